/*
 * fuzz_msg_decode: msg_decode() (common/msg.c), the decoder of every
 * datagram on the supervisor <-> tenant proxy channel.  A compromised
 * tenant proxy controls these bytes and the privileged tpmaild parses
 * them, so the input is one whole datagram: struct msg_hdr (little-endian
 * u32 version, u16 type, u16 flags, u32 len, u32 pid) and the JSON body.
 *
 * Checked: success only for version 1, a known type, an exact length and a
 * JSON object; a failure always says why; the decoded body, sent back as
 * msg_send() would serialise it, decodes to an equal message.
 */
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "msg.h"
#include "log.h"
#include "secret.h"

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	log_init("fuzz_msg_decode", LOG_LEVEL_ERROR);
	secret_install();		/* as tpmaild and tpmail-pop3 do */
	return 0;
}

static void
round_trip(const struct msg *m)
{
	struct msg_hdr	 hdr;
	struct msg	 m2;
	const char	*err = NULL;
	char		*json, *buf;
	size_t		 len;
	int		 r;

	if ((json = json_dumps(m->body, JSON_COMPACT)) == NULL)
		abort();
	len = strlen(json);
	if (len > PROTO_MAX_BODY) {	/* msg_send refuses it */
		free(json);
		return;
	}
	memset(&hdr, 0, sizeof(hdr));
	hdr.version = PROTO_VERSION;
	hdr.type = (uint16_t)m->type;
	hdr.len = (uint32_t)len;
	hdr.pid = (uint32_t)m->pid;
	if ((buf = malloc(sizeof(hdr) + len)) == NULL)
		abort();
	memcpy(buf, &hdr, sizeof(hdr));
	memcpy(buf + sizeof(hdr), json, len);
	memset(&m2, 0, sizeof(m2));
	m2.fd = -1;
	r = msg_decode(buf, sizeof(hdr) + len, &m2, &err);
	FUZZ_CHECK(r == 1, "re-encoded message refused: %s: %s",
	    err ? err : "?", json);
	FUZZ_CHECK(m2.type == m->type && m2.pid == m->pid,
	    "type/pid changed in the round trip");
	FUZZ_CHECK(json_equal(m->body, m2.body), "body changed: %s", json);
	msg_free(&m2);
	free(buf);
	free(json);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct msg_hdr	 hdr;
	struct msg	 m;
	const char	*err = NULL;
	char		*buf = fuzz_dup(data, size, 0);
	int		 r;

	memset(&m, 0, sizeof(m));
	m.fd = -1;			/* msg_recv sets it; msg_free closes it */
	r = msg_decode(buf, size, &m, &err);
	FUZZ_CHECK(r == 1 || r == -2, "msg_decode returned %d", r);
	if (r == -2) {
		FUZZ_CHECK(err != NULL && err[0] != '\0', "refused without reason");
		FUZZ_CHECK(m.body == NULL, "body left behind on failure");
		free(buf);
		return 0;
	}
	FUZZ_CHECK(size >= sizeof(hdr), "accepted %zu bytes", size);
	memcpy(&hdr, data, sizeof(hdr));
	FUZZ_CHECK(hdr.version == PROTO_VERSION, "accepted version %u",
	    (unsigned)hdr.version);
	FUZZ_CHECK(hdr.len == size - sizeof(hdr) && hdr.len <= PROTO_MAX_BODY,
	    "accepted length %u for %zu bytes", (unsigned)hdr.len, size);
	FUZZ_CHECK(strcmp(msg_type_name(m.type), "UNKNOWN") != 0 &&
	    m.type == hdr.type, "accepted type %d", m.type);
	FUZZ_CHECK(json_is_object(m.body), "body is not an object");
	FUZZ_CHECK(m.fd == -1, "fd set by msg_decode");
	round_trip(&m);
	msg_free(&m);
	free(buf);
	return 0;
}
