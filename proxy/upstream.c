/*
 * upstream.c: the tenant proxy's login to the real mail server, one state
 * machine per session: connect (TCP, or TLS for POP3S), greeting, CAPA,
 * STLS and the TLS handshake when asked, then USER/PASS, APOP or SASL PLAIN
 * or LOGIN with the destination's credentials.  Entering a state sends its
 * command; upstream_response() interprets the reply by state.  When the
 * login succeeds the session takes over the connection for relaying.
 *
 * Round trips are the cost of a session's setup.  Once a server's CAPA
 * offered PIPELINING and the login used USER/PASS or AUTH PLAIN, the next
 * sessions of the same configuration send CAPA and the login in one write
 * (RFC 2449 section 6.6 lets a client pipeline then): greeting, then three
 * replies at once, instead of four exchanges.  Each session still reads
 * its CAPA, and one that no longer offers PIPELINING or that mechanism
 * ends the shortcut for the next.
 * Runs unprivileged in the sandboxed tenant proxy.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>

#include <event2/buffer.h>
#include <event2/bufferevent_ssl.h>
#include <openssl/evp.h>

#include "log.h"
#include "params.h"
#include "proxy.h"
#include "secret.h"
#include "socks5.h"

enum upstream_state {
	UP_CONNECT,
	UP_SOCKS_METHOD,	/* connectivity proxy: method selection */
	UP_SOCKS_AUTH,		/* SAP method 0x80: token and location */
	UP_SOCKS_CONNECT,	/* CONNECT to the virtual host */
	UP_TLS_CONNECT,		/* implicit TLS handshake */
	UP_GREETING,
	UP_CAPA,
	UP_STLS,
	UP_STLS_HANDSHAKE,
	UP_CAPA_TLS,		/* CAPA again, as RFC 2595 requires */
	UP_LOGIN,		/* choose a mechanism */
	UP_USER,
	UP_PASS,
	UP_APOP,
	UP_AUTH_PLAIN,
	UP_AUTH_LOGIN,
	UP_AUTH_LOGIN_USER,
	UP_AUTH_LOGIN_PASS,
	UP_AUTH_OAUTH2,		/* AUTH XOAUTH2 / OAUTHBEARER sent, await "+" */
	UP_AUTH_OAUTH2_TOKEN,	/* token sent */
	UP_AUTH_OAUTH2_ERROR,	/* server's error challenge answered */
	UP_READY,
	UP_FAILED,
};

struct upstream {
	struct session		*up_session;
	struct proxy_config	*up_cfg;
	struct bufferevent	*up_bev;
	int			 up_tls;	/* the TLS bufferevent owns the socket */
	enum upstream_state	 up_state;
	struct event		*up_timer;
	char			*up_apop_ts;	/* the greeting's, for APOP */
	char			*up_capa;	/* raw capability lines */
	size_t			 up_capa_len;
	int			 up_has_capa;
	int			 up_pipelining;
	int			 up_user;
	int			 up_stls;
	int			 up_sasl_plain;
	int			 up_sasl_login;
	int			 up_sasl_xoauth2;
	int			 up_sasl_oauthbearer;
	int			 up_bearer;	/* OAUTHBEARER rather than XOAUTH2 */
	const char		*up_token;	/* the access token for this login */
	int			 up_addr;	/* index of the address being tried */
	int			 up_protocol;	/* failed: the server broke POP3 */
	enum upstream_state	 up_pipelined;	/* login sent with CAPA, or 0 */
	int			 up_pipeline_stale; /* its CAPA chose otherwise */
};

static void	upstream_enter_state(struct upstream *, enum upstream_state);
static void	upstream_response(struct upstream *, const char *, size_t);
static void	upstream_read_cb(struct bufferevent *, void *);
static void	upstream_event_cb(struct bufferevent *, short, void *);
static int	upstream_connect(struct upstream *);

static const char *
upstream_strstate(enum upstream_state st)
{
	static const char *const names[] = {
		"connect", "socks-method", "socks-auth", "socks-connect",
		"tls-connect", "greeting", "capa", "stls",
		"stls-handshake", "capa-tls", "login", "user", "pass", "apop",
		"auth-plain", "auth-login", "auth-login-user", "auth-login-pass",
		"auth-oauth2", "auth-oauth2-token", "auth-oauth2-error",
		"ready", "failed",
	};

	return names[st];
}

/* The metrics' class of a login failure. */
static enum upstream_failure
upstream_failure_kind(struct upstream *u, const char *code, const char *reason)
{
	if (u->up_protocol)
		return UPFAIL_PROTOCOL;
	if (strstr(reason, "timed out") != NULL)
		return UPFAIL_TIMEOUT;
	if (u->up_state == UP_TLS_CONNECT || u->up_state == UP_STLS_HANDSHAKE ||
	    u->up_state == UP_STLS || strstr(reason, "STLS") != NULL)
		return UPFAIL_TLS;
	if (u->up_state == UP_CONNECT)
		return UPFAIL_CONNECT;
	if (u->up_state >= UP_USER && u->up_state <= UP_AUTH_OAUTH2_ERROR)
		return UPFAIL_AUTH;
	if (u->up_state >= UP_SOCKS_METHOD && u->up_state <= UP_SOCKS_CONNECT)
		return UPFAIL_CONNECT;
	return UPFAIL_PROTOCOL;
}

