"""Kubernetes mode and the deploy/ manifests, against the test API server in
fakes/kube_apiserver.py (HTTPS, bearer tokens) and, where a person would use
it, the real ``kubectl``.

* kubectl and the manifests: the CRD and the seed examples applied, listed,
  annotated, patched and deleted with kubectl; what the API server rejects;
  ``kubectl kustomize deploy/kustomize/base`` rendered and dry-run on the
  server; the Helm chart, the Containerfile and the systemd unit checked
  statically (Helm itself is not installable here).
* the fake itself: the API conventions the tpmaild tests rely on.
* tpmaild --kubernetes (skipped until the build has it): Services in both
  namespaces, POP3 through the tenant endpoint from the real Dovecot, the
  tenant annotation, deletion (also while tpmaild is down), watch failures
  (drops, 410, compaction, errors), two replicas with a Lease, and the
  status conditions of bad CRs.

Knobs: TPMAIL_BUILD_DIR (as the other tests), TPMAIL_TEST_K8S_TIMEOUT
(default 20 s) for each wait on the API server's state, KUBECTL (default
``kubectl`` on PATH).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import pytest

import tpmail_harness as th
from tpmail_harness import Pop3, multiline_body, wait_for
from fakes.kube_apiserver import KubeApiServer, KubeClient

REPO = th.REPO
DEPLOY = os.path.join(REPO, "deploy")
CRD_FILE = os.path.join(DEPLOY, "crd", "destinations.yaml")
EXAMPLES = [os.path.join(DEPLOY, "examples", f) for f in ("destination-dedicated.yaml",
                                                          "destination-shared.yaml")]
KUSTOMIZE_BASE = os.path.join(DEPLOY, "kustomize", "base")
HELM_CHART = os.path.join(DEPLOY, "helm", "tpmail")

NS = "tpmail-system"                    # tpmaild's own namespace
CR_NS = "team-a"                        # where the CRs live
POD_SELECTOR = "app.kubernetes.io/name=tpmail"
GROUP = "destination.connectivity.api.sap"
CR_API = "/apis/%s/v1" % GROUP
TENANT_ANNOTATION = th.TENANT_ANNOTATION
LEASE = "tpmail-leader"
LEASE_DURATION = 4

K8S_TIMEOUT = float(os.environ.get("TPMAIL_TEST_K8S_TIMEOUT", "20"))
KUBECTL = os.environ.get("KUBECTL") or shutil.which("kubectl")

needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")


# --------------------------------------------------------------------------
# helpers


def kubectl(kube, *args, stdin=None, check=True, timeout=60):
    """Run the real kubectl against ``kube``; returns CompletedProcess (text)."""
    env = dict(os.environ, KUBECONFIG=kube.kubeconfig_path,
               KUBECACHEDIR=os.path.join(kube.workdir, "kubecache"))
    for k in ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
        env.pop(k, None)
    r = subprocess.run([KUBECTL] + list(args), input=stdin, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, env=env, timeout=timeout, text=True)
    if check and r.returncode != 0:
        raise AssertionError("kubectl %s: exit %d\nstdout: %s\nstderr: %s"
                             % (" ".join(args), r.returncode, r.stdout, r.stderr))
    return r


def json_docs(text):
    """Objects in kubectl's -o json output (one object, a List, or several)."""
    text = text.strip()
    out = []
    dec = json.JSONDecoder()
    i = 0
    while i < len(text):
        obj, j = dec.raw_decode(text, i)
        if obj.get("kind") == "List":
            out.extend(obj.get("items") or [])
        else:
            out.append(obj)
        i = j
        while i < len(text) and text[i].isspace():
            i += 1
    return out


def yaml_to_objects(kube, path_or_text):
    """Parse Kubernetes YAML without PyYAML: kubectl's client-side dry run."""
    if os.path.exists(path_or_text):
        r = kubectl(kube, "create", "--dry-run=client", "-o", "json", "-f", path_or_text)
    else:
        r = kubectl(kube, "create", "--dry-run=client", "-o", "json", "-f", "-", stdin=path_or_text)
    return json_docs(r.stdout)


def install_crd(kube):
    kubectl(kube, "apply", "-f", CRD_FILE)
    kubectl(kube, "wait", "--for=condition=Established", "--timeout=10s",
            "crd/destinations.%s" % GROUP)


def cr_obj(name, dest, tenants=None, namespace=CR_NS, port=None, annotations=None):
    o = th.cr(name, dest, tenants=tenants, namespace=namespace, port=port)
    if annotations:
        o["metadata"].setdefault("annotations", {}).update(annotations)
    return o


def apply_cr(kube, obj):
    """kubectl apply of one CR (JSON is YAML)."""
    return kubectl(kube, "apply", "-f", "-", stdin=json.dumps(obj))


