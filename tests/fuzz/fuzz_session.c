/*
 * fuzz_session: the tenant proxy's client-side session state machine, the
 * real proxy/session.c, driven by a fuzzer-chosen client and a scripted
 * mail server.
 *
 * The client is a socketpair whose one end goes to session_new(); the
 * harness writes the input's client bytes to the other end in chunks and
 * reads the replies in chunks (a small read chunk is a slow client).  The
 * upstream login is stubbed (upstream_start() and friends below): after a
 * few loop turns the harness calls session_upstream_ready(), or
 * session_upstream_failed().  The upstream connection is a bufferevent_pair
 * (the session's bufferevent path) or, chosen by the first byte, a
 * socketpair under bufferevent_socket_new() (the session's own reader and
 * writer, session_upstream_fd_cb and session_client_send).  Its far end
 * answers like a POP3 server: +OK, multi-line bodies with dot-stuffing,
 * -ERR, large bodies, or a close instead of or in the middle of a reply,
 * as the script bytes say.
 *
 * The loop runs with EVLOOP_NONBLOCK for a bounded number of turns, until
 * nothing moves; then the client's end is closed and the loop runs until
 * the session is freed.  No real time matters: every timeout is 600 s.
 *
 * Input: byte 0 flags (FL_*), byte 1 the client's write chunk (0: all),
 * byte 2 its read chunk in 16-byte units (0: 64 KiB), byte 3 the login's delay in turns (low
 * 3 bits), the exchange's verdict (bits 3-4) and the server's write chunk
 * (bits 5-7), byte 4 the script's length N, then N script bytes (one per
 * command the server receives), then the client's bytes.
 *
 * Checks:
 *  - what the server receives is exactly the lines the client sent that the
 *    proxy relays (not the ones it answers itself), in order, each with
 *    CRLF; QUIT among them only if the client sent it, and nothing after;
 *  - what the client receives is the greeting, then one reply per complete
 *    line it sent, in order: the server's reply byte for byte for a relayed
 *    line, the proxy's own reply for a local one; it ends only after QUIT's
 *    reply, where the server closed (after the replies it sent, then an
 *    -ERR line if a reply was owed), or after a line too long;
 *  - when nothing moves any more, every complete line has its reply (or
 *    one of the ends above explains why not), also after a half-close;
 *  - the session is freed once the client is gone, its upstream with it,
 *    every session counted closed once; LeakSanitizer checks the rest.
 * In exchange mode (the client brings an XOAUTH2 token) only the server
 * side is checked: what it receives are lines the client sent, QUIT only
 * if the client sent one.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>

#include "fuzz.h"
#include "log.h"
#include "pop3_parse.h"
#include "proxy.h"

#define FL_SOCKET	0x01	/* upstream on a socketpair: the fast path */
#define FL_PIPELINING	0x02	/* upstream offers PIPELINING */
#define FL_SHORT_LINE	0x04	/* max_line 64 rather than 8192 */
#define FL_SMALL_BUF	0x08	/* max_buffer 512 rather than 256 KiB */
#define FL_LOGIN_FAIL	0x10	/* the upstream login fails */
#define FL_EXCHANGE	0x20	/* the client brings a token (AUTH XOAUTH2) */
#define FL_HALF_CLOSE	0x40	/* the client shuts down writing when done */
#define FL_CAPA_RICH	0x80	/* a longer upstream CAPA */

#define MAX_TURNS	20000	/* loop turns per input, all phases */
#define IDLE_TURNS	8	/* turns without progress: nothing moves */
#define MAX_RECS	512	/* server records kept */

static const char	login_fail_reply[] =
    "-ERR [AUTH] the mail server rejected the credentials\r\n";

struct proxy		*proxy;
static struct proxy	 the_proxy;
static int		 verbose;	/* FUZZ_SESSION_VERBOSE: what happened */

/* One command line the server received and what it answered. */
struct rec {
	char	*line;		/* without its end of line */
	size_t	 len;
	char	*reply;		/* every byte sent for it */
	size_t	 rlen;
	int	 closed;	/* the server closed after the reply (or part) */
	int	 partial;	/* ... which was cut short on purpose */
};

