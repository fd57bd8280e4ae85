#ifndef TPMAIL_TRUST_H
#define TPMAIL_TRUST_H

#include <stddef.h>
#include <openssl/x509.h>

/*
 * A CA bundle (PEM) as a trust store whose certificates are parsed when a
 * chain asks for their subject (trust.c).
 */
struct trust;

/*
 * Index the bundle; takes its memory (munmap'd if mapped, else freed),
 * also on failure.  NULL only when out of memory.
 */
struct trust	*trust_new(char *data, size_t len, int mapped);
/* Certificates found in the bundle. */
size_t		 trust_count(const struct trust *);
/* Make it a lookup of the store, which owns it from then on. */
int		 trust_attach(struct trust *, X509_STORE *);
void		 trust_free(struct trust *);

#endif
