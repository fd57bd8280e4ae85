/*
 * k8s_stream.c: what tpmaild does with the bytes of a Kubernetes watch
 * response.  The API server sends one JSON event per line,
 * {"type": "ADDED|MODIFIED|DELETED|BOOKMARK|ERROR", "object": {...}}, in
 * whatever chunks the network makes; lines are assembled here up to a
 * bound, and each event is applied to the store of objects the last list
 * filled, keyed "namespace/name", remembering the resourceVersion to
 * resume from.  An ERROR event (410 Gone once our version is compacted
 * away) or a line that is not JSON ends the watch: the caller lists again.
 * Events that make no sense (an unknown type, an object without a name)
 * are counted and otherwise ignored, so that a broken API server or a
 * proxy in between can never replace an object with nonsense.  No I/O:
 * k8s.c feeds it, and so does a fuzzer.  Runs in the supervisor.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "k8s_stream.h"

void
k8s_stream_init(struct k8s_stream *ks, size_t max_line)
{
	memset(ks, 0, sizeof(*ks));
	ks->ks_objects = json_object();
	ks->ks_max = max_line;
}

void
k8s_stream_free(struct k8s_stream *ks)
{
	json_decref(ks->ks_objects);
	free(ks->ks_rv);
	free(ks->ks_line);
	memset(ks, 0, sizeof(*ks));
}

void
k8s_stream_replace(struct k8s_stream *ks, json_t *objects, const char *rv)
{
	json_decref(ks->ks_objects);
	ks->ks_objects = objects;
	free(ks->ks_rv);
	ks->ks_rv = strdup(rv);
}

void
k8s_stream_forget_rv(struct k8s_stream *ks)
{
	free(ks->ks_rv);
	ks->ks_rv = NULL;
}

void
k8s_stream_begin(struct k8s_stream *ks)
{
	/* a huge line once is no reason to hold its buffer for good */
	if (ks->ks_cap > 65536) {
		free(ks->ks_line);
		ks->ks_line = NULL;
		ks->ks_cap = 0;
	}
	ks->ks_len = 0;
	ks->ks_events = 0;
	ks->ks_ignored = 0;
	ks->ks_ignored_why = NULL;
	ks->ks_error = NULL;
}

int
k8s_object_key(json_t *o, char *buf, size_t sz)
{
	json_t		*md = json_object_get(o, "metadata");
	const char	*ns = json_string_value(json_object_get(md, "namespace"));
	const char	*name = json_string_value(json_object_get(md, "name"));
	int		 n;

	/* exactly one '/' in a key, so that it splits back unambiguously */
	if (ns == NULL || name == NULL || ns[0] == '\0' || name[0] == '\0' ||
	    strchr(ns, '/') != NULL || strchr(name, '/') != NULL)
		return -1;
	n = snprintf(buf, sz, "%s/%s", ns, name);
	if (n < 0 || (size_t)n >= sz)
		return -1;
	return 0;
}

static int
stream_fail(struct k8s_stream *ks, const char *why)
{
	ks->ks_error = why;
	ks->ks_len = 0;
	return -1;
}

static void
stream_ignore(struct k8s_stream *ks, const char *why)
{
	ks->ks_ignored++;
	ks->ks_ignored_why = why;
}

static void
stream_take_rv(struct k8s_stream *ks, json_t *obj)
{
	const char	*rv = json_string_value(json_object_get(
			    json_object_get(obj, "metadata"), "resourceVersion"));
	char		*copy;

	if (rv == NULL || rv[0] == '\0' || (copy = strdup(rv)) == NULL)
		return;
	free(ks->ks_rv);
	ks->ks_rv = copy;
}

