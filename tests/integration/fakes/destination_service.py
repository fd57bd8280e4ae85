"""A fake SAP Destination service (find-destination API) and the OAuth
server behind its mail destinations.

    ts = TokenService(tenants=["tenant-a", "tenant-b"]).start()
    ds = DestinationService(ts).start()
    key = ds.service_key()            # clientid, clientsecret, url, uri
    ds.put("tenant-a", {"Name": "dest-t", "Type": "MAIL", ...})
    ds.update("tenant-a", "dest-t", {"mail.password": "new"})
    ds.set_fail("500" | "hang" | "malformed" | "401"); ds.set_fail(None)

GET /destination-configuration/v1/destinations/<name> with
``Authorization: Bearer <token>``: the token must be one ``ts`` issued to
this instance's client and not yet expired (else 401); its tenant picks the
destinations (404 for an unknown name).  The reply is SAP's shape:
``{"owner", "destinationConfiguration", "authTokens"}``.  authTokens by
``Authentication``:

* BasicAuthentication: a ``Basic`` token (base64 user:password)
* OAuth2ClientCredentials: a ``Bearer`` access token for ``mail.user``
* OAuth2RefreshToken: an access token only when ``X-refresh-token`` is a
  refresh token registered with ``add_refresh_token``; otherwise
  authTokens[0] has an ``error`` and an empty value (as SAP answers)
* OAuth2AuthorizationCode: likewise with ``X-code`` (``add_code``; each
  code works once, like a real authorization code)

Levels and fragments: ``put(tenant, props, level="instance")`` stores a
destination at the service-instance level (the default is the subaccount
level); the v1 lookup tries the instance level, then the subaccount level.
``GET /destination-configuration/v2/destinations/<name>@<level>`` (the
Consume API) reads that level only: ``subaccount``, ``instance``, or
``provider_subaccount``/``provider_instance`` (the provider's, whatever
the token's tenant).  ``put_fragment(tenant, {"FragmentName": ..., ...})``
stores a fragment; ``X-Fragment-Name`` (a comma list) merges fragments
into the destination, their properties winning; a missing one is a 404
("Fragment ... not found") unless ``X-Fragment-Optional: true``.

``certificates``: the certificates a destination's ``TrustStoreLocation``
and ``KeyStoreLocation`` name, from ``ds.put_certificate(tenant, name,
data)`` (``{"Name", "Type": "CERTIFICATE", "Content": base64}``), as SAP
returns them with find-destination.  HTTPS with ``tls=<server context>``.

Access tokens for mail users are checked by Dovecot's oauth2 passdb at
``POST /mail-oauth/introspect`` (``token=...``; introspection_mode = post):
``{"active": true, "username": user}`` while valid.  That endpoint is never
affected by ``set_fail``.

Script: ``python3 destination_service.py --destinations FILE --keys-dir DIR
[--instance NAME] [--lifetime S]`` serves the destinations file's tenants
(tpmaild's destinations-file shape), writes the service key to
DIR/NAME and prints one JSON line with the URLs and ``--resolve`` entries.
"""

import base64
import json
import os
import sys
import threading
import time
import urllib.parse

try:
    from . import common
    from .xsuaa import TokenService, PROVIDER
except ImportError:                     # run as a script
    import common
    from xsuaa import TokenService, PROVIDER

FIND_PREFIX = "/destination-configuration/v1/destinations/"
CONSUME_PREFIX = "/destination-configuration/v2/destinations/"
LEVELS = ("subaccount", "instance", "provider_subaccount", "provider_instance")
INTROSPECT = "/mail-oauth/introspect"
FAIL_MODES = (None, "500", "hang", "malformed", "401", "503")


