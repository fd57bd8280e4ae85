/*
 * msg.h: framing of supervisor <-> proxy messages (one datagram each, a
 * header, a JSON object body and at most one passed fd).
 */
#ifndef TPMAIL_MSG_H
#define TPMAIL_MSG_H

#include <jansson.h>
#include <stddef.h>
#include <sys/types.h>

#include "proto.h"

struct msg {
	int		 type;
	pid_t		 pid;
	json_t		*body;	/* owned; never NULL after a successful recv */
	int		 fd;	/* passed fd or -1; owned by the receiver */
};

/* Send one message; fd < 0 sends none.  Returns 0, or -1 with errno. */
int	 msg_send(int sock, int type, json_t *body, int fd);
/*
 * Receive one message.  Returns 1 with *m filled, 0 at end of file, -1 on a
 * transport error (errno) or -2 on a malformed message (*err says why).
 */
int	 msg_recv(int sock, struct msg *m, const char **err);
/* Decode one datagram already in memory (used by msg_recv and fuzzing). */
int	 msg_decode(const void *buf, size_t len, struct msg *m, const char **err);
void	 msg_free(struct msg *m);

#endif
