/*
 * cr.c: validation of Destination custom resources against SAP's published
 * CRD (destinations.destination.connectivity.api.sap/v1).  A CR that fails
 * is recorded with SAP's reason string where SAP has one and a message that
 * names the field; it never affects the other CRs.  Runs in the supervisor.
 */
#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "supervisor.h"
#include "yaml_json.h"

#define REASON_INVALID		"ConfigurationError-CustomResource-Invalid"
#define REASON_ANNOTATION	"ConfigurationError-MultitenancyAnnotation-Invalid"
#define REASON_FRAGMENT		"ConfigurationError-FragmentSpecification-NotSupported"
#define REASON_TYPE		"ConfigurationError-ReferencedDestination-TypeNotSupported"

static void
reject(json_t *rej, const char *ns, const char *name, const char *source,
    const char *reason, const char *fmt, ...)
{
	char	msg[1024];
	va_list	ap;

	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	utf8_clean(msg);
	json_array_append_new(rej, json_pack("{s:s?,s:s?,s:s,s:s,s:s}",
	    "namespace", ns, "cr", name, "reason", reason, "error", msg,
	    "source", source));
}

/* RFC 1123 label: what Kubernetes demands of namespaces and Service names. */
int	cr_valid_label(const char *, size_t);
int
cr_valid_label(const char *s, size_t max)
{
	size_t	i, n = strlen(s);

	if (n == 0 || n > max)
		return 0;
	for (i = 0; i < n; i++)
		if (!(islower((unsigned char)s[i]) || isdigit((unsigned char)s[i]) ||
		    s[i] == '-'))
			return 0;
	return s[0] != '-' && s[n - 1] != '-';
}

/* RFC 1035 label, for Service names: must also start with a letter. */
static int
valid_service_name(const char *s)
{
	return cr_valid_label(s, 63) && islower((unsigned char)s[0]);
}

static int
valid_object_name(const char *s)
{
	size_t	i, n = strlen(s);

	if (n == 0 || n > 253)
		return 0;
	for (i = 0; i < n; i++)
		if (!(islower((unsigned char)s[i]) || isdigit((unsigned char)s[i]) ||
		    s[i] == '-' || s[i] == '.'))
			return 0;
	return isalnum((unsigned char)s[0]) && isalnum((unsigned char)s[n - 1]);
}

static int
valid_fragment_name(const char *s)
{
	size_t	i, n = strlen(s);

	if (n == 0 || n > 200)
		return 0;
	for (i = 0; i < n; i++)
		if (!(isalnum((unsigned char)s[i]) || s[i] == '-' ||
		    s[i] == '_' || s[i] == '.'))
			return 0;
	return 1;
}

static const char *const spec_fields[] = {
	"destinationRef", "destinationServiceInstanceName", "fragmentRef",
	"chainRef", "service", "accessControl", "actions",
};
static const char *const levels[] = {
	"subaccount", "instance", "provider_subaccount", "provider_instance",
};

static int
in_list(const char *s, const char *const *list, size_t n)
{
	size_t	i;

	for (i = 0; s != NULL && i < n; i++)
		if (strcmp(s, list[i]) == 0)
			return 1;
	return 0;
}
#define IN_LIST(s, l)	in_list((s), (l), sizeof(l) / sizeof((l)[0]))

/* The tenant-subdomains annotation: a JSON array of distinct subdomains. */
static json_t *
parse_tenants(const char *value, char *msg, size_t msgsz)
{
	json_error_t	 jerr;
	json_t		*arr, *t;
	size_t		 i, j;

	arr = json_loads(value, JSON_DECODE_ANY, &jerr);
	if (arr == NULL || !json_is_array(arr)) {
		snprintf(msg, msgsz, "annotation %s must be a JSON array of "
		    "tenant subdomains, e.g. '[\"tenant-a\", \"tenant-b\"]'; got "
		    "'%.100s'%s%s", TPMAIL_ANNOTATION_TENANTS, value,
		    arr == NULL ? ": " : "", arr == NULL ? jerr.text : "");
		json_decref(arr);
		return NULL;
	}
	if (json_array_size(arr) == 0) {
		snprintf(msg, msgsz, "annotation %s lists no tenant subdomain",
		    TPMAIL_ANNOTATION_TENANTS);
		json_decref(arr);
		return NULL;
	}
	json_array_foreach(arr, i, t) {
		if (!json_is_string(t) ||
		    !cr_valid_label(json_string_value(t), 63)) {
			snprintf(msg, msgsz, "annotation %s: element %zu must be a "
			    "tenant subdomain (lower-case letters, digits and '-')",
			    TPMAIL_ANNOTATION_TENANTS, i);
			json_decref(arr);
			return NULL;
		}
		for (j = 0; j < i; j++)
			if (json_equal(t, json_array_get(arr, j))) {
				snprintf(msg, msgsz, "annotation %s lists tenant "
				    "\"%s\" twice", TPMAIL_ANNOTATION_TENANTS,
				    json_string_value(t));
				json_decref(arr);
				return NULL;
			}
	}
	return arr;
}