/* Fail the login: the session greets its client with -ERR [code]. */
static void
upstream_fail(struct upstream *u, const char *code, const char *reason)
{
	if (u->up_state == UP_FAILED)
		return;
	log_warnx("session=%lu upstream=%s:%d state=%s result=fail reason=\"%s\"",
	    session_id(u->up_session), u->up_cfg->host, u->up_cfg->port,
	    upstream_strstate(u->up_state), reason);
	proxy_upstream_failed(upstream_failure_kind(u, code, reason));
	u->up_state = UP_FAILED;
	if (u->up_timer != NULL)
		evtimer_del(u->up_timer);
	if (u->up_bev != NULL)
		bufferevent_disable(u->up_bev, EV_READ | EV_WRITE);
	session_upstream_failed(u->up_session, code, reason);
}

static void
upstream_timeout_cb(evutil_socket_t fd, short ev, void *arg)
{
	struct upstream	*u = arg;

	upstream_fail(u, "SYS/TEMP", "timed out logging in to the mail server");
}

static void
upstream_secret_done(const void *data, size_t len, void *line)
{
	secret_free(line);
}

/* Queue a line that holds a secret: its memory is wiped once written. */
static void
upstream_send_secret(struct upstream *u, char *line, size_t len)
{
	bev_send_secret(u->up_bev, line, len, upstream_secret_done);
}

static void
upstream_sendf(struct upstream *u, const char *fmt, const char *arg)
{
	char	line[PARAM_MAX_LINE];
	int	n = snprintf(line, sizeof(line), fmt, arg);

	if (n < 0 || (size_t)n >= sizeof(line))
		evbuffer_add_printf(bufferevent_get_output(u->up_bev), fmt,
		    arg);
	else
		bev_send(u->up_bev, line, n);
}

static char *
base64(const void *data, size_t len)
{
	char	*out = malloc(4 * ((len + 2) / 3) + 1);

	if (out != NULL)
		EVP_EncodeBlock((unsigned char *)out, data, len);
	return out;
}

/* "CMD base64(data)\r\n" with every intermediate copy wiped. */
static void
upstream_send_b64(struct upstream *u, const char *prefix, const void *data,
    size_t len)
{
	char	*b, *line;
	size_t	 n;

	if ((b = base64(data, len)) == NULL) {
		upstream_fail(u, "SYS/TEMP", "out of memory");
		return;
	}
	n = strlen(prefix) + strlen(b) + 3;
	if ((line = malloc(n)) == NULL) {
		secret_free(b);
		upstream_fail(u, "SYS/TEMP", "out of memory");
		return;
	}
	n = snprintf(line, n, "%s%s\r\n", prefix, b);
	secret_free(b);
	upstream_send_secret(u, line, n);
}

static void
upstream_send_apop(struct upstream *u)
{
	unsigned char	 md[EVP_MAX_MD_SIZE];
	unsigned int	 mdlen, i;
	char		 hex[2 * EVP_MAX_MD_SIZE + 1], *line;
	EVP_MD_CTX	*ctx;
	size_t		 n;

	ctx = EVP_MD_CTX_new();
	if (ctx == NULL || EVP_DigestInit_ex(ctx, EVP_md5(), NULL) != 1 ||
	    EVP_DigestUpdate(ctx, u->up_apop_ts, strlen(u->up_apop_ts)) != 1 ||
	    EVP_DigestUpdate(ctx, u->up_cfg->password,
	    strlen(u->up_cfg->password)) != 1 ||
	    EVP_DigestFinal_ex(ctx, md, &mdlen) != 1) {
		EVP_MD_CTX_free(ctx);
		upstream_fail(u, "SYS/TEMP", "cannot compute the APOP digest");
		return;
	}
	EVP_MD_CTX_free(ctx);
	for (i = 0; i < mdlen; i++)
		snprintf(hex + 2 * i, 3, "%02x", md[i]);
	n = strlen(u->up_cfg->user) + strlen(hex) + 9;
	if ((line = malloc(n)) == NULL) {
		upstream_fail(u, "SYS/TEMP", "out of memory");
		return;
	}
	n = snprintf(line, n, "APOP %s %s\r\n", u->up_cfg->user, hex);
	upstream_send_secret(u, line, n);
}

/* SASL PLAIN's message (RFC 4616): authzid empty, authcid, password. */
static char *
plain_message(struct upstream *u, size_t *len)
{
	size_t	 ul = strlen(u->up_cfg->user), pl = strlen(u->up_cfg->password);
	char	*msg = malloc(ul + pl + 2);

	if (msg == NULL)
		return NULL;
	msg[0] = '\0';
	memcpy(msg + 1, u->up_cfg->user, ul);
	msg[ul + 1] = '\0';
	memcpy(msg + ul + 2, u->up_cfg->password, pl);
	*len = ul + pl + 2;
	return msg;
}

static void
upstream_send_plain(struct upstream *u)
{
	size_t	 len;
	char	*msg = plain_message(u, &len);

	if (msg == NULL) {
		upstream_fail(u, "SYS/TEMP", "out of memory");
		return;
	}
	upstream_send_b64(u, "AUTH PLAIN ", msg, len);
	secret_wipe(msg, len);
	free(msg);
}

