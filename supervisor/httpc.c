/*
 * httpc.c: asynchronous HTTP requests for tpmaild (libcurl's multi interface
 * driven by libevent), for the OAuth token endpoints and the Destination
 * service.  One request, one callback with the status and the body; the
 * event loop never blocks on a slow or dead control plane.  Request and
 * response bodies carry secrets (client secrets, tokens, passwords): every
 * buffer is wiped when freed.  Runs in the supervisor.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <curl/curl.h>
#include <event2/event.h>

#include "log.h"
#include "secret.h"
#include "supervisor.h"

#define HTTPC_MAX_BODY	(4 * 1024 * 1024)

struct httpc_req {
	CURL			*hr_easy;
	struct curl_slist	*hr_headers;
	char			*hr_body;	/* request body (secret) */
	char			*hr_resp;	/* response body (secret) */
	char			*hr_cert;	/* client certificate, PEM */
	char			*hr_key;	/* its private key (secret) */
	size_t			 hr_len;
	size_t			 hr_cap;
	int			 hr_too_big;
	char			 hr_err[CURL_ERROR_SIZE];
	httpc_cb		 hr_cb;
	httpc_line_cb		 hr_line_cb;	/* streaming: one call per line */
	void			*hr_arg;
	int			 hr_cancelled;
};

struct httpc_sock {
	struct event	*hs_ev;
	curl_socket_t	 hs_fd;
};

static CURLM			*multi;
static struct event		*multi_timer;
static struct curl_slist	*resolve_list;

static void	httpc_check_done(void);

/* Streaming: hand over every complete line, keep the rest. */
static void
httpc_lines(struct httpc_req *r)
{
	char	*nl, *start = r->hr_resp;
	size_t	 used;

	while (!r->hr_cancelled &&
	    (nl = memchr(start, '\n', r->hr_len - (start - r->hr_resp))) != NULL) {
		*nl = '\0';
		r->hr_line_cb(start, nl - start, r->hr_arg);
		start = nl + 1;
	}
	used = start - r->hr_resp;
	if (used > 0) {
		memmove(r->hr_resp, start, r->hr_len - used);
		r->hr_len -= used;
		r->hr_resp[r->hr_len] = '\0';
	}
}

static size_t
httpc_write(char *data, size_t size, size_t n, void *arg)
{
	struct httpc_req	*r = arg;
	size_t			 len = size * n, cap;
	char			*nb;

	if (r->hr_cancelled)
		return 0;

	if (r->hr_len + len + 1 > HTTPC_MAX_BODY) {
		r->hr_too_big = 1;
		return 0;
	}
	if (r->hr_len + len + 1 > r->hr_cap) {
		cap = (r->hr_len + len + 1) * 2;
		if ((nb = malloc(cap)) == NULL)
			return 0;
		/* copied by hand so that no old block escapes unwiped */
		if (r->hr_resp != NULL)
			memcpy(nb, r->hr_resp, r->hr_len);
		secret_free(r->hr_resp);
		r->hr_resp = nb;
		r->hr_cap = cap;
	}
	memcpy(r->hr_resp + r->hr_len, data, len);
	r->hr_len += len;
	r->hr_resp[r->hr_len] = '\0';
	if (r->hr_line_cb != NULL) {
		long	status = 0;

		/* an error reply is read whole, as a normal request */
		curl_easy_getinfo(r->hr_easy, CURLINFO_RESPONSE_CODE, &status);
		if (status == 200)
			httpc_lines(r);
	}
	return len;
}

static void
httpc_free(struct httpc_req *r)
{
	curl_multi_remove_handle(multi, r->hr_easy);
	curl_easy_cleanup(r->hr_easy);
	curl_slist_free_all(r->hr_headers);
	secret_free(r->hr_body);
	secret_free(r->hr_resp);
	free(r->hr_cert);
	secret_free(r->hr_key);
	free(r);
}

static void
httpc_event_cb(evutil_socket_t fd, short what, void *arg)
{
	int	running, flags = 0;

	if (what & EV_READ)
		flags |= CURL_CSELECT_IN;
	if (what & EV_WRITE)
		flags |= CURL_CSELECT_OUT;
	curl_multi_socket_action(multi, fd, flags, &running);
	httpc_check_done();
}

static void
httpc_timer_cb(evutil_socket_t fd, short what, void *arg)
{
	int	running;

	curl_multi_socket_action(multi, CURL_SOCKET_TIMEOUT, 0, &running);
	httpc_check_done();
}

