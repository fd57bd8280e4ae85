/*
 * settings.c: tpmaild's settings from its built-in defaults, then the YAML
 * config file (--config), then the command line, which wins.  Runs in the
 * supervisor before anything is bound or started.
 */
#include <errno.h>
#include <getopt.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "supervisor.h"
#include "yaml_json.h"

enum {
	OPT_CRS = 256, OPT_DESTINATIONS, OPT_STATE_DIR, OPT_CONTROL, OPT_CONFIG,
	OPT_LISTEN, OPT_PORTS, OPT_PROXY, OPT_LOG_LEVEL, OPT_IDLE, OPT_CONNECT,
	OPT_AUTH, OPT_MAX_SESSIONS, OPT_MAX_LINE, OPT_MAX_BUFFER, OPT_GRACE,
	OPT_BACKOFF_MAX, OPT_UID_BASE, OPT_SANDBOX, OPT_SYSTEM_CA, OPT_HTTP,
	OPT_LOG_FORMAT, OPT_SERVICE_KEYS, OPT_DEFAULT_INSTANCE, OPT_POLL,
	OPT_CONN_PROXY, OPT_CONN_KEY, OPT_RESOLVE, OPT_KUBERNETES, OPT_KUBE_API,
	OPT_KUBE_CA, OPT_KUBE_TOKEN, OPT_NAMESPACE, OPT_POD_SELECTOR,
	OPT_WATCH_NS, OPT_IDENTITY, OPT_LEASE, OPT_ALLOW_LOOPBACK, OPT_SERVICE_CA,
	OPT_HELP,
};

static const struct option long_opts[] = {
	{ "crs", required_argument, NULL, OPT_CRS },
	{ "destinations", required_argument, NULL, OPT_DESTINATIONS },
	{ "state-dir", required_argument, NULL, OPT_STATE_DIR },
	{ "control", required_argument, NULL, OPT_CONTROL },
	{ "config", required_argument, NULL, OPT_CONFIG },
	{ "listen-address", required_argument, NULL, OPT_LISTEN },
	{ "port-range", required_argument, NULL, OPT_PORTS },
	{ "proxy-path", required_argument, NULL, OPT_PROXY },
	{ "log-level", required_argument, NULL, OPT_LOG_LEVEL },
	{ "idle-timeout", required_argument, NULL, OPT_IDLE },
	{ "connect-timeout", required_argument, NULL, OPT_CONNECT },
	{ "auth-timeout", required_argument, NULL, OPT_AUTH },
	{ "max-sessions", required_argument, NULL, OPT_MAX_SESSIONS },
	{ "max-line", required_argument, NULL, OPT_MAX_LINE },
	{ "max-buffer", required_argument, NULL, OPT_MAX_BUFFER },
	{ "drain-grace", required_argument, NULL, OPT_GRACE },
	{ "backoff-max", required_argument, NULL, OPT_BACKOFF_MAX },
	{ "uid-base", required_argument, NULL, OPT_UID_BASE },
	{ "sandbox", required_argument, NULL, OPT_SANDBOX },
	{ "system-ca", required_argument, NULL, OPT_SYSTEM_CA },
	{ "http", required_argument, NULL, OPT_HTTP },
	{ "log-format", required_argument, NULL, OPT_LOG_FORMAT },
	{ "service-keys", required_argument, NULL, OPT_SERVICE_KEYS },
	{ "default-instance", required_argument, NULL, OPT_DEFAULT_INSTANCE },
	{ "poll-interval", required_argument, NULL, OPT_POLL },
	{ "connectivity-proxy", required_argument, NULL, OPT_CONN_PROXY },
	{ "connectivity-key", required_argument, NULL, OPT_CONN_KEY },
	{ "resolve", required_argument, NULL, OPT_RESOLVE },
	{ "service-ca", required_argument, NULL, OPT_SERVICE_CA },
	{ "kubernetes", no_argument, NULL, OPT_KUBERNETES },
	{ "kube-api", required_argument, NULL, OPT_KUBE_API },
	{ "kube-ca", required_argument, NULL, OPT_KUBE_CA },
	{ "kube-token-file", required_argument, NULL, OPT_KUBE_TOKEN },
	{ "namespace", required_argument, NULL, OPT_NAMESPACE },
	{ "pod-selector", required_argument, NULL, OPT_POD_SELECTOR },
	{ "watch-namespaces", required_argument, NULL, OPT_WATCH_NS },
	{ "identity", required_argument, NULL, OPT_IDENTITY },
	{ "lease-duration", required_argument, NULL, OPT_LEASE },
	{ "allow-loopback", no_argument, NULL, OPT_ALLOW_LOOPBACK },
	{ "help", no_argument, NULL, OPT_HELP },
	{ NULL, 0, NULL, 0 },
};

