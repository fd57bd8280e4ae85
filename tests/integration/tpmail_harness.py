"""Helpers for the tpmail integration tests: running tpmaild, writing CRs
and destinations, a raw POP3 client.  No pytest imports here."""

import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
LIB = os.path.join(REPO, "tests", "lib")
if LIB not in sys.path:
    sys.path.insert(0, LIB)

from dovecot import (wait_for, small_message, dotted_message,  # noqa: E402
                     big_message)

HOST = "127.0.0.1"

# Timeouts are generous because the suite also runs against ASan builds.
START_TIMEOUT = float(os.environ.get("TPMAIL_TEST_START_TIMEOUT", "15"))
IO_TIMEOUT = float(os.environ.get("TPMAIL_TEST_IO_TIMEOUT", "15"))
RELOAD_TIMEOUT = float(os.environ.get("TPMAIL_TEST_RELOAD_TIMEOUT", "10"))
DRAIN_GRACE = 3


# --------------------------------------------------------------------------
# build artefacts

def build_dir():
    return os.path.abspath(os.environ.get("TPMAIL_BUILD_DIR") or os.path.join(REPO, "build"))


def find_binary(name):
    """Locate a built program: BUILD/{supervisor,proxy}/NAME or BUILD/NAME."""
    b = build_dir()
    for sub in ("supervisor", "proxy", ""):
        p = os.path.join(b, sub, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def binaries():
    """{name: path}; raises FileNotFoundError naming what is missing."""
    out = {}
    missing = []
    for n in ("tpmaild", "tpmail-pop3", "tpmailctl"):
        p = find_binary(n)
        if p is None:
            missing.append(n)
        out[n] = p
    if missing:
        raise FileNotFoundError(
            "tpmail binaries not found in %s (set TPMAIL_BUILD_DIR): %s"
            % (build_dir(), ", ".join(missing)))
    return out


# --------------------------------------------------------------------------
# YAML (tiny emitter: block style, JSON-quoted scalars; no PyYAML needed)

def _yaml_scalar(v):
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    return json.dumps(str(v))


def to_yaml(obj, indent=0):
    pad = "  " * indent
    lines = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and v:
                lines.append("%s%s:" % (pad, k))
                lines.append(to_yaml(v, indent + 1))
            elif isinstance(v, dict):
                lines.append("%s%s: {}" % (pad, k))
            elif isinstance(v, list):
                lines.append("%s%s: []" % (pad, k))
            else:
                lines.append("%s%s: %s" % (pad, k, _yaml_scalar(v)))
    elif isinstance(obj, list):
        for v in obj:
            if isinstance(v, (dict, list)) and v:
                sub = to_yaml(v, indent + 1).split("\n")
                first = sub[0].lstrip()
                lines.append("%s- %s" % (pad, first))
                lines.extend(sub[1:])
            else:
                lines.append("%s- %s" % (pad, _yaml_scalar(v)))
    else:
        lines.append(pad + _yaml_scalar(obj))
    return "\n".join(lines)


def yaml_docs(docs):
    """Several documents in one YAML stream."""
    return "".join("---\n" + to_yaml(d) + "\n" for d in docs)


# --------------------------------------------------------------------------
# CRs and destinations

TENANT_ANNOTATION = "transparent-proxy.connectivity.api.sap/tenant-subdomains"


def cr(name, dest, tenants=None, namespace=None, port=None):
    """A Destination CR as a dict (dedicated, or shared when tenants given)."""
    md = {"name": name}
    if namespace is not None:
        md["namespace"] = namespace
    if tenants is not None:
        md["annotations"] = {TENANT_ANNOTATION: json.dumps(list(tenants))}
    spec = {"destinationRef": {"name": dest}}
    if port is not None:
        spec["service"] = {"port": port}
    return {"apiVersion": "destination.connectivity.api.sap/v1", "kind": "Destination",
            "metadata": md, "spec": spec}


def pop3_dest(name, user, password, port, host=HOST, protocol="pop3", **props):
    """A MAIL destination.  props: extra "mail.<p>.*" keys given as
    keyword args with '_' for '.', or a dict via extra=... ."""
    p = protocol
    d = {"Name": name, "Type": "MAIL", "ProxyType": "Internet",
         "Authentication": "BasicAuthentication",
         "mail.user": user, "mail.password": password,
         "mail.transport.protocol": p,
         "mail.%s.host" % p: host, "mail.%s.port" % p: str(port),
         "mail.%s.auth" % p: "true"}
    extra = props.pop("extra", None) or {}
    for k, v in props.items():
        d["mail.%s.%s" % (p, k.replace("_", "."))] = v
    d.update(extra)
    return d


# --------------------------------------------------------------------------
# process helpers

def _proc_stat(pid):
    """(state, ppid, starttime) of a process or None."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            st = f.read()
    except OSError:
        return None
    rest = st[st.rindex(b")") + 2:].split()
    return rest[0].decode(), int(rest[1]), int(rest[19])


def proc_alive(pid, starttime=None):
    s = _proc_stat(pid)
    if s is None or s[0] == "Z":
        return False
    return starttime is None or s[2] == starttime


def proc_exe_name(pid):
    try:
        return os.path.basename(os.readlink("/proc/%d/exe" % pid))
    except OSError:
        try:
            with open("/proc/%d/cmdline" % pid, "rb") as f:
                return os.path.basename(f.read().split(b"\0")[0].decode(errors="replace"))
        except OSError:
            return None


def proc_is_proxy(pid):
    """True if pid runs tpmail-pop3 (as its executable, or as the script
    an interpreter runs)."""
    if proc_exe_name(pid) == "tpmail-pop3":
        return True
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().split(b"\0")[:2]
    except OSError:
        return False
    return any(os.path.basename(a) == b"tpmail-pop3" for a in argv)


def descendants(pid):
    """{pid: starttime} of all live descendants of pid."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        s = _proc_stat(int(d))
        if s and s[0] != "Z":
            children.setdefault(s[1], []).append((int(d), s[2]))
    out = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        for c, st in children.get(p, []):
            if c not in out:
                out[c] = st
                todo.append(c)
    return out


def port_open(port, host=HOST):
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _ephemeral_low():
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def pick_port_range(width=64, lo=20000, hi=None, tries=200):
    """A random range of ``width`` ports on 127.0.0.1 that are all free,
    below the kernel's ephemeral range (so that no outgoing connection
    takes one of them before tpmaild binds it)."""
    if hi is None:
        hi = _ephemeral_low()
        if hi - lo < 4 * width:
            hi = 60000
    rnd = random.Random(os.getpid() ^ int(time.time() * 1000))
    for _ in range(tries):
        start = rnd.randrange(lo, hi - width)
        ok = True
        for p in range(start, start + width):
            try:
                with socket.socket() as s:
                    s.bind((HOST, p))
            except OSError:
                ok = False
                break
        if ok:
            return start, start + width - 1
    raise RuntimeError("no free port range found")


# --------------------------------------------------------------------------
# tpmaild

class TpmaildDied(RuntimeError):
    pass


class Tpmaild:
    """One tpmaild process with its own CR dir, destinations file and state
    dir under ``workdir``."""

    def __init__(self, workdir, crs=None, destinations=None, args=(), port_range=None,
                 log_level="debug", bins=None):
        self.bins = bins or binaries()
        self.workdir = str(workdir)
        self.cr_dir = os.path.join(self.workdir, "crs")
        self.dest_dir = os.path.join(self.workdir, "dest")
        self.dest_file = os.path.join(self.dest_dir, "destinations.json")
        self.state_dir = os.path.join(self.workdir, "state")
        self.scratch = os.path.join(self.workdir, "scratch")
        for d in (self.cr_dir, self.dest_dir, self.state_dir, self.scratch):
            os.makedirs(d, exist_ok=True)
        self.control = os.path.join(self.state_dir, "control.sock")
        self.log_path = os.path.join(self.workdir, "tpmaild.stderr")
        self.port_range = port_range or pick_port_range()
        self.args = list(args)
        self.log_level = log_level
        self.proc = None
        self.stopped = False
        self.seen_pids = {}     # pid -> starttime of every proxy pid seen
        self.last_status = None
        self.returncode = None
        self.destinations = destinations if destinations is not None else {}
        self.write_destinations(self.destinations)
        for fname, docs in (crs or {}).items():
            self.write_cr(fname, docs)

    # -- files -------------------------------------------------------------

    def _atomic_write(self, path, data):
        tmp = os.path.join(self.scratch, os.path.basename(path) + ".tmp%d" % time.monotonic_ns())
        with open(tmp, "w") as f:
            f.write(data)
        os.rename(tmp, path)

    def write_cr(self, fname, docs, in_place=False):
        """Write a CR file.  docs: dict, list of dicts (multi-doc YAML, or a
        JSON array when fname ends with .json) or raw text."""
        if isinstance(docs, str):
            text = docs
        elif fname.endswith(".json"):
            text = json.dumps(docs, indent=2) + "\n"
        else:
            text = yaml_docs(docs if isinstance(docs, list) else [docs])
        path = os.path.join(self.cr_dir, fname)
        if in_place:
            with open(path, "w") as f:
                f.write(text)
        else:
            self._atomic_write(path, text)
        return path

    def remove_cr(self, fname):
        os.unlink(os.path.join(self.cr_dir, fname))

    def write_destinations(self, dests):
        self.destinations = dests
        self._atomic_write(self.dest_file, json.dumps(dests, indent=2) + "\n")

    # -- process -----------------------------------------------------------

    def argv(self):
        a = [self.bins["tpmaild"], "--crs", self.cr_dir, "--destinations", self.dest_file,
             "--state-dir", self.state_dir, "--control", self.control,
             "--listen-address", HOST, "--port-range", "%d-%d" % self.port_range,
             "--proxy-path", self.bins["tpmail-pop3"], "--log-level", self.log_level]
        if "--drain-grace" not in self.args:
            # open sessions get this long when a service stops (default 30 s)
            a += ["--drain-grace", str(DRAIN_GRACE)]
        return a + self.args

    def start(self):
        self._logf = open(self.log_path, "ab")
        env = dict(os.environ)
        # ASan: a leak report at exit must not turn exit code 0 into 1 for
        # reasons the test can't see; keep whatever the caller configured.
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=self._logf,
                                     stderr=subprocess.STDOUT, start_new_session=True, env=env)
        return self

    @property
    def pid(self):
        return self.proc.pid

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def ctl(self, *args, timeout=10):
        return subprocess.run([self.bins["tpmailctl"], "--control", self.control] + list(args),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)

    def status(self):
        """Parsed ``tpmailctl status --json``; raises on failure."""
        if not self.alive():
            raise TpmaildDied("tpmaild is not running (exit code %s)" % self.proc.poll())
        r = self.ctl("status", "--json")
        if r.returncode != 0:
            raise RuntimeError("tpmailctl status exit %d: %s" % (r.returncode, r.stderr.decode(errors="replace")))
        st = json.loads(r.stdout.decode())
        self.last_status = st
        for s in st.get("services", []):
            pid = s.get("pid")
            if isinstance(pid, int) and pid > 0 and pid not in self.seen_pids:
                ps = _proc_stat(pid)
                if ps:
                    self.seen_pids[pid] = ps[2]
        return st

    def services(self):
        return {s["name"]: s for s in self.status().get("services", [])}

    def rejected(self):
        return self.status().get("rejected", [])

    def rejected_for(self, cr_name):
        return [r for r in self.rejected() if r.get("cr") == cr_name]

    def wait_services(self, names, state="running", timeout=START_TIMEOUT, absent=()):
        """Wait until each service in ``names`` has ``state`` and none of
        ``absent`` is listed; returns {name: service}."""
        names = list(names)

        def ok():
            svcs = self.services()
            for n in names:
                if n not in svcs or svcs[n].get("state") != state:
                    return None
            for n in absent:
                if n in svcs:
                    return None
            return {"services": svcs}
        try:
            return wait_for(ok, timeout, interval=0.1,
                            what="services %s to be %s (absent: %s)"
                            % (names, state, list(absent)), fatal=(TpmaildDied,))["services"]
        except TimeoutError as e:
            raise TimeoutError("%s; last status: %s" % (e, self._last_status_str()))

    def _last_status_str(self):
        return json.dumps(self.last_status)[:2000] if self.last_status else "none"

    def wait_rejected(self, cr_name, timeout=RELOAD_TIMEOUT, pred=None):
        def ok():
            rs = self.rejected_for(cr_name)
            if rs and (pred is None or any(pred(r) for r in rs)):
                return rs
            return None
        try:
            return wait_for(ok, timeout, interval=0.1, what="CR %s to be rejected" % cr_name,
                            fatal=(TpmaildDied,))
        except TimeoutError as e:
            raise TimeoutError("%s; last status: %s" % (e, self._last_status_str()))

    def port(self, name):
        listen = self.services()[name]["listen"]
        return int(listen.rsplit(":", 1)[1])

    def stop(self, sig=signal.SIGTERM, timeout=20):
        """Signal tpmaild and wait; returns the exit code (None if it had to
        be SIGKILLed).  Records the proxies that were running."""
        if self.proc is None:
            return self.returncode
        self.stopped = True
        if self.proc.poll() is None:
            for pid, st in descendants(self.proc.pid).items():
                self.seen_pids.setdefault(pid, st)
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                self.returncode = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_everything()
                self.returncode = None
        else:
            self.returncode = self.proc.returncode
        if self._logf:
            self._logf.close()
            self._logf = None
        return self.returncode

    def leftover_proxies(self, timeout=5):
        """Proxies (any pid ever seen as ours) still alive after ``timeout``."""
        def left():
            return [p for p, st in self.seen_pids.items() if proc_alive(p, st)]
        try:
            wait_for(lambda: not left(), timeout, interval=0.05, what="proxies to exit")
        except TimeoutError:
            pass
        return [(p, proc_exe_name(p)) for p in left()]

    def kill_everything(self):
        """Last-resort cleanup of only what this object started."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for p, st in list(self.seen_pids.items()):
            if proc_alive(p, st):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# --------------------------------------------------------------------------
# a raw POP3 client

class Pop3Closed(Exception):
    pass


class Pop3:
    """A byte-exact POP3 client over a socket."""

    def __init__(self, port, host=HOST, timeout=IO_TIMEOUT, greeting=True):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.buf = b""
        self.greeting = self.readline() if greeting else None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def abort(self):
        """Close with RST (SO_LINGER 0)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def send(self, data):
        self.sock.sendall(data)

    def _fill(self):
        d = self.sock.recv(262144)
        if not d:
            raise Pop3Closed("connection closed by peer (buffered: %r)" % self.buf[:200])
        self.buf += d

    def readline(self, limit=1 << 20):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line, self.buf = self.buf[:i + 2], self.buf[i + 2:]
                return line
            if len(self.buf) > limit:
                raise AssertionError("line longer than %d bytes: %r..." % (limit, self.buf[:200]))
            self._fill()

    def read_multiline(self):
        """Raw data lines after a +OK line, including the final '.\\r\\n'
        (dot-stuffing untouched)."""
        scanned = 0
        while True:
            if self.buf.startswith(b".\r\n"):
                self.buf = self.buf[3:]
                return b".\r\n"
            j = self.buf.find(b"\r\n.\r\n", max(0, scanned - 4))
            if j >= 0:
                raw, self.buf = self.buf[:j + 5], self.buf[j + 5:]
                return raw
            scanned = len(self.buf)
            self._fill()

    def cmd(self, line):
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.readline()

    def cmd_multi(self, line):
        st = self.cmd(line)
        if not st.startswith(b"+OK"):
            return st, None
        return st, self.read_multiline()

    def wait_closed(self, timeout):
        """Read (and return) whatever arrives until the peer closes the
        connection; raises socket.timeout if it stays open."""
        self.sock.settimeout(timeout)
        data = self.buf
        self.buf = b""
        deadline = time.monotonic() + timeout
        while True:
            try:
                d = self.sock.recv(65536)
            except ConnectionResetError:
                return data
            if not d:
                return data
            data += d
            if time.monotonic() > deadline:
                raise socket.timeout("still open after %.1fs" % timeout)