/*
 * Have what the server sends acknowledged at once (the kernel otherwise
 * delays an ACK up to 40 ms when we send nothing back).  A server that
 * leaves Nagle's algorithm on (Dovecot does) holds each pipelined reply
 * after the first until that one is acknowledged.
 */
static void
upstream_quickack(struct upstream *u)
{
	(void)setsockopt(bufferevent_getfd(u->up_bev), IPPROTO_TCP,
	    TCP_QUICKACK, &(int){ 1 }, sizeof(int));
}

/* XOAUTH2: user=U^Aauth=Bearer T^A^A; OAUTHBEARER (RFC 7628): n,a=U,^A... */
static void
upstream_send_oauth2(struct upstream *u)
{
	const char	*user = u->up_cfg->user ? u->up_cfg->user : "";
	size_t		 n = strlen(user) + strlen(u->up_token) + 40;
	char		*msg = malloc(n);
	int		 len;

	if (msg == NULL) {
		upstream_fail(u, "SYS/TEMP", "out of memory");
		return;
	}
	if (u->up_bearer)
		len = snprintf(msg, n, "n,a=%s,\001auth=Bearer %s\001\001", user,
		    u->up_token);
	else
		len = snprintf(msg, n, "user=%s\001auth=Bearer %s\001\001", user,
		    u->up_token);
	upstream_send_b64(u, "", msg, len);
	secret_wipe(msg, n);
	free(msg);
}

/* Pick the login mechanism: the destination's choice, else what CAPA offers. */
static enum upstream_state
upstream_choose_login(struct upstream *u)
{
	switch (u->up_cfg->auth) {
	case UPSTREAM_AUTH_NONE:
		return UP_READY;
	case UPSTREAM_AUTH_USER:
		return UP_USER;
	case UPSTREAM_AUTH_APOP:
		return UP_APOP;
	case UPSTREAM_AUTH_PLAIN:
		return UP_AUTH_PLAIN;
	case UPSTREAM_AUTH_LOGIN:
		return UP_AUTH_LOGIN;
	case UPSTREAM_AUTH_OAUTH2:
	case UPSTREAM_AUTH_EXCHANGE:
		/* XOAUTH2 unless the server offers only OAUTHBEARER */
		u->up_bearer = u->up_sasl_oauthbearer && !u->up_sasl_xoauth2;
		return UP_AUTH_OAUTH2;
	case UPSTREAM_AUTH_AUTO:
		break;
	}
	/* RFC 2449: without CAPA, USER is the baseline. */
	if (!u->up_has_capa || u->up_user)
		return UP_USER;
	if (u->up_sasl_plain)
		return UP_AUTH_PLAIN;
	if (u->up_sasl_login)
		return UP_AUTH_LOGIN;
	return UP_USER;
}

/*
 * May this CAPA carry the login?  Not before STLS: the credentials wait for
 * TLS.  Only for mechanisms that need no challenge or greeting data.
 */
static int
upstream_may_pipeline(struct upstream *u, enum upstream_state capa)
{
	return capa == UP_CAPA_TLS || (u->up_cfg->tls != UPSTREAM_TLS_STARTTLS &&
	    u->up_cfg->tls != UPSTREAM_TLS_STARTTLS_REQUIRED);
}

/* What the next sessions learn from this CAPA and the login it chose. */
static void
upstream_learn_pipeline(struct upstream *u, enum upstream_state capa,
    enum upstream_state login)
{
	u->up_cfg->login_pipeline = (u->up_pipelining &&
	    upstream_may_pipeline(u, capa) &&
	    (login == UP_USER || login == UP_AUTH_PLAIN)) ? (int)login : 0;
}

/* CAPA and the login, one write; the secret part is wiped once sent. */
static void
upstream_send_capa_login(struct upstream *u, enum upstream_state login)
{
	const char	*user = u->up_cfg->user, *pass = u->up_cfg->password;
	size_t		 n, ml;
	char		*line, *msg, *b = NULL;

	if (login == UP_AUTH_PLAIN) {
		if ((msg = plain_message(u, &ml)) == NULL)
			goto oom;
		b = base64(msg, ml);
		secret_wipe(msg, ml);
		free(msg);
		if (b == NULL)
			goto oom;
		n = strlen(b) + 24;
	} else
		n = strlen(user) + strlen(pass) + 24;
	if ((line = malloc(n)) == NULL) {
		if (b != NULL)
			secret_free(b);
		goto oom;
	}
	if (login == UP_AUTH_PLAIN) {
		n = snprintf(line, n, "CAPA\r\nAUTH PLAIN %s\r\n", b);
		secret_free(b);
	} else
		n = snprintf(line, n, "CAPA\r\nUSER %s\r\nPASS %s\r\n", user,
		    pass);
	u->up_pipelined = login;
	upstream_send_secret(u, line, n);
	/* the replies now come with nothing sent back in between */
	upstream_quickack(u);
	return;
oom:
	upstream_fail(u, "SYS/TEMP", "out of memory");
}

