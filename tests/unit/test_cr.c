/*
 * test_cr.c: unit tests for Destination CR validation (supervisor/cr.c)
 * fed through the YAML reader (common/yaml_json.c), as the supervisor does.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "log.h"
#include "supervisor.h"
#include "yaml_json.h"

#define R_INVALID	"ConfigurationError-CustomResource-Invalid"
#define R_ANNOTATION	"ConfigurationError-MultitenancyAnnotation-Invalid"
#define R_FRAGMENT	"ConfigurationError-FragmentSpecification-NotSupported"
#define R_TYPE		"ConfigurationError-ReferencedDestination-TypeNotSupported"

#define SOURCE		"crs/test.yaml"

#define HEAD \
	"apiVersion: destination.connectivity.api.sap/v1\n" \
	"kind: Destination\n"

/* YAML text to its documents; fails the test if the YAML is refused. */
static json_t *
yaml_docs(const char *yaml)
{
	char	 err[256] = "";
	json_t	*docs;

	docs = yaml_to_json(yaml, strlen(yaml), err, sizeof(err));
	if (docs == NULL)
		fail_msg("yaml_to_json refused:\n%s\n-> %s", yaml, err);
	assert_true(json_is_array(docs));
	return docs;
}

/* One document through cr_parse; *rej gets the rejections array. */
static struct cr *
parse_one(const char *yaml, json_t **rej)
{
	json_t		*docs = yaml_docs(yaml);
	struct cr	*cr;

	if (json_array_size(docs) != 1)
		fail_msg("expected 1 document, got %zu", json_array_size(docs));
	*rej = json_array();
	cr = cr_parse(json_array_get(docs, 0), SOURCE, *rej);
	json_decref(docs);
	return cr;
}

static const char *
rej_str(json_t *r, const char *key)
{
	return json_string_value(json_object_get(r, key));
}

/*
 * The document must be rejected with `reason`, once, with an error message
 * holding each of the (up to two) substrings.
 */
static json_t *
expect_reject(const char *yaml, const char *reason, const char *sub1,
    const char *sub2)
{
	json_t		*rej, *r;
	struct cr	*cr;
	const char	*e;

	cr = parse_one(yaml, &rej);
	if (cr != NULL)
		fail_msg("accepted, expected %s:\n%s", reason, yaml);
	if (json_array_size(rej) != 1)
		fail_msg("%zu rejections, expected 1:\n%s", json_array_size(rej),
		    yaml);
	r = json_array_get(rej, 0);
	if (rej_str(r, "reason") == NULL ||
	    strcmp(rej_str(r, "reason"), reason) != 0)
		fail_msg("reason %s, expected %s (error: %s):\n%s",
		    rej_str(r, "reason"), reason, rej_str(r, "error"), yaml);
	e = rej_str(r, "error");
	assert_non_null(e);
	if (sub1 != NULL && strstr(e, sub1) == NULL)
		fail_msg("error \"%s\" does not mention \"%s\"", e, sub1);
	if (sub2 != NULL && strstr(e, sub2) == NULL)
		fail_msg("error \"%s\" does not mention \"%s\"", e, sub2);
	assert_string_equal(rej_str(r, "source"), SOURCE);
	return rej;
}

static void
reject_case(const char *yaml, const char *reason, const char *sub1,
    const char *sub2)
{
	json_decref(expect_reject(yaml, reason, sub1, sub2));
}

/* ---- valid CRs ---- */

static void
test_valid_dedicated(void **state)
{
	json_t		*rej;
	struct cr	*cr;

	(void)state;
	cr = parse_one(HEAD
	    "metadata:\n"
	    "  name: mail\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: dest-a\n", &rej);
	assert_non_null(cr);
	assert_int_equal(json_array_size(rej), 0);
	assert_string_equal(cr->cr_namespace, "default");
	assert_string_equal(cr->cr_name, "mail");
	assert_string_equal(cr->cr_dest, "dest-a");
	assert_null(cr->cr_instance);
	assert_int_equal(cr->cr_port, 0);
	assert_null(cr->cr_tenants);
	assert_string_equal(cr->cr_source, SOURCE);
	cr_free(cr);
	json_decref(rej);
}

