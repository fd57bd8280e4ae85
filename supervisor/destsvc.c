/*
 * destsvc.c: the SAP Destination service and the connectivity service as
 * tpmaild's control planes.  Per (instance, tenant) an OAuth2
 * client-credentials token from the tenant's token endpoint (the service
 * key's url with its first host label replaced by the tenant subdomain),
 * refreshed before it expires; per (instance, tenant, destination) the
 * find-destination result, cached (SAP: 2 minutes), re-polled every
 * --poll-interval seconds bypassing the cache, and kept while the service
 * fails, with a backoff.  Lookups never block: a missing entry is fetched in
 * the background and the reconcile runs again when it arrives.  Runs in the
 * supervisor; every buffer that held a secret is wiped.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/queue.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "log.h"
#include "secret.h"
#include "supervisor.h"
#include "yaml_json.h"

#define DSVC_TIMEOUT		10	/* seconds per HTTP request */
#define DSVC_CACHE_TTL		120	/* SAP's destination cache */
#define DSVC_TOKEN_MARGIN	60	/* refresh this long before expiry */
#define DSVC_BACKOFF_MAX	60
#define DSVC_FORGET		600	/* an entry no CR asked for is dropped */

enum entry_state { ENTRY_IDLE, ENTRY_WAIT_TOKEN, ENTRY_FETCHING };

/* An OAuth2 token for (instance or "connectivity", tenant). */
struct token {
	TAILQ_ENTRY(token)	 tk_entry;
	char			*tk_key;	/* "instance\ntenant" */
	char			*tk_instance;	/* NULL: the connectivity service */
	char			*tk_tenant;
	char			*tk_value;	/* secret */
	time_t			 tk_expires;
	time_t			 tk_fetched_at;
	int			 tk_fetching;
	char			*tk_error;
	int			 tk_failures;
	time_t			 tk_next_try;
};

/* A find-destination result for (instance, tenant, name). */
struct dentry {
	TAILQ_ENTRY(dentry)	 de_entry;
	char			*de_instance;
	char			*de_tenant;
	char			*de_name;
	char			*de_level;	/* destinationRef.level, or NULL */
	char			*de_fragment;	/* fragmentRef.name, or NULL */
	int			 de_fragment_optional;
	json_t			*de_result;	/* last good; secrets inside */
	time_t			 de_fetched;
	time_t			 de_token_expires; /* of its authTokens, or 0 */
	time_t			 de_token_life;
	char			*de_error;	/* last failure, or NULL */
	const char		*de_reason;
	enum entry_state	 de_state;
	int			 de_failures;
	time_t			 de_next_try;
	time_t			 de_wanted_at;	/* last asked for by a reconcile, */
	unsigned long		 de_wanted_pass; /* and which one */
};

/* A client's refresh token or code on its way to an access token. */
struct exchange {
	struct dentry		 ex_dest;	/* names only */
	char			*ex_kind;
	char			*ex_value;	/* secret */
	destsvc_exchange_cb	 ex_cb;
	void			*ex_arg;
};

static TAILQ_HEAD(, token)	tokens = TAILQ_HEAD_INITIALIZER(tokens);
static TAILQ_HEAD(, dentry)	dentries = TAILQ_HEAD_INITIALIZER(dentries);
static struct event		*tick, *kick;

static void	dsvc_fetch(struct dentry *);
static void	token_fetch(struct token *);

static void
set_str(char **dst, const char *fmt, ...)
{
	char	buf[1024];
	va_list	ap;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	free(*dst);
	*dst = strdup(buf);
}

/* Something changed that the tenant services depend on: reconcile soon. */
static void
dsvc_changed(void)
{
	/* a reply may land after destsvc_stop, while tpmaild shuts down */
	if (kick != NULL)
		event_active(kick, EV_TIMEOUT, 0);
}

static void
kick_cb(evutil_socket_t fd, short ev, void *arg)
{
	reconcile_all();
}