/* The config file's keys: the long option names with '_' for '-'. */
static const char *
opt_key(int opt)
{
	static char	 key[64];
	size_t		 i;
	char		*p;

	for (i = 0; long_opts[i].name != NULL; i++)
		if (long_opts[i].val == opt) {
			snprintf(key, sizeof(key), "%s", long_opts[i].name);
			for (p = key; *p; p++)
				if (*p == '-')
					*p = '_';
			return key;
		}
	return "";
}

static void
usage(FILE *f)
{
	fprintf(f,
"usage: tpmaild --crs DIR --destinations FILE [--state-dir DIR] [options]\n"
"\n"
"Standalone mode: serves every Destination CR in DIR (YAML or JSON, watched)\n"
"with the destinations in FILE (watched), one tpmail-pop3 per tenant service.\n"
"\n"
"  --config FILE          YAML file with the same settings (flags win)\n"
"  --state-dir DIR        ports.json and control.sock (default /var/lib/tpmail)\n"
"  --control PATH         control socket (default STATE_DIR/control.sock)\n"
"  --listen-address ADDR  address of the tenant endpoints (default 127.0.0.1)\n"
"  --port-range LO-HI     ports for tenant endpoints (default 20000-20999)\n"
"  --proxy-path PATH      tpmail-pop3 binary (default: next to tpmaild)\n"
"  --log-level LEVEL      error, warn, info (default), debug\n"
"  --log-format FORMAT    json (one object per line), text, or auto (default:\n"
"                         text on a terminal, json otherwise)\n"
"  --idle-timeout SEC     client silence before autologout (default 600)\n"
"  --connect-timeout SEC  upstream TCP/TLS connect (default 10)\n"
"  --auth-timeout SEC     whole upstream login (default 30)\n"
"  --max-sessions N       concurrent sessions per tenant service (default 100)\n"
"  --max-line BYTES       longest client command line (default 8192)\n"
"  --max-buffer BYTES     buffered per direction per session (default 262144)\n"
"  --drain-grace SEC      time open sessions get when a service stops (default 30)\n"
"  --backoff-max SEC      longest restart delay of a crashing proxy (default 60)\n"
"  --uid-base N           as root, tenant proxies run as uid/gid N + (port - low port)\n"
"                         (default 200000)\n"
"  --sandbox MODE         best-effort (default: apply what the privileges allow,\n"
"                         report the rest) or strict (refuse to serve otherwise)\n"
"  --service-keys DIR     Destination service keys, one file per instance\n"
"  --default-instance N   instance for CRs without destinationServiceInstanceName\n"
"  --poll-interval SEC    re-read destinations from the service (default 180)\n"
"  --connectivity-proxy HOST:PORT  the connectivity proxy's SOCKS5 (OnPremise)\n"
"  --connectivity-key FILE         its service key (tokens per tenant)\n"
"  --resolve HOST:PORT:ADDR        as curl's --resolve, for control-plane URLs\n"
"  --service-ca FILE      the only CAs trusted for the token endpoints and the\n"
"                         Destination service (default: the system's)\n"
"\n"
"Kubernetes mode: tpmaild --kubernetes [--kube-api URL --kube-ca FILE\n"
"  --kube-token-file FILE] [--namespace NS] [--pod-selector k=v,...]\n"
"  [--watch-namespaces a,b] [--identity ID] [--lease-duration SEC]\n"
"  [--allow-loopback] [--destinations FILE] ...  (in-cluster defaults from the\n"
"  service account; CRs from the API server; Services, status and a Lease)\n"
"\n"
"  --http ADDR:PORT       serve /healthz, /readyz and /metrics (e.g. 127.0.0.1:9494)\n"
"  --system-ca FILE       CA bundle for destinations without their own CA file\n"
"                         (default /etc/ssl/certs/ca-certificates.crt)\n");
}

static int
parse_int(const char *s, int min, int max, int *out)
{
	char	*end;
	long	 v;

	errno = 0;
	v = strtol(s, &end, 10);
	if (*s == '\0' || *end != '\0' || errno || v < min || v > max)
		return -1;
	*out = (int)v;
	return 0;
}

