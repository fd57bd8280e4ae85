#!/usr/bin/python3
"""Side-by-side benchmark: tpmail against direct Dovecot, nginx's mail proxy
and HAProxy (TCP mode), all on loopback.  Started by tests/bench/run, which
installs the packages, builds tpmail and popbench; see docs/performance.md.

    bench.py --build-dir DIR --popbench BIN [--quick] [--reps N]
             [--only W1,W2,...] [--json FILE] [--markdown FILE]
             [--wait-quiet SEC] [--time-limit SEC]

Every server this starts runs in its own session (process group) under a
fresh work directory and is stopped at the end, whatever happens; every load
run is bounded in time (popbench -T) and in count.
"""
import argparse
import ctypes
import json
import os
import platform
import random
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(TOP, "tests", "lib"))
from dovecot import Dovecot, big_message, dot_stuff, wait_for  # noqa: E402

HOST = "127.0.0.1"
USER, PASSWORD = "bench", "bench-password"
CLK = os.sysconf("SC_CLK_TCK")
KIB = 1024
MIB = 1024 * 1024
GIB = 1024 * MIB
SLOW_MSG_SIZE = 20 * MIB


def log(msg):
    sys.stderr.write("[bench %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


class BenchError(RuntimeError):
    pass


class Deadline(BaseException):
    """The whole run's time bound passed (SIGALRM)."""


# --------------------------------------------------------------------------
# /proc helpers

def _stat_fields(pid):
    """Fields of /proc/PID/stat after the command name (index 0 = state)."""
    with open("/proc/%d/stat" % pid, "rb") as f:
        st = f.read()
    return st[st.rindex(b")") + 2:].split()


def all_procs():
    """{pid: (ppid, session, state)} of every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            f = _stat_fields(int(d))
        except (OSError, ValueError):
            continue
        out[int(d)] = (int(f[1]), int(f[3]), f[0].decode())
    return out


def tree(root):
    """root and all its live descendants."""
    procs = all_procs()
    kids = {}
    for pid, (ppid, _, state) in procs.items():
        if state != "Z":
            kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in procs or p == root:
            out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_seconds(pids):
    """CPU time (user + system) of the processes, with the CPU time of
    their reaped children.  Live time comes from the scheduler's nanosecond
    counter (/proc/PID/task/*/schedstat, the quantity utime+stime in
    /proc/PID/stat are scaled to) so short runs are not rounded to 10 ms
    ticks; /proc/PID/stat's utime+stime are the fallback."""
    total = 0.0
    for pid in pids:
        try:
            f = _stat_fields(pid)
        except OSError:
            continue
        live = None
        try:
            ns = 0
            for t in os.listdir("/proc/%d/task" % pid):
                with open("/proc/%d/task/%s/schedstat" % (pid, t)) as s:
                    ns += int(s.read().split()[0])
            live = ns / 1e9
        except (OSError, ValueError, IndexError):
            live = None
        if live is None:
            live = (int(f[11]) + int(f[12])) / CLK
        total += live + (int(f[13]) + int(f[14])) / CLK
    return total


def smaps_rollup(pid):
    """{field: kB} from /proc/PID/smaps_rollup."""
    out = {}
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            m = re.match(r"(\w+):\s+(\d+) kB", line)
            if m:
                out[m.group(1)] = int(m.group(2))
    out["Private"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    return out


def mem_kib(pids):
    """Summed Pss / Private / Rss (KiB) of the processes."""
    tot = {"Pss": 0, "Private": 0, "Rss": 0}
    for pid in pids:
        try:
            m = smaps_rollup(pid)
        except OSError:
            continue
        for k in tot:
            tot[k] += m.get(k, 0)
    return tot


def status_kib(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_hwm(pid):
    """Reset VmHWM (peak RSS) to the current RSS."""
    with open("/proc/%d/clear_refs" % pid, "w") as f:
        f.write("5")


def machine_cpu():
    """(busy, steal, total) CPU seconds of the whole machine since boot;
    busy is user + nice + system (interrupt time left out)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = v
    return ((user + nice + system) / CLK, steal / CLK,
            (user + nice + system + idle + iowait + irq + softirq + steal) / CLK)


def own_cpu():
    """CPU seconds of this process and of every child it has reaped (and
    so of everything started here, once stopped)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def other_cpu_share(interval=2.0):
    """Share of the machine's CPU used by processes not started here,
    over ``interval`` seconds."""
    m0, o0 = machine_cpu(), own_cpu()
    time.sleep(interval)
    m1, o1 = machine_cpu(), own_cpu()
    total = m1[2] - m0[2]
    return max(0.0, (m1[0] - m0[0]) - (o1 - o0)) / total if total > 0 else 0.0


def kill_session(sid, sig=signal.SIGKILL):
    """Signal every process of session ``sid``; returns how many.  Each is
    signalled through a pidfd opened before its session is checked again,
    so that a pid reused between the listing and the signal (by a process
    of another session) is never hit."""
    n = 0
    for pid, (_, s, state) in all_procs().items():
        if s != sid or state == "Z":
            continue
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue                    # gone already
        try:
            if int(_stat_fields(pid)[3]) == sid:
                signal.pidfd_send_signal(fd, sig)
                n += 1
        except (OSError, ValueError):
            pass                        # gone meanwhile: nothing to signal
        finally:
            os.close(fd)
    return n


def session_alive(sid):
    return any(s == sid and st != "Z" for _, s, st in all_procs().values())


def port_free(port, host=HOST):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def free_ports(n):
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def pick_port_range(width, used=()):
    """``width`` consecutive free ports below the ephemeral range."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            eph_lo = int(f.read().split()[0])
    except OSError:
        eph_lo = 32768
    rnd = random.Random(os.getpid() ^ int(time.time() * 1000))
    for _ in range(200):
        lo = rnd.randrange(10000, eph_lo - width)
        hi = lo + width - 1
        if any(not (hi < a or lo > b) for a, b in used):
            continue
        if all(port_free(p) for p in range(lo, hi + 1)):
            return lo, hi
    raise BenchError("no free range of %d ports" % width)


def wait_port(port, timeout, host=HOST):
    def ok():
        with socket.create_connection((host, port), timeout=1):
            return True
    wait_for(ok, timeout, what="port %d" % port)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pctl(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(round(p * (len(xs) - 1))))]


# --------------------------------------------------------------------------
# servers

class Server:
    """A foreground server in its own session, logging to a file."""

    name = "server"

    def __init__(self, work):
        self.work = work
        self.proc = None
        self.logf = None

    def argv(self):
        raise NotImplementedError

    def start(self):
        self.logf = open(os.path.join(self.work, "%s.log" % self.name), "ab")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL,
                                     stdout=self.logf, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=self.work)
        try:
            self.wait_ready()
        except Exception as e:
            tail = self.log_tail()
            self.stop()
            raise BenchError("%s did not start (%s); its log:\n%s" % (self.name, e, tail))

    def wait_ready(self):
        pass

    def log_tail(self, n=3000):
        try:
            with open(self.logf.name, "rb") as f:
                return f.read()[-n:].decode(errors="replace")
        except OSError:
            return ""

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc is None:
            return
        sid = self.proc.pid
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log("%s did not stop within %d s: killing it" % (self.name, timeout))
                self.proc.kill()
                self.proc.wait(5)
        # nothing of it may stay behind (children in the same session)
        deadline = time.monotonic() + 5
        while session_alive(sid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if session_alive(sid):
            log("%s: killing leftover processes" % self.name)
            kill_session(sid)
            wait_for(lambda: not session_alive(sid), 5, what="%s leftovers" % self.name)
        self.proc = None
        if self.logf:
            self.logf.close()
            self.logf = None

    def restart(self):
        self.stop()
        self.start()


class BenchDovecot(Dovecot):
    """The test fixture's Dovecot, tuned to carry the benchmark: no rawlog
    (the fixture records every session), high-performance login (one
    pop3-login process per core serving many connections, as Dovecot's
    documentation recommends for busy servers; it also keeps the TLS of
    1,000 sessions without 1,000 login processes), reusable pop3 processes,
    and limits raised for thousands of sessions from one user and IP."""

    def _write_conf(self):
        super()._write_conf()
        with open(self.conf_path) as f:
            conf = f.read()

        def sub(pattern, repl, flags=0):
            nonlocal conf
            conf, n = re.subn(pattern, repl, conf, flags=flags)
            if n != 1:
                raise BenchError("tests/lib/dovecot.py's configuration changed: "
                                 "cannot apply %r" % pattern)

        sub(r"^rawlog_dir = .*\n", "", re.M)
        sub(r"mail_max_userip_connections = \d+", "mail_max_userip_connections = 20000")
        sub(r"auth_verbose = yes", "auth_verbose = no")
        sub(r"(service pop3-login \{\n(?:.*\n)*?)  process_limit = \d+\n\}",
            r"\1  process_limit = 8\n  service_count = 0\n"
            r"  process_min_avail = %d\n  client_limit = 6000\n}" % (os.cpu_count() or 1))
        sub(r"service pop3 \{\n  process_limit = \d+\n\}",
            "service pop3 {\n  process_limit = 6000\n  service_count = 0\n"
            "  process_min_avail = 4\n}")
        sub(r"(service anvil \{\n  )client_limit = \d+", r"\1client_limit = 15000")
        conf += "default_client_limit = 15000\n"
        with open(self.conf_path, "w") as f:
            f.write(conf)


class Nginx(Server):
    name = "nginx"

    def __init__(self, work, dc, port, auth_port):
        super().__init__(work)
        self.port, self.auth_port = port, auth_port
        self.dir = os.path.join(work, "nginx")
        os.makedirs(os.path.join(self.dir, "tmp"), exist_ok=True)
        self.conf = os.path.join(self.dir, "nginx.conf")
        module = None
        for d in ("/usr/lib/nginx/modules", "/usr/share/nginx/modules"):
            p = os.path.join(d, "ngx_mail_module.so")
            if os.path.exists(p):
                module = p
                break
        if module is None:
            raise BenchError("nginx mail module not found (libnginx-mod-mail)")
        tmp = os.path.join(self.dir, "tmp")
        with open(self.conf, "w") as f:
            f.write("""\
load_module {module};
worker_processes auto;
worker_rlimit_nofile 16000;
daemon off;
master_process on;
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {{
    worker_connections 8000;
}}
http {{
    access_log off;
    client_body_temp_path {tmp}/client;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    # auth_http answered by this same nginx: a fixed backend and the
    # user's password
    server {{
        listen {host}:{auth_port};
        location = /auth {{
            add_header Auth-Status OK;
            add_header Auth-Server {host};
            add_header Auth-Port {dport};
            add_header Auth-Pass {password};
            return 204;
        }}
    }}
}}
mail {{
    auth_http {host}:{auth_port}/auth;
    proxy on;
    server {{
        listen {host}:{port};
        protocol pop3;
    }}
}}
""".format(module=module, dir=self.dir, tmp=tmp, host=HOST, auth_port=auth_port,
           dport=dc.pop3_port, password=PASSWORD, port=port))

    def argv(self):
        return [shutil.which("nginx") or "/usr/sbin/nginx", "-p", self.dir, "-c", self.conf,
                "-e", os.path.join(self.dir, "error.log")]

    def wait_ready(self):
        wait_port(self.port, 15)
        wait_port(self.auth_port, 15)


class HAProxy(Server):
    name = "haproxy"

    def __init__(self, work, dc, port, tls_port):
        super().__init__(work)
        self.port, self.tls_port = port, tls_port
        self.conf = os.path.join(work, "haproxy.cfg")
        with open(self.conf, "w") as f:
            f.write("""\
global
    maxconn 8000
defaults
    mode tcp
    maxconn 8000
    timeout connect 10s
    timeout client 10m
    timeout server 10m
# a protocol-blind relay: clients log in themselves
listen pop3
    bind {host}:{port}
    server dovecot {host}:{dport}
# the same with TLS to the server (POP3S), verified like tpmail does
listen pop3_tls_upstream
    bind {host}:{tls_port}
    server dovecot {host}:{dsport} ssl verify required ca-file {ca} verifyhost localhost sni str(localhost)
""".format(host=HOST, port=port, dport=dc.pop3_port, tls_port=tls_port,
           dsport=dc.pop3s_port, ca=dc.ca_file))

    def argv(self):
        return [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", self.conf]

    def wait_ready(self):
        wait_port(self.port, 15)
        wait_port(self.tls_port, 15)


def cr_doc(name, dest):
    return {"apiVersion": "destination.connectivity.api.sap/v1", "kind": "Destination",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"destinationRef": {"name": dest}}}


def dest_plain(name, dc):
    return {"Name": name, "Type": "MAIL", "ProxyType": "Internet",
            "Authentication": "BasicAuthentication",
            "mail.user": USER, "mail.password": PASSWORD,
            "mail.transport.protocol": "pop3",
            "mail.pop3.host": HOST, "mail.pop3.port": str(dc.pop3_port)}


def dest_pop3s(name, dc, cafile=True):
    d = {"Name": name, "Type": "MAIL", "ProxyType": "Internet",
         "Authentication": "BasicAuthentication",
         "mail.user": USER, "mail.password": PASSWORD,
         "mail.transport.protocol": "pop3s",
         "mail.pop3s.host": HOST, "mail.pop3s.port": str(dc.pop3s_port)}
    if cafile:
        d["mail.pop3s.ssl.cafile"] = dc.ca_file
    return d


class Tpmaild(Server):
    """tpmaild in standalone mode, run as root (complete sandbox)."""

    def __init__(self, work, name, bins, destinations, crs, port_range, uid_base,
                 args=()):
        super().__init__(work)
        self.name = name
        self.bins = bins
        self.dir = os.path.join(work, name)
        self.crs = os.path.join(self.dir, "crs")
        self.state = os.path.join(self.dir, "state")
        self.control = os.path.join(self.state, "control.sock")
        self.dest_file = os.path.join(self.dir, "destinations.json")
        os.makedirs(self.crs)
        with open(self.dest_file, "w") as f:
            json.dump(destinations, f)
        for name_, dest in crs:
            self.write_cr(name_, dest)
        self.port_range = port_range
        self.uid_base = uid_base
        self.args = list(args)
        self.expect = len(crs)

    def write_cr(self, name, dest):
        tmp = os.path.join(self.crs, ".%s.tmp" % name)
        with open(tmp, "w") as f:
            json.dump(cr_doc(name, dest), f)
        os.rename(tmp, os.path.join(self.crs, "%s.json" % name))

    def argv(self):
        return [self.bins["tpmaild"], "--crs", self.crs, "--destinations", self.dest_file,
                "--state-dir", self.state, "--listen-address", HOST,
                "--port-range", "%d-%d" % self.port_range, "--uid-base", str(self.uid_base),
                "--log-format", "json"] + self.args

    def wait_ready(self):
        wait_for(lambda: self.alive() and os.path.exists(self.control) and self.status(),
                 20, what="%s control socket" % self.name)
        if self.expect:
            self.wait_running(self.expect, 60)

    def ctl(self, *args, check=True, timeout=30):
        r = subprocess.run([self.bins["tpmailctl"], "--control", self.control] + list(args),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        if check and r.returncode != 0:
            raise BenchError("tpmailctl %s: %s" % (" ".join(args), r.stderr.decode()))
        return r.stdout

    def status(self, timeout=30):
        return json.loads(self.ctl("--json", "status", timeout=timeout))

    def running(self, timeout=30):
        return [s for s in self.status(timeout)["services"]
                if s["state"] == "running" and s["pid"]]

    def wait_running(self, n, timeout):
        def ok():
            if not self.alive():
                raise BenchError("%s exited:\n%s" % (self.name, self.log_tail()))
            return len(self.running()) >= n
        wait_for(ok, timeout, interval=0.1, what="%d services of %s running" % (n, self.name),
                 fatal=(BenchError,))

    def service(self, name):
        for s in self.status()["services"]:
            if s["name"] == name:
                return s
        raise BenchError("no service %s in %s" % (name, self.name))

    def restart_service(self, name, hard=True, timeout=15):
        old = self.service(name)["pid"]
        self.ctl("restart", "default/%s" % name, *(["--hard"] if hard else []))

        def new():
            s = self.service(name)
            return s["state"] == "running" and s["pid"] and s["pid"] != old and s
        s = wait_for(new, timeout, interval=0.02, what="%s restarted" % name)
        wait_for(lambda: not os.path.exists("/proc/%d" % old) or
                 _stat_fields(old)[0] == b"Z", 10, what="old proxy of %s to exit" % name)
        return s


# --------------------------------------------------------------------------
# targets: where a client connects, and which processes are "the proxy"

class Target:
    def __init__(self, key, label, port, tls=False, cpu_pids=None, mem_pids=None,
                 fresh=None, proxy=True):
        self.key, self.label, self.port, self.tls = key, label, port, tls
        self._cpu_pids, self._mem_pids, self._fresh = cpu_pids, mem_pids, fresh
        self.proxy = proxy

    def cpu_pids(self):
        return self._cpu_pids()

    def mem_pids(self):
        return self._mem_pids()

    def fresh(self):
        """A new proxy process (no memory retained from earlier runs)."""
        if self._fresh:
            self._fresh()


# --------------------------------------------------------------------------

class Bench:
    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.reps = args.reps or (1 if self.quick else 3)
        self.results = {}        # (workload, target) -> {metric: [values]}
        self.notes = []
        self.bins = {
            "tpmaild": os.path.join(args.build_dir, "supervisor", "tpmaild"),
            "tpmailctl": os.path.join(args.build_dir, "supervisor", "tpmailctl"),
            "tpmail-pop3": os.path.join(args.build_dir, "proxy", "tpmail-pop3"),
        }
        for n, p in self.bins.items():
            if not os.access(p, os.X_OK):
                raise BenchError("%s not built (%s)" % (n, p))
        self.popbench_bin = args.popbench
        self.servers = []
        self.used_ranges = []
        self.uid_next = 3100000 + random.Random().randrange(0, 200) * 10000
        # sizes
        q = self.quick
        self.msg_size = 2 * MIB if q else 20 * MIB
        self.retr_plan = [(1, 4), (4, 8)] if q else [(1, 16), (4, 32)]
        self.retr_tls_plan = [(1, 2), (4, 4)] if q else [(1, 8), (4, 16)]
        self.setup_conc = [1, 8, 32]
        self.setup_secs = 0.5 if q else 3.0
        self.tls_setup_conc = [8] if q else [1, 8]
        self.idle_n = 100 if q else 1000
        self.slow_secs = 0.5 if q else 2.0
        self.slow_rate = 64 * KIB
        self.slow_rcvbuf = 64 * KIB
        self.tenants = 20 if q else 200
        self.restarts = 10 if q else 100
        self.scale_crs = 50 if q else 1000
        self.scale_reps = 1 if q else min(self.reps, 3)
        self.scale_timeout = 30 if q else 90

    # -- record ------------------------------------------------------------

    def put(self, workload, target, metric, value):
        self.results.setdefault((workload, target), {}).setdefault(metric, []).append(value)

    def get(self, workload, target, metric):
        return median(self.results.get((workload, target), {}).get(metric, []))

    # -- environment -----------------------------------------------------

    def start(self):
        self.work = tempfile.mkdtemp(prefix="tpmail-bench-")
        os.chmod(self.work, 0o755)
        log("work dir %s" % self.work)
        self.dc = BenchDovecot(workdir=os.path.join(self.work, "dovecot"),
                               users={USER: PASSWORD}, start=False)
        self.dc.start()
        self.msg = big_message(self.msg_size, tag="bench")
        msgs = [self.msg]
        self.body_len = len(dot_stuff(self.msg))
        # the slow reader needs a message larger than what the kernel's
        # socket buffers absorb: always 20 MiB
        if self.msg_size == SLOW_MSG_SIZE:
            self.slow_msgno, self.slow_body_len = 1, self.body_len
        else:
            slow = big_message(SLOW_MSG_SIZE, tag="slow")
            msgs.append(slow)
            self.slow_msgno, self.slow_body_len = 2, len(dot_stuff(slow))
        self.dc.seed(USER, msgs)
        dc = self.dc

        # tpmail: one CR with a plain upstream, one with POP3S
        rng = pick_port_range(8)
        self.used_ranges.append(rng)
        self.tp = Tpmaild(self.work, "tpmaild", self.bins,
                          {"provider": [dest_plain("plain", dc), dest_pop3s("tls", dc)]},
                          [("bench-plain", "plain"), ("bench-tls", "tls")], rng,
                          self.next_uid_base(8),
                          args=["--max-sessions", str(self.idle_n + 500),
                                "--log-level", "warn", "--drain-grace", "2"])
        self.start_server(self.tp)
        np_, na, hp, hpt = free_ports(4)
        self.ngx = Nginx(self.work, dc, np_, na)
        self.start_server(self.ngx)
        self.hap = HAProxy(self.work, dc, hp, hpt)
        self.start_server(self.hap)

        def tp_port(name):
            return int(self.tp.service(name)["listen"].rsplit(":", 1)[1])

        def tp_pid(name):
            return lambda: [self.tp.service(name)["pid"]]

        def tp_fresh(name):
            return lambda: self.tp.restart_service(name, hard=True)

        dc_tree = lambda: tree(self.dc.proc.pid)  # noqa: E731
        self.targets = {
            "direct": Target("direct", "Dovecot direct", dc.pop3_port,
                             cpu_pids=dc_tree, mem_pids=dc_tree, proxy=False),
            "direct-tls": Target("direct-tls", "Dovecot direct POP3S", dc.pop3s_port, tls=True,
                                 cpu_pids=dc_tree, mem_pids=dc_tree, proxy=False),
            "tpmail": Target("tpmail", "tpmail", tp_port("bench-plain"),
                             cpu_pids=lambda: tree(self.tp.pid), mem_pids=tp_pid("bench-plain"),
                             fresh=tp_fresh("bench-plain")),
            "tpmail-tls": Target("tpmail-tls", "tpmail, POP3S upstream", tp_port("bench-tls"),
                                 cpu_pids=lambda: tree(self.tp.pid),
                                 mem_pids=tp_pid("bench-tls"), fresh=tp_fresh("bench-tls")),
            "nginx": Target("nginx", "nginx mail proxy", np_,
                            cpu_pids=lambda: tree(self.ngx.pid),
                            mem_pids=lambda: tree(self.ngx.pid), fresh=self.ngx.restart),
            "haproxy": Target("haproxy", "HAProxy (TCP)", hp,
                              cpu_pids=lambda: [self.hap.pid], mem_pids=lambda: [self.hap.pid],
                              fresh=self.hap.restart),
            "haproxy-tls": Target("haproxy-tls", "HAProxy, TLS upstream", hpt,
                                  cpu_pids=lambda: [self.hap.pid],
                                  mem_pids=lambda: [self.hap.pid], fresh=self.hap.restart),
        }
        sb = self.tp.service("bench-plain").get("sandbox") or {}
        self.sandbox = "complete" if sb and not sb.get("missing") else "missing: %s" % (
            json.dumps(sb.get("missing")) if sb else "no report")
        log("tpmail sandbox: %s (uid %s, chroot %s, seccomp %s)" % (
            self.sandbox, sb.get("uid"), sb.get("chroot"), sb.get("seccomp")))
        # every path works before anything is measured
        for t in self.targets.values():
            r = self.popbench("retr", t, ["-c", "1", "-n", "1", "-e", str(self.body_len)],
                              timeout=30)
            if r.get("failed") or not r.get("completed"):
                raise BenchError("smoke RETR through %s failed: %s" % (t.key, r))
        log("all paths work (message %d bytes, %d on the wire)" % (len(self.msg), self.body_len))

    def next_uid_base(self, width):
        b = self.uid_next
        self.uid_next += width + 100
        return b

    def start_server(self, s):
        self.servers.append(s)
        s.start()

    def stop_all(self):
        for s in reversed(self.servers):
            try:
                s.stop()
            except Exception as e:  # noqa: BLE001
                log("stopping %s: %r" % (s.name, e))
        self.servers = []
        if getattr(self, "dc", None) is not None:
            try:
                self.dc.stop()
            except Exception as e:  # noqa: BLE001
                log("stopping dovecot: %r" % (e,))

    # -- load --------------------------------------------------------------

    def popbench_argv(self, mode, t, extra, timeout):
        argv = [self.popbench_bin, mode] + list(extra)
        if t.tls:
            argv += ["-s", "-C", self.dc.ca_file]
        argv += ["-u", USER, "-p", PASSWORD, "-T", "%g" % timeout, HOST, str(t.port)]
        return argv

    def popbench(self, mode, t, extra, timeout):
        argv = self.popbench_argv(mode, t, extra, timeout)
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=timeout + 15)
        lines = r.stdout.decode().strip().splitlines()
        try:
            res = json.loads(lines[-1])
        except (IndexError, ValueError):
            raise BenchError("popbench %s: no result (%s)" % (" ".join(argv),
                                                              r.stderr.decode()[-500:]))
        if r.returncode != 0:
            res["stderr"] = r.stderr.decode()[-500:]
            log("WARNING: %s %s: %d failed sessions: %s" % (mode, t.key, res.get("failed", 0),
                                                            res["stderr"].strip()))
        return res

    # -- workloads -------------------------------------------------------

    def w1_retr(self):
        """RETR of the big message, plain legs."""
        keys = ["direct", "tpmail", "nginx", "haproxy"]
        self._retr("W1", keys, self.retr_plan)

    def w2_retr_tls(self):
        keys = ["direct-tls", "tpmail-tls", "haproxy-tls"]
        self._retr("W2", keys, self.retr_tls_plan)

    def _retr(self, w, keys, plan):
        for c, n in plan:
            for k in keys:  # warm-up
                self.popbench("retr", self.targets[k], ["-c", str(c), "-n", str(c),
                                                        "-e", str(self.body_len)], timeout=60)
            for rep in range(self.reps):
                for k in keys:
                    t = self.targets[k]
                    pids = t.cpu_pids()
                    c0 = cpu_seconds(pids)
                    r = self.popbench("retr", t, ["-c", str(c), "-n", str(n),
                                                  "-e", str(self.body_len)], timeout=120)
                    c1 = cpu_seconds(t.cpu_pids())
                    if r.get("failed"):
                        continue
                    gib = r["body_bytes"] / GIB
                    self.put("%s c=%d" % (w, c), k, "mib_s", r["mib_per_s"])
                    self.put("%s c=%d" % (w, c), k, "cpu_s_gib", (c1 - c0) / gib)
                    log("%s c=%d %-12s %8.1f MiB/s  %6.2f CPU s/GiB" % (
                        w, c, k, r["mib_per_s"], (c1 - c0) / gib))

    def w3_setup(self):
        self._setup("W3", ["direct", "tpmail", "nginx", "haproxy"], self.setup_conc)

    def w4_setup_tls(self):
        self._setup("W4", ["direct-tls", "tpmail-tls", "haproxy-tls"], self.tls_setup_conc)

    def _setup(self, w, keys, concs):
        for k in keys:  # warm-up
            self.popbench("setup", self.targets[k], ["-c", "8", "-d", "0.3"], timeout=30)
        for c in concs:
            for rep in range(self.reps):
                for k in keys:
                    t = self.targets[k]
                    c0 = cpu_seconds(t.cpu_pids())
                    r = self.popbench("setup", t, ["-c", str(c), "-d", "%g" % self.setup_secs,
                                                   "-S", "20"], timeout=self.setup_secs + 30)
                    c1 = cpu_seconds(t.cpu_pids())
                    if not r.get("completed"):
                        continue
                    wk = "%s c=%d" % (w, c)
                    self.put(wk, k, "sess_s", r["sessions_per_s"])
                    self.put(wk, k, "p50_ms", r["p50_ms"])
                    self.put(wk, k, "p99_ms", r["p99_ms"])
                    self.put(wk, k, "cpu_us", (c1 - c0) / r["completed"] * 1e6)
                    if r.get("failed"):
                        self.put(wk, k, "failed", r["failed"])
                    log("%s %-12s %7.0f sessions/s  p50 %6.2f ms  p99 %6.2f ms  "
                        "%6.0f us CPU/session" % (wk, k, r["sessions_per_s"], r["p50_ms"],
                                                   r["p99_ms"], (c1 - c0) / r["completed"] * 1e6))

    def _warm(self, t):
        """A few short sessions, so lazily built state exists before a
        baseline is taken."""
        self.popbench("setup", t, ["-c", "2", "-d", "0.2"], timeout=20)

    def w5_idle(self):
        keys = ["tpmail", "nginx", "haproxy", "tpmail-tls", "haproxy-tls"]
        n = self.idle_n
        for rep in range(self.reps):
            for k in keys:
                t = self.targets[k]
                t.fresh()
                self._warm(t)
                time.sleep(0.3)
                pids = t.mem_pids()
                m0 = mem_kib(pids)
                argv = self.popbench_argv("idle", t, ["-n", str(n), "-c", "32", "-H", "60",
                                                      "-S", "60"], timeout=150)
                p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
                try:
                    line = self._read_line(p, 120)
                    if not line.startswith(b"READY "):
                        raise BenchError("idle %s: %r %s" % (k, line, p.stderr.read()))
                    info = json.loads(line[6:])
                    time.sleep(0.5)
                    m1 = mem_kib(t.mem_pids())
                    # EOF on popbench's stdin releases the sessions
                    out, err = p.communicate(timeout=120)
                finally:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                ready = info["ready"]
                if info["failed"] or ready < n:
                    log("WARNING: idle %s: %d of %d sessions ready (%s)" % (
                        k, ready, n, err.decode()[-300:]))
                if ready == 0:
                    continue
                pss = (m1["Pss"] - m0["Pss"]) / ready
                priv = (m1["Private"] - m0["Private"]) / ready
                self.put("W5", k, "pss_kib", pss)
                self.put("W5", k, "priv_kib", priv)
                log("W5 %-12s %d idle sessions: %6.1f KiB PSS, %6.1f KiB private per session "
                    "(opened in %.1f s)" % (k, ready, pss, priv, info["open_s"]))

    @staticmethod
    def _read_line(p, timeout):
        deadline = time.monotonic() + timeout
        buf = b""
        fd = p.stdout.fileno()
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError("popbench gave no READY within %d s" % timeout)
            r, _, _ = select.select([fd], [], [], left)
            if r:
                b = os.read(fd, 1)
                if not b:
                    break
                buf += b
        return buf

    def w6_slow(self):
        keys = ["tpmail", "nginx", "haproxy", "tpmail-tls", "haproxy-tls"]
        for rep in range(self.reps):
            for k in keys:
                t = self.targets[k]
                t.fresh()
                self._warm(t)
                time.sleep(0.2)
                pids = t.mem_pids()
                base = {}
                for pid in pids:
                    reset_hwm(pid)
                    base[pid] = status_kib(pid, "VmRSS")
                peak = dict(base)
                argv = self.popbench_argv("slow", t, ["-r", str(self.slow_rate), "-t",
                                                      "%g" % self.slow_secs,
                                                      "-b", str(self.slow_rcvbuf),
                                                      "-m", str(self.slow_msgno),
                                                      "-e", str(self.slow_body_len)],
                                        timeout=60)
                p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                try:
                    while p.poll() is None:
                        for pid in pids:
                            try:
                                peak[pid] = max(peak[pid], status_kib(pid, "VmRSS"))
                            except OSError:
                                pass
                        time.sleep(0.01)
                    out, err = p.communicate(timeout=60)
                finally:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                for pid in pids:
                    try:
                        peak[pid] = max(peak[pid], status_kib(pid, "VmHWM"))
                    except OSError:
                        pass
                res = json.loads(out.decode().strip().splitlines()[-1])
                if res.get("failed"):
                    log("WARNING: slow %s failed: %s" % (k, err.decode()[-300:]))
                    continue
                growth = sum(peak[p_] - base[p_] for p_ in pids)
                self.put("W6", k, "rss_kib", growth)
                log("W6 %-12s peak RSS growth %6d KiB" % (k, growth))

    # -- tenants ---------------------------------------------------------

    def w7_tenants(self):
        """200 idle tenants: memory and spawn-to-ready over restarts."""
        n = self.tenants
        dc = self.dc
        dests = [dest_plain("plain", dc), dest_pop3s("pop3s-sysca", dc, cafile=False)]
        crs = [("t%04d" % i, "plain" if i % 2 == 0 else "pop3s-sysca") for i in range(n)]
        rng = pick_port_range(n + 10, self.used_ranges)
        self.used_ranges.append(rng)
        tp = Tpmaild(self.work, "tenants", self.bins, {"provider": dests}, crs, rng,
                     self.next_uid_base(n + 10), args=["--drain-grace", "1"])
        tp.expect = 0
        t0 = time.monotonic()
        self.start_server(tp)
        try:
            tp.wait_running(n, 60)
            self.put("W7", "tpmail", "start_all_s", time.monotonic() - t0)
            time.sleep(1.0)
            for _ in range(3):
                self._tenant_mem(tp, "W7", "")
                time.sleep(0.3)
            self._spawn_latency(tp)
            self._tenant_mem(tp, "W7", "after_restarts_")
        finally:
            tp.stop(timeout=60)
            self.servers.remove(tp)

    def _tenant_mem(self, tp, w, prefix):
        st = tp.status()["services"]
        kinds = {"plain": [], "sysca": []}
        for s in st:
            if s["state"] != "running" or not s["pid"]:
                continue
            try:
                m = smaps_rollup(s["pid"])
            except OSError:
                continue
            kind = "plain" if int(s["name"][1:]) % 2 == 0 else "sysca"
            # an idle proxy's CPU time so far is what its start cost
            m["cpu_ms"] = cpu_seconds([s["pid"]]) * 1e3
            kinds[kind].append(m)
        for kind, ms in kinds.items():
            if not ms:
                continue
            self.put(w, "tpmail", "%spss_%s_kib" % (prefix, kind),
                     sum(m["Pss"] for m in ms) / len(ms))
            self.put(w, "tpmail", "%spriv_%s_kib" % (prefix, kind),
                     sum(m["Private"] for m in ms) / len(ms))
            self.put(w, "tpmail", "%srss_%s_kib" % (prefix, kind),
                     sum(m["Rss"] for m in ms) / len(ms))
            self.put(w, "tpmail", "%sstart_cpu_%s_ms" % (prefix, kind),
                     statistics.median(m["cpu_ms"] for m in ms))
        allm = kinds["plain"] + kinds["sysca"]
        self.put(w, "tpmail", "%spss_all_kib" % prefix, sum(m["Pss"] for m in allm) / len(allm))
        sup = smaps_rollup(tp.pid)
        self.put(w, "tpmail", "%ssupervisor_pss_kib" % prefix, sup["Pss"])
        log("W7 %d tenants: PSS per tenant %.0f KiB (plain %.0f, POP3S+system CA %.0f), "
            "private %.0f / %.0f KiB; tpmaild PSS %d KiB" % (
                len(allm), self.results[(w, "tpmail")]["%spss_all_kib" % prefix][-1],
                self.results[(w, "tpmail")].get("%spss_plain_kib" % prefix, [0])[-1],
                self.results[(w, "tpmail")].get("%spss_sysca_kib" % prefix, [0])[-1],
                self.results[(w, "tpmail")].get("%spriv_plain_kib" % prefix, [0])[-1],
                self.results[(w, "tpmail")].get("%spriv_sysca_kib" % prefix, [0])[-1],
                sup["Pss"]))

    def _spawn_latency(self, tp):
        """tpmailctl restart of one tenant after another; spawn-to-ready from
        tpmaild's log ("started pid P" to "running: pid P", ms stamps), and
        as a client sees it (restart command issued to the new pid running in
        the log: includes starting tpmailctl)."""
        logpath = tp.logf.name
        names = ["t%04d" % (i % self.tenants) for i in range(self.restarts)]
        spawn, client, by_kind = [], [], {"plain": [], "sysca": []}
        deadline = time.monotonic() + (40 if self.quick else 120)
        with open(logpath, "rb") as lf:
            lf.seek(0, os.SEEK_END)
            pending = b""
            for name in names:
                if time.monotonic() > deadline:
                    log("WARNING: spawn latency: time bound reached after %d restarts"
                        % len(spawn))
                    break
                key = "default/%s" % name
                t0 = time.monotonic()
                tp.ctl("restart", key)
                started = running = None
                until = time.monotonic() + 10
                while running is None and time.monotonic() < until:
                    chunk = lf.read()
                    if not chunk:
                        time.sleep(0.001)
                        continue
                    pending += chunk
                    lines = pending.split(b"\n")
                    pending = lines.pop()
                    for line in lines:
                        try:
                            o = json.loads(line)
                        except ValueError:
                            continue
                        msg = o.get("msg", "")
                        m = re.match(r"service (\S+): started pid (\d+)$", msg)
                        if m and m.group(1) == key:
                            started = (int(m.group(2)), o["time"])
                        m = re.match(r"service (\S+) running: pid (\d+)", msg)
                        if m and m.group(1) == key and started and \
                                int(m.group(2)) == started[0]:
                            running = o["time"]
                            client.append((time.monotonic() - t0) * 1e3)
                if running is None:
                    log("WARNING: %s did not report running after restart" % key)
                    continue
                spawn.append(_iso_ms(running) - _iso_ms(started[1]))
                by_kind["plain" if int(name[1:]) % 2 == 0 else "sysca"].append(spawn[-1])
        if spawn:
            self.put("W7", "tpmail", "spawn_p50_ms", pctl(spawn, 0.5))
            self.put("W7", "tpmail", "spawn_p99_ms", pctl(spawn, 0.99))
            self.put("W7", "tpmail", "restart_client_p50_ms", pctl(client, 0.5))
            self.put("W7", "tpmail", "restart_client_p99_ms", pctl(client, 0.99))
            self.put("W7", "tpmail", "restarts", len(spawn))
            for kind, xs in by_kind.items():
                if xs:
                    self.put("W7", "tpmail", "spawn_%s_p50_ms" % kind, pctl(xs, 0.5))
                    self.put("W7", "tpmail", "spawn_%s_p99_ms" % kind, pctl(xs, 0.99))
            log("W7 spawn-to-ready over %d restarts: p50 %.0f ms p99 %.0f ms (log stamps; "
                "plain upstream p50 %s ms, POP3S + system CA p50 %s ms); "
                "restart command to running: p50 %.1f ms p99 %.1f ms" % (
                    len(spawn), pctl(spawn, 0.5), pctl(spawn, 0.99),
                    pctl(by_kind["plain"], 0.5), pctl(by_kind["sysca"], 0.5),
                    pctl(client, 0.5), pctl(client, 0.99)))

    def w7_scale(self):
        """1,000 CRs written into a watched directory: time until all serve.

        "Serving" is tpmaild's log line "service NS/NAME running: pid P"
        (written when the proxy reports it listens), so the time does not
        depend on how fast the control socket answers during the ramp;
        ``tpmailctl status`` is polled too, for its answer time and to
        confirm the count."""
        n = self.scale_crs
        for rep in range(self.scale_reps):
            rng = pick_port_range(n + 20, self.used_ranges)
            self.used_ranges.append(rng)
            tp = Tpmaild(self.work, "scale%d" % rep, self.bins,
                         {"provider": [dest_plain("plain", self.dc)]}, [], rng,
                         self.next_uid_base(n + 20),
                         args=["--log-level", "info", "--drain-grace", "1"])
            self.start_server(tp)
            try:
                logf = open(tp.logf.name, "rb")
                logf.seek(0, os.SEEK_END)
                pending = b""
                serving = {}
                t0_wall_ms = (time.time() % 86400) * 1000
                t0 = time.monotonic()
                for i in range(n):
                    tp.write_cr("s%04d" % i, "plain")
                t_written = time.monotonic() - t0
                limit = t0 + self.scale_timeout
                nrun = 0
                slowest = 0.0
                while time.monotonic() < limit:
                    chunk = logf.read()
                    lines = (pending + chunk).split(b"\n")
                    pending = lines.pop()
                    for line in lines:
                        m = re.search(rb'"time":"([^"]+)".*"msg":"service (\S+) running: pid',
                                      line)
                        if m:
                            serving[m.group(2)] = _iso_ms(m.group(1).decode())
                    if len(serving) >= n:
                        break
                    if not tp.alive():
                        raise BenchError("tpmaild exited:\n" + tp.log_tail())
                    q = time.monotonic()
                    try:
                        nrun = len(tp.running(timeout=max(1, limit - q)))
                    except subprocess.TimeoutExpired:
                        pass
                    slowest = max(slowest, time.monotonic() - q)
                    time.sleep(0.1)
                logf.close()
                self.put("W7", "tpmail", "scale_status_max_s", slowest)
                if len(serving) < n:
                    log("WARNING: W7 scale: only %d of %d serving after %d s (status: %d)" % (
                        len(serving), n, self.scale_timeout, nrun))
                    self.put("W7", "tpmail", "scale_s", None)
                    self.notes.append("%d CRs: only %d services serving after the %d s bound"
                                      % (n, len(serving), self.scale_timeout))
                    continue
                last = max(serving.values()) - t0_wall_ms
                if last < -43200000:        # midnight passed
                    last += 86400000
                done = last / 1000
                self.put("W7", "tpmail", "scale_s", done)
                st = tp.running(timeout=60)
                if len(st) < n:
                    raise BenchError("the log says %d serving, status lists %d running"
                                     % (len(serving), len(st)))
                pss = [smaps_rollup(s["pid"])["Pss"] for s in st[:n]]
                self.put("W7", "tpmail", "scale_pss_kib", sum(pss) / len(pss))
                log("W7 %d CRs written in %.2f s; all serving after %.2f s; "
                    "PSS per tenant %.0f KiB; slowest status answer during the ramp %.2f s"
                    % (n, t_written, done, sum(pss) / len(pss), slowest))
            finally:
                t1 = time.monotonic()
                tp.stop(timeout=90)
                self.servers.remove(tp)
                log("W7 scale: tpmaild with %d tenants stopped in %.1f s" % (
                    n, time.monotonic() - t1))

    # -- report ----------------------------------------------------------

    def environment(self):
        def cmd(argv):
            try:
                r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   timeout=10)
                return r.stdout.decode(errors="replace").strip()
            except (OSError, subprocess.TimeoutExpired):
                return "?"
        model = "?"
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        try:
            ev = ctypes.CDLL("libevent-2.1.so.7")
            ev.event_get_version.restype = ctypes.c_char_p
            libevent = ev.event_get_version().decode()
        except OSError:
            libevent = "?"
        try:
            ssl = ctypes.CDLL("libssl.so.3")
            ssl.OpenSSL_version.restype = ctypes.c_char_p
            ssl.OpenSSL_version.argtypes = [ctypes.c_int]
            openssl = ssl.OpenSSL_version(0).decode()
        except OSError:
            openssl = cmd(["openssl", "version"])
        with open("/proc/meminfo") as f:
            mem = f.readline().split()[1]
        git = cmd(["git", "-C", TOP, "rev-parse", "--short", "HEAD"])
        dirty = cmd(["git", "-C", TOP, "status", "--porcelain", "--untracked-files=no"])
        return {
            "nproc": os.cpu_count(), "cpu": model, "mem_gib": round(int(mem) / MIB, 1),
            "kernel": platform.release(), "openssl": openssl, "libevent": libevent,
            "dovecot": cmd(["dovecot", "--version"]).split()[0],
            "nginx": cmd(["nginx", "-v"]).split("/")[-1],
            "haproxy": cmd(["haproxy", "-v"]).splitlines()[0].split()[2],
            "tpmail": git + (" (with local changes)" if dirty else ""),
            "loadavg": open("/proc/loadavg").read().split()[:3],
        }

    def table(self, env):
        """The markdown report."""
        G = self.get
        rows = []

        def fmt(v, unit):
            if v is None:
                return "–"
            if unit in ("MiB/s", "sessions/s"):
                return "%.0f" % v
            if unit in ("ms", "s") and v < 10:
                return "%.2f" % v
            if v >= 100:
                return "%.0f" % v
            return "%.1f" % v

        def ratio(a, b):
            if a is None or b is None or b == 0:
                return "–"
            return "%.2f×" % (a / b)

        def row(workload, metric, unit, better, w, keys, goal="", met=None, note_direct=None):
            """keys: (direct, tpmail, nginx, haproxy) target keys or None."""
            vals = [G(w, k, metric) if k else None for k in keys]
            d, tpv, ng, hp = vals
            peers = [v for v in (ng, hp) if v is not None]
            best = None
            if peers:
                best = max(peers) if better == "high" else min(peers)
            cells = []
            for i, v in enumerate(vals):
                s = fmt(v, unit)
                if i == 0 and note_direct and v is not None:
                    s = "(%s %s)" % (s, note_direct)
                cells.append(s)
            rd = ratio(tpv, d) if not note_direct else "–"
            verdict = ""
            if met is not None:
                ok = met(d, tpv, ng, hp)
                verdict = "–" if ok is None else ("yes" if ok else "**no**")
            rows.append("| %s | %s (%s) | %s | %s | %s | %s | %s |" % (
                workload, metric_label(metric), unit, " | ".join(cells), rd,
                ratio(tpv, best), goal, verdict))

        def metric_label(m):
            return {
                "mib_s": "throughput ↑", "cpu_s_gib": "proxy CPU per GiB ↓",
                "sess_s": "sessions/s ↑", "p50_ms": "latency p50 ↓", "p99_ms": "latency p99 ↓",
                "cpu_us": "proxy CPU per session ↓", "pss_kib": "PSS per session ↓",
                "priv_kib": "private per session ↓", "rss_kib": "peak RSS growth ↓",
            }.get(m, m)

        def ge(a, b, f=1.0):
            return None if a is None or b is None else a >= f * b

        def lt(a, b):
            return None if a is None or b is None else a < b

        def le(a, b):
            return None if a is None or b is None else a <= b

        def best_low(*xs):
            xs = [x for x in xs if x is not None]
            return min(xs) if xs else None

        def best_high(*xs):
            xs = [x for x in xs if x is not None]
            return max(xs) if xs else None

        size = "%d MiB" % (self.msg_size // MIB)
        plain = ("direct", "tpmail", "nginx", "haproxy")
        tls = ("direct-tls", "tpmail-tls", None, "haproxy-tls")
        for c, n in self.retr_plan:
            w = "W1 c=%d" % c
            lbl = "1. RETR %s plain, %d conn" % (size, c)
            row(lbl, "mib_s", "MiB/s", "high", w, plain, "≥ 0.95× direct",
                lambda d, t, g, h: ge(t, d, 0.95))
            row(lbl, "cpu_s_gib", "CPU s", "low", w, plain, "< HAProxy",
                lambda d, t, g, h: lt(t, h), note_direct="Dovecot")
        for c, n in self.retr_tls_plan:
            w = "W2 c=%d" % c
            lbl = "2. RETR %s, POP3S upstream, %d conn" % (size, c)
            row(lbl, "mib_s", "MiB/s", "high", w, tls, "≥ 0.9× direct POP3S",
                lambda d, t, g, h: ge(t, d, 0.9))
            row(lbl, "cpu_s_gib", "CPU s", "low", w, tls, "", None, note_direct="Dovecot")
        for c in self.setup_conc:
            w = "W3 c=%d" % c
            lbl = "3. session setup, %d conn" % c
            row(lbl, "sess_s", "sessions/s", "high", w, plain, "≥ nginx and HAProxy",
                lambda d, t, g, h: ge(t, best_high(g, h)))
            row(lbl, "p50_ms", "ms", "low", w, plain)
            row(lbl, "p99_ms", "ms", "low", w, plain, "≤ nginx and HAProxy",
                lambda d, t, g, h: le(t, best_low(g, h)))
            row(lbl, "cpu_us", "µs", "low", w, plain, "< nginx and HAProxy",
                lambda d, t, g, h: lt(t, best_low(g, h)), note_direct="Dovecot")
        for c in self.tls_setup_conc:
            w = "W4 c=%d" % c
            lbl = "4. session setup, POP3S upstream, %d conn" % c
            row(lbl, "sess_s", "sessions/s", "high", w, tls)
            row(lbl, "p99_ms", "ms", "low", w, tls)
            row(lbl, "cpu_us", "µs", "low", w, tls, "≤ 600 µs per login",
                lambda d, t, g, h: le(t, 600), note_direct="Dovecot")
        lbl = "5. %d idle sessions, plain" % self.idle_n
        row(lbl, "pss_kib", "KiB", "low", "W5", (None, "tpmail", "nginx", "haproxy"),
            "< HAProxy", lambda d, t, g, h: lt(t, h))
        row(lbl, "priv_kib", "KiB", "low", "W5", (None, "tpmail", "nginx", "haproxy"),
            "< HAProxy", lambda d, t, g, h: lt(t, h))
        lbl = "5. %d idle sessions, POP3S upstream" % self.idle_n
        row(lbl, "pss_kib", "KiB", "low", "W5", (None, "tpmail-tls", None, "haproxy-tls"),
            "≤ 40 KiB", lambda d, t, g, h: le(t, 40))
        row(lbl, "priv_kib", "KiB", "low", "W5", (None, "tpmail-tls", None, "haproxy-tls"))
        lbl = "6. slow reader of RETR %d MiB" % (SLOW_MSG_SIZE // MIB)
        row(lbl, "rss_kib", "KiB", "low", "W6", (None, "tpmail", "nginx", "haproxy"),
            "≤ 256 KiB", lambda d, t, g, h: le(t, 256))
        row(lbl + ", POP3S upstream", "rss_kib", "KiB", "low", "W6",
            (None, "tpmail-tls", None, "haproxy-tls"), "≤ 256 KiB",
            lambda d, t, g, h: le(t, 256))

        # tenant rows: tpmail only
        t = "7. %d idle tenants" % self.tenants
        sp = "7. spawn-to-ready, %d restarts" % self.restarts
        trow_v = [
            (t, "PSS per tenant, plain upstream (KiB)", "pss_plain_kib", "≤ 1024 KiB",
             lambda v: v <= 1024),
            (t, "PSS per tenant, POP3S upstream + system CA store (KiB)", "pss_sysca_kib",
             "≤ 1024 KiB", lambda v: v <= 1024),
            (t, "private per tenant, plain upstream (KiB)", "priv_plain_kib", "", None),
            (t, "private per tenant, POP3S + system CA (KiB)", "priv_sysca_kib", "", None),
            (t, "tpmaild PSS (KiB)", "supervisor_pss_kib", "", None),
            (t, "all %d running after start (s)" % self.tenants, "start_all_s", "", None),
            (t, "CPU to start a tenant proxy, plain upstream (ms)", "start_cpu_plain_ms",
             "", None),
            (t, "CPU to start a tenant proxy, POP3S + system CA (ms)", "start_cpu_sysca_ms",
             "", None),
            (sp, "p50, plain upstream (ms)", "spawn_plain_p50_ms", "≤ 20 ms",
             lambda v: v <= 20),
            (sp, "p99, plain upstream (ms)", "spawn_plain_p99_ms", "≤ 100 ms",
             lambda v: v <= 100),
            (sp, "p50, POP3S + system CA (ms)", "spawn_sysca_p50_ms", "≤ 20 ms",
             lambda v: v <= 20),
            (sp, "p99, POP3S + system CA (ms)", "spawn_sysca_p99_ms", "≤ 100 ms",
             lambda v: v <= 100),
            ("7. restart command to running, %d restarts" % self.restarts,
             "p50, as tpmailctl sees it (ms)", "restart_client_p50_ms", "", None),
            ("7. restart command to running, %d restarts" % self.restarts,
             "p99, as tpmailctl sees it (ms)", "restart_client_p99_ms", "", None),
            ("7. %d CRs written" % self.scale_crs, "time until all serving (s)", "scale_s",
             "< 30 s", lambda v: v < 30),
            ("7. %d CRs written" % self.scale_crs, "PSS per tenant (KiB)", "scale_pss_kib",
             "", None),
            ("7. %d CRs written" % self.scale_crs,
             "slowest `tpmailctl status` during the ramp (s)", "scale_status_max_s", "", None),
        ]
        for label, mlabel, metric, goal, met in trow_v:
            v = G("W7", "tpmail", metric)
            verdict = ""
            if met is not None:
                verdict = "–" if v is None else ("yes" if met(v) else "**no**")
            unit = re.search(r"\((\w+)\)$", mlabel).group(1)
            rows.append("| %s | %s | – | %s | – | – | – | – | %s | %s |" % (
                label, mlabel, fmt(v, unit), goal, verdict))

        head = [
            "| workload | metric (unit) | Dovecot direct | tpmail | nginx | HAProxy "
            "| tpmail ÷ direct | tpmail ÷ best peer | goal | met |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        envline = ("Machine: %d × %s, %s GiB RAM; kernel %s; %s; libevent %s; Dovecot %s; "
                   "nginx %s; HAProxy %s; tpmail %s (sandbox %s). Medians of %d runs%s; the run took "
                   "%s s. Load average at start: %s. CPU used by other processes during "
                   "the run: %s of the machine; steal: %s." % (
                       env["nproc"], env["cpu"], env["mem_gib"], env["kernel"],
                       env["openssl"], env["libevent"], env["dovecot"], env["nginx"],
                       env["haproxy"], env["tpmail"], env.get("sandbox", "?"), self.reps,
                       " (--quick: reduced sizes)" if self.quick else "",
                       env.get("duration_s", "?"), " ".join(env["loadavg"]),
                       env.get("other_cpu", "?"), env.get("steal", "?")))
        legend = ("↑ higher is better, ↓ lower is better. For TLS rows the direct column is "
                  "Dovecot's POP3S port (the client does TLS) and the HAProxy column is "
                  "HAProxy with `ssl` to Dovecot's POP3S port; nginx cannot do TLS upstream "
                  "for mail. Values in parentheses in the direct column are Dovecot's own "
                  "CPU (the server, not a proxy), for scale. \"best peer\" is the better of "
                  "nginx and HAProxy for that metric.")
        out = [envline, "", legend, ""] + head + rows
        if self.notes:
            out += [""] + ["Note: " + n for n in self.notes]
        return "\n".join(out) + "\n"


def _iso_ms(ts):
    """'2026-01-01T00:00:00.123Z' -> milliseconds (of the day is enough)."""
    m = re.match(r".*T(\d+):(\d+):(\d+)\.(\d+)Z$", ts)
    h, mi, s, ms = (int(x) for x in m.groups())
    return ((h * 60 + mi) * 60 + s) * 1000 + ms


WORKLOADS = [
    ("W1", "w1_retr"), ("W2", "w2_retr_tls"), ("W3", "w3_setup"), ("W4", "w4_setup_tls"),
    ("W5", "w5_idle"), ("W6", "w6_slow"), ("W7", "w7_tenants"), ("W7s", "w7_scale"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--build-dir", required=True)
    ap.add_argument("--popbench", required=True)
    ap.add_argument("--quick", action="store_true", help="reduced sizes: a smoke test")
    ap.add_argument("--reps", type=int, help="runs per measurement (default 3; 1 with --quick)")
    ap.add_argument("--only", help="comma-separated workloads: W1,W2,W3,W4,W5,W6,W7,W7s")
    ap.add_argument("--json", help="write the raw results here")
    ap.add_argument("--markdown", help="write the table here too")
    ap.add_argument("--wait-quiet", type=int, default=0, metavar="SEC",
                    help="first wait up to SEC seconds for other processes to use less "
                         "than 15%% of the machine's CPU")
    ap.add_argument("--time-limit", type=int,
                    help="hard bound in seconds (default 840; 110 with --quick)")
    args = ap.parse_args()
    args.build_dir = os.path.abspath(args.build_dir)
    args.popbench = os.path.abspath(args.popbench)
    if os.geteuid() != 0:
        sys.exit("bench: run as root (tpmaild's sandbox and Dovecot need it)")
    limit = args.time_limit or (110 if args.quick else 840)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < 8192:
        sys.exit("bench: the descriptor limit (%d) is too low for the idle workload" % hard)

    def on_alarm(signum, frame):
        raise Deadline()

    def on_term(signum, frame):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGALRM, on_alarm)
    signal.signal(signal.SIGTERM, on_term)
    if args.wait_quiet > 0:
        until = time.monotonic() + args.wait_quiet
        while True:
            share = other_cpu_share()
            if share < 0.15 or time.monotonic() >= until:
                log("other processes use %.0f%% of the CPU%s" % (
                    100 * share, "" if share < 0.15 else "; starting anyway"))
                break
            log("other processes use %.0f%% of the CPU: waiting" % (100 * share))
            time.sleep(3)
    signal.alarm(limit)
    only = set(args.only.split(",")) if args.only else None
    b = Bench(args)
    env = b.environment()
    if float(env["loadavg"][0]) > 0.5:
        log("WARNING: load average %s before the run: other work on this machine "
            "skews the numbers" % env["loadavg"][0])
    t0 = time.monotonic()
    m0, own0 = machine_cpu(), own_cpu()
    status = 0
    try:
        b.start()
        for key, meth in WORKLOADS:
            if only and key not in only:
                continue
            log("== %s (%.0f s so far)" % (key, time.monotonic() - t0))
            try:
                getattr(b, meth)()
            except (Deadline, KeyboardInterrupt):
                raise
            except Exception as e:  # noqa: BLE001 - the other workloads still run
                status = 1
                if not isinstance(e, (BenchError, TimeoutError, subprocess.TimeoutExpired)):
                    traceback.print_exc()
                log("ERROR in %s: %s" % (key, e))
                b.notes.append("%s did not complete: %s" % (key, (str(e) or repr(e)).splitlines()[0]))
    except Deadline:
        status = 1
        log("ERROR: time limit of %d s reached; the table is partial" % limit)
        b.notes.append("the run hit its %d s time limit; later workloads are missing" % limit)
    except KeyboardInterrupt:
        status = 130
        log("interrupted")
    except Exception:  # noqa: BLE001
        status = 1
        traceback.print_exc()
    finally:
        signal.alarm(0)
        # the cleanup itself must not be cut short by another alarm
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        b.stop_all()
        if getattr(b, "work", None) and not os.environ.get("TPMAIL_BENCH_KEEP"):
            shutil.rmtree(b.work, ignore_errors=True)
    env["duration_s"] = round(time.monotonic() - t0)
    env["sandbox"] = getattr(b, "sandbox", "?")
    m1, own1 = machine_cpu(), own_cpu()
    total = m1[2] - m0[2]
    if total > 0:
        other = max(0.0, (m1[0] - m0[0]) - (own1 - own0))
        env["other_cpu"] = "%.0f%%" % (100 * other / total)
        env["steal"] = "%.0f%%" % (100 * (m1[1] - m0[1]) / total)
    table = b.table(env)
    print(table)
    log("done in %d s" % env["duration_s"])
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "quick": b.quick, "reps": b.reps,
                       "results": [{"workload": w, "target": t, "metrics": m}
                                   for (w, t), m in sorted(b.results.items())],
                       "notes": b.notes}, f, indent=1)
    return status


if __name__ == "__main__":
    sys.exit(main())