def managed_services(kube, namespace=None):
    """{(ns, name): Service} of the Services tpmail manages."""
    return {(s["metadata"]["namespace"], s["metadata"]["name"]): s
            for s in kube.objects("Service", namespace)
            if (s["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by") == "tpmail"}


def available(kube, name, namespace=CR_NS):
    cr = kube.get("Destination", namespace, name)
    if cr is None:
        return None
    for c in (cr.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Available":
            return c
    return None


def wait_available(kube, name, status="True", namespace=CR_NS, reason=None, timeout=K8S_TIMEOUT):
    def ok():
        c = available(kube, name, namespace)
        if c and c.get("status") == status and (reason is None or c.get("reason") == reason):
            return c
        return None
    try:
        return wait_for(ok, timeout, interval=0.1, what="CR %s/%s Available=%s%s" % (
            namespace, name, status, " (%s)" % reason if reason else ""))
    except TimeoutError as e:
        cr = kube.get("Destination", namespace, name)
        raise AssertionError("%s; CR status now: %s" % (e, json.dumps((cr or {}).get("status"))))


def wait_services(kube, names, absent=(), cr_namespace=CR_NS, timeout=K8S_TIMEOUT):
    """Wait until every tenant service in ``names`` has its Service in NS and
    in ``cr_namespace``, and none of ``absent`` has either; returns
    {name: (proxy-namespace Service, CR-namespace Service)}."""
    def ok():
        svcs = managed_services(kube)
        out = {}
        for n in names:
            a, b = svcs.get((NS, n)), svcs.get((cr_namespace, n))
            if a is None or b is None:
                return None
            out[n] = (a, b)
        for n in absent:
            if (NS, n) in svcs or (cr_namespace, n) in svcs:
                return None
        return out
    try:
        return wait_for(ok, timeout, interval=0.1, what="Services %s (absent: %s)" % (list(names), list(absent)))
    except TimeoutError as e:
        raise AssertionError("%s; managed Services now: %s" % (e, sorted(managed_services(kube))))


def target_port(svc):
    return svc["spec"]["ports"][0]["targetPort"]


def first_message(port, host=th.HOST):
    c = Pop3(port, host=host)
    try:
        if not c.greeting.startswith(b"+OK"):
            return c.greeting
        st, raw = c.cmd_multi("RETR 1")
        c.cmd("QUIT")
        return multiline_body(raw) if raw is not None else st
    finally:
        c.close()


def check_service_pair(kube, name, cr, tenant, port, port_range, cr_namespace=CR_NS):
    """The two Services of one tenant service, as the contract has them."""
    svcs = managed_services(kube)
    main = svcs[(NS, name)]
    ext = svcs[(cr_namespace, name)]
    labels = {"app.kubernetes.io/managed-by": "tpmail", "tpmail.io/cr-namespace": cr_namespace,
              "tpmail.io/cr-name": cr["metadata"]["name"], "tpmail.io/tenant": tenant or ""}
    for s in (main, ext):
        got = s["metadata"].get("labels") or {}
        assert {k: got.get(k) for k in labels} == labels, (s["metadata"]["namespace"], got)
        assert len(s["spec"]["ports"]) == 1, s["spec"]["ports"]
        p = s["spec"]["ports"][0]
        assert p.get("name") == "pop3" and p.get("port") == port, p
    # proxy namespace: selects the tpmail pods, targetPort from the range
    assert main["spec"].get("type", "ClusterIP") == "ClusterIP", main["spec"]
    assert main["spec"].get("selector") == dict(kv.split("=", 1) for kv in POD_SELECTOR.split(",")), \
        main["spec"].get("selector")
    tp = target_port(main)
    assert isinstance(tp, int) and port_range[0] <= tp <= port_range[1], (tp, port_range)
    assert not main["metadata"].get("ownerReferences"), main["metadata"].get("ownerReferences")
    # CR namespace: ExternalName to the proxy-namespace Service, owned by the CR
    assert ext["spec"].get("type") == "ExternalName", ext["spec"]
    assert ext["spec"].get("externalName") == "%s.%s.svc.cluster.local" % (name, NS), ext["spec"]
    owners = ext["metadata"].get("ownerReferences") or []
    assert len(owners) == 1, owners
    o = owners[0]
    assert (o.get("apiVersion"), o.get("kind"), o.get("name"), o.get("uid"), o.get("controller")) == \
        ("%s/v1" % GROUP, "Destination", cr["metadata"]["name"], cr["metadata"]["uid"], True), o
    return tp


def write_request_log(kube, path):
    with open(path, "w") as f:
        for r in kube.requests():
            f.write(json.dumps(r, default=str) + "\n")
    return path


def writes(kube, user=None, since=0, path=None):
    """Write requests (not the Lease's) as "METHOD path -> status"."""
    out = []
    for r in kube.requests(user=user, since=since, path=path):
        if r["method"] in ("POST", "PUT", "PATCH", "DELETE") and "/leases" not in r["path"]:
            out.append("%s %s -> %s" % (r["method"], r["path"], r["status"]))
    return out


# --------------------------------------------------------------------------
# fixtures


@pytest.fixture
def kube(tmp_path):
    srv = KubeApiServer(workdir=str(tmp_path / "kube"), bookmark_interval=1.0, max_watch_seconds=120)
    srv.start()
    yield srv
    log = write_request_log(srv, str(tmp_path / "kube-requests.jsonl"))
    print("fake API server request log: %s" % log)
    srv.close()


def k8s_mode_available(bins):
    r = subprocess.run([bins["tpmaild"], "--help"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=10)
    return b"--kubernetes" in r.stdout


class K8sTpmaild(th.Tpmaild):
    """tpmaild --kubernetes against the fake API server."""

    def __init__(self, workdir, kube, destinations, identity="tpmaild-0", listen=th.HOST,
                 port_range=None, token=None, allow_loopback=True, lease_duration=LEASE_DURATION,
                 in_cluster=False, env=None, args=(), bins=None):
        super().__init__(workdir, crs=None, destinations=destinations, args=args,
                         port_range=port_range, bins=bins)
        self.kube = kube
        self.identity = identity
        self.in_cluster = in_cluster    # no --kube-api / --identity: from the environment
        self.env = dict(env or {})
        self.listen = listen
        self.allow_loopback = allow_loopback
        self.lease_duration = lease_duration
        self.user = "sa-" + identity
        tok = token or ("token-" + identity)
        self.token = tok
        kube.add_token(tok, self.user)
        self.token_file = kube.write_token_file(os.path.join(self.workdir, "token"), tok)

    def argv(self):
        a = [self.bins["tpmaild"], "--kubernetes"]
        if not self.in_cluster:
            a += ["--kube-api", self.kube.url, "--identity", self.identity]
        a += ["--kube-ca", self.kube.ca_file,
              "--kube-token-file", self.token_file, "--namespace", NS, "--pod-selector", POD_SELECTOR,
              "--destinations", self.dest_file, "--state-dir", self.state_dir,
             "--control", self.control, "--listen-address", self.listen,
             "--port-range", "%d-%d" % self.port_range, "--proxy-path", self.bins["tpmail-pop3"],
             "--log-level", self.log_level, "--drain-grace", str(th.DRAIN_GRACE)]
        if self.lease_duration:
            a += ["--lease-duration", str(self.lease_duration)]
        if self.allow_loopback:
            a.append("--allow-loopback")
        return a + self.args

    def start(self):
        env_clear = ("KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT", "POD_NAME", "POD_NAMESPACE")
        saved = {k: os.environ.pop(k) for k in env_clear if k in os.environ}
        os.environ.update(self.env)
        try:
            return super().start()
        finally:
            for k in self.env:
                os.environ.pop(k, None)
            os.environ.update(saved)


@pytest.fixture
def k8s_tpmaild(bins, kube, dovecot, tmp_path):
    """make(name=..., **K8sTpmaild kwargs) -> a started K8sTpmaild.
    Teardown: SIGTERM, exit 0, no proxy left (as for standalone tpmaild)."""
    if not k8s_mode_available(bins):
        pytest.skip("this tpmaild has no --kubernetes mode yet")
    started = []

    def make(name=None, destinations=None, workdir=None, **kw):
        wd = workdir or str(tmp_path / (name or "tpmaild%d" % len(started)))
        os.makedirs(wd, exist_ok=True)
        if destinations is None:
            destinations = th.standard_destinations(dovecot)
        t = K8sTpmaild(wd, kube, destinations, bins=bins, **kw)
        th.ACTIVE.append(t)
        t.start()
        started.append(t)
        # up: the control socket answers
        wait_for(lambda: t.status() is not None, th.START_TIMEOUT, interval=0.1,
                 what="tpmaild --kubernetes to answer tpmailctl", fatal=(th.TpmaildDied,))
        return t

    yield make
    errors = th.teardown_all(started)
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)


@pytest.fixture
def kube_world(kube):
    """The fake with the CRD installed by kubectl (or directly without kubectl)."""
    if KUBECTL:
        install_crd(kube)
    else:
        pytest.skip("kubectl is not installed")
    return kube


# ==========================================================================
# kubectl and the manifests (no tpmaild)


@needs_kubectl
def test_kubectl_crd_and_seed_examples(kube):
    install_crd(kube)
    crd = kube.get("CustomResourceDefinition", None, "destinations.%s" % GROUP)
    assert crd["spec"]["names"]["shortNames"] == ["dst"]
    assert crd["spec"]["scope"] == "Namespaced"
    # the seed's examples apply unchanged
    for f in EXAMPLES:
        out = kubectl(kube, "apply", "-f", f).stdout
        assert "created" in out, out
    out = kubectl(kube, "get", "dst", "-A").stdout
    lines = out.strip().splitlines()
    head = lines[0].split()
    assert head[:2] == ["NAMESPACE", "NAME"] and "DESTINATIONREF" in head and "STATUS" in head, out
    rows = {l.split()[1]: l.split() for l in lines[1:]}
    assert set(rows) == {"mail-pop3", "mail-shared"}, out
    assert rows["mail-pop3"][head.index("DESTINATIONREF")] == "example-dest-pop3", out
    shared = kube.get("Destination", "default", "mail-shared")
    assert json.loads(shared["metadata"]["annotations"][TENANT_ANNOTATION]) == ["tenant-a", "tenant-b"]
    assert shared["metadata"]["generation"] == 1
    # annotate: no generation bump
    kubectl(kube, "annotate", "dst", "mail-shared", "-n", "default", "--overwrite",
            '%s=["tenant-a"]' % TENANT_ANNOTATION)
    shared = kube.get("Destination", "default", "mail-shared")
    assert shared["metadata"]["annotations"][TENANT_ANNOTATION] == '["tenant-a"]'
    assert shared["metadata"]["generation"] == 1
    # status only through the status subresource, and shown by kubectl
    status = {"conditions": [{"type": "Available", "status": "True", "reason": "ConfigurationSuccessful",
                              "message": "Technical connectivity is configured. Kubernetes service with "
                                         "name mail-pop3 is created.",
                              "lastUpdateTime": "2025-01-02T03:04:05Z"}],
              "tenants": [], "observedGeneration": 1}
    kubectl(kube, "patch", "dst", "mail-pop3", "-n", "default", "--subresource=status", "--type=merge",
            "-p", json.dumps({"status": status}))
    kubectl(kube, "patch", "dst", "mail-pop3", "-n", "default", "--type=merge",
            "-p", json.dumps({"status": {"tenants": [{"tenantSubdomain": "ignored"}]}}))
    docs = json_docs(kubectl(kube, "get", "destinations", "-n", "default", "-o", "json").stdout)
    got = {d["metadata"]["name"]: d for d in docs}
    assert got["mail-pop3"]["status"] == status, got["mail-pop3"].get("status")
    assert got["mail-pop3"]["metadata"]["generation"] == 1
    y = kubectl(kube, "get", "destinations", "mail-pop3", "-n", "default", "-o", "yaml").stdout
    assert "reason: ConfigurationSuccessful" in y and "type: Available" in y, y
    out = kubectl(kube, "get", "dst", "mail-pop3", "-n", "default").stdout
    assert "ConfigurationSuccessful" in out, out        # the Status printer column
    # a spec change bumps the generation; the status stays
    kubectl(kube, "patch", "dst", "mail-pop3", "-n", "default", "--type=merge",
            "-p", '{"spec":{"service":{"port":1110}}}')
    cr = kube.get("Destination", "default", "mail-pop3")
    assert cr["metadata"]["generation"] == 2 and cr["status"] == status
    # a second apply with a changed file: kubectl's three-way merge patch
    # (the port set outside apply stays, as on a real server)
    with open(EXAMPLES[0]) as f:
        changed = f.read().replace('"example-dest-pop3"', '"other-dest"')
    kubectl(kube, "apply", "-f", "-", stdin=changed)
    cr = kube.get("Destination", "default", "mail-pop3")
    assert cr["spec"] == {"destinationRef": {"name": "other-dest"}, "service": {"port": 1110}}, cr["spec"]
    assert cr["metadata"]["generation"] == 3
    assert [r["content_type"] for r in kube.requests(method="PATCH", path=r"/destinations/mail-pop3$")][-1] \
        == "application/merge-patch+json"
    # delete
    out = kubectl(kube, "delete", "dst", "mail-pop3", "mail-shared", "-n", "default").stdout
    assert out.count("deleted") == 2, out
    assert kube.objects("Destination") == []
    assert "No resources found" in kubectl(kube, "get", "dst", "-A").stderr


@needs_kubectl
def test_kubectl_rejects_what_the_api_server_rejects(kube):
    install_crd(kube)

    def apply(text, *flags):
        return kubectl(kube, "apply", "-f", "-", *flags, stdin=text, check=False)

    # SAP's shared-mode doc bug: destinationRef without spec
    doc_bug = ("apiVersion: %s/v1\nkind: Destination\nmetadata:\n  name: mail-shared\n  namespace: %s\n"
               "  annotations:\n    %s: '[\"tenant-a\"]'\ndestinationRef:\n  name: \"example-dest-pop3\"\n"
               % (GROUP, CR_NS, TENANT_ANNOTATION))
    r = apply(doc_bug)
    assert r.returncode != 0 and 'unknown field "destinationRef"' in r.stderr, r.stderr
    r = apply(doc_bug, "--validate=false")          # pruned, then spec is missing
    assert r.returncode != 0 and "spec: Required value" in r.stderr, r.stderr
    bad = {"no-name": ({"destinationRef": {}}, "spec.destinationRef.name: Required value"),
           "empty-name": ({"destinationRef": {"name": ""}}, "should be at least 1 chars long"),
           "port-0": ({"destinationRef": {"name": "d"}, "service": {"port": 0}}, "spec.service.port"),
           "port-big": ({"destinationRef": {"name": "d"}, "service": {"port": 65536}}, "spec.service.port"),
           "level": ({"destinationRef": {"name": "d", "level": "tenant"}}, 'Unsupported value: "tenant"'),
           "scope": ({"destinationRef": {"name": "d"}, "accessControl": {"scope": "x"}}, "spec.accessControl"),
           "port-str": ({"destinationRef": {"name": "d"}, "service": {"port": "110"}}, "must be of type integer")}
    for name, (spec, msg) in bad.items():
        r = apply(json.dumps({"apiVersion": GROUP + "/v1", "kind": "Destination",
                              "metadata": {"name": name, "namespace": CR_NS}, "spec": spec}))
        assert r.returncode != 0 and msg in r.stderr, (name, r.stderr)
    assert kube.objects("Destination") == []
    # every optional field SAP's schema declares is accepted
    full = {"destinationRef": {"name": "d", "level": "provider_instance"},
            "destinationServiceInstanceName": "inst", "fragmentRef": {"name": "f", "level": "instance"},
            "chainRef": {"name": "c", "variables": [{"name": "v", "value": "x"}]},
            "service": {"port": 65535}, "accessControl": {"scope": "clusterWide"}}
    r = apply(json.dumps({"apiVersion": GROUP + "/v1", "kind": "Destination",
                          "metadata": {"name": "full", "namespace": CR_NS}, "spec": full}))
    assert r.returncode == 0, r.stderr
    got = kube.get("Destination", CR_NS, "full")["spec"]
    assert got["fragmentRef"].pop("optional") is False          # the schema's default
    assert got == full
    # validate=False (for tpmaild's own reporting of bad CRs): stored as sent
    kube.validate = False
    r = apply(doc_bug, "--validate=false")
    assert r.returncode == 0, r.stderr
    stored = kube.get("Destination", CR_NS, "mail-shared")
    assert "spec" not in stored and stored["destinationRef"] == {"name": "example-dest-pop3"}


def _render_base(kube):
    r = subprocess.run([KUBECTL, "kustomize", KUSTOMIZE_BASE], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=60,
                       env=dict(os.environ, KUBECONFIG=os.devnull))
    assert r.returncode == 0, r.stderr
    return r.stdout


@needs_kubectl
def test_kustomize_base_renders_and_passes_server_dry_run(kube):
    text = _render_base(kube)           # offline: no API server needed
    objs = yaml_to_objects(kube, text)
    by_kind = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    assert set(by_kind) >= {"CustomResourceDefinition", "Namespace", "ServiceAccount", "ClusterRole",
                            "ClusterRoleBinding", "Role", "RoleBinding", "Deployment"}, sorted(by_kind)
    for o in objs:
        if o["kind"] not in ("CustomResourceDefinition", "Namespace", "ClusterRole", "ClusterRoleBinding"):
            assert o["metadata"].get("namespace") == NS, (o["kind"], o["metadata"])
    # the CRD is exactly deploy/crd's
    crd_file = yaml_to_objects(kube, CRD_FILE)[0]
    crd = by_kind["CustomResourceDefinition"][0]
    assert crd["spec"] == crd_file["spec"]
    # RBAC: least privilege, as the contract lists it
    rules = {(tuple(r.get("apiGroups", [])), tuple(r["resources"]), tuple(r.get("resourceNames", []))):
             sorted(r["verbs"]) for r in by_kind["ClusterRole"][0]["rules"]}
    assert rules == {
        ((GROUP,), ("destinations",), ()): ["get", "list", "watch"],
        ((GROUP,), ("destinations/status",), ()): ["get", "patch", "update"],
        (("",), ("services",), ()): sorted(["get", "list", "watch", "create", "update", "patch", "delete"]),
        (("", "events.k8s.io"), ("events",), ()): ["create", "patch"]}, rules
    role = by_kind["Role"][0]
    verbs = {}
    for r in role["rules"]:
        assert r["apiGroups"] == ["coordination.k8s.io"] and r["resources"] == ["leases"], r
        for v in r["verbs"]:
            verbs[v] = r.get("resourceNames")
    assert verbs == {"create": None, "get": [LEASE], "update": [LEASE]}, verbs
    sa = by_kind["ServiceAccount"][0]["metadata"]["name"]
    for b in by_kind["ClusterRoleBinding"] + by_kind["RoleBinding"]:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NS}], b["subjects"]
    # the Deployment
    dep = by_kind["Deployment"][0]
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa
    assert dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "tpmail"
    c = pod["containers"][0]
    args = c["args"]
    for flag, val in (("--namespace", "$(POD_NAMESPACE)"), ("--pod-selector", POD_SELECTOR),
                      ("--http", "0.0.0.0:9494"), ("--state-dir", "/var/lib/tpmail")):
        assert args[args.index(flag) + 1] == val, args
    assert args[0] == "--kubernetes"
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c["env"] if "valueFrom" in e}
    assert env["POD_NAME"] == "metadata.name" and env["POD_NAMESPACE"] == "metadata.namespace", env
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        p = c[probe]["httpGet"]["port"]
        assert (ports.get(p) if isinstance(p, str) else p) == 9494, c[probe]
    sc, psc = c["securityContext"], pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 65532
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in vols[mounts["/var/lib/tpmail"]]
    for k in ("requests", "limits"):
        assert set(c["resources"][k]) >= {"cpu", "memory"}, c["resources"]
    # every manifest passes the server's dry run, and nothing is created by it
    r = kubectl(kube, "apply", "--dry-run=server", "-f", "-", stdin=text)
    lines = [l for l in r.stdout.splitlines() if l.strip()]
    assert len(lines) == len(objs) and all(l.endswith("(server dry run)") for l in lines), r.stdout
    assert kube.objects("Deployment") == [] and kube.get("Namespace", None, NS) is None
    dry = [q for q in kube.requests(method="POST")]
    assert dry and all(q["query"].get("dryRun") == "All" for q in dry), dry
    # for real, then again dry: unchanged
    kubectl(kube, "apply", "-f", "-", stdin=text)
    assert kube.get("Deployment", NS, dep["metadata"]["name"])["spec"]["replicas"] == 2
    r = kubectl(kube, "apply", "--dry-run=server", "-f", "-", stdin=text)
    assert "Deployment" not in r.stderr, r.stderr
    # the seed examples apply against the installed CRD
    for f in EXAMPLES:
        kubectl(kube, "apply", "--dry-run=server", "-f", f)
    # the overlay example renders on top of the base and dry-runs too
    r = kubectl(kube, "kustomize", os.path.join(DEPLOY, "examples", "kustomize-overlay"))
    over = {o["kind"]: o for o in yaml_to_objects(kube, r.stdout)}
    oc = over["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert oc["args"][-2:] == ["--default-instance", "dest-instance"] and oc["image"].endswith("/tpmail:0.1.0")
    kubectl(kube, "apply", "--dry-run=server", "-f", "-", stdin=r.stdout)


def _helm_value_paths(d, prefix=""):
    out = set()
    if isinstance(d, dict):
        for k, v in d.items():
            p = "%s.%s" % (prefix, k) if prefix else k
            out.add(p)
            out |= _helm_value_paths(v, p)
    return out


def test_helm_chart_is_consistent():
    """Helm is not installable here (not in Debian 12): check what can be
    checked without it.  Chart.yaml and values.yaml parse; every
    .Values path a template names exists in values.yaml; actions and
    control blocks balance; the chart's CRD is deploy/crd's."""
    yaml = pytest.importorskip("yaml")
    with open(os.path.join(HELM_CHART, "Chart.yaml")) as f:
        chart = yaml.safe_load(f)
    assert chart["apiVersion"] == "v2" and chart["name"] == "tpmail"
    assert re.match(r"^\d+\.\d+\.\d+", str(chart["version"]))
    with open(os.path.join(HELM_CHART, "values.yaml")) as f:
        values = yaml.safe_load(f)
    # SAP's value names where they exist
    assert values["config"]["integration"]["destinationService"]["defaultInstanceName"] == ""
    assert "defaultInstanceName" in values["config"]["destinationService"]
    assert values["config"]["integration"]["connectivityProxy"]["tcp"]["port"] == 20004
    assert "serviceName" in values["config"]["integration"]["connectivityProxy"]
    paths = _helm_value_paths(values)
    tdir = os.path.join(HELM_CHART, "templates")
    for fn in sorted(os.listdir(tdir)):
        with open(os.path.join(tdir, fn)) as f:
            text = f.read()
        actions = re.findall(r"\{\{-?\s*(.*?)\s*-?\}\}", text, re.S)
        assert text.count("{{") == text.count("}}") == len(actions), fn
        depth = 0
        for a in actions:
            if a.startswith("/*"):
                continue
            word = a.split()[0] if a.split() else ""
            if word in ("if", "range", "with", "define", "block"):
                depth += 1
            elif word == "end":
                depth -= 1
                assert depth >= 0, (fn, a)
        assert depth == 0, fn
        for ref in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", text):
            assert ref.rstrip(".") in paths, "%s: .Values.%s is not in values.yaml" % (fn, ref)
    with open(os.path.join(HELM_CHART, "crds", "destinations.yaml")) as a, open(CRD_FILE) as b:
        assert a.read() == b.read(), "deploy/helm/tpmail/crds/destinations.yaml differs from deploy/crd"


def test_container_and_systemd_files(bins):
    """The runtime image installs the libraries the built programs link, and
    no compiler or -dev package; the unit passes systemd-analyze verify."""
    with open(os.path.join(DEPLOY, "container", "Containerfile")) as f:
        cf = f.read()
    stages = re.split(r"(?m)^FROM ", cf)[1:]
    assert len(stages) == 2, "a build stage and a runtime stage"
    runtime = stages[1]
    assert re.search(r"(?m)^USER 65532", runtime)
    assert "meson" in stages[0] and "-dev" not in runtime and "gcc" not in runtime
    installed = set(re.findall(r"\b(lib[a-z0-9.+-]+|ca-certificates)\b", runtime.split("RUN", 1)[1].split("&&")[1]))
    need = set()
    for prog in ("tpmaild", "tpmail-pop3", "tpmailctl"):
        out = subprocess.run(["ldd", bins[prog]], stdout=subprocess.PIPE, text=True).stdout
        for m in re.finditer(r"=> (/\S+)", out):
            lib = os.path.basename(m.group(1))
            stem = re.sub(r"\.so.*$", "", lib)
            if stem in ("libc", "libm", "libdl", "libpthread", "librt", "linux-vdso"):
                continue
            need.add(stem)
    direct = {"libevent_core-2.1": "libevent-core-2.1-7", "libevent_openssl-2.1": "libevent-openssl-2.1-7",
              "libevent_extra-2.1": "libevent-extra-2.1-7", "libssl": "libssl3", "libcrypto": "libssl3",
              "libjansson": "libjansson4", "libyaml-0": "libyaml-0-2", "libcap": "libcap2",
              "libcurl": "libcurl4", "libseccomp": "libseccomp2"}
    for stem in need:
        if stem in direct:
            assert direct[stem] in installed, "%s (%s) is not installed in the runtime image" % (
                direct[stem], stem)
    unit = os.path.join(DEPLOY, "systemd", "tpmaild.service")
    with open(unit) as f:
        text = f.read()
    for needed in ("NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=tpmail"):
        assert needed in text, needed
    caps = re.search(r"(?m)^CapabilityBoundingSet=(.*)$", text).group(1).split()
    assert set(caps) == {"CAP_SETUID", "CAP_SETGID", "CAP_SYS_CHROOT", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                         "CAP_KILL", "CAP_DAC_READ_SEARCH"}, caps
    if shutil.which("systemd-analyze") is None:
        return
    # verify with an executable that exists here (and no man pages to look up)
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "tpmaild.service")
        with open(p, "w") as f:
            f.write(re.sub(r"(?m)^Documentation=.*\n", "", text).replace("/usr/sbin/tpmaild", bins["tpmaild"]))
        r = subprocess.run(["systemd-analyze", "verify", p], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stdout


# ==========================================================================
# the fake API server's own conventions (what the tpmaild tests rely on)


def test_fake_api_conventions(kube):
    c = KubeClient(kube)
    assert c.request("GET", "/api/v1/services", headers={"Authorization": "Bearer wrong"})[0] == 401
    # create / conflict / generation
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a", "namespace": "ns1"},
           "spec": {"ports": [{"port": 110}]}}
    st, o, _ = c.request("POST", "/api/v1/namespaces/ns1/services", svc)
    assert st == 201 and o["spec"]["ports"][0]["targetPort"] == 110 and o["spec"]["clusterIP"]
    assert c.request("POST", "/api/v1/namespaces/ns1/services", svc)[1]["reason"] == "AlreadyExists"
    stale = dict(o, metadata=dict(o["metadata"]))
    st, o2, _ = c.request("PUT", "/api/v1/namespaces/ns1/services/a", dict(o, metadata=dict(
        o["metadata"], labels={"x": "y"})))
    assert st == 200 and o2["metadata"]["resourceVersion"] != o["metadata"]["resourceVersion"]
    st, err, _ = c.request("PUT", "/api/v1/namespaces/ns1/services/a", stale)
    assert st == 409 and err["reason"] == "Conflict"
    assert c.request("POST", "/api/v1/namespaces/ns1/services", dict(svc, metadata={"name": "Bad_Name"}))[0] == 422
    # paging over a consistent snapshot
    for i in range(5):
        c.request("POST", "/api/v1/namespaces/ns2/services", {"metadata": {"name": "s%d" % i},
                                                              "spec": {"ports": [{"port": 1}]}})
    st, page, _ = c.request("GET", "/api/v1/namespaces/ns2/services?limit=2")
    names = [i["metadata"]["name"] for i in page["items"]]
    rv = page["metadata"]["resourceVersion"]
    c.request("DELETE", "/api/v1/namespaces/ns2/services/s4")
    while page["metadata"].get("continue"):
        st, page, _ = c.request("GET", "/api/v1/namespaces/ns2/services?limit=2&continue=" +
                                page["metadata"]["continue"])
        assert page["metadata"]["resourceVersion"] == rv
        names += [i["metadata"]["name"] for i in page["items"]]
    assert names == ["s0", "s1", "s2", "s3", "s4"]
    # a watch from the list RV sees the delete, then bookmarks, then ends
    evs = []
    for ev in c.watch("/api/v1/namespaces/ns2/services?watch=true&allowWatchBookmarks=true&timeoutSeconds=2"
                      "&resourceVersion=" + rv):
        evs.append(ev["type"])
    assert evs[0] == "DELETED" and "BOOKMARK" in evs and evs[-1] == "BOOKMARK", evs
    # compaction: the old RV is gone (200 + ERROR 410), and a continue too
    st, page, _ = c.request("GET", "/api/v1/namespaces/ns2/services?limit=1")
    kube.compact()
    evs = list(c.watch("/api/v1/services?watch=true&resourceVersion=" + rv))
    assert evs == [{"type": "ERROR", "object": evs[0]["object"]}] and evs[0]["object"]["code"] == 410, evs
    st, err, _ = c.request("GET", "/api/v1/namespaces/ns2/services?limit=1&continue=" +
                           page["metadata"]["continue"])
    assert st == 410 and err["reason"] == "Expired"
    kube.watch_gone = "http"
    assert next(iter(c.watch("/api/v1/services?watch=true&resourceVersion=" + rv)))["code"] == 410
    # a custom resource: status subresource, generation, GC of owned objects, dryRun
    install = yaml_to_objects(kube, CRD_FILE)[0] if KUBECTL else None
    if install is None:
        return
    kube.create(install)
    crp = CR_API + "/namespaces/ns1/destinations"
    st, cr, _ = c.request("POST", crp, {"apiVersion": GROUP + "/v1", "kind": "Destination",
                                        "metadata": {"name": "d"}, "spec": {"destinationRef": {"name": "x"}},
                                        "status": {"tenants": []}})
    assert st == 201 and "status" not in cr and cr["metadata"]["generation"] == 1
    assert c.request("PUT", crp + "/d", dict(cr, metadata=dict(cr["metadata"], resourceVersion=None)))[0] == 422
    st, cr2, _ = c.request("PATCH", crp + "/d", {"metadata": {"annotations": {"a": "b"}}},
                           "application/merge-patch+json")
    assert cr2["metadata"]["generation"] == 1
    assert c.request("PATCH", crp + "/d", {"spec": {}}, "application/strategic-merge-patch+json")[0] == 415
    st, cr3, _ = c.request("PATCH", crp + "/d/status", {"status": {"tenants": [{"tenantSubdomain": "t"}]},
                                                        "spec": {"destinationRef": {"name": "ignored"}}},
                           "application/merge-patch+json")
    assert cr3["status"]["tenants"] == [{"tenantSubdomain": "t"}] and cr3["spec"]["destinationRef"]["name"] == "x"
    assert cr3["metadata"]["generation"] == 1
    owned = {"metadata": {"name": "d", "ownerReferences": [{"apiVersion": GROUP + "/v1", "kind": "Destination",
                                                            "name": "d", "uid": cr["metadata"]["uid"],
                                                            "controller": True}]},
             "spec": {"type": "ExternalName", "externalName": "d.other.svc.cluster.local"}}
    assert c.request("POST", "/api/v1/namespaces/ns1/services?dryRun=All", owned)[0] == 201
    assert kube.get("Service", "ns1", "d") is None
    assert c.request("POST", "/api/v1/namespaces/ns1/services", owned)[0] == 201
    c.request("DELETE", crp + "/d")
    wait_for(lambda: kube.get("Service", "ns1", "d") is None, 5, what="garbage collection")
    # leases: optimistic concurrency
    lp = "/apis/coordination.k8s.io/v1/namespaces/ns1/leases"
    lease = {"metadata": {"name": "l"}, "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15,
                                                  "renewTime": "2025-01-02T03:04:05.000000Z"}}
    st, l1, _ = c.request("POST", lp, lease)
    assert st == 201
    assert c.request("POST", lp, dict(lease, metadata={"name": "m"}, spec={"renewTime": "2025-01-02T03:04:05Z"}))[0] == 400
    l1["spec"]["holderIdentity"] = "b"
    assert c.request("PUT", lp + "/l", l1)[0] == 200
    assert c.request("PUT", lp + "/l", l1)[1]["reason"] == "Conflict"


