/*
 * fuzz_pop3_command: pop3_parse_command() (proxy/pop3_parse.c) on what a
 * client sends.  The input is first parsed whole as one line (any bytes),
 * then split the way the proxy splits a client's stream (LF or CRLF, as
 * libevent's EVBUFFER_EOL_CRLF) and each line parsed on its own, as a
 * pipelining client's batch is.  Every line is an exact-size heap copy, so
 * a read past len is an ASan report.
 *
 * Checked on success: the command table's contract the relay depends on
 * (disposition, multi-line flag), args inside the line and trimmed, the
 * argument rules (message numbers are digits), and that a relayed line
 * carries nothing but its keyword, digits, spaces and trailing CRs.
 */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fuzz.h"
#include "pop3_parse.h"

static const struct {
	const char		*name;
	enum pop3_cmd_id	 id;
	enum pop3_disposition	 disp;
	int			 multiline;	/* without an argument */
	int			 maxargs;
} table[] = {
	{ "USER", POP3_USER, POP3_LOCAL, 0, 1 },
	{ "PASS", POP3_PASS, POP3_LOCAL, 0, 1 },
	{ "APOP", POP3_APOP, POP3_LOCAL, 0, 2 },
	{ "AUTH", POP3_AUTH, POP3_LOCAL, 0, 2 },
	{ "CAPA", POP3_CAPA, POP3_LOCAL, 1, 0 },
	{ "STLS", POP3_STLS, POP3_LOCAL, 0, 0 },
	{ "QUIT", POP3_QUIT, POP3_RELAY, 0, 0 },
	{ "STAT", POP3_STAT, POP3_RELAY, 0, 0 },
	{ "LIST", POP3_LIST, POP3_RELAY, 1, 1 },
	{ "RETR", POP3_RETR, POP3_RELAY, 1, 1 },
	{ "DELE", POP3_DELE, POP3_RELAY, 0, 1 },
	{ "NOOP", POP3_NOOP, POP3_RELAY, 0, 0 },
	{ "RSET", POP3_RSET, POP3_RELAY, 0, 0 },
	{ "TOP", POP3_TOP, POP3_RELAY, 1, 2 },
	{ "UIDL", POP3_UIDL, POP3_RELAY, 1, 1 },
};

/*
 * The proxy forwards a relayed command's line as it is: after the keyword
 * only message numbers (digits, the first at least 1, TOP's line count may be
 * 0) and spaces, then trailing spaces/CRs.  No other byte reaches the server.
 */
static void
check_relayed(const char *line, size_t len, size_t kwlen,
    const struct pop3_cmd *cmd)
{
	const char	*argend = cmd->args + cmd->argslen;
	unsigned long	 v = 0;
	size_t		 i;
	int		 w = 0, digits = 0;

	for (i = kwlen; i < len; i++) {
		if (line + i < argend)
			FUZZ_CHECK(line[i] == ' ' || isdigit((unsigned char)line[i]),
			    "%s: byte 0x%02x relayed", cmd->name,
			    (unsigned char)line[i]);
		else
			FUZZ_CHECK(line[i] == ' ' || line[i] == '\r',
			    "%s: byte 0x%02x after the args", cmd->name,
			    (unsigned char)line[i]);
	}
	for (i = 0; i <= cmd->argslen; i++) {
		if (i < cmd->argslen && cmd->args[i] != ' ') {
			v = v * 10 + (unsigned long)(cmd->args[i] - '0');
			digits++;
			continue;
		}
		if (digits == 0)
			continue;
		FUZZ_CHECK(digits <= 9, "%s: %d-digit number", cmd->name, digits);
		FUZZ_CHECK(v >= 1 || w == 1, "%s: message number 0", cmd->name);
		w++;
		v = 0;
		digits = 0;
	}
	FUZZ_CHECK(w == cmd->nargs, "%s: %d numbers, nargs %d", cmd->name, w,
	    cmd->nargs);
}

