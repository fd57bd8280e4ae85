/*
 * fuzz_destinations: the destinations file (supervisor/destination.c).
 * destinations_load() reads a path and picks JSON or YAML by the ".json"
 * extension, so each input is written to a memfd and loaded twice: through
 * a symlink named d.json (JSON) and through /proc/self/fd/N (YAML).  The
 * symlink lives in a private directory made once per process under
 * $TMPDIR (default /tmp) and removed at exit.  Then destination_resolve()
 * runs for every tenant and destination name in the loaded object, and
 * for a name that is not there, with loopback allowed and not, and with
 * and without a connectivity proxy (OnPremise).
 *
 * Checked: a refused file says why; a loaded one has the promised shape;
 * a resolved destination is a complete proxy configuration consistent with
 * the settings, and a refused one has SAP's reason and a message.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fuzz.h"
#include "log.h"
#include "secret.h"
#include "supervisor.h"

static int	 memfd = -1;
static char	 dir[256], link_json[300], path_yaml[64];

static void
cleanup(void)
{
	unlink(link_json);
	rmdir(dir);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	const char	*tmp = getenv("TMPDIR");
	char		 target[64];

	log_init("fuzz_destinations", LOG_LEVEL_ERROR);
	secret_install();		/* as tpmaild does */
	if ((memfd = memfd_create("fuzz-destinations", MFD_CLOEXEC)) == -1) {
		perror("memfd_create");
		exit(1);
	}
	snprintf(dir, sizeof(dir), "%s/fuzz-destinations.XXXXXX",
	    tmp && tmp[0] ? tmp : "/tmp");
	if (mkdtemp(dir) == NULL) {
		perror("mkdtemp");
		exit(1);
	}
	snprintf(target, sizeof(target), "/proc/self/fd/%d", memfd);
	snprintf(path_yaml, sizeof(path_yaml), "%s", target);
	snprintf(link_json, sizeof(link_json), "%s/d.json", dir);
	if (symlink(target, link_json) == -1) {
		perror("symlink");
		rmdir(dir);
		exit(1);
	}
	atexit(cleanup);
	return 0;
}

static void
put(const uint8_t *data, size_t size)
{
	size_t	off = 0;
	ssize_t	n;

	if (ftruncate(memfd, 0) == -1)
		abort();
	while (off < size) {
		n = pwrite(memfd, data + off, size - off, (off_t)off);
		if (n == -1 && errno == EINTR)
			continue;
		if (n <= 0)
			abort();
		off += (size_t)n;
	}
}

static const char *const reasons[] = {
	"ConfigurationError-ReferencedDestination-NotFound",
	"ConfigurationError-ReferencedDestination-TypeNotSupported",
	"ConfigurationError-ReferencedDestination-ProxyTypeNotSupported",
	"ConfigurationError-ReferencedDestination-LoopbackUrlNotSupported",
	"ConfigurationError-ReferencedDestination-AuthenticationNotSupported",
	"ConfigurationError-ReferencedDestination-PropertyInvalid",
	"ConfigurationFailed",
	"ConfigurationError-ReferencedFragment-NotFound",
};

static void
resolve(json_t *dests, const char *tenant, const char *name,
    const char *fragment, const struct settings *st, json_t *want)
{
	char		 msg[1024];
	const char	*reason = NULL, *v;
	json_t		*r, *up, *auth;
	size_t		 i;
	int		 ok = 0;
	json_int_t	 port;

	msg[0] = '\0';
	r = destination_resolve(dests, tenant, name, fragment, 0, st, &reason,
	    msg, sizeof(msg));
	if (r == NULL) {
		for (i = 0; reason && i < sizeof(reasons) / sizeof(reasons[0]); i++)
			if (strcmp(reason, reasons[i]) == 0)
				ok = 1;
		FUZZ_CHECK(ok, "refused with reason %s", reason ? reason : "(none)");
		FUZZ_CHECK(msg[0] != '\0', "refused (%s) without a message", reason);
		FUZZ_CHECK(want != NULL || strcmp(reason, reasons[0]) == 0 ||
		    (fragment != NULL && strcmp(reason, reasons[7]) == 0),
		    "missing destination refused with %s", reason);
		return;
	}
	FUZZ_CHECK(want != NULL, "resolved a destination that is not there");
	up = json_object_get(r, "upstream");
	auth = json_object_get(r, "auth");
	v = json_string_value(json_object_get(r, "protocol"));
	FUZZ_CHECK(v && (!strcmp(v, "pop3") || !strcmp(v, "pop3s")),
	    "protocol %s", v ? v : "(none)");
	FUZZ_CHECK(strcmp(v, json_string_value(json_object_get(want,
	    "mail.transport.protocol"))) == 0, "protocol changed");
	v = json_string_value(json_object_get(up, "host"));
	FUZZ_CHECK(v && v[0], "no upstream host");
	port = json_integer_value(json_object_get(up, "port"));
	FUZZ_CHECK(port >= 1 && port <= 65535, "upstream port %lld",
	    (long long)port);
	v = json_string_value(json_object_get(up, "tls"));
	FUZZ_CHECK(v && (!strcmp(v, "none") || !strcmp(v, "implicit") ||
	    !strcmp(v, "starttls") || !strcmp(v, "starttls-required")),
	    "tls %s", v ? v : "(none)");
	if (strcmp(json_string_value(json_object_get(r, "protocol")),
	    "pop3s") == 0)
		FUZZ_CHECK(strcmp(v, "implicit") == 0, "pop3s without TLS");
	FUZZ_CHECK(json_is_boolean(json_object_get(up, "verify_host")),
	    "verify_host");
	v = json_string_value(json_object_get(auth, "method"));
	FUZZ_CHECK(v != NULL, "no auth method");
	if (strcmp(v, "none") != 0 && strcmp(v, "oauth2") != 0 &&
	    strcmp(v, "exchange") != 0)
		FUZZ_CHECK(json_string_value(json_object_get(auth, "user")) &&
		    json_is_string(json_object_get(auth, "password")),
		    "method %s without user/password", v);
	/* the destination's own password, or none: never another's */
	if (json_is_string(json_object_get(auth, "password")))
		FUZZ_CHECK(json_equal(json_object_get(auth, "password"),
		    json_object_get(want, "mail.password")), "password mixed up");
	json_decref(r);
}

