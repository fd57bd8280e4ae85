/*
 * fuzz_common.c: helpers linked into every harness, and sanitizer defaults
 * that make a UBSan report fatal (so libFuzzer records it) even when a
 * harness is run by hand without UBSAN_OPTIONS.
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"

const char	*__ubsan_default_options(void);

const char *
__ubsan_default_options(void)
{
	return "halt_on_error=1:print_stacktrace=1";
}

void
fuzz_fail(const char *file, int line, const char *cond, const char *fmt, ...)
{
	va_list	ap;

	fprintf(stderr, "\n==FUZZ== invariant broken at %s:%d: %s\n==FUZZ== ",
	    file, line, cond);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	abort();
}

char *
fuzz_dup(const uint8_t *data, size_t len, int nul)
{
	char	*p;

	if ((p = malloc(len + (nul ? 1 : 0) + (len == 0 && !nul))) == NULL)
		abort();
	if (len > 0)
		memcpy(p, data, len);
	if (nul)
		p[len] = '\0';
	return p;
}