/* The service key of an instance: DIR/<name> or DIR/<name>.json. */
static json_t *
dsvc_key(const char *instance, const char *file, char *err, size_t errsz)
{
	char	*path, *buf;
	size_t	 len;
	json_t	*key;
	json_error_t jerr;

	if (file != NULL)
		path = strdup(file);
	else {
		if (sup->st.service_keys == NULL || instance == NULL ||
		    strchr(instance, '/') != NULL || instance[0] == '.') {
			snprintf(err, errsz, "no service key for instance %s",
			    instance ? instance : "(none)");
			return NULL;
		}
		if (asprintf(&path, "%s/%s", sup->st.service_keys, instance) == -1)
			return NULL;
		if (access(path, R_OK) == -1) {
			free(path);
			if (asprintf(&path, "%s/%s.json", sup->st.service_keys,
			    instance) == -1)
				return NULL;
		}
	}
	buf = yaml_json_read_file(path, &len, err, errsz);
	free(path);
	if (buf == NULL)
		return NULL;
	key = json_loadb(buf, len, 0, &jerr);
	secret_free(buf);
	if (key == NULL || !json_is_object(key)) {
		snprintf(err, errsz, "service key for %s is not a JSON object",
		    instance ? instance : "the connectivity service");
		json_decref(key);
		return NULL;
	}
	return key;
}

/* Whether a Destination service instance is configured at all. */
int
destsvc_has_instance(const char *instance)
{
	char	err[256];
	json_t	*k = dsvc_key(instance, NULL, err, sizeof(err));

	json_decref(k);
	return k != NULL;
}

/* The service key's url with its first host label replaced by the tenant. */
static char *
tenant_url(const char *url, const char *tenant)
{
	const char	*host, *dot, *end;
	char		*out;

	if (tenant == NULL || strcmp(tenant, TPMAIL_PROVIDER_TENANT) == 0)
		return strdup(url);
	if ((host = strstr(url, "://")) == NULL)
		return NULL;
	host += 3;
	end = host + strcspn(host, ":/");
	dot = memchr(host, '.', end - host);
	if (dot == NULL)
		return NULL;
	if (asprintf(&out, "%.*s%s%s", (int)(host - url), url, tenant, dot) == -1)
		return NULL;
	return out;
}

static struct token *
token_get(const char *instance, const char *tenant)
{
	struct token	*t;
	char		*key;

	if (asprintf(&key, "%s\n%s", instance ? instance : "", tenant) == -1)
		fatal("asprintf");
	TAILQ_FOREACH(t, &tokens, tk_entry)
		if (strcmp(t->tk_key, key) == 0) {
			free(key);
			return t;
		}
	if ((t = calloc(1, sizeof(*t))) == NULL)
		fatal("calloc");
	t->tk_key = key;
	t->tk_instance = instance ? strdup(instance) : NULL;
	t->tk_tenant = strdup(tenant);
	TAILQ_INSERT_TAIL(&tokens, t, tk_entry);
	return t;
}

static int
token_valid(struct token *t)
{
	return t->tk_value != NULL && time(NULL) < t->tk_expires;
}

static void
token_failed(struct token *t, const char *fmt, ...)
{
	char		 buf[512];
	va_list		 ap;
	struct dentry	*d;
	int		 delay;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	t->tk_fetching = 0;
	t->tk_failures++;
	delay = 1 << (t->tk_failures < 6 ? t->tk_failures : 6);
	t->tk_next_try = time(NULL) + (delay > DSVC_BACKOFF_MAX ?
	    DSVC_BACKOFF_MAX : delay);
	if (t->tk_error == NULL || strcmp(t->tk_error, buf) != 0)
		log_warnx("token for %s tenant %s: %s", t->tk_instance ?
		    t->tk_instance : "the connectivity service", t->tk_tenant, buf);
	set_str(&t->tk_error, "%s", buf);
	sup->destination_errors++;
	/* destinations waiting for it fail too, keeping what they had */
	TAILQ_FOREACH(d, &dentries, de_entry) {
		if (d->de_state != ENTRY_WAIT_TOKEN || t->tk_instance == NULL ||
		    strcmp(d->de_instance, t->tk_instance) ||
		    strcmp(d->de_tenant, t->tk_tenant))
			continue;
		d->de_state = ENTRY_IDLE;
		d->de_failures++;
		d->de_next_try = t->tk_next_try;
		set_str(&d->de_error, "Destination service token: %s", buf);
		d->de_reason = "ConfigurationFailed";
	}
	dsvc_changed();
}

