/*
 * fuzz_socks5_reply: the tenant proxy's reader of the connectivity proxy's
 * SOCKS5 replies (proxy/socks5.c): method selection, SAP's method 0x80
 * sub-negotiation, CONNECT with any bound address.
 *
 * The input is what the connectivity proxy sends after the tenant proxy's
 * method request, read as upstream.c reads it: the three replies in turn,
 * each parsed again on every read that grows the buffer.  Reads are split
 * at input-chosen points (1 + the read's first byte % 16), each buffer an
 * exact-size heap copy.  Every verdict must match a reference decision
 * written from RFC 1928 and SAP's reference: the same result, the same
 * length consumed, the same reply code, and a verdict reached on the
 * shortest buffer that decides it, never changed by more bytes.
 */
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "socks5.h"

/* What a reply must give, and how many bytes are needed to know it. */
struct verdict {
	enum socks5_result	 res;
	size_t			 at;	/* buffer length that decides */
	size_t			 len;	/* DONE: the reply's length */
	int			 code;	/* ERROR: CONNECT's REP, else -1 */
};

/* From the specs: the length of a reply, then where it goes wrong. */
static struct verdict
reference(enum socks5_reply which, const unsigned char *b, size_t n)
{
	struct verdict	v = { SOCKS5_NEED_MORE, 0, 0, -1 };
	size_t		addr;

	if (which == SOCKS5_METHOD || which == SOCKS5_AUTH) {
		unsigned char	ver = which == SOCKS5_METHOD ? 5 : 1;
		unsigned char	ok = which == SOCKS5_METHOD ? 0x80 : 0;

		if (n >= 1 && b[0] != ver)
			return (struct verdict){ SOCKS5_ERROR, 1, 0, -1 };
		if (n < 2)
			return v;
		if (b[1] != ok)
			return (struct verdict){ SOCKS5_ERROR, 2, 0, -1 };
		return (struct verdict){ SOCKS5_DONE, 2, 2, -1 };
	}
	if (n >= 1 && b[0] != 5)
		return (struct verdict){ SOCKS5_ERROR, 1, 0, -1 };
	if (n >= 2 && b[1] != 0)
		return (struct verdict){ SOCKS5_ERROR, 2, 0, b[1] };
	if (n < 4)
		return v;
	if (b[3] == 1)
		addr = 4;
	else if (b[3] == 4)
		addr = 16;
	else if (b[3] == 3) {
		if (n < 5)
			return v;
		addr = 1 + (size_t)b[4];
	} else
		return (struct verdict){ SOCKS5_ERROR, 4, 0, -1 };
	if (n < 4 + addr + 2)
		return v;
	return (struct verdict){ SOCKS5_DONE, 4 + addr + 2, 4 + addr + 2, -1 };
}

static enum socks5_result
parse(enum socks5_reply which, const unsigned char *b, size_t n,
    struct socks5_status *st)
{
	char			*copy = fuzz_dup(b, n, 0);
	enum socks5_result	 r;

	r = socks5_reply_parse(which, (const unsigned char *)copy, n, st);
	free(copy);
	return r;
}

static void
check(enum socks5_reply which, const unsigned char *b, size_t n,
    enum socks5_result r, const struct socks5_status *st)
{
	struct verdict	v = reference(which, b, n);

	FUZZ_CHECK(r == v.res, "reply %d, %zu bytes: result %d, reference %d",
	    which, n, r, v.res);
	FUZZ_CHECK(r != SOCKS5_NEED_MORE || n < SOCKS5_REPLY_MAX, "reply %d: "
	    "more than %d bytes needed", which, SOCKS5_REPLY_MAX);
	if (r == SOCKS5_DONE) {
		FUZZ_CHECK(st->consumed == v.len && st->consumed <= n,
		    "reply %d: consumed %zu of %zu, reference %zu", which,
		    st->consumed, n, v.len);
		FUZZ_CHECK(st->consumed <= SOCKS5_REPLY_MAX, "consumed %zu",
		    st->consumed);
	}
	if (r == SOCKS5_ERROR) {
		FUZZ_CHECK(st->message != NULL && st->message[0] != '\0',
		    "reply %d: an error without a message", which);
		FUZZ_CHECK(st->code == v.code, "reply %d: code %d, reference %d",
		    which, st->code, v.code);
		FUZZ_CHECK(st->code == -1 || (st->code > 0 && st->code < 256 &&
		    strcmp(st->message, socks5_reply_name(st->code)) == 0),
		    "code %d, message %s", st->code, st->message);
	}
}

/* Every shorter buffer asks for more; the deciding one and longer agree. */
static void
check_prefixes(enum socks5_reply which, const unsigned char *b, size_t n)
{
	struct socks5_status	st;
	struct verdict		v = reference(which, b, n);
	size_t			i;

	if (v.res == SOCKS5_NEED_MORE)
		return;
	for (i = 0; i <= n && i <= v.at + 1; i++) {
		enum socks5_result	r = parse(which, b, i, &st);

		if (i < v.at)
			FUZZ_CHECK(r == SOCKS5_NEED_MORE, "reply %d decided "
			    "(%d) at %zu bytes, reference at %zu", which, r, i,
			    v.at);
		else
			check(which, b, i, r, &st);
	}
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const enum socks5_reply	seq[] = {
		SOCKS5_METHOD, SOCKS5_AUTH, SOCKS5_CONNECT
	};
	struct socks5_status	st;
	enum socks5_result	r = SOCKS5_NEED_MORE;
	size_t			start = 0, have = 0, step, i;

	/* the handshake: each reply from where the last one ended */
	for (i = 0; i < 3; i++) {
		check_prefixes(seq[i], data + start, size - start);
		for (;;) {
			r = parse(seq[i], data + start, have, &st);
			check(seq[i], data + start, have, r, &st);
			if (r != SOCKS5_NEED_MORE || start + have == size)
				break;
			/* the next read */
			step = 1 + data[start + have] % 16;
			if (step > size - start - have)
				step = size - start - have;
			have += step;
		}
		if (r != SOCKS5_DONE)
			break;
		start += st.consumed;
		have -= st.consumed;
	}
	/* each reply alone, as if the handshake had reached it */
	for (i = 1; i < 3 && size > 0; i++) {
		r = parse(seq[i], data, size, &st);
		check(seq[i], data, size, r, &st);
	}
	return 0;
}
