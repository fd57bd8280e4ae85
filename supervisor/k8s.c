/*
 * k8s.c: tpmaild's Kubernetes mode.  Destination CRs are listed and watched
 * as client-go's reflector does it (paged list, watch from its
 * resourceVersion with bookmarks, re-list on 410 or an ERROR event, capped
 * backoff), and so are the Services tpmail owns (label
 * app.kubernetes.io/managed-by=tpmail).  One replica, elected with a
 * coordination.k8s.io/v1 Lease (client-go's algorithm), publishes: per
 * tenant service a Service in the proxy's namespace selecting the tpmail pods
 * (port -> the tenant's target port, allocated here and recorded by that
 * Service), an ExternalName Service of the same name in the CR's namespace
 * owned by the CR, the CR's status through its status subresource, and
 * Events.  Every replica serves every tenant service on the target ports
 * the Services record.  Runs in the supervisor; the service-account token is
 * re-read for every request, so its rotation is picked up.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>

#include "k8s_stream.h"
#include "log.h"
#include "secret.h"
#include "supervisor.h"
#include "yaml_json.h"

#define K8S_TIMEOUT		15
#define K8S_WATCH_TIMEOUT	300	/* server-side watch timeout, seconds */
#define K8S_BACKOFF_MAX		30
#define K8S_RETRY_PERIOD	2	/* client-go leader election */
#define K8S_RENEW_DEADLINE	10
#define K8S_LEASE_NAME		"tpmail-leader"
#define K8S_REPAIR_PERIOD	30	/* publish again even without changes */
#define LABEL_MANAGED		"app.kubernetes.io/managed-by"
#define LABEL_CR_NS		"tpmail.io/cr-namespace"
#define LABEL_CR_NAME		"tpmail.io/cr-name"
#define LABEL_TENANT		"tpmail.io/tenant"
#define CR_PATH			"/apis/destination.connectivity.api.sap/v1"

/* One list+watch of a kind of object, the way client-go's reflector does. */
struct k8s_watch {
	const char		*kw_what;
	char			*kw_path;	/* collection path */
	const char		*kw_selector;	/* labelSelector, or NULL */
	struct k8s_stream	 kw_st;		/* the objects, the version */
	json_t			*kw_pending;	/* list pages so far */
	struct httpc_req	*kw_req;
	struct event		*kw_retry;
	int			 kw_failures;
	int			 kw_synced;
};

static struct k8s_watch	 cr_watches[16];
static int		 ncr_watches;
static struct k8s_watch	 svc_watch;
static struct event	*lease_timer, *publish_ev, *repair_timer;
static int		 leader;
static time_t		 last_renew;
static char		*lease_rv;
static time_t		 lease_observed;
static json_t		*clashes;	/* "ns/name" of foreign Services in the way */
static json_t		*status_written; /* "ns/name" -> status we last wrote */
static json_t		*lease_record;
static json_t		*created_at;	/* "ns/name" -> when we last POSTed it */
static json_t		*prechecked;	/* "ns/name" -> "pending" | "free" */
static json_t		*deleting;	/* "ns/name" -> when we asked to delete it */

#define K8S_RECREATE_MIN	2	/* seconds between creates of one name */

static struct event	*publish_later, *names_retry;

/*
 * Whether to POST a Service now: not again within a few seconds, so that a
 * stale view (an owner that is already gone, a garbage collector deleting
 * what we create) cannot turn into a create loop.
 */
static int
create_allowed(const char *key)
{
	json_t	*t = json_object_get(created_at, key);
	time_t	 now = time(NULL);

	if (t != NULL && now - (time_t)json_integer_value(t) < K8S_RECREATE_MIN) {
		/* not now, but soon: a new CR of an old name must not wait */
		if (!evtimer_pending(publish_later, NULL))
			event_add(publish_later, &(struct timeval){
			    K8S_RECREATE_MIN, 0 });
		return 0;
	}
	json_object_set_new(created_at, key, json_integer(now));
	return 1;
}

static void	k8s_list(struct k8s_watch *);
static void	k8s_watch_start(struct k8s_watch *);
static void	k8s_schedule_publish(void);
static int	names_free(const char *, const char *);

int
k8s_is_leader(void)
{
	return leader;
}

int
k8s_synced(void)
{
	int	i;

	for (i = 0; i < ncr_watches; i++)
		if (!cr_watches[i].kw_synced)
			return 0;
	return svc_watch.kw_synced;
}

static char *
now_rfc3339(char *buf, size_t sz)
{
	time_t		t = time(NULL);
	struct tm	tm;

	gmtime_r(&t, &tm);
	strftime(buf, sz, "%Y-%m-%dT%H:%M:%SZ", &tm);
	return buf;
}

static char *
now_micro(char *buf, size_t sz)
{
	struct timespec	ts;
	struct tm	tm;
	char		b[32];

	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	strftime(b, sizeof(b), "%Y-%m-%dT%H:%M:%S", &tm);
	snprintf(buf, sz, "%s.%06ldZ", b, ts.tv_nsec / 1000);
	return buf;
}

/* One request to the API server, with the current service-account token. */
static struct httpc_req *
k8s_request(const char *method, const char *path, json_t *body,
    const char *ctype, httpc_line_cb line_cb, int timeout, httpc_cb cb,
    void *arg)
{
	struct httpc_opts	 o;
	struct httpc_req	*r;
	char			*url = NULL, *tok, *auth = NULL, *js = NULL;
	char			 ct[128], err[256];
	const char		*hdrs[4];
	size_t			 len;
	int			 n = 0;

	if (asprintf(&url, "%s%s", sup->st.kube_api, path) == -1)
		return NULL;
	hdrs[n++] = "Accept: application/json";
	if (sup->st.kube_token_file != NULL &&
	    (tok = yaml_json_read_file(sup->st.kube_token_file, &len, err,
	    sizeof(err))) != NULL) {
		while (len > 0 && (tok[len - 1] == '\n' || tok[len - 1] == '\r'))
			tok[--len] = '\0';
		if (asprintf(&auth, "Authorization: Bearer %s", tok) != -1)
			hdrs[n++] = auth;
		secret_free(tok);
	}
	if (body != NULL) {
		snprintf(ct, sizeof(ct), "Content-Type: %s",
		    ctype ? ctype : "application/json");
		hdrs[n++] = ct;
		js = json_dumps(body, JSON_COMPACT);
	}
	hdrs[n] = NULL;
	memset(&o, 0, sizeof(o));
	o.url = url;
	o.method = method;
	o.headers = hdrs;
	o.body = js;
	o.cafile = sup->st.kube_ca;
	o.timeout = timeout;
	o.line_cb = line_cb;
	r = httpc_start(&o, cb, arg);
	free(url);
	secret_free(auth);
	free(js);
	return r;
}

