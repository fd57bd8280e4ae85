"""A fake XSUAA token service: OAuth2 client credentials per tenant.

The tenant is the first label of the Host header: a service key's ``url``
is ``http://<provider-subdomain>.<domain>:PORT`` and a subscriber tenant T
gets its tokens from ``http://T.<domain>:PORT`` (SAP's subdomain
replacement).  Tokens are JWT-shaped, differ per tenant and per request,
and are valid only until ``expires_in`` runs out.

    ts = TokenService(domain="auth.test", tenants=["tenant-a"]).start()
    ts.add_client("sb-dest!b1", "s3cret")
    ts.url()            -> "http://prov-subaccount.auth.test:PORT"
    ts.url("tenant-a")  -> "http://tenant-a.auth.test:PORT"
    ts.resolve_args()   -> ["prov-subaccount.auth.test:PORT:127.0.0.1", ...]
    ts.lookup(token)    -> {"tenant", "client_id", "exp", ...} or None

HTTPS with ``tls=<server ssl.SSLContext>`` (``fakes.pki``); a context that
requires client certificates makes it the ``certurl`` of x.509 service
keys: ``ts.add_cert_client(client_id, cert)`` registers the certificate
whose fingerprint identifies that client, and a token is issued only to a
connection whose client certificate has that fingerprint (no secret).

Endpoints:
  POST /oauth/token   grant_type=client_credentials, client_id; HTTP Basic
                      client_id:client_secret (or client_secret in the body),
                      or a client certificate for an x.509 client
  POST /introspect    token=...  -> {"active": bool, "client_id", "zdn", "exp"}

Script: ``python3 xsuaa.py --client ID:SECRET --tenant tenant-a [--port N]
[--expires-in S] [--lifetime S]`` prints one JSON line with its URLs.
"""

import base64
import json
import sys
import threading
import time
import urllib.parse

try:
    from . import common
except ImportError:                     # run as a script
    import common

PROVIDER = "provider"


class TokenService:
    def __init__(self, domain="auth.test", provider_subdomain="prov-subaccount", tenants=(),
                 expires_in=3600, pad_to=0, name="xsuaa", port=0, verbose=False, tls=None):
        self.domain = domain
        self.provider_subdomain = provider_subdomain
        self.tenants = set(tenants)
        self.expires_in = expires_in
        self.pad_to = pad_to
        self.name = name
        self.clients = {}               # client_id -> secret
        self.cert_clients = {}          # client_id -> sha256 of its certificate
        self.tokens = {}                # token -> record
        self.requests = []              # every /oauth/token request
        self.fail = None                # None, or an HTTP status to answer with
        self.lock = threading.Lock()
        self._key = common.random_secret("jwtkey").encode()
        handler = type("Handler", (_Handler,), {"ts": self})
        self.server = common.BoundedHTTPServer(handler, port=port, verbose=verbose, tls=tls)

    # -- lifecycle --------------------------------------------------------

    def start(self):
        self.server.start()
        return self

    def close(self):
        self.server.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *a):
        self.close()

    @property
    def port(self):
        return self.server.port

    # -- configuration -------------------------------------------------------

    def add_client(self, client_id, secret):
        with self.lock:
            self.clients[client_id] = secret

    def add_cert_client(self, client_id, cert):
        """An x.509 client: ``cert`` (PEM path or text) authenticates it."""
        with self.lock:
            self.cert_clients[client_id] = _fingerprint(cert)

    @property
    def tls_errors(self):
        """Handshakes that failed (e.g. a client certificate of another CA)."""
        return list(self.server.tls_errors)

    def add_tenant(self, tenant):
        with self.lock:
            self.tenants.add(tenant)

    def subdomain(self, tenant):
        return self.provider_subdomain if tenant in (None, PROVIDER) else tenant

    def host(self, tenant=None):
        return "%s.%s" % (self.subdomain(tenant), self.domain)

    def url(self, tenant=None):
        return "%s://%s:%d" % (self.server.scheme, self.host(tenant), self.port)

    def resolve_args(self, tenants=()):
        """curl-style HOST:PORT:ADDR entries for the provider and ``tenants``
        (default: every known tenant)."""
        ts = [None] + list(tenants or sorted(self.tenants))
        return ["%s:%d:%s" % (self.host(t), self.port, common.HOST) for t in ts]

    # -- tokens -----------------------------------------------------------

    def tenant_of_host(self, host):
        """Tenant named by a Host header, or None if it is not ours."""
        h = (host or "").strip().lower()
        if h.startswith("["):
            return None
        h = h.rsplit(":", 1)[0] if ":" in h else h
        suffix = "." + self.domain
        if not h.endswith(suffix):
            return None
        label = h[:-len(suffix)]
        if not label or "." in label:
            return None
        if label == self.provider_subdomain:
            return PROVIDER
        return label if label in self.tenants else None

    def issue(self, tenant, client_id, expires_in=None):
        ttl = self.expires_in if expires_in is None else expires_in
        iat = time.time()
        claims = {"iss": "%s/oauth/token" % self.url(tenant), "client_id": client_id,
                  "cid": client_id, "zid": "zone-" + tenant, "ext_attr": {"zdn": self.subdomain(tenant)},
                  "iat": int(iat), "exp": int(iat + ttl), "jti": common.random_secret("jti", 8),
                  "grant_type": "client_credentials", "fake": self.name}
        tok = common.make_jwt(claims, self._key, self.pad_to)
        with self.lock:
            self.tokens[tok] = {"tenant": tenant, "client_id": client_id, "iat": iat,
                                "exp": iat + ttl, "expires_in": ttl}
        return tok, ttl

    def lookup(self, token):
        """The record of a token we issued that has not expired, else None."""
        with self.lock:
            rec = self.tokens.get(token)
        if rec is None or rec.get("revoked") or time.time() >= rec["exp"]:
            return None
        return rec

    def why_invalid(self, token):
        with self.lock:
            rec = self.tokens.get(token)
        if rec is None:
            return "unknown"
        if rec.get("revoked"):
            return "revoked"
        if time.time() >= rec["exp"]:
            return "expired"
        return None

    def revoke(self, tenant=None):
        with self.lock:
            for rec in self.tokens.values():
                if tenant is None or rec["tenant"] == tenant:
                    rec["revoked"] = True

    def token_requests(self, tenant=None, ok=True):
        with self.lock:
            return [r for r in self.requests
                    if (tenant is None or r["tenant"] == tenant) and (not ok or r["status"] == 200)]


