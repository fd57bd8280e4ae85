"""Limits: line length, NUL bytes, idle timeout, sessions per tenant."""

import socket
import time

import tpmail_harness as th
from tpmail_harness import Pop3, Pop3Closed, wait_for


def _read_reply_or_close(c, timeout=15):
    """First reply line, or b"" if the proxy closed without one."""
    c.sock.settimeout(timeout)
    try:
        return c.readline()
    except (Pop3Closed, ConnectionResetError):
        return b""


def _session_works(port, n):
    c = Pop3(port)
    assert c.greeting.startswith(b"+OK"), c.greeting
    st = c.cmd("STAT")
    assert st.startswith(b"+OK %d " % n), st
    c.cmd("QUIT")
    c.close()


def test_overlong_line_default_limit(tpmaild_factory, mailboxes):
    t = tpmaild_factory()
    port = t.port("mail")
    c = Pop3(port)
    assert c.greeting.startswith(b"+OK")
    try:
        c.send(b"NOOP " + b"A" * 20000 + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = _read_reply_or_close(c)
    assert reply.startswith(b"-ERR"), reply
    c.close()
    # the proxy (and the tenant service) stay up
    assert t.services()["mail"]["state"] == "running"
    _session_works(port, len(mailboxes["alice"]))


def test_max_line_enforced_by_proxy(tpmaild_factory, mailboxes):
    """--max-line 1024: PASS (answered locally, any length of argument) of
    900 bytes is fine, of 2000 bytes is refused: only the line limit can
    tell the two apart."""
    t = tpmaild_factory(args=["--max-line", "1024"])
    port = t.port("mail")
    c = Pop3(port)
    st = c.cmd(b"PASS " + b"p" * 900)
    assert st.startswith(b"+OK"), st
    try:
        c.send(b"PASS " + b"q" * 2000 + b"\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    reply = _read_reply_or_close(c)
    assert reply.startswith(b"-ERR"), reply
    c.close()
    _session_works(port, len(mailboxes["alice"]))


def test_nul_byte_in_command(standard_tpmaild, mailboxes):
    """Dovecot would answer "STAT\\0" with +OK (it stops at the NUL); the
    proxy must refuse the line."""
    port = standard_tpmaild.port("mail")
    c = Pop3(port)
    assert c.greeting.startswith(b"+OK")
    c.send(b"STAT\x00\r\n")
    reply = _read_reply_or_close(c)
    assert reply.startswith(b"-ERR"), reply
    c.close()
    c = Pop3(port)
    c.send(b"RETR 1\x00junk\r\n")
    reply = _read_reply_or_close(c)
    assert reply.startswith(b"-ERR"), reply
    c.close()
    _session_works(port, len(mailboxes["alice"]))


def test_idle_timeout_closes_session(tpmaild_factory, mailboxes):
    t = tpmaild_factory(args=["--idle-timeout", "2"])
    port = t.port("mail")
    # activity keeps a session open past the timeout
    c = Pop3(port)
    assert c.greeting.startswith(b"+OK")
    t0 = time.monotonic()
    while time.monotonic() - t0 < 3.5:
        assert c.cmd("NOOP").startswith(b"+OK")
        time.sleep(0.5)
    # then silence: closed within a few seconds, not immediately
    t1 = time.monotonic()
    rest = c.wait_closed(10)
    elapsed = time.monotonic() - t1
    assert 1.0 <= elapsed <= 8.0, elapsed
    assert rest == b"" or rest.startswith(b"-ERR"), rest
    c.close()
    # a session that never sends anything after the greeting, too
    c = Pop3(port)
    t1 = time.monotonic()
    rest = c.wait_closed(10)
    assert time.monotonic() - t1 <= 8.0
    assert rest == b"" or rest.startswith(b"-ERR"), rest
    c.close()


def test_session_cap_per_tenant(tpmaild_factory, mailboxes):
    t = tpmaild_factory(args=["--max-sessions", "2"])
    pa = t.port("shared-tenant-a")
    pb = t.port("shared-tenant-b")
    c1 = Pop3(pa)
    c2 = Pop3(pa)
    assert c1.greeting.startswith(b"+OK") and c2.greeting.startswith(b"+OK")
    wait_for(lambda: t.services()["shared-tenant-a"]["sessions_active"] == 2, 5,
             what="sessions_active == 2")
    c3 = Pop3(pa)
    assert c3.greeting.startswith(b"-ERR [SYS/TEMP]"), c3.greeting
    c3.wait_closed(10)
    c3.close()
    # the cap is per tenant service: tenant-b is not affected
    cb = Pop3(pb)
    assert cb.greeting.startswith(b"+OK"), cb.greeting
    assert cb.cmd("STAT").startswith(b"+OK %d " % len(mailboxes["tenant-b-user"]))
    cb.close()
    # the two admitted sessions work
    for c in (c1, c2):
        assert c.cmd("STAT").startswith(b"+OK %d " % len(mailboxes["tenant-a-user"]))
    # after one leaves, a new one is admitted
    c1.cmd("QUIT")
    c1.close()

    def admitted():
        c = Pop3(pa)
        try:
            if c.greeting.startswith(b"+OK"):
                return True
            c.wait_closed(5)
            return False
        finally:
            c.close()
    wait_for(admitted, 10, interval=0.2, what="a session to be admitted after one left")
    # counters reach tpmaild at most every 100 ms
    wait_for(lambda: t.services()["shared-tenant-a"]["sessions_total"] >= 3, 5,
             what="sessions_total >= 3")
    c2.close()