static void
upstream_start_tls(struct upstream *u, enum upstream_state next)
{
	struct bufferevent	*tbev;
	SSL			*ssl;
	evutil_socket_t		 fd;

	if ((ssl = tls_ssl_new(u->up_cfg)) == NULL) {
		upstream_fail(u, "SYS/TEMP", "cannot create a TLS session");
		return;
	}
	fd = bufferevent_getfd(u->up_bev);
	bufferevent_free(u->up_bev);
	u->up_bev = NULL;
	tbev = bufferevent_openssl_socket_new(proxy->base, fd, ssl,
	    BUFFEREVENT_SSL_CONNECTING, BEV_OPT_CLOSE_ON_FREE);
	if (tbev == NULL) {
		SSL_free(ssl);
		close(fd);
		upstream_fail(u, "SYS/TEMP", "cannot start TLS");
		return;
	}
	u->up_tls = 1;
	u->up_bev = tbev;
	bufferevent_openssl_set_allow_dirty_shutdown(tbev, 1);
	bufferevent_setcb(tbev, upstream_read_cb, NULL, upstream_event_cb, u);
	bufferevent_set_timeouts(tbev, &(struct timeval){
	    u->up_cfg->connect_timeout, 0 }, &(struct timeval){
	    u->up_cfg->connect_timeout, 0 });
	bufferevent_enable(tbev, EV_READ | EV_WRITE);
	u->up_state = next;
}

static void
upstream_enter_state(struct upstream *u, enum upstream_state st)
{
	log_debug("session=%lu upstream %s -> %s", session_id(u->up_session),
	    upstream_strstate(u->up_state), upstream_strstate(st));
	u->up_state = st;
	switch (st) {
	case UP_CAPA:
	case UP_CAPA_TLS:
		free(u->up_capa);
		u->up_capa = NULL;
		u->up_capa_len = 0;
		u->up_has_capa = u->up_user = u->up_stls = 0;
		u->up_sasl_plain = u->up_sasl_login = u->up_pipelining = 0;
		u->up_sasl_xoauth2 = u->up_sasl_oauthbearer = 0;
		if (u->up_cfg->login_pipeline != 0 &&
		    upstream_may_pipeline(u, st))
			upstream_send_capa_login(u,
			    (enum upstream_state)u->up_cfg->login_pipeline);
		else
			upstream_sendf(u, "CAPA\r\n", NULL);
		break;
	case UP_STLS:
		upstream_sendf(u, "STLS\r\n", NULL);
		break;
	case UP_LOGIN:
		upstream_enter_state(u, upstream_choose_login(u));
		break;
	case UP_USER:
		upstream_sendf(u, "USER %s\r\n", u->up_cfg->user);
		break;
	case UP_PASS: {
		size_t	 n = strlen(u->up_cfg->password) + 8;
		char	*line = malloc(n);

		if (line == NULL) {
			upstream_fail(u, "SYS/TEMP", "out of memory");
			return;
		}
		n = snprintf(line, n, "PASS %s\r\n", u->up_cfg->password);
		upstream_send_secret(u, line, n);
		break;
	}
	case UP_APOP:
		if (u->up_apop_ts == NULL) {
			upstream_fail(u, "SYS/TEMP",
			    "APOP configured but the server offers no APOP timestamp");
			return;
		}
		upstream_send_apop(u);
		break;
	case UP_AUTH_PLAIN:
		upstream_send_plain(u);
		break;
	case UP_AUTH_LOGIN:
		upstream_sendf(u, "AUTH LOGIN\r\n", NULL);
		break;
	case UP_AUTH_LOGIN_USER:
		upstream_send_b64(u, "", u->up_cfg->user, strlen(u->up_cfg->user));
		break;
	case UP_AUTH_LOGIN_PASS:
		upstream_send_b64(u, "", u->up_cfg->password,
		    strlen(u->up_cfg->password));
		break;
	case UP_AUTH_OAUTH2:
		/*
		 * Two steps, empty challenge first: a token rarely fits RFC
		 * 5034's 255-octet initial response, and Microsoft 365 insists.
		 */
		upstream_sendf(u, "AUTH %s\r\n", u->up_bearer ? "OAUTHBEARER" :
		    "XOAUTH2");
		break;
	case UP_AUTH_OAUTH2_TOKEN:
		upstream_send_oauth2(u);
		break;
	case UP_READY:
		if (u->up_timer != NULL)
			evtimer_del(u->up_timer);
		bufferevent_set_timeouts(u->up_bev, NULL, NULL);
		log_debug("session=%lu upstream=%s:%d result=ready",
		    session_id(u->up_session), u->up_cfg->host, u->up_cfg->port);
		session_upstream_ready(u->up_session);
		break;
	default:
		break;
	}
}

