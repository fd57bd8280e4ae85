/*
 * socks5.h: the connectivity proxy's SOCKS5 replies (RFC 1928, with SAP's
 * authentication method 0x80), parsed with no I/O so that they can be
 * unit-tested and fuzzed.
 */
#ifndef TPMAIL_SOCKS5_H
#define TPMAIL_SOCKS5_H

#include <stddef.h>

/* The longest reply: CONNECT with a 255-byte domain name. */
#define SOCKS5_REPLY_MAX	(4 + 1 + 255 + 2)

/* Which reply is expected: each request has exactly one. */
enum socks5_reply {
	SOCKS5_METHOD,		/* method selection: VER 5, METHOD 0x80 */
	SOCKS5_AUTH,		/* 0x80 sub-negotiation: VER 1, STATUS 0 */
	SOCKS5_CONNECT,		/* VER 5, REP, RSV, ATYP, BND.ADDR, BND.PORT */
};

enum socks5_result {
	SOCKS5_NEED_MORE,	/* the bytes so far are a valid beginning */
	SOCKS5_DONE,		/* a successful reply of `consumed` bytes */
	SOCKS5_ERROR,		/* a refusal or a malformed reply */
};

struct socks5_status {
	size_t		 consumed;	/* SOCKS5_DONE: the reply's length */
	int		 code;		/* SOCKS5_ERROR: CONNECT's REP, else -1 */
	const char	*message;	/* SOCKS5_ERROR: what happened */
};

/*
 * Look at the first len bytes received since the request was sent.  The
 * parser keeps no state: call it again with the longer buffer when it
 * says SOCKS5_NEED_MORE.  It decides as soon as the bytes allow, so it
 * never needs more than SOCKS5_REPLY_MAX bytes, and bytes after the reply
 * (the mail server's greeting) are left alone.
 */
enum socks5_result socks5_reply_parse(enum socks5_reply, const unsigned char *,
	    size_t, struct socks5_status *);

/* SAP's meaning of a CONNECT reply code. */
const char	*socks5_reply_name(int);

#endif
