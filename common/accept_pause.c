#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "accept_pause.h"
#include "log.h"

struct accept_pause {
	struct accept_pause	*ap_next;
	struct evconnlistener	*ap_listener;
	struct event		*ap_timer;
	const char		*ap_what;
	int			 ap_seconds;
	int			(*ap_may_resume)(void);
};

/*
 * An evconnlistener hands its error callback the accept callback's
 * argument, which belongs to the listener's owner: find ours by listener.
 */
static struct accept_pause	*pauses;

static void
accept_pause_resume_cb(evutil_socket_t fd, short ev, void *arg)
{
	struct accept_pause	*ap = arg;

	if (ap->ap_may_resume == NULL || ap->ap_may_resume())
		evconnlistener_enable(ap->ap_listener);
}

static void
accept_pause_error_cb(struct evconnlistener *l, void *arg)
{
	struct accept_pause	*ap;
	int			 err = EVUTIL_SOCKET_ERROR();

	for (ap = pauses; ap != NULL && ap->ap_listener != l; ap = ap->ap_next)
		;
	if (ap == NULL)
		return;
	if (err != EMFILE && err != ENFILE && err != ENOBUFS && err != ENOMEM) {
		/* the peer's problem (ECONNABORTED...): the next one may do */
		log_warnx("%s accept: %s", ap->ap_what, strerror(err));
		return;
	}
	log_warnx("%s accept: %s; pausing for %d s", ap->ap_what, strerror(err),
	    ap->ap_seconds);
	evconnlistener_disable(l);
	event_add(ap->ap_timer, &(struct timeval){ ap->ap_seconds, 0 });
}

struct accept_pause *
accept_pause_new(struct event_base *base, struct evconnlistener *l,
    const char *what, int seconds, int (*may_resume)(void))
{
	struct accept_pause	*ap;

	if ((ap = calloc(1, sizeof(*ap))) == NULL)
		return NULL;
	if ((ap->ap_timer = evtimer_new(base, accept_pause_resume_cb, ap)) ==
	    NULL) {
		free(ap);
		return NULL;
	}
	ap->ap_listener = l;
	ap->ap_what = what;
	ap->ap_seconds = seconds;
	ap->ap_may_resume = may_resume;
	ap->ap_next = pauses;
	pauses = ap;
	evconnlistener_set_error_cb(l, accept_pause_error_cb);
	return ap;
}

void
accept_pause_free(struct accept_pause *ap)
{
	struct accept_pause	**pp;

	if (ap == NULL)
		return;
	for (pp = &pauses; *pp != NULL; pp = &(*pp)->ap_next)
		if (*pp == ap) {
			*pp = ap->ap_next;
			break;
		}
	event_free(ap->ap_timer);
	free(ap);
}
