"""Trust stores as the proxies hold them: the system CA bundle, shared.

tpmaild hands each proxy its CA file as a sealed memory file that the proxy
maps; proxies given the same file share one copy, and certificates are
parsed only when a chain needs them.  Checked here with a bundle as large as
a real one (the system's, plus the test CA), given with --system-ca:

* POP3S to Dovecot verifies through it, for every tenant;
* the tenants map one and the same sealed copy (one inode in /proc/PID/maps);
* an edit in place of the CA file (truncated, then rewritten shorter) does
  not reach a running proxy's mapping: it keeps serving, not a SIGBUS;
* a bundle without the server's CA still refuses the server;
* a CA file that changes on disk reaches the running proxies (tpmaild looks
  at its files every 10 s): removing the server's CA makes new logins
  fail, putting it back makes them work, with no proxy restarted.
"""

import os
import re

import pytest

import tpmail_harness as th
from tpmail_harness import Pop3, multiline_body, wait_for

SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def bundle(dovecot, tmp_path, with_test_ca=True):
    """The system's bundle, with the test CA in its middle (a lookup must
    find it among many), written to a file of its own."""
    with open(SYSTEM_BUNDLE) as f:
        system = f.read()
    blocks = re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n?",
                        system, re.S)
    assert len(blocks) > 50, "the system CA bundle (ca-certificates) looks empty"
    if with_test_ca:
        with open(dovecot.ca_file) as f:
            blocks.insert(len(blocks) // 2, f.read())
    path = tmp_path / ("bundle.pem" if with_test_ca else "bundle-without.pem")
    path.write_text("# a comment, and a key block that is skipped\n"
                    "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
                    + "".join(blocks))
    return str(path)


def pop3s_dests(dovecot, tenants):
    # no cafile: the system store, i.e. --system-ca
    return {t: [th.pop3_dest("dest-s", u, dovecot.users[u], dovecot.pop3s_port,
                             protocol="pop3s")]
            for t, u in tenants.items()}


def ca_mappings(pid):
    """(inode) of each mapping of the shared CA copy in a proxy."""
    out = set()
    with open("/proc/%d/maps" % pid) as f:
        for line in f:
            if "memfd:tpmail-ca" in line:
                out.add(int(line.split()[4]))
    return out


def retr_first(port):
    with Pop3(port) as c:
        assert c.greeting.startswith(b"+OK"), c.greeting
        st, raw = c.cmd_multi("RETR 1")
        assert st.startswith(b"+OK"), st
        assert c.cmd("QUIT").startswith(b"+OK")
        return multiline_body(raw)


def test_system_bundle_shared_and_lazy(tpmaild_factory, dovecot, mailboxes, tmp_path):
    path = bundle(dovecot, tmp_path)
    tenants = {"tenant-a": "tenant-a-user", "tenant-b": "tenant-b-user"}
    t = tpmaild_factory(crs={"s.yaml": th.cr("s", "dest-s", tenants=list(tenants))},
                        destinations=pop3s_dests(dovecot, tenants),
                        args=["--system-ca", path], expect=["s-tenant-a", "s-tenant-b"])
    # tenant-a's proxy has looked up the test CA; tenant-b's has not yet
    assert retr_first(t.port("s-tenant-a")) == mailboxes["tenant-a-user"][0]
    pids = [t.services()["s-" + n]["pid"] for n in tenants]
    maps = [ca_mappings(p) for p in pids]
    assert all(len(m) == 1 for m in maps), maps
    assert maps[0] == maps[1], "the tenants hold different copies: %r" % maps

    # an edit in place: truncated, then rewritten shorter.  tenant-b's
    # first lookup reads its mapping after that: a mapping of the file
    # itself would fault there (SIGBUS)
    with open(path, "r+") as f:
        f.truncate(0)
        f.write(open(dovecot.ca_file).read())
    for tenant, user in (("tenant-b", "tenant-b-user"), ("tenant-a", "tenant-a-user")):
        assert retr_first(t.port("s-" + tenant)) == mailboxes[user][0]
    for p, n in zip(pids, tenants):
        s = t.services()["s-" + n]
        assert s["pid"] == p and s["restarts"] == 0, s
    assert "SIGBUS" not in t.log_text()


def test_bundle_without_the_servers_ca_refuses_it(tpmaild_factory, dovecot, mailboxes,
                                                  tmp_path):
    path = bundle(dovecot, tmp_path, with_test_ca=False)
    tenants = {"tenant-a": "tenant-a-user"}
    t = tpmaild_factory(crs={"s.yaml": th.cr("s", "dest-s", tenants=list(tenants))},
                        destinations=pop3s_dests(dovecot, tenants),
                        args=["--system-ca", path], expect=["s-tenant-a"])
    with Pop3(t.port("s-tenant-a")) as c:
        assert c.greeting.startswith(b"-ERR [SYS/TEMP]"), c.greeting
    wait_for(lambda: "certificate verification failed" in t.log_text(), 10,
             what="the verification failure in the log")


def test_ca_file_change_reaches_running_proxies(tpmaild_factory, dovecot, mailboxes, tmp_path):
    path = bundle(dovecot, tmp_path)
    with open(path) as f:
        good = f.read()
    without = open(bundle(dovecot, tmp_path, with_test_ca=False)).read()
    tenants = {"tenant-a": "tenant-a-user"}
    t = tpmaild_factory(crs={"s.yaml": th.cr("s", "dest-s", tenants=list(tenants))},
                        destinations=pop3s_dests(dovecot, tenants),
                        args=["--system-ca", path], expect=["s-tenant-a"])
    port = t.port("s-tenant-a")
    pid = t.services()["s-tenant-a"]["pid"]
    assert retr_first(port) == mailboxes["tenant-a-user"][0]

    def greeting():
        with Pop3(port) as c:
            return c.greeting
    with open(path, "w") as f:                     # edited in place
        f.write(without)
    wait_for(lambda: greeting().startswith(b"-ERR [SYS/TEMP]"), 40, interval=1,
             what="logins to fail once the server's CA is gone from the file")
    tmp = path + ".new"                            # replaced, as tools do
    with open(tmp, "w") as f:
        f.write(good)
    os.rename(tmp, path)
    wait_for(lambda: greeting().startswith(b"+OK"), 40, interval=1,
             what="logins to work again once the CA is back")
    assert retr_first(port) == mailboxes["tenant-a-user"][0]
    s = t.services()["s-tenant-a"]
    assert s["pid"] == pid and s["restarts"] == 0, s
    assert "CA file %s changed" % path in t.log_text()