def _fingerprint(cert):
    try:
        from .pki import fingerprint
    except ImportError:                 # run as a script
        from pki import fingerprint
    return fingerprint(cert)


class _Handler(common.QuietHandler):
    ts = None  # set per server

    def do_POST(self):
        path = urllib.parse.urlsplit(self.path).path
        try:
            body = self.read_body()
        except ValueError:
            return self.reply(413, {"error": "invalid_request"})
        if path == "/oauth/token":
            return self.token(body)
        if path == "/introspect":
            return self.introspect(body)
        return self.reply(404, {"error": "not_found"})

    def do_GET(self):
        self.reply(405, {"error": "method_not_allowed"}, headers={"Allow": "POST"})

    def token(self, body):
        ts = self.ts
        host = self.headers.get("Host", "")
        tenant = ts.tenant_of_host(host)
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        form = {k: v[0] for k, v in form.items()}
        basic_id = basic_secret = None
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                basic_id, _, basic_secret = base64.b64decode(auth[6:].strip()).decode().partition(":")
                basic_id = urllib.parse.unquote(basic_id)
                basic_secret = urllib.parse.unquote(basic_secret)
            except Exception:  # noqa: BLE001
                basic_id = basic_secret = None
        peer = None
        if ts.server.tls is not None:
            der = self.connection.getpeercert(binary_form=True)
            if der:
                peer = _fingerprint(der)
        rec = {"time": time.time(), "host": host, "tenant": tenant, "form": dict(form),
               "basic_user": basic_id, "content_type": self.headers.get("Content-Type"),
               "client_cert": peer, "status": None, "error": None,
               "secret_sent": "client_secret" in form or bool(basic_secret)}
        rec["form"].pop("client_secret", None)

        def answer(code, obj, err=None):
            rec["status"] = code
            rec["error"] = err
            with ts.lock:
                ts.requests.append(rec)
            self.reply(code, obj)

        if ts.fail:
            return answer(int(ts.fail), {"error": "server_error"}, "injected failure")
        if tenant is None:
            return answer(404, {"error": "not_found",
                                "error_description": "no identity zone for host %s" % host},
                          "unknown host/tenant")
        if form.get("grant_type") != "client_credentials":
            return answer(400, {"error": "unsupported_grant_type"}, "grant_type")
        client_id = basic_id if basic_id is not None else form.get("client_id")
        secret = basic_secret if basic_id is not None else form.get("client_secret")
        if form.get("client_id") is not None and form.get("client_id") != client_id:
            return answer(401, {"error": "invalid_client"}, "client_id in body != Basic user")
        with ts.lock:
            known = ts.clients.get(client_id)
            known_cert = ts.cert_clients.get(client_id)
        if peer is not None and known_cert is not None:
            # x.509: the certificate is the credential; no secret is sent
            if peer != known_cert:
                return answer(401, {"error": "unauthorized",
                                    "error_description": "Client certificate does not "
                                                         "match the client"},
                              "certificate of another client")
        elif known is None or secret != known:
            return answer(401, {"error": "unauthorized",
                                "error_description": "Bad credentials"}, "bad credentials")
        tok, ttl = ts.issue(tenant, client_id)
        rec["client_id"] = client_id
        rec["token"] = tok
        answer(200, {"access_token": tok, "token_type": "bearer", "expires_in": int(ttl),
                     "scope": "uaa.resource", "jti": common.jwt_claims(tok)["jti"]})

    def introspect(self, body):
        form = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        tok = (form.get("token") or [""])[0]
        rec = self.ts.lookup(tok)
        if rec is None:
            return self.reply(200, {"active": False})
        self.reply(200, {"active": True, "client_id": rec["client_id"],
                         "zdn": self.ts.subdomain(rec["tenant"]), "tenant": rec["tenant"],
                         "exp": int(rec["exp"])})


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--domain", default="auth.test")
    ap.add_argument("--provider-subdomain", default="prov-subaccount")
    ap.add_argument("--tenant", action="append", default=[])
    ap.add_argument("--client", action="append", default=[], help="ID:SECRET")
    ap.add_argument("--expires-in", type=float, default=3600)
    ap.add_argument("--pad-to", type=int, default=0)
    ap.add_argument("--lifetime", type=float, default=600, help="exit after this many seconds")
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    ts = TokenService(a.domain, a.provider_subdomain, a.tenant, a.expires_in, a.pad_to,
                      port=a.port, verbose=a.verbose)
    for c in a.client:
        cid, _, sec = c.partition(":")
        ts.add_client(cid, sec)
    ts.start()
    print(json.dumps({"port": ts.port, "url": ts.url(),
                      "tenant_urls": {t: ts.url(t) for t in sorted(ts.tenants)},
                      "resolve": ts.resolve_args()}), flush=True)
    try:
        common.run_until(a.lifetime)
    finally:
        ts.close()


if __name__ == "__main__":
    sys.exit(main())