struct upstream {
	struct session		*s;
	struct bufferevent	*bev;		/* the session's end */
	int			 fd;		/* its socket, or -1 (pair) */
	int			 due;		/* turn at which the login ends */
	int			 fired;
};

static struct {
	/* input */
	int			 flags;
	size_t			 wchunk, rchunk, schunk;
	int			 login_delay;
	int			 exch_verdict;
	const uint8_t		*script;
	size_t			 nscript;
	const uint8_t		*cli;
	size_t			 ncli;
	/* state */
	int			 turn;
	struct proxy_config	*cfg;
	struct upstream		*up;		/* the live one, if any */
	int			 ups_started, ups_freed;
	struct bufferevent	*srv;		/* the server's end */
	int			 srv_fd;
	struct evbuffer		*srv_out;	/* replies not yet written */
	int			 srv_closing, srv_closed;
	struct rec		 recs[MAX_RECS];
	int			 nrecs;
	size_t			 nscript_used;
	int			 cli_fd;
	size_t			 cli_sent;
	int			 cli_shut;
	char			*got;
	size_t			 ngot, capgot;
	int			 opened, closed;
	unsigned long		 exch_id;
	int			 exch_due;
	unsigned long		 progress;
} H;

/* ---------------------------------------------------------------- stubs */

void
config_ref(struct proxy_config *c)
{
	c->refs++;
}

void
config_unref(struct proxy_config *c)
{
	FUZZ_CHECK(c->refs > 0, "config unreferenced too often");
	c->refs--;
}

void
proxy_session_opened(void)
{
	H.opened++;
}

void
proxy_session_closed(enum session_outcome o, int failed, const char *error,
    double duration, unsigned long to_client, unsigned long to_server)
{
	FUZZ_CHECK(o >= 0 && o < OUTCOME_MAX, "outcome %d", (int)o);
	FUZZ_CHECK(!failed || error != NULL, "a failure without a reason");
	H.closed++;
}

void
proxy_session_refused(void)
{
}

void
proxy_login_done(double seconds)
{
}

void
proxy_upstream_failed(enum upstream_failure why)
{
}

void
proxy_exchange(unsigned long session, const char *kind, const char *user,
    const char *value)
{
	FUZZ_CHECK(H.exch_id == 0, "a second exchange while one is open");
	H.exch_id = session;
	H.exch_due = H.turn + 1 + (H.exch_verdict & 1);
}

static void
srv_setup(struct upstream *u)
{
	struct bufferevent	*pair[2];
	int			 sv[2];

	if (H.flags & FL_SOCKET) {
		if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == -1)
			abort();
		evutil_make_socket_nonblocking(sv[0]);
		evutil_make_socket_nonblocking(sv[1]);
		/* as upstream.c: the session's end does not own its socket */
		u->bev = bufferevent_socket_new(proxy->base, sv[0], 0);
		u->fd = sv[0];
		H.srv = bufferevent_socket_new(proxy->base, sv[1],
		    BEV_OPT_CLOSE_ON_FREE);
		H.srv_fd = sv[1];
	} else {
		/* deferred, as a socket's callbacks never run inside a write */
		if (bufferevent_pair_new(proxy->base, BEV_OPT_DEFER_CALLBACKS,
		    pair) == -1)
			abort();
		u->bev = pair[0];
		u->fd = -1;
		H.srv = pair[1];
		H.srv_fd = -1;
	}
	if (u->bev == NULL || H.srv == NULL)
		abort();
	bufferevent_enable(H.srv, EV_READ | EV_WRITE);
}

struct upstream *
upstream_start(struct session *s, struct proxy_config *cfg, const char *token)
{
	struct upstream	*u;

	FUZZ_CHECK(H.up == NULL && H.ups_started == 0, "a second upstream");
	if ((u = calloc(1, sizeof(*u))) == NULL)
		abort();
	u->s = s;
	u->due = H.turn + H.login_delay;
	srv_setup(u);
	H.up = u;
	H.ups_started++;
	return u;
}

struct bufferevent *
upstream_bev(struct upstream *u)
{
	return u->bev;
}

const char *
upstream_capa(struct upstream *u)
{
	if (H.flags & FL_CAPA_RICH)
		return "TOP\nUIDL\nRESP-CODES\nSTLS\nUSER\nSASL PLAIN LOGIN\n"
		    "PIPELINING\nIMPLEMENTATION dovecot\nLOGIN-DELAY 900\n";
	return "TOP\nUIDL\n";
}