# ==========================================================================
# tpmaild --kubernetes


def _shared_names(cr, tenants):
    return ["%s-%s" % (cr, t) for t in tenants]


def test_cr_yields_services_status_and_mail(kube_world, k8s_tpmaild, dovecot, mailboxes):
    kube = kube_world
    dests = th.standard_destinations(dovecot)
    dests["provider"].append(th.pop3_dest("dest-s", "alice", dovecot.users["alice"], dovecot.pop3s_port,
                                          protocol="pop3s", extra={"mail.pop3s.ssl.cafile": dovecot.ca_file}))
    t = k8s_tpmaild(destinations=dests)
    apply_cr(kube, cr_obj("mail", "dest-a"))
    apply_cr(kube, cr_obj("shared", "dest-t", tenants=["tenant-a", "tenant-b"]))
    apply_cr(kube, cr_obj("custom", "dest-bob", port=1110))
    apply_cr(kube, cr_obj("secure", "dest-s"))
    names = ["mail", "custom", "secure"] + _shared_names("shared", ["tenant-a", "tenant-b"])
    wait_services(kube, names)
    crs = {n: kube.get("Destination", CR_NS, n) for n in ("mail", "shared", "custom", "secure")}
    tps = {}
    for name, cr_name, tenant, port in (("mail", "mail", None, 110), ("custom", "custom", None, 1110),
                                         ("secure", "secure", None, 995),
                                         ("shared-tenant-a", "shared", "tenant-a", 110),
                                         ("shared-tenant-b", "shared", "tenant-b", 110)):
        tps[name] = check_service_pair(kube, name, crs[cr_name], tenant, port, t.port_range)
    assert len(set(tps.values())) == 5, tps
    # every replica listens on the Service's targetPort
    svcs = t.wait_services(names)
    for n in names:
        assert svcs[n]["listen"] == "%s:%d" % (th.HOST, tps[n]), svcs[n]
    # POP3 through the tenant endpoints: each tenant's own mailbox
    assert first_message(tps["mail"]) == mailboxes["alice"][0]
    assert first_message(tps["custom"]) == mailboxes["bob"][0]
    assert first_message(tps["secure"]) == mailboxes["alice"][0]        # POP3S upstream
    assert first_message(tps["shared-tenant-a"]) == mailboxes["tenant-a-user"][0]
    assert first_message(tps["shared-tenant-b"]) == mailboxes["tenant-b-user"][0]
    # status, through the status subresource only
    for n in ("mail", "shared", "custom", "secure"):
        c = wait_available(kube, n, "True", reason="ConfigurationSuccessful")
        assert c.get("lastUpdateTime") and c.get("message"), c
        cr = kube.get("Destination", CR_NS, n)
        assert cr["status"].get("observedGeneration") == cr["metadata"]["generation"] == 1, cr["status"]
    assert sorted(x["tenantSubdomain"] for x in kube.get("Destination", CR_NS, "shared")["status"]["tenants"]) \
        == ["tenant-a", "tenant-b"]
    for r in kube.requests(path=r"/destinations/"):
        if r["method"] in ("PUT", "PATCH"):
            assert r["path"].endswith("/status"), "status written through the main resource: %s" % r["path"]
    # ... and kubectl shows it
    y = kubectl(kube, "get", "destinations", "-n", CR_NS, "-o", "yaml").stdout
    assert y.count("reason: ConfigurationSuccessful") == 4, y
    out = kubectl(kube, "get", "dst", "-A").stdout
    assert out.count("ConfigurationSuccessful") == 4, out
    # Events in the CR's namespace
    evs = [e for e in kube.objects("Event", CR_NS) if (e.get("involvedObject") or {}).get("name") == "mail"]
    assert evs, kube.objects("Event")
    io = evs[0]["involvedObject"]
    assert io.get("kind") == "Destination" and io.get("uid") == crs["mail"]["metadata"]["uid"], io
    # the Lease: this replica leads
    lease = kube.get("Lease", NS, LEASE)
    assert lease and lease["spec"]["holderIdentity"] == t.identity, lease
    # nothing written twice
    posts = [r["path"] for r in kube.requests(method="POST", path=r"/services$") if r["status"] == 201]
    created = [(r["path"], r["body"]["metadata"]["name"]) for r in kube.requests(method="POST", path=r"/services$")
               if r["status"] == 201]
    assert len(created) == len(set(created)) == 2 * len(names), posts


