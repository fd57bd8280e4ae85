/*
 * popbench: POP3 load generator for tests/bench (libc + OpenSSL only).
 *
 *   popbench MODE [options] HOST PORT
 *
 * Modes (one epoll loop, non-blocking sockets, optional implicit TLS):
 *   retr   -c C -n N: N sessions (C at a time) of greeting, [USER, PASS],
 *          RETR m, QUIT; reports wall throughput of the RETR bodies.
 *   setup  -c C -d SEC: sessions of greeting, [USER, PASS], STAT, QUIT for
 *          SEC seconds at concurrency C; sessions/s and latency percentiles
 *          (connect to QUIT reply).
 *   idle   -n N -c C: opens N sessions (C logins in flight at a time), each
 *          doing [USER, PASS], STAT; then prints "READY {...}" on stdout and
 *          holds them until a line or EOF arrives on stdin (or -H SEC
 *          passes); then QUIT on all.
 *   slow   one session reading RETR m at -r BYTES/s for -t SEC, then the
 *          rest at full speed, then QUIT.
 *
 * Options:
 *   -u USER -p PASS  log in with USER/PASS after the greeting
 *   -s               implicit TLS (POP3S); -C CAFILE verifies the chain
 *   -m N             message number for RETR (default 1)
 *   -e BYTES         expected RETR body size on the wire (after the +OK
 *                    line, terminator included); a mismatch is an error
 *   -S SEC           per-session timeout (default 30)
 *   -T SEC           hard bound on the whole run (default 120)
 *   -H SEC           idle: longest hold (default 60)
 *   -b BYTES         SO_RCVBUF of the client sockets (default: the
 *                    kernel's autotuning); the slow reader uses it to model a
 *                    client whose window is small
 *
 * The result is one JSON object on stdout's last line; diagnostics go to
 * stderr.  Exit status 0 when every session succeeded, 1 otherwise, 2 on
 * usage errors.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

enum mode { M_RETR, M_SETUP, M_IDLE, M_SLOW };

enum state {
	S_FREE, S_CONNECT, S_HANDSHAKE, S_GREETING, S_USER, S_PASS, S_CMD,
	S_BODY, S_IDLE, S_QUIT
};

#define LINE_MAX_LEN	4096
#define RDBUF		(256 * 1024)

struct conn {
	int		 fd;
	SSL		*ssl;
	enum state	 st;
	uint32_t	 events;	/* registered with epoll */
	int		 want_write;	/* TLS wants POLLOUT to progress */
	double		 t0;		/* session start */
	double		 deadline;
	double		 body_t0;
	char		 line[LINE_MAX_LEN];
	size_t		 linelen;
	char		 tail[4];	/* last bytes of the body so far */
	size_t		 taillen;
	uint64_t	 body;
	char		 out[512];
	size_t		 outlen, outoff;
	double		 wake;		/* slow mode: next read allowed */
};

static enum mode	 mode;
static const char	*host, *user, *pass, *cafile;
static int		 port, use_tls, msgno = 1;
static int		 conc = 1;
static long		 total = 1;
static double		 duration = 1, sess_timeout = 30, run_timeout = 120;
static double		 hold = 60, slow_rate = 65536, slow_secs = 2;
static long long	 expect = -1;
static int		 rcvbuf;

static SSL_CTX		*ctx;
static int		 ep;
static struct conn	*conns;
static struct sockaddr_in sa;

/* counters */
static long		 started, completed, completed_in_window, failed;
static long		 ready, inflight;
static uint64_t		 body_bytes;
static double		*lat;
static size_t		 nlat, lat_cap;
static double		 t_start, t_first_ready;
static int		 errors_printed;
static int		 stop_starting;
static int		 released;

static unsigned char	 rdbuf[RDBUF];

