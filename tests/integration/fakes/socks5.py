"""A fake Connectivity Proxy: SOCKS5 with SAP's authentication method 0x80.

    px = Socks5Proxy(validate_token=conn_ts_lookup,           # token -> tenant | None
                     routes={("mail.onprem.test", 110): ("127.0.0.1", 11110)},
                     locations={"*": {"loc-1"}}).start()
    px.port; px.connections  (one record per connection)

Wire (all integers big-endian):
  client  05 01 80                       greeting: version 5, one method, 0x80
  proxy   05 80                          (05 FF if 0x80 was not offered)
  client  01 <u32 len> <JWT> <u8 n> <n bytes: base64(location id)>
  proxy   01 00                          (01 01 for a malformed request)
  client  05 01 00 ATYP ADDR PORT        CONNECT; ATYP 01 IPv4 or 03 domain
  proxy   05 REP 00 ATYP BND.ADDR BND.PORT

REP: 05 the JWT is not one the token service issued (or ``accept_tokens``
is False); 03 the location id is not configured for the token's tenant;
04 no route for the virtual host:port (or the backend refuses); 07 a
command other than CONNECT; 08 an address type other than 01/03; else 00
and bytes are relayed both ways until either side closes.  The BND address
is IPv4 by default (the first ``HEAD_BYTES`` relayed each way are kept in
the record as ``head_up`` / ``head_down``); ``reply_atyp="domain"`` answers with a domain instead
(a client must skip it by its length, as SAP's example does).

Script: ``python3 socks5.py --token-introspect URL --route
mail.onprem.test:110=127.0.0.1:11110 --location loc-1 [--port N]
[--lifetime S]`` (tokens are checked at the fake XSUAA's /introspect).
"""

import base64
import binascii
import json
import select
import socket
import socketserver
import struct
import sys
import threading
import time
import urllib.parse
import urllib.request

try:
    from . import common
except ImportError:                     # run as a script
    import common

REP_NAMES = {0: "succeeded", 1: "general failure", 2: "forbidden", 3: "network unreachable",
             4: "host unreachable", 5: "connection refused", 7: "command not supported",
             8: "address type not supported"}
HANDSHAKE_TIMEOUT = 10.0
HEAD_BYTES = 512                        # kept of each direction, for tests
MAX_TOKEN = 64 * 1024


class _Closed(Exception):
    pass


def _recv_exact(sock, n):
    buf = b""
    while len(buf) < n:
        d = sock.recv(n - len(buf))
        if not d:
            raise _Closed("peer closed after %d of %d bytes" % (len(buf), n))
        buf += d
    return buf