def test_tenant_annotation_change(kube_world, k8s_tpmaild, dovecot, mailboxes):
    kube = kube_world
    dests = th.standard_destinations(dovecot)
    dests["tenant-c"] = [th.pop3_dest("dest-t", "bob", dovecot.users["bob"], dovecot.pop3_port)]
    t = k8s_tpmaild(destinations=dests)
    apply_cr(kube, cr_obj("shared", "dest-t", tenants=["tenant-a", "tenant-b"]))
    before = wait_services(kube, _shared_names("shared", ["tenant-a", "tenant-b"]))
    svcs = t.wait_services(["shared-tenant-a", "shared-tenant-b"])
    pid_b = svcs["shared-tenant-b"]["pid"]
    gen = kube.get("Destination", CR_NS, "shared")["metadata"]["generation"]
    mark = kube.request_count()
    # only the annotation changes (kubectl annotate): tenant-a goes, tenant-c comes
    kubectl(kube, "annotate", "dst", "shared", "-n", CR_NS, "--overwrite",
            '%s=["tenant-b", "tenant-c"]' % TENANT_ANNOTATION)
    assert kube.get("Destination", CR_NS, "shared")["metadata"]["generation"] == gen
    after = wait_services(kube, _shared_names("shared", ["tenant-b", "tenant-c"]), absent=["shared-tenant-a"])
    svcs = t.wait_services(["shared-tenant-b", "shared-tenant-c"], absent=["shared-tenant-a"])
    assert set(svcs) == {"shared-tenant-b", "shared-tenant-c"}, sorted(svcs)
    # tenant-b untouched: same proxy, same Services
    assert svcs["shared-tenant-b"]["pid"] == pid_b
    for i in (0, 1):
        assert after["shared-tenant-b"][i]["metadata"]["uid"] == before["shared-tenant-b"][i]["metadata"]["uid"]
        assert after["shared-tenant-b"][i]["metadata"]["resourceVersion"] == \
            before["shared-tenant-b"][i]["metadata"]["resourceVersion"], "tenant-b's Service was rewritten"
    tpc = check_service_pair(kube, "shared-tenant-c", kube.get("Destination", CR_NS, "shared"), "tenant-c", 110,
                             t.port_range)
    assert first_message(tpc) == mailboxes["bob"][0]
    assert first_message(target_port(after["shared-tenant-b"][0])) == mailboxes["tenant-b-user"][0]
    # exactly these writes to Services: tenant-a's two deleted, tenant-c's two created
    svc_writes = sorted(w for w in writes(kube, since=mark) if "/services" in w)
    assert svc_writes == sorted([
        "DELETE /api/v1/namespaces/%s/services/shared-tenant-a -> 200" % NS,
        "DELETE /api/v1/namespaces/%s/services/shared-tenant-a -> 200" % CR_NS,
        "POST /api/v1/namespaces/%s/services -> 201" % NS,
        "POST /api/v1/namespaces/%s/services -> 201" % CR_NS]), svc_writes
    c = wait_available(kube, "shared", "True")
    wait_for(lambda: sorted(x["tenantSubdomain"] for x in
                            (kube.get("Destination", CR_NS, "shared")["status"].get("tenants") or []))
             == ["tenant-b", "tenant-c"], K8S_TIMEOUT, what="status.tenants to follow the annotation")
    assert c["reason"] == "ConfigurationSuccessful"


