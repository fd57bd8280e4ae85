/*
 * test_pop3_parse.c: unit tests for proxy/pop3_parse.c (command parsing,
 * response classification, multi-line body scanning, CAPA rewriting).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "pop3_parse.h"

#define E_INVALID	"Invalid arguments"
#define E_UNKNOWN	"Unknown command"
#define E_EMPTY		"Empty command"
#define E_NUL		"NUL byte in command"
#define E_TOOLONG	"Argument too long"
#define E_MISSING	"Missing argument"

/* One row: a command line and what the parser must make of it. */
struct cmd_case {
	const char		*line;
	size_t			 len;		/* 0: strlen(line) */
	const char		*err;		/* NULL: must parse */
	enum pop3_cmd_id	 id;
	const char		*name;
	enum pop3_disposition	 disp;
	int			 multiline;
	int			 nargs;
	const char		*args;
};

#define OK(l, i, n, d, ml, na, a) \
	{ (l), 0, NULL, (i), (n), (d), (ml), (na), (a) }
#define BAD(l, e) \
	{ (l), 0, (e), 0, NULL, 0, 0, 0, NULL }

static const struct cmd_case cmd_cases[] = {
	/* keywords are case-insensitive; the canonical name is upper case */
	OK("LIST", POP3_LIST, "LIST", POP3_RELAY, 1, 0, ""),
	OK("list", POP3_LIST, "LIST", POP3_RELAY, 1, 0, ""),
	OK("LiSt", POP3_LIST, "LIST", POP3_RELAY, 1, 0, ""),
	OK("retr 7", POP3_RETR, "RETR", POP3_RELAY, 1, 1, "7"),
	OK("quit", POP3_QUIT, "QUIT", POP3_RELAY, 0, 0, ""),

	/* LIST / UIDL: a message number makes the reply single-line */
	OK("LIST 1", POP3_LIST, "LIST", POP3_RELAY, 0, 1, "1"),
	OK("LIST 123456", POP3_LIST, "LIST", POP3_RELAY, 0, 1, "123456"),
	BAD("LIST 0", E_INVALID),
	BAD("LIST x", E_INVALID),
	BAD("LIST 1 2", E_INVALID),
	OK("UIDL", POP3_UIDL, "UIDL", POP3_RELAY, 1, 0, ""),
	OK("uidl 3", POP3_UIDL, "UIDL", POP3_RELAY, 0, 1, "3"),
	BAD("UIDL 0", E_INVALID),

	/* TOP msg n: message number from 1, line count from 0 */
	OK("TOP 1 0", POP3_TOP, "TOP", POP3_RELAY, 1, 2, "1 0"),
	OK("TOP 2 10", POP3_TOP, "TOP", POP3_RELAY, 1, 2, "2 10"),
	BAD("TOP 1", E_INVALID),
	BAD("TOP", E_INVALID),
	BAD("TOP 0 1", E_INVALID),
	BAD("TOP 1 -1", E_INVALID),
	BAD("TOP 1 x", E_INVALID),
	BAD("TOP 1 2 3", E_INVALID),

	/* RETR / DELE: exactly one message number >= 1 */
	OK("RETR 1", POP3_RETR, "RETR", POP3_RELAY, 1, 1, "1"),
	BAD("RETR 0", E_INVALID),
	BAD("RETR abc", E_INVALID),
	BAD("RETR 1 2", E_INVALID),
	BAD("RETR", E_INVALID),
	BAD("RETR -1", E_INVALID),
	BAD("RETR +1", E_INVALID),
	BAD("RETR 1a", E_INVALID),
	OK("DELE 2", POP3_DELE, "DELE", POP3_RELAY, 0, 1, "2"),
	BAD("DELE", E_INVALID),
	BAD("DELE 0", E_INVALID),

	/* commands without arguments */
	OK("STAT", POP3_STAT, "STAT", POP3_RELAY, 0, 0, ""),
	BAD("STAT 1", E_INVALID),
	BAD("NOOP x", E_INVALID),
	BAD("QUIT now", E_INVALID),
	BAD("CAPA x", E_INVALID),
	BAD("STLS x", E_INVALID),

	/* trailing spaces are not an argument */
	OK("LIST   ", POP3_LIST, "LIST", POP3_RELAY, 1, 0, ""),
	OK("STAT ", POP3_STAT, "STAT", POP3_RELAY, 0, 0, ""),
	OK("RETR 1  ", POP3_RETR, "RETR", POP3_RELAY, 1, 1, "1"),
	OK("TOP  1   0 ", POP3_TOP, "TOP", POP3_RELAY, 1, 2, "1   0"),
	OK("NOOP\r", POP3_NOOP, "NOOP", POP3_RELAY, 0, 0, ""),

	/* unknown and empty */
	BAD("FOO", E_UNKNOWN),
	BAD("LISTX", E_UNKNOWN),
	BAD("LIS", E_UNKNOWN),
	BAD("XTND XMIT", E_UNKNOWN),
	BAD("", E_EMPTY),
	BAD("   ", E_EMPTY),

	/* USER one word, APOP two, PASS the rest of the line */
	OK("USER alice", POP3_USER, "USER", POP3_LOCAL, 0, 1, "alice"),
	BAD("USER", E_INVALID),
	BAD("USER alice bob", E_INVALID),
	OK("PASS secret with  spaces", POP3_PASS, "PASS", POP3_LOCAL, 0, 1,
	    "secret with  spaces"),
	OK("pass x", POP3_PASS, "PASS", POP3_LOCAL, 0, 1, "x"),
	BAD("PASS", E_MISSING),
	BAD("PASS   ", E_MISSING),
	OK("APOP mrose c4c9334bac560ecc979e58001b3e22fb", POP3_APOP, "APOP",
	    POP3_LOCAL, 0, 2, "mrose c4c9334bac560ecc979e58001b3e22fb"),
	BAD("APOP mrose", E_INVALID),
	BAD("APOP a b c", E_INVALID),

	/* AUTH mechanism [initial-response] */
	OK("AUTH PLAIN", POP3_AUTH, "AUTH", POP3_LOCAL, 0, 1, "PLAIN"),
	OK("AUTH PLAIN AGFsaWNlAHNlY3JldA==", POP3_AUTH, "AUTH", POP3_LOCAL, 0,
	    2, "PLAIN AGFsaWNlAHNlY3JldA=="),
	BAD("AUTH PLAIN a b", E_INVALID),

	/* the RFC 1939 40-character argument limit */
	OK("USER 0123456789012345678901234567890123456789", POP3_USER, "USER",
	    POP3_LOCAL, 0, 1, "0123456789012345678901234567890123456789"),
	BAD("USER 01234567890123456789012345678901234567890", E_TOOLONG),
	BAD("APOP u 01234567890123456789012345678901234567890", E_TOOLONG),
	BAD("RETR 00000000000000000000000000000000000000001", E_TOOLONG),

	/* the capability and session commands are answered locally */
	OK("CAPA", POP3_CAPA, "CAPA", POP3_LOCAL, 1, 0, ""),
	OK("STLS", POP3_STLS, "STLS", POP3_LOCAL, 0, 0, ""),
};

