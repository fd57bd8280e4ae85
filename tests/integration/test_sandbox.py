"""The tenant proxies' sandbox, checked from outside each running child
(/proc, the control socket, the logs), under a root and an unprivileged
tpmaild: identities, capabilities, no_new_privs, seccomp, rlimits, open
descriptors, root directory, the forbidden-syscall trigger of test builds,
and which credentials each proxy's memory holds.

Needs root (the root-mode tpmaild, reading other processes' /proc entries
and memory) and, for the syscall tests, a build configured with
-Dsandbox_testing=true.  The unprivileged tpmaild runs as nobody via
setpriv from a fresh 0755 dir under the system temp dir (pytest's basetemp
is 0700, which nobody cannot traverse).

Which system call a seccomp kill was for is known only to the kernel: where
its log holds the audit record of the kill (type 1326, readable with dmesg)
the syscall tests also check that the trigger died of the call it names;
elsewhere that one check is left out.  In sanitizer builds mlock is a no-op
(ASan intercepts it), so the "locked" checks of the vault are left out there.
"""

import grp
import json
import os
import pwd
import random
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile

import pytest

import tpmail_harness as th
from tpmail_harness import Pop3, list_lines, multiline_body, wait_for, START_TIMEOUT
from dovecot import dot_stuff

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sandbox tests need root")

NS = "default"
TENANTS = ("shared-tenant-a", "shared-tenant-b")     # the shared CR's two tenants
DEDICATED = "mail"                                  # the dedicated CR
SERVICE_USER = {"mail": "alice", "shared-tenant-a": "tenant-a-user",
                "shared-tenant-b": "tenant-b-user"}
SETPRIV = shutil.which("setpriv") or "/usr/bin/setpriv"

KILLED_BY = ["ptrace", "kill", "execve", "process_vm_readv", "setuid"]
SOFT_DENIED = ["openat", "socket_unix"]
EACCES = 13
SIGSYS = 31


# --------------------------------------------------------------------------
# /proc readers

def proc_status(pid):
    """/proc/<pid>/status as {key: value string}."""
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            k, _, v = line.partition(":")
            out[k] = v.strip()
    return out


def status_ids(value):
    return [int(x) for x in value.split()]


def proc_limits(pid):
    """{limit name: (soft, hard)} from /proc/<pid>/limits."""
    out = {}
    with open("/proc/%d/limits" % pid) as f:
        next(f)
        for line in f:
            m = re.match(r"(Max [a-z ]+?)\s{2,}(\S+)\s+(\S+)", line)
            if m:
                out[m.group(1)] = (m.group(2), m.group(3))
    return out


def proc_fds(pid):
    """{fd: (kind, detail)}; kind one of socket, pipe, anon_inode, devnull,
    other (anything else: a file, a directory, a device...)."""
    out = {}
    base = "/proc/%d/fd" % pid
    for n in os.listdir(base):
        p = os.path.join(base, n)
        try:
            target = os.readlink(p)
            st = os.stat(p)
        except FileNotFoundError:
            continue                    # closed while we looked
        m = re.match(r"(socket|pipe):\[(\d+)\]$", target)
        if m:
            out[int(n)] = (m.group(1), int(m.group(2)))
        elif target.startswith("anon_inode:"):
            out[int(n)] = ("anon_inode", target[len("anon_inode:"):])
        elif target == "/dev/null" and stat.S_ISCHR(st.st_mode):
            out[int(n)] = ("devnull", target)
        else:
            out[int(n)] = ("other", "%s (mode %o)" % (target, st.st_mode))
    return out


def _hexaddr_port(s):
    return int(s.rsplit(":", 1)[1], 16)


def tcp_sockets():
    """{inode: (state, local port, remote port)} of every TCP socket."""
    out = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    fl = line.split()
                    out[int(fl[9])] = (fl[3], _hexaddr_port(fl[1]), _hexaddr_port(fl[2]))
        except FileNotFoundError:
            pass
    return out


def unix_socket_inodes():
    with open("/proc/net/unix") as f:
        next(f)
        return {int(line.split()[6]) for line in f if len(line.split()) >= 7}


TCP_LISTEN, TCP_ESTABLISHED = "0A", "01"


