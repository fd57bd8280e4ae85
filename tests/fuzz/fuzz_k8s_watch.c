/*
 * fuzz_k8s_watch: tpmaild's reader of a Kubernetes watch response
 * (supervisor/k8s_stream.c): newline-delimited JSON events applied to the
 * store of objects a list filled.
 *
 * Input: one byte choosing the longest line accepted (16 to 4096 bytes,
 * or 255 for the real K8S_STREAM_MAX_LINE), one byte steering the splits,
 * then the response body.  The body is fed four ways, each to a fresh
 * stream over the same listed objects: whole; in chunks whose sizes come
 * from the input; as the lines httpc hands over (k8s_stream_feed_line,
 * a last partial line through k8s_stream_feed); and a prefix of
 * input-chosen length through k8s_stream_feed, the rest as lines.  All
 * four must end in the same store, resourceVersion, verdict and counts as
 * a reference written from the watch protocol.  The store may only ever
 * hold objects under their own "namespace/name"; once a stream has failed
 * nothing changes it; a new watch on the same store works again.
 */
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "k8s_stream.h"

struct outcome {
	json_t		*objects;	/* borrowed */
	const char	*rv;
	const char	*error;
	unsigned long	 events;
	unsigned long	 ignored;
	int		 changed;
};

static json_t *
listed(void)
{
	return json_pack("{s:{s:{s:s,s:s,s:s}},s:{s:{s:s,s:s,s:s},s:{}}}",
	    "team-a/mail", "metadata", "namespace", "team-a", "name", "mail",
	    "resourceVersion", "10",
	    "team-a/shared", "metadata", "namespace", "team-a", "name", "shared",
	    "resourceVersion", "11", "spec");
}

static void
setup(struct k8s_stream *ks, size_t max)
{
	k8s_stream_init(ks, max);
	k8s_stream_replace(ks, listed(), "12");
	k8s_stream_begin(ks);
}

/* Only objects under their own key; a failed stream buffers nothing. */
static void
check_store(struct k8s_stream *ks)
{
	const char	*key;
	json_t		*o;
	char		 k[K8S_KEY_MAX];

	FUZZ_CHECK(ks->ks_len <= ks->ks_max, "%zu bytes buffered, max %zu",
	    ks->ks_len, ks->ks_max);
	FUZZ_CHECK(ks->ks_error == NULL || ks->ks_len == 0, "failed with %zu "
	    "bytes buffered", ks->ks_len);
	FUZZ_CHECK(ks->ks_rv != NULL && ks->ks_rv[0] != '\0', "no version");
	json_object_foreach(ks->ks_objects, key, o) {
		FUZZ_CHECK(json_is_object(o), "%s is not an object", key);
		FUZZ_CHECK(k8s_object_key(o, k, sizeof(k)) == 0 &&
		    strcmp(k, key) == 0, "%s stored under %s", k, key);
		FUZZ_CHECK(strchr(key, '/') == strrchr(key, '/') &&
		    strchr(key, '/') != NULL, "key %s", key);
	}
}

/* Feed; once failed, more bytes must change nothing. */
static void
feed(struct k8s_stream *ks, const char *b, size_t n, int line)
{
	char		*copy = fuzz_dup((const uint8_t *)b, n, 0);
	const char	*err = ks->ks_error;
	json_t		*before = err ? json_deep_copy(ks->ks_objects) : NULL;
	unsigned long	 events = ks->ks_events;
	int		 r;

	r = line ? k8s_stream_feed_line(ks, copy, n) :
	    k8s_stream_feed(ks, copy, n);
	free(copy);
	FUZZ_CHECK((r == -1) == (ks->ks_error != NULL), "returned %d, error %s",
	    r, ks->ks_error ? ks->ks_error : "none");
	if (err != NULL) {
		FUZZ_CHECK(ks->ks_error == err && ks->ks_events == events &&
		    json_equal(before, ks->ks_objects), "a failed stream "
		    "changed");
		json_decref(before);
	}
	check_store(ks);
}

/* The lines of b[0..n), each through feed_line; the rest through feed. */
static void
feed_lines(struct k8s_stream *ks, const char *b, size_t n)
{
	const char	*nl;

	while (n > 0 && (nl = memchr(b, '\n', n)) != NULL) {
		feed(ks, b, nl - b, 1);
		n -= nl - b + 1;
		b = nl + 1;
	}
	if (n > 0)
		feed(ks, b, n, 0);
}

static void
outcome(struct k8s_stream *ks, struct outcome *o)
{
	o->objects = ks->ks_objects;
	o->rv = ks->ks_rv;
	o->error = ks->ks_error;
	o->events = ks->ks_events;
	o->ignored = ks->ks_ignored;
	o->changed = ks->ks_changed;
}

static void
compare(const struct outcome *a, const struct outcome *b, const char *what)
{
	FUZZ_CHECK(json_equal(a->objects, b->objects), "%s: other objects",
	    what);
	FUZZ_CHECK(strcmp(a->rv, b->rv) == 0, "%s: version %s, reference %s",
	    what, a->rv, b->rv);
	FUZZ_CHECK((a->error == NULL) == (b->error == NULL) &&
	    (a->error == NULL || strcmp(a->error, b->error) == 0),
	    "%s: error %s, reference %s", what, a->error ? a->error : "none",
	    b->error ? b->error : "none");
	FUZZ_CHECK(a->events == b->events && a->ignored == b->ignored,
	    "%s: %lu events %lu ignored, reference %lu and %lu", what,
	    a->events, a->ignored, b->events, b->ignored);
	FUZZ_CHECK(a->changed == b->changed, "%s: changed %d, reference %d",
	    what, a->changed, b->changed);
}

