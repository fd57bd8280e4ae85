/*
 * destination.c: the destinations file (the Destination service's JSON
 * shape, per tenant) and the translation of one MAIL destination into what
 * a tenant proxy needs: upstream address, TLS policy, login mechanism and
 * credentials.  Unknown or contradictory settings are refused with a message
 * naming the property, never guessed.  Runs in the supervisor.
 */
#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"
#include "secret.h"
#include "supervisor.h"
#include "yaml_json.h"

#define R_NOTFOUND	"ConfigurationError-ReferencedDestination-NotFound"
#define R_FRAGMENT	"ConfigurationError-ReferencedFragment-NotFound"
#define R_TYPE		"ConfigurationError-ReferencedDestination-TypeNotSupported"
#define R_PROXYTYPE	"ConfigurationError-ReferencedDestination-ProxyTypeNotSupported"
#define R_LOOPBACK	"ConfigurationError-ReferencedDestination-LoopbackUrlNotSupported"
#define R_AUTHTYPE	"ConfigurationError-ReferencedDestination-AuthenticationNotSupported"
#define R_PROPERTY	"ConfigurationError-ReferencedDestination-PropertyInvalid"
#define R_TRUSTSTORE	"ConfigurationError-ReferencedDestination-TrustStoreInvalid"

#define TRUST_STORE_MAX	(256 * 1024)	/* base64 Content of a trust store */

/* Load and check the file's shape: {tenant: [ {prop: "string"...} ]}. */
json_t *
destinations_load(const char *path, char *err, size_t errsz)
{
	json_t		*docs, *root, *arr, *d, *v;
	const char	*tenant, *key;
	size_t		 i;

	const char	*dot = strrchr(path, '.');
	json_error_t	 jerr;
	char		*buf;
	size_t		 len;

	if (dot != NULL && strcmp(dot, ".json") == 0) {
		/* exactly one JSON value: a wrapping list is an error here */
		if ((buf = yaml_json_read_file(path, &len, err, errsz)) == NULL)
			return NULL;
		root = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
		secret_free(buf);
		if (root == NULL) {
			snprintf(err, errsz, "JSON error: %s at line %d column %d",
			    jerr.text, jerr.line, jerr.column);
			utf8_clean(err);
			return NULL;
		}
		docs = json_array();
		json_array_append_new(docs, root);
	} else if ((docs = yaml_json_load_file(path, err, errsz)) == NULL)
		return NULL;
	root = json_array_get(docs, 0);
	if (json_array_size(docs) != 1 || !json_is_object(root)) {
		snprintf(err, errsz, "must hold one JSON object whose keys are "
		    "tenant subdomains (\"%s\" for dedicated mode)",
		    TPMAIL_PROVIDER_TENANT);
		json_decref(docs);
		return NULL;
	}
	json_incref(root);
	json_decref(docs);
	json_object_foreach(root, tenant, arr) {
		if (!json_is_array(arr)) {
			snprintf(err, errsz, "\"%s\" must be an array of "
			    "destinations", tenant);
			goto bad;
		}
		json_array_foreach(arr, i, d) {
			/* a destination has a Name, a fragment a FragmentName */
			if (!json_is_object(d) ||
			    json_is_string(json_object_get(d, "Name")) ==
			    json_is_string(json_object_get(d, "FragmentName"))) {
				snprintf(err, errsz, "\"%s\"[%zu] must be a "
				    "destination object with a Name, or a "
				    "fragment with a FragmentName", tenant, i);
				goto bad;
			}
			json_object_foreach(d, key, v) {
				if (!json_is_string(v)) {
					snprintf(err, errsz, "\"%s\"[%zu] property "
					    "%s must be a string, as the Destination "
					    "service stores it", tenant, i, key);
					goto bad;
				}
			}
		}
	}
	return root;
bad:
	json_decref(root);
	return NULL;
}

static const char *
prop(json_t *d, const char *p, const char *key)
{
	char	full[128];

	snprintf(full, sizeof(full), "mail.%s.%s", p, key);
	return json_string_value(json_object_get(d, full));
}

