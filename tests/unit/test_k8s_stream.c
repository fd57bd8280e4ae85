/*
 * test_k8s_stream.c: unit tests for supervisor/k8s_stream.c, the reader
 * of Kubernetes watch responses: events split anywhere, bookmarks, ERROR
 * and 410, and the events that must be ignored.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "k8s_stream.h"

#define EV(type, ns, name, rv) "{\"type\":\"" type "\",\"object\":{" \
	"\"metadata\":{\"namespace\":\"" ns "\",\"name\":\"" name "\"," \
	"\"resourceVersion\":\"" rv "\"}}}\n"

/* A store listed at version 12 with team-a/mail. */
static void
listed(struct k8s_stream *ks, size_t max)
{
	k8s_stream_init(ks, max);
	k8s_stream_replace(ks, json_pack("{s:{s:{s:s,s:s}}}", "team-a/mail",
	    "metadata", "namespace", "team-a", "name", "mail"), "12");
	k8s_stream_begin(ks);
}

static int
feed(struct k8s_stream *ks, const char *s)
{
	return k8s_stream_feed(ks, s, strlen(s));
}

static void
test_events_split_anywhere(void **state)
{
	static const char	stream[] = EV("ADDED", "team-a", "new", "13")
	    EV("MODIFIED", "team-a", "new", "14")
	    EV("DELETED", "team-a", "mail", "15")
	    EV("ADDED", "team-b", "other", "16");
	struct k8s_stream	ks;
	size_t			i, j, n = strlen(stream);

	/* every pair of split points: three chunks */
	for (i = 0; i <= n; i += 7) {
		for (j = i; j <= n; j += 5) {
			listed(&ks, K8S_STREAM_MAX_LINE);
			assert_int_equal(k8s_stream_feed(&ks, stream, i), 0);
			assert_int_equal(k8s_stream_feed(&ks, stream + i, j - i), 0);
			assert_int_equal(k8s_stream_feed(&ks, stream + j, n - j), 0);
			assert_int_equal(ks.ks_events, 4);
			assert_int_equal(ks.ks_changed, 1);
			assert_string_equal(ks.ks_rv, "16");
			assert_int_equal(json_object_size(ks.ks_objects), 2);
			assert_non_null(json_object_get(ks.ks_objects, "team-a/new"));
			assert_non_null(json_object_get(ks.ks_objects,
			    "team-b/other"));
			assert_string_equal(json_string_value(json_object_get(
			    json_object_get(json_object_get(ks.ks_objects,
			    "team-a/new"), "metadata"), "resourceVersion")), "14");
			k8s_stream_free(&ks);
		}
	}
}

static void
test_lines_as_httpc_splits_them(void **state)
{
	struct k8s_stream	ks;
	static const char	line[] = "{\"type\":\"ADDED\",\"object\":{"
	    "\"metadata\":{\"namespace\":\"n\",\"name\":\"x\"}}}";

	listed(&ks, K8S_STREAM_MAX_LINE);
	assert_int_equal(k8s_stream_feed_line(&ks, line, strlen(line)), 0);
	/* a partial line first: the next line completes it */
	assert_int_equal(k8s_stream_feed(&ks, line, 10), 0);
	assert_int_equal(k8s_stream_feed_line(&ks, line + 10,
	    strlen(line) - 10), 0);
	assert_int_equal(k8s_stream_feed_line(&ks, "", 0), 0);
	assert_int_equal(ks.ks_events, 2);
	assert_non_null(json_object_get(ks.ks_objects, "n/x"));
	k8s_stream_free(&ks);
}

static void
test_bookmark(void **state)
{
	struct k8s_stream	ks;

	listed(&ks, K8S_STREAM_MAX_LINE);
	assert_int_equal(feed(&ks, "{\"type\":\"BOOKMARK\",\"object\":{"
	    "\"kind\":\"Destination\",\"metadata\":{\"resourceVersion\":"
	    "\"99\"}}}\r\n\n  \r\n"), 0);
	assert_string_equal(ks.ks_rv, "99");
	assert_int_equal(ks.ks_events, 1);
	assert_int_equal(ks.ks_changed, 0);
	assert_int_equal(json_object_size(ks.ks_objects), 1);
	k8s_stream_free(&ks);
}

/* Finding 6: an unknown type must never replace an object. */
static void
test_unknown_type_ignored(void **state)
{
	struct k8s_stream	ks;
	json_t			*before;

	listed(&ks, K8S_STREAM_MAX_LINE);
	before = json_deep_copy(ks.ks_objects);
	assert_int_equal(feed(&ks, EV("EXPLODED", "team-a", "mail", "40")
	    EV("added", "team-a", "ghost", "41")), 0);
	assert_true(json_equal(before, ks.ks_objects));
	assert_string_equal(ks.ks_rv, "12");
	assert_int_equal(ks.ks_events, 0);
	assert_int_equal(ks.ks_ignored, 2);
	assert_string_equal(ks.ks_ignored_why, "an unknown event type");
	assert_int_equal(ks.ks_changed, 0);
	json_decref(before);
	k8s_stream_free(&ks);
}

