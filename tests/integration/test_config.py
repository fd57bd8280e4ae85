"""CRs and destinations changing while tpmaild runs; rejected CRs."""

import copy
import os
import json

import pytest

import tpmail_harness as th
from tpmail_harness import Pop3, multiline_body, port_open, wait_for, RELOAD_TIMEOUT


def _first_message(port):
    c = Pop3(port)
    try:
        if not c.greeting.startswith(b"+OK"):
            return None
        st, raw = c.cmd_multi("RETR 1")
        c.cmd("QUIT")
        return multiline_body(raw) if raw is not None else None
    finally:
        c.close()


def _wait_serves(t, svc, message, timeout=RELOAD_TIMEOUT):
    """Wait until service ``svc`` is running and RETR 1 returns ``message``."""
    def ok():
        s = t.services().get(svc)
        if not s or s["state"] != "running":
            return False
        return _first_message(t.port(svc)) == message
    wait_for(ok, timeout, interval=0.2, what="%s to serve the expected mailbox" % svc)


def test_cr_add_change_remove(tpmaild_factory, mailboxes):
    t = tpmaild_factory(crs={"mail.yaml": th.cr("mail", "dest-a")}, expect=["mail"])
    assert set(t.services()) == {"mail"}
    # add
    t.write_cr("extra.yaml", th.cr("extra", "dest-bob"))
    t.wait_services(["extra"], timeout=RELOAD_TIMEOUT)
    _wait_serves(t, "extra", mailboxes["bob"][0])
    # change (in place, as an editor would): now alice's mailbox
    t.write_cr("extra.yaml", th.cr("extra", "dest-a"), in_place=True)
    _wait_serves(t, "extra", mailboxes["alice"][0])
    # "mail" was not disturbed
    assert _first_message(t.port("mail")) == mailboxes["alice"][0]
    # remove
    port = t.port("extra")
    t.remove_cr("extra.yaml")
    t.wait_services(["mail"], absent=["extra"], timeout=RELOAD_TIMEOUT)
    wait_for(lambda: not port_open(port), 5, what="port of removed service to close")
    assert t.services()["mail"]["state"] == "running"


def test_shared_cr_gains_and_loses_tenant(tpmaild_factory, mailboxes):
    t = tpmaild_factory(crs={"shared.yaml": th.cr("shared", "dest-t", tenants=["tenant-a"])},
                        expect=["shared-tenant-a"])
    assert "shared-tenant-b" not in t.services()
    pa = t.port("shared-tenant-a")
    c = Pop3(pa)   # an open session on tenant-a across the change
    assert c.greeting.startswith(b"+OK")
    t.write_cr("shared.yaml", th.cr("shared", "dest-t", tenants=["tenant-a", "tenant-b"]))
    t.wait_services(["shared-tenant-a", "shared-tenant-b"], timeout=RELOAD_TIMEOUT)
    _wait_serves(t, "shared-tenant-b", mailboxes["tenant-b-user"][0])
    assert t.port("shared-tenant-a") == pa
    st, raw = c.cmd_multi("RETR 1")
    assert multiline_body(raw) == mailboxes["tenant-a-user"][0]
    c.close()
    # and drops tenant-a again
    t.write_cr("shared.yaml", th.cr("shared", "dest-t", tenants=["tenant-b"]))
    t.wait_services(["shared-tenant-b"], absent=["shared-tenant-a"], timeout=RELOAD_TIMEOUT)
    wait_for(lambda: not port_open(pa), 5, what="tenant-a port to close")


def test_destinations_file_change(tpmaild_factory, dovecot, mailboxes):
    t = tpmaild_factory(crs={"mail.yaml": th.cr("mail", "dest-a")}, expect=["mail"])
    assert _first_message(t.port("mail")) == mailboxes["alice"][0]
    dests = copy.deepcopy(t.destinations)
    for d in dests["provider"]:
        if d["Name"] == "dest-a":
            d["mail.user"] = "bob"
            d["mail.password"] = dovecot.users["bob"]
    t.write_destinations(dests)
    _wait_serves(t, "mail", mailboxes["bob"][0])


HANDWRITTEN_CR = """\
# as in SAP's documentation, with comments and single quotes
apiVersion: destination.connectivity.api.sap/v1
kind: Destination
metadata:
  name: handwritten
  annotations:
    transparent-proxy.connectivity.api.sap/tenant-subdomains: '["tenant-a"]'
spec:
  destinationRef:
    name: dest-t   # plain scalar
  service:
    port: 110
"""