static const char *
meta_str(json_t *o, const char *k)
{
	return json_string_value(json_object_get(json_object_get(o, "metadata"),
	    k));
}

/* The same for text put into a path or a message: never NULL. */
static const char *
meta_text(json_t *o, const char *k)
{
	const char	*v = meta_str(o, k);

	return v != NULL ? v : "";
}

static void
watch_changed(struct k8s_watch *w)
{
	/* CRs feed the reconcile; Services only the publisher and ports */
	reconcile_schedule();
}

static void
watch_retry_cb(evutil_socket_t fd, short ev, void *arg)
{
	struct k8s_watch	*w = arg;

	if (w->kw_st.ks_rv == NULL)
		k8s_list(w);
	else
		k8s_watch_start(w);
}

static void
watch_backoff(struct k8s_watch *w, int relist, const char *why)
{
	int	delay;

	w->kw_req = NULL;
	if (relist)
		k8s_stream_forget_rv(&w->kw_st);
	w->kw_failures++;
	delay = 1 << (w->kw_failures < 5 ? w->kw_failures : 5);
	if (delay > K8S_BACKOFF_MAX)
		delay = K8S_BACKOFF_MAX;
	log_warnx("kubernetes %s: %s; retrying in %d s", w->kw_what, why, delay);
	sup->source_errors++;
	event_add(w->kw_retry, &(struct timeval){ delay, 0 });
}

static void
list_done(long status, const char *body, size_t len, const char *err,
    void *arg)
{
	struct k8s_watch	*w = arg;
	json_error_t		 jerr;
	json_t			*j, *items, *it;
	const char		*cont, *rv;
	char			 key[K8S_KEY_MAX];
	size_t			 i;

	w->kw_req = NULL;
	if (err != NULL || status != 200) {
		json_decref(w->kw_pending);
		w->kw_pending = NULL;
		if (err != NULL)
			watch_backoff(w, 1, err);
		else {
			char	why[64];

			snprintf(why, sizeof(why), "list answered HTTP %ld", status);
			watch_backoff(w, 1, why);
		}
		return;
	}
	j = json_loadb(body, len, 0, &jerr);
	items = json_object_get(j, "items");
	if (!json_is_array(items)) {
		json_decref(j);
		json_decref(w->kw_pending);
		w->kw_pending = NULL;
		watch_backoff(w, 1, "malformed list");
		return;
	}
	if (w->kw_pending == NULL)
		w->kw_pending = json_object();
	json_array_foreach(items, i, it) {
		/* as in the watch: nothing without a namespace and a name */
		if (k8s_object_key(it, key, sizeof(key)) == 0)
			json_object_set(w->kw_pending, key, it);
	}
	cont = json_string_value(json_object_get(json_object_get(j, "metadata"),
	    "continue"));
	rv = json_string_value(json_object_get(json_object_get(j, "metadata"),
	    "resourceVersion"));
	if (cont != NULL && cont[0] != '\0') {
		char	*path, *sel = NULL;

		if (w->kw_selector != NULL)
			sel = httpc_escape(w->kw_selector);
		if (asprintf(&path, "%s?limit=500&continue=%s%s%s", w->kw_path,
		    cont, sel ? "&labelSelector=" : "", sel ? sel : "") != -1) {
			w->kw_req = k8s_request("GET", path, NULL, NULL, NULL,
			    K8S_TIMEOUT, list_done, w);
			free(path);
		}
		free(sel);
		json_decref(j);
		if (w->kw_req == NULL)
			watch_backoff(w, 1, "cannot continue the list");
		return;
	}
	/* the whole list: replace what we had, then watch from its version */
	k8s_stream_replace(&w->kw_st, w->kw_pending, rv ? rv : "0");
	w->kw_pending = NULL;
	json_decref(j);
	w->kw_failures = 0;
	w->kw_synced = 1;
	log_debug("kubernetes %s: listed %zu at resourceVersion %s", w->kw_what,
	    json_object_size(w->kw_st.ks_objects), w->kw_st.ks_rv);
	watch_changed(w);
	k8s_watch_start(w);
}

static void
k8s_list(struct k8s_watch *w)
{
	char	*path, *sel = NULL;

	json_decref(w->kw_pending);
	w->kw_pending = NULL;
	if (w->kw_selector != NULL)
		sel = httpc_escape(w->kw_selector);
	if (asprintf(&path, "%s?limit=500%s%s", w->kw_path, sel ?
	    "&labelSelector=" : "", sel ? sel : "") == -1)
		fatal("asprintf");
	free(sel);
	w->kw_req = k8s_request("GET", path, NULL, NULL, NULL, K8S_TIMEOUT,
	    list_done, w);
	free(path);
	if (w->kw_req == NULL)
		watch_backoff(w, 1, "cannot start the list");
}

/* Lines of the watch response, as httpc splits them. */
static void
watch_line(const char *line, size_t len, void *arg)
{
	struct k8s_watch	*w = arg;
	struct k8s_stream	*ks = &w->kw_st;
	unsigned long		 ignored = ks->ks_ignored;
	int			 r;

	r = k8s_stream_feed_line(ks, line, len);
	if (ks->ks_ignored > ignored)
		log_warnx("kubernetes %s: ignored a watch event: %s",
		    w->kw_what, ks->ks_ignored_why);
	if (ks->ks_changed) {
		ks->ks_changed = 0;
		watch_changed(w);
	}
	if (r == -1) {
		httpc_cancel(w->kw_req);
		watch_backoff(w, 1, ks->ks_error);
		return;
	}
	/*
	 * The watch works: the next drop starts the backoff afresh instead
	 * of waiting longer each time a working watch is cut.
	 */
	if (ks->ks_events > 0)
		w->kw_failures = 0;
}