static void
check_cmd_case(const struct cmd_case *c)
{
	struct pop3_cmd	 cmd;
	const char	*err = NULL;
	size_t		 len = c->len ? c->len : strlen(c->line);
	int		 r;

	r = pop3_parse_command(c->line, len, &cmd, &err);
	if (c->err != NULL) {
		if (r != -1 || err == NULL || strcmp(err, c->err) != 0)
			fail_msg("\"%s\": expected -1 \"%s\", got %d \"%s\"",
			    c->line, c->err, r, err ? err : "(null)");
		return;
	}
	if (r != 0)
		fail_msg("\"%s\": expected success, got %d \"%s\"", c->line, r,
		    err ? err : "(null)");
	if (cmd.id != c->id || cmd.disp != c->disp ||
	    cmd.multiline != c->multiline || cmd.nargs != c->nargs ||
	    cmd.name == NULL || strcmp(cmd.name, c->name) != 0)
		fail_msg("\"%s\": got id %d name %s disp %d multiline %d nargs "
		    "%d; expected id %d name %s disp %d multiline %d nargs %d",
		    c->line, cmd.id, cmd.name ? cmd.name : "(null)", cmd.disp,
		    cmd.multiline, cmd.nargs, c->id, c->name, c->disp,
		    c->multiline, c->nargs);
	if (cmd.args == NULL || cmd.argslen != strlen(c->args) ||
	    memcmp(cmd.args, c->args, cmd.argslen) != 0)
		fail_msg("\"%s\": args \"%.*s\" (%zu), expected \"%s\"",
		    c->line, cmd.args ? (int)cmd.argslen : 0,
		    cmd.args ? cmd.args : "", cmd.argslen, c->args);
}

