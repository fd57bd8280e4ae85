/*
 * log.h: the one logging API of every tpmail program.  Lines go to stderr,
 * prefixed with the time, the program and (in a proxy) the service, so a
 * container runtime or journald keeps them.  Session lines begin with the
 * session id and carry key=value fields.
 */
#ifndef TPMAIL_LOG_H
#define TPMAIL_LOG_H

#include <stdarg.h>

enum log_level { LOG_LEVEL_ERROR, LOG_LEVEL_WARN, LOG_LEVEL_INFO, LOG_LEVEL_DEBUG };

void	log_init(const char *procname, int level);
void	log_set_context(const char *ctx);
/* One JSON object per line (time, level, program, pid, msg, key=value fields). */
void	log_set_json(int);
int	log_get_json(void);
void	log_set_level(int);
int	log_get_level(void);
int	log_level_parse(const char *);
const char *log_level_name(int);

void	log_warn(const char *, ...) __attribute__((format(printf, 1, 2)));
void	log_warnx(const char *, ...) __attribute__((format(printf, 1, 2)));
void	log_info(const char *, ...) __attribute__((format(printf, 1, 2)));
void	log_debug(const char *, ...) __attribute__((format(printf, 1, 2)));
void	fatal(const char *, ...) __attribute__((format(printf, 1, 2), noreturn));
void	fatalx(const char *, ...) __attribute__((format(printf, 1, 2), noreturn));

#endif
