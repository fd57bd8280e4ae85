/*
 * test_trust.c: unit tests for proxy/trust.c, the lazily read trust store.
 * Certificates are made here with OpenSSL: two CAs, a server certificate
 * from each, and a bundle with the first CA among unrelated certificates
 * and blocks that are not certificates.  Checked: what the index counts,
 * that nothing is parsed into the store before a chain needs it, that a
 * chain from a bundled CA verifies and one from another CA does not, that
 * two CAs with one subject are both offered, and that a store that never
 * looked anything up frees its trust (ASan's leak check).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include "trust.h"

static EVP_PKEY	*key;

/* A certificate for subject cn, signed by issuer (NULL: self-signed CA). */
static X509 *
make_cert(const char *cn, X509 *issuer, int ca, long serial)
{
	X509		*x = X509_new();
	X509_NAME	*n = X509_NAME_new();
	X509V3_CTX	 v3;
	X509_EXTENSION	*ext;

	X509_set_version(x, 2);
	ASN1_INTEGER_set(X509_get_serialNumber(x), serial);
	X509_gmtime_adj(X509_getm_notBefore(x), -3600);
	X509_gmtime_adj(X509_getm_notAfter(x), 86400);
	X509_NAME_add_entry_by_txt(n, "O", MBSTRING_ASC,
	    (const unsigned char *)"tpmail tests", -1, -1, 0);
	X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_ASC,
	    (const unsigned char *)cn, -1, -1, 0);
	X509_set_subject_name(x, n);
	X509_set_issuer_name(x, issuer ? X509_get_subject_name(issuer) : n);
	X509_NAME_free(n);
	X509_set_pubkey(x, key);
	X509V3_set_ctx(&v3, issuer ? issuer : x, x, NULL, NULL, 0);
	ext = X509V3_EXT_conf_nid(NULL, &v3, NID_basic_constraints,
	    ca ? "critical,CA:TRUE" : "CA:FALSE");
	X509_add_ext(x, ext, -1);
	X509_EXTENSION_free(ext);
	/* key identifiers: how a chain tells two CAs of one name apart */
	ext = X509V3_EXT_conf_nid(NULL, &v3, NID_subject_key_identifier, "hash");
	X509_add_ext(x, ext, -1);
	X509_EXTENSION_free(ext);
	ext = X509V3_EXT_conf_nid(NULL, &v3, NID_authority_key_identifier,
	    "keyid:always");
	X509_add_ext(x, ext, -1);
	X509_EXTENSION_free(ext);
	if (ca) {
		ext = X509V3_EXT_conf_nid(NULL, &v3, NID_key_usage,
		    "critical,keyCertSign,cRLSign");
		X509_add_ext(x, ext, -1);
		X509_EXTENSION_free(ext);
	}
	assert_true(X509_sign(x, key, EVP_sha256()) > 0);
	return x;
}

static void
append_pem(char **buf, size_t *len, X509 *x)
{
	BIO	*b = BIO_new(BIO_s_mem());
	char	*p;
	long	 n;

	PEM_write_bio_X509(b, x);
	n = BIO_get_mem_data(b, &p);
	*buf = realloc(*buf, *len + n + 1);
	memcpy(*buf + *len, p, n);
	*len += n;
	(*buf)[*len] = '\0';
	BIO_free(b);
}

static void
append_text(char **buf, size_t *len, const char *s)
{
	size_t	n = strlen(s);

	*buf = realloc(*buf, *len + n + 1);
	memcpy(*buf + *len, s, n + 1);
	*len += n;
}

/* Does leaf verify against a store holding t? */
static int
verifies(X509_STORE *store, X509 *leaf)
{
	X509_STORE_CTX	*ctx = X509_STORE_CTX_new();
	int		 ok;

	assert_non_null(ctx);
	assert_int_equal(X509_STORE_CTX_init(ctx, store, leaf, NULL), 1);
	ok = X509_verify_cert(ctx);
	X509_STORE_CTX_free(ctx);
	return ok == 1;
}

static int
store_size(X509_STORE *store)
{
	return sk_X509_OBJECT_num(X509_STORE_get0_objects(store));
}

static int
setup(void **state)
{
	EVP_PKEY_CTX	*kc = EVP_PKEY_CTX_new_id(EVP_PKEY_EC, NULL);

	assert_non_null(kc);
	assert_int_equal(EVP_PKEY_keygen_init(kc), 1);
	assert_int_equal(EVP_PKEY_CTX_set_ec_paramgen_curve_nid(kc,
	    NID_X9_62_prime256v1), 1);
	assert_int_equal(EVP_PKEY_keygen(kc, &key), 1);
	EVP_PKEY_CTX_free(kc);
	return 0;
}

static int
teardown(void **state)
{
	EVP_PKEY_free(key);
	return 0;
}

