"""Real destinations: tpmaild reading MAIL destinations from (fake) SAP BTP
services instead of a file.

* the Destination service (``fakes.destination_service``), with OAuth2
  client-credentials tokens per tenant from a fake XSUAA that tells tenants
  apart by the Host header (``--resolve`` sends ``tenant-a.auth.test`` to
  127.0.0.1);
* OnPremise destinations through a fake Connectivity Proxy (SOCKS5 with
  SAP's method 0x80, ``fakes.socks5``) in front of the same Dovecot;
* OAuth2 destinations against a Dovecot whose oauth2 passdb checks tokens at
  the fake's introspection endpoint.

One Dovecot and one set of fakes per module; the fakes are reset and the
mailboxes re-seeded for every test, and every test runs its own tpmaild
(``--poll-interval 1``).  Needs root (the memory scan reads other processes'
memory).
"""

import base64
import os
import re
import secrets
import time

import pytest

import tpmail_harness as th
from tpmail_harness import (Pop3, Pop3Closed, list_lines, multiline_body, wait_for,
                            RELOAD_TIMEOUT)
from dovecot import Dovecot, big_message, small_message, dotted_message
from fakes import FakeBtp, PROVIDER

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (Dovecot, /proc/<pid>/mem)")

TENANTS = ["tenant-a", "tenant-b"]
POLL = 1
VHOST = "mail.onprem.test"            # the Cloud Connector's virtual host
LOCATION = "loc-1"                     # the only location id the fake knows
INSTANCE_B = "inst-b"                  # a second Destination service instance

# Dovecot users; passwords are fresh per run so that a memory or log scan
# cannot find them by accident.
_RUN = secrets.token_hex(6)
USERS = {
    "tenant-a": ("dest-ta", "pw-tenant-a-" + _RUN),
    "tenant-b": ("dest-tb", "pw-tenant-b-" + _RUN),
    "prov": ("dest-prov", "pw-prov-" + _RUN),
    "onprem": ("dest-onprem", "pw-onprem-" + _RUN),
    "cc": ("dest-cc", "pw-cc-unused-" + _RUN),
    "rt": ("dest-rt", "pw-rt-unused-" + _RUN),
    "code": ("dest-code", "pw-code-unused-" + _RUN),
}
REFRESH_TOKEN = "rt-" + secrets.token_hex(16)

# Waits.  A Destination service request times out after tpmaild's HTTP
# timeout; failed polls back off, so recovery may take a few periods.
FAIL_SHOW_TIMEOUT = 15
HANG_SHOW_TIMEOUT = 30
RECOVER_TIMEOUT = 40
UPDATE_TIMEOUT = RELOAD_TIMEOUT + 3 * POLL


def user(key):
    return USERS[key][0]


def password(key):
    return USERS[key][1]


def mailboxes():
    return {
        "tenant-a": [small_message(1, "tenant-a"), dotted_message("tenant-a")],
        "tenant-b": [small_message(1, "tenant-b"), small_message(2, "tenant-b"),
                     small_message(3, "tenant-b")],
        "prov": [small_message(1, "prov")],
        "onprem": [small_message(1, "onprem"), dotted_message("onprem")],
        "cc": [small_message(1, "cc")],
        "rt": [small_message(1, "rt"), small_message(2, "rt")],
        "code": [small_message(1, "code")],
    }


# --------------------------------------------------------------------------
# the world: fakes + Dovecot (module), reset per test

@pytest.fixture(scope="module")
def btp(tmp_path_factory):
    world = FakeBtp(tmp_path_factory.mktemp("btp"), tenants=TENANTS,
                    instances=("dest-instance", INSTANCE_B), locations={"*": {LOCATION}},
                    hang_max=25)
    world.start()
    yield world
    world.close()


@pytest.fixture(scope="module")
def dovecot(btp):
    """This module's Dovecot (overrides conftest's): OAuth2 via the fake's
    introspection endpoint, and a certificate for the virtual host too."""
    dc = Dovecot(users={u: p for u, p in USERS.values()},
                 oauth2_introspection_url=btp.dest.introspection_url, extra_dns=(VHOST,))
    btp.socks.add_route(VHOST, 110, dc.host, dc.pop3_port)
    btp.socks.add_route(VHOST, 995, dc.host, dc.pop3s_port)
    yield dc
    dc.close()


def dest(name, key, dc, host=None, port=None, protocol="pop3", auth="BasicAuthentication",
         **props):
    d = th.pop3_dest(name, user(key), password(key), port or dc.pop3_port,
                     host=host or dc.host, protocol=protocol, **props)
    d["Authentication"] = auth
    if auth != "BasicAuthentication":
        del d["mail.password"]
    return d


def onprem(name, dc, location=LOCATION, host=VHOST, port=110, protocol="pop3", **props):
    d = dest(name, "onprem", dc, host=host, port=port, protocol=protocol, **props)
    d["ProxyType"] = "OnPremise"
    if location is not None:
        d["CloudConnectorLocationId"] = location
    return d