/*
 * Fragment frag of tenant merged into each of its destinations: the
 * reference merge (the fragment's properties win, but its FragmentName)
 * is what the resolution must match.  The last fragment of a name wins.
 */
static void
with_fragment(json_t *dests, const char *tenant, json_t *frag,
    const struct settings *st)
{
	const char	*fname = json_string_value(json_object_get(frag,
			    "FragmentName")), *name, *key;
	json_t		*d, *want, *v, *last = NULL;
	size_t		 i;

	json_array_foreach(json_object_get(dests, tenant), i, d)
		if (json_is_string(json_object_get(d, "FragmentName")) &&
		    strcmp(json_string_value(json_object_get(d,
		    "FragmentName")), fname) == 0)
			last = d;
	if (last != frag)
		return;
	json_array_foreach(json_object_get(dests, tenant), i, d) {
		if ((name = json_string_value(json_object_get(d, "Name"))) ==
		    NULL || destination_find(dests, tenant, name) != d)
			continue;
		want = json_deep_copy(d);
		json_object_foreach(frag, key, v)
			if (strcmp(key, "FragmentName") != 0)
				json_object_set(want, key, v);
		resolve(dests, tenant, name, fname, st, want);
		json_decref(want);
	}
}

static void
resolve_all(json_t *dests)
{
	struct settings	 st;
	json_t		*arr, *d;
	const char	*tenant;
	size_t		 i;
	int		 loop, cp;

	for (loop = 0; loop <= 1; loop++)
		for (cp = 0; cp <= 1; cp++) {
			memset(&st, 0, sizeof(st));
			st.allow_loopback = loop;
			st.connectivity_proxy = cp ? "connectivity-proxy:20004" : NULL;
			st.connectivity_key = cp ? "connectivity-key.json" : NULL;
			json_object_foreach(dests, tenant, arr) {
				json_array_foreach(arr, i, d) {
					const char *name = json_string_value(
					    json_object_get(d, "Name"));

					if (name == NULL) {
						/* a fragment: on each destination */
						with_fragment(dests, tenant, d,
						    &st);
						continue;
					}
					/* the last of that name wins */
					resolve(dests, tenant, name, NULL, &st,
					    destination_find(dests, tenant, name));
				}
				resolve(dests, tenant, "no-such-destination", NULL,
				    &st, destination_find(dests, tenant,
				    "no-such-destination"));
				resolve(dests, tenant, "no-such-destination",
				    "no-such-fragment", &st, NULL);
			}
			resolve(dests, "no-such-tenant", "example-dest-pop3",
			    NULL, &st, NULL);
		}
}

static void
load(const char *path)
{
	char		 err[512];	/* reconcile_all's */
	json_t		*dests, *arr, *d, *v;
	const char	*tenant, *key;
	size_t		 i;

	err[0] = '\0';
	if ((dests = destinations_load(path, err, sizeof(err))) == NULL) {
		FUZZ_CHECK(err[0] != '\0', "refused without a message");
		return;
	}
	FUZZ_CHECK(json_is_object(dests), "not an object");
	json_object_foreach(dests, tenant, arr) {
		FUZZ_CHECK(json_is_array(arr), "tenant %s: not an array", tenant);
		json_array_foreach(arr, i, d) {
			/* a destination or a fragment, never both */
			FUZZ_CHECK(json_is_string(json_object_get(d, "Name")) !=
			    json_is_string(json_object_get(d, "FragmentName")),
			    "tenant %s [%zu]: neither or both of Name and "
			    "FragmentName", tenant, i);
			json_object_foreach(d, key, v)
				FUZZ_CHECK(json_is_string(v), "property %s", key);
		}
	}
	resolve_all(dests);
	json_decref(dests);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	put(data, size);
	load(link_json);
	load(path_yaml);
	return 0;
}