def test_delete_cr_removes_everything(kube_world, k8s_tpmaild, dovecot, mailboxes):
    kube = kube_world
    t = k8s_tpmaild()
    apply_cr(kube, cr_obj("mail", "dest-a"))
    apply_cr(kube, cr_obj("shared", "dest-t", tenants=["tenant-a", "tenant-b"]))
    names = ["mail"] + _shared_names("shared", ["tenant-a", "tenant-b"])
    wait_services(kube, names)
    svcs = t.wait_services(names)
    pids = [svcs[n]["pid"] for n in _shared_names("shared", ["tenant-a", "tenant-b"])]
    kubectl(kube, "delete", "dst", "shared", "-n", CR_NS)
    wait_services(kube, ["mail"], absent=_shared_names("shared", ["tenant-a", "tenant-b"]))
    t.wait_services(["mail"], absent=_shared_names("shared", ["tenant-a", "tenant-b"]))
    wait_for(lambda: not any(th.proc_alive(p) for p in pids), th.DRAIN_GRACE + 10, what="the proxies to exit")
    assert set(managed_services(kube)) == {(NS, "mail"), (CR_NS, "mail")}
    kubectl(kube, "delete", "dst", "mail", "-n", CR_NS)
    wait_for(lambda: not managed_services(kube), K8S_TIMEOUT, what="every tpmail Service to go")
    wait_for(lambda: not t.services(), K8S_TIMEOUT, what="tpmaild to serve nothing")
    # created again under the same name: a new object, with its own status
    apply_cr(kube, cr_obj("mail", "dest-a"))
    wait_services(kube, ["mail"])
    wait_available(kube, "mail", "True")


