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

#include <jansson.h>

#include "log.h"

static const char	*log_procname = "tpmail";
static char		 log_context[256];
static int		 log_level = LOG_LEVEL_INFO;
static int		 log_json;

static const char *const log_names[] = { "error", "warn", "info", "debug" };

void
log_init(const char *procname, int level)
{
	log_procname = procname;
	log_level = level;
	setvbuf(stderr, NULL, _IOLBF, 0);
}

void
log_set_json(int on)
{
	log_json = on;
}

int
log_get_json(void)
{
	return log_json;
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

/*
 * key=value (or key="value") pairs of a message become fields of its JSON
 * line, so that "session=7 result=ok" can be filtered on.
 */
static void
log_fields(json_t *o, const char *s)
{
	char		 key[32], val[512];
	const char	*p = s, *k, *v;
	size_t		 kl, vl;

	while (*p != '\0') {
		while (*p == ' ')
			p++;
		for (k = p; (*p >= 'a' && *p <= 'z') || *p == '_'; p++)
			;
		kl = p - k;
		if (kl == 0 || kl >= sizeof(key) || *p != '=') {
			while (*p != '\0' && *p != ' ')
				p++;
			continue;
		}
		p++;
		if (*p == '"') {
			v = ++p;
			while (*p != '\0' && *p != '"')
				p++;
			vl = p - v;
			if (*p == '"')
				p++;
		} else {
			v = p;
			while (*p != '\0' && *p != ' ')
				p++;
			vl = p - v;
		}
		if (vl >= sizeof(val))
			vl = sizeof(val) - 1;
		memcpy(key, k, kl);
		key[kl] = '\0';
		memcpy(val, v, vl);
		val[vl] = '\0';
		/* the fixed fields win over a message's own */
		if (json_object_get(o, key) == NULL)
			json_object_set_new(o, key, json_string(val));
	}
}

static void
log_write_json(int level, const char *ts, long ms, const char *msg,
    const char *errstr)
{
	json_t	*o;
	char	 t[48], full[2600], *line;

	snprintf(t, sizeof(t), "%s.%03ldZ", ts, ms);
	snprintf(full, sizeof(full), "%s%s%s", msg, errstr ? ": " : "",
	    errstr ? errstr : "");
	o = json_pack("{s:s,s:s,s:s,s:i,s:s}", "time", t, "level",
	    log_names[level], "program", log_procname, "pid", (int)getpid(),
	    "msg", full);
	if (o == NULL)
		return;
	log_fields(o, log_context);
	log_fields(o, msg);
	if ((line = json_dumps(o, JSON_COMPACT | JSON_ENSURE_ASCII)) != NULL) {
		fprintf(stderr, "%s\n", line);
		free(line);
	}
	json_decref(o);
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
	if (log_json) {
		log_write_json(level, ts, now.tv_nsec / 1000000, msg, errstr);
		return;
	}
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
