/*
 * session.c: one client's POP3 session in the tenant proxy.  While the
 * upstream login runs the client waits for its greeting; afterwards every
 * client line goes through the command table: USER/PASS/APOP/AUTH/CAPA are
 * answered here, the rest is relayed upstream in order, and replies are
 * copied back byte for byte.  A FIFO of pending commands keeps replies in
 * the client's order even when local answers and relayed ones are
 * pipelined together.  QUIT is the only way a session ends with a QUIT
 * upstream: a client that vanishes commits nothing.
 * Runs unprivileged in the sandboxed tenant proxy.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/queue.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/bufferevent_ssl.h>
#include <event2/event.h>

#include "log.h"
#include "params.h"
#include "proxy.h"
#include "secret.h"
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>

enum session_state {
	SESSION_LOGIN,		/* upstream login in progress */
	SESSION_AUTHWAIT,	/* waiting for the client's AUTH XOAUTH2 */
	SESSION_EXCHANGE,	/* its token being exchanged by tpmaild */
	SESSION_RELAY,		/* client commands served */
	SESSION_CLOSING,	/* flushing the last bytes to the client */
	SESSION_DEAD,		/* freed on the next loop turn */
};

enum reply_state {
	REPLY_STATUS,		/* waiting for the status line */
	REPLY_BODY,		/* copying a multi-line body */
};

struct pending {
	TAILQ_ENTRY(pending)	 pe_entry;
	int			 pe_local;	/* pe_data is the reply */
	int			 pe_sent;	/* relayed: written upstream */
	int			 pe_multiline;
	int			 pe_quit;
	char			*pe_data;	/* local reply, or the line to relay */
	size_t			 pe_len;
};
TAILQ_HEAD(pending_queue, pending);

struct session {
	TAILQ_ENTRY(session)	 se_entry;
	unsigned long		 se_id;
	enum session_state	 se_state;
	struct proxy_config	*se_cfg;
	struct bufferevent	*se_client;
	struct upstream		*se_up;
	struct bufferevent	*se_ubev;	/* upstream's, once ready */
	struct event		*se_uread;	/* our own reader of the upstream */
	SSL			*se_ussl;	/* its TLS, when it has one */
	short			 se_ueof;	/* its end, owed once its input is relayed */
	struct event		*se_cwrite;	/* our own writer to the client */
	struct pending_queue	 se_queue;
	int			 se_npending;
	int			 se_inflight;	/* relayed, reply not complete */
	enum reply_state	 se_reply;
	struct pop3_ml_scan	 se_scan;
	int			 se_sasl_steps;	/* client SASL lines still to absorb */
	int			 se_quit;	/* client sent QUIT */
	int			 se_client_eof;	/* half-closed: replies still owed */
	int			 se_overlong;	/* ... or its line had no end */
	int			 se_client_gone;	/* cannot be written to */
	int			 se_failed;
	int			 se_login_failed;
	int			 se_exchanged;	/* logged in with an exchanged token */
	char			*se_token;	/* that token, wiped on free */
	char			*se_reason;	/* owned: callers' strings are transient */
	const char		*se_capa;	/* the CAPA reply: the config's, */
	char			*se_capa_own;	/* or this, when the server's differs */
	struct timeval		 se_start;
	unsigned long		 se_commands;
	unsigned long		 se_bytes_up;	/* upstream -> client */
	unsigned long		 se_bytes_down;	/* client -> upstream */
};

static TAILQ_HEAD(, session)	sessions = TAILQ_HEAD_INITIALIZER(sessions);

static void	session_pump(struct session *);
static void	session_authwait_read(struct session *);
static void	session_client_read(struct session *);
static void	session_close(struct session *, int, const char *);
static void	session_close_flush(struct session *, int, const char *);
static void	session_upstream_event_cb(struct bufferevent *, short, void *);
static void	session_client_event_cb(struct bufferevent *, short, void *);
static void	session_client_send(struct session *);

/*
 * Reading from the mail server on or off.  A plain TCP upstream is read by
 * the session's own event (see session_upstream_fd_cb); a TLS one by its
 * bufferevent.
 */
static void
session_upstream_reading(struct session *s, int on)
{
	if (s->se_uread == NULL) {
		if (on)
			bufferevent_enable(s->se_ubev, EV_READ);
		else
			bufferevent_disable(s->se_ubev, EV_READ);
	} else if (!on || s->se_ueof)
		event_del(s->se_uread);
	else if (!event_pending(s->se_uread, EV_READ, NULL)) {
		event_add(s->se_uread, &(struct timeval){
		    s->se_cfg->idle_timeout, 0 });
		/* decrypted bytes left in OpenSSL: the socket won't say so */
		if (s->se_ussl != NULL && SSL_pending(s->se_ussl) > 0)
			event_active(s->se_uread, EV_READ, 0);
	}
}

unsigned long
session_id(struct session *s)
{
	return s->se_id;
}

static void
session_enter_state(struct session *s, enum session_state st)
{
	static const char *const names[] = { "login", "authwait", "exchange",
	    "relay", "closing", "dead" };

	log_debug("session=%lu state %s -> %s", s->se_id, names[s->se_state],
	    names[st]);
	s->se_state = st;
}

/* Append a reply the proxy answers itself, in command order. */
static void
session_local(struct session *s, const char *reply)
{
	struct pending	*p;

	if ((p = calloc(1, sizeof(*p))) == NULL ||
	    (p->pe_data = strdup(reply)) == NULL) {
		free(p);
		session_close(s, 1, "out of memory");
		return;
	}
	p->pe_local = 1;
	p->pe_len = strlen(reply);
	TAILQ_INSERT_TAIL(&s->se_queue, p, pe_entry);
	s->se_npending++;
}

/* Append a command to relay: the line as the client wrote it, with CRLF. */
static void
session_relay(struct session *s, const struct pop3_cmd *cmd, const char *line,
    size_t len)
{
	struct pending	*p;

	if ((p = calloc(1, sizeof(*p))) == NULL ||
	    (p->pe_data = malloc(len + 2)) == NULL) {
		free(p);
		session_close(s, 1, "out of memory");
		return;
	}
	memcpy(p->pe_data, line, len);
	memcpy(p->pe_data + len, "\r\n", 2);
	p->pe_len = len + 2;
	p->pe_multiline = cmd->multiline;
	p->pe_quit = cmd->id == POP3_QUIT;
	TAILQ_INSERT_TAIL(&s->se_queue, p, pe_entry);
	s->se_npending++;
}

