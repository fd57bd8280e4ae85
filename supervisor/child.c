/*
 * child.c: the tenant proxies' lifecycle.  For each tenant service the
 * supervisor binds the listening socket (ports.c), creates the channel,
 * forks and execs tpmail-pop3 under the launch contract in proto.h, sends
 * the configuration with the socket attached, follows its state through
 * the channel, reaps it, and restarts it with an exponential backoff when
 * it dies.  A misbehaving child is killed; the supervisor never dies
 * because of a child.  Runs in the supervisor.
 */
#include <errno.h>
#include <stdarg.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <event2/buffer.h>

#include "log.h"
#include "msg.h"
#include "supervisor.h"

/* A child that ran this long before dying starts its backoff afresh. */
#define CHILD_STABLE_SECONDS	60

const char *
service_state_name(enum service_state st)
{
	static const char *const names[] = {
		"starting", "running", "backoff", "failed", "stopping",
		"drained",
	};

	return names[st];
}

static int	service_send(struct service *, int, json_t *, int);

static void
service_set_error(struct service *sv, const char *fmt, ...)
{
	char	buf[512];
	va_list	ap;

	char	ts[32];
	time_t	now = time(NULL);

	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	free(sv->sv_error);
	sv->sv_error = strdup(buf);
	/* the last few, with their time, for tpmailctl status <service> */
	strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
	if (sv->sv_errors == NULL)
		sv->sv_errors = json_array();
	json_array_append_new(sv->sv_errors, json_pack("{s:s,s:s}", "time", ts,
	    "error", buf));
	while (json_array_size(sv->sv_errors) > SERVICE_ERRORS_KEPT)
		json_array_remove(sv->sv_errors, 0);
}

/* A problem worth showing in status, without a new entry for a repeat. */
void
service_note_error(struct service *sv, const char *msg)
{
	if (sv->sv_error != NULL && strcmp(sv->sv_error, msg) == 0)
		return;
	service_set_error(sv, "%s", msg);
}

/* Every proxy, current and retired, logs at this level from now on. */
void
services_set_log_level(int level)
{
	struct service	*sv;
	json_t		*body;

	body = json_pack("{s:s}", "log_level", log_level_name(level));
	TAILQ_FOREACH(sv, &sup->services, sv_entry)
		if (sv->sv_chan != -1)
			service_send(sv, MSG_LOG_LEVEL, body, -1);
	json_decref(body);
}

struct service *
service_new(const char *ns, const char *name, const char *cr, const char *tenant)
{
	struct service	*sv;

	if ((sv = calloc(1, sizeof(*sv))) == NULL)
		fatal("calloc");
	if (asprintf(&sv->sv_key, "%s/%s", ns, name) == -1)
		fatal("asprintf");
	sv->sv_namespace = strdup(ns);
	sv->sv_name = strdup(name);
	sv->sv_cr = strdup(cr);
	sv->sv_tenant = tenant ? strdup(tenant) : NULL;
	sv->sv_lfd = sv->sv_chan = -1;
	sv->sv_backoff = 1;
	TAILQ_INSERT_TAIL(&sup->services, sv, sv_entry);
	return sv;
}

static void
service_close_channel(struct service *sv)
{
	if (sv->sv_chan_ev != NULL) {
		event_free(sv->sv_chan_ev);
		sv->sv_chan_ev = NULL;
	}
	if (sv->sv_chan != -1) {
		close(sv->sv_chan);
		sv->sv_chan = -1;
	}
}

/* A child broke the protocol: it is not trusted with another message. */
static void
service_kill(struct service *sv, const char *why)
{
	log_warnx("service %s: killing pid %d: %s", sv->sv_key, (int)sv->sv_pid,
	    why);
	service_set_error(sv, "proxy killed: %s", why);
	if (sv->sv_pid > 0)
		kill(sv->sv_pid, SIGKILL);
	service_close_channel(sv);
}