static void
watch_done(long status, const char *body, size_t len, const char *err,
    void *arg)
{
	struct k8s_watch	*w = arg;
	char			 why[300];

	w->kw_req = NULL;
	if (status == 410) {
		watch_backoff(w, 1, "watch expired (410)");
		return;
	}
	if (err != NULL || status != 200) {
		snprintf(why, sizeof(why), "watch ended: %s", err ? err : "HTTP");
		watch_backoff(w, status != 200 && status != 0, why);
		return;
	}
	/* the server's timeout: carry on from where we are */
	w->kw_failures = 0;
	k8s_watch_start(w);
}

static void
k8s_watch_start(struct k8s_watch *w)
{
	char	*path, *sel = NULL;

	k8s_stream_begin(&w->kw_st);
	if (w->kw_selector != NULL)
		sel = httpc_escape(w->kw_selector);
	if (asprintf(&path, "%s?watch=1&allowWatchBookmarks=true&"
	    "resourceVersion=%s&timeoutSeconds=%d%s%s", w->kw_path,
	    w->kw_st.ks_rv, K8S_WATCH_TIMEOUT, sel ? "&labelSelector=" : "",
	    sel ? sel : "") == -1)
		fatal("asprintf");
	free(sel);
	w->kw_req = k8s_request("GET", path, NULL, NULL, watch_line, 0,
	    watch_done, w);
	free(path);
	if (w->kw_req == NULL)
		watch_backoff(w, 0, "cannot start the watch");
}

static void
watch_init(struct k8s_watch *w, const char *what, const char *path,
    const char *selector)
{
	w->kw_what = what;
	w->kw_path = strdup(path);
	w->kw_selector = selector;
	k8s_stream_init(&w->kw_st, K8S_STREAM_MAX_LINE);
	w->kw_retry = evtimer_new(sup->base, watch_retry_cb, w);
	k8s_list(w);
}

static int
cr_cmp(const void *a, const void *b)
{
	const struct cr	*x = *(struct cr *const *)a, *y = *(struct cr *const *)b;
	int		 c = strcmp(x->cr_namespace, y->cr_namespace);

	return c ? c : strcmp(x->cr_name, y->cr_name);
}

/* Every CR seen, validated like the files of standalone mode. */
struct cr **
k8s_load_crs(size_t *ncrs, json_t *rejected)
{
	struct cr	**crs = NULL, *cr;
	const char	*key;
	json_t		*obj;
	size_t		 n = 0;
	int		 i;

	for (i = 0; i < ncr_watches; i++) {
		json_object_foreach(cr_watches[i].kw_st.ks_objects, key, obj) {
			if ((cr = cr_parse(obj, key, rejected)) == NULL)
				continue;
			crs = reallocarray(crs, n + 1, sizeof(*crs));
			crs[n++] = cr;
		}
	}
	/* a stable order, so that the same CR wins a name clash every time */
	if (n > 1)
		qsort(crs, n, sizeof(*crs), cr_cmp);
	*ncrs = n;
	return crs;
}

static json_t *
k8s_cr_object(const char *ns, const char *name)
{
	char	key[600];
	json_t	*o;
	int	i;

	snprintf(key, sizeof(key), "%s/%s", ns, name);
	for (i = 0; i < ncr_watches; i++)
		if ((o = json_object_get(cr_watches[i].kw_st.ks_objects, key)) != NULL)
			return o;
	return NULL;
}

/* The Service named `name` in the proxy namespace that tpmail owns. */
static json_t *
k8s_own_service(const char *name)
{
	char	key[600];

	snprintf(key, sizeof(key), "%s/%s", sup->st.namespace, name);
	return json_object_get(svc_watch.kw_st.ks_objects, key);
}

static int
service_target_port(json_t *svc)
{
	json_t	*p = json_array_get(json_object_get(json_object_get(svc, "spec"),
	    "ports"), 0);

	return (int)json_integer_value(json_object_get(p, "targetPort"));
}

/*
 * The listen port of a tenant service: what its proxy-namespace Service
 * records; the leader allocates one for a new service, the others wait.
 * 0 with *wait set while there is none yet.
 */
int
k8s_port_for(struct service *sv, int *wait)
{
	json_t		*svc = k8s_own_service(sv->sv_name), *o;
	const char	*key, *crns;
	int		 port, used;

	*wait = 0;
	if (svc != NULL) {
		crns = json_string_value(json_object_get(json_object_get(
		    json_object_get(svc, "metadata"), "labels"), LABEL_CR_NS));
		if (crns != NULL && strcmp(crns, sv->sv_namespace) == 0 &&
		    (port = service_target_port(svc)) > 0)
			return port;
	}
	if (!leader || !svc_watch.kw_synced) {
		*wait = 1;
		return 0;
	}
	/*
	 * A new service gets a port, and so a proxy, only once both of its
	 * Service names are known not to be someone else's: a CR that clashes
	 * never serves, not even for the moment it takes to find out.
	 */
	if (svc == NULL) {
		char	k1[600], k2[600];

		snprintf(k1, sizeof(k1), "%s/%s", sup->st.namespace, sv->sv_name);
		snprintf(k2, sizeof(k2), "%s/%s", sv->sv_namespace, sv->sv_name);
		if (!names_free(k1, strcmp(sv->sv_namespace, sup->st.namespace) ?
		    k2 : NULL)) {
			*wait = 1;
			return 0;
		}
	}
	for (port = sup->st.port_min; port <= sup->st.port_max; port++) {
		used = 0;
		json_object_foreach(svc_watch.kw_st.ks_objects, key, o)
			if (service_target_port(o) == port)
				used = 1;
		if (!used && !services_port_in_use(port))
			return port;
	}
	return 0;
}