static double
now(void)
{
	struct timespec	ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void
usage(void)
{
	fprintf(stderr, "usage: popbench retr|setup|idle|slow [-c C] [-n N] "
	    "[-d SEC] [-u USER -p PASS] [-s] [-C CAFILE] [-m N] [-e BYTES] "
	    "[-r BYTES/S] [-t SEC] [-b BYTES] [-S SEC] [-T SEC] [-H SEC] "
	    "HOST PORT\n");
	exit(2);
}

static void
record_latency(double v)
{
	if (nlat == lat_cap) {
		lat_cap = lat_cap ? lat_cap * 2 : 4096;
		if ((lat = realloc(lat, lat_cap * sizeof(*lat))) == NULL) {
			perror("realloc");
			exit(1);
		}
	}
	lat[nlat++] = v;
}

static void
ep_set(struct conn *c, uint32_t ev)
{
	struct epoll_event	e;

	if (c->events == ev)
		return;
	memset(&e, 0, sizeof(e));
	e.events = ev;
	e.data.ptr = c;
	if (c->events == 0 && ev != 0)
		epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &e);
	else if (ev == 0)
		epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
	else
		epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
	c->events = ev;
}

static void
conn_close(struct conn *c)
{
	if (c->fd != -1) {
		ep_set(c, 0);
		if (c->ssl != NULL) {
			SSL_set_quiet_shutdown(c->ssl, 1);
			SSL_free(c->ssl);
			c->ssl = NULL;
		}
		close(c->fd);
	}
	c->fd = -1;
	if (c->st != S_IDLE)	/* idle sessions are not in flight */
		inflight--;
	c->st = S_FREE;
}

static void
conn_fail(struct conn *c, const char *what)
{
	if (errors_printed < 5) {
		fprintf(stderr, "popbench: session failed in state %d: %s\n",
		    (int)c->st, what);
		errors_printed++;
	}
	failed++;
	if (c->st == S_IDLE)
		ready--;
	conn_close(c);
}

static int
conn_start(struct conn *c)
{
	int	one = 1;

	memset(c, 0, sizeof(*c));
	c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
	if (c->fd == -1) {
		perror("socket");
		c->st = S_FREE;
		failed++;
		return -1;
	}
	setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	if (rcvbuf > 0)
		setsockopt(c->fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf));
	started++;
	inflight++;
	c->t0 = now();
	c->deadline = c->t0 + sess_timeout;
	c->st = S_CONNECT;
	if (connect(c->fd, (struct sockaddr *)&sa, sizeof(sa)) == -1 &&
	    errno != EINPROGRESS) {
		conn_fail(c, strerror(errno));
		return -1;
	}
	ep_set(c, EPOLLOUT);
	return 0;
}

/* Queue a command and try to send it. */
static void conn_flush(struct conn *);

static void
conn_send(struct conn *c, const char *fmt, const char *arg)
{
	int	n;

	n = snprintf(c->out, sizeof(c->out), fmt, arg);
	c->outlen = (size_t)n;
	c->outoff = 0;
	conn_flush(c);
}

static void
conn_flush(struct conn *c)
{
	ssize_t	n;
	int	r;

	while (c->fd != -1 && c->outoff < c->outlen) {
		if (c->ssl != NULL) {
			r = SSL_write(c->ssl, c->out + c->outoff,
			    (int)(c->outlen - c->outoff));
			if (r <= 0) {
				int e = SSL_get_error(c->ssl, r);
				if (e == SSL_ERROR_WANT_WRITE ||
				    e == SSL_ERROR_WANT_READ) {
					c->want_write = 1;
					ep_set(c, EPOLLIN | EPOLLOUT);
					return;
				}
				conn_fail(c, "TLS write");
				return;
			}
			n = r;
		} else {
			n = send(c->fd, c->out + c->outoff,
			    c->outlen - c->outoff, MSG_NOSIGNAL);
			if (n == -1) {
				if (errno == EAGAIN || errno == EINTR) {
					c->want_write = 1;
					ep_set(c, EPOLLIN | EPOLLOUT);
					return;
				}
				conn_fail(c, strerror(errno));
				return;
			}
		}
		c->outoff += (size_t)n;
	}
	if (c->fd != -1) {
		c->want_write = 0;
		ep_set(c, EPOLLIN);
	}
}

/* After login: the mode's command. */
static void
conn_command(struct conn *c)
{
	char	buf[32];

	c->st = S_CMD;
	if (mode == M_RETR || mode == M_SLOW) {
		snprintf(buf, sizeof(buf), "%d", msgno);
		conn_send(c, "RETR %s\r\n", buf);
	} else
		conn_send(c, "STAT\r\n%s", "");
}

