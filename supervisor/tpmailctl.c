/*
 * tpmailctl.c: the operator's tool.  Talks to tpmaild's control socket:
 * one JSON request, one JSON reply.  `status` prints a table, or the reply
 * itself with --json.  Exit codes: 0 ok, 1 the supervisor answered with an
 * error, 2 usage, 3 the supervisor cannot be reached.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <jansson.h>

#include "unixaddr.h"

#define DEFAULT_CONTROL	"/var/lib/tpmail/control.sock"

static void
usage(FILE *f)
{
	fprintf(f,
"usage: tpmailctl [--control PATH] [--json] COMMAND [ARGS]\n"
"\n"
"  status [NS/SERVICE]        tenant services and rejected CRs; one service in\n"
"                             detail (sandbox, recent errors)\n"
"  restart NS/SERVICE [--hard]\n"
"  restart --cr NS/CR [--hard]\n"
"                             restart a tenant's proxy: a new one takes over the\n"
"                             listening socket, the old one finishes its sessions\n"
"                             (--hard: ends them now); clears a backoff\n"
"  drain NS/SERVICE           stop accepting, let sessions finish; `restart`\n"
"                             brings it back\n"
"  log-level LEVEL            error, warn, info or debug, for tpmaild and every proxy\n"
"\n"
"  --json      print the supervisor's JSON reply\n"
"  --control   tpmaild's control socket (default " DEFAULT_CONTROL ")\n"
"\n"
"Exit status: 0 done, 1 tpmaild refused (e.g. no such service), 2 usage,\n"
"3 tpmaild not reachable.\n");
}

static json_t *
request(const char *path, json_t *req)
{
	struct sockaddr_un	 sun;
	json_error_t		 jerr;
	char			*buf = NULL, line[1024], *s;
	size_t			 len = 0;
	ssize_t			 n;
	json_t			*reply;
	int			 fd, dirfd;

	if (unixaddr_fill(path, &sun, &dirfd) == -1) {
		fprintf(stderr, "tpmailctl: control socket %s: %s\n", path,
		    strerror(errno));
		exit(2);
	}
	if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) == -1 ||
	    connect(fd, (struct sockaddr *)&sun, sizeof(sun)) == -1) {
		fprintf(stderr, "tpmailctl: cannot reach tpmaild at %s: %s\n",
		    path, strerror(errno));
		exit(3);
	}
	if (dirfd != -1)
		close(dirfd);
	s = json_dumps(req, JSON_COMPACT);
	json_decref(req);
	n = snprintf(line, sizeof(line), "%s\n", s ? s : "{}");
	free(s);
	if (n >= (ssize_t)sizeof(line) || write(fd, line, n) != n) {
		fprintf(stderr, "tpmailctl: write: %s\n", strerror(errno));
		exit(3);
	}
	for (;;) {
		char	*nb = realloc(buf, len + 65536);

		if (nb == NULL)
			exit(3);
		buf = nb;
		n = read(fd, buf + len, 65536);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		len += n;
	}
	close(fd);
	reply = json_loadb(buf ? buf : "", len, 0, &jerr);
	free(buf);
	if (reply == NULL) {
		fprintf(stderr, "tpmailctl: unreadable reply from tpmaild: %s\n",
		    jerr.text);
		exit(3);
	}
	return reply;
}

static const char *
str_or(json_t *o, const char *key, const char *def)
{
	const char	*s = json_string_value(json_object_get(o, key));

	return s ? s : def;
}

static void
print_table(json_t *reply)
{
	json_t	*s, *pid;
	size_t	 i;
	char	 pidbuf[16];

	printf("%-12s %-28s %-16s %-16s %-21s %-7s %-9s %8s %6s %6s  %s\n",
	    "NAMESPACE", "SERVICE", "CR", "TENANT", "LISTEN", "PID", "STATE",
	    "RESTARTS", "ACTIVE", "TOTAL", "ERROR");
	json_array_foreach(json_object_get(reply, "services"), i, s) {
		pid = json_object_get(s, "pid");
		snprintf(pidbuf, sizeof(pidbuf), "%s", "-");
		if (json_is_integer(pid))
			snprintf(pidbuf, sizeof(pidbuf), "%lld",
			    (long long)json_integer_value(pid));
		printf("%-12s %-28s %-16s %-16s %-21s %-7s %-9s %8lld %6lld %6lld  %s\n",
		    str_or(s, "namespace", "-"), str_or(s, "name", "-"),
		    str_or(s, "cr", "-"), str_or(s, "tenant", "-"),
		    str_or(s, "listen", "-"), pidbuf, str_or(s, "state", "-"),
		    (long long)json_integer_value(json_object_get(s, "restarts")),
		    (long long)json_integer_value(json_object_get(s,
		    "sessions_active")),
		    (long long)json_integer_value(json_object_get(s,
		    "sessions_total")), str_or(s, "error", ""));
	}
	if (json_array_size(json_object_get(reply, "rejected")) == 0)
		return;
	printf("\nREJECTED CRs\n%-12s %-20s %-52s %s\n", "NAMESPACE", "CR",
	    "REASON", "ERROR");
	json_array_foreach(json_object_get(reply, "rejected"), i, s)
		printf("%-12s %-20s %-52s %s\n", str_or(s, "namespace", "-"),
		    str_or(s, "cr", "-"), str_or(s, "reason", "-"),
		    str_or(s, "error", ""));
}

static void
print_detail(json_t *sv)
{
	json_t		*e, *sb, *m;
	size_t		 i;
	const char	*k;

	printf("service:   %s/%s\n", str_or(sv, "namespace", "-"),
	    str_or(sv, "name", "-"));
	printf("cr:        %s\n", str_or(sv, "cr", "-"));
	printf("tenant:    %s\n", str_or(sv, "tenant", "- (dedicated)"));
	printf("listen:    %s (Service port %lld)\n", str_or(sv, "listen", "-"),
	    (long long)json_integer_value(json_object_get(sv, "port")));
	printf("state:     %s, pid %lld, restarts %lld\n", str_or(sv, "state", "-"),
	    (long long)json_integer_value(json_object_get(sv, "pid")),
	    (long long)json_integer_value(json_object_get(sv, "restarts")));
	printf("sessions:  %lld active, %lld total, %lld failed\n",
	    (long long)json_integer_value(json_object_get(sv, "sessions_active")),
	    (long long)json_integer_value(json_object_get(sv, "sessions_total")),
	    (long long)json_integer_value(json_object_get(sv, "sessions_failed")));
	if ((sb = json_object_get(sv, "sandbox")) != NULL) {
		printf("sandbox:  ");
		json_object_foreach(sb, k, m) {
			if (json_is_integer(m))
				printf(" %s=%lld", k, (long long)json_integer_value(m));
			else if (json_is_boolean(m))
				printf(" %s=%s", k, json_is_true(m) ? "yes" : "no");
		}
		printf("\n");
		json_array_foreach(json_object_get(sb, "missing"), i, m)
			printf("  not applied: %s\n", json_string_value(m));
	}
	printf("recent errors:\n");
	json_array_foreach(json_object_get(sv, "recent_errors"), i, e)
		printf("  %s  %s\n", str_or(e, "time", "?"), str_or(e, "error", ""));
	if (json_array_size(json_object_get(sv, "recent_errors")) == 0)
		printf("  (none)\n");
}

int
main(int argc, char *argv[])
{
	static const struct option opts[] = {
		{ "control", required_argument, NULL, 'c' },
		{ "json", no_argument, NULL, 'j' },
		{ "hard", no_argument, NULL, 'H' },
		{ "cr", required_argument, NULL, 'r' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char	*control = DEFAULT_CONTROL, *cmd, *cr = NULL, *arg = NULL;
	const char	*arg2 = NULL;
	json_t		*reply, *req;
	char		*s;
	int		 opt, json = 0, hard = 0, rc;

	/* options may come before or after the command: tpmailctl status --json */
	while ((opt = getopt_long(argc, argv, "c:jh", opts, NULL)) != -1) {
		switch (opt) {
		case 'c': control = optarg; break;
		case 'j': json = 1; break;
		case 'H': hard = 1; break;
		case 'r': cr = optarg; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind >= argc) {
		usage(stderr);
		return 2;
	}
	cmd = argv[optind];
	if (optind + 1 < argc)
		arg = argv[optind + 1];
	if (optind + 2 < argc)
		arg2 = argv[optind + 2];
	if (optind + 3 < argc) {
		usage(stderr);
		return 2;
	}
	if (strcmp(cmd, "status") == 0 && arg2 == NULL)
		req = json_pack("{s:s,s:s?}", "cmd", "status", "service", arg);
	else if (strcmp(cmd, "restart") == 0 && arg2 == NULL &&
	    (arg != NULL) != (cr != NULL))
		req = json_pack("{s:s,s:s?,s:s?,s:b}", "cmd", "restart",
		    "service", arg, "cr", cr, "hard", hard);
	else if (strcmp(cmd, "drain") == 0 && arg != NULL && arg2 == NULL)
		req = json_pack("{s:s,s:s}", "cmd", "drain", "service", arg);
	else if (strcmp(cmd, "log-level") == 0 && arg != NULL && arg2 == NULL)
		req = json_pack("{s:s,s:s}", "cmd", "log-level", "level", arg);
#ifdef TPMAIL_SANDBOX_TESTING
	/* test builds only: tpmailctl test-syscall <ns>/<service> <syscall> */
	else if (strcmp(cmd, "test-syscall") == 0 && arg2 != NULL)
		req = json_pack("{s:s,s:s,s:s}", "cmd", "test-syscall",
		    "service", arg, "syscall", arg2);
#endif
	else {
		fprintf(stderr, "tpmailctl: bad command line\n");
		usage(stderr);
		return 2;
	}
	reply = request(control, req);
	rc = json_object_get(reply, "error") != NULL;
	if (json) {
		s = json_dumps(reply, JSON_INDENT(2));
		printf("%s\n", s);
		free(s);
	} else if (rc)
		fprintf(stderr, "tpmailctl: %s\n", str_or(reply, "error", "?"));
	else if (strcmp(cmd, "status") == 0 && arg != NULL)
		print_detail(json_object_get(reply, "service"));
	else if (strcmp(cmd, "status") == 0)
		print_table(reply);
	else if (strcmp(cmd, "restart") == 0) {
		json_t	*v;
		size_t	 i;

		json_array_foreach(json_object_get(reply, "restarted"), i, v)
			printf("restarted %s%s\n", json_string_value(v),
			    hard ? " (hard)" : "");
	} else if (strcmp(cmd, "log-level") == 0)
		printf("log level %s\n", str_or(reply, "level", "?"));
	json_decref(reply);
	return rc;
}