static void
session_pending_free(struct session *s, struct pending *p)
{
	TAILQ_REMOVE(&s->se_queue, p, pe_entry);
	s->se_npending--;
	free(p->pe_data);
	free(p);
}

/* The SASL exchange a client starts is answered here, whatever it carries. */
static void
session_auth(struct session *s, const struct pop3_cmd *cmd)
{
	char	mech[32];
	size_t	ml;
	int	ir;

	if (cmd->nargs == 0) {
		session_local(s, "+OK\r\nPLAIN\r\nLOGIN\r\nXOAUTH2\r\n.\r\n");
		return;
	}
	for (ml = 0; ml < cmd->argslen && cmd->args[ml] != ' ' &&
	    ml < sizeof(mech) - 1; ml++)
		mech[ml] = cmd->args[ml];
	mech[ml] = '\0';
	ir = cmd->nargs == 2;
	if (strcasecmp(mech, "PLAIN") == 0 || strcasecmp(mech, "XOAUTH2") == 0) {
		if (ir)
			session_local(s, "+OK Logged in.\r\n");
		else {
			session_local(s, "+ \r\n");
			s->se_sasl_steps = 1;
		}
	} else if (strcasecmp(mech, "LOGIN") == 0) {
		if (ir) {
			session_local(s, "+ UGFzc3dvcmQ6\r\n");
			s->se_sasl_steps = 1;
		} else {
			session_local(s, "+ VXNlcm5hbWU6\r\n");
			s->se_sasl_steps = 2;
		}
	} else
		session_local(s, "-ERR Unsupported authentication mechanism\r\n");
}

/* A SASL continuation line from the client: absorbed, never relayed. */
static void
session_sasl_line(struct session *s, const char *line, size_t len)
{
	s->se_sasl_steps--;
	if (len == 1 && line[0] == '*') {
		s->se_sasl_steps = 0;
		session_local(s, "-ERR Authentication cancelled\r\n");
	} else if (s->se_sasl_steps == 0)
		session_local(s, "+OK Logged in.\r\n");
	else
		session_local(s, "+ UGFzc3dvcmQ6\r\n");
}

/* Handle one complete command line from the client. */
static void
session_command(struct session *s, char *line, size_t len)
{
	struct pop3_cmd	 cmd;
	const char	*err;
	char		 buf[128];

	s->se_commands++;
	if (s->se_sasl_steps > 0) {
		session_sasl_line(s, line, len);
		return;
	}
	if (pop3_parse_command(line, len, &cmd, &err) == -1) {
		snprintf(buf, sizeof(buf), "-ERR %s\r\n", err);
		session_local(s, buf);
		return;
	}
	log_debug("session=%lu command=%s", s->se_id, cmd.name);
	switch (cmd.id) {
	case POP3_USER:
		session_local(s, "+OK\r\n");
		break;
	case POP3_PASS:
	case POP3_APOP:
		session_local(s, "+OK Logged in.\r\n");
		break;
	case POP3_AUTH:
		session_auth(s, &cmd);
		break;
	case POP3_CAPA:
		session_local(s, s->se_capa);
		break;
	case POP3_STLS:
		session_local(s, "-ERR STLS is not offered by this proxy\r\n");
		break;
	case POP3_QUIT:
		s->se_quit = 1;
		/* FALLTHROUGH */
	default:
		session_relay(s, &cmd, line, len);
		break;
	}
}

/*
 * Whether to read the client: not while its queue is full, nor while it
 * has not taken half the buffer budget of replies (a client that pipelines
 * without reading would otherwise grow its output without bound).
 */
static int
session_client_backlogged(struct session *s)
{
	return s->se_npending >= PARAM_MAX_PENDING ||
	    evbuffer_get_length(bufferevent_get_output(s->se_client)) >=
	    (size_t)s->se_cfg->max_buffer / 2;
}

static int
session_client_may_read(struct session *s)
{
	return s->se_state == SESSION_RELAY && !s->se_quit &&
	    !s->se_client_eof && !session_client_backlogged(s);
}

/*
 * The client's output drained.  Read it again unless it is backlogged; after
 * QUIT too, though only to notice it leave (its lines are not served).
 */
static void
session_client_reading_update(struct session *s)
{
	struct evbuffer	*in = bufferevent_get_input(s->se_client);

	if (s->se_state != SESSION_RELAY || s->se_client_eof)
		return;
	if (session_client_backlogged(s)) {
		bufferevent_disable(s->se_client, EV_READ);
		return;
	}
	bufferevent_enable(s->se_client, EV_READ);
	/* lines already read wait for no new bytes */
	if (!s->se_quit &&
	    evbuffer_search_eol(in, NULL, NULL, EVBUFFER_EOL_CRLF).pos != -1)
		session_client_read(s);
}

/* Read complete lines from the client, as many as the queue takes. */
static void
session_client_read(struct session *s)
{
	struct evbuffer		*in = bufferevent_get_input(s->se_client);
	struct evbuffer_ptr	 eol;
	size_t			 eol_len, len;
	char			*line;

	while (s->se_state == SESSION_RELAY && !s->se_quit) {
		/*
		 * A full queue may be local replies only: they leave at once.
		 * Stopping here instead would strand the lines already read
		 * until the client sent more, which it need not.
		 */
		if (s->se_npending >= PARAM_MAX_PENDING)
			session_pump(s);
		if (s->se_npending >= PARAM_MAX_PENDING ||
		    evbuffer_get_length(bufferevent_get_output(s->se_client)) >=
		    (size_t)s->se_cfg->max_buffer / 2)
			break;
		eol = evbuffer_search_eol(in, NULL, &eol_len, EVBUFFER_EOL_CRLF);
		if (eol.pos == -1) {
			if (evbuffer_get_length(in) >= (size_t)s->se_cfg->max_line) {
				/*
				 * Read no more, but answer what came before it
				 * first: closing now would drop the replies still
				 * owed and this -ERR behind them.  The last reply
				 * closes (session_reply_done).
				 */
				session_local(s, "-ERR Line too long\r\n");
				evbuffer_drain(in, evbuffer_get_length(in));
				s->se_client_eof = s->se_overlong = 1;
				bufferevent_disable(s->se_client, EV_READ);
				session_pump(s);
				if (TAILQ_EMPTY(&s->se_queue))
					session_close_flush(s, 1,
					    "client line too long");
			}
			break;
		}
		len = eol.pos;
		if (len + eol_len > (size_t)s->se_cfg->max_line) {
			evbuffer_drain(in, len + eol_len);
			session_local(s, "-ERR Line too long\r\n");
			continue;
		}
		if ((line = malloc(len + 1)) == NULL) {
			session_close(s, 1, "out of memory");
			return;
		}
		evbuffer_remove(in, line, len);
		line[len] = '\0';
		evbuffer_drain(in, eol_len);
		s->se_bytes_down += len + eol_len;
		session_command(s, line, len);
		/* the line may have carried a password or a SASL response */
		secret_wipe(line, len);
		free(line);
	}
	/* after QUIT nothing is served: what comes is dropped, not held */
	if (s->se_quit)
		evbuffer_drain(in, evbuffer_get_length(in));
	session_pump(s);
	/* the queue or the output full: read again when they drain */
	if (s->se_state == SESSION_RELAY && session_client_backlogged(s))
		bufferevent_disable(s->se_client, EV_READ);
}

