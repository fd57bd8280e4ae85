/*
 * main.c: tpmail-pop3, the tenant proxy.  Started by tpmaild with fork and
 * exec (see include/proto.h for the launch contract), one process per tenant
 * service.  It receives its trust store, listening socket and configuration
 * over the channel on fd 3, sandboxes itself (include/sandbox.h) before it
 * reads a byte from the network, then serves POP3 sessions with libevent
 * until the channel closes or a DRAIN arrives.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <fcntl.h>
#include <unistd.h>

#include <event2/event.h>
#include <openssl/ssl.h>

#include "log.h"
#include "msg.h"
#include "params.h"
#include "proxy.h"
#include "sandbox.h"
#include "secret.h"

struct proxy	*proxy;

/* A trust store passed with MSG_CA, for the configuration that follows. */
static struct trust	*pending_trust;

static void
proxy_send(int type, json_t *body)
{
	static int	warned;

	/*
	 * A stopped or busy supervisor fills the channel: counters are sent
	 * again with the next change, so a full channel only costs a warning
	 * (once) instead of blocking the sessions.
	 */
	if (msg_send(proxy->chan, type, body, -1) == -1 && errno != EPIPE &&
	    ((errno != EAGAIN && errno != EWOULDBLOCK) || !warned++))
		log_warn("channel send %s", msg_type_name(type));
	json_decref(body);
}

static struct event	*stats_timer;
static struct timeval	 stats_sent;

static void
proxy_send_stats_now(void)
{
	if (stats_timer != NULL)
		evtimer_del(stats_timer);
	gettimeofday(&stats_sent, NULL);
	proxy_send(MSG_STATS, json_pack("{s:I,s:I,s:I,s:o}", "active",
	    (json_int_t)proxy->active, "total", (json_int_t)proxy->total,
	    "failed", (json_int_t)proxy->failed, "counters",
	    stats_json(&proxy->stats)));
}

static void
proxy_stats_timer_cb(evutil_socket_t fd, short ev, void *arg)
{
	proxy_send_stats_now();
}

/*
 * The counters changed.  At most one MSG_STATS per PARAM_STATS_INTERVAL_MS:
 * encoding them and tpmaild decoding them cost more than a short session
 * itself, so a burst of sessions shares one report, sent when the interval
 * is over (and at exit).
 */
static void
proxy_send_stats(void)
{
	struct timeval	now, d, wait;

	if (stats_timer == NULL)
		stats_timer = evtimer_new(proxy->base, proxy_stats_timer_cb, NULL);
	if (stats_timer == NULL) {
		proxy_send_stats_now();
		return;
	}
	if (evtimer_pending(stats_timer, NULL))
		return;
	gettimeofday(&now, NULL);
	timersub(&now, &stats_sent, &d);
	if (d.tv_sec > 0 || d.tv_usec >= PARAM_STATS_INTERVAL_MS * 1000 ||
	    d.tv_sec < 0) {
		proxy_send_stats_now();
		return;
	}
	wait.tv_sec = 0;
	wait.tv_usec = PARAM_STATS_INTERVAL_MS * 1000 - d.tv_usec;
	evtimer_add(stats_timer, &wait);
}

void
proxy_session_opened(void)
{
	proxy->active++;
	proxy->total++;
	proxy->stats.st_total++;
	proxy_send_stats();
}

/* Ask tpmaild to exchange a client's refresh token or code for a session. */
void
proxy_exchange(unsigned long session, const char *kind, const char *user,
    const char *value)
{
	json_t	*body;

	body = json_pack("{s:I,s:s,s:s,s:s}", "session", (json_int_t)session,
	    "kind", kind, "user", user, "value", value);
	proxy_send(MSG_EXCHANGE, body);
}

void
proxy_session_refused(void)
{
	proxy->failed++;
	proxy->stats.st_refused++;
	proxy_send_stats();
}

void
proxy_login_done(double seconds)
{
	stats_observe(&proxy->stats.st_login, seconds);
}

void
proxy_upstream_failed(enum upstream_failure why)
{
	proxy->stats.st_upfail[why]++;
}

