/*
 * tls.c: the tenant proxy's TLS client toward the mail server.  One SSL_CTX
 * per configuration, built once; the trust store is the destination's CA
 * file, or the system's bundle, read lazily per lookup (trust.c) instead
 * of parsed whole at start.  Peer certificates
 * are always verified and the host name checked unless the destination
 * turns that off explicitly.
 */
#include <string.h>

#include <arpa/inet.h>
#include <event2/bufferevent_ssl.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>

#include "log.h"
#include "proxy.h"

/*
 * Keep the newest session the mail server gave us: the next login resumes
 * it and skips the full handshake (and its signature check).
 */
static int
tls_new_session_cb(SSL *ssl, SSL_SESSION *sess)
{
	struct proxy_config	*c = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));

	if (c == NULL)
		return 0;
	if (c->ssl_session != NULL)
		SSL_SESSION_free(c->ssl_session);
	c->ssl_session = sess;
	return 1;	/* we keep the reference */
}

/* Tie a context to its configuration, for the session cache. */
void
tls_ctx_bind(SSL_CTX *ctx, struct proxy_config *c)
{
	SSL_CTX_set_app_data(ctx, c);
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT |
	    SSL_SESS_CACHE_NO_INTERNAL_STORE);
	SSL_CTX_sess_set_new_cb(ctx, tls_new_session_cb);
}

/*
 * The trust store arrives as a CA bundle the supervisor passed (the proxy
 * cannot open files); trust.c reads its certificates when a chain needs
 * them.  The context owns the trust from here on, also on failure.
 */
SSL_CTX *
tls_ctx_new(struct trust *trust, const char **err)
{
	SSL_CTX		*ctx;

	if (trust == NULL) {
		*err = "no CA certificates to verify the mail server with";
		return NULL;
	}
	if (trust_count(trust) == 0) {
		trust_free(trust);
		*err = "the CA file holds no certificate";
		return NULL;
	}
	if ((ctx = SSL_CTX_new(TLS_client_method())) == NULL) {
		trust_free(trust);
		*err = "cannot create TLS context";
		return NULL;
	}
	SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
	SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
	if (trust_attach(trust, SSL_CTX_get_cert_store(ctx)) == -1) {
		trust_free(trust);
		SSL_CTX_free(ctx);
		*err = "cannot set up the trust store";
		return NULL;
	}
	return ctx;
}

/* A client SSL for one upstream connection: SNI and host name check set. */
SSL *
tls_ssl_new(struct proxy_config *c)
{
	SSL			*ssl;
	X509_VERIFY_PARAM	*vp;
	unsigned char		 addr[16];
	int			 is_ip;

	if ((ssl = SSL_new(c->ssl_ctx)) == NULL)
		return NULL;
	if (c->ssl_session != NULL)
		SSL_set_session(ssl, c->ssl_session);
	is_ip = inet_pton(AF_INET, c->host, addr) == 1 ||
	    inet_pton(AF_INET6, c->host, addr) == 1;
	if (!is_ip)
		SSL_set_tlsext_host_name(ssl, c->host);
	if (c->verify_host) {
		vp = SSL_get0_param(ssl);
		if (is_ip)
			X509_VERIFY_PARAM_set1_ip_asc(vp, c->host);
		else {
			X509_VERIFY_PARAM_set_hostflags(vp,
			    X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
			SSL_set1_host(ssl, c->host);
		}
	}
	return ssl;
}

/*
 * Why a TLS bufferevent failed, in words for the log and the client; NULL
 * when OpenSSL has no error to tell, because the peer closed (or reset)
 * the connection: libevent then passes on SSL_get_error()'s
 * SSL_ERROR_SYSCALL, which ERR_error_string() prints as
 * "error:00000005:lib(0)::reason(5)".  *detail gets that raw text, for a
 * debug line.
 */
const char *
tls_error_string(struct bufferevent *bev, const char **detail)
{
	static char	 buf[256];
	unsigned long	 e;
	SSL		*ssl = bufferevent_openssl_get_ssl(bev);
	long		 vr;

	*detail = "no OpenSSL error";
	if (ssl != NULL && (vr = SSL_get_verify_result(ssl)) != X509_V_OK) {
		snprintf(buf, sizeof(buf), "certificate verification failed: %s",
		    X509_verify_cert_error_string(vr));
		return buf;
	}
	e = bufferevent_get_openssl_error(bev);
	if (e != 0) {
		ERR_error_string_n(e, buf, sizeof(buf));
		*detail = buf;
	}
	if (ERR_GET_LIB(e) == 0)
		return NULL;
	return buf;
}