static void
conn_quit(struct conn *c)
{
	c->st = S_QUIT;
	conn_send(c, "QUIT\r\n%s", "");
}

static void
session_done(struct conn *c)
{
	double	t = now();

	completed++;
	if (mode == M_SETUP) {
		record_latency(t - c->t0);
		if (t - t_start <= duration)
			completed_in_window++;
	} else if (mode == M_RETR || mode == M_SLOW)
		record_latency(t - c->t0);
	conn_close(c);
}

static void
body_done(struct conn *c)
{
	body_bytes += c->body;
	if (expect >= 0 && (long long)c->body != expect) {
		char	msg[96];

		snprintf(msg, sizeof(msg), "RETR body %llu bytes, expected %lld",
		    (unsigned long long)c->body, expect);
		conn_fail(c, msg);
		return;
	}
	conn_quit(c);
}

/*
 * Feed body bytes; returns how many belong to the body (the rest would be
 * a pipelined reply, which we never ask for).  The terminator is CRLF "."
 * CRLF; the status line's CRLF counts as the first CRLF.
 */
static size_t
body_feed(struct conn *c, const unsigned char *p, size_t n, int *done)
{
	static const char	 term[] = "\r\n.\r\n";
	char			 joint[8];
	size_t			 k, jl, i;
	const unsigned char	*m;

	*done = 0;
	/* a terminator across the previous chunk's tail and this chunk */
	k = n < 4 ? n : 4;
	memcpy(joint, c->tail, c->taillen);
	memcpy(joint + c->taillen, p, k);
	jl = c->taillen + k;
	for (i = 0; i + 5 <= jl; i++)
		if (memcmp(joint + i, term, 5) == 0 && i + 5 > c->taillen) {
			size_t used = i + 5 - c->taillen;

			c->body += used;
			*done = 1;
			return used;
		}
	m = memmem(p, n, term, 5);
	if (m != NULL) {
		size_t used = (size_t)(m - p) + 5;

		c->body += used;
		*done = 1;
		return used;
	}
	c->body += n;
	/* keep the last 4 bytes of the stream */
	if (n >= 4) {
		memcpy(c->tail, p + n - 4, 4);
		c->taillen = 4;
	} else {
		jl = c->taillen + n;
		memcpy(joint, c->tail, c->taillen);
		memcpy(joint + c->taillen, p, n);
		k = jl < 4 ? jl : 4;
		memcpy(c->tail, joint + jl - k, k);
		c->taillen = k;
	}
	return n;
}

static void
handle_line(struct conn *c, const char *line)
{
	int	ok = strncmp(line, "+OK", 3) == 0;

	if (!ok) {
		char	msg[160];

		snprintf(msg, sizeof(msg), "server said: %.120s", line);
		conn_fail(c, msg);
		return;
	}
	switch (c->st) {
	case S_GREETING:
		if (user != NULL) {
			c->st = S_USER;
			conn_send(c, "USER %s\r\n", user);
		} else
			conn_command(c);
		break;
	case S_USER:
		c->st = S_PASS;
		conn_send(c, "PASS %s\r\n", pass ? pass : "");
		break;
	case S_PASS:
		conn_command(c);
		break;
	case S_CMD:
		if (mode == M_RETR || mode == M_SLOW) {
			c->st = S_BODY;
			memcpy(c->tail, "\r\n", 2);
			c->taillen = 2;
			c->body = 0;
			c->body_t0 = now();
		} else if (mode == M_IDLE) {
			c->st = S_IDLE;
			c->deadline = 0;
			ready++;
			inflight--;	/* counts logins in flight */
			if (ready + failed >= total && t_first_ready == 0)
				t_first_ready = now();
		} else
			conn_quit(c);
		break;
	case S_QUIT:
		session_done(c);
		break;
	default:
		conn_fail(c, "unexpected line");
		break;
	}
}