def test_cr_deleted_while_tpmaild_is_down(kube_world, k8s_tpmaild, dovecot, mailboxes, tmp_path):
    kube = kube_world
    wd = str(tmp_path / "restart")
    t = k8s_tpmaild(workdir=wd)
    apply_cr(kube, cr_obj("mail", "dest-a"))
    apply_cr(kube, cr_obj("gone", "dest-bob"))
    first = wait_services(kube, ["mail", "gone"])
    t.wait_services(["mail", "gone"])
    assert t.stop() == 0
    # Services stay while tpmaild is down (another replica may serve them)
    assert set(managed_services(kube)) == {(NS, "mail"), (NS, "gone"), (CR_NS, "mail"), (CR_NS, "gone")}
    kubectl(kube, "delete", "dst", "gone", "-n", CR_NS)
    wait_for(lambda: (CR_NS, "gone") not in managed_services(kube), 5, what="GC of the owned Service")
    assert (NS, "gone") in managed_services(kube)
    t2 = k8s_tpmaild(workdir=wd, port_range=t.port_range)
    wait_services(kube, ["mail"], absent=["gone"])
    t2.wait_services(["mail"], absent=["gone"])
    now = managed_services(kube)
    assert set(now) == {(NS, "mail"), (CR_NS, "mail")}
    assert target_port(now[(NS, "mail")]) == target_port(first["mail"][0])
    assert now[(NS, "mail")]["metadata"]["uid"] == first["mail"][0]["metadata"]["uid"]
    assert first_message(target_port(now[(NS, "mail")])) == mailboxes["alice"][0]


def test_watch_failures_lose_and_duplicate_nothing(kube_world, k8s_tpmaild, dovecot, mailboxes):
    kube = kube_world
    kube.max_watch_seconds = 6              # watches also end normally, often
    t = k8s_tpmaild()
    apply_cr(kube, cr_obj("mail", "dest-a"))
    base = wait_services(kube, ["mail"])
    svcs = t.wait_services(["mail"])
    mail_pid = svcs["mail"]["pid"]

    def wait_watching(since):
        wait_for(lambda: any(r["watch"] and "/destinations" in r["path"] and r["status"] == 200
                             for r in kube.requests(since=since)), K8S_TIMEOUT,
                 what="tpmaild to watch Destinations again")

    # 1. the connection drops mid-stream; a CR arrives meanwhile
    mark = kube.request_count()
    kube.drop_watches()
    apply_cr(kube, cr_obj("one", "dest-bob"))
    wait_services(kube, ["mail", "one"])
    t.wait_services(["mail", "one"])
    wait_watching(mark)
    # 2. ERROR 410 in the stream + compaction; the annotation-only change of a new CR
    apply_cr(kube, cr_obj("shared", "dest-t", tenants=["tenant-a"]))
    wait_services(kube, ["shared-tenant-a"])
    mark = kube.request_count()
    kube.compact()
    kube.expire_watches()
    kubectl(kube, "annotate", "dst", "shared", "-n", CR_NS, "--overwrite",
            '%s=["tenant-a", "tenant-b"]' % TENANT_ANNOTATION)
    wait_services(kube, _shared_names("shared", ["tenant-a", "tenant-b"]))
    t.wait_services(_shared_names("shared", ["tenant-a", "tenant-b"]))
    wait_watching(mark)
    # 3. watches refused with HTTP 410 after a compaction, and a deletion the
    #    stream never carried: found by the re-list
    kube.watch_gone = "http"
    mark = kube.request_count()
    kube.fail(503, method="GET", path=r"/destinations$", count=2, watch=True, user=t.user)
    kube.drop_watches()
    kubectl(kube, "delete", "dst", "one", "-n", CR_NS)
    kube.compact()
    wait_services(kube, ["mail"], absent=["one"])
    t.wait_services(["mail"], absent=["one"])
    wait_watching(mark)
    # 4. the API server answers 500 / 429 for a while (tpmaild backs off,
    #    at most 30 s between tries, as client-go)
    kube.fail(500, method="GET", path=r"/destinations", count=2, user=t.user)
    kube.fail(429, method="GET", path=r"/services", count=2, user=t.user)
    kube.drop_watches()
    apply_cr(kube, cr_obj("two", "dest-bob"))
    wait_services(kube, ["mail", "two"], timeout=K8S_TIMEOUT + 30)
    t.wait_services(["mail", "two"])
    # nothing missed, nothing duplicated, nothing restarted that did not change
    svcs = t.services()
    assert set(svcs) == {"mail", "two", "shared-tenant-a", "shared-tenant-b"}, sorted(svcs)
    assert svcs["mail"]["pid"] == mail_pid
    now = managed_services(kube)
    assert set(now) == {(ns, n) for ns in (NS, CR_NS) for n in ("mail", "two", "shared-tenant-a",
                                                               "shared-tenant-b")}, sorted(now)
    for i, ns in ((0, NS), (1, CR_NS)):
        assert now[(ns, "mail")]["metadata"]["uid"] == base["mail"][i]["metadata"]["uid"]
    assert target_port(now[(NS, "mail")]) == target_port(base["mail"][0])
    created = [(r["path"], r["body"]["metadata"]["name"]) for r in kube.requests(method="POST", path=r"/services$")
               if r["status"] == 201]
    assert len(created) == len(set(created)), created
    assert first_message(target_port(now[(NS, "two")])) == mailboxes["bob"][0]
    # the list+watch used what the server offered
    ws = [r for r in kube.requests(path=r"/destinations$") if r["watch"]]
    assert all(r["query"].get("allowWatchBookmarks") == "true" for r in ws), ws[:3]
    assert all(r["query"].get("resourceVersion") for r in ws), [r["query"] for r in ws][:5]


def test_watch_backoff_reset_by_a_working_watch(kube_world, k8s_tpmaild, dovecot, mailboxes):
    """Watches cut abruptly again and again, each after it delivered an
    event: every reconnect waits the first backoff step, instead of 2, 4,
    8 s as if the watches in between had failed (docs/robustness.md,
    finding 7)."""
    kube = kube_world
    t = k8s_tpmaild()
    apply_cr(kube, cr_obj("mail", "dest-a"))
    t.wait_services(["mail"])
    names = ["mail"]
    mark = kube.request_count()
    for name in ("one", "two", "three"):
        kube.drop_watches()
        apply_cr(kube, cr_obj(name, "dest-bob"))
        names.append(name)
        # only the resumed watch can have brought it: a drop does not re-list
        t.wait_services(names)
    waits = re.findall(r"kubernetes destinations: watch ended: [^\n]*?; retrying in (\d+) s",
                       t.log_text())
    assert len(waits) >= 3, t.log_text()[-3000:]
    assert set(waits) == {"2"}, waits
    # each CR came by a resumed watch, not by a list
    assert [r for r in kube.requests(path=r"/destinations$", user=t.user, since=mark)
            if not r["watch"]] == []