def standard_destinations(dc):
    return {
        "tenant-a": [dest("dest-t", "tenant-a", dc)],
        "tenant-b": [dest("dest-t", "tenant-b", dc)],
        PROVIDER: [
            onprem("op-plain", dc),
            onprem("op-stls", dc, starttls_enable="true", starttls_required="true",
                   ssl_cafile=dc.ca_file),
            onprem("op-pop3s", dc, port=995, protocol="pop3s", ssl_cafile=dc.ca_file),
            onprem("op-badloc", dc, location="loc-unknown"),
            onprem("op-nohost", dc, host="unknown.onprem.test"),
            dest("dest-cc", "cc", dc, auth="OAuth2ClientCredentials"),
            dest("dest-rt", "rt", dc, auth="OAuth2RefreshToken"),
            dest("dest-code", "code", dc, auth="OAuth2AuthorizationCode"),
        ],
    }


@pytest.fixture
def world(btp, dovecot):
    """Fakes healthy and holding the standard destinations, passwords back to
    their defaults, mailboxes seeded; returns the mailboxes."""
    for ds in btp.instances.values():
        ds.set_fail(None)
        with ds.lock:
            ds.destinations.clear()
            ds.instance_destinations.clear()
            ds.fragments.clear()
            ds.requests.clear()
            ds.introspections.clear()
        ds.mail_token_ttl = 3600
    for ts in (btp.xsuaa, btp.conn_xsuaa):
        ts.expires_in = 3600
        ts.fail = None
        with ts.lock:
            ts.requests.clear()
    btp.socks.accept_tokens = True
    btp.socks.reply_atyp = "ipv4"
    btp.socks.locations = {"*": {LOCATION}}
    with btp.socks.lock:
        btp.socks.connections.clear()
    for u, pw in USERS.values():
        if dovecot.users.get(u) != pw:
            dovecot.add_user(u, pw)
    for tenant, arr in standard_destinations(dovecot).items():
        for d in arr:
            btp.dest.put(tenant, d)
    btp.dest.add_refresh_token(REFRESH_TOKEN, user("rt"))
    boxes = mailboxes()
    for key, msgs in boxes.items():
        dovecot.seed(user(key), msgs)
    yield boxes
    for ds in btp.instances.values():
        ds.set_fail(None)           # let any hanging request go


@pytest.fixture
def start(tpmaild_factory, btp, world):
    """start(crs, expect, args=(), connectivity=True) -> Tpmaild reading
    destinations from the fakes (its destinations file is empty)."""
    def go(crs, expect, args=(), connectivity=True):
        return tpmaild_factory(crs=crs, destinations={}, expect=expect,
                               args=btp.tpmaild_args(POLL, connectivity) + list(args))
    return go


def shared_cr():
    return {"shared.yaml": th.cr("shared", "dest-t", tenants=TENANTS)}


SHARED = ["shared-" + t for t in TENANTS]


# --------------------------------------------------------------------------
# helpers

def session_ok(port, box, retr=1):
    """A whole session: greeting, LIST and RETR as Dovecot has them, QUIT."""
    with Pop3(port) as p:
        assert p.greeting.startswith(b"+OK"), p.greeting
        st, raw = p.cmd_multi("LIST")
        assert st.startswith(b"+OK") and raw == list_lines(box), (st, raw)
        if retr:
            st, raw = p.cmd_multi("RETR %d" % retr)
            assert st.startswith(b"+OK") and multiline_body(raw) == box[retr - 1], st
        assert p.cmd("QUIT").startswith(b"+OK")


def greeting(port):
    """The first line a new session gets (b"" if closed without one)."""
    try:
        with Pop3(port) as p:
            return p.greeting
    except Pop3Closed:
        return b""


def xoauth2(u, token):
    return base64.b64encode(("user=%s\x01auth=Bearer %s\x01\x01" % (u, token)).encode())


def services_of(st, cr):
    return {s["name"]: s for s in st["services"] if s["cr"] == cr}


def failure_in_status(st, cr, baseline):
    """What the status shows about a failing CR: its rejection, or errors
    of its services that were not there at ``baseline`` ({name: error})."""
    rej = [r for r in st["rejected"] if r["cr"] == cr]
    if rej:
        return {"rejected": rej}
    errs = {n: s["error"] for n, s in services_of(st, cr).items()
            if s.get("error") and s.get("error") != baseline.get(n)}
    return {"errors": errs} if errs else None


# memory of a live process, read as root through /proc/<pid>/mem.  Mappings
# larger than MAX_REGION are sanitizer shadow (reserved, never data).
MAX_REGION = 1 << 30
CHUNK = 1 << 20


