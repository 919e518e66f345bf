/* SPDX-License-Identifier: MIT */
/*
 * NBD connections: the receive buffer, the output queue, hand-off to the
 * volume's reactor, and the end of a connection.
 *
 * Invariants:
 *  - at most one recv and one sendmsg are in flight per connection;
 *  - a connection is freed only when nothing refers to it: no armed recv or
 *    send, no request in flight (a backend may still be writing into a
 *    request's buffer);
 *  - replies leave in the order they are queued; requests complete in any
 *    order.
 */
#include <stddef.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "flashtier/log.h"
#include "internal.h"

static void conn_recv_arm(struct nbd_conn *c);
static void conn_flush_send(struct nbd_conn *c);
static void conn_maybe_finish(struct nbd_conn *c);
static void conn_try_handoff(struct nbd_conn *c);
static void on_flush_deferred(struct ft_deferred *d);

static uint64_t next_conn_id = 1;

static void drop_output(struct nbd_conn *c)
{
	while (c->out_head) {
		struct nbd_out *o = c->out_head;

		c->out_head = o->next;
		if (!c->out_head)
			c->out_tail = NULL;
		o->release(o);
	}
	c->out_head_sent = 0;
}

void conn_protocol_error(struct nbd_conn *c, const char *why)
{
	ft_warn("conn %llu%s%s: protocol violation: %s; disconnecting", (unsigned long long)c->id,
		c->vol ? " volume " : "", c->vol ? c->vol->cfg->name : "", why);
	conn_fail(c, NULL);
}

void conn_fail(struct nbd_conn *c, const char *why)
{
	if (c->dead)
		return;
	if (why)
		ft_debug("conn %llu%s%s: closing: %s", (unsigned long long)c->id,
			c->vol ? " volume " : "", c->vol ? c->vol->cfg->name : "", why);
	c->dead = true;
	c->read_done = true;
	/* Wake an armed recv or send; their completions then find the connection dead. */
	shutdown(c->fd, SHUT_RDWR);
	conn_enter(c);
	if (!c->send_armed)
		drop_output(c);
	conn_leave(c);
}

static void conn_free(struct nbd_conn *c)
{
	struct ft_reactor *r = c->r;

	if (c->state == CS_TRANSMISSION) {
		ft_stat_sub(&c->vol->stats.connections, 1);
	} else {
		ft_stat_add(&server_stats(c->srv)->handshake_failures_total, 1);
	}
	ft_debug("conn %llu: closed", (unsigned long long)c->id);
	server_conn_unlink(c->srv, c);
	tx_req_free_all(c);
	close(c->fd);
	free(c->rbuf);
	free(c);
	ft_reactor_release(r);
}

/* Free the connection once it is finished and nothing refers to it any more. */
static void conn_maybe_finish(struct nbd_conn *c)
{
	bool finished = c->dead || (c->read_done && c->inflight == 0 && !c->out_head &&
				    !c->payload_req && c->skip == 0);

	if (!finished)
		return;
	if (!c->dead) {
		/* Clean end: every reply is out. */
		c->dead = true;
		shutdown(c->fd, SHUT_RDWR);
	}
	/* A WRITE whose payload will never arrive: nothing else will release it. */
	if (c->payload_req && !c->recv_armed) {
		tx_req_abandon(c->payload_req);
		c->payload_req = NULL;
	}
	if (c->skip_req) {
		tx_req_abandon(c->skip_req);
		c->skip_req = NULL;
		c->skip_done = NULL;
	}
	if (c->busy || c->recv_armed || c->send_armed || c->inflight > 0 || c->flush_d.queued)
		return;
	conn_free(c);
}

void conn_enter(struct nbd_conn *c)
{
	c->busy++;
}

/*
 * Leaving the outermost entry point is the last moment the connection is
 * ours: free it if finished, or hand it to its volume's reactor (after
 * which this thread must not touch it again).
 */
void conn_leave(struct nbd_conn *c)
{
	if (--c->busy != 0)
		return;
	if (c->state == CS_HANDOFF && !c->dead)
		conn_try_handoff(c);
	else
		conn_maybe_finish(c);
}

/* ---- sending ---- */

