"""A test Kubernetes API server (standard library only, loopback only).

Written to the public API conventions, so that both tpmaild's Kubernetes
mode and the real ``kubectl`` can talk to it:

    with KubeApiServer(workdir) as kube:          # HTTPS, bearer token
        kube.kubeconfig_path                      # for kubectl (KUBECONFIG=...)
        kube.url, kube.ca_file, kube.token_file   # for tpmaild --kube-*
        kube.objects("Service", "team-a")         # test hooks, see below

What it serves
--------------
* ``/version``, ``/healthz``, ``/livez``, ``/readyz``; discovery (legacy JSON:
  ``/api``, ``/api/v1``, ``/apis``, ``/apis/<g>``, ``/apis/<g>/<v>``);
  ``/openapi/v3`` (an index and one small document per group-version, enough
  for kubectl to send ``fieldValidation=Strict``); ``/openapi/v2`` is 404,
  which kubectl tolerates.
* Built-in kinds: core/v1 Namespaces, Services, Events, ServiceAccounts,
  ConfigMaps, Secrets; apps/v1 Deployments; rbac.authorization.k8s.io/v1
  (Cluster)Roles and (Cluster)RoleBindings; coordination.k8s.io/v1 Leases;
  discovery.k8s.io/v1 EndpointSlices; policy/v1 PodDisruptionBudgets;
  apiextensions.k8s.io/v1 CustomResourceDefinitions.  Creating a CRD serves
  its kind at once (status ``Established``); deleting it deletes its objects.
* Verbs: get, list (``labelSelector``, ``fieldSelector``, ``limit`` +
  ``continue`` over a consistent snapshot, ``resourceVersion`` +
  ``resourceVersionMatch``), watch (``watch=true``, ``resourceVersion``,
  ``allowWatchBookmarks``, ``timeoutSeconds``, selectors; chunked,
  newline-terminated JSON events), create (``generateName``, 409
  AlreadyExists), update (PUT; stale ``resourceVersion`` -> 409 Conflict; a
  custom resource PUT without one -> 422), patch (merge, JSON patch,
  strategic merge for built-in kinds only - custom resources answer 415 as
  the real server does - and a simplified server-side apply), delete
  (``preconditions``, finalizers -> ``deletionTimestamp``), the ``/status``
  subresource (PUT/PATCH change only ``.status``; writes to the main resource
  keep the stored status), ``dryRun=All`` on every write, and
  ``fieldValidation`` (Strict -> 400 on unknown fields, Warn -> a
  ``Warning`` header, Ignore) for custom resources.
* Object metadata: ``uid``, ``resourceVersion`` (one global counter, as a
  string), ``creationTimestamp``, ``generation`` (custom resources,
  Deployments, CRDs: 1 on create, +1 only when something outside
  ``metadata`` and ``status`` changes - so an annotation edit does not bump
  it).  Services get a ``clusterIP`` (not for ``ExternalName``), port
  ``protocol`` and ``targetPort`` defaults.
* Custom resources are pruned and validated against the CRD's structural
  schema (type, required, enum, minimum/maximum, minLength/maxLength,
  pattern, items, additionalProperties, defaults;
  ``x-kubernetes-preserve-unknown-fields`` honoured; CEL rules are not
  evaluated), with the real server's messages and 422 ``Invalid``.
* Garbage collection: a short while after an object is deleted, every object
  all of whose ``ownerReferences`` name missing uids (same namespace, or
  cluster-scoped owners) is deleted too, recursively (background
  propagation).  Deleting a Namespace deletes what is in it.
* Namespaces are created on first use (``auto_namespaces=True``); the real
  server would answer 404 instead.

``validate=False``
------------------
The real API server rejects a Destination without ``spec`` or without
``spec.destinationRef.name`` at admission, and prunes fields the schema does
not declare (such as a top-level ``destinationRef``, SAP's shared-mode doc
bug).  tpmaild must still report such CRs itself (they can reach it through
a CRD with a looser schema or an older one); to test that, construct the
server with ``validate=False`` (or set ``kube.validate = False`` at any
time): custom resources are then stored as sent, with neither schema
validation nor pruning.  Everything else behaves the same.

Watches and their failures
--------------------------
Every write is recorded in a history.  A watch from ``resourceVersion`` R
replays the history after R, then streams; a watch without R (or "0")
starts with synthetic ADDED events.  Objects that start or stop matching a
watch's selectors arrive as ADDED / DELETED, as from the real server.
BOOKMARKs (``allowWatchBookmarks=true``) come every ``bookmark_interval``
seconds and just before a watch ends at ``timeoutSeconds`` (capped by
``max_watch_seconds``).  Test hooks:

* ``compact()``: forget the history; every resourceVersion issued so far
  becomes too old: a watch from one gets ``200`` + one ``ERROR`` event with
  a ``Status`` 410 ``Expired`` (or ``HTTP 410`` with ``watch_gone="http"``),
  a list with ``resourceVersionMatch=Exact`` or with ``limit`` and such an
  RV gets ``HTTP 410``, and so does a ``continue`` token issued before.
* ``expire_watches()``: every open watch gets an ERROR 410 event and ends.
* ``drop_watches(abrupt=True)``: every open watch is cut (no final chunk).
* ``fail(code, method=..., path=..., count=...)``: the next matching
  requests get that error ``Status`` (429 and 503 with ``Retry-After: 1``).
* ``objects(kind, ns)``, ``get(kind, ns, name)``, ``create(obj)``,
  ``update(obj)``, ``delete(kind, ns, name)``, ``patch_status(...)``:
  direct access, with the same semantics and events as over HTTP.
* ``requests(...)``: the request log (method, path, query, user, status,
  content type, the JSON body); ``watches(...)``: open watches.

Authentication: HTTPS (self-signed CA made with ``openssl``, certificate for
127.0.0.1 and localhost) with bearer tokens; each token maps to a user name
that the request log records (``add_token``), so a test can tell replicas
apart.  ``tls=False`` serves plain HTTP without authentication (kubectl
sends no credentials over http).

Script: ``python3 kube_apiserver.py --workdir DIR [--port N] [--http]
[--no-validate] [--lifetime S]`` prints one JSON line (url, kubeconfig,
ca_file, token_file) and serves until the lifetime ends or SIGTERM.
"""

import base64
import copy
import datetime
import http.server
import json
import os
import re
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid

try:
    from . import common
except ImportError:                 # run as a script
    import common

HOST = "127.0.0.1"
IDLE_TIMEOUT = 30.0          # a silent keep-alive connection is closed after this
OPENSSL = os.environ.get("OPENSSL_BIN") or "openssl"

# --------------------------------------------------------------------------
# errors


class ApiError(Exception):
    """An error answered as a metav1.Status."""

    REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
               405: "MethodNotAllowed", 406: "NotAcceptable", 409: "Conflict", 410: "Expired",
               415: "UnsupportedMediaType", 422: "Invalid", 429: "TooManyRequests",
               500: "InternalError", 503: "ServiceUnavailable", 504: "Timeout"}

    def __init__(self, code, message, reason=None, details=None, headers=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or self.REASONS.get(code, "Unknown")
        self.details = details
        self.headers = headers or {}

    def status(self):
        st = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
              "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            st["details"] = self.details
        return st


def not_found(rt, name):
    return ApiError(404, '%s "%s" not found' % (rt.resource_label(), name),
                    details={"name": name, "group": rt.group, "kind": rt.plural})


def invalid(rt, name, causes):
    """422 Invalid from [(field, reason, message)] the way the apiserver words it."""
    parts = ["%s: %s" % (f, m) if f else m for f, _, m in causes]
    msg = '%s "%s" is invalid: ' % (rt.kind_label(), name)
    msg += parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    return ApiError(422, msg, details={
        "name": name, "group": rt.group, "kind": rt.kind,
        "causes": [{"reason": r, "message": m, "field": f} for f, r, m in causes]})


# --------------------------------------------------------------------------
# small helpers

def now_rfc3339():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s):
    try:
        s = s.replace("Z", "+00:00")
        if "." in s:
            head, rest = s.split(".", 1)
            m = re.match(r"(\d+)(.*)", rest)
            s = head + "." + m.group(1)[:6].ljust(6, "0") + m.group(2)
        return datetime.datetime.fromisoformat(s)
    except (ValueError, AttributeError):
        return None


def human_duration(ts):
    t = parse_time(ts) if isinstance(ts, str) else None
    if t is None:
        return "<unknown>"
    secs = int((datetime.datetime.now(datetime.timezone.utc) - t).total_seconds())
    if secs < 0:
        secs = 0
    if secs < 120:
        return "%ds" % secs
    if secs < 600:
        return "%dm%ds" % (secs // 60, secs % 60) if secs % 60 else "%dm" % (secs // 60)
    if secs < 3 * 3600:
        return "%dm" % (secs // 60)
    if secs < 48 * 3600:
        return "%dh" % (secs // 3600)
    return "%dd" % (secs // 86400)


DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
MICROTIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}(Z|[+-]\d{2}:\d{2})$")
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")
IANA_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,13}[a-z0-9])?$")


def is_dns1123_subdomain(s):
    return isinstance(s, str) and 0 < len(s) <= 253 and bool(DNS1123_SUBDOMAIN.match(s))


def check_qualified_key(k):
    """Label/annotation key: [prefix/]name (name <= 63, prefix a DNS subdomain)."""
    if not isinstance(k, str) or not k:
        return False
    if "/" in k:
        prefix, name = k.split("/", 1)
        if not is_dns1123_subdomain(prefix):
            return False
    else:
        name = k
    return 0 < len(name) <= 63 and bool(QUALIFIED_NAME.match(name))


def deep_merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    out = dict(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = deep_merge_patch(out.get(k), v)
    return out


def _ptr_tokens(ptr):
    if ptr == "":
        return []
    if not ptr.startswith("/"):
        raise ValueError("invalid JSON pointer %r" % ptr)
    return [t.replace("~1", "/").replace("~0", "~") for t in ptr[1:].split("/")]


def json_patch(doc, ops):
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test)."""
    doc = copy.deepcopy(doc)
    if not isinstance(ops, list):
        raise ValueError("a JSON patch is a list of operations")

    def parent(d, toks):
        for t in toks[:-1]:
            if isinstance(d, list):
                d = d[int(t)]
            elif isinstance(d, dict):
                d = d[t]
            else:
                raise KeyError(t)
        return d

    def get(d, toks):
        for t in toks:
            d = d[int(t)] if isinstance(d, list) else d[t]
        return d

    def remove(d, toks):
        p = parent(d, toks)
        last = toks[-1]
        if isinstance(p, list):
            return p.pop(int(last))
        return p.pop(last)

    def add(d, toks, value):
        if not toks:
            return value
        p = parent(d, toks)
        last = toks[-1]
        if isinstance(p, list):
            if last == "-":
                p.append(value)
            else:
                i = int(last)
                if i < 0 or i > len(p):
                    raise IndexError(last)
                p.insert(i, value)
        elif isinstance(p, dict):
            p[last] = value
        else:
            raise KeyError(last)
        return d

    for op in ops:
        kind = op.get("op")
        toks = _ptr_tokens(op.get("path", ""))
        try:
            if kind == "add":
                doc = add(doc, toks, copy.deepcopy(op["value"]))
            elif kind == "remove":
                remove(doc, toks)
            elif kind == "replace":
                if not toks:
                    doc = copy.deepcopy(op["value"])
                else:
                    get(doc, toks)          # must exist
                    p = parent(doc, toks)
                    if isinstance(p, list):
                        p[int(toks[-1])] = copy.deepcopy(op["value"])
                    else:
                        p[toks[-1]] = copy.deepcopy(op["value"])
            elif kind in ("move", "copy"):
                src = _ptr_tokens(op["from"])
                v = copy.deepcopy(get(doc, src))
                if kind == "move":
                    remove(doc, src)
                doc = add(doc, toks, v)
            elif kind == "test":
                if get(doc, toks) != op.get("value"):
                    raise AssertionError("testing value %s failed" % op.get("path"))
            else:
                raise ValueError("unknown JSON patch op %r" % kind)
        except AssertionError:
            raise
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ValueError("JSON patch %s %s: %s" % (kind, op.get("path"), e))
    return doc


# strategic merge patch: merge keys of the built-in kinds' lists (by field name)
SMP_MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "env": "name", "volumes": "name", "volumeMounts": "mountPath", "volumeDevices": "devicePath",
    "imagePullSecrets": "name", "ownerReferences": "uid", "conditions": "type",
    "hostAliases": "ip", "topologySpreadConstraints": "topologyKey", "resourceClaims": "name",
}


def strategic_merge_patch(target, patch, field=None):
    """A strategic merge patch over the built-in kinds' common lists."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if not isinstance(target, dict):
        target = {}
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return None
    out = dict(target)
    retain = patch.get("$retainKeys")
    for k, v in patch.items():
        if k in ("$patch", "$retainKeys"):
            continue
        if k.startswith("$setElementOrder/"):
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            f = k.split("/", 1)[1]
            if isinstance(out.get(f), list):
                out[f] = [x for x in out[f] if x not in (v or [])]
            continue
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict):
            r = strategic_merge_patch(out.get(k), v, k)
            if r is None:
                out.pop(k, None)
            else:
                out[k] = r
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            key = SMP_MERGE_KEYS.get(k)
            if k == "ports":
                key = "containerPort" if any("containerPort" in x for x in v) else "port"
            if key is None or not isinstance(out.get(k), list):
                out[k] = [{a: b for a, b in x.items() if a != "$patch"} for x in v
                          if x.get("$patch") != "delete"]
                continue
            cur = [copy.deepcopy(x) for x in out[k]]
            for item in v:
                kv = item.get(key)
                idx = next((i for i, x in enumerate(cur) if isinstance(x, dict) and x.get(key) == kv), None)
                if item.get("$patch") == "delete":
                    if idx is not None:
                        cur.pop(idx)
                elif idx is None:
                    cur.append({a: b for a, b in item.items() if a != "$patch"})
                else:
                    cur[idx] = strategic_merge_patch(cur[idx], item, k)
            out[k] = cur
        else:
            out[k] = copy.deepcopy(v)
    if isinstance(retain, list):
        out = {k: v for k, v in out.items() if k in retain}
    return out


