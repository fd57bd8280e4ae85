/*
 * test_socks5.c: unit tests for proxy/socks5.c, the connectivity proxy's
 * SOCKS5 replies: every reply code, every address type, and every way a
 * reply can be split across reads.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "socks5.h"

#define M_METHOD	"the connectivity proxy refused SOCKS5 authentication " \
			"method 0x80"
#define M_AUTH		"the connectivity proxy rejected the tenant's token " \
			"or location id"
#define M_MALFORMED	"malformed SOCKS5 reply from the connectivity proxy"

static enum socks5_result
parse(enum socks5_reply which, const char *b, size_t len,
    struct socks5_status *st)
{
	unsigned char	*copy = malloc(len ? len : 1);	/* ASan: no overread */
	enum socks5_result r;

	assert_non_null(copy);
	memcpy(copy, b, len);
	r = socks5_reply_parse(which, copy, len, st);
	free(copy);
	return r;
}

/*
 * The whole reply must give `want`, and so must every longer buffer; every
 * prefix shorter than `decided` bytes must ask for more, as a read split
 * anywhere in the reply would see it.
 */
static void
check_splits(enum socks5_reply which, const char *b, size_t len,
    size_t decided, enum socks5_result want, size_t consumed, int code,
    const char *message)
{
	struct socks5_status	st;
	char			buf[SOCKS5_REPLY_MAX + 16];
	size_t			i;

	assert_true(len + 3 <= sizeof(buf));
	for (i = 0; i < decided; i++)
		assert_int_equal(parse(which, b, i, &st), SOCKS5_NEED_MORE);
	/* what follows the reply (the greeting) must not change the verdict */
	memcpy(buf, b, len);
	memcpy(buf + len, "+OK", 3);
	for (i = decided; i <= len + 3; i++) {
		assert_int_equal(parse(which, buf, i, &st), want);
		if (want == SOCKS5_DONE)
			assert_int_equal(st.consumed, consumed);
		else {
			assert_int_equal(st.code, code);
			assert_string_equal(st.message, message);
		}
	}
}

static void
test_method_accepted(void **state)
{
	check_splits(SOCKS5_METHOD, "\x05\x80", 2, 2, SOCKS5_DONE, 2, 0, NULL);
}

static void
test_method_refused(void **state)
{
	/* 0xff: no acceptable method; 0x00: a proxy that ignores 0x80 */
	check_splits(SOCKS5_METHOD, "\x05\xff", 2, 2, SOCKS5_ERROR, 0, -1,
	    M_METHOD);
	check_splits(SOCKS5_METHOD, "\x05\x00", 2, 2, SOCKS5_ERROR, 0, -1,
	    M_METHOD);
	/* not SOCKS5 at all: known from the first byte */
	check_splits(SOCKS5_METHOD, "\x04\x80", 2, 1, SOCKS5_ERROR, 0, -1,
	    M_METHOD);
	check_splits(SOCKS5_METHOD, "HTTP/1.1 400", 12, 1, SOCKS5_ERROR, 0, -1,
	    M_METHOD);
}

static void
test_auth(void **state)
{
	check_splits(SOCKS5_AUTH, "\x01\x00", 2, 2, SOCKS5_DONE, 2, 0, NULL);
	check_splits(SOCKS5_AUTH, "\x01\x01", 2, 2, SOCKS5_ERROR, 0, -1,
	    M_AUTH);
	check_splits(SOCKS5_AUTH, "\x01\xff", 2, 2, SOCKS5_ERROR, 0, -1,
	    M_AUTH);
	check_splits(SOCKS5_AUTH, "\x05\x00", 2, 1, SOCKS5_ERROR, 0, -1,
	    M_AUTH);
}

static void
test_connect_ipv4(void **state)
{
	check_splits(SOCKS5_CONNECT, "\x05\x00\x00\x01\x0a\x00\x00\x07\x00\x6e",
	    10, 10, SOCKS5_DONE, 10, 0, NULL);
	/* RSV is not checked */
	check_splits(SOCKS5_CONNECT, "\x05\x00\x2a\x01\x00\x00\x00\x00\x00\x00",
	    10, 10, SOCKS5_DONE, 10, 0, NULL);
}

static void
test_connect_ipv6(void **state)
{
	check_splits(SOCKS5_CONNECT, "\x05\x00\x00\x04"
	    "\x20\x01\x0d\xb8\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01"
	    "\x01\xbb", 22, 22, SOCKS5_DONE, 22, 0, NULL);
}