static void
test_valid_full(void **state)
{
	json_t		*rej;
	struct cr	*cr;

	(void)state;
	cr = parse_one(HEAD
	    "metadata:\n"
	    "  name: mail-in\n"
	    "  namespace: team-1\n"
	    "  labels:\n"
	    "    app: x\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: Dest_A.1\n"
	    "    level: subaccount\n"
	    "  destinationServiceInstanceName: dest-svc\n"
	    "  service:\n"
	    "    port: 1110\n"
	    "  accessControl:\n"
	    "    scope: namespaced\n", &rej);
	assert_non_null(cr);
	assert_int_equal(json_array_size(rej), 0);
	assert_string_equal(cr->cr_namespace, "team-1");
	assert_string_equal(cr->cr_name, "mail-in");
	assert_string_equal(cr->cr_dest, "Dest_A.1");
	assert_non_null(cr->cr_instance);
	assert_string_equal(cr->cr_instance, "dest-svc");
	assert_int_equal(cr->cr_port, 1110);
	assert_null(cr->cr_tenants);
	cr_free(cr);
	json_decref(rej);
}

static void
test_valid_shared(void **state)
{
	json_t		*rej, *want;
	struct cr	*cr;

	(void)state;
	cr = parse_one(HEAD
	    "metadata:\n"
	    "  name: mail\n"
	    "  annotations:\n"
	    "    transparent-proxy.connectivity.api.sap/tenant-subdomains: "
	    "'[\"tenant-a\", \"tenant-b\"]'\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: dest-a\n", &rej);
	assert_non_null(cr);
	assert_int_equal(json_array_size(rej), 0);
	assert_non_null(cr->cr_tenants);
	want = json_pack("[s,s]", "tenant-a", "tenant-b");
	assert_true(json_equal(cr->cr_tenants, want));
	json_decref(want);
	assert_int_equal(cr->cr_port, 0);
	cr_free(cr);
	json_decref(rej);
}

static void
test_port_bounds(void **state)
{
	static const struct {
		const char	*port;
		int		 ok;
		int		 value;
	} t[] = {
		{ "1", 1, 1 },
		{ "110", 1, 110 },
		{ "65535", 1, 65535 },
		{ "0", 0, 0 },
		{ "-1", 0, 0 },
		{ "65536", 0, 0 },
		{ "70000", 0, 0 },
		{ "4294967406", 0, 0 },	/* 2^32 + 110: no wrap-around */
		{ "'110'", 0, 0 },	/* a string, not an integer */
		{ "\"110\"", 0, 0 },
		{ "110.0", 0, 0 },
		{ "true", 0, 0 },
		{ "null", 0, 0 },
		{ "[110]", 0, 0 },
	};
	char		 yaml[512];
	json_t		*rej;
	struct cr	*cr;
	size_t		 i;

	(void)state;
	for (i = 0; i < sizeof(t) / sizeof(t[0]); i++) {
		snprintf(yaml, sizeof(yaml), HEAD
		    "metadata:\n"
		    "  name: mail\n"
		    "spec:\n"
		    "  destinationRef:\n"
		    "    name: dest-a\n"
		    "  service:\n"
		    "    port: %s\n", t[i].port);
		if (t[i].ok) {
			cr = parse_one(yaml, &rej);
			if (cr == NULL)
				fail_msg("port %s rejected: %s", t[i].port,
				    rej_str(json_array_get(rej, 0), "error"));
			assert_int_equal(cr->cr_port, t[i].value);
			assert_int_equal(json_array_size(rej), 0);
			cr_free(cr);
			json_decref(rej);
		} else
			reject_case(yaml, R_INVALID, "spec.service.port", NULL);
	}
}