/* "true"/"false" only; NULL gives def; anything else is -1. */
static int
prop_bool(const char *v, int def)
{
	if (v == NULL)
		return def;
	if (strcasecmp(v, "true") == 0)
		return 1;
	if (strcasecmp(v, "false") == 0)
		return 0;
	return -1;
}

static int
is_loopback(const char *host)
{
	struct in_addr	a4;
	struct in6_addr	a6;

	if (strcasecmp(host, "localhost") == 0)
		return 1;
	if (inet_pton(AF_INET, host, &a4) == 1)
		return (ntohl(a4.s_addr) >> 24) == 127;
	if (inet_pton(AF_INET6, host, &a6) == 1)
		return IN6_IS_ADDR_LOOPBACK(&a6) || (IN6_IS_ADDR_V4MAPPED(&a6) &&
		    a6.s6_addr[12] == 127);
	return 0;
}

/* Properties tpmail reads under mail.<protocol>. */
static const char *const known_props[] = {
	"host", "port", "auth", "user", "from", "starttls.enable",
	"starttls.required", "ssl.enable", "ssl.cafile",
	"ssl.checkserveridentity", "apop.enable", "auth.mechanisms",
};

#define FAIL(r, ...) do {					\
	*reason = (r);						\
	snprintf(msg, msgsz, __VA_ARGS__);			\
	return NULL;						\
} while (0)

/* The last entry of `tenant` whose `key` ("Name", "FragmentName") is `name`. */
static json_t *
entry_find(json_t *dests, const char *tenant, const char *key,
    const char *name)
{
	json_t		*v, *d = NULL;
	const char	*n;
	size_t		 i;

	json_array_foreach(json_object_get(dests, tenant), i, v)
		if ((n = json_string_value(json_object_get(v, key))) != NULL &&
		    strcmp(n, name) == 0)
			d = v;
	return d;
}

/* Destination `name` of `tenant` in the destinations file, or NULL. */
json_t *
destination_find(json_t *dests, const char *tenant, const char *name)
{
	return entry_find(dests, tenant, "Name", name);
}

/*
 * A destination extended with a fragment, as the Destination service
 * merges them: the fragment's properties win, its FragmentName is not one.
 */
static json_t *
fragment_merge(json_t *d, json_t *frag)
{
	json_t		*out = json_deep_copy(d), *v;
	const char	*key;

	if (out == NULL)
		return NULL;
	json_object_foreach(frag, key, v)
		if (strcmp(key, "FragmentName") != 0)
			json_object_set(out, key, v);
	return out;
}

/*
 * Find destination `name` for `tenant` in the destinations file and turn
 * it into the proxy's configuration.  NULL with SAP's reason and a message.
 */
json_t *
destination_resolve(json_t *dests, const char *tenant, const char *name,
    const char *fragment, int fragment_optional, const struct settings *st,
    const char **reason, char *msg, size_t msgsz)
{
	json_t	*d = destination_find(dests, tenant, name), *f = NULL, *merged, *out;

	if (d == NULL)
		FAIL(R_NOTFOUND, "Technical connectivity is not configured. "
		    "Destination \"%s\" not found for tenant \"%s\"", name, tenant);
	if (fragment == NULL || ((f = entry_find(dests, tenant,
	    "FragmentName", fragment)) == NULL && fragment_optional))
		return destination_translate(d, NULL, NULL, st, reason, msg,
		    msgsz);
	if (f == NULL)
		FAIL(R_FRAGMENT, "Technical connectivity is not configured. "
		    "Fragment \"%s\" not found for tenant \"%s\"", fragment,
		    tenant);
	if ((merged = fragment_merge(d, f)) == NULL)
		FAIL(R_PROPERTY, "out of memory");
	out = destination_translate(merged, NULL, NULL, st, reason, msg, msgsz);
	json_decref(merged);
	return out;
}