/* Write local replies at the head and send relayed commands upstream. */
static void
session_pump(struct session *s)
{
	struct evbuffer	*out;
	struct pending	*p;

	if (s->se_state != SESSION_RELAY && s->se_state != SESSION_CLOSING)
		return;
	out = bufferevent_get_output(s->se_client);
	while ((p = TAILQ_FIRST(&s->se_queue)) != NULL && p->pe_local) {
		evbuffer_add(out, p->pe_data, p->pe_len);
		session_pending_free(s, p);
	}
	if (s->se_state != SESSION_RELAY || s->se_ubev == NULL)
		return;
	TAILQ_FOREACH(p, &s->se_queue, pe_entry) {
		if (p->pe_local || p->pe_sent)
			continue;
		/* Without PIPELINING upstream, one command at a time. */
		if (s->se_inflight > 0 && !upstream_pipelining(s->se_up))
			break;
		bev_send(s->se_ubev, p->pe_data, p->pe_len);
		p->pe_sent = 1;
		s->se_inflight++;
	}
	if (session_client_may_read(s))
		bufferevent_enable(s->se_client, EV_READ);
}

/* The reply at the head of the queue is complete. */
static void
session_reply_done(struct session *s)
{
	struct pending	*p = TAILQ_FIRST(&s->se_queue);
	int		 quit = p->pe_quit;

	session_pending_free(s, p);
	s->se_reply = REPLY_STATUS;
	s->se_inflight--;
	if (quit) {
		session_close_flush(s, 0, "quit");
		return;
	}
	session_pump(s);
	if (s->se_client_eof && TAILQ_EMPTY(&s->se_queue))
		session_close_flush(s, s->se_overlong, s->se_overlong ?
		    "client line too long" : "client closed");
	else if (TAILQ_EMPTY(&s->se_queue) && s->se_state == SESSION_RELAY)
		session_client_read(s);
}

/*
 * Drop what the client is owed but can no longer take.  A socket
 * bufferevent keeps the start of its output frozen, where a plain drain
 * would fail.
 */
static void
session_client_discard(struct session *s)
{
	struct evbuffer	*out = bufferevent_get_output(s->se_client);

	evbuffer_unfreeze(out, 1);
	evbuffer_drain(out, evbuffer_get_length(out));
	evbuffer_freeze(out, 1);
}

/* Copy upstream replies to the client, tracking where each one ends. */
void
session_upstream_read(struct session *s)
{
	struct evbuffer		*in = bufferevent_get_input(s->se_ubev);
	struct evbuffer		*out = bufferevent_get_output(s->se_client);
	struct evbuffer_iovec	 v[16];
	struct evbuffer_ptr	 eol;
	struct pending		*p;
	size_t			 eol_len, n, used;
	char			 status[8];
	int			 i, nv, done = 0;

	while (s->se_state == SESSION_RELAY && evbuffer_get_length(in) > 0) {
		/*
		 * A client gone after QUIT takes nothing more: its replies are
		 * only followed to their end, so that the QUIT behind them
		 * reaches the server and it commits, as the client asked.
		 */
		if (s->se_client_gone)
			session_client_discard(s);
		/* half the budget each way: upstream input, client output */
		if (evbuffer_get_length(out) >= (size_t)s->se_cfg->max_buffer / 2) {
			/* slow client: stop reading upstream until it drains */
			session_upstream_reading(s, 0);
			return;
		}
		p = TAILQ_FIRST(&s->se_queue);
		if (p == NULL || p->pe_local || !p->pe_sent) {
			session_close_flush(s, 1, "unexpected data from the mail server");
			return;
		}
		if (s->se_reply == REPLY_STATUS) {
			eol = evbuffer_search_eol(in, NULL, &eol_len,
			    EVBUFFER_EOL_CRLF);
			if (eol.pos == -1) {
				if (evbuffer_get_length(in) > PARAM_MAX_LINE)
					session_close_flush(s, 1,
					    "overlong status line from the mail server");
				return;
			}
			n = evbuffer_copyout(in, status, sizeof(status));
			s->se_bytes_up += eol.pos + eol_len;
			evbuffer_remove_buffer(in, out, eol.pos + eol_len);
			if (p->pe_multiline && pop3_response_status(status,
			    n < (size_t)eol.pos ? n : (size_t)eol.pos) == 1) {
				s->se_reply = REPLY_BODY;
				pop3_ml_init(&s->se_scan);
				continue;
			}
			session_reply_done(s);
			continue;
		}
		/* REPLY_BODY: find the terminator across the buffer's chunks */
		nv = evbuffer_peek(in, -1, NULL, v, 16);
		if (nv > 16)
			nv = 16;
		for (i = 0, used = 0; i < nv && !done; i++)
			used += pop3_ml_feed(&s->se_scan, v[i].iov_base,
			    v[i].iov_len, &done);
		s->se_bytes_up += used;
		evbuffer_remove_buffer(in, out, used);
		if (done) {
			done = 0;
			session_reply_done(s);
		}
	}
}

static void
session_upstream_read_cb(struct bufferevent *bev, void *arg)
{
	session_upstream_read(arg);
	session_client_send(arg);
}