def scan_memory(pid, needles):
    """{needle: hits} over every readable mapping of ``pid``."""
    hits = {n: 0 for n in needles}
    overlap = max(len(n) for n in needles) - 1
    regions = []
    with open("/proc/%d/maps" % pid) as f:
        for line in f:
            addr, perms = line.split()[:2]
            lo, hi = (int(x, 16) for x in addr.split("-"))
            if "r" in perms and hi - lo <= MAX_REGION:
                regions.append((lo, hi))
    total = 0
    with open("/proc/%d/mem" % pid, "rb", buffering=0) as mem:
        for lo, hi in regions:
            pos, tail = lo, b""
            while pos < hi:
                try:
                    mem.seek(pos)
                    data = mem.read(min(CHUNK, hi - pos))
                except OSError:
                    break
                if not data:
                    break
                total += len(data)
                buf = tail + data
                for n in needles:
                    hits[n] += buf.count(n)
                tail = buf[-overlap:]
                pos += len(data)
    assert total > 0, "nothing readable in /proc/%d/mem" % pid
    return hits


def assert_not_logged(t, secrets_, what):
    log = t.log_text()
    leaked = [s for s in secrets_ if s and s in log]
    assert not leaked, "%s in the tpmaild log: %r" % (what, [s[:12] + "..." for s in leaked])


def log_since(t, offset):
    return t.log_text()[offset:]


def dovecot_logins(dovecot_log, u):
    return re.findall(r"Login: user=<%s>, method=(\w+)" % re.escape(u), dovecot_log())


# --------------------------------------------------------------------------
# 1. shared CR: tenants resolved through the Destination service

def test_shared_cr_tenants_resolved_through_destination_service(start, btp, world):
    t = start(shared_cr(), SHARED)
    for tenant in TENANTS:
        session_ok(t.port("shared-" + tenant), world[tenant], retr=len(world[tenant]))

    # tokens per tenant from the tenant's own token host, lookups per tenant
    for tenant in TENANTS:
        reqs = btp.xsuaa.token_requests(tenant)
        assert reqs, "no token request for %s: %r" % (tenant, btp.xsuaa.requests)
        for r in reqs:
            assert r["host"].split(":")[0] == "%s.auth.test" % tenant, r
            assert r["basic_user"] == btp.dest.client_id, r
            assert r["form"].get("grant_type") == "client_credentials", r
            assert r["form"].get("client_id") == btp.dest.client_id, r
        ok = btp.dest.find_requests(tenant=tenant, name="dest-t", status=200)
        assert ok, btp.dest.requests
    assert not btp.dest.find_requests(status=401), btp.dest.find_requests(status=401)

    # each proxy holds its own tenant's password and not the other's
    svcs = t.services()
    pw = {tn: password(tn).encode() for tn in TENANTS}
    for tenant in TENANTS:
        other = [x for x in TENANTS if x != tenant][0]
        pid = svcs["shared-" + tenant]["pid"]
        hits = scan_memory(pid, [pw[tenant], pw[other]])
        assert hits[pw[other]] == 0, "proxy of %s (pid %d) holds %s's password" % (
            tenant, pid, other)
        assert hits[pw[tenant]] >= 1, "proxy of %s (pid %d) does not hold its password" % (
            tenant, pid)
    assert_not_logged(t, [password(tn) for tn in TENANTS], "a password")
    tokens = [r.get("token") for r in btp.xsuaa.requests]
    assert_not_logged(t, tokens, "a Destination service token")


def test_cr_names_its_destination_service_instance(start, btp, dovecot, world):
    """spec.destinationServiceInstanceName picks the instance (its key file
    is inst-b.json); the default instance does not have that destination."""
    btp.instances[INSTANCE_B].put(PROVIDER, dest("dest-prov", "prov", dovecot))
    c = th.cr("mail-b", "dest-prov")
    c["spec"]["destinationServiceInstanceName"] = INSTANCE_B
    t = start({"b.yaml": c}, ["mail-b"])
    session_ok(t.port("mail-b"), world["prov"])
    assert btp.instances[INSTANCE_B].find_requests(tenant=PROVIDER, name="dest-prov", status=200)
    assert not btp.dest.find_requests(name="dest-prov")
    # dedicated: the provider's token, from the service key's url as is
    hosts = {r["host"].split(":")[0] for r in btp.xsuaa.token_requests(PROVIDER)}
    assert hosts == {"prov-subaccount.auth.test"}, hosts


def test_fragment_merged_by_the_service(start, btp, dovecot, world):
    """spec.fragmentRef reaches the Destination service as X-Fragment-Name
    (and X-Fragment-Optional); the merged destination is served.  A missing
    fragment is SAP's ReferencedFragment-NotFound, unless optional."""
    btp.dest.put(PROVIDER, dest("dest-prov", "prov", dovecot))
    btp.dest.put_fragment(PROVIDER, {"FragmentName": "as-ta", "mail.user": user("tenant-a"),
                                     "mail.password": password("tenant-a")})
    crs = {"f.yaml": [th.cr("frag", "dest-prov"), th.cr("frag-missing", "dest-prov"),
                      th.cr("frag-optional", "dest-prov")]}
    crs["f.yaml"][0]["spec"]["fragmentRef"] = {"name": "as-ta"}
    crs["f.yaml"][1]["spec"]["fragmentRef"] = {"name": "nope"}
    crs["f.yaml"][2]["spec"]["fragmentRef"] = {"name": "nope", "optional": True}
    t = start(crs, ["frag", "frag-optional"])
    session_ok(t.port("frag"), world["tenant-a"])
    session_ok(t.port("frag-optional"), world["prov"])
    reqs = btp.dest.find_requests(tenant=PROVIDER, name="dest-prov", status=200)
    assert {(r["x_fragment_name"], r["x_fragment_optional"]) for r in reqs} == \
        {("as-ta", "false"), ("nope", "true")}, reqs
    rs = t.wait_rejected("frag-missing")
    assert rs[0]["reason"] == "ConfigurationError-ReferencedFragment-NotFound", rs
    assert "nope" in rs[0]["error"], rs


