"""Relaying through a tenant endpoint: the seed session, curl, poplib,
tenant isolation, DELE commit semantics, pipelining, local answers."""

import base64
import poplib
import re
import socket
import time

import pytest

import tpmail_harness as th
from tpmail_harness import Pop3, list_lines, multiline_body, wait_for
from dovecot import dot_stuff


@pytest.fixture
def std(standard_tpmaild, mailboxes):
    return standard_tpmaild


def test_seed_session_raw_socket_no_credentials(std, mailboxes):
    """The seed's session as typed in telnet: list, retr 1, retr 2, quit."""
    msgs = mailboxes["alice"]
    c = Pop3(std.port("mail"))
    assert c.greeting.startswith(b"+OK"), c.greeting
    assert c.greeting.endswith(b"\r\n")

    c.send(b"list\r\n")
    st = c.readline()
    assert st.startswith(b"+OK"), st
    assert c.read_multiline() == list_lines(msgs)

    c.send(b"retr 1\r\n")
    st = c.readline()
    assert st.startswith(b"+OK"), st
    raw = c.read_multiline()
    assert raw.endswith(b"\r\n.\r\n")
    assert raw == dot_stuff(msgs[0])

    c.send(b"retr 2\r\n")
    st = c.readline()
    assert st.startswith(b"+OK"), st
    raw = c.read_multiline()
    # dot-stuffed exactly as Dovecot sends it
    assert b"\r\n..hidden\r\n" in raw and b"\r\n...double\r\n" in raw and b"\r\n..\r\n" in raw
    assert raw == dot_stuff(msgs[1])
    assert multiline_body(raw) == msgs[1]

    c.send(b"quit\r\n")
    st = c.readline()
    assert st.startswith(b"+OK"), st
    assert c.wait_closed(10) == b""
    c.close()


def test_curl_list_and_retr(std, mailboxes):
    msgs = mailboxes["alice"]
    port = std.port("mail")
    r = th.curl(["-u", "anyone:anything", "pop3://127.0.0.1:%d/" % port])
    assert r.returncode == 0, r.stderr
    assert r.stdout == list_lines(msgs)[:-3], r.stdout
    for i in (1, 2):
        r = th.curl(["-u", "anyone:anything", "pop3://127.0.0.1:%d/%d" % (port, i)])
        assert r.returncode == 0, r.stderr
        assert r.stdout == msgs[i - 1]


def test_curl_big_message(std, mailboxes):
    big = mailboxes["alice"][2]
    assert len(big) >= 3 * 1024 * 1024
    r = th.curl(["-u", "x:y", "pop3://127.0.0.1:%d/3" % std.port("mail")], timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout) == len(big)
    assert r.stdout == big


def _poplib_snapshot(p, n):
    out = {"stat": p.stat(), "list": p.list()[1], "uidl": p.uidl()[1]}
    for i in range(1, n + 1):
        out["top%d" % i] = p.top(i, 2)[1]
        out["retr%d" % i] = p.retr(i)[1]
        out["uidl%d" % i] = p.uidl(i)
        out["list%d" % i] = p.list(i)
    return out


def test_poplib_matches_direct_dovecot(std, dovecot, mailboxes):
    n = len(mailboxes["alice"])
    d = poplib.POP3(dovecot.host, dovecot.pop3_port, timeout=30)
    d.user("alice")
    d.pass_(dovecot.users["alice"])
    direct = _poplib_snapshot(d, n)
    d.quit()

    p = poplib.POP3(th.HOST, std.port("mail"), timeout=30)
    # credentials sent by the client are answered locally
    assert p.user("whoever").startswith(b"+OK")
    assert p.pass_("whatever").startswith(b"+OK")
    via = _poplib_snapshot(p, n)
    assert p.quit().startswith(b"+OK")

    assert direct["stat"] == (n, sum(map(len, mailboxes["alice"])))
    for k in direct:
        assert via[k] == direct[k], k
    assert b"".join(l + b"\r\n" for l in via["retr2"]) == mailboxes["alice"][1]