/*
 * A find-destination reply (the body of a 200) as what tpmail keeps of it:
 * {destinationConfiguration, authTokens?, certificates?}.  Only the shape
 * is checked here, nothing the destination means; NULL with err when the
 * reply is not one (an outage, not a new truth about the destination).
 */
json_t *
destination_reply_parse(const char *body, size_t len, char *err, size_t errsz)
{
	json_error_t	 jerr;
	json_t		*j, *dc, *tokens, *certs, *out = NULL;
	const char	*key;
	json_t		*v;

	if ((j = json_loadb(body, len, 0, &jerr)) == NULL) {
		snprintf(err, errsz, "malformed reply (not JSON)");
		return NULL;
	}
	dc = json_object_get(j, "destinationConfiguration");
	tokens = json_object_get(j, "authTokens");
	certs = json_object_get(j, "certificates");
	if (!json_is_object(dc)) {
		snprintf(err, errsz, "malformed reply (destinationConfiguration)");
		goto done;
	}
	json_object_foreach(dc, key, v)
		if (!json_is_string(v)) {
			snprintf(err, errsz, "malformed reply (destinationConfiguration)");
			goto done;
		}
	if (tokens != NULL && !json_is_array(tokens) && !json_is_null(tokens)) {
		snprintf(err, errsz, "malformed reply (authTokens)");
		goto done;
	}
	if (certs != NULL && !json_is_array(certs) && !json_is_null(certs)) {
		snprintf(err, errsz, "malformed reply (certificates)");
		goto done;
	}
	out = json_pack("{s:O,s:O*,s:O*}", "destinationConfiguration", dc,
	    "authTokens", json_is_array(tokens) ? tokens : NULL,
	    "certificates", json_is_array(certs) ? certs : NULL);
	if (out == NULL)
		snprintf(err, errsz, "out of memory");
done:
	json_decref(j);
	return out;
}

static char *
b64(const char *s)
{
	size_t	 n = strlen(s);
	char	*out = malloc(4 * ((n + 2) / 3) + 1);

	if (out != NULL)
		EVP_EncodeBlock((unsigned char *)out, (const unsigned char *)s, n);
	return out;
}

/* base64 with whatever line breaks and blanks the service put in; NULL. */
static unsigned char *
b64_decode(const char *in, size_t *outlen)
{
	size_t		 n = strlen(in), i, k = 0, pad = 0;
	char		*clean;
	unsigned char	*out;
	int		 r;

	if ((clean = malloc(n + 1)) == NULL)
		return NULL;
	for (i = 0; i < n; i++)
		if (!isspace((unsigned char)in[i]))
			clean[k++] = in[i];
	clean[k] = '\0';
	if (k == 0 || k % 4 != 0 || (out = malloc(k / 4 * 3 + 1)) == NULL) {
		free(clean);
		return NULL;
	}
	if ((r = EVP_DecodeBlock(out, (unsigned char *)clean, (int)k)) < 0) {
		free(clean);
		free(out);
		return NULL;
	}
	/* EVP_DecodeBlock counts the padding as zero bytes */
	while (pad < 2 && k > pad && clean[k - 1 - pad] == '=')
		pad++;
	free(clean);
	*outlen = (size_t)r - pad;
	return out;
}

/*
 * The certificates in a trust store's bytes (PEM, any number of them, or
 * one DER certificate) as PEM text, or NULL.  Only certificates are kept:
 * anything else a PEM file holds (a private key...) is dropped.
 */
static char *
trust_store_to_pem(const unsigned char *der, size_t len)
{
	BIO		*in, *out;
	X509		*x;
	const unsigned char *p = der;
	char		*pem = NULL, *data;
	long		 n;
	int		 count = 0;

	if ((out = BIO_new(BIO_s_mem())) == NULL)
		return NULL;
	if (memmem(der, len, "-----BEGIN", 10) != NULL) {
		if ((in = BIO_new_mem_buf(der, (int)len)) == NULL) {
			BIO_free(out);
			return NULL;
		}
		while ((x = PEM_read_bio_X509(in, NULL, NULL, NULL)) != NULL) {
			count += PEM_write_bio_X509(out, x) == 1;
			X509_free(x);
		}
		BIO_free(in);
	} else if ((x = d2i_X509(NULL, &p, (long)len)) != NULL) {
		if (p == der + len)		/* one certificate, nothing after */
			count += PEM_write_bio_X509(out, x) == 1;
		X509_free(x);
	}
	ERR_clear_error();
	if (count > 0 && (n = BIO_get_mem_data(out, &data)) > 0 &&
	    (pem = malloc((size_t)n + 1)) != NULL) {
		memcpy(pem, data, (size_t)n);
		pem[n] = '\0';
	}
	BIO_free(out);
	return pem;
}