static int
service_send(struct service *sv, int type, json_t *body, int fd)
{
	if (sv->sv_chan == -1)
		return -1;
	if (msg_send(sv->sv_chan, type, body, fd) == -1) {
		log_warn("service %s: send %s", sv->sv_key, msg_type_name(type));
		return -1;
	}
	return 0;
}

/*
 * Pass the trust store as an open descriptor: the proxy cannot open files.
 * A sealed copy shared by every proxy that trusts the same file (cashare.c).
 */
static int
service_send_ca(struct service *sv)
{
	json_t	*body;
	int	 fd, r;

	if (sv->sv_ca == NULL)
		return 0;
	if ((fd = cashare_open(sv->sv_ca)) == -1) {
		service_set_error(sv, "cannot open CA file %s: %s", sv->sv_ca,
		    strerror(errno));
		return -1;
	}
	body = json_pack("{s:s}", "source", sv->sv_ca);
	r = service_send(sv, MSG_CA, body, fd);
	json_decref(body);
	close(fd);
	return r;
}

/*
 * The sandbox the proxy applies to itself.  As root: its own uid and gid,
 * derived from its port so they are stable and distinct per service, and
 * an empty root directory.  Unprivileged: whatever needs no privilege.
 */
static json_t *
service_sandbox_policy(struct service *sv)
{
	int	id = sup->st.uid_base + (sv->sv_port - sup->st.port_min);

	if (geteuid() != 0)
		return json_pack("{s:n,s:n,s:n,s:b}", "uid", "gid", "chroot",
		    "strict", sup->st.sandbox_strict);
	return json_pack("{s:i,s:i,s:s,s:b}", "uid", id, "gid", id, "chroot",
	    sup->st.empty_dir, "strict", sup->st.sandbox_strict);
}

/* Where an exchange's answer goes: the proxy that asked, if still there. */
struct exchange_reply {
	char		*xr_key;
	pid_t		 xr_pid;
	json_int_t	 xr_session;
};

#define SERVICE_MAX_EXCHANGES	32	/* in flight per proxy */

static void
service_exchanged(const char *token, const char *error, int temporary,
    void *arg)
{
	struct exchange_reply	*xr = arg;
	struct service		*sv;
	json_t			*body;

	TAILQ_FOREACH(sv, &sup->services, sv_entry)
		if (strcmp(sv->sv_key, xr->xr_key) == 0 &&
		    sv->sv_pid == xr->xr_pid && sv->sv_chan != -1)
			break;
	if (sv != NULL) {
		if (sv->sv_exchanges > 0)
			sv->sv_exchanges--;
		body = json_pack("{s:I,s:s?,s:s?,s:b}", "session", xr->xr_session,
		    "token", token, "error", token ? NULL : error, "temporary",
		    token == NULL && temporary);
		service_send(sv, MSG_EXCHANGED, body, -1);
		json_decref(body);	/* the allocator wipes the token */
		if (token == NULL)
			service_note_error(sv, error ? error : "token exchange "
			    "refused");
	}
	free(xr->xr_key);
	free(xr);
}

/*
 * A proxy asks to exchange a client's refresh token or code.  The proxy is
 * not trusted: the destination it may ask for is its own service's, and
 * only so many requests may be in flight.
 */
static void
service_exchange(struct service *sv, json_t *body)
{
	struct exchange_reply	*xr;
	struct destref		 ref;
	const char		*kind, *value;
	json_t			*reply;
	json_int_t		 session;

	kind = json_string_value(json_object_get(body, "kind"));
	value = json_string_value(json_object_get(body, "value"));
	session = json_integer_value(json_object_get(body, "session"));
	if (kind == NULL || value == NULL || (strcmp(kind, "refresh") &&
	    strcmp(kind, "code")) || strlen(value) > 16384) {
		service_kill(sv, "malformed EXCHANGE");
		return;
	}
	if (sv->sv_instance == NULL || sv->sv_exchanges >= SERVICE_MAX_EXCHANGES) {
		reply = json_pack("{s:I,s:s,s:b}", "session", session, "error",
		    sv->sv_instance == NULL ? "this destination does not exchange "
		    "tokens" : "too many token exchanges in flight", "temporary",
		    sv->sv_instance != NULL);
		service_send(sv, MSG_EXCHANGED, reply, -1);
		json_decref(reply);
		return;
	}
	if ((xr = calloc(1, sizeof(*xr))) == NULL)
		fatal("calloc");
	xr->xr_key = strdup(sv->sv_key);
	xr->xr_pid = sv->sv_pid;
	xr->xr_session = session;
	sv->sv_exchanges++;
	/* the same destination the service was configured from */
	ref = (struct destref){ sv->sv_dest, sv->sv_level, sv->sv_fragment,
	    sv->sv_fragment_optional };
	destsvc_exchange(sv->sv_instance, sv->sv_tenant ? sv->sv_tenant :
	    TPMAIL_PROVIDER_TENANT, &ref, kind, value, service_exchanged, xr);
}