def test_destination_level_reads_that_level_only(start, btp, dovecot, world):
    """spec.destinationRef.level uses the Consume API (name@level): that
    level and no other.  Without it, the instance level comes first."""
    btp.dest.put(PROVIDER, dest("dest-lv", "prov", dovecot), level="instance")
    btp.dest.put(PROVIDER, dest("dest-lv", "tenant-b", dovecot), level="subaccount")
    btp.dest.put(PROVIDER, dest("dest-sub-only", "tenant-a", dovecot))
    crs = {"l.yaml": [th.cr("lv-any", "dest-lv"), th.cr("lv-sub", "dest-lv"),
                      th.cr("lv-inst", "dest-lv"), th.cr("lv-inst-missing", "dest-sub-only")]}
    for c, level in zip(crs["l.yaml"], [None, "subaccount", "instance", "instance"]):
        if level:
            c["spec"]["destinationRef"]["level"] = level
    t = start(crs, ["lv-any", "lv-sub", "lv-inst"])
    session_ok(t.port("lv-any"), world["prov"])
    session_ok(t.port("lv-sub"), world["tenant-b"])
    session_ok(t.port("lv-inst"), world["prov"])
    levels = {r["level"] for r in btp.dest.find_requests(tenant=PROVIDER, name="dest-lv",
                                                          status=200)}
    assert levels == {None, "subaccount", "instance"}, levels
    rs = t.wait_rejected("lv-inst-missing")
    assert rs[0]["reason"] == "ConfigurationError-ReferencedDestination-NotFound", rs


# --------------------------------------------------------------------------
# 2. rotation

def test_password_rotation_reaches_running_proxy(start, btp, dovecot, world):
    big = big_message(4 * 1024 * 1024, tag="tenant-a")
    box = world["tenant-a"] + [big]
    dovecot.seed(user("tenant-a"), box)
    t = start(shared_cr(), SHARED)
    port = t.port("shared-tenant-a")
    before = t.services()["shared-tenant-a"]

    # a session in the middle of a multi-MB RETR
    old = Pop3(port)
    try:
        assert old.greeting.startswith(b"+OK"), old.greeting
        old.send(b"RETR %d\r\n" % len(box))
        st = old.readline()
        assert st.startswith(b"+OK"), st
        while len(old.buf) < 256 * 1024:
            old._fill()

        new_pw = "pw-tenant-a-rotated-" + secrets.token_hex(6)
        dovecot.add_user(user("tenant-a"), new_pw)      # Dovecot takes only the new one
        btp.dest.update("tenant-a", "dest-t", {"mail.password": new_pw})
        wait_for(lambda: greeting(port).startswith(b"+OK"), UPDATE_TIMEOUT, interval=0.3,
                 what="a new session to log in with the rotated password")
        session_ok(port, box, retr=1)

        # the open session finishes undisturbed
        raw = old.read_multiline()
        assert multiline_body(raw) == big, "RETR of the open session differs after the rotation"
        assert old.cmd("QUIT").startswith(b"+OK")
    finally:
        old.close()
    after = t.services()["shared-tenant-a"]
    assert after["pid"] == before["pid"], "the proxy was restarted: %s -> %s" % (
        before["pid"], after["pid"])
    assert after["restarts"] == before["restarts"], (before, after)
    assert after["state"] == "running"
    # tenant-b untouched
    session_ok(t.port("shared-tenant-b"), world["tenant-b"])
    assert_not_logged(t, [new_pw], "the rotated password")


def test_address_change_reaches_running_proxy(start, btp, dovecot, world, dovecot_log):
    if not dovecot.nostls_supported:
        pytest.skip("no second loopback address for Dovecot")
    t = start(shared_cr(), SHARED)
    pid = t.services()["shared-tenant-a"]["pid"]
    btp.dest.update("tenant-a", "dest-t", {"mail.pop3.host": dovecot.nostls_host,
                                           "mail.pop3.port": str(dovecot.nostls_port)})
    lip = re.compile(r"Login: user=<%s>, [^\n]*lip=%s" % (user("tenant-a"),
                                                           re.escape(dovecot.nostls_host)))

    def moved():
        session_ok(t.port("shared-tenant-a"), world["tenant-a"], retr=0)
        return lip.search(dovecot_log())
    wait_for(moved, UPDATE_TIMEOUT, interval=0.3,
             what="sessions to go to the new address %s" % dovecot.nostls_host)
    assert t.services()["shared-tenant-a"]["pid"] == pid