static json_t *
k8s_selector(void)
{
	json_t	*sel = json_object();
	char	*copy = strdup(sup->st.pod_selector ? sup->st.pod_selector :
		    "app.kubernetes.io/name=tpmail"), *tok, *save = NULL, *eq;

	for (tok = strtok_r(copy, ",", &save); tok != NULL;
	    tok = strtok_r(NULL, ",", &save))
		if ((eq = strchr(tok, '=')) != NULL) {
			*eq = '\0';
			json_object_set_new(sel, tok, json_string(eq + 1));
		}
	free(copy);
	return sel;
}

static json_t *
k8s_labels(struct service *sv)
{
	return json_pack("{s:s,s:s,s:s,s:s}", LABEL_MANAGED, "tpmail",
	    LABEL_CR_NS, sv->sv_namespace, LABEL_CR_NAME, sv->sv_cr,
	    LABEL_TENANT, sv->sv_tenant ? sv->sv_tenant : "");
}

struct write_ctx {
	char	*key;		/* what it was about, for logs and clashes */
	char	*what;
	char	*uid;		/* a status write: the CR's uid */
};

static json_t	*status_inflight;	/* uid -> true while a PATCH is out */

static void
write_ctx_free(struct write_ctx *c)
{
	free(c->key);
	free(c->what);
	free(c->uid);
	free(c);
}

static struct write_ctx *
write_ctx(const char *key, const char *what)
{
	struct write_ctx	*c = calloc(1, sizeof(*c));

	if (c == NULL)
		fatal("calloc");
	c->key = strdup(key);
	c->what = strdup(what);
	return c;
}

/* Whether an object carries tpmail's managed-by label. */
static int
managed_by_tpmail(json_t *o)
{
	const char	*m = json_string_value(json_object_get(json_object_get(
			    json_object_get(o, "metadata"), "labels"),
			    LABEL_MANAGED));

	return m != NULL && strcmp(m, "tpmail") == 0;
}

/* The same of a Service as the API server returned it. */
static int
body_managed_by_tpmail(const char *body, size_t len)
{
	json_error_t	 jerr;
	json_t		*j = json_loadb(body, len, 0, &jerr);
	int		 ours = managed_by_tpmail(j);

	json_decref(j);
	return ours;
}

static void
clash_check_done(long status, const char *body, size_t len, const char *err,
    void *arg)
{
	struct write_ctx	*c = arg;

	if (status == 200 && !body_managed_by_tpmail(body, len)) {
		if (json_object_get(clashes, c->key) == NULL) {
			log_warnx("kubernetes: Service %s exists and is not "
			    "tpmail's: leaving it alone", c->key);
			json_object_set_new(clashes, c->key, json_true());
			reconcile_schedule();
		}
	}
	write_ctx_free(c);
}

static void
write_done(long status, const char *body, size_t len, const char *err,
    void *arg)
{
	struct write_ctx	*c = arg;
	char			 path[700], *slash;

	if (err != NULL)
		log_warnx("kubernetes: %s %s: %s", c->what, c->key, err);
	else if (status == 409 && strcmp(c->what, "create Service") == 0) {
		/* someone's Service by that name: whose? */
		slash = strchr(c->key, '/');
		snprintf(path, sizeof(path), "/api/v1/namespaces/%.*s/services/%s",
		    (int)(slash - c->key), c->key, slash + 1);
		k8s_request("GET", path, NULL, NULL, NULL, K8S_TIMEOUT,
		    clash_check_done, write_ctx(c->key, "get Service"));
	} else if (status == 409)
		/* a newer version than ours: the watch brings it, retry then */
		k8s_schedule_publish();
	else if (status >= 300)
		log_warnx("kubernetes: %s %s: HTTP %ld", c->what, c->key, status);
	else
		log_debug("kubernetes: %s %s: HTTP %ld", c->what, c->key, status);
	if (c->uid != NULL) {
		/*
		 * One status write per CR at a time, so they land in order;
		 * a failed one is written again.
		 */
		json_object_del(status_inflight, c->uid);
		if (err != NULL || status >= 300)
			json_object_del(status_written, c->uid);
		k8s_schedule_publish();
	}
	write_ctx_free(c);
}

static void
k8s_write(const char *method, const char *path, json_t *body,
    const char *ctype, const char *key, const char *what)
{
	if (k8s_request(method, path, body, ctype, NULL, K8S_TIMEOUT, write_done,
	    write_ctx(key, what)) == NULL)
		log_warnx("kubernetes: cannot %s %s", what, key);
}

static void
k8s_event(json_t *cr, const char *type, const char *reason, const char *msg)
{
	char	 path[600], ts[64];
	json_t	*ev;

	snprintf(path, sizeof(path), "/api/v1/namespaces/%s/events",
	    meta_text(cr, "namespace"));
	ev = json_pack("{s:s,s:s,s:{s:s++,s:s},s:{s:s,s:s,s:s,s:s,s:s},"
	    "s:s,s:s,s:s,s:{s:s},s:s,s:s,s:i}",
	    "apiVersion", "v1", "kind", "Event",
	    "metadata", "generateName", meta_text(cr, "name"), ".", "",
	    "namespace", meta_text(cr, "namespace"),
	    "involvedObject", "apiVersion", "destination.connectivity.api.sap/v1",
	    "kind", "Destination", "name", meta_text(cr, "name"),
	    "namespace", meta_text(cr, "namespace"), "uid", meta_text(cr, "uid"),
	    "type", type, "reason", reason, "message", msg,
	    "source", "component", "tpmail",
	    "firstTimestamp", now_rfc3339(ts, sizeof(ts)),
	    "lastTimestamp", ts, "count", 1);
	k8s_write("POST", path, ev, NULL, path, "create Event");
	json_decref(ev);
}

/* An Event on the CR of a tenant service (the leader writes it). */
void
k8s_service_event(struct service *sv, const char *type, const char *reason,
    const char *msg)
{
	json_t	*cr;

	if (!leader || (cr = k8s_cr_object(sv->sv_namespace, sv->sv_cr)) == NULL)
		return;
	k8s_event(cr, type, reason, msg);
}