static void
token_done(long status, const char *body, size_t len, const char *err,
    void *arg)
{
	struct token	*t = arg;
	struct dentry	*d;
	json_error_t	 jerr;
	json_t		*j;
	const char	*at;
	json_int_t	 exp;

	if (err != NULL) {
		token_failed(t, "token endpoint: %s", err);
		return;
	}
	if (status != 200) {
		token_failed(t, "token endpoint answered HTTP %ld", status);
		return;
	}
	j = json_loadb(body, len, 0, &jerr);
	at = json_string_value(json_object_get(j, "access_token"));
	if (at == NULL || at[0] == '\0') {
		json_decref(j);
		token_failed(t, "token endpoint: no access_token in the reply");
		return;
	}
	exp = json_integer_value(json_object_get(j, "expires_in"));
	if (exp <= 0 && json_is_string(json_object_get(j, "expires_in")))
		exp = strtoll(json_string_value(json_object_get(j,
		    "expires_in")), NULL, 10);
	if (exp <= 0)
		exp = 3600;
	secret_free(t->tk_value);
	t->tk_value = strdup(at);
	t->tk_fetched_at = time(NULL);
	t->tk_expires = t->tk_fetched_at + exp;
	t->tk_fetching = 0;
	t->tk_failures = 0;
	free(t->tk_error);
	t->tk_error = NULL;
	json_decref(j);
	log_debug("token for %s tenant %s: valid for %lld s", t->tk_instance ?
	    t->tk_instance : "the connectivity service", t->tk_tenant,
	    (long long)exp);
	if (t->tk_instance == NULL)
		dsvc_changed();		/* a new connectivity token for the proxies */
	TAILQ_FOREACH(d, &dentries, de_entry)
		if (d->de_state == ENTRY_WAIT_TOKEN && strcmp(d->de_instance,
		    t->tk_instance ? t->tk_instance : "") == 0 &&
		    strcmp(d->de_tenant, t->tk_tenant) == 0)
			dsvc_fetch(d);
}

/* POST <url>/oauth/token at the tenant's subdomain, client credentials. */
static void
token_fetch(struct token *t)
{
	json_t		*key;
	const char	*id, *secret, *url, *cert, *pkey, *certurl;
	char		 err[256], *turl = NULL, *full = NULL, *eid = NULL, *body = NULL;
	static const char *const hdrs[] = {
		"Content-Type: application/x-www-form-urlencoded",
		"Accept: application/json", NULL,
	};

	if (t->tk_fetching)
		return;
	key = dsvc_key(t->tk_instance, t->tk_instance ? NULL :
	    sup->st.connectivity_key, err, sizeof(err));
	if (key == NULL) {
		token_failed(t, "%s", err);
		return;
	}
	id = json_string_value(json_object_get(key, "clientid"));
	secret = json_string_value(json_object_get(key, "clientsecret"));
	cert = json_string_value(json_object_get(key, "certificate"));
	pkey = json_string_value(json_object_get(key, "key"));
	certurl = json_string_value(json_object_get(key, "certurl"));
	url = json_string_value(json_object_get(key, "token_service_url"));
	if (url == NULL)
		url = json_string_value(json_object_get(key, "url"));
	if (cert != NULL && pkey != NULL && certurl != NULL)
		url = certurl;		/* x.509 service key: mTLS, no secret */
	if (id == NULL || url == NULL || (secret == NULL && cert == NULL)) {
		json_decref(key);
		token_failed(t, "service key lacks clientid, url or clientsecret");
		return;
	}
	if ((turl = tenant_url(url, t->tk_tenant)) == NULL ||
	    asprintf(&full, "%s%soauth/token", turl,
	    turl[strlen(turl) - 1] == '/' ? "" : "/") == -1 ||
	    (eid = httpc_escape(id)) == NULL ||
	    asprintf(&body, "grant_type=client_credentials&client_id=%s", eid) ==
	    -1) {
		free(turl);
		free(full);
		secret_free(eid);
		json_decref(key);
		token_failed(t, "cannot build the token URL for tenant %s from %s",
		    t->tk_tenant, url);
		return;
	}
	t->tk_fetching = 1;
	if (httpc_request(full, hdrs, body, cert ? NULL : id, cert ? NULL : secret,
	    cert, pkey, DSVC_TIMEOUT, token_done, t) == -1) {
		t->tk_fetching = 0;
		token_failed(t, "cannot start the token request");
	}
	free(turl);
	free(full);
	secret_free(eid);
	secret_free(body);
	json_decref(key);	/* the allocator wipes the client secret */
}