/* ---- rejections ---- */

static void
test_destination_ref_required(void **state)
{
	(void)state;
	reject_case(HEAD
	    "metadata:\n"
	    "  name: mail\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    level: subaccount\n",
	    R_INVALID, "spec.destinationRef.name", NULL);
	reject_case(HEAD
	    "metadata:\n"
	    "  name: mail\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: \"\"\n",
	    R_INVALID, "spec.destinationRef.name", NULL);
	reject_case(HEAD
	    "metadata:\n"
	    "  name: mail\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: 42\n",
	    R_INVALID, "spec.destinationRef.name", NULL);
	reject_case(HEAD
	    "metadata:\n"
	    "  name: mail\n"
	    "spec:\n"
	    "  destinationRef: dest-a\n",
	    R_INVALID, "spec.destinationRef.name", NULL);
	reject_case(HEAD
	    "metadata:\n"
	    "  name: mail\n"
	    "spec:\n"
	    "  destinationServiceInstanceName: x\n",
	    R_INVALID, "spec.destinationRef.name", NULL);
	reject_case(HEAD
	    "metadata:\n"
	    "  name: mail\n",
	    R_INVALID, "spec", NULL);
}

static void
test_metadata_name(void **state)
{
	json_t	*rej;

	(void)state;
	reject_case(HEAD
	    "metadata:\n"
	    "  name: \"\"\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: dest-a\n",
	    R_INVALID, "metadata.name", NULL);
	reject_case(HEAD
	    "metadata:\n"
	    "  namespace: x\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: dest-a\n",
	    R_INVALID, "metadata.name", NULL);
	reject_case(HEAD
	    "metadata:\n"
	    "  name: Mail\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: dest-a\n",
	    R_INVALID, "metadata.name", NULL);
	rej = expect_reject(HEAD
	    "metadata:\n"
	    "  name: mail\n"
	    "  namespace: Team_1\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: dest-a\n",
	    R_INVALID, "metadata.namespace", NULL);
	/* the rejection names the CR it is about */
	assert_string_equal(rej_str(json_array_get(rej, 0), "cr"), "mail");
	assert_string_equal(rej_str(json_array_get(rej, 0), "namespace"),
	    "Team_1");
	json_decref(rej);
}

/* SAP's shared-mode examples put destinationRef at top level, no spec: */
static void
test_sap_doc_bug(void **state)
{
	json_t	*rej, *r;

	(void)state;
	rej = expect_reject(HEAD
	    "metadata:\n"
	    "  name: mail\n"
	    "  annotations:\n"
	    "    transparent-proxy.connectivity.api.sap/tenant-subdomains: "
	    "'[\"tenant-a\"]'\n"
	    "destinationRef:\n"
	    "  name: dest-a\n"
	    "destinationServiceInstanceName: dest-svc\n",
	    R_INVALID, "destinationRef", "spec");
	r = json_array_get(rej, 0);
	assert_string_equal(rej_str(r, "namespace"), "default");
	assert_string_equal(rej_str(r, "cr"), "mail");
	/* the hint is specific: not the plain "spec is required" message */
	assert_non_null(strstr(rej_str(r, "error"), "top level"));
	json_decref(rej);
}

#define SHARED(ann) HEAD \
	"metadata:\n" \
	"  name: mail\n" \
	"  annotations:\n" \
	"    transparent-proxy.connectivity.api.sap/tenant-subdomains: " ann "\n" \
	"spec:\n" \
	"  destinationRef:\n" \
	"    name: dest-a\n"