def test_local_auth_commands_answered_ok(std, mailboxes):
    c = Pop3(std.port("mail"))
    assert c.greeting.startswith(b"+OK")
    assert c.cmd("USER nobody-in-particular").startswith(b"+OK")
    assert c.cmd("PASS wrong-on-purpose").startswith(b"+OK")
    assert c.cmd("APOP someone 0123456789abcdef0123456789abcdef").startswith(b"+OK")
    assert c.cmd("AUTH PLAIN " + base64.b64encode(b"\0x\0y").decode()).startswith(b"+OK")
    st = c.cmd("STAT")
    m = th.STAT_RE.match(st)
    assert m, st
    assert int(m.group(1)) == len(mailboxes["alice"])
    assert c.cmd("QUIT").startswith(b"+OK")
    c.close()


def test_capa_derived_from_upstream(std, mailboxes):
    c = Pop3(std.port("mail"))
    st, body = c.cmd_multi("CAPA")
    assert st.startswith(b"+OK"), st
    caps = [l.split(b" ")[0].upper() for l in body.split(b"\r\n")[:-2]]
    # Dovecot offers TOP and UIDL: the derived list keeps them
    assert b"TOP" in caps and b"UIDL" in caps, body
    # the client side is plain POP3: STLS from upstream must not leak through
    assert b"STLS" not in caps, body
    # the session still works after CAPA
    assert th.STAT_RE.match(c.cmd("STAT"))
    c.close()


@pytest.mark.parametrize("svc,user,other", [
    ("shared-tenant-a", "tenant-a-user", "tenant-b-user"),
    ("shared-tenant-b", "tenant-b-user", "tenant-a-user"),
    ("mail", "alice", "tenant-a-user"),
])
def test_tenant_sees_own_mailbox(std, mailboxes, svc, user, other):
    mine, theirs = mailboxes[user], mailboxes[other]
    c = Pop3(std.port(svc))
    assert c.greeting.startswith(b"+OK")
    st = c.cmd("STAT")
    assert st.startswith(b"+OK %d %d" % (len(mine), sum(map(len, mine)))), st
    for i, m in enumerate(mine, 1):
        st, raw = c.cmd_multi("RETR %d" % i)
        assert st.startswith(b"+OK"), st
        assert multiline_body(raw) == m
        assert multiline_body(raw) not in theirs
    c.cmd("QUIT")
    c.close()


def test_tenant_ports_distinct(std):
    svcs = std.services()
    ports = {n: svcs[n]["listen"] for n in ("mail", "shared-tenant-a", "shared-tenant-b")}
    assert len(set(ports.values())) == 3, ports
    for n in ports:
        assert ports[n].startswith("127.0.0.1:"), ports
    assert svcs["shared-tenant-a"]["tenant"] == "tenant-a"
    assert svcs["shared-tenant-b"]["tenant"] == "tenant-b"
    assert svcs["mail"]["tenant"] is None
    assert svcs["shared-tenant-a"]["cr"] == "shared"


# ---------------------------------------------------------------- DELE

def _wait_dovecot_disconnect(dovecot_log, user, count, timeout=10):
    """Wait until Dovecot logged ``count`` session ends of ``user`` since the
    test began (the upstream session is gone, commit or not)."""
    pat = re.compile(r"pop3\(%s\)<[^>]*><[^>]*>: Info: (Disconnected|Connection closed)" % re.escape(user))
    return wait_for(lambda: len(pat.findall(dovecot_log())) >= count, timeout,
                    what="dovecot to log the end of %d session(s) of %s" % (count, user))


