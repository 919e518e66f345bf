/* SPDX-License-Identifier: MIT */
/*
 * Fixed newstyle handshake and option haggling (doc/proto.md, "Handshake").
 *
 * Supported options: EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY,
 * and LIST/SET_META_CONTEXT (which find no context: no namespace is
 * served). Anything else gets NBD_REP_ERR_UNSUP; a malformed option gets
 * NBD_REP_ERR_INVALID. Only a violation the spec gives no error for (bad
 * magic, unknown client flags, an unknown export with EXPORT_NAME) ends the
 * connection.
 */
#include <stddef.h>
#include <endian.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "flashtier/log.h"
#include "internal.h"

/* An option reply (or any handshake message) with its bytes inline. */
struct hs_out {
	struct nbd_out out;
	uint8_t data[];
};

static void hs_out_release(struct nbd_out *o)
{
	free(o);
}

static uint8_t *hs_alloc(struct nbd_conn *c, size_t len)
{
	struct hs_out *h = malloc(sizeof(*h) + len);

	if (!h) {
		conn_fail(c, "out of memory");
		return NULL;
	}
	h->out.iov[0].iov_base = h->data;
	h->out.iov[0].iov_len = len;
	h->out.niov = 1;
	h->out.release = hs_out_release;
	return h->data;
}

static void hs_commit(struct nbd_conn *c, uint8_t *data)
{
	struct hs_out *h = (struct hs_out *)(data - offsetof(struct hs_out, data));

	conn_send(c, &h->out);
}

/* Send an option reply of @type carrying @len bytes of @payload (may be NULL). */
static int reply(struct nbd_conn *c, uint32_t type, const void *payload, uint32_t len)
{
	struct nbd_option_reply hdr = {
		.magic = htobe64(NBD_REP_MAGIC),
		.option = htobe32(c->opt),
		.type = htobe32(type),
		.length = htobe32(len),
	};
	uint8_t *d = hs_alloc(c, sizeof(hdr) + len);

	if (!d)
		return -1;
	memcpy(d, &hdr, sizeof(hdr));
	if (len)
		memcpy(d + sizeof(hdr), payload, len);
	hs_commit(c, d);
	return 0;
}

static int reply_err(struct nbd_conn *c, uint32_t type, const char *msg)
{
	ft_debug("conn %llu: option %u refused: %s", (unsigned long long)c->id, c->opt, msg);
	return reply(c, type, msg, (uint32_t)strlen(msg));
}

void hs_greet(struct nbd_conn *c)
{
	struct nbd_new_handshake g = {
		.nbdmagic = htobe64(NBD_MAGIC),
		.version = htobe64(NBD_IHAVEOPT),
		.gflags = htobe16(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES),
	};
	uint8_t *d = hs_alloc(c, sizeof(g));

	if (!d)
		return;
	memcpy(d, &g, sizeof(g));
	hs_commit(c, d);
}

static uint16_t conn_eflags(const struct nbd_conn *c, const struct ft_volume *v)
{
	uint16_t f = v->eflags;

	/* We always answer a read with one chunk, so DF costs nothing once structured. */
	if (c->structured)
		f |= NBD_FLAG_SEND_DF;
	return f;
}

/*
 * The default export (empty name) is the volume named "" if there is one,
 * else the only volume when there is exactly one.
 */
static struct ft_volume *lookup(struct nbd_conn *c, const char *name, size_t len)
{
	struct ft_volume *v = server_find_volume(c->srv, name, len);

	if (!v && len == 0 && server_n_volumes(c->srv) == 1)
		v = server_volume(c->srv, 0);
	return v;
}

static int opt_export_name(struct nbd_conn *c, const uint8_t *data, uint32_t len)
{
	struct ft_volume *v = lookup(c, (const char *)data, len);
	struct nbd_export_name_reply r;
	size_t total = sizeof(r) + (c->no_zeroes ? 0 : 124);
	uint8_t *d;

	if (!v) {
		/* The spec leaves no way to refuse EXPORT_NAME but to hang up. */
		conn_fail(c, "NBD_OPT_EXPORT_NAME for an unknown export");
		return -1;
	}
	if (ft_reactor_stopping(c->r)) {
		conn_fail(c, "shutting down");
		return -1;
	}
	r.size = htobe64(v->size);
	r.eflags = htobe16(conn_eflags(c, v));
	d = hs_alloc(c, total);
	if (!d)
		return -1;
	memset(d, 0, total);
	memcpy(d, &r, sizeof(r));
	hs_commit(c, d);
	conn_enter_transmission(c, v);
	return 0;
}

