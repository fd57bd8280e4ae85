/*
 * trust.c: a tenant proxy's trust store, read lazily.  The supervisor
 * passes a CA bundle (the system's has about 140 certificates) as a sealed
 * memory file, which the proxy maps: every proxy given the same bundle
 * shares its pages.  Parsing the whole bundle into an X509_STORE would cost
 * each proxy about 1 MiB and 20-45 ms at start; instead the bundle is
 * indexed by the hash of each certificate's subject (a walk of the DER
 * down to the subject, no full parse), and a certificate is parsed and
 * added to the store only when a chain asks for its subject, as OpenSSL's
 * hashed-directory lookup does with files.
 */
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <openssl/asn1.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include "trust.h"

struct trust_cert {
	unsigned long	 tc_hash;	/* X509_NAME_hash_ex of the subject */
	size_t		 tc_off;	/* base64 body in the bundle */
	size_t		 tc_len;
	int		 tc_loaded;	/* in the store already */
};

struct trust {
	char			*t_data;
	size_t			 t_len;
	int			 t_mapped;	/* munmap, else free */
	struct trust_cert	*t_certs;
	size_t			 t_ncerts;
};

static const char	pem_end[] = "-----END ";

/* The DER of one PEM body; *len set.  NULL if it does not decode. */
static unsigned char *
trust_der(const char *b64, size_t b64len, int *len)
{
	EVP_ENCODE_CTX	*ctx;
	unsigned char	*der;
	int		 n = 0, m = 0;

	if (b64len > 1 << 20 || (der = malloc(b64len / 4 * 3 + 4)) == NULL)
		return NULL;
	if ((ctx = EVP_ENCODE_CTX_new()) == NULL) {
		free(der);
		return NULL;
	}
	EVP_DecodeInit(ctx);
	if (EVP_DecodeUpdate(ctx, der, &n, (const unsigned char *)b64,
	    (int)b64len) < 0 || EVP_DecodeFinal(ctx, der + n, &m) < 0) {
		EVP_ENCODE_CTX_free(ctx);
		free(der);
		return NULL;
	}
	EVP_ENCODE_CTX_free(ctx);
	*len = n + m;
	return der;
}

/* Step over one DER element; its header in *tag, *cls.  -1 if malformed. */
static int
der_next(const unsigned char **p, const unsigned char *end, int *tag,
    int *cls, const unsigned char **body, long *blen)
{
	const unsigned char	*q = *p;
	long			 l;

	if (q >= end || (ASN1_get_object(&q, &l, tag, cls, end - q) & 0x80) ||
	    l > end - q)
		return -1;
	*body = q;
	*blen = l;
	*p = q + l;
	return 0;
}

/*
 * The subject's hash, from Certificate -> TBSCertificate -> [version],
 * serialNumber, signature, issuer, validity, subject.  0 if malformed.
 */
static int
trust_subject_hash(const unsigned char *der, int len, unsigned long *hash)
{
	const unsigned char	*p = der, *end = der + len, *body, *subj;
	X509_NAME		*name;
	long			 blen;
	int			 tag, cls, i, ok = 0;

	if (der_next(&p, end, &tag, &cls, &body, &blen) == -1 ||
	    tag != V_ASN1_SEQUENCE)
		return 0;
	p = body;
	end = body + blen;
	if (der_next(&p, end, &tag, &cls, &body, &blen) == -1 ||
	    tag != V_ASN1_SEQUENCE)
		return 0;
	p = body;
	end = body + blen;
	/* [0] EXPLICIT version, when present */
	subj = p;
	if (der_next(&p, end, &tag, &cls, &body, &blen) == -1)
		return 0;
	if (cls != V_ASN1_CONTEXT_SPECIFIC)
		p = subj;
	/* serialNumber, signature, issuer, validity */
	for (i = 0; i < 4; i++)
		if (der_next(&p, end, &tag, &cls, &body, &blen) == -1)
			return 0;
	subj = p;
	if (der_next(&p, end, &tag, &cls, &body, &blen) == -1 ||
	    tag != V_ASN1_SEQUENCE)
		return 0;
	if ((name = d2i_X509_NAME(NULL, &subj, p - subj)) == NULL)
		return 0;
	*hash = X509_NAME_hash_ex(name, NULL, NULL, &ok);
	X509_NAME_free(name);
	return ok;
}

