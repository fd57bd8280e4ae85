/*
 * reconcile.c: desired tenant services versus running ones.  Every pass
 * re-reads the CRs and the destinations, derives the set of tenant services
 * (one per dedicated CR, one per tenant of a shared CR), starts what is new,
 * pushes changed configuration to what runs (new sessions use it, open ones
 * are untouched), and drains what is gone.  A CR or tenant that fails is
 * reported and changes nothing else.  Runs in the supervisor.
 */
#include <sys/socket.h>
#include <sys/stat.h>
#include <arpa/inet.h>
#include <openssl/evp.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "supervisor.h"
#include "yaml_json.h"

#define R_FAILED_TENANTS	"FailedToApplyConfiguration"
#define R_CONFIG_FAILED		"ConfigurationFailed"
#define R_NAME_PRESENT		"ConfigurationError-K8sResourceWithNameAlreadyPresent"

static struct service *
service_find(const char *key)
{
	struct service	*sv;

	TAILQ_FOREACH(sv, &sup->services, sv_entry)
		if (strcmp(sv->sv_key, key) == 0 && !sv->sv_remove)
			return sv;
	return NULL;
}

/*
 * The mail server's addresses, resolved here: the sandboxed proxy has no
 * DNS (no files, no sockets but TCP).  NULL with msg set on failure.
 */
static json_t *
reconcile_resolve(const char *host, char *msg, size_t msgsz)
{
	struct addrinfo	 hints, *res, *ai;
	char		 buf[INET6_ADDRSTRLEN];
	json_t		*arr;
	int		 r;

	memset(&hints, 0, sizeof(hints));
	hints.ai_socktype = SOCK_STREAM;
	if ((r = getaddrinfo(host, NULL, &hints, &res)) != 0) {
		snprintf(msg, msgsz, "cannot resolve the mail server %s: %s",
		    host, gai_strerror(r));
		return NULL;
	}
	arr = json_array();
	for (ai = res; ai != NULL && json_array_size(arr) < 4; ai = ai->ai_next) {
		if (ai->ai_family == AF_INET)
			inet_ntop(AF_INET, &((struct sockaddr_in *)ai->ai_addr)->
			    sin_addr, buf, sizeof(buf));
		else if (ai->ai_family == AF_INET6)
			inet_ntop(AF_INET6, &((struct sockaddr_in6 *)ai->ai_addr)->
			    sin6_addr, buf, sizeof(buf));
		else
			continue;
		json_array_append_new(arr, json_string(buf));
	}
	freeaddrinfo(res);
	return arr;
}

/* STATE_DIR/trust: trust stores from the Destination service. */
static int
trust_dir(char *buf, size_t bufsz)
{
	if ((size_t)snprintf(buf, bufsz, "%s/trust", sup->st.state_dir) >= bufsz)
		return -1;
	if (mkdir(buf, 0700) == -1 && errno != EEXIST)
		return -1;
	return 0;
}

/* Write text to path whole or not at all, mode 0600. */
static int
write_file_atomic(const char *path, const char *text)
{
	char	tmp[PATH_MAX];
	size_t	len = strlen(text), off = 0;
	ssize_t	n;
	int	fd;

	if ((size_t)snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= sizeof(tmp))
		return -1;
	unlink(tmp);
	if ((fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600)) == -1)
		return -1;
	while (off < len) {
		if ((n = write(fd, text + off, len - off)) == -1 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		off += (size_t)n;
	}
	if (off < len || fsync(fd) == -1 || close(fd) == -1) {
		if (off < len)
			close(fd);
		unlink(tmp);
		return -1;
	}
	if (rename(tmp, path) == -1) {
		unlink(tmp);
		return -1;
	}
	return 0;
}

/*
 * A trust store the Destination service returned (upstream.ca_pem) becomes
 * a file the proxy gets opened like any ssl.cafile: STATE_DIR/trust/<sha256
 * of the content>.pem.  Named by content, so a changed certificate is a new
 * file and reaches the running proxy as a changed configuration.
 */
