/*
 * test_msg.c: unit tests for the supervisor <-> proxy framing (common/msg.c)
 * over a real socketpair(AF_UNIX, SOCK_SEQPACKET).
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cmocka.h>

#include "msg.h"
#include "proto.h"

struct pair {
	int	sv[2];
};

static int
setup_pair(void **state)
{
	struct pair	*p = calloc(1, sizeof(*p));

	if (p == NULL)
		return -1;
	if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, p->sv) == -1) {
		free(p);
		return -1;
	}
	*state = p;
	return 0;
}

static int
teardown_pair(void **state)
{
	struct pair	*p = *state;

	if (p->sv[0] != -1)
		close(p->sv[0]);
	if (p->sv[1] != -1)
		close(p->sv[1]);
	free(p);
	return 0;
}

static int
count_open_fds(void)
{
	DIR		*d;
	struct dirent	*de;
	int		 n = 0;

	d = opendir("/proc/self/fd");
	assert_non_null(d);
	while ((de = readdir(d)) != NULL)
		if (de->d_name[0] != '.')
			n++;
	closedir(d);
	return n;	/* includes the directory's own fd, in every count */
}

/* Nothing is waiting on the socket. */
static void
assert_nothing_queued(int s)
{
	char	c;

	assert_int_equal(recv(s, &c, 1, MSG_DONTWAIT), -1);
	assert_true(errno == EAGAIN || errno == EWOULDBLOCK);
}

/* Send one raw datagram: header fields, body bytes, and fds. */
static void
send_raw(int s, uint32_t version, uint16_t type, uint32_t hlen,
    const char *body, size_t blen, const int *fds, int nfds)
{
	struct msg_hdr	 hdr;
	struct msghdr	 mh;
	struct iovec	 iov[2];
	union {
		struct cmsghdr	h;
		char		buf[CMSG_SPACE(sizeof(int) * 8)];
	} cb;
	struct cmsghdr	*cmsg;

	assert_true(nfds >= 0 && nfds <= 8);
	memset(&hdr, 0, sizeof(hdr));
	hdr.version = version;
	hdr.type = type;
	hdr.len = hlen;
	hdr.pid = 4242;
	iov[0].iov_base = &hdr;
	iov[0].iov_len = sizeof(hdr);
	iov[1].iov_base = (void *)body;
	iov[1].iov_len = blen;
	memset(&mh, 0, sizeof(mh));
	mh.msg_iov = iov;
	mh.msg_iovlen = 2;
	if (nfds > 0) {
		memset(&cb, 0, sizeof(cb));
		mh.msg_control = cb.buf;
		mh.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
		cmsg = CMSG_FIRSTHDR(&mh);
		cmsg->cmsg_level = SOL_SOCKET;
		cmsg->cmsg_type = SCM_RIGHTS;
		cmsg->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
		memcpy(CMSG_DATA(cmsg), fds, sizeof(int) * nfds);
	}
	assert_int_equal(sendmsg(s, &mh, 0), (ssize_t)(sizeof(hdr) + blen));
}

static void
test_roundtrip_no_fd(void **state)
{
	struct pair	*p = *state;
	struct msg	 m;
	const char	*err = "unset";
	json_t		*body;

	body = json_pack("{s:s,s:i,s:{s:s,s:b},s:[i,i]}", "host", "mail.example",
	    "port", 995, "auth", "user", "alice", "tls", 1, "list", 1, 2);
	assert_non_null(body);
	assert_int_equal(msg_send(p->sv[0], MSG_CONFIG, body, -1), 0);
	assert_int_equal(msg_recv(p->sv[1], &m, &err), 1);
	assert_int_equal(m.type, MSG_CONFIG);
	assert_int_equal(m.pid, getpid());
	assert_int_equal(m.fd, -1);
	assert_non_null(m.body);
	assert_true(json_equal(m.body, body));
	msg_free(&m);
	assert_null(m.body);
	assert_int_equal(m.fd, -1);

	/* an empty object is a valid body, in the other direction too */
	json_decref(body);
	body = json_object();
	assert_int_equal(msg_send(p->sv[1], MSG_READY, body, -1), 0);
	assert_int_equal(msg_recv(p->sv[0], &m, &err), 1);
	assert_int_equal(m.type, MSG_READY);
	assert_true(json_is_object(m.body));
	assert_int_equal(json_object_size(m.body), 0);
	msg_free(&m);
	json_decref(body);
	assert_nothing_queued(p->sv[0]);
	assert_nothing_queued(p->sv[1]);
}

