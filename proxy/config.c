/*
 * config.c: the tenant proxy's view of its service configuration, built from
 * the supervisor's MSG_CONFIG/MSG_UPDATE body.  The supervisor validated the
 * destination; this only checks the shape, since a malformed message from the
 * supervisor is a bug and fatal.  A configuration is reference counted: an
 * update applies to new sessions while open ones keep theirs.
 */
#include <arpa/inet.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "log.h"
#include "params.h"
#include "proxy.h"
#include "secret.h"

static int
get_int(json_t *obj, const char *key, int def, int min, int max, int *out)
{
	json_t	*v = json_object_get(obj, key);

	if (v == NULL || json_is_null(v)) {
		*out = def;
		return 0;
	}
	if (!json_is_integer(v) || json_integer_value(v) < min ||
	    json_integer_value(v) > max)
		return -1;
	*out = (int)json_integer_value(v);
	return 0;
}

static char *
get_str(json_t *obj, const char *key)
{
	const char	*s = json_string_value(json_object_get(obj, key));

	return s ? strdup(s) : NULL;
}

static const struct {
	const char	*name;
	int		 value;
} tls_names[] = {
	{ "none", UPSTREAM_TLS_NONE },
	{ "implicit", UPSTREAM_TLS_IMPLICIT },
	{ "starttls", UPSTREAM_TLS_STARTTLS },
	{ "starttls-required", UPSTREAM_TLS_STARTTLS_REQUIRED },
}, auth_names[] = {
	{ "none", UPSTREAM_AUTH_NONE },
	{ "auto", UPSTREAM_AUTH_AUTO },
	{ "user", UPSTREAM_AUTH_USER },
	{ "apop", UPSTREAM_AUTH_APOP },
	{ "plain", UPSTREAM_AUTH_PLAIN },
	{ "login", UPSTREAM_AUTH_LOGIN },
	{ "oauth2", UPSTREAM_AUTH_OAUTH2 },
	{ "exchange", UPSTREAM_AUTH_EXCHANGE },
};

static int
lookup_name(const char *s, int which, int *out)
{
	size_t	i, n = which ? sizeof(auth_names) / sizeof(auth_names[0]) :
		    sizeof(tls_names) / sizeof(tls_names[0]);

	for (i = 0; s != NULL && i < n; i++) {
		if (strcmp(s, which ? auth_names[i].name : tls_names[i].name) == 0) {
			*out = which ? auth_names[i].value : tls_names[i].value;
			return 0;
		}
	}
	return -1;
}

/* Build a configuration from a CONFIG body; NULL with *err on bad shape. */
/* The supervisor resolved the host: numeric addresses only, no DNS here. */
static int
config_addresses(struct proxy_config *c, json_t *arr, int port)
{
	struct sockaddr_in	*sin;
	struct sockaddr_in6	*sin6;
	json_t			*v;
	size_t			 i;
	const char		*a;

	json_array_foreach(arr, i, v) {
		if (c->naddrs == 4)
			break;
		if ((a = json_string_value(v)) == NULL)
			return -1;
		memset(&c->addrs[c->naddrs], 0, sizeof(c->addrs[0]));
		sin = (struct sockaddr_in *)&c->addrs[c->naddrs];
		sin6 = (struct sockaddr_in6 *)&c->addrs[c->naddrs];
		if (inet_pton(AF_INET, a, &sin->sin_addr) == 1) {
			sin->sin_family = AF_INET;
			sin->sin_port = htons(port);
			c->addrlens[c->naddrs++] = sizeof(*sin);
		} else if (inet_pton(AF_INET6, a, &sin6->sin6_addr) == 1) {
			sin6->sin6_family = AF_INET6;
			sin6->sin6_port = htons(port);
			c->addrlens[c->naddrs++] = sizeof(*sin6);
		} else
			return -1;
	}
	return c->naddrs > 0 ? 0 : -1;
}