/*
 * Fill the upstream input from a plain socket: PARAM_READ_SIZE a read, up
 * to limit.  A short read means the socket is drained, so no read is spent
 * on EAGAIN.  Returns 1 while the connection is open, 0 at its end, -1 on
 * an error.
 */
static int
session_fill_plain(struct evbuffer *in, evutil_socket_t fd, size_t limit)
{
	struct evbuffer_iovec	 v[2];
	struct iovec		 iov[2];
	size_t			 want, got;
	ssize_t			 n;
	int			 i, nv;

	while (evbuffer_get_length(in) < limit) {
		want = limit - evbuffer_get_length(in);
		if ((nv = evbuffer_reserve_space(in, want < PARAM_READ_SIZE ?
		    want : PARAM_READ_SIZE, v, 2)) <= 0)
			return -1;
		for (i = 0, want = 0; i < nv; i++) {
			iov[i].iov_base = v[i].iov_base;
			iov[i].iov_len = v[i].iov_len;
			want += v[i].iov_len;
		}
		if ((n = readv(fd, iov, nv)) <= 0) {
			evbuffer_commit_space(in, v, 0);
			if (n == -1 && (errno == EAGAIN || errno == EINTR))
				return 1;
			return n == 0 ? 0 : -1;
		}
		got = n;
		for (i = 0; i < nv && got > v[i].iov_len; i++)
			got -= v[i].iov_len;
		v[i].iov_len = got;
		evbuffer_commit_space(in, v, i + 1);
		if ((size_t)n < want)
			break;		/* a short read: the socket is drained */
	}
	return 1;
}

/*
 * The same through TLS: SSL_read record after record into one contiguous
 * PARAM_READ_SIZE space, until OpenSSL needs the socket again.
 */
static int
session_fill_tls(struct evbuffer *in, SSL *ssl, size_t limit)
{
	struct evbuffer_iovec	 v;
	size_t			 used;
	int			 r = 1, rv = 1;

	ERR_clear_error();
	while (r > 0 && evbuffer_get_length(in) < limit) {
		used = limit - evbuffer_get_length(in);
		if (evbuffer_reserve_space(in, used < PARAM_READ_SIZE ? used :
		    PARAM_READ_SIZE, &v, 1) != 1)
			return -1;
		for (used = 0; used < v.iov_len; used += r)
			if ((r = SSL_read(ssl, (char *)v.iov_base + used,
			    (int)(v.iov_len - used))) <= 0)
				break;
		v.iov_len = used;
		evbuffer_commit_space(in, &v, 1);
	}
	if (r <= 0) {
		switch (SSL_get_error(ssl, r)) {
		case SSL_ERROR_WANT_READ:
		case SSL_ERROR_WANT_WRITE:
			break;
		case SSL_ERROR_ZERO_RETURN:
			rv = 0;
			break;
		case SSL_ERROR_SYSCALL:
			/* a close without close_notify: allowed, as for the login */
			rv = ERR_peek_error() == 0 && (errno == 0 ||
			    errno == ECONNRESET) ? 0 : -1;
			break;
		default:
			rv = -1;
			break;
		}
		ERR_clear_error();
	}
	return rv;
}

/*
 * The upstream's reader after the login.  libevent 2.1's socket bufferevent
 * reads 4 KiB per call with an ioctl before each, its OpenSSL one 4 KiB per
 * SSL_read; this fills the same input buffer in large steps, up to half the
 * session's buffer budget, then hands it to session_upstream_read.
 */
static void
session_upstream_fd_cb(evutil_socket_t fd, short what, void *arg)
{
	struct session		*s = arg;
	struct evbuffer		*in = bufferevent_get_input(s->se_ubev);
	size_t			 out = evbuffer_get_length(
				    bufferevent_get_output(s->se_client));
	size_t			 limit = s->se_cfg->max_buffer / 2;
	int			 open;

	if (what & EV_TIMEOUT) {
		session_upstream_event_cb(s->se_ubev,
		    BEV_EVENT_READING | BEV_EVENT_TIMEOUT, s);
		return;
	}
	/*
	 * What the client has not taken yet counts against the budget too:
	 * a slow reader holds half of it in all, a fast one gets it all for
	 * reading, as its output leaves at once.
	 */
	limit = out + PARAM_MIN_READ < limit ? limit - out : PARAM_MIN_READ;
	/* a bufferevent keeps its input's end frozen but while it reads */
	evbuffer_unfreeze(in, 0);
	errno = 0;
	open = s->se_ussl != NULL ? session_fill_tls(in, s->se_ussl, limit) :
	    session_fill_plain(in, fd, limit);
	evbuffer_freeze(in, 0);
	session_upstream_read(s);
	session_client_send(s);
	if (s->se_state != SESSION_RELAY)
		return;
	if (open <= 0) {
		event_del(s->se_uread);
		s->se_ueof = open == 0 ? BEV_EVENT_EOF : BEV_EVENT_ERROR;
		/* a slow client has not taken all yet: its end comes after */
		if (evbuffer_get_length(in) == 0)
			session_upstream_event_cb(s->se_ubev, BEV_EVENT_READING |
			    s->se_ueof, s);
	} else if (s->se_ussl != NULL && SSL_pending(s->se_ussl) > 0 &&
	    event_pending(s->se_uread, EV_READ, NULL))
		event_active(s->se_uread, EV_READ, 0);	/* more, decrypted */
}

/* Upstream output drained: resume reading a client we paused. */
static void
session_upstream_write_cb(struct bufferevent *bev, void *arg)
{
	struct session	*s = arg;

	if (s->se_state == SESSION_RELAY && !s->se_quit && !s->se_client_eof)
		bufferevent_enable(s->se_client, EV_READ);
}

static void
session_upstream_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct session	*s = arg;
	struct pending	*p = TAILQ_FIRST(&s->se_queue);

	if (s->se_state != SESSION_RELAY)
		return;
	if (what & BEV_EVENT_TIMEOUT) {
		if (s->se_inflight == 0) {
			/* nothing owed: the server may be quiet */
			session_upstream_reading(s, 1);
			return;
		}
		session_close_flush(s, 1, "mail server timed out");
		return;
	}
	/* Tell the client why, unless we are in the middle of a reply. */
	if (s->se_reply == REPLY_STATUS && !(p != NULL && p->pe_quit))
		evbuffer_add_printf(bufferevent_get_output(s->se_client),
		    "-ERR [SYS/TEMP] Connection to the mail server lost\r\n");
	session_close_flush(s, p == NULL || !p->pe_quit, "mail server closed");
}

