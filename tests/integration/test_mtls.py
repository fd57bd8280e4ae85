"""The control plane over HTTPS: x.509 (mTLS) service keys, --service-ca,
and trust stores the Destination service returns with a destination.

* the token endpoint (``certurl``) serves HTTPS with a test CA and requires a
  client certificate signed by the client CA; it issues a token only to the
  certificate registered for the service key's client id (no secret);
* the Destination service serves HTTPS with the same server CA;
* tpmaild trusts that CA only through ``--service-ca`` / ``service_ca:``;
* a destination whose ``TrustStoreLocation`` names a certificate of the
  find-destination reply verifies the mail server with it (POP3S, real
  Dovecot).

Certificates are made at test time with the openssl command line.
"""

import json
import os
import re
import ssl

import pytest

import tpmail_harness as th
from tpmail_harness import Pop3, Pop3Closed, list_lines, multiline_body
from fakes import PROVIDER
from fakes.destination_service import DestinationService
from fakes.pki import Pki, fingerprint, read
from fakes.world import write_secret_dir
from fakes.xsuaa import TokenService

INSTANCE = "dest-x509"
CERT_DOMAIN = "authentication.cert.test"   # SAP's certurl: a separate host
POLL = 1
R_TRUSTSTORE = "ConfigurationError-ReferencedDestination-TrustStoreInvalid"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return Pki(tmp_path_factory.mktemp("pki"), server_dns=("*." + CERT_DOMAIN,))


@pytest.fixture(scope="module")
def services(pki):
    """(token service requiring client certificates, Destination service),
    both HTTPS with the server CA."""
    ts = TokenService(domain=CERT_DOMAIN, tls=pki.server_context(client_ca=pki.client_ca),
                      name="xsuaa-cert").start()
    ds = DestinationService(ts, name=INSTANCE, tls=pki.server_context()).start()
    yield ts, ds
    ds.close()
    ts.close()


@pytest.fixture
def fakes(services, dovecot, mailboxes):
    ts, ds = services
    with ds.lock:
        ds.destinations.clear()
        ds.certificates.clear()
        ds.requests.clear()
    with ts.lock:
        ts.requests.clear()
        ts.cert_clients.clear()
    del ts.server.tls_errors[:]
    ds.put(PROVIDER, th.provider_dest(dovecot, "dest-a", "alice"))
    return ts, ds


def write_key(workdir, ts, ds, cert, key):
    """The x.509 service key of INSTANCE, laid out as a mounted Secret."""
    d = os.path.join(str(workdir), "keys")
    write_secret_dir(d, {INSTANCE: json.dumps({
        "clientid": ds.client_id, "certificate": read(cert), "key": read(key),
        "certurl": ts.url(), "url": "https://prov-subaccount.authentication.test:1",
        "uri": ds.url(), "credential-type": "x509", "identityzone": "prov-subaccount",
        "uaadomain": CERT_DOMAIN, "tenantmode": "dedicated"}, indent=2)})
    return d


@pytest.fixture
def start(tpmaild_factory, fakes, pki, tmp_path):
    """start(crs, expect, key=(cert, key) or None, args=(), service_ca=True)."""
    ts, ds = fakes

    def go(crs, expect, key=None, args=(), service_ca=True):
        if key is None:
            key = pki.client_cert(ds.client_id)
            ts.add_cert_client(ds.client_id, key[0])
        keys = write_key(tmp_path, ts, ds, *key)
        a = ["--service-keys", keys, "--default-instance", INSTANCE,
             "--poll-interval", str(POLL)]
        for r in ts.resolve_args():
            a += ["--resolve", r]
        if service_ca:
            a += ["--service-ca", pki.server_ca]
        t = tpmaild_factory(crs=crs, destinations={}, expect=expect, args=a + list(args))
        t.service_key = read(key[1])
        return t
    return go


def session_ok(port, box):
    with Pop3(port) as p:
        assert p.greeting.startswith(b"+OK"), p.greeting
        st, raw = p.cmd_multi("LIST")
        assert st.startswith(b"+OK") and raw == list_lines(box), (st, raw)
        st, raw = p.cmd_multi("RETR 1")
        assert st.startswith(b"+OK") and multiline_body(raw) == box[0], st
        assert p.cmd("QUIT").startswith(b"+OK")


def key_body(pem):
    """The base64 lines of a PEM private key (what would leak)."""
    lines = [x for x in pem.splitlines() if x and not x.startswith("-----")]
    assert lines
    return lines


def assert_key_nowhere(t, pem):
    """Not in tpmaild's or its proxies' argv and environment, not in the
    log, not in any file under tpmaild's work and state directories."""
    body = key_body(pem)
    pids = [t.pid] + [s["pid"] for s in t.status()["services"] if s.get("pid")]
    for pid in pids:
        for what in ("cmdline", "environ"):
            with open("/proc/%d/%s" % (pid, what), "rb") as f:
                data = f.read().decode(errors="replace")
            assert not [b for b in body if b in data], "the service key's private key " \
                "in /proc/%d/%s" % (pid, what)
    log = t.log_text()
    assert not [b for b in body if b in log], "the private key in the tpmaild log"
    assert "PRIVATE KEY" not in log
    for top in (t.workdir, t.state_dir):
        for root, _, files in os.walk(top):
            for f in files:
                p = os.path.join(root, f)
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                with open(p, "rb") as fh:
                    data = fh.read().decode(errors="replace")
                assert not [b for b in body if b in data], "the private key in %s" % p