def multiline_body(raw):
    """Strip the terminator and undo dot-stuffing: the original bytes."""
    assert raw.endswith(b".\r\n"), raw[-20:]
    body = raw[:-3]
    lines = body.split(b"\r\n")
    if lines and lines[-1] == b"":
        lines = lines[:-1]
    out = [l[1:] if l.startswith(b".") else l for l in lines]
    return b"".join(l + b"\r\n" for l in out)


def list_lines(msgs):
    """The raw LIST body Dovecot sends for these messages."""
    return b"".join(b"%d %d\r\n" % (i, len(m)) for i, m in enumerate(msgs, 1)) + b".\r\n"


def curl(args, timeout=60):
    return subprocess.run(["curl", "-sS", "--max-time", str(int(timeout))] + list(args),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout + 10)


STAT_RE = re.compile(rb"^\+OK (\d+) (\d+)")


# --------------------------------------------------------------------------
# the standard test world

USERS = {
    "alice": "alice-secret",
    "bob": "bob-secret",
    "tenant-a-user": "tenant-a-secret",
    "tenant-b-user": "tenant-b-secret",
}


def standard_mailboxes():
    return {
        "alice": [small_message(1, "alice"), dotted_message("alice"), big_message(tag="alice")],
        "bob": [small_message(1, "bob"), small_message(2, "bob")],
        "tenant-a-user": [small_message(1, "tenant-a"), dotted_message("tenant-a")],
        "tenant-b-user": [small_message(1, "tenant-b"), small_message(2, "tenant-b"),
                          small_message(3, "tenant-b")],
    }


