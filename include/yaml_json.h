/*
 * yaml_json.h: read YAML or JSON files into jansson values.
 */
#ifndef TPMAIL_YAML_JSON_H
#define TPMAIL_YAML_JSON_H

#include <jansson.h>

#define YAML_JSON_MAX_FILE	(4 * 1024 * 1024)

/* Every document of a YAML stream, as a JSON array; NULL with err set. */
json_t	*yaml_to_json(const char *buf, size_t len, char *err, size_t errsz);
/* Replace bytes that are not valid UTF-8 with '?', in place. */
void	 utf8_clean(char *);
/* A whole file, read without stdio; the caller frees it with secret_free(). */
char	*yaml_json_read_file(const char *path, size_t *len, char *err,
	    size_t errsz);
/* A .json file (one value, or an array of objects) or a YAML file. */
json_t	*yaml_json_load_file(const char *path, char *err, size_t errsz);

#endif
