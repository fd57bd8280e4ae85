"""Operations: graceful and hard restarts under load, crash backoff,
/metrics (checked with promtool and against what the test did), /readyz
and /healthz, SIGTERM with open sessions, SIGHUP re-reading the config
file, JSON logs without secrets, and tpmailctl (exit codes, status detail,
drain, restart --cr, log-level).

Every load loop is bounded in sessions and in time; every wait polls
tpmaild (status, log, HTTP) with a deadline instead of sleeping.
"""

import base64
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

import tpmail_harness as th
from tpmail_harness import (Pop3, Pop3Closed, multiline_body, wait_for, START_TIMEOUT,
                            DRAIN_GRACE, IO_TIMEOUT)
from dovecot import big_message, small_message, dot_stuff

NS = "default"
SHARED_A, SHARED_B, DEDICATED = "shared-tenant-a", "shared-tenant-b", "mail"


def key(name):
    return "%s/%s" % (NS, name)


# --------------------------------------------------------------------------
# helpers: HTTP, metrics, logs

def free_http_port():
    """A free port below the ephemeral range (nothing else grabs it first)."""
    return th.pick_port_range(width=1)[0]


def http_get(port, path, timeout=10):
    conn = http.client.HTTPConnection(th.HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Metrics:
    """One /metrics scrape: samples by (name, sorted labels), TYPE lines."""

    def __init__(self, text):
        self.text = text
        self.samples = {}
        self.types = {}
        for line in text.splitlines():
            if line.startswith("# TYPE "):
                _, _, name, typ = line.split(None, 3)
                self.types[name] = typ
                continue
            if not line or line.startswith("#"):
                continue
            m = _SAMPLE.match(line)
            assert m, "unparsable metrics line: %r" % line
            labels = tuple(sorted(_LABEL.findall(m.group(2) or "")))
            self.samples[(m.group(1), labels)] = float(m.group(3))

    def get(self, name, labels=None, **extra):
        lab = dict(labels or {})
        lab.update(extra)
        k = (name, tuple(sorted(lab.items())))
        if k not in self.samples:
            raise KeyError("no sample %s%r in /metrics" % (name, lab))
        return self.samples[k]


def scrape(port):
    st, body = http_get(port, "/metrics")
    assert st == 200, (st, body[:500])
    return Metrics(body)


def wait_metrics(port, pred, what, timeout=10, show=None):
    """Scrape until pred(metrics) holds; on timeout show the last scrape
    (its samples mentioning ``show``, buckets left out)."""
    last = []

    def ok():
        m = scrape(port)
        last[:] = [m]
        return m if pred(m) else None
    try:
        return wait_for(ok, timeout, interval=0.1, what=what)
    except TimeoutError as e:
        text = last[0].text if last else ""
        lines = [l for l in text.splitlines() if not l.startswith("#") and "_bucket" not in l
                 and (show is None or show in l)]
        raise AssertionError("%s; last /metrics:\n%s" % (e, "\n".join(lines)))


def svc_labels(svc):
    """The label set tpmaild gives a service (from its status entry)."""
    return {"namespace": svc["namespace"], "service": svc["name"], "cr": svc["cr"],
            "tenant": svc.get("tenant") or ""}


def log_records(text):
    """Every line of a log: (parsed dict or None, raw line)."""
    out = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        out.append((rec if isinstance(rec, dict) else None, line))
    return out


def records(t, since=0):
    return [r for r, _ in log_records(t.log_text()[since:]) if r is not None]


def wait_log(t, pred, timeout=th.RELOAD_TIMEOUT, since=0, what="log line"):
    """The first JSON log record after ``since`` for which pred(rec) holds."""
    def find():
        for r in records(t, since):
            if pred(r):
                return r
        return None
    return wait_for(find, timeout, interval=0.1, what=what)


def log_mark(t):
    return len(t.log_text())


def ctl_text(r):
    return "exit %d, stdout %r, stderr %r" % (r.returncode, r.stdout.decode(errors="replace"),
                                              r.stderr.decode(errors="replace"))


def sanitizer_file_report(pid):
    """A sanitizer report that process ``pid`` wrote to ASAN_OPTIONS /
    UBSAN_OPTIONS log_path (as scripts/test sets it), or ""."""
    out = []
    for var in ("ASAN_OPTIONS", "UBSAN_OPTIONS"):
        m = re.search(r"(?:^|:)log_path=([^:]+)", os.environ.get(var, ""))
        if m:
            try:
                with open("%s.%d" % (m.group(1), pid), errors="replace") as f:
                    out.append(f.read()[:6000])
            except OSError:
                pass
    return "\n".join(out)


def stop_clean(t, timeout=20):
    """SIGTERM tpmaild; it must exit 0 (a sanitizer build exits 1 on a leak)."""
    rc = t.stop(signal.SIGTERM, timeout=timeout)
    assert rc == 0, "tpmaild exit code after SIGTERM: %r\n%s" % (rc, sanitizer_file_report(t.pid))
    return rc


def tpmaild_with_http(tpmaild_factory, args=(), **kw):
    hp = free_http_port()
    t = tpmaild_factory(args=["--http", "%s:%d" % (th.HOST, hp)] + list(args), **kw)
    return t, hp


def wait_running(t, name, old_pid=None, timeout=START_TIMEOUT):
    """Wait until ``name`` is running with a live pid other than old_pid."""
    def ok():
        s = t.services().get(name)
        if s and s["state"] == "running" and s["pid"] and s["pid"] != old_pid \
                and th.proc_alive(s["pid"]):
            return s
        return None
    return wait_for(ok, timeout, interval=0.05, what="%s running (pid != %s)" % (name, old_pid),
                    fatal=(th.TpmaildDied,))


def wait_state(t, name, state, timeout=5):
    return wait_for(lambda: (lambda s: s if s and s["state"] == state else None)(
        t.services().get(name)), timeout, interval=0.02, what="%s in state %s" % (name, state),
        fatal=(th.TpmaildDied,))


def connect_refused(port):
    """True if a TCP connect to the port is refused (nothing listens)."""
    try:
        s = socket.create_connection((th.HOST, port), timeout=2)
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    s.close()
    return False


def stat_line(msgs):
    return b"+OK %d %d\r\n" % (len(msgs), sum(len(m) for m in msgs))


def quick_session(port, msgs):
    """Greeting, STAT, QUIT; asserts each reply."""
    with Pop3(port) as c:
        assert c.greeting.startswith(b"+OK"), c.greeting
        st = c.cmd("STAT")
        assert st == stat_line(msgs), st
        q = c.cmd("QUIT")
        assert q.startswith(b"+OK"), q


# --------------------------------------------------------------------------
# a bounded POP3 load

class Load:
    """``threads`` clients each looping whole sessions against ``port``:
    greeting, STAT, RETR of message ``retr`` (compared byte for byte), QUIT.
    Bounded by ``per_thread`` sessions per client and ``max_seconds``.

    Outcomes: ok; refused (connection refused, or the session cap's
    greeting); broken (the connection closed or reset mid-way, or ended
    with -ERR [SYS/TEMP]); failed (anything else: a wrong reply or wrong
    data, a timeout)."""

    def __init__(self, name, port, msgs, retr, threads=4, per_thread=300, max_seconds=60,
                 every_10=None):
        self.name = name
        self.every_10 = every_10        # called after every 10th session (e.g. a cleanup)
        self.port = port
        self.stat = stat_line(msgs)
        self.retr = retr
        self.expect_raw = dot_stuff(msgs[retr - 1])
        self.nthreads = threads
        self.per_thread = per_thread
        self.max_seconds = max_seconds
        self.counts = {"ok": 0, "refused": 0, "broken": 0, "failed": 0}
        self.problems = []
        self.per_client = [0] * threads
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = []

    def _session(self):
        try:
            c = Pop3(self.port)
        except ConnectionRefusedError as e:
            return "refused", "connect: %r" % e
        except (Pop3Closed, ConnectionResetError) as e:
            return "broken", "before the greeting: %r" % e
        except OSError as e:
            return "failed", "connect/greeting: %r" % e
        try:
            if not c.greeting.startswith(b"+OK"):
                return self._bad_reply("greeting", c.greeting)
            st = c.cmd("STAT")
            if st != self.stat:
                return self._bad_reply("STAT", st)
            st, raw = c.cmd_multi("RETR %d" % self.retr)
            if not st.startswith(b"+OK"):
                return self._bad_reply("RETR", st)
            if raw != self.expect_raw:
                return "failed", "RETR %r: %d bytes, expected %d" % (st, len(raw),
                                                                    len(self.expect_raw))
            q = c.cmd("QUIT")
            if not q.startswith(b"+OK"):
                return self._bad_reply("QUIT", q)
            return "ok", None
        except (Pop3Closed, ConnectionResetError, BrokenPipeError) as e:
            return "broken", repr(e)
        except OSError as e:        # socket.timeout included
            return "failed", repr(e)
        finally:
            c.close()

    @staticmethod
    def _bad_reply(what, line):
        """The session cap's greeting is a refusal; another -ERR [SYS/TEMP]
        (the proxy ending a session it cannot go on with) a break."""
        if what == "greeting" and line.startswith(b"-ERR [SYS/TEMP] Too many sessions"):
            return "refused", "greeting %r" % line
        if line.startswith(b"-ERR [SYS/TEMP]"):
            return "broken", "%s %r" % (what, line)
        return "failed", "%s %r" % (what, line)

    def _run(self, i):
        deadline = time.monotonic() + self.max_seconds
        n = 0
        while not self._stop.is_set() and n < self.per_thread and time.monotonic() < deadline:
            n += 1
            kind, detail = self._session()
            with self._lock:
                self.counts[kind] += 1
                if kind == "ok":
                    self.per_client[i] += 1
                else:
                    self.problems.append((round(time.monotonic(), 3), kind, detail))
                tenth = sum(self.counts.values()) % 10 == 0
            if tenth and self.every_10 is not None:
                self.every_10()

    def start(self):
        for i in range(self.nthreads):
            th_ = threading.Thread(target=self._run, args=(i,), daemon=True,
                                   name="load-%s-%d" % (self.name, i))
            th_.start()
            self._threads.append(th_)
        return self

    def wait_each_ok(self, n=1, timeout=30):
        wait_for(lambda: min(self.per_client) >= n, timeout, interval=0.05,
                 what="each %s client to finish %d sessions (%r)" % (self.name, n, self.counts))

    def alive(self):
        return any(x.is_alive() for x in self._threads)

    def stop(self, timeout=None):
        self._stop.set()
        timeout = timeout if timeout is not None else IO_TIMEOUT * 3
        for x in self._threads:
            x.join(timeout)
        assert not self.alive(), "%s load threads did not stop" % self.name

    def report(self):
        return "%s: %r; problems: %r" % (self.name, self.counts, self.problems[:10])


def rawlog_trimmer(dovecot, user):
    """Drops the user's *.out rawlog files (what Dovecot sent: a copy of
    every RETR), keeping the *.in ones (what the proxy sent), so that a
    long load does not fill the disk."""
    d = os.path.join(dovecot.mail_root, user, "rawlog")

    def trim():
        try:
            names = os.listdir(d)
        except OSError:
            return
        for n in names:
            if n.endswith(".out"):
                try:
                    os.unlink(os.path.join(d, n))
                except OSError:
                    pass
    return trim


@pytest.fixture
def big_boxes(dovecot, mailboxes):
    """The tenants' mailboxes with a multi-MB message each (message 2)."""
    boxes = {
        "tenant-a-user": [small_message(1, "tenant-a"), big_message(tag="tenant-a")],
        "tenant-b-user": [small_message(1, "tenant-b"), big_message(tag="tenant-b")],
    }
    for u, msgs in boxes.items():
        dovecot.seed(u, msgs)
    yield boxes
    # the load writes a lot of rawlog (Dovecot logs every RETR): drop it
    for u in boxes:
        dovecot.clear_rawlog(u)


def retired_exits(t, since, pids):
    """{pid: how} from 'retired proxy pid N <how>' log lines."""
    out = {}
    for r in records(t, since):
        m = re.match(r"service \S+: retired proxy pid (\d+) (.*)$", r.get("msg", ""))
        if m and int(m.group(1)) in pids:
            out[int(m.group(1))] = m.group(2)
    return out


# --------------------------------------------------------------------------
# 1. restarts under load

def test_graceful_restart_under_load(tpmaild_factory, dovecot, big_boxes):
    """Five graceful restarts of tenant-a while 4 clients loop whole
    sessions with a multi-MB RETR: no session fails, no connection is
    refused, tenant-b's concurrent load and proxy are untouched, and every
    retired proxy finishes its sessions and exits on its own within the
    drain grace."""
    t = tpmaild_factory()
    svcs = t.services()
    pa, pb = t.port(SHARED_A), t.port(SHARED_B)
    pid_b = svcs[SHARED_B]["pid"]
    mark = log_mark(t)

    # a session open across the first restart: served to its end by the
    # retired proxy (within the drain grace)
    held = Pop3(pa)
    assert held.greeting.startswith(b"+OK"), held.greeting
    assert held.cmd("STAT") == stat_line(big_boxes["tenant-a-user"])

    la = Load("tenant-a", pa, big_boxes["tenant-a-user"], 2, threads=4,
              every_10=rawlog_trimmer(dovecot, "tenant-a-user")).start()
    lb = Load("tenant-b", pb, big_boxes["tenant-b-user"], 2, threads=2,
              every_10=rawlog_trimmer(dovecot, "tenant-b-user")).start()
    old_pids = []
    try:
        la.wait_each_ok(1)
        lb.wait_each_ok(1)
        pid = svcs[SHARED_A]["pid"]
        for i in range(5):
            # restart while sessions are open on the current proxy
            wait_for(lambda: t.services()[SHARED_A]["sessions_active"] >= 1, 10, interval=0.01,
                     what="open sessions on tenant-a before restart %d" % (i + 1))
            r = t.ctl("restart", key(SHARED_A))
            assert r.returncode == 0, ctl_text(r)
            assert r.stdout.decode().strip() == "restarted %s" % key(SHARED_A), ctl_text(r)
            old_pids.append(pid)
            pid = wait_running(t, SHARED_A, old_pid=pid)["pid"]
            if i == 0:
                # the held session, begun on the retired proxy, works to its end
                assert th.proc_alive(old_pids[0])
                st, raw = held.cmd_multi("RETR 2")
                assert st.startswith(b"+OK"), st
                assert raw == dot_stuff(big_boxes["tenant-a-user"][1])
                assert held.cmd("QUIT").startswith(b"+OK")
                held.close()
            done = la.counts["ok"]
            wait_for(lambda: la.counts["ok"] >= done + 1, 20, interval=0.02,
                     what="tenant-a sessions after restart %d" % (i + 1))
    finally:
        la.stop()
        lb.stop()
        held.close()

    assert la.counts["failed"] == 0 and la.counts["broken"] == 0, la.report()
    assert la.counts["refused"] == 0, la.report()
    assert lb.counts == {"ok": lb.counts["ok"], "refused": 0, "broken": 0, "failed": 0}, lb.report()
    assert la.counts["ok"] >= 10 and lb.counts["ok"] >= 4, (la.report(), lb.report())

    s = t.services()
    assert s[SHARED_A]["restarts"] == 5, s[SHARED_A]
    assert s[SHARED_B]["pid"] == pid_b and s[SHARED_B]["restarts"] == 0, s[SHARED_B]
    assert len(set(old_pids)) == 5 and pid not in old_pids

    # every retired proxy drained: it exited by itself (status 0) once its
    # sessions were done, within the grace, and was not killed
    wait_for(lambda: len(retired_exits(t, mark, old_pids)) == 5, DRAIN_GRACE + 5, interval=0.1,
             what="the 5 retired proxies to exit")
    how = retired_exits(t, mark, old_pids)
    assert all(v == "exited with status 0" for v in how.values()), how
    # at least one of them really had sessions to finish when retired
    drains = [r for r in records(t, mark) if r.get("pid") in old_pids
              and r.get("msg", "").startswith("draining (asked)")]
    assert len(drains) == 5, drains
    assert any(not r["msg"].startswith("draining (asked): 0 sessions") for r in drains), drains
    assert not [r for r in records(t, mark) if "grace period over" in r.get("msg", "")]


def test_hard_restart_cuts_only_that_tenant(tpmaild_factory, dovecot, big_boxes):
    """--hard ends the old proxy at once: its open sessions are cut without
    a QUIT upstream, so a DELE in a cut session is not committed.  Only
    tenant-a's clients may see breaks; tenant-b's concurrent load sees no
    failure at all."""
    t = tpmaild_factory()
    svcs = t.services()
    pa, pb = t.port(SHARED_A), t.port(SHARED_B)
    pid_b = svcs[SHARED_B]["pid"]
    user = "tenant-a-user"
    nmsgs = len(big_boxes[user])
    dovecot.clear_rawlog(user)

    held = Pop3(pa)
    assert held.greeting.startswith(b"+OK"), held.greeting
    assert held.cmd("DELE 1").startswith(b"+OK")
    assert held.cmd("STAT") == stat_line(big_boxes[user][1:])   # deleted in this session

    la = Load("tenant-a", pa, big_boxes[user], 2, threads=4,
              every_10=rawlog_trimmer(dovecot, user)).start()
    lb = Load("tenant-b", pb, big_boxes["tenant-b-user"], 2, threads=2,
              every_10=rawlog_trimmer(dovecot, "tenant-b-user")).start()
    old_pids = []
    cut_after = None            # seconds from `restart --hard` to the held session's end
    first_old_alive = None      # the first old proxy, 5 s after its hard restart
    try:
        la.wait_each_ok(1)
        lb.wait_each_ok(1)
        pid = svcs[SHARED_A]["pid"]
        for i in range(3):
            t0 = time.monotonic()
            r = t.ctl("restart", "--hard", key(SHARED_A))
            assert r.returncode == 0, ctl_text(r)
            assert "(hard)" in r.stdout.decode(), ctl_text(r)
            old_pids.append(pid)
            if i == 0:
                # the held session must be cut at once (judged at the end)
                try:
                    held.wait_closed(5)
                    cut_after = time.monotonic() - t0
                except (socket.timeout, TimeoutError):
                    pass
                deadline = t0 + 5
                while th.proc_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                first_old_alive = th.proc_alive(pid)
            pid = wait_running(t, SHARED_A, old_pid=pid)["pid"]
            done = la.counts["ok"]
            wait_for(lambda: la.counts["ok"] >= done + 1, 20, interval=0.02,
                     what="tenant-a sessions after hard restart %d" % (i + 1))
    finally:
        la.stop()
        lb.stop()
        held.close()

    # the other tenant never noticed
    assert lb.counts == {"ok": lb.counts["ok"], "refused": 0, "broken": 0, "failed": 0}, lb.report()
    assert lb.counts["ok"] >= 4, lb.report()
    s = t.services()
    assert s[SHARED_B]["pid"] == pid_b and s[SHARED_B]["restarts"] == 0, s[SHARED_B]
    # tenant-a: cut sessions at most, never wrong data, never refused
    assert la.counts["failed"] == 0 and la.counts["refused"] == 0, la.report()
    assert s[SHARED_A]["restarts"] == 3 and s[SHARED_A]["state"] == "running", s[SHARED_A]
    quick_session(pa, big_boxes[user])

    # nothing was committed by the DELE session: no QUIT reached Dovecot
    def dele_session_ended():
        for sess in dovecot.rawlog(user):
            if b"DELE 1" in sess["in"]:
                return sess
        return None
    wait_for(lambda: not any(th.proc_alive(p) for p in old_pids), DRAIN_GRACE + 30,
             interval=0.1, what="the old proxies to be gone")
    sess = wait_for(dele_session_ended, 5, what="the DELE session in Dovecot's rawlog")
    assert b"QUIT" not in sess["in"], sess["in"]
    assert dovecot.count(user) == nmsgs
    quick_session(pa, big_boxes[user])

    # ... and it was the hard restart that ended it, at once
    drains = [r["msg"] for r in records(t) if r.get("pid") in old_pids and "drain" in r.get("msg", "")]
    assert cut_after is not None, (
        "a session of the old proxy was still open 5 s after `tpmailctl restart --hard` "
        "(old proxy still alive: %s); the old proxies logged: %r" % (first_old_alive, drains))
    assert not first_old_alive, "the hard-restarted proxy was alive 5 s later: %r" % drains


# --------------------------------------------------------------------------
# 2. crash backoff

def test_crash_backoff_and_restart_clears_it(tpmaild_factory, mailboxes):
    """SIGKILLed repeatedly, a proxy is restarted after 1 s, 2 s, then the
    --backoff-max cap; status shows `backoff` and the reason meanwhile,
    /metrics the state, the delay and the growing restart count, /readyz
    503.  `tpmailctl restart` ends a backoff at once and resets it."""
    t, hp = tpmaild_with_http(tpmaild_factory, args=["--backoff-max", "3"])
    box = mailboxes["tenant-a-user"]
    pa = t.port(SHARED_A)
    lab = svc_labels(t.services()[SHARED_A])
    pid = t.services()[SHARED_A]["pid"]
    backoff_metric = []

    for n, delay in ((1, 1), (2, 2), (3, 3)):
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        s = wait_state(t, SHARED_A, "backoff")
        assert s["pid"] is None, s
        assert "killed by signal 9" in (s["error"] or ""), s
        assert "restarting in %d s" % delay in s["error"], s
        assert s["restarts"] == n, s
        m = scrape(hp)
        assert m.get("tpmail_service_state", lab, state="backoff") == 1, m.text
        assert m.get("tpmail_service_state", lab, state="running") == 0
        assert m.get("tpmail_proxy_restarts_total", lab) == n
        assert m.get("tpmail_ready") == 0
        backoff_metric.append((delay, m.get("tpmail_service_backoff_seconds", lab)))
        st, body = http_get(hp, "/readyz")
        assert st == 503 and key(SHARED_A) in body and "backoff" in body, (st, body)
        # the reason, with its time, in the service's detail
        r = t.ctl("status", "--json", key(SHARED_A))
        assert r.returncode == 0, ctl_text(r)
        errs = json.loads(r.stdout)["service"]["recent_errors"]
        assert errs and "killed by signal 9" in errs[-1]["error"], errs
        # connections wait in the backlog meanwhile (the socket stays bound)
        assert not connect_refused(pa)
        if n == 3:
            break
        s = wait_running(t, SHARED_A, old_pid=None, timeout=delay + START_TIMEOUT)
        took = time.monotonic() - t0
        assert took >= delay - 0.2, "restarted after %.2f s, backoff was %d s" % (took, delay)
        pid = s["pid"]

    # in the 3 s backoff: an operator restart serves at once, well before
    # the backoff would have ended (t0: the third kill)
    r = t.ctl("restart", key(SHARED_A))
    assert r.returncode == 0, ctl_text(r)
    s = wait_running(t, SHARED_A, timeout=START_TIMEOUT)
    took = time.monotonic() - t0
    assert took < 3 - 0.3, "running %.2f s after the kill: restart did not end the 3 s backoff" \
        % took
    assert s["restarts"] == 4, s
    quick_session(pa, box)
    m = scrape(hp)
    assert m.get("tpmail_service_state", lab, state="running") == 1
    assert m.get("tpmail_service_backoff_seconds", lab) == 0
    assert m.get("tpmail_proxy_restarts_total", lab) == 4
    wait_for(lambda: http_get(hp, "/readyz")[0] == 200, 5, what="/readyz 200")

    # ... and resets the delay: the next crash waits 1 s again
    os.kill(s["pid"], signal.SIGKILL)
    s2 = wait_state(t, SHARED_A, "backoff")
    assert "restarting in 1 s" in s2["error"], s2
    wait_running(t, SHARED_A, timeout=1 + START_TIMEOUT)
    quick_session(pa, box)

    # the gauge: "Delay before the next restart" must be the delay status shows
    assert all(v == d for d, v in backoff_metric), (
        "tpmail_service_backoff_seconds during backoff (status delay, metric): %r"
        % backoff_metric)


# --------------------------------------------------------------------------
# 3. /metrics

PROMTOOL = shutil.which("promtool")

METRIC_TYPES = {
    "tp_destination_crs": "gauge", "tp_open_tcp_connections": "gauge",
    "tp_tcp_connections_total": "counter", "tpmail_sessions_total": "counter",
    "tpmail_sessions_refused_total": "counter", "tpmail_upstream_failures_total": "counter",
    "tpmail_bytes_total": "counter", "tpmail_session_duration_seconds": "histogram",
    "tpmail_upstream_login_seconds": "histogram", "tpmail_proxy_restarts_total": "counter",
    "tpmail_service_state": "gauge", "tpmail_service_backoff_seconds": "gauge",
    "tpmail_reconcile_total": "counter", "tpmail_source_errors_total": "counter",
    "tpmail_destination_lookup_errors_total": "counter", "tpmail_ready": "gauge",
}


def promtool_check(text):
    if PROMTOOL is None:
        pytest.skip("promtool not installed")
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=text.encode(),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert r.returncode == 0, "promtool check metrics: %s" % ctl_text(r)


def histogram_ok(m, name, lab, count):
    buckets = sorted(((float(dict(k[1])["le"]), v) for k, v in m.samples.items()
                      if k[0] == name + "_bucket" and
                      {a: b for a, b in k[1] if a != "le"} == lab))
    assert buckets and buckets[-1][0] == float("inf"), buckets
    vals = [v for _, v in buckets]
    assert vals == sorted(vals), "buckets not cumulative: %r" % buckets
    assert vals[-1] == count == m.get(name + "_count", lab), (name, buckets, count)
    assert m.get(name + "_sum", lab) >= 0


ROUNDS = 3      # graceful restarts with a session ending on the retired proxy


def test_metrics_promtool_and_counts(tpmaild_factory, dovecot, mailboxes):
    box = mailboxes["tenant-b-user"]
    crs = th.standard_crs()
    crs["badpw.yaml"] = th.cr("badpw", "dest-badpw")
    crs["nodest.yaml"] = th.cr("nodest", "dest-missing")         # rejected: no destination
    crs["broken.yaml"] = "metadata: [unclosed\n"                   # unreadable CR file
    dests = th.standard_destinations(dovecot)
    dests["provider"].append(th.pop3_dest("dest-badpw", "bob", "not-bobs-password",
                                          dovecot.pop3_port))
    t, hp = tpmaild_with_http(tpmaild_factory, crs=crs, destinations=dests,
                              expect=th.STANDARD_SERVICES + ["badpw"])
    svcs = t.services()
    lab_b, lab_bad = svc_labels(svcs[SHARED_B]), svc_labels(svcs["badpw"])
    pb, pbad = t.port(SHARED_B), t.port("badpw")

    m = scrape(hp)
    promtool_check(m.text)
    for name, typ in METRIC_TYPES.items():
        assert m.types.get(name) == typ, (name, m.types.get(name))
    assert m.get("tp_destination_crs", status="available") == 3, m.text
    assert m.get("tp_destination_crs", status="rejected") == 2
    assert m.get("tpmail_reconcile_total") >= 1
    assert m.get("tpmail_source_errors_total") >= 1
    assert m.get("tpmail_destination_lookup_errors_total") >= 1
    assert m.get("tpmail_ready") == 1
    for o in ("ok", "client_closed", "login_failed", "idle_timeout", "error"):
        assert m.get("tpmail_sessions_total", lab_b, outcome=o) == 0

    # N whole sessions with QUIT, one closed by the client, one held open
    n = 3
    relayed = total = sent = 0
    for i in range(n):
        with Pop3(pb) as c:
            total += len(c.greeting)
            cmds = ["STAT"] + ["RETR %d" % j for j in range(1, len(box) + 1)] + ["QUIT"]
            for cmd in cmds:
                sent += len(cmd) + 2
                if cmd.startswith("RETR"):
                    st, raw = c.cmd_multi(cmd)
                    assert multiline_body(raw) == box[int(cmd[5:]) - 1]
                    relayed += len(st) + len(raw)
                else:
                    st = c.cmd(cmd)
                    relayed += len(st)
                assert st.startswith(b"+OK"), (cmd, st)
    with Pop3(pb) as c:
        total += len(c.greeting)
        st = c.cmd("STAT")
        sent += 6
        relayed += len(st)
    total += relayed
    held = Pop3(pb)
    assert held.greeting.startswith(b"+OK")
    # a login the mail server refuses
    with Pop3(pbad) as c:
        assert c.greeting.startswith(b"-ERR [AUTH]"), c.greeting
        assert c.wait_closed(10) == b""

    def counted():
        m = scrape(hp)
        if (m.get("tpmail_sessions_total", lab_b, outcome="ok") == n and
                m.get("tpmail_sessions_total", lab_b, outcome="client_closed") == 1 and
                m.get("tpmail_sessions_total", lab_bad, outcome="login_failed") == 1):
            return m
        return None
    m = wait_for(counted, 10, interval=0.1, what="the sessions to be counted")
    for o in ("login_failed", "idle_timeout", "error"):
        assert m.get("tpmail_sessions_total", lab_b, outcome=o) == 0, (o, m.text)
    assert m.get("tp_open_tcp_connections", lab_b) == 1
    assert m.get("tp_tcp_connections_total", lab_b) == n + 2
    assert m.get("tpmail_sessions_refused_total", lab_b) == 0
    for r in ("connect", "tls", "auth", "timeout", "protocol"):
        assert m.get("tpmail_upstream_failures_total", lab_b, reason=r) == 0
        assert m.get("tpmail_upstream_failures_total", lab_bad, reason=r) == (r == "auth"), r
    for o in ("ok", "client_closed", "idle_timeout", "error"):
        assert m.get("tpmail_sessions_total", lab_bad, outcome=o) == 0
    to_client = m.get("tpmail_bytes_total", lab_b, direction="to_client")
    to_server = m.get("tpmail_bytes_total", lab_b, direction="to_server")
    # the relayed replies are counted; at most all the client received
    assert relayed <= to_client <= total, (relayed, to_client, total)
    assert 0 < to_server <= sent, (to_server, sent)
    histogram_ok(m, "tpmail_session_duration_seconds", lab_b, n + 1)
    histogram_ok(m, "tpmail_session_duration_seconds", lab_bad, 1)
    histogram_ok(m, "tpmail_upstream_login_seconds", lab_bad, 0)
    assert held.cmd("QUIT").startswith(b"+OK")
    held.close()
    # the held session's login and duration are counted once it is over
    m = wait_for(lambda: (lambda m: m if m.get("tpmail_sessions_total", lab_b, outcome="ok")
                          == n + 1 else None)(scrape(hp)), 10, interval=0.1,
                 what="the held session to be counted")
    histogram_ok(m, "tpmail_upstream_login_seconds", lab_b, n + 2)
    histogram_ok(m, "tpmail_session_duration_seconds", lab_b, n + 2)
    assert m.get("tp_open_tcp_connections", lab_b) == 0

    # counters are summed across the service's successive proxies: a
    # session open across a graceful restart ends on the retired proxy,
    # which reports it and exits; then a SIGKILLed proxy's counts stay
    ok = n + 1

    def oks(m):
        return m.get("tpmail_sessions_total", lab_b, outcome="ok")
    for i in range(ROUNDS):
        pid = t.services()[SHARED_B]["pid"]
        old = Pop3(pb)
        assert old.cmd("STAT") == stat_line(box)
        r = t.ctl("restart", key(SHARED_B))
        assert r.returncode == 0, ctl_text(r)
        wait_running(t, SHARED_B, old_pid=pid)
        assert old.cmd("QUIT").startswith(b"+OK")
        old.close()
        wait_for(lambda: not th.proc_alive(pid), DRAIN_GRACE + 2, interval=0.02,
                 what="the retired proxy to exit after its last session")
        ok += 1
        wait_metrics(hp, lambda m: oks(m) == ok,
                     "round %d: %d ok sessions summed over a graceful restart" % (i + 1, ok),
                     show=SHARED_B)
    pid = t.services()[SHARED_B]["pid"]
    quick_session(pb, box)
    ok += 1
    wait_metrics(hp, lambda m: oks(m) == ok, "%d ok sessions" % ok, show=SHARED_B)
    os.kill(pid, signal.SIGKILL)
    wait_running(t, SHARED_B, old_pid=pid, timeout=1 + START_TIMEOUT)
    quick_session(pb, box)
    ok += 1
    m = wait_metrics(hp, lambda m: oks(m) == ok, "%d ok sessions summed over a SIGKILL" % ok,
                     show=SHARED_B)
    n_all = ok + 1          # and the client_closed one
    assert m.get("tpmail_sessions_total", lab_b, outcome="client_closed") == 1
    assert m.get("tp_tcp_connections_total", lab_b) == n_all
    assert m.get("tpmail_bytes_total", lab_b, direction="to_client") > to_client
    histogram_ok(m, "tpmail_session_duration_seconds", lab_b, n_all)
    histogram_ok(m, "tpmail_upstream_login_seconds", lab_b, n_all)
    assert m.get("tpmail_proxy_restarts_total", lab_b) == ROUNDS + 1
    assert m.get("tp_open_tcp_connections", lab_b) == 0
    # a reconcile pass (SIGHUP re-reads everything) is counted
    rec = m.get("tpmail_reconcile_total")
    os.kill(t.pid, signal.SIGHUP)
    m = wait_for(lambda: (lambda m: m if m.get("tpmail_reconcile_total") > rec else None)(
        scrape(hp)), 10, interval=0.1, what="tpmail_reconcile_total to grow")
    promtool_check(m.text)


# --------------------------------------------------------------------------
# 4. /readyz and /healthz

def slow_proxy(tmp_path, bins, delay=1.5):
    """A --proxy-path wrapper that takes ``delay`` s before exec'ing the
    real proxy: services stay `starting` that long."""
    sh = shutil.which("sh")
    sleep = shutil.which("sleep")
    p = tmp_path / "slow-tpmail-pop3"
    p.write_text("#!%s\n%s %s\nexec %s \"$@\"\n" % (sh, sleep, delay, bins["tpmail-pop3"]))
    p.chmod(0o755)
    return str(p)


def test_readyz_and_healthz(tpmaild_factory, bins, tmp_path, mailboxes):
    wrapper = slow_proxy(tmp_path, bins)
    t, hp = tpmaild_with_http(tpmaild_factory, args=["--proxy-path", wrapper], expect=[])
    st, body = wait_for(lambda: _try(http_get, hp, "/readyz"), 5, interval=0.02,
                        what="the HTTP endpoint")
    assert st == 503, (st, body)
    assert "starting" in body or "first sync" in body, body
    assert http_get(hp, "/healthz") == (200, "ok\n")
    m = scrape(hp)
    assert m.get("tpmail_ready") == 0
    assert any(k[0] == "tpmail_service_state" and dict(k[1])["state"] == "starting" and v == 1
               for k, v in m.samples.items()), m.text

    t.wait_services(th.STANDARD_SERVICES)
    st, body = wait_for(lambda: (lambda r: r if r[0] == 200 else None)(http_get(hp, "/readyz")),
                        5, interval=0.05, what="/readyz 200")
    assert body == "ok\n", body
    assert scrape(hp).get("tpmail_ready") == 1

    # a crashed proxy makes it unready until it is back
    pid = t.services()[SHARED_B]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_state(t, SHARED_B, "backoff")
    st, body = http_get(hp, "/readyz")
    assert st == 503 and body == "service %s is backoff\n" % key(SHARED_B), (st, body)
    assert http_get(hp, "/healthz")[0] == 200
    wait_running(t, SHARED_B, old_pid=pid, timeout=START_TIMEOUT + 3)
    wait_for(lambda: http_get(hp, "/readyz")[0] == 200, 5, interval=0.05, what="/readyz 200")

    # a service an operator drained is not a reason to be unready
    r = t.ctl("drain", key(SHARED_B))
    assert r.returncode == 0, ctl_text(r)
    wait_state(t, SHARED_B, "drained")
    assert http_get(hp, "/readyz")[0] == 200
    # only GET/HEAD; unknown paths 404
    assert http_get(hp, "/nope")[0] == 404


def _try(f, *a):
    try:
        return f(*a)
    except OSError:
        return None


# --------------------------------------------------------------------------
# 5. SIGTERM with open sessions

def test_sigterm_lets_open_sessions_finish(tpmaild_factory, dovecot, mailboxes):
    grace = 4
    t = tpmaild_factory(args=["--drain-grace", str(grace)])
    alice, ta = mailboxes["alice"], mailboxes["tenant-a-user"]
    pm, pa = t.port(DEDICATED), t.port(SHARED_A)
    t.status()                      # records the proxies' pids for the leftover check
    mid = Pop3(pm)                  # mid-way at the signal; finishes RETR + QUIT after it
    assert mid.greeting.startswith(b"+OK")
    assert mid.cmd("STAT") == stat_line(alice)
    idle = Pop3(pa)                 # never finishes: cut at the end of the grace
    assert idle.greeting.startswith(b"+OK")
    assert idle.cmd("DELE 1").startswith(b"+OK")

    t0 = time.monotonic()
    t.proc.send_signal(signal.SIGTERM)
    # no new clients once stopping
    wait_for(lambda: connect_refused(pm) and connect_refused(pa), 3, interval=0.05,
             what="listening sockets to close")
    st, raw = mid.cmd_multi("RETR 3")
    assert st.startswith(b"+OK"), st
    assert raw == dot_stuff(alice[2])
    assert mid.cmd("QUIT").startswith(b"+OK")
    mid.close()
    assert t.alive(), "tpmaild exited while a session was still open"
    rest = idle.wait_closed(grace + 3)
    cut = time.monotonic() - t0
    idle.close()
    assert grace - 1 <= cut <= grace + 3, (cut, rest)

    try:
        rc = t.proc.wait(grace + 5)     # one SIGTERM only
    except subprocess.TimeoutExpired:
        rc = "still running"
    took = time.monotonic() - t0
    t.stop()
    assert rc == 0, "tpmaild exit code after SIGTERM: %r\n%s" % (rc, sanitizer_file_report(t.pid))
    assert took < grace + 4, took
    assert not t.leftover_proxies(timeout=1)
    # the cut session committed nothing
    assert dovecot.count("tenant-a-user") == len(ta)
    log = t.log_text()
    assert "all tenant proxies stopped; exiting" in log


# --------------------------------------------------------------------------
# 6. SIGHUP

def test_sighup_applies_new_limit(tpmaild_factory, tmp_path, mailboxes):
    """--config with max_sessions: 1; raised to 3 by SIGHUP: the held
    session survives, three concurrent ones work, a fourth is refused.  A
    flag beats the file (--idle-timeout 60 against idle_timeout: 1), also
    after the reload; a config that no longer loads is ignored."""
    box = mailboxes["alice"]
    cfg = tmp_path / "tpmaild.yaml"
    cfg.write_text("max_sessions: 1\nidle_timeout: 1\n")
    t = tpmaild_factory(args=["--config", str(cfg), "--idle-timeout", "60"])
    pm = t.port(DEDICATED)

    held = Pop3(pm)
    assert held.greeting.startswith(b"+OK"), held.greeting
    assert held.cmd("STAT") == stat_line(box)
    last_cmd = time.monotonic()
    with Pop3(pm) as c2:
        assert c2.greeting.startswith(b"-ERR [SYS/TEMP]"), c2.greeting
        assert c2.wait_closed(5) == b""

    mark = log_mark(t)
    cfg.write_text("max_sessions: 3\nidle_timeout: 1\n")
    os.kill(t.pid, signal.SIGHUP)
    wait_log(t, lambda r: r.get("msg") == "service %s: configuration updated" % key(DEDICATED),
             since=mark, what="the new configuration to reach the proxy")
    wait_log(t, lambda r: r.get("program") == "tpmail-pop3" and
             r.get("service") == key(DEDICATED) and r.get("msg") == "configuration updated",
             since=mark, what="the proxy to take the update")
    # the held session is alive, and was idle for longer than the file's 1 s
    time.sleep(max(0.0, 1.6 - (time.monotonic() - last_cmd)))
    assert held.cmd("NOOP").startswith(b"+OK")
    others = []
    try:
        for _ in range(2):
            c = Pop3(pm)
            others.append(c)
            assert c.greeting.startswith(b"+OK"), c.greeting
        for c in [held] + others:
            assert c.cmd("STAT") == stat_line(box)
        with Pop3(pm) as c4:
            assert c4.greeting.startswith(b"-ERR [SYS/TEMP]"), c4.greeting
        for c in [held] + others:
            assert c.cmd("QUIT").startswith(b"+OK")
    finally:
        for c in [held] + others:
            c.close()

    # a config that does not load: kept the current one, nothing dropped
    mark = log_mark(t)
    cfg.write_text("max_sessions: many\n")
    os.kill(t.pid, signal.SIGHUP)
    wait_log(t, lambda r: "configuration does not load" in r.get("msg", ""), since=mark,
             what="the bad config to be reported")
    assert t.alive()
    conns = []
    try:
        for _ in range(3):
            c = Pop3(pm)
            conns.append(c)
            assert c.greeting.startswith(b"+OK"), c.greeting
    finally:
        for c in conns:
            c.close()
    assert t.services()[DEDICATED]["state"] == "running"
    stop_clean(t)


# --------------------------------------------------------------------------
# 7. logs

OPS_USER = "ops-log-user"
OPS_PW = "Ops-Dest-Pw-7qXz2Kv9"        # the destination's (right) password
WRONG_PW = "Wrong-Dest-Pw-3mNc8Rt5"    # a wrong one, sent to Dovecot
CLIENT_PW = "Client-Pw-9hLw4Yb6"       # what a client sends in PASS
CLIENT_PW2 = "Client-Sasl-Pw-5eGt1Uo8"  # ... and in AUTH PLAIN

TS_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def secret_forms(user, pw):
    forms = {pw, pw.encode().hex()}
    for raw in ("\0%s\0%s" % (user, pw), "%s\0%s\0%s" % (user, user, pw), pw):
        forms.add(base64.b64encode(raw.encode()).decode())
    return forms


def test_logs_json_and_no_secrets(tpmaild_factory, dovecot, mailboxes):
    dovecot.add_user(OPS_USER, OPS_PW)
    dovecot.seed(OPS_USER, [small_message(1, "ops")])
    crs = th.standard_crs()
    crs["opsgood.yaml"] = th.cr("opsgood", "dest-ops")
    crs["opswrong.yaml"] = th.cr("opswrong", "dest-wrong")
    dests = th.standard_destinations(dovecot)
    dests["provider"] += [th.pop3_dest("dest-ops", OPS_USER, OPS_PW, dovecot.pop3_port),
                          th.pop3_dest("dest-wrong", OPS_USER, WRONG_PW, dovecot.pop3_port)]
    t, hp = tpmaild_with_http(tpmaild_factory, crs=crs, destinations=dests,
                              args=["--log-level", "debug"],
                              expect=th.STANDARD_SERVICES + ["opsgood", "opswrong"])
    pg, pw, pa = t.port("opsgood"), t.port("opswrong"), t.port(SHARED_A)

    with Pop3(pg) as c:
        assert c.greeting.startswith(b"+OK")
        assert c.cmd("USER " + OPS_USER).startswith(b"+OK")
        assert c.cmd("PASS " + CLIENT_PW).startswith(b"+OK")
        assert c.cmd("STAT").startswith(b"+OK 1 ")
        st, raw = c.cmd_multi("RETR 1")
        assert st.startswith(b"+OK")
        assert c.cmd("QUIT").startswith(b"+OK")
    with Pop3(pa) as c:
        plain = base64.b64encode(("\0tenant-a-user\0" + CLIENT_PW2).encode()).decode()
        assert c.cmd("AUTH PLAIN " + plain).startswith(b"+OK")
        assert c.cmd("STAT").startswith(b"+OK")
        assert c.cmd("QUIT").startswith(b"+OK")
    for _ in range(2):
        with Pop3(pw) as c:
            assert c.greeting.startswith(b"-ERR [AUTH]"), c.greeting
            c.wait_closed(10)
    # the configuration goes to the proxies again: restart, reload, log level
    assert t.ctl("restart", key("opswrong")).returncode == 0
    os.kill(t.pid, signal.SIGHUP)
    assert t.ctl("log-level", "debug").returncode == 0
    wait_running(t, "opswrong")

    def ended():
        ends = [r for r in records(t) if "duration_ms" in r]
        return ends if len(ends) >= 4 else None
    wait_for(ended, 10, interval=0.1, what="4 session end lines")
    status_json = t.ctl("status", "--json").stdout.decode()
    details = "".join(t.ctl("status", "--json", key(s)).stdout.decode()
                      for s in ("opsgood", "opswrong"))
    metrics = http_get(hp, "/metrics")[1]
    stop_clean(t)
    log = t.log_text()

    bad = [line for rec, line in log_records(log) if rec is None]
    assert not bad, "non-JSON lines in tpmaild's stderr:\n%s" % "\n".join(bad[:20])
    recs = [rec for rec, _ in log_records(log)]
    assert len(recs) > 20
    for r in recs:
        for f in ("time", "level", "program", "pid", "msg"):
            assert f in r, (f, r)
        assert TS_RE.match(r["time"]), r
        assert r["level"] in ("error", "warn", "info", "debug"), r
        assert r["program"] in ("tpmaild", "tpmail-pop3"), r
        assert isinstance(r["pid"], int) and isinstance(r["msg"], str), r
        if r["program"] == "tpmail-pop3":
            assert r.get("service", "").startswith(NS + "/"), r
            if r["service"] in (key(SHARED_A), key(SHARED_B)):
                assert r.get("tenant") in ("tenant-a", "tenant-b"), r
                assert r["service"].endswith(r["tenant"]), r
            else:
                assert "tenant" not in r, r
    assert any(r["level"] == "debug" for r in recs)
    # one end line per session, with its numbers and result
    ends = [r for r in recs if "duration_ms" in r]
    for r in ends:
        for f in ("session", "result", "reason", "commands", "bytes_to_client",
                  "bytes_to_server"):
            assert f in r, (f, r)
        assert r["duration_ms"].isdigit() and r["commands"].isdigit(), r
    good = [r for r in ends if r["service"] == key("opsgood")]
    assert len(good) == 1 and good[0]["result"] == "ok" and good[0]["reason"] == "quit", good
    assert int(good[0]["commands"]) >= 3 and int(good[0]["bytes_to_client"]) > 0, good
    wrong = [r for r in ends if r["service"] == key("opswrong")]
    assert len(wrong) == 2 and all(r["result"] == "fail" for r in wrong), wrong
    assert all(r["level"] == "warn" for r in wrong), wrong
    fails = [r for r in recs if r.get("service") == key("opswrong") and r.get("upstream")
             and r.get("result") == "fail"]
    assert len(fails) == 2 and "reason" in fails[0], fails

    secrets = set()
    for user, pw in ((OPS_USER, OPS_PW), (OPS_USER, WRONG_PW), (OPS_USER, CLIENT_PW),
                     ("tenant-a-user", CLIENT_PW2)):
        secrets |= secret_forms(user, pw)
    for user, pw in th.USERS.items():
        secrets |= secret_forms(user, pw)
    for where, text in (("log", log), ("status --json", status_json + details),
                        ("/metrics", metrics)):
        leaked = sorted(s for s in secrets if s in text)
        assert not leaked, "secrets in the %s: %r" % (where, leaked)


# --------------------------------------------------------------------------
# 8. tpmailctl

def test_tpmailctl_exit_codes_and_status(tpmaild_factory, bins, dovecot, mailboxes, tmp_path):
    crs = th.standard_crs()
    crs["badpw.yaml"] = th.cr("badpw", "dest-badpw")
    dests = th.standard_destinations(dovecot)
    dests["provider"].append(th.pop3_dest("dest-badpw", "bob", "not-bobs-password",
                                          dovecot.pop3_port))
    t = tpmaild_factory(crs=crs, destinations=dests, expect=th.STANDARD_SERVICES + ["badpw"])

    def ctl(*a):
        return t.ctl(*a)

    # 1: tpmaild refuses
    for args in (("status", key("nope")), ("restart", key("nope")), ("drain", key("nope")),
                 ("restart", "--cr", key("nope")), ("restart", "--cr", "no-slash"),
                 ("log-level", "loud"), ("status", "nope")):
        r = ctl(*args)
        assert r.returncode == 1, (args, ctl_text(r))
        assert r.stderr.decode().startswith("tpmailctl: "), (args, ctl_text(r))
    r = ctl("--json", "status", key("nope"))
    assert r.returncode == 1 and "error" in json.loads(r.stdout), ctl_text(r)
    # 2: usage
    for args in ((), ("frobnicate",), ("restart",), ("restart", key(DEDICATED), "--cr", key("mail")),
                 ("drain",), ("log-level",), ("status", "a", "b"), ("--bogus", "status"),
                 ("status", "a", "b", "c", "d")):
        r = ctl(*args)
        assert r.returncode == 2, (args, ctl_text(r))
        assert b"usage" in r.stderr, (args, ctl_text(r))
    r = ctl("--help")
    assert r.returncode == 0 and b"usage" in r.stdout, ctl_text(r)
    # 3: unreachable
    for path in (tmp_path / "no-such.sock", tmp_path):
        r = subprocess.run([bins["tpmailctl"], "--control", str(path), "status"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=10)
        assert r.returncode == 3, (path, ctl_text(r))
        assert b"cannot reach tpmaild" in r.stderr, ctl_text(r)

    # status: the table, and one service in detail with its recent errors
    r = ctl("status")
    assert r.returncode == 0, ctl_text(r)
    out = r.stdout.decode()
    for s in th.STANDARD_SERVICES + ["badpw"]:
        assert re.search(r"^%s\s+%s\s" % (NS, re.escape(s)), out, re.M), out
    r = ctl("status", key("badpw"))
    assert r.returncode == 0 and "recent errors:\n  (none)" in r.stdout.decode(), ctl_text(r)
    with Pop3(t.port("badpw")) as c:
        assert c.greeting.startswith(b"-ERR [AUTH]"), c.greeting

    def detail():
        r = ctl("--json", "status", key("badpw"))
        assert r.returncode == 0, ctl_text(r)
        sv = json.loads(r.stdout)["service"]
        return sv if sv["recent_errors"] else None
    sv = wait_for(detail, 10, interval=0.1, what="a recent error for badpw")
    assert sv["name"] == "badpw" and sv["namespace"] == NS and sv["state"] == "running", sv
    err = sv["recent_errors"][-1]
    assert set(err) == {"time", "error"}, err
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", err["time"]), err
    assert "rejected the credentials" in err["error"], err
    assert sv["sessions_failed"] == 1 and sv["sessions_total"] == 1, sv
    r = ctl("status", key("badpw"))
    text = r.stdout.decode()
    assert r.returncode == 0 and "recent errors:" in text and err["error"] in text, text
    assert "state:     running" in text, text

    # drain: the open session finishes, new clients are refused, until restart
    pa = t.port(SHARED_A)
    box = mailboxes["tenant-a-user"]
    before = t.services()[SHARED_A]
    c = Pop3(pa)
    assert c.cmd("STAT") == stat_line(box)
    r = ctl("drain", key(SHARED_A))
    assert r.returncode == 0, ctl_text(r)
    s = wait_state(t, SHARED_A, "drained")
    assert s["pid"] is None and "drained" in s["error"], s
    wait_for(lambda: connect_refused(pa), 3, interval=0.05, what="the drained port to refuse")
    st, raw = c.cmd_multi("RETR 1")
    assert multiline_body(raw) == box[0]
    assert c.cmd("QUIT").startswith(b"+OK")
    c.close()
    wait_for(lambda: not th.proc_alive(before["pid"]), DRAIN_GRACE + 2, interval=0.05,
             what="the drained proxy to exit after its last session")
    assert connect_refused(pa)
    assert t.services()[SHARED_A]["state"] == "drained"
    r = ctl("restart", key(SHARED_A))
    assert r.returncode == 0, ctl_text(r)
    s = wait_running(t, SHARED_A)
    assert s["listen"] == before["listen"], (s, before)
    quick_session(pa, box)

    # restart --cr: every tenant service of the CR, nothing else
    pids = {n: s["pid"] for n, s in t.services().items()}
    r = ctl("--json", "restart", "--cr", "%s/shared" % NS)
    assert r.returncode == 0, ctl_text(r)
    assert sorted(json.loads(r.stdout)["restarted"]) == [key(SHARED_A), key(SHARED_B)], ctl_text(r)
    for n in (SHARED_A, SHARED_B):
        wait_running(t, n, old_pid=pids[n])
    after = t.services()
    assert after[DEDICATED]["pid"] == pids[DEDICATED] and after["badpw"]["pid"] == pids["badpw"]
    quick_session(t.port(SHARED_B), mailboxes["tenant-b-user"])

    # tpmaild gone: 3
    stop_clean(t)
    r = ctl("status")
    assert r.returncode == 3, ctl_text(r)


def test_tpmailctl_log_level(tpmaild_factory, mailboxes):
    """`log-level debug` reaches the running proxies (debug lines appear),
    `warn` silences info lines, and tpmaild logs the change."""
    t = tpmaild_factory(args=["--log-level", "info"])
    pm = t.port(DEDICATED)
    box = mailboxes["alice"]
    pid = t.services()[DEDICATED]["pid"]

    def session_end(since):
        return wait_log(t, lambda r: r.get("pid") == pid and "duration_ms" in r, since=since,
                        what="a session end line")

    quick_session(pm, box)
    session_end(0)
    assert not [r for r in records(t) if r["level"] == "debug"]

    mark = log_mark(t)
    r = t.ctl("log-level", "debug")
    assert r.returncode == 0 and r.stdout == b"log level debug\n", ctl_text(r)
    wait_log(t, lambda r: r.get("program") == "tpmaild" and r["msg"] == "log level set to debug",
             since=mark)
    quick_session(pm, box)
    session_end(mark)
    dbg = [r for r in records(t, mark) if r["level"] == "debug" and r.get("pid") == pid]
    assert any(r.get("command") == "STAT" for r in dbg), dbg
    # the session's last debug line follows its end line: let it land first
    wait_log(t, lambda r: r.get("pid") == pid and r["msg"].endswith("closing -> dead"),
             since=mark, what="the session's last debug line")

    mark = log_mark(t)
    r = t.ctl("log-level", "warn")
    assert r.returncode == 0, ctl_text(r)
    quick_session(pm, box)                           # its end line is info: not logged
    r = t.ctl("log-level", "info")
    assert r.returncode == 0, ctl_text(r)
    quick_session(pm, box)
    end = session_end(mark)                          # the one after `info` again
    lines = [r for r in records(t, mark) if r.get("pid") == pid and "duration_ms" in r]
    assert lines == [end], lines
    assert not [r for r in records(t, mark) if r["level"] == "debug"]


def test_restart_annotation_restarts_gracefully(tpmaild_factory, mailboxes):
    """Changing the CR's tpmail.io/restartedAt annotation restarts every
    tenant proxy of that CR gracefully (new pids, restarts+1, a session open
    across it finishes), as `kubectl rollout restart` does for Deployments;
    the other CR's proxy is untouched, and the same value again does
    nothing."""
    t = tpmaild_factory()
    before = t.services()
    box = mailboxes["tenant-a-user"]
    held = Pop3(t.port(SHARED_A))
    assert held.greeting.startswith(b"+OK"), held.greeting
    doc = th.cr("shared", "dest-t", tenants=["tenant-a", "tenant-b"])
    doc["metadata"]["annotations"]["tpmail.io/restartedAt"] = "2026-11-27T10:00:00Z"
    t.write_cr("shared.yaml", doc)

    def restarted():
        s = t.services()
        return all(s[n]["pid"] != before[n]["pid"] and s[n]["state"] == "running"
                   for n in (SHARED_A, SHARED_B)) and s
    after = wait_for(restarted, START_TIMEOUT, what="both tenants restarted")
    assert after[DEDICATED]["pid"] == before[DEDICATED]["pid"]
    for n in (SHARED_A, SHARED_B):
        assert after[n]["restarts"] == before[n]["restarts"] + 1, after[n]
    # the session open across the restart is served by the retired proxy
    assert held.cmd("STAT") == stat_line(box)
    held.cmd("QUIT")
    # the same value again (any other change to the file) restarts nothing
    doc["spec"]["service"] = {"port": 110}
    t.write_cr("shared.yaml", doc)
    time.sleep(1.5)
    again = t.services()
    for n in (SHARED_A, SHARED_B):
        assert again[n]["pid"] == after[n]["pid"], again[n]
