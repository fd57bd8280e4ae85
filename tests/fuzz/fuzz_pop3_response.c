/*
 * fuzz_pop3_response: the proxy's reader of what a mail server sends
 * (proxy/pop3_parse.c): pop3_response_status() and pop3_response_code() on
 * every line, the multi-line body scanner pop3_ml_feed(), and
 * pop3_capa_build() on the capability lines.
 *
 * The input is a server's stream after a multi-line command: a status line,
 * then body bytes.  The body is scanned three ways, each restarting the
 * scanner after every terminator as the relay does for the next reply:
 * whole, one byte per call, and in chunks whose sizes come from the input
 * (1 + the chunk's first byte % 64), each chunk an exact-size heap copy.
 * Every call must consume at most its chunk (all of it unless the reply
 * ended), and all three must find the same terminators as a reference
 * scanner written from RFC 1939 (a line that is "." before CRLF or LF).
 */
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "fuzz.h"
#include "pop3_parse.h"

#define MAX_TERMS	4096

struct terms {
	size_t	pos[MAX_TERMS];	/* offset just past each terminator */
	size_t	n;
	size_t	tail;		/* bytes after the last terminator */
};

static struct terms	ref, whole, bytes, split;

/* RFC 1939 section 3, independently of the scanner's state machine. */
static void
reference_scan(const char *b, size_t n, struct terms *t)
{
	size_t	i, start = 0, len;

	t->n = 0;
	for (i = 0; i < n; i++) {
		if (b[i] != '\n')
			continue;
		len = i - start;
		if ((len == 1 && b[start] == '.') ||
		    (len == 2 && b[start] == '.' && b[start + 1] == '\r')) {
			if (t->n < MAX_TERMS)
				t->pos[t->n++] = i + 1;
		}
		start = i + 1;
	}
}

/* Feed b[0..n) in chunks of chunk(pos) bytes (0: all that is left). */
static void
scan(const char *b, size_t n, int mode, struct terms *t)
{
	struct pop3_ml_scan	 sc;
	size_t			 pos = 0, c, r;
	char			*chunk;
	int			 done;

	t->n = 0;
	pop3_ml_init(&sc);
	while (pos < n) {
		if (mode == 0)
			c = n - pos;
		else if (mode == 1)
			c = 1;
		else {
			c = 1 + (unsigned char)b[pos] % 64;
			if (c > n - pos)
				c = n - pos;
		}
		chunk = mode == 0 ? NULL : fuzz_dup((const uint8_t *)b + pos, c, 0);
		done = -1;
		r = pop3_ml_feed(&sc, chunk ? chunk : b + pos, c, &done);
		free(chunk);
		FUZZ_CHECK(done == 0 || done == 1, "done is %d", done);
		FUZZ_CHECK(r <= c, "consumed %zu of a %zu-byte chunk at %zu", r, c,
		    pos);
		FUZZ_CHECK(done || r == c, "consumed %zu of %zu at %zu without "
		    "the end of the reply", r, c, pos);
		FUZZ_CHECK(r > 0, "consumed nothing at %zu", pos);
		pos += r;
		if (done) {
			if (t->n < MAX_TERMS)
				t->pos[t->n++] = pos;
			pop3_ml_init(&sc);
		}
	}
}

static void
compare(const struct terms *a, const struct terms *b, const char *what)
{
	size_t	i;

	for (i = 0; i < a->n && i < b->n; i++)
		FUZZ_CHECK(a->pos[i] == b->pos[i], "%s: terminator %zu at %zu, "
		    "reference at %zu", what, i, b->pos[i], a->pos[i]);
	FUZZ_CHECK(a->n == b->n, "%s: %zu terminators, reference %zu", what,
	    b->n, a->n);
}

static void
check_status_line(const char *data, size_t len, size_t bufsz)
{
	char	*line = fuzz_dup((const uint8_t *)data, len, 0);
	char	*code = malloc(bufsz ? bufsz : 1);
	int	 st, want, r;
	const char	*sp, *open, *close;

	if (code == NULL)
		abort();
	st = pop3_response_status(line, len);
	if (len >= 3 && memcmp(line, "+OK", 3) == 0 && (len == 3 ||
	    line[3] == ' ' || line[3] == '\r' || line[3] == '\n'))
		want = 1;
	else if (len >= 4 && memcmp(line, "-ERR", 4) == 0 && (len == 4 ||
	    line[4] == ' ' || line[4] == '\r' || line[4] == '\n'))
		want = 0;
	else if (len >= 1 && line[0] == '+' && (len == 1 || line[1] == ' ' ||
	    line[1] == '\r' || line[1] == '\n'))
		want = 2;
	else
		want = -1;
	FUZZ_CHECK(st == want, "status %d, expected %d", st, want);

	/* the code: "[...]" right after the first space, fitting bufsz */
	memset(code, 'X', bufsz ? bufsz : 1);
	r = pop3_response_code(line, len, code, bufsz);
	sp = memchr(line, ' ', len);
	open = sp && sp + 1 < line + len && sp[1] == '[' ? sp + 1 : NULL;
	close = open ? memchr(open + 1, ']', line + len - open - 1) : NULL;
	want = close != NULL && close > open + 1 &&
	    (size_t)(close - open - 1) < bufsz;
	FUZZ_CHECK(r == want, "response code found %d, expected %d", r, want);
	if (r) {
		/* the bytes between the brackets (a NUL among them is kept) */
		FUZZ_CHECK(memcmp(code, open + 1, close - open - 1) == 0 &&
		    code[close - open - 1] == '\0', "code %s", code);
	}
	free(code);
	free(line);
}