/* The reference's idea of an object's key. */
static int
ref_key(json_t *obj, char *k, size_t sz)
{
	json_t		*md = json_object_get(obj, "metadata");
	json_t		*ns = json_object_get(md, "namespace");
	json_t		*name = json_object_get(md, "name");
	size_t		 nl, ml;

	if (!json_is_string(ns) || !json_is_string(name))
		return -1;
	nl = json_string_length(ns);
	ml = json_string_length(name);
	if (nl == 0 || ml == 0 || nl + 1 + ml >= sz ||
	    memchr(json_string_value(ns), '/', nl) != NULL ||
	    memchr(json_string_value(name), '/', ml) != NULL)
		return -1;
	memcpy(k, json_string_value(ns), nl);
	k[nl] = '/';
	memcpy(k + nl + 1, json_string_value(name), ml + 1);
	return 0;
}

/* From the protocol: split at every LF, then apply each event in turn. */
static void
reference(const char *b, size_t n, size_t max, struct outcome *o,
    char **rvp)
{
	size_t		 start = 0, end, i;
	const char	*line, *type, *rv;
	json_t		*ev, *obj, *md;
	json_error_t	 jerr;
	char		 k[K8S_KEY_MAX];

	while (start < n && o->error == NULL) {
		line = b + start;
		for (end = start; end < n && b[end] != '\n'; end++)
			;
		if (end - start > max) {
			o->error = "watch event too long";
			break;
		}
		if (end == n)		/* no newline yet: not an event */
			break;
		start = end + 1;
		for (i = 0; line + i < b + end; i++)
			if (line[i] != ' ' && line[i] != '\t' && line[i] != '\r')
				break;
		if (line + i == b + end)
			continue;
		if ((ev = json_loadb(line, b + end - line, 0, &jerr)) == NULL) {
			o->error = "malformed watch event";
			break;
		}
		type = json_string_value(json_object_get(ev, "type"));
		obj = json_object_get(ev, "object");
		md = json_object_get(obj, "metadata");
		rv = json_string_value(json_object_get(md, "resourceVersion"));
		if (type == NULL || !json_is_object(obj))
			o->ignored++;
		else if (strcmp(type, "ERROR") == 0)
			o->error = json_integer_value(json_object_get(obj,
			    "code")) == 410 ? "watch expired (410)" :
			    "watch ERROR event";
		else if (strcmp(type, "ADDED") && strcmp(type, "MODIFIED") &&
		    strcmp(type, "DELETED") && strcmp(type, "BOOKMARK"))
			o->ignored++;
		else if (strcmp(type, "BOOKMARK") && ref_key(obj, k,
		    sizeof(k)) == -1)
			o->ignored++;
		else {
			if (strcmp(type, "DELETED") == 0) {
				if (json_object_get(o->objects, k) != NULL)
					o->changed = 1;
				json_object_del(o->objects, k);
			} else if (strcmp(type, "BOOKMARK") != 0) {
				json_object_set(o->objects, k, obj);
				o->changed = 1;
			}
			o->events++;
			if (rv != NULL && rv[0] != '\0') {
				free(*rvp);
				*rvp = strdup(rv);
				o->rv = *rvp;
			}
		}
		json_decref(ev);
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const char	*bookmark = "{\"type\":\"BOOKMARK\","
	    "\"object\":{\"metadata\":{\"resourceVersion\":\"99\"}}}\n";
	struct k8s_stream	 ks[4];
	struct outcome		 out[4], ref;
	const char		*b = (const char *)data + 2;
	char			*rv = NULL;
	size_t			 n, max, pos, c, i;
	unsigned		 seed;

	if (size < 2)
		return 0;
	max = data[0] == 255 ? K8S_STREAM_MAX_LINE : 16 + (size_t)data[0] * 16;
	seed = data[1];
	n = size - 2;
	for (i = 0; i < 4; i++)
		setup(&ks[i], max);

	feed(&ks[0], b, n, 0);
	for (pos = 0; pos < n; pos += c) {
		c = 1 + ((unsigned char)b[pos] * 31u + seed) % 97;
		if (c > n - pos)
			c = n - pos;
		feed(&ks[1], b + pos, c, 0);
	}
	feed_lines(&ks[2], b, n);
	c = n ? seed % (n + 1) : 0;
	feed(&ks[3], b, c, 0);
	feed_lines(&ks[3], b + c, n - c);

	memset(&ref, 0, sizeof(ref));
	ref.objects = listed();
	ref.rv = "12";
	reference(b, n, max, &ref, &rv);
	for (i = 0; i < 4; i++) {
		static const char *const what[] = {
			"whole", "chunks", "lines", "prefix and lines"
		};

		outcome(&ks[i], &out[i]);
		compare(&out[i], &ref, what[i]);
	}
	json_decref(ref.objects);
	free(rv);

	/* the next watch on the same store, after a failure or not */
	k8s_stream_begin(&ks[0]);
	if (max >= strlen(bookmark)) {
		feed(&ks[0], bookmark, strlen(bookmark), 0);
		FUZZ_CHECK(ks[0].ks_error == NULL && ks[0].ks_events == 1 &&
		    strcmp(ks[0].ks_rv, "99") == 0, "a new watch after %s",
		    out[1].error ? out[1].error : "none");
	}
	for (i = 0; i < 4; i++)
		k8s_stream_free(&ks[i]);
	return 0;
}
