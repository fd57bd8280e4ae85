/*
 * sandbox.c: the tenant proxy's privilege drop, one function, one order
 * (STYLE.md point 7; reference/sandbox.md section 1):
 *   early:  RLIMIT_CORE 0, not dumpable (before any secret arrives)
 *   then:   stray fds closed, libraries initialised while files exist,
 *   enter:  umask, empty environment, chroot to an empty directory, the
 *           capability bounding set dropped while CAP_SETPCAP is held,
 *           supplementary groups, gid, uid (verified unrecoverable), every
 *           capability set cleared, no_new_privs, not dumpable again, parent
 *           death signal, rlimits (no files, no processes), seccomp last.
 * A step that needs a privilege we do not have is reported as missing (and
 * is fatal when the supervisor asks for strict mode); a step that fails for
 * any other reason is always fatal: the sandbox never silently degrades.
 * Runs in tpmail-pop3 between exec and serving.
 */
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/capability.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/rand.h>
#include <openssl/ssl.h>

#include "log.h"
#include "sandbox.h"
#include "secret.h"

void
sandbox_early(void)
{
	struct rlimit	rl = { 0, 0 };

	if (setrlimit(RLIMIT_CORE, &rl) == -1)
		fatal("setrlimit(RLIMIT_CORE)");
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == -1)
		fatal("prctl(PR_SET_DUMPABLE)");
}

static int
int_cmp(const void *a, const void *b)
{
	return *(const int *)a - *(const int *)b;
}

void
sandbox_close_fds(const int *keep, int nkeep)
{
	int	sorted[8], i, from = 3;

	if (nkeep > 8)
		fatalx("sandbox_close_fds: too many fds to keep");
	memcpy(sorted, keep, nkeep * sizeof(int));
	qsort(sorted, nkeep, sizeof(int), int_cmp);
	for (i = 0; i < nkeep; i++) {
		if (sorted[i] < from)
			continue;
		if (sorted[i] > from && close_range(from, sorted[i] - 1, 0) == -1)
			fatal("close_range");
		from = sorted[i] + 1;
	}
	if (close_range(from, ~0U, 0) == -1)
		fatal("close_range");
}

void
sandbox_preload(int tls)
{
	unsigned char	b[16];
	time_t		t = 0;
	struct tm	tm;

	/* glibc opens /etc/localtime on first use; OpenSSL's time checks use it */
	tzset();
	localtime_r(&t, &tm);
	gmtime_r(&t, &tm);
	/*
	 * What reads files (the configuration, the providers) happens now.
	 * Not the error strings: their tables cost every tenant about 100 KiB
	 * of heap, they are in memory, and SSL_CTX_new loads them for the
	 * tenants that use TLS, sandbox or not.
	 */
	if (OPENSSL_init_ssl(0, NULL) != 1)
		fatalx("OpenSSL initialisation failed");
	/*
	 * Seed the DRBG now, where TLS is to come.  Its first use fetches
	 * and sets up the provider's algorithms, about 180 KiB of heap that
	 * a plain tenant never needs.  A plain tenant switched to TLS later
	 * seeds it in the sandbox, from getrandom, which the filter allows.
	 */
	if (tls && RAND_bytes(b, sizeof(b)) != 1)
		fatalx("RAND_bytes failed");
}

static void
report_missing(json_t *rep, const struct sandbox_policy *pol, const char *step,
    const char *why)
{
	char	buf[256];

	snprintf(buf, sizeof(buf), "%s: %s", step, why);
	if (pol->strict)
		fatalx("sandbox (strict): cannot apply %s", buf);
	json_array_append_new(json_object_get(rep, "missing"), json_string(buf));
}

static int
have_cap(cap_value_t c)
{
	cap_t			caps = cap_get_proc();
	cap_flag_value_t	v = CAP_CLEAR;

	if (caps != NULL) {
		cap_get_flag(caps, c, CAP_EFFECTIVE, &v);
		cap_free(caps);
	}
	return v == CAP_SET;
}

/* Switch to uid/gid for good, and prove the old ones are gone. */
static void
sandbox_set_ids(uid_t uid, gid_t gid)
{
	uid_t	ou = getuid();
	gid_t	og = getgid();

	if (setgroups(0, NULL) == -1)
		fatal("setgroups");
	if (setresgid(gid, gid, gid) == -1)
		fatal("setresgid(%u)", (unsigned)gid);
	if (setresuid(uid, uid, uid) == -1)
		fatal("setresuid(%u)", (unsigned)uid);
	/* as OpenSSH's permanently_set_uid: regaining must fail */
	if (og != gid && (setgid(og) != -1 || setegid(og) != -1))
		fatalx("sandbox: old gid %u still recoverable", (unsigned)og);
	if (ou != uid && (setuid(ou) != -1 || seteuid(ou) != -1))
		fatalx("sandbox: old uid %u still recoverable", (unsigned)ou);
	if (getuid() != uid || geteuid() != uid || getgid() != gid ||
	    getegid() != gid)
		fatalx("sandbox: ids not switched");
}

/* Every capability set empty, verified. */
static void
sandbox_clear_caps(void)
{
	cap_t	empty, now;
	int	same;

	if ((empty = cap_init()) == NULL)
		fatal("cap_init");
	if (cap_set_proc(empty) == -1)
		fatal("cap_set_proc");
	if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) == -1 &&
	    errno != EINVAL)
		fatal("prctl(PR_CAP_AMBIENT_CLEAR_ALL)");
	if ((now = cap_get_proc()) == NULL)
		fatal("cap_get_proc");
	same = cap_compare(now, empty) == 0;
	cap_free(now);
	cap_free(empty);
	if (!same)
		fatalx("sandbox: capabilities remain after clearing");
}