def test_two_replicas_one_leader_and_handover(kube_world, k8s_tpmaild, dovecot, mailboxes):
    kube = kube_world
    pr = th.pick_port_range()
    r1 = k8s_tpmaild(name="r1", identity="replica-1", listen="127.0.0.2", port_range=pr)
    r2 = k8s_tpmaild(name="r2", identity="replica-2", listen="127.0.0.3", port_range=pr)
    apply_cr(kube, cr_obj("mail", "dest-a"))
    apply_cr(kube, cr_obj("shared", "dest-t", tenants=["tenant-a", "tenant-b"]))
    names = ["mail"] + _shared_names("shared", ["tenant-a", "tenant-b"])
    before = wait_services(kube, names)
    lease = wait_for(lambda: (kube.get("Lease", NS, LEASE) or {}).get("spec", {}).get("holderIdentity")
                     and kube.get("Lease", NS, LEASE), K8S_TIMEOUT, what="a Lease holder")
    holder = lease["spec"]["holderIdentity"]
    assert holder in ("replica-1", "replica-2"), lease
    assert lease["spec"]["leaseDurationSeconds"] == LEASE_DURATION, lease["spec"]
    leader, follower = (r1, r2) if holder == "replica-1" else (r2, r1)
    # both serve every tenant on the Services' target ports
    for r in (r1, r2):
        svcs = r.wait_services(names)
        for n in names:
            assert svcs[n]["listen"] == "%s:%d" % (r.listen, target_port(before[n][0])), (r.identity, svcs[n])
    tp = target_port(before["mail"][0])
    assert first_message(tp, host=leader.listen) == mailboxes["alice"][0]
    assert first_message(tp, host=follower.listen) == mailboxes["alice"][0]
    wait_available(kube, "mail", "True")
    # only the leader writes
    assert writes(kube, user=leader.user), "the leader wrote nothing"
    assert writes(kube, user=follower.user) == [], writes(kube, user=follower.user)
    # the leader dies: the follower takes over within the lease duration
    mark = kube.request_count()
    t0 = time.monotonic()
    leader.stop(signal.SIGKILL)
    wait_for(lambda: (kube.get("Lease", NS, LEASE) or {}).get("spec", {}).get("holderIdentity")
             == follower.identity, LEASE_DURATION + 8, interval=0.1, what="the follower to take the Lease")
    took = time.monotonic() - t0
    assert took <= LEASE_DURATION + 2 * 1.2 * 2 + 1, "handover took %.1fs" % took
    lease2 = kube.get("Lease", NS, LEASE)
    assert lease2["spec"].get("leaseTransitions", 0) >= lease["spec"].get("leaseTransitions", 0) + 1, lease2
    # Services and target ports unchanged; the follower still serves
    time.sleep(2.5)
    now = managed_services(kube)
    for n in names:
        for i, ns in ((0, NS), (1, CR_NS)):
            assert now[(ns, n)]["metadata"]["uid"] == before[n][i]["metadata"]["uid"], (ns, n)
        assert target_port(now[(NS, n)]) == target_port(before[n][0]), n
    svc_writes = [w for w in writes(kube, since=mark) if "/services" in w]
    assert svc_writes == [], svc_writes
    assert first_message(tp, host=follower.listen) == mailboxes["alice"][0]
    # the new leader acts
    mark = kube.request_count()
    apply_cr(kube, cr_obj("extra", "dest-bob"))
    new = wait_services(kube, ["extra"])
    follower.wait_services(["extra"])
    assert first_message(target_port(new["extra"][0]), host=follower.listen) == mailboxes["bob"][0]
    assert [w for w in writes(kube, since=mark) if w.startswith("POST") and "/services" in w]
    assert {r["user"] for r in kube.requests(since=mark) if r["method"] == "POST" and "/services" in r["path"]} \
        == {follower.user}
    wait_available(kube, "extra", "True")


def test_bad_crs_get_conditions(kube_world, k8s_tpmaild, dovecot, mailboxes):
    kube = kube_world
    kube.validate = False           # what admission would reject must reach tpmaild
    dests = th.standard_destinations(dovecot)
    dests["provider"].append({"Name": "http-dest", "Type": "HTTP", "ProxyType": "Internet",
                              "URL": "https://example.test", "Authentication": "NoAuthentication"})
    t = k8s_tpmaild(destinations=dests)
    # foreign Services in the way (no tpmail labels)
    kube.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "clash", "namespace": NS},
                 "spec": {"selector": {"app": "someone-else"}, "ports": [{"port": 110, "targetPort": 1234}]}})
    kube.create({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "clash2", "namespace": CR_NS},
                 "spec": {"selector": {"app": "someone-else"}, "ports": [{"port": 110}]}})
    foreign = {(NS, "clash"): kube.get("Service", NS, "clash"), (CR_NS, "clash2"): kube.get("Service", CR_NS, "clash2")}
    client = KubeClient(kube)

    def post(obj):
        st, body, _ = client.request("POST", CR_API + "/namespaces/%s/destinations" % CR_NS, obj)
        assert st == 201, body

    base = {"apiVersion": GROUP + "/v1", "kind": "Destination"}
    post(dict(base, metadata={"name": "no-ref"}, spec={}))
    post(dict(base, metadata={"name": "doc-bug", "annotations": {TENANT_ANNOTATION: '["tenant-a"]'}},
              destinationRef={"name": "dest-t"}))
    post(cr_obj("bad-annotation", "dest-t", annotations={TENANT_ANNOTATION: "tenant-a, tenant-b"}))
    post(cr_obj("unknown-dest", "no-such-destination"))
    post(cr_obj("not-mail", "http-dest"))
    post(cr_obj("clash", "dest-a"))
    post(cr_obj("clash2", "dest-bob"))
    post(cr_obj("mail", "dest-a"))
    wait_services(kube, ["mail"])
    wait_available(kube, "mail", "True")
    expect = {
        "no-ref": ("ConfigurationError-CustomResource-Invalid", ["destinationRef"]),
        "doc-bug": ("ConfigurationError-CustomResource-Invalid", ["destinationRef", "spec"]),
        "bad-annotation": ("ConfigurationError-MultitenancyAnnotation-Invalid", ["annotation"]),
        "unknown-dest": ("ConfigurationError-ReferencedDestination-NotFound", ["no-such-destination"]),
        "not-mail": ("ConfigurationError-ReferencedDestination-TypeNotSupported", ["HTTP"]),
        "clash": ("ConfigurationError-K8sResourceWithNameAlreadyPresent", ["clash"]),
        "clash2": ("ConfigurationError-K8sResourceWithNameAlreadyPresent", ["clash2"]),
    }
    problems = []
    for name, (reason, words) in expect.items():
        try:
            c = wait_available(kube, name, "False", reason=reason)
        except AssertionError as e:
            problems.append(str(e))
            continue
        msg = c.get("message") or ""
        for w in words:
            if w.lower() not in msg.lower():
                problems.append("%s: message %r does not name %r" % (name, msg, w))
        if not c.get("lastUpdateTime"):
            problems.append("%s: no lastUpdateTime" % name)
    assert not problems, "\n".join(problems)
    # no Service for any bad CR; the foreign ones untouched
    assert set(managed_services(kube)) == {(NS, "mail"), (CR_NS, "mail")}, sorted(managed_services(kube))
    for (ns, n), svc in foreign.items():
        assert kube.get("Service", ns, n) == svc, "tpmail touched the foreign Service %s/%s" % (ns, n)
    foreign_paths = ("/api/v1/namespaces/%s/services/clash " % NS, "/api/v1/namespaces/%s/services/clash2 " % CR_NS)
    assert not [w for w in writes(kube) if w.split(" ", 1)[1].startswith(foreign_paths)], writes(kube)
    assert set(t.services()) == {"mail"}
    # a lookup failure is an Event on the CR
    wait_for(lambda: [e for e in kube.objects("Event", CR_NS)
                      if (e.get("involvedObject") or {}).get("name") == "unknown-dest"], K8S_TIMEOUT,
             what="an Event on unknown-dest")
    # fixing a CR makes it available
    client.request("PATCH", CR_API + "/namespaces/%s/destinations/unknown-dest" % CR_NS,
                   {"spec": {"destinationRef": {"name": "dest-bob"}}}, "application/merge-patch+json")
    wait_services(kube, ["mail", "unknown-dest"])
    c = wait_available(kube, "unknown-dest", "True")
    cr = kube.get("Destination", CR_NS, "unknown-dest")
    assert cr["status"].get("observedGeneration") == cr["metadata"]["generation"] == 2, cr["status"]
    assert c["reason"] == "ConfigurationSuccessful"
    # the foreign Service goes away: the CR gets its Services (tpmaild does
    # not watch Services it does not own; its 30 s repair pass may notice)
    kube.delete("Service", NS, "clash")
    wait_services(kube, ["mail", "unknown-dest", "clash"], timeout=K8S_TIMEOUT + 30)
    wait_available(kube, "clash", "True")
    # a CR in the way of a foreign Service never served, not even briefly
    log = t.log_text()
    assert "service %s/clash2: started" % CR_NS not in log, "clash2 got a proxy"
    assert log.count("service %s/clash: started" % CR_NS) == 1, "clash got a proxy before its name was free"
    assert set(t.services()) == {"mail", "unknown-dest", "clash"}


def test_duplicate_cr_names_across_namespaces(kube_world, k8s_tpmaild, dovecot, mailboxes):
    kube = kube_world
    k8s_tpmaild()
    apply_cr(kube, cr_obj("mail", "dest-a"))
    wait_services(kube, ["mail"])
    wait_available(kube, "mail", "True")
    apply_cr(kube, cr_obj("mail", "dest-bob", namespace="team-b"))
    c = wait_available(kube, "mail", "False", namespace="team-b",
                       reason="ConfigurationError-DuplicateDestinationCustomResource")
    assert CR_NS in c.get("message", ""), c
    # the first one keeps its Services and its mailbox
    svcs = managed_services(kube)
    assert set(svcs) == {(NS, "mail"), (CR_NS, "mail")}, sorted(svcs)
    assert svcs[(NS, "mail")]["metadata"]["labels"]["tpmail.io/cr-namespace"] == CR_NS
    assert first_message(target_port(svcs[(NS, "mail")])) == mailboxes["alice"][0]
    assert available(kube, "mail")["status"] == "True"


