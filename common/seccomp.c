/*
 * seccomp.c: the tenant proxy's syscall allowlist (libseccomp), loaded last
 * in sandbox_enter().  Default action: kill the process.  Allowed: what a
 * single-threaded libevent + OpenSSL relay really uses (measured with strace
 * over plain, STLS and POP3S sessions), with arguments pinned where that is
 * cheap: channel I/O only on the channel fd, accept only on the listening
 * socket, sockets only AF_INET/AF_INET6 streams, no executable mappings,
 * ioctl only FIONREAD.  Lazy file probes by libraries get EACCES instead of
 * a kill, so a late lookup fails softly.  Nothing here can open a file,
 * start a process, signal another process, or read another's memory.
 */
#include <errno.h>
#include <fcntl.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <seccomp.h>

#include "sandbox.h"

static const char *const allow[] = {
	/* I/O and the event loop */
	"read", "write", "readv", "writev", "close", "shutdown",
	"epoll_wait", "epoll_pwait", "epoll_ctl", "poll",
	"connect", "getsockopt", "setsockopt", "getsockname", "getpeername",
	"sendto", "recvfrom", "fcntl",
	/* memory */
	"brk", "munmap", "mremap", "madvise",
	/* time, randomness, identity of ourselves */
	"clock_gettime", "clock_getres", "gettimeofday", "clock_nanosleep",
	"nanosleep", "getrandom", "getpid", "gettid", "getuid", "geteuid",
	"getgid", "getegid", "sysinfo", "uname",
	/* stdio's first write may stat its stream */
	"fstat", "newfstatat", "lseek",
	/* signals and exit */
	"rt_sigreturn", "rt_sigprocmask", "rt_sigaction", "restart_syscall",
	"exit", "exit_group", "futex", "sched_yield",
};

/* Library probes of files: fail them, do not kill for them. */
static const char *const deny_eacces[] = {
	"open", "openat", "stat", "lstat", "statx", "access", "faccessat",
	"faccessat2", "readlink", "readlinkat", "shmget", "shmat", "shmdt",
};