/* strcmp for strings that may be absent. */
static int
opt_equal(const char *a, const char *b)
{
	return (a == NULL && b == NULL) ||
	    (a != NULL && b != NULL && strcmp(a, b) == 0);
}

/* What names an entry: for a polled one, and for an exchange's request. */
static void
dentry_set_names(struct dentry *d, const char *instance, const char *tenant,
    const struct destref *ref)
{
	d->de_instance = strdup(instance);
	d->de_tenant = strdup(tenant);
	d->de_name = strdup(ref->name);
	d->de_level = ref->level ? strdup(ref->level) : NULL;
	d->de_fragment = ref->fragment ? strdup(ref->fragment) : NULL;
	d->de_fragment_optional = ref->fragment_optional;
}

static void
dentry_free_names(struct dentry *d)
{
	free(d->de_instance);
	free(d->de_tenant);
	free(d->de_name);
	free(d->de_level);
	free(d->de_fragment);
}

static struct dentry *
dentry_get(const char *instance, const char *tenant, const struct destref *ref)
{
	struct dentry	*d;

	TAILQ_FOREACH(d, &dentries, de_entry)
		if (strcmp(d->de_instance, instance) == 0 &&
		    strcmp(d->de_tenant, tenant) == 0 &&
		    strcmp(d->de_name, ref->name) == 0 &&
		    opt_equal(d->de_level, ref->level) &&
		    opt_equal(d->de_fragment, ref->fragment) &&
		    d->de_fragment_optional == ref->fragment_optional)
			return d;
	if ((d = calloc(1, sizeof(*d))) == NULL)
		fatal("calloc");
	dentry_set_names(d, instance, tenant, ref);
	d->de_wanted_at = time(NULL);
	TAILQ_INSERT_TAIL(&dentries, d, de_entry);
	return d;
}

/*
 * An entry that two whole reconciles and DSVC_FORGET seconds passed without
 * asking for: its CR changed (name, level, fragment) or went away.  Time
 * alone would not do (a quiet system reconciles only when something
 * changes); passes alone would drop one a CR skipped once.  Not while its
 * request is out: the request's callback holds it.
 */
static void
dentry_forget(struct dentry *d)
{
	log_debug("destination %s (instance %s, tenant %s): no longer used",
	    d->de_name, d->de_instance, d->de_tenant);
	TAILQ_REMOVE(&dentries, d, de_entry);
	dentry_free_names(d);
	json_decref(d->de_result);	/* the allocator wipes its secrets */
	free(d->de_error);
	free(d);
}

/*
 * Does a 404's body blame the fragment?  The service answers 404 for a
 * missing destination and for a missing fragment alike; only its message
 * tells them apart.
 */
static int
blames_fragment(const char *body, size_t len)
{
	char	buf[1024];

	if (body == NULL)
		return 0;
	snprintf(buf, sizeof(buf), "%.*s", (int)(len < sizeof(buf) - 1 ? len :
	    sizeof(buf) - 1), body);
	return strcasestr(buf, "fragment") != NULL;
}

static void
dentry_failed(struct dentry *d, const char *reason, const char *fmt, ...)
{
	char	buf[512];
	va_list	ap;
	int	delay;

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	d->de_state = ENTRY_IDLE;
	d->de_failures++;
	delay = 1 << (d->de_failures < 6 ? d->de_failures : 6);
	d->de_next_try = time(NULL) + (delay > DSVC_BACKOFF_MAX ?
	    DSVC_BACKOFF_MAX : delay);
	if (d->de_error == NULL || strcmp(d->de_error, buf) != 0) {
		log_warnx("destination %s (instance %s, tenant %s): %s%s",
		    d->de_name, d->de_instance, d->de_tenant, buf, d->de_result ?
		    "; keeping the last good configuration" : "");
		set_str(&d->de_error, "%s", buf);
		dsvc_changed();
	}
	d->de_reason = reason;
	sup->destination_errors++;
}