def processes_with_uid(lo, hi):
    """pids of live processes whose real uid is in [lo, hi)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            uid = status_ids(proc_status(int(d))["Uid"])[0]
        except (OSError, KeyError, IndexError):
            continue
        if lo <= uid < hi and th.proc_alive(int(d)):
            out.append(int(d))
    return out


# --------------------------------------------------------------------------
# memory of a live process, read as root through /proc/<pid>/mem

# Readable mappings larger than this are not read: in sanitizer builds the
# shadow memory is many TiB of reserved-but-unused address space (reading
# it would fault in page tables for all of it).  It holds poison bytes,
# never data; skipped ranges are returned for the failure message.
MAX_REGION = 1 << 30
CHUNK = 1 << 20


def memory_regions(pid):
    """[(start, end, perms, name, vmflags)] from /proc/<pid>/smaps."""
    regions = []
    head = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            m = head.match(line)
            if m:
                regions.append([int(m.group(1), 16), int(m.group(2), 16), m.group(3),
                                m.group(4), set()])
            elif line.startswith("VmFlags:") and regions:
                regions[-1][4] = set(line.split()[1:])
    return [tuple(r) for r in regions]


def scan_memory(pid, needles):
    """Search every readable mapping of ``pid`` for each needle (bytes).
    Returns ({needle: [(address, region)]}, bytes read, skipped regions)."""
    hits = {n: [] for n in needles}
    overlap = max(len(n) for n in needles) - 1
    total = 0
    skipped = []
    with open("/proc/%d/mem" % pid, "rb", buffering=0) as mem:
        for reg in memory_regions(pid):
            start, end, perms = reg[0], reg[1], reg[2]
            if "r" not in perms:
                continue
            if end - start > MAX_REGION:
                skipped.append(reg)
                continue
            pos = start
            tail = b""
            while pos < end:
                n = min(CHUNK, end - pos)
                try:
                    mem.seek(pos)
                    data = mem.read(n)
                except OSError:         # [vvar], [vsyscall], a guard page...
                    break
                if not data:
                    break
                total += len(data)
                buf = tail + data
                base = pos - len(tail)
                for nd in needles:
                    i = buf.find(nd)
                    while i >= 0:
                        hits[nd].append((base + i, reg))
                        i = buf.find(nd, i + 1)
                tail = buf[-overlap:] if overlap else b""
                pos += len(data)
    return hits, total, skipped


def read_proc_bytes(pid, name):
    with open("/proc/%d/%s" % (pid, name), "rb") as f:
        return f.read()


def sanitized(pid):
    """True if the process runs with ASan (whose interceptors turn mlock
    into a no-op, so nothing is really locked in such builds)."""
    with open("/proc/%d/maps" % pid) as f:
        return "libasan" in f.read()


# --------------------------------------------------------------------------
# tpmaild's log, text or JSON lines

_TEXT_LINE = re.compile(r"^\S+ (\w+) ([\w.-]+)\[(\d+)\]((?: \w+=\S+)*): (.*)$")


def log_records(text):
    """[{program, pid, msg, service?...}] from tpmaild's stderr log, in
    either of its formats (text: "TIME LEVEL PROG[PID] k=v...: MSG", or
    one JSON object per line)."""
    out = []
    for line in text.splitlines():
        rec = None
        if line.startswith("{"):
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if not isinstance(rec, dict) or "msg" not in rec:
                rec = None
        if rec is None:
            m = _TEXT_LINE.match(line)
            if not m:
                continue
            rec = {"level": m.group(1), "program": m.group(2), "pid": int(m.group(3)),
                   "msg": m.group(5)}
            for kv in m.group(4).split():
                k, _, v = kv.partition("=")
                rec.setdefault(k, v)
        out.append(rec)
    return out


def find_log(t, offset=0, program=None, pid=None, service=None, msg=None):
    """Records of the log since ``offset`` matching all given criteria
    (msg: a regex searched in the message)."""
    out = []
    for r in log_records(t.log_text()[offset:]):
        if program is not None and r.get("program") != program:
            continue
        if pid is not None and r.get("pid") != pid:
            continue
        if service is not None and r.get("service") != service:
            continue
        if msg is not None and not re.search(msg, r.get("msg", "")):
            continue
        out.append(r)
    return out


# --------------------------------------------------------------------------
# an unprivileged tpmaild (setpriv as nobody)

def _unpriv_ids():
    try:
        pw = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' for the unprivileged tpmaild")
    try:
        gid = grp.getgrnam("nogroup").gr_gid
    except KeyError:
        gid = pw.pw_gid
    return pw.pw_uid, gid


def _usable_by_others(path):
    """True if every ancestor dir of path is world-traversable and path
    itself is world-executable."""
    p = os.path.abspath(path)
    if not os.stat(p).st_mode & 0o001:
        return False
    p = os.path.dirname(p)
    while True:
        if not os.stat(p).st_mode & 0o001:
            return False
        if os.path.dirname(p) == p:
            return True
        p = os.path.dirname(p)


class UnprivTpmaild(th.Tpmaild):
    """tpmaild started through setpriv as an unprivileged user; its state
    dir belongs to that user, everything else stays root's (readable)."""

    def __init__(self, workdir, run_uid, run_gid, **kw):
        self.run_uid, self.run_gid = run_uid, run_gid
        super().__init__(workdir, **kw)
        os.chown(self.state_dir, run_uid, run_gid)

    def argv(self):
        return [SETPRIV, "--reuid=%d" % self.run_uid, "--regid=%d" % self.run_gid,
                "--clear-groups", "--"] + super().argv()


