/*
 * http.c: tpmaild's HTTP endpoint (libevent's evhttp) for probes and
 * Prometheus: /healthz (the event loop answers), /readyz (the first sync is
 * done and every desired tenant service is running) and /metrics (text
 * format 0.0.4).  Metric names follow SAP's transparent proxy where it has
 * them (tp_open_tcp_connections, tp_tcp_connections_total,
 * tp_destination_crs), so existing dashboards keep working; the rest are
 * tpmail_*.  Nothing secret is ever exported.  Runs in the supervisor.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <event2/buffer.h>
#include <event2/http.h>
#include <event2/listener.h>

#include "accept_pause.h"
#include "log.h"
#include "supervisor.h"

static struct evhttp	*http;

/* Bucket bounds, in the order the proxies send their cumulative counts. */
static const char *const bucket_le[] = {
	"0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25",
	"0.5", "1", "2.5", "10", "60", "600", "+Inf",
};

/* Add x into acc: numbers summed, arrays elementwise, objects by key. */
void
stats_add(json_t *acc, json_t *x)
{
	const char	*k;
	json_t		*v, *a;
	size_t		 i;

	if (json_is_object(acc) && json_is_object(x)) {
		json_object_foreach(x, k, v) {
			if ((a = json_object_get(acc, k)) == NULL)
				json_object_set_new(acc, k, json_deep_copy(v));
			else if (json_is_integer(a) && json_is_integer(v))
				json_integer_set(a, json_integer_value(a) +
				    json_integer_value(v));
			else if (json_is_number(a) && json_is_number(v))
				json_object_set_new(acc, k, json_real(
				    json_number_value(a) + json_number_value(v)));
			else
				stats_add(a, v);
		}
	} else if (json_is_array(acc) && json_is_array(x)) {
		json_array_foreach(x, i, v) {
			a = json_array_get(acc, i);
			if (a != NULL && json_is_integer(a) && json_is_integer(v))
				json_integer_set(a, json_integer_value(a) +
				    json_integer_value(v));
		}
	}
}

/* Whether every tenant service that should run does. */
static int
http_ready(char *why, size_t whysz)
{
	struct service	*sv;

	if (!sup->synced) {
		snprintf(why, whysz, "first sync not done\n");
		return 0;
	}
	TAILQ_FOREACH(sv, &sup->services, sv_entry) {
		if (sv->sv_remove || sv->sv_state == SERVICE_RUNNING ||
		    sv->sv_state == SERVICE_DRAINED)
			continue;
		snprintf(why, whysz, "service %s is %s\n", sv->sv_key,
		    service_state_name(sv->sv_state));
		return 0;
	}
	snprintf(why, whysz, "ok\n");
	return 1;
}

static void
http_reply(struct evhttp_request *req, int code, const char *reason,
    struct evbuffer *body, const char *ctype)
{
	evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
	    ctype);
	evhttp_send_reply(req, code, reason, body);
}

static void
http_healthz(struct evhttp_request *req, void *arg)
{
	struct evbuffer	*b = evbuffer_new();

	evbuffer_add_printf(b, "ok\n");
	http_reply(req, 200, "OK", b, "text/plain");
	evbuffer_free(b);
}

static void
http_readyz(struct evhttp_request *req, void *arg)
{
	struct evbuffer	*b = evbuffer_new();
	char		 why[512];
	int		 ok = http_ready(why, sizeof(why));

	evbuffer_add(b, why, strlen(why));
	http_reply(req, ok ? 200 : 503, ok ? "OK" : "Service Unavailable", b,
	    "text/plain");
	evbuffer_free(b);
}

static void
head(struct evbuffer *b, const char *name, const char *type, const char *help)
{
	evbuffer_add_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name,
	    type);
}

/* The label set of a service: namespace, service, cr, tenant. */
static void
labels(struct service *sv, char *buf, size_t bufsz)
{
	snprintf(buf, bufsz, "namespace=\"%s\",service=\"%s\",cr=\"%s\","
	    "tenant=\"%s\"", sv->sv_namespace, sv->sv_name, sv->sv_cr,
	    sv->sv_tenant ? sv->sv_tenant : "");
}

static long long
ival(json_t *o, const char *path1, const char *path2)
{
	json_t	*v = json_object_get(o, path1);

	if (path2 != NULL)
		v = json_object_get(v, path2);
	return json_is_integer(v) ? (long long)json_integer_value(v) : 0;
}

static void
histogram(struct evbuffer *b, const char *name, json_t *h, const char *lab)
{
	json_t	*bk = json_object_get(h, "buckets");
	size_t	 i;

	for (i = 0; i < sizeof(bucket_le) / sizeof(bucket_le[0]); i++)
		evbuffer_add_printf(b, "%s_bucket{%s,le=\"%s\"} %lld\n", name, lab,
		    bucket_le[i], (long long)json_integer_value(
		    json_array_get(bk, i)));
	evbuffer_add_printf(b, "%s_sum{%s} %.6f\n%s_count{%s} %lld\n", name, lab,
	    json_number_value(json_object_get(h, "sum")), name, lab,
	    (long long)json_integer_value(json_object_get(h, "count")));
}