int
upstream_pipelining(struct upstream *u)
{
	return (H.flags & FL_PIPELINING) != 0;
}

void
upstream_login_done(struct upstream *u)
{
}

void
upstream_free(struct upstream *u)
{
	if (u == NULL)
		return;
	FUZZ_CHECK(u == H.up, "freeing an unknown upstream");
	bufferevent_free(u->bev);
	if (u->fd != -1)
		close(u->fd);
	free(u);
	H.up = NULL;
	H.ups_freed++;
}

/* ---------------------------------------------------------- the server */

static int
cmd_is(const char *line, size_t len, const char *kw)
{
	size_t	kl = strlen(kw);

	return len >= kl && strncasecmp(line, kw, kl) == 0 &&
	    (len == kl || line[kl] == ' ' || line[kl] == '\r');
}

/* Multi-line when +OK, as RFC 1939 says (LIST and UIDL without argument). */
static int
srv_multiline(const char *line, size_t len)
{
	const char	*p;

	if (cmd_is(line, len, "RETR") || cmd_is(line, len, "TOP"))
		return 1;
	if (!cmd_is(line, len, "LIST") && !cmd_is(line, len, "UIDL"))
		return 0;
	for (p = line + 4; p < line + len; p++)
		if (*p != ' ' && *p != '\r')
			return 0;
	return 1;
}