def test_json_multidoc_and_handwritten_yaml(tpmaild_factory, mailboxes):
    crs = {
        "one.json": th.cr("json-cr", "dest-bob"),
        "two.yaml": [th.cr("doc-one", "dest-a"),
                     th.cr("doc-two", "dest-t", tenants=["tenant-b"])],
        "three.yaml": HANDWRITTEN_CR,
    }
    t = tpmaild_factory(crs=crs, expect=["json-cr", "doc-one", "doc-two-tenant-b",
                                         "handwritten-tenant-a"])
    assert _first_message(t.port("json-cr")) == mailboxes["bob"][0]
    assert _first_message(t.port("doc-one")) == mailboxes["alice"][0]
    assert _first_message(t.port("doc-two-tenant-b")) == mailboxes["tenant-b-user"][0]
    assert _first_message(t.port("handwritten-tenant-a")) == mailboxes["tenant-a-user"][0]
    assert t.rejected() == []


DOC_BUG_CR = """\
apiVersion: destination.connectivity.api.sap/v1
kind: Destination
metadata:
  name: docbug
destinationRef:
  name: "dest-a"
"""

MISSING_REF_CR = """\
apiVersion: destination.connectivity.api.sap/v1
kind: Destination
metadata:
  name: noref
spec:
  service:
    port: 110
"""

BAD_ANNOTATION_CR = """\
apiVersion: destination.connectivity.api.sap/v1
kind: Destination
metadata:
  name: badanno
  annotations:
    transparent-proxy.connectivity.api.sap/tenant-subdomains: '["tenant-a", '
spec:
  destinationRef:
    name: "dest-t"
"""


def test_malformed_crs_rejected_others_keep_serving(tpmaild_factory, mailboxes):
    t = tpmaild_factory()
    svcs_before = t.services()
    c = Pop3(t.port("mail"))          # a session open across the bad CRs
    assert c.greeting.startswith(b"+OK")
    t.write_cr("docbug.yaml", DOC_BUG_CR)
    t.write_cr("noref.yaml", MISSING_REF_CR)
    t.write_cr("badanno.yaml", BAD_ANNOTATION_CR)

    r = t.wait_rejected("badanno")
    assert r[0]["reason"] == "ConfigurationError-MultitenancyAnnotation-Invalid", r

    r = t.wait_rejected("noref")
    assert r[0]["reason"].startswith("ConfigurationError"), r
    assert "destinationRef" in (r[0].get("error") or ""), r

    r = t.wait_rejected("docbug")
    assert r[0]["reason"].startswith("ConfigurationError"), r
    err = r[0].get("error") or ""
    assert "destinationRef" in err and "spec" in err, r

    svcs = t.services()
    for n in ("docbug", "noref") + tuple(n for n in svcs if n.startswith("badanno")):
        assert n not in svcs, svcs
    for n in ("mail", "shared-tenant-a", "shared-tenant-b"):
        assert svcs[n]["state"] == "running", svcs[n]
        assert svcs[n]["listen"] == svcs_before[n]["listen"]
    st, raw = c.cmd_multi("RETR 1")
    assert multiline_body(raw) == mailboxes["alice"][0]
    c.close()
    assert _first_message(t.port("shared-tenant-a")) == mailboxes["tenant-a-user"][0]

    # fixing a rejected CR makes it serve and leave "rejected"
    t.write_cr("docbug.yaml", th.cr("docbug", "dest-bob"))
    t.wait_services(["docbug"], timeout=RELOAD_TIMEOUT)
    _wait_serves(t, "docbug", mailboxes["bob"][0])
    wait_for(lambda: not t.rejected_for("docbug"), RELOAD_TIMEOUT, what="docbug to leave rejected")
    # removing a rejected CR removes it from "rejected"
    t.remove_cr("noref.yaml")
    wait_for(lambda: not t.rejected_for("noref"), RELOAD_TIMEOUT, what="noref to leave rejected")


def test_unparseable_file_does_not_disturb_others(tpmaild_factory, mailboxes):
    t = tpmaild_factory()
    t.write_cr("garbage.yaml", "apiVersion: [unclosed\n  - : :\n\t\x01")
    t.write_cr("garbage.json", "{not json")
    # give the watcher time to read both: a valid CR added after them must
    # show up, proving the files were processed
    t.write_cr("later.yaml", th.cr("later", "dest-bob"))
    t.wait_services(["later", "mail", "shared-tenant-a", "shared-tenant-b"], timeout=RELOAD_TIMEOUT)
    assert _first_message(t.port("mail")) == mailboxes["alice"][0]


