/*
 * control.c: the control socket tpmailctl talks to.  A Unix stream socket
 * (mode 0600, in the state directory by default); one JSON request line per
 * connection, one JSON reply, then close.  Requests: {"cmd":"status"}.
 * Nothing secret is ever in a reply.  Runs in the supervisor.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/listener.h>

#include "accept_pause.h"
#include "log.h"
#include "msg.h"
#include "supervisor.h"
#include "unixaddr.h"

#define CONTROL_MAX_REQUEST	4096

static struct evconnlistener	*control_listener;

/* One service as tpmailctl status shows it. */
static json_t *
control_service(struct service *sv)
{
	char	listen[128];

	snprintf(listen, sizeof(listen), "%s:%d", sup->st.listen_address,
	    sv->sv_port);
	return json_pack(
		    "{s:s,s:s,s:s,s:s?,s:s,s:i,s:o,s:s,s:i,s:I,s:I,s:I,s:s?,s:O?}",
		    "namespace", sv->sv_namespace, "name", sv->sv_name,
		    "cr", sv->sv_cr, "tenant", sv->sv_tenant,
		    "listen", listen, "port", sv->sv_svc_port,
		    "pid", sv->sv_pid > 0 ? json_integer(sv->sv_pid) : json_null(),
		    "state", service_state_name(sv->sv_state),
		    "restarts", sv->sv_restarts,
		    "sessions_active", (json_int_t)sv->sv_active,
		    "sessions_total", (json_int_t)sv->sv_total,
		    "sessions_failed", (json_int_t)sv->sv_failed,
		    "error", sv->sv_error, "sandbox", sv->sv_sandbox);
}

static struct service *
control_find(const char *key)
{
	struct service	*sv;

	TAILQ_FOREACH(sv, &sup->services, sv_entry)
		if (key != NULL && strcmp(sv->sv_key, key) == 0 && !sv->sv_remove)
			return sv;
	return NULL;
}

/* tpmailctl status --json: the services and the rejected CRs. */
json_t *
control_status(void)
{
	struct service	*sv;
	json_t		*services = json_array(), *rej = json_array(), *r;
	size_t		 i;

	TAILQ_FOREACH(sv, &sup->services, sv_entry)
		json_array_append_new(services, control_service(sv));
	json_array_foreach(sup->rejected, i, r)
		json_array_append_new(rej, json_pack("{s:O,s:O,s:O,s:O}",
		    "namespace", json_object_get(r, "namespace"),
		    "cr", json_object_get(r, "cr"),
		    "reason", json_object_get(r, "reason"),
		    "error", json_object_get(r, "error")));
	return json_pack("{s:o,s:o}", "services", services, "rejected", rej);
}

#ifdef TPMAIL_SANDBOX_TESTING
/* Test builds only: ask one proxy to make a forbidden system call. */
static json_t *
control_test_syscall(json_t *req)
{
	struct service	*sv;
	const char	*key = json_string_value(json_object_get(req, "service"));
	json_t		*body;

	TAILQ_FOREACH(sv, &sup->services, sv_entry) {
		if (key == NULL || strcmp(sv->sv_key, key) != 0 || sv->sv_chan == -1)
			continue;
		body = json_pack("{s:O}", "syscall", json_object_get(req,
		    "syscall"));
		msg_send(sv->sv_chan, MSG_TEST_SYSCALL, body, -1);
		json_decref(body);
		return json_pack("{s:b}", "ok", 1);
	}
	return json_pack("{s:s}", "error", "no such running service");
}
#endif

/* status, or status of one service in detail (recent errors included). */
static json_t *
control_status_req(json_t *req)
{
	const char	*key = json_string_value(json_object_get(req, "service"));
	struct service	*sv;
	json_t		*one;

	if (key == NULL)
		return control_status();
	if ((sv = control_find(key)) == NULL)
		return json_pack("{s:s+}", "error", "no such service: ", key);
	one = control_service(sv);
	json_object_set_new(one, "recent_errors", sv->sv_errors ?
	    json_incref(sv->sv_errors) : json_array());
	json_object_set_new(one, "started", json_integer(sv->sv_started));
	return json_pack("{s:o}", "service", one);
}

/* restart one service, or every service of a CR; graceful unless hard. */
static json_t *
control_restart(json_t *req)
{
	const char	*key = json_string_value(json_object_get(req, "service"));
	const char	*cr = json_string_value(json_object_get(req, "cr"));
	int		 hard = json_is_true(json_object_get(req, "hard"));
	struct service	*sv, *next;
	json_t		*done = json_array();
	char		 ns[256];
	const char	*slash;

	if (cr == NULL) {
		if ((sv = control_find(key)) == NULL) {
			json_decref(done);
			return json_pack("{s:s+}", "error", "no such service: ",
			    key ? key : "(none)");
		}
		if (service_restart(sv, hard) == -1) {
			json_decref(done);
			return json_pack("{s:s+}", "error", "cannot restart ", key);
		}
		json_array_append_new(done, json_string(sv->sv_key));
		return json_pack("{s:b,s:o}", "ok", 1, "restarted", done);
	}
	if ((slash = strchr(cr, '/')) == NULL || (size_t)(slash - cr) >= sizeof(ns)) {
		json_decref(done);
		return json_pack("{s:s}", "error", "expected --cr <namespace>/<cr>");
	}
	memcpy(ns, cr, slash - cr);
	ns[slash - cr] = '\0';
	TAILQ_FOREACH_SAFE(sv, &sup->services, sv_entry, next)
		if (!sv->sv_remove && strcmp(sv->sv_namespace, ns) == 0 &&
		    strcmp(sv->sv_cr, slash + 1) == 0 &&
		    service_restart(sv, hard) == 0)
			json_array_append_new(done, json_string(sv->sv_key));
	if (json_array_size(done) == 0) {
		json_decref(done);
		return json_pack("{s:s+}", "error", "no running service for CR ", cr);
	}
	return json_pack("{s:b,s:o}", "ok", 1, "restarted", done);
}