@pytest.fixture
def unpriv_factory(bins, dovecot):
    """make(args=(), expect=STANDARD_SERVICES, crs=None, destinations=None)
    -> an UnprivTpmaild (running as nobody).  Teardown as the harness's:
    SIGTERM, exit 0, no proxy left, no sanitizer report."""
    uid, gid = _unpriv_ids()
    started, dirs = [], []

    def make(args=(), expect=None, crs=None, destinations=None):
        wd = tempfile.mkdtemp(prefix="tpmail-sandbox-")
        dirs.append(wd)
        os.chmod(wd, 0o755)
        b = dict(bins)
        for n in ("tpmaild", "tpmail-pop3"):
            if not _usable_by_others(b[n]):
                # the build dir is not reachable by nobody: run copies
                os.makedirs(os.path.join(wd, "bin"), mode=0o755, exist_ok=True)
                b[n] = shutil.copy2(b[n], os.path.join(wd, "bin", n))
                os.chmod(b[n], 0o755)
        if crs is None:
            crs = th.standard_crs()
            if expect is None:
                expect = th.STANDARD_SERVICES
        if destinations is None:
            destinations = th.standard_destinations(dovecot)
        t = UnprivTpmaild(wd, uid, gid, crs=crs, destinations=destinations, args=args, bins=b)
        th.ACTIVE.append(t)
        started.append(t)
        t.start()
        if expect:
            try:
                t.wait_services(expect)
            except Exception as e:
                raise RuntimeError("unprivileged tpmaild did not start as expected: %s\n"
                                   "--- tpmaild log tail ---\n%s"
                                   % (e, t.log_text()[-8000:])) from e
        return t

    yield make
    errors = th.teardown_all(started)
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)


@pytest.fixture(params=["root", "unprivileged"])
def mode_factory(request, tpmaild_factory, unpriv_factory):
    """(mode, make) for a root or an unprivileged tpmaild."""
    if request.param == "root":
        return "root", lambda args=(), **kw: tpmaild_factory(args=list(args), **kw)
    return "unprivileged", lambda args=(), **kw: unpriv_factory(args=list(args), **kw)


def random_uid_base():
    return 300000 + random.randrange(0, 5000) * 1000


# --------------------------------------------------------------------------
# shared checks

def pop3_session(port, msgs, retr=None):
    """list, retr each message (or the first ``retr``), quit through the
    proxy; byte-exact."""
    with Pop3(port) as c:
        assert c.greeting.startswith(b"+OK"), c.greeting
        st, raw = c.cmd_multi("LIST")
        assert st.startswith(b"+OK"), st
        assert raw == list_lines(msgs)
        for i, m in enumerate(msgs[:retr], 1):
            st, raw = c.cmd_multi("RETR %d" % i)
            assert st.startswith(b"+OK"), st
            assert raw == dot_stuff(m)
            assert multiline_body(raw) == m
        assert c.cmd("QUIT").startswith(b"+OK")


def check_common_confinement(pid, svc):
    """What both modes promise, from outside; returns the parsed status."""
    assert th.proc_is_proxy(pid), th.proc_exe_name(pid)
    ps = proc_status(pid)
    for k in ("CapInh", "CapPrm", "CapEff", "CapAmb"):
        assert int(ps[k], 16) == 0, "%s: %s=%s" % (svc, k, ps[k])
    assert ps["NoNewPrivs"] == "1", (svc, ps["NoNewPrivs"])
    assert ps["Seccomp"] == "2", (svc, ps["Seccomp"])
    assert ps["TracerPid"] == "0", (svc, ps["TracerPid"])
    assert ps["Groups"] == "", (svc, ps["Groups"])
    # not dumpable: the kernel then gives the files in /proc/<pid> to root
    # (a dumpable process of uid N has them owned by N)
    assert os.stat("/proc/%d/status" % pid).st_uid == 0, \
        "%s: /proc/%d/status owned by %d, not root: dumpable?" % (
            svc, pid, os.stat("/proc/%d/status" % pid).st_uid)

    lim = proc_limits(pid)
    assert lim["Max core file size"] == ("0", "0"), lim["Max core file size"]
    assert lim["Max processes"] == ("0", "0"), lim["Max processes"]
    assert lim["Max file size"] == ("0", "0"), lim["Max file size"]
    soft, hard = lim["Max open files"]
    assert soft == hard and soft != "unlimited" and int(soft) <= 100000, lim["Max open files"]
    return ps


