/*
 * main.c: tpmail-pop3, the tenant proxy.  Started by tpmaild with fork and
 * exec (see include/proto.h for the launch contract), one process per tenant
 * service.  It receives its listening socket and configuration over the
 * channel on fd 3, then serves POP3 sessions with libevent until the
 * channel closes or a DRAIN arrives.  It never runs as a standalone server.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/dns.h>
#include <event2/event.h>
#include <openssl/ssl.h>

#include "log.h"
#include "msg.h"
#include "params.h"
#include "proxy.h"
#include "secret.h"

struct proxy	*proxy;

static void
proxy_send(int type, json_t *body)
{
	if (msg_send(proxy->chan, type, body, -1) == -1 && errno != EPIPE)
		log_warn("channel send %s", msg_type_name(type));
	json_decref(body);
}

static void
proxy_send_stats(void)
{
	proxy_send(MSG_STATS, json_pack("{s:I,s:I,s:I}", "active",
	    (json_int_t)proxy->active, "total", (json_int_t)proxy->total,
	    "failed", (json_int_t)proxy->failed));
}

void
proxy_session_opened(void)
{
	proxy->active++;
	proxy->total++;
	proxy_send_stats();
}

void
proxy_session_closed(int failed, const char *error)
{
	proxy->active--;
	if (failed)
		proxy->failed++;
	if (error != NULL)
		proxy_send(MSG_EVENT, json_pack("{s:s}", "error", error));
	proxy_send_stats();
	if (proxy->draining && proxy->active == 0)
		event_base_loopexit(proxy->base, NULL);
}

static void
proxy_drain_timeout_cb(evutil_socket_t fd, short ev, void *arg)
{
	log_warnx("drain grace period over with %u sessions open; exiting",
	    proxy->active);
	event_base_loopexit(proxy->base, NULL);
}

/* Stop accepting; exit once the open sessions are done or the grace ends. */
static void
proxy_drain(int grace, const char *why)
{
	if (proxy->draining)
		return;
	proxy->draining = 1;
	log_info("draining (%s): %u sessions open, grace %d s", why,
	    proxy->active, grace);
	listener_stop();
	if (proxy->active == 0) {
		event_base_loopexit(proxy->base, NULL);
		return;
	}
	proxy->drain_timer = evtimer_new(proxy->base, proxy_drain_timeout_cb, NULL);
	event_add(proxy->drain_timer, &(struct timeval){ grace, 0 });
}

static void
proxy_apply_log_level(json_t *body)
{
	const char	*lvl = json_string_value(json_object_get(body, "log_level"));
	int		 l;

	if (lvl != NULL && (l = log_level_parse(lvl)) != -1)
		log_set_level(l);
}

static void
proxy_dispatch(evutil_socket_t fd, short ev, void *arg)
{
	struct proxy_config	*c;
	struct msg		 m;
	const char		*err;
	json_int_t		 grace;
	int			 r;

	r = msg_recv(proxy->chan, &m, &err);
	if (r == -1 && (errno == EAGAIN || errno == EINTR))
		return;
	if (r == 0 || r == -1) {
		event_del(proxy->chan_ev);
		proxy_drain(PARAM_DRAIN_GRACE, "supervisor gone");
		return;
	}
	if (r == -2)
		fatalx("malformed message from the supervisor: %s", err);
	switch (m.type) {
	case MSG_UPDATE:
		/* new sessions use it; open ones keep the one they began with */
		if ((c = config_parse(m.body, &err)) == NULL)
			fatalx("bad UPDATE from the supervisor: %s", err);
		config_unref(proxy->cfg);
		proxy->cfg = c;
		proxy_apply_log_level(m.body);
		log_info("configuration updated");
		break;
	case MSG_DRAIN:
		grace = json_integer_value(json_object_get(m.body, "grace"));
		proxy_drain(grace > 0 ? (int)grace : PARAM_DRAIN_GRACE, "asked");
		break;
	case MSG_STATS_REQ:
		proxy_send_stats();
		break;
	default:
		fatalx("unexpected %s from the supervisor", msg_type_name(m.type));
	}
	msg_free(&m);
}