/* One event line, without its newline. */
static int
stream_event(struct k8s_stream *ks, const char *line, size_t len)
{
	json_error_t	 jerr;
	json_t		*ev, *obj;
	const char	*type;
	char		 key[K8S_KEY_MAX];
	size_t		 i;
	json_int_t	 code;

	/* an empty line (a keepalive, or the CR of a CRLF) is no event */
	for (i = 0; i < len; i++)
		if (line[i] != ' ' && line[i] != '\t' && line[i] != '\r')
			break;
	if (i == len)
		return 0;
	if ((ev = json_loadb(line, len, 0, &jerr)) == NULL)
		return stream_fail(ks, "malformed watch event");
	type = json_string_value(json_object_get(ev, "type"));
	obj = json_object_get(ev, "object");
	if (type == NULL || !json_is_object(obj)) {
		stream_ignore(ks, "an event without a type or an object");
		json_decref(ev);
		return 0;
	}
	if (strcmp(type, "ERROR") == 0) {
		code = json_integer_value(json_object_get(obj, "code"));
		json_decref(ev);
		/* 410 Gone: our version was compacted away; list again */
		return stream_fail(ks, code == 410 ? "watch expired (410)" :
		    "watch ERROR event");
	}
	if (strcmp(type, "BOOKMARK") == 0) {
		ks->ks_events++;
		stream_take_rv(ks, obj);
		json_decref(ev);
		return 0;
	}
	/* client-go does not apply what it does not understand; nor do we */
	if (strcmp(type, "ADDED") != 0 && strcmp(type, "MODIFIED") != 0 &&
	    strcmp(type, "DELETED") != 0) {
		stream_ignore(ks, "an unknown event type");
		json_decref(ev);
		return 0;
	}
	if (k8s_object_key(obj, key, sizeof(key)) == -1) {
		stream_ignore(ks, "an object without a namespace and a name");
		json_decref(ev);
		return 0;
	}
	if (type[0] == 'D') {
		if (json_object_del(ks->ks_objects, key) == 0)
			ks->ks_changed = 1;
	} else if (json_object_set(ks->ks_objects, key, obj) == 0)
		ks->ks_changed = 1;
	ks->ks_events++;
	stream_take_rv(ks, obj);
	json_decref(ev);
	return 0;
}

static int
stream_append(struct k8s_stream *ks, const char *data, size_t len)
{
	size_t	 cap;
	char	*nb;

	if (ks->ks_len + len > ks->ks_cap) {
		cap = ks->ks_cap ? ks->ks_cap : 256;
		while (cap < ks->ks_len + len)
			cap *= 2;
		if (cap > ks->ks_max)
			cap = ks->ks_max;
		if ((nb = realloc(ks->ks_line, cap)) == NULL)
			return -1;
		ks->ks_line = nb;
		ks->ks_cap = cap;
	}
	memcpy(ks->ks_line + ks->ks_len, data, len);
	ks->ks_len += len;
	return 0;
}

int
k8s_stream_feed(struct k8s_stream *ks, const char *data, size_t len)
{
	const char	*nl;
	size_t		 n;
	int		 r;

	if (ks->ks_error != NULL)
		return -1;
	while (len > 0) {
		nl = memchr(data, '\n', len);
		n = nl != NULL ? (size_t)(nl - data) : len;
		if (n > ks->ks_max - ks->ks_len)
			return stream_fail(ks, "watch event too long");
		if (nl != NULL && ks->ks_len == 0) {
			/* the usual case: a whole line in one chunk */
			if (stream_event(ks, data, n) == -1)
				return -1;
		} else {
			if (n > 0 && stream_append(ks, data, n) == -1)
				return stream_fail(ks, "out of memory");
			if (nl != NULL) {
				r = stream_event(ks, ks->ks_line, ks->ks_len);
				ks->ks_len = 0;
				if (r == -1)
					return -1;
			}
		}
		if (nl == NULL)
			break;
		data = nl + 1;
		len -= n + 1;
	}
	return 0;
}

int
k8s_stream_feed_line(struct k8s_stream *ks, const char *line, size_t len)
{
	if (ks->ks_error == NULL && ks->ks_len == 0 &&
	    memchr(line, '\n', len) == NULL) {
		if (len > ks->ks_max)
			return stream_fail(ks, "watch event too long");
		return stream_event(ks, line, len);
	}
	if (k8s_stream_feed(ks, line, len) == -1)
		return -1;
	return k8s_stream_feed(ks, "\n", 1);
}