/* HELLO arrived: [CA] then CONFIG with the listening socket. */
static void
service_configure(struct service *sv)
{
	json_t	*cfg = json_copy(sv->sv_config);
	int	 r;

	json_object_set_new(cfg, "sandbox", service_sandbox_policy(sv));
	json_object_set_new(cfg, "log_level",
	    json_string(log_level_name(log_get_level())));
	r = service_send_ca(sv);
	if (r == 0)
		r = service_send(sv, MSG_CONFIG, cfg, sv->sv_lfd);
	json_decref(cfg);
	if (r == -1)
		service_kill(sv, "cannot send its configuration");
}

static void
service_dispatch(evutil_socket_t fd, short ev, void *arg)
{
	struct service	*sv = arg;
	struct msg	 m;
	const char	*err, *e;
	int		 r;

	for (;;) {
		r = msg_recv(sv->sv_chan, &m, &err);
		if (r == -1 && (errno == EAGAIN || errno == EWOULDBLOCK))
			return;
		if (r == 0 || r == -1) {
			/* the child is exiting; the reaper does the rest */
			service_close_channel(sv);
			return;
		}
		if (r == -2) {
			service_kill(sv, err);
			return;
		}
		switch (m.type) {
		case MSG_HELLO:
			if (sv->sv_state != SERVICE_STARTING) {
				service_kill(sv, "HELLO out of order");
				break;
			}
			service_configure(sv);
			break;
		case MSG_READY:
			json_decref(sv->sv_sandbox);
			sv->sv_sandbox = json_incref(json_object_get(m.body,
			    "sandbox"));
			sv->sv_state = SERVICE_RUNNING;
			log_info("service %s running: pid %d listening on %s:%d",
			    sv->sv_key, (int)sv->sv_pid, sup->st.listen_address,
			    sv->sv_port);
			break;
		case MSG_STATS:
			if (json_is_object(json_object_get(m.body, "counters"))) {
				json_decref(sv->sv_counters);
				sv->sv_counters = json_incref(json_object_get(
				    m.body, "counters"));
			}
			sv->sv_active = json_integer_value(
			    json_object_get(m.body, "active"));
			sv->sv_total = json_integer_value(
			    json_object_get(m.body, "total"));
			sv->sv_failed = json_integer_value(
			    json_object_get(m.body, "failed"));
			break;
		case MSG_EXCHANGE:
			service_exchange(sv, m.body);
			break;
		case MSG_EVENT:
			if ((e = json_string_value(json_object_get(m.body,
			    "error"))) != NULL)
				service_set_error(sv, "%s", e);
			break;
		default:
			service_kill(sv, "unexpected message type");
			break;
		}
		msg_free(&m);
		if (sv->sv_chan == -1)
			return;
	}
}

/* A line from a proxy's stderr: already formatted, passed through whole. */
static void
service_log_read_cb(struct bufferevent *bev, void *arg)
{
	struct evbuffer	*in = bufferevent_get_input(bev);
	char		*line;
	size_t		 len;

	while ((line = evbuffer_readln(in, &len, EVBUFFER_EOL_LF)) != NULL) {
		fprintf(stderr, "%s\n", line);
		free(line);
	}
	/* an unterminated flood is cut into pieces rather than held */
	if (evbuffer_get_length(in) > 8192) {
		fwrite(evbuffer_pullup(in, -1), 1, evbuffer_get_length(in), stderr);
		fputc('\n', stderr);
		evbuffer_drain(in, evbuffer_get_length(in));
	}
}

