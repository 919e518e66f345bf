/* SPDX-License-Identifier: MIT */
/* The listening socket, accepting on reactor 0, volume lookup, and shutdown drain. */
#include <stddef.h>
#include <endian.h>
#include <errno.h>
#include <poll.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "flashtier/log.h"
#include "internal.h"

#define ACCEPT_RETRY_NS (100ull * 1000000ull)

struct reactor_conns {
	struct nbd_conn *head;
	struct ft_timer drain_timer;
	struct ft_reactor *r;
};

struct ft_nbd_server {
	int lfd;
	bool is_tcp;
	char *unix_path;
	struct ft_volume **vols;
	size_t n_vols;
	struct ft_reactor **reactors;
	unsigned n_reactors;
	struct reactor_conns *per_reactor;
	struct ft_server_stats *stats;
	struct ft_completion accept_c;
	struct ft_timer accept_retry;
	bool accepting;
	struct ft_msg start_msg;
};

/* One server per process: the reactor stop hook finds it here. */
static struct ft_nbd_server *the_server;

struct ft_volume *server_find_volume(struct ft_nbd_server *s, const char *name, size_t len)
{
	for (size_t i = 0; i < s->n_vols; i++) {
		const char *vn = s->vols[i]->cfg->name;

		if (strlen(vn) == len && memcmp(vn, name, len) == 0)
			return s->vols[i];
	}
	return NULL;
}

size_t server_n_volumes(const struct ft_nbd_server *s)
{
	return s->n_vols;
}

struct ft_volume *server_volume(const struct ft_nbd_server *s, size_t i)
{
	return s->vols[i];
}

struct ft_server_stats *server_stats(struct ft_nbd_server *s)
{
	return s->stats;
}

void server_conn_link(struct ft_nbd_server *s, struct nbd_conn *c)
{
	struct reactor_conns *rc = &s->per_reactor[ft_reactor_id(c->r)];

	c->prev = NULL;
	c->next = rc->head;
	if (rc->head)
		rc->head->prev = c;
	rc->head = c;
}

void server_conn_unlink(struct ft_nbd_server *s, struct nbd_conn *c)
{
	struct reactor_conns *rc = &s->per_reactor[ft_reactor_id(c->r)];

	if (c->prev)
		c->prev->next = c->next;
	else
		rc->head = c->next;
	if (c->next)
		c->next->prev = c->prev;
	c->prev = c->next = NULL;
}

static void arm_accept(struct ft_nbd_server *s);

static void on_accept_retry(struct ft_timer *t)
{
	(void)t;
	arm_accept(the_server);
}

static void on_accept(struct ft_completion *comp, int res, uint32_t flags)
{
	struct ft_nbd_server *s = the_server;
	struct ft_reactor *r = s->reactors[0];

	(void)comp;
	(void)flags;
	if (!s->accepting) {
		if (res >= 0)
			close(res);
		return;
	}
	if (res < 0) {
		if (res == -EINTR || res == -EAGAIN || res == -ECONNABORTED) {
			arm_accept(s);
			return;
		}
		/* EMFILE and friends: back off instead of spinning. */
		ft_warn("accept: %s; retrying", strerror(-res));
		s->accept_retry.fn = on_accept_retry;
		ft_timer_arm(r, &s->accept_retry, ACCEPT_RETRY_NS);
		return;
	}
	if (s->is_tcp) {
		int one = 1;

		if (setsockopt(res, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0)
			ft_debug("TCP_NODELAY: %s", strerror(errno));
	}
	ft_stat_add(&s->stats->accepted_total, 1);
	if (!conn_new(s, r, res)) {
		ft_warn("accept: out of memory for a connection");
		close(res);
	}
	arm_accept(s);
}

static void arm_accept(struct ft_nbd_server *s)
{
	struct io_uring_sqe *sqe = ft_reactor_sqe(s->reactors[0], &s->accept_c);

	io_uring_prep_accept(sqe, s->lfd, NULL, NULL, SOCK_CLOEXEC);
}

static void on_start(struct ft_reactor *r, struct ft_msg *m)
{
	(void)r;
	(void)m;
	the_server->accepting = true;
	arm_accept(the_server);
}

void ft_nbd_server_start(struct ft_nbd_server *s)
{
	s->accept_c.fn = on_accept;
	s->start_msg.fn = on_start;
	ft_reactor_post(s->reactors[0], &s->start_msg);
}

static void on_drain_timeout(struct ft_timer *t)
{
	struct reactor_conns *rc =
		(struct reactor_conns *)((char *)t - offsetof(struct reactor_conns, drain_timer));
	struct nbd_conn *c = rc->head;

	if (c)
		ft_warn("shutdown: connections still busy after %llu s; closing them",
			DRAIN_TIMEOUT_NS / 1000000000ull);
	while (c) {
		struct nbd_conn *next = c->next;

		conn_fail(c, "drain timeout");
		c = next;
	}
}

void ft_nbd_server_drain(struct ft_reactor *r)
{
	struct ft_nbd_server *s = the_server;
	struct reactor_conns *rc;
	struct nbd_conn *c;

	if (!s)
		return;
	rc = &s->per_reactor[ft_reactor_id(r)];
	if (r == s->reactors[0]) {
		s->accepting = false;
		/* Wakes the pending accept (it fails with EINVAL). */
		shutdown(s->lfd, SHUT_RDWR);
	}
	c = rc->head;
	while (c) {
		struct nbd_conn *next = c->next;

		conn_drain(c);
		c = next;
	}
	rc->r = r;
	rc->drain_timer.fn = on_drain_timeout;
	ft_timer_arm(r, &rc->drain_timer, DRAIN_TIMEOUT_NS);
}

/* Does the server on @fd send an NBD greeting within a second? */
static bool probe_greets(int fd)
{
	struct pollfd pfd = { .fd = fd, .events = POLLIN };
	uint64_t magic;

	if (poll(&pfd, 1, 1000) != 1)
		return false;
	if (recv(fd, &magic, sizeof(magic), MSG_WAITALL) != (ssize_t)sizeof(magic))
		return false;
	return be64toh(magic) == NBD_MAGIC;
}

static int listen_unix(struct ft_nbd_server *s, const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	struct stat st;
	int fd;

	if (strlen(path) >= sizeof(sa.sun_path)) {
		ft_err("listen: socket path too long: %s", path);
		return -ENAMETOOLONG;
	}
	strcpy(sa.sun_path, path);
	if (lstat(path, &st) == 0) {
		int probe;

		if (!S_ISSOCK(st.st_mode)) {
			ft_err("listen: %s exists and is not a socket; not removing it", path);
			return -EEXIST;
		}
		/*
		 * A socket nobody answers on is left over from a dead agent. A
		 * connect alone is not proof of life: a just-killed agent's socket
		 * accepts for a few milliseconds while the kernel tears its ring
		 * down. A live server greets within the probe's time limit.
		 */
		probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (probe < 0)
			return -errno;
		if (connect(probe, (struct sockaddr *)&sa, sizeof(sa)) == 0 && probe_greets(probe)) {
			close(probe);
			ft_err("listen: %s is in use by a running server", path);
			return -EADDRINUSE;
		}
		close(probe);
		if (unlink(path) < 0 && errno != ENOENT) {
			ft_err("listen: cannot remove stale socket %s: %s", path, strerror(errno));
			return -errno;
		}
	}
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -errno;
	if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 128) < 0) {
		int e = errno;

		ft_err("listen: %s: %s", path, strerror(e));
		close(fd);
		return -e;
	}
	s->unix_path = strdup(path);
	if (!s->unix_path) {
		close(fd);
		unlink(path);
		return -ENOMEM;
	}
	s->lfd = fd;
	ft_info("listening on unix:%s", path);
	return 0;
}

