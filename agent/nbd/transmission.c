/* SPDX-License-Identifier: MIT */
/*
 * Transmission phase: parse and validate requests, submit them to the
 * volume's backing store, and queue replies (doc/proto.md, "Transmission").
 *
 * Validation happens here, once, at the boundary; everything below trusts
 * offset and length. Errors the spec names: EINVAL for unknown commands or
 * flags, misalignment, zero length, reads/trims past the end or an
 * oversized payload; ENOSPC for writes past the end; EPERM for writes to a
 * read-only export. A rejected WRITE's payload is still read and dropped,
 * so the stream stays in sync.
 */
#include <stddef.h>
#include <endian.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "flashtier/log.h"
#include "internal.h"

static const char *cmd_name(uint16_t type)
{
	static const char *const names[] = { "READ", "WRITE", "DISC", "FLUSH",
					     "TRIM", "CACHE", "WRITE_ZEROES", "BLOCK_STATUS" };

	return type < sizeof(names) / sizeof(names[0]) ? names[type] : "UNKNOWN";
}

static enum ft_op op_of(uint16_t type)
{
	switch (type) {
	case NBD_CMD_READ:
		return FT_OP_READ;
	case NBD_CMD_WRITE:
		return FT_OP_WRITE;
	case NBD_CMD_FLUSH:
		return FT_OP_FLUSH;
	case NBD_CMD_TRIM:
		return FT_OP_TRIM;
	case NBD_CMD_WRITE_ZEROES:
		return FT_OP_WRITE_ZEROES;
	default:
		return FT_OP_CACHE;
	}
}

uint32_t ft_nbd_errno_to_wire(int err)
{
	switch (-err) {
	case 0:
		return 0;
	case EPERM:
	case EROFS:
		return NBD_EPERM;
	case ENOMEM:
		return NBD_ENOMEM;
	case EINVAL:
		return NBD_EINVAL;
	case ENOSPC:
	case EDQUOT:
	case EFBIG:
		return NBD_ENOSPC;
	case EOVERFLOW:
		return NBD_EOVERFLOW;
	case ENOTSUP:
		return NBD_ENOTSUP;
	case ESHUTDOWN:
		return NBD_ESHUTDOWN;
	default:
		return NBD_EIO;
	}
}

/* ---- request memory ---- */

static void req_release(struct nbd_out *o);

static struct nbd_req *req_get(struct nbd_conn *c, uint32_t buf_len)
{
	struct nbd_req *req = c->free_reqs;

	if (req) {
		c->free_reqs = req->next_free;
	} else {
		req = calloc(1, sizeof(*req));
		if (!req)
			return NULL;
	}
	if (buf_len > req->buf_cap) {
		void *buf;

		free(req->buf);
		req->buf = NULL;
		req->buf_cap = 0;
		/* 4 KiB alignment lets the file backend use O_DIRECT. */
		if (posix_memalign(&buf, 4096, buf_len) != 0) {
			req->next_free = c->free_reqs;
			c->free_reqs = req;
			return NULL;
		}
		req->buf = buf;
		req->buf_cap = buf_len;
	}
	req->c = c;
	req->error = 0;
	req->errmsg = NULL;
	req->out.release = req_release;
	c->inflight++;
	return req;
}

static void req_put(struct nbd_req *req)
{
	struct nbd_conn *c = req->c;

	if (req->buf_cap > REQ_BUF_KEEP) {
		free(req->buf);
		req->buf = NULL;
		req->buf_cap = 0;
	}
	req->next_free = c->free_reqs;
	c->free_reqs = req;
	c->inflight--;
}

void tx_req_free_all(struct nbd_conn *c)
{
	while (c->free_reqs) {
		struct nbd_req *req = c->free_reqs;

		c->free_reqs = req->next_free;
		free(req->buf);
		free(req);
	}
}

/* The reply left (or was dropped): recycle the request. The sender resumes a throttled reader. */
static void req_release(struct nbd_out *o)
{
	req_put((struct nbd_req *)((char *)o - offsetof(struct nbd_req, out)));
}

/* ---- replies ---- */

static void log_failure(struct nbd_req *req)
{
	struct ft_volume *v = req->c->vol;
	uint64_t sec = req->t_start / 1000000000ull;

	/* Rate-limited to 10 lines a second: a failing store must not flood the log. */
	if (sec != v->error_log_second) {
		if (v->error_log_suppressed)
			ft_warn("volume '%s': %u more backing-store errors were not logged",
				v->cfg->name, v->error_log_suppressed);
		v->error_log_second = sec;
		v->error_log_budget = 10;
		v->error_log_suppressed = 0;
	}
	if (v->error_log_budget == 0) {
		v->error_log_suppressed++;
		return;
	}
	v->error_log_budget--;
	ft_warn("volume '%s': %s offset=%llu length=%u failed: %s", v->cfg->name,
		cmd_name(req->type), (unsigned long long)req->offset, req->len,
		strerror(-req->error));
}