/* Remember the capability lines and the ones the login depends on. */
static void
upstream_capa_line(struct upstream *u, const char *line, size_t len)
{
	char	*p;

	if ((p = realloc(u->up_capa, u->up_capa_len + len + 2)) == NULL)
		return;
	u->up_capa = p;
	memcpy(p + u->up_capa_len, line, len);
	u->up_capa_len += len;
	p[u->up_capa_len++] = '\n';
	p[u->up_capa_len] = '\0';
	if (len == 4 && strncasecmp(line, "USER", 4) == 0)
		u->up_user = 1;
	else if (len == 4 && strncasecmp(line, "STLS", 4) == 0)
		u->up_stls = 1;
	else if (len == 10 && strncasecmp(line, "PIPELINING", 10) == 0)
		u->up_pipelining = 1;
	else if (len > 5 && strncasecmp(line, "SASL ", 5) == 0) {
		/* mechanisms are words: match them whole */
		const char	*w = line + 5, *end = line + len;

		while (w < end) {
			const char	*e = memchr(w, ' ', end - w);
			size_t		 wl = (e ? e : end) - w;

			if (wl == 5 && strncasecmp(w, "PLAIN", 5) == 0)
				u->up_sasl_plain = 1;
			if (wl == 5 && strncasecmp(w, "LOGIN", 5) == 0)
				u->up_sasl_login = 1;
			if (wl == 7 && strncasecmp(w, "XOAUTH2", 7) == 0)
				u->up_sasl_xoauth2 = 1;
			if (wl == 11 && strncasecmp(w, "OAUTHBEARER", 11) == 0)
				u->up_sasl_oauthbearer = 1;
			w += wl + 1;
		}
	}
}

/* The login failed with -ERR: pass a meaningful response code on. */
static void
upstream_login_rejected(struct upstream *u, const char *line, size_t len)
{
	char	code[32], reason[80];

	/*
	 * Neither +OK nor -ERR is no verdict on the credentials but a
	 * server that does not speak POP3 (or not to us): say so, or an
	 * operator would change a password that is fine.
	 */
	if (pop3_response_status(line, len) == -1) {
		snprintf(reason, sizeof(reason), "the mail server sent an "
		    "invalid reply to %s", u->up_state == UP_USER ? "USER" :
		    u->up_state == UP_PASS ? "PASS" : u->up_state == UP_APOP ?
		    "APOP" : "AUTH");
		u->up_protocol = 1;
		upstream_fail(u, "SYS/TEMP", reason);
		return;
	}
	/*
	 * The login went out with a CAPA that no longer offers it: the server
	 * changed, not the credentials.  The next session logs in anew.
	 */
	if (u->up_pipeline_stale) {
		upstream_fail(u, "SYS/TEMP", "the mail server's capabilities "
		    "changed during the login; the next one adapts");
		return;
	}
	if (pop3_response_code(line, len, code, sizeof(code)) &&
	    (strcmp(code, "SYS/TEMP") == 0 || strcmp(code, "SYS/PERM") == 0 ||
	    strcmp(code, "IN-USE") == 0 || strcmp(code, "LOGIN-DELAY") == 0))
		upstream_fail(u, strcmp(code, "SYS/PERM") == 0 ? "SYS/PERM" : code,
		    "the mail server refused the login");
	else
		upstream_fail(u, "AUTH", "the mail server rejected the credentials");
}

