/*
 * test_destination.c: unit tests for the destinations file loader and the
 * translation of a MAIL destination into a proxy's upstream/auth config
 * (supervisor/destination.c).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include "log.h"
#include "supervisor.h"

#define R_NOTFOUND	"ConfigurationError-ReferencedDestination-NotFound"
#define R_FRAGMENT	"ConfigurationError-ReferencedFragment-NotFound"
#define R_TYPE		"ConfigurationError-ReferencedDestination-TypeNotSupported"
#define R_PROXYTYPE	"ConfigurationError-ReferencedDestination-ProxyTypeNotSupported"
#define R_LOOPBACK	"ConfigurationError-ReferencedDestination-LoopbackUrlNotSupported"
#define R_AUTHTYPE	"ConfigurationError-ReferencedDestination-AuthenticationNotSupported"
#define R_PROPERTY	"ConfigurationError-ReferencedDestination-PropertyInvalid"

#define R_TRUSTSTORE	"ConfigurationError-ReferencedDestination-TrustStoreInvalid"

#define PASSWORD	"s3cret-Pa55"

/* A test CA (public certificate only). */
static const char ca_pem[] =
	"-----BEGIN CERTIFICATE-----\n"
	"MIIBhzCCAS2gAwIBAgIUd5uD1ZGIxOktsoV2bOqRcVxiR88wCgYIKoZIzj0EAwIw\n"
	"GTEXMBUGA1UEAwwOdHBtYWlsLWZ1enotY2EwHhcNMjYxMTI3MTIwNzQ4WhcNMzYx\n"
	"MTI0MTIwNzQ4WjAZMRcwFQYDVQQDDA50cG1haWwtZnV6ei1jYTBZMBMGByqGSM49\n"
	"AgEGCCqGSM49AwEHA0IABLAWY1HJrAS5qhbNAySmlvnyngTejlcwB13CnFMQ9XZI\n"
	"3mduTdf0ZJXyA8q8a+A/GVYqU7rBbDyUZSKyKHSv47ajUzBRMB0GA1UdDgQWBBRR\n"
	"8O9+OUf4pztIA2P/zslzrVtfKjAfBgNVHSMEGDAWgBRR8O9+OUf4pztIA2P/zslz\n"
	"rVtfKjAPBgNVHRMBAf8EBTADAQH/MAoGCCqGSM49BAMCA0gAMEUCIQDtw2vuz5Ft\n"
	"7SxUy2BciaVSIqwyhU0AtQyvHVZlrQoKBgIgXeBzafMovah80TjIybjlWH3pCAh5\n"
	"LhmNLTfWZ2Vff8I=\n"
	"-----END CERTIFICATE-----\n";

/* Write text to a fresh temporary file ending in ext; returns its path. */
static char *
write_temp(const char *text, const char *ext)
{
	const char	*dir = getenv("TMPDIR");
	char		*path;
	int		 fd;
	size_t		 len = strlen(text);

	if (dir == NULL || dir[0] == '\0')
		dir = P_tmpdir;
	assert_true(asprintf(&path, "%s/tpmail-dest-XXXXXX%s", dir, ext) > 0);
	fd = mkstemps(path, (int)strlen(ext));
	assert_true(fd >= 0);
	assert_int_equal(write(fd, text, len), (ssize_t)len);
	close(fd);
	return path;
}

/* destinations_load() on the given file content. */
static json_t *
load_text(const char *text, const char *ext, char *err, size_t errsz)
{
	char	*path = write_temp(text, ext);
	json_t	*d;

	err[0] = '\0';
	d = destinations_load(path, err, errsz);
	unlink(path);
	free(path);
	return d;
}

/* The sample shape: a plain POP3 destination with basic authentication. */
static json_t *
sample_dest(void)
{
	return json_pack("{s:s,s:s,s:s,s:s,s:s,s:s,s:s,s:s,s:s,s:s}",
	    "Name", "mail-a",
	    "Type", "MAIL",
	    "ProxyType", "Internet",
	    "Authentication", "BasicAuthentication",
	    "mail.user", "alice@example.com",
	    "mail.password", PASSWORD,
	    "mail.transport.protocol", "pop3",
	    "mail.pop3.host", "pop.example.com",
	    "mail.pop3.port", "110",
	    "mail.pop3.auth", "true");
}

/* Set (value non-NULL) or delete properties: key, value, ..., NULL. */
static json_t *
with_props(json_t *d, ...)
{
	va_list		 ap;
	const char	*k, *v;

	va_start(ap, d);
	while ((k = va_arg(ap, const char *)) != NULL) {
		v = va_arg(ap, const char *);
		if (v != NULL)
			json_object_set_new(d, k, json_string(v));
		else
			json_object_del(d, k);
	}
	va_end(ap);
	return d;
}

/*
 * Resolve destination d (as the only destination of "provider") after a
 * round trip through a destinations file, so the loader sees it too.
 * Takes the caller's reference to d.
 */
static json_t *
resolve_one(json_t *d, int allow_loopback, const char **reason, char *msg,
    size_t msgsz)
{
	struct settings	 st;
	json_t		*file, *dests, *out;
	char		*text, err[256];

	memset(&st, 0, sizeof(st));
	st.allow_loopback = allow_loopback;
	file = json_pack("{s:[O]}", TPMAIL_PROVIDER_TENANT, d);
	text = json_dumps(file, JSON_INDENT(2));
	json_decref(file);
	dests = load_text(text, ".json", err, sizeof(err));
	free(text);
	if (dests == NULL)
		fail_msg("destinations_load refused the file: %s", err);
	*reason = NULL;
	msg[0] = '\0';
	out = destination_resolve(dests, TPMAIL_PROVIDER_TENANT,
	    json_string_value(json_object_get(d, "Name")), NULL, 0, &st, reason,
	    msg, msgsz);
	json_decref(dests);
	json_decref(d);
	return out;
}