def check_fds(pid, svc, port, sessions=0, upstream_port=None):
    """Only sockets, pipes, anon inodes and /dev/null; the one listener
    is the service's own port; fd 3 is the (unix) channel."""
    fds = proc_fds(pid)
    bad = {fd: k for fd, k in fds.items() if k[0] not in ("socket", "pipe", "anon_inode", "devnull")}
    assert not bad, "%s (pid %d) holds unexpected descriptors: %r (all: %r)" % (svc, pid, bad, fds)
    assert fds.get(0) == ("devnull", "/dev/null"), fds.get(0)
    assert fds.get(1, ("?",))[0] == "pipe" and fds.get(1) == fds.get(2), (fds.get(1), fds.get(2))
    assert fds.get(3, ("?",))[0] == "socket", fds.get(3)
    assert fds[3][1] in unix_socket_inodes(), "fd 3 is not a unix socket: %r" % (fds[3],)

    tcp = tcp_sockets()
    sock_inodes = [d for k, d in fds.values() if k == "socket"]
    listeners = [tcp[i] for i in sock_inodes if i in tcp and tcp[i][0] == TCP_LISTEN]
    assert [l[1] for l in listeners] == [port], \
        "%s: listening sockets %r, expected exactly its own port %d" % (svc, listeners, port)
    conns = [tcp[i] for i in sock_inodes if i in tcp and tcp[i][0] != TCP_LISTEN]
    assert len(conns) == 2 * sessions, "%s: TCP connections %r with %d sessions" % (svc, conns, sessions)
    if sessions:
        assert sum(1 for c in conns if c[1] == port) == sessions, conns
        assert sum(1 for c in conns if c[2] == upstream_port) == sessions, conns
    epolls = [d for k, d in fds.values() if k == "anon_inode"]
    assert epolls == ["[eventpoll]"], "%s: anon inodes %r" % (svc, epolls)
    # 0, 1, 2, channel, listener, epoll, libevent's notify pair; plus sessions
    assert len(fds) <= 8 + 2 * sessions, "%s: %d descriptors: %r" % (svc, len(fds), fds)
    return fds


def missing_steps(sandbox):
    steps = {}
    for m in sandbox["missing"]:
        step, sep, why = m.partition(": ")
        assert sep and why.strip(), "missing entry without a reason: %r" % m
        steps[step] = why
    return steps


def log_since(t, offset):
    return t.log_text()[offset:]


# What each trigger must die of, by audit arch (x86_64, aarch64).
SYSCALL_NR = {
    "c000003e": {"ptrace": 101, "kill": 62, "execve": 59, "process_vm_readv": 310,
                 "setuid": 105, "getppid": 110},
    "c00000b7": {"ptrace": 117, "kill": 129, "execve": 221, "process_vm_readv": 270,
                 "setuid": 146, "getppid": 173},
}
_AUDIT_SECCOMP = re.compile(r'type=1326 .*? pid=(\d+) comm="[^"]*" exe="([^"]*)" sig=(\d+) '
                            r'arch=([0-9a-f]+) syscall=(\d+)')