void
proxy_session_closed(enum session_outcome outcome, int failed,
    const char *error, double duration, unsigned long to_client,
    unsigned long to_server)
{
	proxy->active--;
	if (failed)
		proxy->failed++;
	proxy->stats.st_outcome[outcome]++;
	proxy->stats.st_bytes_to_client += to_client;
	proxy->stats.st_bytes_to_server += to_server;
	stats_observe(&proxy->stats.st_duration, duration);
	if (error != NULL)
		proxy_send(MSG_EVENT, json_pack("{s:s}", "error", error));
	if (proxy->draining && proxy->active == 0) {
		proxy_send_stats_now();		/* the last word */
		event_base_loopexit(proxy->base, NULL);
	} else
		proxy_send_stats();
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
	if (proxy->active == 0 || grace == 0) {
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

/*
 * A passed trust store.  The supervisor seals the memory file it passes
 * against shrinking: such a one is mapped, its pages shared with every
 * proxy given the same bundle, and cannot be cut under us (a mapping of a
 * file that shrinks faults).  Privately: before Linux 6.7 a shared mapping
 * of a write-sealed memory file is refused even read-only, and pages never
 * written are shared all the same.  Anything else is read whole.  Fatal if
 * unreadable.
 */
static void
proxy_take_ca(int fd)
{
	struct stat	 st;
	char		*buf = NULL, *nb;
	size_t		 len = 0, cap = 0;
	ssize_t		 n;
	int		 seals;

	trust_free(pending_trust);
	pending_trust = NULL;
	seals = fcntl(fd, F_GET_SEALS);
	if (seals != -1 && (seals & F_SEAL_SHRINK) && fstat(fd, &st) == 0 &&
	    st.st_size > 0 && st.st_size <= PARAM_MAX_CA &&
	    (buf = mmap(NULL, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0)) !=
	    MAP_FAILED) {
		close(fd);
		if ((pending_trust = trust_new(buf, st.st_size, 1)) == NULL)
			fatalx("out of memory for the CA store");
		return;
	}
	buf = NULL;
	for (;;) {
		if (len + 65536 > cap) {
			cap = cap ? cap * 2 : 262144;
			if (cap > PARAM_MAX_CA || (nb = realloc(buf, cap)) == NULL)
				fatalx("CA store too large");
			buf = nb;
		}
		/*
		 * From the start, whoever moved the shared file offset (the
		 * supervisor's copy, another proxy's read); read if a pipe.
		 */
		n = pread(fd, buf + len, cap - len, (off_t)len);
		if (n == -1 && errno == ESPIPE)
			n = read(fd, buf + len, cap - len);
		if (n == -1 && errno == EINTR)
			continue;
		if (n == -1)
			fatal("read CA store");
		if (n == 0)
			break;
		len += n;
	}
	close(fd);
	if ((pending_trust = trust_new(buf, len, 0)) == NULL)
		fatalx("out of memory for the CA store");
}

static struct proxy_config *
proxy_config_from(json_t *body, const char *what)
{
	struct proxy_config	*c;
	const char		*err;

	c = config_parse(body, pending_trust, &err);
	pending_trust = NULL;	/* the configuration's now */
	if (c == NULL)
		fatalx("bad %s from the supervisor: %s", what, err);
	return c;
}

#ifdef TPMAIL_SANDBOX_TESTING
/*
 * Test builds only: make one forbidden system call on request, so the tests
 * can see the filter kill the process (or fail the call softly).
 */
static void
proxy_test_syscall(json_t *body)
{
	const char	*name = json_string_value(json_object_get(body, "syscall"));
	long		 r = 0;
	char		 buf[128];

	if (name == NULL)
		return;
	log_warnx("test: calling forbidden %s", name);
	/* the parent's pid was taken before the filter: getppid is not allowed */
	if (strcmp(name, "ptrace") == 0)
		r = ptrace(PTRACE_ATTACH, proxy->ppid, NULL, NULL);
	else if (strcmp(name, "kill") == 0)
		r = kill(proxy->ppid, 0);
	else if (strcmp(name, "execve") == 0)
		r = execve("/bin/true", (char *[]){ "true", NULL }, NULL);
	else if (strcmp(name, "openat") == 0)
		r = openat(AT_FDCWD, "/etc/passwd", O_RDONLY);
	else if (strcmp(name, "socket_unix") == 0)
		r = socket(AF_UNIX, SOCK_STREAM, 0);
	else if (strcmp(name, "process_vm_readv") == 0)
		r = syscall(SYS_process_vm_readv, proxy->ppid, NULL, 0, NULL, 0, 0);
	else if (strcmp(name, "setuid") == 0)
		r = setuid(0);
	snprintf(buf, sizeof(buf), "test syscall %s returned %ld errno %d", name,
	    r, r == -1 ? errno : 0);
	proxy_send(MSG_EVENT, json_pack("{s:s}", "error", buf));
}
#endif

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
	case MSG_CA:
		if (m.fd == -1)
			fatalx("CA without a descriptor");
		proxy_take_ca(m.fd);
		m.fd = -1;
		break;
	case MSG_UPDATE:
		/* new sessions use it; open ones keep the one they began with */
		c = proxy_config_from(m.body, "UPDATE");
		config_unref(proxy->cfg);
		proxy->cfg = c;
		proxy_apply_log_level(m.body);
		log_info("configuration updated");
		break;
	case MSG_DRAIN:
		/* grace 0 is a hard stop: open sessions are cut now */
		grace = json_is_integer(json_object_get(m.body, "grace")) ?
		    json_integer_value(json_object_get(m.body, "grace")) :
		    PARAM_DRAIN_GRACE;
		proxy_drain(grace >= 0 ? (int)grace : PARAM_DRAIN_GRACE, "asked");
		break;
	case MSG_STATS_REQ:
		proxy_send_stats_now();
		break;
	case MSG_LOG_LEVEL:
		proxy_apply_log_level(m.body);
		break;
	case MSG_EXCHANGED:
		session_exchanged(json_integer_value(json_object_get(m.body,
		    "session")), json_string_value(json_object_get(m.body,
		    "token")), json_string_value(json_object_get(m.body, "error")),
		    json_is_true(json_object_get(m.body, "temporary")));
		break;
#ifdef TPMAIL_SANDBOX_TESTING
	case MSG_TEST_SYSCALL:
		proxy_test_syscall(m.body);
		break;
#endif
	default:
		fatalx("unexpected %s from the supervisor", msg_type_name(m.type));
	}
	msg_free(&m);
}