/*
 * The pipe is about to go: print what the proxy wrote last and tpmaild has
 * not read yet.  That is what matters most for diagnosis (a crash message,
 * a sanitizer's report at exit), and a freed service used to drop it.
 * Bounded, and never blocking on a proxy that still runs.
 */
static void
service_log_free(struct bufferevent *bev)
{
	struct evbuffer	*in = bufferevent_get_input(bev);
	evutil_socket_t	 fd = bufferevent_getfd(bev);
	int		 i;

	if (fd != -1) {
		evutil_make_socket_nonblocking(fd);
		/* a socket bufferevent keeps its input's end frozen */
		evbuffer_unfreeze(in, 0);
		for (i = 0; i < 256; i++)
			if (evbuffer_read(in, fd, 65536) <= 0)
				break;
		evbuffer_freeze(in, 0);
	}
	service_log_read_cb(bev, NULL);
	if (evbuffer_get_length(in) > 0) {
		fwrite(evbuffer_pullup(in, -1), 1, evbuffer_get_length(in),
		    stderr);
		fputc('\n', stderr);
	}
	bufferevent_free(bev);
}

/* arg: the slot holding this bufferevent (a service's or a retired's). */
static void
service_log_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct bufferevent	**slot = arg;

	service_log_free(bev);
	if (*slot == bev)
		*slot = NULL;
}

/* In the child between fork and exec: the launch contract of proto.h. */
static void __attribute__((noreturn))
child_exec(struct service *sv, int chan, int logfd)
{
	char		*argv[] = { "tpmail-pop3", sv->sv_key,
			    log_get_json() ? "json" : "text", NULL };
	char		*envp[4];
	const char	*keep[] = { "ASAN_OPTIONS", "UBSAN_OPTIONS", "LSAN_OPTIONS" };
	char		*v;
	int		 i, n = 0, null;
	sigset_t	 all;

	/* only sanitizer settings pass; nothing secret lives there */
	for (i = 0; i < 3; i++)
		if ((v = getenv(keep[i])) != NULL &&
		    asprintf(&envp[n], "%s=%s", keep[i], v) != -1)
			n++;
	envp[n] = NULL;
	if (chan == PROTO_CHANNEL_FD) {
		if (fcntl(chan, F_SETFD, 0) == -1)
			_exit(127);
	} else if (dup2(chan, PROTO_CHANNEL_FD) == -1)
		_exit(127);
	/* stdout and stderr: a pipe to the supervisor, never a file */
	if ((null = open("/dev/null", O_RDWR)) == -1 ||
	    dup2(null, STDIN_FILENO) == -1 || dup2(logfd, STDOUT_FILENO) == -1 ||
	    dup2(logfd, STDERR_FILENO) == -1)
		_exit(127);
	/*
	 * A stopped or slow tpmaild must not freeze a proxy in a log write:
	 * with a full pipe, log lines are dropped instead.
	 */
	fcntl(STDERR_FILENO, F_SETFL, fcntl(STDERR_FILENO, F_GETFL) | O_NONBLOCK);
	if (close_range(PROTO_CHANNEL_FD + 1, ~0U, 0) == -1)
		_exit(127);
	sigemptyset(&all);
	sigprocmask(SIG_SETMASK, &all, NULL);
	for (i = 1; i < NSIG; i++)
		signal(i, SIG_DFL);
	execve(sup->st.proxy_path, argv, envp);
	fprintf(stderr, "tpmaild: cannot exec %s: %s\n", sup->st.proxy_path,
	    strerror(errno));
	_exit(127);
}