/* Apply one setting, from a flag or the config file; -1 with a message. */
static int
settings_apply(struct settings *st, int opt, const char *val)
{
	int	lo, hi, l;
	char	*dash;

	switch (opt) {
	case OPT_CRS: free(st->crs_dir); st->crs_dir = strdup(val); return 0;
	case OPT_DESTINATIONS:
		free(st->destinations);
		st->destinations = strdup(val);
		return 0;
	case OPT_STATE_DIR:
		free(st->state_dir);
		st->state_dir = strdup(val);
		return 0;
	case OPT_CONTROL: free(st->control); st->control = strdup(val); return 0;
	case OPT_LISTEN:
		free(st->listen_address);
		st->listen_address = strdup(val);
		return 0;
	case OPT_PROXY:
		free(st->proxy_path);
		st->proxy_path = strdup(val);
		return 0;
	case OPT_PORTS:
		dash = strchr(val, '-');
		if (dash == NULL)
			return -1;
		*dash = '\0';
		l = parse_int(val, 1, 65535, &lo) || parse_int(dash + 1, 1, 65535, &hi);
		*dash = '-';
		if (l || lo > hi)
			return -1;
		st->port_min = lo;
		st->port_max = hi;
		return 0;
	case OPT_LOG_LEVEL:
		if ((l = log_level_parse(val)) == -1)
			return -1;
		st->log_level = l;
		return 0;
	case OPT_IDLE: return parse_int(val, 1, 86400, &st->idle_timeout);
	case OPT_CONNECT: return parse_int(val, 1, 3600, &st->connect_timeout);
	case OPT_AUTH: return parse_int(val, 1, 3600, &st->auth_timeout);
	case OPT_MAX_SESSIONS: return parse_int(val, 1, 1000000, &st->max_sessions);
	case OPT_MAX_LINE: return parse_int(val, 64, 1 << 20, &st->max_line);
	case OPT_MAX_BUFFER: return parse_int(val, 4096, 1 << 30, &st->max_buffer);
	case OPT_GRACE: return parse_int(val, 0, 86400, &st->drain_grace);
	case OPT_BACKOFF_MAX: return parse_int(val, 1, 3600, &st->backoff_max);
	case OPT_UID_BASE: return parse_int(val, 1, 2000000000, &st->uid_base);
	case OPT_SANDBOX:
		if (strcmp(val, "strict") == 0)
			st->sandbox_strict = 1;
		else if (strcmp(val, "best-effort") == 0)
			st->sandbox_strict = 0;
		else
			return -1;
		return 0;
	case OPT_KUBERNETES:
		st->kubernetes = strcmp(val, "false") != 0;
		return 0;
	case OPT_ALLOW_LOOPBACK:
		st->allow_loopback_set = strcmp(val, "false") == 0 ? -1 : 1;
		return 0;
	case OPT_KUBE_API:
		free(st->kube_api);
		st->kube_api = strdup(val);
		return 0;
	case OPT_KUBE_CA:
		free(st->kube_ca);
		st->kube_ca = strdup(val);
		return 0;
	case OPT_KUBE_TOKEN:
		free(st->kube_token_file);
		st->kube_token_file = strdup(val);
		return 0;
	case OPT_NAMESPACE:
		free(st->namespace);
		st->namespace = strdup(val);
		return 0;
	case OPT_POD_SELECTOR:
		free(st->pod_selector);
		st->pod_selector = strdup(val);
		return 0;
	case OPT_WATCH_NS:
		free(st->watch_namespaces);
		st->watch_namespaces = strdup(val);
		return 0;
	case OPT_IDENTITY:
		free(st->identity);
		st->identity = strdup(val);
		return 0;
	case OPT_LEASE: return parse_int(val, 2, 3600, &st->lease_duration);
	case OPT_SERVICE_KEYS:
		free(st->service_keys);
		st->service_keys = strdup(val);
		return 0;
	case OPT_DEFAULT_INSTANCE:
		free(st->default_instance);
		st->default_instance = strdup(val);
		return 0;
	case OPT_POLL: return parse_int(val, 1, 86400, &st->poll_interval);
	case OPT_CONN_PROXY:
		if (strrchr(val, ':') == NULL)
			return -1;
		free(st->connectivity_proxy);
		st->connectivity_proxy = strdup(val);
		return 0;
	case OPT_CONN_KEY:
		free(st->connectivity_key);
		st->connectivity_key = strdup(val);
		return 0;
	case OPT_RESOLVE:
		/* HOST:PORT:ADDR, as curl's --resolve */
		if (strchr(val, ':') == NULL || strchr(strchr(val, ':') + 1,
		    ':') == NULL)
			return -1;
		if (st->resolve == NULL)
			st->resolve = json_array();
		json_array_append_new(st->resolve, json_string(val));
		return 0;
	case OPT_SERVICE_CA:
		free(st->service_ca);
		st->service_ca = strdup(val);
		return 0;
	case OPT_LOG_FORMAT:
		if (strcmp(val, "json") == 0)
			st->log_json = 1;
		else if (strcmp(val, "text") == 0)
			st->log_json = 0;
		else if (strcmp(val, "auto") == 0)
			st->log_json = !isatty(STDERR_FILENO);
		else
			return -1;
		return 0;
	case OPT_HTTP:
		if (strchr(val, ':') == NULL)
			return -1;
		free(st->http);
		st->http = strdup(val);
		return 0;
	case OPT_SYSTEM_CA:
		free(st->system_ca);
		st->system_ca = strdup(val);
		return 0;
	}
	return -1;
}