static void
check_line(const uint8_t *data, size_t len)
{
	struct pop3_cmd	 cmd;
	const char	*err = NULL, *end;
	char		*line = fuzz_dup(data, len, 0);
	size_t		 i, kwlen;
	int		 r, t = -1;

	r = pop3_parse_command(line, len, &cmd, &err);
	FUZZ_CHECK(r == 0 || r == -1, "returned %d", r);
	if (r == -1) {
		FUZZ_CHECK(err != NULL && err[0] != '\0', "failure without reason");
		FUZZ_CHECK(strlen(err) < 100, "reason too long for a -ERR line");
		free(line);
		return;
	}
	for (i = 0; i < sizeof(table) / sizeof(table[0]); i++)
		if (table[i].id == cmd.id)
			t = (int)i;
	FUZZ_CHECK(t >= 0, "unknown id %d", (int)cmd.id);
	FUZZ_CHECK(cmd.name != NULL && strcmp(cmd.name, table[t].name) == 0,
	    "name %s for %s", cmd.name ? cmd.name : "(null)", table[t].name);
	kwlen = strlen(cmd.name);
	FUZZ_CHECK(len >= kwlen && strncasecmp(line, cmd.name, kwlen) == 0 &&
	    (len == kwlen || line[kwlen] == ' ' || line[kwlen] == '\r'),
	    "keyword of the line is not %s", cmd.name);
	FUZZ_CHECK(memchr(line, '\0', len) == NULL, "NUL accepted");
	FUZZ_CHECK(cmd.disp == table[t].disp, "%s: disposition %d", cmd.name,
	    (int)cmd.disp);
	FUZZ_CHECK(cmd.args != NULL, "%s: args NULL", cmd.name);
	end = line + len;
	if (cmd.argslen > 0) {
		FUZZ_CHECK(cmd.args >= line + kwlen && cmd.args + cmd.argslen <= end,
		    "%s: args outside the line", cmd.name);
		FUZZ_CHECK(cmd.args[0] != ' ', "%s: args not trimmed", cmd.name);
		FUZZ_CHECK(cmd.args[cmd.argslen - 1] != ' ' &&
		    cmd.args[cmd.argslen - 1] != '\r',
		    "%s: trailing space/CR in args", cmd.name);
	}
	FUZZ_CHECK(cmd.nargs >= 0 && cmd.nargs <= table[t].maxargs,
	    "%s: %d args", cmd.name, cmd.nargs);
	FUZZ_CHECK((cmd.nargs == 0) == (cmd.argslen == 0),
	    "%s: nargs %d with argslen %zu", cmd.name, cmd.nargs, cmd.argslen);
	/* the relay's reply tracking rests on this flag */
	FUZZ_CHECK(cmd.multiline == (table[t].multiline &&
	    !((cmd.id == POP3_LIST || cmd.id == POP3_UIDL) && cmd.nargs == 1)),
	    "%s with %d args: multiline %d", cmd.name, cmd.nargs, cmd.multiline);
	switch (cmd.id) {
	case POP3_RETR:
	case POP3_DELE:
	case POP3_TOP:
		FUZZ_CHECK(cmd.nargs == (cmd.id == POP3_TOP ? 2 : 1),
		    "%s: %d args", cmd.name, cmd.nargs);
		break;
	case POP3_USER:
	case POP3_PASS:
		FUZZ_CHECK(cmd.nargs == 1, "%s: no argument", cmd.name);
		break;
	case POP3_APOP:
		FUZZ_CHECK(cmd.nargs == 2, "APOP: %d args", cmd.nargs);
		break;
	default:
		break;
	}
	if (cmd.disp == POP3_RELAY) {
		check_relayed(line, len, kwlen, &cmd);
	} else if (cmd.id != POP3_PASS && cmd.id != POP3_AUTH)
		/* RFC 1939: arguments up to 40 characters (AUTH, PASS exempt) */
		for (i = 0; i < cmd.argslen; i++) {
			size_t	w = 0;

			while (i < cmd.argslen && cmd.args[i] != ' ') {
				i++;
				w++;
			}
			FUZZ_CHECK(w <= POP3_MAX_ARGLEN, "%s: %zu-byte argument",
			    cmd.name, w);
		}
	free(line);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	size_t	start = 0, i, len;

	check_line(data, size);
	/* then line by line, as session_client_read() splits the stream */
	for (i = 0; i < size; i++) {
		if (data[i] != '\n')
			continue;
		len = i - start;
		if (len > 0 && data[start + len - 1] == '\r')
			len--;
		check_line(data + start, len);
		start = i + 1;
	}
	return 0;
}
