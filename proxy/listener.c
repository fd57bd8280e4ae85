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

#include "accept_pause.h"
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

/* A draining proxy accepts no more, whatever paused it before. */
static int
listener_may_resume(void)
{
	return proxy->listener != NULL && !proxy->draining;
}

void
listener_start(int fd)
{
	evutil_make_socket_nonblocking(fd);
	proxy->listener = evconnlistener_new(proxy->base, listener_accept_cb,
	    NULL, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, -1, fd);
	if (proxy->listener == NULL)
		fatalx("cannot listen on the passed socket");
	proxy->accept_pause = accept_pause_new(proxy->base, proxy->listener,
	    "client", PARAM_ACCEPT_PAUSE, listener_may_resume);
}

void
listener_stop(void)
{
	if (proxy->listener != NULL) {
		evconnlistener_free(proxy->listener);
		proxy->listener = NULL;
	}
}