static void
test_command_table(void **state)
{
	size_t	i;

	(void)state;
	for (i = 0; i < sizeof(cmd_cases) / sizeof(cmd_cases[0]); i++)
		check_cmd_case(&cmd_cases[i]);
}

/* args points into the caller's line, not into a copy */
static void
test_args_point_into_line(void **state)
{
	const char	*line = "PASS  my secret";
	struct pop3_cmd	 cmd;
	const char	*err = NULL;

	(void)state;
	assert_int_equal(pop3_parse_command(line, strlen(line), &cmd, &err), 0);
	assert_ptr_equal(cmd.args, line + 6);
	assert_int_equal(cmd.argslen, 9);
}

/* Only len bytes are read: the line need not be NUL-terminated. */
static void
test_len_bounds_line(void **state)
{
	const char	*line = "RETR 12XYZ";
	struct pop3_cmd	 cmd;
	const char	*err = NULL;

	(void)state;
	assert_int_equal(pop3_parse_command(line, 7, &cmd, &err), 0);
	assert_int_equal(cmd.id, POP3_RETR);
	assert_int_equal(cmd.argslen, 2);
	assert_memory_equal(cmd.args, "12", 2);
	assert_int_equal(pop3_parse_command(line, 10, &cmd, &err), -1);
	assert_string_equal(err, E_INVALID);
}

static void
test_nul_byte_rejected(void **state)
{
	static const char	 l1[] = "RETR\0 1";
	static const char	 l2[] = "PASS abc\0def";
	static const char	 l3[] = "\0";
	static const char	 l4[] = "NOOP\0";
	struct pop3_cmd		 cmd;
	const char		*err;

	(void)state;
	err = NULL;
	assert_int_equal(pop3_parse_command(l1, sizeof(l1) - 1, &cmd, &err), -1);
	assert_string_equal(err, E_NUL);
	err = NULL;
	assert_int_equal(pop3_parse_command(l2, sizeof(l2) - 1, &cmd, &err), -1);
	assert_string_equal(err, E_NUL);
	err = NULL;
	assert_int_equal(pop3_parse_command(l3, sizeof(l3) - 1, &cmd, &err), -1);
	assert_string_equal(err, E_NUL);
	/* a trailing NUL is still a NUL in the command */
	err = NULL;
	assert_int_equal(pop3_parse_command(l4, sizeof(l4) - 1, &cmd, &err), -1);
	assert_string_equal(err, E_NUL);
}