def provider_dest(dc, name="dest-a", user="alice", **props):
    return pop3_dest(name, user, dc.users[user], dc.pop3_port, **props)


def standard_destinations(dc):
    """provider: dest-a (alice), dest-bob (bob); tenants: dest-t per tenant."""
    return {
        "provider": [provider_dest(dc, "dest-a", "alice"), provider_dest(dc, "dest-bob", "bob")],
        "tenant-a": [pop3_dest("dest-t", "tenant-a-user", dc.users["tenant-a-user"], dc.pop3_port)],
        "tenant-b": [pop3_dest("dest-t", "tenant-b-user", dc.users["tenant-b-user"], dc.pop3_port)],
    }


def standard_crs():
    """Dedicated CR "mail" -> dest-a; shared CR "shared" for tenant-a/-b."""
    return {
        "mail.yaml": cr("mail", "dest-a"),
        "shared.yaml": cr("shared", "dest-t", tenants=["tenant-a", "tenant-b"]),
    }


STANDARD_SERVICES = ["mail", "shared-tenant-a", "shared-tenant-b"]

SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "WARNING: AddressSanitizer", "ERROR: ThreadSanitizer")


def sanitizer_reports(log):
    """The sanitizer reports (ASan/LSan/UBSan) found in a log, or ""."""
    lines = log.splitlines()
    out = []
    for i, l in enumerate(lines):
        if any(m in l for m in SANITIZER_MARKERS):
            out.append("\n".join(lines[max(0, i - 2):i + 30]))
    return "\n...\n".join(out)[:12000]