static void
upstream_response(struct upstream *u, const char *line, size_t len)
{
	int		 st = pop3_response_status(line, len);
	const char	*lt, *gt;

	switch (u->up_state) {
	case UP_GREETING:
		if (st != 1) {
			upstream_fail(u, "SYS/TEMP",
			    "the mail server did not greet with +OK");
			return;
		}
		/* RFC 1939 APOP timestamp: <...> in the greeting */
		lt = memchr(line, '<', len);
		gt = lt ? memchr(lt, '>', line + len - lt) : NULL;
		if (lt && gt && gt - lt + 1 < 256 && u->up_apop_ts == NULL &&
		    (u->up_apop_ts = malloc(gt - lt + 2)) != NULL) {
			memcpy(u->up_apop_ts, lt, gt - lt + 1);
			u->up_apop_ts[gt - lt + 1] = '\0';
		}
		upstream_enter_state(u, UP_CAPA);
		break;
	case UP_CAPA:
	case UP_CAPA_TLS:
		if (!u->up_has_capa) {
			if (st == 1) {
				u->up_has_capa = 1;
				return;		/* lines follow */
			}
			/* no CAPA: RFC 1939 server */
		} else if (!(len == 1 && line[0] == '.')) {
			if (u->up_capa_len + len > PARAM_MAX_CAPA) {
				upstream_fail(u, "SYS/TEMP",
				    "the mail server's CAPA is too long");
				return;
			}
			upstream_capa_line(u, line, len);
			return;
		}
		if (u->up_state == UP_CAPA &&
		    (u->up_cfg->tls == UPSTREAM_TLS_STARTTLS ||
		    u->up_cfg->tls == UPSTREAM_TLS_STARTTLS_REQUIRED)) {
			if (u->up_stls) {
				upstream_enter_state(u, UP_STLS);
				return;
			}
			if (u->up_cfg->tls == UPSTREAM_TLS_STARTTLS_REQUIRED) {
				upstream_fail(u, "SYS/TEMP", "STLS required but "
				    "the mail server does not offer it");
				return;
			}
		}
		if (u->up_pipelined) {
			/* the login went out with CAPA: await its replies */
			if (upstream_choose_login(u) != u->up_pipelined ||
			    !u->up_pipelining) {
				u->up_cfg->login_pipeline = 0;
				u->up_pipeline_stale = 1;
			}
			log_debug("session=%lu upstream %s -> %s (pipelined)",
			    session_id(u->up_session),
			    upstream_strstate(u->up_state),
			    upstream_strstate(u->up_pipelined));
			u->up_state = u->up_pipelined;
			break;
		}
		upstream_learn_pipeline(u, u->up_state,
		    upstream_choose_login(u));
		upstream_enter_state(u, UP_LOGIN);
		break;
	case UP_STLS:
		if (st != 1) {
			if (u->up_cfg->tls == UPSTREAM_TLS_STARTTLS_REQUIRED) {
				upstream_fail(u, "SYS/TEMP",
				    "the mail server refused STLS");
				return;
			}
			upstream_enter_state(u, UP_LOGIN);
			return;
		}
		/*
		 * Anything the server sent after +OK and before the handshake
		 * would be read as if it came over TLS: STARTTLS command
		 * injection (CVE-2011-0411 family).  Refuse it.
		 */
		if (evbuffer_get_length(bufferevent_get_input(u->up_bev)) > 0) {
			upstream_fail(u, "SYS/TEMP", "the mail server sent data "
			    "before the TLS handshake (possible injection)");
			return;
		}
		upstream_start_tls(u, UP_STLS_HANDSHAKE);
		break;
	case UP_USER:
		if (st != 1) {
			upstream_login_rejected(u, line, len);
			return;
		}
		if (u->up_pipelined)
			u->up_state = UP_PASS;	/* sent already */
		else
			upstream_enter_state(u, UP_PASS);
		break;
	case UP_PASS:
	case UP_APOP:
		if (st != 1) {
			upstream_login_rejected(u, line, len);
			return;
		}
		upstream_enter_state(u, UP_READY);
		break;
	case UP_AUTH_PLAIN:
	case UP_AUTH_LOGIN_PASS:
		if (st == 2 && u->up_state == UP_AUTH_PLAIN) {
			/* server ignored the initial response: RFC 5034 empty */
			upstream_fail(u, "SYS/TEMP",
			    "unexpected SASL challenge from the mail server");
			return;
		}
		if (st != 1) {
			upstream_login_rejected(u, line, len);
			return;
		}
		upstream_enter_state(u, UP_READY);
		break;
	case UP_AUTH_OAUTH2:
		if (st != 2) {
			upstream_login_rejected(u, line, len);
			return;
		}
		upstream_enter_state(u, UP_AUTH_OAUTH2_TOKEN);
		break;
	case UP_AUTH_OAUTH2_TOKEN:
		if (st == 2) {
			/*
			 * An error challenge (base64 JSON): answer it as the
			 * mechanism says, then the server sends -ERR.
			 */
			upstream_sendf(u, "%s\r\n", u->up_bearer ? "AQ==" : "");
			u->up_state = UP_AUTH_OAUTH2_ERROR;
			return;
		}
		if (st != 1) {
			upstream_login_rejected(u, line, len);
			return;
		}
		upstream_enter_state(u, UP_READY);
		break;
	case UP_AUTH_OAUTH2_ERROR:
		upstream_fail(u, "AUTH", "the mail server rejected the token");
		break;
	case UP_AUTH_LOGIN:
	case UP_AUTH_LOGIN_USER:
		if (st != 2) {
			upstream_login_rejected(u, line, len);
			return;
		}
		upstream_enter_state(u, u->up_state == UP_AUTH_LOGIN ?
		    UP_AUTH_LOGIN_USER : UP_AUTH_LOGIN_PASS);
		break;
	default:
		upstream_fail(u, "SYS/TEMP", "unexpected data from the mail server");
		break;
	}
}

/* Method 0x80 accepted: the tenant's token and the location id. */
static void
upstream_socks_auth(struct upstream *u)
{
	size_t		 jl = strlen(u->up_cfg->socks_jwt);
	size_t		 ll = strlen(u->up_cfg->socks_location);
	unsigned char	*m;
	size_t		 n = 1 + 4 + jl + 1 + ll;

	if (ll > 255 || jl > 0xffffff || (m = malloc(n)) == NULL) {
		upstream_fail(u, "SYS/TEMP", "connectivity proxy token or "
		    "location id too long");
		return;
	}
	m[0] = 0x01;			/* sub-version 1 */
	m[1] = jl >> 24;		/* big-endian length of the JWT */
	m[2] = jl >> 16;
	m[3] = jl >> 8;
	m[4] = jl;
	memcpy(m + 5, u->up_cfg->socks_jwt, jl);
	m[5 + jl] = ll;			/* base64 location id, may be empty */
	memcpy(m + 6 + jl, u->up_cfg->socks_location, ll);
	upstream_send_secret(u, (char *)m, n);
	u->up_state = UP_SOCKS_AUTH;
}