static void
test_lazy_verify(void **state)
{
	X509		*ca = make_cert("Test CA", NULL, 1, 1);
	X509		*other = make_cert("Other CA", NULL, 1, 2);
	X509		*leaf = make_cert("mail.example.test", ca, 0, 3);
	X509		*stranger = make_cert("evil.example.test", other, 0, 4);
	X509		*filler[20];
	X509_STORE	*store = X509_STORE_new();
	struct trust	*t;
	char		*buf = NULL, name[32];
	size_t		 len = 0;
	int		 i;

	append_text(&buf, &len, "# comment line\n-----BEGIN PRIVATE KEY-----\n"
	    "AAAA\n-----END PRIVATE KEY-----\n");
	for (i = 0; i < 20; i++) {
		snprintf(name, sizeof(name), "Filler CA %d", i);
		filler[i] = make_cert(name, NULL, 1, 100 + i);
		append_pem(&buf, &len, filler[i]);
		if (i == 10)
			append_pem(&buf, &len, ca);
	}
	/* a certificate block that is not base64, and one not DER */
	append_text(&buf, &len, "-----BEGIN CERTIFICATE-----\n!!!!\n"
	    "-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\n"
	    "AAAAAAAA\n-----END CERTIFICATE-----\n");

	t = trust_new(buf, len, 0);
	assert_non_null(t);
	assert_int_equal(trust_count(t), 21);
	assert_int_equal(trust_attach(t, store), 0);
	/* nothing parsed until a chain asks */
	assert_int_equal(store_size(store), 0);
	assert_true(verifies(store, leaf));
	/* the CA, and only it */
	assert_int_equal(store_size(store), 1);
	assert_true(verifies(store, leaf));
	assert_int_equal(store_size(store), 1);
	assert_false(verifies(store, stranger));
	assert_int_equal(store_size(store), 1);

	X509_STORE_free(store);		/* frees the trust too */
	for (i = 0; i < 20; i++)
		X509_free(filler[i]);
	X509_free(ca);
	X509_free(other);
	X509_free(leaf);
	X509_free(stranger);
}

/* Two CAs with the same subject (a re-issued root): both are offered. */
static void
test_same_subject(void **state)
{
	X509		*old = make_cert("Test CA", NULL, 1, 1);
	EVP_PKEY	*k1 = key;
	EVP_PKEY_CTX	*kc = EVP_PKEY_CTX_new_id(EVP_PKEY_EC, NULL);
	EVP_PKEY	*k2 = NULL;
	X509		*renewed, *leaf;
	X509_STORE	*store = X509_STORE_new();
	struct trust	*t;
	char		*buf = NULL;
	size_t		 len = 0;

	EVP_PKEY_keygen_init(kc);
	EVP_PKEY_CTX_set_ec_paramgen_curve_nid(kc, NID_X9_62_prime256v1);
	assert_int_equal(EVP_PKEY_keygen(kc, &k2), 1);
	EVP_PKEY_CTX_free(kc);
	key = k2;
	renewed = make_cert("Test CA", NULL, 1, 2);
	leaf = make_cert("mail.example.test", renewed, 0, 3);
	key = k1;
	append_pem(&buf, &len, old);	/* first, with the wrong key */
	append_pem(&buf, &len, renewed);
	t = trust_new(buf, len, 0);
	assert_int_equal(trust_count(t), 2);
	assert_int_equal(trust_attach(t, store), 0);
	assert_true(verifies(store, leaf));
	assert_int_equal(store_size(store), 2);
	X509_STORE_free(store);
	X509_free(old);
	X509_free(renewed);
	X509_free(leaf);
	EVP_PKEY_free(k2);
}

static void
test_no_certificate(void **state)
{
	char		*buf = strdup("not a bundle at all\n");
	struct trust	*t = trust_new(buf, strlen(buf), 0);

	assert_non_null(t);
	assert_int_equal(trust_count(t), 0);
	trust_free(t);
	t = trust_new(calloc(1, 1), 0, 0);
	assert_non_null(t);
	assert_int_equal(trust_count(t), 0);
	trust_free(t);
}

/* A store that never looked anything up still frees what it was given. */
static void
test_unused_store(void **state)
{
	X509		*ca = make_cert("Test CA", NULL, 1, 1);
	X509_STORE	*store = X509_STORE_new();
	char		*buf = NULL;
	size_t		 len = 0;
	struct trust	*t;

	append_pem(&buf, &len, ca);
	t = trust_new(buf, len, 0);
	assert_int_equal(trust_attach(t, store), 0);
	X509_STORE_free(store);
	X509_free(ca);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_lazy_verify),
		cmocka_unit_test(test_same_subject),
		cmocka_unit_test(test_no_certificate),
		cmocka_unit_test(test_unused_store),
	};

	return cmocka_run_group_tests(tests, setup, teardown);
}
