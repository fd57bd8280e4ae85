/*
 * Unix socket addresses for paths of any length.
 *
 * sun_path holds 107 bytes; a state directory deep in a CI checkout or a
 * mounted volume can be longer.  Such a path is reached through its
 * directory instead: the directory is opened (O_PATH) and the address
 * becomes /proc/self/fd/N/<name>, which the kernel resolves like the
 * original path for bind() and connect() alike.
 */
#ifndef TPMAIL_UNIXADDR_H
#define TPMAIL_UNIXADDR_H

#include <sys/socket.h>
#include <sys/un.h>

/*
 * Fill sun for path.  *dirfd is -1, or a descriptor the caller closes
 * once bind() or connect() is done.  Returns 0, or -1 with errno set.
 */
int	unixaddr_fill(const char *path, struct sockaddr_un *sun, int *dirfd);

#endif