# --------------------------------------------------------------------------
# selectors

def parse_label_selector(s):
    """labelSelector string -> list of (key, op, values)."""
    reqs = []
    if not s:
        return reqs
    parts = []
    depth = 0
    cur = ""
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    for p in parts:
        p = p.strip()
        if not p:
            continue
        m = re.match(r"^(\S+)\s+(in|notin)\s*\((.*)\)$", p)
        if m:
            vals = [v.strip() for v in m.group(3).split(",") if v.strip() or True]
            reqs.append((m.group(1), m.group(2), vals))
            continue
        if p.startswith("!"):
            reqs.append((p[1:].strip(), "!exists", []))
            continue
        m = re.match(r"^([^=!]+?)\s*(==|=|!=)\s*(.*)$", p)
        if m:
            op = {"==": "=", "=": "=", "!=": "!="}[m.group(2)]
            reqs.append((m.group(1).strip(), op, [m.group(3).strip()]))
            continue
        if re.match(r"^[A-Za-z0-9_./-]+$", p):
            reqs.append((p, "exists", []))
            continue
        raise ApiError(400, "unable to parse requirement: %r" % p)
    return reqs


def label_match(labels, reqs):
    labels = labels or {}
    for k, op, vals in reqs:
        has = k in labels
        v = labels.get(k)
        if op == "=" and v != vals[0]:
            return False
        if op == "!=" and has and v == vals[0]:
            return False
        if op == "in" and (not has or v not in vals):
            return False
        if op == "notin" and has and v in vals:
            return False
        if op == "exists" and not has:
            return False
        if op == "!exists" and has:
            return False
    return True


def parse_field_selector(s):
    reqs = []
    for p in (s or "").split(","):
        p = p.strip()
        if not p:
            continue
        m = re.match(r"^([^=!]+?)\s*(==|=|!=)\s*(.*)$", p)
        if not m:
            raise ApiError(400, "invalid field selector: %r" % p)
        reqs.append((m.group(1).strip(), "!=" if m.group(2) == "!=" else "=", m.group(3).strip()))
    return reqs


def field_value(obj, path):
    cur = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def field_match(obj, reqs):
    for path, op, val in reqs:
        v = field_value(obj, path)
        if (op == "=") != (v == val):
            return False
    return True


# --------------------------------------------------------------------------
# a JSONPath subset for printer columns: .a.b, [N], [-1], [*], ['k'], [?(@.k=="v")]

def jsonpath(obj, path):
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    if path.startswith("$"):
        path = path[1:]
    toks = re.findall(r"\.([A-Za-z0-9_-]+)|\[\?\(@\.([A-Za-z0-9_.-]+)\s*==\s*['\"]([^'\"]*)['\"]\)\]"
                      r"|\[(-?\d+|\*)\]|\[['\"]([^'\"]+)['\"]\]", path)
    cur = [obj]
    for name, fkey, fval, idx, qname in toks:
        nxt = []
        for c in cur:
            if name or qname:
                key = name or qname
                if isinstance(c, dict) and key in c:
                    nxt.append(c[key])
            elif fkey:
                if isinstance(c, list):
                    nxt.extend(x for x in c if field_value(x, fkey) == fval)
            elif idx:
                if isinstance(c, list):
                    if idx == "*":
                        nxt.extend(c)
                    else:
                        i = int(idx)
                        if -len(c) <= i < len(c):
                            nxt.append(c[i])
        cur = nxt
    return cur


# --------------------------------------------------------------------------
# resource types

class ResourceType:
    def __init__(self, group, version, plural, kind, namespaced=True, short_names=(),
                 singular=None, status=False, generation=False, categories=(), crd=None,
                 verbs=("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")):
        self.group = group
        self.version = version
        self.plural = plural
        self.kind = kind
        self.namespaced = namespaced
        self.short_names = list(short_names)
        self.singular = singular or kind.lower()
        self.status = status
        self.generation = generation
        self.categories = list(categories)
        self.crd = crd                  # the CRD version dict for custom resources
        self.verbs = list(verbs)

    @property
    def key(self):
        return (self.group, self.plural)

    @property
    def gv(self):
        return "%s/%s" % (self.group, self.version) if self.group else self.version

    @property
    def custom(self):
        return self.crd is not None

    def resource_label(self):
        return "%s.%s" % (self.plural, self.group) if self.group else self.plural

    def kind_label(self):
        return "%s.%s" % (self.kind, self.group) if self.group else self.kind

    def schema(self):
        if not self.crd:
            return None
        return (self.crd.get("schema") or {}).get("openAPIV3Schema")

    def printer_columns(self):
        return (self.crd or {}).get("additionalPrinterColumns")


BUILTIN_TYPES = [
    ResourceType("", "v1", "namespaces", "Namespace", namespaced=False, short_names=["ns"], status=True,
                 verbs=("create", "delete", "get", "list", "patch", "update", "watch")),
    ResourceType("", "v1", "services", "Service", short_names=["svc"], status=True, categories=["all"]),
    ResourceType("", "v1", "events", "Event", short_names=["ev"]),
    ResourceType("", "v1", "serviceaccounts", "ServiceAccount", short_names=["sa"]),
    ResourceType("", "v1", "configmaps", "ConfigMap", short_names=["cm"]),
    ResourceType("", "v1", "secrets", "Secret"),
    ResourceType("apps", "v1", "deployments", "Deployment", short_names=["deploy"], status=True,
                 generation=True, categories=["all"]),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", namespaced=False),
    ResourceType("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding",
                 namespaced=False),
    ResourceType("rbac.authorization.k8s.io", "v1", "roles", "Role"),
    ResourceType("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
    ResourceType("coordination.k8s.io", "v1", "leases", "Lease"),
    ResourceType("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice"),
    ResourceType("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", short_names=["pdb"],
                 status=True, generation=True),
    ResourceType("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
                 namespaced=False, short_names=["crd", "crds"], status=True, generation=True),
]

OBJECT_META_FIELDS = {
    "name", "generateName", "namespace", "selfLink", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "labels",
    "annotations", "ownerReferences", "finalizers", "managedFields",
}


# --------------------------------------------------------------------------
# structural schema: defaulting, pruning, validation

def _type_ok(v, t):
    if t == "object":
        return isinstance(v, dict)
    if t == "array":
        return isinstance(v, list)
    if t == "string":
        return isinstance(v, str)
    if t == "integer":
        return isinstance(v, int) and not isinstance(v, bool)
    if t == "number":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if t == "boolean":
        return isinstance(v, bool)
    return True


_GO_TYPE = {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number", type(None): "null"}


def schema_default(v, sch):
    """Apply ``default`` values of the schema (in place where possible)."""
    if not isinstance(sch, dict):
        return v
    if isinstance(v, dict):
        props = sch.get("properties") or {}
        for k, ps in props.items():
            if k not in v and isinstance(ps, dict) and "default" in ps:
                v[k] = copy.deepcopy(ps["default"])
            if k in v:
                v[k] = schema_default(v[k], ps)
        ap = sch.get("additionalProperties")
        if isinstance(ap, dict):
            for k in list(v):
                if k not in props:
                    v[k] = schema_default(v[k], ap)
    elif isinstance(v, list) and isinstance(sch.get("items"), dict):
        return [schema_default(x, sch["items"]) for x in v]
    return v


def schema_prune(v, sch, path, unknown):
    """Drop fields the schema does not declare; record their paths."""
    if not isinstance(sch, dict):
        return v
    if sch.get("x-kubernetes-preserve-unknown-fields") and not sch.get("properties"):
        return v
    if isinstance(v, dict) and (sch.get("type") == "object" or "properties" in sch
                                or "additionalProperties" in sch):
        props = sch.get("properties") or {}
        ap = sch.get("additionalProperties")
        out = {}
        for k, x in v.items():
            p = "%s.%s" % (path, k) if path else k
            if k in props:
                out[k] = schema_prune(x, props[k], p, unknown)
            elif isinstance(ap, dict):
                out[k] = schema_prune(x, ap, p, unknown)
            elif ap is True or sch.get("x-kubernetes-preserve-unknown-fields"):
                out[k] = x
            else:
                unknown.append(p)
        return out
    if isinstance(v, list) and isinstance(sch.get("items"), dict):
        return [schema_prune(x, sch["items"], "%s[%d]" % (path, i), unknown) for i, x in enumerate(v)]
    return v


def schema_validate(v, sch, path, errs):
    """Append (field, reason, message) tuples to errs, worded as the apiserver does."""
    if not isinstance(sch, dict):
        return
    if v is None:
        if not sch.get("nullable"):
            t = sch.get("type")
            if t:
                errs.append((path, "FieldValueTypeInvalid",
                             'Invalid value: "null": %s in body must be of type %s: "null"' % (path, t)))
        return
    t = sch.get("type")
    if sch.get("x-kubernetes-int-or-string"):
        if not (isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool))):
            errs.append((path, "FieldValueTypeInvalid",
                         'Invalid value: "%s": %s in body must be of type integer,string: "%s"'
                         % (_GO_TYPE.get(type(v), "?"), path, _GO_TYPE.get(type(v), "?"))))
        return
    if t and not _type_ok(v, t):
        errs.append((path, "FieldValueTypeInvalid",
                     'Invalid value: "%s": %s in body must be of type %s: "%s"'
                     % (_GO_TYPE.get(type(v), "?"), path, t, _GO_TYPE.get(type(v), "?"))))
        return
    if "enum" in sch and v not in sch["enum"]:
        errs.append((path, "FieldValueNotSupported", "Unsupported value: %s: supported values: %s"
                     % (json.dumps(v), ", ".join(json.dumps(x) for x in sch["enum"]))))
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if "minimum" in sch and (v < sch["minimum"] or (sch.get("exclusiveMinimum") and v == sch["minimum"])):
            errs.append((path, "FieldValueInvalid", "Invalid value: %s: %s in body should be greater than "
                         "or equal to %s" % (v, path, sch["minimum"])))
        if "maximum" in sch and (v > sch["maximum"] or (sch.get("exclusiveMaximum") and v == sch["maximum"])):
            errs.append((path, "FieldValueInvalid", "Invalid value: %s: %s in body should be less than "
                         "or equal to %s" % (v, path, sch["maximum"])))
    if isinstance(v, str):
        if "minLength" in sch and len(v) < sch["minLength"]:
            errs.append((path, "FieldValueInvalid", 'Invalid value: "%s": %s in body should be at least '
                         '%d chars long' % (v, path, sch["minLength"])))
        if "maxLength" in sch and len(v) > sch["maxLength"]:
            errs.append((path, "FieldValueTooLong", "Too long: may not be more than %d bytes"
                         % sch["maxLength"]))
        if "pattern" in sch and not re.search(sch["pattern"], v):
            errs.append((path, "FieldValueInvalid", 'Invalid value: "%s": %s in body should match \'%s\''
                         % (v, path, sch["pattern"])))
    if isinstance(v, dict):
        for r in sch.get("required") or []:
            if r not in v:
                errs.append(("%s.%s" % (path, r) if path else r, "FieldValueRequired", "Required value"))
        props = sch.get("properties") or {}
        ap = sch.get("additionalProperties")
        for k, x in v.items():
            p = "%s.%s" % (path, k) if path else k
            if k in props:
                schema_validate(x, props[k], p, errs)
            elif isinstance(ap, dict):
                schema_validate(x, ap, p, errs)
        if "minProperties" in sch and len(v) < sch["minProperties"]:
            errs.append((path, "FieldValueInvalid", "Invalid value: %d: %s in body should have at least %d "
                         "properties" % (len(v), path, sch["minProperties"])))
    if isinstance(v, list):
        if "minItems" in sch and len(v) < sch["minItems"]:
            errs.append((path, "FieldValueInvalid", "Invalid value: %d: %s in body should have at least %d "
                         "items" % (len(v), path, sch["minItems"])))
        if "maxItems" in sch and len(v) > sch["maxItems"]:
            errs.append((path, "FieldValueTooMany", "Too many: %d: must have at most %d items"
                         % (len(v), sch["maxItems"])))
        items = sch.get("items")
        for i, x in enumerate(v):
            schema_validate(x, items, "%s[%d]" % (path, i), errs)
        if sch.get("x-kubernetes-list-type") == "map":
            keys = sch.get("x-kubernetes-list-map-keys") or []
            seen = set()
            for i, x in enumerate(v):
                if isinstance(x, dict):
                    kv = tuple(json.dumps(x.get(k)) for k in keys)
                    if kv in seen:
                        errs.append(("%s[%d]" % (path, i), "FieldValueDuplicate",
                                     "Duplicate value: %s" % json.dumps({k: x.get(k) for k in keys})))
                    seen.add(kv)