/* A pre-create look at a name: free (404, or already ours) or foreign. */
static void
precheck_done(long status, const char *body, size_t len, const char *err,
    void *arg)
{
	struct write_ctx	*c = arg;

	if (err != NULL || (status != 200 && status != 404)) {
		json_object_del(prechecked, c->key);	/* ask again soon */
		if (!evtimer_pending(names_retry, NULL))
			event_add(names_retry, &(struct timeval){
			    K8S_RETRY_PERIOD, 0 });
		write_ctx_free(c);
		return;
	}
	if (status == 200 && !body_managed_by_tpmail(body, len)) {
		log_warnx("kubernetes: Service %s exists and is not tpmail's: "
		    "leaving it alone", c->key);
		json_object_set_new(clashes, c->key, json_true());
		json_object_del(prechecked, c->key);
		write_ctx_free(c);
		reconcile_schedule();
		return;
	}
	json_object_set_new(prechecked, c->key, json_string("free"));
	write_ctx_free(c);
	reconcile_schedule();		/* a service waiting for it can start */
	k8s_schedule_publish();
}

/*
 * Whether both names of a tenant service are known to be free for us.
 * The first time, ask the API server about each, so that a foreign
 * Service in either namespace is found before anything is created.
 */
static int
names_free(const char *k1, const char *k2)
{
	const char	*keys[2] = { k1, k2 }, *st, *slash;
	char		 path[700];
	int		 i, ok = 1;

	for (i = 0; i < 2; i++) {
		if (keys[i] == NULL)
			continue;
		st = json_string_value(json_object_get(prechecked, keys[i]));
		if (st != NULL && strcmp(st, "free") == 0)
			continue;
		ok = 0;
		if (st != NULL)
			continue;	/* being asked */
		slash = strchr(keys[i], '/');
		snprintf(path, sizeof(path), "/api/v1/namespaces/%.*s/services/%s",
		    (int)(slash - keys[i]), keys[i], slash + 1);
		json_object_set_new(prechecked, keys[i], json_string("pending"));
		if (k8s_request("GET", path, NULL, NULL, NULL, K8S_TIMEOUT,
		    precheck_done, write_ctx(keys[i], "check Service")) == NULL)
			json_object_del(prechecked, keys[i]);
	}
	return ok;
}

/* Make the two Services of one tenant service what they should be. */
static void
publish_service(struct service *sv, json_t *desired_names)
{
	json_t		*cur, *want, *cr, *p;
	char		 path[700], key[600], ext[600], crkey[600];
	int		 same;

	snprintf(key, sizeof(key), "%s/%s", sup->st.namespace, sv->sv_name);
	snprintf(crkey, sizeof(crkey), "%s/%s", sv->sv_namespace, sv->sv_name);
	json_object_set_new(desired_names, key, json_true());
	if (sv->sv_port <= 0 || json_object_get(clashes, key) != NULL ||
	    json_object_get(clashes, crkey) != NULL)
		return;
	cr = k8s_cr_object(sv->sv_namespace, sv->sv_cr);
	/* nothing is created until neither name is someone else's */
	if ((k8s_own_service(sv->sv_name) == NULL ||
	    (strcmp(sv->sv_namespace, sup->st.namespace) != 0 &&
	    json_object_get(svc_watch.kw_st.ks_objects, crkey) == NULL)) &&
	    !names_free(key, strcmp(sv->sv_namespace, sup->st.namespace) ?
	    crkey : NULL)) {
		if (strcmp(sv->sv_namespace, sup->st.namespace) != 0)
			json_object_set_new(desired_names, crkey, json_true());
		return;
	}
	want = json_pack("{s:s,s:s,s:{s:s,s:s,s:o},s:{s:o,s:[{s:s,s:i,s:i,"
	    "s:s}]}}", "apiVersion", "v1", "kind", "Service",
	    "metadata", "name", sv->sv_name, "namespace", sup->st.namespace,
	    "labels", k8s_labels(sv),
	    "spec", "selector", k8s_selector(), "ports", "name", "pop3",
	    "port", sv->sv_svc_port, "targetPort", sv->sv_port,
	    "protocol", "TCP");
	cur = k8s_own_service(sv->sv_name);
	if (cur == NULL && create_allowed(key)) {
		snprintf(path, sizeof(path), "/api/v1/namespaces/%s/services",
		    sup->st.namespace);
		k8s_write("POST", path, want, NULL, key, "create Service");
		if (cr != NULL) {
			char	msg[300];

			snprintf(msg, sizeof(msg), "Service %s created for tenant "
			    "service %s", sv->sv_name, sv->sv_key);
			k8s_event(cr, "Normal", "ServiceCreated", msg);
		}
	} else if (cur != NULL) {
		p = json_array_get(json_object_get(json_object_get(cur, "spec"),
		    "ports"), 0);
		same = json_integer_value(json_object_get(p, "port")) ==
		    sv->sv_svc_port && service_target_port(cur) == sv->sv_port &&
		    json_equal(json_object_get(json_object_get(cur, "spec"),
		    "selector"), json_object_get(json_object_get(want, "spec"),
		    "selector"));
		if (!same) {
			snprintf(path, sizeof(path),
			    "/api/v1/namespaces/%s/services/%s", sup->st.namespace,
			    sv->sv_name);
			json_object_set_new(json_object_get(want, "metadata"),
			    "resourceVersion", json_string(meta_str(cur,
			    "resourceVersion")));
			k8s_write("PUT", path, want, NULL, key, "update Service");
		}
	}
	json_decref(want);

	/* in the CR's namespace: a name that leads to the first one */
	if (strcmp(sv->sv_namespace, sup->st.namespace) == 0 || cr == NULL)
		return;
	snprintf(key, sizeof(key), "%s/%s", sv->sv_namespace, sv->sv_name);
	json_object_set_new(desired_names, key, json_true());
	if (json_object_get(clashes, key) != NULL)
		return;
	snprintf(ext, sizeof(ext), "%s.%s.svc.cluster.local", sv->sv_name,
	    sup->st.namespace);
	want = json_pack("{s:s,s:s,s:{s:s,s:s,s:o,s:[{s:s,s:s,s:s,s:s,s:b,"
	    "s:b}]},s:{s:s,s:s,s:[{s:s,s:i,s:i,s:s}]}}",
	    "apiVersion", "v1", "kind", "Service",
	    "metadata", "name", sv->sv_name, "namespace", sv->sv_namespace,
	    "labels", k8s_labels(sv), "ownerReferences",
	    "apiVersion", "destination.connectivity.api.sap/v1",
	    "kind", "Destination", "name", sv->sv_cr,
	    "uid", meta_text(cr, "uid"),
	    "controller", 1, "blockOwnerDeletion", 1,
	    "spec", "type", "ExternalName", "externalName", ext,
	    "ports", "name", "pop3", "port", sv->sv_svc_port,
	    "targetPort", sv->sv_svc_port, "protocol", "TCP");
	cur = json_object_get(svc_watch.kw_st.ks_objects, key);
	if (cur == NULL) {
		if (!create_allowed(key)) {
			json_decref(want);
			return;
		}
		snprintf(path, sizeof(path), "/api/v1/namespaces/%s/services",
		    sv->sv_namespace);
		k8s_write("POST", path, want, NULL, key, "create Service");
	} else if (!json_equal(json_object_get(json_object_get(cur, "spec"),
	    "externalName"), json_object_get(json_object_get(want, "spec"),
	    "externalName")) || json_integer_value(json_object_get(
	    json_array_get(json_object_get(json_object_get(cur, "spec"), "ports"),
	    0), "port")) != sv->sv_svc_port) {
		snprintf(path, sizeof(path), "/api/v1/namespaces/%s/services/%s",
		    sv->sv_namespace, sv->sv_name);
		json_object_set_new(json_object_get(want, "metadata"),
		    "resourceVersion", json_string(meta_str(cur,
		    "resourceVersion")));
		k8s_write("PUT", path, want, NULL, key, "update Service");
	}
	json_decref(want);
}