/* A body of lines, dot-stuffed; some start with a dot. */
static void
srv_body(struct evbuffer *b, unsigned c, int n, size_t big)
{
	int	i;

	for (i = 0; i < n; i++) {
		switch ((c + i) % 5) {
		case 0:
			evbuffer_add_printf(b, "line %d of %u\r\n", i, c);
			break;
		case 1:
			evbuffer_add_printf(b, "..dotted %d\r\n", i);	/* ".dotted" */
			break;
		case 2:
			evbuffer_add_printf(b, "\r\n");
			break;
		case 3:
			evbuffer_add_printf(b, "..\r\n");	/* a lone "." */
			break;
		default:
			evbuffer_add_printf(b, "... .\r\n");
			break;
		}
	}
	for (; big > 0; big -= big > 100 ? 100 : big)
		evbuffer_add_printf(b, "%.*s\r\n", (int)(big > 100 ? 100 : big),
		    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
		    "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
}

/* Answer one command line as the script says. */
static void
srv_answer(char *line, size_t len)
{
	struct rec	*r;
	struct evbuffer	*b = evbuffer_new();
	unsigned	 c = 0;
	int		 ml, quit;

	if (H.nrecs >= MAX_RECS) {
		free(line);
		evbuffer_free(b);
		H.srv_closing = 1;
		return;
	}
	r = &H.recs[H.nrecs++];
	r->line = line;
	r->len = len;
	if (H.nscript_used < H.nscript)
		c = H.script[H.nscript_used++];
	ml = srv_multiline(line, len);
	quit = cmd_is(line, len, "QUIT");
	switch (c & 7) {
	case 3:
		evbuffer_add_printf(b, "-ERR [IN-USE] no such message %u\r\n", c);
		break;
	case 5:		/* close instead of answering */
		r->closed = 1;
		break;
	case 6:		/* close in the middle of the reply */
		if (!ml) {
			r->closed = 1;
			break;
		}
		evbuffer_add_printf(b, "+OK %u octets\r\n", c);
		srv_body(b, c, 1 + (c >> 3) % 4, 0);
		r->closed = r->partial = 1;
		break;
	case 7:		/* a large body */
		evbuffer_add_printf(b, "+OK %u octets\r\n", (c >> 3) * 1000);
		if (ml) {
			srv_body(b, c, 2, (c >> 3) * 1000);
			evbuffer_add(b, ".\r\n", 3);
		}
		break;
	default:
		if (quit) {
			evbuffer_add_printf(b, "+OK bye\r\n");
			break;
		}
		evbuffer_add_printf(b, "+OK %u\r\n", c);
		if (ml) {
			srv_body(b, c, (c >> 3) % 8, 0);
			evbuffer_add(b, ".\r\n", 3);
		}
		break;
	}
	if (quit)
		r->closed = 1;
	r->rlen = evbuffer_get_length(b);
	if ((r->reply = malloc(r->rlen + 1)) == NULL)
		abort();
	evbuffer_copyout(b, r->reply, r->rlen);
	evbuffer_add_buffer(H.srv_out, b);
	evbuffer_free(b);
	if (r->closed)
		H.srv_closing = 1;
}

/* One turn of the server: read commands, write some of the replies. */
static void
srv_turn(void)
{
	struct evbuffer	*in, *out;
	char		*line;
	size_t		 len, n;

	if (H.srv == NULL)
		return;
	in = bufferevent_get_input(H.srv);
	out = bufferevent_get_output(H.srv);
	if (H.srv_closing) {
		/* a closed server reads nothing more: discard */
		if (evbuffer_get_length(in) > 0) {
			H.progress++;
			evbuffer_drain(in, evbuffer_get_length(in));
		}
	} else {
		while ((line = evbuffer_readln(in, &len, EVBUFFER_EOL_CRLF)) !=
		    NULL) {
			H.progress++;
			srv_answer(line, len);
			if (H.srv_closing)
				break;
		}
	}
	n = evbuffer_get_length(H.srv_out);
	if (n > 0) {
		if (H.schunk != 0 && n > H.schunk)
			n = H.schunk;
		evbuffer_remove_buffer(H.srv_out, out, n);
		H.progress++;
	}
	/*
	 * The close follows the last byte, as TCP's FIN does.  A pair hands
	 * its EOF over at once, even while the session does not read: wait
	 * until the session's end has taken the data in, too.
	 */
	if (H.srv_closing && !H.srv_closed &&
	    evbuffer_get_length(H.srv_out) == 0 &&
	    evbuffer_get_length(out) == 0 &&
	    (H.srv_fd != -1 || H.up == NULL ||
	    evbuffer_get_length(bufferevent_get_input(H.up->bev)) == 0)) {
		H.srv_closed = 1;
		H.progress++;
		if (H.srv_fd != -1)
			shutdown(H.srv_fd, SHUT_WR);
		else
			bufferevent_flush(H.srv, EV_WRITE, BEV_FINISHED);
	}
}

/* ---------------------------------------------------------- the client */

static void
cli_turn(void)
{
	char	 buf[65536];
	size_t	 n;
	ssize_t	 r;

	if (H.cli_fd == -1)
		return;
	if (H.cli_sent < H.ncli) {
		n = H.ncli - H.cli_sent;
		if (H.wchunk != 0 && n > H.wchunk)
			n = H.wchunk;
		r = write(H.cli_fd, H.cli + H.cli_sent, n);
		if (r > 0) {
			H.cli_sent += r;
			H.progress++;
		}
	}
	if (H.cli_sent == H.ncli && (H.flags & FL_HALF_CLOSE) && !H.cli_shut) {
		shutdown(H.cli_fd, SHUT_WR);
		H.cli_shut = 1;
		H.progress++;
	}
	n = H.rchunk < sizeof(buf) ? H.rchunk : sizeof(buf);
	while ((r = read(H.cli_fd, buf, n)) > 0) {
		if (H.ngot + r > H.capgot) {
			H.capgot = 2 * (H.ngot + r);
			if ((H.got = realloc(H.got, H.capgot)) == NULL)
				abort();
		}
		memcpy(H.got + H.ngot, buf, r);
		H.ngot += r;
		H.progress++;
		if (H.rchunk < sizeof(buf))
			break;		/* a slow reader: one read a turn */
	}
}

/* Loop turns, the login and the exchange as they fall due. */
static void
run_turn(void)
{
	struct upstream	*u;
	unsigned long	 id;

	H.turn++;
	event_base_loop(proxy->base, EVLOOP_NONBLOCK);
	/* the loop may have freed the session, and its upstream with it */
	if ((u = H.up) != NULL && !u->fired && H.turn >= u->due) {
		u->fired = 1;
		H.progress++;
		if (H.flags & FL_LOGIN_FAIL)
			session_upstream_failed(u->s, "AUTH",
			    "the mail server rejected the credentials");
		else
			session_upstream_ready(u->s);
	}
	if (H.exch_id != 0 && H.turn >= H.exch_due) {
		id = H.exch_id;
		H.exch_id = 0;
		H.progress++;
		if (H.exch_verdict & 2)
			session_exchanged(id, NULL, "The token was refused",
			    H.exch_verdict & 1);
		else
			session_exchanged(id, "access-token", NULL, 0);
	}
	cli_turn();
	srv_turn();
}

/* Turns until nothing moves: 1, or 0 if the budget ran out first. */
static int
run_idle(void)
{
	int	idle = 0;

	while (H.turn < MAX_TURNS && idle < IDLE_TURNS) {
		H.progress = 0;
		run_turn();
		idle = H.progress == 0 ? idle + 1 : 0;
	}
	return idle == IDLE_TURNS;
}

/* ---------------------------------------------------------- the model */

struct line {
	const char	*p;
	size_t		 len, eol;
};

/* The complete lines the client sent, split as evbuffer's EOL_CRLF. */
static size_t
client_lines(struct line *l, size_t max, size_t *tail)
{
	size_t	i, start = 0, n = 0;

	for (i = 0; i < H.cli_sent && n < max; i++) {
		if (H.cli[i] != '\n')
			continue;
		l[n].p = (const char *)H.cli + start;
		l[n].len = i - start;
		l[n].eol = 1;
		if (l[n].len > 0 && l[n].p[l[n].len - 1] == '\r') {
			l[n].len--;
			l[n].eol = 2;
		}
		n++;
		start = i + 1;
	}
	*tail = H.cli_sent - start;
	return n;
}

/* The proxy's SASL bookkeeping (session_auth): continuation lines to come. */
static int
sasl_steps(const struct pop3_cmd *cmd, const char **reply, int *multi)
{
	char	mech[32];
	size_t	ml;
	int	ir = cmd->nargs == 2;

	*multi = 0;
	if (cmd->nargs == 0) {
		*reply = "+OK\r\nPLAIN\r\nLOGIN\r\nXOAUTH2\r\n.\r\n";
		*multi = 1;
		return 0;
	}
	for (ml = 0; ml < cmd->argslen && cmd->args[ml] != ' ' &&
	    ml < sizeof(mech) - 1; ml++)
		mech[ml] = cmd->args[ml];
	mech[ml] = '\0';
	if (strcasecmp(mech, "PLAIN") == 0 || strcasecmp(mech, "XOAUTH2") == 0) {
		*reply = ir ? "+OK Logged in.\r\n" : "+ \r\n";
		return ir ? 0 : 1;
	}
	if (strcasecmp(mech, "LOGIN") == 0) {
		*reply = ir ? "+ UGFzc3dvcmQ6\r\n" : "+ VXNlcm5hbWU6\r\n";
		return ir ? 1 : 2;
	}
	*reply = "-ERR Unsupported authentication mechanism\r\n";
	return 0;
}

/* What the client may see next: exact bytes, or "-ERR <anything>\r\n". */
static int
expect_exact(size_t *pos, const char *want, size_t wlen, int *cut)
{
	size_t	have = H.ngot - *pos;

	if (have < wlen) {
		FUZZ_CHECK(have == 0 || memcmp(H.got + *pos, want, have) == 0,
		    "the client got %.*s where %.*s was due", (int)have,
		    H.got + *pos, (int)wlen, want);
		*cut = 1;
		*pos = H.ngot;
		return 0;
	}
	FUZZ_CHECK(memcmp(H.got + *pos, want, wlen) == 0,
	    "the client got %.*s where %.*s was due", (int)wlen, H.got + *pos,
	    (int)wlen, want);
	*pos += wlen;
	return 1;
}

static void
expect_err_line(size_t *pos)
{
	const char	*nl;

	FUZZ_CHECK(H.ngot - *pos >= 5 && memcmp(H.got + *pos, "-ERR ", 5) == 0,
	    "the client got %.*s where -ERR was due",
	    (int)(H.ngot - *pos > 40 ? 40 : H.ngot - *pos), H.got + *pos);
	nl = memchr(H.got + *pos, '\n', H.ngot - *pos);
	FUZZ_CHECK(nl != NULL && nl > H.got + *pos && nl[-1] == '\r',
	    "an unterminated -ERR line");
	*pos = nl - H.got + 1;
}

/*
 * The lines the proxy must relay, in order: every complete line that is
 * not too long, not a SASL continuation and parses as a relayed command,
 * up to QUIT.  rel[k] is the index of the k-th one.
 */
static size_t
model_relayed(const struct line *lines, size_t n, size_t *rel)
{
	struct pop3_cmd	 cmd;
	const char	*err, *reply;
	size_t		 i, k = 0;
	int		 steps = 0, multi;

	for (i = 0; i < n; i++) {
		if (lines[i].len + lines[i].eol > (size_t)H.cfg->max_line)
			continue;
		if (steps > 0) {
			steps--;
			if (lines[i].len == 1 && lines[i].p[0] == '*')
				steps = 0;
			continue;
		}
		if (pop3_parse_command(lines[i].p, lines[i].len, &cmd, &err) == -1)
			continue;
		if (cmd.id == POP3_AUTH)
			steps = sasl_steps(&cmd, &reply, &multi);
		if (cmd.disp != POP3_RELAY)
			continue;
		rel[k++] = i;
		if (cmd.id == POP3_QUIT)
			break;
	}
	return k;
}

static struct line	lines[65536];
static size_t		rel[65536];

/*
 * Walk the client's lines and the replies it got side by side.  final: the
 * loop went idle with every client byte sent (every reply is due).
 */
static void
check_relay(int final)
{
	struct pop3_cmd	 cmd;
	const char	*err, *reply;
	char		*capa;
	size_t		 n, nrel, i, pos = 0, tail;
	int		 steps = 0, r = 0, cut = 0, may_end = 0;
	int		 multi, quit = 0, local, k;

	n = client_lines(lines, sizeof(lines) / sizeof(lines[0]), &tail);
	nrel = model_relayed(lines, n, rel);
	/* the server got exactly the relayed lines, a prefix of them */
	FUZZ_CHECK((size_t)H.nrecs <= nrel, "the server got %d lines, the "
	    "client sent %zu to relay", H.nrecs, nrel);
	for (k = 0; k < H.nrecs; k++)
		FUZZ_CHECK(H.recs[k].len == lines[rel[k]].len &&
		    memcmp(H.recs[k].line, lines[rel[k]].p, H.recs[k].len) == 0,
		    "the server got %.*s for the client's %.*s",
		    (int)H.recs[k].len, H.recs[k].line, (int)lines[rel[k]].len,
		    lines[rel[k]].p);
	if (H.got == NULL && (H.got = malloc(1)) == NULL)
		abort();
	if (H.flags & FL_LOGIN_FAIL) {
		if (H.ngot > 0)
			FUZZ_CHECK(H.ngot == sizeof(login_fail_reply) - 1 &&
			    memcmp(H.got, login_fail_reply, H.ngot) == 0,
			    "after a failed login the client got %.*s",
			    (int)H.ngot, H.got);
		FUZZ_CHECK(H.nrecs == 0, "a command relayed without a login");
		return;
	}
	if (H.ngot == 0 && !final)
		return;
	if (!expect_exact(&pos, "+OK tpmail POP3 proxy ready\r\n", 29, &cut))
		return;
	if ((capa = pop3_capa_build(upstream_capa(NULL))) == NULL)
		abort();
	for (i = 0; i < n && !quit; i++) {
		if (pos == H.ngot)
			break;
		if (lines[i].len + lines[i].eol > (size_t)H.cfg->max_line) {
			/* too long: answered, then maybe the end (see proxy) */
			expect_exact(&pos, "-ERR Line too long\r\n", 20, &cut);
			may_end = 1;
			continue;
		}
		local = 1;
		reply = NULL;
		if (steps > 0) {
			steps--;
			if (lines[i].len == 1 && lines[i].p[0] == '*') {
				steps = 0;
				reply = "-ERR Authentication cancelled\r\n";
			} else
				reply = steps == 0 ? "+OK Logged in.\r\n" :
				    "+ UGFzc3dvcmQ6\r\n";
		} else if (pop3_parse_command(lines[i].p, lines[i].len, &cmd,
		    &err) == -1)
			reply = NULL;		/* -ERR <reason> */
		else if (cmd.id == POP3_USER)
			reply = "+OK\r\n";
		else if (cmd.id == POP3_PASS || cmd.id == POP3_APOP)
			reply = "+OK Logged in.\r\n";
		else if (cmd.id == POP3_AUTH)
			steps = sasl_steps(&cmd, &reply, &multi);
		else if (cmd.id == POP3_CAPA)
			reply = capa;
		else if (cmd.id == POP3_STLS)
			reply = "-ERR STLS is not offered by this proxy\r\n";
		else
			local = 0;
		if (local) {
			if (reply == NULL)
				expect_err_line(&pos);
			else if (!expect_exact(&pos, reply, strlen(reply), &cut))
				break;
			continue;
		}
		/* relayed: the server's reply, byte for byte */
		quit = cmd.id == POP3_QUIT;
		FUZZ_CHECK(r < H.nrecs, "line %zu (%.*s) answered but never "
		    "relayed", i, (int)lines[i].len, lines[i].p);
		if (!expect_exact(&pos, H.recs[r].reply, H.recs[r].rlen, &cut)) {
			/* still coming when the turns ran out, or cut by the server */
			FUZZ_CHECK(H.recs[r].partial || !final,
			    "the reply to %.*s was cut",
			    (int)lines[i].len, lines[i].p);
			break;
		}
		if (H.recs[r].closed && !quit) {
			/* a reply was owed when the server closed: say so */
			if (H.recs[r].rlen == 0 && (pos < H.ngot || final))
				expect_exact(&pos, "-ERR [SYS/TEMP] Connection to "
				    "the mail server lost\r\n", 52, &cut);
			FUZZ_CHECK(pos == H.ngot, "more after the server closed: "
			    "%.*s", (int)(H.ngot - pos), H.got + pos);
			r++;
			break;
		}
		r++;
	}
	/* an unterminated line too long: answered, then the end */
	if (i == n && !quit && pos < H.ngot && tail >= (size_t)H.cfg->max_line) {
		expect_exact(&pos, "-ERR Line too long\r\n", 20, &cut);
		may_end = 1;
	}
	FUZZ_CHECK(pos == H.ngot, "the client got more than its replies: %.*s",
	    (int)(H.ngot - pos > 80 ? 80 : H.ngot - pos), H.got + pos);
	if (final && !quit && !H.srv_closed && !may_end && !cut)
		FUZZ_CHECK(i == n, "line %zu of %zu (%.*s) has no reply", i, n,
		    (int)(lines[i].len > 60 ? 60 : lines[i].len), lines[i].p);
	free(capa);
}

/* Exchange mode: only the server side. */
static void
check_exchange(void)
{
	size_t	n, i, tail;
	int	r, found;

	n = client_lines(lines, sizeof(lines) / sizeof(lines[0]), &tail);
	for (r = 0; r < H.nrecs; r++) {
		for (i = 0, found = 0; i < n && !found; i++)
			found = lines[i].len == H.recs[r].len &&
			    memcmp(lines[i].p, H.recs[r].line, lines[i].len) == 0;
		FUZZ_CHECK(found, "the server got %.*s, which the client never "
		    "sent", (int)H.recs[r].len, H.recs[r].line);
	}
}

/* Any QUIT upstream: the client sent that very line, and it was the last. */
static void
check_quit(void)
{
	int	r;

	for (r = 0; r < H.nrecs; r++)
		if (cmd_is(H.recs[r].line, H.recs[r].len, "QUIT"))
			FUZZ_CHECK(r == H.nrecs - 1, "commands after QUIT");
}

/* ------------------------------------------------------------ the input */

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	signal(SIGPIPE, SIG_IGN);
	verbose = getenv("FUZZ_SESSION_VERBOSE") != NULL;
	log_init("fuzz_session", LOG_LEVEL_ERROR);
	proxy = &the_proxy;
	if ((proxy->base = event_base_new()) == NULL)
		abort();
	return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct proxy_config	 cfg;
	size_t			 ns;
	int			 sv[2], r, idle;

	if (size < 5)
		return 0;
	memset(&H, 0, sizeof(H));
	H.flags = data[0];
	H.wchunk = data[1];
	H.rchunk = data[2] == 0 ? 65536 : (size_t)data[2] * 16;
	H.login_delay = data[3] & 7;
	H.exch_verdict = (data[3] >> 3) & 3;
	H.schunk = (data[3] >> 5) == 0 ? 0 : (size_t)1 << (data[3] >> 5);
	ns = data[4];
	if (ns > size - 5)
		ns = size - 5;
	H.script = data + 5;
	H.nscript = ns;
	H.cli = data + 5 + ns;
	H.ncli = size - 5 - ns;
	H.srv_fd = -1;

	memset(&cfg, 0, sizeof(cfg));
	cfg.refs = 1;
	cfg.service = "default/fuzz";
	cfg.host = "mail.example.com";
	cfg.port = 110;
	cfg.auth = (H.flags & FL_EXCHANGE) ? UPSTREAM_AUTH_EXCHANGE :
	    UPSTREAM_AUTH_USER;
	cfg.exchange = "refresh";
	cfg.connect_timeout = 600;
	cfg.auth_timeout = 600;
	cfg.idle_timeout = 600;
	cfg.max_sessions = 10;
	cfg.max_line = (H.flags & FL_SHORT_LINE) ? 64 : 8192;
	cfg.max_buffer = (H.flags & FL_SMALL_BUF) ? 512 : 256 * 1024;
	H.cfg = &cfg;
	if ((H.srv_out = evbuffer_new()) == NULL)
		abort();

	if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) == -1)
		abort();
	evutil_make_socket_nonblocking(sv[0]);
	evutil_make_socket_nonblocking(sv[1]);
	H.cli_fd = sv[1];
	session_new(sv[0], &cfg);
	FUZZ_CHECK(H.opened == 1, "session not opened");

	/* phase 1: the client talks until nothing moves */
	idle = run_idle();
	if (verbose)
		fprintf(stderr, "turns %d%s, client sent %zu of %zu, got %zu, "
		    "server got %d lines%s:\n%.*s\n", H.turn, idle ? "" :
		    " (budget spent)", H.cli_sent, H.ncli, H.ngot, H.nrecs,
		    H.srv_closed ? " and closed" : "", (int)H.ngot, H.got);
	if (H.flags & FL_EXCHANGE)
		check_exchange();
	else
		check_relay(idle && H.cli_sent == H.ncli);
	check_quit();

	/* phase 2: the client goes away; the session must end and be freed */
	close(H.cli_fd);
	H.cli_fd = -1;
	/*
	 * A client gone after QUIT still has its QUIT forwarded once the
	 * replies before it have ended, which a trickling server can make
	 * take as many turns as phase 1 had.
	 */
	for (r = 0; r < 25000 && (H.closed == 0 || H.up != NULL); r++)
		run_turn();
	/* the free is one more turn away */
	for (r = 0; r < 4; r++)
		event_base_loop(proxy->base, EVLOOP_NONBLOCK);
	FUZZ_CHECK(H.closed == 1, "session closed %d times", H.closed);
	FUZZ_CHECK(H.up == NULL && H.ups_freed == H.ups_started,
	    "upstream not freed (%d of %d)", H.ups_freed, H.ups_started);
	FUZZ_CHECK(cfg.refs == 1, "config references left: %d", cfg.refs);
	check_quit();

	if (H.srv != NULL)
		bufferevent_free(H.srv);
	evbuffer_free(H.srv_out);
	for (r = 0; r < H.nrecs; r++) {
		free(H.recs[r].line);
		free(H.recs[r].reply);
	}
	free(H.got);
	/* what the session left in the configuration (the shared CAPA) */
	free(cfg.capa_raw);
	free(cfg.capa_reply);
	/* bufferevents are finalized on the loop's next turn */
	for (r = 0; r < 4; r++)
		event_base_loop(proxy->base, EVLOOP_NONBLOCK);
	/* nothing may be left on the base: the next input starts clean */
	FUZZ_CHECK(event_base_get_num_events(proxy->base,
	    EVENT_BASE_COUNT_ADDED | EVENT_BASE_COUNT_ACTIVE) == 0,
	    "%d events left on the base", event_base_get_num_events(proxy->base,
	    EVENT_BASE_COUNT_ADDED | EVENT_BASE_COUNT_ACTIVE));
	return 0;
}