/* Seconds until the destination's own auth token expires, or 0. */
static time_t
auth_token_expiry(json_t *res)
{
	json_t	*t = json_array_get(json_object_get(res, "authTokens"), 0);
	json_t	*e = json_object_get(t, "expires_in");
	long	 v = 0;

	if (json_is_integer(e))
		v = json_integer_value(e);
	else if (json_is_string(e))
		v = strtol(json_string_value(e), NULL, 10);
	return v > 0 ? time(NULL) + v : 0;
}

static void
dest_done(long status, const char *body, size_t len, const char *err,
    void *arg)
{
	struct dentry	*d = arg;
	struct token	*t;
	json_t		*res;
	char		 perr[128];
	int		 changed;

	if (err != NULL) {
		dentry_failed(d, "ConfigurationFailed", "Destination service: %s",
		    err);
		return;
	}
	if (status == 401 || status == 403) {
		/* the token may have been revoked: fetch a new one next time */
		t = token_get(d->de_instance, d->de_tenant);
		t->tk_expires = 0;
		dentry_failed(d, "ConfigurationFailed", "Destination service "
		    "answered HTTP %ld (not authorised)", status);
		return;
	}
	if (status == 404 && d->de_fragment != NULL &&
	    !d->de_fragment_optional && blames_fragment(body, len)) {
		json_decref(d->de_result);
		d->de_result = NULL;
		dentry_failed(d, "ConfigurationError-ReferencedFragment-NotFound",
		    "Technical connectivity is not configured. Fragment \"%s\" "
		    "of destination \"%s\" not found in instance %s for tenant "
		    "\"%s\"", d->de_fragment, d->de_name, d->de_instance,
		    d->de_tenant);
		return;
	}
	if (status == 404) {
		/* an answer, not an outage: the destination is gone */
		json_decref(d->de_result);
		d->de_result = NULL;
		dentry_failed(d, "ConfigurationError-ReferencedDestination-NotFound",
		    "Technical connectivity is not configured. Destination \"%s\" "
		    "not found in instance %s for tenant \"%s\"", d->de_name,
		    d->de_instance, d->de_tenant);
		return;
	}
	if (status != 200) {
		dentry_failed(d, "ConfigurationFailed", "Destination service "
		    "answered HTTP %ld", status);
		return;
	}
	if ((res = destination_reply_parse(body, len, perr, sizeof(perr))) ==
	    NULL) {
		/* nonsense from the service is an outage, not a new truth */
		dentry_failed(d, "ConfigurationFailed", "Destination service: %s",
		    perr);
		return;
	}
	changed = d->de_result == NULL || !json_equal(d->de_result, res) ||
	    d->de_error != NULL;
	json_decref(d->de_result);
	d->de_result = res;
	d->de_fetched = time(NULL);
	d->de_token_expires = auth_token_expiry(res);
	d->de_token_life = d->de_token_expires ? d->de_token_expires -
	    time(NULL) : 0;
	d->de_state = ENTRY_IDLE;
	d->de_failures = 0;
	free(d->de_error);
	d->de_error = NULL;
	if (changed) {
		log_info("destination %s (instance %s, tenant %s) %s",
		    d->de_name, d->de_instance, d->de_tenant,
		    "fetched from the Destination service");
		dsvc_changed();
	}
}

/*
 * GET <uri>/destination-configuration/v1/destinations/<name>, or with a
 * level the Consume API's v2/destinations/<name>@<level> (that level only,
 * no fallback); a fragment goes in X-Fragment-Name and X-Fragment-Optional.
 */
