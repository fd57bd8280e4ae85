"""Plumbing shared by the fake servers: a bounded threaded HTTP server,
JWT-shaped tokens, small helpers.  Standard library only; loopback only."""

import base64
import hashlib
import hmac
import http.server
import json
import os
import secrets
import socket
import ssl
import threading
import time

HOST = "127.0.0.1"

# Every connection a fake keeps open ends after this much silence, so that
# nothing a test forgets can live on.
IDLE_TIMEOUT = 30.0


def b64url(data):
    if isinstance(data, str):
        data = data.encode()
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(s):
    s = s + "=" * (-len(s) % 4)
    return base64.urlsafe_b64decode(s.encode())


def make_jwt(claims, key, pad_to=0):
    """A JWT-shaped token (HS256 over header.payload).  ``pad_to``: grow the
    payload with a filler claim until the token is at least that long (real
    XSUAA tokens are 1-2 KB, longer than a one-byte length field allows)."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "fake"}))
    claims = dict(claims)
    while True:
        payload = b64url(json.dumps(claims, sort_keys=True))
        sig = b64url(hmac.new(key, (header + "." + payload).encode(), hashlib.sha256).digest())
        tok = "%s.%s.%s" % (header, payload, sig)
        if len(tok) >= pad_to:
            return tok
        claims["ext_pad"] = "x" * (pad_to - len(tok) + 8)


def jwt_claims(tok):
    """The payload of a JWT-shaped token (no verification), or None."""
    try:
        return json.loads(b64url_decode(tok.split(".")[1]))
    except Exception:  # noqa: BLE001 - anything malformed is "not a JWT"
        return None


def random_secret(prefix, n=12):
    return "%s-%s" % (prefix, secrets.token_hex(n))


class Json(dict):
    """Marker: a reply body to be sent as JSON."""


class QuietHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.1 handler (keep-alive, always a Content-Length) that records
    nothing on stderr unless the server is verbose, and gives up on a
    connection after ``IDLE_TIMEOUT`` seconds of silence."""

    protocol_version = "HTTP/1.1"
    timeout = IDLE_TIMEOUT
    server_version = "tpmail-fake/1"

    def log_message(self, fmt, *args):  # noqa: D401 - http.server API
        if getattr(self.server, "verbose", False):
            super().log_message(fmt, *args)

    def read_body(self, limit=1 << 20):
        n = int(self.headers.get("Content-Length") or 0)
        if n < 0 or n > limit:
            raise ValueError("body too large")
        return self.rfile.read(n) if n else b""

    def reply(self, code, body=b"", ctype="application/json", headers=None):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.wfile.flush()


class BoundedHTTPServer(http.server.ThreadingHTTPServer):
    """A ThreadingHTTPServer on loopback that runs in a daemon thread,
    remembers its open connections and closes all of them on close().

    ``tls``: an ``ssl.SSLContext`` (server side) to serve HTTPS with; the
    handshake runs in the connection's thread, and a failed one is recorded
    in ``tls_errors`` (its text, e.g. a client certificate that does not
    verify) instead of reaching a handler."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, handler, host=HOST, port=0, verbose=False, tls=None):
        super().__init__((host, port), handler)
        self.verbose = verbose
        self.tls = tls
        self.tls_errors = []
        self._conns = set()
        self._conns_lock = threading.Lock()
        self._thread = None
        self.closed = threading.Event()

    @property
    def scheme(self):
        return "https" if self.tls is not None else "http"

    def finish_request(self, request, client_address):
        if self.tls is not None:
            try:
                request.settimeout(IDLE_TIMEOUT)
                request.do_handshake()
            except (ssl.SSLError, OSError) as e:
                with self._conns_lock:
                    self.tls_errors.append(str(e))
                return
        super().finish_request(request, client_address)

    @property
    def port(self):
        return self.server_address[1]

    def get_request(self):
        sock, addr = super().get_request()
        if self.tls is not None:
            sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        with self._conns_lock:
            self._conns.add(sock)
        return sock, addr

    def shutdown_request(self, request):
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def start(self):
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fake-http-%d" % self.port, daemon=True)
        self._thread.start()
        return self

    def close(self):
        if self.closed.is_set():
            return
        self.closed.set()
        if self._thread is not None:
            self.shutdown()
            self._thread.join(5)
        self.server_close()
        close_connections(self._conns, self._conns_lock)


def close_connections(conns, lock):
    """Shut down and close every socket in the set ``conns`` (guarded by
    ``lock``) and empty it: a server's open keep-alive connections."""
    with lock:
        socks = list(conns)
        conns.clear()
    for c in socks:
        try:
            c.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            c.close()
        except OSError:
            pass


def run_until(lifetime, stop_event=None):
    """Script mode: block until ``lifetime`` seconds passed, SIGINT/SIGTERM,
    or ``stop_event`` is set."""
    import signal
    ev = stop_event or threading.Event()

    def stop(*_):
        ev.set()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    ev.wait(lifetime)


def now():
    return time.time()


def write_json(path, obj, mode=0o600):
    tmp = "%s.tmp%d" % (path, os.getpid())
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