/* AUTH's initial response is exempt from the 40-character limit. */
static void
test_auth_long_initial_response(void **state)
{
	char		 line[16 + 1000 + 1];
	struct pop3_cmd	 cmd;
	const char	*err = NULL;
	size_t		 len;

	(void)state;
	strcpy(line, "AUTH PLAIN ");
	len = strlen(line);
	memset(line + len, 'A', 1000);
	len += 1000;
	line[len] = '\0';
	assert_int_equal(pop3_parse_command(line, len, &cmd, &err), 0);
	assert_int_equal(cmd.id, POP3_AUTH);
	assert_int_equal(cmd.disp, POP3_LOCAL);
	assert_int_equal(cmd.nargs, 2);
	assert_int_equal(cmd.argslen, 6 + 1000);
	assert_ptr_equal(cmd.args, line + 5);

	/* ...but the same argument on USER is refused */
	memcpy(line, "USER ", 5);
	memset(line + 5, 'A', 1000);
	line[1005] = '\0';
	err = NULL;
	assert_int_equal(pop3_parse_command(line, 1005, &cmd, &err), -1);
	assert_string_equal(err, E_TOOLONG);
}

/* Every command, minimal valid arguments: LOCAL vs RELAY and multi-line. */
static void
test_disposition_each_command(void **state)
{
	static const struct {
		const char		*line;
		enum pop3_cmd_id	 id;
		const char		*name;
		enum pop3_disposition	 disp;
		int			 multiline;
	} t[] = {
		{ "USER u", POP3_USER, "USER", POP3_LOCAL, 0 },
		{ "PASS p", POP3_PASS, "PASS", POP3_LOCAL, 0 },
		{ "APOP u d", POP3_APOP, "APOP", POP3_LOCAL, 0 },
		{ "AUTH PLAIN", POP3_AUTH, "AUTH", POP3_LOCAL, 0 },
		{ "CAPA", POP3_CAPA, "CAPA", POP3_LOCAL, 1 },
		{ "STLS", POP3_STLS, "STLS", POP3_LOCAL, 0 },
		{ "QUIT", POP3_QUIT, "QUIT", POP3_RELAY, 0 },
		{ "STAT", POP3_STAT, "STAT", POP3_RELAY, 0 },
		{ "LIST", POP3_LIST, "LIST", POP3_RELAY, 1 },
		{ "RETR 1", POP3_RETR, "RETR", POP3_RELAY, 1 },
		{ "DELE 1", POP3_DELE, "DELE", POP3_RELAY, 0 },
		{ "NOOP", POP3_NOOP, "NOOP", POP3_RELAY, 0 },
		{ "RSET", POP3_RSET, "RSET", POP3_RELAY, 0 },
		{ "TOP 1 0", POP3_TOP, "TOP", POP3_RELAY, 1 },
		{ "UIDL", POP3_UIDL, "UIDL", POP3_RELAY, 1 },
	};
	struct pop3_cmd	 cmd;
	const char	*err;
	size_t		 i;

	(void)state;
	for (i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
		err = NULL;
		if (pop3_parse_command(t[i].line, strlen(t[i].line), &cmd,
		    &err) != 0)
			fail_msg("\"%s\": %s", t[i].line, err ? err : "?");
		if (cmd.id != t[i].id || strcmp(cmd.name, t[i].name) != 0 ||
		    cmd.disp != t[i].disp || cmd.multiline != t[i].multiline)
			fail_msg("\"%s\": id %d %s disp %d ml %d", t[i].line,
			    cmd.id, cmd.name, cmd.disp, cmd.multiline);
	}
}

