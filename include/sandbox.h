/*
 * sandbox.h: how a tenant proxy confines itself before it reads a byte from
 * the network.  sandbox_early() runs first thing after exec; after the
 * configuration has arrived and every file and library has been initialised,
 * sandbox_enter() applies the rest, in the order of STYLE.md point 7, and
 * reports what was applied and what could not be (and why).
 */
#ifndef TPMAIL_SANDBOX_H
#define TPMAIL_SANDBOX_H

#include <sys/types.h>
#include <jansson.h>

struct sandbox_policy {
	uid_t		 uid;		/* (uid_t)-1: keep ours */
	gid_t		 gid;
	const char	*chroot;	/* an empty root-owned directory, or NULL */
	int		 channel_fd;
	int		 listen_fd;
	int		 max_fds;	/* RLIMIT_NOFILE */
	int		 strict;	/* a step that cannot be applied is fatal */
};

/* Core size 0 and not dumpable: before any secret arrives. */
void	 sandbox_early(void);
/* Close every fd but stdin/out/err and the ones listed (-1 ends the list). */
void	 sandbox_close_fds(const int *keep, int nkeep);
/*
 * Load what must be loaded while files are still reachable.  tls: the
 * process starts with TLS work to do, so the random generator is seeded
 * now too (see sandbox.c).
 */
void	 sandbox_preload(int tls);
/*
 * Apply every step; returns the report object (uid, gid, chroot,
 * no_new_privs, caps_cleared, seccomp, dumpable, missing[]).  Fatal on any
 * step that fails unexpectedly, or on any missing step when strict.
 */
json_t	*sandbox_enter(const struct sandbox_policy *);

/* seccomp.c: the syscall allowlist, kill by default. */
int	 seccomp_install(int channel_fd, int listen_fd, const char **err);

#endif
