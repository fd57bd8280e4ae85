"""Upstream variants: plain, STLS, POP3S, CA checks, login methods, and
upstream failures (wrong password, Dovecot down)."""

import re
import socket

import pytest

import tpmail_harness as th
from tpmail_harness import Pop3, multiline_body
from tpmail_harness import USERS, start_tpmaild, teardown_tpmaild, standard_destinations


_HELD = []   # sockets kept bound for the module's lifetime


def _variants(dc):
    """name -> (destination, expectation).  expectation: "ok", "ok-tls",
    "ok-plain", or an -ERR prefix."""
    pw = USERS["alice"]
    P = dc.pop3_port
    S = dc.pop3s_port
    # a port that refuses connections: bound (so nothing else, like this
    # very tpmaild's port range, can take it) but not listening
    hold = socket.socket()
    hold.bind((th.HOST, 0))
    _HELD.append(hold)
    closed_port = hold.getsockname()[1]
    v = {
        "up-plain": (th.pop3_dest("d-plain", "alice", pw, P), "ok-plain"),
        "up-stls": (th.pop3_dest("d-stls", "alice", pw, P, starttls_enable="true",
                                 starttls_required="true",
                                 extra={"mail.pop3.ssl.cafile": dc.ca_file}), "ok-tls"),
        "up-stls-localhost": (th.pop3_dest("d-stls-lh", "alice", pw, P, host="localhost",
                                           starttls_enable="true", starttls_required="true",
                                           extra={"mail.pop3.ssl.cafile": dc.ca_file}), "ok-tls"),
        "up-stls-wrongca": (th.pop3_dest("d-stls-wca", "alice", pw, P, starttls_enable="true",
                                         starttls_required="true",
                                         extra={"mail.pop3.ssl.cafile": dc.wrong_ca_file}),
                            "-ERR [SYS/TEMP]"),
        "up-pop3s": (th.pop3_dest("d-pop3s", "alice", pw, S, protocol="pop3s",
                                  extra={"mail.pop3s.ssl.cafile": dc.ca_file}), "ok-tls"),
        "up-pop3s-localhost": (th.pop3_dest("d-pop3s-lh", "alice", pw, S, host="localhost",
                                            protocol="pop3s",
                                            extra={"mail.pop3s.ssl.cafile": dc.ca_file}), "ok-tls"),
        "up-pop3s-wrongca": (th.pop3_dest("d-pop3s-wca", "alice", pw, S, protocol="pop3s",
                                          extra={"mail.pop3s.ssl.cafile": dc.wrong_ca_file}),
                             "-ERR [SYS/TEMP]"),
        # default CA store: the test CA is not in it
        "up-pop3s-systemca": (th.pop3_dest("d-pop3s-sys", "alice", pw, S, protocol="pop3s"),
                              "-ERR [SYS/TEMP]"),
        # implicit TLS towards a plain POP3 port: handshake fails
        "up-pop3s-on-plain": (th.pop3_dest("d-pop3s-plain", "alice", pw, P, protocol="pop3s",
                                           extra={"mail.pop3s.ssl.cafile": dc.ca_file}),
                              "-ERR [SYS/TEMP]"),
        "up-wrongpw": (th.pop3_dest("d-wrongpw", "alice", "not-the-password", P), "-ERR [AUTH]"),
        "up-unknownuser": (th.pop3_dest("d-unknown", "no-such-user", "x", P), "-ERR [AUTH]"),
        "up-closedport": (th.pop3_dest("d-closed", "alice", pw, closed_port), "-ERR [SYS/TEMP]"),
        "up-apop": (th.pop3_dest("d-apop", "alice", pw, P, apop_enable="true"), "ok-plain"),
        "up-apop-wrongpw": (th.pop3_dest("d-apop-wpw", "alice", "nope", P, apop_enable="true"),
                            "-ERR [AUTH]"),
        "up-sasl-plain": (th.pop3_dest("d-sasl-plain", "alice", pw, P, auth_mechanisms="PLAIN"),
                          "ok-plain"),
        "up-sasl-login": (th.pop3_dest("d-sasl-login", "alice", pw, P, auth_mechanisms="LOGIN"),
                          "ok-plain"),
        "up-sasl-plain-wrongpw": (th.pop3_dest("d-sasl-wpw", "alice", "nope", P,
                                               auth_mechanisms="PLAIN"), "-ERR [AUTH]"),
        # STLS + SASL LOGIN together
        "up-stls-sasl-login": (th.pop3_dest("d-stls-login", "alice", pw, P, starttls_enable="true",
                                            starttls_required="true", auth_mechanisms="LOGIN",
                                            extra={"mail.pop3.ssl.cafile": dc.ca_file}), "ok-tls"),
    }
    if dc.nostls_supported:
        N, NH = dc.nostls_port, dc.nostls_host
        v["up-stls-required-absent"] = (
            th.pop3_dest("d-stls-req-abs", "alice", pw, N, host=NH, starttls_enable="true",
                         starttls_required="true", extra={"mail.pop3.ssl.cafile": dc.ca_file}),
            "-ERR [SYS/TEMP]")
        v["up-stls-optional-absent"] = (
            th.pop3_dest("d-stls-opt-abs", "alice", pw, N, host=NH, starttls_enable="true",
                         extra={"mail.pop3.ssl.cafile": dc.ca_file}),
            "ok-plain")
    return v