static void
test_response_status(void **state)
{
	static const struct {
		const char	*line;
		int		 expect;
	} t[] = {
		{ "+OK", 1 },
		{ "+OK foo", 1 },
		{ "+OK\r\n", 1 },
		{ "+OK 2 320", 1 },
		{ "-ERR", 0 },
		{ "-ERR x", 0 },
		{ "-ERR [AUTH] bad\r\n", 0 },
		{ "+ ", 2 },
		{ "+ dXNlcm5hbWU6", 2 },
		{ "+", 2 },
		{ "+OKAY", -1 },
		{ "-ERROR", -1 },
		{ "-ER", -1 },
		{ "+O", -1 },
		{ "+ok", -1 },
		{ "OK", -1 },
		{ "* OK", -1 },
		{ "", -1 },
	};
	size_t	i;
	int	r;

	(void)state;
	for (i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
		r = pop3_response_status(t[i].line, strlen(t[i].line));
		if (r != t[i].expect)
			fail_msg("\"%s\": %d, expected %d", t[i].line, r,
			    t[i].expect);
	}
	/* the length bounds what is read: "+OKAY" cut to "+OK" is +OK */
	assert_int_equal(pop3_response_status("+OKAY", 3), 1);
	assert_int_equal(pop3_response_status("-ERRx", 4), 0);
	assert_int_equal(pop3_response_status("+OK", 0), -1);
}

static void
test_response_code(void **state)
{
	char		 buf[32];
	const char	*l;

	(void)state;
	l = "-ERR [AUTH] bad";
	memset(buf, 'z', sizeof(buf));
	assert_int_equal(pop3_response_code(l, strlen(l), buf, sizeof(buf)), 1);
	assert_string_equal(buf, "AUTH");

	l = "-ERR [SYS/TEMP] x";
	assert_int_equal(pop3_response_code(l, strlen(l), buf, sizeof(buf)), 1);
	assert_string_equal(buf, "SYS/TEMP");

	l = "+OK [IN-USE]";
	assert_int_equal(pop3_response_code(l, strlen(l), buf, sizeof(buf)), 1);
	assert_string_equal(buf, "IN-USE");

	l = "-ERR no code here";
	assert_int_equal(pop3_response_code(l, strlen(l), buf, sizeof(buf)), 0);
	l = "-ERR";
	assert_int_equal(pop3_response_code(l, strlen(l), buf, sizeof(buf)), 0);
	l = "-ERR ";
	assert_int_equal(pop3_response_code(l, strlen(l), buf, sizeof(buf)), 0);
	l = "-ERR [AUTH bad";
	assert_int_equal(pop3_response_code(l, strlen(l), buf, sizeof(buf)), 0);
	l = "-ERR [";
	assert_int_equal(pop3_response_code(l, strlen(l), buf, sizeof(buf)), 0);
	l = "-ERR [] x";
	assert_int_equal(pop3_response_code(l, strlen(l), buf, sizeof(buf)), 0);
	/* the code must come first, not later in the text */
	l = "-ERR bad [AUTH]";
	assert_int_equal(pop3_response_code(l, strlen(l), buf, sizeof(buf)), 0);
	/* the closing bracket must lie within len */
	l = "-ERR [AUTH] bad";
	assert_int_equal(pop3_response_code(l, 9, buf, sizeof(buf)), 0);

	/* a code that does not fit the buffer is not truncated or overflowed */
	memset(buf, 'z', sizeof(buf));
	l = "-ERR [SYS/TEMP] x";
	assert_int_equal(pop3_response_code(l, strlen(l), buf, 8), 0);
	assert_int_equal(buf[8], 'z');
	assert_int_equal(pop3_response_code(l, strlen(l), buf, 9), 1);
	assert_string_equal(buf, "SYS/TEMP");
	assert_int_equal(buf[9], 'z');
}

/* ---- multi-line scanner ---- */

/*
 * A body as it follows a "+OK" status line: dot-stuffed lines, a "..\r\n"
 * line (an escaped lone dot, not the end), a line with a dot mid-line, an
 * empty line, then the terminator and the next pipelined reply.
 */
static const char ml_body[] =
    "Subject: hi\r\n"
    "\r\n"
    "..x\r\n"
    "..\r\n"
    "a.\r\n"
    ". \r\n"
    ".x.\r\n"
    "last\r\n"
    ".\r\n"
    "+OK next reply\r\n";
#define ML_BODY_LEN	(sizeof(ml_body) - 1)
#define ML_BODY_END	(ML_BODY_LEN - strlen("+OK next reply\r\n"))