/* CONNECT to the virtual host: an IPv4 literal as ATYP 1, else a domain. */
static void
upstream_socks_connect(struct upstream *u)
{
	struct evbuffer	*out = bufferevent_get_output(u->up_bev);
	unsigned char	 hdr[4] = { 0x05, 0x01, 0x00, 0x03 }, a4[4], len, pb[2];
	size_t		 hl = strlen(u->up_cfg->host);

	pb[0] = u->up_cfg->port >> 8;
	pb[1] = u->up_cfg->port & 0xff;
	if (inet_pton(AF_INET, u->up_cfg->host, a4) == 1) {
		hdr[3] = 0x01;
		evbuffer_add(out, hdr, 4);
		evbuffer_add(out, a4, 4);
	} else {
		if (hl > 255) {
			upstream_fail(u, "SYS/TEMP", "virtual host name too long");
			return;
		}
		len = hl;
		evbuffer_add(out, hdr, 4);
		evbuffer_add(out, &len, 1);
		evbuffer_add(out, u->up_cfg->host, hl);
	}
	evbuffer_add(out, pb, 2);
	u->up_state = UP_SOCKS_CONNECT;
}

/* The connectivity proxy's binary replies; returns 0 when more is needed. */
static int
upstream_socks_read(struct upstream *u)
{
	struct evbuffer		*in = bufferevent_get_input(u->up_bev);
	unsigned char		 b[SOCKS5_REPLY_MAX];
	char			 reason[200];
	struct socks5_status	 st;
	enum socks5_reply	 which;
	ev_ssize_t		 n;

	switch (u->up_state) {
	case UP_SOCKS_METHOD:
		which = SOCKS5_METHOD;
		break;
	case UP_SOCKS_AUTH:
		which = SOCKS5_AUTH;
		break;
	case UP_SOCKS_CONNECT:
		which = SOCKS5_CONNECT;
		break;
	default:
		return 0;
	}
	/* copied, not removed: a partial reply stays for the next read */
	if ((n = evbuffer_copyout(in, b, sizeof(b))) <= 0)
		return 0;
	switch (socks5_reply_parse(which, b, n, &st)) {
	case SOCKS5_NEED_MORE:
		return 0;
	case SOCKS5_ERROR:
		if (which == SOCKS5_CONNECT && st.code > 0) {
			log_warnx("session=%lu connectivity proxy reply code %d",
			    session_id(u->up_session), st.code);
			snprintf(reason, sizeof(reason), "connectivity proxy "
			    "reply %d: %s", st.code, st.message);
			upstream_fail(u, "SYS/TEMP", reason);
		} else
			upstream_fail(u, "SYS/TEMP", st.message);
		return 0;
	case SOCKS5_DONE:
		break;
	}
	evbuffer_drain(in, st.consumed);
	switch (which) {
	case SOCKS5_METHOD:
		upstream_socks_auth(u);
		return 1;
	case SOCKS5_AUTH:
		upstream_socks_connect(u);
		return 1;
	case SOCKS5_CONNECT:
		break;
	}
	log_debug("session=%lu connectivity proxy connected to %s:%d",
	    session_id(u->up_session), u->up_cfg->host, u->up_cfg->port);
	if (u->up_cfg->tls == UPSTREAM_TLS_IMPLICIT) {
		upstream_start_tls(u, UP_TLS_CONNECT);
		return 0;
	}
	u->up_state = UP_GREETING;
	return 1;
}

static void
upstream_read_cb(struct bufferevent *bev, void *arg)
{
	struct upstream	*u = arg;
	struct evbuffer	*in = bufferevent_get_input(bev);
	char		*line;
	size_t		 len;

	while (u->up_state >= UP_SOCKS_METHOD && u->up_state <= UP_SOCKS_CONNECT)
		if (!upstream_socks_read(u))
			return;

	/*
	 * Over TLS the pipelined login left on a later loop turn than the
	 * QUICKACK set after queueing it, which that send may have undone:
	 * acknowledge each reply now, so that the server's next one is not
	 * held for a delayed ACK.
	 */
	if (u->up_pipelined && u->up_tls && u->up_state != UP_READY)
		upstream_quickack(u);
	while (u->up_state != UP_FAILED && u->up_state != UP_READY &&
	    u->up_state != UP_STLS_HANDSHAKE && u->up_state != UP_TLS_CONNECT) {
		line = evbuffer_readln(in, &len, EVBUFFER_EOL_CRLF);
		if (line == NULL) {
			if (evbuffer_get_length(in) > PARAM_MAX_RESPONSE_LINE)
				upstream_fail(u, "SYS/TEMP",
				    "overlong line from the mail server");
			return;
		}
		if (len > PARAM_MAX_RESPONSE_LINE) {
			free(line);
			upstream_fail(u, "SYS/TEMP",
			    "overlong line from the mail server");
			return;
		}
		upstream_response(u, line, len);
		free(line);
		/* the session may have freed us through a failure callback */
		if (u->up_state == UP_FAILED)
			return;
	}
}

