/*
 * supervisor.h: tpmaild, the supervisor.  It owns everything privileged and
 * everything that reads configuration: the CR source, the destinations, the
 * listening sockets, and the tenant proxies it starts, feeds and restarts.
 */
#ifndef TPMAIL_SUPERVISOR_H
#define TPMAIL_SUPERVISOR_H

#include <sys/queue.h>
#include <sys/types.h>

#include <event2/event.h>
#include <event2/bufferevent.h>
#include <jansson.h>

#ifndef TAILQ_FOREACH_SAFE
#define TAILQ_FOREACH_SAFE(var, head, field, tvar)			\
	for ((var) = TAILQ_FIRST(head);					\
	    (var) != NULL && ((tvar) = TAILQ_NEXT(var, field), 1);	\
	    (var) = (tvar))
#endif

#define TPMAIL_ANNOTATION_TENANTS \
	"transparent-proxy.connectivity.api.sap/tenant-subdomains"
#define TPMAIL_CR_API_VERSION	"destination.connectivity.api.sap/v1"
#define TPMAIL_PROVIDER_TENANT	"provider"

/* Settings from flags and the config file (flags win). */
struct settings {
	char	*crs_dir;
	char	*destinations;
	char	*state_dir;
	char	*control;
	char	*config_file;
	char	*listen_address;
	int	 port_min;
	int	 port_max;
	char	*proxy_path;
	int	 log_level;
	int	 log_json;
	int	 connect_timeout;
	int	 auth_timeout;
	int	 idle_timeout;
	int	 max_sessions;
	int	 max_line;
	int	 max_buffer;
	int	 backoff_max;
	int	 drain_grace;
	int	 allow_loopback;
	int	 uid_base;		/* tenant uid/gid = base + port offset */
	int	 sandbox_strict;
	char	*system_ca;		/* the system CA bundle, for system trust */
	char	*empty_dir;		/* the tenant proxies' chroot */
	char	*http;			/* ADDR:PORT of /healthz /readyz /metrics */
	char	*service_keys;		/* Destination service keys, per instance */
	char	*default_instance;
	int	 poll_interval;
	char	*connectivity_proxy;	/* HOST:PORT of its SOCKS5 endpoint */
	char	*connectivity_key;	/* its service key file */
	json_t	*resolve;		/* HOST:PORT:ADDR strings (curl --resolve) */
	char	*service_ca;		/* CA file for the control plane, or NULL */
	int	 kubernetes;		/* CRs from the API server, not files */
	char	*kube_api;
	char	*kube_ca;
	char	*kube_token_file;
	char	*namespace;		/* the proxy's own */
	char	*pod_selector;		/* k=v,... of the tpmail pods */
	char	*watch_namespaces;	/* a,b,... or NULL: all */
	char	*identity;		/* for the Lease */
	int	 lease_duration;
	int	 allow_loopback_set;	/* 1 / -1 when given, 0 for the default */
};

/* One validated Destination CR. */
struct cr {
	char	*cr_namespace;
	char	*cr_name;
	char	*cr_dest;		/* spec.destinationRef.name */
	char	*cr_instance;		/* spec.destinationServiceInstanceName */
	char	*cr_level;		/* spec.destinationRef.level, or NULL */
	char	*cr_fragment;		/* spec.fragmentRef.name, or NULL */
	int	 cr_fragment_optional;	/* spec.fragmentRef.optional */
	int	 cr_port;		/* spec.service.port, or the protocol's */
	json_t	*cr_tenants;		/* array of subdomains; NULL: dedicated */
	char	*cr_source;		/* file it came from */
	char	*cr_restart;		/* the restart annotation's value */
};

/* Changing this annotation restarts the CR's proxies, as `kubectl rollout
 * restart` does for a Deployment (the value is usually a timestamp). */
#define TPMAIL_ANNOTATION_RESTART	"tpmail.io/restartedAt"

enum service_state {
	SERVICE_STARTING,
	SERVICE_RUNNING,
	SERVICE_BACKOFF,
	SERVICE_FAILED,
	SERVICE_STOPPING,
	SERVICE_DRAINED,	/* taken out of service by an operator */
};