/* Wait for [CA] + CONFIG, the listening socket attached to CONFIG. */
static int
proxy_receive_config(json_t **sandbox)
{
	struct pollfd	 pfd = { .fd = proxy->chan, .events = POLLIN };
	struct msg	 m;
	const char	*err;
	int		 r, fd;

	for (;;) {
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
		if (m.type == MSG_CA && m.fd != -1) {
			proxy_take_ca(m.fd);
			m.fd = -1;
			msg_free(&m);
			continue;
		}
		if (m.type != MSG_CONFIG || m.fd == -1)
			fatalx("expected CONFIG with a socket, got %s",
			    msg_type_name(m.type));
		break;
	}
	proxy->cfg = proxy_config_from(m.body, "CONFIG");
	proxy_apply_log_level(m.body);
	*sandbox = json_incref(json_object_get(m.body, "sandbox"));
	fd = m.fd;
	m.fd = -1;
	msg_free(&m);
	return fd;
}

/* The channel must be a SOCK_SEQPACKET socket: we were started by tpmaild. */
static int
proxy_check_channel(int fd)
{
	int		type;
	socklen_t	len = sizeof(type);

	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &len) == -1)
		return -1;
	return type == SOCK_SEQPACKET ? 0 : -1;
}

/* The listening socket must be a listening TCP socket. */
static void
proxy_check_listener(int fd)
{
	int		v;
	socklen_t	len = sizeof(v);

	if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &v, &len) == -1 || !v)
		fatalx("the passed socket is not listening");
	len = sizeof(v);
	if (getsockopt(fd, SOL_SOCKET, SO_TYPE, &v, &len) == -1 ||
	    v != SOCK_STREAM)
		fatalx("the passed socket is not a stream socket");
}

static void
proxy_signal_cb(evutil_socket_t sig, short ev, void *arg)
{
	proxy_drain(PARAM_DRAIN_GRACE, "signal");
}

/* Confine ourselves as the supervisor's policy says. */
static json_t *
proxy_sandbox(json_t *sb, int lfd)
{
	struct sandbox_policy	pol;
	json_t			*v;

	memset(&pol, 0, sizeof(pol));
	pol.uid = (uid_t)-1;
	pol.gid = (gid_t)-1;
	if ((v = json_object_get(sb, "uid")) != NULL && json_is_integer(v))
		pol.uid = json_integer_value(v);
	if ((v = json_object_get(sb, "gid")) != NULL && json_is_integer(v))
		pol.gid = json_integer_value(v);
	pol.chroot = json_string_value(json_object_get(sb, "chroot"));
	pol.strict = json_is_true(json_object_get(sb, "strict"));
	pol.channel_fd = proxy->chan;
	pol.listen_fd = lfd;
	/* two per session, plus room for the loop, the channel and stderr */
	pol.max_fds = proxy->cfg->max_sessions * 2 + 64;
	return sandbox_enter(&pol);
}