static void
upstream_event_cb(struct bufferevent *bev, short what, void *arg)
{
	struct upstream	*u = arg;
	const char	*why, *detail;
	char		 reason[300];
	int		 err;

	if (what & BEV_EVENT_CONNECTED) {
		bufferevent_set_timeouts(bev, NULL, NULL);
		if (u->up_state == UP_CONNECT) {
			if (u->up_cfg->socks) {
				/* SOCKS5, one method: SAP's 0x80 */
				evbuffer_add(bufferevent_get_output(bev),
				    "\x05\x01\x80", 3);
				u->up_state = UP_SOCKS_METHOD;
				return;
			}
			if (u->up_cfg->tls == UPSTREAM_TLS_IMPLICIT) {
				upstream_start_tls(u, UP_TLS_CONNECT);
				return;
			}
			u->up_state = UP_GREETING;
		} else if (u->up_state == UP_TLS_CONNECT)
			u->up_state = UP_GREETING;
		else if (u->up_state == UP_STLS_HANDSHAKE) {
			upstream_enter_state(u, UP_CAPA_TLS);
		}
		return;
	}
	if (what & BEV_EVENT_TIMEOUT) {
		upstream_fail(u, "SYS/TEMP", "timed out connecting to the mail server");
		return;
	}
	if (u->up_state == UP_TLS_CONNECT || u->up_state == UP_STLS_HANDSHAKE) {
		if ((why = tls_error_string(bev, &detail)) == NULL) {
			log_debug("session=%lu TLS handshake cut: %s",
			    session_id(u->up_session), detail);
			upstream_fail(u, "SYS/TEMP", "the mail server closed the "
			    "connection during the TLS handshake");
			return;
		}
		snprintf(reason, sizeof(reason), "TLS with the mail server failed: %s",
		    why);
		upstream_fail(u, "SYS/TEMP", reason);
		return;
	}
	if (what & BEV_EVENT_ERROR) {
		err = EVUTIL_SOCKET_ERROR();
		if (u->up_state == UP_CONNECT &&
		    u->up_addr + 1 < u->up_cfg->naddrs) {
			/* the next address of the mail server */
			u->up_addr++;
			if (upstream_connect(u) == -1)
				upstream_fail(u, "SYS/TEMP",
				    "cannot connect to the mail server");
			return;
		}
		snprintf(reason, sizeof(reason), "cannot reach the mail server: %s",
		    evutil_socket_error_to_string(err));
		upstream_fail(u, "SYS/TEMP", reason);
		return;
	}
	upstream_fail(u, "SYS/TEMP", "the mail server closed the connection");
}

static void
upstream_auth_timer_start(struct upstream *u)
{
	event_add(u->up_timer, &(struct timeval){ u->up_cfg->auth_timeout, 0 });
}

/* Connect to the current address, on a fresh plain bufferevent. */
static int
upstream_connect(struct upstream *u)
{
	struct proxy_config	*cfg = u->up_cfg;
	evutil_socket_t		 fd;

	if (u->up_bev != NULL) {
		fd = bufferevent_getfd(u->up_bev);
		bufferevent_free(u->up_bev);
		if (fd != -1)
			close(fd);
	}
	/* No CLOSE_ON_FREE: the socket outlives this bufferevent when TLS starts. */
	if ((u->up_bev = bufferevent_socket_new(proxy->base, -1, 0)) == NULL)
		return -1;
	bufferevent_setcb(u->up_bev, upstream_read_cb, NULL, upstream_event_cb, u);
	bufferevent_set_timeouts(u->up_bev, &(struct timeval){
	    cfg->connect_timeout, 0 }, &(struct timeval){ cfg->connect_timeout, 0 });
	bufferevent_enable(u->up_bev, EV_READ | EV_WRITE);
	return bufferevent_socket_connect(u->up_bev,
	    (struct sockaddr *)&cfg->addrs[u->up_addr], cfg->addrlens[u->up_addr]);
}

/* Open the upstream connection for a session and start the login. */
struct upstream *
upstream_start(struct session *s, struct proxy_config *cfg, const char *token)
{
	struct upstream	*u;

	if ((u = calloc(1, sizeof(*u))) == NULL)
		return NULL;
	u->up_session = s;
	u->up_cfg = cfg;
	/* the destination's token, or one exchanged for this session */
	u->up_token = token ? token : cfg->token;
	u->up_state = UP_CONNECT;
	u->up_timer = evtimer_new(proxy->base, upstream_timeout_cb, u);
	if (u->up_timer == NULL || upstream_connect(u) == -1) {
		upstream_free(u);
		return NULL;
	}
	upstream_auth_timer_start(u);
	return u;
}

struct bufferevent *
upstream_bev(struct upstream *u)
{
	return u->up_bev;
}

const char *
upstream_capa(struct upstream *u)
{
	return u->up_capa ? u->up_capa : "";
}

int
upstream_pipelining(struct upstream *u)
{
	return u->up_pipelining;
}

/*
 * The session has taken what it needs of the login (the capabilities):
 * what only the login used goes, so that an idle session holds less.
 */
void
upstream_login_done(struct upstream *u)
{
	if (u->up_timer != NULL)
		event_free(u->up_timer);
	u->up_timer = NULL;
	free(u->up_capa);
	u->up_capa = NULL;
	u->up_capa_len = 0;
	free(u->up_apop_ts);
	u->up_apop_ts = NULL;
}

void
upstream_free(struct upstream *u)
{
	evutil_socket_t	fd;

	if (u == NULL)
		return;
	if (u->up_bev != NULL) {
		/* a plain bufferevent does not own its socket (see upstream_start) */
		fd = u->up_tls ? -1 : bufferevent_getfd(u->up_bev);
		bufferevent_free(u->up_bev);
		if (fd != -1)
			close(fd);
	}
	if (u->up_timer != NULL)
		event_free(u->up_timer);
	free(u->up_capa);
	free(u->up_apop_ts);
	free(u);
}
