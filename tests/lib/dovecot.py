"""A throw-away real Dovecot POP3 server for tests and demos.

No pytest in here: the module is also used by demo scripts.

    from dovecot import Dovecot, small_message, dotted_message, big_message

    with Dovecot(users={"alice": "secret"}) as dc:
        dc.seed("alice", [small_message(1), dotted_message()])
        # plain POP3 (STLS offered):  dc.host, dc.pop3_port
        # POP3S (implicit TLS):       dc.host, dc.pop3s_port
        # plain POP3 without STLS:    dc.nostls_host, dc.nostls_port
        # CA of the server cert:      dc.ca_file   (unrelated CA: dc.wrong_ca_file)
        dc.stop(); dc.start()         # same ports again

    # optional: OAuth2 (SASL XOAUTH2 / OAUTHBEARER) checked by Dovecot's oauth2
    # passdb against an introspection endpoint the caller serves
    Dovecot(users=..., oauth2_introspection_url="http://127.0.0.1:PORT/introspect",
            oauth2_mechanisms=("xoauth2", "oauthbearer"),
            extra_dns=("mail.onprem.test",))   # more DNS names in the server cert

Design notes
------------
* Dovecot runs in the foreground (``dovecot -F -c CONF``) in its own process
  group, with its own base_dir / state_dir / log file under the work dir and
  only the listeners configured here (``protocols = pop3``), so it does not
  clash with a system Dovecot.
* Dovecot never accesses mail as uid 0, so the mail user is ``nobody`` (or
  ``dovecot`` as a fallback); the maildirs are chowned to it.  For that the
  work dir and all its ancestors must be traversable by that user: the
  default work dir is a fresh ``mkdtemp`` under the system temp dir.
* The no-STLS listener binds 127.0.0.2 (all of 127/8 is loopback on Linux)
  and a ``local 127.0.0.2 { ssl = no }`` block turns TLS, and with it the
  STLS capability, off for that address only.  Dovecot's config filters
  match on local IP, not on port, hence the second address.
* APOP: ``auth_mechanisms = plain login apop``; works because the
  passwd-file holds ``{PLAIN}`` passwords.  The greeting then carries the
  APOP timestamp ``<...>``.
* OAuth2 (only with ``oauth2_introspection_url``): the mechanisms in
  ``oauth2_mechanisms`` are added to ``auth_mechanisms`` (so CAPA's SASL line
  lists them) and served by an oauth2 passdb with ``introspection_mode =
  post``: Dovecot POSTs ``token=<token>`` and wants a JSON object with
  ``"active": true`` and ``"username"`` equal to the user logging in.  Each
  passdb is restricted to its own mechanisms, so USER/PASS, PLAIN, LOGIN and
  APOP never reach the introspection URL and tokens never reach the
  passwd-file.  Without it the configuration is exactly as before.
"""

import hashlib
import os
import pwd
import grp
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time

__all__ = [
    "Dovecot", "DovecotError", "free_port", "make_message", "small_message",
    "dotted_message", "big_message", "make_ca", "make_server_cert",
    "dot_stuff", "wait_for",
]

DOVECOT_BIN = os.environ.get("DOVECOT_BIN") or shutil.which("dovecot") or "/usr/sbin/dovecot"
OPENSSL_BIN = os.environ.get("OPENSSL_BIN") or shutil.which("openssl") or "/usr/bin/openssl"


class DovecotError(RuntimeError):
    pass


class _DovecotExited(DovecotError):
    pass


# --------------------------------------------------------------------------
# small helpers

def wait_for(pred, timeout, interval=0.05, what="condition", fatal=()):
    """Poll ``pred()`` until it returns a truthy value; return that value.

    Raises TimeoutError after ``timeout`` seconds.  Exceptions raised by
    ``pred`` count as "not yet" and the last one is reported on timeout,
    except those of the classes in ``fatal``, which propagate at once.
    """
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            v = pred()
            if v:
                return v
        except Exception as e:  # noqa: BLE001 - reported on timeout
            if fatal and isinstance(e, fatal):
                raise
            last_exc = e
        if time.monotonic() >= deadline:
            msg = "timed out after %.1fs waiting for %s" % (timeout, what)
            if last_exc is not None:
                msg += " (last error: %r)" % (last_exc,)
            raise TimeoutError(msg)
        time.sleep(interval)