/* Bind if needed and start the tenant's proxy. */
int
service_start(struct service *sv)
{
	int	sp[2], lp[2];
	pid_t	pid;

	if (sv->sv_timer != NULL)
		evtimer_del(sv->sv_timer);
	if (sv->sv_lfd == -1 && ports_bind(sv) == -1) {
		sv->sv_state = SERVICE_FAILED;
		if (errno == EAGAIN)
			service_note_error(sv, "waiting for the leader to "
			    "allocate this service's target port");
		else
			service_set_error(sv, "cannot bind a listening socket: %s",
			    strerror(errno));
		return -1;
	}
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sp) == -1) {
		sv->sv_state = SERVICE_FAILED;
		service_set_error(sv, "socketpair: %s", strerror(errno));
		return -1;
	}
	if (pipe2(lp, O_CLOEXEC) == -1) {
		close(sp[0]);
		close(sp[1]);
		sv->sv_state = SERVICE_FAILED;
		service_set_error(sv, "pipe: %s", strerror(errno));
		return -1;
	}
	switch ((pid = fork())) {
	case -1:
		close(sp[0]);
		close(sp[1]);
		close(lp[0]);
		close(lp[1]);
		sv->sv_state = SERVICE_FAILED;
		service_set_error(sv, "fork: %s", strerror(errno));
		return -1;
	case 0:
		close(sp[0]);
		close(lp[0]);
		child_exec(sv, sp[1], lp[1]);
	}
	close(sp[1]);
	close(lp[1]);
	if (sv->sv_log != NULL)
		service_log_free(sv->sv_log);
	evutil_make_socket_nonblocking(lp[0]);
	sv->sv_log = bufferevent_socket_new(sup->base, lp[0], BEV_OPT_CLOSE_ON_FREE);
	bufferevent_setcb(sv->sv_log, service_log_read_cb, NULL,
	    service_log_event_cb, &sv->sv_log);
	bufferevent_enable(sv->sv_log, EV_READ);
	sv->sv_pid = pid;
	sv->sv_chan = sp[0];
	sv->sv_state = SERVICE_STARTING;
	sv->sv_started = time(NULL);
	sv->sv_active = 0;
	evutil_make_socket_nonblocking(sv->sv_chan);
	sv->sv_chan_ev = event_new(sup->base, sv->sv_chan, EV_READ | EV_PERSIST,
	    service_dispatch, sv);
	event_add(sv->sv_chan_ev, NULL);
	log_info("service %s: started pid %d", sv->sv_key, (int)pid);
	return 0;
}

/* New credentials or limits: new sessions use them, open ones are untouched. */
void
service_update(struct service *sv, json_t *config, const char *ca)
{
	if (sv->sv_config != NULL && json_equal(sv->sv_config, config) &&
	    ((ca == NULL && sv->sv_ca == NULL) ||
	    (ca != NULL && sv->sv_ca != NULL && strcmp(ca, sv->sv_ca) == 0))) {
		json_decref(config);
		/* nothing new, but a service that could not start tries again */
		if (sv->sv_state == SERVICE_FAILED)
			service_start(sv);
		return;
	}
	json_decref(sv->sv_config);
	sv->sv_config = config;
	free(sv->sv_ca);
	sv->sv_ca = ca ? strdup(ca) : NULL;
	if (sv->sv_state == SERVICE_RUNNING && service_send_ca(sv) == 0 &&
	    service_send(sv, MSG_UPDATE, config, -1) == 0)
		log_info("service %s: configuration updated", sv->sv_key);
	else if (sv->sv_state == SERVICE_FAILED)
		service_start(sv);
}

/*
 * A CA file changed on disk (cashare.c): running proxies that trust it get
 * it again, with their configuration, as for any update; new sessions use
 * it, open ones keep theirs.
 */
void
services_ca_changed(const char *path)
{
	struct service	*sv;

	TAILQ_FOREACH(sv, &sup->services, sv_entry)
		if (sv->sv_ca != NULL && strcmp(sv->sv_ca, path) == 0 &&
		    sv->sv_state == SERVICE_RUNNING && !sv->sv_remove &&
		    service_send_ca(sv) == 0 &&
		    service_send(sv, MSG_UPDATE, sv->sv_config, -1) == 0)
			log_info("service %s: CA file updated", sv->sv_key);
}

