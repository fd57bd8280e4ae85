/*
 * proxy.h: the tenant proxy (tpmail-pop3), one process per tenant service.
 */
#ifndef TPMAIL_PROXY_H
#define TPMAIL_PROXY_H

#include <sys/queue.h>
#include <sys/socket.h>
#include <jansson.h>
#include <event2/event.h>
#include <event2/bufferevent.h>
#include <openssl/ssl.h>

#include "accept_pause.h"
#include "pop3_parse.h"
#include "trust.h"

enum upstream_tls {
	UPSTREAM_TLS_NONE,
	UPSTREAM_TLS_IMPLICIT,		/* POP3S */
	UPSTREAM_TLS_STARTTLS,		/* STLS when offered */
	UPSTREAM_TLS_STARTTLS_REQUIRED,	/* STLS or fail */
};

enum upstream_auth {
	UPSTREAM_AUTH_NONE,	/* mail.<p>.auth false */
	UPSTREAM_AUTH_AUTO,	/* USER/PASS, else SASL PLAIN, else LOGIN */
	UPSTREAM_AUTH_USER,
	UPSTREAM_AUTH_APOP,
	UPSTREAM_AUTH_PLAIN,
	UPSTREAM_AUTH_LOGIN,
	UPSTREAM_AUTH_OAUTH2,		/* XOAUTH2, or OAUTHBEARER, with a token */
	UPSTREAM_AUTH_EXCHANGE,		/* the client's AUTH XOAUTH2 carries a
					   refresh token or code to exchange */
};

/* One service's configuration, as received in MSG_CONFIG / MSG_UPDATE. */
struct proxy_config {
	int			 refs;		/* sessions keep the config they began with */
	char			*service;	/* namespace/name */
	char			*tenant;	/* NULL: dedicated */
	char			*host;		/* for SNI and the certificate check */
	int			 port;
	struct sockaddr_storage	 addrs[4];	/* resolved by the supervisor */
	socklen_t		 addrlens[4];
	int			 naddrs;
	enum upstream_tls	 tls;
	char			*ca_source;	/* where the CA came from, for logs */
	int			 verify_host;
	enum upstream_auth	 auth;
	char			*user;
	char			*password;	/* in the vault */
	char			*token;		/* OAuth2 access token, in the vault */
	char			*exchange;	/* "refresh" or "code" */
	int			 socks;		/* through the connectivity proxy */
	char			*socks_jwt;	/* its token, in the vault */
	char			*socks_location; /* base64 location id, or "" */
	int			 connect_timeout;
	int			 auth_timeout;
	int			 idle_timeout;
	int			 max_sessions;
	int			 max_line;
	int			 max_buffer;
	SSL_CTX			*ssl_ctx;	/* built once per config */
	SSL_SESSION		*ssl_session;	/* newest, to resume the next */
	int			 login_pipeline; /* learned, see upstream.c */
	char			*capa_raw;	/* the server's CAPA lines, */
	char			*capa_reply;	/* and our answer, see session.c */
};

/* Histogram buckets (seconds), shared by every duration the proxy reports. */
#define STATS_NBUCKETS	14
extern const double	stats_buckets[STATS_NBUCKETS];

struct histogram {
	unsigned long	h_counts[STATS_NBUCKETS + 1];	/* last: +Inf */
	double		h_sum;
	unsigned long	h_count;
};

enum session_outcome {
	OUTCOME_OK,		/* the client's QUIT */
	OUTCOME_CLIENT_CLOSED,	/* the client left without QUIT */
	OUTCOME_LOGIN_FAILED,	/* the upstream login failed */
	OUTCOME_IDLE_TIMEOUT,
	OUTCOME_ERROR,
	OUTCOME_MAX,
};

enum upstream_failure {
	UPFAIL_CONNECT, UPFAIL_TLS, UPFAIL_AUTH, UPFAIL_TIMEOUT, UPFAIL_PROTOCOL,
	UPFAIL_MAX,
};

/* Counters since this process started; tpmaild adds up restarts. */
struct proxy_stats {
	unsigned long		st_total;
	unsigned long		st_refused;
	unsigned long		st_outcome[OUTCOME_MAX];
	unsigned long		st_upfail[UPFAIL_MAX];
	unsigned long long	st_bytes_to_client;
	unsigned long long	st_bytes_to_server;
	struct histogram	st_duration;
	struct histogram	st_login;
};

struct proxy {
	struct event_base	*base;
	struct proxy_config	*cfg;
	struct evconnlistener	*listener;
	struct event		*chan_ev;
	struct accept_pause	*accept_pause;
	struct event		*drain_timer;
	int			 chan;
	pid_t			 ppid;		/* tpmaild */
	int			 draining;
	unsigned int		 active;
	unsigned long		 total;
	unsigned long		 failed;
	unsigned long		 next_id;
	struct proxy_stats	 stats;
};

extern struct proxy	*proxy;

/* config.c */
struct proxy_config	*config_parse(json_t *, struct trust *,
			    const char **);
void			 config_ref(struct proxy_config *);
void			 config_unref(struct proxy_config *);

/* main.c */
void	proxy_session_opened(void);
void	proxy_session_closed(enum session_outcome, int failed, const char *error,
	    double duration, unsigned long to_client, unsigned long to_server);
void	proxy_session_refused(void);
void	proxy_login_done(double seconds);
void	proxy_upstream_failed(enum upstream_failure);

/* stats.c */
void	stats_observe(struct histogram *, double);
json_t	*stats_json(const struct proxy_stats *);

/* listener.c */
void	listener_start(int fd);
void	listener_stop(void);

/* session.c */
struct session;
/* bev_send.c */
void	bev_send(struct bufferevent *, const void *, size_t);
void	bev_send_secret(struct bufferevent *, char *, size_t,
	    void (*)(const void *, size_t, void *));

void	session_new(int fd, struct proxy_config *);
void	session_upstream_ready(struct session *);
void	session_upstream_failed(struct session *, const char *code,
	    const char *reason);
void	session_upstream_read(struct session *);
void	session_exchanged(unsigned long id, const char *token, const char *error,
	    int temporary);
void	proxy_exchange(unsigned long session, const char *kind, const char *user,
	    const char *value);
void	session_upstream_event(struct session *, short);
unsigned long	session_id(struct session *);

/* upstream.c */
struct upstream;
struct upstream	*upstream_start(struct session *, struct proxy_config *,
		    const char *token);
struct bufferevent *upstream_bev(struct upstream *);
const char	*upstream_capa(struct upstream *);
int		 upstream_pipelining(struct upstream *);
void		 upstream_login_done(struct upstream *);
void		 upstream_free(struct upstream *);

/* tls.c */
SSL_CTX	*tls_ctx_new(struct trust *, const char **err);
SSL	*tls_ssl_new(struct proxy_config *);
void	 tls_ctx_bind(SSL_CTX *, struct proxy_config *);
const char *tls_error_string(struct bufferevent *, const char **);

#endif