/* Process received bytes; returns -1 when the connection is gone. */
static int
handle_bytes(struct conn *c, const unsigned char *p, size_t n)
{
	size_t	i, used;
	int	done;

	while (n > 0) {
		if (c->fd == -1)
			return -1;
		if (c->st == S_BODY) {
			used = body_feed(c, p, n, &done);
			p += used;
			n -= used;
			if (done) {
				body_done(c);
				if (c->fd == -1)
					return -1;
			}
			continue;
		}
		for (i = 0; i < n && p[i] != '\n'; i++)
			;
		if (i == n) {
			if (c->linelen + n >= sizeof(c->line)) {
				conn_fail(c, "overlong line");
				return -1;
			}
			memcpy(c->line + c->linelen, p, n);
			c->linelen += n;
			return 0;
		}
		if (c->linelen + i + 1 >= sizeof(c->line)) {
			conn_fail(c, "overlong line");
			return -1;
		}
		memcpy(c->line + c->linelen, p, i);
		c->linelen += i;
		c->line[c->linelen] = '\0';
		c->linelen = 0;
		p += i + 1;
		n -= i + 1;
		handle_line(c, c->line);
	}
	return c->fd == -1 ? -1 : 0;
}

static void
conn_handshake(struct conn *c)
{
	int	r, e;

	r = SSL_do_handshake(c->ssl);
	if (r == 1) {
		c->st = S_GREETING;
		ep_set(c, EPOLLIN);
		return;
	}
	e = SSL_get_error(c->ssl, r);
	if (e == SSL_ERROR_WANT_READ)
		ep_set(c, EPOLLIN);
	else if (e == SSL_ERROR_WANT_WRITE)
		ep_set(c, EPOLLOUT);
	else {
		unsigned long	err = ERR_get_error();
		char		buf[200];

		snprintf(buf, sizeof(buf), "TLS handshake: %s",
		    err ? ERR_error_string(err, NULL) : "closed");
		conn_fail(c, buf);
	}
}

/* How many bytes the slow reader may read now (SIZE_MAX: no limit). */
static size_t
slow_budget(struct conn *c, double t)
{
	double	allowed;

	if (mode != M_SLOW || c->st != S_BODY || t - c->body_t0 >= slow_secs)
		return RDBUF;
	allowed = slow_rate * (t - c->body_t0 + 0.05) - (double)c->body;
	if (allowed < 1)
		return 0;
	return allowed > RDBUF ? RDBUF : (size_t)allowed;
}

static void
conn_read(struct conn *c)
{
	ssize_t	n;
	size_t	budget;
	int	rounds, r, e;

	for (rounds = 0; rounds < 8 && c->fd != -1; rounds++) {
		budget = slow_budget(c, now());
		if (budget == 0) {
			/* come back when the budget allows: see main loop */
			c->wake = now() + 0.01;
			ep_set(c, 0);
			return;
		}
		if (c->ssl != NULL) {
			r = SSL_read(c->ssl, rdbuf, (int)budget);
			if (r <= 0) {
				e = SSL_get_error(c->ssl, r);
				if (e == SSL_ERROR_WANT_READ)
					return;
				if (e == SSL_ERROR_WANT_WRITE) {
					ep_set(c, EPOLLIN | EPOLLOUT);
					return;
				}
				conn_fail(c, e == SSL_ERROR_ZERO_RETURN ?
				    "closed by server" : "TLS read");
				return;
			}
			n = r;
		} else {
			n = recv(c->fd, rdbuf, budget, 0);
			if (n == -1) {
				if (errno == EAGAIN || errno == EINTR)
					return;
				conn_fail(c, strerror(errno));
				return;
			}
			if (n == 0) {
				conn_fail(c, "closed by server");
				return;
			}
		}
		if (handle_bytes(c, rdbuf, (size_t)n) == -1)
			return;
	}
}

static void
conn_event(struct conn *c, uint32_t ev)
{
	int		err = 0;
	socklen_t	el = sizeof(err);

	if (c->st == S_CONNECT) {
		if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el) == -1 ||
		    err != 0) {
			conn_fail(c, strerror(err ? err : errno));
			return;
		}
		if (use_tls) {
			c->ssl = SSL_new(ctx);
			SSL_set_fd(c->ssl, c->fd);
			SSL_set_connect_state(c->ssl);
			SSL_set_tlsext_host_name(c->ssl, "localhost");
			c->st = S_HANDSHAKE;
			conn_handshake(c);
		} else {
			c->st = S_GREETING;
			ep_set(c, EPOLLIN);
		}
		return;
	}
	if (c->st == S_HANDSHAKE) {
		conn_handshake(c);
		return;
	}
	if (c->want_write && (ev & EPOLLOUT)) {
		conn_flush(c);
		if (c->fd == -1)
			return;
	}
	if (ev & (EPOLLIN | EPOLLHUP | EPOLLERR))
		conn_read(c);
}

