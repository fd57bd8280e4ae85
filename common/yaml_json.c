/*
 * yaml_json.c: YAML documents (libyaml) to jansson values, so that every
 * consumer of CRs and configuration sees one data model whether the file was
 * YAML or JSON.  Scalars stay strings unless plain (unquoted) and shaped like
 * an integer, a boolean or null, as YAML 1.2's core schema reads them; that
 * keeps `port: 110` an integer and `'["a"]'` a string.  Anchors and aliases
 * are refused: a CR has no use for them and they invite billion-laughs.
 */
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <yaml.h>

#include "secret.h"
#include "yaml_json.h"

static json_t *
scalar_value(yaml_event_t *ev)
{
	const char	*v = (const char *)ev->data.scalar.value;
	size_t		 len = ev->data.scalar.length;
	char		*end;
	long long	 n;

	if (ev->data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
		return json_stringn(v, len);
	if (len == 0 || strcmp(v, "~") == 0 || strcmp(v, "null") == 0 ||
	    strcmp(v, "Null") == 0 || strcmp(v, "NULL") == 0)
		return json_null();
	if (strcmp(v, "true") == 0 || strcmp(v, "True") == 0 ||
	    strcmp(v, "TRUE") == 0)
		return json_true();
	if (strcmp(v, "false") == 0 || strcmp(v, "False") == 0 ||
	    strcmp(v, "FALSE") == 0)
		return json_false();
	if ((v[0] >= '0' && v[0] <= '9') || ((v[0] == '-' || v[0] == '+') &&
	    len > 1 && v[1] >= '0' && v[1] <= '9')) {
		errno = 0;
		n = strtoll(v, &end, 10);
		if (*end == '\0' && errno == 0)
			return json_integer(n);
	}
	return json_stringn(v, len);
}

struct frame {
	json_t	*node;
	json_t	*key;	/* mapping: pending key */
};

static void
set_err(char *err, size_t errsz, const char *what, yaml_mark_t *mark)
{
	snprintf(err, errsz, "%s at line %zu column %zu", what,
	    mark->line + 1, mark->column + 1);
}

/*
 * Make a message valid UTF-8 in place (each bad byte becomes '?'), so that
 * jansson accepts it: a cut multi-byte character in a quoted CR value or a
 * parser's error text must not make a rejection vanish.
 */
void
utf8_clean(char *s)
{
	unsigned char	*p = (unsigned char *)s;
	int		 n, i;

	while (*p != '\0') {
		if (*p < 0x80) {
			p++;
			continue;
		}
		n = (*p & 0xe0) == 0xc0 ? 1 : (*p & 0xf0) == 0xe0 ? 2 :
		    (*p & 0xf8) == 0xf0 ? 3 : -1;
		for (i = 1; n > 0 && i <= n; i++)
			if ((p[i] & 0xc0) != 0x80)
				n = -1;
		if (n < 0 || (n == 1 && *p < 0xc2)) {
			*p++ = '?';
			continue;
		}
		p += n + 1;
	}
}

json_t *
yaml_to_json(const char *buf, size_t len, char *err, size_t errsz)
{
	yaml_parser_t	 p;
	yaml_event_t	 ev;
	struct frame	 stack[64];
	json_t		*docs, *v;
	int		 depth = -1, done = 0, ok = 1;

	docs = json_array();
	yaml_parser_initialize(&p);
	yaml_parser_set_input_string(&p, (const unsigned char *)buf, len);
	while (!done && ok) {
		if (!yaml_parser_parse(&p, &ev)) {
			snprintf(err, errsz, "YAML error: %s at line %zu column %zu",
			    p.problem ? p.problem : "syntax error",
			    p.problem_mark.line + 1, p.problem_mark.column + 1);
			ok = 0;
			break;
		}
		v = NULL;
		switch (ev.type) {
		case YAML_STREAM_END_EVENT:
			done = 1;
			break;
		case YAML_ALIAS_EVENT:
			set_err(err, errsz, "YAML aliases are not supported",
			    &ev.start_mark);
			ok = 0;
			break;
		case YAML_SCALAR_EVENT:
			if (ev.data.scalar.anchor) {
				set_err(err, errsz, "YAML anchors are not supported",
				    &ev.start_mark);
				ok = 0;
				break;
			}
			v = scalar_value(&ev);
			break;
		case YAML_SEQUENCE_START_EVENT:
		case YAML_MAPPING_START_EVENT:
			if ((ev.type == YAML_SEQUENCE_START_EVENT ?
			    ev.data.sequence_start.anchor :
			    ev.data.mapping_start.anchor) != NULL) {
				set_err(err, errsz, "YAML anchors are not supported",
				    &ev.start_mark);
				ok = 0;
				break;
			}
			if (depth + 1 >= (int)(sizeof(stack) / sizeof(stack[0]))) {
				set_err(err, errsz, "YAML nested too deeply",
				    &ev.start_mark);
				ok = 0;
				break;
			}
			stack[++depth].node = ev.type == YAML_SEQUENCE_START_EVENT ?
			    json_array() : json_object();
			stack[depth].key = NULL;
			break;
		case YAML_SEQUENCE_END_EVENT:
		case YAML_MAPPING_END_EVENT:
			v = stack[depth--].node;
			break;
		case YAML_DOCUMENT_END_EVENT:
			break;
		default:
			break;
		}
		if (v != NULL) {
			if (depth < 0) {
				/* a whole document; an empty one (null) is skipped */
				if (json_is_null(v))
					json_decref(v);
				else
					json_array_append_new(docs, v);
			} else if (json_is_array(stack[depth].node))
				json_array_append_new(stack[depth].node, v);
			else if (stack[depth].key == NULL) {
				if (!json_is_string(v)) {
					/* keys: scalars, read back as strings */
					char	 kb[64];
					char	*s = json_dumps(v, JSON_ENCODE_ANY);

					snprintf(kb, sizeof(kb), "%s", s ? s : "");
					free(s);
					json_decref(v);
					v = json_string(kb);
				}
				stack[depth].key = v;
			} else {
				if (json_object_get(stack[depth].node,
				    json_string_value(stack[depth].key)) != NULL) {
					snprintf(err, errsz,
					    "duplicate key \"%s\" at line %zu",
					    json_string_value(stack[depth].key),
					    ev.start_mark.line + 1);
					ok = 0;
				}
				json_object_set_new(stack[depth].node,
				    json_string_value(stack[depth].key), v);
				json_decref(stack[depth].key);
				stack[depth].key = NULL;
			}
		}
		yaml_event_delete(&ev);
	}
	yaml_parser_delete(&p);
	if (!ok) {
		while (depth >= 0) {
			json_decref(stack[depth].key);
			json_decref(stack[depth--].node);
		}
		json_decref(docs);
		utf8_clean(err);	/* a message may quote a cut character */
		return NULL;
	}
	return docs;
}

/*
 * Read a whole file with read(2) into one buffer the caller wipes: no stdio
 * buffer keeps a copy of a destinations file's passwords.
 */
char *
yaml_json_read_file(const char *path, size_t *lenp, char *err, size_t errsz)
{
	char	*buf = NULL, *nb;
	size_t	 len = 0, cap = 0;
	ssize_t	 n;
	int	 fd;

	if ((fd = open(path, O_RDONLY | O_CLOEXEC)) == -1) {
		snprintf(err, errsz, "cannot open: %s", strerror(errno));
		return NULL;
	}
	for (;;) {
		if (len + 4096 > cap) {
			cap = cap ? cap * 2 : 8192;
			if (cap > YAML_JSON_MAX_FILE + 8192 ||
			    (nb = malloc(cap)) == NULL) {
				snprintf(err, errsz, "file too large");
				secret_free(buf);
				close(fd);
				return NULL;
			}
			/* copy by hand so that no old block escapes unwiped */
			if (buf != NULL)
				memcpy(nb, buf, len);
			secret_free(buf);
			buf = nb;
		}
		n = read(fd, buf + len, cap - len);
		if (n == -1 && errno == EINTR)
			continue;
		if (n == -1) {
			snprintf(err, errsz, "read: %s", strerror(errno));
			secret_free(buf);
			close(fd);
			return NULL;
		}
		if (n == 0)
			break;
		len += n;
	}
	close(fd);
	if (len > YAML_JSON_MAX_FILE) {
		snprintf(err, errsz, "file too large");
		secret_free(buf);
		return NULL;
	}
	*lenp = len;
	return buf;
}

json_t *
yaml_json_load_file(const char *path, char *err, size_t errsz)
{
	char		*buf;
	size_t		 len;
	json_t		*docs, *one;
	json_error_t	 jerr;
	const char	*dot;

	if ((buf = yaml_json_read_file(path, &len, err, errsz)) == NULL)
		return NULL;
	dot = strrchr(path, '.');
	if (dot != NULL && strcmp(dot, ".json") == 0) {
		one = json_loadb(buf, len, JSON_REJECT_DUPLICATES, &jerr);
		secret_free(buf);
		if (one == NULL) {
			snprintf(err, errsz, "JSON error: %s at line %d column %d",
			    jerr.text, jerr.line, jerr.column);
			utf8_clean(err);
			return NULL;
		}
		docs = json_array();
		/* a JSON file holds one object, or a list of them */
		if (json_is_array(one) && json_array_size(one) > 0 &&
		    json_is_object(json_array_get(one, 0))) {
			json_array_extend(docs, one);
			json_decref(one);
		} else
			json_array_append_new(docs, one);
		return docs;
	}
	docs = yaml_to_json(buf, len, err, errsz);
	secret_free(buf);
	return docs;
}