static void
session_client_read_cb(struct bufferevent *bev, void *arg)
{
	struct session	*s = arg;

	if (s->se_state == SESSION_AUTHWAIT)
		session_authwait_read(s);
	else if (s->se_state == SESSION_LOGIN) {
		/*
		 * Early input waits for the greeting.  Once a line's worth is
		 * held, stop reading: libevent calls this again on every loop
		 * turn while the input stays at its high watermark, a busy
		 * loop until the login ends.  session_upstream_ready reads on.
		 */
		if (evbuffer_get_length(bufferevent_get_input(bev)) >=
		    (size_t)s->se_cfg->max_line)
			bufferevent_disable(bev, EV_READ);
	} else {
		session_client_read(s);
		session_client_send(s);
	}
}

/*
 * One writev of the client's output.  A socket bufferevent keeps the start
 * of its output frozen but while it writes itself.  -1 on a real error.
 */
static int
session_client_write(struct session *s, evutil_socket_t fd)
{
	struct evbuffer	*out = bufferevent_get_output(s->se_client);
	int		 n;

	evbuffer_unfreeze(out, 1);
	n = evbuffer_write(out, fd);
	evbuffer_freeze(out, 1);
	return (n == -1 && errno != EAGAIN && errno != EINTR) ? -1 : 0;
}

static void	session_client_fd_cb(evutil_socket_t, short, void *);

/* The client's write event, made when its socket is first full. */
static struct event *
session_client_writer(struct session *s)
{
	if (s->se_cwrite == NULL)
		s->se_cwrite = event_new(proxy->base, bufferevent_getfd(
		    s->se_client), EV_WRITE, session_client_fd_cb, s);
	return s->se_cwrite;
}

/*
 * Write what the client is owed, now rather than on the next loop turn,
 * and while its output drains relay more of what the mail server sent.
 * During the relay the client's bufferevent does not write: this does,
 * and session_client_fd_cb when the socket was full.
 */
static void
session_client_send(struct session *s)
{
	struct evbuffer	*out = bufferevent_get_output(s->se_client);
	struct evbuffer	*in;

	while (s->se_state == SESSION_RELAY &&
	    !s->se_client_gone) {
		if (evbuffer_get_length(out) > 0 && session_client_write(s,
		    bufferevent_getfd(s->se_client)) == -1) {
			/* handled in the writer's callback, not under our callers */
			if (session_client_writer(s) != NULL)
				event_active(s->se_cwrite, EV_WRITE, 0);
			else
				session_close(s, 1, "out of memory");
			return;
		}
		if (evbuffer_get_length(out) > 0) {
			if (session_client_writer(s) == NULL)
				session_close(s, 1, "out of memory");
			else if (!event_pending(s->se_cwrite, EV_WRITE, NULL))
				event_add(s->se_cwrite, &(struct timeval){
				    s->se_cfg->idle_timeout, 0 });
			return;
		}
		if (s->se_cwrite != NULL)
			event_del(s->se_cwrite);
		/* drained: a client paused for its output may go on */
		session_client_reading_update(s);
		if (evbuffer_get_length(out) > 0)
			continue;	/* answers to the lines it had sent */
		if (s->se_ubev == NULL)
			return;
		/* and what waits upstream can follow */
		session_upstream_reading(s, 1);
		in = bufferevent_get_input(s->se_ubev);
		if (evbuffer_get_length(in) == 0) {
			if (s->se_ueof)
				session_upstream_event_cb(s->se_ubev,
				    BEV_EVENT_READING | s->se_ueof, s);
			return;
		}
		session_upstream_read(s);
		if (evbuffer_get_length(out) == 0)
			return;
	}
}

static void
session_client_fd_cb(evutil_socket_t fd, short what, void *arg)
{
	struct session	*s = arg;
	struct evbuffer	*out = bufferevent_get_output(s->se_client);

	if (s->se_state != SESSION_RELAY || s->se_client_gone)
		return;
	if (what & EV_TIMEOUT) {
		session_close(s, 1, "client write timeout");
		return;
	}
	if (evbuffer_get_length(out) > 0 && session_client_write(s, fd) == -1) {
		event_del(s->se_cwrite);
		session_client_event_cb(s->se_client, BEV_EVENT_WRITING |
		    BEV_EVENT_ERROR, s);
		return;
	}
	session_client_send(s);
}

/*
 * Client output drained below the low watermark.  The bufferevent writes
 * only while the session closes; during the relay see session_client_send.
 */
static void
session_client_write_cb(struct bufferevent *bev, void *arg)
{
	struct session	*s = arg;

	if (s->se_state == SESSION_CLOSING &&
	    evbuffer_get_length(bufferevent_get_output(bev)) == 0)
		session_close(s, s->se_failed, s->se_reason);
}

static void
session_client_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct session	*s = arg;

	if (what & BEV_EVENT_TIMEOUT) {
		if ((what & BEV_EVENT_READING) && s->se_state == SESSION_RELAY &&
		    s->se_inflight > 0) {
			/* waiting for the mail server, not idle */
			bufferevent_enable(bev, EV_READ);
			return;
		}
		if (s->se_state == SESSION_RELAY && (what & BEV_EVENT_READING)) {
			evbuffer_add_printf(bufferevent_get_output(bev),
			    "-ERR [SYS/TEMP] Autologout; idle for too long\r\n");
			session_close_flush(s, 0, "idle timeout");
		} else
			session_close(s, 1, "client write timeout");
		return;
	}
	if ((what & BEV_EVENT_EOF) && s->se_state == SESSION_RELAY &&
	    !TAILQ_EMPTY(&s->se_queue)) {
		/*
		 * Half-closed client with replies owed: finish them.  Unless it
		 * sent QUIT, the upstream is closed without QUIT at the end.
		 */
		s->se_client_eof = 1;
		bufferevent_disable(bev, EV_READ);
		return;
	}
	if (s->se_quit && s->se_state == SESSION_RELAY) {
		/* QUIT was sent: let the server commit, then close. */
		s->se_client_eof = s->se_client_gone = 1;
		bufferevent_disable(bev, EV_READ | EV_WRITE);
		if (s->se_cwrite != NULL)
			event_del(s->se_cwrite);
		/* nobody takes what is owed: drop it, go on to the QUIT */
		session_client_discard(s);
		if (s->se_ubev != NULL) {
			session_upstream_reading(s, 1);
			session_upstream_read(s);
		}
		return;
	}
	session_close(s, 0, (what & BEV_EVENT_EOF) ? "client closed" :
	    "client connection error");
}