/* Resolves; checks upstream {host, port, tls} and auth.method. */
static json_t *
expect_ok(json_t *d, int allow_loopback, const char *host, int port,
    const char *tls, const char *method)
{
	const char	*reason;
	char		 msg[512];
	json_t		*out, *up, *auth;

	out = resolve_one(d, allow_loopback, &reason, msg, sizeof(msg));
	if (out == NULL)
		fail_msg("refused: %s: %s", reason ? reason : "?", msg);
	up = json_object_get(out, "upstream");
	auth = json_object_get(out, "auth");
	assert_true(json_is_object(up));
	assert_true(json_is_object(auth));
	assert_string_equal(json_string_value(json_object_get(up, "host")), host);
	assert_true(json_is_integer(json_object_get(up, "port")));
	assert_int_equal(json_integer_value(json_object_get(up, "port")), port);
	assert_string_equal(json_string_value(json_object_get(up, "tls")), tls);
	assert_string_equal(json_string_value(json_object_get(auth, "method")),
	    method);
	return out;
}

static void
ok_case(json_t *d, int allow_loopback, const char *host, int port,
    const char *tls, const char *method)
{
	json_decref(expect_ok(d, allow_loopback, host, port, tls, method));
}

/* Refused with reason, and the message mentions sub1 and sub2. */
static void
expect_fail(json_t *d, int allow_loopback, const char *reason,
    const char *sub1, const char *sub2)
{
	const char	*got;
	char		 msg[512];
	json_t		*out;

	out = resolve_one(d, allow_loopback, &got, msg, sizeof(msg));
	if (out != NULL) {
		char	 buf[512];
		char	*s = json_dumps(out, JSON_COMPACT);

		snprintf(buf, sizeof(buf), "%s", s ? s : "?");
		free(s);
		json_decref(out);
		fail_msg("accepted, expected %s: %s", reason, buf);
	}
	if (got == NULL || strcmp(got, reason) != 0)
		fail_msg("reason %s, expected %s (%s)", got ? got : "(null)",
		    reason, msg);
	if (sub1 != NULL && strstr(msg, sub1) == NULL)
		fail_msg("message \"%s\" does not mention \"%s\"", msg, sub1);
	if (sub2 != NULL && strstr(msg, sub2) == NULL)
		fail_msg("message \"%s\" does not mention \"%s\"", msg, sub2);
}

/* ---- resolve: accepted shapes ---- */

static void
test_sample_shape(void **state)
{
	json_t	*out, *auth, *up;
	char	*dump;

	(void)state;
	out = expect_ok(sample_dest(), 0, "pop.example.com", 110, "none",
	    "auto");
	auth = json_object_get(out, "auth");
	up = json_object_get(out, "upstream");
	assert_string_equal(json_string_value(json_object_get(auth, "user")),
	    "alice@example.com");
	assert_string_equal(json_string_value(json_object_get(auth, "password")),
	    PASSWORD);
	assert_string_equal(json_string_value(json_object_get(out, "protocol")),
	    "pop3");
	assert_int_equal(json_integer_value(json_object_get(out,
	    "default_port")), 110);
	assert_true(json_is_true(json_object_get(up, "verify_host")));
	assert_null(json_string_value(json_object_get(up, "cafile")));
	/* the password appears once, under auth, nowhere else */
	dump = json_dumps(out, JSON_COMPACT);
	assert_non_null(strstr(dump, PASSWORD));
	assert_null(strstr(strstr(dump, PASSWORD) + 1, PASSWORD));
	free(dump);
	json_decref(out);

	/* port defaults to 110 for pop3; an explicit one is used as given */
	ok_case(with_props(sample_dest(), "mail.pop3.port", NULL, NULL), 0,
	    "pop.example.com", 110, "none", "auto");
	ok_case(with_props(sample_dest(), "mail.pop3.port", "1110", NULL), 0,
	    "pop.example.com", 1110, "none", "auto");
	ok_case(with_props(sample_dest(), "mail.pop3.port", "1", NULL), 0,
	    "pop.example.com", 1, "none", "auto");
	ok_case(with_props(sample_dest(), "mail.pop3.port", "65535", NULL), 0,
	    "pop.example.com", 65535, "none", "auto");
	/* auth defaults to true; Authentication may be absent */
	ok_case(with_props(sample_dest(), "mail.pop3.auth", NULL,
	    "Authentication", NULL, NULL), 0, "pop.example.com", 110, "none",
	    "auto");
}

static json_t *
pop3s_dest(void)
{
	return with_props(sample_dest(),
	    "mail.transport.protocol", "pop3s",
	    "mail.pop3.host", NULL, "mail.pop3.port", NULL,
	    "mail.pop3.auth", NULL,
	    "mail.pop3s.host", "pop.example.com",
	    "mail.pop3s.auth", "true", NULL);
}