# --------------------------------------------------------------------------
# 3. the Destination service token expires

def test_expiring_service_token_is_refreshed(start, btp, world):
    btp.xsuaa.expires_in = 3
    t = start(shared_cr(), SHARED)
    pids = {n: s["pid"] for n, s in services_of(t.status(), "shared").items()}
    end = time.monotonic() + 8                      # > 2.5 token lifetimes
    n = 0
    while time.monotonic() < end:
        for tenant in TENANTS:
            session_ok(t.port("shared-" + tenant), world[tenant], retr=0)
            n += 1
        time.sleep(0.4)
    st = t.status()
    assert not [r for r in st["rejected"] if r["cr"] == "shared"], st["rejected"]
    for name, s in services_of(st, "shared").items():
        assert s["state"] == "running" and s["pid"] == pids[name], s
        assert not s.get("error"), s
    for tenant in TENANTS:
        toks = btp.xsuaa.token_requests(tenant)
        assert len(toks) >= 3, "%s: %d token requests in 8 s of 3 s tokens" % (tenant, len(toks))
    refused = btp.dest.find_requests(status=401)
    assert not refused, "lookups with an expired token: %r" % [
        (r["tenant"], r["error"]) for r in refused]
    # and the re-polls kept going with fresh tokens until the end
    late = [r for r in btp.dest.find_requests(status=200) if r["time"] > time.time() - 3]
    assert {r["tenant"] for r in late} == set(TENANTS), late


# --------------------------------------------------------------------------
# 4. the Destination service fails

@pytest.mark.parametrize("mode", ["500", "hang", "malformed", "401"])
def test_service_failure_keeps_last_good_configuration(start, btp, dovecot, world, mode):
    t = start(shared_cr(), SHARED)
    st0 = t.status()
    base = {n: s.get("error") for n, s in services_of(st0, "shared").items()}
    pids = {n: s["pid"] for n, s in services_of(st0, "shared").items()}
    since = time.time()
    btp.dest.set_fail(mode)
    if mode == "hang":
        # tpmaild's event loop must not wait for the hanging service
        wait_for(lambda: any(r["status"] == "hang" for r in btp.dest.requests
                             if r["time"] >= since), 3 * POLL + 5, interval=0.1,
                 what="a lookup to hang")
        t1 = time.monotonic()
        t.status()
        assert time.monotonic() - t1 < 2, "tpmailctl status blocked by a hanging lookup"

    # the failure shows in status
    shown = wait_for(lambda: failure_in_status(t.status(), "shared", base),
                     HANG_SHOW_TIMEOUT if mode == "hang" else FAIL_SHOW_TIMEOUT,
                     interval=0.3, what="the %s failure to show in status" % mode)
    failed = [r for r in btp.dest.requests if r["time"] >= since
              and (r["error"] or r["status"] == "hang")]
    assert failed, "status shows %r, but no lookup failed" % (shown,)

    # running tenants keep serving, with the same proxies
    t1 = time.monotonic()
    for tenant in TENANTS:
        session_ok(t.port("shared-" + tenant), world[tenant])
    assert time.monotonic() - t1 < 10, "sessions slow during the outage"
    st = t.status()
    for n, s in services_of(st, "shared").items():
        assert s["pid"] == pids[n] and s["state"] == "running", s

    # healthy again: a change made now reaches the proxy (tenant-b switches
    # to another mailbox; both work, so no session fails meanwhile) ...
    btp.dest.set_fail(None)
    t2 = time.monotonic()
    btp.dest.update("tenant-b", "dest-t", {"mail.user": user("prov"),
                                           "mail.password": password("prov")})

    def switched():
        with Pop3(t.port("shared-tenant-b")) as p:
            assert p.greeting.startswith(b"+OK"), p.greeting
            return p.cmd_multi("LIST")[1] == list_lines(world["prov"])
    wait_for(switched, RECOVER_TIMEOUT, interval=0.5,
             what="a change made after the recovery to reach tenant-b's proxy")
    took = time.monotonic() - t2
    session_ok(t.port("shared-tenant-a"), world["tenant-a"])

    # ... without a rejection left behind.  (A service's "error" is its last
    # error by design, so it keeps naming the outage; not checked here.)
    st = t.status()
    assert not [r for r in st["rejected"] if r["cr"] == "shared"], (took, st["rejected"])
    for n, s in services_of(t.status(), "shared").items():
        assert s["pid"] == pids[n], s


# --------------------------------------------------------------------------
# 5. OnPremise through the connectivity proxy

ONPREM = {"op-plain": "onprem-plain", "op-stls": "onprem-stls", "op-pop3s": "onprem-pop3s"}


def socks_record(btp, port_virtual, since, **match):
    recs = [r for r in btp.socks.records(**match) if r["time"] >= since and r["port"] ==
            port_virtual]
    assert recs, "no SOCKS connection to %s:%d: %r" % (VHOST, port_virtual, btp.socks.connections)
    return recs[-1]