class DestinationService:
    def __init__(self, token_service, client_id=None, client_secret=None, name="dest-instance",
                 mail_token_ttl=3600, hang_max=30.0, port=0, verbose=False, tls=None):
        self.ts = token_service
        self.name = name
        self.client_id = client_id or "sb-%s!b%d" % (name, os.getpid())
        self.client_secret = client_secret or common.random_secret("dest-client")
        self.ts.add_client(self.client_id, self.client_secret)
        self.destinations = {}          # tenant -> {name: {props}}, subaccount level
        self.instance_destinations = {}  # tenant -> {name: {props}}, instance level
        self.fragments = {}             # tenant -> {fragment name: {props}}
        self.certificates = {}          # tenant -> {name: certificate object}
        self.requests = []              # every find-destination request
        self.introspections = []        # every introspection request
        self.mail_tokens = {}           # access token -> {"user", "exp"}
        self.refresh_tokens = {}        # refresh token -> user
        self.codes = {}                 # authorization code -> user (single use)
        self.mail_token_ttl = mail_token_ttl
        self.hang_max = hang_max
        self.fail = None
        self.fail_tenants = None        # None: every tenant
        self._release = threading.Event()
        self.lock = threading.RLock()
        handler = type("Handler", (_Handler,), {"ds": self})
        self.server = common.BoundedHTTPServer(handler, port=port, verbose=verbose, tls=tls)

    # -- lifecycle --------------------------------------------------------

    def start(self):
        self.server.start()
        return self

    def close(self):
        self._release.set()
        self.server.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *a):
        self.close()

    @property
    def port(self):
        return self.server.port

    def url(self):
        return "%s://%s:%d" % (self.server.scheme, common.HOST, self.port)

    @property
    def introspection_url(self):
        return self.url() + INTROSPECT

    def service_key(self):
        """What a service key (binding) of this instance holds."""
        return {"clientid": self.client_id, "clientsecret": self.client_secret,
                "url": self.ts.url(), "uri": self.url(),
                "identityzone": self.ts.provider_subdomain, "uaadomain": self.ts.domain,
                "tenantid": "zone-" + PROVIDER, "xsappname": "clone-" + self.name,
                "tenantmode": "dedicated", "verificationkey": "none", "instanceid": self.name}

    # -- destinations -------------------------------------------------------

    def put(self, tenant, props, level="subaccount"):
        if not all(isinstance(v, str) for v in props.values()):
            raise TypeError("destination properties are strings")
        store = {"subaccount": self.destinations,
                 "instance": self.instance_destinations}[level]
        with self.lock:
            store.setdefault(tenant, {})[props["Name"]] = dict(props)

    def put_fragment(self, tenant, props):
        if not all(isinstance(v, str) for v in props.values()):
            raise TypeError("fragment properties are strings")
        with self.lock:
            self.fragments.setdefault(tenant, {})[props["FragmentName"]] = dict(props)

    def _find(self, tenant, name, level):
        """The destination's properties (a copy) or None."""
        with self.lock:
            if level is None:
                d = (self.instance_destinations.get(tenant, {}).get(name)
                     or self.destinations.get(tenant, {}).get(name))
            else:
                if level.startswith("provider_"):
                    tenant, level = PROVIDER, level[len("provider_"):]
                store = (self.instance_destinations if level == "instance"
                         else self.destinations)
                d = store.get(tenant, {}).get(name)
            return dict(d) if d is not None else None

    def load(self, dests):
        """{tenant: [props, ...]} (tpmaild's destinations-file shape)."""
        for tenant, arr in dests.items():
            if tenant != PROVIDER:
                self.ts.add_tenant(tenant)
            for d in arr:
                if "FragmentName" in d:
                    self.put_fragment(tenant, d)
                else:
                    self.put(tenant, d)

    def update(self, tenant, name, changes):
        with self.lock:
            d = self.destinations[tenant][name]
            for k, v in changes.items():
                if v is None:
                    d.pop(k, None)
                else:
                    d[k] = v

    def put_certificate(self, tenant, name, data, ctype="CERTIFICATE"):
        """A certificate (bytes: PEM or DER) destinations can name."""
        with self.lock:
            self.certificates.setdefault(tenant, {})[name] = {
                "Name": name, "Type": ctype, "Content": base64.b64encode(data).decode()}

    def _certificates(self, tenant, d):
        names = [d.get(k) for k in ("TrustStoreLocation", "KeyStoreLocation") if d.get(k)]
        with self.lock:
            have = self.certificates.get(tenant, {})
            return [dict(have[n]) for n in names if n in have]

    def remove(self, tenant, name):
        with self.lock:
            self.destinations.get(tenant, {}).pop(name, None)

    def get(self, tenant, name):
        with self.lock:
            return dict(self.destinations[tenant][name])

    def set_fail(self, mode, tenants=None):
        """Make find-destination fail: "500"/"503" (an error status),
        "hang" (hold the request up to ``hang_max`` s, then close without an
        answer), "malformed" (200 with broken JSON), "401" (every token
        refused); None: healthy again (hanging requests are let go)."""
        if mode not in FAIL_MODES:
            raise ValueError("unknown failure mode %r" % (mode,))
        with self.lock:
            self.fail = mode
            self.fail_tenants = set(tenants) if tenants else None
            if mode != "hang":
                old, self._release = self._release, threading.Event()
                old.set()

    # -- mail OAuth -----------------------------------------------------------

    def add_refresh_token(self, rt, user):
        with self.lock:
            self.refresh_tokens[rt] = user

    def add_code(self, code, user):
        with self.lock:
            self.codes[code] = user

    def issue_mail_token(self, user, ttl=None):
        ttl = self.mail_token_ttl if ttl is None else ttl
        tok = "mail-at-" + common.random_secret(user, 16)
        with self.lock:
            self.mail_tokens[tok] = {"user": user, "exp": time.time() + ttl, "iat": time.time()}
        return tok, ttl

    def mail_token_user(self, tok):
        with self.lock:
            rec = self.mail_tokens.get(tok)
        if rec is None or time.time() >= rec["exp"]:
            return None
        return rec["user"]

    def revoke_mail_tokens(self):
        with self.lock:
            for rec in self.mail_tokens.values():
                rec["exp"] = 0

    # -- records ------------------------------------------------------------

    def find_requests(self, tenant=None, name=None, status=None):
        with self.lock:
            return [r for r in self.requests
                    if (tenant is None or r["tenant"] == tenant)
                    and (name is None or r["name"] == name)
                    and (status is None or r["status"] == status)]

    # -- the reply ----------------------------------------------------------

    def _auth_tokens(self, d, headers, rec):
        authn = d.get("Authentication", "BasicAuthentication")
        user = d.get("mail.user", "")
        if authn == "BasicAuthentication":
            v = base64.b64encode(("%s:%s" % (user, d.get("mail.password", ""))).encode()).decode()
            return [{"type": "Basic", "value": v,
                     "http_header": {"key": "Authorization", "value": "Basic " + v}}]
        if authn == "NoAuthentication":
            return []
        if authn == "OAuth2ClientCredentials":
            who = user
        elif authn == "OAuth2RefreshToken":
            rt = headers.get("X-refresh-token")
            rec["x_refresh_token"] = rt
            with self.lock:
                who = self.refresh_tokens.get(rt) if rt else None
            if who is None:
                return [_token_error("Retrieval of OAuthToken failed due to: %s"
                                     % ("invalid_grant: Invalid refresh token" if rt
                                        else "missing X-refresh-token header"))]
        elif authn == "OAuth2AuthorizationCode":
            code = headers.get("X-code")
            rec["x_code"] = code
            with self.lock:
                who = self.codes.pop(code, None) if code else None
            if who is None:
                return [_token_error("Retrieval of OAuthToken failed due to: %s"
                                     % ("invalid_grant: Invalid authorization code" if code
                                        else "missing X-code header"))]
        else:
            return [_token_error("Authentication type %s is not supported" % authn)]
        tok, ttl = self.issue_mail_token(who)
        rec["issued_mail_token"] = tok
        t = {"type": "Bearer", "value": tok, "expires_in": str(int(ttl)),
             "http_header": {"key": "Authorization", "value": "Bearer " + tok}}
        if authn == "OAuth2RefreshToken":
            t["refresh_token"] = headers.get("X-refresh-token")
        return [t]


