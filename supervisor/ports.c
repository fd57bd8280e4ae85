/*
 * ports.c: stable listening endpoints.  Each tenant service keeps its port
 * across restarts of tpmaild: the allocation is persisted in the state
 * directory (ports.json) and the socket is bound here, in the supervisor,
 * so a child never needs the privilege to bind.  Runs in the supervisor.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "log.h"
#include "supervisor.h"

static char *
ports_path(void)
{
	char	*p;

	if (asprintf(&p, "%s/ports.json", sup->st.state_dir) == -1)
		fatal("asprintf");
	return p;
}

void
ports_load(void)
{
	json_error_t	 jerr;
	char		*path = ports_path();

	sup->ports = json_load_file(path, 0, &jerr);
	if (sup->ports == NULL || !json_is_object(sup->ports)) {
		if (access(path, F_OK) == 0)
			log_warnx("%s: unreadable (%s); allocating ports anew",
			    path, jerr.text);
		json_decref(sup->ports);
		sup->ports = json_object();
	}
	free(path);
}

static void
ports_save(void)
{
	char	*path = ports_path(), *tmp;

	if (asprintf(&tmp, "%s.tmp", path) == -1)
		fatal("asprintf");
	if (json_dump_file(sup->ports, tmp, JSON_INDENT(2) | JSON_SORT_KEYS) == -1 ||
	    rename(tmp, path) == -1)
		log_warn("cannot save %s", path);
	free(tmp);
	free(path);
}

static int
port_taken(int port, const char *except)
{
	const char	*key;
	json_t		*v;

	json_object_foreach(sup->ports, key, v)
		if (json_integer_value(v) == port && strcmp(key, except) != 0)
			return 1;
	return 0;
}

static int
bind_port(int port)
{
	struct sockaddr_in	sin;
	int			fd, one = 1;

	memset(&sin, 0, sizeof(sin));
	sin.sin_family = AF_INET;
	sin.sin_port = htons(port);
	if (inet_pton(AF_INET, sup->st.listen_address, &sin.sin_addr) != 1) {
		errno = EINVAL;
		return -1;
	}
	if ((fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0)) == -1)
		return -1;
	setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(fd, (struct sockaddr *)&sin, sizeof(sin)) == -1 ||
	    listen(fd, 511) == -1) {
		int	saved = errno;

		close(fd);
		errno = saved;
		return -1;
	}
	return fd;
}

/* Bind the service's endpoint: its remembered port, or a new one. */
int
ports_bind(struct service *sv)
{
	json_t	*v = json_object_get(sup->ports, sv->sv_key);
	int	 port, fd, wait;

	if (sup->st.kubernetes) {
		/* the proxy-namespace Service records the port */
		if ((port = k8s_port_for(sv, &wait)) <= 0) {
			errno = wait ? EAGAIN : EADDRNOTAVAIL;
			return -1;
		}
		if ((fd = bind_port(port)) == -1) {
			log_warn("service %s: cannot bind %s:%d", sv->sv_key,
			    sup->st.listen_address, port);
			return -1;
		}
		sv->sv_port = port;
		sv->sv_lfd = fd;
		return 0;
	}
	if (v != NULL) {
		port = json_integer_value(v);
		if ((fd = bind_port(port)) == -1) {
			log_warn("service %s: cannot bind its port %s:%d",
			    sv->sv_key, sup->st.listen_address, port);
			return -1;
		}
		sv->sv_port = port;
		sv->sv_lfd = fd;
		return 0;
	}
	for (port = sup->st.port_min; port <= sup->st.port_max; port++) {
		if (port_taken(port, sv->sv_key))
			continue;
		if ((fd = bind_port(port)) == -1)
			continue;
		sv->sv_port = port;
		sv->sv_lfd = fd;
		json_object_set_new(sup->ports, sv->sv_key, json_integer(port));
		ports_save();
		return 0;
	}
	errno = EADDRNOTAVAIL;
	log_warnx("service %s: no free port in %d-%d", sv->sv_key,
	    sup->st.port_min, sup->st.port_max);
	return -1;
}

void
ports_release(const char *key)
{
	if (json_object_del(sup->ports, key) == 0)
		ports_save();
}
