/*
 * params.h: every built-in limit and default of the tenant proxy in one
 * place.  The supervisor may override the ones marked (config) per service.
 */
#ifndef TPMAIL_PARAMS_H
#define TPMAIL_PARAMS_H

/* (config) A command line, CRLF included: long enough for an AUTH XOAUTH2 line. */
#define PARAM_MAX_LINE		8192
/* (config) Concurrent sessions per tenant service; more get -ERR [SYS/TEMP]. */
#define PARAM_MAX_SESSIONS	100
/* (config) Seconds to connect upstream (TCP and TLS). */
#define PARAM_CONNECT_TIMEOUT	10
/* (config) Seconds for the whole upstream login, greeting to +OK. */
#define PARAM_AUTH_TIMEOUT	30
/* (config) RFC 1939 autologout: at least 10 minutes of client silence. */
#define PARAM_IDLE_TIMEOUT	600
/*
 * (config) Bytes buffered per direction before reading from the other side
 * pauses: a slow reader of a large RETR holds about this much, not the message.
 */
#define PARAM_MAX_BUFFER	(256 * 1024)
/* Relayed commands queued per session before the client is no longer read. */
#define PARAM_MAX_PENDING	64
/* Largest single read from a socket: libevent's default is 4 KiB. */
#define PARAM_READ_SIZE		(64 * 1024)
/* The least an upstream read asks for, however full the budget. */
#define PARAM_MIN_READ		(4 * 1024)
/* Largest upstream status or CAPA line we accept during login. */
#define PARAM_MAX_RESPONSE_LINE	1024
/* Largest CAPA reply accepted from the upstream. */
#define PARAM_MAX_CAPA		8192
/* Seconds to wait for the configuration after exec. */
#define PARAM_CONFIG_TIMEOUT	10
/* Seconds an accept pause lasts after EMFILE/ENFILE. */
#define PARAM_ACCEPT_PAUSE	1
/* Seconds to finish open sessions after a drain, unless configured. */
#define PARAM_DRAIN_GRACE	30
/* Milliseconds between two counter reports to tpmaild, at most one each. */
#define PARAM_STATS_INTERVAL_MS	100
/* Bytes of a CA bundle a proxy takes (the system's is about 220 KB). */
#define PARAM_MAX_CA		(16 * 1024 * 1024)

#endif