static void
test_pop3s(void **state)
{
	json_t	*out;

	(void)state;
	out = expect_ok(pop3s_dest(), 0, "pop.example.com", 995, "implicit",
	    "auto");
	assert_string_equal(json_string_value(json_object_get(out, "protocol")),
	    "pop3s");
	assert_int_equal(json_integer_value(json_object_get(out,
	    "default_port")), 995);
	json_decref(out);
	ok_case(with_props(pop3s_dest(), "mail.pop3s.port", "1995", NULL), 0,
	    "pop.example.com", 1995, "implicit", "auto");
	ok_case(with_props(pop3s_dest(), "mail.pop3s.ssl.enable", "true", NULL),
	    0, "pop.example.com", 995, "implicit", "auto");
	/* a CA file and no host check, with TLS */
	out = expect_ok(with_props(pop3s_dest(),
	    "mail.pop3s.ssl.cafile", "certs/ca.pem",
	    "mail.pop3s.ssl.checkserveridentity", "false", NULL), 0,
	    "pop.example.com", 995, "implicit", "auto");
	assert_string_equal(json_string_value(json_object_get(json_object_get(
	    out, "upstream"), "cafile")), "certs/ca.pem");
	assert_true(json_is_false(json_object_get(json_object_get(out,
	    "upstream"), "verify_host")));
	json_decref(out);
	/* pop3 with ssl.enable is implicit TLS on the given port */
	ok_case(with_props(sample_dest(), "mail.pop3.ssl.enable", "true",
	    "mail.pop3.port", "995", NULL), 0, "pop.example.com", 995,
	    "implicit", "auto");
}

static void
test_starttls(void **state)
{
	(void)state;
	ok_case(with_props(sample_dest(), "mail.pop3.starttls.enable", "true",
	    NULL), 0, "pop.example.com", 110, "starttls", "auto");
	ok_case(with_props(sample_dest(), "mail.pop3.starttls.required", "true",
	    NULL), 0, "pop.example.com", 110, "starttls-required", "auto");
	ok_case(with_props(sample_dest(), "mail.pop3.starttls.enable", "true",
	    "mail.pop3.starttls.required", "true", NULL), 0,
	    "pop.example.com", 110, "starttls-required", "auto");
	ok_case(with_props(sample_dest(), "mail.pop3.starttls.enable", "FALSE",
	    NULL), 0, "pop.example.com", 110, "none", "auto");
	ok_case(with_props(sample_dest(), "mail.pop3.starttls.enable", "True",
	    NULL), 0, "pop.example.com", 110, "starttls", "auto");

	/* STLS and implicit TLS contradict */
	expect_fail(with_props(pop3s_dest(), "mail.pop3s.starttls.enable",
	    "true", NULL), 0, R_PROPERTY, "starttls", "pop3s");
	expect_fail(with_props(pop3s_dest(), "mail.pop3s.starttls.required",
	    "true", NULL), 0, R_PROPERTY, "starttls", NULL);
	expect_fail(with_props(sample_dest(), "mail.pop3.ssl.enable", "true",
	    "mail.pop3.starttls.enable", "true", NULL), 0, R_PROPERTY,
	    "starttls", "ssl.enable");
	expect_fail(with_props(pop3s_dest(), "mail.pop3s.ssl.enable", "false",
	    NULL), 0, R_PROPERTY, "mail.pop3s.ssl.enable", NULL);
	/* a CA file without any TLS is a mistake */
	expect_fail(with_props(sample_dest(), "mail.pop3.ssl.cafile", "certs/ca.pem",
	    NULL), 0, R_PROPERTY, "mail.pop3.ssl.cafile", NULL);
	/* booleans are "true" or "false" */
	expect_fail(with_props(sample_dest(), "mail.pop3.starttls.enable",
	    "yes", NULL), 0, R_PROPERTY, "starttls.enable", NULL);
	expect_fail(with_props(sample_dest(), "mail.pop3.auth", "1", NULL), 0,
	    R_PROPERTY, "mail.pop3.auth", NULL);
}