def rejection(t, cr, pred, what):
    rs = t.wait_rejected(cr, timeout=20, pred=pred)
    return [r for r in rs if pred(r)][0]


# --------------------------------------------------------------------------
# x.509 service keys

def test_x509_service_key_reaches_the_tenant(start, fakes, mailboxes):
    ts, ds = fakes
    t = start({"m.yaml": th.cr("mail-x509", "dest-a")}, ["mail-x509"])
    session_ok(t.port("mail-x509"), mailboxes["alice"])

    reqs = ts.token_requests(PROVIDER)
    assert reqs, ts.requests
    want = ts.cert_clients[ds.client_id]
    for r in reqs:
        # certurl's host, the certificate as the credential, no secret
        assert r["host"].split(":")[0] == "prov-subaccount." + CERT_DOMAIN, r
        assert r["client_cert"] == want, r
        assert r["form"].get("client_id") == ds.client_id, r
        assert r["form"].get("grant_type") == "client_credentials", r
        assert not r["secret_sent"] and r["basic_user"] is None, r
    assert ds.find_requests(tenant=PROVIDER, name="dest-a", status=200)
    assert not ts.tls_errors, ts.tls_errors
    assert_key_nowhere(t, t.service_key)


def test_x509_shared_cr_uses_the_tenants_certurl(start, fakes, dovecot, mailboxes):
    """A shared CR's tenant gets its token from certurl with the first host
    label replaced, over the same client certificate."""
    ts, ds = fakes
    ts.add_tenant("tenant-a")
    ds.put("tenant-a", th.pop3_dest("dest-t", "tenant-a-user", dovecot.users["tenant-a-user"],
                                    dovecot.pop3_port))
    t = start({"s.yaml": th.cr("shared", "dest-t", tenants=["tenant-a"])}, ["shared-tenant-a"])
    session_ok(t.port("shared-tenant-a"), mailboxes["tenant-a-user"])
    hosts = {r["host"].split(":")[0] for r in ts.token_requests("tenant-a")}
    assert hosts == {"tenant-a." + CERT_DOMAIN}, hosts


def test_client_certificate_of_another_ca_is_refused(start, fakes, pki):
    ts, ds = fakes
    bad = pki.client_cert(ds.client_id, ca="other")
    ts.add_cert_client(ds.client_id, bad[0])   # even registered: the CA is not trusted
    t = start({"m.yaml": th.cr("mail-x509", "dest-a")}, [], key=bad)
    r = rejection(t, "mail-x509", lambda r: "token" in r["error"], "a token failure")
    assert r["reason"] == "ConfigurationFailed", r
    assert "token endpoint" in r["error"], r
    assert ts.tls_errors, "the fake saw no failed handshake"
    assert not ts.token_requests(ok=True), ts.requests
    assert not ds.requests, ds.requests
    assert_key_nowhere(t, t.service_key)


def test_client_certificate_of_another_client_is_refused(start, fakes, pki):
    """Signed by the right CA, but not the certificate of this client."""
    ts, ds = fakes
    registered = pki.client_cert(ds.client_id)
    ts.add_cert_client(ds.client_id, registered[0])
    other = pki.client_cert("someone-else")
    t = start({"m.yaml": th.cr("mail-x509", "dest-a")}, [], key=other)
    r = rejection(t, "mail-x509", lambda r: "401" in r["error"], "HTTP 401")
    assert "token endpoint answered HTTP 401" in r["error"], r
    recs = ts.requests
    assert recs and all(x["status"] == 401 and x["client_cert"] == fingerprint(other[0])
                        for x in recs), recs
    assert_key_nowhere(t, t.service_key)


# --------------------------------------------------------------------------
# --service-ca and service_ca:

def test_without_service_ca_the_control_plane_is_not_trusted(start, fakes):
    ts, ds = fakes
    t = start({"m.yaml": th.cr("mail-x509", "dest-a")}, [], service_ca=False)
    r = rejection(t, "mail-x509", lambda r: "token" in r["error"], "a token failure")
    assert re.search(r"certificate|SSL", r["error"]), r
    assert not ts.token_requests(ok=True)


def test_service_ca_from_the_config_file_and_flags_win(start, fakes, pki, tmp_path, mailboxes):
    conf = tmp_path / "tpmaild.yaml"
    conf.write_text("service_ca: %s\n" % pki.server_ca)
    t = start({"m.yaml": th.cr("mail-x509", "dest-a")}, ["mail-x509"],
              args=["--config", str(conf)], service_ca=False)
    session_ok(t.port("mail-x509"), mailboxes["alice"])

    # the config names a CA that did not sign the servers; the flag wins
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("service_ca: %s\n" % pki.other_ca)
    t2 = start({"m.yaml": th.cr("mail-x509", "dest-a")}, ["mail-x509"],
               args=["--config", str(wrong), "--service-ca", pki.server_ca], service_ca=False)
    session_ok(t2.port("mail-x509"), mailboxes["alice"])