/* Remove a service: drain its proxy, free it once reaped. */
void
service_stop(struct service *sv)
{
	json_t	*body;

	sv->sv_remove = 1;
	if (sv->sv_timer != NULL)
		evtimer_del(sv->sv_timer);
	if (sv->sv_lfd != -1) {
		close(sv->sv_lfd);
		sv->sv_lfd = -1;
	}
	if (!sup->stopping)
		ports_release(sv->sv_key);
	if (sv->sv_pid <= 0) {
		service_free(sv);
		return;
	}
	sv->sv_state = SERVICE_STOPPING;
	log_info("service %s: stopping pid %d", sv->sv_key, (int)sv->sv_pid);
	body = json_pack("{s:i}", "grace", sup->st.drain_grace);
	if (service_send(sv, MSG_DRAIN, body, -1) == -1)
		kill(sv->sv_pid, SIGTERM);
	json_decref(body);
}

void
service_free(struct service *sv)
{
	TAILQ_REMOVE(&sup->services, sv, sv_entry);
	service_close_channel(sv);
	if (sv->sv_timer != NULL)
		event_free(sv->sv_timer);
	if (sv->sv_lfd != -1)
		close(sv->sv_lfd);
	json_decref(sv->sv_config);	/* the allocator wipes the secrets */
	json_decref(sv->sv_sandbox);
	json_decref(sv->sv_errors);
	json_decref(sv->sv_counters);
	json_decref(sv->sv_base);
	free(sv->sv_ca);
	if (sv->sv_log != NULL)
		service_log_free(sv->sv_log);
	free(sv->sv_key);
	free(sv->sv_namespace);
	free(sv->sv_name);
	free(sv->sv_cr);
	free(sv->sv_tenant);
	free(sv->sv_instance);
	free(sv->sv_dest);
	free(sv->sv_level);
	free(sv->sv_fragment);
	free(sv->sv_restart);
	free(sv->sv_error);
	free(sv);
}

static void
service_backoff_cb(evutil_socket_t fd, short ev, void *arg)
{
	struct service	*sv = arg;

	if (!sup->stopping)
		service_start(sv);
}

int
services_port_in_use(int port)
{
	struct service	*sv;

	TAILQ_FOREACH(sv, &sup->services, sv_entry)
		if (sv->sv_port == port && sv->sv_lfd != -1)
			return 1;
	return 0;
}

int
services_alive(void)
{
	struct service	*sv;
	struct retired	*rt;
	int		 n = 0;

	TAILQ_FOREACH(sv, &sup->services, sv_entry)
		if (sv->sv_pid > 0)
			n++;
	TAILQ_FOREACH(rt, &sup->retired, rt_entry)
		n++;
	return n;
}

/* A dead proxy's counters join its predecessors'. */
static void
service_fold_counters(struct service *sv, json_t *c)
{
	if (sv->sv_base == NULL)
		sv->sv_base = json_deep_copy(c);
	else
		stats_add(sv->sv_base, c);
}

/* All of a service's counters: the dead, the retired and the current. */
json_t *
service_counters(struct service *sv)
{
	struct retired	*rt;
	json_t		*acc = NULL;

	if (sv->sv_base != NULL)
		acc = json_deep_copy(sv->sv_base);
	if (sv->sv_counters != NULL) {
		if (acc == NULL)
			acc = json_deep_copy(sv->sv_counters);
		else
			stats_add(acc, sv->sv_counters);
	}
	TAILQ_FOREACH(rt, &sup->retired, rt_entry) {
		if (strcmp(rt->rt_key, sv->sv_key) != 0 || rt->rt_counters == NULL)
			continue;
		if (acc == NULL)
			acc = json_deep_copy(rt->rt_counters);
		else
			stats_add(acc, rt->rt_counters);
	}
	return acc;
}