def test_onpremise_plain_stls_pop3s_through_socks5(start, btp, world):
    crs = {"op.yaml": [th.cr(cr, d) for d, cr in ONPREM.items()]}
    t = start(crs, list(ONPREM.values()))
    checks = {"onprem-plain": (110, lambda up: up[:1] != b"\x16" and b"STLS" not in up),
              "onprem-stls": (110, lambda up: up.find(b"STLS\r\n") >= 0
                              and b"PASS" not in up and b"AUTH" not in up),
              "onprem-pop3s": (995, lambda up: up[:1] == b"\x16")}
    for svc, (vport, looks_right) in checks.items():
        since = time.time()
        session_ok(t.port(svc), world["onprem"], retr=2)
        r = socks_record(btp, vport, since)
        assert r["greeting"] == b"\x05\x01\x80", r["greeting"]
        assert r["auth_version"] == 1 and r["location_raw"] == base64.b64encode(LOCATION.encode()), r
        assert r["atyp"] == 3 and r["host"] == VHOST and r["cmd"] == 1, r
        assert r["rep"] == 0 and r["tenant"] == PROVIDER, r
        assert btp.conn_xsuaa.lookup(r["token"]) is not None, "not a live connectivity token"
        assert looks_right(r["head_up"]), "%s: first bytes to the mail server: %r" % (
            svc, r["head_up"][:80])
    # the connectivity token: the provider's, with the connectivity key's client
    reqs = btp.conn_xsuaa.token_requests(PROVIDER)
    assert reqs and all(r["basic_user"] == btp.conn_client_id for r in reqs), reqs
    assert not btp.conn_xsuaa.token_requests("tenant-a")
    assert_not_logged(t, [r.get("token") for r in btp.conn_xsuaa.requests], "a connectivity token")


def test_onpremise_shared_tenant_uses_its_own_connectivity_token(start, btp, dovecot, world):
    for tenant in TENANTS:
        btp.dest.put(tenant, onprem("op-t", dovecot))
    t = start({"s.yaml": th.cr("sop", "op-t", tenants=TENANTS)}, ["sop-" + x for x in TENANTS])
    for tenant in TENANTS:
        since = time.time()
        session_ok(t.port("sop-" + tenant), world["onprem"], retr=0)
        r = socks_record(btp, 110, since)
        assert r["tenant"] == tenant and r["rep"] == 0, r
        hosts = {x["host"].split(":")[0] for x in btp.conn_xsuaa.token_requests(tenant)}
        assert hosts == {"%s.conn.test" % tenant}, hosts


REFUSALS = {
    # REP: (words the client's -ERR names the failure with)
    3: ("location", "network unreachable"),
    4: ("host unreachable", "backend"),
    5: ("token", "authentication", "refused"),
}


def assert_refused(t, btp, svc, rep, vport=110):
    off = len(t.log_text())
    since = time.time()
    g = greeting(t.port(svc))
    assert g.startswith(b"-ERR [SYS/TEMP]"), "%s: %r" % (svc, g)
    low = g.decode(errors="replace").lower()
    assert any(w in low for w in REFUSALS[rep]), \
        "REP %d: the client's -ERR does not name the failure: %r" % (rep, g)
    r = socks_record(btp, vport, since)
    assert r["rep"] == rep, r

    def logged():
        pat = re.compile(r"(socks|connectivity)[^\n]*\b(rep|reply)[^\n]*?\b0?%d\b" % rep, re.I)
        return pat.search(log_since(t, off))
    wait_for(logged, 5, interval=0.2, what="a log line naming SOCKS reply code %d" % rep)


def test_onpremise_refusals_reach_the_client(start, btp, world):
    crs = {"op.yaml": [th.cr("onprem-plain", "op-plain"), th.cr("onprem-badloc", "op-badloc"),
                       th.cr("onprem-nohost", "op-nohost")]}
    t = start(crs, ["onprem-plain", "onprem-badloc", "onprem-nohost"])
    assert_refused(t, btp, "onprem-badloc", 3)
    assert btp.socks.records(rep=3)[-1]["location"] == "loc-unknown"
    assert_refused(t, btp, "onprem-nohost", 4)
    btp.socks.accept_tokens = False
    try:
        assert_refused(t, btp, "onprem-plain", 5)
    finally:
        btp.socks.accept_tokens = True
    session_ok(t.port("onprem-plain"), world["onprem"], retr=0)


def test_onpremise_connectivity_token_is_refreshed(start, btp, world):
    """A connectivity token that expires (3 s) is replaced before the SOCKS
    server would refuse it (REP 05)."""
    btp.conn_xsuaa.expires_in = 3
    t = start({"op.yaml": th.cr("onprem-plain", "op-plain")}, ["onprem-plain"])
    pid = t.services()["onprem-plain"]["pid"]
    end = time.monotonic() + 7
    while time.monotonic() < end:
        session_ok(t.port("onprem-plain"), world["onprem"], retr=0)
        time.sleep(0.4)
    assert [r["rep"] for r in btp.socks.connections if r["rep"]] == []
    assert len({r["token"] for r in btp.socks.connections}) >= 2, "one token used past its expiry"
    assert t.services()["onprem-plain"]["pid"] == pid