/* The status SAP's CRD defines, from the last reconcile. */
static json_t *
cr_status(json_t *cr, json_t *rejected)
{
	struct service	*sv;
	json_t		*r, *tenants = json_array(), *names = json_array();
	const char	*ns = meta_text(cr, "namespace"),
			*name = meta_text(cr, "name");
	const char	*reason = NULL, *msg = NULL;
	char		 buf[1024], ts[64];
	size_t		 i, off = 0;
	json_t		*gen;

	json_array_foreach(rejected, i, r) {
		if (json_string_value(json_object_get(r, "namespace")) != NULL &&
		    strcmp(json_string_value(json_object_get(r, "namespace")),
		    ns) == 0 && json_string_value(json_object_get(r, "cr")) !=
		    NULL && strcmp(json_string_value(json_object_get(r, "cr")),
		    name) == 0) {
			reason = json_string_value(json_object_get(r, "reason"));
			msg = json_string_value(json_object_get(r, "error"));
		}
	}
	TAILQ_FOREACH(sv, &sup->services, sv_entry) {
		if (sv->sv_remove || strcmp(sv->sv_namespace, ns) != 0 ||
		    strcmp(sv->sv_cr, name) != 0 || sv->sv_port <= 0)
			continue;
		if (sv->sv_tenant != NULL)
			json_array_append_new(tenants, json_pack("{s:s}",
			    "tenantSubdomain", sv->sv_tenant));
		json_array_append_new(names, json_string(sv->sv_name));
		off += snprintf(buf + off, off < sizeof(buf) ? sizeof(buf) - off : 0,
		    "%s%s", off ? ", " : "", sv->sv_name);
	}
	if (reason == NULL && json_array_size(names) == 0) {
		reason = "ConfigurationFailed";
		msg = "Technical connectivity is not configured. The tenant "
		    "services are being set up.";
	}
	if (reason == NULL) {
		char	m[1200];

		snprintf(m, sizeof(m), "Technical connectivity is configured. "
		    "Kubernetes service%s with name%s %s %s created.",
		    json_array_size(names) > 1 ? "s" : "",
		    json_array_size(names) > 1 ? "s" : "", buf,
		    json_array_size(names) > 1 ? "are" : "is");
		r = json_pack("{s:[{s:s,s:s,s:s,s:s,s:s}],s:o}",
		    "conditions", "type", "Available", "status", "True",
		    "reason", "ConfigurationSuccessful", "message", m,
		    "lastUpdateTime", now_rfc3339(ts, sizeof(ts)),
		    "tenants", tenants);
	} else {
		char	m[1200];

		snprintf(m, sizeof(m), "%s%s", strncmp(msg ? msg : "",
		    "Technical connectivity", 22) == 0 ? "" :
		    "Technical connectivity is not configured. ", msg ? msg : "");
		r = json_pack("{s:[{s:s,s:s,s:s,s:s,s:s}],s:o}",
		    "conditions", "type", "Available", "status", "False",
		    "reason", reason, "message", m,
		    "lastUpdateTime", now_rfc3339(ts, sizeof(ts)),
		    "tenants", tenants);
	}
	if ((gen = json_object_get(json_object_get(cr, "metadata"),
	    "generation")) != NULL)
		json_object_set(r, "observedGeneration", gen);
	json_decref(names);
	return r;
}

/* Conditions compared without their time: equal means nothing to write. */
static int
status_same(json_t *a, json_t *b)
{
	json_t	*ca, *cb;
	int	 same;

	if (a == NULL || b == NULL)
		return 0;
	ca = json_deep_copy(a);
	cb = json_deep_copy(b);
	json_object_del(json_array_get(json_object_get(ca, "conditions"), 0),
	    "lastUpdateTime");
	json_object_del(json_array_get(json_object_get(cb, "conditions"), 0),
	    "lastUpdateTime");
	same = json_equal(ca, cb);
	json_decref(ca);
	json_decref(cb);
	return same;
}

