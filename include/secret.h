/*
 * secret.h: memory that held credentials is wiped before it is returned.
 * secret_install() makes jansson zero every block it frees, so a parsed
 * configuration that carried a password leaves nothing behind in the heap.
 */
#ifndef TPMAIL_SECRET_H
#define TPMAIL_SECRET_H

#include <stddef.h>

void	 secret_install(void);
void	 secret_free(void *);		/* wipe the whole allocation, then free */
char	*secret_strdup(const char *);
void	 secret_wipe(void *, size_t);
/* Locked, undumpable storage for credentials kept for the process's life. */
char	*secret_vault_strdup(const char *);
void	 secret_vault_free(char *);
int	 secret_vault_locked(void);

#endif