static const char	authwait_capa[] =
    "+OK Capability list follows\r\nSASL XOAUTH2\r\nRESP-CODES\r\n"
    "AUTH-RESP-CODE\r\nPIPELINING\r\nIMPLEMENTATION tpmail\r\n.\r\n";

/*
 * The client's XOAUTH2 response: base64 of user=U^Aauth=Bearer T^A^A.  T is
 * a refresh token or an authorization code that tpmaild exchanges for an
 * access token; nothing of it is logged.
 */
static void
session_xoauth2(struct session *s, const char *b64, size_t len)
{
	unsigned char	*raw;
	char		*user, *auth, *tok, *end;
	int		 n;

	if (len == 0 || len > (size_t)s->se_cfg->max_line ||
	    (raw = malloc(len + 1)) == NULL) {
		evbuffer_add_printf(bufferevent_get_output(s->se_client),
		    "-ERR [AUTH] Malformed XOAUTH2 response\r\n");
		return;
	}
	n = EVP_DecodeBlock(raw, (const unsigned char *)b64, len);
	if (n < 0) {
		secret_free(raw);
		evbuffer_add_printf(bufferevent_get_output(s->se_client),
		    "-ERR [AUTH] Malformed XOAUTH2 response\r\n");
		return;
	}
	raw[n] = '\0';		/* padding decodes to trailing NULs: harmless */
	user = (char *)raw;
	auth = strchr(user, '\001');
	if (strncmp(user, "user=", 5) != 0 || auth == NULL ||
	    strncmp(auth + 1, "auth=Bearer ", 12) != 0 ||
	    (end = strchr(auth + 13, '\001')) == NULL || end == auth + 13) {
		secret_free(raw);
		evbuffer_add_printf(bufferevent_get_output(s->se_client),
		    "-ERR [AUTH] Malformed XOAUTH2 response\r\n");
		return;
	}
	*auth = '\0';
	*end = '\0';
	tok = auth + 13;
	session_enter_state(s, SESSION_EXCHANGE);
	bufferevent_disable(s->se_client, EV_READ);
	proxy_exchange(s->se_id, s->se_cfg->exchange, user + 5, tok);
	secret_free(raw);
}

/* Before the client authenticated: only what leads to AUTH XOAUTH2. */
static void
session_authwait_read(struct session *s)
{
	struct evbuffer		*in = bufferevent_get_input(s->se_client);
	struct evbuffer		*out = bufferevent_get_output(s->se_client);
	struct evbuffer_ptr	 eol;
	struct pop3_cmd		 cmd;
	const char		*err, *sp;
	size_t			 eol_len, len;
	char			*line;

	while (s->se_state == SESSION_AUTHWAIT) {
		eol = evbuffer_search_eol(in, NULL, &eol_len, EVBUFFER_EOL_CRLF);
		if (eol.pos == -1) {
			if (evbuffer_get_length(in) >= (size_t)s->se_cfg->max_line) {
				evbuffer_add_printf(out, "-ERR Line too long\r\n");
				session_close_flush(s, 1, "client line too long");
			}
			return;
		}
		len = eol.pos;
		if (len + eol_len > (size_t)s->se_cfg->max_line ||
		    (line = malloc(len + 1)) == NULL) {
			evbuffer_drain(in, len + eol_len);
			evbuffer_add_printf(out, "-ERR Line too long\r\n");
			continue;
		}
		evbuffer_remove(in, line, len);
		line[len] = '\0';
		evbuffer_drain(in, eol_len);
		s->se_commands++;
		if (s->se_sasl_steps > 0) {
			s->se_sasl_steps = 0;
			if (len == 1 && line[0] == '*')
				evbuffer_add_printf(out,
				    "-ERR Authentication cancelled\r\n");
			else
				session_xoauth2(s, line, len);
		} else if (pop3_parse_command(line, len, &cmd, &err) == -1)
			evbuffer_add_printf(out, "-ERR %s\r\n", err);
		else if (cmd.id == POP3_CAPA)
			evbuffer_add(out, authwait_capa, sizeof(authwait_capa) - 1);
		else if (cmd.id == POP3_QUIT) {
			evbuffer_add_printf(out, "+OK Bye\r\n");
			secret_free(line);
			session_close_flush(s, 0, "quit");
			return;
		} else if (cmd.id == POP3_NOOP)
			evbuffer_add_printf(out, "+OK\r\n");
		else if (cmd.id == POP3_AUTH && cmd.nargs >= 1 &&
		    strncasecmp(cmd.args, "XOAUTH2", 7) == 0 &&
		    (cmd.argslen == 7 || cmd.args[7] == ' ')) {
			if (cmd.nargs == 1) {
				evbuffer_add_printf(out, "+ \r\n");
				s->se_sasl_steps = 1;
			} else {
				sp = cmd.args + 8;
				session_xoauth2(s, sp, cmd.args + cmd.argslen - sp);
			}
		} else
			evbuffer_add_printf(out, "-ERR [AUTH] Authenticate with "
			    "AUTH XOAUTH2 and your %s first\r\n",
			    strcmp(s->se_cfg->exchange, "code") == 0 ?
			    "authorization code" : "refresh token");
		secret_free(line);
	}
}

/* tpmaild answered an exchange: log in upstream with the token, or refuse. */
void
session_exchanged(unsigned long id, const char *token, const char *error,
    int temporary)
{
	struct session	*s;

	TAILQ_FOREACH(s, &sessions, se_entry)
		if (s->se_id == id)
			break;
	if (s == NULL || s->se_state != SESSION_EXCHANGE)
		return;		/* gone meanwhile */
	if (token == NULL) {
		log_warnx("session=%lu result=auth-refused reason=\"%s\"", id,
		    error ? error : "exchange refused");
		/* RFC 3206: [AUTH] says the token is bad, [SYS/TEMP] try later */
		evbuffer_add_printf(bufferevent_get_output(s->se_client),
		    "-ERR [%s] %s\r\n", temporary ? "SYS/TEMP" : "AUTH",
		    error ? error : "The token exchange was refused");
		session_enter_state(s, SESSION_AUTHWAIT);
		bufferevent_enable(s->se_client, EV_READ);
		session_authwait_read(s);
		return;
	}
	if ((s->se_token = strdup(token)) == NULL) {
		session_close(s, 1, "out of memory");
		return;
	}
	s->se_exchanged = 1;
	session_enter_state(s, SESSION_LOGIN);
	if ((s->se_up = upstream_start(s, s->se_cfg, s->se_token)) == NULL) {
		evbuffer_add_printf(bufferevent_get_output(s->se_client),
		    "-ERR [SYS/TEMP] Cannot connect to the mail server\r\n");
		session_close_flush(s, 1, "cannot start the upstream connection");
	}
}

