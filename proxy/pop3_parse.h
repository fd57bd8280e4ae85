/*
 * pop3_parse.h: POP3 command and response parsing with no I/O, so it can be
 * unit-tested and fuzzed (RFC 1939, 2449, 5034).
 */
#ifndef TPMAIL_POP3_PARSE_H
#define TPMAIL_POP3_PARSE_H

#include <stddef.h>

#define POP3_MAX_ARGLEN		40	/* RFC 1939 argument limit (AUTH exempt) */

enum pop3_cmd_id {
	POP3_USER, POP3_PASS, POP3_APOP, POP3_AUTH, POP3_CAPA, POP3_STLS,
	POP3_QUIT, POP3_STAT, POP3_LIST, POP3_RETR, POP3_DELE, POP3_NOOP,
	POP3_RSET, POP3_TOP, POP3_UIDL,
};

/* How the proxy handles a command. */
enum pop3_disposition {
	POP3_LOCAL,	/* answered by the proxy, never sent upstream */
	POP3_RELAY,	/* forwarded upstream, reply relayed */
};

struct pop3_cmd {
	enum pop3_cmd_id	 id;
	const char		*name;		/* canonical upper-case keyword */
	enum pop3_disposition	 disp;
	int			 multiline;	/* a +OK reply is multi-line */
	int			 nargs;
	const char		*args;		/* points into the line, or "" */
	size_t			 argslen;
};

/*
 * Parse one command line (without its CRLF).  Returns 0 and fills *cmd, or
 * -1 with *err set to a short reason suitable for "-ERR <reason>".
 */
int	pop3_parse_command(const char *line, size_t len, struct pop3_cmd *cmd,
	    const char **err);

/* Classify a response line: 1 for +OK, 0 for -ERR, 2 for "+ " (SASL), -1 other. */
int	pop3_response_status(const char *line, size_t len);

/*
 * Copy the extended response code of a -ERR/+OK line ("AUTH", "SYS/TEMP",
 * ...) into buf; returns 1 if one was found.
 */
int	pop3_response_code(const char *line, size_t len, char *buf, size_t bufsz);

/*
 * Multi-line body scanner.  Feed the bytes that follow the status line; it
 * returns how many bytes belong to the response, and sets *done once the
 * terminating ".CRLF" line has been consumed.  State persists across calls,
 * so a terminator split between reads is found.
 */
struct pop3_ml_scan {
	int	state;
};
void	pop3_ml_init(struct pop3_ml_scan *);
size_t	pop3_ml_feed(struct pop3_ml_scan *, const char *buf, size_t len,
	    int *done);

/*
 * Build the proxy's own CAPA reply from the upstream's capability lines
 * (one per line, without the terminator).  Drops what the proxy does not
 * honour toward its clients (STLS, the upstream's SASL list, USER, any
 * IMPLEMENTATION) and adds its own.  Returns a malloc'd multi-line reply
 * including "+OK" and the final ".\r\n".
 */
char	*pop3_capa_build(const char *upstream_capa);

#endif