static void
publish_status(json_t *cr)
{
	json_t		*st = cr_status(cr, sup->rejected), *body, *cur, *c;
	char		 key[600], path[800], nsname[600];
	const char	*reason;
	struct write_ctx *wc;

	/* by uid: a CR deleted and created again is a new object */
	snprintf(key, sizeof(key), "%s", meta_text(cr, "uid"));
	if (json_object_get(status_inflight, key) != NULL) {
		json_decref(st);	/* written when the one in flight is done */
		return;
	}
	cur = json_object_get(cr, "status");
	if (status_same(st, cur) || status_same(st, json_object_get(
	    status_written, key))) {
		json_decref(st);
		return;
	}
	c = json_array_get(json_object_get(st, "conditions"), 0);
	reason = json_string_value(json_object_get(c, "reason"));
	/* a failure is worth an Event; the moment of setting up is not */
	if (strcmp(json_string_value(json_object_get(c, "status")), "False") ==
	    0 && strstr(json_string_value(json_object_get(c, "message")),
	    "being set up") == NULL)
		k8s_event(cr, "Warning", reason, json_string_value(
		    json_object_get(c, "message")));
	json_object_set(status_written, key, st);
	snprintf(path, sizeof(path), CR_PATH "/namespaces/%s/destinations/%s/status",
	    meta_text(cr, "namespace"), meta_text(cr, "name"));
	body = json_pack("{s:o}", "status", st);
	json_object_set_new(status_inflight, key, json_true());
	k8s_object_key(cr, nsname, sizeof(nsname));
	wc = write_ctx(nsname, "update status of");
	wc->uid = strdup(key);
	if (k8s_request("PATCH", path, body, "application/merge-patch+json",
	    NULL, K8S_TIMEOUT, write_done, wc) == NULL) {
		json_object_del(status_inflight, wc->uid);
		json_object_del(status_written, wc->uid);
		write_ctx_free(wc);
	}
	json_decref(body);
}

/* The leader makes Services and statuses match the last reconcile. */
static void
publish_cb(evutil_socket_t fd, short ev, void *arg)
{
	struct service	*sv;
	json_t		*desired = json_object(), *o;
	const char	*key;
	char		 path[800];
	int		 i;

	/*
	 * Only once a reconcile has run over the complete lists: a new leader
	 * must not delete what it merely has not reconciled yet.
	 */
	if (!leader || !k8s_synced() || !sup->synced || sup->stopping) {
		json_decref(desired);
		return;
	}
	TAILQ_FOREACH(sv, &sup->services, sv_entry)
		if (!sv->sv_remove)
			publish_service(sv, desired);
	/* Services tpmail made whose tenant or CR is gone */
	json_object_foreach(svc_watch.kw_st.ks_objects, key, o) {
		if (!managed_by_tpmail(o) ||
		    json_object_get(desired, key) != NULL ||
		    meta_str(o, "deletionTimestamp") != NULL)
			continue;
		/* once: the watch will tell when it is gone */
		if (json_object_get(deleting, key) != NULL && time(NULL) -
		    (time_t)json_integer_value(json_object_get(deleting, key)) <
		    K8S_TIMEOUT)
			continue;
		json_object_set_new(deleting, key, json_integer(time(NULL)));
		snprintf(path, sizeof(path), "/api/v1/namespaces/%s/services/%s",
		    meta_text(o, "namespace"), meta_text(o, "name"));
		log_info("kubernetes: deleting Service %s: its tenant service "
		    "is gone", key);
		k8s_write("DELETE", path, NULL, NULL, key, "delete Service");
	}
	json_decref(desired);
	for (i = 0; i < ncr_watches; i++)
		json_object_foreach(cr_watches[i].kw_st.ks_objects, key, o)
			publish_status(o);
}

static void
k8s_schedule_publish(void)
{
	if (publish_ev != NULL)
		event_active(publish_ev, EV_TIMEOUT, 0);
}

/* After every reconcile: the leader publishes. */
void
k8s_after_reconcile(void)
{
	k8s_schedule_publish();
}

/* A foreign Service in the way, looked at again: gone, or still there. */
static void
clash_recheck_done(long status, const char *body, size_t len, const char *err,
    void *arg)
{
	struct write_ctx	*c = arg;

	if (err == NULL && (status == 404 ||
	    (status == 200 && body_managed_by_tpmail(body, len)))) {
		log_info("kubernetes: Service %s is no longer in the way", c->key);
		json_object_del(clashes, c->key);
		json_object_set_new(prechecked, c->key, json_string("free"));
		reconcile_schedule();
	}
	write_ctx_free(c);
}

static void
repair_cb(evutil_socket_t fd, short ev, void *arg)
{
	const char	*key, *slash;
	json_t		*v;
	char		 path[700];

	/*
	 * A foreign Service may have gone (the watch sees only ours): ask
	 * about each again.  Only an answer clears a clash, so a CR in the
	 * way of someone's Service never serves in between.
	 */
	json_object_foreach(clashes, key, v) {
		slash = strchr(key, '/');
		snprintf(path, sizeof(path), "/api/v1/namespaces/%.*s/services/%s",
		    (int)(slash - key), key, slash + 1);
		k8s_request("GET", path, NULL, NULL, NULL, K8S_TIMEOUT,
		    clash_recheck_done, write_ctx(key, "recheck Service"));
	}
	k8s_schedule_publish();
}

static void
names_retry_cb(evutil_socket_t fd, short ev, void *arg)
{
	reconcile_schedule();
}

/* Whether a proxy-namespace Service name is a foreign object in our way. */
int
k8s_clash(const char *ns, const char *name)
{
	char	key[600];

	snprintf(key, sizeof(key), "%s/%s", ns, name);
	return json_object_get(clashes, key) != NULL;
}

static void
lease_set_leader(int on)
{
	if (on == leader)
		return;
	leader = on;
	log_info("kubernetes: %s the leader (%s)", on ? "became" : "no longer",
	    sup->st.identity);
	if (on) {
		/* a new leader allocates ports: services waiting may start */
		reconcile_schedule();
		k8s_schedule_publish();
	}
}