static int
cmp_double(const void *a, const void *b)
{
	double	x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static double
pct(double p)
{
	size_t	i;

	if (nlat == 0)
		return 0;
	i = (size_t)(p * (double)(nlat - 1) + 0.5);
	return lat[i];
}

static void
release_idle(void)
{
	int	i;

	released = 1;
	for (i = 0; i < (int)total; i++)
		if (conns[i].st == S_IDLE) {
			conns[i].deadline = now() + sess_timeout;
			inflight++;
			ready--;
			conn_quit(&conns[i]);
		}
}

int
main(int argc, char **argv)
{
	struct epoll_event	 evs[256];
	struct conn		*c;
	const char		*m;
	double			 t, t_end, wall, next_wake;
	int			 opt, i, n, timeout_ms, timed_out = 0;
	int			 stdin_reg = 0, nslots;
	long			 opened = 0;

	if (argc < 2)
		usage();
	m = argv[1];
	if (strcmp(m, "retr") == 0)
		mode = M_RETR;
	else if (strcmp(m, "setup") == 0)
		mode = M_SETUP;
	else if (strcmp(m, "idle") == 0)
		mode = M_IDLE;
	else if (strcmp(m, "slow") == 0)
		mode = M_SLOW;
	else
		usage();
	optind = 2;
	while ((opt = getopt(argc, argv, "b:c:n:d:u:p:sC:m:e:r:t:S:T:H:")) != -1) {
		switch (opt) {
		case 'b': rcvbuf = atoi(optarg); break;
		case 'c': conc = atoi(optarg); break;
		case 'n': total = atol(optarg); break;
		case 'd': duration = atof(optarg); break;
		case 'u': user = optarg; break;
		case 'p': pass = optarg; break;
		case 's': use_tls = 1; break;
		case 'C': cafile = optarg; break;
		case 'm': msgno = atoi(optarg); break;
		case 'e': expect = atoll(optarg); break;
		case 'r': slow_rate = atof(optarg); break;
		case 't': slow_secs = atof(optarg); break;
		case 'S': sess_timeout = atof(optarg); break;
		case 'T': run_timeout = atof(optarg); break;
		case 'H': hold = atof(optarg); break;
		default: usage();
		}
	}
	if (argc - optind != 2 || conc < 1 || total < 1)
		usage();
	host = argv[optind];
	port = atoi(argv[optind + 1]);
	memset(&sa, 0, sizeof(sa));
	sa.sin_family = AF_INET;
	sa.sin_port = htons((uint16_t)port);
	if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
		usage();
	signal(SIGPIPE, SIG_IGN);
	if (use_tls) {
		ctx = SSL_CTX_new(TLS_client_method());
		if (ctx == NULL)
			return 1;
		SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
		if (cafile != NULL) {
			if (SSL_CTX_load_verify_locations(ctx, cafile, NULL) != 1) {
				fprintf(stderr, "popbench: cannot load %s\n", cafile);
				return 2;
			}
			SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
		}
	}
	if (mode == M_SLOW)
		conc = 1, total = 1;
	/* idle: all N sessions stay open; -c bounds logins in flight */
	nslots = mode == M_IDLE ? (int)total : conc;
	if (mode == M_RETR && conc > total)
		conc = nslots = (int)total;
	if ((conns = calloc((size_t)nslots, sizeof(*conns))) == NULL)
		return 1;
	for (i = 0; i < nslots; i++) {
		conns[i].fd = -1;
		conns[i].st = S_FREE;
	}
	if ((ep = epoll_create1(EPOLL_CLOEXEC)) == -1) {
		perror("epoll_create1");
		return 1;
	}

	t_start = now();
	t_end = t_start + run_timeout;
	for (;;) {
		t = now();
		if (t >= t_end) {
			timed_out = 1;
			break;
		}
		if (mode == M_SETUP && t - t_start >= duration)
			stop_starting = 1;
		/* start sessions into free slots */
		if (!stop_starting) {
			for (i = 0; i < nslots; i++) {
				c = &conns[i];
				if (c->st != S_FREE)
					continue;
				if (mode == M_IDLE) {
					if (opened >= total || inflight >= conc)
						break;
				} else if (mode != M_SETUP && started >= total)
					break;
				if (mode == M_IDLE)
					opened++;
				conn_start(c);
			}
			if (mode != M_SETUP && mode != M_IDLE && started >= total)
				stop_starting = 1;
			if (mode == M_IDLE && opened >= total)
				stop_starting = 1;
		}
		/* idle: announce readiness once, then wait for the release */
		if (mode == M_IDLE && !released && ready + failed >= total) {
			if (!stdin_reg) {
				struct epoll_event e;

				printf("READY {\"ready\": %ld, \"failed\": %ld, "
				    "\"open_s\": %.3f}\n", ready, failed,
				    now() - t_start);
				fflush(stdout);
				memset(&e, 0, sizeof(e));
				e.events = EPOLLIN;
				e.data.ptr = NULL;
				if (epoll_ctl(ep, EPOLL_CTL_ADD, 0, &e) == -1)
					release_idle();
				stdin_reg = 1;
				t_first_ready = now();
			}
			if (now() - t_first_ready >= hold)
				release_idle();
		}
		/* finished? */
		if (stop_starting && inflight == 0 &&
		    (mode != M_IDLE || released))
			break;
		/* timeouts and slow-reader wake-ups */
		next_wake = t + 0.1;
		for (i = 0; i < nslots; i++) {
			c = &conns[i];
			if (c->st == S_FREE)
				continue;
			if (c->deadline > 0 && t >= c->deadline) {
				conn_fail(c, "session timeout");
				continue;
			}
			if (c->wake > 0) {
				if (t >= c->wake) {
					c->wake = 0;
					ep_set(c, EPOLLIN);
				} else if (c->wake < next_wake)
					next_wake = c->wake;
			}
		}
		timeout_ms = (int)((next_wake - t) * 1000) + 1;
		if (timeout_ms < 0)
			timeout_ms = 0;
		n = epoll_wait(ep, evs, 256, timeout_ms);
		if (n == -1) {
			if (errno == EINTR)
				continue;
			perror("epoll_wait");
			return 1;
		}
		for (i = 0; i < n; i++) {
			if (evs[i].data.ptr == NULL) {
				/* stdin: release the idle sessions */
				epoll_ctl(ep, EPOLL_CTL_DEL, 0, NULL);
				if (!released)
					release_idle();
				continue;
			}
			c = evs[i].data.ptr;
			if (c->fd == -1)
				continue;
			conn_event(c, evs[i].events);
		}
	}
	wall = now() - t_start;
	if (timed_out) {
		for (i = 0; i < nslots; i++)
			if (conns[i].st != S_FREE)
				conn_fail(&conns[i], "run timeout");
		fprintf(stderr, "popbench: run timeout after %.1f s\n", wall);
	}
	qsort(lat, nlat, sizeof(*lat), cmp_double);
	printf("{\"mode\": \"%s\", \"concurrency\": %d, \"started\": %ld, "
	    "\"completed\": %ld, \"failed\": %ld, \"wall_s\": %.6f, "
	    "\"timed_out\": %s", m, conc, started, completed, failed, wall,
	    timed_out ? "true" : "false");
	if (mode == M_SETUP)
		printf(", \"window_s\": %.3f, \"completed_in_window\": %ld, "
		    "\"sessions_per_s\": %.1f", duration, completed_in_window,
		    completed_in_window / duration);
	if (mode == M_RETR || mode == M_SLOW)
		printf(", \"body_bytes\": %llu, \"mib_per_s\": %.2f",
		    (unsigned long long)body_bytes,
		    body_bytes / wall / (1024.0 * 1024.0));
	if (nlat > 0)
		printf(", \"p50_ms\": %.3f, \"p90_ms\": %.3f, \"p99_ms\": %.3f, "
		    "\"max_ms\": %.3f", pct(0.50) * 1e3, pct(0.90) * 1e3,
		    pct(0.99) * 1e3, lat[nlat - 1] * 1e3);
	printf("}\n");
	fflush(stdout);
	return failed > 0 || timed_out ? 1 : 0;
}
