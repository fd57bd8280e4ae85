"""Supervision: a killed tenant proxy is restarted without disturbing the
others; SIGTERM stops everything cleanly."""

import os
import re
import signal
import time

import tpmail_harness as th
from tpmail_harness import Pop3, multiline_body, port_open, wait_for, START_TIMEOUT


def test_kill9_one_tenant_others_unaffected(tpmaild_factory, mailboxes):
    t = tpmaild_factory()
    svcs = t.services()
    a, b = svcs["shared-tenant-a"], svcs["shared-tenant-b"]
    pa, pb = t.port("shared-tenant-a"), t.port("shared-tenant-b")
    assert a["restarts"] == 0

    cb = Pop3(pb)                       # tenant-b session, mid-use
    assert cb.greeting.startswith(b"+OK")
    assert cb.cmd("STAT").startswith(b"+OK %d " % len(mailboxes["tenant-b-user"]))
    st, raw = cb.cmd_multi("RETR 1")
    assert multiline_body(raw) == mailboxes["tenant-b-user"][0]

    os.kill(a["pid"], signal.SIGKILL)
    wait_for(lambda: not th.proc_alive(a["pid"]) or
             t.services()["shared-tenant-a"]["pid"] != a["pid"], 5,
             what="killed proxy to be gone")

    # the other tenant's open session goes on
    for i, m in enumerate(mailboxes["tenant-b-user"], 1):
        st, raw = cb.cmd_multi("RETR %d" % i)
        assert st.startswith(b"+OK"), st
        assert multiline_body(raw) == m
    assert cb.cmd("QUIT").startswith(b"+OK")
    cb.close()
    # tenant-b's proxy itself was not touched
    assert t.services()["shared-tenant-b"]["pid"] == b["pid"]

    # tenant-a comes back after its backoff, same port, restarts >= 1
    def restarted():
        s = t.services()["shared-tenant-a"]
        return (s["state"] == "running" and s["pid"] != a["pid"] and s["restarts"] >= 1
                and th.proc_alive(s["pid"]))
    wait_for(restarted, START_TIMEOUT + 15, interval=0.2, what="tenant-a to be restarted")
    s = t.services()["shared-tenant-a"]
    assert s["listen"] == a["listen"], (s, a)
    assert t.services()["shared-tenant-b"]["restarts"] == 0

    def serves():
        c = Pop3(pa)
        try:
            return (c.greeting.startswith(b"+OK") and
                    c.cmd("STAT").startswith(b"+OK %d " % len(mailboxes["tenant-a-user"])))
        finally:
            c.close()
    wait_for(serves, 10, interval=0.2, what="tenant-a to serve again")


def test_sigterm_stops_everything(tpmaild_factory, mailboxes):
    # --drain-grace: how long open sessions may go on once asked to stop
    t = tpmaild_factory(args=["--drain-grace", "2"])
    svcs = t.services()
    ports = [t.port(n) for n in th.STANDARD_SERVICES]
    pids = {s["pid"]: th._proc_stat(s["pid"])[2] for s in svcs.values()}
    for p in pids:
        assert th.proc_is_proxy(p), th.proc_exe_name(p)
    c = Pop3(ports[0])                  # an open session at shutdown time
    assert c.greeting.startswith(b"+OK")
    assert c.cmd("STAT").startswith(b"+OK")

    t0 = time.monotonic()
    rc = t.stop(signal.SIGTERM, timeout=30)
    took = time.monotonic() - t0
    assert rc == 0, rc
    assert took < 12, took
    for p, st in pids.items():
        assert not th.proc_alive(p, st), "proxy %d still alive" % p
    assert not t.leftover_proxies(timeout=1)
    for p in ports:
        assert not port_open(p), "port %d still open" % p
    assert not os.path.exists(t.control) or not _control_answers(t)
    # the client's session was ended
    c.wait_closed(10)
    c.close()
    # each proxy's last words (written as it exits) reached tpmaild's log
    log = t.log_text()
    for p in pids:
        assert re.search(r'"pid":%d,"msg":"exiting: sessions total=' % p, log), \
            "proxy %d's exit line is missing from the log" % p


def _control_answers(t):
    try:
        r = t.ctl("status", "--json", timeout=5)
    except Exception:  # noqa: BLE001
        return False
    return r.returncode == 0


def test_sigint_like_sigterm(tpmaild_factory, mailboxes):
    """Ctrl-C in a terminal (SIGINT) must not leave orphans either."""
    t = tpmaild_factory()
    pids = {s["pid"]: th._proc_stat(s["pid"])[2] for s in t.services().values()}
    rc = t.stop(signal.SIGINT, timeout=30)
    assert rc is not None, "tpmaild ignored SIGINT"
    for p, st in pids.items():
        wait_for(lambda: not th.proc_alive(p, st), 5, what="proxy %d to exit" % p)


def test_sigkill_supervisor_leaves_no_orphans(tpmaild_factory, bins, mailboxes):
    """If tpmaild itself dies, its proxies go too (no orphan keeps a port),
    and a new tpmaild can take over the same ports."""
    t = tpmaild_factory()
    svcs = t.services()
    pids = {s["pid"]: th._proc_stat(s["pid"])[2] for s in svcs.values()}
    ports = {n: t.port(n) for n in svcs}
    t.stop(signal.SIGKILL)
    for p, st in pids.items():
        wait_for(lambda: not th.proc_alive(p, st), 10, what="orphan proxy %d to exit" % p)
    for p in ports.values():
        wait_for(lambda: not port_open(p), 5, what="port %d to close" % p)
    t2 = th.Tpmaild(t.workdir, crs=None, destinations=t.destinations, args=t.args,
                    port_range=t.port_range, bins=bins)
    th.ACTIVE.append(t2)
    try:
        t2.start()
        t2.wait_services(th.STANDARD_SERVICES)
        c = Pop3(t2.port("mail"))
        assert c.cmd("STAT").startswith(b"+OK %d " % len(mailboxes["alice"]))
        c.close()
    finally:
        th.teardown_tpmaild(t2)