static int
reconcile_trust_file(json_t *resolved, char *msg, size_t msgsz)
{
	json_t		*up = json_object_get(resolved, "upstream");
	const char	*pem = json_string_value(json_object_get(up, "ca_pem"));
	unsigned char	 md[EVP_MAX_MD_SIZE];
	unsigned int	 mdlen, i;
	char		 dir[PATH_MAX], hex[2 * EVP_MAX_MD_SIZE + 1];
	char		 path[PATH_MAX + 2 * EVP_MAX_MD_SIZE + 8];

	if (pem == NULL)
		return 0;
	if (EVP_Digest(pem, strlen(pem), md, &mdlen, EVP_sha256(), NULL) != 1) {
		snprintf(msg, msgsz, "cannot hash the trust store");
		return -1;
	}
	for (i = 0; i < mdlen; i++)
		snprintf(hex + 2 * i, 3, "%02x", md[i]);
	if (trust_dir(dir, sizeof(dir)) == -1) {
		snprintf(msg, msgsz, "cannot make the trust store directory in "
		    "%.*s: %s", (int)(msgsz / 2), sup->st.state_dir,
		    strerror(errno));
		return -1;
	}
	snprintf(path, sizeof(path), "%s/%s.pem", dir, hex);
	if (access(path, R_OK) == -1 && write_file_atomic(path, pem) == -1) {
		snprintf(msg, msgsz, "cannot write the trust store %.*s: %s",
		    (int)(msgsz / 2), path, strerror(errno));
		return -1;
	}
	json_object_set_new(up, "cafile", json_string(path));
	json_object_del(up, "ca_pem");
	return 0;
}