/* Messages keep their boundaries and order. */
static void
test_roundtrip_sequence(void **state)
{
	struct pair	*p = *state;
	struct msg	 m;
	const char	*err;
	json_t		*b;
	int		 i;

	for (i = 0; i < 5; i++) {
		b = json_pack("{s:i}", "seq", i);
		assert_int_equal(msg_send(p->sv[0], MSG_STATS, b, -1), 0);
		json_decref(b);
	}
	for (i = 0; i < 5; i++) {
		assert_int_equal(msg_recv(p->sv[1], &m, &err), 1);
		assert_int_equal(m.type, MSG_STATS);
		assert_int_equal(json_integer_value(json_object_get(m.body,
		    "seq")), i);
		msg_free(&m);
	}
	assert_nothing_queued(p->sv[1]);
}

static void
test_roundtrip_with_fd(void **state)
{
	struct pair	*p = *state;
	struct msg	 m;
	const char	*err = "unset";
	json_t		*body;
	int		 pfd[2], before, flags;
	char		 buf[32];

	assert_int_equal(pipe(pfd), 0);
	body = json_pack("{s:s}", "what", "listen");
	assert_int_equal(msg_send(p->sv[0], MSG_CONFIG, body, pfd[1]), 0);
	json_decref(body);
	/* the sender keeps its own copy; drop it so only the passed one is left */
	assert_int_equal(close(pfd[1]), 0);
	before = count_open_fds();

	assert_int_equal(msg_recv(p->sv[1], &m, &err), 1);
	assert_int_equal(m.type, MSG_CONFIG);
	assert_string_equal(json_string_value(json_object_get(m.body, "what")),
	    "listen");
	assert_true(m.fd >= 0);
	assert_int_equal(count_open_fds(), before + 1);
	/* received close-on-exec, so it cannot leak into an exec'd proxy */
	flags = fcntl(m.fd, F_GETFD);
	assert_true(flags != -1 && (flags & FD_CLOEXEC));

	/* the fd is the pipe's write end: what we write comes out of pfd[0] */
	assert_int_equal(write(m.fd, "through", 7), 7);
	memset(buf, 0, sizeof(buf));
	assert_int_equal(read(pfd[0], buf, sizeof(buf)), 7);
	assert_string_equal(buf, "through");

	/* msg_free closes it: the pipe's last write end is gone, read sees EOF */
	msg_free(&m);
	assert_int_equal(m.fd, -1);
	assert_int_equal(count_open_fds(), before);
	assert_int_equal(read(pfd[0], buf, sizeof(buf)), 0);
	close(pfd[0]);
}

static void
test_recv_eof(void **state)
{
	struct pair	*p = *state;
	struct msg	 m;
	const char	*err = NULL;
	json_t		*b = json_object();

	/* a queued message is still delivered, then end of file */
	assert_int_equal(msg_send(p->sv[0], MSG_HELLO, b, -1), 0);
	json_decref(b);
	close(p->sv[0]);
	p->sv[0] = -1;
	assert_int_equal(msg_recv(p->sv[1], &m, &err), 1);
	assert_int_equal(m.type, MSG_HELLO);
	msg_free(&m);
	assert_int_equal(msg_recv(p->sv[1], &m, &err), 0);
	assert_int_equal(msg_recv(p->sv[1], &m, &err), 0);
}