VARIANT_NAMES = [
    "up-plain", "up-stls", "up-stls-localhost", "up-stls-wrongca", "up-pop3s",
    "up-pop3s-localhost", "up-pop3s-wrongca", "up-pop3s-systemca", "up-pop3s-on-plain",
    "up-wrongpw", "up-unknownuser", "up-closedport", "up-apop", "up-apop-wrongpw",
    "up-sasl-plain", "up-sasl-login", "up-sasl-plain-wrongpw", "up-stls-sasl-login",
    "up-stls-required-absent", "up-stls-optional-absent",
]


@pytest.fixture(scope="module")
def variants_tpmaild(bins, dovecot, tmp_path_factory):
    v = _variants(dovecot)
    dests = standard_destinations(dovecot)
    dests["provider"] = dests["provider"] + [d for d, _ in v.values()]
    crs = {"variants.yaml": [th.cr(n, d["Name"]) for n, (d, _) in v.items()],
           "mail.yaml": th.cr("mail", "dest-a")}
    t = start_tpmaild(bins, tmp_path_factory.mktemp("tpmaild-up"), crs, dests,
               ["--connect-timeout", "5", "--auth-timeout", "10"], list(v) + ["mail"])
    t.variants = v
    yield t
    try:
        teardown_tpmaild(t)
    except AssertionError as e:
        pytest.fail("%s\n--- tpmaild log tail ---\n%s" % (e, t.log_text()[-6000:]), pytrace=False)
    finally:
        while _HELD:
            _HELD.pop().close()


LOGIN_RE = re.compile(r"pop3-login: Info: Login: user=<([^>]*)>, method=([A-Z0-9-]+), "
                      r"rip=[^,]*, lip=[^,]*, mpid=\d+, ([^\n]*)")