static void send_done(struct nbd_conn *c, int res);

static void on_send(struct ft_completion *comp, int res, uint32_t flags)
{
	struct nbd_conn *c = (struct nbd_conn *)((char *)comp - offsetof(struct nbd_conn, send_c));

	(void)flags;
	c->send_armed = false;
	conn_enter(c);
	send_done(c, res);
	conn_leave(c);
}

static void send_done(struct nbd_conn *c, int res)
{
	size_t left;

	if (c->dead) {
		drop_output(c);
		return;
	}
	if (res == -EINTR || res == -EAGAIN) {
		conn_flush_send(c);
		return;
	}
	if (res <= 0) {
		conn_fail(c, res == 0 ? "peer stopped reading" : strerror(-res));
		return;
	}
	/* Retire fully sent items; remember how far into the next one we got. */
	left = (size_t)res + c->out_head_sent;
	c->out_head_sent = 0;
	while (c->out_head) {
		struct nbd_out *o = c->out_head;
		size_t sz = 0;

		for (unsigned i = 0; i < o->niov; i++)
			sz += o->iov[i].iov_len;
		if (left < sz) {
			c->out_head_sent = left;
			break;
		}
		left -= sz;
		c->out_head = o->next;
		if (!c->out_head)
			c->out_tail = NULL;
		o->release(o);
	}
	if (c->out_head)
		conn_flush_send(c);
	/* Released requests may un-throttle the reader. */
	if (c->state == CS_TRANSMISSION && !c->recv_armed)
		conn_process(c);
}

static void conn_flush_send(struct nbd_conn *c)
{
	size_t skip = c->out_head_sent;
	unsigned n = 0;
	struct io_uring_sqe *sqe;

	if (c->send_armed || c->dead || !c->out_head)
		return;
	for (struct nbd_out *o = c->out_head; o && n < SEND_MAX_IOV; o = o->next) {
		for (unsigned i = 0; i < o->niov && n < SEND_MAX_IOV; i++) {
			struct iovec v = o->iov[i];

			if (skip >= v.iov_len) {
				skip -= v.iov_len;
				continue;
			}
			v.iov_base = (char *)v.iov_base + skip;
			v.iov_len -= skip;
			skip = 0;
			if (v.iov_len)
				c->send_iov[n++] = v;
		}
	}
	memset(&c->msg, 0, sizeof(c->msg));
	c->msg.msg_iov = c->send_iov;
	c->msg.msg_iovlen = n;
	c->send_armed = true;
	sqe = ft_reactor_sqe(c->r, &c->send_c);
	io_uring_prep_sendmsg(sqe, c->fd, &c->msg, MSG_NOSIGNAL);
}

void conn_send(struct nbd_conn *c, struct nbd_out *o)
{
	if (c->dead) {
		o->release(o);
		return;
	}
	o->next = NULL;
	if (c->out_tail)
		c->out_tail->next = o;
	else
		c->out_head = o;
	c->out_tail = o;
	/*
	 * Send once this reactor has handled its whole batch of completions:
	 * every reply the batch produced then shares one sendmsg, and the
	 * client is woken once instead of once per reply.
	 */
	ft_reactor_defer(c->r, &c->flush_d);
}

static void on_flush_deferred(struct ft_deferred *d)
{
	struct nbd_conn *c = (struct nbd_conn *)((char *)d - offsetof(struct nbd_conn, flush_d));

	conn_enter(c);
	conn_flush_send(c);
	conn_leave(c);
}

/* ---- receiving ---- */

static void recv_done(struct nbd_conn *c, int res, bool direct);

static void on_recv(struct ft_completion *comp, int res, uint32_t flags)
{
	struct nbd_conn *c = (struct nbd_conn *)((char *)comp - offsetof(struct nbd_conn, recv_c));
	bool direct = c->recv_direct;

	(void)flags;
	c->recv_armed = false;
	c->recv_direct = false;
	conn_enter(c);
	recv_done(c, res, direct);
	conn_leave(c);
}