static const char *const keep[] = {
	"TOP", "UIDL", "RESP-CODES", "EXPIRE", "LOGIN-DELAY",
	"AUTH-RESP-CODE", "UTF8", "LANG",
};
#define CAPA_HEAD	"+OK Capability list follows\r\n"
#define CAPA_TAIL	"USER\r\nSASL PLAIN LOGIN\r\nPIPELINING\r\n" \
			"IMPLEMENTATION tpmail\r\n.\r\n"

static void
check_capa(const char *data, size_t len)
{
	struct pop3_ml_scan	 sc;
	char			*in = fuzz_dup((const uint8_t *)data, len, 1);
	char			*out;
	const char		*p, *eol, *tail;
	size_t			 olen, r, kl, i;
	int			 done, ok;

	out = pop3_capa_build(in);
	FUZZ_CHECK(out != NULL, "pop3_capa_build failed");
	olen = strlen(out);
	FUZZ_CHECK(olen >= strlen(CAPA_HEAD) + strlen(CAPA_TAIL) &&
	    strncmp(out, CAPA_HEAD, strlen(CAPA_HEAD)) == 0,
	    "CAPA reply does not start with +OK (%zu bytes)", olen);
	FUZZ_CHECK(strcmp(out + olen - strlen(CAPA_TAIL), CAPA_TAIL) == 0,
	    "CAPA reply (%zu bytes from %zu of capabilities) does not end "
	    "with its own lines and \".\\r\\n\": ...%s", olen, strlen(in),
	    out + (olen > 40 ? olen - 40 : 0));
	/* a client finds its end exactly there */
	pop3_ml_init(&sc);
	r = pop3_ml_feed(&sc, out + strlen(CAPA_HEAD), olen - strlen(CAPA_HEAD),
	    &done);
	FUZZ_CHECK(done && r == olen - strlen(CAPA_HEAD), "CAPA reply ends "
	    "early: done %d after %zu of %zu", done, r,
	    olen - strlen(CAPA_HEAD));
	/* between head and tail: kept capabilities only, CRLF-terminated */
	tail = out + olen - strlen(CAPA_TAIL);
	for (p = out + strlen(CAPA_HEAD); p < tail; p = eol + 1) {
		eol = memchr(p, '\n', tail - p);
		FUZZ_CHECK(eol != NULL && eol > p && eol[-1] == '\r',
		    "CAPA line not CRLF-terminated");
		for (kl = 0; p + kl < eol - 1 && p[kl] != ' '; kl++)
			;
		for (i = 0, ok = 0; i < sizeof(keep) / sizeof(keep[0]); i++)
			if (strlen(keep[i]) == kl &&
			    strncasecmp(p, keep[i], kl) == 0)
				ok = 1;
		FUZZ_CHECK(ok, "CAPA passes on \"%.*s\"", (int)kl, p);
	}
	free(out);
	free(in);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	const char	*d = (const char *)data, *nl;
	size_t		 i, start, body, n;

	/* status line: up to the first LF, without its CRLF */
	nl = memchr(d, '\n', size);
	body = nl ? (size_t)(nl - d) + 1 : size;
	n = nl ? (size_t)(nl - d) : size;
	if (n > 0 && d[n - 1] == '\r')
		n--;
	check_status_line(d, n, 32);
	check_status_line(d, n < 8 ? n : 8, 32);	/* session.c's peek */
	check_status_line(d, n, size > 0 ? data[size - 1] % 9 : 0);

	/* every other line's status and code, as the login reader sees them */
	for (start = body, i = body; i < size; i++)
		if (d[i] == '\n') {
			n = i - start;
			if (n > 0 && d[n + start - 1] == '\r')
				n--;
			check_status_line(d + start, n, 32);
			start = i + 1;
		}

	/* the body: one reply after another */
	reference_scan(d + body, size - body, &ref);
	scan(d + body, size - body, 0, &whole);
	scan(d + body, size - body, 1, &bytes);
	scan(d + body, size - body, 2, &split);
	compare(&ref, &whole, "whole");
	compare(&ref, &bytes, "byte by byte");
	compare(&ref, &split, "split");

	/* the capability lines the upstream reader collected */
	check_capa(d + body, size - body);
	return 0;
}