def free_port(host="127.0.0.1"):
    """A TCP port that is free on ``host`` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _free_ports(host, n, avoid=()):
    ports = []
    socks = []
    try:
        # Keep them bound while picking so we get n distinct ports.
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            p = s.getsockname()[1]
            socks.append(s)
            if p not in avoid:
                ports.append(p)
    finally:
        for s in socks:
            s.close()
    return ports


def _run(argv, **kw):
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    if r.returncode != 0:
        raise DovecotError("%s failed (%d): %s" % (" ".join(map(str, argv)), r.returncode,
                                                   r.stderr.decode(errors="replace")))
    return r


# --------------------------------------------------------------------------
# certificates (openssl CLI)

def make_ca(directory, name="tpmail-test-ca"):
    """Self-signed CA (EC P-256).  Returns (cert_path, key_path)."""
    os.makedirs(directory, exist_ok=True)
    key = os.path.join(directory, name + ".key")
    crt = os.path.join(directory, name + ".crt")
    _run([OPENSSL_BIN, "req", "-x509", "-new", "-nodes",
          "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
          "-keyout", key, "-out", crt, "-days", "3650", "-sha256",
          "-subj", "/CN=%s" % name,
          "-addext", "basicConstraints=critical,CA:TRUE",
          "-addext", "keyUsage=critical,keyCertSign,cRLSign",
          "-addext", "subjectKeyIdentifier=hash"])
    return crt, key


def make_server_cert(directory, ca_crt, ca_key, name="server",
                     dns=("localhost",), ips=("127.0.0.1",)):
    """Server cert signed by the CA, SAN with DNS names and IPs."""
    key = os.path.join(directory, name + ".key")
    csr = os.path.join(directory, name + ".csr")
    crt = os.path.join(directory, name + ".crt")
    ext = os.path.join(directory, name + ".ext")
    san = ",".join(["DNS:%s" % d for d in dns] + ["IP:%s" % i for i in ips])
    with open(ext, "w") as f:
        f.write("basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\n"
                "subjectAltName=%s\n" % san)
    _run([OPENSSL_BIN, "req", "-new", "-nodes",
          "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
          "-keyout", key, "-out", csr, "-subj", "/CN=%s" % (dns[0] if dns else ips[0])])
    _run([OPENSSL_BIN, "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key,
          "-CAcreateserial", "-out", crt, "-days", "3650", "-sha256", "-extfile", ext])
    return crt, key


# --------------------------------------------------------------------------
# message builders (bytes, CRLF line endings, deterministic)

def make_message(subject, body_lines, frm="sender@example.test", to="rcpt@example.test",
                 msgid=None):
    """An RFC 5322 message as bytes with CRLF line endings."""
    if msgid is None:
        msgid = "<%s@tpmail.test>" % hashlib.sha1(subject.encode()).hexdigest()[:16]
    hdr = [
        "From: %s" % frm,
        "To: %s" % to,
        "Subject: %s" % subject,
        "Date: Mon, 01 Jan 2024 00:00:00 +0000",
        "Message-ID: %s" % msgid,
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
    ]
    lines = hdr + [""] + list(body_lines)
    return ("\r\n".join(lines) + "\r\n").encode("ascii")


def small_message(n=1, tag="test"):
    return make_message("%s message %d" % (tag, n),
                        ["Hello, this is %s message number %d." % (tag, n),
                         "Second line of message %d." % n])


def dotted_message(tag="test"):
    """A message whose body has lines starting with '.' and a lone '.' line."""
    return make_message("%s dotted" % tag, [
        "Lines below start with dots:",
        ".hidden",
        "..double",
        ".",
        "a line after the lone dot",
        "...",
        ". space after dot",
        "end of dotted message",
    ])


def big_message(size=3 * 1024 * 1024, tag="test"):
    """A deterministic message of about ``size`` bytes (76-char lines)."""
    head = make_message("%s big message" % tag, [])
    lines = []
    total = len(head)
    i = 0
    while total < size:
        h = hashlib.sha256(b"%d" % i).hexdigest()  # 64 chars
        line = "%08d%s%s" % (i, h, h[:4])            # 76 chars
        if i % 997 == 0:
            line = "." + line[1:]                   # some dot-stuffing too
        lines.append(line)
        total += len(line) + 2
        i += 1
    return head + ("\r\n".join(lines) + "\r\n").encode("ascii")


def dot_stuff(msg):
    """What a POP3 server sends for RETR of ``msg`` (CRLF bytes) after the
    +OK line: dot-stuffed body plus the terminating '.\\r\\n'."""
    if msg and not msg.endswith(b"\r\n"):
        msg += b"\r\n"
    out = []
    for line in msg.split(b"\r\n")[:-1] if msg else []:
        if line.startswith(b"."):
            line = b"." + line
        out.append(line + b"\r\n")
    return b"".join(out) + b".\r\n"


# --------------------------------------------------------------------------

def _mail_owner():
    for u in ("nobody", "dovecot"):
        try:
            pw = pwd.getpwnam(u)
        except KeyError:
            continue
        return pw.pw_uid, pw.pw_gid
    raise DovecotError("no suitable non-root mail user (nobody/dovecot) found")


def _traversable_by_others(path):
    p = os.path.abspath(path)
    while True:
        st = os.stat(p)
        if not (st.st_mode & 0o001):
            return False, p
        parent = os.path.dirname(p)
        if parent == p:
            return True, None
        p = parent


class Dovecot:
    """A private Dovecot POP3 instance.

    users: {name: password}.  Ports are picked once (free at init) and kept
    across stop()/start().
    """

    _count = 0

    def __init__(self, workdir=None, users=None, host="127.0.0.1", nostls_host="127.0.0.2",
                 debug=False, start=True, oauth2_introspection_url=None,
                 oauth2_mechanisms=("xoauth2", "oauthbearer"), extra_dns=()):
        self._own_workdir = workdir is None
        if workdir is None:
            workdir = tempfile.mkdtemp(prefix="tpmail-dovecot-")
        workdir = os.path.abspath(str(workdir))
        os.makedirs(workdir, exist_ok=True)
        os.chmod(workdir, 0o755)
        ok, bad = _traversable_by_others(workdir)
        if not ok:
            raise DovecotError(
                "Dovecot work dir %s is not reachable by the (non-root) mail user: "
                "%s is not world-traversable; use a dir under %s (Dovecot(workdir=None))"
                % (workdir, bad, tempfile.gettempdir()))
        self.workdir = workdir
        self.host = host
        self.nostls_host = nostls_host
        self.debug = debug
        self.users = dict(users or {})
        self.mail_uid, self.mail_gid = _mail_owner()
        self.oauth2_introspection_url = oauth2_introspection_url
        self.oauth2_mechanisms = tuple(m.lower() for m in oauth2_mechanisms) \
            if oauth2_introspection_url else ()
        for m in self.oauth2_mechanisms:
            if m not in ("xoauth2", "oauthbearer"):
                raise ValueError("oauth2 mechanism %r: xoauth2 or oauthbearer" % m)
        self.oauth2_conf_path = os.path.join(workdir, "dovecot-oauth2.conf.ext")

        self.conf_path = os.path.join(workdir, "dovecot.conf")
        self.log_path = os.path.join(workdir, "dovecot.log")
        self.passwd_path = os.path.join(workdir, "users.passwd")
        self.base_dir = os.path.join(workdir, "run")
        self.state_dir = os.path.join(workdir, "state")
        self.mail_root = os.path.join(workdir, "mail")
        self.tls_dir = os.path.join(workdir, "tls")
        Dovecot._count += 1
        self.instance_name = "tpmailtest%d-%d" % (os.getpid(), Dovecot._count)

        self.pop3_port, self.pop3s_port, self.nostls_port = _free_ports(host, 3)
        self.nostls_supported = self._can_bind(nostls_host)
        if not self.nostls_supported:
            self.nostls_host = None
            self.nostls_port = None
        self.apop_supported = True

        for d in (self.base_dir, self.state_dir, self.mail_root, self.tls_dir):
            os.makedirs(d, exist_ok=True)
        os.chmod(self.mail_root, 0o755)
        self.ca_file, self._ca_key = make_ca(self.tls_dir, "tpmail-test-ca")
        self.wrong_ca_file, _ = make_ca(self.tls_dir, "tpmail-wrong-ca")
        ips = ["127.0.0.1"] + ([nostls_host] if self.nostls_supported else [])
        self.cert_file, self.key_file = make_server_cert(
            self.tls_dir, self.ca_file, self._ca_key, "server",
            dns=tuple(dict.fromkeys(("localhost",) + tuple(extra_dns))),
            ips=tuple(dict.fromkeys(ips + [host])))
        for name in self.users:
            self._make_maildir(name)
        self._write_passwd()
        self._write_conf()
        self.proc = None
        self._logf = None
        if start:
            self.start()

    # -- config --------------------------------------------------------

    @staticmethod
    def _can_bind(h):
        try:
            with socket.socket() as s:
                s.bind((h, 0))
            return True
        except OSError:
            return False

    def _write_passwd(self):
        tmp = self.passwd_path + ".tmp"
        with open(tmp, "w") as f:
            for name, pw in self.users.items():
                if ":" in name or ":" in pw or "\n" in name + pw:
                    raise ValueError("user/password may not contain ':' or newlines")
                home = os.path.join(self.mail_root, name)
                f.write("%s:{PLAIN}%s:%d:%d::%s::\n" % (name, pw, self.mail_uid, self.mail_gid, home))
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.passwd_path)

    def _write_conf(self):
        listeners = [
            "  inet_listener pop3 {\n    address = %s\n    port = %d\n  }" % (self.host, self.pop3_port),
            "  inet_listener pop3s {\n    address = %s\n    port = %d\n    ssl = yes\n  }"
            % (self.host, self.pop3s_port),
        ]
        local_block = ""
        if self.nostls_supported:
            listeners.append("  inet_listener pop3nostls {\n    address = %s\n    port = %d\n  }"
                             % (self.nostls_host, self.nostls_port))
            local_block = "local %s {\n  ssl = no\n}\n" % self.nostls_host
        mechanisms = "plain login apop"
        passdb_filter = ""
        oauth2_passdb = ""
        if self.oauth2_mechanisms:
            self._write_oauth2_conf()
            mechanisms += " " + " ".join(self.oauth2_mechanisms)
            passdb_filter = "  mechanisms = plain login apop\n"
            oauth2_passdb = ("passdb {\n  driver = oauth2\n  mechanisms = %s\n  args = %s\n}\n"
                             % (" ".join(self.oauth2_mechanisms), self.oauth2_conf_path))
        conf = """\
