#!/usr/bin/python3
"""Self-check of the fakes on their own (no tpmail): curl against the token
and Destination services, a SAP-style SOCKS5 client against the fake
Connectivity Proxy, the scripts as subprocesses, and Dovecot's oauth2
passdb against the fake introspection endpoint.

    /usr/bin/python3 tests/integration/fakes/selftest.py [-v]

Exits 0 and prints "N passed, 0 failed" when every check holds.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "lib"))

from fakes import FakeBtp, sap_socks5_connect  # noqa: E402

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


def curl(btp, *args, timeout=5):
    r = subprocess.run(["curl", "-sS", "--max-time", str(timeout), "-w", "\n%{http_code}"]
                       + btp.resolve_args() + list(args),
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout + 5)
    body, _, code = r.stdout.decode().rpartition("\n")
    return int(code or 0), body


def get_token(btp, tenant, key=None, secret=None):
    key = key or btp.dest.service_key()
    code, body = curl(btp, "-u", "%s:%s" % (key["clientid"], secret or key["clientsecret"]),
                      "-d", "grant_type=client_credentials&client_id=" + key["clientid"],
                      btp.xsuaa.url(tenant) + "/oauth/token")
    return code, (json.loads(body) if body.startswith("{") else body)


def find(btp, token, name, *headers):
    args = []
    for h in headers:
        args += ["-H", h]
    code, body = curl(btp, "-H", "Authorization: Bearer " + token, *args,
                      btp.dest.url() + "/destination-configuration/v1/destinations/" + name)
    try:
        return code, json.loads(body)
    except ValueError:
        return code, body


class Echo:
    """A loopback echo server (the SOCKS target)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = False
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                continue
            c.settimeout(5)
            try:
                c.sendall(b"+OK echo\r\n")
                while True:
                    d = c.recv(4096)
                    if not d:
                        break
                    c.sendall(d)
            except OSError:
                pass
            c.close()

    def close(self):
        self.stop = True
        self.t.join(2)
        self.sock.close()


def main():
    work = tempfile.mkdtemp(prefix="tpmail-fakes-")
    echo = Echo()
    routes = {("mail.onprem.test", 110): ("127.0.0.1", echo.port),
              ("10.0.0.7", 110): ("127.0.0.1", echo.port),
              ("dead.onprem.test", 110): ("127.0.0.1", 1)}
    btp = FakeBtp(work, tenants=["tenant-a", "tenant-b"], routes=routes,
                  locations={"*": {"loc-1"}, "tenant-b": {""}}, hang_max=2).start()
    try:
        run(btp)
    finally:
        btp.close()
        echo.close()
        shutil.rmtree(work, ignore_errors=True)
    failed = sum(1 for _, ok in results if not ok)
    print("%d passed, %d failed" % (len(results) - failed, failed))
    return 1 if failed else 0