static void
test_auth_methods(void **state)
{
	json_t	*out, *auth;
	char	*dump;

	(void)state;
	ok_case(with_props(sample_dest(), "mail.pop3.apop.enable", "true", NULL),
	    0, "pop.example.com", 110, "none", "apop");
	ok_case(with_props(sample_dest(), "mail.pop3.auth.mechanisms", "PLAIN",
	    NULL), 0, "pop.example.com", 110, "none", "plain");
	ok_case(with_props(sample_dest(), "mail.pop3.auth.mechanisms", "LOGIN",
	    NULL), 0, "pop.example.com", 110, "none", "login");
	ok_case(with_props(sample_dest(), "mail.pop3.auth.mechanisms", "login",
	    NULL), 0, "pop.example.com", 110, "none", "login");
	ok_case(with_props(sample_dest(), "mail.pop3.auth.mechanisms", "USER",
	    NULL), 0, "pop.example.com", 110, "none", "user");
	expect_fail(with_props(sample_dest(), "mail.pop3.auth.mechanisms",
	    "CRAM-MD5", NULL), 0, R_PROPERTY, "mail.pop3.auth.mechanisms",
	    "CRAM-MD5");
	expect_fail(with_props(sample_dest(), "mail.pop3.auth.mechanisms",
	    "PLAIN LOGIN", NULL), 0, R_PROPERTY, "auth.mechanisms", NULL);
	expect_fail(with_props(sample_dest(), "mail.pop3.apop.enable", "true",
	    "mail.pop3.auth.mechanisms", "PLAIN", NULL), 0, R_PROPERTY,
	    "apop.enable", "auth.mechanisms");

	/* no login: method none, and no credentials handed to the proxy */
	out = expect_ok(with_props(sample_dest(), "mail.pop3.auth", "false",
	    NULL), 0, "pop.example.com", 110, "none", "none");
	auth = json_object_get(out, "auth");
	assert_null(json_string_value(json_object_get(auth, "user")));
	assert_null(json_string_value(json_object_get(auth, "password")));
	dump = json_dumps(out, JSON_COMPACT);
	assert_null(strstr(dump, PASSWORD));
	assert_null(strstr(dump, "alice@example.com"));
	free(dump);
	json_decref(out);
	/* ...which then needs neither user nor password */
	ok_case(with_props(sample_dest(), "mail.pop3.auth", "false",
	    "mail.user", NULL, "mail.password", NULL, NULL), 0,
	    "pop.example.com", 110, "none", "none");
	out = expect_ok(with_props(sample_dest(), "Authentication",
	    "NoAuthentication", NULL), 0, "pop.example.com", 110, "none",
	    "none");
	dump = json_dumps(out, JSON_COMPACT);
	assert_null(strstr(dump, PASSWORD));
	free(dump);
	json_decref(out);

	/* with login: user and password are required */
	expect_fail(with_props(sample_dest(), "mail.user", NULL, NULL), 0,
	    R_PROPERTY, "mail.user", NULL);
	expect_fail(with_props(sample_dest(), "mail.user", "", NULL), 0,
	    R_PROPERTY, "mail.user", NULL);
	expect_fail(with_props(sample_dest(), "mail.password", NULL, NULL), 0,
	    R_PROPERTY, "mail.password", NULL);
	expect_fail(with_props(sample_dest(), "Authentication",
	    "OAuth2ClientCredentials", NULL), 0, R_AUTHTYPE,
	    "OAuth2ClientCredentials", NULL);
}

/* ---- resolve: refused ---- */

static void
test_not_found(void **state)
{
	struct settings	 st;
	json_t		*dests;
	const char	*reason = NULL;
	char		 msg[512], err[256];

	(void)state;
	memset(&st, 0, sizeof(st));
	dests = load_text(
	    "{\"provider\": [{\"Name\": \"mail-a\", \"Type\": \"MAIL\"}],"
	    " \"tenant-a\": [], \"tenant-b\": [{\"Name\": \"mail-b\"}]}",
	    ".json", err, sizeof(err));
	if (dests == NULL)
		fail_msg("%s", err);
	assert_null(destination_resolve(dests, "provider", "mail-x", NULL, 0, &st,
	    &reason, msg, sizeof(msg)));
	assert_string_equal(reason, R_NOTFOUND);
	assert_non_null(strstr(msg, "\"mail-x\""));
	assert_non_null(strstr(msg, "\"provider\""));
	/* names are per tenant */
	reason = NULL;
	assert_null(destination_resolve(dests, "tenant-a", "mail-a", NULL, 0, &st,
	    &reason, msg, sizeof(msg)));
	assert_string_equal(reason, R_NOTFOUND);
	assert_non_null(strstr(msg, "\"tenant-a\""));
	reason = NULL;
	assert_null(destination_resolve(dests, "tenant-b", "mail-a", NULL, 0, &st,
	    &reason, msg, sizeof(msg)));
	assert_string_equal(reason, R_NOTFOUND);
	reason = NULL;
	assert_null(destination_resolve(dests, "tenant-c", "mail-a", NULL, 0, &st,
	    &reason, msg, sizeof(msg)));
	assert_string_equal(reason, R_NOTFOUND);
	/* names match exactly */
	reason = NULL;
	assert_null(destination_resolve(dests, "provider", "MAIL-A", NULL, 0, &st,
	    &reason, msg, sizeof(msg)));
	assert_string_equal(reason, R_NOTFOUND);
	json_decref(dests);
}

/*
 * Fragments: merged over the destination (their properties win, their
 * FragmentName is no property), per tenant; a missing one is SAP's
 * ReferencedFragment-NotFound unless optional; an entry with both a Name
 * and a FragmentName, or neither, breaks the file.
 */