def test_dele_quit_commits(std, dovecot, mailboxes, dovecot_log):
    msgs = mailboxes["tenant-a-user"]
    c = Pop3(std.port("shared-tenant-a"))
    assert c.cmd("DELE 1").startswith(b"+OK")
    assert c.cmd("QUIT").startswith(b"+OK")
    c.wait_closed(10)
    c.close()
    _wait_dovecot_disconnect(dovecot_log, "tenant-a-user", 1)
    assert dovecot.messages("tenant-a-user") == msgs[1:]


@pytest.mark.parametrize("how", ["fin", "rst"])
def test_dele_without_quit_commits_nothing(std, dovecot, mailboxes, dovecot_log, how):
    msgs = mailboxes["tenant-b-user"]
    c = Pop3(std.port("shared-tenant-b"))
    assert c.cmd("DELE 1").startswith(b"+OK")
    assert c.cmd("DELE 2").startswith(b"+OK")
    st = c.cmd("STAT")
    assert st.startswith(b"+OK 1 "), st   # the deletions were really relayed
    if how == "rst":
        c.abort()
    else:
        c.close()
    _wait_dovecot_disconnect(dovecot_log, "tenant-b-user", 1)
    assert dovecot.count("tenant-b-user") == len(msgs)
    assert dovecot.messages("tenant-b-user") == msgs
    # and a new session still sees all of them
    c = Pop3(std.port("shared-tenant-b"))
    assert c.cmd("STAT").startswith(b"+OK %d " % len(msgs))
    c.cmd("QUIT")
    c.close()


# ---------------------------------------------------------------- pipelining

def test_pipelining_relayed(std, mailboxes):
    msgs = mailboxes["alice"]
    c = Pop3(std.port("mail"))
    c.send(b"STAT\r\nLIST\r\nRETR 1\r\nUIDL\r\n")
    st = c.readline()
    assert st.startswith(b"+OK %d %d" % (len(msgs), sum(map(len, msgs)))), st
    st = c.readline()
    assert st.startswith(b"+OK"), st
    assert c.read_multiline() == list_lines(msgs)
    st = c.readline()
    assert st.startswith(b"+OK"), st
    assert c.read_multiline() == dot_stuff(msgs[0])
    st = c.readline()
    assert st.startswith(b"+OK"), st
    uidl = c.read_multiline()
    lines = uidl.split(b"\r\n")[:-2]
    assert [int(l.split()[0]) for l in lines] == list(range(1, len(msgs) + 1)), uidl
    c.cmd("QUIT")
    c.close()


def test_pipelining_local_between_relayed(std, mailboxes):
    msgs = mailboxes["alice"]
    c = Pop3(std.port("mail"))
    c.send(b"LIST\r\nCAPA\r\nSTAT\r\nUSER x\r\nRETR 2\r\nNOOP\r\n")
    st = c.readline()
    assert st.startswith(b"+OK"), st
    assert c.read_multiline() == list_lines(msgs)
    st = c.readline()
    assert st.startswith(b"+OK"), st
    capa = c.read_multiline()
    caps = capa.split(b"\r\n")[:-2]
    assert caps and not any(re.match(rb"^\d+ \d+$", l) for l in caps), capa
    assert b"UIDL" in [l.split(b" ")[0].upper() for l in caps], capa
    st = c.readline()
    assert th.STAT_RE.match(st) and st.startswith(b"+OK %d " % len(msgs)), st
    st = c.readline()
    assert st.startswith(b"+OK"), st          # USER, answered locally
    st = c.readline()
    assert st.startswith(b"+OK"), st
    assert c.read_multiline() == dot_stuff(msgs[1])
    st = c.readline()
    assert st.startswith(b"+OK"), st          # NOOP
    c.send(b"QUIT\r\n")
    assert c.readline().startswith(b"+OK")
    c.close()