static void queue_reply(struct nbd_req *req)
{
	struct nbd_conn *c = req->c;
	struct ft_volume *v = c->vol;
	uint32_t wire = ft_nbd_errno_to_wire(req->error);
	bool is_read = req->type == NBD_CMD_READ;
	uint64_t now = ft_now_ns();

	ft_stats_record(&v->stats, op_of(req->type), req->error ? 0 : req->len, now - req->t_start,
			req->error != 0);
	ft_stat_sub(&v->stats.in_flight, 1);

	if (c->structured && (is_read || wire)) {
		struct nbd_structured_reply h = {
			.magic = htobe32(NBD_STRUCTURED_REPLY_MAGIC),
			.flags = htobe16(NBD_REPLY_FLAG_DONE),
			.cookie = htobe64(req->cookie),
		};

		if (wire) {
			const char *msg = req->errmsg ? req->errmsg : strerror(-req->error);
			uint16_t mlen = (uint16_t)strnlen(msg, sizeof(req->hdr) - sizeof(h) - 6);
			struct nbd_error_chunk e = { htobe32(wire), htobe16(mlen) };

			h.type = htobe16(NBD_REPLY_TYPE_ERROR);
			h.length = htobe32((uint32_t)sizeof(e) + mlen);
			memcpy(req->hdr, &h, sizeof(h));
			memcpy(req->hdr + sizeof(h), &e, sizeof(e));
			memcpy(req->hdr + sizeof(h) + sizeof(e), msg, mlen);
			req->out.iov[0] = (struct iovec){ req->hdr, sizeof(h) + sizeof(e) + mlen };
			req->out.niov = 1;
		} else {
			struct nbd_offset_data od = { htobe64(req->offset) };

			h.type = htobe16(NBD_REPLY_TYPE_OFFSET_DATA);
			h.length = htobe32((uint32_t)sizeof(od) + req->len);
			memcpy(req->hdr, &h, sizeof(h));
			memcpy(req->hdr + sizeof(h), &od, sizeof(od));
			req->out.iov[0] = (struct iovec){ req->hdr, sizeof(h) + sizeof(od) };
			req->out.iov[1] = (struct iovec){ req->buf, req->len };
			req->out.niov = 2;
		}
	} else {
		struct nbd_simple_reply h = {
			.magic = htobe32(NBD_SIMPLE_REPLY_MAGIC),
			.error = htobe32(wire),
			.cookie = htobe64(req->cookie),
		};

		memcpy(req->hdr, &h, sizeof(h));
		req->out.iov[0] = (struct iovec){ req->hdr, sizeof(h) };
		req->out.niov = 1;
		if (is_read && !wire) {
			req->out.iov[1] = (struct iovec){ req->buf, req->len };
			req->out.niov = 2;
		}
	}
	conn_send(c, &req->out);
}

static void req_end_io(struct ft_bio *bio, int error)
{
	struct nbd_req *req = (struct nbd_req *)((char *)bio - offsetof(struct nbd_req, bio));
	struct nbd_conn *c = req->c;

	conn_enter(c);
	req->error = error;
	if (error)
		log_failure(req);
	queue_reply(req);
	conn_leave(c);
}

static void submit(struct nbd_req *req)
{
	struct ft_bio *bio = &req->bio;
	struct ft_volume *v = req->c->vol;

	switch (req->type) {
	case NBD_CMD_READ:
		bio->op = FT_BIO_READ;
		break;
	case NBD_CMD_WRITE:
		bio->op = FT_BIO_WRITE;
		break;
	case NBD_CMD_FLUSH:
		bio->op = FT_BIO_FLUSH;
		break;
	case NBD_CMD_TRIM:
		bio->op = FT_BIO_TRIM;
		break;
	case NBD_CMD_WRITE_ZEROES:
		bio->op = FT_BIO_WRITE_ZEROES;
		break;
	default:
		bio->op = FT_BIO_CACHE;
		break;
	}
	bio->flags = 0;
	if (req->flags & NBD_CMD_FLAG_FUA)
		bio->flags |= FT_BIO_FUA;
	if (req->flags & NBD_CMD_FLAG_NO_HOLE)
		bio->flags |= FT_BIO_NO_HOLE;
	if (req->flags & NBD_CMD_FLAG_FAST_ZERO)
		bio->flags |= FT_BIO_FAST_ZERO;
	bio->offset = req->offset;
	bio->len = req->len;
	bio->buf = req->buf;
	bio->end_io = req_end_io;
	ft_bio_submit(v->backend, bio);
}

void tx_payload_complete(struct nbd_req *req)
{
	submit(req);
}

void tx_req_abandon(struct nbd_req *req)
{
	ft_stat_sub(&req->c->vol->stats.in_flight, 1);
	req_put(req);
}

static void rejected_payload_skipped(struct nbd_conn *c)
{
	struct nbd_req *req = c->skip_req;

	c->skip_req = NULL;
	queue_reply(req);
}

/*
 * Reject @req with @err before it reaches the store. A WRITE's payload is
 * read and dropped first, so the stream stays in sync, and answered after.
 */