static void
test_annotation_invalid(void **state)
{
	(void)state;
	reject_case(SHARED("'[tenant-a'"), R_ANNOTATION,
	    TPMAIL_ANNOTATION_TENANTS, "[tenant-a");
	reject_case(SHARED("'[\"tenant-a\"'"), R_ANNOTATION, "JSON array", NULL);
	/* valid JSON, but not an array */
	reject_case(SHARED("'{\"tenant-a\": 1}'"), R_ANNOTATION, "JSON array",
	    NULL);
	reject_case(SHARED("'\"tenant-a\"'"), R_ANNOTATION, "JSON array", NULL);
	reject_case(SHARED("tenant-a"), R_ANNOTATION, "JSON array", NULL);
	/* a YAML list instead of a string holding JSON */
	reject_case(HEAD
	    "metadata:\n"
	    "  name: mail\n"
	    "  annotations:\n"
	    "    transparent-proxy.connectivity.api.sap/tenant-subdomains:\n"
	    "      - tenant-a\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: dest-a\n", R_ANNOTATION, "string", NULL);
	/* empty, duplicates, bad elements */
	reject_case(SHARED("'[]'"), R_ANNOTATION, "no tenant", NULL);
	reject_case(SHARED("'[\"tenant-a\", \"tenant-b\", \"tenant-a\"]'"),
	    R_ANNOTATION, "\"tenant-a\"", "twice");
	reject_case(SHARED("'[\"tenant-a\", 7]'"), R_ANNOTATION, "element 1",
	    NULL);
	reject_case(SHARED("'[\"Tenant-A\"]'"), R_ANNOTATION, "element 0", NULL);
	reject_case(SHARED("'[\"-a\"]'"), R_ANNOTATION, "element 0", NULL);
	reject_case(SHARED("'[\"\"]'"), R_ANNOTATION, "element 0", NULL);
}

static void
test_gateway_and_fragment(void **state)
{
	(void)state;
	reject_case(HEAD
	    "metadata:\n"
	    "  name: mail\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: \"*\"\n",
	    R_TYPE, "\"*\"", NULL);
	reject_case(HEAD
	    "metadata:\n"
	    "  name: mail\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: \"*\"\n"
	    "  fragmentRef:\n"
	    "    name: frag\n",
	    R_FRAGMENT, "fragmentRef", NULL);
	/* fragmentRef.level without fragmentRef.name */
	reject_case(HEAD
	    "metadata:\n"
	    "  name: mail\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: dest-a\n"
	    "  fragmentRef:\n"
	    "    level: subaccount\n",
	    R_INVALID, "fragmentRef", NULL);
	reject_case(HEAD
	    "metadata:\n"
	    "  name: mail\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: dest-a\n"
	    "    level: tenant\n",
	    R_INVALID, "spec.destinationRef.level", NULL);
}

static void
test_api_version_and_kind(void **state)
{
	json_t		*rej;
	struct cr	*cr;

	(void)state;
	reject_case(
	    "apiVersion: destination.connectivity.api.sap/v2\n"
	    "kind: Destination\n"
	    "metadata:\n"
	    "  name: mail\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: dest-a\n",
	    R_INVALID, "apiVersion", "destination.connectivity.api.sap/v2");
	reject_case(
	    "apiVersion: v1\n"
	    "kind: Destination\n"
	    "metadata:\n"
	    "  name: mail\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: dest-a\n",
	    R_INVALID, "apiVersion", NULL);
	reject_case(
	    "kind: Destination\n"
	    "metadata:\n"
	    "  name: mail\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: dest-a\n",
	    R_INVALID, "apiVersion", NULL);
	reject_case(
	    "apiVersion: destination.connectivity.api.sap/v1\n"
	    "metadata:\n"
	    "  name: mail\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: dest-a\n",
	    R_INVALID, "kind", NULL);

	/* a Service in the same directory is not a Destination: ignored */
	cr = parse_one(
	    "apiVersion: v1\n"
	    "kind: Service\n"
	    "metadata:\n"
	    "  name: mail\n"
	    "spec:\n"
	    "  ports:\n"
	    "    - port: 110\n", &rej);
	assert_null(cr);
	assert_int_equal(json_array_size(rej), 0);
	json_decref(rej);

	/* a document that is not an object at all is rejected */
	reject_case("just a string\n", R_INVALID, NULL, NULL);
	reject_case("- a\n- b\n", R_INVALID, NULL, NULL);
}