/* The upstream login succeeded: greet the client and start relaying. */
/*
 * The answer to the client's CAPA, from the server's.  Every session of a
 * configuration shares one (an idle session holds less): the first
 * session's server CAPA makes it, and only a session whose server answered
 * differently (an upgrade in between) builds its own.
 */
static const char *
session_capa(struct session *s)
{
	struct proxy_config	*c = s->se_cfg;
	const char		*raw = upstream_capa(s->se_up);

	if (c->capa_reply == NULL && (c->capa_raw = strdup(raw)) != NULL &&
	    (c->capa_reply = pop3_capa_build(raw)) == NULL) {
		free(c->capa_raw);
		c->capa_raw = NULL;
	}
	if (c->capa_reply != NULL && strcmp(c->capa_raw, raw) == 0)
		return c->capa_reply;
	return s->se_capa_own = pop3_capa_build(raw);
}

void
session_upstream_ready(struct session *s)
{
	struct timeval	now, d;

	gettimeofday(&now, NULL);
	timersub(&now, &s->se_start, &d);
	proxy_login_done(d.tv_sec + d.tv_usec / 1e6);
	s->se_ubev = upstream_bev(s->se_up);
	bufferevent_setcb(s->se_ubev, session_upstream_read_cb,
	    session_upstream_write_cb, session_upstream_event_cb, s);
	bufferevent_set_max_single_read(s->se_ubev, PARAM_READ_SIZE);
	bufferevent_setwatermark(s->se_ubev, EV_READ, 0, s->se_cfg->max_buffer / 2);
	bufferevent_setwatermark(s->se_ubev, EV_WRITE, s->se_cfg->max_buffer / 2, 0);
	/*
	 * One read timeout for the whole session, set once (re-arming it per
	 * command costs a system call each time): it only counts while a
	 * reply is owed, see session_upstream_event_cb.
	 */
	bufferevent_set_timeouts(s->se_ubev, &(struct timeval){
	    s->se_cfg->idle_timeout, 0 }, NULL);
	/*
	 * The login left writing enabled; enabling it again would poll for
	 * writability once more (an epoll_ctl and a wake-up for nothing).
	 */
	if (!(bufferevent_get_enabled(s->se_ubev) & EV_WRITE))
		bufferevent_enable(s->se_ubev, EV_WRITE);
	s->se_ussl = bufferevent_openssl_get_ssl(s->se_ubev);
	if (bufferevent_getfd(s->se_ubev) != -1 &&
	    evbuffer_get_length(bufferevent_get_input(s->se_ubev)) == 0 &&
	    (s->se_ussl == NULL || SSL_pending(s->se_ussl) == 0) &&
	    (s->se_uread = event_new(proxy->base, bufferevent_getfd(s->se_ubev),
	    EV_READ | EV_PERSIST, session_upstream_fd_cb, s)) != NULL) {
		/*
		 * Our reader first, then the bufferevent's off: the socket stays
		 * polled for reading throughout, so epoll is not told twice.
		 */
		session_upstream_reading(s, 1);
		bufferevent_disable(s->se_ubev, EV_READ);
	} else {
		s->se_ussl = NULL;
		session_upstream_reading(s, 1);
	}
	/*
	 * From now on the session writes to the client itself; its write
	 * event is made the first time the client's socket is full.
	 */
	bufferevent_disable(s->se_client, EV_WRITE);
	if ((s->se_capa = session_capa(s)) == NULL) {
		session_close(s, 1, "out of memory");
		return;
	}
	upstream_login_done(s->se_up);
	session_enter_state(s, SESSION_RELAY);
	/* the greeting, or for an exchanged token the answer to its AUTH */
	evbuffer_add_printf(bufferevent_get_output(s->se_client), "%s",
	    s->se_exchanged ? "+OK Logged in.\r\n" :
	    "+OK tpmail POP3 proxy ready\r\n");
	bufferevent_setwatermark(s->se_client, EV_READ, 0, 0);
	bufferevent_set_timeouts(s->se_client, &(struct timeval){
	    s->se_cfg->idle_timeout, 0 }, &(struct timeval){
	    s->se_cfg->idle_timeout, 0 });
	bufferevent_enable(s->se_client, EV_READ);
	session_client_read(s);
	session_client_send(s);
}

void
session_upstream_failed(struct session *s, const char *code, const char *reason)
{
	if (s->se_state != SESSION_LOGIN)
		return;
	evbuffer_add_printf(bufferevent_get_output(s->se_client),
	    "-ERR [%s] %s\r\n", code, reason);
	s->se_login_failed = 1;
	/* the upstream object is still on the stack: free it later */
	session_close_flush(s, 1, reason);
}

/* Stop everything but the last bytes to the client, then close. */
static void
session_close_flush(struct session *s, int failed, const char *reason)
{
	if (s->se_state == SESSION_CLOSING || s->se_state == SESSION_DEAD)
		return;
	session_enter_state(s, SESSION_CLOSING);
	s->se_failed = failed;
	free(s->se_reason);
	s->se_reason = strdup(reason);
	if (s->se_ubev != NULL)
		bufferevent_disable(s->se_ubev, EV_READ | EV_WRITE);
	if (s->se_uread != NULL)
		event_del(s->se_uread);
	if (s->se_cwrite != NULL)
		event_del(s->se_cwrite);	/* the bufferevent writes the rest */
	bufferevent_disable(s->se_client, EV_READ);
	if (s->se_client_gone) {
		session_close(s, failed, reason);
		return;
	}
	bufferevent_setwatermark(s->se_client, EV_WRITE, 0, 0);
	bufferevent_set_timeouts(s->se_client, NULL, &(struct timeval){
	    s->se_cfg->connect_timeout, 0 });
	/*
	 * The last bytes (QUIT's answer, an -ERR) nearly always fit in the
	 * socket: written now, the session ends without polling for them.
	 * A client that cannot take them is gone; what it was owed is lost
	 * either way.
	 */
	if (evbuffer_get_length(bufferevent_get_output(s->se_client)) > 0 &&
	    session_client_write(s, bufferevent_getfd(s->se_client)) == -1) {
		session_client_discard(s);
		s->se_client_gone = 1;
	}
	if (evbuffer_get_length(bufferevent_get_output(s->se_client)) == 0)
		session_close(s, failed, reason);
	else
		bufferevent_enable(s->se_client, EV_WRITE);
}