static void
test_send_to_closed_peer(void **state)
{
	struct pair	*p = *state;
	json_t		*b = json_object();

	close(p->sv[1]);
	p->sv[1] = -1;
	errno = 0;
	/* MSG_NOSIGNAL: an error, not a SIGPIPE that kills the test */
	assert_int_equal(msg_send(p->sv[0], MSG_HELLO, b, -1), -1);
	assert_int_equal(errno, EPIPE);
	json_decref(b);
}

/* A body of `len` bytes once serialised compactly: {"s":"xxx..."} */
static json_t *
body_of_len(size_t len)
{
	char	*s;
	json_t	*b;
	char	*dump;

	assert_true(len >= 8);
	s = malloc(len - 8 + 1);
	assert_non_null(s);
	memset(s, 'x', len - 8);
	s[len - 8] = '\0';
	b = json_pack("{s:s}", "s", s);
	free(s);
	dump = json_dumps(b, JSON_COMPACT);
	assert_int_equal(strlen(dump), len);
	free(dump);
	return b;
}

static void
test_max_body(void **state)
{
	struct pair	*p = *state;
	struct msg	 m;
	const char	*err;
	json_t		*b;

	/* exactly PROTO_MAX_BODY bytes: sent and received whole */
	b = body_of_len(PROTO_MAX_BODY);
	assert_int_equal(msg_send(p->sv[0], MSG_UPDATE, b, -1), 0);
	assert_int_equal(msg_recv(p->sv[1], &m, &err), 1);
	assert_int_equal(m.type, MSG_UPDATE);
	assert_true(json_equal(m.body, b));
	msg_free(&m);
	json_decref(b);

	/* one byte more: refused with EMSGSIZE and nothing is sent */
	b = body_of_len(PROTO_MAX_BODY + 1);
	errno = 0;
	assert_int_equal(msg_send(p->sv[0], MSG_UPDATE, b, -1), -1);
	assert_int_equal(errno, EMSGSIZE);
	json_decref(b);

	b = body_of_len(4 * PROTO_MAX_BODY);
	errno = 0;
	assert_int_equal(msg_send(p->sv[0], MSG_UPDATE, b, -1), -1);
	assert_int_equal(errno, EMSGSIZE);
	json_decref(b);
	assert_nothing_queued(p->sv[1]);
}

/* A datagram larger than any valid message is refused, not half-read. */
static void
test_recv_oversized_datagram(void **state)
{
	struct pair	*p = *state;
	struct msg	 m;
	const char	*err = NULL;
	size_t		 blen = PROTO_MAX_BODY + 100;
	char		*big = malloc(blen);
	int		 pfd[2], before;

	assert_non_null(big);
	memset(big, ' ', blen);
	big[0] = '{';
	big[blen - 1] = '}';
	assert_int_equal(pipe(pfd), 0);
	before = count_open_fds();
	send_raw(p->sv[0], PROTO_VERSION, MSG_CONFIG, blen, big, blen, &pfd[1],
	    1);
	assert_int_equal(msg_recv(p->sv[1], &m, &err), -2);
	assert_non_null(err);
	assert_string_equal(err, "truncated message");
	assert_int_equal(m.fd, -1);
	assert_null(m.body);
	/* the fd that came with it was closed */
	assert_int_equal(count_open_fds(), before);
	close(pfd[1]);
	close(pfd[0]);
	free(big);
	assert_nothing_queued(p->sv[1]);
}

static void
test_two_fds_rejected(void **state)
{
	struct pair	*p = *state;
	struct msg	 m;
	const char	*err = NULL;
	int		 a[2], b[2], fds[2], before;
	char		 c;

	assert_int_equal(pipe(a), 0);
	assert_int_equal(pipe(b), 0);
	fds[0] = a[1];
	fds[1] = b[1];
	before = count_open_fds();
	send_raw(p->sv[0], PROTO_VERSION, MSG_CONFIG, 2, "{}", 2, fds, 2);
	assert_int_equal(msg_recv(p->sv[1], &m, &err), -2);
	assert_string_equal(err, "more than one fd passed");
	assert_int_equal(m.fd, -1);
	assert_null(m.body);
	/* both received copies are closed: nothing leaked */
	assert_int_equal(count_open_fds(), before);
	/* with our own write ends closed too, both pipes read EOF */
	close(a[1]);
	close(b[1]);
	assert_int_equal(read(a[0], &c, 1), 0);
	assert_int_equal(read(b[0], &c, 1), 0);
	close(a[0]);
	close(b[0]);
}

