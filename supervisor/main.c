/*
 * main.c: tpmaild, the supervisor, in standalone mode.  Runs in the
 * foreground (as in a container), logs to stderr, and on SIGTERM or SIGINT
 * drains every tenant proxy and exits 0 once all are gone.
 */
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/capability.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "supervisor.h"
#include "secret.h"

struct supervisor	*sup;
static struct event	*stop_timer;

static void
supervisor_check_done(void)
{
	if (sup->stopping && services_alive() == 0)
		event_base_loopexit(sup->base, NULL);
}

static void
supervisor_stop_timeout_cb(evutil_socket_t fd, short ev, void *arg)
{
	struct service	*sv;

	struct retired	*rt;

	TAILQ_FOREACH(sv, &sup->services, sv_entry)
		if (sv->sv_pid > 0) {
			log_warnx("service %s: pid %d still running after the "
			    "grace period; killing it", sv->sv_key, (int)sv->sv_pid);
			kill(sv->sv_pid, SIGKILL);
		}
	TAILQ_FOREACH(rt, &sup->retired, rt_entry)
		kill(rt->rt_pid, SIGKILL);
}

/*
 * SIGHUP: the settings again, from the config file and the same flags.
 * Limits, log settings, the sandbox mode and the trust store apply at once
 * (running proxies get the new limits for new sessions); what would move
 * an endpoint or a directory needs a restart and is reported.
 */
static void
supervisor_reload(void)
{
	struct settings	 ns, *st = &sup->st;

	optind = 0;
	if (settings_load(&ns, sup->argc, sup->argv) == -1) {
		log_warnx("SIGHUP: the configuration does not load; keeping the "
		    "current one");
		settings_free(&ns);
		return;
	}
	if (strcmp(ns.crs_dir, st->crs_dir) || strcmp(ns.destinations,
	    st->destinations) || strcmp(ns.state_dir, st->state_dir) ||
	    strcmp(ns.control, st->control) || strcmp(ns.listen_address,
	    st->listen_address) || ns.port_min != st->port_min ||
	    ns.port_max != st->port_max || ns.uid_base != st->uid_base ||
	    strcmp(ns.proxy_path, st->proxy_path) ||
	    (ns.http == NULL) != (st->http == NULL) ||
	    (ns.http && strcmp(ns.http, st->http)))
		log_warnx("SIGHUP: directories, endpoints, ports, uid base, "
		    "proxy path and HTTP address change only with a restart");
	st->log_level = ns.log_level;
	st->log_json = ns.log_json;
	st->connect_timeout = ns.connect_timeout;
	st->auth_timeout = ns.auth_timeout;
	st->idle_timeout = ns.idle_timeout;
	st->max_sessions = ns.max_sessions;
	st->max_line = ns.max_line;
	st->max_buffer = ns.max_buffer;
	st->drain_grace = ns.drain_grace;
	st->backoff_max = ns.backoff_max;
	st->sandbox_strict = ns.sandbox_strict;
	st->poll_interval = ns.poll_interval;
	free(st->system_ca);
	st->system_ca = ns.system_ca;
	ns.system_ca = NULL;
	free(st->service_ca);
	st->service_ca = ns.service_ca;
	ns.service_ca = NULL;
	settings_free(&ns);
	log_set_level(st->log_level);
	log_set_json(st->log_json);
	services_set_log_level(st->log_level);
}

static void
supervisor_signal_cb(evutil_socket_t sig, short ev, void *arg)
{
	struct service	*sv, *next;

	if (sig == SIGCHLD) {
		child_reap();
		supervisor_check_done();
		return;
	}
	if (sig == SIGHUP) {
		log_info("SIGHUP: re-reading the configuration, CRs and destinations");
		supervisor_reload();
		reconcile_all();
		return;
	}
	if (sup->stopping)
		return;
	log_info("signal %d: stopping %d tenant proxies", (int)sig,
	    services_alive());
	sup->stopping = 1;
	if (sup->st.kubernetes)
		k8s_stop();
	crdir_stop();
	control_stop();
	http_stop();
	destsvc_stop();
	TAILQ_FOREACH_SAFE(sv, &sup->services, sv_entry, next)
		service_stop(sv);
	stop_timer = evtimer_new(sup->base, supervisor_stop_timeout_cb, NULL);
	event_add(stop_timer, &(struct timeval){ sup->st.drain_grace + 1, 0 });
	supervisor_check_done();
}

/*
 * The tenant proxies' root: an empty directory owned by root and writable
 * by nobody, so a chrooted proxy sees no file at all.
 */
static void
supervisor_empty_dir(void)
{
	struct dirent	*de;
	DIR		*d;

	if (geteuid() != 0)
		return;
	if (mkdir(sup->st.empty_dir, 0555) == -1 && errno != EEXIST)
		fatal("mkdir %s", sup->st.empty_dir);
	if (chown(sup->st.empty_dir, 0, 0) == -1 ||
	    chmod(sup->st.empty_dir, 0555) == -1)
		fatal("%s", sup->st.empty_dir);
	if ((d = opendir(sup->st.empty_dir)) == NULL)
		fatal("opendir %s", sup->st.empty_dir);
	while ((de = readdir(d)) != NULL)
		if (strcmp(de->d_name, ".") != 0 && strcmp(de->d_name, "..") != 0)
			fatalx("%s must be empty: the tenant proxies are "
			    "confined to it", sup->st.empty_dir);
	closedir(d);
}

