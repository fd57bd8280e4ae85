#!/usr/bin/python3
"""The embedded default: tpmail in standalone mode against a real local Dovecot.

Starts a private Dovecot holding demo mail for the provider and two tenants,
runs tpmaild with the example CRs from deploy/examples/ (one dedicated, one
shared with two tenant subdomains), prints the endpoints, plays the seed's
telnet session (list, retr 1, retr 2, quit) against one of them, and keeps
running until Ctrl-C; then stops everything it started.

    scripts/demo.py [--build-dir DIR] [--once]

--once stops right after the session instead of waiting for Ctrl-C.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(TOP, "tests", "lib"))
from dovecot import Dovecot, make_message, wait_for  # noqa: E402

USERS = {
    "provider": ("provider-user", "provider-password"),
    "tenant-a": ("tenant-a-user", "tenant-a-password"),
    "tenant-b": ("tenant-b-user", "tenant-b-password"),
}


def demo_mail(tenant):
    return [
        make_message("Welcome, %s" % tenant,
                     ["This mailbox belongs to %s." % tenant,
                      "tpmail logged in for you: the workload holds no password."]),
        make_message("Second message for %s" % tenant,
                     ["Lines that start with a dot survive the relay:",
                      ".like this one", "..and this one", "End."]),
    ]


def destinations(dc, example):
    """deploy/examples/destinations.json, pointed at the local Dovecot."""
    out = {}
    for tenant, dests in example.items():
        out[tenant] = []
        for d in dests:
            d = dict(d)
            proto = d["mail.transport.protocol"]
            d["mail.%s.host" % proto] = dc.host
            if proto == "pop3s":
                d["mail.pop3s.port"] = str(dc.pop3s_port)
                d["mail.pop3s.ssl.cafile"] = dc.ca_file
            else:
                d["mail.pop3.port"] = str(dc.pop3_port)
                if d.get("mail.pop3.starttls.enable") == "true":
                    d["mail.pop3.ssl.cafile"] = dc.ca_file
            out[tenant].append(d)
    return out


def status(ctl, control):
    """tpmailctl status --json; while tpmaild starts, its "cannot reach"
    is expected and not shown (wait_for reports the last one on a timeout)."""
    r = subprocess.run([ctl, "--control", control, "status", "--json"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip() or "tpmailctl exited with %d" % r.returncode)
    return json.loads(r.stdout)


def seed_session(host, port):
    """The seed's telnet session, typed line by line, printed as it happens."""
    print("$ telnet %s %d" % (host, port))
    with socket.create_connection((host, port), timeout=10) as s:
        f = s.makefile("rb")

        def reply(multi):
            line = f.readline()
            sys.stdout.write(line.decode(errors="replace"))
            if multi and line.startswith(b"+OK"):
                while True:
                    line = f.readline()
                    sys.stdout.write(line.decode(errors="replace"))
                    if line in (b".\r\n", b""):
                        break
        reply(False)
        for cmd, multi in (("list", True), ("retr 1", True), ("retr 2", True), ("quit", False)):
            print(cmd)
            s.sendall(cmd.encode() + b"\r\n")
            reply(multi)
    sys.stdout.flush()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build-dir", default=os.path.join(TOP, "build"))
    ap.add_argument("--once", action="store_true")
    args = ap.parse_args()
    tpmaild = os.path.join(args.build_dir, "supervisor", "tpmaild")
    ctl = os.path.join(args.build_dir, "supervisor", "tpmailctl")

    work = tempfile.mkdtemp(prefix="tpmail-demo-")
    os.chmod(work, 0o755)
    crs = os.path.join(work, "crs")
    state = os.path.join(work, "state")
    os.makedirs(crs)
    for name in sorted(os.listdir(os.path.join(TOP, "deploy", "examples"))):
        if name.endswith(".yaml"):
            shutil.copy(os.path.join(TOP, "deploy", "examples", name), crs)
    with open(os.path.join(TOP, "deploy", "examples", "destinations.json")) as f:
        example = json.load(f)

    dc = Dovecot(workdir=os.path.join(work, "dovecot"),
                 users={u: p for u, p in USERS.values()})
    proc = None
    try:
        for tenant, (user, _) in USERS.items():
            dc.seed(user, demo_mail(tenant))
        dest_file = os.path.join(work, "destinations.json")
        with open(dest_file, "w") as f:
            json.dump(destinations(dc, example), f, indent=2)
        control = os.path.join(state, "control.sock")
        print("== Dovecot on %s (POP3 %d, POP3S %d); tpmaild state in %s" %
              (dc.host, dc.pop3_port, dc.pop3s_port, state))
        proc = subprocess.Popen([tpmaild, "--crs", crs, "--destinations", dest_file,
                                 "--state-dir", state])

        def all_running():
            st = status(ctl, control)
            return len(st["services"]) == 3 and all(
                s["state"] == "running" for s in st["services"]) and st
        wait_for(all_running, 20, what="3 tenant services running")
        print("\n== Endpoints (tpmailctl --control %s status)" % control)
        subprocess.run([ctl, "--control", control, "status"], check=True)
        st = status(ctl, control)
        first = next(s for s in st["services"] if s["tenant"] is None)
        host, port = first["listen"].rsplit(":", 1)
        print("\n== The seed's session against %s/%s (no credentials sent)\n" %
              (first["namespace"], first["name"]))
        seed_session(host, int(port))
        if args.once:
            return 0
        print("\n== tpmail is running; try another endpoint with telnet or curl. Ctrl-C stops it.")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                rc = proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
            print("== tpmaild exited with status %d" % rc)
        dc.close()
        shutil.rmtree(work, ignore_errors=True)


def _terminate(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, _terminate)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