#define RULE(ctx, act, name, n, ...) \
	seccomp_rule_add(ctx, act, seccomp_syscall_resolve_name(name), n, \
	    ##__VA_ARGS__)

#if defined(__SANITIZE_ADDRESS__)
/*
 * Sanitizer builds (tests) only: a sanitizer's error report makes system
 * calls a relay never does, and a kill would swallow the report.  There,
 * unlisted calls fail with ENOSYS, while the calls that would let a proxy
 * reach beyond itself still kill it, so the tests that prove those kills
 * hold in every build.  Release builds kill on anything unlisted.
 */
#define SECCOMP_DEFAULT	SCMP_ACT_ERRNO(ENOSYS)
static const char *const always_kill[] = {
	"ptrace", "process_vm_readv", "process_vm_writev", "kill", "tkill",
	"execve", "execveat", "fork", "vfork", "clone", "setuid", "setgid",
	"setreuid", "setregid", "setresuid", "setresgid", "setgroups", "capset",
	"chroot", "mount", "umount2", "unshare", "setns", "pidfd_open",
	"pidfd_getfd", "kcmp", "bpf", "perf_event_open", "keyctl", "add_key",
	"init_module", "finit_module", "userfaultfd", "io_uring_setup",
	"seccomp", "personality",
};
#else
#define SECCOMP_DEFAULT	SCMP_ACT_KILL_PROCESS
#endif

int
seccomp_install(int channel_fd, int listen_fd, const char **err)
{
	scmp_filter_ctx	ctx;
	size_t		i;
	int		r = 0, nr;

	if ((ctx = seccomp_init(SECCOMP_DEFAULT)) == NULL) {
		*err = "seccomp_init failed";
		return -1;
	}
	for (i = 0; i < sizeof(allow) / sizeof(allow[0]); i++) {
		/* a name absent on this architecture is skipped */
		if ((nr = seccomp_syscall_resolve_name(allow[i])) == __NR_SCMP_ERROR)
			continue;
		r |= seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0);
	}
	for (i = 0; i < sizeof(deny_eacces) / sizeof(deny_eacces[0]); i++) {
		if ((nr = seccomp_syscall_resolve_name(deny_eacces[i])) ==
		    __NR_SCMP_ERROR)
			continue;
		r |= seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EACCES), nr, 0);
	}
	/* the channel, and nothing else, carries messages with fds */
	r |= RULE(ctx, SCMP_ACT_ALLOW, "sendmsg", 1, SCMP_A0(SCMP_CMP_EQ,
	    channel_fd));
	r |= RULE(ctx, SCMP_ACT_ALLOW, "recvmsg", 1, SCMP_A0(SCMP_CMP_EQ,
	    channel_fd));
	r |= RULE(ctx, SCMP_ACT_ALLOW, "accept4", 1, SCMP_A0(SCMP_CMP_EQ,
	    listen_fd));
	r |= RULE(ctx, SCMP_ACT_ALLOW, "accept", 1, SCMP_A0(SCMP_CMP_EQ,
	    listen_fd));
	/* TCP over IPv4 or IPv6 only; anything else (AF_UNIX, netlink) fails */
	r |= RULE(ctx, SCMP_ACT_ALLOW, "socket", 2,
	    SCMP_A0(SCMP_CMP_EQ, AF_INET),
	    SCMP_A1(SCMP_CMP_MASKED_EQ, ~(SOCK_NONBLOCK | SOCK_CLOEXEC),
	    SOCK_STREAM));
	r |= RULE(ctx, SCMP_ACT_ALLOW, "socket", 2,
	    SCMP_A0(SCMP_CMP_EQ, AF_INET6),
	    SCMP_A1(SCMP_CMP_MASKED_EQ, ~(SOCK_NONBLOCK | SOCK_CLOEXEC),
	    SOCK_STREAM));
	r |= RULE(ctx, SCMP_ACT_ERRNO(EACCES), "socket", 1,
	    SCMP_A0(SCMP_CMP_EQ, AF_UNIX));
	r |= RULE(ctx, SCMP_ACT_ERRNO(EACCES), "socket", 1,
	    SCMP_A0(SCMP_CMP_EQ, AF_NETLINK));
	/* no executable memory */
	r |= RULE(ctx, SCMP_ACT_ALLOW, "mmap", 1,
	    SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0));
	r |= RULE(ctx, SCMP_ACT_ALLOW, "mprotect", 1,
	    SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, 0));
	r |= RULE(ctx, SCMP_ACT_ALLOW, "ioctl", 1, SCMP_A1(SCMP_CMP_EQ, FIONREAD));
	/* abort() signals itself: let it end with SIGABRT, not SIGSYS */
	r |= RULE(ctx, SCMP_ACT_ALLOW, "tgkill", 1, SCMP_A0(SCMP_CMP_EQ, getpid()));
#if !defined(__SANITIZE_ADDRESS__)
	/*
	 * glibc falls back to clone only on ENOSYS; threads never start here.
	 * (In sanitizer builds ENOSYS is the default, and libseccomp refuses
	 * a rule that repeats the default action.)
	 */
	r |= RULE(ctx, SCMP_ACT_ERRNO(ENOSYS), "clone3", 0);
#endif
#if defined(__SANITIZE_ADDRESS__)
	for (i = 0; i < sizeof(always_kill) / sizeof(always_kill[0]); i++) {
		if ((nr = seccomp_syscall_resolve_name(always_kill[i])) ==
		    __NR_SCMP_ERROR)
			continue;
		r |= seccomp_rule_add(ctx, SCMP_ACT_KILL_PROCESS, nr, 0);
	}
#endif
	if (r != 0) {
		seccomp_release(ctx);
		*err = "cannot build the filter";
		return -1;
	}
	if (seccomp_load(ctx) != 0) {
		seccomp_release(ctx);
		*err = "cannot load the filter (kernel without seccomp filters?)";
		return -1;
	}
	seccomp_release(ctx);
	return 0;
}