static void
test_unknown_spec_field(void **state)
{
	(void)state;
	reject_case(HEAD
	    "metadata:\n"
	    "  name: mail\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: dest-a\n"
	    "  destinationref:\n"
	    "    name: dest-b\n",
	    R_INVALID, "spec.destinationref", NULL);
	reject_case(HEAD
	    "metadata:\n"
	    "  name: mail\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: dest-a\n"
	    "  port: 110\n",
	    R_INVALID, "spec.port", NULL);
	reject_case(HEAD
	    "metadata:\n"
	    "  name: mail\n"
	    "spec: [1]\n",
	    R_INVALID, "spec", NULL);
	reject_case(HEAD
	    "metadata:\n"
	    "  name: mail\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: dest-a\n"
	    "  accessControl:\n"
	    "    scope: global\n",
	    R_INVALID, "spec.accessControl.scope", NULL);
}

static char *
name_of_len(size_t n)
{
	char	*s = malloc(n + 1);

	assert_non_null(s);
	memset(s, 'a', n);
	s[n] = '\0';
	return s;
}

/* Service names <cr> and <cr>-<tenant> must fit a 63-character label. */
static void
test_service_name_length(void **state)
{
	char		 yaml[1024];
	char		*name;
	json_t		*rej;
	struct cr	*cr;

	(void)state;
	/* dedicated: the Service is named after the CR */
	name = name_of_len(63);
	snprintf(yaml, sizeof(yaml), HEAD "metadata:\n  name: %s\n"
	    "spec:\n  destinationRef:\n    name: dest-a\n", name);
	cr = parse_one(yaml, &rej);
	assert_non_null(cr);
	cr_free(cr);
	json_decref(rej);
	free(name);
	name = name_of_len(64);
	snprintf(yaml, sizeof(yaml), HEAD "metadata:\n  name: %s\n"
	    "spec:\n  destinationRef:\n    name: dest-a\n", name);
	reject_case(yaml, R_INVALID, name, "63");
	free(name);

	/* a Service name starts with a letter */
	reject_case(HEAD "metadata:\n  name: 1mail\n"
	    "spec:\n  destinationRef:\n    name: dest-a\n",
	    R_INVALID, "1mail", NULL);

	/* shared: "<cr>-tenant-a" is 63 characters with a 54-char CR name */
	name = name_of_len(54);
	snprintf(yaml, sizeof(yaml), HEAD "metadata:\n  name: %s\n"
	    "  annotations:\n"
	    "    " TPMAIL_ANNOTATION_TENANTS ": '[\"tenant-a\"]'\n"
	    "spec:\n  destinationRef:\n    name: dest-a\n", name);
	cr = parse_one(yaml, &rej);
	if (cr == NULL)
		fail_msg("63-char service name rejected: %s",
		    rej_str(json_array_get(rej, 0), "error"));
	cr_free(cr);
	json_decref(rej);
	free(name);

	/* one more character in the CR name: "<cr>-tenant-a" is 64 */
	name = name_of_len(55);
	snprintf(yaml, sizeof(yaml), HEAD "metadata:\n  name: %s\n"
	    "  annotations:\n"
	    "    " TPMAIL_ANNOTATION_TENANTS ": '[\"b\", \"tenant-a\"]'\n"
	    "spec:\n  destinationRef:\n    name: dest-a\n", name);
	rej = expect_reject(yaml, R_INVALID, "-tenant-a\"", "63");
	assert_string_equal(rej_str(json_array_get(rej, 0), "cr"), name);
	json_decref(rej);
	free(name);
}

