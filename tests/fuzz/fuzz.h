/*
 * fuzz.h: what every libFuzzer harness in tests/fuzz shares.  A broken
 * invariant aborts with a message, so libFuzzer saves the input as crash-*.
 */
#ifndef TPMAIL_FUZZ_H
#define TPMAIL_FUZZ_H

#include <stddef.h>
#include <stdint.h>

int	LLVMFuzzerTestOneInput(const uint8_t *, size_t);
int	LLVMFuzzerInitialize(int *, char ***);

/* Abort with file, line and the broken condition (never compiled out). */
#define FUZZ_CHECK(cond, ...) do {					\
	if (!(cond))							\
		fuzz_fail(__FILE__, __LINE__, #cond, __VA_ARGS__);	\
} while (0)

void	fuzz_fail(const char *file, int line, const char *cond,
	    const char *fmt, ...)
	    __attribute__((format(printf, 4, 5), noreturn));

/* A heap copy of exactly len bytes (plus NUL if nul), so ASan sees overreads. */
char	*fuzz_dup(const uint8_t *data, size_t len, int nul);

#endif