struct proxy_config *
config_parse(json_t *body, struct trust *trust, const char **err)
{
	struct proxy_config	*c;
	json_t			*up, *auth, *lim, *socks;
	int			 v;

	if ((c = calloc(1, sizeof(*c))) == NULL) {
		trust_free(trust);
		*err = "out of memory";
		return NULL;
	}
	c->refs = 1;
	up = json_object_get(body, "upstream");
	auth = json_object_get(body, "auth");
	lim = json_object_get(body, "limits");
	c->service = get_str(body, "service");
	c->tenant = get_str(body, "tenant");
	c->host = get_str(up, "host");
	c->ca_source = get_str(up, "ca");
	c->user = get_str(auth, "user");
	c->password = secret_vault_strdup(json_string_value(json_object_get(auth,
	    "password")));
	c->token = secret_vault_strdup(json_string_value(json_object_get(auth,
	    "token")));
	c->exchange = get_str(auth, "exchange");
	socks = json_object_get(up, "socks");
	if (socks != NULL) {
		c->socks = 1;
		c->socks_jwt = secret_vault_strdup(json_string_value(
		    json_object_get(socks, "jwt")));
		c->socks_location = get_str(socks, "location");
	}
	*err = NULL;
	if (c->service == NULL || c->host == NULL)
		*err = "service or upstream.host missing";
	else if (get_int(up, "port", 0, 1, 65535, &c->port) || c->port == 0)
		*err = "upstream.port invalid";
	else if (config_addresses(c, c->socks ? json_object_get(socks,
	    "addresses") : json_object_get(up, "addresses"), c->socks ?
	    (int)json_integer_value(json_object_get(socks, "port")) : c->port) == -1)
		*err = "upstream addresses invalid";
	else if (c->socks && (c->socks_jwt == NULL || c->socks_location == NULL))
		*err = "upstream.socks needs jwt and location";
	else if (lookup_name(json_string_value(json_object_get(up, "tls")),
	    0, &v))
		*err = "upstream.tls invalid";
	else if ((c->tls = v, 0) || lookup_name(
	    json_string_value(json_object_get(auth, "method")), 1, &v))
		*err = "auth.method invalid";
	else if ((c->auth = v, 0) ||
	    (c->auth != UPSTREAM_AUTH_NONE && c->auth != UPSTREAM_AUTH_EXCHANGE &&
	    c->user == NULL))
		*err = "auth.user missing";
	else if (c->auth == UPSTREAM_AUTH_OAUTH2 && c->token == NULL)
		*err = "auth.token missing";
	else if (c->auth == UPSTREAM_AUTH_EXCHANGE && (c->exchange == NULL ||
	    (strcmp(c->exchange, "refresh") && strcmp(c->exchange, "code"))))
		*err = "auth.exchange must be refresh or code";
	else if ((c->auth == UPSTREAM_AUTH_USER || c->auth == UPSTREAM_AUTH_AUTO ||
	    c->auth == UPSTREAM_AUTH_APOP || c->auth == UPSTREAM_AUTH_PLAIN ||
	    c->auth == UPSTREAM_AUTH_LOGIN) && c->password == NULL)
		*err = "auth.password missing";
	else if ((c->verify_host = !json_is_false(json_object_get(up,
	    "verify_host")), 0) || get_int(lim, "connect_timeout", PARAM_CONNECT_TIMEOUT, 1, 3600,
	    &c->connect_timeout) ||
	    get_int(lim, "auth_timeout", PARAM_AUTH_TIMEOUT, 1, 3600,
	    &c->auth_timeout) ||
	    get_int(lim, "idle_timeout", PARAM_IDLE_TIMEOUT, 1, 86400,
	    &c->idle_timeout) ||
	    get_int(lim, "max_sessions", PARAM_MAX_SESSIONS, 1, 1000000,
	    &c->max_sessions) ||
	    get_int(lim, "max_line", PARAM_MAX_LINE, 64, 1 << 20,
	    &c->max_line) ||
	    get_int(lim, "max_buffer", PARAM_MAX_BUFFER, 4096, 1 << 30,
	    &c->max_buffer))
		*err = "limits invalid";
	/* the trust is the context's now, or freed */
	if (*err == NULL && c->tls != UPSTREAM_TLS_NONE) {
		if ((c->ssl_ctx = tls_ctx_new(trust, err)) != NULL)
			tls_ctx_bind(c->ssl_ctx, c);
	} else
		trust_free(trust);
	if (*err != NULL) {
		config_unref(c);
		return NULL;
	}
	return c;
}

void
config_ref(struct proxy_config *c)
{
	c->refs++;
}

void
config_unref(struct proxy_config *c)
{
	if (c == NULL || --c->refs > 0)
		return;
	free(c->service);
	free(c->tenant);
	free(c->host);
	free(c->ca_source);
	free(c->user);
	secret_vault_free(c->password);
	secret_vault_free(c->token);
	secret_vault_free(c->socks_jwt);
	free(c->socks_location);
	free(c->exchange);
	free(c->capa_raw);
	free(c->capa_reply);
	if (c->ssl_session != NULL)
		SSL_SESSION_free(c->ssl_session);
	if (c->ssl_ctx != NULL)
		SSL_CTX_free(c->ssl_ctx);
	free(c);
}
