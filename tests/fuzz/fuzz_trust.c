/*
 * fuzz_trust: the tenant proxy's lazily read trust store (proxy/trust.c),
 * given any bundle.  A CA bundle reaches a proxy from an operator's file or
 * from the Destination service (a tenant's trust store), so it is input.
 *
 * The input is the bundle.  The harness indexes it, attaches it to a
 * store and verifies a server certificate issued by "CN=Fuzz CA" (made
 * at start with a key the input cannot know), so that every entry whose
 * subject hashes like that CA's is parsed and compared.  Invariants: the
 * index counts at most one certificate per BEGIN line; the store never
 * holds more certificates than the index; the verification fails (the
 * input cannot hold the right CA); nothing leaks (libFuzzer's check).
 */
#include <string.h>

#include <openssl/evp.h>
#include <openssl/x509.h>

#include "fuzz.h"
#include "trust.h"

static X509	*leaf;

static X509 *
make(const char *cn, EVP_PKEY *key, X509 *issuer)
{
	X509		*x = X509_new();
	X509_NAME	*n = X509_NAME_new();

	X509_set_version(x, 2);
	ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
	X509_gmtime_adj(X509_getm_notBefore(x), -3600);
	X509_gmtime_adj(X509_getm_notAfter(x), 86400);
	X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_ASC,
	    (const unsigned char *)cn, -1, -1, 0);
	X509_set_subject_name(x, n);
	X509_set_issuer_name(x, issuer ? X509_get_subject_name(issuer) : n);
	X509_NAME_free(n);
	X509_set_pubkey(x, key);
	X509_sign(x, key, EVP_sha256());
	return x;
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	EVP_PKEY	*key = EVP_EC_gen("P-256");
	X509		*ca;

	FUZZ_CHECK(key != NULL, "no key");
	ca = make("Fuzz CA", key, NULL);
	leaf = make("mail.example.test", key, ca);
	X509_free(ca);
	EVP_PKEY_free(key);
	return 0;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t len)
{
	struct trust	*t;
	X509_STORE	*store;
	X509_STORE_CTX	*ctx;
	const uint8_t	*p = data;
	size_t		 begins = 0, n;
	int		 ok;

	while ((p = memmem(p, len - (p - data), "-----BEGIN ", 11)) != NULL) {
		begins++;
		p += 11;
	}
	t = trust_new(fuzz_dup(data, len, 0), len, 0);
	FUZZ_CHECK(t != NULL, "out of memory");
	n = trust_count(t);
	FUZZ_CHECK(n <= begins, "%zu certificates from %zu BEGIN lines", n,
	    begins);
	store = X509_STORE_new();
	FUZZ_CHECK(trust_attach(t, store) == 0, "attach failed");
	ctx = X509_STORE_CTX_new();
	X509_STORE_CTX_init(ctx, store, leaf, NULL);
	ok = X509_verify_cert(ctx);
	X509_STORE_CTX_free(ctx);
	FUZZ_CHECK(ok != 1, "verified without the CA");
	FUZZ_CHECK((size_t)sk_X509_OBJECT_num(X509_STORE_get0_objects(store))
	    <= n, "the store holds more than the bundle");
	X509_STORE_free(store);
	return 0;
}
