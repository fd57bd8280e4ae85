/*
 * k8s_stream.h: the client side of a Kubernetes watch, with no I/O: the
 * newline-delimited JSON events of a watch response, applied to the store
 * of objects a list filled, as client-go's reflector applies them.  Pure,
 * so that it can be fuzzed.
 */
#ifndef TPMAIL_K8S_STREAM_H
#define TPMAIL_K8S_STREAM_H

#include <stddef.h>

#include <jansson.h>

/*
 * The longest event line read.  etcd stores objects of up to 1.5 MiB, so
 * no real event comes near; a longer line means the stream is not what
 * it claims to be.
 */
#define K8S_STREAM_MAX_LINE	(2 * 1024 * 1024)

/* "namespace/name": a namespace is at most 63 bytes, a name 253. */
#define K8S_KEY_MAX		320

struct k8s_stream {
	json_t		*ks_objects;	/* "ns/name" -> object */
	char		*ks_rv;		/* resourceVersion to resume from */
	char		*ks_line;	/* the incomplete line so far */
	size_t		 ks_len;
	size_t		 ks_cap;
	size_t		 ks_max;	/* longest line accepted */
	unsigned long	 ks_events;	/* applied by this watch, bookmarks too */
	unsigned long	 ks_ignored;	/* events that make no sense to us */
	const char	*ks_ignored_why; /* the last one's reason */
	int		 ks_changed;	/* objects changed; the caller clears it */
	const char	*ks_error;	/* why the watch must end: list again */
};

void	k8s_stream_init(struct k8s_stream *, size_t max_line);
void	k8s_stream_free(struct k8s_stream *);

/* A complete list: its objects (taken over) and its resourceVersion. */
void	k8s_stream_replace(struct k8s_stream *, json_t *objects,
	    const char *rv);

/* Forget the resourceVersion: the next watch needs a list first. */
void	k8s_stream_forget_rv(struct k8s_stream *);

/* A new watch response begins (from ks_rv). */
void	k8s_stream_begin(struct k8s_stream *);

/*
 * Bytes of the response as they arrive, in any chunks.  Returns 0, or -1
 * once the watch must end and the objects be listed again (ks_error says
 * why: an ERROR event such as 410 Gone, a line that is not JSON, a line
 * over the limit); after that every call returns -1 and changes nothing.
 */
int	k8s_stream_feed(struct k8s_stream *, const char *, size_t);

/* The same for one whole line that the transport split already. */
int	k8s_stream_feed_line(struct k8s_stream *, const char *, size_t);

/*
 * An object's key in the store, "namespace/name", into buf (at least
 * K8S_KEY_MAX bytes).  -1 for an object without a name and a namespace:
 * nothing tpmail watches is cluster-scoped.
 */
int	k8s_object_key(json_t *, char *buf, size_t);

#endif