/* One tenant service: a listening socket and the proxy serving it. */
struct service {
	TAILQ_ENTRY(service)	 sv_entry;
	char			*sv_key;	/* namespace/name */
	char			*sv_namespace;
	char			*sv_name;
	char			*sv_cr;
	char			*sv_tenant;	/* NULL: dedicated */
	char			*sv_instance;	/* Destination service instance */
	char			*sv_dest;	/* destination name */
	char			*sv_level;	/* and the CR's level, fragment */
	char			*sv_fragment;
	int			 sv_fragment_optional;
	int			 sv_exchanges;	/* token exchanges in flight */
	char			*sv_restart;	/* restart annotation last acted on */
	json_t			*sv_config;	/* what the proxy gets (secrets!) */
	char			*sv_ca;		/* trust store file, NULL without TLS */
	json_t			*sv_sandbox;	/* the proxy's sandbox report */
	struct bufferevent	*sv_log;	/* the proxy's stderr */
	int			 sv_port;	/* listen port */
	int			 sv_svc_port;	/* the Service port (CR) */
	int			 sv_lfd;
	pid_t			 sv_pid;
	int			 sv_chan;
	struct event		*sv_chan_ev;
	struct event		*sv_timer;	/* backoff */
	enum service_state	 sv_state;
	int			 sv_restarts;
	int			 sv_backoff;	/* seconds, next delay */
	int			 sv_backoff_now; /* the delay being waited out */
	int			 sv_desired;	/* reconcile mark */
	int			 sv_remove;	/* drop once the child is gone */
	time_t			 sv_started;
	long			 sv_active;
	long			 sv_total;
	long			 sv_failed;
	char			*sv_error;
	json_t			*sv_errors;	/* recent errors, oldest first */
	json_t			*sv_counters;	/* the current proxy's counters */
	json_t			*sv_base;	/* counters of its predecessors */
};
#define SERVICE_ERRORS_KEPT	10
TAILQ_HEAD(service_list, service);

/*
 * A proxy replaced by a graceful restart: it stops accepting and finishes
 * its sessions while the new one serves; only reaped.
 */
struct retired {
	TAILQ_ENTRY(retired)	 rt_entry;
	char			*rt_key;
	pid_t			 rt_pid;
	int			 rt_chan;
	struct event		*rt_chan_ev;
	struct bufferevent	*rt_log;
	json_t			*rt_counters;	/* its latest, until reaped */
};
TAILQ_HEAD(retired_list, retired);

struct supervisor {
	struct settings		 st;
	struct event_base	*base;
	struct service_list	 services;
	struct retired_list	 retired;
	json_t			*rejected;	/* array of {namespace,cr,reason,error} */
	json_t			*destinations;	/* last good destinations file */
	json_t			*ports;		/* "ns/name" -> port, persisted */
	int			 stopping;
	int			 argc;		/* for a reload on SIGHUP */
	char			**argv;
	int			 synced;	/* the first reconcile is done */
	unsigned long		 reconciles;
	unsigned long		 source_errors;
	unsigned long		 destination_errors;
};

extern struct supervisor	*sup;

/* settings.c */
int	 settings_load(struct settings *, int, char **);
void	 settings_free(struct settings *);

/* cr.c */
struct cr	*cr_parse(json_t *doc, const char *source, json_t *reject);
void		 cr_free(struct cr *);

/* destination.c */
json_t	*destinations_load(const char *path, char *err, size_t errsz);
json_t	*destination_find(json_t *dests, const char *tenant, const char *name);
json_t	*destination_translate(json_t *d, json_t *auth_tokens,
	    json_t *certificates, const struct settings *, const char **reason,
	    char *msg, size_t msgsz);
json_t	*destination_reply_parse(const char *body, size_t len, char *err,
	    size_t errsz);