/* Feed buf in pieces of the given boundaries; check done only at the end. */
static size_t
ml_feed_split(const char *buf, size_t len, size_t cut, int *done,
    size_t *done_at)
{
	struct pop3_ml_scan	sc;
	size_t			n, total = 0;

	pop3_ml_init(&sc);
	*done = 0;
	*done_at = 0;
	n = pop3_ml_feed(&sc, buf, cut, done);
	assert_true(n <= cut);
	total += n;
	if (*done) {
		*done_at = total;
		return total;
	}
	assert_int_equal(n, cut);
	n = pop3_ml_feed(&sc, buf + cut, len - cut, done);
	assert_true(n <= len - cut);
	total += n;
	if (*done)
		*done_at = total;
	return total;
}

static void
test_ml_whole(void **state)
{
	struct pop3_ml_scan	sc;
	size_t			n;
	int			done = -1;

	(void)state;
	pop3_ml_init(&sc);
	n = pop3_ml_feed(&sc, ml_body, ML_BODY_LEN, &done);
	assert_int_equal(done, 1);
	assert_int_equal(n, ML_BODY_END);
	/* the unconsumed rest is exactly the next reply */
	assert_string_equal(ml_body + n, "+OK next reply\r\n");
}

static void
test_ml_byte_by_byte(void **state)
{
	struct pop3_ml_scan	sc;
	size_t			i, n, total = 0;
	int			done;

	(void)state;
	pop3_ml_init(&sc);
	for (i = 0; i < ML_BODY_LEN; i++) {
		done = -1;
		n = pop3_ml_feed(&sc, ml_body + i, 1, &done);
		assert_int_equal(n, 1);
		total += n;
		if (i + 1 < ML_BODY_END && done != 0)
			fail_msg("done %d after byte %zu of %zu", done, i + 1,
			    (size_t)ML_BODY_END);
		if (done == 1)
			break;
	}
	assert_int_equal(done, 1);
	assert_int_equal(total, ML_BODY_END);
}

static void
test_ml_every_split(void **state)
{
	size_t	cut, total, done_at;
	int	done;

	(void)state;
	for (cut = 0; cut <= ML_BODY_LEN; cut++) {
		total = ml_feed_split(ml_body, ML_BODY_LEN, cut, &done,
		    &done_at);
		if (done != 1 || total != ML_BODY_END || done_at != ML_BODY_END)
			fail_msg("split at %zu: done %d consumed %zu, expected "
			    "done 1 consumed %zu", cut, done, total,
			    (size_t)ML_BODY_END);
	}
}

/* Split at every pair of positions (three reads). */
static void
test_ml_every_double_split(void **state)
{
	struct pop3_ml_scan	sc;
	size_t			a, b, n, total;
	int			done;

	(void)state;
	for (a = 0; a <= ML_BODY_LEN; a++)
		for (b = a; b <= ML_BODY_LEN; b++) {
			pop3_ml_init(&sc);
			total = 0;
			done = 0;
			n = pop3_ml_feed(&sc, ml_body, a, &done);
			total += n;
			if (!done) {
				n = pop3_ml_feed(&sc, ml_body + a, b - a, &done);
				total += n;
			}
			if (!done) {
				n = pop3_ml_feed(&sc, ml_body + b,
				    ML_BODY_LEN - b, &done);
				total += n;
			}
			if (done != 1 || total != ML_BODY_END)
				fail_msg("splits %zu/%zu: done %d consumed %zu",
				    a, b, done, total);
		}
}