static void recv_done(struct nbd_conn *c, int res, bool direct)
{
	if (c->dead)
		return;
	if (res == -EINTR || res == -EAGAIN) {
		conn_process(c);
		return;
	}
	if (res < 0) {
		conn_fail(c, strerror(-res));
		return;
	}
	if (res == 0) {
		/* EOF: expected after DISC or a drain; otherwise a hard disconnect. */
		if (c->draining || (c->read_done && !c->payload_req && c->skip == 0))
			c->read_done = true;
		else if (c->state != CS_TRANSMISSION || c->payload_req || conn_avail(c) || c->skip)
			conn_fail(c, "client disconnected mid-request");
		else
			conn_fail(c, "client disconnected without NBD_CMD_DISC");
		return;
	}
	if (direct) {
		c->payload_have += (uint32_t)res;
		if (c->payload_have == c->payload_req->len) {
			struct nbd_req *req = c->payload_req;

			c->payload_req = NULL;
			tx_payload_complete(req);
		}
	} else {
		c->rend += (uint32_t)res;
	}
	conn_process(c);
}

/* Make room for at least @need contiguous bytes after rstart. */
static void conn_compact(struct nbd_conn *c)
{
	if (c->rstart == 0)
		return;
	memmove(c->rbuf, c->rbuf + c->rstart, c->rend - c->rstart);
	c->rend -= c->rstart;
	c->rstart = 0;
}

static void conn_recv_arm(struct nbd_conn *c)
{
	struct io_uring_sqe *sqe;
	void *dst;
	size_t len;

	if (c->recv_armed || c->dead || c->state == CS_HANDOFF)
		return;
	if (c->rend == CONN_RBUF_SIZE && c->rstart == 0 && !c->payload_req)
		return; /* cannot happen: every message we buffer is smaller than rbuf */
	/* A drained or disconnected connection still finishes the payload it is reading. */
	if (c->read_done && !c->payload_req && c->skip == 0)
		return;
	if (c->state == CS_TRANSMISSION && !c->payload_req && c->skip == 0 &&
	    c->inflight >= CONN_MAX_INFLIGHT)
		return; /* throttled: resumes when a reply is released */

	if (c->payload_req && conn_avail(c) == 0 &&
	    c->payload_req->len - c->payload_have >= 16384) {
		/* Large payloads land in the request buffer directly, with no copy. */
		c->recv_direct = true;
		dst = (char *)c->payload_req->buf + c->payload_have;
		len = c->payload_req->len - c->payload_have;
	} else {
		if (c->rstart == c->rend)
			c->rstart = c->rend = 0;
		else if (c->rend == CONN_RBUF_SIZE || c->rstart > CONN_RBUF_SIZE / 2)
			conn_compact(c);
		dst = c->rbuf + c->rend;
		len = CONN_RBUF_SIZE - c->rend;
	}
	c->recv_armed = true;
	sqe = ft_reactor_sqe(c->r, &c->recv_c);
	io_uring_prep_recv(sqe, c->fd, dst, len, 0);
}

/*
 * Parse everything the receive buffer holds, then re-arm the recv. Called
 * after each recv, after a hand-off, and when a throttled connection
 * releases a request.
 */
void conn_process(struct nbd_conn *c)
{
	conn_enter(c);
	while (!c->dead) {
		uint32_t avail = conn_avail(c);
		int rc;

		if (c->skip) {
			uint32_t n = avail < c->skip ? avail : (uint32_t)c->skip;

			if (n == 0)
				break;
			conn_consume(c, n);
			c->skip -= n;
			if (c->skip == 0 && c->skip_done) {
				void (*done)(struct nbd_conn *) = c->skip_done;

				c->skip_done = NULL;
				done(c);
			}
			continue;
		}
		if (c->payload_req) {
			struct nbd_req *req = c->payload_req;
			uint32_t want = req->len - c->payload_have;
			uint32_t n = avail < want ? avail : want;

			if (n == 0)
				break;
			memcpy((char *)req->buf + c->payload_have, conn_data(c), n);
			conn_consume(c, n);
			c->payload_have += n;
			if (c->payload_have == req->len) {
				c->payload_req = NULL;
				tx_payload_complete(req);
			}
			continue;
		}
		if (c->read_done)
			break;
		if (c->state == CS_HANDSHAKE) {
			rc = hs_step(c);
		} else if (c->state == CS_TRANSMISSION) {
			if (c->inflight >= CONN_MAX_INFLIGHT)
				break;
			rc = tx_step(c);
		} else {
			break;
		}
		if (rc <= 0)
			break;
	}
	if (!c->dead) {
		/* A partial message at the end of a full buffer: move it to the front. */
		if (c->rend == CONN_RBUF_SIZE && c->rstart > 0)
			conn_compact(c);
		conn_recv_arm(c);
	}
	conn_leave(c);
}