static int
trust_index_entries(struct trust *t)
{
	const char	*p = t->t_data, *end = t->t_data + t->t_len, *b, *e;
	unsigned char	*der;
	unsigned long	 hash;
	size_t		 cap = 0;
	void		*nc;
	int		 len;

	while ((b = memmem(p, end - p, "-----BEGIN ", 11)) != NULL) {
		if ((e = memmem(b, end - b, pem_end, sizeof(pem_end) - 1)) == NULL)
			break;
		p = e + sizeof(pem_end) - 1;
		/* "CERTIFICATE-----" or "X509 CERTIFICATE-----", as PEM reads */
		if (strncmp(b + 11, "CERTIFICATE-----", 16) == 0)
			b += 11 + 16;
		else if (strncmp(b + 11, "X509 CERTIFICATE-----", 21) == 0)
			b += 11 + 21;
		else
			continue;
		/* "-----BEGIN CERTIFICATE-----END ...": the label ran into it */
		if (b > e || (der = trust_der(b, e - b, &len)) == NULL)
			continue;
		if (!trust_subject_hash(der, len, &hash)) {
			free(der);
			continue;
		}
		free(der);
		if (t->t_ncerts == cap) {
			cap = cap ? cap * 2 : 16;
			if ((nc = reallocarray(t->t_certs, cap,
			    sizeof(*t->t_certs))) == NULL)
				return -1;
			t->t_certs = nc;
		}
		t->t_certs[t->t_ncerts++] = (struct trust_cert){ hash,
		    b - t->t_data, e - b, 0 };
	}
	return 0;
}

/* Index every CERTIFICATE block of the bundle; others are skipped. */
static int
trust_index(struct trust *t)
{
	int	r;

	/* malformed entries are skipped, and so are their errors */
	ERR_set_mark();
	r = trust_index_entries(t);
	ERR_pop_to_mark();
	return r;
}

struct trust *
trust_new(char *data, size_t len, int mapped)
{
	struct trust	*t;

	if ((t = calloc(1, sizeof(*t))) == NULL) {
		if (mapped)
			munmap(data, len);
		else
			free(data);
		return NULL;
	}
	t->t_data = data;
	t->t_len = len;
	t->t_mapped = mapped;
	if (trust_index(t) == -1) {
		trust_free(t);
		return NULL;
	}
	return t;
}

size_t
trust_count(const struct trust *t)
{
	return t->t_ncerts;
}

void
trust_free(struct trust *t)
{
	if (t == NULL)
		return;
	if (t->t_mapped)
		munmap(t->t_data, t->t_len);
	else
		free(t->t_data);
	free(t->t_certs);
	free(t);
}

/* One indexed certificate, parsed. */
static X509 *
trust_parse(struct trust *t, struct trust_cert *c)
{
	const unsigned char	*p;
	unsigned char		*der;
	X509			*x;
	int			 len;

	if ((der = trust_der(t->t_data + c->tc_off, c->tc_len, &len)) == NULL)
		return NULL;
	/* a bad entry's errors must not pass for the handshake's own */
	ERR_set_mark();
	p = der;
	x = d2i_X509(NULL, &p, len);
	ERR_pop_to_mark();
	free(der);
	return x;
}

/*
 * The store found no certificate with this subject among those it holds:
 * add every one of the bundle's, and hand one back (the store keeps the
 * references, as with OpenSSL's own lookups).
 */
static int
trust_by_subject(X509_LOOKUP *lu, X509_LOOKUP_TYPE type, const X509_NAME *name,
    X509_OBJECT *ret)
{
	struct trust	*t = X509_LOOKUP_get_method_data(lu);
	X509_STORE	*store = X509_LOOKUP_get_store(lu);
	X509		*x, *found = NULL;
	unsigned long	 hash;
	size_t		 i;
	int		 ok = 0;

	if (t == NULL || type != X509_LU_X509)
		return 0;
	hash = X509_NAME_hash_ex(name, NULL, NULL, &ok);
	if (!ok)
		return 0;
	for (i = 0; i < t->t_ncerts; i++) {
		if (t->t_certs[i].tc_hash != hash || t->t_certs[i].tc_loaded)
			continue;
		if ((x = trust_parse(t, &t->t_certs[i])) == NULL)
			continue;
		if (X509_NAME_cmp(X509_get_subject_name(x), name) != 0) {
			X509_free(x);		/* a hash collision */
			continue;
		}
		t->t_certs[i].tc_loaded = 1;
		if (X509_STORE_add_cert(store, x) == 1 && found == NULL)
			found = x;
		else
			X509_free(x);
	}
	if (found == NULL)
		return 0;
	ok = X509_OBJECT_set1_X509(ret, found);
	/* ours, then set1's: ret borrows the store's reference */
	X509_free(found);
	if (ok)
		X509_free(found);
	return ok;
}

static void
trust_lookup_free(X509_LOOKUP *lu)
{
	trust_free(X509_LOOKUP_get_method_data(lu));
}

int
trust_attach(struct trust *t, X509_STORE *store)
{
	static X509_LOOKUP_METHOD	*method;
	X509_LOOKUP			*lu;

	if (method == NULL) {
		if ((method = X509_LOOKUP_meth_new("tpmail trust")) == NULL)
			return -1;
		X509_LOOKUP_meth_set_get_by_subject(method, trust_by_subject);
		X509_LOOKUP_meth_set_free(method, trust_lookup_free);
	}
	if ((lu = X509_STORE_add_lookup(store, method)) == NULL)
		return -1;
	X509_LOOKUP_set_method_data(lu, t);
	return 0;
}