def _token_error(msg):
    return {"type": "", "value": "", "error": msg}


class _Handler(common.QuietHandler):
    ds = None

    def do_GET(self):
        ds = self.ds
        u = urllib.parse.urlsplit(self.path)
        level = None
        if u.path.startswith(FIND_PREFIX):
            name = urllib.parse.unquote(u.path[len(FIND_PREFIX):])
        elif u.path.startswith(CONSUME_PREFIX):
            name, _, level = urllib.parse.unquote(u.path[len(CONSUME_PREFIX):]).rpartition("@")
            if level not in LEVELS or not name:
                return self.reply(400, {"ErrorMessage": "name@level expected"})
        else:
            return self.reply(404, {"ErrorMessage": "no such endpoint"})
        query = urllib.parse.parse_qs(u.query)
        auth = self.headers.get("Authorization", "")
        tok = auth[7:].strip() if auth[:7].lower() == "bearer " else None
        tokrec = ds.ts.lookup(tok) if tok else None
        tenant = tokrec["tenant"] if tokrec else None
        rec = {"time": time.time(), "name": name, "tenant": tenant, "status": None,
               "error": None, "token": tok, "x_refresh_token": self.headers.get("X-refresh-token"),
               "x_code": self.headers.get("X-code"), "level": level,
               "x_fragment_name": self.headers.get("X-Fragment-Name"),
               "x_fragment_optional": self.headers.get("X-Fragment-Optional")}

        def answer(code, body, err=None, ctype="application/json"):
            rec["status"] = code
            rec["error"] = err
            with ds.lock:
                ds.requests.append(rec)
            self.reply(code, body, ctype=ctype)

        with ds.lock:
            fail, fail_tenants, release = ds.fail, ds.fail_tenants, ds._release
        if fail and (fail_tenants is None or tenant in fail_tenants):
            if fail == "hang":
                rec["status"] = "hang"
                with ds.lock:
                    ds.requests.append(rec)
                release.wait(ds.hang_max)
                self.close_connection = True
                return
            if fail == "malformed":
                return answer(200, b'{"owner": {"SubaccountId": "x", "InstanceId": null}, '
                                   b'"destinationConfiguration": {"Name": "', "injected malformed")
            if fail == "401":
                return answer(401, {"ErrorMessage": "Unauthorized"}, "injected 401")
            return answer(int(fail), {"ErrorMessage": "Internal Server Error"},
                          "injected %s" % fail)
        if tokrec is None:
            why = ds.ts.why_invalid(tok) if tok else "no bearer token"
            return answer(401, {"ErrorMessage": "Unauthorized"}, "token %s" % why)
        if tokrec["client_id"] != ds.client_id:
            return answer(401, {"ErrorMessage": "Unauthorized"}, "token of another client")
        d = ds._find(tenant, name, level)
        if d is None:
            return answer(404, {"ErrorMessage": "Configuration with the specified name was "
                                                "not found"}, "not found")
        optional = (self.headers.get("X-Fragment-Optional") or "").lower() == "true"
        for fname in filter(None, (f.strip() for f in
                                   (self.headers.get("X-Fragment-Name") or "").split(","))):
            with ds.lock:
                frag = ds.fragments.get(tenant, {}).get(fname)
                frag = dict(frag) if frag is not None else None
            if frag is None:
                if optional:
                    continue
                return answer(404, {"ErrorMessage": "Fragment %s not found" % fname},
                              "fragment not found")
            frag.pop("FragmentName")
            d.update(frag)
        body = {"owner": {"SubaccountId": "subaccount-" + tenant, "InstanceId": None},
                "destinationConfiguration": d}
        if query.get("$skipTokenRetrieval", ["false"])[0] != "true":
            body["authTokens"] = ds._auth_tokens(d, self.headers, rec)
        certs = ds._certificates(tenant, d)
        if certs:
            body["certificates"] = certs
        answer(200, body)

    def do_POST(self):
        ds = self.ds
        u = urllib.parse.urlsplit(self.path)
        try:
            raw = self.read_body()
        except ValueError:
            return self.reply(413, {"error": "too large"})
        if u.path != INTROSPECT:
            return self.reply(404, {"ErrorMessage": "no such endpoint"})
        form = urllib.parse.parse_qs(raw.decode("utf-8", "replace"))
        tok = (form.get("token") or [""])[0]
        if not tok:
            auth = self.headers.get("Authorization", "")
            tok = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        user = ds.mail_token_user(tok)
        with ds.lock:
            ds.introspections.append({"time": time.time(), "token": tok, "user": user})
        if user is None:
            return self.reply(200, {"active": False})
        self.reply(200, {"active": True, "username": user, "scope": "pop3",
                         "exp": int(ds.mail_tokens[tok]["exp"])})


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--destinations", required=True, help="{tenant: [destination, ...]} JSON")
    ap.add_argument("--keys-dir", help="write the service key here as INSTANCE")
    ap.add_argument("--instance", default="dest-instance")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--token-port", type=int, default=0)
    ap.add_argument("--expires-in", type=float, default=3600, help="token lifetime")
    ap.add_argument("--refresh-token", action="append", default=[], help="RT:USER")
    ap.add_argument("--code", action="append", default=[], help="CODE:USER")
    ap.add_argument("--lifetime", type=float, default=600, help="exit after this many seconds")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    with open(a.destinations) as f:
        dests = json.load(f)
    ts = TokenService(tenants=[t for t in dests if t != PROVIDER], expires_in=a.expires_in,
                      port=a.token_port, verbose=a.verbose)
    ds = DestinationService(ts, name=a.instance, port=a.port, verbose=a.verbose)
    ds.load(dests)
    for s in a.refresh_token:
        rt, _, u = s.partition(":")
        ds.add_refresh_token(rt, u)
    for s in a.code:
        c, _, u = s.partition(":")
        ds.add_code(c, u)
    ts.start()
    ds.start()
    out = {"destination_url": ds.url(), "token_url": ts.url(),
           "introspection_url": ds.introspection_url, "resolve": ts.resolve_args()}
    if a.keys_dir:
        os.makedirs(a.keys_dir, exist_ok=True)
        out["service_key"] = os.path.join(a.keys_dir, a.instance)
        common.write_json(out["service_key"], ds.service_key())
    print(json.dumps(out), flush=True)
    try:
        common.run_until(a.lifetime)
    finally:
        ds.close()
        ts.close()


if __name__ == "__main__":
    sys.exit(main())