def test_service_ca_that_does_not_exist_stops_tpmaild(bins, tmp_path):
    t = th.Tpmaild(tmp_path / "t", args=["--service-ca", str(tmp_path / "missing.pem")],
                   bins=bins)
    t.start()
    try:
        rc = t.proc.wait(15)
    finally:
        t.kill_everything()
    assert rc != 0
    assert "--service-ca" in t.log_text() and "missing.pem" in t.log_text(), t.log_text()


# --------------------------------------------------------------------------
# the destination's trust store (find-destination "certificates")

def pop3s_dest(dc, name, **props):
    d = th.pop3_dest(name, "alice", dc.users["alice"], dc.pop3s_port, protocol="pop3s")
    d.update(props)
    return d


def greeting(port):
    try:
        with Pop3(port) as p:
            return p.greeting
    except Pop3Closed:
        return b""


def test_trust_store_from_the_destination_service(start, fakes, dovecot, mailboxes):
    ts, ds = fakes
    pem = read(dovecot.ca_file).encode()
    der = ssl.PEM_cert_to_DER_cert(pem.decode())
    ds.put_certificate(PROVIDER, "dovecot-ca.pem", pem)
    ds.put_certificate(PROVIDER, "dovecot-ca.der", der)
    ds.put(PROVIDER, pop3s_dest(dovecot, "d-pem", TrustStoreLocation="dovecot-ca.pem"))
    ds.put(PROVIDER, pop3s_dest(dovecot, "d-der", TrustStoreLocation="dovecot-ca.der"))
    ds.put(PROVIDER, pop3s_dest(dovecot, "d-none"))
    ds.put(PROVIDER, pop3s_dest(dovecot, "d-missing", TrustStoreLocation="absent.pem"))
    ds.put(PROVIDER, pop3s_dest(dovecot, "d-jks", TrustStoreLocation="store.jks"))
    crs = {"c.yaml": [th.cr("m-pem", "d-pem"), th.cr("m-der", "d-der"),
                      th.cr("m-none", "d-none"), th.cr("m-missing", "d-missing"),
                      th.cr("m-jks", "d-jks")]}
    t = start(crs, ["m-pem", "m-der", "m-none"])

    # the certificate verifies Dovecot (chain and host name)
    session_ok(t.port("m-pem"), mailboxes["alice"])
    session_ok(t.port("m-der"), mailboxes["alice"])
    found = [r for r in ds.find_requests(name="d-pem", status=200)]
    assert found

    # written once per content, 0600, in the state dir, as a PEM
    trust = os.path.join(t.state_dir, "trust")
    files = sorted(os.listdir(trust))
    assert len(files) == 1, files            # PEM and DER: the same certificate
    st = os.stat(os.path.join(trust, files[0]))
    assert st.st_mode & 0o777 == 0o600, oct(st.st_mode)
    with open(os.path.join(trust, files[0])) as f:
        assert ssl.PEM_cert_to_DER_cert(f.read()) == der

    # without it the system's store is used, which does not know the test CA
    g = greeting(t.port("m-none"))
    assert g.startswith(b"-ERR [SYS/TEMP]"), g
    svc = th.wait_for(lambda: (t.services()["m-none"].get("error") or None), 10,
                      interval=0.2, what="m-none's error in status")
    assert re.search(r"certificate verify failed|verif", svc, re.I), svc

    # a name the reply does not carry, a key store type
    for cr, words in (("m-missing", "absent.pem"), ("m-jks", "store.jks")):
        r = rejection(t, cr, lambda r: r["reason"] == R_TRUSTSTORE, R_TRUSTSTORE)
        assert words in r["error"], r


def test_trust_store_change_reaches_the_running_proxy(start, fakes, dovecot, mailboxes):
    """A certificate that stops matching is a new configuration: the old
    file goes, new sessions fail verification, the proxy keeps running."""
    ts, ds = fakes
    ds.put_certificate(PROVIDER, "ca.pem", read(dovecot.ca_file).encode())
    ds.put(PROVIDER, pop3s_dest(dovecot, "d-pem", TrustStoreLocation="ca.pem"))
    t = start({"c.yaml": th.cr("m-pem", "d-pem")}, ["m-pem"])
    port = t.port("m-pem")
    pid = t.services()["m-pem"]["pid"]
    session_ok(port, mailboxes["alice"])
    trust = os.path.join(t.state_dir, "trust")
    before = os.listdir(trust)

    ds.put_certificate(PROVIDER, "ca.pem", read(dovecot.wrong_ca_file).encode())
    th.wait_for(lambda: os.listdir(trust) != before and len(os.listdir(trust)) == 1, 15,
                interval=0.2, what="the new trust store to replace the old one")
    th.wait_for(lambda: greeting(port).startswith(b"-ERR [SYS/TEMP]"), 10, interval=0.3,
                what="sessions to fail verification with the wrong CA")
    assert t.services()["m-pem"]["pid"] == pid