static void reject(struct nbd_req *req, int err, const char *why)
{
	struct nbd_conn *c = req->c;

	ft_stat_add(&c->vol->stats.invalid_requests, 1);
	ft_debug("conn %llu: %s offset=%llu length=%u flags=0x%x rejected: %s",
		 (unsigned long long)c->id, cmd_name(req->type), (unsigned long long)req->offset,
		 req->len, req->flags, why);
	req->error = err;
	req->errmsg = why;
	if (req->type == NBD_CMD_WRITE) {
		c->skip_req = req;
		conn_skip(c, req->len, rejected_payload_skipped);
		return;
	}
	queue_reply(req);
}

/* Which command flags each command accepts (FUA: every command, per the spec). */
static uint16_t allowed_flags(const struct nbd_conn *c, uint16_t type)
{
	uint16_t f = NBD_CMD_FLAG_FUA;

	switch (type) {
	case NBD_CMD_READ:
		if (c->structured)
			f |= NBD_CMD_FLAG_DF;
		break;
	case NBD_CMD_WRITE_ZEROES:
		f |= NBD_CMD_FLAG_NO_HOLE;
		if (c->vol->eflags & NBD_FLAG_SEND_FAST_ZERO)
			f |= NBD_CMD_FLAG_FAST_ZERO;
		break;
	}
	return f;
}

/*
 * Validate a request against the export. Returns 0, or a negative errno
 * with *why set. Overflow-safe: offset + length is never computed before
 * offset is known to be within the export.
 */
static int validate(const struct nbd_conn *c, const struct nbd_req *req, const char **why)
{
	const struct ft_volume *v = c->vol;
	bool writes = req->type == NBD_CMD_WRITE || req->type == NBD_CMD_TRIM ||
		      req->type == NBD_CMD_WRITE_ZEROES;
	uint64_t mask = v->min_block - 1;

	switch (req->type) {
	case NBD_CMD_READ:
	case NBD_CMD_WRITE:
	case NBD_CMD_TRIM:
	case NBD_CMD_WRITE_ZEROES:
	case NBD_CMD_CACHE:
	case NBD_CMD_FLUSH:
		break;
	default:
		*why = "unknown or unsupported command";
		return -EINVAL;
	}
	if (req->flags & ~allowed_flags(c, req->type)) {
		*why = "command flag not valid for this command";
		return -EINVAL;
	}
	if (writes && (v->eflags & NBD_FLAG_READ_ONLY)) {
		*why = "export is read-only";
		return -EPERM;
	}
	if (req->type == NBD_CMD_FLUSH) {
		if (req->offset || req->len) {
			*why = "FLUSH with nonzero offset or length";
			return -EINVAL;
		}
		return 0;
	}
	if (req->len == 0) {
		*why = "zero length";
		return -EINVAL;
	}
	if ((req->type == NBD_CMD_READ || req->type == NBD_CMD_WRITE) &&
	    req->len > v->max_payload) {
		*why = "length exceeds the maximum payload";
		return -EINVAL;
	}
	if ((req->offset & mask) || (req->len & mask)) {
		*why = "offset or length not aligned to the minimum block size";
		return -EINVAL;
	}
	if (req->offset > v->size || req->len > v->size - req->offset) {
		*why = "offset and length beyond the end of the export";
		/* The spec: ENOSPC for writes past the end, EINVAL for reads and trims. */
		return (req->type == NBD_CMD_WRITE || req->type == NBD_CMD_WRITE_ZEROES) ? -ENOSPC
											: -EINVAL;
	}
	return 0;
}

int tx_step(struct nbd_conn *c)
{
	struct nbd_request h;
	struct nbd_req *req;
	const char *why = NULL;
	uint32_t buf_len;
	int rc;

	if (conn_avail(c) < sizeof(h))
		return 0;
	memcpy(&h, conn_data(c), sizeof(h));
	conn_consume(c, sizeof(h));
	if (be32toh(h.magic) != NBD_REQUEST_MAGIC) {
		conn_protocol_error(c, "bad request magic");
		return -1;
	}
	uint16_t type = be16toh(h.type);
	uint32_t len = be32toh(h.length);

	if (type == NBD_CMD_DISC) {
		ft_debug("conn %llu: NBD_CMD_DISC", (unsigned long long)c->id);
		c->read_done = true;
		return 0;
	}
	if (c->draining) {
		/* Not reached: a draining connection reads nothing new. */
		return 0;
	}
	/* A buffer only for commands that carry data, and only if the request is sane. */
	buf_len = 0;
	if ((type == NBD_CMD_READ || type == NBD_CMD_WRITE) && len <= c->vol->max_payload)
		buf_len = len;
	req = req_get(c, buf_len);
	if (!req) {
		conn_fail(c, "out of memory for a request");
		return -1;
	}
	req->cookie = be64toh(h.cookie);
	req->offset = be64toh(h.offset);
	req->len = len;
	req->type = type;
	req->flags = be16toh(h.flags);
	req->t_start = ft_now_ns();
	ft_stat_add(&c->vol->stats.in_flight, 1);

	rc = validate(c, req, &why);
	if (rc < 0) {
		reject(req, rc, why);
		return 1;
	}
	if (type == NBD_CMD_WRITE) {
		c->payload_req = req;
		c->payload_have = 0;
		return 1;
	}
	submit(req);
	return 1;
}