static void
test_fragments(void **state)
{
	struct settings	 st;
	json_t		*dests, *out, *file;
	const char	*reason = NULL;
	char		 msg[512], err[256], *text;

	(void)state;
	memset(&st, 0, sizeof(st));
	file = json_pack("{s:[o,{s:s,s:s,s:s},{s:s,s:s}],s:[{s:s,s:s}]}",
	    "provider", with_props(sample_dest(), "mail.pop3.host",
	    "pop.example", NULL),
	    "FragmentName", "other-login", "mail.user", "carol",
	    "mail.pop3.host", "pop2.example",
	    "FragmentName", "empty", "Description", "x",
	    "tenant-a", "FragmentName", "other-login", "mail.user", "dave");
	text = json_dumps(file, 0);
	json_decref(file);
	dests = load_text(text, ".json", err, sizeof(err));
	free(text);
	if (dests == NULL)
		fail_msg("%s", err);
	out = destination_resolve(dests, "provider", "mail-a", "other-login", 0,
	    &st, &reason, msg, sizeof(msg));
	if (out == NULL)
		fail_msg("%s: %s", reason, msg);
	assert_string_equal(json_string_value(json_object_get(json_object_get(
	    out, "upstream"), "host")), "pop2.example");
	assert_string_equal(json_string_value(json_object_get(json_object_get(
	    out, "auth"), "user")), "carol");
	json_decref(out);
	/* the file's destination itself is untouched */
	out = destination_resolve(dests, "provider", "mail-a", NULL, 0, &st,
	    &reason, msg, sizeof(msg));
	assert_non_null(out);
	assert_string_equal(json_string_value(json_object_get(json_object_get(
	    out, "upstream"), "host")), "pop.example");
	json_decref(out);
	reason = NULL;
	assert_null(destination_resolve(dests, "provider", "mail-a", "nope", 0,
	    &st, &reason, msg, sizeof(msg)));
	assert_string_equal(reason, R_FRAGMENT);
	assert_non_null(strstr(msg, "\"nope\""));
	out = destination_resolve(dests, "provider", "mail-a", "nope", 1, &st,
	    &reason, msg, sizeof(msg));
	assert_non_null(out);
	json_decref(out);
	/* fragments are per tenant too; the destination is looked up first */
	reason = NULL;
	assert_null(destination_resolve(dests, "tenant-a", "mail-a",
	    "other-login", 0, &st, &reason, msg, sizeof(msg)));
	assert_string_equal(reason, R_NOTFOUND);
	json_decref(dests);

	assert_null(load_text("{\"provider\": [{\"Name\": \"a\", "
	    "\"FragmentName\": \"b\"}]}", ".json", err, sizeof(err)));
	assert_non_null(strstr(err, "FragmentName"));
	assert_null(load_text("{\"provider\": [{\"Type\": \"MAIL\"}]}",
	    ".json", err, sizeof(err)));
}

/* Each tenant resolves its own destination of the same name. */
static void
test_per_tenant(void **state)
{
	struct settings	 st;
	json_t		*dests, *a, *b, *file, *out;
	const char	*reason;
	char		 msg[512], err[256], *text;

	(void)state;
	memset(&st, 0, sizeof(st));
	a = with_props(sample_dest(), "mail.pop3.host", "pop.a.example", NULL);
	b = with_props(sample_dest(), "mail.pop3.host", "pop.b.example",
	    "mail.user", "bob", NULL);
	file = json_pack("{s:[o],s:[o]}", "tenant-a", a, "tenant-b", b);
	text = json_dumps(file, 0);
	json_decref(file);
	dests = load_text(text, ".json", err, sizeof(err));
	free(text);
	assert_non_null(dests);
	out = destination_resolve(dests, "tenant-b", "mail-a", NULL, 0, &st, &reason,
	    msg, sizeof(msg));
	assert_non_null(out);
	assert_string_equal(json_string_value(json_object_get(json_object_get(
	    out, "upstream"), "host")), "pop.b.example");
	assert_string_equal(json_string_value(json_object_get(json_object_get(
	    out, "auth"), "user")), "bob");
	json_decref(out);
	out = destination_resolve(dests, "tenant-a", "mail-a", NULL, 0, &st, &reason,
	    msg, sizeof(msg));
	assert_non_null(out);
	assert_string_equal(json_string_value(json_object_get(json_object_get(
	    out, "upstream"), "host")), "pop.a.example");
	json_decref(out);
	json_decref(dests);
}

static void
test_type_and_proxy_type(void **state)
{
	(void)state;
	expect_fail(with_props(sample_dest(), "Type", "HTTP", NULL), 0, R_TYPE,
	    "HTTP", NULL);
	expect_fail(with_props(sample_dest(), "Type", "mail", NULL), 0, R_TYPE,
	    NULL, NULL);
	expect_fail(with_props(sample_dest(), "Type", NULL, NULL), 0, R_TYPE,
	    NULL, NULL);
	expect_fail(with_props(sample_dest(), "ProxyType", "Foo", NULL), 0,
	    R_PROXYTYPE, "Foo", NULL);
	expect_fail(with_props(sample_dest(), "ProxyType", NULL, NULL), 0,
	    R_PROXYTYPE, NULL, NULL);
	expect_fail(with_props(sample_dest(), "ProxyType", "OnPremise", NULL),
	    0, R_PROXYTYPE, "OnPremise", NULL);
}

static void
test_protocol(void **state)
{
	(void)state;
	expect_fail(with_props(sample_dest(), "mail.transport.protocol", "imap4",
	    NULL), 0, R_TYPE, "imap4", NULL);
	expect_fail(with_props(sample_dest(), "mail.transport.protocol", "smtp",
	    NULL), 0, R_TYPE, "smtp", NULL);
	expect_fail(with_props(sample_dest(), "mail.transport.protocol", "POP3",
	    NULL), 0, R_TYPE, NULL, NULL);
	expect_fail(with_props(sample_dest(), "mail.transport.protocol", NULL,
	    NULL), 0, R_PROPERTY, "mail.transport.protocol", NULL);
}

static void
test_port_invalid(void **state)
{
	static const char *const bad[] = {
		"abc", "0", "70000", "65536", "-1", "", "110x", "1e3",
		"99999999999999999999",
	};
	size_t	i;

	(void)state;
	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
		expect_fail(with_props(sample_dest(), "mail.pop3.port", bad[i],
		    NULL), 0, R_PROPERTY, "mail.pop3.port", bad[i]);
	expect_fail(with_props(pop3s_dest(), "mail.pop3s.port", "abc", NULL), 0,
	    R_PROPERTY, "mail.pop3s.port", "abc");
}