def test_loopback_mail_server_refused_without_allow_loopback(kube_world, k8s_tpmaild, dovecot, mailboxes):
    kube = kube_world
    k8s_tpmaild(allow_loopback=False)
    apply_cr(kube, cr_obj("mail", "dest-a"))
    c = wait_available(kube, "mail", "False")
    assert c["reason"].endswith("LoopbackUrlNotSupported"), c
    assert c["reason"].startswith("ConfigurationError-ReferencedDestination"), c
    assert "127.0.0.1" in c.get("message", ""), c
    assert not managed_services(kube)


def test_managed_services_repaired(kube_world, k8s_tpmaild, dovecot, mailboxes):
    """Someone deletes or edits a Service tpmail owns: it comes back as it
    was (same target port: the proxies listen there)."""
    kube = kube_world
    t = k8s_tpmaild()
    apply_cr(kube, cr_obj("mail", "dest-a"))
    before = wait_services(kube, ["mail"])
    tp = target_port(before["mail"][0])
    t.wait_services(["mail"])
    kube.delete("Service", NS, "mail")
    kube.delete("Service", CR_NS, "mail")
    after = wait_services(kube, ["mail"])
    assert target_port(after["mail"][0]) == tp
    check_service_pair(kube, "mail", kube.get("Destination", CR_NS, "mail"), None, 110, t.port_range)
    kube.patch("Service", NS, "mail", {"spec": {"selector": {"app": "wrong"}}})
    wait_for(lambda: kube.get("Service", NS, "mail")["spec"]["selector"] == {"app.kubernetes.io/name": "tpmail"},
             K8S_TIMEOUT, what="the selector to be repaired")
    assert first_message(tp) == mailboxes["alice"][0]


def test_idle_tpmaild_writes_only_its_lease(kube_world, k8s_tpmaild, dovecot, mailboxes):
    """No hot loops: once everything is published, tpmaild writes nothing
    but Lease renewals (every 2 s), also across its periodic repair pass;
    and the status it writes holds only fields the CRD declares (a real API
    server prunes the others, silently)."""
    kube = kube_world
    t = k8s_tpmaild()
    apply_cr(kube, cr_obj("mail", "dest-a"))
    apply_cr(kube, cr_obj("shared", "dest-t", tenants=["tenant-a", "tenant-b"]))
    wait_services(kube, ["mail"] + _shared_names("shared", ["tenant-a", "tenant-b"]))
    wait_available(kube, "mail", "True")
    wait_available(kube, "shared", "True")
    time.sleep(2)
    mark = kube.request_count()
    idle = float(os.environ.get("TPMAIL_TEST_K8S_IDLE", "33"))     # > tpmaild's 30 s repair period
    time.sleep(idle)
    assert writes(kube, since=mark) == [], writes(kube, since=mark)
    renewals = [r for r in kube.requests(since=mark, method="PUT", path=r"/leases/%s$" % LEASE)]
    assert idle / 2 * 0.5 <= len(renewals) <= idle / 2 * 1.5 + 1, len(renewals)
    assert all(r["status"] == 200 for r in renewals), [r["status"] for r in renewals]
    # the status fields tpmaild sends
    crd = kube.get("CustomResourceDefinition", None, "destinations.%s" % GROUP)
    declared = set(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"])
    sent = set()
    for r in kube.requests(path=r"/destinations/[^/]+/status$"):
        if r["method"] in ("PUT", "PATCH") and isinstance(r["body"], dict):
            sent |= set((r["body"].get("status") or {}).keys())
    assert sent and sent <= declared, "status fields the CRD does not declare (pruned by a real " \
        "API server): %s" % sorted(sent - declared)


def _http_get(port, path):
    import http.client
    c = http.client.HTTPConnection(th.HOST, port, timeout=5)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        c.close()


def test_in_cluster_defaults_health_and_token_rotation(kube_world, k8s_tpmaild, dovecot, mailboxes):
    """No --kube-api and no --identity: the API server from
    KUBERNETES_SERVICE_HOST/PORT, the identity from POD_NAME; /healthz and
    /readyz; a rotated token file is picked up without a restart."""
    kube = kube_world
    from dovecot import free_port
    hp = free_port()
    pod = "tpmail-5d8f7c9b6-x2x4q"
    t = k8s_tpmaild(in_cluster=True, identity=pod, args=["--http", "%s:%d" % (th.HOST, hp)],
                    env={"KUBERNETES_SERVICE_HOST": th.HOST, "KUBERNETES_SERVICE_PORT": str(kube.port),
                         "POD_NAME": pod, "POD_NAMESPACE": NS})
    assert "--kube-api" not in t.argv() and "--identity" not in t.argv()
    apply_cr(kube, cr_obj("mail", "dest-a"))
    wait_services(kube, ["mail"])
    lease = kube.get("Lease", NS, LEASE)
    assert lease["spec"]["holderIdentity"] == pod, lease["spec"]
    assert _http_get(hp, "/healthz")[0] == 200
    wait_for(lambda: _http_get(hp, "/readyz")[0] == 200, K8S_TIMEOUT, what="/readyz 200")
    # rotate the token: the old one stops working at once
    new = "rotated-token"
    kube.add_token(new, "sa-rotated")
    kube.write_token_file(t.token_file, new)
    kube.remove_token(t.token)
    mark = kube.request_count()
    apply_cr(kube, cr_obj("after-rotation", "dest-bob"))
    got = wait_services(kube, ["after-rotation"])
    assert first_message(target_port(got["after-rotation"][0])) == mailboxes["bob"][0]
    users = {r["user"] for r in kube.requests(since=mark) if r["method"] == "POST" and "/services" in r["path"]
             and r["status"] == 201}
    assert users == {"sa-rotated"}, users
    wait_for(lambda: (kube.get("Lease", NS, LEASE)["spec"]["holderIdentity"] == pod
                      and [r for r in kube.requests(since=mark, path="/leases/") if r["user"] == "sa-rotated"
                           and r["method"] == "PUT" and r["status"] == 200]), K8S_TIMEOUT,
             what="the Lease renewed with the new token")
    assert t.alive()


def test_watch_namespaces(kube_world, k8s_tpmaild, dovecot, mailboxes):
    kube = kube_world
    k8s_tpmaild(args=["--watch-namespaces", "%s,team-c" % CR_NS])
    apply_cr(kube, cr_obj("mail", "dest-a"))
    apply_cr(kube, cr_obj("elsewhere", "dest-bob", namespace="team-b"))
    apply_cr(kube, cr_obj("third", "dest-bob", namespace="team-c"))
    wait_services(kube, ["mail"])
    wait_services(kube, ["third"], cr_namespace="team-c")
    wait_available(kube, "third", "True", namespace="team-c")
    time.sleep(1)
    assert (NS, "elsewhere") not in managed_services(kube)
    assert "status" not in kube.get("Destination", "team-b", "elsewhere")
    paths = {r["path"] for r in kube.requests(path=r"/destinations$") if r["user"] == "sa-tpmaild-0"}
    assert paths == {CR_API + "/namespaces/%s/destinations" % n for n in (CR_NS, "team-c")}, paths


def test_cr_replaced_under_the_same_name_while_not_watching(kube_world, k8s_tpmaild, dovecot, mailboxes):
    """Deleted and created again (a new uid) while tpmaild's watch is down:
    the re-list finds a different object under the same name; the
    CR-namespace Service must end up owned by the new uid, and the endpoint
    serves the new destination."""
    kube = kube_world
    t = k8s_tpmaild()
    apply_cr(kube, cr_obj("mail", "dest-a"))
    before = wait_services(kube, ["mail"])
    t.wait_services(["mail"])
    kube.fail(503, method="GET", path=r"/destinations$", count=2, watch=True, user=t.user)
    kube.drop_watches()
    kubectl(kube, "delete", "dst", "mail", "-n", CR_NS)
    apply_cr(kube, cr_obj("mail", "dest-bob"))
    new_uid = kube.get("Destination", CR_NS, "mail")["metadata"]["uid"]

    def settled():
        svcs = managed_services(kube)
        ext = svcs.get((CR_NS, "mail"))
        if not ext or (NS, "mail") not in svcs:
            return None
        owners = ext["metadata"].get("ownerReferences") or []
        return svcs if [o.get("uid") for o in owners] == [new_uid] else None
    svcs = wait_for(settled, K8S_TIMEOUT + 30, interval=0.2, what="the Services to follow the new CR")
    check_service_pair(kube, "mail", kube.get("Destination", CR_NS, "mail"), None, 110, t.port_range)
    wait_for(lambda: first_message(target_port(svcs[(NS, "mail")])) == mailboxes["bob"][0], K8S_TIMEOUT,
             interval=0.3, what="the endpoint to serve bob's mailbox")
    c = wait_available(kube, "mail", "True", timeout=K8S_TIMEOUT + 30)
    assert kube.get("Destination", CR_NS, "mail")["status"]["observedGeneration"] == 1, c
    # a bounded number of Service writes while tpmaild still believed the old
    # CR (the Service it made for the old uid is garbage-collected at once)
    posts = [r for r in kube.requests(method="POST", path=r"/namespaces/%s/services$" % CR_NS)]
    assert len(posts) <= 6, "%d POSTs of %s/mail: %s" % (len(posts), CR_NS, [round(r["time"] - posts[0]["time"], 2)
                                                                           for r in posts])
    assert before["mail"][0]["metadata"]["uid"]      # (the proxy-namespace one may be kept or replaced)