/* A retired proxy's channel: nothing it says matters any more but EOF. */
static void
retired_dispatch(evutil_socket_t fd, short ev, void *arg)
{
	struct retired	*rt = arg;
	struct msg	 m;
	const char	*err;
	int		 r;

	while ((r = msg_recv(rt->rt_chan, &m, &err)) == 1) {
		/* only its counters still matter, until it is reaped */
		if (m.type == MSG_STATS && json_is_object(json_object_get(m.body,
		    "counters"))) {
			json_decref(rt->rt_counters);
			rt->rt_counters = json_incref(json_object_get(m.body,
			    "counters"));
		}
		msg_free(&m);
	}
	if (r == -1 && (errno == EAGAIN || errno == EWOULDBLOCK))
		return;
	event_free(rt->rt_chan_ev);
	rt->rt_chan_ev = NULL;
	close(rt->rt_chan);
	rt->rt_chan = -1;
}

static void
retired_free(struct retired *rt)
{
	TAILQ_REMOVE(&sup->retired, rt, rt_entry);
	if (rt->rt_chan_ev != NULL)
		event_free(rt->rt_chan_ev);
	if (rt->rt_chan != -1)
		close(rt->rt_chan);
	if (rt->rt_log != NULL)
		service_log_free(rt->rt_log);
	json_decref(rt->rt_counters);
	free(rt->rt_key);
	free(rt);
}

/*
 * Hand the current proxy over to the retired list and tell it to drain:
 * it stops accepting (the listening socket stays open here, so nothing is
 * refused meanwhile) and finishes its sessions within `grace` seconds.
 */
static void
service_retire(struct service *sv, int grace)
{
	struct retired	*rt;
	json_t		*body;

	if (sv->sv_pid <= 0)
		return;
	if ((rt = calloc(1, sizeof(*rt))) == NULL)
		fatal("calloc");
	rt->rt_key = strdup(sv->sv_key);
	rt->rt_pid = sv->sv_pid;
	rt->rt_chan = sv->sv_chan;
	rt->rt_log = sv->sv_log;
	if (rt->rt_log != NULL)
		bufferevent_setcb(rt->rt_log, service_log_read_cb, NULL,
		    service_log_event_cb, &rt->rt_log);
	if (sv->sv_chan_ev != NULL)
		event_free(sv->sv_chan_ev);
	sv->sv_chan_ev = NULL;
	sv->sv_chan = -1;
	sv->sv_log = NULL;
	sv->sv_pid = 0;
	rt->rt_counters = sv->sv_counters;	/* it goes on counting */
	sv->sv_counters = NULL;
	TAILQ_INSERT_TAIL(&sup->retired, rt, rt_entry);
	body = json_pack("{s:i}", "grace", grace);
	if (rt->rt_chan == -1 || msg_send(rt->rt_chan, MSG_DRAIN, body, -1) == -1)
		kill(rt->rt_pid, grace > 0 ? SIGTERM : SIGKILL);
	json_decref(body);
	if (rt->rt_chan != -1) {
		rt->rt_chan_ev = event_new(sup->base, rt->rt_chan,
		    EV_READ | EV_PERSIST, retired_dispatch, rt);
		event_add(rt->rt_chan_ev, NULL);
	}
	log_info("service %s: pid %d retired, draining within %d s", sv->sv_key,
	    (int)rt->rt_pid, grace);
}

/*
 * Restart a service's proxy.  Graceful: the new proxy starts on the same
 * listening socket first, then the old one drains.  Hard: the old one is
 * ended at once, its sessions cut (no QUIT upstream: nothing is deleted).
 * Either way the backoff is cleared.
 */
int
service_restart(struct service *sv, int hard)
{
	if (sv->sv_remove || sv->sv_state == SERVICE_STOPPING)
		return -1;
	sv->sv_backoff = 1;
	if (sv->sv_timer != NULL)
		evtimer_del(sv->sv_timer);
	log_info("service %s: %s restart requested", sv->sv_key,
	    hard ? "hard" : "graceful");
	service_retire(sv, hard ? 0 : sup->st.drain_grace);
	sv->sv_restarts++;
	return service_start(sv);
}