int
main(int argc, char *argv[])
{
	struct event		*sigterm, *sigint;
	struct event_config	*ecfg;
	json_t			*sb = NULL, *report;
	char			 ctx[300];
	int			 lfd, keep[2];

	sandbox_early();
	log_init("tpmail-pop3", LOG_LEVEL_INFO);
	if (argc < 2 || argc > 3)
		fatalx("usage: tpmail-pop3 <namespace>/<service> [json|text] "
		    "(started by tpmaild, with its channel on fd %d)",
		    PROTO_CHANNEL_FD);
	log_set_json(argc == 3 && strcmp(argv[2], "json") == 0);
	snprintf(ctx, sizeof(ctx), "service=%s", argv[1]);
	log_set_context(ctx);
	secret_install();
	signal(SIGPIPE, SIG_IGN);

	if ((proxy = calloc(1, sizeof(*proxy))) == NULL)
		fatal("calloc");
	proxy->chan = PROTO_CHANNEL_FD;
	proxy->ppid = getppid();
	if (proxy_check_channel(proxy->chan) == -1)
		fatalx("no channel on fd %d: tpmail-pop3 is started by tpmaild",
		    PROTO_CHANNEL_FD);
	proxy_send(MSG_HELLO, json_pack("{s:i}", "pid", (int)getpid()));
	lfd = proxy_receive_config(&sb);
	if (proxy->cfg->tenant != NULL) {
		snprintf(ctx, sizeof(ctx), "service=%s tenant=%s", argv[1],
		    proxy->cfg->tenant);
		log_set_context(ctx);
	}
	proxy_check_listener(lfd);

	/* nothing but stdio, the channel and the listener survives */
	keep[0] = proxy->chan;
	keep[1] = lfd;
	sandbox_close_fds(keep, 2);
	sandbox_preload(proxy->cfg->tls != UPSTREAM_TLS_NONE);

	if ((ecfg = event_config_new()) == NULL)
		fatalx("event_config_new");
	event_config_set_flag(ecfg, EVENT_BASE_FLAG_IGNORE_ENV);
	if ((proxy->base = event_base_new_with_config(ecfg)) == NULL)
		fatalx("event_base_new");
	event_config_free(ecfg);
	listener_start(lfd);
	evutil_make_socket_nonblocking(proxy->chan);
	proxy->chan_ev = event_new(proxy->base, proxy->chan, EV_READ | EV_PERSIST,
	    proxy_dispatch, NULL);
	event_add(proxy->chan_ev, NULL);
	sigterm = evsignal_new(proxy->base, SIGTERM, proxy_signal_cb, NULL);
	sigint = evsignal_new(proxy->base, SIGINT, proxy_signal_cb, NULL);
	evsignal_add(sigterm, NULL);
	evsignal_add(sigint, NULL);

	report = proxy_sandbox(sb, lfd);
	json_decref(sb);
	proxy_send(MSG_READY, json_pack("{s:o}", "sandbox", report));
	log_info("serving upstream=%s:%d tls=%d max_sessions=%d", proxy->cfg->host,
	    proxy->cfg->port, proxy->cfg->tls, proxy->cfg->max_sessions);

	event_base_dispatch(proxy->base);
	if (stats_timer != NULL && evtimer_pending(stats_timer, NULL))
		proxy_send_stats_now();

	log_info("exiting: sessions total=%lu failed=%lu", proxy->total,
	    proxy->failed);
	listener_stop();
	config_unref(proxy->cfg);
	event_free(sigterm);
	event_free(sigint);
	if (stats_timer != NULL)
		event_free(stats_timer);
	if (proxy->chan_ev)
		event_free(proxy->chan_ev);
	if (proxy->drain_timer)
		event_free(proxy->drain_timer);
	accept_pause_free(proxy->accept_pause);
	event_base_free(proxy->base);
	free(proxy);
	return 0;
}