static int opt_list(struct nbd_conn *c, uint32_t len)
{
	if (len != 0)
		return reply_err(c, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
	for (size_t i = 0; i < server_n_volumes(c->srv); i++) {
		const struct ft_volume_config *vc = server_volume(c->srv, i)->cfg;
		uint32_t nlen = (uint32_t)strlen(vc->name);
		uint32_t dlen = vc->description ? (uint32_t)strlen(vc->description) : 0;
		uint8_t *buf = malloc(4 + nlen + dlen);
		uint32_t be_nlen = htobe32(nlen);

		if (!buf) {
			conn_fail(c, "out of memory");
			return -1;
		}
		/* Name, then (the spec's free-form tail) the description for humans. */
		memcpy(buf, &be_nlen, 4);
		memcpy(buf + 4, vc->name, nlen);
		if (dlen)
			memcpy(buf + 4 + nlen, vc->description, dlen);
		reply(c, NBD_REP_SERVER, buf, 4 + nlen + dlen);
		free(buf);
	}
	return reply(c, NBD_REP_ACK, NULL, 0);
}

static int send_info(struct nbd_conn *c, uint16_t type, const void *payload, uint32_t len)
{
	uint8_t buf[2 + NBD_MAX_STRING];
	uint16_t t = htobe16(type);

	memcpy(buf, &t, 2);
	memcpy(buf + 2, payload, len);
	return reply(c, NBD_REP_INFO, buf, 2 + len);
}

static int opt_info_go(struct nbd_conn *c, const uint8_t *data, uint32_t len)
{
	uint32_t namelen;
	uint16_t nreqs;
	bool want_name = false, want_desc = false;
	struct ft_volume *v;

	/* Layout: u32 name length, name, u16 count, count x u16 (all checked before use). */
	if (len < 6)
		return reply_err(c, NBD_REP_ERR_INVALID, "option data too short");
	namelen = be32toh(*(const uint32_t *)data);
	if (namelen > len - 6)
		return reply_err(c, NBD_REP_ERR_INVALID, "export name length exceeds option data");
	if (namelen > NBD_MAX_STRING)
		return reply_err(c, NBD_REP_ERR_INVALID, "export name longer than 4096 bytes");
	memcpy(&nreqs, data + 4 + namelen, 2);
	nreqs = be16toh(nreqs);
	if ((uint64_t)len != 4ull + namelen + 2 + 2ull * nreqs)
		return reply_err(c, NBD_REP_ERR_INVALID,
				 "option length does not match the information requests");
	for (uint32_t i = 0; i < nreqs; i++) {
		uint16_t t;

		memcpy(&t, data + 6 + namelen + 2 * i, 2);
		t = be16toh(t);
		if (t == NBD_INFO_NAME)
			want_name = true;
		else if (t == NBD_INFO_DESCRIPTION)
			want_desc = true;
		/* NBD_INFO_BLOCK_SIZE is always sent; unknown requests are ignored. */
	}
	if (ft_reactor_stopping(c->r))
		return reply_err(c, NBD_REP_ERR_SHUTDOWN, "server is shutting down");
	v = lookup(c, (const char *)data + 4, namelen);
	if (!v)
		return reply_err(c, NBD_REP_ERR_UNKNOWN, "no such export");

	struct {
		uint64_t size;
		uint16_t eflags;
	} __attribute__((packed)) ex = { htobe64(v->size), htobe16(conn_eflags(c, v)) };
	struct {
		uint32_t min, pref, max;
	} __attribute__((packed)) bs = { htobe32(v->min_block), htobe32(v->pref_block),
					 htobe32(v->max_payload) };

	send_info(c, NBD_INFO_EXPORT, &ex, sizeof(ex));
	send_info(c, NBD_INFO_BLOCK_SIZE, &bs, sizeof(bs));
	if (want_name)
		send_info(c, NBD_INFO_NAME, v->cfg->name, (uint32_t)strlen(v->cfg->name));
	if (want_desc && v->cfg->description)
		send_info(c, NBD_INFO_DESCRIPTION, v->cfg->description,
			  (uint32_t)strlen(v->cfg->description));
	reply(c, NBD_REP_ACK, NULL, 0);
	if (c->opt == NBD_OPT_GO)
		conn_enter_transmission(c, v);
	return 0;
}

/*
 * LIST/SET_META_CONTEXT: check the syntax; no metadata namespace is served,
 * so every well-formed query matches nothing and the answer is a bare ACK.
 */
static int opt_meta_context(struct nbd_conn *c, const uint8_t *data, uint32_t len)
{
	uint32_t namelen, nq, off;

	if (c->opt == NBD_OPT_SET_META_CONTEXT && !c->structured)
		return reply_err(c, NBD_REP_ERR_INVALID,
				 "NBD_OPT_SET_META_CONTEXT needs structured replies first");
	if (len < 8)
		return reply_err(c, NBD_REP_ERR_INVALID, "option data too short");
	namelen = be32toh(*(const uint32_t *)data);
	if (namelen > len - 8)
		return reply_err(c, NBD_REP_ERR_INVALID, "export name length exceeds option data");
	memcpy(&nq, data + 4 + namelen, 4);
	nq = be32toh(nq);
	off = 8 + namelen;
	for (uint32_t i = 0; i < nq; i++) {
		uint32_t ql;

		if (len - off < 4)
			return reply_err(c, NBD_REP_ERR_INVALID, "query overruns option data");
		memcpy(&ql, data + off, 4);
		ql = be32toh(ql);
		off += 4;
		if (ql > len - off)
			return reply_err(c, NBD_REP_ERR_INVALID, "query overruns option data");
		off += ql;
	}
	if (off != len)
		return reply_err(c, NBD_REP_ERR_INVALID, "trailing bytes after the queries");
	if (!lookup(c, (const char *)data + 4, namelen))
		return reply_err(c, NBD_REP_ERR_UNKNOWN, "no such export");
	return reply(c, NBD_REP_ACK, NULL, 0);
}

static int handle_option(struct nbd_conn *c, const uint8_t *data, uint32_t len)
{
	switch (c->opt) {
	case NBD_OPT_EXPORT_NAME:
		return opt_export_name(c, data, len);
	case NBD_OPT_ABORT:
		/* Acknowledge, then close once the ACK is out; read nothing more. */
		c->read_done = true;
		return reply(c, NBD_REP_ACK, NULL, 0);
	}
	if (ft_reactor_stopping(c->r))
		return reply_err(c, NBD_REP_ERR_SHUTDOWN, "server is shutting down");
	switch (c->opt) {
	case NBD_OPT_LIST:
		return opt_list(c, len);
	case NBD_OPT_INFO:
	case NBD_OPT_GO:
		return opt_info_go(c, data, len);
	case NBD_OPT_STRUCTURED_REPLY:
		if (len != 0)
			return reply_err(c, NBD_REP_ERR_INVALID,
					 "NBD_OPT_STRUCTURED_REPLY takes no data");
		c->structured = true;
		return reply(c, NBD_REP_ACK, NULL, 0);
	case NBD_OPT_LIST_META_CONTEXT:
	case NBD_OPT_SET_META_CONTEXT:
		return opt_meta_context(c, data, len);
	case NBD_OPT_STARTTLS:
		if (len != 0)
			return reply_err(c, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
		return reply_err(c, NBD_REP_ERR_UNSUP, "TLS is not supported by flashtierd");
	default:
		return reply_err(c, NBD_REP_ERR_UNSUP, "unknown option");
	}
}

/* An oversized option's data is gone: now refuse it. */
static void option_skipped(struct nbd_conn *c)
{
	reply_err(c, NBD_REP_ERR_TOO_BIG, "option data too large");
}

int hs_step(struct nbd_conn *c)
{
	const uint8_t *d = conn_data(c);

	switch (c->hs) {
	case HS_CLIENT_FLAGS: {
		uint32_t flags;

		if (conn_avail(c) < 4)
			return 0;
		memcpy(&flags, d, 4);
		flags = be32toh(flags);
		conn_consume(c, 4);
		if (flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
			conn_protocol_error(c, "unknown client flags");
			return -1;
		}
		c->no_zeroes = flags & NBD_FLAG_C_NO_ZEROES;
		c->hs = HS_OPT_HEADER;
		return 1;
	}
	case HS_OPT_HEADER: {
		struct nbd_option_header h;

		if (conn_avail(c) < sizeof(h))
			return 0;
		memcpy(&h, d, sizeof(h));
		conn_consume(c, sizeof(h));
		if (be64toh(h.magic) != NBD_IHAVEOPT) {
			conn_protocol_error(c, "bad option magic");
			return -1;
		}
		c->opt = be32toh(h.option);
		c->opt_len = be32toh(h.length);
		if (c->opt_len > OPT_MAX_DATA) {
			if (c->opt == NBD_OPT_EXPORT_NAME) {
				conn_protocol_error(c, "oversized NBD_OPT_EXPORT_NAME");
				return -1;
			}
			conn_skip(c, c->opt_len, option_skipped);
			return 1;
		}
		c->hs = HS_OPT_DATA;
		return 1;
	}
	case HS_OPT_DATA:
		if (conn_avail(c) < c->opt_len)
			return 0;
		/* Consumed first; the bytes stay in place until the next compaction. */
		conn_consume(c, c->opt_len);
		c->hs = HS_OPT_HEADER;
		handle_option(c, d, c->opt_len);
		return 1;
	}
	return -1;
}