static void
test_unknown_and_misplaced_props(void **state)
{
	(void)state;
	expect_fail(with_props(sample_dest(), "mail.pop3.bogus", "1", NULL), 0,
	    R_PROPERTY, "mail.pop3.bogus", NULL);
	expect_fail(with_props(sample_dest(), "mail.pop3.ssl.trust", "*", NULL),
	    0, R_PROPERTY, "mail.pop3.ssl.trust", NULL);
	expect_fail(with_props(pop3s_dest(), "mail.pop3s.Host", "x", NULL), 0,
	    R_PROPERTY, "mail.pop3s.Host", NULL);
	/* the host under the other protocol's prefix */
	expect_fail(with_props(sample_dest(), "mail.pop3.host", NULL,
	    "mail.pop3s.host", "pop.example.com", NULL), 0, R_PROPERTY,
	    "mail.pop3.host", "mail.pop3s.host");
	expect_fail(with_props(pop3s_dest(), "mail.pop3s.host", NULL,
	    "mail.pop3.host", "pop.example.com", NULL), 0, R_PROPERTY,
	    "mail.pop3s.host", "mail.pop3.host");
	expect_fail(with_props(sample_dest(), "mail.pop3.host", NULL, NULL), 0,
	    R_PROPERTY, "mail.pop3.host", NULL);
	expect_fail(with_props(sample_dest(), "mail.pop3.host", "", NULL), 0,
	    R_PROPERTY, "mail.pop3.host", NULL);
	/* properties outside mail.<protocol>. are not second-guessed */
	ok_case(with_props(sample_dest(), "Description", "team mailbox",
	    "mail.smtp.host", "smtp.example.com", NULL), 0, "pop.example.com",
	    110, "none", "auto");
}

static void
test_loopback(void **state)
{
	static const char *const lo[] = {
		"127.0.0.1", "127.1.2.3", "localhost", "LocalHost", "::1",
	};
	size_t	i;

	(void)state;
	for (i = 0; i < sizeof(lo) / sizeof(lo[0]); i++) {
		expect_fail(with_props(sample_dest(), "mail.pop3.host", lo[i],
		    NULL), 0, R_LOOPBACK, lo[i], NULL);
		ok_case(with_props(sample_dest(), "mail.pop3.host", lo[i], NULL),
		    1, lo[i], 110, "none", "auto");
	}
	/* not loopback */
	ok_case(with_props(sample_dest(), "mail.pop3.host", "128.0.0.1", NULL),
	    0, "128.0.0.1", 110, "none", "auto");
	ok_case(with_props(sample_dest(), "mail.pop3.host", "10.0.0.1", NULL),
	    0, "10.0.0.1", 110, "none", "auto");
	ok_case(with_props(sample_dest(), "mail.pop3.host", "localhost.example",
	    NULL), 0, "localhost.example", 110, "none", "auto");
	ok_case(with_props(sample_dest(), "mail.pop3.host", "::2", NULL), 0,
	    "::2", 110, "none", "auto");
}

/* ---- destinations_load: file-level errors ---- */

static void
expect_load_error(const char *text, const char *ext, const char *sub)
{
	char	 err[256];
	json_t	*d;

	d = load_text(text, ext, err, sizeof(err));
	if (d != NULL)
		fail_msg("loaded:\n%s", text);
	if (err[0] == '\0')
		fail_msg("refused without a message:\n%s", text);
	if (sub != NULL && strstr(err, sub) == NULL)
		fail_msg("error \"%s\" does not mention \"%s\"", err, sub);
}

static void
test_load_errors(void **state)
{
	char	 err[256];

	(void)state;
	expect_load_error("[1, 2]", ".json", "JSON object");
	expect_load_error("\"provider\"", ".json", "JSON");
	expect_load_error("[]", ".json", "JSON object");
	expect_load_error("{\"provider\": {\"Name\": \"a\"}}", ".json",
	    "\"provider\"");
	expect_load_error("{\"provider\": \"a\"}", ".json", "array");
	expect_load_error("{\"provider\": [{\"Name\": \"a\", "
	    "\"mail.pop3.port\": 110}]}", ".json", "mail.pop3.port");
	expect_load_error("{\"provider\": [{\"Name\": \"a\", "
	    "\"mail.pop3.auth\": true}]}", ".json", "mail.pop3.auth");
	expect_load_error("{\"provider\": [{\"Name\": \"a\", "
	    "\"x\": null}]}", ".json", "string");
	expect_load_error("{\"provider\": [{\"Type\": \"MAIL\"}]}", ".json",
	    "Name");
	expect_load_error("{\"provider\": [{\"Name\": 5}]}", ".json", "Name");
	expect_load_error("{\"provider\": [\"mail-a\"]}", ".json", "Name");
	expect_load_error("{\"provider\": [{\"Name\": \"a\",}]}", ".json",
	    "JSON");
	expect_load_error("{\"provider\": [", ".json", "JSON");
	expect_load_error("", ".json", "JSON");
	expect_load_error("{\"provider\": [], \"provider\": []}", ".json", NULL);
	/* YAML: the same rules */
	expect_load_error("provider:\n  - Name: a\n    mail.pop3.port: 110\n",
	    ".yaml", "mail.pop3.port");
	expect_load_error("provider: [1\n", ".yaml", NULL);
	expect_load_error("a: {}\n---\nb: {}\n", ".yaml", "JSON object");

	/* a file that does not exist */
	err[0] = '\0';
	assert_null(destinations_load("no-such-dir/no-such-file.json", err,
	    sizeof(err)));
	assert_true(err[0] != '\0');
}

