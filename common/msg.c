/*
 * msg.c: supervisor <-> proxy framing.  One SOCK_SEQPACKET datagram per
 * message: struct msg_hdr, a JSON object, and at most one fd passed with
 * SCM_RIGHTS.  Used by both the privileged supervisor and the sandboxed
 * proxy; the decoder trusts nothing and consumes every byte or fails.
 */
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include "msg.h"
#include "secret.h"

const char *
msg_type_name(int type)
{
	switch (type) {
	case MSG_CONFIG: return "CONFIG";
	case MSG_UPDATE: return "UPDATE";
	case MSG_DRAIN: return "DRAIN";
	case MSG_STATS_REQ: return "STATS_REQ";
	case MSG_CA: return "CA";
	case MSG_LOG_LEVEL: return "LOG_LEVEL";
	case MSG_EXCHANGED: return "EXCHANGED";
	case MSG_EXCHANGE: return "EXCHANGE";
	case MSG_TEST_SYSCALL: return "TEST_SYSCALL";
	case MSG_HELLO: return "HELLO";
	case MSG_READY: return "READY";
	case MSG_STATS: return "STATS";
	case MSG_EVENT: return "EVENT";
	}
	return "UNKNOWN";
}

static int
msg_type_valid(int type)
{
	return strcmp(msg_type_name(type), "UNKNOWN") != 0;
}

int
msg_send(int sock, int type, json_t *body, int fd)
{
	struct msg_hdr	 hdr;
	struct msghdr	 mh;
	struct iovec	 iov[2];
	union {
		struct cmsghdr	hdr;
		char		buf[CMSG_SPACE(sizeof(int))];
	} cmsgbuf;
	struct cmsghdr	*cmsg;
	char		*json;
	size_t		 len;
	ssize_t		 n;
	int		 saved;

	/* The body may hold credentials: the serialised copy is wiped below. */
	json = json_dumps(body, JSON_COMPACT);
	if (json == NULL) {
		errno = ENOMEM;
		return -1;
	}
	len = strlen(json);
	if (len > PROTO_MAX_BODY) {
		secret_free(json);
		errno = EMSGSIZE;
		return -1;
	}
	memset(&hdr, 0, sizeof(hdr));
	hdr.version = PROTO_VERSION;
	hdr.type = type;
	hdr.len = len;
	hdr.pid = getpid();

	iov[0].iov_base = &hdr;
	iov[0].iov_len = sizeof(hdr);
	iov[1].iov_base = json;
	iov[1].iov_len = len;
	memset(&mh, 0, sizeof(mh));
	mh.msg_iov = iov;
	mh.msg_iovlen = 2;
	if (fd >= 0) {
		memset(&cmsgbuf, 0, sizeof(cmsgbuf));
		mh.msg_control = cmsgbuf.buf;
		mh.msg_controllen = sizeof(cmsgbuf.buf);
		cmsg = CMSG_FIRSTHDR(&mh);
		cmsg->cmsg_level = SOL_SOCKET;
		cmsg->cmsg_type = SCM_RIGHTS;
		cmsg->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
	}
	do {
		n = sendmsg(sock, &mh, MSG_NOSIGNAL);
	} while (n == -1 && errno == EINTR);
	saved = errno;
	secret_free(json);
	errno = saved;
	if (n == -1)
		return -1;
	if ((size_t)n != sizeof(hdr) + len) {
		errno = EMSGSIZE;
		return -1;
	}
	return 0;
}

int
msg_decode(const void *buf, size_t len, struct msg *m, const char **err)
{
	struct msg_hdr	 hdr;
	json_error_t	 jerr;
	json_t		*body;

	if (len < sizeof(hdr)) {
		*err = "short header";
		return -2;
	}
	memcpy(&hdr, buf, sizeof(hdr));
	if (hdr.version != PROTO_VERSION) {
		*err = "protocol version mismatch";
		return -2;
	}
	if (!msg_type_valid(hdr.type)) {
		*err = "unknown message type";
		return -2;
	}
	if (hdr.len != len - sizeof(hdr) || hdr.len > PROTO_MAX_BODY) {
		*err = "length mismatch";
		return -2;
	}
	body = json_loadb((const char *)buf + sizeof(hdr), hdr.len,
	    JSON_REJECT_DUPLICATES, &jerr);
	if (body == NULL) {
		*err = "malformed JSON body";
		return -2;
	}
	if (!json_is_object(body)) {
		json_decref(body);
		*err = "body is not a JSON object";
		return -2;
	}
	m->type = hdr.type;
	m->pid = hdr.pid;
	m->body = body;
	return 1;
}

int
msg_recv(int sock, struct msg *m, const char **err)
{
	static char	 buf[sizeof(struct msg_hdr) + PROTO_MAX_BODY + 1];
	struct msghdr	 mh;
	struct iovec	 iov;
	union {
		struct cmsghdr	hdr;
		char		buf[CMSG_SPACE(sizeof(int) * 4)];
	} cmsgbuf;
	struct cmsghdr	*cmsg;
	ssize_t		 n;
	int		 fd = -1, r, nfds, i, fds[4];

	memset(m, 0, sizeof(*m));
	m->fd = -1;
	*err = NULL;
	iov.iov_base = buf;
	iov.iov_len = sizeof(buf);
	memset(&mh, 0, sizeof(mh));
	mh.msg_iov = &iov;
	mh.msg_iovlen = 1;
	mh.msg_control = cmsgbuf.buf;
	mh.msg_controllen = sizeof(cmsgbuf.buf);
	do {
		n = recvmsg(sock, &mh, MSG_CMSG_CLOEXEC);
	} while (n == -1 && errno == EINTR);
	if (n == -1)
		return -1;
	if (n == 0)
		return 0;

	/* Take every fd first so that none leaks whatever else is wrong. */
	for (cmsg = CMSG_FIRSTHDR(&mh); cmsg != NULL;
	    cmsg = CMSG_NXTHDR(&mh, cmsg)) {
		if (cmsg->cmsg_level != SOL_SOCKET ||
		    cmsg->cmsg_type != SCM_RIGHTS)
			continue;
		nfds = (cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int);
		memcpy(fds, CMSG_DATA(cmsg), nfds * sizeof(int));
		for (i = 0; i < nfds; i++) {
			if (fd == -1)
				fd = fds[i];
			else {
				close(fds[i]);
				*err = "more than one fd passed";
			}
		}
	}
	if (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC))
		*err = "truncated message";
	if (*err != NULL) {
		if (fd != -1)
			close(fd);
		secret_wipe(buf, n);
		return -2;
	}
	r = msg_decode(buf, n, m, err);
	secret_wipe(buf, n);
	if (r != 1) {
		if (fd != -1)
			close(fd);
		return r;
	}
	m->fd = fd;
	return 1;
}

void
msg_free(struct msg *m)
{
	if (m->body != NULL)
		json_decref(m->body);
	m->body = NULL;
	if (m->fd != -1)
		close(m->fd);
	m->fd = -1;
}