/* Remove the trust store files no service uses any more. */
static void
reconcile_trust_gc(void)
{
	struct service	*sv;
	DIR		*dp;
	struct dirent	*de;
	char		 dir[PATH_MAX], path[PATH_MAX + 256];
	int		 used;

	if ((size_t)snprintf(dir, sizeof(dir), "%s/trust", sup->st.state_dir) >=
	    sizeof(dir) || (dp = opendir(dir)) == NULL)
		return;
	while ((de = readdir(dp)) != NULL) {
		if (de->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
		used = 0;
		TAILQ_FOREACH(sv, &sup->services, sv_entry)
			if (sv->sv_ca != NULL && strcmp(sv->sv_ca, path) == 0)
				used = 1;
		if (!used)
			unlink(path);
	}
	closedir(dp);
}

/* What the tenant proxy receives: the resolved destination plus limits. */
static json_t *
reconcile_config(const char *key, const char *tenant, json_t *resolved,
    char *msg, size_t msgsz)
{
	json_t		*c, *up, *addrs;
	const char	*ca, *loc, *jwt;
	char		 chost[256], *colon;

	up = json_deep_copy(json_object_get(resolved, "upstream"));
	if ((loc = json_string_value(json_object_get(resolved, "onpremise"))) !=
	    NULL) {
		/*
		 * On premise: connect to the connectivity proxy, which reaches
		 * the virtual host through the Cloud Connector.
		 */
		if (destsvc_connectivity_token(tenant ? tenant :
		    TPMAIL_PROVIDER_TENANT, &jwt, msg, msgsz) != 1) {
			json_decref(up);
			return NULL;
		}
		snprintf(chost, sizeof(chost), "%s", sup->st.connectivity_proxy);
		if ((colon = strrchr(chost, ':')) == NULL) {
			snprintf(msg, msgsz, "--connectivity-proxy needs HOST:PORT");
			json_decref(up);
			return NULL;
		}
		*colon = '\0';
		if ((addrs = reconcile_resolve(chost, msg, msgsz)) == NULL) {
			json_decref(up);
			return NULL;
		}
		json_object_set_new(up, "socks", json_pack("{s:o,s:i,s:s,s:s}",
		    "addresses", addrs, "port", atoi(colon + 1), "jwt", jwt,
		    "location", loc));
	} else {
		if ((addrs = reconcile_resolve(json_string_value(json_object_get(
		    up, "host")), msg, msgsz)) == NULL) {
			json_decref(up);
			return NULL;
		}
		json_object_set_new(up, "addresses", addrs);
	}
	/* the proxy gets the CA as a descriptor; it keeps only its origin */
	ca = json_string_value(json_object_get(up, "cafile"));
	json_object_set_new(up, "ca", json_string(ca ? ca : "system"));
	json_object_del(up, "cafile");
	c = json_pack("{s:s,s:s?,s:o,s:O,s:{s:i,s:i,s:i,s:i,s:i,s:i}}",
	    "service", key, "tenant", tenant,
	    "upstream", up,
	    "auth", json_object_get(resolved, "auth"),
	    "limits",
	    "connect_timeout", sup->st.connect_timeout,
	    "auth_timeout", sup->st.auth_timeout,
	    "idle_timeout", sup->st.idle_timeout,
	    "max_sessions", sup->st.max_sessions,
	    "max_line", sup->st.max_line,
	    "max_buffer", sup->st.max_buffer);
	return c;
}

static void
reject_cr(json_t *rejected, struct cr *cr, const char *reason, const char *m)
{
	char	msg[4096];

	snprintf(msg, sizeof(msg), "%s", m);
	utf8_clean(msg);
	json_array_append_new(rejected, json_pack("{s:s,s:s,s:s,s:s,s:s}",
	    "namespace", cr->cr_namespace, "cr", cr->cr_name, "reason", reason,
	    "error", msg, "source", cr->cr_source));
}

/*
 * Kubernetes: the Service names a CR implies live in the proxy's namespace
 * too, where two namespaces' CRs of one name would collide, and where (or
 * in the CR's namespace) a foreign Service may already have the name.
 */
static const char *
reconcile_k8s_name(struct cr *cr, const char *name, char *msg, size_t msgsz)
{
	struct service	*sv;

	TAILQ_FOREACH(sv, &sup->services, sv_entry)
		if (sv->sv_desired && !sv->sv_remove &&
		    strcmp(sv->sv_name, name) == 0 &&
		    strcmp(sv->sv_namespace, cr->cr_namespace) != 0) {
			snprintf(msg, msgsz, "a Destination CR named %s in "
			    "namespace %s already uses the service name %s",
			    sv->sv_cr, sv->sv_namespace, name);
			return "ConfigurationError-DuplicateDestinationCustomResource";
		}
	if (k8s_clash(sup->st.namespace, name) ||
	    k8s_clash(cr->cr_namespace, name)) {
		snprintf(msg, msgsz, "a Kubernetes Service named %s that tpmail "
		    "does not own already exists", name);
		return R_NAME_PRESENT;
	}
	return NULL;
}

static struct event	*reconcile_ev;

static void
reconcile_ev_cb(evutil_socket_t fd, short ev, void *arg)
{
	reconcile_all();
}

/* Reconcile soon, once, however many changes arrive meanwhile. */
void
reconcile_schedule(void)
{
	if (reconcile_ev == NULL)
		reconcile_ev = evtimer_new(sup->base, reconcile_ev_cb, NULL);
	if (!evtimer_pending(reconcile_ev, NULL))
		event_add(reconcile_ev, &(struct timeval){ 0, 50000 });
}

/* The CR's restart annotation changed: a graceful restart, once. */
static void
reconcile_restart(struct service *sv, struct cr *cr)
{
	if ((sv->sv_restart == NULL && cr->cr_restart == NULL) ||
	    (sv->sv_restart != NULL && cr->cr_restart != NULL &&
	    strcmp(sv->sv_restart, cr->cr_restart) == 0))
		return;
	free(sv->sv_restart);
	sv->sv_restart = cr->cr_restart ? strdup(cr->cr_restart) : NULL;
	if (cr->cr_restart == NULL)
		return;		/* removing the annotation restarts nothing */
	log_info("service %s: %s changed to %s: restarting", sv->sv_key,
	    TPMAIL_ANNOTATION_RESTART, cr->cr_restart);
	service_restart(sv, 0);
}

/* The Destination service instance of a CR: its own, or the default. */
static const char *
reconcile_instance(struct cr *cr)
{
	return cr->cr_instance ? cr->cr_instance : sup->st.default_instance;
}

/*
 * A tenant's destination: from the destinations file, else from the
 * Destination service when the CR's instance has a service key.
 * 1 with *resolved, 0 while the first lookup runs, -1 with reason and msg.
 */
static int
reconcile_lookup(struct cr *cr, const char *tenant, json_t **resolved,
    const char **stale, const char **reason, char *msg, size_t msgsz)
{
	const char	*instance = reconcile_instance(cr);
	json_t		*d, *res, *tokens, *certs;
	struct destref	 ref = { cr->cr_dest, cr->cr_level, cr->cr_fragment,
			    cr->cr_fragment_optional };
	int		 r;

	if ((d = destination_find(sup->destinations, tenant, cr->cr_dest)) !=
	    NULL || instance == NULL || !destsvc_has_instance(instance)) {
		*resolved = destination_resolve(sup->destinations, tenant,
		    cr->cr_dest, cr->cr_fragment, cr->cr_fragment_optional,
		    &sup->st, reason, msg, msgsz);
		return *resolved ? 1 : -1;
	}
	r = destsvc_lookup(instance, tenant, &ref, &res, stale, reason, msg,
	    msgsz);
	if (r != 1)
		return r;
	tokens = json_object_get(res, "authTokens");
	if (tokens == NULL)
		tokens = json_array();
	else
		json_incref(tokens);
	if ((certs = json_object_get(res, "certificates")) == NULL)
		certs = json_array();
	else
		json_incref(certs);
	*resolved = destination_translate(json_object_get(res,
	    "destinationConfiguration"), tokens, certs, &sup->st, reason, msg,
	    msgsz);
	json_decref(tokens);
	json_decref(certs);
	if (*resolved == NULL)
		return -1;
	json_object_set_new(*resolved, "from_service", json_true());
	return 1;
}

/* The tenant services of one CR; returns how many were applied. */
static void
reconcile_cr(struct cr *cr, json_t *rejected)
{
	struct service	*sv;
	json_t		*resolved, *config, *failed = json_array();
	const char	*tenant, *reason = NULL, *ca, *stale;
	int		 r;
	char		 name[300], key[600], msg[1024], all[4096];
	size_t		 i, n = cr->cr_tenants ? json_array_size(cr->cr_tenants) : 1;
	int		 nfailed = 0;

	all[0] = '\0';
	for (i = 0; i < n; i++) {
		tenant = cr->cr_tenants ?
		    json_string_value(json_array_get(cr->cr_tenants, i)) : NULL;
		snprintf(name, sizeof(name), "%s%s%s", cr->cr_name,
		    tenant ? "-" : "", tenant ? tenant : "");
		snprintf(key, sizeof(key), "%s/%s", cr->cr_namespace, name);
		if ((sv = service_find(key)) != NULL && sv->sv_desired &&
		    strcmp(sv->sv_cr, cr->cr_name) != 0) {
			snprintf(msg, sizeof(msg), "service %s is already created "
			    "for CR %s", key, sv->sv_cr);
			reason = R_NAME_PRESENT;
			goto tenant_failed;
		}
		if (sup->st.kubernetes && (reason = reconcile_k8s_name(cr, name,
		    msg, sizeof(msg))) != NULL)
			goto tenant_failed;
		stale = NULL;
		resolved = NULL;
		r = reconcile_lookup(cr, tenant ? tenant : TPMAIL_PROVIDER_TENANT,
		    &resolved, &stale, &reason, msg, sizeof(msg));
		if (r == 0 || (r == -1 && sv != NULL && sv->sv_config != NULL &&
		    sv->sv_instance != NULL && reason != NULL &&
		    strcmp(reason, R_CONFIG_FAILED) == 0)) {
			/* being fetched, or failing: keep what serves now */
			if (sv != NULL && sv->sv_config != NULL) {
				sv->sv_desired = 1;
				if (r == -1)
					service_note_error(sv, msg);
			}
			if (r == 0)
				continue;
			goto tenant_failed;
		}
		if (r == -1)
			goto tenant_failed;
		if (reconcile_trust_file(resolved, msg, sizeof(msg)) == -1) {
			json_decref(resolved);
			reason = R_CONFIG_FAILED;
			goto tenant_failed;
		}
		if ((config = reconcile_config(key, tenant, resolved, msg,
		    sizeof(msg))) == NULL) {
			json_decref(resolved);
			reason = R_CONFIG_FAILED;
			if (sv != NULL && sv->sv_config != NULL) {
				/* keep serving with the last good addresses */
				sv->sv_desired = 1;
				log_warnx("service %s: %s; keeping its last "
				    "configuration", key, msg);
			}
			goto tenant_failed;
		}
		ca = json_string_value(json_object_get(json_object_get(resolved,
		    "upstream"), "cafile"));
		if (ca == NULL && strcmp(json_string_value(json_object_get(
		    json_object_get(resolved, "upstream"), "tls")), "none") != 0)
			ca = sup->st.system_ca;
		if (strcmp(json_string_value(json_object_get(json_object_get(
		    resolved, "upstream"), "tls")), "none") == 0)
			ca = NULL;
		if (sv == NULL)
			sv = service_new(cr->cr_namespace, name, cr->cr_name, tenant);
		sv->sv_desired = 1;
		if (strcmp(sv->sv_cr, cr->cr_name) != 0) {
			free(sv->sv_cr);
			sv->sv_cr = strdup(cr->cr_name);
		}
		/* where a client's token is exchanged, if it comes to that */
		free(sv->sv_instance);
		free(sv->sv_dest);
		free(sv->sv_level);
		free(sv->sv_fragment);
		sv->sv_instance = json_is_true(json_object_get(resolved,
		    "from_service")) ? strdup(reconcile_instance(cr)) : NULL;
		sv->sv_dest = strdup(cr->cr_dest);
		sv->sv_level = cr->cr_level ? strdup(cr->cr_level) : NULL;
		sv->sv_fragment = cr->cr_fragment ? strdup(cr->cr_fragment) : NULL;
		sv->sv_fragment_optional = cr->cr_fragment_optional;
		if (stale != NULL)
			service_note_error(sv, stale);
		sv->sv_svc_port = cr->cr_port ? cr->cr_port : (int)json_integer_value(
		    json_object_get(resolved, "default_port"));
		if (sv->sv_config == NULL) {
			sv->sv_config = config;
			sv->sv_ca = ca ? strdup(ca) : NULL;
			sv->sv_restart = cr->cr_restart ? strdup(cr->cr_restart) :
			    NULL;
			service_start(sv);
		} else {
			service_update(sv, config, ca);
			reconcile_restart(sv, cr);
		}
		json_decref(resolved);
		continue;
tenant_failed:
		nfailed++;
		sup->destination_errors++;
		json_array_append_new(failed, json_string(tenant ? tenant :
		    TPMAIL_PROVIDER_TENANT));
		snprintf(all + strlen(all), sizeof(all) - strlen(all), "%s%s",
		    all[0] ? "; " : "", msg);
	}
	if (nfailed > 0) {
		if (cr->cr_tenants == NULL)
			reject_cr(rejected, cr, reason, msg);
		else {
			char	*list = json_dumps(failed, JSON_COMPACT), *m;

			if (asprintf(&m, "Configuration failed for tenants: %s: %s",
			    list ? list : "", all) == -1)
				fatal("asprintf");
			free(list);
			reject_cr(rejected, cr, R_FAILED_TENANTS, m);
			free(m);
		}
	}
	json_decref(failed);
}

/* Log each rejection once, when it appears, not on every pass. */
static void
reconcile_log_rejected(json_t *old, json_t *now)
{
	json_t	*r, *o;
	size_t	 i, j;
	int	 seen;

	json_array_foreach(now, i, r) {
		seen = 0;
		json_array_foreach(old, j, o)
			if (json_equal(r, o))
				seen = 1;
		if (!seen)
			log_warnx("CR %s/%s (%s) rejected: reason=%s: %s",
			    json_string_value(json_object_get(r, "namespace")) ?
			    json_string_value(json_object_get(r, "namespace")) : "?",
			    json_string_value(json_object_get(r, "cr")) ?
			    json_string_value(json_object_get(r, "cr")) : "?",
			    json_string_value(json_object_get(r, "source")),
			    json_string_value(json_object_get(r, "reason")),
			    json_string_value(json_object_get(r, "error")));
	}
}

void
reconcile_all(void)
{
	struct service	*sv, *next;
	struct cr	**crs;
	json_t		*rejected, *dests;
	char		 err[512];
	size_t		 n, i;

	if (sup->stopping)
		return;
	rejected = json_array();
	dests = sup->st.destinations == NULL ? json_object() :
	    destinations_load(sup->st.destinations, err, sizeof(err));
	if (dests == NULL) {
		sup->destination_errors++;
		log_warnx("destinations file %s: %s%s", sup->st.destinations, err,
		    sup->destinations ? "; keeping the last good one" : "");
		if (sup->destinations == NULL)
			sup->destinations = json_object();
	} else {
		json_decref(sup->destinations);
		sup->destinations = dests;
	}
	crs = sup->st.kubernetes ? k8s_load_crs(&n, rejected) :
	    crdir_load(&n, rejected);
	TAILQ_FOREACH(sv, &sup->services, sv_entry)
		sv->sv_desired = 0;
	for (i = 0; i < n; i++)
		reconcile_cr(crs[i], rejected);
	TAILQ_FOREACH_SAFE(sv, &sup->services, sv_entry, next) {
		if (!sv->sv_desired && !sv->sv_remove)
			service_stop(sv);
	}
	for (i = 0; i < n; i++)
		cr_free(crs[i]);
	free(crs);
	reconcile_trust_gc();
	reconcile_log_rejected(sup->rejected, rejected);
	json_decref(sup->rejected);
	sup->rejected = rejected;
	sup->reconciles++;
	sup->synced = !sup->st.kubernetes || k8s_synced();
	if (sup->st.kubernetes)
		k8s_after_reconcile();
	log_debug("reconciled: %zu CRs, %zu rejected", n,
	    json_array_size(rejected));
}