def test_pipelined_quit_after_retr_of_big_message(std, mailboxes):
    """A client that pipelines RETR of the big message and QUIT, then reads:
    the whole message arrives before the QUIT answer."""
    big = mailboxes["alice"][2]
    c = Pop3(std.port("mail"))
    c.send(b"RETR 3\r\nQUIT\r\n")
    st = c.readline()
    assert st.startswith(b"+OK"), st
    assert c.read_multiline() == dot_stuff(big)
    assert c.readline().startswith(b"+OK")
    c.close()


def test_split_command_bytes(std, mailboxes):
    """A command arriving byte by byte still works."""
    c = Pop3(std.port("mail"))
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for b in b"STAT\r\n":
        c.send(bytes([b]))
    st = c.readline()
    assert st.startswith(b"+OK %d " % len(mailboxes["alice"])), st
    c.close()


# ---------------------------------------------------------------- byte-exact relay

def _session_rawlog(dovecot, dovecot_log, user, n=1):
    _wait_dovecot_disconnect(dovecot_log, user, n)
    logs = dovecot.rawlog(user)
    assert len(logs) == n, logs
    return logs


def test_upstream_receives_client_bytes_exactly(std, dovecot, mailboxes, dovecot_log):
    """What Dovecot receives after login is exactly the client's relayed
    command lines (case and spacing kept); locally answered commands and
    credentials never reach it."""
    c = Pop3(std.port("mail"))
    sent = [b"list", b"user someone", b"retr 1", b"pass hunter2", b"StAt", b"capa",
            b"top 2 1", b"uidl 1", b"noop", b"quit"]
    for line in sent:
        c.send(line + b"\r\n")
        st = c.readline()
        assert st.startswith(b"+OK"), (line, st)
        if line in (b"list", b"retr 1", b"capa", b"top 2 1"):
            c.read_multiline()
    c.wait_closed(10)
    c.close()
    logs = _session_rawlog(dovecot, dovecot_log, "alice")
    got = logs[0]["in"]
    want = b"list\r\nretr 1\r\nStAt\r\ntop 2 1\r\nuidl 1\r\nnoop\r\nquit\r\n"
    assert got == want, got
    assert b"hunter2" not in got and b"someone" not in got


def test_abrupt_close_sends_no_quit_upstream(std, dovecot, mailboxes, dovecot_log):
    c = Pop3(std.port("shared-tenant-a"))
    assert c.cmd("DELE 1").startswith(b"+OK")
    c.close()
    logs = _session_rawlog(dovecot, dovecot_log, "tenant-a-user")
    assert logs[0]["in"] == b"DELE 1\r\n", logs[0]["in"]
    assert dovecot.count("tenant-a-user") == len(mailboxes["tenant-a-user"])


def test_single_line_replies_with_arguments(std, mailboxes):
    """LIST n / UIDL n are single-line, -ERR replies are single-line: a
    proxy that waits for a '.' after them would hang here."""
    msgs = mailboxes["alice"]
    c = Pop3(std.port("mail"))
    c.send(b"LIST 1\r\nLIST 99\r\nUIDL 2\r\nRETR 99\r\nTOP 99 0\r\nTOP 1 0\r\nSTAT\r\n")
    st = c.readline()
    assert st == b"+OK 1 %d\r\n" % len(msgs[0]), st
    st = c.readline()
    assert st.startswith(b"-ERR"), st
    st = c.readline()
    assert st.startswith(b"+OK 2 "), st
    st = c.readline()
    assert st.startswith(b"-ERR"), st
    st = c.readline()
    assert st.startswith(b"-ERR"), st
    st = c.readline()
    assert st.startswith(b"+OK"), st
    hdr = multiline_body(c.read_multiline())
    assert hdr == msgs[0].split(b"\r\n\r\n")[0] + b"\r\n\r\n", hdr
    st = c.readline()
    assert st.startswith(b"+OK %d %d" % (len(msgs), sum(map(len, msgs)))), st
    c.close()