static void
http_metrics(struct evhttp_request *req, void *arg)
{
	static const char *const outcomes[] = {
		"ok", "client_closed", "login_failed", "idle_timeout", "error",
	};
	static const char *const upfails[] = {
		"connect", "tls", "auth", "timeout", "protocol",
	};
	static const enum service_state states[] = {
		SERVICE_STARTING, SERVICE_RUNNING, SERVICE_BACKOFF, SERVICE_FAILED,
		SERVICE_STOPPING, SERVICE_DRAINED,
	};
	struct evbuffer	*b = evbuffer_new();
	struct service	*sv;
	json_t		**cs;
	char		 lab[1024], why[256];
	size_t		 i, n = 0, k;

	TAILQ_FOREACH(sv, &sup->services, sv_entry)
		n++;
	cs = calloc(n + 1, sizeof(*cs));
	i = 0;
	TAILQ_FOREACH(sv, &sup->services, sv_entry)
		cs[i++] = service_counters(sv);

	head(b, "tp_destination_crs", "gauge",
	    "Destination custom resources, by outcome of their validation.");
	{
		/* CRs serving at least one tenant, and rejected ones */
		json_t	*seen = json_object(), *r;
		char	 key[600];

		TAILQ_FOREACH(sv, &sup->services, sv_entry) {
			snprintf(key, sizeof(key), "%s/%s", sv->sv_namespace, sv->sv_cr);
			json_object_set_new(seen, key, json_true());
		}
		json_array_foreach(sup->rejected, k, r) {
			snprintf(key, sizeof(key), "%s/%s",
			    json_string_value(json_object_get(r, "namespace")) ?
			    json_string_value(json_object_get(r, "namespace")) : "",
			    json_string_value(json_object_get(r, "cr")) ?
			    json_string_value(json_object_get(r, "cr")) : "");
			json_object_del(seen, key);
		}
		evbuffer_add_printf(b, "tp_destination_crs{status=\"available\"} %zu\n",
		    json_object_size(seen));
		evbuffer_add_printf(b, "tp_destination_crs{status=\"rejected\"} %zu\n",
		    json_array_size(sup->rejected));
		json_decref(seen);
	}

	head(b, "tp_open_tcp_connections", "gauge",
	    "Client connections open now, per tenant service.");
	TAILQ_FOREACH(sv, &sup->services, sv_entry) {
		labels(sv, lab, sizeof(lab));
		evbuffer_add_printf(b, "tp_open_tcp_connections{%s} %ld\n", lab,
		    sv->sv_active);
	}
	head(b, "tp_tcp_connections_total", "counter",
	    "Client connections accepted, per tenant service.");
	i = 0;
	TAILQ_FOREACH(sv, &sup->services, sv_entry) {
		labels(sv, lab, sizeof(lab));
		evbuffer_add_printf(b, "tp_tcp_connections_total{%s} %lld\n", lab,
		    ival(cs[i], "sessions", NULL) + ival(cs[i], "refused", NULL));
		i++;
	}
	head(b, "tpmail_sessions_total", "counter",
	    "Finished POP3 sessions, by outcome.");
	i = 0;
	TAILQ_FOREACH(sv, &sup->services, sv_entry) {
		labels(sv, lab, sizeof(lab));
		for (k = 0; k < sizeof(outcomes) / sizeof(outcomes[0]); k++)
			evbuffer_add_printf(b, "tpmail_sessions_total{%s,outcome=\"%s\"} "
			    "%lld\n", lab, outcomes[k], ival(cs[i], "outcomes",
			    outcomes[k]));
		i++;
	}
	head(b, "tpmail_sessions_refused_total", "counter",
	    "Connections refused at the session cap (max_sessions).");
	i = 0;
	TAILQ_FOREACH(sv, &sup->services, sv_entry) {
		labels(sv, lab, sizeof(lab));
		evbuffer_add_printf(b, "tpmail_sessions_refused_total{%s} %lld\n",
		    lab, ival(cs[i++], "refused", NULL));
	}
	head(b, "tpmail_upstream_failures_total", "counter",
	    "Failed upstream connections and logins, by reason.");
	i = 0;
	TAILQ_FOREACH(sv, &sup->services, sv_entry) {
		labels(sv, lab, sizeof(lab));
		for (k = 0; k < sizeof(upfails) / sizeof(upfails[0]); k++)
			evbuffer_add_printf(b, "tpmail_upstream_failures_total{%s,"
			    "reason=\"%s\"} %lld\n", lab, upfails[k],
			    ival(cs[i], "upstream_failures", upfails[k]));
		i++;
	}
	head(b, "tpmail_bytes_total", "counter",
	    "Bytes relayed, by direction.");
	i = 0;
	TAILQ_FOREACH(sv, &sup->services, sv_entry) {
		labels(sv, lab, sizeof(lab));
		evbuffer_add_printf(b, "tpmail_bytes_total{%s,direction=\"to_client\"} "
		    "%lld\n", lab, ival(cs[i], "bytes_to_client", NULL));
		evbuffer_add_printf(b, "tpmail_bytes_total{%s,direction=\"to_server\"} "
		    "%lld\n", lab, ival(cs[i], "bytes_to_server", NULL));
		i++;
	}
	head(b, "tpmail_session_duration_seconds", "histogram",
	    "Duration of finished sessions.");
	i = 0;
	TAILQ_FOREACH(sv, &sup->services, sv_entry) {
		labels(sv, lab, sizeof(lab));
		histogram(b, "tpmail_session_duration_seconds",
		    json_object_get(cs[i++], "session_duration"), lab);
	}
	head(b, "tpmail_upstream_login_seconds", "histogram",
	    "Time from a client's connect to the upstream login's success.");
	i = 0;
	TAILQ_FOREACH(sv, &sup->services, sv_entry) {
		labels(sv, lab, sizeof(lab));
		histogram(b, "tpmail_upstream_login_seconds",
		    json_object_get(cs[i++], "login_duration"), lab);
	}
	head(b, "tpmail_proxy_restarts_total", "counter",
	    "Restarts of a tenant service's proxy (crashes and operator restarts).");
	TAILQ_FOREACH(sv, &sup->services, sv_entry) {
		labels(sv, lab, sizeof(lab));
		evbuffer_add_printf(b, "tpmail_proxy_restarts_total{%s} %d\n", lab,
		    sv->sv_restarts);
	}
	head(b, "tpmail_service_state", "gauge",
	    "1 for the state a tenant service is in.");
	TAILQ_FOREACH(sv, &sup->services, sv_entry) {
		labels(sv, lab, sizeof(lab));
		for (k = 0; k < sizeof(states) / sizeof(states[0]); k++)
			evbuffer_add_printf(b, "tpmail_service_state{%s,state=\"%s\"} "
			    "%d\n", lab, service_state_name(states[k]),
			    sv->sv_state == states[k]);
	}
	head(b, "tpmail_service_backoff_seconds", "gauge",
	    "Delay before the next restart of a crashed proxy (0 unless in backoff).");
	TAILQ_FOREACH(sv, &sup->services, sv_entry) {
		labels(sv, lab, sizeof(lab));
		evbuffer_add_printf(b, "tpmail_service_backoff_seconds{%s} %d\n", lab,
		    sv->sv_state == SERVICE_BACKOFF ? sv->sv_backoff_now : 0);
	}
	head(b, "tpmail_reconcile_total", "counter",
	    "Reconcile passes of CRs and destinations.");
	evbuffer_add_printf(b, "tpmail_reconcile_total %lu\n", sup->reconciles);
	head(b, "tpmail_source_errors_total", "counter",
	    "CR files that could not be read or parsed, per pass.");
	evbuffer_add_printf(b, "tpmail_source_errors_total %lu\n",
	    sup->source_errors);
	head(b, "tpmail_destination_lookup_errors_total", "counter",
	    "Failed destination lookups (file unreadable, destination missing or invalid).");
	evbuffer_add_printf(b, "tpmail_destination_lookup_errors_total %lu\n",
	    sup->destination_errors);
	head(b, "tpmail_ready", "gauge", "1 when /readyz answers 200.");
	evbuffer_add_printf(b, "tpmail_ready %d\n", http_ready(why, sizeof(why)));

	for (i = 0; i < n; i++)
		json_decref(cs[i]);
	free(cs);
	http_reply(req, 200, "OK", b, "text/plain; version=0.0.4");
	evbuffer_free(b);
}

