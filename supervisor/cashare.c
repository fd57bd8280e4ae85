/*
 * cashare.c: CA files handed to the proxies as sealed memory files.  A
 * proxy maps what it is given (proxy/trust.c), so every proxy given the
 * same file shares one copy of its pages: 200 tenants trusting the system
 * bundle hold it once, not 200 times.  The copy is sealed against any
 * change, so no proxy's mapping can be cut or rewritten under it, as a
 * mapping of the CA file itself could be by an edit in place.  A copy is
 * made per version of a file (its inode, size and modification time) and
 * kept while it is the newest; proxies keep the old one mapped until their
 * configuration changes.  Every CASHARE_CHECK seconds each file copied is
 * looked at again: one that changed (edited in place, or replaced) and has
 * then stayed as it is for an interval is dropped from the cache, and its
 * proxies are sent the new one.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/event.h>

#include "log.h"
#include "supervisor.h"

#define CASHARE_MAX		64		/* files remembered */
#define CASHARE_MAX_SIZE	(16 * 1024 * 1024)
#define CASHARE_CHECK		10		/* seconds */

struct cashare {
	char		*cs_path;
	struct stat	 cs_st;		/* the version copied */
	int		 cs_fd;		/* the sealed copy */
	unsigned long	 cs_used;	/* for eviction: last use */
	struct stat	 cs_seen;	/* a change seen, not yet acted on */
	int		 cs_changed;
};

static struct cashare	cache[CASHARE_MAX];
static unsigned long	uses;
static struct event	*check_ev;

/* One version of a file: the same inode, size and modification time. */
static int
same_version(const struct stat *a, const struct stat *b)
{
	return a->st_dev == b->st_dev && a->st_ino == b->st_ino &&
	    a->st_size == b->st_size &&
	    a->st_mtim.tv_sec == b->st_mtim.tv_sec &&
	    a->st_mtim.tv_nsec == b->st_mtim.tv_nsec;
}

/* A sealed copy of what fd holds (size bytes); -1 with errno. */
static int
cashare_copy(int fd, off_t size)
{
	char	 buf[65536];
	ssize_t	 n, w;
	off_t	 total = 0;
	int	 mfd, e;

	if ((mfd = memfd_create("tpmail-ca", MFD_CLOEXEC |
	    MFD_ALLOW_SEALING)) == -1)
		return -1;
	while ((n = read(fd, buf, sizeof(buf))) != 0) {
		if (n == -1 && errno == EINTR)
			continue;
		if (n == -1 || (total += n) > CASHARE_MAX_SIZE)
			goto fail;
		for (w = 0; w < n; ) {
			ssize_t r = write(mfd, buf + w, n - w);

			if (r == -1 && errno == EINTR)
				continue;
			if (r == -1)
				goto fail;
			w += r;
		}
	}
	if (total != size) {
		errno = EAGAIN;		/* changed while we read */
		goto fail;
	}
	if (fcntl(mfd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW |
	    F_SEAL_WRITE | F_SEAL_SEAL) == -1 ||
	    lseek(mfd, 0, SEEK_SET) == -1)	/* for a proxy that reads it */
		goto fail;
	return mfd;
fail:
	e = errno ? errno : EFBIG;
	close(mfd);
	errno = e;
	return -1;
}

int
cashare_open(const char *path)
{
	struct cashare	*c, *slot = NULL;
	struct stat	 st;
	int		 fd, mfd, i;

	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) == -1)
		return -1;
	if (fstat(fd, &st) == -1 || !S_ISREG(st.st_mode)) {
		/* not a plain file (a pipe, a device): pass it as it is */
		return fd;
	}
	for (i = 0; i < CASHARE_MAX; i++) {
		c = &cache[i];
		if (c->cs_path != NULL && strcmp(c->cs_path, path) == 0) {
			slot = c;
			break;
		}
		if (slot == NULL || (slot->cs_path != NULL &&
		    (c->cs_path == NULL || c->cs_used < slot->cs_used)))
			slot = c;
	}
	if (slot->cs_path != NULL && strcmp(slot->cs_path, path) == 0 &&
	    same_version(&slot->cs_st, &st)) {
		close(fd);
		slot->cs_used = ++uses;
		return fcntl(slot->cs_fd, F_DUPFD_CLOEXEC, 0);
	}
	/* a file rewritten while copied is copied again (a few times) */
	for (i = 0; i < 3; i++) {
		struct stat	after;

		if ((mfd = cashare_copy(fd, st.st_size)) != -1 &&
		    fstat(fd, &after) == 0 && same_version(&after, &st))
			break;
		if (mfd != -1)
			close(mfd);
		mfd = -1;
		if (lseek(fd, 0, SEEK_SET) == -1 || fstat(fd, &st) == -1)
			break;
	}
	if (mfd == -1) {
		/* no memory file: the proxy reads the file itself */
		log_warn("CA file %s: cannot make a shared copy", path);
		if (lseek(fd, 0, SEEK_SET) == -1) {
			close(fd);
			return -1;
		}
		return fd;
	}
	close(fd);
	if (slot->cs_path != NULL) {
		free(slot->cs_path);
		close(slot->cs_fd);
	}
	*slot = (struct cashare){ .cs_path = strdup(path), .cs_st = st,
	    .cs_fd = mfd, .cs_used = ++uses };
	if (slot->cs_path == NULL) {
		close(mfd);
		slot->cs_fd = -1;
		errno = ENOMEM;
		return -1;
	}
	return fcntl(mfd, F_DUPFD_CLOEXEC, 0);
}

/* Files that changed since they were copied: forget them, tell services. */
static void
cashare_check_cb(evutil_socket_t fd, short ev, void *arg)
{
	struct stat	 st;
	char		*path;
	int		 i;

	for (i = 0; i < CASHARE_MAX; i++) {
		if (cache[i].cs_path == NULL || stat(cache[i].cs_path, &st) == -1 ||
		    same_version(&cache[i].cs_st, &st)) {
			cache[i].cs_changed = 0;
			continue;	/* unchanged, or gone: the copy stays */
		}
		/*
		 * Acted on once it has not moved for a whole interval: an
		 * editor writing in place is not caught half way.
		 */
		if (!cache[i].cs_changed ||
		    !same_version(&cache[i].cs_seen, &st)) {
			cache[i].cs_seen = st;
			cache[i].cs_changed = 1;
			continue;
		}
		path = cache[i].cs_path;
		close(cache[i].cs_fd);
		cache[i].cs_path = NULL;
		log_info("CA file %s changed: sending it to its proxies", path);
		services_ca_changed(path);
		free(path);
	}
}

void
cashare_start(void)
{
	check_ev = event_new(sup->base, -1, EV_PERSIST, cashare_check_cb, NULL);
	if (check_ev != NULL)
		event_add(check_ev, &(struct timeval){ CASHARE_CHECK, 0 });
}

void
cashare_clear(void)
{
	int	i;

	if (check_ev != NULL)
		event_free(check_ev);
	check_ev = NULL;

	for (i = 0; i < CASHARE_MAX; i++) {
		if (cache[i].cs_path == NULL)
			continue;
		free(cache[i].cs_path);
		close(cache[i].cs_fd);
		cache[i].cs_path = NULL;
	}
}
