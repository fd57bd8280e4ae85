/*
 * log.c: logging to stderr for every tpmail program.  One line per event:
 * "<time> <level> <program>[<pid>] <context>: message".  No credential is
 * ever passed here; callers redact PASS/AUTH lines before tracing them.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

static const char	*log_procname = "tpmail";
static char		 log_context[256];
static int		 log_level = LOG_LEVEL_INFO;

static const char *const log_names[] = { "error", "warn", "info", "debug" };

void
log_init(const char *procname, int level)
{
	log_procname = procname;
	log_level = level;
	setvbuf(stderr, NULL, _IOLBF, 0);
}

void
log_set_context(const char *ctx)
{
	snprintf(log_context, sizeof(log_context), "%s", ctx ? ctx : "");
}

void
log_set_level(int level)
{
	log_level = level;
}

int
log_get_level(void)
{
	return log_level;
}

const char *
log_level_name(int level)
{
	return level >= 0 && level <= LOG_LEVEL_DEBUG ? log_names[level] : "info";
}

int
log_level_parse(const char *s)
{
	int	i;

	for (i = 0; i <= LOG_LEVEL_DEBUG; i++)
		if (strcasecmp(s, log_names[i]) == 0)
			return i;
	if (strcasecmp(s, "warning") == 0)
		return LOG_LEVEL_WARN;
	return -1;
}

static void
log_vwrite(int level, const char *errstr, const char *fmt, va_list ap)
{
	char		 msg[2048], ts[32];
	struct timespec	 now;
	struct tm	 tm;

	if (level > log_level)
		return;
	vsnprintf(msg, sizeof(msg), fmt, ap);
	clock_gettime(CLOCK_REALTIME, &now);
	gmtime_r(&now.tv_sec, &tm);
	strftime(ts, sizeof(ts), "%Y-%m-%dT%H:%M:%S", &tm);
	fprintf(stderr, "%s.%03ldZ %s %s[%d]%s%s: %s%s%s\n", ts,
	    now.tv_nsec / 1000000, log_names[level], log_procname, (int)getpid(),
	    log_context[0] ? " " : "", log_context, msg,
	    errstr ? ": " : "", errstr ? errstr : "");
}

#define LOG_BODY(level, errstr) do {			\
	va_list	ap;					\
	va_start(ap, fmt);				\
	log_vwrite(level, errstr, fmt, ap);		\
	va_end(ap);					\
} while (0)

void
log_warn(const char *fmt, ...)
{
	const char	*e = strerror(errno);

	LOG_BODY(LOG_LEVEL_WARN, e);
}

void
log_warnx(const char *fmt, ...)
{
	LOG_BODY(LOG_LEVEL_WARN, NULL);
}

void
log_info(const char *fmt, ...)
{
	LOG_BODY(LOG_LEVEL_INFO, NULL);
}

void
log_debug(const char *fmt, ...)
{
	LOG_BODY(LOG_LEVEL_DEBUG, NULL);
}

void
fatal(const char *fmt, ...)
{
	const char	*e = strerror(errno);

	LOG_BODY(LOG_LEVEL_ERROR, e);
	exit(1);
}

void
fatalx(const char *fmt, ...)
{
	LOG_BODY(LOG_LEVEL_ERROR, NULL);
	exit(1);
}