static void
test_nameless_ignored(void **state)
{
	static const char *const bad[] = {
		"{\"type\":\"ADDED\",\"object\":{\"kind\":\"Destination\"}}\n",
		"{\"type\":\"ADDED\",\"object\":{\"metadata\":{\"name\":\"x\"}}}\n",
		"{\"type\":\"ADDED\",\"object\":{\"metadata\":{\"namespace\":"
		    "\"n\"}}}\n",
		"{\"type\":\"MODIFIED\",\"object\":{\"metadata\":{\"name\":5,"
		    "\"namespace\":[\"x\"]}}}\n",
		"{\"type\":\"DELETED\",\"object\":{\"metadata\":{\"name\":null,"
		    "\"namespace\":\"team-a\"}}}\n",
		EV("ADDED", "", "x", "50"),
		EV("ADDED", "n", "", "51"),
		EV("ADDED", "n/m", "x", "52"),
		EV("DELETED", "team-a", "mail/x", "53"),
		"{\"type\":\"ADDED\",\"object\":\"not an object\"}\n",
		"{\"type\":null,\"object\":{}}\n",
		"[1,2]\n",
	};
	struct k8s_stream	ks;
	size_t			i;

	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		listed(&ks, K8S_STREAM_MAX_LINE);
		assert_int_equal(feed(&ks, bad[i]), 0);
		assert_int_equal(ks.ks_ignored, 1);
		assert_int_equal(ks.ks_events, 0);
		assert_int_equal(json_object_size(ks.ks_objects), 1);
		assert_string_equal(ks.ks_rv, "12");
		k8s_stream_free(&ks);
	}
}

static void
test_error_events(void **state)
{
	struct k8s_stream	ks;

	listed(&ks, K8S_STREAM_MAX_LINE);
	assert_int_equal(feed(&ks, EV("ADDED", "n", "a", "13")
	    "{\"type\":\"ERROR\",\"object\":{\"kind\":\"Status\",\"status\":"
	    "\"Failure\",\"reason\":\"Expired\",\"code\":410}}\n"
	    EV("ADDED", "n", "b", "14")), -1);
	assert_string_equal(ks.ks_error, "watch expired (410)");
	/* what came before counts; nothing after it does */
	assert_non_null(json_object_get(ks.ks_objects, "n/a"));
	assert_null(json_object_get(ks.ks_objects, "n/b"));
	assert_string_equal(ks.ks_rv, "13");
	assert_int_equal(feed(&ks, EV("ADDED", "n", "c", "15")), -1);
	assert_null(json_object_get(ks.ks_objects, "n/c"));
	/* the next watch starts clean */
	k8s_stream_begin(&ks);
	assert_null(ks.ks_error);
	assert_int_equal(feed(&ks, EV("ADDED", "n", "c", "15")), 0);
	assert_non_null(json_object_get(ks.ks_objects, "n/c"));
	k8s_stream_free(&ks);

	listed(&ks, K8S_STREAM_MAX_LINE);
	assert_int_equal(feed(&ks, "{\"type\":\"ERROR\",\"object\":{\"code\":"
	    "500}}\n"), -1);
	assert_string_equal(ks.ks_error, "watch ERROR event");
	k8s_stream_free(&ks);

	listed(&ks, K8S_STREAM_MAX_LINE);
	assert_int_equal(feed(&ks, "this is not JSON {\n"), -1);
	assert_string_equal(ks.ks_error, "malformed watch event");
	k8s_stream_free(&ks);
}

static void
test_line_bound(void **state)
{
	struct k8s_stream	ks;
	char			line[200];
	size_t			i;

	/* exactly the bound is fine, one more is not, even before its LF */
	memset(line, ' ', sizeof(line));
	memcpy(line, EV("ADDED", "n", "x", "1"), strlen(EV("ADDED", "n", "x",
	    "1")) - 1);
	listed(&ks, 100);
	assert_int_equal(k8s_stream_feed(&ks, line, 100), 0);
	assert_int_equal(k8s_stream_feed(&ks, "\n", 1), 0);
	assert_int_equal(ks.ks_events, 1);
	for (i = 0; i < 100; i++)
		assert_int_equal(k8s_stream_feed(&ks, line + i, 1), 0);
	assert_int_equal(k8s_stream_feed(&ks, " ", 1), -1);
	assert_string_equal(ks.ks_error, "watch event too long");
	assert_int_equal(ks.ks_len, 0);
	k8s_stream_free(&ks);
	listed(&ks, 100);
	assert_int_equal(k8s_stream_feed_line(&ks, line, 101), -1);
	assert_string_equal(ks.ks_error, "watch event too long");
	k8s_stream_free(&ks);
}

static void
test_object_key(void **state)
{
	json_t	*o = json_pack("{s:{s:s,s:s}}", "metadata", "namespace",
		    "team-a", "name", "mail");
	char	 k[K8S_KEY_MAX], small[8];

	assert_int_equal(k8s_object_key(o, k, sizeof(k)), 0);
	assert_string_equal(k, "team-a/mail");
	/* never a truncated key: two long names must not collide */
	assert_int_equal(k8s_object_key(o, small, sizeof(small)), -1);
	json_decref(o);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_events_split_anywhere),
		cmocka_unit_test(test_lines_as_httpc_splits_them),
		cmocka_unit_test(test_bookmark),
		cmocka_unit_test(test_unknown_type_ignored),
		cmocka_unit_test(test_nameless_ignored),
		cmocka_unit_test(test_error_events),
		cmocka_unit_test(test_line_bound),
		cmocka_unit_test(test_object_key),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
