"""Everything tpmaild talks to besides the mail server, wired together:

* ``xsuaa``: the token service of the Destination service instances
  (``http://prov-subaccount.auth.test:P``, tenants by first label)
* ``instances``: {name: DestinationService}, all sharing ``xsuaa``
* ``conn_xsuaa``: the Connectivity service's token service
  (``http://prov-subaccount.conn.test:P2``; long JWTs)
* ``socks``: the Connectivity Proxy (SOCKS5, method 0x80), accepting only
  tokens ``conn_xsuaa`` issued to the connectivity client

    with FakeBtp(workdir, tenants=["tenant-a"]) as btp:
        btp.dest.put("tenant-a", {...})
        args = btp.tpmaild_args(poll_interval=1)   # --service-keys ... --resolve ...

Service keys are written as a mounted Kubernetes Secret looks:
``keys/..<timestamp>/<file>`` real files, ``keys/..data`` a symlink to that
directory, and ``keys/<file>`` symlinks through ``..data``.  The default
instance's file has no extension, the others end in ``.json``.

Script: ``python3 world.py --workdir DIR --destinations FILE [--lifetime S]``
starts it all and prints the tpmaild arguments as JSON.
"""

import json
import os
import shutil
import sys
import time

try:
    from . import common
    from .xsuaa import TokenService, PROVIDER
    from .destination_service import DestinationService
    from .socks5 import Socks5Proxy
except ImportError:                     # run as a script
    import common
    from xsuaa import TokenService, PROVIDER
    from destination_service import DestinationService
    from socks5 import Socks5Proxy