/* More fds than the receiver has room for: refused, none leaked. */
static void
test_many_fds_rejected(void **state)
{
	struct pair	*p = *state;
	struct msg	 m;
	const char	*err = NULL;
	int		 pfd[2], fds[8], before, i;
	char		 c;

	assert_int_equal(pipe(pfd), 0);
	for (i = 0; i < 8; i++)
		fds[i] = pfd[1];
	before = count_open_fds();
	send_raw(p->sv[0], PROTO_VERSION, MSG_CONFIG, 2, "{}", 2, fds, 8);
	assert_int_equal(msg_recv(p->sv[1], &m, &err), -2);
	assert_non_null(err);
	assert_int_equal(m.fd, -1);
	assert_int_equal(count_open_fds(), before);
	close(pfd[1]);
	assert_int_equal(read(pfd[0], &c, 1), 0);
	close(pfd[0]);
	/* the channel still works afterwards */
	send_raw(p->sv[0], PROTO_VERSION, MSG_READY, 2, "{}", 2, NULL, 0);
	assert_int_equal(msg_recv(p->sv[1], &m, &err), 1);
	assert_int_equal(m.type, MSG_READY);
	msg_free(&m);
}

/* A malformed message that carries an fd does not leak the fd. */
static void
test_bad_message_with_fd_closed(void **state)
{
	struct pair	*p = *state;
	struct msg	 m;
	const char	*err = NULL;
	int		 a[2], before;
	char		 c;

	assert_int_equal(pipe(a), 0);
	before = count_open_fds();
	send_raw(p->sv[0], PROTO_VERSION + 1, MSG_CONFIG, 2, "{}", 2, &a[1], 1);
	assert_int_equal(msg_recv(p->sv[1], &m, &err), -2);
	assert_string_equal(err, "protocol version mismatch");
	assert_int_equal(m.fd, -1);
	assert_int_equal(count_open_fds(), before);

	send_raw(p->sv[0], PROTO_VERSION, MSG_CONFIG, 3, "[1]", 3, &a[1], 1);
	assert_int_equal(msg_recv(p->sv[1], &m, &err), -2);
	assert_string_equal(err, "body is not a JSON object");
	assert_int_equal(count_open_fds(), before);

	close(a[1]);
	assert_int_equal(read(a[0], &c, 1), 0);
	close(a[0]);
}

/* A raw datagram that is valid is received like a msg_send one. */
static void
test_recv_raw_valid(void **state)
{
	struct pair	*p = *state;
	struct msg	 m;
	const char	*err = NULL;
	const char	*body = "{\"error\":\"upstream refused\"}";

	send_raw(p->sv[0], PROTO_VERSION, MSG_EVENT, strlen(body), body,
	    strlen(body), NULL, 0);
	assert_int_equal(msg_recv(p->sv[1], &m, &err), 1);
	assert_int_equal(m.type, MSG_EVENT);
	assert_int_equal(m.pid, 4242);
	assert_int_equal(m.fd, -1);
	assert_string_equal(json_string_value(json_object_get(m.body, "error")),
	    "upstream refused");
	msg_free(&m);
}

/* ---- msg_decode on buffers in memory ---- */

static size_t
build(char *buf, uint32_t version, uint32_t type, uint32_t hlen,
    const char *body)
{
	struct msg_hdr	hdr;
	size_t		blen = strlen(body);

	memset(&hdr, 0, sizeof(hdr));
	hdr.version = version;
	hdr.type = type;
	hdr.len = hlen;
	hdr.pid = 77;
	memcpy(buf, &hdr, sizeof(hdr));
	memcpy(buf + sizeof(hdr), body, blen);
	return sizeof(hdr) + blen;
}