/* curl tells which sockets to watch for what. */
static int
httpc_socket_cb(CURL *e, curl_socket_t fd, int what, void *cbp, void *sockp)
{
	struct httpc_sock	*hs = sockp;
	short			 ev = 0;

	if (what == CURL_POLL_REMOVE) {
		if (hs != NULL) {
			event_free(hs->hs_ev);
			free(hs);
		}
		curl_multi_assign(multi, fd, NULL);
		return 0;
	}
	if (what & CURL_POLL_IN)
		ev |= EV_READ;
	if (what & CURL_POLL_OUT)
		ev |= EV_WRITE;
	if (hs == NULL) {
		if ((hs = calloc(1, sizeof(*hs))) == NULL)
			return -1;
		hs->hs_fd = fd;
		curl_multi_assign(multi, fd, hs);
	} else
		event_free(hs->hs_ev);
	hs->hs_ev = event_new(sup->base, fd, ev | EV_PERSIST, httpc_event_cb,
	    NULL);
	event_add(hs->hs_ev, NULL);
	return 0;
}

static int
httpc_timerfunc(CURLM *m, long ms, void *arg)
{
	struct timeval	tv;

	if (ms < 0) {
		evtimer_del(multi_timer);
		return 0;
	}
	tv.tv_sec = ms / 1000;
	tv.tv_usec = (ms % 1000) * 1000;
	event_add(multi_timer, &tv);
	return 0;
}

static void
httpc_check_done(void)
{
	struct httpc_req	*r;
	CURLMsg			*msg;
	long			 status = 0;
	int			 left;
	const char		*err;

	while ((msg = curl_multi_info_read(multi, &left)) != NULL) {
		if (msg->msg != CURLMSG_DONE)
			continue;
		curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, (char **)&r);
		curl_easy_getinfo(msg->easy_handle, CURLINFO_RESPONSE_CODE, &status);
		err = NULL;
		if (r->hr_cancelled)
			continue;	/* httpc_reap_cb frees it */
		if (msg->data.result != CURLE_OK)
			err = r->hr_too_big ? "response too large" :
			    r->hr_err[0] ? r->hr_err :
			    curl_easy_strerror(msg->data.result);
		r->hr_cb(err ? 0 : status, r->hr_resp ? r->hr_resp : "",
		    r->hr_len, err, r->hr_arg);
		httpc_free(r);
	}
}

void
httpc_init(void)
{
	if (curl_global_init(CURL_GLOBAL_DEFAULT) != 0)
		fatalx("curl_global_init");
	if ((multi = curl_multi_init()) == NULL)
		fatalx("curl_multi_init");
	multi_timer = evtimer_new(sup->base, httpc_timer_cb, NULL);
	curl_multi_setopt(multi, CURLMOPT_SOCKETFUNCTION, httpc_socket_cb);
	curl_multi_setopt(multi, CURLMOPT_TIMERFUNCTION, httpc_timerfunc);
}

/* HOST:PORT:ADDR, as curl's --resolve, for every request. */
void
httpc_add_resolve(const char *entry)
{
	resolve_list = curl_slist_append(resolve_list, entry);
}

/*
 * mTLS from memory: the private key never goes to a file.  The request owns
 * the copies curl reads (CURL_BLOB_NOCOPY), so that the key is wiped when
 * the request ends rather than freed as is by curl.
 */
static int
httpc_client_cert(struct httpc_req *r, const struct httpc_opts *o)
{
	struct curl_blob	cert, key;

	if ((r->hr_cert = strdup(o->cert)) == NULL ||
	    (r->hr_key = strdup(o->key)) == NULL)
		return -1;
	cert.data = r->hr_cert;
	cert.len = strlen(r->hr_cert);
	cert.flags = CURL_BLOB_NOCOPY;
	key.data = r->hr_key;
	key.len = strlen(r->hr_key);
	key.flags = CURL_BLOB_NOCOPY;
	if (curl_easy_setopt(r->hr_easy, CURLOPT_SSLCERT_BLOB, &cert) !=
	    CURLE_OK || curl_easy_setopt(r->hr_easy, CURLOPT_SSLKEY_BLOB,
	    &key) != CURLE_OK)
		return -1;
	return 0;
}

/*
 * Start a request described by o.  A body is sent (form POST unless a method
 * and content type say otherwise); user/pass as HTTP Basic; cert/key (PEM
 * strings) for mTLS; cafile to verify the server.  cb runs later, exactly
 * once, from the event loop; with o->line_cb a 200 reply is streamed to it
 * line by line as it arrives and cb sees only what is left at the end.
 * Returns a handle for httpc_cancel, or NULL.
 */