static void
test_ml_just_terminator(void **state)
{
	struct pop3_ml_scan	sc;
	int			done = -1;

	(void)state;
	pop3_ml_init(&sc);
	assert_int_equal(pop3_ml_feed(&sc, ".\r\n", 3, &done), 3);
	assert_int_equal(done, 1);

	/* with the next reply pipelined right behind it */
	pop3_ml_init(&sc);
	done = -1;
	assert_int_equal(pop3_ml_feed(&sc, ".\r\n-ERR no\r\n", 12, &done), 3);
	assert_int_equal(done, 1);

	/* and a second body after the first, once re-initialised */
	pop3_ml_init(&sc);
	done = -1;
	assert_int_equal(pop3_ml_feed(&sc, "1 2\r\n.\r\n.\r\n", 11, &done), 8);
	assert_int_equal(done, 1);
}

static void
test_ml_not_terminators(void **state)
{
	static const char *const bodies[] = {
		"..\r\n",
		"..x\r\n",
		". \r\n",
		"x.\r\n",
		"x\r\n.x\r\n",
		".\rx\r\n",
		"..\r\n..\r\n",
		"abc",
		".",
		".\r",
		"x\r\n.\r",
	};
	struct pop3_ml_scan	sc;
	size_t			i;
	int			done;

	(void)state;
	for (i = 0; i < sizeof(bodies) / sizeof(bodies[0]); i++) {
		pop3_ml_init(&sc);
		done = -1;
		if (pop3_ml_feed(&sc, bodies[i], strlen(bodies[i]), &done) !=
		    strlen(bodies[i]) || done != 0)
			fail_msg("body %zu (\"%s\"): done %d", i, bodies[i], done);
	}

	/* ".\r" then "\n" in the next read completes the terminator */
	pop3_ml_init(&sc);
	assert_int_equal(pop3_ml_feed(&sc, "x\r\n.\r", 5, &done), 5);
	assert_int_equal(done, 0);
	assert_int_equal(pop3_ml_feed(&sc, "\nNEXT", 5, &done), 1);
	assert_int_equal(done, 1);

	/* an empty read changes nothing */
	pop3_ml_init(&sc);
	done = -1;
	assert_int_equal(pop3_ml_feed(&sc, "", 0, &done), 0);
	assert_int_equal(done, 0);
}

/* ---- CAPA ---- */

static int
has_line(const char *reply, const char *line)
{
	const char	*p = reply;
	size_t		 l = strlen(line);
	int		 n = 0;

	while (p != NULL && *p != '\0') {
		if (strncmp(p, line, l) == 0 && strncmp(p + l, "\r\n", 2) == 0)
			n++;
		p = strstr(p, "\r\n");
		if (p != NULL)
			p += 2;
	}
	return n;
}

/* +OK first, CRLF only, no line starting with '.', ends with ".\r\n". */
static void
check_multiline_reply(const char *r)
{
	size_t		 len = strlen(r), i;
	const char	*p;

	assert_true(len >= 8);
	assert_memory_equal(r, "+OK", 3);
	assert_true(r[3] == ' ' || r[3] == '\r');
	assert_string_equal(r + len - 5, "\r\n.\r\n");
	for (i = 0; i < len; i++) {
		if (r[i] == '\n' && (i == 0 || r[i - 1] != '\r'))
			fail_msg("bare LF at %zu in:\n%s", i, r);
		if (r[i] == '\r' && r[i + 1] != '\n')
			fail_msg("bare CR at %zu in:\n%s", i, r);
	}
	/* the only line beginning with '.' is the terminator */
	for (p = strstr(r, "\r\n"); p != NULL; p = strstr(p + 2, "\r\n"))
		if (p[2] == '.' && p + 5 != r + len)
			fail_msg("dot line inside the reply:\n%s", r);
	/* the terminator is found by the scanner right at the end */
	{
		struct pop3_ml_scan	 sc;
		const char		*body = strstr(r, "\r\n") + 2;
		int			 done;

		pop3_ml_init(&sc);
		assert_int_equal(pop3_ml_feed(&sc, body, strlen(body), &done),
		    strlen(body));
		assert_int_equal(done, 1);
	}
}

