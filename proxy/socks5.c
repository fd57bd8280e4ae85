/*
 * socks5.c: the replies of SAP's connectivity proxy to the tenant proxy's
 * SOCKS5 handshake (method selection, the method 0x80 token exchange,
 * CONNECT), parsed from a buffer with no I/O.  A reply is judged as early
 * as its bytes allow: a wrong version or a refusal is an error even if the
 * proxy closes before the rest, so the client learns why.
 * Runs unprivileged inside the sandboxed tenant proxy.
 */
#include <stddef.h>

#include "socks5.h"

#define MSG_MALFORMED	"malformed SOCKS5 reply from the connectivity proxy"
#define MSG_METHOD	"the connectivity proxy refused SOCKS5 authentication " \
			"method 0x80"
#define MSG_AUTH	"the connectivity proxy rejected the tenant's token " \
			"or location id"

/* SAP's meanings of the SOCKS5 reply codes (reference section 4). */
const char *
socks5_reply_name(int rep)
{
	switch (rep) {
	case 1: return "general failure (backend closed the connection)";
	case 2: return "forbidden (no Cloud Connector mapping for the host)";
	case 3: return "network unreachable (Cloud Connector not connected, "
		    "or unknown location id)";
	case 4: return "host unreachable (cannot open the backend)";
	case 5: return "connection refused (authentication failure: token "
		    "rejected)";
	case 7: return "command not supported";
	case 8: return "address type not supported";
	}
	return "unknown reply code";
}

static enum socks5_result
fail(struct socks5_status *st, int code, const char *message)
{
	st->code = code;
	st->message = message;
	return SOCKS5_ERROR;
}

static enum socks5_result
done(struct socks5_status *st, size_t n)
{
	st->consumed = n;
	return SOCKS5_DONE;
}

/* VER REP RSV ATYP BND.ADDR BND.PORT; the address is skipped, not used. */
static enum socks5_result
connect_reply(const unsigned char *b, size_t len, struct socks5_status *st)
{
	size_t	need;

	if (len < 1)
		return SOCKS5_NEED_MORE;
	if (b[0] != 0x05)
		return fail(st, -1, MSG_MALFORMED);
	if (len < 2)
		return SOCKS5_NEED_MORE;
	if (b[1] != 0x00)
		return fail(st, b[1], socks5_reply_name(b[1]));
	/* RSV is ignored: RFC 1928 reserves it, nothing depends on it */
	if (len < 4)
		return SOCKS5_NEED_MORE;
	switch (b[3]) {
	case 0x01:
		need = 4 + 4 + 2;
		break;
	case 0x04:
		need = 4 + 16 + 2;
		break;
	case 0x03:
		if (len < 5)
			return SOCKS5_NEED_MORE;
		need = 4 + 1 + (size_t)b[4] + 2;
		break;
	default:
		return fail(st, -1, MSG_MALFORMED);
	}
	if (len < need)
		return SOCKS5_NEED_MORE;
	return done(st, need);
}

enum socks5_result
socks5_reply_parse(enum socks5_reply which, const unsigned char *b,
    size_t len, struct socks5_status *st)
{
	st->consumed = 0;
	st->code = -1;
	st->message = NULL;
	switch (which) {
	case SOCKS5_METHOD:
		if (len >= 1 && b[0] != 0x05)
			return fail(st, -1, MSG_METHOD);
		if (len < 2)
			return SOCKS5_NEED_MORE;
		if (b[1] != 0x80)	/* 0xff: no acceptable method */
			return fail(st, -1, MSG_METHOD);
		return done(st, 2);
	case SOCKS5_AUTH:
		if (len >= 1 && b[0] != 0x01)
			return fail(st, -1, MSG_AUTH);
		if (len < 2)
			return SOCKS5_NEED_MORE;
		if (b[1] != 0x00)
			return fail(st, -1, MSG_AUTH);
		return done(st, 2);
	case SOCKS5_CONNECT:
		return connect_reply(b, len, st);
	}
	return fail(st, -1, MSG_MALFORMED);
}