void conn_skip(struct nbd_conn *c, uint64_t len, void (*done)(struct nbd_conn *c))
{
	c->skip = len;
	c->skip_done = NULL;
	if (len == 0)
		done(c);
	else
		c->skip_done = done;
}

/* ---- hand-off and draining ---- */

static void become_transmission(struct nbd_conn *c)
{
	struct ft_volume *v = c->vol;

	c->state = CS_TRANSMISSION;
	ft_stat_add(&v->stats.connections, 1);
	ft_stat_add(&v->stats.connections_total, 1);
	ft_debug("conn %llu: transmission on volume '%s' (reactor %u)", (unsigned long long)c->id,
		 v->cfg->name, ft_reactor_id(c->r));
}

static void on_handoff(struct ft_reactor *r, struct ft_msg *m)
{
	struct nbd_conn *c = (struct nbd_conn *)((char *)m - offsetof(struct nbd_conn, handoff_msg));

	c->r = r;
	ft_reactor_hold(r);
	server_conn_link(c->srv, c);
	conn_enter(c);
	become_transmission(c);
	if (ft_reactor_stopping(r)) {
		conn_drain(c);
	} else {
		conn_flush_send(c);
		conn_process(c);
	}
	conn_leave(c);
}

/*
 * Move to the volume's reactor once no SQE on this ring still points at the
 * connection (the pending send's completion comes back through conn_leave()).
 */
static void conn_try_handoff(struct nbd_conn *c)
{
	/* The negotiation's replies leave from this reactor first. */
	if (c->recv_armed || c->send_armed || c->flush_d.queued || c->out_head)
		return;
	server_conn_unlink(c->srv, c);
	ft_reactor_release(c->r);
	c->handoff_msg.fn = on_handoff;
	ft_reactor_post(c->vol->reactor, &c->handoff_msg);
}

/*
 * The handshake chose @v. Called while the connection processes input; on
 * the owning reactor it switches to transmission in place (the caller's
 * loop goes on parsing requests), elsewhere it hands the connection over.
 */
void conn_enter_transmission(struct nbd_conn *c, struct ft_volume *v)
{
	c->vol = v;
	if (c->r != v->reactor) {
		c->state = CS_HANDOFF; /* the outermost conn_leave() moves it */
		return;
	}
	become_transmission(c);
}

void conn_drain(struct nbd_conn *c)
{
	if (c->draining)
		return;
	c->draining = true;
	c->read_done = true;
	if (c->state != CS_TRANSMISSION) {
		conn_fail(c, NULL);
		return;
	}
	/* Stop reading new requests; in-flight ones finish and are answered. */
	if (c->recv_armed && !c->payload_req && c->skip == 0)
		shutdown(c->fd, SHUT_RD);
	conn_enter(c);
	conn_leave(c);
}

struct nbd_conn *conn_new(struct ft_nbd_server *srv, struct ft_reactor *r, int fd)
{
	struct nbd_conn *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	c->rbuf = malloc(CONN_RBUF_SIZE);
	if (!c->rbuf) {
		free(c);
		return NULL;
	}
	c->srv = srv;
	c->r = r;
	c->fd = fd;
	c->id = __atomic_fetch_add(&next_conn_id, 1, __ATOMIC_RELAXED);
	c->recv_c.fn = on_recv;
	c->send_c.fn = on_send;
	c->flush_d.fn = on_flush_deferred;
	c->state = CS_HANDSHAKE;
	c->hs = HS_CLIENT_FLAGS;
	ft_reactor_hold(r);
	server_conn_link(srv, c);
	conn_enter(c);
	hs_greet(c);
	conn_process(c);
	conn_leave(c);
	return c;
}
