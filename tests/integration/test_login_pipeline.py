"""The upstream login, pipelined once the server has shown it may be.

A session's setup costs round trips to the mail server: greeting, CAPA,
USER, PASS.  Once a server's CAPA offered PIPELINING, the tenant proxy sends
CAPA and the login together on later sessions.  These tests use scripted
servers that note, for each command, whether it had arrived before the
server answered the command in front of it, and check:

* the first session learns (one command at a time), later ones pipeline,
  for USER/PASS and for AUTH PLAIN;
* a server that stops offering PIPELINING is answered one command at a time
  again from the next session on;
* with STLS, no credential is ever sent before TLS: only the CAPA after the
  handshake carries the login;
* a rejected pipelined login fails cleanly with -ERR [AUTH];
* the answer to a client's CAPA (shared by the sessions of a tenant) still
  follows a server whose CAPA changed between sessions;
* a server that drops the pipelined mechanism fails that one login as
  temporary (not as bad credentials), and the next session adapts.
"""

import select
import socket
import ssl
import threading

import pytest

import tpmail_harness as th
from tpmail_harness import Pop3, start_tpmaild, teardown_tpmaild


class Conn:
    """Line reader over a socket that may become TLS midway."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def readline(self, timeout=30):
        """The next line, or None when the peer closed or was silent."""
        while b"\r\n" not in self.buf:
            pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
            if not pending and not select.select([self.sock], [], [], timeout)[0]:
                return None                          # nothing within timeout
            d = self.sock.recv(4096)
            if not d:
                return None                          # closed
            self.buf += d
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def send(self, data):
        self.sock.sendall(data)


class Server:
    """A scripted POP3 server.  ``capa`` lists its capability lines (read on
    every CAPA, so a test can change them); ``tls`` a server SSLContext for
    STLS.  Each session's record: [(command, arrived_early, in_tls)], where
    arrived_early means the command was there before the reply to the one in
    front of it was sent."""

    def __init__(self, capa, tls=None, pass_reply=b"+OK Logged in.\r\n"):
        self.capa = list(capa)
        self.tls = tls
        self.pass_reply = pass_reply
        self.user_reply = b"+OK\r\n"
        self.sessions = []
        self.lock = threading.Lock()
        self.up = th.ScriptedUpstream(self._script)
        self.port = self.up.port

    def _script(self, c, _readline):
        rec = []
        with self.lock:
            self.sessions.append(rec)
        conn = Conn(c)
        conn.send(b"+OK scripted ready\r\n")
        in_tls = False
        while True:
            line = conn.readline()
            if line is None:
                return
            cmd = line.split(b" ")[0].upper()
            # What came with it: the next command, if it is already here.
            # Wait a little for it, so that a proxy which does not pipeline
            # is seen as such, not just as slow.
            early = b"\r\n" in conn.buf or bool(
                select.select([conn.sock], [], [], 0.3 if cmd == b"CAPA" else 0)[0])
            rec.append((cmd, early, in_tls))
            if cmd == b"CAPA":
                conn.send(b"+OK\r\n" + b"".join(l + b"\r\n" for l in self.capa) + b".\r\n")
            elif cmd == b"STLS" and self.tls is not None and not in_tls:
                conn.send(b"+OK begin TLS\r\n")
                conn.sock = self.tls.wrap_socket(conn.sock, server_side=True)
                in_tls = True
            elif cmd == b"USER":
                conn.send(self.user_reply)
            elif cmd == b"PASS" or cmd == b"AUTH":
                conn.send(self.pass_reply)
            elif cmd == b"STAT":
                conn.send(b"+OK 0 0\r\n")
            elif cmd == b"QUIT":
                conn.send(b"+OK bye\r\n")
                return
            else:
                conn.send(b"-ERR unknown\r\n")

    def login_of(self, i):
        """Session i's commands up to the login's end, with (early, in_tls)."""
        out = []
        for cmd, early, in_tls in self.sessions[i]:
            out.append((cmd.decode(), early, in_tls))
            if cmd in (b"PASS", b"AUTH"):
                break
        return out

    def close(self):
        self.up.close()


def pipelined(login):
    """Did the login go out with CAPA (CAPA answered with the rest there)?"""
    return login[0][0] == "CAPA" and login[0][1] is True


@pytest.fixture(scope="module")
def dovecot_cert(dovecot):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(dovecot.cert_file, dovecot.key_file)
    return ctx


@pytest.fixture(scope="module")
def servers(bins, dovecot, dovecot_cert, tmp_path_factory):
    sv = {
        "user": Server([b"USER", b"PIPELINING", b"UIDL"]),
        "plain": Server([b"SASL PLAIN", b"PIPELINING"]),
        "nopipe": Server([b"USER", b"UIDL"]),
        "stls": Server([b"STLS", b"USER", b"PIPELINING"], tls=dovecot_cert),
        "rejected": Server([b"USER", b"PIPELINING"], pass_reply=b"-ERR [AUTH] no\r\n"),
        "capa": Server([b"USER", b"PIPELINING", b"TOP", b"UIDL"]),
        "switch": Server([b"USER", b"SASL PLAIN", b"PIPELINING"]),
    }
    extra = {"stls": dict(starttls_enable="true", starttls_required="true",
                          extra={"mail.pop3.ssl.cafile": dovecot.ca_file})}
    dests = {"provider": [th.pop3_dest("d-" + n, "u", "p", s.port, **extra.get(n, {}))
                          for n, s in sv.items()]}
    crs = {"pipe.yaml": [th.cr("pl-" + n, "d-" + n) for n in sv]}
    t = start_tpmaild(bins, tmp_path_factory.mktemp("tpmaild-pl"), crs, dests,
                      ["--connect-timeout", "5", "--auth-timeout", "10"],
                      ["pl-" + n for n in sv])
    t.servers = sv
    yield t
    try:
        teardown_tpmaild(t)
    finally:
        for s in sv.values():
            s.close()


def session(t, name):
    c = Pop3(t.port("pl-" + name), timeout=20)
    try:
        assert c.greeting.startswith(b"+OK"), c.greeting
        assert c.cmd("STAT") == b"+OK 0 0\r\n"
        assert c.cmd("QUIT").startswith(b"+OK")
    finally:
        c.close()


@pytest.mark.parametrize("name,login", [("user", ["CAPA", "USER", "PASS"]),
                                        ("plain", ["CAPA", "AUTH"])])
def test_first_session_learns_later_ones_pipeline(servers, name, login):
    sv = servers.servers[name]
    for _ in range(3):
        session(servers, name)
    logins = [sv.login_of(i) for i in range(3)]
    assert [[c for c, _, _ in l] for l in logins] == [login] * 3, logins
    assert not pipelined(logins[0]), logins[0]
    assert pipelined(logins[1]) and pipelined(logins[2]), logins
    if name == "user":
        # USER and PASS went out together as well
        assert logins[1][1][1] is True, logins[1]


def test_server_that_stops_pipelining(servers):
    sv = servers.servers["user"]
    sv.capa = [b"USER", b"UIDL"]          # no PIPELINING any more
    n = len(sv.sessions)
    session(servers, "user")              # learned before: still pipelined
    session(servers, "user")              # learned from the last CAPA: not
    a, b = sv.login_of(n), sv.login_of(n + 1)
    assert pipelined(a), a
    assert not pipelined(b), b
    assert [c for c, _, _ in b] == ["CAPA", "USER", "PASS"], b


def test_server_never_offering_pipelining(servers):
    sv = servers.servers["nopipe"]
    for _ in range(3):
        session(servers, "nopipe")
    for i in range(3):
        assert not pipelined(sv.login_of(i)), sv.login_of(i)


def test_stls_never_sends_credentials_before_tls(servers):
    sv = servers.servers["stls"]
    for _ in range(3):
        session(servers, "stls")
    for i in range(3):
        login = sv.login_of(i)
        assert [c for c, _, _ in login] == ["CAPA", "STLS", "CAPA", "USER", "PASS"], login
        assert [tls for _, _, tls in login] == [False, False, True, True, True], login
        # the CAPA in clear was answered before anything else was sent
        assert login[0][1] is False, login
    assert not sv.login_of(0)[2][1], sv.login_of(0)
    assert sv.login_of(1)[2][1] and sv.login_of(2)[2][1], [sv.login_of(i) for i in (1, 2)]


def test_rejected_pipelined_login(servers):
    sv = servers.servers["rejected"]
    for i in range(3):
        c = Pop3(servers.port("pl-rejected"), timeout=20)
        assert c.greeting.startswith(b"-ERR [AUTH]"), c.greeting
        c.wait_closed(15)
        c.close()
    assert not pipelined(sv.login_of(0))
    # learned from the first CAPA even though its login failed
    assert pipelined(sv.login_of(1)) and pipelined(sv.login_of(2))


def client_capa(t, name):
    c = Pop3(t.port("pl-" + name), timeout=20)
    try:
        assert c.greeting.startswith(b"+OK"), c.greeting
        st, raw = c.cmd_multi("CAPA")
        assert st.startswith(b"+OK"), st
        assert c.cmd("QUIT").startswith(b"+OK")
        return raw.split(b"\r\n")
    finally:
        c.close()


def test_client_capa_follows_the_server(servers):
    sv = servers.servers["capa"]
    first = client_capa(servers, "capa")
    assert b"TOP" in first and b"UIDL" in first, first
    assert client_capa(servers, "capa") == first          # the shared answer
    sv.capa = [b"USER", b"PIPELINING", b"UIDL", b"EXPIRE 30"]
    changed = client_capa(servers, "capa")
    assert b"TOP" not in changed and b"EXPIRE 30" in changed, changed
    sv.capa = [b"USER", b"PIPELINING", b"TOP", b"UIDL"]
    assert client_capa(servers, "capa") == first


def test_server_that_drops_the_pipelined_mechanism(servers):
    sv = servers.servers["switch"]
    session(servers, "switch")                     # learns USER, pipelining
    session(servers, "switch")                     # pipelined
    assert pipelined(sv.login_of(1)), sv.login_of(1)
    sv.capa = [b"SASL PLAIN", b"PIPELINING"]       # USER gone
    sv.user_reply = b"-ERR USER is not offered\r\n"
    c = Pop3(servers.port("pl-switch"), timeout=20)
    try:
        # the pipelined USER was refused: the server changed, not the password
        assert c.greeting.startswith(b"-ERR [SYS/TEMP]"), c.greeting
    finally:
        c.close()
    session(servers, "switch")                     # AUTH PLAIN, one at a time
    last = sv.login_of(len(sv.sessions) - 1)
    assert [cmd for cmd, _, _ in last] == ["CAPA", "AUTH"], last
    assert not pipelined(last), last