@pytest.mark.parametrize("case,reason", [
    ("missing", "ConfigurationError-ReferencedDestination-NotFound"),
    ("type", "ConfigurationError-ReferencedDestination-TypeNotSupported"),
    ("proxytype", "ConfigurationError-ReferencedDestination-ProxyTypeNotSupported"),
])
def test_destination_problems(tpmaild_factory, dovecot, mailboxes, case, reason):
    dests = th.standard_destinations(dovecot)
    http = th.pop3_dest("dest-http", "alice", "x", dovecot.pop3_port)
    http["Type"] = "HTTP"
    onprem = th.pop3_dest("dest-onprem", "alice", "x", dovecot.pop3_port)
    onprem["ProxyType"] = "OnPremise"
    dests["provider"] += [http, onprem]
    ref = {"missing": "dest-nope", "type": "dest-http", "proxytype": "dest-onprem"}[case]
    t = tpmaild_factory(destinations=dests)
    t.write_cr("bad.yaml", th.cr("bad", ref))
    r = t.wait_rejected("bad")
    assert r[0]["reason"] == reason, r
    assert "bad" not in t.services()
    assert t.services()["mail"]["state"] == "running"


def test_missing_destination_appears_later(tpmaild_factory, dovecot, mailboxes):
    """A CR rejected for a missing destination starts once the destination
    is added to the destinations file."""
    t = tpmaild_factory(crs={"late.yaml": th.cr("late", "dest-late")}, expect=[])
    r = t.wait_rejected("late")
    assert r[0]["reason"] == "ConfigurationError-ReferencedDestination-NotFound", r
    dests = copy.deepcopy(t.destinations)
    dests["provider"].append(th.pop3_dest("dest-late", "bob", dovecot.users["bob"], dovecot.pop3_port))
    t.write_destinations(dests)
    t.wait_services(["late"], timeout=RELOAD_TIMEOUT)
    _wait_serves(t, "late", mailboxes["bob"][0])
    wait_for(lambda: not t.rejected_for("late"), RELOAD_TIMEOUT, what="late to leave rejected")


def test_shared_cr_partial_failure(tpmaild_factory, mailboxes):
    t = tpmaild_factory(crs={"shared.yaml": th.cr("shared", "dest-t",
                                                  tenants=["tenant-a", "tenant-ghost"])},
                        expect=["shared-tenant-a"])
    r = t.wait_rejected("shared")
    assert r[0]["reason"] == "FailedToApplyConfiguration", r
    svcs = t.services()
    assert "shared-tenant-ghost" not in svcs or svcs["shared-tenant-ghost"]["state"] != "running"
    assert _first_message(t.port("shared-tenant-a")) == mailboxes["tenant-a-user"][0]