static void
test_capa_build_dovecot(void **state)
{
	const char	*up =
	    "STLS\n"
	    "SASL PLAIN LOGIN\n"
	    "USER\n"
	    "TOP\n"
	    "UIDL\n"
	    "PIPELINING\n"
	    "RESP-CODES\n"
	    "AUTH-RESP-CODE\n"
	    "IMPLEMENTATION Dovecot\n";
	char		*r;

	(void)state;
	r = pop3_capa_build(up);
	assert_non_null(r);
	check_multiline_reply(r);
	/* kept from upstream */
	assert_int_equal(has_line(r, "TOP"), 1);
	assert_int_equal(has_line(r, "UIDL"), 1);
	assert_int_equal(has_line(r, "RESP-CODES"), 1);
	assert_int_equal(has_line(r, "AUTH-RESP-CODE"), 1);
	/* dropped */
	assert_int_equal(has_line(r, "STLS"), 0);
	assert_null(strstr(r, "STLS"));
	assert_null(strstr(r, "Dovecot"));
	/* the proxy's own, each exactly once */
	assert_int_equal(has_line(r, "USER"), 1);
	assert_int_equal(has_line(r, "PIPELINING"), 1);
	assert_int_equal(has_line(r, "SASL PLAIN LOGIN"), 1);
	assert_int_equal(has_line(r, "IMPLEMENTATION tpmail"), 1);
	assert_null(strstr(strstr(r, "IMPLEMENTATION") + 1, "IMPLEMENTATION"));
	free(r);
}

/* CRLF line endings from upstream and a SASL list the proxy must not echo */
static void
test_capa_build_crlf_and_sasl(void **state)
{
	const char	*up =
	    "CAPA\r\n"
	    "top\r\n"
	    "SASL GSSAPI XOAUTH2 PLAIN\r\n"
	    "EXPIRE 30\r\n"
	    "LOGIN-DELAY 900\r\n"
	    "TOPX\r\n"
	    "X-SECRET-EXT\r\n"
	    "IMPLEMENTATION Cyrus v3";
	char		*r;

	(void)state;
	r = pop3_capa_build(up);
	assert_non_null(r);
	check_multiline_reply(r);
	assert_int_equal(has_line(r, "top"), 1);
	assert_int_equal(has_line(r, "EXPIRE 30"), 1);
	assert_int_equal(has_line(r, "LOGIN-DELAY 900"), 1);
	assert_null(strstr(r, "GSSAPI"));
	assert_null(strstr(r, "XOAUTH2"));
	assert_null(strstr(r, "TOPX"));
	assert_null(strstr(r, "X-SECRET-EXT"));
	assert_null(strstr(r, "Cyrus"));
	assert_int_equal(has_line(r, "CAPA"), 0);
	assert_int_equal(has_line(r, "SASL PLAIN LOGIN"), 1);
	free(r);

	/* an upstream without any capability still gives a valid reply */
	r = pop3_capa_build("");
	assert_non_null(r);
	check_multiline_reply(r);
	assert_int_equal(has_line(r, "USER"), 1);
	assert_int_equal(has_line(r, "TOP"), 0);
	free(r);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_command_table),
		cmocka_unit_test(test_args_point_into_line),
		cmocka_unit_test(test_len_bounds_line),
		cmocka_unit_test(test_nul_byte_rejected),
		cmocka_unit_test(test_auth_long_initial_response),
		cmocka_unit_test(test_disposition_each_command),
		cmocka_unit_test(test_response_status),
		cmocka_unit_test(test_response_code),
		cmocka_unit_test(test_ml_whole),
		cmocka_unit_test(test_ml_byte_by_byte),
		cmocka_unit_test(test_ml_every_split),
		cmocka_unit_test(test_ml_every_double_split),
		cmocka_unit_test(test_ml_just_terminator),
		cmocka_unit_test(test_ml_not_terminators),
		cmocka_unit_test(test_capa_build_dovecot),
		cmocka_unit_test(test_capa_build_crlf_and_sasl),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