static void
expect_decode_error(const char *buf, size_t len, const char *want)
{
	struct msg	 m;
	const char	*err = NULL;

	memset(&m, 0, sizeof(m));
	m.fd = -1;
	assert_int_equal(msg_decode(buf, len, &m, &err), -2);
	assert_non_null(err);
	assert_string_equal(err, want);
	assert_null(m.body);
}

static void
test_decode_valid(void **state)
{
	char		 buf[256];
	size_t		 len;
	struct msg	 m;
	const char	*err = NULL;

	(void)state;
	len = build(buf, PROTO_VERSION, MSG_DRAIN, 11, "{\"grace\":5}");
	memset(&m, 0, sizeof(m));
	m.fd = -1;
	assert_int_equal(msg_decode(buf, len, &m, &err), 1);
	assert_int_equal(m.type, MSG_DRAIN);
	assert_int_equal(m.pid, 77);
	assert_int_equal(json_integer_value(json_object_get(m.body, "grace")), 5);
	msg_free(&m);
}

static void
test_decode_rejects(void **state)
{
	char	buf[256];
	size_t	len, i;

	(void)state;
	/* short header: every length below the header size */
	len = build(buf, PROTO_VERSION, MSG_HELLO, 2, "{}");
	for (i = 0; i < sizeof(struct msg_hdr); i++)
		expect_decode_error(buf, i, "short header");

	/* wrong version */
	len = build(buf, 0, MSG_HELLO, 2, "{}");
	expect_decode_error(buf, len, "protocol version mismatch");
	len = build(buf, PROTO_VERSION + 1, MSG_HELLO, 2, "{}");
	expect_decode_error(buf, len, "protocol version mismatch");

	/* unknown type, including ones between the known ranges */
	len = build(buf, PROTO_VERSION, 0, 2, "{}");
	expect_decode_error(buf, len, "unknown message type");
	len = build(buf, PROTO_VERSION, 107, 2, "{}");
	expect_decode_error(buf, len, "unknown message type");
	len = build(buf, PROTO_VERSION, 199, 2, "{}");
	expect_decode_error(buf, len, "unknown message type");
	len = build(buf, PROTO_VERSION, 205, 2, "{}");
	expect_decode_error(buf, len, "unknown message type");
	len = build(buf, PROTO_VERSION, 0xffff, 2, "{}");
	expect_decode_error(buf, len, "unknown message type");

	/* header length disagrees with the datagram */
	len = build(buf, PROTO_VERSION, MSG_HELLO, 3, "{}");
	expect_decode_error(buf, len, "length mismatch");
	len = build(buf, PROTO_VERSION, MSG_HELLO, 1, "{}");
	expect_decode_error(buf, len, "length mismatch");
	len = build(buf, PROTO_VERSION, MSG_HELLO, 0xffffffffu, "{}");
	expect_decode_error(buf, len, "length mismatch");
	/* trailing garbage after the declared body */
	len = build(buf, PROTO_VERSION, MSG_HELLO, 2, "{}xx");
	expect_decode_error(buf, len, "length mismatch");

	/* a body that is JSON but not an object */
	len = build(buf, PROTO_VERSION, MSG_HELLO, 5, "[1,2]");
	expect_decode_error(buf, len, "body is not a JSON object");

	/* malformed JSON */
	len = build(buf, PROTO_VERSION, MSG_HELLO, 5, "{\"a\":");
	expect_decode_error(buf, len, "malformed JSON body");
	len = build(buf, PROTO_VERSION, MSG_HELLO, 4, "{}{}");
	expect_decode_error(buf, len, "malformed JSON body");
	len = build(buf, PROTO_VERSION, MSG_HELLO, 0, "");
	expect_decode_error(buf, len, "malformed JSON body");
	len = build(buf, PROTO_VERSION, MSG_HELLO, 5, "hello");
	expect_decode_error(buf, len, "malformed JSON body");
	/* duplicate keys are refused, not silently merged */
	len = build(buf, PROTO_VERSION, MSG_HELLO, 13, "{\"a\":1,\"a\":2}");
	expect_decode_error(buf, len, "malformed JSON body");
}

