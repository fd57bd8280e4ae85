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

#define DEFAULT_CONTROL	"/var/lib/tpmail/control.sock"

static void
usage(FILE *f)
{
	fprintf(f,
"usage: tpmailctl [--control PATH] status [--json]\n"
"\n"
"  status        tenant services (endpoint, pid, state, restarts, sessions,\n"
"                last error) and rejected CRs with their reasons\n"
"  --json        print the supervisor's JSON reply\n"
"  --control     tpmaild's control socket (default " DEFAULT_CONTROL ")\n");
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
	int			 fd;

	memset(&sun, 0, sizeof(sun));
	sun.sun_family = AF_UNIX;
	if (strlen(path) >= sizeof(sun.sun_path)) {
		fprintf(stderr, "tpmailctl: control path too long\n");
		exit(2);
	}
	strcpy(sun.sun_path, path);
	if ((fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0)) == -1 ||
	    connect(fd, (struct sockaddr *)&sun, sizeof(sun)) == -1) {
		fprintf(stderr, "tpmailctl: cannot reach tpmaild at %s: %s\n",
		    path, strerror(errno));
		exit(3);
	}
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

int
main(int argc, char *argv[])
{
	static const struct option opts[] = {
		{ "control", required_argument, NULL, 'c' },
		{ "json", no_argument, NULL, 'j' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char	*control = DEFAULT_CONTROL;
	json_t		*reply;
	char		*s;
	int		 opt, json = 0;

	while ((opt = getopt_long(argc, argv, "c:jh", opts, NULL)) != -1) {
		switch (opt) {
		case 'c': control = optarg; break;
		case 'j': json = 1; break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind >= argc) {
		usage(stderr);
		return 2;
	}
#ifdef TPMAIL_SANDBOX_TESTING
	/* test builds only: tpmailctl test-syscall <ns>/<service> <syscall> */
	if (strcmp(argv[optind], "test-syscall") == 0 && optind + 2 < argc) {
		reply = request(control, json_pack("{s:s,s:s,s:s}", "cmd",
		    "test-syscall", "service", argv[optind + 1], "syscall",
		    argv[optind + 2]));
		opt = json_object_get(reply, "error") != NULL;
		if (opt)
			fprintf(stderr, "tpmailctl: %s\n", str_or(reply, "error", "?"));
		json_decref(reply);
		return opt;
	}
#endif
	if (strcmp(argv[optind], "status") != 0) {
		fprintf(stderr, "tpmailctl: unknown command %s\n", argv[optind]);
		usage(stderr);
		return 2;
	}
	/* options may follow the command too: tpmailctl status --json */
	for (opt = optind + 1; opt < argc; opt++) {
		if (strcmp(argv[opt], "--json") == 0)
			json = 1;
		else {
			usage(stderr);
			return 2;
		}
	}
	reply = request(control, json_pack("{s:s}", "cmd", "status"));
	if (json_object_get(reply, "error") != NULL) {
		fprintf(stderr, "tpmailctl: %s\n", str_or(reply, "error", "?"));
		json_decref(reply);
		return 1;
	}
	if (json) {
		s = json_dumps(reply, JSON_INDENT(2));
		printf("%s\n", s);
		free(s);
	} else
		print_table(reply);
	json_decref(reply);
	return 0;
}