def test_status_json_shape(tpmaild_factory):
    t = tpmaild_factory()
    r = t.ctl("status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert set(st) >= {"services", "rejected"}
    keys = {"namespace", "name", "cr", "tenant", "listen", "pid", "state", "restarts",
            "sessions_active", "sessions_total", "error"}
    for s in st["services"]:
        assert keys <= set(s), s
        assert s["namespace"] == "default"
        assert isinstance(s["pid"], int) and s["pid"] > 0
        assert th.proc_is_proxy(s["pid"]), (s, th.proc_exe_name(s["pid"]))
        assert s["restarts"] == 0
    assert sorted(s["name"] for s in st["services"]) == sorted(th.STANDARD_SERVICES)


def test_same_name_in_two_namespaces(tpmaild_factory, mailboxes):
    crs = {"mail.yaml": th.cr("mail", "dest-a"),
           "other.yaml": th.cr("mail", "dest-bob", namespace="other")}
    t = tpmaild_factory(crs=crs, expect=["mail"])

    def both():
        ss = [s for s in t.status()["services"] if s["name"] == "mail"]
        if sorted(s["namespace"] for s in ss) == ["default", "other"] and \
                all(s["state"] == "running" for s in ss):
            return {s["namespace"]: s for s in ss}
        return None
    ss = wait_for(both, RELOAD_TIMEOUT, what="default/mail and other/mail running")
    assert ss["default"]["listen"] != ss["other"]["listen"]
    port = lambda s: int(s["listen"].rsplit(":", 1)[1])  # noqa: E731
    assert _first_message(port(ss["default"])) == mailboxes["alice"][0]
    assert _first_message(port(ss["other"])) == mailboxes["bob"][0]


def test_restart_keeps_ports(tpmaild_factory, bins, mailboxes):
    """A second tpmaild on the same state dir gives each service the port it
    had before (clients keep their configured endpoint)."""
    t = tpmaild_factory()
    before = {n: s["listen"] for n, s in t.services().items()}
    assert t.stop() == 0
    t2 = th.Tpmaild(t.workdir, crs=None, destinations=t.destinations, args=t.args,
                    port_range=t.port_range, bins=bins)
    th.ACTIVE.append(t2)
    try:
        t2.start()
        t2.wait_services(th.STANDARD_SERVICES)
        after = {n: s["listen"] for n, s in t2.services().items()}
        assert after == before
        assert _first_message(t2.port("mail")) == mailboxes["alice"][0]
    finally:
        th.teardown_tpmaild(t2)


def test_state_dir_deeper_than_a_socket_path(tpmaild_factory, mailboxes):
    """A state directory whose control socket path is longer than a Unix
    socket address can hold (108 bytes) still works: tpmaild listens there
    and tpmailctl reaches it (deep CI checkouts and volume mounts do this)."""
    t = tpmaild_factory(name="d" + "e" * 60 + "p/" + "s" * 60)
    assert len(t.control.encode()) > 108
    assert t.services()["mail"]["state"] == "running"
    assert os.path.exists(t.control)
    assert _first_message(t.port("mail")) == mailboxes["alice"][0]


def test_fragment_extends_the_destination(tpmaild_factory, dovecot, mailboxes):
    """spec.fragmentRef: a fragment in the destinations file (an entry with
    a FragmentName) merged into the destination, its properties winning, as
    the Destination service merges them; a missing fragment rejects the CR
    with SAP's reason unless spec.fragmentRef.optional is true."""
    dests = th.standard_destinations(dovecot)
    dests["provider"].append({"FragmentName": "as-bob", "mail.user": "bob",
                              "mail.password": dovecot.users["bob"]})
    crs = {"f.yaml": [th.cr("with-frag", "dest-a"), th.cr("no-frag", "dest-a"),
                      th.cr("missing-frag", "dest-a"), th.cr("optional-frag", "dest-a")]}
    for c, ref in zip(crs["f.yaml"], [{"name": "as-bob"}, None, {"name": "nope"},
                                      {"name": "nope", "optional": True}]):
        if ref is not None:
            c["spec"]["fragmentRef"] = ref
    t = tpmaild_factory(crs=crs, destinations=dests,
                        expect=["with-frag", "no-frag", "optional-frag"])
    assert _first_message(t.port("with-frag")) == mailboxes["bob"][0]
    assert _first_message(t.port("no-frag")) == mailboxes["alice"][0]
    assert _first_message(t.port("optional-frag")) == mailboxes["alice"][0]
    r = t.wait_rejected("missing-frag")
    assert r[0]["reason"] == "ConfigurationError-ReferencedFragment-NotFound", r
    assert "nope" in r[0]["error"], r
    # the fragment appears: the CR starts
    dests["provider"].append({"FragmentName": "nope", "mail.user": "bob",
                              "mail.password": dovecot.users["bob"]})
    t.write_destinations(dests)
    _wait_serves(t, "missing-frag", mailboxes["bob"][0])


@pytest.mark.parametrize("ref,field", [
    ({"name": ""}, "spec.fragmentRef.name"),
    ({"name": "a\r\nX-Injected: 1"}, "spec.fragmentRef.name"),
    ({"name": "a,b"}, "spec.fragmentRef.name"),
    ({"name": "f", "optional": "yes"}, "spec.fragmentRef.optional"),
    ({"name": "f", "level": "galaxy"}, "spec.fragmentRef.level"),
    ({"level": "instance"}, "spec.fragmentRef.level"),
])
def test_malformed_fragment_ref(tpmaild_factory, ref, field):
    c = th.cr("bad-frag", "dest-a")
    c["spec"]["fragmentRef"] = ref
    t = tpmaild_factory(crs={"bad.yaml": c}, expect=[])
    r = t.wait_rejected("bad-frag")
    assert field in r[0]["error"], r


def test_destinations_file_entry_needs_name_or_fragment_name(tpmaild_factory, dovecot):
    """An entry with neither (or both) is a broken destinations file: the
    last good one stays in force and the error names the entry."""
    t = tpmaild_factory(crs={"mail.yaml": th.cr("mail", "dest-a")}, expect=["mail"])
    dests = copy.deepcopy(t.destinations)
    dests["provider"].append({"Name": "x", "FragmentName": "y"})
    t.write_destinations(dests)
    wait_for(lambda: "Name, or a fragment with a FragmentName" in t.log_text(), RELOAD_TIMEOUT,
             what="the destinations file's error in the log")
    assert t.services()["mail"]["state"] == "running"
