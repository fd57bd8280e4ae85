#!/usr/bin/python3
"""Self-check of tests/lib/dovecot.py directly against Dovecot (no tpmail).

    /usr/bin/python3 tests/lib/dovecot_selftest.py [-v]

Exits 0 and prints "N passed, 0 failed" when every check holds.
"""

import hashlib
import os
import poplib
import socket
import ssl
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from dovecot import (Dovecot, big_message, dot_stuff, dotted_message,  # noqa: E402
                     small_message)

VERBOSE = "-v" in sys.argv
results = []


def check(name, fn):
    t = time.monotonic()
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        results.append((name, False))
        print("FAIL %s: %r" % (name, e))
        return
    results.append((name, True))
    if VERBOSE:
        print("ok   %s (%.2fs)" % (name, time.monotonic() - t))


def retr_raw(p, n):
    """RETR via poplib, return the message as CRLF bytes (un-dot-stuffed)."""
    resp, lines, octets = p.retr(n)
    assert resp.startswith(b"+OK"), resp
    return b"".join(l + b"\r\n" for l in lines)


def main():
    msgs = [small_message(1), dotted_message(), big_message()]
    with Dovecot(users={"alice": "secret", "bob": "hunter2"}) as dc:
        if VERBOSE:
            print(dc.describe())
        dc.seed("alice", msgs)
        dc.seed("bob", [small_message(7, "bob")])

        def plain_userpass():
            p = poplib.POP3(dc.host, dc.pop3_port, timeout=10)
            p.user("alice")
            p.pass_("secret")
            count, size = p.stat()
            assert count == 3 and size == sum(map(len, msgs)), (count, size)
            for i, m in enumerate(msgs, 1):
                got = retr_raw(p, i)
                assert got == m, (i, len(got), len(m))
            p.quit()
        check("USER/PASS + STAT + RETR round trip", plain_userpass)

        def raw_dot_stuffing():
            s = socket.create_connection((dc.host, dc.pop3_port), timeout=10)
            f = s.makefile("rb")
            assert f.readline().startswith(b"+OK")
            s.sendall(b"USER alice\r\nPASS secret\r\nRETR 2\r\nQUIT\r\n")
            assert f.readline().startswith(b"+OK")
            assert f.readline().startswith(b"+OK")
            assert f.readline().startswith(b"+OK")
            body = b""
            while not body.endswith(b"\r\n.\r\n"):
                line = f.readline()
                assert line, "eof"
                body += line
            assert body == dot_stuff(msgs[1]), body
            s.close()
        check("raw RETR is dot-stuffed as expected", raw_dot_stuffing)

        def capa_plain():
            p = poplib.POP3(dc.host, dc.pop3_port, timeout=10)
            caps = p.capa()
            assert "STLS" in caps, caps
            assert "SASL" in caps and {"PLAIN", "LOGIN"} <= set(caps["SASL"]), caps
            assert "<" in p.getwelcome().decode(), p.getwelcome()  # APOP timestamp
            p.quit()
        check("CAPA: STLS, SASL PLAIN LOGIN, APOP timestamp", capa_plain)

        def stls():
            p = poplib.POP3(dc.host, dc.pop3_port, timeout=10)
            p.stls(dc.ssl_context())
            p.user("bob")
            p.pass_("hunter2")
            assert p.stat()[0] == 1
            assert retr_raw(p, 1) == small_message(7, "bob")
            p.quit()
        check("STLS with test CA", stls)

        def pop3s():
            p = poplib.POP3_SSL(dc.host, dc.pop3s_port, context=dc.ssl_context(), timeout=10)
            p.user("alice")
            p.pass_("secret")
            assert p.stat()[0] == 3
            p.quit()
        check("POP3S with test CA", pop3s)

        def pop3s_localhost():
            p = poplib.POP3_SSL("localhost", dc.pop3s_port, context=dc.ssl_context(), timeout=10)
            p.quit()
        check("POP3S by name localhost", pop3s_localhost)

        def pop3s_wrong_ca():
            try:
                poplib.POP3_SSL(dc.host, dc.pop3s_port, context=dc.ssl_context(wrong_ca=True),
                                timeout=10)
            except ssl.SSLCertVerificationError:
                return
            raise AssertionError("wrong CA accepted")
        check("POP3S with wrong CA fails", pop3s_wrong_ca)

        def apop():
            p = poplib.POP3(dc.host, dc.pop3_port, timeout=10)
            p.apop("alice", "secret")
            assert p.stat()[0] == 3
            p.quit()
        check("APOP", apop)

        def apop_wrong():
            p = poplib.POP3(dc.host, dc.pop3_port, timeout=10)
            try:
                p.apop("alice", "nope")
            except poplib.error_proto:
                return
            raise AssertionError("APOP with wrong secret accepted")
        check("APOP wrong password rejected", apop_wrong)

        def sasl(mech):
            def run():
                import base64
                s = socket.create_connection((dc.host, dc.pop3_port), timeout=10)
                f = s.makefile("rb")
                assert f.readline().startswith(b"+OK")
                if mech == "PLAIN":
                    s.sendall(b"AUTH PLAIN " + base64.b64encode(b"\0bob\0hunter2") + b"\r\n")
                else:
                    s.sendall(b"AUTH LOGIN\r\n")
                    assert f.readline().startswith(b"+ ")
                    s.sendall(base64.b64encode(b"bob") + b"\r\n")
                    assert f.readline().startswith(b"+ ")
                    s.sendall(base64.b64encode(b"hunter2") + b"\r\n")
                line = f.readline()
                assert line.startswith(b"+OK"), line
                s.sendall(b"STAT\r\nQUIT\r\n")
                assert f.readline().startswith(b"+OK 1 ")
                s.close()
            return run
        check("SASL PLAIN", sasl("PLAIN"))
        check("SASL LOGIN", sasl("LOGIN"))

        def wrong_password():
            p = poplib.POP3(dc.host, dc.pop3_port, timeout=10)
            p.user("alice")
            try:
                p.pass_("wrong")
            except poplib.error_proto as e:
                assert b"-ERR" in e.args[0]
                return
            raise AssertionError("wrong password accepted")
        check("wrong password rejected", wrong_password)

        def nostls():
            assert dc.nostls_supported
            p = poplib.POP3(dc.nostls_host, dc.nostls_port, timeout=10)
            caps = p.capa()
            assert "STLS" not in caps, caps
            p.user("alice")
            p.pass_("secret")
            assert p.stat()[0] == 3
            p.quit()
        check("no-STLS listener: CAPA without STLS, USER/PASS works", nostls)

        def dele_commit_and_abort():
            dc.seed("bob", [small_message(1, "b"), small_message(2, "b")])
            p = poplib.POP3(dc.host, dc.pop3_port, timeout=10)
            p.user("bob"); p.pass_("hunter2")
            p.dele(1)
            p.sock.close()  # no QUIT: not committed
            time.sleep(0.3)
            assert dc.count("bob") == 2
            p = poplib.POP3(dc.host, dc.pop3_port, timeout=10)
            p.user("bob"); p.pass_("hunter2")
            p.dele(1)
            p.quit()
            assert dc.count("bob") == 1, dc.count("bob")
            assert dc.messages("bob") == [small_message(2, "b")]
        check("DELE committed by QUIT only", dele_commit_and_abort)

        def order_many():
            many = [small_message(i, "order") for i in range(1, 31)]
            dc.seed("bob", many)
            p = poplib.POP3(dc.host, dc.pop3_port, timeout=10)
            p.user("bob"); p.pass_("hunter2")
            for i in (1, 2, 10, 17, 30):
                assert retr_raw(p, i) == many[i - 1], i
            p.quit()
            assert dc.messages("bob") == many
        check("seed order == POP3 order (30 messages)", order_many)

        def restart_same_ports():
            ports = (dc.pop3_port, dc.pop3s_port, dc.nostls_port)
            dc.stop()
            try:
                socket.create_connection((dc.host, dc.pop3_port), timeout=2).close()
                raise AssertionError("port still open after stop")
            except ConnectionRefusedError:
                pass
            dc.start()
            assert (dc.pop3_port, dc.pop3s_port, dc.nostls_port) == ports
            p = poplib.POP3(dc.host, dc.pop3_port, timeout=10)
            p.user("alice"); p.pass_("secret")
            assert p.stat()[0] == 3
            p.quit()
        check("stop/start on the same ports", restart_same_ports)

        def add_user_live():
            dc.add_user("carol", "pw3")
            dc.seed("carol", [small_message(1, "carol")])
            p = poplib.POP3(dc.host, dc.pop3_port, timeout=10)
            p.user("carol"); p.pass_("pw3")
            assert p.stat()[0] == 1
            p.quit()
        check("add_user while running", add_user_live)

        if VERBOSE:
            print("log tail:\n" + dc.log_text()[-1500:])
        pgid_gone_check = dc
    # after close: nothing left
    import subprocess
    out = subprocess.run(["ps", "-eo", "pid,args"], stdout=subprocess.PIPE).stdout.decode()
    left = [l for l in out.splitlines() if pgid_gone_check.instance_name in l]
    results.append(("no processes left after close", not left))
    if left:
        print("FAIL leftover processes:", left)
    passed = sum(1 for _, ok in results if ok)
    failed = len(results) - passed
    print("%d passed, %d failed" % (passed, failed))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