class Socks5Proxy:
    def __init__(self, validate_token, routes=None, locations=None, reply_atyp="ipv4",
                 port=0, idle_timeout=common.IDLE_TIMEOUT, verbose=False):
        self.validate_token = validate_token
        self.routes = {(h.lower(), int(p)): tuple(t) for (h, p), t in (routes or {}).items()}
        self.locations = {k: set(v) for k, v in (locations or {"*": {""}}).items()}
        self.reply_atyp = reply_atyp
        self.idle_timeout = idle_timeout
        self.accept_tokens = True
        self.verbose = verbose
        self.connections = []
        self.lock = threading.Lock()
        self.server = _Server(self, port)
        self._thread = None

    def start(self):
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.1},
                                        name="fake-socks5", daemon=True)
        self._thread.start()
        return self

    def close(self):
        self.server.closing.set()
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(5)
            self._thread = None
        self.server.server_close()
        self.server.close_all()

    def __enter__(self):
        return self.start()

    def __exit__(self, *a):
        self.close()

    @property
    def port(self):
        return self.server.server_address[1]

    @property
    def address(self):
        return "%s:%d" % (common.HOST, self.port)

    def add_route(self, vhost, vport, host, port):
        with self.lock:
            self.routes[(vhost.lower(), int(vport))] = (host, int(port))

    def records(self, **match):
        with self.lock:
            return [r for r in self.connections
                    if all(r.get(k) == v for k, v in match.items())]

    # -- one connection ---------------------------------------------------------

    def handle(self, c):
        rec = {"time": time.time(), "greeting": None, "auth_version": None, "token": None,
               "tenant": None, "location_raw": None, "location": None, "cmd": None,
               "atyp": None, "host": None, "port": None, "rep": None, "error": None,
               "bytes_up": 0, "bytes_down": 0, "head_up": b"", "head_down": b"",
               "done": False}
        with self.lock:
            self.connections.append(rec)
        up = None
        try:
            c.settimeout(HANDSHAKE_TIMEOUT)
            head = _recv_exact(c, 2)
            methods = _recv_exact(c, head[1]) if head[1] else b""
            rec["greeting"] = head + methods
            if head[0] != 5:
                rec["error"] = "not SOCKS5"
                return
            if 0x80 not in methods:
                rec["error"] = "method 0x80 not offered"
                c.sendall(b"\x05\xff")
                return
            c.sendall(b"\x05\x80")
            ver = _recv_exact(c, 1)[0]
            rec["auth_version"] = ver
            if ver != 1:
                rec["error"] = "auth sub-version %d" % ver
                c.sendall(b"\x01\x01")
                return
            (tlen,) = struct.unpack(">I", _recv_exact(c, 4))
            if tlen == 0 or tlen > MAX_TOKEN:
                rec["error"] = "JWT length %d" % tlen
                c.sendall(b"\x01\x01")
                return
            rec["token"] = _recv_exact(c, tlen).decode("ascii", "replace")
            llen = _recv_exact(c, 1)[0]
            raw = _recv_exact(c, llen) if llen else b""
            rec["location_raw"] = raw
            try:
                rec["location"] = base64.b64decode(raw, validate=True).decode() if raw else ""
            except (binascii.Error, UnicodeDecodeError):
                rec["location"] = None
            c.sendall(b"\x01\x00")

            req = _recv_exact(c, 4)
            rec["cmd"] = req[1]
            atyp = req[3]
            rec["atyp"] = atyp
            if req[0] != 5:
                rec["error"] = "CONNECT version %d" % req[0]
                return
            if atyp == 1:
                host = socket.inet_ntoa(_recv_exact(c, 4))
            elif atyp == 3:
                host = _recv_exact(c, _recv_exact(c, 1)[0]).decode("ascii", "replace")
            else:
                return self._reply(c, rec, 8)
            (port,) = struct.unpack(">H", _recv_exact(c, 2))
            rec["host"], rec["port"] = host, port
            if req[1] != 1:
                return self._reply(c, rec, 7)
            tenant = self.validate_token(rec["token"]) if self.accept_tokens else None
            rec["tenant"] = tenant
            if tenant is None:
                return self._reply(c, rec, 5)
            with self.lock:
                allowed = self.locations.get(tenant, self.locations.get("*", {""}))
                target = self.routes.get((host.lower(), port))
            if rec["location"] not in allowed:
                return self._reply(c, rec, 3)
            if target is None:
                return self._reply(c, rec, 4)
            try:
                up = socket.create_connection(target, timeout=5)
            except OSError as e:
                rec["error"] = "backend: %s" % e
                return self._reply(c, rec, 4)
            self.server.track(up)
            self._reply(c, rec, 0, up.getsockname())
            self._relay(c, up, rec)
        except (_Closed, OSError) as e:
            if rec["error"] is None:
                rec["error"] = "%s: %s" % (type(e).__name__, e)
        finally:
            rec["done"] = True
            if up is not None:
                self.server.untrack(up)
                try:
                    up.close()
                except OSError:
                    pass

    def _reply(self, c, rec, rep, bnd=("0.0.0.0", 0)):
        rec["rep"] = rep
        if self.reply_atyp == "domain":
            name = b"bnd.connectivity-proxy.test"
            c.sendall(bytes([5, rep, 0, 3, len(name)]) + name + struct.pack(">H", bnd[1]))
        else:
            c.sendall(bytes([5, rep, 0, 1]) + socket.inet_aton(bnd[0]) + struct.pack(">H", bnd[1]))

    def _relay(self, c, up, rec):
        c.settimeout(None)
        up.settimeout(None)
        open_in = {c: True, up: True}
        peer = {c: up, up: c}
        key = {c: "bytes_up", up: "bytes_down"}
        head = {c: "head_up", up: "head_down"}
        last = time.monotonic()
        while any(open_in.values()) and not self.server.closing.is_set():
            rl = [s for s, o in open_in.items() if o]
            r, _, _ = select.select(rl, [], [], 0.2)
            if not r:
                if time.monotonic() - last > self.idle_timeout:
                    rec["error"] = "idle timeout"
                    return
                continue
            last = time.monotonic()
            for s in r:
                try:
                    d = s.recv(65536)
                except OSError:
                    d = b""
                if not d:
                    open_in[s] = False
                    try:
                        peer[s].shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    continue
                rec[key[s]] += len(d)
                if len(rec[head[s]]) < HEAD_BYTES:
                    rec[head[s]] += d[:HEAD_BYTES - len(rec[head[s]])]
                try:
                    peer[s].sendall(d)
                except OSError:
                    return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, proxy, port):
        self.proxy = proxy
        self.closing = threading.Event()
        self._conns = set()
        self._lock = threading.Lock()
        super().__init__((common.HOST, port), _Handler)

    def track(self, s):
        with self._lock:
            self._conns.add(s)

    def untrack(self, s):
        with self._lock:
            self._conns.discard(s)

    def get_request(self):
        s, a = super().get_request()
        self.track(s)
        return s, a

    def shutdown_request(self, request):
        self.untrack(request)
        super().shutdown_request(request)

    def close_all(self):
        with self._lock:
            conns = list(self._conns)
            self._conns.clear()
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass


class _Handler(socketserver.BaseRequestHandler):
    def handle(self):
        self.server.proxy.handle(self.request)


def sap_socks5_connect(address, jwt, location, host, port, timeout=10):
    """A minimal SAP-style SOCKS5 client (for checking the fake):
    returns (socket, REP).  The socket is connected to the target when REP
    is 0, else closed."""
    h, _, p = address.rpartition(":")
    s = socket.create_connection((h, int(p)), timeout=timeout)
    try:
        s.sendall(b"\x05\x01\x80")
        if _recv_exact(s, 2) != b"\x05\x80":
            raise _Closed("method 0x80 refused")
        loc = base64.b64encode(location.encode()) if location else b""
        tok = jwt.encode()
        s.sendall(b"\x01" + struct.pack(">I", len(tok)) + tok + bytes([len(loc)]) + loc)
        if _recv_exact(s, 2) != b"\x01\x00":
            raise _Closed("authentication refused")
        try:
            addr = b"\x01" + socket.inet_aton(host)
        except OSError:
            addr = b"\x03" + bytes([len(host)]) + host.encode()
        s.sendall(b"\x05\x01\x00" + addr + struct.pack(">H", port))
        head = _recv_exact(s, 4)
        atyp = head[3]
        n = 4 if atyp == 1 else 16 if atyp == 4 else _recv_exact(s, 1)[0]
        _recv_exact(s, n + 2)
        rep = head[1]
    except BaseException:
        s.close()
        raise
    if rep != 0:
        s.close()
    return s, rep


def introspecting_validator(url):
    """validate_token for script mode: ask the fake XSUAA's /introspect."""
    def validate(tok):
        data = urllib.parse.urlencode({"token": tok}).encode()
        try:
            with urllib.request.urlopen(url, data, timeout=5) as r:
                j = json.load(r)
        except OSError:
            return None
        return j.get("tenant") if j.get("active") else None
    return validate


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--token-introspect", required=True, help="the fake XSUAA's /introspect URL")
    ap.add_argument("--route", action="append", default=[], help="VHOST:VPORT=HOST:PORT")
    ap.add_argument("--location", action="append", default=[],
                    help="accepted location id (repeat; '' for none)")
    ap.add_argument("--reply-atyp", choices=("ipv4", "domain"), default="ipv4")
    ap.add_argument("--lifetime", type=float, default=600, help="exit after this many seconds")
    a = ap.parse_args(argv)
    routes = {}
    for r in a.route:
        v, _, t = r.partition("=")
        vh, _, vp = v.rpartition(":")
        th, _, tp = t.rpartition(":")
        routes[(vh, int(vp))] = (th, int(tp))
    px = Socks5Proxy(introspecting_validator(a.token_introspect), routes,
                     {"*": set(a.location or [""])}, a.reply_atyp, port=a.port).start()
    print(json.dumps({"port": px.port, "address": px.address}), flush=True)
    try:
        common.run_until(a.lifetime)
    finally:
        px.close()


if __name__ == "__main__":
    sys.exit(main())