static void
test_load_valid(void **state)
{
	char		 err[256];
	json_t		*d;
	struct settings	 st;
	const char	*reason;
	char		 msg[256];
	json_t		*out;

	(void)state;
	d = load_text("{}", ".json", err, sizeof(err));
	assert_non_null(d);
	assert_int_equal(json_object_size(d), 0);
	json_decref(d);

	d = load_text("{\"provider\": [], \"tenant-a\": []}", ".json", err,
	    sizeof(err));
	assert_non_null(d);
	assert_int_equal(json_object_size(d), 2);
	json_decref(d);

	/* the same file as YAML; the quoted port stays a string */
	d = load_text(
	    "provider:\n"
	    "  - Name: mail-a\n"
	    "    Type: MAIL\n"
	    "    ProxyType: Internet\n"
	    "    mail.user: alice\n"
	    "    mail.password: pw\n"
	    "    mail.transport.protocol: pop3s\n"
	    "    mail.pop3s.host: pop.example.com\n"
	    "    mail.pop3s.port: '1995'\n",
	    ".yaml", err, sizeof(err));
	if (d == NULL)
		fail_msg("%s", err);
	memset(&st, 0, sizeof(st));
	out = destination_resolve(d, "provider", "mail-a", NULL, 0, &st, &reason, msg,
	    sizeof(msg));
	if (out == NULL)
		fail_msg("%s: %s", reason, msg);
	assert_int_equal(json_integer_value(json_object_get(json_object_get(out,
	    "upstream"), "port")), 1995);
	assert_string_equal(json_string_value(json_object_get(json_object_get(
	    out, "upstream"), "tls")), "implicit");
	json_decref(out);
	json_decref(d);
}

/* ---- find-destination replies and their trust stores ---- */

static char *
b64_of(const void *data, size_t len)
{
	char	*out = malloc(4 * ((len + 2) / 3) + 1);

	assert_non_null(out);
	EVP_EncodeBlock((unsigned char *)out, data, (int)len);
	return out;
}

/* The test CA as DER, base64. */
static char *
ca_der_b64(void)
{
	BIO		*b = BIO_new_mem_buf(ca_pem, -1);
	X509		*x = PEM_read_bio_X509(b, NULL, NULL, NULL);
	unsigned char	*der = NULL;
	int		 n;
	char		*out;

	assert_non_null(x);
	n = i2d_X509(x, &der);
	assert_true(n > 0);
	out = b64_of(der, (size_t)n);
	OPENSSL_free(der);
	X509_free(x);
	BIO_free(b);
	return out;
}

/* A pop3s destination naming trust store `store` (NULL: none). */
static json_t *
store_dest(const char *store)
{
	json_t	*d = with_props(sample_dest(), "mail.transport.protocol", "pop3s",
	    "mail.pop3.host", NULL, "mail.pop3.port", NULL, "mail.pop3.auth",
	    NULL, "mail.pop3s.host", "pop.example.com", NULL);

	if (store != NULL)
		json_object_set_new(d, "TrustStoreLocation", json_string(store));
	return d;
}

static json_t *
translate(json_t *d, json_t *certs, const char **reason, char *msg,
    size_t msgsz)
{
	struct settings	 st;
	json_t		*tokens = json_array(), *out;

	memset(&st, 0, sizeof(st));
	*reason = NULL;
	msg[0] = '\0';
	out = destination_translate(d, tokens, certs, &st, reason, msg, msgsz);
	json_decref(tokens);
	return out;
}

static json_t *
cert_list(const char *name, const char *content)
{
	return json_pack("[{s:s,s:s,s:s}]", "Name", name, "Type", "CERTIFICATE",
	    "Content", content);
}

static void
expect_trust_fail(json_t *d, json_t *certs, const char *reason,
    const char *sub)
{
	const char	*got;
	char		 msg[512];
	json_t		*out = translate(d, certs, &got, msg, sizeof(msg));

	if (out != NULL) {
		json_decref(out);
		fail_msg("accepted, expected %s", reason);
	}
	if (got == NULL || strcmp(got, reason) != 0)
		fail_msg("reason %s, expected %s (%s)", got ? got : "(null)",
		    reason, msg);
	if (strstr(msg, sub) == NULL)
		fail_msg("message \"%s\" does not mention \"%s\"", msg, sub);
	json_decref(d);
	json_decref(certs);
}

