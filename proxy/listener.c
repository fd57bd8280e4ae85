/*
 * listener.c: accepting clients on the listening socket the supervisor
 * bound and passed.  Enforces the per-service session cap (excess clients
 * get -ERR [SYS/TEMP] at once, never a hang) and pauses accepting for a
 * moment when the process runs out of descriptors, instead of spinning.
 * Runs unprivileged in the sandboxed tenant proxy.
 */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/listener.h>

#include "log.h"
#include "params.h"
#include "proxy.h"

static const char	busy_reply[] =
    "-ERR [SYS/TEMP] Too many sessions for this service, try again later\r\n";

static void
listener_accept_cb(struct evconnlistener *l, evutil_socket_t fd,
    struct sockaddr *sa, int salen, void *arg)
{
	ssize_t	n;

	if (proxy->draining) {
		close(fd);
		return;
	}
	if (proxy->active >= (unsigned int)proxy->cfg->max_sessions) {
		/* best effort: a fresh socket's send buffer takes this line */
		n = send(fd, busy_reply, sizeof(busy_reply) - 1,
		    MSG_DONTWAIT | MSG_NOSIGNAL);
		(void)n;
		close(fd);
		proxy_session_refused();
		log_warnx("refused a client: %u sessions active (max_sessions)",
		    proxy->active);
		return;
	}
	session_new(fd, proxy->cfg);
}

static void
listener_resume_cb(evutil_socket_t fd, short ev, void *arg)
{
	if (proxy->listener != NULL && !proxy->draining)
		evconnlistener_enable(proxy->listener);
}

static void
listener_error_cb(struct evconnlistener *l, void *arg)
{
	int	err = EVUTIL_SOCKET_ERROR();

	if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
		log_warnx("accept: %s; pausing for %d s", strerror(err),
		    PARAM_ACCEPT_PAUSE);
		evconnlistener_disable(l);
		event_add(proxy->accept_pause,
		    &(struct timeval){ PARAM_ACCEPT_PAUSE, 0 });
		return;
	}
	log_warnx("accept: %s", strerror(err));
}

void
listener_start(int fd)
{
	evutil_make_socket_nonblocking(fd);
	proxy->listener = evconnlistener_new(proxy->base, listener_accept_cb,
	    NULL, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, -1, fd);
	if (proxy->listener == NULL)
		fatalx("cannot listen on the passed socket");
	evconnlistener_set_error_cb(proxy->listener, listener_error_cb);
	proxy->accept_pause = evtimer_new(proxy->base, listener_resume_cb, NULL);
}

void
listener_stop(void)
{
	if (proxy->listener != NULL) {
		evconnlistener_free(proxy->listener);
		proxy->listener = NULL;
	}
}
