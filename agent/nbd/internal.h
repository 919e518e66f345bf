/* SPDX-License-Identifier: MIT */
/* Private to the NBD server: connections, requests, and the output queue. */
#ifndef FLASHTIER_NBD_INTERNAL_H
#define FLASHTIER_NBD_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "flashtier/backend.h"
#include "flashtier/nbd_proto.h"
#include "flashtier/nbd_server.h"

#define CONN_RBUF_SIZE     (256u << 10) /* receive buffer per connection */
#define CONN_MAX_INFLIGHT  128u         /* requests received and not yet answered */
#define OPT_MAX_DATA       (64u << 10)  /* largest option payload we parse */
#define REQ_BUF_KEEP       (256u << 10) /* request buffers up to this size are reused */
#define SEND_MAX_IOV       64u
#define DRAIN_TIMEOUT_NS   (10ull * 1000000000ull)

/* An item on a connection's output queue: up to three iovecs. */
struct nbd_out {
	struct nbd_out *next;
	struct iovec iov[3];
	unsigned niov;
	/* Called once the item is fully sent, or dropped because the peer is gone. */
	void (*release)(struct nbd_out *o);
};

enum conn_state {
	CS_HANDSHAKE,
	CS_HANDOFF, /* negotiated; waiting to move to the volume's reactor */
	CS_TRANSMISSION,
};

enum hs_step {
	HS_CLIENT_FLAGS,
	HS_OPT_HEADER,
	HS_OPT_DATA,
};

struct nbd_req;

struct nbd_conn {
	struct ft_nbd_server *srv;
	struct ft_reactor *r;
	struct ft_volume *vol; /* NULL until the handshake picks one */
	struct nbd_conn *prev, *next; /* on the owning reactor's list */
	uint64_t id;
	int fd;
	enum conn_state state;

	/* handshake */
	enum hs_step hs;
	uint32_t opt;
	uint32_t opt_len;
	bool no_zeroes;
	bool structured;

	/* receive side */
	uint8_t *rbuf;
	uint32_t rstart, rend;
	struct ft_completion recv_c;
	bool recv_armed;
	bool recv_direct;          /* the armed recv targets payload_req's buffer */
	struct nbd_req *payload_req; /* WRITE whose payload is being received */
	uint32_t payload_have;
	uint64_t skip;             /* payload bytes of a rejected message still to discard */
	/*
	 * Runs once the skipped payload is consumed: a rejection is answered
	 * only then, since clients (libnbd) cannot match a reply to a request
	 * they are still sending.
	 */
	void (*skip_done)(struct nbd_conn *c);
	struct nbd_req *skip_req; /* the rejected WRITE whose payload is skipped */

	/* send side */
	struct nbd_out *out_head, *out_tail;
	size_t out_head_sent; /* bytes of out_head already sent */
	struct ft_completion send_c;
	bool send_armed;
	struct ft_deferred flush_d; /* queued: a send starts at the end of the batch */
	struct msghdr msg;
	struct iovec send_iov[SEND_MAX_IOV];

	/* lifetime */
	unsigned busy;         /* entry points running: defer freeing until 0 */
	unsigned inflight;     /* requests not yet released */
	bool read_done;        /* no more requests will be read (EOF, DISC, drain) */
	bool dead;             /* socket unusable: drop output, close when idle */
	bool draining;
	struct nbd_req *free_reqs;
	struct ft_msg handoff_msg;
};

struct nbd_req {
	struct nbd_conn *c;
	struct nbd_req *next_free;
	uint64_t cookie;
	uint64_t offset;
	uint32_t len;
	uint16_t type;
	uint16_t flags;
	int error;          /* 0 or negative errno */
	const char *errmsg; /* for structured error chunks */
	void *buf;
	uint32_t buf_cap;
	uint64_t t_start;
	struct ft_bio bio;
	struct nbd_out out;
	uint8_t hdr[160]; /* reply header, or an error chunk with its message */
};

/* conn.c */
struct nbd_conn *conn_new(struct ft_nbd_server *srv, struct ft_reactor *r, int fd);
void conn_send(struct nbd_conn *c, struct nbd_out *o);
void conn_process(struct nbd_conn *c);
void conn_fail(struct nbd_conn *c, const char *why);
/* A peer that broke a MUST of the protocol: logged as a warning, then conn_fail(). */
void conn_protocol_error(struct nbd_conn *c, const char *why);
/* Bracket every entry into a connection: it is freed only outside them. */
void conn_enter(struct nbd_conn *c);
void conn_leave(struct nbd_conn *c);
void conn_enter_transmission(struct nbd_conn *c, struct ft_volume *v);
void conn_drain(struct nbd_conn *c);
/* Bytes available in the receive buffer, and consuming them. */
static inline uint32_t conn_avail(const struct nbd_conn *c)
{
	return c->rend - c->rstart;
}
static inline const uint8_t *conn_data(const struct nbd_conn *c)
{
	return c->rbuf + c->rstart;
}
static inline void conn_consume(struct nbd_conn *c, uint32_t n)
{
	c->rstart += n;
}

/* handshake.c: one step; returns 1 on progress, 0 when more bytes are needed, -1 to stop. */
void hs_greet(struct nbd_conn *c);
int hs_step(struct nbd_conn *c);

/* transmission.c: same convention. */
int tx_step(struct nbd_conn *c);
void tx_payload_complete(struct nbd_req *req);
/* Drop a request that will never be answered (its connection died mid-payload). */
void tx_req_abandon(struct nbd_req *req);
/* Start discarding @len payload bytes; @done runs when they are gone. */
void conn_skip(struct nbd_conn *c, uint64_t len, void (*done)(struct nbd_conn *c));
void tx_req_free_all(struct nbd_conn *c);

/* server.c */
struct ft_volume *server_find_volume(struct ft_nbd_server *s, const char *name, size_t len);
size_t server_n_volumes(const struct ft_nbd_server *s);
struct ft_volume *server_volume(const struct ft_nbd_server *s, size_t i);
struct ft_server_stats *server_stats(struct ft_nbd_server *s);
void server_conn_link(struct ft_nbd_server *s, struct nbd_conn *c);
void server_conn_unlink(struct ft_nbd_server *s, struct nbd_conn *c);

#endif