static json_t *
control_drain(json_t *req)
{
	const char	*key = json_string_value(json_object_get(req, "service"));
	struct service	*sv;

	if ((sv = control_find(key)) == NULL)
		return json_pack("{s:s+}", "error", "no such service: ",
		    key ? key : "(none)");
	if (service_drain(sv) == -1)
		return json_pack("{s:s+}", "error", "cannot drain ", key);
	return json_pack("{s:b}", "ok", 1);
}

static json_t *
control_log_level(json_t *req)
{
	const char	*lvl = json_string_value(json_object_get(req, "level"));
	int		 l;

	if (lvl == NULL || (l = log_level_parse(lvl)) == -1)
		return json_pack("{s:s}", "error",
		    "level must be error, warn, info or debug");
	log_set_level(l);
	sup->st.log_level = l;
	services_set_log_level(l);
	log_info("log level set to %s", log_level_name(l));
	return json_pack("{s:b,s:s}", "ok", 1, "level", log_level_name(l));
}

static void
control_reply(struct bufferevent *bev, json_t *reply)
{
	char	*s = json_dumps(reply, JSON_COMPACT);

	json_decref(reply);
	if (s != NULL) {
		evbuffer_add_printf(bufferevent_get_output(bev), "%s\n", s);
		free(s);
	}
	/* close once written */
	bufferevent_disable(bev, EV_READ);
}

static void
control_read_cb(struct bufferevent *bev, void *arg)
{
	struct evbuffer	*in = bufferevent_get_input(bev);
	json_error_t	 jerr;
	json_t		*req;
	const char	*cmd;
	char		*line;
	size_t		 len;

	if ((line = evbuffer_readln(in, &len, EVBUFFER_EOL_LF)) == NULL) {
		if (evbuffer_get_length(in) > CONTROL_MAX_REQUEST)
			control_reply(bev, json_pack("{s:s}", "error",
			    "request too long"));
		return;
	}
	req = json_loadb(line, len, 0, &jerr);
	free(line);
	cmd = json_string_value(json_object_get(req, "cmd"));
	if (cmd == NULL)
		control_reply(bev, json_pack("{s:s}", "error",
		    "malformed request: expected {\"cmd\": ...}"));
	else if (strcmp(cmd, "status") == 0)
		control_reply(bev, control_status_req(req));
	else if (strcmp(cmd, "restart") == 0)
		control_reply(bev, control_restart(req));
	else if (strcmp(cmd, "drain") == 0)
		control_reply(bev, control_drain(req));
	else if (strcmp(cmd, "log-level") == 0)
		control_reply(bev, control_log_level(req));
#ifdef TPMAIL_SANDBOX_TESTING
	else if (strcmp(cmd, "test-syscall") == 0)
		control_reply(bev, control_test_syscall(req));
#endif
	else
		control_reply(bev, json_pack("{s:s+}", "error",
		    "unknown command: ", cmd));
	json_decref(req);
}

static void
control_write_cb(struct bufferevent *bev, void *arg)
{
	if (!(bufferevent_get_enabled(bev) & EV_READ))
		bufferevent_free(bev);
}

static void
control_event_cb(struct bufferevent *bev, short what, void *arg)
{
	bufferevent_free(bev);
}

static void
control_accept_cb(struct evconnlistener *l, evutil_socket_t fd,
    struct sockaddr *sa, int salen, void *arg)
{
	struct bufferevent	*bev;

	bev = bufferevent_socket_new(sup->base, fd, BEV_OPT_CLOSE_ON_FREE);
	if (bev == NULL) {
		close(fd);
		return;
	}
	bufferevent_setcb(bev, control_read_cb, control_write_cb,
	    control_event_cb, NULL);
	bufferevent_set_timeouts(bev, &(struct timeval){ 10, 0 },
	    &(struct timeval){ 10, 0 });
	bufferevent_enable(bev, EV_READ | EV_WRITE);
}

static struct accept_pause	*control_pause;

void
control_start(void)
{
	struct sockaddr_un	sun;
	mode_t			old;
	int			dirfd;

	if (unixaddr_fill(sup->st.control, &sun, &dirfd) == -1)
		fatal("control socket %s", sup->st.control);
	if (unlink(sup->st.control) == -1 && errno != ENOENT)
		fatal("unlink %s", sup->st.control);
	old = umask(0077);
	control_listener = evconnlistener_new_bind(sup->base, control_accept_cb,
	    NULL, LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, 16,
	    (struct sockaddr *)&sun, sizeof(sun));
	umask(old);
	if (dirfd != -1)
		close(dirfd);
	if (control_listener == NULL)
		fatal("cannot listen on %s", sup->st.control);
	/* out of descriptors: stop accepting for a second, not spin */
	control_pause = accept_pause_new(sup->base, control_listener,
	    "control", 1, NULL);
}

void
control_stop(void)
{
	if (control_listener != NULL) {
		evconnlistener_free(control_listener);
		unlink(sup->st.control);
	}
	control_listener = NULL;
	accept_pause_free(control_pause);
	control_pause = NULL;
}