/* Store types tpmail reads: certificates, not key stores. */
static int
trust_store_type_ok(const char *file)
{
	static const char *const ok[] = { ".pem", ".crt", ".cer", ".der" };
	const char	*dot = strrchr(file, '.');
	size_t		 i;

	for (i = 0; dot != NULL && i < sizeof(ok) / sizeof(ok[0]); i++)
		if (strcasecmp(dot, ok[i]) == 0)
			return 1;
	return 0;
}

/*
 * TrustStoreLocation: the certificate of that name among the reply's
 * certificates, as PEM.  NULL with SAP's reason and a message.
 */
static char *
trust_store_pem(json_t *certs, const char *dname, const char *store,
    const char **reason, char *msg, size_t msgsz)
{
	json_t		*c, *found = NULL;
	const char	*content;
	unsigned char	*raw;
	size_t		 i, len;
	char		*pem;

	*reason = R_TRUSTSTORE;
	if (certs == NULL) {
		snprintf(msg, msgsz, "Destination \"%s\": TrustStoreLocation "
		    "needs the Destination service, which returns the "
		    "certificate; in a destinations file use mail.<protocol>."
		    "ssl.cafile", dname);
		return NULL;
	}
	if (!trust_store_type_ok(store)) {
		snprintf(msg, msgsz, "Destination \"%s\": trust store \"%s\": "
		    "tpmail reads certificates (.pem, .crt, .cer, .der), not "
		    "key stores", dname, store);
		return NULL;
	}
	json_array_foreach(certs, i, c)
		if (json_is_object(c) && json_is_string(json_object_get(c,
		    "Name")) && strcmp(json_string_value(json_object_get(c,
		    "Name")), store) == 0)
			found = c;
	if (found == NULL) {
		snprintf(msg, msgsz, "Destination \"%s\": the trust store \"%s\" "
		    "(TrustStoreLocation) is not among the certificates the "
		    "Destination service returned", dname, store);
		return NULL;
	}
	content = json_string_value(json_object_get(found, "Content"));
	if (content == NULL || strlen(content) > TRUST_STORE_MAX ||
	    (raw = b64_decode(content, &len)) == NULL) {
		snprintf(msg, msgsz, "Destination \"%s\": the trust store \"%s\" "
		    "has no base64 Content", dname, store);
		return NULL;
	}
	pem = trust_store_to_pem(raw, len);
	free(raw);
	if (pem == NULL)
		snprintf(msg, msgsz, "Destination \"%s\": the trust store \"%s\" "
		    "holds no PEM or DER certificate", dname, store);
	return pem;
}

/*
 * One MAIL destination (a flat property object, from the file or from the
 * Destination service's destinationConfiguration, with its authTokens when
 * it came from there) as the proxy's upstream and auth configuration.
 */