static json_t *
lease_spec(json_t *old)
{
	char		 now[64];
	json_int_t	 transitions;
	const char	*holder;
	json_t		*spec;

	now_micro(now, sizeof(now));
	holder = json_string_value(json_object_get(json_object_get(old, "spec"),
	    "holderIdentity"));
	transitions = json_integer_value(json_object_get(json_object_get(old,
	    "spec"), "leaseTransitions"));
	spec = json_pack("{s:s,s:i,s:s,s:s,s:I}", "holderIdentity",
	    sup->st.identity, "leaseDurationSeconds", sup->st.lease_duration,
	    "renewTime", now, "acquireTime", now, "leaseTransitions",
	    transitions + (holder != NULL && strcmp(holder, sup->st.identity) ?
	    1 : 0));
	if (holder != NULL && strcmp(holder, sup->st.identity) == 0 &&
	    json_object_get(json_object_get(old, "spec"), "acquireTime"))
		json_object_set(spec, "acquireTime", json_object_get(
		    json_object_get(old, "spec"), "acquireTime"));
	return spec;
}

static void
lease_write_done(long status, const char *body, size_t len, const char *err,
    void *arg)
{
	if (err == NULL && (status == 200 || status == 201)) {
		last_renew = time(NULL);
		lease_set_leader(1);
		return;
	}
	/* a conflict or an error: someone else may hold it now */
	if (leader && time(NULL) - last_renew >= K8S_RENEW_DEADLINE) {
		log_warnx("kubernetes: could not renew the lease for %d s",
		    K8S_RENEW_DEADLINE);
		lease_set_leader(0);
	}
}

static void
lease_get_done(long status, const char *body, size_t len, const char *err,
    void *arg)
{
	json_error_t	 jerr;
	json_t		*j, *spec, *w;
	const char	*holder, *rv;
	char		 path[600];

	snprintf(path, sizeof(path),
	    "/apis/coordination.k8s.io/v1/namespaces/%s/leases",
	    sup->st.namespace);
	if (err != NULL || (status != 200 && status != 404)) {
		lease_write_done(0, "", 0, err ? err : "lease read failed", NULL);
		return;
	}
	if (status == 404) {
		w = json_pack("{s:s,s:s,s:{s:s,s:s},s:o}", "apiVersion",
		    "coordination.k8s.io/v1", "kind", "Lease", "metadata",
		    "name", K8S_LEASE_NAME, "namespace", sup->st.namespace,
		    "spec", lease_spec(NULL));
		k8s_request("POST", path, w, NULL, NULL, K8S_TIMEOUT,
		    lease_write_done, NULL);
		json_decref(w);
		return;
	}
	j = json_loadb(body, len, 0, &jerr);
	spec = json_object_get(j, "spec");
	holder = json_string_value(json_object_get(spec, "holderIdentity"));
	rv = meta_str(j, "resourceVersion");
	/* client-go: expiry is judged by when we saw the record change */
	if (lease_rv == NULL || rv == NULL || strcmp(lease_rv, rv) != 0) {
		free(lease_rv);
		lease_rv = rv ? strdup(rv) : NULL;
		lease_observed = time(NULL);
	}
	if (holder == NULL || holder[0] == '\0' ||
	    strcmp(holder, sup->st.identity) == 0 ||
	    time(NULL) - lease_observed > json_integer_value(json_object_get(spec,
	    "leaseDurationSeconds"))) {
		if (holder != NULL && strcmp(holder, sup->st.identity) != 0)
			log_info("kubernetes: lease held by %s expired; taking "
			    "over", holder);
		w = json_deep_copy(j);
		json_object_set_new(w, "spec", lease_spec(j));
		snprintf(path + strlen(path), sizeof(path) - strlen(path), "/%s",
		    K8S_LEASE_NAME);
		k8s_request("PUT", path, w, NULL, NULL, K8S_TIMEOUT,
		    lease_write_done, NULL);
		json_decref(w);
	} else
		lease_set_leader(0);
	json_decref(lease_record);
	lease_record = j;
}

static void
lease_cb(evutil_socket_t fd, short ev, void *arg)
{
	char	path[600];

	if (sup->stopping)
		return;
	snprintf(path, sizeof(path),
	    "/apis/coordination.k8s.io/v1/namespaces/%s/leases/%s",
	    sup->st.namespace, K8S_LEASE_NAME);
	k8s_request("GET", path, NULL, NULL, NULL, K8S_TIMEOUT, lease_get_done,
	    NULL);
}

void
k8s_start(void)
{
	char	 path[600], *copy, *tok, *save = NULL;

	clashes = json_object();
	status_written = json_object();
	created_at = json_object();
	prechecked = json_object();
	deleting = json_object();
	status_inflight = json_object();
	if (sup->st.watch_namespaces == NULL)
		watch_init(&cr_watches[ncr_watches++], "destinations",
		    CR_PATH "/destinations", NULL);
	else {
		copy = strdup(sup->st.watch_namespaces);
		for (tok = strtok_r(copy, ",", &save); tok != NULL &&
		    ncr_watches < 16; tok = strtok_r(NULL, ",", &save)) {
			snprintf(path, sizeof(path), CR_PATH
			    "/namespaces/%s/destinations", tok);
			watch_init(&cr_watches[ncr_watches++], "destinations",
			    path, NULL);
		}
		free(copy);
	}
	watch_init(&svc_watch, "services", "/api/v1/services",
	    LABEL_MANAGED "=tpmail");
	publish_ev = event_new(sup->base, -1, 0, publish_cb, NULL);
	publish_later = evtimer_new(sup->base, publish_cb, NULL);
	names_retry = evtimer_new(sup->base, names_retry_cb, NULL);
	repair_timer = event_new(sup->base, -1, EV_PERSIST, repair_cb, NULL);
	event_add(repair_timer, &(struct timeval){ K8S_REPAIR_PERIOD, 0 });
	lease_timer = event_new(sup->base, -1, EV_PERSIST, lease_cb, NULL);
	event_add(lease_timer, &(struct timeval){ K8S_RETRY_PERIOD, 0 });
	lease_cb(-1, 0, NULL);
	log_info("kubernetes mode: API %s, namespace %s, identity %s",
	    sup->st.kube_api, sup->st.namespace, sup->st.identity);
}

/* Stepping down on exit lets the next leader take over at once. */
void
k8s_stop(void)
{
	if (lease_timer != NULL)
		event_free(lease_timer);
	lease_timer = NULL;
	if (repair_timer != NULL)
		event_free(repair_timer);
	repair_timer = NULL;
	if (names_retry != NULL)
		event_free(names_retry);
	names_retry = NULL;
}