def run(btp):
    ds = btp.dest
    ds.put("tenant-a", {"Name": "dest-t", "Type": "MAIL", "ProxyType": "Internet",
                        "Authentication": "BasicAuthentication",
                        "mail.user": "ua", "mail.password": "pa"})
    ds.put("tenant-b", {"Name": "dest-t", "Type": "MAIL", "ProxyType": "Internet",
                        "Authentication": "BasicAuthentication",
                        "mail.user": "ub", "mail.password": "pb"})
    ds.put("provider", {"Name": "cc", "Type": "MAIL", "Authentication": "OAuth2ClientCredentials",
                        "mail.user": "ou"})
    ds.put("provider", {"Name": "rt", "Type": "MAIL", "Authentication": "OAuth2RefreshToken",
                        "mail.user": "ru"})
    ds.put("provider", {"Name": "code", "Type": "MAIL",
                        "Authentication": "OAuth2AuthorizationCode", "mail.user": "cu"})
    ds.add_refresh_token("rt-good", "ru")
    ds.add_code("code-good", "cu")
    toks = {}

    def keys_on_disk():
        p = os.path.join(btp.keys_dir, btp.default_instance)
        assert os.path.islink(p) and os.readlink(p) == "..data/dest-instance", os.readlink(p)
        assert os.path.islink(os.path.join(btp.keys_dir, "..data"))
        with open(p) as f:
            k = json.load(f)
        assert set(k) >= {"clientid", "clientsecret", "url", "uri"}, k
        assert k["url"] == btp.xsuaa.url() and k["uri"] == ds.url(), k
        with open(btp.conn_key_file) as f:
            ck = json.load(f)
        assert ck["token_service_url"] == btp.conn_xsuaa.url(), ck
    check("service keys as a mounted Secret (..data symlinks)", keys_on_disk)

    def tokens_per_tenant():
        for t in ("tenant-a", "tenant-b", None):
            code, j = get_token(btp, t)
            assert code == 200 and j["token_type"] == "bearer" and j["expires_in"] > 0, (t, code, j)
            toks[t] = j["access_token"]
        assert len(set(toks.values())) == 3
        hosts = [r["host"].split(":")[0] for r in btp.xsuaa.token_requests()]
        assert hosts == ["tenant-a.auth.test", "tenant-b.auth.test", "prov-subaccount.auth.test"], hosts
        r = btp.xsuaa.token_requests()[0]
        assert r["basic_user"] == ds.client_id and r["form"]["client_id"] == ds.client_id, r
    check("token per tenant by Host header (curl --resolve)", tokens_per_tenant)

    def token_refusals():
        code, _ = get_token(btp, "tenant-a", secret="wrong")
        assert code == 401, code
        key = ds.service_key()
        code, _ = curl(btp, "--resolve", "tenant-zzz.auth.test:%d:127.0.0.1" % btp.xsuaa.port,
                       "-u", "%s:%s" % (key["clientid"], key["clientsecret"]),
                       "-d", "grant_type=client_credentials", btp.xsuaa.url("tenant-zzz")
                       + "/oauth/token")
        assert code == 404, code
    check("token: wrong secret 401, unknown tenant 404", token_refusals)

    def find_per_tenant():
        ca, ja = find(btp, toks["tenant-a"], "dest-t")
        cb, jb = find(btp, toks["tenant-b"], "dest-t")
        assert ca == cb == 200, (ca, cb)
        assert ja["destinationConfiguration"]["mail.password"] == "pa", ja
        assert jb["destinationConfiguration"]["mail.password"] == "pb", jb
        assert ja["authTokens"][0]["type"] == "Basic", ja
        assert find(btp, toks[None], "dest-t")[0] == 404
        assert find(btp, toks["tenant-a"], "nope")[0] == 404
        assert find(btp, "bogus", "dest-t")[0] == 401
    check("find destination per tenant; 404; 401", find_per_tenant)

    def expired_and_foreign_tokens():
        old = btp.xsuaa.expires_in
        btp.xsuaa.expires_in = 1
        try:
            _, j = get_token(btp, "tenant-a")
        finally:
            btp.xsuaa.expires_in = old
        assert find(btp, j["access_token"], "dest-t")[0] == 200
        time.sleep(1.1)
        assert find(btp, j["access_token"], "dest-t")[0] == 401
        assert ds.find_requests(status=401)[-1]["error"] == "token expired"
        btp.conn_xsuaa.add_client("x", "y")
        code, body = curl(btp, "-u", "x:y", "-d", "grant_type=client_credentials&client_id=x",
                          btp.conn_xsuaa.url("tenant-a") + "/oauth/token")
        assert code == 200, (code, body)
        assert find(btp, json.loads(body)["access_token"], "dest-t")[0] == 401
    check("expired token and another service's token: 401", expired_and_foreign_tokens)

    def failure_modes():
        try:
            ds.set_fail("500")
            assert find(btp, toks["tenant-a"], "dest-t")[0] == 500
            ds.set_fail("malformed")
            code, body = find(btp, toks["tenant-a"], "dest-t")
            assert code == 200 and isinstance(body, str), (code, body)
            ds.set_fail("401")
            assert find(btp, toks["tenant-a"], "dest-t")[0] == 401
            ds.set_fail("hang")
            t = time.monotonic()
            code, _ = find(btp, toks["tenant-a"], "dest-t")
            assert code == 0 and 1.5 < time.monotonic() - t < 4, (code, time.monotonic() - t)
            # a hanging request is let go as soon as the service is healthy
            box = []
            th = threading.Thread(target=lambda: box.append(find(btp, toks["tenant-a"], "dest-t")))
            t = time.monotonic()
            th.start()
            time.sleep(0.5)
            ds.set_fail(None)
            th.join(5)
            assert box and box[0][0] == 0 and time.monotonic() - t < 1.5, box
            assert find(btp, toks["tenant-a"], "dest-t")[0] == 200
        finally:
            ds.set_fail(None)
    check("failure injection: 500, malformed, 401, hang (bounded)", failure_modes)

    def oauth_destinations():
        code, j = find(btp, toks[None], "cc")
        at = j["authTokens"][0]
        assert code == 200 and at["type"] == "Bearer" and at["value"].startswith("mail-at-"), j
        assert at["http_header"]["value"] == "Bearer " + at["value"] and int(at["expires_in"]) > 0
        code, body = curl(btp, "-d", "token=" + at["value"], ds.introspection_url)
        assert json.loads(body) == {"active": True, "username": "ou", "scope": "pop3",
                                    "exp": json.loads(body)["exp"]}, body
        assert json.loads(curl(btp, "-d", "token=nope", ds.introspection_url)[1]) == {"active": False}
        # refresh token: only with the right X-refresh-token
        _, j = find(btp, toks[None], "rt")
        assert j["authTokens"][0]["value"] == "" and "error" in j["authTokens"][0], j
        _, j = find(btp, toks[None], "rt", "X-refresh-token: rt-bad")
        assert j["authTokens"][0]["value"] == "" and "error" in j["authTokens"][0], j
        _, j = find(btp, toks[None], "rt", "X-refresh-token: rt-good")
        assert ds.mail_token_user(j["authTokens"][0]["value"]) == "ru", j
        # authorization code: once
        _, j = find(btp, toks[None], "code", "X-code: code-good")
        assert ds.mail_token_user(j["authTokens"][0]["value"]) == "cu", j
        _, j = find(btp, toks[None], "code", "X-code: code-good")
        assert "error" in j["authTokens"][0], j
    check("OAuth2 destinations: client credentials, refresh token, code", oauth_destinations)

    def conn_token(tenant):
        code, body = curl(btp, "-u", "%s:%s" % (btp.conn_client_id, btp.conn_client_secret),
                          "-d", "grant_type=client_credentials&client_id=" + btp.conn_client_id,
                          btp.conn_xsuaa.url(tenant) + "/oauth/token")
        assert code == 200, (code, body)
        tok = json.loads(body)["access_token"]
        assert len(tok) > 1000, len(tok)        # longer than a 1-byte length allows
        return tok

    def socks_ok():
        jwt = conn_token("tenant-a")
        for host in ("mail.onprem.test", "10.0.0.7"):
            s, rep = sap_socks5_connect(btp.socks.address, jwt, "loc-1", host, 110)
            assert rep == 0, rep
            f = s.makefile("rb")
            assert f.readline() == b"+OK echo\r\n"
            s.sendall(b"hello\r\n")
            assert f.readline() == b"hello\r\n"
            s.close()
        recs = btp.socks.records(rep=0)
        assert recs[0]["greeting"] == b"\x05\x01\x80" and recs[0]["atyp"] == 3, recs[0]
        assert recs[0]["location_raw"] == b"bG9jLTE=" and recs[0]["tenant"] == "tenant-a"
        assert recs[1]["atyp"] == 1 and recs[1]["host"] == "10.0.0.7", recs[1]
        # tenant-b is configured without a location id
        s, rep = sap_socks5_connect(btp.socks.address, conn_token("tenant-b"), "",
                                    "mail.onprem.test", 110)
        assert rep == 0, rep
        s.close()
    check("SOCKS5 0x80: CONNECT by domain and IPv4, relay, base64 location", socks_ok)

    def socks_refusals():
        jwt = conn_token("tenant-a")
        a = btp.socks.address
        assert sap_socks5_connect(a, "eyJ.bogus.jwt", "loc-1", "mail.onprem.test", 110)[1] == 5
        assert sap_socks5_connect(a, toks["tenant-a"], "loc-1", "mail.onprem.test", 110)[1] == 5
        assert sap_socks5_connect(a, jwt, "loc-2", "mail.onprem.test", 110)[1] == 3
        assert sap_socks5_connect(a, jwt, "", "mail.onprem.test", 110)[1] == 3
        assert sap_socks5_connect(a, jwt, "loc-1", "other.onprem.test", 110)[1] == 4
        assert sap_socks5_connect(a, jwt, "loc-1", "mail.onprem.test", 111)[1] == 4
        assert sap_socks5_connect(a, jwt, "loc-1", "dead.onprem.test", 110)[1] == 4
        btp.socks.accept_tokens = False
        try:
            assert sap_socks5_connect(a, jwt, "loc-1", "mail.onprem.test", 110)[1] == 5
        finally:
            btp.socks.accept_tokens = True
        # a raw (not base64) location id is not the configured one
        s = socket.create_connection(("127.0.0.1", btp.socks.port), timeout=5)
        s.sendall(b"\x05\x01\x80")
        assert s.recv(2) == b"\x05\x80"
        tok = jwt.encode()
        s.sendall(b"\x01" + len(tok).to_bytes(4, "big") + tok + b"\x05loc-1")
        assert s.recv(2) == b"\x01\x00"
        s.sendall(b"\x05\x01\x00\x03\x10mail.onprem.test\x00\x6e")
        assert s.recv(10)[:2] == b"\x05\x03"
        s.close()
        # no method 0x80 offered
        s = socket.create_connection(("127.0.0.1", btp.socks.port), timeout=5)
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\xff"
        s.close()
    check("SOCKS5 REP 05 bad token, 03 location, 04 host; 05 FF without 0x80", socks_refusals)

    def socks_domain_reply():
        btp.socks.reply_atyp = "domain"
        try:
            s, rep = sap_socks5_connect(btp.socks.address, conn_token("tenant-a"), "loc-1",
                                        "mail.onprem.test", 110)
            assert rep == 0
            assert s.makefile("rb").readline() == b"+OK echo\r\n"
            s.close()
        finally:
            btp.socks.reply_atyp = "ipv4"
    check("SOCKS5 reply with a domain BND address", socks_domain_reply)

    def scripts():
        dfile = os.path.join(btp.workdir, "dests.json")
        with open(dfile, "w") as f:
            json.dump({"provider": [{"Name": "d", "Type": "MAIL", "mail.user": "u",
                                     "mail.password": "p"}]}, f)
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "world.py"), "--workdir",
                              os.path.join(btp.workdir, "w2"), "--destinations", dfile,
                              "--lifetime", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            info = json.loads(p.stdout.readline())
            args = info["tpmaild_args"]
            assert "--service-keys" in args and "--connectivity-proxy" in args, args
            with open(os.path.join(info["keys_dir"], "dest-instance")) as f:
                key = json.load(f)
            res = [args[i + 1] for i, a in enumerate(args) if a == "--resolve"]
            rargs = sum((["--resolve", r] for r in res), [])
            r = subprocess.run(["curl", "-sS", "--max-time", "5"] + rargs + [
                "-u", "%s:%s" % (key["clientid"], key["clientsecret"]), "-d",
                "grant_type=client_credentials", key["url"] + "/oauth/token"],
                stdout=subprocess.PIPE, timeout=10)
            tok = json.loads(r.stdout)["access_token"]
            r = subprocess.run(["curl", "-sS", "--max-time", "5", "-H", "Authorization: Bearer "
                                + tok, key["uri"] + "/destination-configuration/v1/destinations/d"],
                               stdout=subprocess.PIPE, timeout=10)
            assert json.loads(r.stdout)["destinationConfiguration"]["mail.password"] == "p"
        finally:
            p.terminate()
            p.wait(10)
        assert p.returncode == 0, (p.returncode, p.stderr.read())
        # the SOCKS script checks tokens at the XSUAA's /introspect
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "socks5.py"),
                              "--token-introspect",
                              "http://127.0.0.1:%d/introspect" % btp.conn_xsuaa.port,
                              "--route", "mail.onprem.test:110=127.0.0.1:%d"
                              % btp.socks.routes[("mail.onprem.test", 110)][1],
                              "--location", "loc-1", "--lifetime", "30"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            info = json.loads(p.stdout.readline())
            a = "127.0.0.1:%d" % info["port"]
            s, rep = sap_socks5_connect(a, conn_token("tenant-a"), "loc-1", "mail.onprem.test", 110)
            assert rep == 0, rep
            assert s.makefile("rb").readline() == b"+OK echo\r\n"
            s.close()
            assert sap_socks5_connect(a, "x.y.z", "loc-1", "mail.onprem.test", 110)[1] == 5
        finally:
            p.terminate()
            p.wait(10)
    check("scripts: world.py and socks5.py run, answer and stop", scripts)

    def dovecot_oauth2():
        from dovecot import Dovecot
        with Dovecot(users={"ou": "pw-ou", "other": "pw-other"},
                     oauth2_introspection_url=ds.introspection_url) as dc:
            tok, _ = ds.issue_mail_token("ou")
            assert dc.try_sasl("xoauth2", "ou", tok).startswith(b"+OK")
            assert dc.try_sasl("oauthbearer", "ou", tok).startswith(b"+OK")
            assert dc.try_sasl("xoauth2", "other", tok).startswith(b"-ERR [AUTH]")
            assert dc.try_sasl("xoauth2", "ou", "mail-at-bogus").startswith(b"-ERR [AUTH]")
            assert dc.try_login("ou", "pw-ou") and not dc.try_login("ou", tok)
            short, _ = ds.issue_mail_token("ou", ttl=1)
            time.sleep(1.1)
            assert dc.try_sasl("xoauth2", "ou", short).startswith(b"-ERR [AUTH]")
    if shutil.which("dovecot") or os.path.exists("/usr/sbin/dovecot"):
        check("Dovecot oauth2 passdb: XOAUTH2/OAUTHBEARER via the fake introspection",
              dovecot_oauth2)


if __name__ == "__main__":
    sys.exit(main())
