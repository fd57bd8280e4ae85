/*
 * fuzz_destsvc_reply: a find-destination reply from the Destination
 * service (the body of a 200), as tpmaild reads it: destination_reply_parse()
 * keeps destinationConfiguration, authTokens and certificates, then
 * destination_translate() turns it into a proxy configuration, with
 * loopback allowed and not, and with and without a connectivity proxy.
 * The certificates reach OpenSSL when TrustStoreLocation names one.
 *
 * Checked: a refused reply says why; a kept one has the promised shape; a
 * translated destination is a complete proxy configuration whose trust
 * store, if any, is PEM certificates and nothing else; a refused one has
 * SAP's reason and a message.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "fuzz.h"
#include "log.h"
#include "secret.h"
#include "supervisor.h"

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	log_init("fuzz_destsvc_reply", LOG_LEVEL_ERROR);
	secret_install();		/* as tpmaild does */
	return 0;
}

static const char *const reasons[] = {
	"ConfigurationError-ReferencedDestination-TypeNotSupported",
	"ConfigurationError-ReferencedDestination-ProxyTypeNotSupported",
	"ConfigurationError-ReferencedDestination-LoopbackUrlNotSupported",
	"ConfigurationError-ReferencedDestination-AuthenticationNotSupported",
	"ConfigurationError-ReferencedDestination-PropertyInvalid",
	"ConfigurationError-ReferencedDestination-TrustStoreInvalid",
	"ConfigurationFailed",
};

/* PEM text holding at least one certificate and nothing but certificates. */
static void
check_pem(const char *pem)
{
	BIO		*b;
	X509		*x;
	const char	*p;
	int		 n = 0;

	/* every PEM block is a certificate (base64 may spell anything) */
	for (p = pem; (p = strstr(p, "-----BEGIN ")) != NULL; p++)
		FUZZ_CHECK(strncmp(p, "-----BEGIN CERTIFICATE-----\n", 28) == 0,
		    "not a certificate in the trust store: %.40s", p);
	FUZZ_CHECK(strncmp(pem, "-----BEGIN CERTIFICATE-----", 27) == 0,
	    "trust store does not start with a certificate");
	b = BIO_new_mem_buf(pem, -1);
	FUZZ_CHECK(b != NULL, "BIO_new_mem_buf");
	while ((x = PEM_read_bio_X509(b, NULL, NULL, NULL)) != NULL) {
		n++;
		X509_free(x);
	}
	BIO_free(b);
	ERR_clear_error();
	FUZZ_CHECK(n > 0, "trust store without a certificate");
}

static void
check_resolved(json_t *r, json_t *dc, json_t *tokens)
{
	json_t		*up = json_object_get(r, "upstream");
	json_t		*auth = json_object_get(r, "auth");
	const char	*v, *tls, *pem;
	json_int_t	 port;

	v = json_string_value(json_object_get(r, "protocol"));
	FUZZ_CHECK(v && (!strcmp(v, "pop3") || !strcmp(v, "pop3s")),
	    "protocol %s", v ? v : "(none)");
	FUZZ_CHECK(json_equal(json_object_get(r, "protocol"),
	    json_object_get(dc, "mail.transport.protocol")), "protocol changed");
	v = json_string_value(json_object_get(up, "host"));
	FUZZ_CHECK(v && v[0], "no upstream host");
	port = json_integer_value(json_object_get(up, "port"));
	FUZZ_CHECK(port >= 1 && port <= 65535, "port %lld", (long long)port);
	tls = json_string_value(json_object_get(up, "tls"));
	FUZZ_CHECK(tls && (!strcmp(tls, "none") || !strcmp(tls, "implicit") ||
	    !strcmp(tls, "starttls") || !strcmp(tls, "starttls-required")),
	    "tls %s", tls ? tls : "(none)");
	pem = json_string_value(json_object_get(up, "ca_pem"));
	if (pem != NULL) {
		FUZZ_CHECK(json_object_get(dc, "TrustStoreLocation") != NULL,
		    "a trust store nobody asked for");
		FUZZ_CHECK(json_string_value(json_object_get(up, "cafile")) == NULL,
		    "both a cafile and a trust store");
		FUZZ_CHECK(strcmp(tls, "none") != 0, "a trust store without TLS");
		check_pem(pem);
	} else
		FUZZ_CHECK(json_object_get(dc, "TrustStoreLocation") == NULL,
		    "TrustStoreLocation ignored");
	v = json_string_value(json_object_get(auth, "method"));
	FUZZ_CHECK(v != NULL, "no auth method");
	if (strcmp(v, "oauth2") == 0)
		FUZZ_CHECK(json_equal(json_object_get(auth, "token"),
		    json_object_get(json_array_get(tokens, 0), "value")),
		    "oauth2 with another token than authTokens[0]");
	if (json_is_string(json_object_get(auth, "password")))
		FUZZ_CHECK(json_equal(json_object_get(auth, "password"),
		    json_object_get(dc, "mail.password")), "password mixed up");
}

static void
translate(json_t *res, const struct settings *st)
{
	json_t		*dc = json_object_get(res, "destinationConfiguration");
	json_t		*tokens = json_object_get(res, "authTokens");
	json_t		*certs = json_object_get(res, "certificates");
	json_t		*empty = json_array(), *r;
	const char	*reason = NULL;
	char		 msg[1024];	/* reconcile_cr's */
	size_t		 i;
	int		 ok = 0;

	msg[0] = '\0';
	/* reconcile_lookup: a missing array is an empty one */
	r = destination_translate(dc, tokens ? tokens : empty,
	    certs ? certs : empty, st, &reason, msg, sizeof(msg));
	if (r == NULL) {
		for (i = 0; reason && i < sizeof(reasons) / sizeof(reasons[0]); i++)
			if (strcmp(reason, reasons[i]) == 0)
				ok = 1;
		FUZZ_CHECK(ok, "refused with reason %s", reason ? reason : "(none)");
		FUZZ_CHECK(msg[0] != '\0', "refused (%s) without a message", reason);
	} else {
		check_resolved(r, dc, tokens ? tokens : empty);
		json_decref(r);
	}
	json_decref(empty);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct settings	 st;
	json_t		*res, *v;
	const char	*key;
	char		 err[128];	/* dest_done's */
	char		*body = fuzz_dup(data, size, 0);
	int		 loop, cp;

	err[0] = '\0';
	res = destination_reply_parse(body, size, err, sizeof(err));
	free(body);
	if (res == NULL) {
		FUZZ_CHECK(err[0] != '\0', "refused without a message");
		return 0;
	}
	FUZZ_CHECK(json_is_object(json_object_get(res,
	    "destinationConfiguration")), "no destinationConfiguration");
	json_object_foreach(json_object_get(res, "destinationConfiguration"),
	    key, v)
		FUZZ_CHECK(json_is_string(v), "property %s", key);
	v = json_object_get(res, "authTokens");
	FUZZ_CHECK(v == NULL || json_is_array(v), "authTokens");
	v = json_object_get(res, "certificates");
	FUZZ_CHECK(v == NULL || json_is_array(v), "certificates");
	for (loop = 0; loop <= 1; loop++)
		for (cp = 0; cp <= 1; cp++) {
			memset(&st, 0, sizeof(st));
			st.allow_loopback = loop;
			st.connectivity_proxy = cp ? "connectivity-proxy:20004" :
			    NULL;
			st.connectivity_key = cp ? "connectivity-key.json" : NULL;
			translate(res, &st);
		}
	json_decref(res);
	return 0;
}