/*
 * tpmaild holds every tenant's credentials: no core dumps, no ptrace by
 * same-uid processes.  As root it keeps only the capabilities it still
 * needs once started, in every set including the bounding set, which is
 * also all a tenant proxy starts with after exec:
 *   SETUID, SETGID, SYS_CHROOT, SETPCAP  the proxies' own privilege drop
 *   NET_BIND_SERVICE                     endpoints below 1024 for new CRs
 *   KILL                                 signalling proxies of other uids
 *   DAC_READ_SEARCH                      reading CR, CA and destination files
 */
static void
supervisor_drop_privileges(void)
{
	static const cap_value_t keep[] = {
		CAP_SETUID, CAP_SETGID, CAP_SYS_CHROOT, CAP_SETPCAP,
		CAP_NET_BIND_SERVICE, CAP_KILL, CAP_DAC_READ_SEARCH,
	};
	struct rlimit	rl = { 0, 0 };
	cap_value_t	c;
	cap_t		caps;
	size_t		i;
	int		kept;

	if (setrlimit(RLIMIT_CORE, &rl) == -1)
		fatal("setrlimit(RLIMIT_CORE)");
	if (prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == -1)
		fatal("prctl(PR_SET_DUMPABLE)");
	if (geteuid() != 0)
		return;
	for (c = 0; c < cap_max_bits(); c++) {
		for (kept = 0, i = 0; i < sizeof(keep) / sizeof(keep[0]); i++)
			if (keep[i] == c)
				kept = 1;
		if (!kept && cap_drop_bound(c) == -1 && errno != EINVAL)
			fatal("cap_drop_bound(%d)", (int)c);
	}
	if ((caps = cap_init()) == NULL)
		fatal("cap_init");
	if (cap_set_flag(caps, CAP_PERMITTED, sizeof(keep) / sizeof(keep[0]),
	    keep, CAP_SET) == -1 || cap_set_flag(caps, CAP_EFFECTIVE,
	    sizeof(keep) / sizeof(keep[0]), keep, CAP_SET) == -1 ||
	    cap_set_proc(caps) == -1)
		fatal("cap_set_proc");
	cap_free(caps);
}

int
main(int argc, char *argv[])
{
	struct event	*sigs[4];
	int		 signos[4] = { SIGTERM, SIGINT, SIGCHLD, SIGHUP }, i;
	struct stat	 sb;
	sigset_t	 mask;
	json_t		*rv;
	size_t		 ri;

	log_init("tpmaild", LOG_LEVEL_INFO);
	secret_install();
	if ((sup = calloc(1, sizeof(*sup))) == NULL)
		fatal("calloc");
	if (settings_load(&sup->st, argc, argv) == -1)
		return 2;
	sup->argc = argc;
	sup->argv = argv;
	log_set_level(sup->st.log_level);
	log_set_json(sup->st.log_json);
	signal(SIGPIPE, SIG_IGN);
	/* a parent may have left these blocked; we depend on them */
	sigemptyset(&mask);
	for (i = 0; i < 4; i++)
		sigaddset(&mask, signos[i]);
	sigprocmask(SIG_UNBLOCK, &mask, NULL);
	TAILQ_INIT(&sup->services);
	TAILQ_INIT(&sup->retired);
	sup->rejected = json_array();

	if (!sup->st.kubernetes && (stat(sup->st.crs_dir, &sb) == -1 ||
	    !S_ISDIR(sb.st_mode)))
		fatalx("--crs %s: not a directory", sup->st.crs_dir);

	if (mkdir(sup->st.state_dir, 0700) == -1 && errno != EEXIST)
		fatal("cannot create state directory %s", sup->st.state_dir);
	if (access(sup->st.proxy_path, X_OK) == -1)
		fatal("proxy binary %s", sup->st.proxy_path);
	supervisor_empty_dir();

	if ((sup->base = event_base_new()) == NULL)
		fatalx("event_base_new");
	for (i = 0; i < 4; i++) {
		sigs[i] = evsignal_new(sup->base, signos[i], supervisor_signal_cb,
		    NULL);
		evsignal_add(sigs[i], NULL);
	}
	ports_load();
	httpc_init();
	json_array_foreach(sup->st.resolve, ri, rv)
		httpc_add_resolve(json_string_value(rv));
	destsvc_start();
	cashare_start();
	control_start();
	supervisor_drop_privileges();
	if (sup->st.kubernetes)
		k8s_start();
	crdir_start();
	if (http_start() == -1)
		fatalx("cannot start the HTTP endpoint");
	if (!sup->st.kubernetes)
		log_info("standalone mode: CRs in %s, destinations in %s, "
		    "control %s", sup->st.crs_dir, sup->st.destinations,
		    sup->st.control);
	reconcile_all();

	event_base_dispatch(sup->base);

	log_info("all tenant proxies stopped; exiting");
	/* a late signal must not kill us between here and exit(0) */
	sigprocmask(SIG_BLOCK, &mask, NULL);
	for (i = 0; i < 4; i++)
		event_free(sigs[i]);
	if (stop_timer != NULL)
		event_free(stop_timer);
	cashare_clear();	/* its timer belongs to the base */
	event_base_free(sup->base);
	json_decref(sup->rejected);
	json_decref(sup->destinations);
	json_decref(sup->ports);
	return 0;
}
