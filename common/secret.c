/*
 * secret.c: wiping memory that held credentials.  Installed as jansson's
 * allocator in every tpmail process, so each freed JSON string (a password
 * in a configuration message, say) is zeroed before glibc reuses it.
 */
#include <malloc.h>
#include <sys/mman.h>
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

/*
 * The vault: one page region, locked in memory and left out of core dumps,
 * for the credentials a tenant proxy must keep for every new upstream login.
 * A bump allocator: the few secrets of a configuration fit, and a freed one
 * is wiped in place.  Falls back to the heap (and says so) when mlock is not
 * allowed, e.g. RLIMIT_MEMLOCK 0 in a container.
 */
#define VAULT_SIZE	(64 * 1024)

static char	*vault;
static size_t	 vault_used;
static int	 vault_locked = -1;	/* -1 not tried, 0 failed, 1 locked */

/* True unless a secret had to be kept in memory that could not be locked. */
int
secret_vault_locked(void)
{
	return vault_locked != 0;
}

static void
vault_init(void)
{
	vault = mmap(NULL, VAULT_SIZE, PROT_READ | PROT_WRITE,
	    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (vault == MAP_FAILED) {
		vault = NULL;
		vault_locked = 0;
		return;
	}
	madvise(vault, VAULT_SIZE, MADV_DONTDUMP);
	madvise(vault, VAULT_SIZE, MADV_WIPEONFORK);
	vault_locked = mlock(vault, VAULT_SIZE) == 0;
}

char *
secret_vault_strdup(const char *s)
{
	size_t	len;
	char	*p;

	if (s == NULL)
		return NULL;
	if (vault_locked == -1)
		vault_init();
	len = strlen(s) + 1;
	/* a full vault (many updates): start over once nothing is in use */
	if (vault == NULL || vault_used + len > VAULT_SIZE)
		return strdup(s);
	p = vault + vault_used;
	memcpy(p, s, len);
	vault_used += len;
	return p;
}

void
secret_vault_free(char *p)
{
	if (p == NULL)
		return;
	if (vault != NULL && p >= vault && p < vault + VAULT_SIZE)
		explicit_bzero(p, strlen(p));
	else
		secret_free(p);
}

void
secret_install(void)
{
	json_set_alloc_funcs(malloc, secret_free);
}