def structural_errors(sch, path="openAPIV3Schema"):
    """A few of the structural-schema rules a v1 CRD must follow."""
    errs = []
    if not isinstance(sch, dict):
        return [(path, "FieldValueRequired", "Required value: schemas are required")]
    t = sch.get("type")
    if not t and not sch.get("x-kubernetes-int-or-string") and not sch.get("x-kubernetes-preserve-unknown-fields"):
        errs.append((path + ".type", "FieldValueRequired", "Required value: must not be empty for specified "
                     "object fields"))
    for k, ps in (sch.get("properties") or {}).items():
        errs += structural_errors(ps, "%s.properties[%s]" % (path, k))
    if isinstance(sch.get("items"), dict):
        errs += structural_errors(sch["items"], path + ".items")
    if t == "array" and "items" not in sch:
        errs.append((path + ".items", "FieldValueRequired", "Required value: must be specified"))
    return errs


# --------------------------------------------------------------------------
# TLS material

def make_tls(directory, hosts=("127.0.0.1", "localhost")):
    """CA + server certificate (SAN IP:127.0.0.1, DNS:localhost) with openssl."""
    os.makedirs(directory, exist_ok=True)
    ca_key = os.path.join(directory, "ca.key")
    ca_crt = os.path.join(directory, "ca.crt")
    key = os.path.join(directory, "apiserver.key")
    csr = os.path.join(directory, "apiserver.csr")
    crt = os.path.join(directory, "apiserver.crt")
    ext = os.path.join(directory, "apiserver.ext")
    san = ",".join(("IP:%s" % h) if re.match(r"^[\d.]+$|:", h) else ("DNS:%s" % h) for h in hosts)

    def run(*argv):
        r = subprocess.run([OPENSSL] + list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           timeout=60)
        if r.returncode != 0:
            raise RuntimeError("openssl %s: %s" % (argv[0], r.stderr.decode(errors="replace")))

    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", ca_key, "-out", ca_crt, "-days", "2", "-subj", "/CN=tpmail-fake-kube-ca",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key,
        "-out", csr, "-subj", "/CN=kube-apiserver")
    with open(ext, "w") as f:
        f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\nsubjectAltName=%s\n" % san)
    run("x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial", "-out", crt,
        "-days", "2", "-extfile", ext)
    return ca_crt, crt, key


# --------------------------------------------------------------------------
# watches

class Watch:
    def __init__(self, rt, ns, lsel, fsel, bookmarks, deadline, user, table):
        self.rt = rt
        self.ns = ns
        self.lsel = lsel
        self.fsel = fsel
        self.bookmarks = bookmarks
        self.deadline = deadline
        self.user = user
        self.table = table
        self.queue = []
        self.end = None             # None, "drop", "close", or a Status dict (ERROR event then close)
        self.sock = None
        self.started = time.time()
        self.events_sent = 0

    def matches(self, obj):
        if obj is None:
            return False
        md = obj.get("metadata") or {}
        if self.ns is not None and md.get("namespace") != self.ns:
            return False
        return label_match(md.get("labels"), self.lsel) and field_match(obj, self.fsel)

    def describe(self):
        return {"resource": self.rt.resource_label(), "namespace": self.ns, "user": self.user,
                "started": self.started, "events_sent": self.events_sent}


# --------------------------------------------------------------------------
# the server


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False
    request_queue_size = 64

    def __init__(self, addr, handler, api):
        self.api = api
        self._conns = set()
        self._conns_lock = threading.Lock()
        super().__init__(addr, handler)

    def get_request(self):
        sock, addr = self.socket.accept()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        if self.api.ssl_context is not None:
            sock = self.api.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self._conns_lock:
            self._conns.add(sock)
        return sock, addr

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        try:
            super().shutdown_request(request)
        except OSError:
            pass

    def close_all(self):
        common.close_connections(self._conns, self._conns_lock)