static void
session_free_cb(evutil_socket_t fd, short ev, void *arg)
{
	struct session	*s = arg;
	struct pending	*p;

	while ((p = TAILQ_FIRST(&s->se_queue)) != NULL)
		session_pending_free(s, p);
	/* no QUIT is ever sent here: an unfinished session commits nothing */
	if (s->se_uread != NULL)
		event_free(s->se_uread);	/* before its socket closes */
	if (s->se_cwrite != NULL)
		event_free(s->se_cwrite);
	upstream_free(s->se_up);
	bufferevent_free(s->se_client);
	config_unref(s->se_cfg);
	free(s->se_capa_own);
	free(s->se_reason);
	secret_free(s->se_token);
	free(s);
}

/* Which outcome a session's end counts as, for the metrics. */
static enum session_outcome
session_outcome(struct session *s, const char *reason)
{
	if (s->se_login_failed)
		return OUTCOME_LOGIN_FAILED;
	if (strcmp(reason, "quit") == 0)
		return OUTCOME_OK;
	if (strcmp(reason, "idle timeout") == 0)
		return OUTCOME_IDLE_TIMEOUT;
	if (strcmp(reason, "client closed") == 0)
		return OUTCOME_CLIENT_CLOSED;
	return OUTCOME_ERROR;
}

/* The session's end: one log line, then everything is freed. */
static void
session_close(struct session *s, int failed, const char *reason)
{
	struct timeval	now, d;

	if (s->se_state == SESSION_DEAD)
		return;
	gettimeofday(&now, NULL);
	timersub(&now, &s->se_start, &d);
	(failed ? log_warnx : log_info)("session=%lu result=%s reason=\"%s\" "
	    "duration_ms=%ld commands=%lu bytes_to_client=%lu "
	    "bytes_to_server=%lu", s->se_id, failed ? "fail" : "ok", reason,
	    (long)(d.tv_sec * 1000 + d.tv_usec / 1000), s->se_commands,
	    s->se_bytes_up, s->se_bytes_down);
	session_enter_state(s, SESSION_DEAD);
	TAILQ_REMOVE(&sessions, s, se_entry);
	bufferevent_disable(s->se_client, EV_READ | EV_WRITE);
	if (s->se_ubev != NULL)
		bufferevent_disable(s->se_ubev, EV_READ | EV_WRITE);
	if (s->se_uread != NULL)
		event_del(s->se_uread);
	if (s->se_cwrite != NULL)
		event_del(s->se_cwrite);
	proxy_session_closed(session_outcome(s, reason), failed,
	    failed ? reason : NULL, d.tv_sec + d.tv_usec / 1e6, s->se_bytes_up,
	    s->se_bytes_down);
	/* callers may still be inside this session's callbacks */
	event_base_once(proxy->base, -1, EV_TIMEOUT, session_free_cb, s,
	    &(struct timeval){ 0, 0 });
}

/* A new client connection: log in upstream before greeting it. */
void
session_new(int fd, struct proxy_config *cfg)
{
	struct session	*s;

	if ((s = calloc(1, sizeof(*s))) == NULL) {
		evutil_closesocket(fd);
		return;
	}
	s->se_id = ++proxy->next_id;
	s->se_state = SESSION_LOGIN;
	s->se_cfg = cfg;
	config_ref(cfg);
	TAILQ_INIT(&s->se_queue);
	TAILQ_INSERT_TAIL(&sessions, s, se_entry);
	gettimeofday(&s->se_start, NULL);
	s->se_client = bufferevent_socket_new(proxy->base, fd,
	    BEV_OPT_CLOSE_ON_FREE);
	if (s->se_client == NULL) {
		evutil_closesocket(fd);
		config_unref(cfg);
		free(s);
		return;
	}
	proxy_session_opened();
	bufferevent_setcb(s->se_client, session_client_read_cb,
	    session_client_write_cb, session_client_event_cb, s);
	bufferevent_set_max_single_read(s->se_client, PARAM_READ_SIZE);
	bufferevent_setwatermark(s->se_client, EV_WRITE, cfg->max_buffer / 4, 0);
	/* hold at most one line of early client input until the greeting */
	bufferevent_setwatermark(s->se_client, EV_READ, 0, cfg->max_line);
	/*
	 * Reading during the login notices a client that leaves early.  Not
	 * writing: a socket bufferevent polls for writability as soon as its
	 * write is enabled, even with nothing to write (two epoll_ctl and a
	 * wake-up per session); what a login that fails says is flushed by
	 * session_close_flush, which enables it.
	 */
	bufferevent_enable(s->se_client, EV_READ);
	log_debug("session=%lu accepted", s->se_id);
	if (cfg->auth == UPSTREAM_AUTH_EXCHANGE) {
		/* the client brings the credential: greet, then wait for it */
		bufferevent_enable(s->se_client, EV_WRITE);
		s->se_state = SESSION_AUTHWAIT;
		evbuffer_add_printf(bufferevent_get_output(s->se_client),
		    "+OK tpmail POP3 proxy ready (AUTH XOAUTH2)\r\n");
		bufferevent_set_timeouts(s->se_client, &(struct timeval){
		    cfg->idle_timeout, 0 }, &(struct timeval){ cfg->idle_timeout,
		    0 });
		return;
	}
	if ((s->se_up = upstream_start(s, cfg, NULL)) == NULL) {
		evbuffer_add_printf(bufferevent_get_output(s->se_client),
		    "-ERR [SYS/TEMP] Cannot connect to the mail server\r\n");
		session_close_flush(s, 1, "cannot start the upstream connection");
	}
}