struct httpc_req *
httpc_start(const struct httpc_opts *o, httpc_cb cb, void *arg)
{
	struct httpc_req	*r;
	size_t			 i;

	if ((r = calloc(1, sizeof(*r))) == NULL ||
	    (r->hr_easy = curl_easy_init()) == NULL) {
		free(r);
		return NULL;
	}
	r->hr_cb = cb;
	r->hr_line_cb = o->line_cb;
	r->hr_arg = arg;
	for (i = 0; o->headers != NULL && o->headers[i] != NULL; i++)
		r->hr_headers = curl_slist_append(r->hr_headers, o->headers[i]);
	curl_easy_setopt(r->hr_easy, CURLOPT_URL, o->url);
	curl_easy_setopt(r->hr_easy, CURLOPT_PRIVATE, r);
	curl_easy_setopt(r->hr_easy, CURLOPT_WRITEFUNCTION, httpc_write);
	curl_easy_setopt(r->hr_easy, CURLOPT_WRITEDATA, r);
	curl_easy_setopt(r->hr_easy, CURLOPT_ERRORBUFFER, r->hr_err);
	if (o->timeout > 0)
		curl_easy_setopt(r->hr_easy, CURLOPT_TIMEOUT, (long)o->timeout);
	curl_easy_setopt(r->hr_easy, CURLOPT_CONNECTTIMEOUT, 10L);
	curl_easy_setopt(r->hr_easy, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(r->hr_easy, CURLOPT_PROTOCOLS_STR, "http,https");
	curl_easy_setopt(r->hr_easy, CURLOPT_HTTPHEADER, r->hr_headers);
	if (resolve_list != NULL)
		curl_easy_setopt(r->hr_easy, CURLOPT_RESOLVE, resolve_list);
	if (o->cafile != NULL) {
		/* that file only: not the system's directory besides it */
		curl_easy_setopt(r->hr_easy, CURLOPT_CAINFO, o->cafile);
		curl_easy_setopt(r->hr_easy, CURLOPT_CAPATH, NULL);
	}
	if (o->body != NULL) {
		r->hr_body = strdup(o->body);
		curl_easy_setopt(r->hr_easy, CURLOPT_POSTFIELDS, r->hr_body);
	}
	if (o->method != NULL)
		curl_easy_setopt(r->hr_easy, CURLOPT_CUSTOMREQUEST, o->method);
	if (o->user != NULL) {
		curl_easy_setopt(r->hr_easy, CURLOPT_HTTPAUTH, CURLAUTH_BASIC);
		curl_easy_setopt(r->hr_easy, CURLOPT_USERNAME, o->user);
		curl_easy_setopt(r->hr_easy, CURLOPT_PASSWORD,
		    o->pass ? o->pass : "");
	}
	if (o->cert != NULL && o->key != NULL && httpc_client_cert(r, o) == -1) {
		httpc_free(r);
		return NULL;
	}
	if (curl_multi_add_handle(multi, r->hr_easy) != CURLM_OK) {
		httpc_free(r);
		return NULL;
	}
	return r;
}

static void
httpc_reap_cb(evutil_socket_t fd, short ev, void *arg)
{
	httpc_free(arg);
}

/*
 * Stop a request: its callbacks will not run again.  It is freed from the
 * event loop, since curl forbids removing a handle inside its callbacks,
 * where a line callback may well decide to cancel.
 */
void
httpc_cancel(struct httpc_req *r)
{
	if (r == NULL || r->hr_cancelled)
		return;
	r->hr_cancelled = 1;
	event_base_once(sup->base, -1, EV_TIMEOUT, httpc_reap_cb, r,
	    &(struct timeval){ 0, 0 });
}

/*
 * The common case: one request, one callback, trusting --service-ca when
 * given, else the system's store.
 */
int
httpc_request(const char *url, const char *const *headers, const char *body,
    const char *user, const char *pass, const char *cert, const char *key,
    int timeout, httpc_cb cb, void *arg)
{
	struct httpc_opts	o;

	memset(&o, 0, sizeof(o));
	o.url = url;
	o.headers = headers;
	o.body = body;
	o.user = user;
	o.pass = pass;
	o.cert = cert;
	o.key = key;
	/* the control plane (token endpoints, Destination service) */
	o.cafile = sup->st.service_ca;
	o.timeout = timeout;
	return httpc_start(&o, cb, arg) == NULL ? -1 : 0;
}

/* Percent-encode for a form body; the caller frees with secret_free. */
char *
httpc_escape(const char *s)
{
	char	*e = curl_easy_escape(NULL, s, 0), *copy;

	if (e == NULL)
		return NULL;
	copy = strdup(e);
	secret_wipe(e, strlen(e));
	curl_free(e);
	return copy;
}