static int
settings_file(struct settings *st, const char *path)
{
	json_t		*docs, *root, *v;
	const char	*key;
	char		 err[512], num[32], *val;
	size_t		 i;
	int		 found;

	if ((docs = yaml_json_load_file(path, err, sizeof(err))) == NULL) {
		fprintf(stderr, "tpmaild: %s: %s\n", path, err);
		return -1;
	}
	root = json_array_get(docs, 0);
	if (!json_is_object(root)) {
		fprintf(stderr, "tpmaild: %s: must be a YAML mapping\n", path);
		json_decref(docs);
		return -1;
	}
	json_object_foreach(root, key, v) {
		found = 0;
		for (i = 0; long_opts[i].name != NULL; i++) {
			if (strcmp(opt_key(long_opts[i].val), key) != 0 ||
			    long_opts[i].val == OPT_CONFIG ||
			    long_opts[i].val == OPT_HELP)
				continue;
			found = 1;
			if (json_is_integer(v)) {
				snprintf(num, sizeof(num), "%lld",
				    (long long)json_integer_value(v));
				val = num;
			} else if (json_is_boolean(v))
				val = json_is_true(v) ? "true" : "false";
			else
				val = (char *)json_string_value(v);
			if (val == NULL || settings_apply(st, long_opts[i].val,
			    val) == -1) {
				fprintf(stderr, "tpmaild: %s: invalid value for "
				    "%s\n", path, key);
				json_decref(docs);
				return -1;
			}
		}
		if (!found) {
			fprintf(stderr, "tpmaild: %s: unknown setting %s\n",
			    path, key);
			json_decref(docs);
			return -1;
		}
	}
	json_decref(docs);
	return 0;
}

#define SA_DIR	"/var/run/secrets/kubernetes.io/serviceaccount"

static char *
read_small(const char *path)
{
	char	buf[512], err[128], *b;
	size_t	len;

	if ((b = yaml_json_read_file(path, &len, err, sizeof(err))) == NULL)
		return NULL;
	while (len > 0 && (b[len - 1] == '\n' || b[len - 1] == ' '))
		len--;
	snprintf(buf, sizeof(buf), "%.*s", (int)len, b);
	free(b);
	return strdup(buf);
}

/* In-cluster defaults for what the flags left unset. */
static int
settings_kubernetes(struct settings *st)
{
	const char	*h = getenv("KUBERNETES_SERVICE_HOST");
	const char	*p = getenv("KUBERNETES_SERVICE_PORT");
	const char	*pod = getenv("POD_NAME");
	char		 host[256];

	if (st->kube_api == NULL) {
		if (h == NULL) {
			fprintf(stderr, "tpmaild: --kubernetes: no --kube-api and "
			    "no KUBERNETES_SERVICE_HOST\n");
			return -1;
		}
		if (asprintf(&st->kube_api, strchr(h, ':') ? "https://[%s]:%s" :
		    "https://%s:%s", h, p ? p : "443") == -1)
			return -1;
	}
	if (st->kube_ca == NULL && access(SA_DIR "/ca.crt", R_OK) == 0)
		st->kube_ca = strdup(SA_DIR "/ca.crt");
	if (st->kube_token_file == NULL && access(SA_DIR "/token", R_OK) == 0)
		st->kube_token_file = strdup(SA_DIR "/token");
	if (st->namespace == NULL)
		st->namespace = read_small(SA_DIR "/namespace");
	if (st->namespace == NULL) {
		fprintf(stderr, "tpmaild: --kubernetes needs --namespace (the "
		    "proxy's own)\n");
		return -1;
	}
	if (st->identity == NULL) {
		/* unique per replica: the pod's name, else the host's and pid */
		if (pod != NULL && pod[0] != '\0')
			st->identity = strdup(pod);
		else {
			gethostname(host, sizeof(host));
			host[sizeof(host) - 1] = '\0';
			if (asprintf(&st->identity, "%s-%d", host, (int)getpid()) == -1)
				return -1;
		}
	}
	return 0;
}

