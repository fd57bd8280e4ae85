/*
 * secret.c: wiping memory that held credentials.  Installed as jansson's
 * allocator in every tpmail process, so each freed JSON string (a password
 * in a configuration message, say) is zeroed before glibc reuses it.
 */
#include <malloc.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "secret.h"

void
secret_wipe(void *p, size_t len)
{
	if (p != NULL)
		explicit_bzero(p, len);
}

void
secret_free(void *p)
{
	if (p == NULL)
		return;
	explicit_bzero(p, malloc_usable_size(p));
	free(p);
}

char *
secret_strdup(const char *s)
{
	return s == NULL ? NULL : strdup(s);
}

void
secret_install(void)
{
	json_set_alloc_funcs(malloc, secret_free);
}
