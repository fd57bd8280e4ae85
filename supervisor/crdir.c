/*
 * crdir.c: the standalone CR source.  Destination CRs are YAML or JSON files
 * in a directory; the directory and the destinations file are watched with
 * inotify, and any change triggers one debounced reconcile (so an editor's
 * write-rename-chmod burst costs one pass).  Runs in the supervisor.
 */
#include <dirent.h>
#include <errno.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <unistd.h>

#include "log.h"
#include "supervisor.h"
#include "yaml_json.h"

#define CRDIR_DEBOUNCE_MS	150

static int		 crdir_fd = -1, crdir_wd = -1, dest_wd = -1;
static struct event	*crdir_ev, *crdir_timer;
static char		*dest_base;

static void
crdir_timer_cb(evutil_socket_t fd, short ev, void *arg)
{
	reconcile_all();
}

static void
crdir_schedule(void)
{
	event_add(crdir_timer, &(struct timeval){ 0, CRDIR_DEBOUNCE_MS * 1000 });
}

static int	crdir_wanted(const char *);

/* Does this event concern a CR file or the destinations file? */
static int
crdir_relevant(const struct inotify_event *ie)
{
	if (ie->wd == crdir_wd)
		return ie->len == 0 || crdir_wanted(ie->name);
	if (ie->wd == dest_wd)
		return ie->len > 0 && dest_base != NULL &&
		    strcmp(ie->name, dest_base) == 0;
	return 0;
}

static void
crdir_read_cb(evutil_socket_t fd, short ev, void *arg)
{
	char			 buf[8192]
	    __attribute__((aligned(__alignof__(struct inotify_event))));
	const struct inotify_event *ie;
	ssize_t			 n;
	char			*p;
	int			 relevant = 0;

	while ((n = read(crdir_fd, buf, sizeof(buf))) > 0) {
		for (p = buf; p < buf + n; p += sizeof(*ie) + ie->len) {
			ie = (const struct inotify_event *)p;
			if (ie->mask & IN_Q_OVERFLOW)
				relevant = 1;
			else if (crdir_relevant(ie))
				relevant = 1;
		}
	}
	if (n == -1 && errno != EAGAIN)
		log_warn("inotify read");
	/* which file changed does not matter: all are re-read */
	if (relevant)
		crdir_schedule();
}

void
crdir_start(void)
{
	char	*d1, *d2;

	if ((crdir_fd = inotify_init1(IN_NONBLOCK | IN_CLOEXEC)) == -1)
		fatal("inotify_init1");
	if (sup->st.crs_dir != NULL &&
	    (crdir_wd = inotify_add_watch(crdir_fd, sup->st.crs_dir, IN_CREATE | IN_DELETE |
	    IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_MODIFY |
	    IN_ATTRIB | IN_DELETE_SELF | IN_MOVE_SELF)) == -1)
		fatal("cannot watch %s", sup->st.crs_dir);
	crdir_ev = event_new(sup->base, crdir_fd, EV_READ | EV_PERSIST,
	    crdir_read_cb, NULL);
	crdir_timer = evtimer_new(sup->base, crdir_timer_cb, NULL);
	event_add(crdir_ev, NULL);
	if (sup->st.destinations == NULL)
		return;
	/* watch the destinations file's directory: editors replace files */
	d1 = strdup(sup->st.destinations);
	d2 = strdup(sup->st.destinations);
	dest_base = strdup(basename(d2));
	if ((dest_wd = inotify_add_watch(crdir_fd, dirname(d1), IN_CREATE |
	    IN_DELETE | IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM |
	    IN_MODIFY)) == -1)
		log_warn("cannot watch the directory of %s", sup->st.destinations);
	free(d1);
	free(d2);
}

void
crdir_stop(void)
{
	if (crdir_ev != NULL)
		event_free(crdir_ev);
	if (crdir_timer != NULL)
		event_free(crdir_timer);
	crdir_ev = crdir_timer = NULL;
	if (crdir_fd != -1)
		close(crdir_fd);
	crdir_fd = -1;
	free(dest_base);
	dest_base = NULL;
}

static int
crdir_wanted(const char *name)
{
	const char	*dot = strrchr(name, '.');

	if (name[0] == '.' || dot == NULL)
		return 0;
	return strcmp(dot, ".yaml") == 0 || strcmp(dot, ".yml") == 0 ||
	    strcmp(dot, ".json") == 0;
}

static int
crdir_cmp(const void *a, const void *b)
{
	return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Every CR in the directory, in file-name order; failures go to rejected. */
struct cr **
crdir_load(size_t *ncrs, json_t *rejected)
{
	DIR		 *dir;
	struct dirent	 *de;
	char		**names = NULL, *path, *label, err[512];
	size_t		  nnames = 0, i, j, k, n = 0;
	struct cr	**crs = NULL, *cr;
	json_t		 *docs, *doc;

	if ((dir = opendir(sup->st.crs_dir)) == NULL) {
		log_warn("cannot read %s", sup->st.crs_dir);
		*ncrs = 0;
		return NULL;
	}
	while ((de = readdir(dir)) != NULL) {
		if (!crdir_wanted(de->d_name))
			continue;
		names = reallocarray(names, nnames + 1, sizeof(*names));
		names[nnames++] = strdup(de->d_name);
	}
	closedir(dir);
	if (nnames > 0)
		qsort(names, nnames, sizeof(*names), crdir_cmp);
	for (i = 0; i < nnames; i++) {
		if (asprintf(&path, "%s/%s", sup->st.crs_dir, names[i]) == -1)
			fatal("asprintf");
		/* the file's name as shown in status: valid UTF-8 */
		label = strdup(names[i]);
		utf8_clean(label);
		if ((docs = yaml_json_load_file(path, err, sizeof(err))) == NULL) {
			sup->source_errors++;
			utf8_clean(err);
			log_warnx("%s: %s", path, err);
			json_array_append_new(rejected, json_pack(
			    "{s:n,s:n,s:s,s:s++,s:s}", "namespace", "cr",
			    "reason", "ConfigurationError-CustomResource-Invalid",
			    "error", label, ": ", err, "source", label));
			free(label);
			free(path);
			continue;
		}
		json_array_foreach(docs, j, doc) {
			if ((cr = cr_parse(doc, label, rejected)) == NULL)
				continue;
			for (k = 0; k < n; k++)
				if (strcmp(crs[k]->cr_namespace, cr->cr_namespace) == 0 &&
				    strcmp(crs[k]->cr_name, cr->cr_name) == 0)
					break;
			if (k < n) {
				json_array_append_new(rejected, json_pack(
				    "{s:s,s:s,s:s,s:s+++,s:s}", "namespace",
				    cr->cr_namespace, "cr", cr->cr_name, "reason",
				    "ConfigurationError-K8sResourceWithNameAlreadyPresent",
				    "error", "a CR with this name is already defined in ",
				    crs[k]->cr_source, "; this one in ", label,
				    "source", label));
				cr_free(cr);
				continue;
			}
			crs = reallocarray(crs, n + 1, sizeof(*crs));
			crs[n++] = cr;
		}
		json_decref(docs);
		free(path);
		free(label);
	}
	for (i = 0; i < nnames; i++)
		free(names[i]);
	free(names);
	*ncrs = n;
	return crs;
}