def write_secret_dir(directory, files):
    """(Re)write ``directory`` the way kubelet projects a Secret:
    {name: text}.  Swaps ``..data`` atomically, like kubelet."""
    os.makedirs(directory, exist_ok=True)
    os.chmod(directory, 0o755)
    stamp = "..%s.%09d" % (time.strftime("%Y_%m_%d_%H_%M_%S"), time.monotonic_ns() % 10**9)
    real = os.path.join(directory, stamp)
    os.mkdir(real, 0o755)
    for name, text in files.items():
        p = os.path.join(real, name)
        with open(p, "w") as f:
            f.write(text)
        os.chmod(p, 0o600)
    old = None
    data = os.path.join(directory, "..data")
    if os.path.islink(data):
        old = os.path.join(directory, os.readlink(data))
    tmp = os.path.join(directory, "..data_tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(stamp, tmp)
    os.rename(tmp, data)
    for name in files:
        link = os.path.join(directory, name)
        if not os.path.lexists(link):
            os.symlink(os.path.join("..data", name), link)
    for n in os.listdir(directory):
        if not n.startswith(".."):
            p = os.path.join(directory, n)
            if os.path.islink(p) and not os.path.exists(p):
                os.unlink(p)            # a key that is gone
    if old and os.path.isdir(old) and os.path.abspath(old) != os.path.abspath(real):
        shutil.rmtree(old, ignore_errors=True)


class FakeBtp:
    def __init__(self, workdir, tenants=(), instances=("dest-instance",), default_instance=None,
                 dest_expires_in=3600, conn_expires_in=3600, routes=None, locations=None,
                 socks_reply_atyp="ipv4", hang_max=30.0, verbose=False):
        self.workdir = os.path.abspath(str(workdir))
        os.makedirs(self.workdir, exist_ok=True)
        self.tenants = list(tenants)
        self.xsuaa = TokenService(domain="auth.test", tenants=self.tenants,
                                  expires_in=dest_expires_in, name="xsuaa-dest", verbose=verbose)
        self.instances = {}
        for name in instances:
            self.instances[name] = DestinationService(self.xsuaa, name=name, hang_max=hang_max,
                                                      verbose=verbose)
        self.default_instance = default_instance or list(instances)[0]
        self.conn_xsuaa = TokenService(domain="conn.test", tenants=self.tenants,
                                       expires_in=conn_expires_in, pad_to=1200,
                                       name="xsuaa-conn", verbose=verbose)
        self.conn_client_id = "sb-connectivity-proxy!b%d" % os.getpid()
        self.conn_client_secret = common.random_secret("conn-client")
        self.conn_xsuaa.add_client(self.conn_client_id, self.conn_client_secret)
        self.socks = Socks5Proxy(self._conn_tenant, routes=routes, locations=locations,
                                 reply_atyp=socks_reply_atyp, verbose=verbose)
        self.keys_dir = os.path.join(self.workdir, "service-keys")
        self.conn_key_file = os.path.join(self.workdir, "connectivity-key.json")
        self._started = False

    @property
    def dest(self):
        """The default Destination service instance."""
        return self.instances[self.default_instance]

    def _conn_tenant(self, tok):
        rec = self.conn_xsuaa.lookup(tok)
        if rec is None or rec["client_id"] != self.conn_client_id:
            return None
        return rec["tenant"]

    def start(self):
        self.xsuaa.start()
        self.conn_xsuaa.start()
        for ds in self.instances.values():
            ds.start()
        self.socks.start()
        self._started = True
        self.write_keys()
        return self

    def close(self):
        for x in [self.socks] + list(self.instances.values()) + [self.xsuaa, self.conn_xsuaa]:
            try:
                x.close()
            except Exception:  # noqa: BLE001 - close the rest anyway
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *a):
        self.close()

    def add_tenant(self, tenant):
        self.tenants.append(tenant)
        self.xsuaa.add_tenant(tenant)
        self.conn_xsuaa.add_tenant(tenant)

    def key_file_name(self, instance):
        return instance if instance == self.default_instance else instance + ".json"

    def write_keys(self):
        files = {self.key_file_name(n): json.dumps(ds.service_key(), indent=2)
                 for n, ds in self.instances.items()}
        write_secret_dir(self.keys_dir, files)
        common.write_json(self.conn_key_file, {
            "clientid": self.conn_client_id, "clientsecret": self.conn_client_secret,
            "token_service_url": self.conn_xsuaa.url(), "url": self.conn_xsuaa.url(),
            "onpremise_proxy_host": common.HOST,
            "onpremise_socks5_proxy_port": str(self.socks.port),
            "uaadomain": self.conn_xsuaa.domain})

    def resolve_args(self):
        out = []
        for r in self.xsuaa.resolve_args() + self.conn_xsuaa.resolve_args():
            out += ["--resolve", r]
        return out

    def tpmaild_args(self, poll_interval=1, connectivity=True):
        a = ["--service-keys", self.keys_dir, "--default-instance", self.default_instance,
             "--poll-interval", str(poll_interval)] + self.resolve_args()
        if connectivity:
            a += ["--connectivity-proxy", self.socks.address,
                  "--connectivity-key", self.conn_key_file]
        return a

    def describe(self):
        return {"destination_urls": {n: ds.url() for n, ds in self.instances.items()},
                "token_url": self.xsuaa.url(), "conn_token_url": self.conn_xsuaa.url(),
                "socks5": self.socks.address, "keys_dir": self.keys_dir,
                "conn_key": self.conn_key_file, "tenants": self.tenants}


def main(argv=None):
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--destinations", required=True, help="{tenant: [destination, ...]} JSON")
    ap.add_argument("--route", action="append", default=[], help="VHOST:VPORT=HOST:PORT")
    ap.add_argument("--location", action="append", default=[])
    ap.add_argument("--poll-interval", type=int, default=2)
    ap.add_argument("--lifetime", type=float, default=600, help="exit after this many seconds")
    a = ap.parse_args(argv)
    with open(a.destinations) as f:
        dests = json.load(f)
    routes = {}
    for r in a.route:
        v, _, t = r.partition("=")
        vh, _, vp = v.rpartition(":")
        th, _, tp = t.rpartition(":")
        routes[(vh, int(vp))] = (th, int(tp))
    btp = FakeBtp(a.workdir, tenants=[t for t in dests if t != PROVIDER], routes=routes,
                  locations={"*": set(a.location or [""])})
    btp.dest.load(dests)
    btp.start()
    print(json.dumps(dict(btp.describe(), tpmaild_args=btp.tpmaild_args(a.poll_interval))),
          flush=True)
    try:
        common.run_until(a.lifetime)
    finally:
        btp.close()


if __name__ == "__main__":
    sys.exit(main())