/* Wait for the one CONFIG message, with the listening socket attached. */
static int
proxy_receive_config(void)
{
	struct pollfd	 pfd = { .fd = proxy->chan, .events = POLLIN };
	struct msg	 m;
	const char	*err;
	int		 r, fd;

	r = poll(&pfd, 1, PARAM_CONFIG_TIMEOUT * 1000);
	if (r == 0)
		fatalx("no configuration from the supervisor within %d s",
		    PARAM_CONFIG_TIMEOUT);
	if (r == -1)
		fatal("poll");
	r = msg_recv(proxy->chan, &m, &err);
	if (r == 0)
		fatalx("supervisor closed the channel before configuring us");
	if (r == -1)
		fatal("channel receive");
	if (r == -2)
		fatalx("malformed message from the supervisor: %s", err);
	if (m.type != MSG_CONFIG || m.fd == -1)
		fatalx("expected CONFIG with a socket, got %s",
		    msg_type_name(m.type));
	if ((proxy->cfg = config_parse(m.body, &err)) == NULL)
		fatalx("bad CONFIG from the supervisor: %s", err);
	proxy_apply_log_level(m.body);
	fd = m.fd;
	m.fd = -1;
	msg_free(&m);
	return fd;
}

/* What needs no privilege and must hold before any network byte is read. */
static void
proxy_harden(void)
{
	struct rlimit	rl = { 0, 0 };

	if (setrlimit(RLIMIT_CORE, &rl) == -1)
		fatal("setrlimit(RLIMIT_CORE)");
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == -1)
		fatal("prctl(PR_SET_DUMPABLE)");
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == -1)
		fatal("prctl(PR_SET_NO_NEW_PRIVS)");
	if (prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0) == -1)
		fatal("prctl(PR_SET_PDEATHSIG)");
}

/* The channel must be a SOCK_SEQPACKET socket: we were started by tpmaild. */
static int
fcntl_check_channel(int fd)
{
	int		type;
	socklen_t	len = sizeof(type);

	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == -1)
		return -1;
	return type == SOCK_SEQPACKET ? 0 : -1;
}

static void
proxy_signal_cb(evutil_socket_t sig, short ev, void *arg)
{
	proxy_drain(PARAM_DRAIN_GRACE, "signal");
}

int
main(int argc, char *argv[])
{
	struct event	*sigterm, *sigint;
	char		 ctx[300];
	int		 lfd;

	log_init("tpmail-pop3", LOG_LEVEL_INFO);
	if (argc != 2)
		fatalx("usage: tpmail-pop3 <namespace>/<service> (started by "
		    "tpmaild, with its channel on fd %d)", PROTO_CHANNEL_FD);
	snprintf(ctx, sizeof(ctx), "service=%s", argv[1]);
	log_set_context(ctx);
	secret_install();
	signal(SIGPIPE, SIG_IGN);
	proxy_harden();

	if ((proxy = calloc(1, sizeof(*proxy))) == NULL)
		fatal("calloc");
	proxy->chan = PROTO_CHANNEL_FD;
	if (fcntl_check_channel(proxy->chan) == -1)
		fatalx("no channel on fd %d: tpmail-pop3 is started by tpmaild",
		    PROTO_CHANNEL_FD);
	proxy_send(MSG_HELLO, json_pack("{s:i}", "pid", (int)getpid()));
	lfd = proxy_receive_config();

	if ((proxy->base = event_base_new()) == NULL)
		fatalx("event_base_new");
	proxy->dns = evdns_base_new(proxy->base,
	    EVDNS_BASE_INITIALIZE_NAMESERVERS | EVDNS_BASE_DISABLE_WHEN_INACTIVE);
	listener_start(lfd);
	evutil_make_socket_nonblocking(proxy->chan);
	proxy->chan_ev = event_new(proxy->base, proxy->chan, EV_READ | EV_PERSIST,
	    proxy_dispatch, NULL);
	event_add(proxy->chan_ev, NULL);
	sigterm = evsignal_new(proxy->base, SIGTERM, proxy_signal_cb, NULL);
	sigint = evsignal_new(proxy->base, SIGINT, proxy_signal_cb, NULL);
	evsignal_add(sigterm, NULL);
	evsignal_add(sigint, NULL);
	proxy_send(MSG_READY, json_object());
	log_info("serving upstream=%s:%d max_sessions=%d", proxy->cfg->host,
	    proxy->cfg->port, proxy->cfg->max_sessions);

	event_base_dispatch(proxy->base);

	log_info("exiting: sessions total=%lu failed=%lu", proxy->total,
	    proxy->failed);
	listener_stop();
	config_unref(proxy->cfg);
	event_free(sigterm);
	event_free(sigint);
	if (proxy->chan_ev)
		event_free(proxy->chan_ev);
	if (proxy->drain_timer)
		event_free(proxy->drain_timer);
	if (proxy->accept_pause)
		event_free(proxy->accept_pause);
	if (proxy->dns)
		evdns_base_free(proxy->dns, 0);
	event_base_free(proxy->base);
	free(proxy);
	return 0;
}