@pytest.mark.parametrize("name", VARIANT_NAMES)
def test_upstream_variant(variants_tpmaild, dovecot, mailboxes, dovecot_log, name):
    t = variants_tpmaild
    if name not in t.variants:
        # only the no-STLS listener variants can be missing; the fixture
        # always provides it on Linux, so this is a real failure
        pytest.fail("variant %s needs the no-STLS Dovecot listener" % name)
    dest, expect = t.variants[name]
    c = Pop3(t.port(name), timeout=30)
    if expect.startswith("-ERR"):
        assert c.greeting.startswith(expect.encode()), (name, c.greeting)
        # and the proxy closes the connection
        c.wait_closed(15)
        c.close()
        assert t.services()[name]["state"] == "running"
        return
    assert c.greeting.startswith(b"+OK"), (name, c.greeting)
    msgs = mailboxes["alice"]
    st = c.cmd("STAT")
    assert st.startswith(b"+OK %d %d" % (len(msgs), sum(map(len, msgs)))), st
    st, raw = c.cmd_multi("RETR 2")
    assert multiline_body(raw) == msgs[1]
    st, raw = c.cmd_multi("RETR 3")          # several MB, through TLS too
    assert st.startswith(b"+OK"), st
    assert multiline_body(raw) == msgs[2]
    assert c.cmd("QUIT").startswith(b"+OK")
    c.close()
    # What did Dovecot see?  "TLS" for STLS/POP3S logins; the method for
    # APOP and SASL LOGIN (USER/PASS and SASL PLAIN both log PLAIN).
    th.wait_for(lambda: LOGIN_RE.search(dovecot_log()), 5, what="dovecot login line")
    logins = [m for m in LOGIN_RE.findall(dovecot_log()) if m[0] == "alice"]
    assert len(logins) == 1, logins
    _, method, rest = logins[0]
    if expect == "ok-tls":
        assert "TLS" in rest, rest
    else:
        assert "TLS" not in rest, rest
    want_method = {"up-apop": "APOP", "up-sasl-login": "LOGIN",
                   "up-stls-sasl-login": "LOGIN"}.get(name, "PLAIN")
    assert method == want_method, logins[0]


FAILING_VARIANTS = [n for n in VARIANT_NAMES
                    if n not in ("up-plain", "up-stls", "up-stls-localhost", "up-pop3s",
                                 "up-pop3s-localhost", "up-apop", "up-sasl-plain",
                                 "up-sasl-login", "up-stls-sasl-login", "up-stls-optional-absent")]


@pytest.mark.parametrize("name", FAILING_VARIANTS)
def test_failed_login_reported_in_status(variants_tpmaild, mailboxes, name):
    """After a failed upstream login, status counts it and its "error" says
    what went wrong in readable text."""
    t = variants_tpmaild
    before = t.services()[name]
    c = Pop3(t.port(name), timeout=30)
    assert c.greeting.startswith(b"-ERR"), c.greeting
    c.wait_closed(15)
    c.close()
    s = th.wait_for(lambda: (lambda s: s if s["sessions_failed"] > before["sessions_failed"]
                             else None)(t.services()[name]), 5, what="sessions_failed to grow")
    err = s.get("error")
    assert isinstance(err, str) and len(err) >= 5 and err.isprintable(), (name, err)


def test_dovecot_down_then_up(variants_tpmaild, dovecot, mailboxes):
    t = variants_tpmaild
    port = t.port("mail")
    with Pop3(port) as c:
        assert c.greeting.startswith(b"+OK")
    dovecot.stop()
    try:
        c = Pop3(port, timeout=30)
        assert c.greeting.startswith(b"-ERR [SYS/TEMP]"), c.greeting
        c.wait_closed(15)
        c.close()
        # the service is still there
        assert t.services()["mail"]["state"] == "running"
    finally:
        dovecot.start()
    c = Pop3(port)
    assert c.greeting.startswith(b"+OK"), c.greeting
    assert c.cmd("STAT").startswith(b"+OK %d " % len(mailboxes["alice"]))
    c.cmd("QUIT")
    c.close()


def test_upstream_lost_mid_session(variants_tpmaild, dovecot, mailboxes):
    """Dovecot goes away under an open session: the client is told and
    disconnected, not left hanging."""
    t = variants_tpmaild
    c = Pop3(t.port("mail"), timeout=30)
    assert c.greeting.startswith(b"+OK")
    assert c.cmd("STAT").startswith(b"+OK")
    dovecot.stop()
    try:
        try:
            c.send(b"STAT\r\n")
        except OSError:
            pass
        rest = c.wait_closed(15)
        assert b"+OK" not in rest, rest
        c.close()
    finally:
        dovecot.start()


# ---------------------------------------------------------------- scripted upstreams

