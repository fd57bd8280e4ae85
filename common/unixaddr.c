#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "unixaddr.h"

int
unixaddr_fill(const char *path, struct sockaddr_un *sun, int *dirfd)
{
	const char	*slash;
	char		*dir;
	int		 n;

	memset(sun, 0, sizeof(*sun));
	sun->sun_family = AF_UNIX;
	*dirfd = -1;
	if (strlen(path) < sizeof(sun->sun_path)) {
		memcpy(sun->sun_path, path, strlen(path) + 1);
		return 0;
	}
	if ((slash = strrchr(path, '/')) == NULL || slash[1] == '\0') {
		errno = ENAMETOOLONG;
		return -1;
	}
	if ((dir = strndup(path, slash == path ? 1 : (size_t)(slash - path)))
	    == NULL)
		return -1;
	*dirfd = open(dir, O_PATH | O_DIRECTORY | O_CLOEXEC);
	free(dir);
	if (*dirfd == -1)
		return -1;
	n = snprintf(sun->sun_path, sizeof(sun->sun_path), "/proc/self/fd/%d/%s",
	    *dirfd, slash + 1);
	if (n < 0 || (size_t)n >= sizeof(sun->sun_path)) {
		close(*dirfd);
		*dirfd = -1;
		errno = ENAMETOOLONG;
		return -1;
	}
	return 0;
}
