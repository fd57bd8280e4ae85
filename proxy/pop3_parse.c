/*
 * pop3_parse.c: POP3 parsing with no I/O.  The command table decides, per
 * command, whether the proxy answers it itself or relays it, whether a +OK
 * reply is multi-line, and which arguments are valid, so that the relay never
 * loses track of where one upstream reply ends and the next begins.
 * Runs unprivileged inside the sandboxed tenant proxy.
 */
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "pop3_parse.h"

enum arg_rule {
	ARGS_NONE,	/* no argument */
	ARGS_MSG_OPT,	/* optional message number: multi-line without it */
	ARGS_MSG,	/* one message number */
	ARGS_MSG_LINES,	/* message number and a line count */
	ARGS_WORD,	/* one word (USER) */
	ARGS_REST,	/* the rest of the line, spaces allowed (PASS) */
	ARGS_TWO,	/* two words (APOP) */
	ARGS_SASL,	/* mechanism and optional initial response (AUTH) */
};

static const struct pop3_cmd_def {
	const char		*name;
	enum pop3_cmd_id	 id;
	enum pop3_disposition	 disp;
	enum arg_rule		 rule;
	int			 multiline;
} pop3_cmds[] = {
	{ "USER", POP3_USER, POP3_LOCAL, ARGS_WORD, 0 },
	{ "PASS", POP3_PASS, POP3_LOCAL, ARGS_REST, 0 },
	{ "APOP", POP3_APOP, POP3_LOCAL, ARGS_TWO, 0 },
	{ "AUTH", POP3_AUTH, POP3_LOCAL, ARGS_SASL, 0 },
	{ "CAPA", POP3_CAPA, POP3_LOCAL, ARGS_NONE, 1 },
	{ "STLS", POP3_STLS, POP3_LOCAL, ARGS_NONE, 0 },
	{ "QUIT", POP3_QUIT, POP3_RELAY, ARGS_NONE, 0 },
	{ "STAT", POP3_STAT, POP3_RELAY, ARGS_NONE, 0 },
	{ "LIST", POP3_LIST, POP3_RELAY, ARGS_MSG_OPT, 1 },
	{ "RETR", POP3_RETR, POP3_RELAY, ARGS_MSG, 1 },
	{ "DELE", POP3_DELE, POP3_RELAY, ARGS_MSG, 0 },
	{ "NOOP", POP3_NOOP, POP3_RELAY, ARGS_NONE, 0 },
	{ "RSET", POP3_RSET, POP3_RELAY, ARGS_NONE, 0 },
	{ "TOP", POP3_TOP, POP3_RELAY, ARGS_MSG_LINES, 1 },
	{ "UIDL", POP3_UIDL, POP3_RELAY, ARGS_MSG_OPT, 1 },
};

/* A decimal number without sign, fully checked; msg numbers start at 1. */
static int
parse_number(const char *s, size_t len, int min)
{
	unsigned long	v = 0;
	size_t		i;

	if (len == 0 || len > 9)
		return 0;
	for (i = 0; i < len; i++) {
		if (!isdigit((unsigned char)s[i]))
			return 0;
		v = v * 10 + (s[i] - '0');
	}
	return (long)v >= min;
}

/* Split the arguments into at most 3 space-separated words. */
static int
split_words(const char *s, size_t len, const char *w[3], size_t wl[3])
{
	size_t	i = 0;
	int	n = 0;

	while (i < len) {
		if (s[i] == ' ') {
			i++;
			continue;
		}
		if (n == 3)
			return 4;
		w[n] = s + i;
		while (i < len && s[i] != ' ')
			i++;
		wl[n] = s + i - w[n];
		n++;
	}
	return n;
}

int
pop3_parse_command(const char *line, size_t len, struct pop3_cmd *cmd,
    const char **err)
{
	const struct pop3_cmd_def	*def = NULL;
	const char			*w[3];
	size_t				 wl[3], kwlen, i;
	int				 n;

	memset(cmd, 0, sizeof(*cmd));
	if (memchr(line, '\0', len) != NULL) {
		*err = "NUL byte in command";
		return -1;
	}
	/* Trailing spaces (some clients send them) are not an argument. */
	while (len > 0 && (line[len - 1] == ' ' || line[len - 1] == '\r'))
		len--;
	for (kwlen = 0; kwlen < len && line[kwlen] != ' '; kwlen++)
		;
	if (kwlen == 0) {
		*err = "Empty command";
		return -1;
	}
	for (i = 0; i < sizeof(pop3_cmds) / sizeof(pop3_cmds[0]); i++) {
		if (strlen(pop3_cmds[i].name) == kwlen &&
		    strncasecmp(pop3_cmds[i].name, line, kwlen) == 0) {
			def = &pop3_cmds[i];
			break;
		}
	}
	if (def == NULL) {
		*err = "Unknown command";
		return -1;
	}
	cmd->id = def->id;
	cmd->name = def->name;
	cmd->disp = def->disp;
	cmd->multiline = def->multiline;
	cmd->args = line + kwlen;
	cmd->argslen = len - kwlen;
	while (cmd->argslen > 0 && cmd->args[0] == ' ') {
		cmd->args++;
		cmd->argslen--;
	}

	if (def->rule == ARGS_REST) {
		cmd->nargs = cmd->argslen > 0;
		if (!cmd->nargs) {
			*err = "Missing argument";
			return -1;
		}
		return 0;
	}
	n = split_words(cmd->args, cmd->argslen, w, wl);
	cmd->nargs = n;
	if (def->rule != ARGS_SASL)
		for (i = 0; i < (size_t)n && i < 3; i++)
			if (wl[i] > POP3_MAX_ARGLEN) {
				*err = "Argument too long";
				return -1;
			}
	switch (def->rule) {
	case ARGS_NONE:
		if (n != 0)
			goto bad;
		break;
	case ARGS_MSG_OPT:
		if (n > 1 || (n == 1 && !parse_number(w[0], wl[0], 1)))
			goto bad;
		if (n == 1)
			cmd->multiline = 0;
		break;
	case ARGS_MSG:
		if (n != 1 || !parse_number(w[0], wl[0], 1))
			goto bad;
		break;
	case ARGS_MSG_LINES:
		if (n != 2 || !parse_number(w[0], wl[0], 1) ||
		    !parse_number(w[1], wl[1], 0))
			goto bad;
		break;
	case ARGS_WORD:
		if (n != 1)
			goto bad;
		break;
	case ARGS_TWO:
		if (n != 2)
			goto bad;
		break;
	case ARGS_SASL:
		if (n > 2)
			goto bad;
		break;
	case ARGS_REST:
		break;
	}
	return 0;
bad:
	*err = "Invalid arguments";
	return -1;
}