# generated by tests/lib/dovecot.py
instance_name = {instance}
base_dir = {base_dir}
state_dir = {state_dir}
protocols = pop3
listen = {host}
shutdown_clients = yes
log_path = {log}
info_log_path = {log}
debug_log_path = {log}
auth_verbose = yes
auth_debug = {debug}
mail_debug = {debug}
verbose_ssl = {debug}
login_greeting = Dovecot test ready.

ssl = yes
ssl_cert = <{cert}
ssl_key = <{key}
ssl_min_protocol = TLSv1.2

disable_plaintext_auth = no
auth_mechanisms = {mechanisms}
auth_failure_delay = 0
auth_cache_size = 0

first_valid_uid = {uid}
last_valid_uid = 0
first_valid_gid = 1
mail_location = maildir:~/Maildir
mail_max_userip_connections = 500
pop3_uidl_format = %08Xu%08Xv
pop3_lock_session = no
# post-login traffic of every session, see Dovecot.rawlog()
rawlog_dir = %h/rawlog

passdb {{
  driver = passwd-file
{passdb_filter}  args = scheme=PLAIN username_format=%u {passwd}
}}
{oauth2_passdb}userdb {{
  driver = passwd-file
  args = username_format=%u {passwd}
}}

service pop3-login {{
{listeners}
  process_limit = 200
}}
service pop3 {{
  process_limit = 200
}}
service anvil {{
  client_limit = 1000
  # mode 0: the auth process cannot connect, which disables the auth
  # penalty (delays of up to 15 s after failed logins from 127.0.0.1)
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
{local_block}""".format(
            instance=self.instance_name, base_dir=self.base_dir, state_dir=self.state_dir,
            host=self.host, log=self.log_path, debug="yes" if self.debug else "no",
            cert=self.cert_file, key=self.key_file, uid=min(self.mail_uid, 500),
            passwd=self.passwd_path, listeners="\n".join(listeners), local_block=local_block,
            mechanisms=mechanisms, passdb_filter=passdb_filter, oauth2_passdb=oauth2_passdb)
        with open(self.conf_path, "w") as f:
            f.write(conf)

    def _write_oauth2_conf(self):
        with open(self.oauth2_conf_path, "w") as f:
            f.write("# generated by tests/lib/dovecot.py\n"
                    "introspection_mode = post\n"
                    "introspection_url = %s\n"
                    "force_introspection = yes\n"
                    "username_attribute = username\n"
                    "username_format = %%u\n"
                    "active_attribute = active\n"
                    "active_value = true\n"
                    "timeout_msecs = 10000\n"
                    "debug = %s\n" % (self.oauth2_introspection_url,
                                       "yes" if self.debug else "no"))
        os.chmod(self.oauth2_conf_path, 0o644)

    # -- process control -------------------------------------------------

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout=20):
        if self.running:
            return
        self._logf = open(os.path.join(self.workdir, "dovecot.stderr"), "ab")
        self.proc = subprocess.Popen([DOVECOT_BIN, "-F", "-c", self.conf_path],
                                     stdin=subprocess.DEVNULL, stdout=self._logf,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(self._ready, timeout, interval=0.05, what="dovecot to accept POP3",
                     fatal=(_DovecotExited,))
        except _DovecotExited:
            self.stop()
            raise
        except TimeoutError:
            self.stop()
            raise DovecotError("dovecot did not come up:\n" + self.log_text()[-4000:])

    def _ready(self):
        if self.proc.poll() is not None:
            raise _DovecotExited("dovecot exited with %s:\n%s" % (self.proc.returncode,
                                                              self.log_text()[-4000:]))
        ports = [(self.host, self.pop3_port), (self.host, self.pop3s_port)]
        if self.nostls_supported:
            ports.append((self.nostls_host, self.nostls_port))
        for hp in ports:
            with socket.create_connection(hp, timeout=2):
                pass
        # a full greeting on the plain port means login processes + auth work
        with socket.create_connection((self.host, self.pop3_port), timeout=5) as s:
            s.settimeout(5)
            return s.recv(512).startswith(b"+OK")

    def stop(self, timeout=10):
        """Stop Dovecot and wait until none of its processes is left.

        SIGTERM goes to the whole process group (Dovecot runs in its own
        session), which is much faster than letting the master tell its
        children one by one; whatever is still alive after ``timeout``
        gets SIGKILL."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        if self.proc.poll() is None:
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            wait_for(lambda: not _pgroup_alive(pgid), 3, what="dovecot processes to exit")
        except TimeoutError:
            pass
        if _pgroup_alive(pgid) or self.proc.poll() is None:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(5)
            wait_for(lambda: not _pgroup_alive(pgid), 5, what="dovecot processes to die")
        self.proc = None
        if self._logf:
            self._logf.close()
            self._logf = None
        # the listeners must be gone before a test counts on "unreachable"
        wait_for(lambda: not self._port_open(self.host, self.pop3_port), 5,
                 what="dovecot port to close")

    def restart(self):
        self.stop()
        self.start()

    def close(self):
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc):
        self.close()

    @staticmethod
    def _port_open(h, p):
        try:
            with socket.create_connection((h, p), timeout=0.5):
                return True
        except OSError:
            return False

    def log_text(self):
        out = []
        for p in (os.path.join(self.workdir, "dovecot.stderr"), self.log_path):
            try:
                with open(p, "rb") as f:
                    out.append(f.read().decode(errors="replace"))
            except FileNotFoundError:
                pass
        return "\n".join(out)

    # -- users and mail --------------------------------------------------

    def add_user(self, name, password, timeout=10):
        """Add or change a user.  Dovecot re-reads the passwd-file when it
        changes (checked at most about once a second), so when running this
        waits until the new credentials are accepted."""
        self.users[name] = password
        self._make_maildir(name)
        self._write_passwd()
        if self.running:
            wait_for(lambda: self.try_login(name, password), timeout, interval=0.2,
                     what="dovecot to accept new user %s" % name)

    def try_login(self, user, password):
        """USER/PASS on the plain port; True if accepted."""
        import poplib
        p = poplib.POP3(self.host, self.pop3_port, timeout=5)
        try:
            p.user(user)
            p.pass_(password)
        except poplib.error_proto:
            p.close()
            return False
        p.quit()
        return True

    def try_sasl(self, mechanism, user, token, port=None):
        """AUTH <mechanism> with an OAuth2 bearer token (XOAUTH2 or
        OAUTHBEARER, initial response) on the plain port, then QUIT.
        Returns the server's reply line to AUTH (bytes)."""
        import base64
        mech = mechanism.upper()
        if mech == "XOAUTH2":
            ir = "user=%s\x01auth=Bearer %s\x01\x01" % (user, token)
        elif mech == "OAUTHBEARER":
            ir = "n,a=%s,\x01auth=Bearer %s\x01\x01" % (user, token)
        else:
            raise ValueError(mechanism)
        with socket.create_connection((self.host, port or self.pop3_port), timeout=10) as s:
            f = s.makefile("rb")
            f.readline()
            s.sendall(b"AUTH %s %s\r\n" % (mech.encode(), base64.b64encode(ir.encode())))
            line = f.readline()
            if line.startswith(b"+ "):          # a failure's JSON challenge:
                s.sendall(b"AQ==\r\n")        # RFC 7628's dummy response, %x01
                line = f.readline()
            if line.startswith(b"+OK"):
                s.sendall(b"QUIT\r\n")
                f.readline()
            return line

    def maildir(self, user):
        return os.path.join(self.mail_root, user, "Maildir")

    def _chown_tree(self, top):
        for root, dirs, files in os.walk(top):
            os.chown(root, self.mail_uid, self.mail_gid)
            for n in files:
                os.chown(os.path.join(root, n), self.mail_uid, self.mail_gid)

    def _make_maildir(self, user):
        home = os.path.join(self.mail_root, user)
        md = self.maildir(user)
        for sub in ("cur", "new", "tmp"):
            os.makedirs(os.path.join(md, sub), exist_ok=True)
        os.makedirs(os.path.join(home, "rawlog"), exist_ok=True)
        os.chmod(home, 0o700)
        self._chown_tree(home)

    def seed(self, user, messages):
        """Replace the user's mailbox with ``messages`` (list of bytes).

        Message i of the list is POP3 message i+1.  Files go to cur/ with
        names whose leading timestamps increase, which is the order in which
        Dovecot assigns UIDs (and so POP3 message numbers) to new files.
        """
        if user not in self.users:
            raise KeyError("unknown user %r" % user)
        md = self.maildir(user)
        if os.path.exists(md):
            shutil.rmtree(md)
        self.clear_rawlog(user)
        self._make_maildir(user)
        base = 1500000000
        for i, msg in enumerate(messages):
            if not isinstance(msg, (bytes, bytearray)):
                raise TypeError("messages must be bytes")
            name = "%d.M%06dP%d.tpmailtest,S=%d:2," % (base + i, i, os.getpid(), len(msg))
            tmp = os.path.join(md, "tmp", name)
            with open(tmp, "wb") as f:
                f.write(msg)
            os.utime(tmp, (base + i, base + i))
            os.chown(tmp, self.mail_uid, self.mail_gid)
            os.rename(tmp, os.path.join(md, "cur", name))

    def _message_files(self, user):
        md = self.maildir(user)
        files = []
        for sub in ("new", "cur"):
            d = os.path.join(md, sub)
            for n in os.listdir(d):
                if n.startswith("."):
                    continue
                m = re.match(r"(\d+)\.M(\d+)", n)
                key = (int(m.group(1)), int(m.group(2))) if m else (1 << 62, 0)
                files.append((key, n, os.path.join(d, n)))
        files.sort()
        return [f[2] for f in files]

    def count(self, user):
        """Number of messages in the user's maildir (read directly)."""
        return len(self._message_files(user))

    def messages(self, user):
        """The user's messages as bytes, in seed order (read directly)."""
        out = []
        for p in self._message_files(user):
            with open(p, "rb") as f:
                out.append(f.read())
        return out

    # -- rawlog: what Dovecot received and sent after login ----------------

    def clear_rawlog(self, user):
        d = os.path.join(self.mail_root, user, "rawlog")
        if os.path.isdir(d):
            for n in os.listdir(d):
                os.unlink(os.path.join(d, n))

    def rawlog(self, user):
        """Post-login traffic of the user's sessions since the last seed() /
        clear_rawlog(), oldest first: [{"in": bytes, "out": bytes}, ...].
        "in" is what the client (the proxy) sent, byte for byte.  Dovecot
        writes these files as the session goes; read them after the session
        ended."""
        d = os.path.join(self.mail_root, user, "rawlog")
        sessions = {}
        for n in os.listdir(d):
            m = re.match(r"(\d{8}-\d{6})\.(\d+)\.(\d+)\.(in|out)$", n)
            if not m:
                continue
            with open(os.path.join(d, n), "rb") as f:
                data = f.read()
            key = (m.group(1), int(m.group(2)), int(m.group(3)))
            sessions.setdefault(key, {"in": b"", "out": b""})[m.group(4)] = _strip_rawlog_ts(data)
        return [sessions[k] for k in sorted(sessions)]

    # -- client helpers ----------------------------------------------------

    def ssl_context(self, wrong_ca=False):
        ctx = ssl.create_default_context(cafile=self.wrong_ca_file if wrong_ca else self.ca_file)
        return ctx

    def describe(self):
        d = {"host": self.host, "pop3_port": self.pop3_port, "pop3s_port": self.pop3s_port,
             "nostls_host": self.nostls_host, "nostls_port": self.nostls_port,
             "ca_file": self.ca_file, "wrong_ca_file": self.wrong_ca_file,
             "users": dict(self.users), "apop": self.apop_supported, "log": self.log_path,
             "oauth2_introspection_url": self.oauth2_introspection_url,
             "oauth2_mechanisms": list(self.oauth2_mechanisms)}
        return d


def _strip_rawlog_ts(data):
    """Remove the "<secs>.<usecs> " prefix Dovecot puts before each line."""
    out = []
    for line in data.split(b"\n"):
        m = re.match(rb"\d+\.\d+ ", line)
        out.append(line[m.end():] if m else line)
    return b"\n".join(out)


def _pgroup_alive(pgid):
    """True if a non-zombie process of process group ``pgid`` exists."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d, "rb") as f:
                st = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may contain spaces/parens
        rest = st[st.rindex(b")") + 2:].split()
        if len(rest) >= 3 and int(rest[2]) == pgid and rest[0] != b"Z":
            return True
    return False
