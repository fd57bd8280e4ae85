/*
 * Listeners that pause instead of spinning when accept() fails for want of
 * descriptors or memory: libevent's evconnlistener retries at once, on
 * every loop turn, while the condition lasts.
 */
#ifndef TPMAIL_ACCEPT_PAUSE_H
#define TPMAIL_ACCEPT_PAUSE_H

#include <event2/event.h>
#include <event2/listener.h>

struct accept_pause;

/*
 * Watch l's accept errors: on EMFILE, ENFILE, ENOBUFS or ENOMEM stop
 * accepting for `seconds`, then resume unless may_resume (if not NULL)
 * says no.  what names the listener in the log line.
 */
struct accept_pause	*accept_pause_new(struct event_base *,
			    struct evconnlistener *l, const char *what,
			    int seconds, int (*may_resume)(void));
void			 accept_pause_free(struct accept_pause *);

#endif