/* A stream of documents: each one stands on its own. */
static void
test_multiple_documents(void **state)
{
	const char	*yaml =
	    "---\n"
	    HEAD
	    "metadata:\n"
	    "  name: one\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: dest-a\n"
	    "---\n"
	    "apiVersion: v1\n"
	    "kind: Service\n"
	    "metadata:\n"
	    "  name: svc\n"
	    "---\n"
	    "# an empty document\n"
	    "---\n"
	    HEAD
	    "metadata:\n"
	    "  name: two\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: \"*\"\n"
	    "---\n"
	    HEAD
	    "metadata:\n"
	    "  name: three\n"
	    "  namespace: ns3\n"
	    "spec:\n"
	    "  destinationRef:\n"
	    "    name: dest-c\n"
	    "  service:\n"
	    "    port: 2110\n"
	    "...\n";
	json_t		*docs, *rej, *doc;
	struct cr	*cr, *got[8];
	size_t		 i, n = 0;

	(void)state;
	docs = yaml_docs(yaml);
	assert_int_equal(json_array_size(docs), 4);
	rej = json_array();
	json_array_foreach(docs, i, doc) {
		cr = cr_parse(doc, SOURCE, rej);
		if (cr != NULL)
			got[n++] = cr;
	}
	assert_int_equal(n, 2);
	assert_string_equal(got[0]->cr_name, "one");
	assert_string_equal(got[0]->cr_dest, "dest-a");
	assert_string_equal(got[1]->cr_name, "three");
	assert_string_equal(got[1]->cr_namespace, "ns3");
	assert_int_equal(got[1]->cr_port, 2110);
	assert_int_equal(json_array_size(rej), 1);
	assert_string_equal(rej_str(json_array_get(rej, 0), "cr"), "two");
	assert_string_equal(rej_str(json_array_get(rej, 0), "reason"), R_TYPE);
	for (i = 0; i < n; i++)
		cr_free(got[i]);
	json_decref(rej);
	json_decref(docs);
}

/* ---- yaml_to_json itself ---- */

static void
test_yaml_scalars(void **state)
{
	json_t	*docs, *d;

	(void)state;
	docs = yaml_docs(
	    "int: 110\n"
	    "neg: -5\n"
	    "squoted: '110'\n"
	    "dquoted: \"110\"\n"
	    "t: true\n"
	    "f: false\n"
	    "qt: 'true'\n"
	    "n1: ~\n"
	    "n2: null\n"
	    "n3:\n"
	    "s: hello world\n"
	    "hex: 0x10\n"
	    "mixed: 110abc\n"
	    "json: '[\"tenant-a\", \"tenant-b\"]'\n"
	    "block: |\n"
	    "  line1\n"
	    "  line2\n"
	    "flow: {a: 1, b: [x, 2]}\n"
	    "110: numeric key\n");
	assert_int_equal(json_array_size(docs), 1);
	d = json_array_get(docs, 0);
	assert_true(json_is_integer(json_object_get(d, "int")));
	assert_int_equal(json_integer_value(json_object_get(d, "int")), 110);
	assert_int_equal(json_integer_value(json_object_get(d, "neg")), -5);
	assert_true(json_is_string(json_object_get(d, "squoted")));
	assert_string_equal(json_string_value(json_object_get(d, "squoted")),
	    "110");
	assert_true(json_is_string(json_object_get(d, "dquoted")));
	assert_true(json_is_true(json_object_get(d, "t")));
	assert_true(json_is_false(json_object_get(d, "f")));
	assert_true(json_is_string(json_object_get(d, "qt")));
	assert_true(json_is_null(json_object_get(d, "n1")));
	assert_true(json_is_null(json_object_get(d, "n2")));
	assert_true(json_is_null(json_object_get(d, "n3")));
	assert_string_equal(json_string_value(json_object_get(d, "s")),
	    "hello world");
	assert_true(json_is_string(json_object_get(d, "hex")));
	assert_true(json_is_string(json_object_get(d, "mixed")));
	assert_string_equal(json_string_value(json_object_get(d, "json")),
	    "[\"tenant-a\", \"tenant-b\"]");
	assert_string_equal(json_string_value(json_object_get(d, "block")),
	    "line1\nline2\n");
	assert_int_equal(json_integer_value(json_object_get(
	    json_object_get(d, "flow"), "a")), 1);
	assert_string_equal(json_string_value(json_array_get(json_object_get(
	    json_object_get(d, "flow"), "b"), 0)), "x");
	assert_string_equal(json_string_value(json_object_get(d, "110")),
	    "numeric key");
	json_decref(docs);
}