/* A header claiming the maximum plus one is refused even if it matches. */
static void
test_decode_over_max(void **state)
{
	size_t		 blen = PROTO_MAX_BODY + 1, len;
	char		*buf = malloc(sizeof(struct msg_hdr) + blen + 1);
	char		*body = malloc(blen + 1);

	(void)state;
	assert_non_null(buf);
	assert_non_null(body);
	memset(body, ' ', blen);
	body[0] = '{';
	body[blen - 1] = '}';
	body[blen] = '\0';
	len = build(buf, PROTO_VERSION, MSG_CONFIG, blen, body);
	expect_decode_error(buf, len, "length mismatch");
	free(buf);
	free(body);
}

static void
test_type_names(void **state)
{
	(void)state;
	assert_string_equal(msg_type_name(MSG_CONFIG), "CONFIG");
	assert_string_equal(msg_type_name(MSG_UPDATE), "UPDATE");
	assert_string_equal(msg_type_name(MSG_DRAIN), "DRAIN");
	assert_string_equal(msg_type_name(MSG_STATS_REQ), "STATS_REQ");
	assert_string_equal(msg_type_name(MSG_HELLO), "HELLO");
	assert_string_equal(msg_type_name(MSG_READY), "READY");
	assert_string_equal(msg_type_name(MSG_STATS), "STATS");
	assert_string_equal(msg_type_name(MSG_EVENT), "EVENT");
	assert_string_equal(msg_type_name(MSG_CA), "CA");
	assert_string_equal(msg_type_name(MSG_TEST_SYSCALL), "TEST_SYSCALL");
	assert_int_equal(MSG_CONFIG, 100);
	assert_int_equal(MSG_HELLO, 200);
	assert_string_equal(msg_type_name(0), "UNKNOWN");
	assert_string_equal(msg_type_name(-1), "UNKNOWN");
	assert_string_equal(msg_type_name(107), "UNKNOWN");
	assert_string_equal(msg_type_name(150), "UNKNOWN");
	assert_string_equal(msg_type_name(205), "UNKNOWN");
	assert_string_equal(msg_type_name(999), "UNKNOWN");
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test_setup_teardown(test_roundtrip_no_fd,
		    setup_pair, teardown_pair),
		cmocka_unit_test_setup_teardown(test_roundtrip_sequence,
		    setup_pair, teardown_pair),
		cmocka_unit_test_setup_teardown(test_roundtrip_with_fd,
		    setup_pair, teardown_pair),
		cmocka_unit_test_setup_teardown(test_recv_eof,
		    setup_pair, teardown_pair),
		cmocka_unit_test_setup_teardown(test_send_to_closed_peer,
		    setup_pair, teardown_pair),
		cmocka_unit_test_setup_teardown(test_max_body,
		    setup_pair, teardown_pair),
		cmocka_unit_test_setup_teardown(test_recv_oversized_datagram,
		    setup_pair, teardown_pair),
		cmocka_unit_test_setup_teardown(test_two_fds_rejected,
		    setup_pair, teardown_pair),
		cmocka_unit_test_setup_teardown(test_many_fds_rejected,
		    setup_pair, teardown_pair),
		cmocka_unit_test_setup_teardown(test_bad_message_with_fd_closed,
		    setup_pair, teardown_pair),
		cmocka_unit_test_setup_teardown(test_recv_raw_valid,
		    setup_pair, teardown_pair),
		cmocka_unit_test(test_decode_valid),
		cmocka_unit_test(test_decode_rejects),
		cmocka_unit_test(test_decode_over_max),
		cmocka_unit_test(test_type_names),
	};

	return cmocka_run_group_tests(tests, NULL, NULL);
}