static struct accept_pause	*http_pause;

int
http_start(void)
{
	struct evhttp_bound_socket	*bound;
	char				*addr, *colon;
	long				 port;

	if (sup->st.http == NULL)
		return 0;
	addr = strdup(sup->st.http);
	if ((colon = strrchr(addr, ':')) == NULL) {
		free(addr);
		log_warnx("--http %s: expected ADDR:PORT", sup->st.http);
		return -1;
	}
	*colon = '\0';
	port = strtol(colon + 1, NULL, 10);
	if ((http = evhttp_new(sup->base)) == NULL ||
	    (bound = evhttp_bind_socket_with_handle(http, addr, port)) == NULL) {
		log_warn("cannot serve HTTP on %s", sup->st.http);
		free(addr);
		return -1;
	}
	free(addr);
	/* out of descriptors: stop accepting for a second, not spin */
	http_pause = accept_pause_new(sup->base,
	    evhttp_bound_socket_get_listener(bound), "HTTP", 1, NULL);
	evhttp_set_allowed_methods(http, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD);
	evhttp_set_cb(http, "/healthz", http_healthz, NULL);
	evhttp_set_cb(http, "/readyz", http_readyz, NULL);
	evhttp_set_cb(http, "/metrics", http_metrics, NULL);
	evhttp_set_timeout(http, 10);
	log_info("HTTP on %s: /healthz /readyz /metrics", sup->st.http);
	return 0;
}

void
http_stop(void)
{
	if (http != NULL)
		evhttp_free(http);
	http = NULL;
	accept_pause_free(http_pause);
	http_pause = NULL;
}