static int
dest_request(struct dentry *d, struct token *t, const char *extra,
    httpc_cb cb, void *arg, char *err, size_t errsz)
{
	json_t		*key;
	const char	*uri;
	char		*url = NULL, *auth = NULL, *ename = NULL, *frag = NULL;
	const char	*hdrs[6];
	int		 r = -1, n = 0;

	if ((key = dsvc_key(d->de_instance, NULL, err, errsz)) == NULL)
		return -1;
	if ((uri = json_string_value(json_object_get(key, "uri"))) == NULL) {
		snprintf(err, errsz, "service key of %s has no uri",
		    d->de_instance);
		json_decref(key);
		return -1;
	}
	if ((ename = httpc_escape(d->de_name)) != NULL &&
	    asprintf(&url, "%s%sdestination-configuration/%s/destinations/%s%s%s",
	    uri, uri[strlen(uri) - 1] == '/' ? "" : "/", d->de_level ? "v2" :
	    "v1", ename, d->de_level ? "@" : "", d->de_level ? d->de_level :
	    "") != -1 &&
	    asprintf(&auth, "Authorization: Bearer %s", t->tk_value) != -1 &&
	    (d->de_fragment == NULL || asprintf(&frag, "X-Fragment-Name: %s",
	    d->de_fragment) != -1)) {
		hdrs[n++] = auth;
		hdrs[n++] = "Accept: application/json";
		if (frag != NULL) {
			hdrs[n++] = frag;
			hdrs[n++] = d->de_fragment_optional ?
			    "X-Fragment-Optional: true" :
			    "X-Fragment-Optional: false";
		}
		hdrs[n++] = extra;
		hdrs[n] = NULL;
		r = httpc_request(url, hdrs, NULL, NULL, NULL, NULL, NULL,
		    DSVC_TIMEOUT, cb, arg);
		if (r == -1)
			snprintf(err, errsz, "cannot start the request");
	} else
		snprintf(err, errsz, "out of memory");
	free(url);
	free(frag);
	secret_free(auth);
	secret_free(ename);
	json_decref(key);
	return r;
}

static void
dsvc_fetch(struct dentry *d)
{
	struct token	*t = token_get(d->de_instance, d->de_tenant);
	char		 err[512];

	if (!token_valid(t)) {
		d->de_state = ENTRY_WAIT_TOKEN;
		if (time(NULL) >= t->tk_next_try)
			token_fetch(t);
		else if (!t->tk_fetching) {
			d->de_state = ENTRY_IDLE;
			d->de_next_try = t->tk_next_try;
		}
		return;
	}
	d->de_state = ENTRY_FETCHING;
	if (dest_request(d, t, NULL, dest_done, d, err, sizeof(err)) == -1)
		dentry_failed(d, "ConfigurationFailed", "%s", err);
}

/*
 * The reconcile's question: the destination from the Destination service.
 * 1 with *res (borrowed) — possibly the last good one while the service
 * fails (then *stale holds the failure); 0 while the first fetch runs;
 * -1 with reason and message.
 */
int
destsvc_lookup(const char *instance, const char *tenant,
    const struct destref *ref, json_t **res, const char **stale,
    const char **reason, char *msg, size_t msgsz)
{
	struct dentry	*d = dentry_get(instance, tenant, ref);
	time_t		 now = time(NULL);

	d->de_wanted_at = time(NULL);
	d->de_wanted_pass = sup->reconciles;
	*stale = NULL;
	/* a reconcile may ask anew once the cache is older than SAP's 2 min */
	if (d->de_state == ENTRY_IDLE && now >= d->de_next_try &&
	    (d->de_result == NULL || now - d->de_fetched >= DSVC_CACHE_TTL))
		dsvc_fetch(d);
	if (d->de_result != NULL) {
		*res = d->de_result;
		*stale = d->de_error;
		return 1;
	}
	if (d->de_error != NULL) {
		*reason = d->de_reason ? d->de_reason : "ConfigurationFailed";
		snprintf(msg, msgsz, "%s", d->de_error);
		return -1;
	}
	snprintf(msg, msgsz, "looking destination %s up in the Destination "
	    "service", ref->name);
	return 0;
}

/* The connectivity proxy's token for a tenant: 1, 0 while fetched, -1. */
int
destsvc_connectivity_token(const char *tenant, const char **jwt, char *msg,
    size_t msgsz)
{
	struct token	*t = token_get(NULL, tenant);

	if (token_valid(t)) {
		*jwt = t->tk_value;
		return 1;
	}
	if (!t->tk_fetching && time(NULL) >= t->tk_next_try)
		token_fetch(t);
	if (t->tk_error != NULL) {
		snprintf(msg, msgsz, "connectivity service token: %s", t->tk_error);
		return -1;
	}
	snprintf(msg, msgsz, "fetching the connectivity service token");
	return 0;
}

static void
exchange_free(struct exchange *x)
{
	dentry_free_names(&x->ex_dest);
	free(x->ex_kind);
	secret_free(x->ex_value);
	free(x);
}