json_t *
destination_translate(json_t *d, json_t *auth_tokens, json_t *certificates,
    const struct settings *st, const char **reason, char *msg, size_t msgsz)
{
	json_t		*v, *out;
	const char	*type, *ptype, *authn, *proto, *host, *port, *user, *pw;
	const char	*tls = "none", *method = "auto", *mechs, *cafile, *key;
	const char	*name, *token = NULL, *exchange = NULL, *loc, *store;
	char		*end, other[16], *loc64, *ca_pem = NULL;
	size_t		 plen;
	long		 portn;
	int		 auth, stls, stls_req, ssl, apop, verify, onprem;

	if (!json_is_object(d))
		FAIL(R_PROPERTY, "the destination is not an object");
	json_object_foreach(d, key, v)
		if (!json_is_string(v))
			FAIL(R_PROPERTY, "destination property %s must be a "
			    "string, as the Destination service stores it", key);
	name = json_string_value(json_object_get(d, "Name"));
	if (name == NULL)
		FAIL(R_PROPERTY, "the destination has no Name");
	type = json_string_value(json_object_get(d, "Type"));
	if (type == NULL || strcmp(type, "MAIL") != 0)
		FAIL(R_TYPE, "Destination \"%s\" has Type \"%s\"; tpmail serves "
		    "Type MAIL", name, type ? type : "");
	ptype = json_string_value(json_object_get(d, "ProxyType"));
	if (ptype == NULL || (strcmp(ptype, "Internet") != 0 &&
	    strcmp(ptype, "OnPremise") != 0))
		FAIL(R_PROXYTYPE, "Destination \"%s\" has ProxyType \"%s\"; it "
		    "must be Internet or OnPremise", name, ptype ? ptype : "");
	onprem = strcmp(ptype, "OnPremise") == 0;
	if (onprem && (st->connectivity_proxy == NULL ||
	    st->connectivity_key == NULL))
		FAIL(R_PROXYTYPE, "Destination \"%s\" is OnPremise, which needs "
		    "the connectivity proxy (--connectivity-proxy and "
		    "--connectivity-key); none is configured", name);
	authn = json_string_value(json_object_get(d, "Authentication"));
	if (authn == NULL || strcmp(authn, "BasicAuthentication") == 0 ||
	    strcmp(authn, "NoAuthentication") == 0)
		;
	else if (strcmp(authn, "OAuth2ClientCredentials") == 0) {
		v = json_array_get(auth_tokens, 0);
		token = json_string_value(json_object_get(v, "value"));
		if (auth_tokens == NULL)
			FAIL(R_AUTHTYPE, "Destination \"%s\": "
			    "OAuth2ClientCredentials needs the Destination "
			    "service, which fetches its token", name);
		if (token == NULL || token[0] == '\0')
			FAIL("ConfigurationFailed", "Destination \"%s\": the "
			    "Destination service returned no token: %s", name,
			    json_string_value(json_object_get(v, "error")) ?
			    json_string_value(json_object_get(v, "error")) :
			    "no authTokens");
	} else if (strcmp(authn, "OAuth2RefreshToken") == 0 ||
	    strcmp(authn, "OAuth2AuthorizationCode") == 0) {
		if (auth_tokens == NULL)
			FAIL(R_AUTHTYPE, "Destination \"%s\": %s needs the "
			    "Destination service to exchange the client's token",
			    name, authn);
		exchange = strcmp(authn, "OAuth2RefreshToken") == 0 ? "refresh" :
		    "code";
	} else
		FAIL(R_AUTHTYPE, "Destination \"%s\": Authentication \"%s\" is "
		    "not supported for MAIL (BasicAuthentication, "
		    "OAuth2ClientCredentials, OAuth2RefreshToken, "
		    "OAuth2AuthorizationCode are)", name, authn);
	proto = json_string_value(json_object_get(d, "mail.transport.protocol"));
	if (proto == NULL)
		FAIL(R_PROPERTY, "Destination \"%s\": mail.transport.protocol is "
		    "missing (pop3 or pop3s)", name);
	if (strcmp(proto, "pop3") != 0 && strcmp(proto, "pop3s") != 0)
		FAIL(R_TYPE, "Destination \"%s\": mail.transport.protocol \"%s\" "
		    "is not served by tpmail (pop3, pop3s)", name, proto);
	snprintf(other, sizeof(other), "%s", strcmp(proto, "pop3") == 0 ?
	    "pop3s" : "pop3");

	/* every mail.<proto>.* key must be one tpmail understands */
	plen = strlen(proto);
	json_object_foreach(d, key, v) {
		if (strncmp(key, "mail.", 5) == 0 &&
		    strncmp(key + 5, other, strlen(other)) == 0 &&
		    key[5 + strlen(other)] == '.')
			FAIL(R_PROPERTY, "Destination \"%s\": %s is set but "
			    "mail.transport.protocol is %s: use mail.%s.%s", name,
			    key, proto, proto, key + 6 + strlen(other));
		if (strncmp(key, "mail.", 5) == 0 &&
		    strncmp(key + 5, proto, plen) == 0 && key[5 + plen] == '.') {
			const char	*sub = key + 6 + plen;
			size_t		 k;
			int		 ok = 0;

			for (k = 0; k < sizeof(known_props) / sizeof(known_props[0]);
			    k++)
				if (strcmp(sub, known_props[k]) == 0)
					ok = 1;
			if (!ok)
				FAIL(R_PROPERTY, "Destination \"%s\": property %s "
				    "is not known to tpmail", name, key);
		}
	}

	host = prop(d, proto, "host");
	if (host == NULL || host[0] == '\0') {
		if (prop(d, other, "host") != NULL)
			FAIL(R_PROPERTY, "Destination \"%s\": mail.%s.host is "
			    "missing; mail.%s.host is set but "
			    "mail.transport.protocol is %s", name, proto, other,
			    proto);
		FAIL(R_PROPERTY, "Destination \"%s\": mail.%s.host is missing",
		    name, proto);
	}
	if (!onprem && !st->allow_loopback && is_loopback(host))
		FAIL(R_LOOPBACK, "Destination \"%s\": mail.%s.host %s is a "
		    "loopback address", name, proto, host);
	port = prop(d, proto, "port");
	if (port == NULL)
		portn = strcmp(proto, "pop3s") == 0 ? 995 : 110;
	else {
		errno = 0;
		portn = strtol(port, &end, 10);
		if (!isdigit((unsigned char)*port) || *end != '\0' || errno ||
		    portn < 1 ||
		    portn > 65535)
			FAIL(R_PROPERTY, "Destination \"%s\": mail.%s.port \"%s\" "
			    "is not a port number (1-65535)", name, proto, port);
	}

	auth = prop_bool(prop(d, proto, "auth"), 1);
	stls = prop_bool(prop(d, proto, "starttls.enable"), 0);
	stls_req = prop_bool(prop(d, proto, "starttls.required"), 0);
	ssl = prop_bool(prop(d, proto, "ssl.enable"), strcmp(proto, "pop3s") == 0);
	apop = prop_bool(prop(d, proto, "apop.enable"), 0);
	verify = prop_bool(prop(d, proto, "ssl.checkserveridentity"), 1);
	if (auth < 0 || stls < 0 || stls_req < 0 || ssl < 0 || apop < 0 ||
	    verify < 0)
		FAIL(R_PROPERTY, "Destination \"%s\": mail.%s.auth, "
		    ".starttls.enable, .starttls.required, .ssl.enable, "
		    ".apop.enable and .ssl.checkserveridentity take \"true\" or "
		    "\"false\"", name, proto);
	if (strcmp(proto, "pop3s") == 0 && !ssl)
		FAIL(R_PROPERTY, "Destination \"%s\": mail.pop3s.ssl.enable is "
		    "false, but pop3s is POP3 over TLS", name);
	if (ssl && (stls || stls_req))
		FAIL(R_PROPERTY, "Destination \"%s\": STLS (starttls) and "
		    "implicit TLS (%s) contradict each other", name,
		    strcmp(proto, "pop3s") == 0 ? "pop3s" : "ssl.enable");
	if (ssl)
		tls = "implicit";
	else if (stls_req)
		tls = "starttls-required";
	else if (stls)
		tls = "starttls";
	cafile = prop(d, proto, "ssl.cafile");
	if (cafile != NULL && strcmp(tls, "none") == 0)
		FAIL(R_PROPERTY, "Destination \"%s\": mail.%s.ssl.cafile is set "
		    "but no TLS is used (set starttls.enable or use pop3s)",
		    name, proto);
	store = json_string_value(json_object_get(d, "TrustStoreLocation"));
	if (store != NULL && cafile != NULL)
		FAIL(R_PROPERTY, "Destination \"%s\": TrustStoreLocation and "
		    "mail.%s.ssl.cafile contradict each other", name, proto);
	if (store != NULL && strcmp(tls, "none") == 0)
		FAIL(R_PROPERTY, "Destination \"%s\": TrustStoreLocation is set "
		    "but no TLS is used (set starttls.enable or use pop3s)", name);

	user = json_string_value(json_object_get(d, "mail.user"));
	pw = json_string_value(json_object_get(d, "mail.password"));
	mechs = prop(d, proto, "auth.mechanisms");
	if (authn != NULL && strcmp(authn, "NoAuthentication") == 0)
		auth = 0;
	if (!auth)
		method = "none";
	else if (token != NULL || exchange != NULL) {
		if (exchange == NULL && (user == NULL || user[0] == '\0'))
			FAIL(R_PROPERTY, "Destination \"%s\": mail.user is "
			    "required for OAuth2ClientCredentials", name);
		if (apop || mechs != NULL)
			FAIL(R_PROPERTY, "Destination \"%s\": apop.enable and "
			    "auth.mechanisms do not apply to OAuth2 logins", name);
		method = exchange != NULL ? "exchange" : "oauth2";
	} else {
		if (user == NULL || user[0] == '\0')
			FAIL(R_PROPERTY, "Destination \"%s\": mail.user is "
			    "required when mail.%s.auth is true", name, proto);
		if (pw == NULL)
			FAIL(R_PROPERTY, "Destination \"%s\": mail.password is "
			    "required for BasicAuthentication", name);
		if (apop && mechs != NULL)
			FAIL(R_PROPERTY, "Destination \"%s\": mail.%s.apop.enable "
			    "and mail.%s.auth.mechanisms contradict each other",
			    name, proto, proto);
		if (apop)
			method = "apop";
		else if (mechs != NULL) {
			if (strcasecmp(mechs, "PLAIN") == 0)
				method = "plain";
			else if (strcasecmp(mechs, "LOGIN") == 0)
				method = "login";
			else if (strcasecmp(mechs, "USER") == 0)
				method = "user";
			else
				FAIL(R_PROPERTY, "Destination \"%s\": "
				    "mail.%s.auth.mechanisms \"%s\": tpmail logs "
				    "in with one of USER, PLAIN, LOGIN", name,
				    proto, mechs);
		}
	}
	if (store != NULL && (ca_pem = trust_store_pem(certificates, name, store,
	    reason, msg, msgsz)) == NULL)
		return NULL;
	out = json_pack("{s:s,s:i,s:{s:s,s:i,s:s,s:s?,s:s*,s:b},"
	    "s:{s:s,s:s?,s:s?,s:s?,s:s?}}",
	    "protocol", proto,
	    "default_port", strcmp(proto, "pop3s") == 0 ? 995 : 110,
	    "upstream", "host", host, "port", (int)portn, "tls", tls,
	    "cafile", cafile, "ca_pem", ca_pem, "verify_host", verify,
	    "auth", "method", method, "user", auth ? user : NULL,
	    "password", auth && token == NULL && exchange == NULL ? pw : NULL,
	    "token", auth ? token : NULL, "exchange", auth ? exchange : NULL);
	free(ca_pem);
	if (onprem) {
		/* the virtual host is the Cloud Connector's business */
		loc = json_string_value(json_object_get(d,
		    "CloudConnectorLocationId"));
		loc64 = loc != NULL && loc[0] != '\0' ? b64(loc) : strdup("");
		if (loc64 == NULL || strlen(loc64) > 255) {
			free(loc64);
			json_decref(out);
			FAIL(R_PROPERTY, "Destination \"%s\": "
			    "CloudConnectorLocationId is too long", name);
		}
		json_object_set_new(out, "onpremise", json_string(loc64));
		free(loc64);
	}
	return out;
}