def test_slow_reader_big_message(std, mailboxes):
    """A client that stops reading mid-RETR and resumes gets every byte."""
    big = mailboxes["alice"][2]
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    s.settimeout(th.IO_TIMEOUT)
    s.connect((th.HOST, std.port("mail")))
    c = Pop3.__new__(Pop3)
    c.sock, c.buf = s, b""
    assert c.readline().startswith(b"+OK")
    c.send(b"RETR 3\r\nSTAT\r\n")
    st = c.readline()
    assert st.startswith(b"+OK"), st
    c._fill()
    time.sleep(1.5)                      # upstream and proxy buffers fill up
    raw = c.read_multiline()
    assert raw == dot_stuff(big)
    assert c.readline().startswith(b"+OK 3 ")
    c.close()


def test_concurrent_sessions(std, mailboxes):
    import threading
    results = {}

    def worker(i, svc, user, n):
        try:
            c = Pop3(std.port(svc), timeout=60)
            st, raw = c.cmd_multi("RETR %d" % n)
            ok = multiline_body(raw) == mailboxes[user][n - 1]
            c.cmd("QUIT")
            c.close()
            results[i] = ok
        except Exception as e:  # noqa: BLE001
            results[i] = repr(e)
    jobs = [(i, "mail", "alice", 3) for i in range(6)]
    jobs += [(10 + i, "shared-tenant-a", "tenant-a-user", 2) for i in range(4)]
    jobs += [(20 + i, "shared-tenant-b", "tenant-b-user", 3) for i in range(4)]
    threads = [threading.Thread(target=worker, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert results == {j[0]: True for j in jobs}, results


@pytest.mark.parametrize("opts", [["--login-options", "AUTH=PLAIN"],
                                  ["--login-options", "AUTH=LOGIN"],
                                  ["--login-options", "AUTH=*"],
                                  []])
def test_curl_login_variants(std, mailboxes, opts):
    """curl's SASL PLAIN / LOGIN and default login against the local answers."""
    r = th.curl(["-u", "someone:secret"] + opts +
                ["pop3://127.0.0.1:%d/2" % std.port("mail")])
    assert r.returncode == 0, r.stderr
    assert r.stdout == mailboxes["alice"][1]


def test_local_commands_case_insensitive(std, mailboxes):
    c = Pop3(std.port("mail"))
    assert c.cmd("user x").startswith(b"+OK")
    assert c.cmd("pass y").startswith(b"+OK")
    st, body = c.cmd_multi("capa")
    assert st.startswith(b"+OK") and body.endswith(b".\r\n"), (st, body)
    assert c.cmd("stat").startswith(b"+OK %d " % len(mailboxes["alice"]))
    c.close()


def test_auth_login_exchange(std, mailboxes):
    """A client doing SASL LOGIN step by step is walked through it."""
    c = Pop3(std.port("mail"))
    st = c.cmd("AUTH LOGIN")
    if st.startswith(b"+ "):
        st = c.cmd(base64.b64encode(b"someone"))
        assert st.startswith(b"+ "), st
        st = c.cmd(base64.b64encode(b"secret"))
    assert st.startswith(b"+OK"), st
    assert c.cmd("STAT").startswith(b"+OK %d " % len(mailboxes["alice"]))
    c.close()


def test_deep_pipeline(std, mailboxes):
    """More pipelined commands than any sane queue: all answered, in order."""
    msgs = mailboxes["alice"]
    c = Pop3(std.port("mail"), timeout=60)
    n = 300
    c.send(b"".join(b"LIST %d\r\nRETR 1\r\n" % (i % 2 + 1) for i in range(n)) + b"QUIT\r\n")
    for i in range(n):
        st = c.readline()
        k = i % 2 + 1
        assert st == b"+OK %d %d\r\n" % (k, len(msgs[k - 1])), (i, st)
        st = c.readline()
        assert st.startswith(b"+OK"), (i, st)
        assert c.read_multiline() == dot_stuff(msgs[0]), i
    assert c.readline().startswith(b"+OK")
    c.close()