# every Tpmaild in use; conftest attaches their logs to failing tests
ACTIVE = []


def start_tpmaild(bins, workdir, crs, destinations, args, expect):
    t = Tpmaild(workdir, crs=crs, destinations=destinations, args=args, bins=bins)
    ACTIVE.append(t)
    t.start()
    try:
        t.wait_services(expect)
    except Exception as e:
        t.kill_everything()
        ACTIVE.remove(t)
        raise RuntimeError("tpmaild did not start as expected: %s\n--- tpmaild log tail ---\n%s"
                           % (e, t.log_text()[-8000:])) from e
    return t


def teardown_all(started, tail=6000):
    """Tear down every tpmaild a fixture started; returns a message (with
    its log tail) for each that did not stop cleanly."""
    errors = []
    for t in started:
        try:
            teardown_tpmaild(t)
        except AssertionError as e:
            errors.append("%s\n--- tpmaild log tail ---\n%s" % (e, t.log_text()[-tail:]))
    return errors


def teardown_tpmaild(t, check=True):
    """SIGTERM; exit code 0; no proxy left.  Always leaves nothing running."""
    try:
        if t.proc is None:
            return
        was_alive = t.alive()
        stopped_by_test = t.stopped
        rc = t.stop(signal.SIGTERM)
        left = t.leftover_proxies()
        if left:
            t.kill_everything()
        if check:
            assert was_alive or stopped_by_test, \
                "tpmaild died during the test (exit %s)" % t.proc.returncode
            if was_alive:
                assert rc == 0, "tpmaild exit code after SIGTERM: %r" % (rc,)
            assert not left, "tpmail-pop3 processes left after tpmaild exited: %r" % (left,)
            san = sanitizer_reports(t.log_text())
            assert not san, "sanitizer reports in the tpmaild log:\n" + san
    finally:
        t.kill_everything()
        if t in ACTIVE:
            ACTIVE.remove(t)