def test_onpremise_socks_reply_with_domain_address(start, btp, world):
    """A CONNECT reply whose BND address is a domain (ATYP 03) is skipped by
    its length: the POP3 greeting after it arrives intact."""
    btp.socks.reply_atyp = "domain"
    t = start({"op.yaml": th.cr("onprem-plain", "op-plain")}, ["onprem-plain"])
    session_ok(t.port("onprem-plain"), world["onprem"])


def test_onpremise_ipv4_literal_host(start, btp, dovecot, world):
    """A virtual host that is an IPv4 literal goes as ATYP 01 (4 bytes)."""
    btp.socks.add_route("10.0.0.7", 110, dovecot.host, dovecot.pop3_port)
    btp.dest.put(PROVIDER, onprem("op-ip", dovecot, host="10.0.0.7"))
    t = start({"op.yaml": th.cr("onprem-ip", "op-ip")}, ["onprem-ip"])
    since = time.time()
    session_ok(t.port("onprem-ip"), world["onprem"], retr=0)
    r = socks_record(btp, 110, since)
    assert r["atyp"] == 1 and r["host"] == "10.0.0.7" and r["rep"] == 0, r


def test_onpremise_without_location_id(start, btp, dovecot, world):
    """No CloudConnectorLocationId: the location field is empty (length 0)."""
    btp.dest.put(PROVIDER, onprem("op-noloc", dovecot, location=None))
    btp.socks.locations = {"*": {""}}
    t = start({"op.yaml": th.cr("onprem-noloc", "op-noloc")}, ["onprem-noloc"])
    since = time.time()
    session_ok(t.port("onprem-noloc"), world["onprem"], retr=0)
    r = socks_record(btp, 110, since)
    assert r["location_raw"] == b"" and r["rep"] == 0, r


def test_onpremise_without_connectivity_proxy_is_rejected(start, btp, world):
    t = start({"op.yaml": [th.cr("onprem-plain", "op-plain"), th.cr("mail", "dest-cc")]},
              ["mail"], connectivity=False)
    rs = t.wait_rejected("onprem-plain")
    assert rs[0]["reason"] == "ConfigurationError-ReferencedDestination-ProxyTypeNotSupported", rs
    assert not btp.socks.connections


# --------------------------------------------------------------------------
# 6. OAuth2 destinations against Dovecot's oauth2 passdb

def test_oauth2_client_credentials_logs_in_with_xoauth2(start, btp, world, dovecot_log):
    t = start({"o.yaml": th.cr("oauth-cc", "dest-cc")}, ["oauth-cc"])
    session_ok(t.port("oauth-cc"), world["cc"])
    assert dovecot_logins(dovecot_log, user("cc")) == ["XOAUTH2"], dovecot_log()[-3000:]
    issued = [r["issued_mail_token"] for r in btp.dest.find_requests(name="dest-cc", status=200)
              if r.get("issued_mail_token")]
    seen = [i for i in btp.dest.introspections if i["user"] == user("cc")]
    assert seen and seen[-1]["token"] in issued, (seen, issued)
    assert_not_logged(t, issued, "a mail access token")


def test_oauth2_short_lived_mail_token_is_renewed(start, btp, world, dovecot_log):
    btp.dest.mail_token_ttl = 3
    t = start({"o.yaml": th.cr("oauth-cc", "dest-cc")}, ["oauth-cc"])
    pid = t.services()["oauth-cc"]["pid"]
    end = time.monotonic() + 7
    while time.monotonic() < end:
        session_ok(t.port("oauth-cc"), world["cc"], retr=0)
        time.sleep(0.4)
    assert t.services()["oauth-cc"]["pid"] == pid
    assert len({i["token"] for i in btp.dest.introspections}) >= 3, \
        "the same mail token used across its expiry"


def test_oauth2_refresh_token_from_the_client(start, btp, world, dovecot_log):
    t = start({"o.yaml": th.cr("oauth-rt", "dest-rt")}, ["oauth-rt"])
    port = t.port("oauth-rt")
    with Pop3(port) as p:
        assert p.greeting.startswith(b"+OK"), p.greeting
        r = p.cmd(b"AUTH XOAUTH2 " + xoauth2(user("rt"), REFRESH_TOKEN))
        assert r.startswith(b"+OK"), r
        st, raw = p.cmd_multi("LIST")
        assert raw == list_lines(world["rt"]), raw
        st, raw = p.cmd_multi("RETR 2")
        assert multiline_body(raw) == world["rt"][1]
        assert p.cmd("QUIT").startswith(b"+OK")
    ex = [r for r in btp.dest.find_requests(name="dest-rt") if r["x_refresh_token"]]
    assert ex and ex[-1]["x_refresh_token"] == REFRESH_TOKEN and ex[-1]["status"] == 200, ex
    assert dovecot_logins(dovecot_log, user("rt")) == ["XOAUTH2"], dovecot_log()[-3000:]

    # a refresh token the service does not know
    with Pop3(port) as p:
        assert p.greeting.startswith(b"+OK"), p.greeting
        r = p.cmd(b"AUTH XOAUTH2 " + xoauth2(user("rt"), "rt-wrong-" + secrets.token_hex(8)))
        assert r.startswith(b"-ERR [AUTH]"), r
    assert dovecot_logins(dovecot_log, user("rt")) == ["XOAUTH2"]
    issued = [r.get("issued_mail_token") for r in btp.dest.requests]
    assert_not_logged(t, [REFRESH_TOKEN] + issued, "a refresh or access token")


