/*
 * stats.c: the tenant proxy's counters and histograms, as one JSON object
 * sent to tpmaild with every MSG_STATS.  tpmaild turns them into Prometheus
 * metrics and adds up the counters of a service's successive proxies.
 * Runs in the sandboxed tenant proxy; no I/O here.
 */
#include "proxy.h"

const double	stats_buckets[STATS_NBUCKETS] = {
	0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10,
	60, 600,
};

static const char *const outcome_names[OUTCOME_MAX] = {
	"ok", "client_closed", "login_failed", "idle_timeout", "error",
};
static const char *const upfail_names[UPFAIL_MAX] = {
	"connect", "tls", "auth", "timeout", "protocol",
};

void
stats_observe(struct histogram *h, double v)
{
	int	i;

	for (i = 0; i < STATS_NBUCKETS && v > stats_buckets[i]; i++)
		;
	h->h_counts[i]++;
	h->h_sum += v;
	h->h_count++;
}

static json_t *
histogram_json(const struct histogram *h)
{
	json_t	*b = json_array();
	int	 i;

	/* cumulative, as Prometheus wants them */
	unsigned long	acc = 0;

	for (i = 0; i <= STATS_NBUCKETS; i++) {
		acc += h->h_counts[i];
		json_array_append_new(b, json_integer(acc));
	}
	return json_pack("{s:o,s:f,s:I}", "buckets", b, "sum", h->h_sum,
	    "count", (json_int_t)h->h_count);
}

json_t *
stats_json(const struct proxy_stats *st)
{
	json_t	*out = json_object(), *up = json_object();
	int	 i;

	for (i = 0; i < OUTCOME_MAX; i++)
		json_object_set_new(out, outcome_names[i],
		    json_integer(st->st_outcome[i]));
	for (i = 0; i < UPFAIL_MAX; i++)
		json_object_set_new(up, upfail_names[i],
		    json_integer(st->st_upfail[i]));
	return json_pack("{s:I,s:I,s:o,s:o,s:I,s:I,s:o,s:o}",
	    "sessions", (json_int_t)st->st_total,
	    "refused", (json_int_t)st->st_refused,
	    "outcomes", out, "upstream_failures", up,
	    "bytes_to_client", (json_int_t)st->st_bytes_to_client,
	    "bytes_to_server", (json_int_t)st->st_bytes_to_server,
	    "session_duration", histogram_json(&st->st_duration),
	    "login_duration", histogram_json(&st->st_login));
}