static void
expect_yaml_refused(const char *yaml, const char *sub)
{
	char	 err[256] = "";
	json_t	*docs;

	docs = yaml_to_json(yaml, strlen(yaml), err, sizeof(err));
	if (docs != NULL) {
		char	 buf[512];
		char	*s = json_dumps(docs, JSON_COMPACT);

		snprintf(buf, sizeof(buf), "%s", s ? s : "?");
		free(s);
		json_decref(docs);
		fail_msg("accepted:\n%s\nas %s", yaml, buf);
	}
	if (err[0] == '\0')
		fail_msg("refused without a message:\n%s", yaml);
	if (sub != NULL && strstr(err, sub) == NULL)
		fail_msg("error \"%s\" does not mention \"%s\"", err, sub);
}

static void
test_yaml_anchors_aliases_refused(void **state)
{
	(void)state;
	expect_yaml_refused("a: &x foo\nb: *x\n", NULL);
	expect_yaml_refused("a: &x foo\nb: bar\n", "anchor");
	expect_yaml_refused(
	    "base: &b\n"
	    "  name: dest-a\n"
	    "spec:\n"
	    "  destinationRef: *b\n", NULL);
	expect_yaml_refused(
	    "base: &b {name: dest-a}\n"
	    "ref:\n"
	    "  <<: *b\n", NULL);
}

/*
 * yaml_json.c says "Anchors and aliases are refused"; a scalar anchor is, so
 * an anchor on a mapping or a sequence must be too, alias or not.
 */
static void
test_yaml_collection_anchor_refused(void **state)
{
	(void)state;
	expect_yaml_refused("a: &x\n  b: 1\n", "anchor");
	expect_yaml_refused("a: &x [1, 2]\n", "anchor");
	expect_yaml_refused("&top\nkind: Destination\n", "anchor");
}

static void
test_yaml_errors(void **state)
{
	(void)state;
	expect_yaml_refused("a: 1\na: 2\n", "duplicate key");
	expect_yaml_refused("a: [1, 2\n", "line");
	expect_yaml_refused("a: b: c\n", NULL);
	expect_yaml_refused("\"unterminated\n", NULL);
}

int
main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_valid_dedicated),
		cmocka_unit_test(test_valid_full),
		cmocka_unit_test(test_valid_shared),
		cmocka_unit_test(test_port_bounds),
		cmocka_unit_test(test_destination_ref_required),
		cmocka_unit_test(test_metadata_name),
		cmocka_unit_test(test_sap_doc_bug),
		cmocka_unit_test(test_annotation_invalid),
		cmocka_unit_test(test_gateway_and_fragment),
		cmocka_unit_test(test_api_version_and_kind),
		cmocka_unit_test(test_unknown_spec_field),
		cmocka_unit_test(test_service_name_length),
		cmocka_unit_test(test_multiple_documents),
		cmocka_unit_test(test_yaml_scalars),
		cmocka_unit_test(test_yaml_anchors_aliases_refused),
		cmocka_unit_test(test_yaml_collection_anchor_refused),
		cmocka_unit_test(test_yaml_errors),
	};

	log_init("test_cr", LOG_LEVEL_ERROR);
	return cmocka_run_group_tests(tests, NULL, NULL);
}