#if defined(__SANITIZE_ADDRESS__)
static void	sandbox_sanitizer_prepare(void);
#endif

json_t *
sandbox_enter(const struct sandbox_policy *pol)
{
	json_t		*rep;
	struct rlimit	 rl;
	cap_value_t	 c;
	const char	*err;
	int		 root = geteuid() == 0, chrooted = 0, bound = 0;

	rep = json_pack("{s:[]}", "missing");
	if (!secret_vault_locked())
		report_missing(rep, pol, "mlock",
		    "credentials not locked in memory (RLIMIT_MEMLOCK)");
	umask(077);
	if (clearenv() != 0)
		fatalx("clearenv");

	if (pol->chroot == NULL)
		report_missing(rep, pol, "chroot", geteuid() != 0 ?
		    "unprivileged (no CAP_SYS_CHROOT)" :
		    "no empty directory configured");
	else if (!have_cap(CAP_SYS_CHROOT))
		report_missing(rep, pol, "chroot", "no CAP_SYS_CHROOT (unprivileged)");
	else {
		if (chroot(pol->chroot) == -1)
			fatal("chroot(%s)", pol->chroot);
		if (chdir("/") == -1)
			fatal("chdir(/)");
		chrooted = 1;
	}

	/* the bounding set needs CAP_SETPCAP, which the uid change removes */
	if (have_cap(CAP_SETPCAP)) {
		for (c = 0; c <= cap_max_bits() - 1; c++)
			if (cap_drop_bound(c) == -1 && errno != EINVAL)
				fatal("cap_drop_bound(%d)", (int)c);
		bound = 1;
	} else
		report_missing(rep, pol, "capability bounding set",
		    "no CAP_SETPCAP (unprivileged); inert under no_new_privs");

	if (pol->uid != (uid_t)-1 && pol->uid != geteuid()) {
		if (!root)
			report_missing(rep, pol, "uid/gid",
			    "not root: the proxy keeps the supervisor's uid");
		else
			sandbox_set_ids(pol->uid, pol->gid);
	} else if (root)
		report_missing(rep, pol, "uid/gid", "no tenant uid configured");
	else
		report_missing(rep, pol, "uid/gid",
		    "unprivileged: every proxy shares the supervisor's uid");

	sandbox_clear_caps();
	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == -1)
		fatal("prctl(PR_SET_NO_NEW_PRIVS)");
	/* credential changes reset these two: set them after the last one */
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == -1)
		fatal("prctl(PR_SET_DUMPABLE)");
	if (prctl(PR_SET_PDEATHSIG, SIGTERM, 0, 0, 0) == -1)
		fatal("prctl(PR_SET_PDEATHSIG)");

	/* lowering only: never above the hard limit we were given */
	if (getrlimit(RLIMIT_NOFILE, &rl) == -1)
		fatal("getrlimit(RLIMIT_NOFILE)");
	if (rl.rlim_max == RLIM_INFINITY || rl.rlim_max > (rlim_t)pol->max_fds)
		rl.rlim_max = pol->max_fds;
	rl.rlim_cur = rl.rlim_max;
	if (setrlimit(RLIMIT_NOFILE, &rl) == -1)
		fatal("setrlimit(RLIMIT_NOFILE)");
	rl.rlim_cur = rl.rlim_max = 0;
	if (setrlimit(RLIMIT_NPROC, &rl) == -1 ||
	    setrlimit(RLIMIT_FSIZE, &rl) == -1 ||
	    setrlimit(RLIMIT_CORE, &rl) == -1)
		fatal("setrlimit");

#if defined(__SANITIZE_ADDRESS__)
	sandbox_sanitizer_prepare();
#endif
	/* read back now: prctl is not allowed once the filter is in */
	json_object_set_new(rep, "no_new_privs", json_boolean(
	    prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) == 1));
	json_object_set_new(rep, "dumpable", json_boolean(
	    prctl(PR_GET_DUMPABLE, 0, 0, 0, 0) != 0));
	if (seccomp_install(pol->channel_fd, pol->listen_fd, &err) == -1)
		fatalx("seccomp: %s", err);

	json_object_set_new(rep, "uid", json_integer(getuid()));
	json_object_set_new(rep, "gid", json_integer(getgid()));
	json_object_set_new(rep, "chroot", json_boolean(chrooted));
	json_object_set_new(rep, "bounding_set_cleared", json_boolean(bound));
	json_object_set_new(rep, "caps_cleared", json_true());
	json_object_set_new(rep, "seccomp", json_true());
	json_object_set_new(rep, "secrets_locked", json_boolean(
	    secret_vault_locked()));
	return rep;
}

#if defined(__SANITIZE_ADDRESS__)
void	__sanitizer_set_report_fd(void *);
void	__sanitizer_sandbox_on_notify(void *);

/* Reports must not need a file opened later: send them to stderr. */
static void
sandbox_sanitizer_prepare(void)
{
	__sanitizer_set_report_fd((void *)(long)STDERR_FILENO);
	__sanitizer_sandbox_on_notify(NULL);
}

/*
 * Sanitizer builds (tests): LeakSanitizer's exit-time scan needs clone and
 * ptrace, which the filter rightly kills, so a sandboxed proxy leaves leak
 * checking to the unit tests.  Errors are still reported, on stderr.
 */
const char	*__asan_default_options(void);
const char *
__asan_default_options(void)
{
	return "detect_leaks=0";
}
#endif
