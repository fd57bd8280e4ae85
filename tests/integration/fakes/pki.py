"""Test certificates for the fakes' HTTPS (openssl command line, made at
test time; the CAs come from tests/lib/dovecot.py's ``make_ca``).

    pki = Pki(directory, server_dns=("*.auth.test",))
    pki.server_ca                 # CA file tpmaild is told to trust (--service-ca)
    pki.server_context()          # HTTPS, no client certificate
    pki.server_context(client_ca=pki.client_ca)   # mTLS: a client cert is required
    crt, key = pki.client_cert("sb-dest!b1")      # signed by pki.client_ca
    crt, key = pki.client_cert("intruder", ca="other")   # signed by another CA
    fingerprint(crt)              # sha256 hex of the DER, as ssl reports it

The server certificate names ``server_dns`` (wildcards allowed), localhost
and 127.0.0.1.  Client certificates carry extendedKeyUsage=clientAuth, as
an x.509 service key's certificate does.
"""

import hashlib
import os
import ssl
import sys

try:
    from dovecot import OPENSSL_BIN, _run, make_ca, make_server_cert
except ImportError:                     # run as a script
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "lib"))
    from dovecot import OPENSSL_BIN, _run, make_ca, make_server_cert


def make_client_cert(directory, ca_crt, ca_key, name, cn):
    """Client certificate (EC P-256) for ``cn`` signed by the CA.  Returns
    (cert_path, key_path)."""
    key = os.path.join(directory, name + ".key")
    csr = os.path.join(directory, name + ".csr")
    crt = os.path.join(directory, name + ".crt")
    ext = os.path.join(directory, name + ".ext")
    with open(ext, "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\n"
                "extendedKeyUsage=clientAuth\n")
    _run([OPENSSL_BIN, "req", "-new", "-nodes",
          "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
          "-keyout", key, "-out", csr, "-subj", "/CN=%s" % cn])
    _run([OPENSSL_BIN, "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
          "-CAcreateserial", "-out", crt, "-days", "3650", "-sha256", "-extfile", ext])
    os.chmod(key, 0o600)
    return crt, key


def fingerprint(cert):
    """sha256 of a certificate's DER (``cert``: PEM path, PEM text or DER)."""
    if isinstance(cert, bytes):
        der = cert
    else:
        pem = cert
        if "-----BEGIN" not in cert:
            with open(cert) as f:
                pem = f.read()
        der = ssl.PEM_cert_to_DER_cert(pem)
    return hashlib.sha256(der).hexdigest()


def read(path):
    with open(path) as f:
        return f.read()


class Pki:
    def __init__(self, directory, server_dns=()):
        self.dir = os.path.abspath(str(directory))
        os.makedirs(self.dir, exist_ok=True)
        self.server_ca, self._server_ca_key = make_ca(self.dir, "tpmail-service-ca")
        self.client_ca, self._client_ca_key = make_ca(self.dir, "tpmail-client-ca")
        self.other_ca, self._other_ca_key = make_ca(self.dir, "tpmail-other-ca")
        self.server_cert, self.server_key = make_server_cert(
            self.dir, self.server_ca, self._server_ca_key, "service-server",
            dns=tuple(server_dns) + ("localhost",), ips=("127.0.0.1",))
        self._n = 0

    def client_cert(self, cn, ca="client"):
        """A fresh client certificate for ``cn``, signed by the client CA
        (``ca="client"``) or by an unrelated one (``ca="other"``)."""
        self._n += 1
        crt, key = {"client": (self.client_ca, self._client_ca_key),
                    "other": (self.other_ca, self._other_ca_key)}[ca]
        return make_client_cert(self.dir, crt, key, "client-%d" % self._n, cn)

    def server_context(self, client_ca=None):
        """Server-side context; with ``client_ca`` a client certificate
        signed by it is required (the handshake fails otherwise)."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        if client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(client_ca)
        return ctx
