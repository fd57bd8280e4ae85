/*
 * bev_send.c: sending a short line on a plain socket bufferevent without
 * the write event.  Through libevent 2.1 each bufferevent_write arms the
 * write event (an epoll_ctl), waits a loop turn for it, writes, and
 * disarms it (another epoll_ctl): for the handful of command lines of a
 * session that was a third of its system calls.  When nothing is queued
 * before it, the line is written at once; whatever the socket does not
 * take (or an error, which the bufferevent then reports) goes the usual
 * way.  Runs in the sandboxed tenant proxy.
 */
#include <errno.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>

#include "proxy.h"

/* How much of data went out directly (0: queue all of it). */
static size_t
bev_send_direct(struct bufferevent *bev, const void *data, size_t len)
{
	evutil_socket_t	fd = bufferevent_getfd(bev);
	ssize_t		n;

	if (fd == -1 || evbuffer_get_length(bufferevent_get_output(bev)) > 0 ||
	    !(bufferevent_get_enabled(bev) & EV_WRITE) ||
	    bufferevent_openssl_get_ssl(bev) != NULL)
		return 0;
	do
		n = write(fd, data, len);
	while (n == -1 && errno == EINTR);
	return n > 0 ? (size_t)n : 0;
}

void
bev_send(struct bufferevent *bev, const void *data, size_t len)
{
	size_t	n = bev_send_direct(bev, data, len);

	if (n < len)
		bufferevent_write(bev, (const char *)data + n, len - n);
}

/*
 * The same for a line that holds a secret, allocated with secret_alloc:
 * freed (and wiped) once written, now or when the queue has sent it.
 */
void
bev_send_secret(struct bufferevent *bev, char *line, size_t len,
    evbuffer_ref_cleanup_cb done)
{
	size_t	n = bev_send_direct(bev, line, len);

	if (n == len) {
		done(line, len, line);
		return;
	}
	if (evbuffer_add_reference(bufferevent_get_output(bev), line + n,
	    len - n, done, line) == -1)
		done(line, len, line);
}