static void
exchange_done(long status, const char *body, size_t len, const char *err,
    void *arg)
{
	struct exchange	*x = arg;
	json_error_t	 jerr;
	json_t		*j = NULL, *t;
	const char	*v = NULL, *e = NULL;

	if (err != NULL)
		e = "the Destination service cannot be reached";
	else if (status >= 500 || status == 401 || status == 403)
		e = "the Destination service is failing; try again later";
	else if (status != 200)
		e = "the Destination service refused the exchange";
	else {
		j = json_loadb(body, len, 0, &jerr);
		t = json_array_get(json_object_get(j, "authTokens"), 0);
		v = json_string_value(json_object_get(t, "value"));
		if (v == NULL || v[0] == '\0') {
			v = NULL;
			e = "the token was not accepted";
		}
	}
	/* the service failing is temporary; only a refused token is final */
	x->ex_cb(v, e, err != NULL || status >= 500 || status == 0 ||
	    status == 401 || status == 403, x->ex_arg);
	json_decref(j);
	exchange_free(x);
}

/*
 * OAuth2RefreshToken / OAuth2AuthorizationCode: find-destination with the
 * client's refresh token (X-refresh-token) or code (X-code); the access
 * token comes back in authTokens.  cb runs once, later.
 */
void
destsvc_exchange(const char *instance, const char *tenant,
    const struct destref *ref, const char *kind, const char *value,
    destsvc_exchange_cb cb, void *arg)
{
	struct exchange	*x;
	struct token	*t = token_get(instance, tenant);
	char		*hdr = NULL, err[512];

	if (!token_valid(t)) {
		if (!t->tk_fetching && time(NULL) >= t->tk_next_try)
			token_fetch(t);
		cb(NULL, "the Destination service is not ready, try again", 1, arg);
		return;
	}
	if ((x = calloc(1, sizeof(*x))) == NULL)
		fatal("calloc");
	dentry_set_names(&x->ex_dest, instance, tenant, ref);
	x->ex_kind = strdup(kind);
	x->ex_value = strdup(value);
	x->ex_cb = cb;
	x->ex_arg = arg;
	if (asprintf(&hdr, "%s: %s", strcmp(kind, "code") == 0 ? "X-code" :
	    "X-refresh-token", value) == -1 ||
	    dest_request(&x->ex_dest, t, hdr, exchange_done, x, err,
	    sizeof(err)) == -1) {
		cb(NULL, "the exchange could not be started", 1, arg);
		exchange_free(x);
	}
	secret_free(hdr);
}

/* Once a second: re-poll, refresh tokens before they expire, retry errors. */
static void
tick_cb(evutil_socket_t fd, short ev, void *arg)
{
	struct dentry	*d, *dn;
	struct token	*t;
	time_t		 now = time(NULL);
	int		 margin;

	TAILQ_FOREACH(t, &tokens, tk_entry) {
		if (t->tk_fetching || t->tk_value == NULL || now < t->tk_next_try)
			continue;
		/* refresh early: a minute, or a third of a short lifetime */
		margin = DSVC_TOKEN_MARGIN;
		if (t->tk_expires - t->tk_fetched_at < 3 * margin)
			margin = (t->tk_expires - t->tk_fetched_at) / 3;
		if (now >= t->tk_expires - margin)
			token_fetch(t);
	}
	TAILQ_FOREACH_SAFE(d, &dentries, de_entry, dn) {
		if (d->de_state != ENTRY_FETCHING &&
		    sup->reconciles >= d->de_wanted_pass + 3 &&
		    now - d->de_wanted_at > DSVC_FORGET) {
			dentry_forget(d);
			continue;
		}
		if (d->de_state != ENTRY_IDLE || now < d->de_next_try)
			continue;
		margin = DSVC_TOKEN_MARGIN;
		if (d->de_token_life < 3 * margin)
			margin = d->de_token_life / 3;
		if (now - d->de_fetched >= sup->st.poll_interval ||
		    (d->de_token_expires != 0 && now >= d->de_token_expires -
		    margin) || (d->de_error != NULL))
			dsvc_fetch(d);
	}
}

void
destsvc_start(void)
{
	tick = event_new(sup->base, -1, EV_PERSIST, tick_cb, NULL);
	kick = event_new(sup->base, -1, 0, kick_cb, NULL);
	event_add(tick, &(struct timeval){ 1, 0 });
}

void
destsvc_stop(void)
{
	if (tick != NULL)
		event_free(tick);
	if (kick != NULL)
		event_free(kick);
	tick = kick = NULL;
}