def seccomp_kill_record(pid, exe, timeout=2):
    """(arch, syscall nr) of the kernel's audit record (type 1326) of the
    seccomp kill of ``pid``, or None when the kernel log cannot tell: not
    readable, seccomp kills not logged, record rate-limited away, or a pid
    namespace of our own.  Only the kernel knows which call was fatal."""
    try:
        with open("/proc/sys/kernel/seccomp/actions_logged") as f:
            if "kill_process" not in f.read().split():
                return None
    except OSError:
        return None
    exe = os.path.realpath(exe)

    def find():
        try:
            r = subprocess.run(["dmesg"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return "unreadable"
        if r.returncode != 0:
            return "unreadable"
        for m in _AUDIT_SECCOMP.finditer(r.stdout.decode(errors="replace")):
            if int(m.group(1)) == pid and m.group(2) == exe:
                return (m.group(4), int(m.group(5)))
        return None
    try:
        rec = wait_for(find, timeout, interval=0.1, what="audit record of pid %d" % pid)
    except TimeoutError:
        return None
    return None if rec == "unreadable" else rec


def tpmailctl_test_syscall(t, svc, name):
    r = t.ctl("test-syscall", "%s/%s" % (NS, svc), name)
    err = r.stderr.decode(errors="replace")
    if r.returncode == 2 and "bad command line" in err:
        pytest.skip("not a test build (configure with -Dsandbox_testing=true)")
    assert r.returncode == 0, "tpmailctl test-syscall %s %s: exit %d: %s" % (svc, name, r.returncode, err)


# --------------------------------------------------------------------------
# 1 + 5. root mode

@pytest.mark.parametrize("policy", ["best-effort", "strict"])
def test_root_proxies_confined(tpmaild_factory, dovecot, mailboxes, policy):
    uid_base = random_uid_base()
    t = tpmaild_factory(args=["--uid-base", str(uid_base), "--sandbox", policy])
    svcs = t.services()
    lo = t.port_range[0]
    sup = proc_status(t.pid)
    assert status_ids(sup["Uid"]) == [0, 0, 0, 0]
    empty = os.path.join(t.state_dir, "empty")
    est = os.stat(empty)
    assert est.st_uid == 0 and stat.S_IMODE(est.st_mode) & 0o222 == 0, (est.st_uid, oct(est.st_mode))

    uids = {}
    for name in (DEDICATED,) + TENANTS:
        s = svcs[name]
        pid, port = s["pid"], t.port(name)
        want = uid_base + (port - lo)
        ps = check_common_confinement(pid, name)
        assert int(ps["CapBnd"], 16) == 0, "%s: CapBnd=%s" % (name, ps["CapBnd"])
        assert status_ids(ps["Uid"]) == [want] * 4, (name, ps["Uid"], want)
        assert status_ids(ps["Gid"]) == [want] * 4, (name, ps["Gid"], want)
        # the vault page is locked (not in sanitizer builds: ASan's mlock
        # is a no-op)
        if not sanitized(pid):
            assert int(ps["VmLck"].split()[0]) >= 4, (name, ps["VmLck"])

        assert os.path.realpath("/proc/%d/root" % pid) == os.path.realpath(empty), \
            (name, os.readlink("/proc/%d/root" % pid))
        assert os.listdir("/proc/%d/root" % pid) == [], name
        assert os.path.realpath("/proc/%d/cwd" % pid) == os.path.realpath(empty)

        check_fds(pid, name, port)

        sb = s["sandbox"]
        assert sb is not None, s
        assert sb["missing"] == [], (name, sb["missing"])
        assert (sb["uid"], sb["gid"]) == (want, want), sb
        for k in ("chroot", "no_new_privs", "caps_cleared", "seccomp", "bounding_set_cleared",
                  "secrets_locked"):
            assert sb[k] is True, (name, k, sb)
        assert sb["dumpable"] is False, sb
        assert s["state"] == "running" and s["error"] is None, s
        uids[name] = want

    # 5. distinct per tenant, none is root's or tpmaild's
    assert len(set(uids.values())) == len(uids), uids
    assert 0 not in uids.values() and status_ids(sup["Uid"])[0] not in uids.values(), uids

    # a live session: exactly two more TCP sockets, the accepted one on the
    # service's port and the one to Dovecot; still no file
    name = TENANTS[0]
    port = t.port(name)
    with Pop3(port) as c:
        assert c.greeting.startswith(b"+OK")
        assert c.cmd("STAT").startswith(b"+OK %d " % len(mailboxes[SERVICE_USER[name]]))
        check_fds(svcs[name]["pid"], name, port, sessions=1, upstream_port=dovecot.pop3_port)
        assert c.cmd("QUIT").startswith(b"+OK")


def test_root_tenant_uids_distinct_default_base(tpmaild_factory, mailboxes):
    """Default --uid-base: 200000 + (port - low port); each tenant its own
    uid, none 0 or tpmaild's, none a local account."""
    t = tpmaild_factory()
    svcs = t.services()
    sup_uid = status_ids(proc_status(t.pid)["Uid"])[0]
    seen = {}
    for name in (DEDICATED,) + TENANTS:
        ps = proc_status(svcs[name]["pid"])
        u = status_ids(ps["Uid"])
        g = status_ids(ps["Gid"])
        assert len(set(u)) == 1 and len(set(g)) == 1 and u[0] == g[0], (name, u, g)
        assert u[0] == 200000 + t.port(name) - t.port_range[0], (name, u)
        seen[name] = u[0]
    assert len(set(seen.values())) == len(seen), seen
    for name, u in seen.items():
        assert u not in (0, sup_uid), (name, u, sup_uid)
        with pytest.raises(KeyError):
            pwd.getpwuid(u)


# --------------------------------------------------------------------------
# 2. unprivileged mode

def test_unprivileged_proxies_confined_and_serving(unpriv_factory, mailboxes):
    t = unpriv_factory()
    sup = proc_status(t.pid)
    sup_uid, sup_gid = status_ids(sup["Uid"]), status_ids(sup["Gid"])
    assert sup_uid == [t.run_uid] * 4 and sup_gid == [t.run_gid] * 4, (sup["Uid"], sup["Gid"])
    # controls: what the proxies have below, they did to themselves
    assert sup["NoNewPrivs"] == "0" and sup["Seccomp"] == "0", (sup["NoNewPrivs"], sup["Seccomp"])
    assert int(sup["CapBnd"], 16) != 0, sup["CapBnd"]

    svcs = t.services()
    for name in (DEDICATED,) + TENANTS:
        s = svcs[name]
        pid, port = s["pid"], t.port(name)
        ps = check_common_confinement(pid, name)
        assert status_ids(ps["Uid"]) == sup_uid, (name, ps["Uid"], sup_uid)
        assert status_ids(ps["Gid"]) == sup_gid, (name, ps["Gid"], sup_gid)
        # the bounding set is left as it was (needs CAP_SETPCAP)
        assert ps["CapBnd"] == sup["CapBnd"], (name, ps["CapBnd"], sup["CapBnd"])
        assert os.readlink("/proc/%d/root" % pid) == "/", name
        check_fds(pid, name, port)

        sb = s["sandbox"]
        assert sb is not None, s
        assert (sb["uid"], sb["gid"]) == (t.run_uid, t.run_gid), sb
        for k in ("no_new_privs", "caps_cleared", "seccomp"):
            assert sb[k] is True, (name, k, sb)
        assert sb["chroot"] is False and sb["bounding_set_cleared"] is False, sb
        assert sb["dumpable"] is False, sb
        steps = missing_steps(sb)
        required = {"chroot", "capability bounding set", "uid/gid"}
        assert required <= set(steps), (name, sb["missing"])
        extra = set(steps) - required
        assert extra <= {"mlock"} and (("mlock" in extra) == (not sb["secrets_locked"])), \
            (name, sb["missing"], sb["secrets_locked"])
        assert s["state"] == "running", s

    # real sessions through the unprivileged proxies
    for name in (DEDICATED, TENANTS[0]):
        pop3_session(t.port(name), mailboxes[SERVICE_USER[name]], retr=2)
    assert t.services()[TENANTS[0]]["sessions_total"] >= 1


def test_unprivileged_strict_never_serves(unpriv_factory, mailboxes):
    t = unpriv_factory(args=["--sandbox", "strict", "--backoff-max", "1"], expect=[])
    names = (DEDICATED,) + TENANTS
    seen_states = {n: set() for n in names}

    def died_twice():
        svcs = t.services()
        for n in names:
            if n not in svcs:
                return False
            seen_states[n].add(svcs[n]["state"])
            assert svcs[n]["state"] != "running", "strict unprivileged proxy serves: %r" % svcs[n]
        return all(svcs[n]["restarts"] >= 2 for n in names) and svcs
    svcs = wait_for(died_twice, START_TIMEOUT + 10, interval=0.05,
                    what="strict proxies to fail twice", fatal=(AssertionError, th.TpmaildDied))
    for n in names:
        assert "backoff" in seen_states[n] or svcs[n]["state"] in ("backoff", "starting"), seen_states
        assert svcs[n]["error"], svcs[n]
        assert svcs[n]["sandbox"] is None, svcs[n]

    for n in names:
        recs = find_log(t, program="tpmail-pop3", service="%s/%s" % (NS, n),
                        msg=r"sandbox \(strict\): cannot apply "
                            r"(chroot|capability bounding set|uid/gid): \S")
        assert recs, "no strict-sandbox failure naming the step for %s in the log:\n%s" % (
            n, t.log_text()[-3000:])
    # nobody answers on the port
    with socket.create_connection((th.HOST, t.port(TENANTS[0])), timeout=2) as c:
        c.settimeout(1)
        try:
            data = c.recv(64)
        except socket.timeout:
            data = None
        assert not data, data


# --------------------------------------------------------------------------
# 3. forbidden system calls (the test-build trigger)

@pytest.mark.parametrize("syscall", KILLED_BY)
def test_forbidden_syscall_kills_proxy(mode_factory, mailboxes, syscall):
    mode, make = mode_factory
    t = make(args=["--backoff-max", "1"])
    victim = TENANTS[0]
    before = t.services()
    old = before[victim]
    old_pid, old_start = old["pid"], th._proc_stat(old["pid"])[2]
    others = {n: before[n]["pid"] for n in before if n != victim}
    mark = len(t.log_text())

    tpmailctl_test_syscall(t, victim, syscall)
    died = r"proxy pid %d killed by signal %d \(SIGSYS" % (old_pid, SIGSYS)
    wait_for(lambda: find_log(t, mark, program="tpmaild", msg=died), 10, interval=0.05,
             what="tpmaild to log the SIGSYS death of pid %d" % old_pid, fatal=(th.TpmaildDied,))
    assert find_log(t, mark, program="tpmail-pop3", pid=old_pid,
                    msg=r"test: calling forbidden %s$" % syscall), log_since(t, mark)
    assert not th.proc_alive(old_pid, old_start)

    def restarted():
        s = t.services()[victim]
        return (s["state"] == "running" and s["pid"] not in (None, old_pid)
                and th.proc_alive(s["pid"]) and s)
    s = wait_for(restarted, START_TIMEOUT, interval=0.05, what="%s to be restarted" % victim,
                 fatal=(th.TpmaildDied,))
    assert s["restarts"] == old["restarts"] + 1, s
    assert "SIGSYS" in (s["error"] or ""), s
    # the new proxy is confined again, and serves
    ps = proc_status(s["pid"])
    assert ps["Seccomp"] == "2" and ps["NoNewPrivs"] == "1", ps
    pop3_session(t.port(victim), mailboxes[SERVICE_USER[victim]])

    # tpmaild untouched (not traced, alive), the other tenants untouched
    assert t.alive()
    assert proc_status(t.pid)["TracerPid"] == "0"
    after = t.services()
    for n, pid in others.items():
        assert after[n]["pid"] == pid and after[n]["restarts"] == 0, (n, after[n])

    # which call was fatal: the one under test, not one made on the way
    rec = seccomp_kill_record(old_pid, t.bins["tpmail-pop3"])
    if rec is not None and rec[0] in SYSCALL_NR:
        nrs = SYSCALL_NR[rec[0]]
        names = {v: k for k, v in nrs.items()}
        assert rec[1] == nrs[syscall], \
            "the %s trigger was killed by syscall %d (%s), not by %s (%d): kernel audit record " \
            "of pid %d" % (syscall, rec[1], names.get(rec[1], "?"), syscall, nrs[syscall], old_pid)


@pytest.mark.parametrize("syscall", SOFT_DENIED)
def test_soft_denied_syscall_keeps_proxy(mode_factory, mailboxes, syscall):
    mode, make = mode_factory
    t = make(args=["--backoff-max", "1"])
    victim = TENANTS[1]
    old = t.services()[victim]
    old_pid, old_start = old["pid"], th._proc_stat(old["pid"])[2]
    mark = len(t.log_text())

    tpmailctl_test_syscall(t, victim, syscall)
    want = "test syscall %s returned -1 errno %d" % (syscall, EACCES)
    s = wait_for(lambda: (t.services()[victim]["error"] == want) and t.services()[victim], 10,
                 interval=0.05, what="error %r in status" % want, fatal=(th.TpmaildDied,))
    assert s["pid"] == old_pid and s["restarts"] == old["restarts"] and s["state"] == "running", s
    assert th.proc_alive(old_pid, old_start)
    pop3_session(t.port(victim), mailboxes[SERVICE_USER[victim]])
    s = t.services()[victim]
    assert s["pid"] == old_pid and s["restarts"] == old["restarts"], s
    assert "SIGSYS" not in log_since(t, mark)


# --------------------------------------------------------------------------
# 4. memory: each proxy holds its own tenant's credentials and no other's

@pytest.fixture
def canary_tenants(dovecot, mailboxes):
    """Two fresh Dovecot users whose passwords are random per-run canaries;
    returns ({service: (user, password)}, destinations)."""
    tag = secrets.token_hex(4)
    creds = {}
    for svc, letter in zip(TENANTS, "AB"):
        user = "canary-%s-%s" % (letter.lower(), tag)
        pw = "Cnry%s-%s" % (letter, secrets.token_hex(16))
        dovecot.add_user(user, pw)
        dovecot.seed(user, [th.small_message(1, "canary-%s" % letter)])
        creds[svc] = (user, pw)
    dests = th.standard_destinations(dovecot)
    dests["tenant-a"] = [th.pop3_dest("dest-t", creds[TENANTS[0]][0], creds[TENANTS[0]][1],
                                      dovecot.pop3_port)]
    dests["tenant-b"] = [th.pop3_dest("dest-t", creds[TENANTS[1]][0], creds[TENANTS[1]][1],
                                      dovecot.pop3_port)]
    return creds, dests


def test_proxy_memory_holds_only_own_credentials(mode_factory, dovecot, canary_tenants):
    mode, make = mode_factory
    creds, dests = canary_tenants
    t = make(destinations=dests)
    canary = {svc: pw.encode() for svc, (user, pw) in creds.items()}

    # use each tenant once, so the password also went through a login
    for svc in TENANTS:
        msg = dovecot.messages(creds[svc][0])
        pop3_session(t.port(svc), msg)

    svcs = t.services()
    report = []
    for name in (DEDICATED,) + TENANTS:
        pid = svcs[name]["pid"]
        hits, nread, skipped = scan_memory(pid, list(canary.values()))
        # VmFlags of the vault: "dd" (MADV_DONTDUMP) and "lo" (mlock'd;
        # not in sanitizer builds, where mlock is a no-op)
        vault_flags = {"dd"} if sanitized(pid) else {"lo", "dd"}
        assert nread > 1 << 20, "read only %d bytes of pid %d" % (nread, pid)
        for owner, c in canary.items():
            where = sorted({(r[0], r[1], r[3], " ".join(sorted(r[4]))) for _, r in hits[c]})
            if owner == name:
                # positive control, and the vault: locked, left out of dumps
                assert hits[c], "%s's proxy (pid %d) does not hold its own canary; read %d bytes, " \
                    "skipped %r" % (name, pid, nread, skipped)
                # and only there: no copy left in the heap, the stack or a
                # session buffer after a login
                outside = [(hex(a), r[3], " ".join(sorted(r[4])))
                           for a, r in hits[c] if not vault_flags <= r[4]]
                assert not outside, "%s: its password outside the locked, undumpable vault: %r" \
                    % (name, outside)
                report.append("%s: own canary %d hit(s) in %r" % (name, len(hits[c]), where))
            else:
                assert not hits[c], "%s's proxy (pid %d) holds %s's password at %r" % (
                    name, pid, owner, [hex(a) for a, _ in hits[c]])
        for what in ("cmdline", "environ"):
            data = read_proc_bytes(pid, what)
            for owner, c in canary.items():
                assert c not in data, "%s's canary in /proc/%d/%s of %s" % (owner, pid, what, name)
    print("\n".join(report))

    for what in ("cmdline", "environ"):
        data = read_proc_bytes(t.pid, what)
        for owner, c in canary.items():
            assert c not in data, "%s's canary in tpmaild's /proc/%d/%s" % (owner, t.pid, what)
    status_text = t.ctl("status", "--json").stdout
    for owner, c in canary.items():
        assert c not in status_text, "%s's canary in tpmailctl status" % owner
    log = t.log_text().encode()
    for owner, c in canary.items():
        assert c not in log, "%s's canary in tpmaild's log" % owner


# --------------------------------------------------------------------------
# 6. SIGTERM: exit 0, no proxy left

def test_sigterm_leaves_no_proxy(mode_factory, mailboxes):
    mode, make = mode_factory
    args = ["--drain-grace", "2"]
    uid_base = None
    if mode == "root":
        uid_base = random_uid_base()
        args += ["--uid-base", str(uid_base)]
    t = make(args=args)
    svcs = t.services()
    pids = {s["pid"]: th._proc_stat(s["pid"])[2] for s in svcs.values()}
    ports = [t.port(n) for n in svcs]
    assert len(pids) == 3
    rc = t.stop(signal.SIGTERM, timeout=30)
    assert rc == 0, "tpmaild exit code after SIGTERM: %r" % (rc,)
    for p, st in pids.items():
        wait_for(lambda: not th.proc_alive(p, st), 5, what="proxy %d to exit" % p)
    if uid_base is not None:
        width = t.port_range[1] - t.port_range[0] + 1
        left = processes_with_uid(uid_base, uid_base + width)
        assert not left, "processes still running with tenant uids: %r" % left
    for p in ports:
        assert not th.port_open(p), "port %d still open" % p
    assert "SIGSYS" not in t.log_text()


def test_plain_tenant_switched_to_tls_in_the_sandbox(tpmaild_factory, dovecot, dovecot_log,
                                                     mailboxes):
    """A proxy that started with a plain upstream sets up no TLS before its
    sandbox (it does not need it, and that saves memory in every plain
    tenant).  Switched to POP3S while it runs, it builds its TLS context and
    seeds OpenSSL's random generator inside the sandbox: the same process
    then logs in over TLS, under the filter as shipped (a forbidden call
    would kill it in a release build)."""
    dests = th.standard_destinations(dovecot)
    t = tpmaild_factory(crs={"mail.yaml": th.cr("mail", "dest-a")}, destinations=dests,
                        expect=["mail"])
    pid = t.services()["mail"]["pid"]
    with Pop3(t.port("mail")) as c:
        assert c.greeting.startswith(b"+OK")
        assert c.cmd("QUIT").startswith(b"+OK")
    dests["provider"][0] = th.pop3_dest(
        "dest-a", "alice", dovecot.users["alice"], dovecot.pop3s_port, protocol="pop3s",
        extra={"mail.pop3s.ssl.cafile": dovecot.ca_file})
    t.write_destinations(dests)
    login = re.compile(r"pop3-login: Info: Login: user=<alice>, method=PLAIN, (.*)")

    def over_tls():
        with Pop3(t.port("mail")) as c:
            if not c.greeting.startswith(b"+OK"):
                return False
            st, raw = c.cmd_multi("RETR 1")
            assert st.startswith(b"+OK"), st
            assert multiline_body(raw) == mailboxes["alice"][0]
            c.cmd("QUIT")
        return any("TLS" in m for m in login.findall(dovecot_log()))
    wait_for(over_tls, START_TIMEOUT, interval=0.3, what="a session over TLS after the switch")
    s = t.services()["mail"]
    assert s["pid"] == pid and s["restarts"] == 0, s
    assert th.proc_alive(pid)
    assert "SIGSYS" not in t.log_text()