/* Take a service out of service: stop accepting, let sessions finish. */
int
service_drain(struct service *sv)
{
	if (sv->sv_remove || sv->sv_state == SERVICE_STOPPING)
		return -1;
	if (sv->sv_timer != NULL)
		evtimer_del(sv->sv_timer);
	service_retire(sv, sup->st.drain_grace);
	/* the port stays reserved; new clients are refused until a restart */
	if (sv->sv_lfd != -1) {
		close(sv->sv_lfd);
		sv->sv_lfd = -1;
	}
	sv->sv_state = SERVICE_DRAINED;
	service_set_error(sv, "drained by an operator; tpmailctl restart "
	    "brings it back");
	return 0;
}

/* SIGCHLD: log every exit, restart what should run, free what should not. */
void
child_reap(void)
{
	struct service	*sv, *found;
	struct retired	*rt;
	pid_t		 pid;
	int		 status;
	char		 how[128];

	while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
		found = NULL;
		TAILQ_FOREACH(sv, &sup->services, sv_entry)
			if (sv->sv_pid == pid)
				found = sv;
		TAILQ_FOREACH(rt, &sup->retired, rt_entry)
			if (rt->rt_pid == pid)
				break;
		if (WIFEXITED(status))
			snprintf(how, sizeof(how), "exited with status %d",
			    WEXITSTATUS(status));
		else
			snprintf(how, sizeof(how), "killed by signal %d%s%s",
			    WTERMSIG(status), WTERMSIG(status) == SIGSYS ?
			    " (SIGSYS: a system call outside its sandbox)" : "",
			    WCOREDUMP(status) ? " (core)" : "");
		if (rt != NULL) {
			log_info("service %s: retired proxy pid %d %s", rt->rt_key,
			    (int)pid, how);
			TAILQ_FOREACH(sv, &sup->services, sv_entry)
				if (strcmp(sv->sv_key, rt->rt_key) == 0 &&
				    !sv->sv_remove && rt->rt_counters != NULL)
					service_fold_counters(sv, rt->rt_counters);
			retired_free(rt);
			continue;
		}
		if (found == NULL) {
			log_info("pid %d %s", (int)pid, how);
			continue;
		}
		sv = found;
		sv->sv_pid = 0;
		sv->sv_active = 0;
		if (sv->sv_counters != NULL) {
			service_fold_counters(sv, sv->sv_counters);
			json_decref(sv->sv_counters);
			sv->sv_counters = NULL;
		}
		service_close_channel(sv);
		if (sv->sv_remove || sup->stopping) {
			log_info("service %s: proxy %s", sv->sv_key, how);
			if (sv->sv_remove)
				service_free(sv);
			continue;
		}
		/* an unexpected death: back off, then start again */
		if (time(NULL) - sv->sv_started >= CHILD_STABLE_SECONDS)
			sv->sv_backoff = 1;
		sv->sv_restarts++;
		sv->sv_state = SERVICE_BACKOFF;
		service_set_error(sv, "proxy %s; restarting in %d s", how,
		    sv->sv_backoff);
		log_warnx("service %s: proxy pid %d %s; restart %d in %d s",
		    sv->sv_key, (int)pid, how, sv->sv_restarts, sv->sv_backoff);
		if (sup->st.kubernetes && sv->sv_backoff > 1) {
			char	msg[300];

			/* the second death in a row: crash-looping */
			snprintf(msg, sizeof(msg), "the proxy of %s %s; restart "
			    "%d in %d s", sv->sv_key, how, sv->sv_restarts,
			    sv->sv_backoff);
			k8s_service_event(sv, "Warning", "ProxyCrashLooping", msg);
		}
		if (sv->sv_timer == NULL)
			sv->sv_timer = evtimer_new(sup->base, service_backoff_cb, sv);
		event_add(sv->sv_timer, &(struct timeval){ sv->sv_backoff, 0 });
		sv->sv_backoff_now = sv->sv_backoff;
		sv->sv_backoff *= 2;
		if (sv->sv_backoff > sup->st.backoff_max)
			sv->sv_backoff = sup->st.backoff_max;
	}
}
