/*
 * fuzz_cr: a CR file through the supervisor's reader, as crdir_load() does
 * it: yaml_to_json() (common/yaml_json.c) then cr_parse() (supervisor/cr.c)
 * on each document.  Built twice: fuzz_cr reads YAML; fuzz_cr_json
 * (FUZZ_CR_JSON) reads a .json file's shape (one object, or a list of
 * them) with json_loadb() as yaml_json_load_file() does.
 *
 * Checked: a refused file has a message that fits a JSON rejection;
 * cr_parse() either returns a CR that really is valid (names are DNS
 * labels, the port in range, tenants distinct subdomains), or records
 * exactly one rejection with a reason and a message, or returns NULL
 * silently only for a document whose kind is not Destination.
 */
#include <ctype.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "log.h"
#include "secret.h"
#include "supervisor.h"
#include "yaml_json.h"

#ifdef FUZZ_CR_JSON
#define SOURCE	"fuzz.json"
#else
#define SOURCE	"fuzz.yaml"
#endif

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
	log_init("fuzz_cr", LOG_LEVEL_ERROR);
	secret_install();		/* as tpmaild does */
	return 0;
}

static int
label(const char *s, size_t max)
{
	size_t	i, n = strlen(s);

	if (n == 0 || n > max || s[0] == '-' || s[n - 1] == '-')
		return 0;
	for (i = 0; i < n; i++)
		if (!islower((unsigned char)s[i]) && !isdigit((unsigned char)s[i]) &&
		    s[i] != '-')
			return 0;
	return 1;
}

static void
check_cr(const struct cr *cr)
{
	char		 svc[700];
	json_t		*t;
	size_t		 i, j;

	FUZZ_CHECK(cr->cr_namespace && cr->cr_name && cr->cr_dest &&
	    cr->cr_source, "CR with a NULL field");
	FUZZ_CHECK(label(cr->cr_namespace, 63), "namespace \"%s\"",
	    cr->cr_namespace);
	FUZZ_CHECK(strlen(cr->cr_name) > 0 && strlen(cr->cr_name) <= 253,
	    "name \"%s\"", cr->cr_name);
	FUZZ_CHECK(cr->cr_dest[0] != '\0' && strcmp(cr->cr_dest, "*") != 0,
	    "destinationRef.name \"%s\"", cr->cr_dest);
	FUZZ_CHECK(cr->cr_port >= 0 && cr->cr_port <= 65535, "port %d",
	    cr->cr_port);
	FUZZ_CHECK(strcmp(cr->cr_source, SOURCE) == 0, "source %s",
	    cr->cr_source);
	if (cr->cr_tenants == NULL) {
		FUZZ_CHECK(label(cr->cr_name, 63) && islower((unsigned char)
		    cr->cr_name[0]), "Service name \"%s\"", cr->cr_name);
		return;
	}
	FUZZ_CHECK(json_is_array(cr->cr_tenants) &&
	    json_array_size(cr->cr_tenants) > 0, "tenants not a non-empty array");
	json_array_foreach(cr->cr_tenants, i, t) {
		FUZZ_CHECK(json_is_string(t) && label(json_string_value(t), 63),
		    "tenant %zu is not a subdomain", i);
		for (j = 0; j < i; j++)
			FUZZ_CHECK(!json_equal(t, json_array_get(cr->cr_tenants, j)),
			    "tenant %s twice", json_string_value(t));
		snprintf(svc, sizeof(svc), "%s-%s", cr->cr_name,
		    json_string_value(t));
		FUZZ_CHECK(label(svc, 63) && islower((unsigned char)svc[0]),
		    "Service name \"%s\"", svc);
	}
}

static void
check_doc(json_t *doc)
{
	json_t		*rej = json_array(), *r;
	const char	*kind;
	struct cr	*cr;

	cr = cr_parse(doc, SOURCE, rej);
	if (cr != NULL) {
		FUZZ_CHECK(json_array_size(rej) == 0, "accepted and rejected");
		check_cr(cr);
		cr_free(cr);
		json_decref(rej);
		return;
	}
	kind = json_string_value(json_object_get(doc, "kind"));
	if (json_array_size(rej) == 0) {
		/* silence is for other kinds only; a lost rejection is a bug */
		FUZZ_CHECK(json_is_object(doc) && kind != NULL &&
		    strcmp(kind, "Destination") != 0,
		    "CR refused without a rejection (kind %s)",
		    kind ? kind : "(none)");
	} else {
		FUZZ_CHECK(json_array_size(rej) == 1, "%zu rejections",
		    json_array_size(rej));
		r = json_array_get(rej, 0);
		FUZZ_CHECK(json_is_string(json_object_get(r, "reason")) &&
		    json_is_string(json_object_get(r, "error")) &&
		    strcmp(json_string_value(json_object_get(r, "source")),
		    SOURCE) == 0, "rejection without reason/error/source");
	}
	json_decref(rej);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	char		 err[512];	/* crdir_load's */
	char		*buf = fuzz_dup(data, size, 0);
	json_t		*docs, *doc, *s;
	size_t		 i;
#ifdef FUZZ_CR_JSON
	json_error_t	 jerr;
	json_t		*one;
#endif

	err[0] = '\0';
#ifdef FUZZ_CR_JSON
	docs = NULL;
	one = json_loadb(buf, size, JSON_REJECT_DUPLICATES, &jerr);
	if (one != NULL) {
		docs = json_array();
		if (json_is_array(one) && json_array_size(one) > 0 &&
		    json_is_object(json_array_get(one, 0))) {
			json_array_extend(docs, one);
			json_decref(one);
		} else
			json_array_append_new(docs, one);
	} else {
		/* as yaml_json_load_file words it, and cleans it */
		snprintf(err, sizeof(err), "JSON error: %s at line %d column %d",
		    jerr.text, jerr.line, jerr.column);
		utf8_clean(err);
	}
#else
	docs = yaml_to_json(buf, size, err, sizeof(err));
#endif
	if (docs == NULL) {
		FUZZ_CHECK(err[0] != '\0', "refused without a message");
		/* crdir_load lists it as a rejection: it must be a JSON string */
		s = json_string(err);
		FUZZ_CHECK(s != NULL, "error message is not UTF-8: %s", err);
		json_decref(s);
		free(buf);
		return 0;
	}
	FUZZ_CHECK(json_is_array(docs), "documents not an array");
	json_array_foreach(docs, i, doc)
		check_doc(doc);
	json_decref(docs);
	free(buf);
	return 0;
}