json_t	*destination_resolve(json_t *dests, const char *tenant, const char *name,
	    const char *fragment, int fragment_optional, const struct settings *,
	    const char **reason, char *msg, size_t msgsz);

/* crdir.c */
void	 crdir_start(void);
void	 crdir_stop(void);
struct cr **crdir_load(size_t *, json_t *);

/* reconcile.c */
void	 reconcile_all(void);
void	 reconcile_schedule(void);

/* k8s.c */
void	 k8s_start(void);
void	 k8s_stop(void);
int	 k8s_is_leader(void);
int	 k8s_synced(void);
struct cr **k8s_load_crs(size_t *, json_t *);
int	 k8s_port_for(struct service *, int *wait);
int	 k8s_clash(const char *ns, const char *name);
void	 k8s_after_reconcile(void);
void	 k8s_service_event(struct service *, const char *type,
	    const char *reason, const char *msg);

/* child.c */
struct service	*service_new(const char *ns, const char *name, const char *cr,
		    const char *tenant);
int	 service_start(struct service *);
void	 service_update(struct service *, json_t *config, const char *ca);
void	 service_stop(struct service *);
int	 service_restart(struct service *, int hard);
int	 service_drain(struct service *);
void	 service_free(struct service *);
void	 child_reap(void);
const char *service_state_name(enum service_state);
int	 services_alive(void);
int	 services_port_in_use(int);
void	 service_note_error(struct service *, const char *);
void	 services_set_log_level(int);
void	 services_ca_changed(const char *path);

/* cashare.c: a CA file as a sealed memory file the proxies share */
int	 cashare_open(const char *path);
void	 cashare_start(void);
void	 cashare_clear(void);

/* ports.c */
void	 ports_load(void);
int	 ports_bind(struct service *);
void	 ports_release(const char *key);

/* httpc.c */
typedef void	(*httpc_cb)(long status, const char *body, size_t len,
		    const char *err, void *arg);
typedef void	(*httpc_line_cb)(const char *line, size_t len, void *arg);
struct httpc_opts {
	const char		*url;
	const char		*method;	/* NULL: GET, or POST with a body */
	const char *const	*headers;
	const char		*body;
	const char		*user, *pass;	/* HTTP Basic */
	const char		*cert, *key;	/* mTLS, PEM */
	const char		*cafile;
	int			 timeout;	/* 0: none (watch streams) */
	httpc_line_cb		 line_cb;
};
struct httpc_req;
void	 httpc_init(void);
struct httpc_req *httpc_start(const struct httpc_opts *, httpc_cb, void *);
void	 httpc_cancel(struct httpc_req *);
void	 httpc_add_resolve(const char *);
int	 httpc_request(const char *url, const char *const *headers,
	    const char *body, const char *user, const char *pass,
	    const char *cert, const char *key, int timeout, httpc_cb, void *);
char	*httpc_escape(const char *);

/* destsvc.c */
typedef void	(*destsvc_exchange_cb)(const char *token, const char *error,
		    int temporary, void *arg);
void	 destsvc_start(void);
void	 destsvc_stop(void);
int	 destsvc_has_instance(const char *);
/* Which destination a CR names: spec.destinationRef and fragmentRef. */
struct destref {
	const char	*name;
	const char	*level;		/* NULL: the service's own lookup order */
	const char	*fragment;	/* NULL: none */
	int		 fragment_optional;
};
int	 destsvc_lookup(const char *instance, const char *tenant,
	    const struct destref *, json_t **res, const char **stale,
	    const char **reason, char *msg, size_t msgsz);
int	 destsvc_connectivity_token(const char *tenant, const char **jwt,
	    char *msg, size_t msgsz);
void	 destsvc_exchange(const char *instance, const char *tenant,
	    const struct destref *, const char *kind, const char *value,
	    destsvc_exchange_cb, void *);

/* http.c */
int	 http_start(void);
void	 http_stop(void);
void	 stats_add(json_t *acc, json_t *x);
json_t	*service_counters(struct service *);

/* control.c */
void	 control_start(void);
void	 control_stop(void);
json_t	*control_status(void);

#endif