/* tpmail-pop3 next to tpmaild, or in the build tree's proxy/ beside it. */
static char *
default_proxy_path(void)
{
	char	 self[PATH_MAX], *dir, *p;
	ssize_t	 n;

	n = readlink("/proc/self/exe", self, sizeof(self) - 1);
	if (n <= 0)
		return strdup("tpmail-pop3");
	self[n] = '\0';
	dir = dirname(self);
	if (asprintf(&p, "%s/tpmail-pop3", dir) == -1)
		fatal("asprintf");
	if (access(p, X_OK) == 0)
		return p;
	free(p);
	if (asprintf(&p, "%s/../proxy/tpmail-pop3", dir) == -1)
		fatal("asprintf");
	return p;
}

int
settings_load(struct settings *st, int argc, char **argv)
{
	int	opt, i;

	memset(st, 0, sizeof(*st));
	st->state_dir = strdup("/var/lib/tpmail");
	st->listen_address = strdup("127.0.0.1");
	st->port_min = 20000;
	st->port_max = 20999;
	st->log_level = LOG_LEVEL_INFO;
	st->connect_timeout = 10;
	st->auth_timeout = 30;
	st->idle_timeout = 600;
	st->max_sessions = 100;
	st->max_line = 8192;
	st->max_buffer = 256 * 1024;
	st->drain_grace = 30;
	st->backoff_max = 60;
	st->allow_loopback = 1;		/* standalone mode */
	st->uid_base = 200000;
	st->poll_interval = 180;
	st->lease_duration = 15;
	st->log_json = !isatty(STDERR_FILENO);
	st->system_ca = strdup("/etc/ssl/certs/ca-certificates.crt");

	/* the config file first, so that flags override it */
	for (i = 1; i < argc - 1; i++)
		if (strcmp(argv[i], "--config") == 0 &&
		    settings_file(st, argv[i + 1]) == -1)
			return -1;
	while ((opt = getopt_long(argc, argv, "", long_opts, NULL)) != -1) {
		if (opt == OPT_HELP) {
			usage(stdout);
			exit(0);
		}
		if (opt == '?') {
			usage(stderr);
			return -1;
		}
		if (opt == OPT_CONFIG)
			continue;
		if (settings_apply(st, opt, optarg ? optarg : "true") == -1) {
			fprintf(stderr, "tpmaild: invalid value for --%s: %s\n",
			    opt_key(opt), optarg);
			return -1;
		}
	}
	if (optind != argc) {
		usage(stderr);
		return -1;
	}
	if (st->kubernetes) {
		if (settings_kubernetes(st) == -1)
			return -1;
	} else if (st->crs_dir == NULL || st->destinations == NULL) {
		fprintf(stderr, "tpmaild: --crs and --destinations are required "
		    "(or --kubernetes)\n");
		usage(stderr);
		return -1;
	}
	/* loopback mail servers: fine standalone, refused in a cluster */
	st->allow_loopback = st->allow_loopback_set ? st->allow_loopback_set > 0 :
	    !st->kubernetes;
	if (st->control == NULL && asprintf(&st->control, "%s/control.sock",
	    st->state_dir) == -1)
		return -1;
	if (st->proxy_path == NULL)
		st->proxy_path = default_proxy_path();
	/* a typo would otherwise show only as failing requests, later */
	if (st->service_ca != NULL && access(st->service_ca, R_OK) == -1) {
		fprintf(stderr, "tpmaild: --service-ca %s: %s\n", st->service_ca,
		    strerror(errno));
		return -1;
	}
	if (asprintf(&st->empty_dir, "%s/empty", st->state_dir) == -1)
		return -1;
	if (st->uid_base + (st->port_max - st->port_min) > 2000000000) {
		fprintf(stderr, "tpmaild: --uid-base plus the port range is too large\n");
		return -1;
	}
	return 0;
}

void
settings_free(struct settings *st)
{
	free(st->crs_dir);
	free(st->destinations);
	free(st->state_dir);
	free(st->control);
	free(st->config_file);
	free(st->listen_address);
	free(st->proxy_path);
	free(st->system_ca);
	free(st->empty_dir);
	free(st->http);
	free(st->service_keys);
	free(st->default_instance);
	free(st->connectivity_proxy);
	free(st->connectivity_key);
	free(st->service_ca);
	json_decref(st->resolve);
	free(st->kube_api);
	free(st->kube_ca);
	free(st->kube_token_file);
	free(st->namespace);
	free(st->pod_selector);
	free(st->watch_namespaces);
	free(st->identity);
	memset(st, 0, sizeof(*st));
}