static void
test_connect_domain(void **state)
{
	char	b[4 + 1 + 255 + 2];

	check_splits(SOCKS5_CONNECT, "\x05\x00\x00\x03\x0bvirtual-host\x00\x6e",
	    18, 18, SOCKS5_DONE, 18, 0, NULL);
	/* an empty name and the longest one */
	check_splits(SOCKS5_CONNECT, "\x05\x00\x00\x03\x00\x00\x00", 7, 7,
	    SOCKS5_DONE, 7, 0, NULL);
	memcpy(b, "\x05\x00\x00\x03\xff", 5);
	memset(b + 5, 'h', 255);
	memcpy(b + 260, "\x00\x6e", 2);
	check_splits(SOCKS5_CONNECT, b, sizeof(b), sizeof(b), SOCKS5_DONE,
	    sizeof(b), 0, NULL);
	assert_int_equal(sizeof(b), SOCKS5_REPLY_MAX);
}

/* Every reply code SAP defines, and some it does not. */
static void
test_connect_reply_codes(void **state)
{
	static const struct {
		int		 rep;
		const char	*name;
	} codes[] = {
		{ 1, "general failure (backend closed the connection)" },
		{ 2, "forbidden (no Cloud Connector mapping for the host)" },
		{ 3, "network unreachable (Cloud Connector not connected, or "
		    "unknown location id)" },
		{ 4, "host unreachable (cannot open the backend)" },
		{ 5, "connection refused (authentication failure: token "
		    "rejected)" },
		{ 6, "unknown reply code" },
		{ 7, "command not supported" },
		{ 8, "address type not supported" },
		{ 9, "unknown reply code" },
		{ 255, "unknown reply code" },
	};
	char	b[10] = "\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00";
	size_t	i;

	for (i = 0; i < sizeof(codes) / sizeof(codes[0]); i++) {
		b[1] = (char)codes[i].rep;
		/* known at the second byte: a proxy may close right after */
		check_splits(SOCKS5_CONNECT, b, sizeof(b), 2, SOCKS5_ERROR, 0,
		    codes[i].rep, codes[i].name);
		assert_string_equal(socks5_reply_name(codes[i].rep),
		    codes[i].name);
	}
}

static void
test_connect_malformed(void **state)
{
	/* wrong version, known at once */
	check_splits(SOCKS5_CONNECT, "\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00",
	    10, 1, SOCKS5_ERROR, 0, -1, M_MALFORMED);
	/* unknown address types, known at the fourth byte */
	check_splits(SOCKS5_CONNECT, "\x05\x00\x00\x00\x00\x00\x00\x00\x00\x00",
	    10, 4, SOCKS5_ERROR, 0, -1, M_MALFORMED);
	check_splits(SOCKS5_CONNECT, "\x05\x00\x00\x02\x00\x00\x00\x00\x00\x00",
	    10, 4, SOCKS5_ERROR, 0, -1, M_MALFORMED);
	check_splits(SOCKS5_CONNECT, "\x05\x00\x00\xff\x00\x00\x00\x00\x00\x00",
	    10, 4, SOCKS5_ERROR, 0, -1, M_MALFORMED);
}

/* A whole handshake's replies in one buffer, read one after the other. */
static void
test_replies_back_to_back(void **state)
{
	static const char	b[] = "\x05\x80" "\x01\x00"
	    "\x05\x00\x00\x03\x04host\x00\x6e" "+OK ready\r\n";
	static const enum socks5_reply	seq[] = {
		SOCKS5_METHOD, SOCKS5_AUTH, SOCKS5_CONNECT
	};
	struct socks5_status	st;
	size_t			off = 0, i;

	for (i = 0; i < 3; i++) {
		assert_int_equal(parse(seq[i], b + off, sizeof(b) - 1 - off,
		    &st), SOCKS5_DONE);
		off += st.consumed;
	}
	assert_int_equal(off, 2 + 2 + 11);
	assert_string_equal(b + off, "+OK ready\r\n");
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_method_accepted),
		cmocka_unit_test(test_method_refused),
		cmocka_unit_test(test_auth),
		cmocka_unit_test(test_connect_ipv4),
		cmocka_unit_test(test_connect_ipv6),
		cmocka_unit_test(test_connect_domain),
		cmocka_unit_test(test_connect_reply_codes),
		cmocka_unit_test(test_connect_malformed),
		cmocka_unit_test(test_replies_back_to_back),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