def _scripted(greeting=None, user_reply=b"+OK\r\n", pass_reply=b"+OK Logged in.\r\n"):
    """A minimal POP3 server: greeting, CAPA (USER only), USER, PASS."""
    def script(c, readline):
        if greeting is None:
            return                       # close at once
        c.sendall(greeting)
        if not greeting.startswith(b"+OK"):
            return
        while True:
            line = readline()
            if not line:
                return
            cmd = line.split(b" ")[0].strip().upper()
            if cmd == b"CAPA":
                c.sendall(b"+OK\r\nUSER\r\nUIDL\r\nTOP\r\n.\r\n")
            elif cmd == b"USER":
                c.sendall(user_reply)
            elif cmd == b"PASS":
                c.sendall(pass_reply)
                if not pass_reply.startswith(b"+OK"):
                    continue
            elif cmd == b"STAT":
                c.sendall(b"+OK 0 0\r\n")
            elif cmd == b"QUIT":
                c.sendall(b"+OK bye\r\n")
                return
            else:
                c.sendall(b"-ERR unknown\r\n")
    return script


SCRIPTED_CASES = {
    # name: (script or None for a black hole, expected greeting prefix)
    "blackhole": (None, b"-ERR [SYS/TEMP]"),
    "close-at-once": (_scripted(greeting=None), b"-ERR [SYS/TEMP]"),
    "greeting-err": (_scripted(greeting=b"-ERR server busy\r\n"), b"-ERR [SYS/TEMP]"),
    "garbage-greeting": (_scripted(greeting=b"HTTP/1.1 400 Bad Request\r\n"), b"-ERR [SYS/TEMP]"),
    "pass-rejected": (_scripted(greeting=b"+OK hi\r\n", pass_reply=b"-ERR [AUTH] nope\r\n"),
                      b"-ERR [AUTH]"),
    "pass-rejected-plain": (_scripted(greeting=b"+OK hi\r\n", pass_reply=b"-ERR nope\r\n"),
                            b"-ERR [AUTH]"),
    # beyond the written contract: a temporary failure upstream should not
    # be reported to the client as a rejected login
    "pass-systemp": (_scripted(greeting=b"+OK hi\r\n",
                               pass_reply=b"-ERR [SYS/TEMP] try later\r\n"), b"-ERR [SYS/TEMP]"),
    "works": (_scripted(greeting=b"+OK hi\r\n"), b"+OK"),
}


@pytest.fixture(scope="module")
def scripted_tpmaild(bins, dovecot, tmp_path_factory):
    ups = {n: th.ScriptedUpstream(script) for n, (script, _) in SCRIPTED_CASES.items()}
    dests = {"provider": [th.pop3_dest("d-" + n, "u", "p", u.port) for n, u in ups.items()]}
    crs = {"scripted.yaml": [th.cr("sc-" + n, "d-" + n) for n in ups]}
    t = start_tpmaild(bins, tmp_path_factory.mktemp("tpmaild-sc"), crs, dests,
                      ["--connect-timeout", "2", "--auth-timeout", "2"], ["sc-" + n for n in ups])
    t.upstreams = ups
    yield t
    try:
        teardown_tpmaild(t)
    except AssertionError as e:
        pytest.fail("%s\n--- tpmaild log tail ---\n%s" % (e, t.log_text()[-6000:]), pytrace=False)
    finally:
        for u in ups.values():
            u.close()


@pytest.mark.parametrize("name", list(SCRIPTED_CASES))
def test_scripted_upstream(scripted_tpmaild, name):
    import time
    t = scripted_tpmaild
    expect = SCRIPTED_CASES[name][1]
    t0 = time.monotonic()
    c = Pop3(t.port("sc-" + name), timeout=20)
    took = time.monotonic() - t0
    assert c.greeting.startswith(expect), (name, c.greeting)
    if name == "blackhole":
        # --auth-timeout 2: not the 30 s default
        assert took < 10, took
    if expect == b"+OK":
        assert c.cmd("STAT") == b"+OK 0 0\r\n"
        assert c.cmd("QUIT").startswith(b"+OK")
        sent = bytes(t.upstreams[name].received[-1])
        assert b"USER u\r\n" in sent and b"PASS p\r\n" in sent, sent
    else:
        c.wait_closed(15)
    c.close()