/*
 * Validate one document.  Returns the CR, NULL with a rejection appended,
 * or NULL without one for a document that is not a Destination at all.
 */
struct cr *
cr_parse(json_t *doc, const char *source, json_t *rej)
{
	json_t		*meta, *spec, *ref, *svc, *v, *ann, *frag, *tenants = NULL;
	const char	*ns = "default", *name = NULL, *kind, *api, *key, *dest;
	const char	*t;
	char		 msg[512], svcname[600];
	struct cr	*cr;
	size_t		 i;
	json_int_t	 port = 0;

	if (!json_is_object(doc)) {
		reject(rej, NULL, NULL, source, REASON_INVALID,
		    "a document in %s is not an object", source);
		return NULL;
	}
	kind = json_string_value(json_object_get(doc, "kind"));
	api = json_string_value(json_object_get(doc, "apiVersion"));
	meta = json_object_get(doc, "metadata");
	if (json_is_object(meta)) {
		if ((v = json_object_get(meta, "namespace")) != NULL)
			ns = json_is_string(v) ? json_string_value(v) : "";
		name = json_string_value(json_object_get(meta, "name"));
	}
	if (kind != NULL && strcmp(kind, "Destination") != 0) {
		log_info("%s: ignoring a %s, not a Destination", source, kind);
		return NULL;
	}
	if (kind == NULL) {
		reject(rej, ns, name, source, REASON_INVALID, "kind is missing: "
		    "a Destination CR has kind: Destination");
		return NULL;
	}
	if (api == NULL || strcmp(api, TPMAIL_CR_API_VERSION) != 0) {
		reject(rej, ns, name, source, REASON_INVALID, "apiVersion must be "
		    "%s, got %s", TPMAIL_CR_API_VERSION, api ? api : "nothing");
		return NULL;
	}
	if (name == NULL || !valid_object_name(name)) {
		reject(rej, ns, name, source, REASON_INVALID, "metadata.name is "
		    "missing or not a valid Kubernetes name");
		return NULL;
	}
	if (!cr_valid_label(ns, 63)) {
		reject(rej, ns, name, source, REASON_INVALID, "metadata.namespace "
		    "is not a valid namespace name");
		return NULL;
	}
	spec = json_object_get(doc, "spec");
	if (spec == NULL) {
		if (json_object_get(doc, "destinationRef") != NULL)
			reject(rej, ns, name, source, REASON_INVALID, "spec is "
			    "missing and destinationRef sits at the top level of "
			    "the CR: destinationRef (and "
			    "destinationServiceInstanceName) belong under spec, "
			    "as spec.destinationRef.name (SAP's shared-mode "
			    "examples omit the 'spec:' line)");
		else
			reject(rej, ns, name, source, REASON_INVALID,
			    "spec is required (spec.destinationRef.name)");
		return NULL;
	}
	if (!json_is_object(spec)) {
		reject(rej, ns, name, source, REASON_INVALID, "spec must be an object");
		return NULL;
	}
	json_object_foreach(spec, key, v) {
		if (!IN_LIST(key, spec_fields)) {
			reject(rej, ns, name, source, REASON_INVALID,
			    "spec.%s is not a field of a Destination", key);
			return NULL;
		}
	}
	ref = json_object_get(spec, "destinationRef");
	dest = json_string_value(json_object_get(ref, "name"));
	if (!json_is_object(ref) || dest == NULL || dest[0] == '\0') {
		reject(rej, ns, name, source, REASON_INVALID,
		    "spec.destinationRef.name is required (a non-empty string)");
		return NULL;
	}
	if ((v = json_object_get(ref, "level")) != NULL &&
	    !IN_LIST(json_string_value(v), levels)) {
		reject(rej, ns, name, source, REASON_INVALID,
		    "spec.destinationRef.level must be one of subaccount, "
		    "instance, provider_subaccount, provider_instance");
		return NULL;
	}
	frag = json_object_get(spec, "fragmentRef");
	if (frag != NULL && (!json_is_object(frag) ||
	    (json_object_get(frag, "level") != NULL &&
	    json_object_get(frag, "name") == NULL))) {
		reject(rej, ns, name, source, REASON_INVALID,
		    "spec.fragmentRef.level is allowed only with spec.fragmentRef.name");
		return NULL;
	}
	/*
	 * It travels in an HTTP header (X-Fragment-Name, a comma list): the
	 * characters of destination names only, no CR/LF, no comma.
	 */
	if (frag != NULL && (v = json_object_get(frag, "name")) != NULL &&
	    (!json_is_string(v) || !valid_fragment_name(json_string_value(v)))) {
		reject(rej, ns, name, source, REASON_INVALID,
		    "spec.fragmentRef.name must be a non-empty string of at most "
		    "200 letters, digits, '-', '_' and '.'");
		return NULL;
	}
	if (frag != NULL && (v = json_object_get(frag, "level")) != NULL &&
	    !IN_LIST(json_string_value(v), levels)) {
		reject(rej, ns, name, source, REASON_INVALID,
		    "spec.fragmentRef.level must be one of subaccount, "
		    "instance, provider_subaccount, provider_instance");
		return NULL;
	}
	if (frag != NULL && (v = json_object_get(frag, "optional")) != NULL &&
	    !json_is_boolean(v)) {
		reject(rej, ns, name, source, REASON_INVALID,
		    "spec.fragmentRef.optional must be true or false");
		return NULL;
	}
	if (strcmp(dest, "*") == 0) {
		if (frag != NULL)
			reject(rej, ns, name, source, REASON_FRAGMENT,
			    "spec.fragmentRef is not allowed on a destination "
			    "gateway (destinationRef.name \"*\")");
		else
			reject(rej, ns, name, source, REASON_TYPE,
			    "a destination gateway (destinationRef.name \"*\") "
			    "serves HTTP only; a MAIL destination needs its name");
		return NULL;
	}
	if ((v = json_object_get(spec, "destinationServiceInstanceName")) != NULL &&
	    !json_is_string(v)) {
		reject(rej, ns, name, source, REASON_INVALID,
		    "spec.destinationServiceInstanceName must be a string");
		return NULL;
	}
	svc = json_object_get(spec, "service");
	if (svc != NULL) {
		v = json_object_get(svc, "port");
		if (!json_is_object(svc) || (v != NULL && (!json_is_integer(v) ||
		    json_integer_value(v) < 1 || json_integer_value(v) > 65535))) {
			reject(rej, ns, name, source, REASON_INVALID,
			    "spec.service.port must be an integer from 1 to 65535");
			return NULL;
		}
		port = v ? json_integer_value(v) : 0;
	}
	if ((v = json_object_get(spec, "accessControl")) != NULL &&
	    (v = json_object_get(v, "scope")) != NULL &&
	    (!json_is_string(v) || (strcmp(json_string_value(v), "clusterWide") &&
	    strcmp(json_string_value(v), "namespaced")))) {
		reject(rej, ns, name, source, REASON_INVALID,
		    "spec.accessControl.scope must be clusterWide or namespaced");
		return NULL;
	}
	ann = json_object_get(json_object_get(meta, "annotations"),
	    TPMAIL_ANNOTATION_TENANTS);
	if (ann != NULL) {
		if (!json_is_string(ann)) {
			reject(rej, ns, name, source, REASON_ANNOTATION,
			    "annotation %s must be a string holding a JSON array "
			    "(quote it: '[\"tenant-a\"]')", TPMAIL_ANNOTATION_TENANTS);
			return NULL;
		}
		if ((tenants = parse_tenants(json_string_value(ann), msg,
		    sizeof(msg))) == NULL) {
			reject(rej, ns, name, source, REASON_ANNOTATION, "%s", msg);
			return NULL;
		}
	}
	/* every Service name the CR implies must be a valid DNS-1035 label */
	for (i = 0; i < (tenants ? json_array_size(tenants) : 1); i++) {
		t = tenants ? json_string_value(json_array_get(tenants, i)) : NULL;
		snprintf(svcname, sizeof(svcname), "%s%s%s", name, t ? "-" : "",
		    t ? t : "");
		if (!valid_service_name(svcname)) {
			reject(rej, ns, name, source, REASON_INVALID, "service name "
			    "\"%s\" is not a valid DNS-1035 label (at most 63 "
			    "lower-case letters, digits and '-', starting with a "
			    "letter)", svcname);
			json_decref(tenants);
			return NULL;
		}
	}
	if ((cr = calloc(1, sizeof(*cr))) == NULL)
		fatal("calloc");
	cr->cr_namespace = strdup(ns);
	cr->cr_name = strdup(name);
	cr->cr_dest = strdup(dest);
	v = json_object_get(spec, "destinationServiceInstanceName");
	cr->cr_instance = v ? strdup(json_string_value(v)) : NULL;
	cr->cr_port = (int)port;
	cr->cr_tenants = tenants;
	v = json_object_get(ref, "level");
	cr->cr_level = v ? strdup(json_string_value(v)) : NULL;
	v = json_object_get(frag, "name");
	cr->cr_fragment = v ? strdup(json_string_value(v)) : NULL;
	cr->cr_fragment_optional = json_is_true(json_object_get(frag,
	    "optional"));
	v = json_object_get(json_object_get(meta, "annotations"),
	    TPMAIL_ANNOTATION_RESTART);
	cr->cr_restart = json_is_string(v) ? strdup(json_string_value(v)) : NULL;
	cr->cr_source = strdup(source);
	return cr;
}

void
cr_free(struct cr *cr)
{
	if (cr == NULL)
		return;
	free(cr->cr_namespace);
	free(cr->cr_name);
	free(cr->cr_dest);
	free(cr->cr_instance);
	free(cr->cr_level);
	free(cr->cr_fragment);
	json_decref(cr->cr_tenants);
	free(cr->cr_source);
	free(cr->cr_restart);
	free(cr);
}