class KubeApiServer:
    """See the module docstring."""

    def __init__(self, workdir=None, tls=True, token="test-token", user="tester", port=0,
                 validate=True, auto_namespaces=True, bookmark_interval=5.0,
                 max_watch_seconds=600.0, watch_gone="event", gc_delay=0.2, history_limit=100000,
                 verbose=False):
        self._own_workdir = workdir is None
        self.workdir = workdir or tempfile.mkdtemp(prefix="fake-kube-")
        os.makedirs(self.workdir, exist_ok=True)
        self.tls = tls
        self.validate = validate
        self.auto_namespaces = auto_namespaces
        self.bookmark_interval = bookmark_interval
        self.max_watch_seconds = max_watch_seconds
        self.watch_gone = watch_gone
        self.gc_delay = gc_delay
        self.history_limit = history_limit
        self.verbose = verbose
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.rv = 100
        self.compacted_rv = 0
        self.history = []           # (rv, type, rtkey, new, old)
        self.store = {}             # rtkey -> {(ns, name): obj}
        self.types = {}             # rtkey -> ResourceType
        self._watches = []
        self._snapshots = {}        # continue id -> (rv, rtkey, [objects])
        self._requests = []
        self._faults = []
        self._cluster_ips = 10
        self._gc_timer = None
        self._closed = False
        self.tokens = {}
        if token:
            self.tokens[token] = user
        self.token = token
        for rt in BUILTIN_TYPES:
            self._register(copy.copy(rt))
        for ns in ("default", "kube-system", "kube-public"):
            with self.cond:
                self._put_direct(self.types[("", "namespaces")], None, {
                    "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns},
                    "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
        self.ssl_context = None
        self.ca_file = None
        if tls:
            self.ca_file, crt, key = make_tls(os.path.join(self.workdir, "pki"))
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(crt, key)
            ctx.set_alpn_protocols(["http/1.1"])
            self.ssl_context = ctx
        self.httpd = _HTTPServer((HOST, port), _Handler, self)
        self._thread = None
        self.token_file = os.path.join(self.workdir, "token")
        with open(self.token_file, "w") as f:
            f.write((token or "") + "\n")
        os.chmod(self.token_file, 0o600)
        self.kubeconfig_path = os.path.join(self.workdir, "kubeconfig")
        self.write_kubeconfig(self.kubeconfig_path)

    # -- lifecycle ----------------------------------------------------------

    @property
    def port(self):
        return self.httpd.server_address[1]

    @property
    def url(self):
        return "%s://%s:%d" % ("https" if self.tls else "http", HOST, self.port)

    def start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                            name="fake-kube-%d" % self.port, daemon=True)
            self._thread.start()
        return self

    def close(self):
        if self._closed:
            return
        self._closed = True
        with self.cond:
            for w in self._watches:
                w.end = "close"
            self.cond.notify_all()
            if self._gc_timer:
                self._gc_timer.cancel()
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
        self.httpd.server_close()
        self.httpd.close_all()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    def write_kubeconfig(self, path, token=None, namespace="default"):
        """A kubeconfig for kubectl (current context "fake")."""
        cluster = {"server": self.url}
        if self.tls:
            with open(self.ca_file, "rb") as f:
                cluster["certificate-authority-data"] = base64.b64encode(f.read()).decode()
        user = {"token": token or self.token} if self.tls and (token or self.token) else {}
        cfg = {"apiVersion": "v1", "kind": "Config", "preferences": {},
               "clusters": [{"name": "fake", "cluster": cluster}],
               "users": [{"name": "tester", "user": user}],
               "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "tester",
                                                         "namespace": namespace}}],
               "current-context": "fake"}
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)     # JSON is YAML
        os.chmod(path, 0o600)
        return path

    def add_token(self, token, user):
        """Accept another bearer token, logged as ``user``."""
        with self.lock:
            self.tokens[token] = user

    def remove_token(self, token):
        with self.lock:
            self.tokens.pop(token, None)

    def write_token_file(self, path, token):
        with open(path, "w") as f:
            f.write(token + "\n")
        os.chmod(path, 0o600)
        return path

    # -- types --------------------------------------------------------------

    def _register(self, rt):
        self.types[rt.key] = rt
        self.store.setdefault(rt.key, {})

    def resolve_type(self, kind):
        """A ResourceType from a kind, plural, singular or short name
        (optionally "<plural>.<group>")."""
        with self.lock:
            for rt in self.types.values():
                names = {rt.kind, rt.kind.lower(), rt.plural, rt.singular, rt.resource_label()} | set(rt.short_names)
                if kind in names:
                    return rt
        raise KeyError("unknown kind %r" % kind)

    def _type_for_path(self, group, version, plural):
        rt = self.types.get((group, plural))
        if rt is None or rt.version != version:
            return None
        return rt

    # -- test hooks -----------------------------------------------------------

    def objects(self, kind, namespace=None):
        """Copies of the stored objects of a kind (all namespaces if None),
        sorted by namespace and name."""
        rt = self.resolve_type(kind)
        with self.lock:
            items = [copy.deepcopy(o) for (ns, _), o in sorted(self.store[rt.key].items(),
                                                                   key=lambda kv: (kv[0][0] or "", kv[0][1]))
                     if namespace is None or ns == namespace]
        return items

    def get(self, kind, namespace, name):
        rt = self.resolve_type(kind)
        with self.lock:
            o = self.store[rt.key].get((namespace if rt.namespaced else None, name))
            return copy.deepcopy(o)

    def create(self, obj, namespace=None, validate=None):
        rt = self._type_of_object(obj)
        ns = namespace or (obj.get("metadata") or {}).get("namespace") or ("default" if rt.namespaced else None)
        return self._create(rt, ns if rt.namespaced else None, copy.deepcopy(obj), {}, "test",
                            validate=validate)[0]

    def update(self, obj, validate=None):
        rt = self._type_of_object(obj)
        md = obj.get("metadata") or {}
        return self._update(rt, md.get("namespace") if rt.namespaced else None, md.get("name"),
                            copy.deepcopy(obj), {}, validate=validate)[0]

    def patch(self, kind, namespace, name, patch, ptype="merge", subresource=None):
        rt = self.resolve_type(kind)
        ct = {"merge": "application/merge-patch+json", "json": "application/json-patch+json",
              "strategic": "application/strategic-merge-patch+json"}[ptype]
        return self._patch(rt, namespace if rt.namespaced else None, name, subresource, patch, ct, {})[0]

    def patch_status(self, kind, namespace, name, status):
        return self.patch(kind, namespace, name, {"status": status}, subresource="status")

    def delete(self, kind, namespace, name):
        rt = self.resolve_type(kind)
        return self._delete(rt, namespace if rt.namespaced else None, name, {}, {})

    def _type_of_object(self, obj):
        av = obj.get("apiVersion", "")
        group, _, version = av.rpartition("/")
        with self.lock:
            for rt in self.types.values():
                if rt.group == group and rt.version == version and rt.kind == obj.get("kind"):
                    return rt
        raise KeyError("no kind %s in %s" % (obj.get("kind"), av))

    def compact(self):
        """Forget the history: every resourceVersion issued so far is too old."""
        with self.cond:
            self.rv += 1
            self.compacted_rv = self.rv
            self.history = []
            self._snapshots = {}

    def expire_watches(self, message=None):
        """Every open watch gets ERROR 410 Expired and ends."""
        with self.cond:
            n = 0
            for w in self._watches:
                if w.end is None:
                    w.end = self._gone_status(message or "too old resource version: %d (%d)"
                                              % (self.compacted_rv, self.rv))
                    n += 1
            self.cond.notify_all()
        return n

    def drop_watches(self, abrupt=True):
        """Cut every open watch: ``abrupt`` shuts the socket without the
        final chunk, else the stream ends cleanly."""
        with self.cond:
            ws = [w for w in self._watches if w.end is None]
            for w in ws:
                w.end = "drop" if abrupt else "close"
            self.cond.notify_all()
        if abrupt:
            for w in ws:
                if w.sock is not None:
                    try:
                        w.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
        return len(ws)

    def watches(self, resource=None, user=None):
        """Open watches (dicts), optionally of one resource ("destinations"...)."""
        with self.lock:
            return [w.describe() for w in self._watches if w.end is None
                    and (resource is None or w.rt.plural == resource or w.rt.resource_label() == resource)
                    and (user is None or w.user == user)]

    def fail(self, code, method=None, path=None, count=1, message=None, watch=None, user=None):
        """The next ``count`` requests matching ``method``, the regex
        ``path``, watch or not and the token's ``user`` (each if given) get
        error ``code``."""
        with self.lock:
            self._faults.append({"code": code, "method": method, "path": re.compile(path) if path else None,
                                 "count": count, "message": message, "watch": watch, "user": user})

    def clear_faults(self):
        with self.lock:
            self._faults = []

    def requests(self, method=None, path=None, user=None, since=0):
        """The request log: dicts with time, method, path, query, user,
        status, content_type, body, watch.  ``path``: a regex."""
        rx = re.compile(path) if path else None
        with self.lock:
            return [r for r in self._requests[since:] if (method is None or r["method"] == method)
                    and (rx is None or rx.search(r["path"])) and (user is None or r["user"] == user)]

    def request_count(self):
        with self.lock:
            return len(self._requests)

    # -- store core (all under self.lock) -------------------------------------

    def _next_rv(self):
        self.rv += 1
        return self.rv

    def _emit(self, rt, etype, new, old):
        rv = self.rv
        self.history.append((rv, etype, rt.key, copy.deepcopy(new), copy.deepcopy(old)))
        if len(self.history) > self.history_limit:
            drop = len(self.history) - self.history_limit
            self.compacted_rv = self.history[drop - 1][0] + 1
            del self.history[:drop]
        for w in self._watches:
            if w.end is None and w.rt.key == rt.key:
                ev = self._event_for(w, etype, new, old)
                if ev:
                    w.queue.append(ev)
        self.cond.notify_all()

    @staticmethod
    def _event_for(w, etype, new, old):
        if etype == "ADDED":
            return ("ADDED", new) if w.matches(new) else None
        if etype == "DELETED":
            return ("DELETED", new) if w.matches(new) else None
        was, now = w.matches(old), w.matches(new)
        if was and now:
            return ("MODIFIED", new)
        if now:
            return ("ADDED", new)
        if was:
            return ("DELETED", new)
        return None

    def _put_direct(self, rt, ns, obj):
        md = obj.setdefault("metadata", {})
        md.setdefault("uid", str(uuid.uuid4()))
        md.setdefault("creationTimestamp", now_rfc3339())
        md["resourceVersion"] = str(self._next_rv())
        self.store[rt.key][(ns, md["name"])] = obj
        self._emit(rt, "ADDED", obj, None)

    def _ensure_namespace(self, ns, dry):
        if ns is None:
            return
        nsrt = self.types[("", "namespaces")]
        if (None, ns) in self.store[nsrt.key]:
            if (self.store[nsrt.key][(None, ns)].get("status") or {}).get("phase") == "Terminating":
                raise ApiError(403, 'unable to create new content in namespace %s because it is being '
                               'terminated' % ns, reason="Forbidden")
            return
        if not self.auto_namespaces:
            raise ApiError(404, 'namespaces "%s" not found' % ns, details={"name": ns, "kind": "namespaces"})
        if not dry:
            self._put_direct(nsrt, None, {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns},
                                          "spec": {"finalizers": ["kubernetes"]},
                                          "status": {"phase": "Active"}})

    # -- validation and defaulting per kind -----------------------------------

    def _prepare(self, rt, obj, old, params, warnings, validate):
        """Prune/default/validate ``obj`` for a create (old None) or update."""
        md = obj.get("metadata") or {}
        name = md.get("name") or md.get("generateName") or ""
        causes = []
        # metadata
        if not isinstance(obj.get("metadata"), dict):
            raise ApiError(400, "Object 'metadata' is missing or not an object")
        if rt.custom and validate:
            unknown = [k for k in md if k not in OBJECT_META_FIELDS]
            for k in unknown:
                md.pop(k)
        for k, v in (md.get("labels") or {}).items():
            if not check_qualified_key(k):
                causes.append(("metadata.labels", "FieldValueInvalid",
                               'Invalid value: "%s": name part must consist of alphanumeric characters, '
                               "'-', '_' or '.'" % k))
            if not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.match(v):
                causes.append(("metadata.labels", "FieldValueInvalid",
                               'Invalid value: "%s": a valid label must be an empty string or consist of '
                               "alphanumeric characters, '-', '_' or '.', and must start and end with an "
                               "alphanumeric character" % (v,)))
        for k, v in (md.get("annotations") or {}).items():
            if not check_qualified_key(k):
                causes.append(("metadata.annotations", "FieldValueInvalid", 'Invalid value: "%s": name part '
                               "must consist of alphanumeric characters, '-', '_' or '.'" % k))
            if not isinstance(v, str):
                raise ApiError(400, "json: cannot unmarshal %s into Go struct field ObjectMeta.metadata."
                               "annotations of type string" % _GO_TYPE.get(type(v), "value"))
        owners = md.get("ownerReferences") or []
        if sum(1 for o in owners if o.get("controller")) > 1:
            causes.append(("metadata.ownerReferences", "FieldValueInvalid", "Invalid value: "
                           "only one reference can have Controller set to true"))
        for i, o in enumerate(owners):
            for f in ("apiVersion", "kind", "name", "uid"):
                if not o.get(f):
                    causes.append(("metadata.ownerReferences[%d].%s" % (i, f), "FieldValueRequired",
                                   "Required value"))
        # per kind
        if rt.custom:
            if validate:
                sch = rt.schema()
                if sch:
                    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
                    unknown = []
                    body = schema_prune(body, sch, "", unknown)
                    mode = params.get("fieldValidation", "Warn")
                    if unknown:
                        if mode == "Strict":
                            raise ApiError(400, '%s in version "%s" cannot be handled as a %s: strict decoding '
                                           'error: %s' % (rt.kind, rt.version, rt.kind,
                                                          ", ".join('unknown field "%s"' % u for u in unknown)))
                        if mode == "Warn":
                            warnings.extend('unknown field "%s"' % u for u in unknown)
                    body = schema_default(body, sch)
                    for k in list(obj):
                        if k not in ("apiVersion", "kind", "metadata"):
                            del obj[k]
                    obj.update(body)
                    errs = []
                    schema_validate(body, sch, "", errs)
                    causes += errs
        elif rt.kind == "Service":
            causes += self._service_rules(obj, old)
        elif rt.kind == "Namespace":
            if name and not (len(name) <= 63 and DNS1123_LABEL.match(name)):
                causes.append(("metadata.name", "FieldValueInvalid", 'Invalid value: "%s": a lowercase RFC 1123 '
                               "label must consist of lower case alphanumeric characters or '-'" % name))
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj.setdefault("status", {"phase": "Active"})
        elif rt.kind == "Lease":
            spec = obj.get("spec") or {}
            for f in ("acquireTime", "renewTime"):
                v = spec.get(f)
                if v is not None and (not isinstance(v, str) or not MICROTIME.match(v)):
                    raise ApiError(400, 'Lease in version "v1" cannot be handled as a Lease: parsing time '
                                   '"%s" as "2006-01-02T15:04:05.000000Z07:00": cannot parse' % (v,))
            d = spec.get("leaseDurationSeconds")
            if d is not None and (not isinstance(d, int) or d <= 0):
                causes.append(("spec.leaseDurationSeconds", "FieldValueInvalid",
                               "Invalid value: %s: must be greater than 0" % d))
            t = spec.get("leaseTransitions")
            if t is not None and (not isinstance(t, int) or t < 0):
                causes.append(("spec.leaseTransitions", "FieldValueInvalid",
                               "Invalid value: %s: must be greater than or equal to 0" % t))
        elif rt.kind == "Event":
            io = obj.get("involvedObject") or {}
            ns = md.get("namespace")
            if io.get("namespace") and io.get("namespace") != ns:
                causes.append(("involvedObject.namespace", "FieldValueInvalid", 'Invalid value: "%s": does '
                               "not match event.namespace" % io.get("namespace")))
            for f in ("firstTimestamp", "lastTimestamp"):
                v = obj.get(f)
                if v is not None and (not isinstance(v, str) or not RFC3339.match(v)):
                    raise ApiError(400, 'Event in version "v1" cannot be handled as a Event: parsing time '
                                   '"%s" as "2006-01-02T15:04:05Z07:00": cannot parse' % (v,))
            if obj.get("eventTime") is not None:
                v = obj["eventTime"]
                if not isinstance(v, str) or not MICROTIME.match(v):
                    raise ApiError(400, 'Event in version "v1" cannot be handled as a Event: parsing time '
                                   '"%s" as "2006-01-02T15:04:05.000000Z07:00": cannot parse' % (v,))
                for f in ("reportingComponent", "reportingInstance", "action"):
                    if not obj.get(f):
                        causes.append((f, "FieldValueRequired", "Required value"))
        elif rt.kind == "Deployment":
            spec = obj.get("spec") or {}
            sel = (spec.get("selector") or {}).get("matchLabels")
            tlabels = ((spec.get("template") or {}).get("metadata") or {}).get("labels") or {}
            if not sel and not (spec.get("selector") or {}).get("matchExpressions"):
                causes.append(("spec.selector", "FieldValueRequired", "Required value"))
            elif sel and any(tlabels.get(k) != v for k, v in sel.items()):
                causes.append(("spec.template.metadata.labels", "FieldValueInvalid",
                               "Invalid value: %s: `selector` does not match template `labels`"
                               % json.dumps(tlabels)))
            conts = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
            if not conts:
                causes.append(("spec.template.spec.containers", "FieldValueRequired", "Required value"))
            for i, c in enumerate(conts):
                if not c.get("name"):
                    causes.append(("spec.template.spec.containers[%d].name" % i, "FieldValueRequired",
                                   "Required value"))
                if not c.get("image"):
                    causes.append(("spec.template.spec.containers[%d].image" % i, "FieldValueRequired",
                                   "Required value"))
            spec.setdefault("replicas", 1)
            obj.setdefault("status", {})
            if old is not None and old.get("spec", {}).get("selector") != spec.get("selector"):
                causes.append(("spec.selector", "FieldValueInvalid", "Invalid value: %s: field is immutable"
                               % json.dumps(spec.get("selector"))))
        elif rt.kind in ("RoleBinding", "ClusterRoleBinding"):
            ref = obj.get("roleRef") or {}
            for f in ("apiGroup", "kind", "name"):
                if not ref.get(f):
                    causes.append(("roleRef.%s" % f, "FieldValueRequired", "Required value"))
            if old is not None and old.get("roleRef") != obj.get("roleRef"):
                causes.append(("roleRef", "FieldValueInvalid", "Invalid value: %s: cannot change roleRef"
                               % json.dumps(ref)))
            for i, s in enumerate(obj.get("subjects") or []):
                if s.get("kind") == "ServiceAccount" and rt.kind == "ClusterRoleBinding" and not s.get("namespace"):
                    causes.append(("subjects[%d].namespace" % i, "FieldValueRequired", "Required value"))
        elif rt.kind in ("Role", "ClusterRole"):
            for i, r in enumerate(obj.get("rules") or []):
                if not r.get("verbs"):
                    causes.append(("rules[%d].verbs" % i, "FieldValueRequired",
                                   "Required value: verbs must contain at least one value"))
                if not r.get("nonResourceURLs") and not r.get("resources"):
                    causes.append(("rules[%d].resources" % i, "FieldValueRequired",
                                   "Required value: resource rules must supply at least one resource"))
                if r.get("resources") and "apiGroups" not in r:
                    causes.append(("rules[%d].apiGroups" % i, "FieldValueRequired",
                                   "Required value: resource rules must supply at least one api group"))
        elif rt.kind == "CustomResourceDefinition":
            causes += self._crd_rules(obj, old)
        elif rt.kind == "PodDisruptionBudget":
            spec = obj.get("spec") or {}
            if "minAvailable" in spec and "maxUnavailable" in spec:
                causes.append(("spec", "FieldValueInvalid", "Invalid value: minAvailable and maxUnavailable "
                               "cannot be both set"))
        # name rules
        if name and md.get("name"):
            if rt.kind == "Service":
                if len(name) > 63 or not DNS1035_LABEL.match(name):
                    causes.append(("metadata.name", "FieldValueInvalid",
                                   'Invalid value: "%s": a DNS-1035 label must consist of lower case '
                                   "alphanumeric characters or '-', start with an alphabetic character, and end "
                                   "with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used "
                                   "for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')" % name))
            elif rt.kind != "Namespace" and not rt.kind.endswith("Role") and not rt.kind.endswith("Binding"):
                if not is_dns1123_subdomain(name):
                    causes.append(("metadata.name", "FieldValueInvalid",
                                   'Invalid value: "%s": a lowercase RFC 1123 subdomain must consist of lower '
                                   "case alphanumeric characters, '-' or '.', and must start and end with an "
                                   "alphanumeric character (e.g. 'example.com', regex used for validation is "
                                   "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')" % name))
        if causes:
            raise invalid(rt, md.get("name") or name, causes)

    def _service_rules(self, obj, old):
        causes = []
        spec = obj.setdefault("spec", {})
        t = spec.setdefault("type", "ClusterIP")
        if t not in ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"):
            causes.append(("spec.type", "FieldValueNotSupported", 'Unsupported value: "%s": supported values: '
                           '"ClusterIP", "ExternalName", "LoadBalancer", "NodePort"' % t))
        ports = spec.get("ports") or []
        if t == "ExternalName":
            en = spec.get("externalName")
            if not en:
                causes.append(("spec.externalName", "FieldValueRequired", "Required value"))
            elif not is_dns1123_subdomain(en.rstrip(".")):
                causes.append(("spec.externalName", "FieldValueInvalid", 'Invalid value: "%s": a lowercase RFC '
                               "1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"
                               % en))
            if spec.get("clusterIP") not in (None, ""):
                if old is None or (old.get("spec") or {}).get("type") == "ExternalName":
                    causes.append(("spec.clusterIPs", "FieldValueInvalid",
                                   "Invalid value: %s: may not be set for ExternalName services"
                                   % json.dumps([spec.get("clusterIP")])))
                else:
                    spec.pop("clusterIP", None)
            spec.pop("clusterIPs", None)
        else:
            if not ports and spec.get("clusterIP") != "None":
                causes.append(("spec.ports", "FieldValueRequired", "Required value"))
            oldspec = (old or {}).get("spec") or {}
            if old is not None and oldspec.get("type") != "ExternalName" and oldspec.get("clusterIP"):
                if spec.get("clusterIP") in (None, ""):
                    spec["clusterIP"] = oldspec["clusterIP"]
                    spec["clusterIPs"] = oldspec.get("clusterIPs") or [oldspec["clusterIP"]]
                elif spec["clusterIP"] != oldspec["clusterIP"]:
                    causes.append(("spec.clusterIPs[0]", "FieldValueInvalid", 'Invalid value: %s: may not '
                                   "change once set" % json.dumps([spec["clusterIP"]])))
            if spec.get("clusterIP") in (None, ""):
                self._cluster_ips += 1
                ip = "10.96.%d.%d" % (self._cluster_ips // 250, self._cluster_ips % 250 + 1)
                spec["clusterIP"] = ip
                spec["clusterIPs"] = [ip]
            spec.setdefault("sessionAffinity", "None")
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
            spec.setdefault("internalTrafficPolicy", "Cluster")
        names = set()
        for i, p in enumerate(ports):
            f = "spec.ports[%d]" % i
            port = p.get("port")
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                causes.append((f + ".port", "FieldValueInvalid", "Invalid value: %s: must be between 1 and "
                               "65535, inclusive" % json.dumps(port)))
            p.setdefault("protocol", "TCP")
            if p["protocol"] not in ("TCP", "UDP", "SCTP"):
                causes.append((f + ".protocol", "FieldValueNotSupported", 'Unsupported value: "%s": supported '
                               'values: "SCTP", "TCP", "UDP"' % p["protocol"]))
            n = p.get("name")
            if len(ports) > 1 and not n:
                causes.append((f + ".name", "FieldValueRequired", "Required value"))
            if n:
                if not (len(n) <= 63 and DNS1123_LABEL.match(n)):
                    causes.append((f + ".name", "FieldValueInvalid", 'Invalid value: "%s": a lowercase RFC '
                                   "1123 label must consist of lower case alphanumeric characters or '-'" % n))
                if n in names:
                    causes.append((f + ".name", "FieldValueDuplicate", 'Duplicate value: "%s"' % n))
                names.add(n)
            tp = p.get("targetPort")
            if tp is None:
                p["targetPort"] = port
            elif isinstance(tp, bool) or not isinstance(tp, (int, str)):
                causes.append((f + ".targetPort", "FieldValueInvalid", "Invalid value: %s" % json.dumps(tp)))
            elif isinstance(tp, int) and not 1 <= tp <= 65535:
                causes.append((f + ".targetPort", "FieldValueInvalid", "Invalid value: %d: must be between 1 "
                               "and 65535, inclusive" % tp))
            elif isinstance(tp, str) and not (IANA_SVC_NAME.match(tp) and re.search("[a-z]", tp)
                                              and "--" not in tp):
                causes.append((f + ".targetPort", "FieldValueInvalid", 'Invalid value: "%s": must contain '
                               "only alpha-numeric characters (a-z, 0-9), and hyphens (-)" % tp))
        for k, v in (spec.get("selector") or {}).items():
            if not check_qualified_key(k) or not isinstance(v, str) or not LABEL_VALUE.match(v):
                causes.append(("spec.selector", "FieldValueInvalid", 'Invalid value: "%s": invalid label '
                               "selector" % v))
        obj.setdefault("status", {"loadBalancer": {}})
        return causes

    def _crd_rules(self, obj, old):
        causes = []
        spec = obj.get("spec") or {}
        names = spec.get("names") or {}
        group = spec.get("group") or ""
        plural = names.get("plural") or ""
        name = (obj.get("metadata") or {}).get("name")
        if name != "%s.%s" % (plural, group):
            causes.append(("metadata.name", "FieldValueInvalid", 'Invalid value: "%s": must be spec.names.plural+'
                           '"."+spec.group' % name))
        if not group or "." not in group:
            causes.append(("spec.group", "FieldValueInvalid", 'Invalid value: "%s": should be a domain with at '
                           "least one dot" % group))
        if spec.get("scope") not in ("Namespaced", "Cluster"):
            causes.append(("spec.scope", "FieldValueNotSupported", 'Unsupported value: "%s": supported values: '
                           '"Cluster", "Namespaced"' % spec.get("scope")))
        if not names.get("kind"):
            causes.append(("spec.names.kind", "FieldValueRequired", "Required value"))
        if plural and not DNS1123_LABEL.match(plural):
            causes.append(("spec.names.plural", "FieldValueInvalid", 'Invalid value: "%s": a lowercase RFC 1123 '
                           "label must consist of lower case alphanumeric characters or '-'" % plural))
        versions = spec.get("versions") or []
        if not versions:
            causes.append(("spec.versions", "FieldValueRequired", "Required value: must have exactly one version "
                           "marked as storage version"))
        if sum(1 for v in versions if v.get("storage")) != 1:
            causes.append(("spec.versions", "FieldValueInvalid", "Invalid value: %s: must have exactly one "
                           "version marked as storage version" % json.dumps([v.get("name") for v in versions])))
        for i, v in enumerate(versions):
            sch = (v.get("schema") or {}).get("openAPIV3Schema")
            causes += [("spec.versions[%d].schema.%s" % (i, f), r, m)
                       for f, r, m in structural_errors(sch)]
            for j, c in enumerate(v.get("additionalPrinterColumns") or []):
                if c.get("type") not in ("integer", "number", "string", "boolean", "date"):
                    causes.append(("spec.versions[%d].additionalPrinterColumns[%d].type" % (i, j),
                                   "FieldValueNotSupported", 'Unsupported value: "%s"' % c.get("type")))
                if not c.get("jsonPath"):
                    causes.append(("spec.versions[%d].additionalPrinterColumns[%d].jsonPath" % (i, j),
                                   "FieldValueRequired", "Required value"))
        if old is not None:
            if (old.get("spec") or {}).get("group") != group:
                causes.append(("spec.group", "FieldValueInvalid", "field is immutable"))
        if not causes:
            obj["status"] = {
                "acceptedNames": {k: v for k, v in names.items()},
                "storedVersions": [v["name"] for v in versions if v.get("storage")],
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                     "message": "no conflicts found", "lastTransitionTime": now_rfc3339()},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                     "message": "the initial names have been accepted", "lastTransitionTime": now_rfc3339()}]}
            obj["status"]["acceptedNames"].setdefault("singular", names.get("kind", "").lower())
            obj["status"]["acceptedNames"].setdefault("listKind", names.get("kind", "") + "List")
        return causes

    def _crd_apply(self, crd, deleted=False):
        """Serve (or stop serving) the custom resource a CRD defines."""
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        key = (spec.get("group"), names.get("plural"))
        if deleted:
            rt = self.types.get(key)
            if rt is None or not rt.custom:
                return
            for (ns, name), o in list(self.store[key].items()):
                del self.store[key][(ns, name)]
                self._next_rv()
                self._emit(rt, "DELETED", o, o)
            for w in self._watches:
                if w.rt.key == key and w.end is None:
                    w.end = "close"
            del self.types[key]
            return
        served = [v for v in spec.get("versions") or [] if v.get("served")]
        storage = next((v for v in spec.get("versions") or [] if v.get("storage")), None)
        ver = storage if storage in served else (served[0] if served else None)
        if ver is None:
            return
        rt = ResourceType(spec["group"], ver["name"], names["plural"], names["kind"],
                          namespaced=spec.get("scope") == "Namespaced", short_names=names.get("shortNames") or (),
                          singular=names.get("singular") or names["kind"].lower(),
                          status="status" in (ver.get("subresources") or {}), generation=True,
                          categories=names.get("categories") or (), crd=ver)
        self.types[key] = rt
        self.store.setdefault(key, {})

    # -- verbs ------------------------------------------------------------------

    def _create(self, rt, ns, obj, params, user, validate=None):
        validate = self.validate if validate is None else validate
        dry = params.get("dryRun") == "All"
        warnings = []
        with self.cond:
            if rt.custom and self.types.get(rt.key) is not rt:
                raise ApiError(404, "the server could not find the requested resource")
            if not isinstance(obj, dict):
                raise ApiError(400, "the body of the request was not a JSON object")
            md = obj.setdefault("metadata", {}) if isinstance(obj.get("metadata", {}), dict) else None
            if md is None:
                raise ApiError(400, "metadata must be an object")
            if obj.get("kind") and obj.get("kind") != rt.kind:
                raise ApiError(400, "the API version in the data (%s) does not match the expected API version "
                               "(%s)" % (obj.get("apiVersion"), rt.gv))
            obj["apiVersion"], obj["kind"] = rt.gv, rt.kind
            if rt.namespaced:
                if md.get("namespace") and md["namespace"] != ns:
                    raise ApiError(400, "the namespace of the provided object does not match the namespace "
                                   "sent on the request")
                md["namespace"] = ns
            else:
                md.pop("namespace", None)
            if not md.get("name"):
                if md.get("generateName"):
                    md["name"] = md["generateName"] + secrets.token_hex(3)[:5]
                else:
                    raise invalid(rt, "", [("metadata.name", "FieldValueRequired",
                                            "Required value: name or generateName is required")])
            for f in ("uid", "resourceVersion", "creationTimestamp", "deletionTimestamp", "generation",
                      "selfLink", "managedFields"):
                md.pop(f, None)
            if rt.status and rt.kind not in ("Namespace", "CustomResourceDefinition", "Service"):
                obj.pop("status", None)
            self._prepare(rt, obj, None, params, warnings, validate)
            self._ensure_namespace(ns, dry)
            k = (ns, md["name"])
            if k in self.store[rt.key]:
                raise ApiError(409, '%s "%s" already exists' % (rt.resource_label(), md["name"]),
                               reason="AlreadyExists",
                               details={"name": md["name"], "group": rt.group, "kind": rt.plural})
            md["uid"] = str(uuid.uuid4())
            md["creationTimestamp"] = now_rfc3339()
            if rt.generation:
                md["generation"] = 1
            if dry:
                md["resourceVersion"] = ""
                return copy.deepcopy(obj), warnings
            md["resourceVersion"] = str(self._next_rv())
            self.store[rt.key][k] = obj
            if rt.kind == "CustomResourceDefinition":
                self._crd_apply(obj)
            self._emit(rt, "ADDED", obj, None)
            if md.get("ownerReferences"):
                self._schedule_gc()
            return copy.deepcopy(obj), warnings

    def _update(self, rt, ns, name, obj, params, subresource=None, validate=None, allow_no_rv=False):
        validate = self.validate if validate is None else validate
        dry = params.get("dryRun") == "All"
        warnings = []
        with self.cond:
            cur = self.store[rt.key].get((ns, name))
            if cur is None:
                raise not_found(rt, name)
            if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
                raise ApiError(400, "the body of the request was not a valid object")
            md = obj["metadata"]
            if md.get("name") and md["name"] != name:
                raise ApiError(400, "the name of the object (%s) does not match the name on the URL (%s)"
                               % (md["name"], name))
            if rt.namespaced and md.get("namespace") and md["namespace"] != ns:
                raise ApiError(400, "the namespace of the provided object does not match the namespace sent "
                               "on the request")
            rv = md.get("resourceVersion")
            cmd = cur["metadata"]
            if rv:
                if rv != cmd["resourceVersion"]:
                    raise ApiError(409, 'Operation cannot be fulfilled on %s "%s": the object has been '
                                   'modified; please apply your changes to the latest version and try again'
                                   % (rt.resource_label(), name), reason="Conflict",
                                   details={"name": name, "group": rt.group, "kind": rt.plural})
            elif rt.custom and not allow_no_rv:
                raise invalid(rt, name, [("metadata.resourceVersion", "FieldValueInvalid",
                                          "Invalid value: 0x0: must be specified for an update")])
            if md.get("uid") and md["uid"] != cmd["uid"]:
                raise ApiError(409, 'Precondition failed: UID in precondition: %s, UID in object meta: %s'
                               % (cmd["uid"], md["uid"]), reason="Conflict")
            new = copy.deepcopy(obj)
            new["apiVersion"], new["kind"] = rt.gv, rt.kind
            nmd = new["metadata"]
            if subresource == "status":
                keep = copy.deepcopy(cur)
                keep["status"] = new.get("status")
                if keep["status"] is None:
                    keep.pop("status")
                new = keep
                nmd = new["metadata"]
            else:
                for f in ("uid", "creationTimestamp", "generation", "deletionTimestamp"):
                    if f in cmd:
                        nmd[f] = cmd[f]
                    else:
                        nmd.pop(f, None)
                nmd["name"] = name
                if rt.namespaced:
                    nmd["namespace"] = ns
                else:
                    nmd.pop("namespace", None)
                if rt.status and rt.kind not in ("Namespace",):
                    if "status" in cur:
                        new["status"] = copy.deepcopy(cur["status"])
                    else:
                        new.pop("status", None)
                if cmd.get("deletionTimestamp") and len(nmd.get("finalizers") or []) > len(cmd.get("finalizers") or []):
                    raise ApiError(422, "no new finalizers can be added if the object is being deleted",
                                   reason="Invalid")
            self._prepare(rt, new, cur, params, warnings, validate)
            if rt.generation and subresource != "status":
                def body(o):
                    return {k: v for k, v in o.items() if k not in ("metadata", "status", "apiVersion", "kind")}
                if body(new) != body(cur):
                    nmd["generation"] = cmd.get("generation", 1) + 1
            # an identical write is not persisted (no new resourceVersion, no event)
            cmp_new = copy.deepcopy(new)
            cmp_new["metadata"]["resourceVersion"] = cmd["resourceVersion"]
            if cmp_new == cur:
                return copy.deepcopy(cur), warnings
            if dry:
                nmd["resourceVersion"] = cmd["resourceVersion"]
                return new, warnings
            nmd["resourceVersion"] = str(self._next_rv())
            if cmd.get("deletionTimestamp") and not nmd.get("finalizers"):
                # the last finalizer went away: the object is deleted now
                del self.store[rt.key][(ns, name)]
                self._emit(rt, "MODIFIED", new, cur)
                self._next_rv()
                new["metadata"]["resourceVersion"] = str(self.rv)
                self._emit(rt, "DELETED", new, new)
                self._schedule_gc()
                return copy.deepcopy(new), warnings
            self.store[rt.key][(ns, name)] = new
            if rt.kind == "CustomResourceDefinition":
                self._crd_apply(new)
            self._emit(rt, "MODIFIED", new, cur)
            if nmd.get("ownerReferences") != cmd.get("ownerReferences"):
                self._schedule_gc()
            return copy.deepcopy(new), warnings

    def _patch(self, rt, ns, name, subresource, patch, ctype, params):
        ctype = (ctype or "").split(";")[0].strip()
        with self.cond:
            cur = self.store[rt.key].get((ns, name))
            if ctype == "application/apply-patch+yaml":
                if not params.get("fieldManager"):
                    raise ApiError(400, "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required "
                                   "value: is required for apply patch")
                if not isinstance(patch, dict):
                    raise ApiError(400, "the apply patch must be a JSON object (YAML is not supported here)")
                if cur is None:
                    if subresource:
                        raise not_found(rt, name)
                    obj = copy.deepcopy(patch)
                    obj.setdefault("metadata", {})["name"] = name
                    return self._create(rt, ns, obj, params, "apply")
                merged = self._apply_merge(cur, patch)
                merged["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
                return self._update(rt, ns, name, merged, params, subresource)
            if cur is None:
                raise not_found(rt, name)
            base = copy.deepcopy(cur)
            try:
                if ctype == "application/merge-patch+json":
                    if not isinstance(patch, dict):
                        raise ValueError("a merge patch must be a JSON object")
                    new = deep_merge_patch(base, patch)
                elif ctype == "application/json-patch+json":
                    new = json_patch(base, patch)
                elif ctype == "application/strategic-merge-patch+json":
                    if rt.custom:
                        raise ApiError(415, "the body of the request was in an unknown format - accepted media "
                                       "types include: application/json-patch+json, application/merge-patch+json, "
                                       "application/apply-patch+yaml", reason="UnsupportedMediaType")
                    new = strategic_merge_patch(base, patch)
                else:
                    raise ApiError(415, "the body of the request was in an unknown format - accepted media types "
                                   "include: application/json-patch+json, application/merge-patch+json, "
                                   "application/apply-patch+yaml", reason="UnsupportedMediaType")
            except AssertionError as e:
                raise ApiError(422, str(e), reason="Invalid")
            except ValueError as e:
                raise ApiError(422, str(e), reason="Invalid")
            if not isinstance(new, dict):
                raise ApiError(422, "the patch result is not an object", reason="Invalid")
            new.setdefault("metadata", {})
            rv = (new.get("metadata") or {}).get("resourceVersion")
            if rv is None or rv == cur["metadata"]["resourceVersion"]:
                new["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
            return self._update(rt, ns, name, new, params, subresource)

    @staticmethod
    def _apply_merge(cur, patch):
        def merge(a, b):
            if isinstance(a, dict) and isinstance(b, dict):
                out = dict(a)
                for k, v in b.items():
                    out[k] = merge(a.get(k), v) if v is not None else None
                return {k: v for k, v in out.items() if v is not None}
            return copy.deepcopy(b)
        return merge(copy.deepcopy(cur), patch)

    def _delete(self, rt, ns, name, params, opts):
        dry = params.get("dryRun") == "All" or "All" in (opts.get("dryRun") or [])
        with self.cond:
            cur = self.store[rt.key].get((ns, name))
            if cur is None:
                raise not_found(rt, name)
            pre = opts.get("preconditions") or {}
            if pre.get("uid") and pre["uid"] != cur["metadata"]["uid"]:
                raise ApiError(409, "Precondition failed: UID in precondition: %s, UID in object meta: %s"
                               % (pre["uid"], cur["metadata"]["uid"]), reason="Conflict")
            if pre.get("resourceVersion") and pre["resourceVersion"] != cur["metadata"]["resourceVersion"]:
                raise ApiError(409, "Precondition failed: ResourceVersion in precondition: %s, ResourceVersion "
                               "in object meta: %s" % (pre["resourceVersion"], cur["metadata"]["resourceVersion"]),
                               reason="Conflict")
            if dry:
                return copy.deepcopy(cur)
            if cur["metadata"].get("finalizers"):
                if not cur["metadata"].get("deletionTimestamp"):
                    new = copy.deepcopy(cur)
                    new["metadata"]["deletionTimestamp"] = now_rfc3339()
                    new["metadata"]["deletionGracePeriodSeconds"] = 0
                    new["metadata"]["resourceVersion"] = str(self._next_rv())
                    self.store[rt.key][(ns, name)] = new
                    self._emit(rt, "MODIFIED", new, cur)
                    return copy.deepcopy(new)
                return copy.deepcopy(cur)
            return self._remove(rt, ns, name)

    def _remove(self, rt, ns, name):
        cur = self.store[rt.key].pop((ns, name))
        gone = copy.deepcopy(cur)
        gone["metadata"]["resourceVersion"] = str(self._next_rv())
        self._emit(rt, "DELETED", gone, cur)
        if rt.kind == "CustomResourceDefinition":
            self._crd_apply(cur, deleted=True)
        if rt.kind == "Namespace":
            for key, objs in self.store.items():
                t = self.types.get(key)
                if t is None or not t.namespaced:
                    continue
                for (ons, oname) in [k for k in objs if k[0] == name]:
                    self._remove(t, ons, oname)
        self._schedule_gc()
        return gone

    # -- garbage collection ---------------------------------------------------

    def _schedule_gc(self):
        if self._closed:
            return
        if self._gc_timer is not None and self._gc_timer.is_alive():
            return
        self._gc_timer = threading.Timer(self.gc_delay, self._gc)
        self._gc_timer.daemon = True
        self._gc_timer.start()

    def _gc(self):
        with self.cond:
            self._gc_timer = None
            while True:
                uids = {}
                for key, objs in self.store.items():
                    rt = self.types.get(key)
                    for (ns, _), o in objs.items():
                        uids[o["metadata"]["uid"]] = (ns, rt.namespaced if rt else True)
                victims = []
                for key, objs in self.store.items():
                    rt = self.types.get(key)
                    if rt is None:
                        continue
                    for (ns, name), o in objs.items():
                        refs = o["metadata"].get("ownerReferences") or []
                        if not refs:
                            continue

                        def alive(ref):
                            u = uids.get(ref.get("uid"))
                            return u is not None and (not u[1] or u[0] == ns)
                        if not any(alive(r) for r in refs):
                            victims.append((rt, ns, name))
                if not victims:
                    return
                for rt, ns, name in victims:
                    if (ns, name) in self.store[rt.key]:
                        o = self.store[rt.key][(ns, name)]
                        if o["metadata"].get("finalizers"):
                            if not o["metadata"].get("deletionTimestamp"):
                                self._delete(rt, ns, name, {}, {})
                            continue
                        self._remove(rt, ns, name)

    # -- list, watch ----------------------------------------------------------

    def _list(self, rt, ns, params):
        lsel = parse_label_selector(params.get("labelSelector"))
        fsel = parse_field_selector(params.get("fieldSelector"))
        limit = int(params.get("limit") or 0)
        cont = params.get("continue")
        rvp = params.get("resourceVersion")
        match = params.get("resourceVersionMatch")
        with self.lock:
            if cont:
                if rvp not in (None, "", "0"):
                    raise ApiError(400, "specifying resource version is not allowed when using continue")
                try:
                    tok = json.loads(base64.b64decode(cont + "=" * (-len(cont) % 4)))
                    snap = self._snapshots.get(tok["id"])
                except Exception:  # noqa: BLE001 - any garbage is a bad token
                    raise ApiError(400, "continue key is not valid: illegal base64 data")
                if snap is None or snap[0] < self.compacted_rv:
                    raise ApiError(410, "The provided continue parameter is too old to display a consistent "
                                   "list result. You can start a new list without the continue parameter, or "
                                   "use the continue token in this response to retrieve the remainder of the "
                                   "results. Continuing with the provided token results in an inconsistent "
                                   "list - objects that were created, modified, or deleted between the time "
                                   "the first chunk was returned and now may show up in the list.",
                                   reason="Expired")
                list_rv, items = snap[0], snap[2]
            else:
                list_rv = self.rv
                exact = rvp not in (None, "", "0") and (match == "Exact" or (limit and match != "NotOlderThan"))
                if rvp not in (None, "", "0"):
                    try:
                        want = int(rvp)
                    except ValueError:
                        raise ApiError(400, "invalid resource version: %r" % rvp)
                    if want > self.rv:
                        raise ApiError(504, "Too large resource version: %d, current: %d" % (want, self.rv),
                                       reason="Timeout", details={"causes": [{"reason": "ResourceVersionTooLarge",
                                                                              "message": "Too large resource version"}],
                                                                  "retryAfterSeconds": 1},
                                       headers={"Retry-After": "1"})
                    if exact and want < self.compacted_rv:
                        raise ApiError(410, "too old resource version: %d (%d)" % (want, self.compacted_rv),
                                       reason="Expired")
                objs = dict(self.store[rt.key])
                if exact and want < self.rv:
                    for hrv, _, key, new, old in reversed(self.history):
                        if hrv <= want:
                            break
                        if key != rt.key:
                            continue
                        md = new["metadata"]
                        k = (md.get("namespace") if rt.namespaced else None, md["name"])
                        if old is None:
                            objs.pop(k, None)
                        else:
                            objs[k] = old
                    list_rv = want
                items = [copy.deepcopy(o) for k, o in sorted(objs.items(), key=lambda kv: (kv[0][0] or "", kv[0][1]))
                         if (ns is None or k[0] == ns) and label_match(o["metadata"].get("labels"), lsel)
                         and field_match(o, fsel)]
            meta = {"resourceVersion": str(list_rv)}
            if limit and len(items) > limit:
                page, rest = items[:limit], items[limit:]
                sid = secrets.token_hex(8)
                if len(self._snapshots) > 200:
                    self._snapshots.pop(next(iter(self._snapshots)))
                self._snapshots[sid] = (list_rv, rt.key, rest)
                meta["continue"] = base64.b64encode(json.dumps({"id": sid, "rv": list_rv}).encode()).decode().rstrip("=")
                if not lsel and not fsel:
                    meta["remainingItemCount"] = len(rest)
                items = page
        return {"kind": rt.kind + "List", "apiVersion": rt.gv, "metadata": meta, "items": items}

    def _gone_status(self, message):
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": "Expired", "code": 410}

    def _start_watch(self, rt, ns, params, user, table):
        lsel = parse_label_selector(params.get("labelSelector"))
        fsel = parse_field_selector(params.get("fieldSelector"))
        rvp = params.get("resourceVersion")
        timeout = params.get("timeoutSeconds")
        try:
            timeout = float(timeout) if timeout else self.max_watch_seconds
        except ValueError:
            raise ApiError(400, "invalid timeoutSeconds")
        timeout = max(0.0, min(timeout, self.max_watch_seconds))
        bookmarks = params.get("allowWatchBookmarks") in ("true", "1")
        w = Watch(rt, ns, lsel, fsel, bookmarks, time.monotonic() + timeout, user, table)
        with self.cond:
            if rvp in (None, "", "0"):
                for k, o in sorted(self.store[rt.key].items(), key=lambda kv: (kv[0][0] or "", kv[0][1])):
                    if w.matches(o):
                        w.queue.append(("ADDED", copy.deepcopy(o)))
            else:
                try:
                    want = int(rvp)
                except ValueError:
                    raise ApiError(400, "invalid resource version: %r" % rvp)
                if want > self.rv:
                    raise ApiError(504, "Too large resource version: %d, current: %d" % (want, self.rv),
                                   reason="Timeout", headers={"Retry-After": "1"},
                                   details={"causes": [{"reason": "ResourceVersionTooLarge",
                                                        "message": "Too large resource version"}],
                                            "retryAfterSeconds": 1})
                if want < self.compacted_rv:
                    msg = "too old resource version: %d (%d)" % (want, self.compacted_rv)
                    if self.watch_gone == "http":
                        raise ApiError(410, msg, reason="Expired")
                    w.end = self._gone_status(msg)
                else:
                    for hrv, etype, key, new, old in self.history:
                        if hrv > want and key == rt.key:
                            ev = self._event_for(w, etype, new, old)
                            if ev:
                                w.queue.append((ev[0], copy.deepcopy(ev[1])))
            self._watches.append(w)
        return w

    def _end_watch(self, w):
        with self.cond:
            if w in self._watches:
                self._watches.remove(w)
            if w.end is None:
                w.end = "close"

    def _watch_next(self, w):
        """Block until there is something to send: returns (events, end)."""
        with self.cond:
            next_bm = getattr(w, "_next_bm", time.monotonic() + self.bookmark_interval)
            while True:
                nowm = time.monotonic()
                if w.queue or w.end is not None or self._closed:
                    evs, w.queue = w.queue, []
                    return evs, (w.end if w.end is not None else ("close" if self._closed else None))
                if nowm >= w.deadline:
                    evs = []
                    if w.bookmarks:
                        evs.append(("BOOKMARK", self._bookmark(w)))
                    return evs, "close"
                if w.bookmarks and nowm >= next_bm:
                    w._next_bm = nowm + self.bookmark_interval
                    return [("BOOKMARK", self._bookmark(w))], None
                wake = min(w.deadline, next_bm if w.bookmarks else w.deadline)
                self.cond.wait(max(0.01, min(1.0, wake - nowm)))

    def _bookmark(self, w):
        return {"kind": w.rt.kind, "apiVersion": w.rt.gv,
                "metadata": {"resourceVersion": str(self.rv), "creationTimestamp": None}}

    # -- tables -----------------------------------------------------------------

    def _table(self, rt, objs, list_meta=None, include="Metadata"):
        cols = [{"name": "Name", "type": "string", "format": "name", "description": "Name must be unique "
                 "within a namespace.", "priority": 0}]
        getters = [lambda o: o["metadata"]["name"]]
        pcs = rt.printer_columns() if rt.custom else None
        if rt.custom:
            if pcs is None:
                pcs = [{"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
            for c in pcs:
                cols.append({"name": c["name"], "type": c["type"], "format": c.get("format", ""),
                             "description": c.get("description", ""), "priority": c.get("priority", 0)})

                def g(o, c=c):
                    vals = jsonpath(o, c["jsonPath"])
                    if not vals:
                        return None
                    v = vals[0]
                    if c["type"] == "date":
                        return human_duration(v)
                    if isinstance(v, (dict, list)):
                        return json.dumps(v)
                    return v
                getters.append(g)
        elif rt.kind == "Service":
            extra = [("Type", lambda o: o["spec"].get("type")),
                     ("Cluster-IP", lambda o: o["spec"].get("clusterIP") or "None"),
                     ("External-IP", lambda o: o["spec"].get("externalName") or "<none>"),
                     ("Port(s)", lambda o: ",".join("%s/%s" % (p.get("port"), p.get("protocol", "TCP"))
                                                    for p in o["spec"].get("ports") or []) or "<none>"),
                     ("Age", lambda o: human_duration(o["metadata"].get("creationTimestamp"))),
                     ("Selector", lambda o: ",".join("%s=%s" % kv for kv in sorted((o["spec"].get("selector")
                                                                                      or {}).items())) or "<none>")]
            for n, g in extra:
                cols.append({"name": n, "type": "string", "format": "", "description": "",
                             "priority": 1 if n == "Selector" else 0})
                getters.append(g)
        elif rt.kind == "Lease":
            cols.append({"name": "Holder", "type": "string", "format": "", "description": "", "priority": 0})
            getters.append(lambda o: (o.get("spec") or {}).get("holderIdentity") or "")
            cols.append({"name": "Age", "type": "string", "format": "", "description": "", "priority": 0})
            getters.append(lambda o: human_duration(o["metadata"].get("creationTimestamp")))
        elif rt.kind == "Event":
            for n, g in (("Last Seen", lambda o: human_duration(o.get("lastTimestamp") or o.get("eventTime")
                                                                or o["metadata"].get("creationTimestamp"))),
                         ("Type", lambda o: o.get("type", "")), ("Reason", lambda o: o.get("reason", "")),
                         ("Object", lambda o: "%s/%s" % ((o.get("involvedObject") or {}).get("kind", "").lower(),
                                                          (o.get("involvedObject") or {}).get("name", ""))),
                         ("Message", lambda o: o.get("message", ""))):
                cols.append({"name": n, "type": "string", "format": "", "description": "", "priority": 0})
                getters.append(g)
            cols.pop(0)
            getters.pop(0)
        else:
            cols.append({"name": "Age", "type": "string", "format": "", "description": "", "priority": 0})
            getters.append(lambda o: human_duration(o["metadata"].get("creationTimestamp")))
        rows = []
        for o in objs:
            cells = []
            for g in getters:
                try:
                    cells.append(g(o))
                except (KeyError, TypeError, AttributeError):
                    cells.append(None)
            row = {"cells": cells}
            if include == "Object":
                row["object"] = o
            elif include != "None":
                row["object"] = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                                 "metadata": o.get("metadata", {})}
            rows.append(row)
        t = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list_meta or {},
             "columnDefinitions": cols, "rows": rows}
        return t

    # -- discovery and openapi --------------------------------------------------

    def _resource_list(self, gv):
        res = []
        with self.lock:
            for rt in sorted(self.types.values(), key=lambda r: r.plural):
                if rt.gv != gv:
                    continue
                r = {"name": rt.plural, "singularName": rt.singular, "namespaced": rt.namespaced,
                     "kind": rt.kind, "verbs": rt.verbs}
                if rt.short_names:
                    r["shortNames"] = rt.short_names
                if rt.categories:
                    r["categories"] = rt.categories
                res.append(r)
                if rt.status:
                    res.append({"name": rt.plural + "/status", "singularName": "", "namespaced": rt.namespaced,
                                "kind": rt.kind, "verbs": ["get", "patch", "update"]})
        if not res:
            return None
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": res}

    def _groups(self):
        groups = {}
        with self.lock:
            for rt in self.types.values():
                if rt.group:
                    groups.setdefault(rt.group, set()).add(rt.version)
        out = []
        for g in sorted(groups):
            vs = [{"groupVersion": "%s/%s" % (g, v), "version": v} for v in sorted(groups[g])]
            out.append({"name": g, "versions": vs, "preferredVersion": vs[0]})
        return out

    def _openapi_index(self):
        paths = {"api/v1": {"serverRelativeURL": "/openapi/v3/api/v1?hash=%s" % self._gv_hash("v1")}}
        for g in self._groups():
            for v in g["versions"]:
                gv = v["groupVersion"]
                paths["apis/" + gv] = {"serverRelativeURL": "/openapi/v3/apis/%s?hash=%s" % (gv, self._gv_hash(gv))}
        return {"paths": paths}

    def _gv_hash(self, gv):
        with self.lock:
            sig = json.dumps(sorted((rt.plural, rt.kind, bool(rt.crd)) for rt in self.types.values() if rt.gv == gv))
        return format(abs(hash(sig)) % (1 << 60), "X")

    def _openapi_doc(self, gv):
        """An OpenAPI 3 document for one group-version: enough operations for
        kubectl to see that the server does field validation, and the CRD
        schemas (for ``kubectl explain``)."""
        paths = {}
        schemas = {}
        fv = {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": True},
              "description": "fieldValidation instructs the server on how to handle objects in the request "
                             "containing unknown or duplicate fields."}
        with self.lock:
            types = [rt for rt in self.types.values() if rt.gv == gv]
            for rt in types:
                prefix = "/api/v1" if gv == "v1" else "/apis/" + gv
                coll = prefix + ("/namespaces/{namespace}/" if rt.namespaced else "/") + rt.plural
                gvk = {"group": rt.group, "version": rt.version, "kind": rt.kind}
                ref_name = "%s.%s.%s" % (".".join(reversed(rt.group.split("."))) if rt.group else "io.k8s.api.core",
                                         rt.version, rt.kind)
                op = {"x-kubernetes-group-version-kind": gvk, "parameters": [fv], "responses": {"200": {
                    "description": "OK", "content": {"application/json": {"schema": {
                        "$ref": "#/components/schemas/" + ref_name}}}}}}
                paths[coll] = {"post": dict(op, operationId="create" + rt.kind, **{"x-kubernetes-action": "post"})}
                paths[coll + "/{name}"] = {
                    "get": {"x-kubernetes-group-version-kind": gvk, "x-kubernetes-action": "get",
                            "responses": op["responses"]},
                    "put": dict(op, operationId="replace" + rt.kind, **{"x-kubernetes-action": "put"}),
                    "patch": dict(op, operationId="patch" + rt.kind, **{"x-kubernetes-action": "patch"})}
                if rt.custom and rt.schema():
                    sch = copy.deepcopy(rt.schema())
                    sch.setdefault("properties", {})
                    sch["properties"].setdefault("apiVersion", {"type": "string"})
                    sch["properties"].setdefault("kind", {"type": "string"})
                    sch["properties"].setdefault("metadata", {"type": "object"})
                    sch["x-kubernetes-group-version-kind"] = [gvk]
                    schemas[ref_name] = sch
                elif not rt.custom:
                    schemas[ref_name] = {"type": "object", "x-kubernetes-group-version-kind": [gvk],
                                         "x-kubernetes-preserve-unknown-fields": True}
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"},
                "paths": paths, "components": {"schemas": schemas}}

    # -- request handling (called by the handler) --------------------------------

    def _match_fault(self, method, path, watch, user=None):
        with self.lock:
            for f in self._faults:
                if f["count"] <= 0:
                    continue
                if f["user"] is not None and f["user"] != user:
                    continue
                if f["method"] and f["method"] != method:
                    continue
                if f["path"] and not f["path"].search(path):
                    continue
                if f["watch"] is not None and f["watch"] != watch:
                    continue
                f["count"] -= 1
                self._faults = [x for x in self._faults if x["count"] > 0]
                code = f["code"]
                hdrs = {"Retry-After": "1"} if code in (429, 503) else {}
                return ApiError(code, f["message"] or "injected failure (%d)" % code, headers=hdrs)
        return None

    def _log(self, entry):
        with self.lock:
            self._requests.append(entry)
            if len(self._requests) > 50000:
                del self._requests[:10000]


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    server_version = "tpmail-fake-kube-apiserver/1"

    def log_message(self, fmt, *args):  # noqa: D401
        if self.server.api.verbose:
            sys.stderr.write("fake-kube: " + (fmt % args) + "\n")

    def setup(self):
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            try:
                self.connection.settimeout(10)
                self.connection.do_handshake()
                self.connection.settimeout(self.timeout)
            except (OSError, ssl.SSLError):
                self.close_connection = True
                raise

    def handle(self):
        try:
            super().handle()
        except (OSError, ssl.SSLError):
            pass

    # -- plumbing

    def _send(self, code, body, ctype="application/json", headers=None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-cache, private")
        for k, v in (headers or {}).items():
            if isinstance(v, list):
                for x in v:
                    self.send_header(k, x)
            else:
                self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()
        self._status = code

    def _error(self, e):
        self._send(e.code, e.status(), headers=e.headers)

    def do_GET(self):
        self._dispatch()

    def do_POST(self):
        self._dispatch()

    def do_PUT(self):
        self._dispatch()

    def do_PATCH(self):
        self._dispatch()

    def do_DELETE(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def _dispatch(self):
        api = self.server.api
        self._status = None
        u = urllib.parse.urlsplit(self.path)
        path = u.path
        params = {k: v[-1] for k, v in urllib.parse.parse_qs(u.query, keep_blank_values=True).items()}
        entry = {"time": time.time(), "method": self.command, "path": path, "query": params, "user": None,
                 "status": None, "content_type": self.headers.get("Content-Type"), "body": None,
                 "watch": params.get("watch") in ("true", "1"), "accept": self.headers.get("Accept"),
                 "user_agent": self.headers.get("User-Agent")}
        try:
            n = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(n) if n > 0 else b""
            if n > 3 * 1024 * 1024:
                raise ApiError(413, "request entity too large")
            body = None
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    if self.command in ("POST", "PUT", "PATCH"):
                        raise ApiError(400, "the body of the request could not be decoded as JSON "
                                       "(YAML bodies are not supported by this fake)")
            entry["body"] = copy.deepcopy(body)
            entry["user"] = self._authenticate(path)
            fault = api._match_fault(self.command, path, entry["watch"], entry["user"])
            if fault is not None:
                raise fault
            self._route(path, params, body, entry)
        except ApiError as e:
            try:
                self._error(e)
            except OSError:
                pass
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, socket.timeout):
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - a bug in the fake is a 500, with the trace on stderr
            import traceback
            traceback.print_exc()
            try:
                self._error(ApiError(500, "fake apiserver internal error: %r" % e))
            except OSError:
                pass
        finally:
            entry["status"] = self._status
            api._log(entry)

    def _authenticate(self, path):
        api = self.server.api
        if not api.tls:
            return "anonymous"
        auth = self.headers.get("Authorization") or ""
        if auth.startswith("Bearer "):
            tok = auth[7:].strip()
            with api.lock:
                user = api.tokens.get(tok)
            if user is None:
                raise ApiError(401, "Unauthorized")
            return user
        if path in ("/version", "/healthz", "/livez", "/readyz") or path.startswith("/version"):
            return "system:anonymous"
        raise ApiError(401, "Unauthorized")

    def _route(self, path, params, body, entry):
        api = self.server.api
        parts = [p for p in path.split("/") if p]
        m = self.command
        if path in ("/healthz", "/livez", "/readyz"):
            return self._send(200, "ok", "text/plain; charset=utf-8")
        if path == "/version":
            return self._send(200, {"major": "1", "minor": "32", "gitVersion": "v1.32.0-tpmail-fake",
                                    "gitCommit": "0" * 40, "gitTreeState": "clean",
                                    "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23.0",
                                    "compiler": "gc", "platform": "linux/amd64"})
        if path == "/api":
            return self._send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": "%s:%d" % (HOST, api.port)}]})
        if path == "/apis":
            return self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": api._groups()})
        if path == "/openapi/v3":
            return self._send(200, api._openapi_index())
        if path.startswith("/openapi/v3/"):
            gv = path[len("/openapi/v3/"):]
            gv = gv[len("api/"):] if gv.startswith("api/") else gv[len("apis/"):] if gv.startswith("apis/") else gv
            if api._resource_list(gv) is None:
                raise ApiError(404, "the server could not find the requested resource")
            return self._send(200, api._openapi_doc(gv))
        if not parts or parts[0] not in ("api", "apis"):
            raise ApiError(404, "the server could not find the requested resource")
        if parts[0] == "api":
            if len(parts) < 2 or parts[1] != "v1":
                raise ApiError(404, "the server could not find the requested resource")
            group, version, rest = "", "v1", parts[2:]
        else:
            if len(parts) == 2:
                g = next((x for x in api._groups() if x["name"] == parts[1]), None)
                if g is None:
                    raise ApiError(404, "the server could not find the requested resource")
                return self._send(200, dict(g, kind="APIGroup", apiVersion="v1"))
            if len(parts) < 3:
                raise ApiError(404, "the server could not find the requested resource")
            group, version, rest = parts[1], parts[2], parts[3:]
        gv = "%s/%s" % (group, version) if group else version
        if not rest:
            rl = api._resource_list(gv)
            if rl is None:
                raise ApiError(404, "the server could not find the requested resource")
            return self._send(200, rl)
        # resource paths
        ns = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns, plural, name, sub = rest[1], rest[2], (rest[3] if len(rest) > 3 else None), \
                (rest[4] if len(rest) > 4 else None)
            if len(rest) > 5:
                raise ApiError(404, "the server could not find the requested resource")
        else:
            plural, name, sub = rest[0], (rest[1] if len(rest) > 1 else None), (rest[2] if len(rest) > 2 else None)
            if len(rest) > 3:
                raise ApiError(404, "the server could not find the requested resource")
        with api.lock:
            rt = api._type_for_path(group, version, plural)
        if rt is None:
            raise ApiError(404, "the server could not find the requested resource")
        if ns is not None and not rt.namespaced:
            raise ApiError(404, "the server could not find the requested resource")
        if rt.namespaced and ns is None and name is not None:
            raise ApiError(404, "the server could not find the requested resource")
        if sub is not None and (sub != "status" or not rt.status):
            raise ApiError(404, "the server could not find the requested resource")
        table = "as=Table" in (self.headers.get("Accept") or "")
        if name is None:
            if m == "GET":
                if entry["watch"]:
                    return self._watch(rt, ns, params, entry, table)
                lst = api._list(rt, ns, params)
                if table:
                    return self._send(200, api._table(rt, lst["items"], lst["metadata"],
                                                      params.get("includeObject", "Metadata")))
                return self._send(200, lst)
            if m == "POST":
                if rt.namespaced and ns is None:
                    raise ApiError(405, "the server does not allow this method on the requested resource",
                                   reason="MethodNotAllowed")
                obj, warns = api._create(rt, ns, body if body is not None else {}, params, entry["user"])
                return self._send(201, obj, headers=self._warning_headers(warns))
            if m == "DELETE":
                if "deletecollection" not in rt.verbs:
                    raise ApiError(405, "the server does not allow this method on the requested resource",
                                   reason="MethodNotAllowed")
                lst = api._list(rt, ns, params)
                for o in lst["items"]:
                    try:
                        api._delete(rt, ns if rt.namespaced else None, o["metadata"]["name"], params, body or {})
                    except ApiError:
                        pass
                return self._send(200, {"kind": rt.kind + "List", "apiVersion": rt.gv,
                                        "metadata": {"resourceVersion": str(api.rv)}, "items": lst["items"]})
            raise ApiError(405, "the server does not allow this method on the requested resource",
                           reason="MethodNotAllowed")
        key_ns = ns if rt.namespaced else None
        if m in ("GET", "HEAD"):
            with api.lock:
                o = api.store[rt.key].get((key_ns, name))
                o = copy.deepcopy(o)
            if o is None:
                raise not_found(rt, name)
            if table:
                return self._send(200, api._table(rt, [o], {"resourceVersion": o["metadata"]["resourceVersion"]},
                                                  params.get("includeObject", "Metadata")))
            return self._send(200, o)
        if m == "PUT":
            obj, warns = api._update(rt, key_ns, name, body, params, sub)
            return self._send(200, obj, headers=self._warning_headers(warns))
        if m == "PATCH":
            obj, warns = api._patch(rt, key_ns, name, sub, body, self.headers.get("Content-Type"), params)
            return self._send(200, obj, headers=self._warning_headers(warns))
        if m == "DELETE":
            if sub is not None:
                raise ApiError(405, "the server does not allow this method on the requested resource",
                               reason="MethodNotAllowed")
            o = api._delete(rt, key_ns, name, params, body or {})
            return self._send(200, o)
        raise ApiError(405, "the server does not allow this method on the requested resource",
                       reason="MethodNotAllowed")

    @staticmethod
    def _warning_headers(warns):
        if not warns:
            return {}
        return {"Warning": ['299 - "%s"' % w.replace('"', '\\"') for w in warns]}

    # -- watch streaming

    def _chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, rt, ns, params, entry, table):
        api = self.server.api
        w = api._start_watch(rt, ns, params, entry["user"], table)
        w.sock = self.connection
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self._status = 200
        self.close_connection = True
        try:
            while True:
                evs, end = api._watch_next(w)
                for etype, obj in evs:
                    if table and etype != "BOOKMARK":
                        obj = api._table(rt, [obj], {"resourceVersion": obj["metadata"]["resourceVersion"]},
                                         params.get("includeObject", "Metadata"))
                    self._chunk(json.dumps({"type": etype, "object": obj}).encode() + b"\n")
                    w.events_sent += 1
                if end is None:
                    continue
                if isinstance(end, dict):
                    self._chunk(json.dumps({"type": "ERROR", "object": end}).encode() + b"\n")
                    self.wfile.write(b"0\r\n\r\n")
                elif end == "drop":
                    try:
                        self.connection.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                else:
                    self.wfile.write(b"0\r\n\r\n")
                try:
                    self.wfile.flush()
                except OSError:
                    pass
                return
        except (OSError, ssl.SSLError):
            return
        finally:
            api._end_watch(w)


# --------------------------------------------------------------------------
# a tiny client (for tests that want to talk HTTP without kubectl)

class KubeClient:
    def __init__(self, server, token=None):
        import http.client
        self._http = http.client
        self.server = server
        self.token = token if token is not None else server.token
        self.ctx = None
        if server.tls:
            self.ctx = ssl.create_default_context(cafile=server.ca_file)

    def request(self, method, path, body=None, content_type="application/json", headers=None, timeout=30):
        """(status, parsed JSON or text, response headers)."""
        if self.server.tls:
            c = self._http.HTTPSConnection(HOST, self.server.port, context=self.ctx, timeout=timeout)
        else:
            c = self._http.HTTPConnection(HOST, self.server.port, timeout=timeout)
        h = {"Accept": "application/json"}
        if self.token and self.server.tls:
            h["Authorization"] = "Bearer " + self.token
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = content_type
        h.update(headers or {})
        try:
            c.request(method, path, body=data, headers=h)
            r = c.getresponse()
            raw = r.read()
            try:
                parsed = json.loads(raw) if raw else None
            except ValueError:
                parsed = raw.decode(errors="replace")
            return r.status, parsed, r.headers
        finally:
            c.close()

    def watch(self, path, timeout=30):
        """Yield parsed events of a watch stream until it ends."""
        if self.server.tls:
            c = self._http.HTTPSConnection(HOST, self.server.port, context=self.ctx, timeout=timeout)
        else:
            c = self._http.HTTPConnection(HOST, self.server.port, timeout=timeout)
        h = {"Accept": "application/json"}
        if self.token and self.server.tls:
            h["Authorization"] = "Bearer " + self.token
        c.request("GET", path, headers=h)
        r = c.getresponse()
        if r.status != 200:
            raw = r.read()
            c.close()
            yield {"type": "HTTP", "code": r.status, "object": json.loads(raw) if raw else None}
            return
        try:
            while True:
                line = r.readline()
                if not line:
                    return
                yield json.loads(line)
        except (OSError, self._http.HTTPException):
            return
        finally:
            c.close()


# --------------------------------------------------------------------------
# script mode

def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description="A fake Kubernetes API server for tests (loopback only).")
    ap.add_argument("--workdir", required=True, help="where the CA, token and kubeconfig go")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--http", action="store_true", help="plain HTTP without authentication")
    ap.add_argument("--token", default="test-token")
    ap.add_argument("--no-validate", action="store_true", help="store custom resources without schema "
                    "validation or pruning")
    ap.add_argument("--bookmark-interval", type=float, default=5.0)
    ap.add_argument("--lifetime", type=float, default=600.0, help="exit after this many seconds (default 600)")
    ap.add_argument("--verbose", action="store_true")
    a = ap.parse_args(argv)
    srv = KubeApiServer(workdir=a.workdir, tls=not a.http, token=a.token, port=a.port,
                        validate=not a.no_validate, bookmark_interval=a.bookmark_interval, verbose=a.verbose)
    srv.start()
    print(json.dumps({"url": srv.url, "kubeconfig": srv.kubeconfig_path, "ca_file": srv.ca_file,
                      "token_file": srv.token_file, "pid": os.getpid()}), flush=True)
    ev = threading.Event()

    def stop(*_):
        ev.set()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ev.wait(a.lifetime)
    srv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