static void
test_trust_store(void **state)
{
	const char	*reason, *pem;
	char		 msg[512], *b64, *with_key;
	json_t		*out, *certs, *d;

	/* PEM content: the certificate, as PEM, and no cafile */
	b64 = b64_of(ca_pem, strlen(ca_pem));
	certs = cert_list("mail-ca.pem", b64);
	d = store_dest("mail-ca.pem");
	out = translate(d, certs, &reason, msg, sizeof(msg));
	if (out == NULL)
		fail_msg("%s: %s", reason, msg);
	pem = json_string_value(json_object_get(json_object_get(out,
	    "upstream"), "ca_pem"));
	assert_non_null(pem);
	assert_string_equal(pem, ca_pem);
	assert_null(json_string_value(json_object_get(json_object_get(out,
	    "upstream"), "cafile")));
	json_decref(out);
	json_decref(d);
	json_decref(certs);
	free(b64);

	/* DER content, with line breaks as base64 tools write it */
	b64 = ca_der_b64();
	with_key = malloc(strlen(b64) * 2);
	assert_non_null(with_key);
	snprintf(with_key, strlen(b64) * 2, "%.40s\n%s", b64, b64 + 40);
	certs = cert_list("mail-ca.der", with_key);
	d = store_dest("mail-ca.der");
	out = translate(d, certs, &reason, msg, sizeof(msg));
	if (out == NULL)
		fail_msg("%s: %s", reason, msg);
	assert_string_equal(json_string_value(json_object_get(json_object_get(
	    out, "upstream"), "ca_pem")), ca_pem);
	json_decref(out);
	json_decref(d);
	json_decref(certs);
	free(with_key);
	free(b64);

	/* a private key next to the certificate is dropped */
	assert_true(asprintf(&with_key, "-----BEGIN PRIVATE KEY-----\n"
	    "MC4CAQAwBQYDK2VwBCIEIPcqiZEBi0d9PpI5xY6nNwKBzyvYHmkQYp6OnM6AP8Pl\n"
	    "-----END PRIVATE KEY-----\n%s", ca_pem) > 0);
	b64 = b64_of(with_key, strlen(with_key));
	certs = cert_list("mixed.pem", b64);
	d = store_dest("mixed.pem");
	out = translate(d, certs, &reason, msg, sizeof(msg));
	if (out == NULL)
		fail_msg("%s: %s", reason, msg);
	assert_string_equal(json_string_value(json_object_get(json_object_get(
	    out, "upstream"), "ca_pem")), ca_pem);
	json_decref(out);
	json_decref(d);
	json_decref(certs);
	free(with_key);

	/* refusals */
	expect_trust_fail(store_dest("other.pem"), cert_list("mail-ca.pem", b64),
	    R_TRUSTSTORE, "other.pem");
	expect_trust_fail(store_dest("store.jks"), cert_list("store.jks", b64),
	    R_TRUSTSTORE, "key stores");
	expect_trust_fail(store_dest("bad.pem"), cert_list("bad.pem", "bm9wZQ=="),
	    R_TRUSTSTORE, "no PEM or DER certificate");
	expect_trust_fail(store_dest("bad.pem"), cert_list("bad.pem", "!!!!"),
	    R_TRUSTSTORE, "base64");
	expect_trust_fail(with_props(store_dest("mail-ca.pem"),
	    "mail.pop3s.ssl.cafile", "/etc/ca.pem", NULL),
	    cert_list("mail-ca.pem", b64), R_PROPERTY, "contradict");
	expect_trust_fail(with_props(sample_dest(), "TrustStoreLocation",
	    "mail-ca.pem", NULL), cert_list("mail-ca.pem", b64), R_PROPERTY,
	    "no TLS");
	free(b64);

	/* a destinations file carries no certificates */
	expect_fail(store_dest("mail-ca.pem"), 1, R_TRUSTSTORE, "ssl.cafile",
	    NULL);
}

static void
test_reply_parse(void **state)
{
	static const char *const bad[] = {
		"", "[]", "{\"destinationConfiguration\": \"x\"}",
		"{\"destinationConfiguration\": {\"Name\": 1}}",
		"{\"destinationConfiguration\": {}, \"authTokens\": {}}",
		"{\"destinationConfiguration\": {}, \"certificates\": 3}",
		"{\"owner\": {}, \"destinationConfiguration\": {\"Name\": \"",
	};
	const char	*ok = "{\"owner\": {\"InstanceId\": null}, "
	    "\"destinationConfiguration\": {\"Name\": \"d\"}, "
	    "\"authTokens\": [{\"type\": \"Basic\", \"value\": \"x\"}], "
	    "\"certificates\": [{\"Name\": \"c.pem\"}], \"extra\": 1}";
	char		 err[128];
	json_t		*r;
	size_t		 i;

	for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		err[0] = '\0';
		r = destination_reply_parse(bad[i], strlen(bad[i]), err,
		    sizeof(err));
		if (r != NULL)
			fail_msg("accepted %s", bad[i]);
		assert_non_null(strstr(err, "malformed reply"));
	}
	r = destination_reply_parse(ok, strlen(ok), err, sizeof(err));
	assert_non_null(r);
	assert_int_equal(json_object_size(r), 3);	/* no owner, no extra */
	assert_true(json_is_array(json_object_get(r, "authTokens")));
	assert_true(json_is_array(json_object_get(r, "certificates")));
	json_decref(r);
	/* null arrays are absent ones */
	ok = "{\"destinationConfiguration\": {}, \"authTokens\": null, "
	    "\"certificates\": null}";
	r = destination_reply_parse(ok, strlen(ok), err, sizeof(err));
	assert_non_null(r);
	assert_null(json_object_get(r, "authTokens"));
	assert_null(json_object_get(r, "certificates"));
	json_decref(r);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_sample_shape),
		cmocka_unit_test(test_pop3s),
		cmocka_unit_test(test_starttls),
		cmocka_unit_test(test_auth_methods),
		cmocka_unit_test(test_not_found),
		cmocka_unit_test(test_per_tenant),
		cmocka_unit_test(test_type_and_proxy_type),
		cmocka_unit_test(test_protocol),
		cmocka_unit_test(test_port_invalid),
		cmocka_unit_test(test_unknown_and_misplaced_props),
		cmocka_unit_test(test_loopback),
		cmocka_unit_test(test_load_errors),
		cmocka_unit_test(test_load_valid),
		cmocka_unit_test(test_fragments),
		cmocka_unit_test(test_trust_store),
		cmocka_unit_test(test_reply_parse),
	};

	log_init("test_destination", LOG_LEVEL_ERROR);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