int
pop3_response_status(const char *line, size_t len)
{
	if (len >= 3 && strncmp(line, "+OK", 3) == 0 &&
	    (len == 3 || line[3] == ' ' || line[3] == '\r' || line[3] == '\n'))
		return 1;
	if (len >= 4 && strncmp(line, "-ERR", 4) == 0 &&
	    (len == 4 || line[4] == ' ' || line[4] == '\r' || line[4] == '\n'))
		return 0;
	if (len >= 1 && line[0] == '+' && (len == 1 || line[1] == ' ' ||
	    line[1] == '\r' || line[1] == '\n'))
		return 2;
	return -1;
}

int
pop3_response_code(const char *line, size_t len, char *buf, size_t bufsz)
{
	const char	*p, *end = line + len, *close;

	p = memchr(line, ' ', len);
	if (p == NULL || p + 1 >= end || p[1] != '[')
		return 0;
	p += 2;
	close = memchr(p, ']', end - p);
	if (close == NULL || close == p || (size_t)(close - p) >= bufsz)
		return 0;
	memcpy(buf, p, close - p);
	buf[close - p] = '\0';
	return 1;
}

/* Scanner states: where in a line the last byte left us. */
enum { ML_BOL, ML_MID, ML_DOT, ML_DOT_CR };

void
pop3_ml_init(struct pop3_ml_scan *sc)
{
	sc->state = ML_BOL;
}

size_t
pop3_ml_feed(struct pop3_ml_scan *sc, const char *buf, size_t len, int *done)
{
	const char	*nl;
	size_t		 i = 0;

	*done = 0;
	while (i < len) {
		switch (sc->state) {
		case ML_MID:
			nl = memchr(buf + i, '\n', len - i);
			if (nl == NULL)
				return len;
			i = nl - buf + 1;
			sc->state = ML_BOL;
			break;
		case ML_BOL:
			sc->state = buf[i] == '.' ? ML_DOT :
			    buf[i] == '\n' ? ML_BOL : ML_MID;
			i++;
			break;
		case ML_DOT:
			if (buf[i] == '\r')
				sc->state = ML_DOT_CR;
			else if (buf[i] == '\n') {
				/* ".\n": a bare-LF server's terminator */
				*done = 1;
				sc->state = ML_BOL;
				return i + 1;
			} else
				sc->state = ML_MID;
			i++;
			break;
		case ML_DOT_CR:
			if (buf[i] == '\n') {
				*done = 1;
				sc->state = ML_BOL;
				return i + 1;
			}
			sc->state = ML_MID;
			i++;
			break;
		}
	}
	return len;
}

/* Capabilities the proxy passes through from the upstream unchanged. */
static const char *const capa_keep[] = {
	"TOP", "UIDL", "RESP-CODES", "EXPIRE", "LOGIN-DELAY",
	"AUTH-RESP-CODE", "UTF8", "LANG",
};

char *
pop3_capa_build(const char *upstream_capa)
{
	const char	*p = upstream_capa, *eol;
	char		*out, kw[32];
	size_t		 cap, used, ll, kl, i;
	int		 keep;

	/* every kept line may grow by one byte (LF to CRLF), then ours */
	cap = 2 * strlen(upstream_capa) + 256;
	if ((out = malloc(cap)) == NULL)
		return NULL;
	used = snprintf(out, cap, "+OK Capability list follows\r\n");
	while (p != NULL && *p != '\0') {
		eol = strchr(p, '\n');
		ll = eol ? (size_t)(eol - p) : strlen(p);
		while (ll > 0 && (p[ll - 1] == '\r'))
			ll--;
		for (kl = 0; kl < ll && p[kl] != ' ' && kl < sizeof(kw) - 1; kl++)
			kw[kl] = toupper((unsigned char)p[kl]);
		kw[kl] = '\0';
		keep = 0;
		for (i = 0; i < sizeof(capa_keep) / sizeof(capa_keep[0]); i++)
			if (strcmp(kw, capa_keep[i]) == 0)
				keep = 1;
		if (keep && ll > 0 && used + ll + 2 < cap) {
			memcpy(out + used, p, ll);
			used += ll;
			memcpy(out + used, "\r\n", 2);
			used += 2;
		}
		p = eol ? eol + 1 : NULL;
	}
	used += snprintf(out + used, cap - used,
	    "USER\r\nSASL PLAIN LOGIN\r\nPIPELINING\r\n"
	    "IMPLEMENTATION tpmail\r\n.\r\n");
	return out;
}