# --------------------------------------------------------------------------
# a scripted fake upstream, for failures Dovecot can't be made to produce

class ScriptedUpstream:
    """Listens on 127.0.0.1:<free port>; each connection runs
    ``script(conn)`` in a thread.  ``script=None``: never accept (a
    black hole: the TCP handshake completes, nothing is ever sent)."""

    def __init__(self, script=None):
        import threading
        self.script = script
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((HOST, 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.received = []          # bytes each connection sent us
        self._stop = False
        self._conns = []
        self._thread = None
        if script is not None:
            self._thread = threading.Thread(target=self._serve, daemon=True)
            self._thread.start()

    def _serve(self):
        import threading
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self._conns.append(c)
            threading.Thread(target=self._run, args=(c,), daemon=True).start()

    def _run(self, c):
        rec = bytearray()
        self.received.append(rec)
        c.settimeout(30)
        f = c.makefile("rb")

        def readline():
            line = f.readline()
            rec.extend(line)
            return line
        try:
            self.script(c, readline)
        except OSError:
            pass
        finally:
            try:
                c.close()
            except OSError:
                pass

    def close(self):
        self._stop = True
        try:
            self.sock.close()
        except OSError:
            pass
        for c in self._conns:
            try:
                c.close()
            except OSError:
                pass
        if self._thread:
            self._thread.join(2)
