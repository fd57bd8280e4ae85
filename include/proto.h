/*
 * proto.h: the supervisor <-> tenant proxy channel, the one contract between
 * tpmaild and tpmail-pop3.
 *
 * Launch contract.  tpmaild creates socketpair(AF_UNIX, SOCK_SEQPACKET) with
 * CLOEXEC, forks, and in the child moves its end to fd PROTO_CHANNEL_FD
 * (3), keeps stderr, closes every other fd and execs tpmail-pop3 with only
 * the service identity in argv ("tpmail-pop3 <namespace>/<service>") and an
 * empty environment.  The child sends MSG_HELLO; the parent answers with one
 * MSG_CONFIG whose single SCM_RIGHTS fd is the already-bound listening
 * socket and whose JSON body holds the upstream, the credentials and the
 * limits.  Nothing else ever carries a secret: not argv, not the
 * environment.  End of file on the channel makes the child stop accepting,
 * finish its sessions and exit.
 *
 * Each message is one datagram: struct msg_hdr, then hdr.len bytes of JSON
 * (a single object).  Every message carries PROTO_VERSION; a mismatch is
 * fatal in the child and kills the child in the parent.
 */
#ifndef TPMAIL_PROTO_H
#define TPMAIL_PROTO_H

#include <stdint.h>

#define PROTO_VERSION		1
#define PROTO_CHANNEL_FD	3
#define PROTO_MAX_BODY		(60 * 1024)	/* one datagram, header included < 64 KiB */

/* Message types in ranges: 1xx parent -> child, 2xx child -> parent. */
enum msg_type {
	MSG_CONFIG = 100,	/* body: service config; fd: listen socket */
	MSG_UPDATE = 101,	/* body: new config for new sessions; no fd */
	MSG_DRAIN = 102,	/* body: {"grace": seconds} stop accepting, finish, exit */
	MSG_STATS_REQ = 103,	/* body: {} ask for MSG_STATS */
	MSG_CA = 104,		/* body: {"source"}; fd: PEM trust store to read,
				   for the CONFIG/UPDATE that follows */
	MSG_LOG_LEVEL = 105,	/* body: {"log_level": "debug"|...} */
	MSG_EXCHANGED = 106,	/* body: {"session", "token" | "error"} */
	MSG_TEST_SYSCALL = 190,	/* test builds only: {"syscall": name} */

	MSG_HELLO = 200,	/* body: {"pid": n} */
	MSG_READY = 201,	/* body: {"sandbox": report} serving */
	MSG_STATS = 202,	/* body: {"active","total","failed"} counters */
	MSG_EVENT = 203,	/* body: {"error": "..."} a session-level failure */
	MSG_EXCHANGE = 204,	/* body: {"session", "kind": "refresh"|"code",
				   "user", "value"}: a client's token to swap */
};

struct msg_hdr {
	uint32_t	version;
	uint16_t	type;
	uint16_t	flags;
	uint32_t	len;	/* bytes of JSON after the header */
	uint32_t	pid;	/* sender */
};

const char	*msg_type_name(int);

#endif