def test_oauth2_exchange_asks_the_crs_level_and_fragment(start, btp, world):
    """The exchange of a client's refresh token asks the Destination service
    for the same destination the tenant was configured from: the CR's level
    and fragment go with it."""
    btp.dest.put_fragment(PROVIDER, {"FragmentName": "note", "Description": "x"})
    c = th.cr("oauth-rt-lv", "dest-rt")
    c["spec"]["destinationRef"]["level"] = "subaccount"
    c["spec"]["fragmentRef"] = {"name": "note"}
    t = start({"o.yaml": c}, ["oauth-rt-lv"])
    with Pop3(t.port("oauth-rt-lv")) as p:
        assert p.greeting.startswith(b"+OK"), p.greeting
        r = p.cmd(b"AUTH XOAUTH2 " + xoauth2(user("rt"), REFRESH_TOKEN))
        assert r.startswith(b"+OK"), r
        assert p.cmd("QUIT").startswith(b"+OK")
    ex = [r for r in btp.dest.find_requests(name="dest-rt") if r["x_refresh_token"]]
    assert ex, btp.dest.find_requests(name="dest-rt")
    assert (ex[-1]["level"], ex[-1]["x_fragment_name"], ex[-1]["status"]) == \
        ("subaccount", "note", 200), ex[-1]


def test_oauth2_exchange_during_service_outage_is_temporary(start, btp, world):
    """The Destination service failing (500) is not a verdict on the
    client's refresh token: the client must hear [SYS/TEMP], not [AUTH]
    (RFC 3206), so that it keeps its token and retries."""
    t = start({"o.yaml": th.cr("oauth-rt", "dest-rt")}, ["oauth-rt"])
    btp.dest.set_fail("500")
    with Pop3(t.port("oauth-rt")) as p:
        assert p.greeting.startswith(b"+OK"), p.greeting
        r = p.cmd(b"AUTH XOAUTH2 " + xoauth2(user("rt"), REFRESH_TOKEN))
    assert any(x["x_refresh_token"] == REFRESH_TOKEN and x["status"] == 500
               for x in btp.dest.requests), btp.dest.requests
    assert r.startswith(b"-ERR [SYS/TEMP]"), r
    btp.dest.set_fail(None)
    with Pop3(t.port("oauth-rt")) as p:
        assert p.cmd(b"AUTH XOAUTH2 " + xoauth2(user("rt"), REFRESH_TOKEN)).startswith(b"+OK")


def test_oauth2_authorization_code_works_once(start, btp, world, dovecot_log):
    code = "code-" + secrets.token_hex(12)
    btp.dest.add_code(code, user("code"))
    t = start({"o.yaml": th.cr("oauth-code", "dest-code")}, ["oauth-code"])
    port = t.port("oauth-code")
    with Pop3(port) as p:
        assert p.greeting.startswith(b"+OK"), p.greeting
        r = p.cmd(b"AUTH XOAUTH2 " + xoauth2(user("code"), code))
        assert r.startswith(b"+OK"), r
        st, raw = p.cmd_multi("LIST")
        assert raw == list_lines(world["code"]), raw
        assert p.cmd("QUIT").startswith(b"+OK")
    assert [r["x_code"] for r in btp.dest.find_requests(name="dest-code") if r["x_code"]] == [code]
    with Pop3(port) as p:                       # a code is good for one exchange
        assert p.greeting.startswith(b"+OK"), p.greeting
        r = p.cmd(b"AUTH XOAUTH2 " + xoauth2(user("code"), code))
        assert r.startswith(b"-ERR [AUTH]"), r
    assert_not_logged(t, [code], "an authorization code")


def test_oauth2_oauthbearer_when_server_lacks_xoauth2(start, btp, world, tmp_path):
    """A server that offers OAUTHBEARER but not XOAUTH2 gets OAUTHBEARER."""
    u, pw = USERS["cc"]
    dc2 = Dovecot(users={u: pw}, oauth2_introspection_url=btp.dest.introspection_url,
                  oauth2_mechanisms=("oauthbearer",))
    try:
        dc2.seed(u, world["cc"])
        btp.dest.put(PROVIDER, dest("dest-ob", "cc", dc2, auth="OAuth2ClientCredentials"))
        t = start({"o.yaml": th.cr("oauth-ob", "dest-ob")}, ["oauth-ob"])
        session_ok(t.port("oauth-ob"), world["cc"])
        with open(dc2.log_path) as f:
            logins = re.findall(r"Login: user=<%s>, method=(\w+)" % u, f.read())
        assert logins == ["OAUTHBEARER"], logins
    finally:
        dc2.close()