static int listen_tcp(struct ft_nbd_server *s, const char *host, const char *port)
{
	struct addrinfo hints = { .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE };
	struct addrinfo *ai, *p;
	int rc, fd = -1, e = 0;

	rc = getaddrinfo(host, port, &hints, &ai);
	if (rc != 0) {
		ft_err("listen: cannot resolve %s:%s: %s", host, port, gai_strerror(rc));
		return -EINVAL;
	}
	for (p = ai; p; p = p->ai_next) {
		int one = 1;

		fd = socket(p->ai_family, p->ai_socktype | SOCK_CLOEXEC, p->ai_protocol);
		if (fd < 0) {
			e = errno;
			continue;
		}
		if (setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) == 0 &&
		    bind(fd, p->ai_addr, p->ai_addrlen) == 0 && listen(fd, 128) == 0)
			break;
		e = errno;
		close(fd);
		fd = -1;
	}
	freeaddrinfo(ai);
	if (fd < 0) {
		ft_err("listen: tcp:%s:%s: %s", host, port, strerror(e));
		return -e;
	}
	s->lfd = fd;
	s->is_tcp = true;
	ft_info("listening on tcp:%s:%s", host, port);
	return 0;
}

int ft_nbd_server_create(const struct ft_listen_addr *addr, struct ft_volume **vols, size_t n_vols,
			 struct ft_reactor **reactors, unsigned n_reactors,
			 struct ft_server_stats *stats, struct ft_nbd_server **out)
{
	struct ft_nbd_server *s = calloc(1, sizeof(*s));
	int rc;

	if (!s)
		return -ENOMEM;
	s->per_reactor = calloc(n_reactors, sizeof(*s->per_reactor));
	if (!s->per_reactor) {
		free(s);
		return -ENOMEM;
	}
	s->lfd = -1;
	s->vols = vols;
	s->n_vols = n_vols;
	s->reactors = reactors;
	s->n_reactors = n_reactors;
	s->stats = stats;
	rc = addr->kind == FT_ADDR_UNIX ? listen_unix(s, addr->path)
					: listen_tcp(s, addr->host, addr->port);
	if (rc < 0) {
		free(s->per_reactor);
		free(s);
		return rc;
	}
	the_server = s;
	*out = s;
	return 0;
}

void ft_nbd_server_destroy(struct ft_nbd_server *s)
{
	if (!s)
		return;
	if (s->lfd >= 0)
		close(s->lfd);
	if (s->unix_path && unlink(s->unix_path) < 0 && errno != ENOENT)
		ft_warn("cannot remove %s: %s", s->unix_path, strerror(errno));
	free(s->unix_path);
	free(s->per_reactor);
	if (the_server == s)
		the_server = NULL;
	free(s);
}
