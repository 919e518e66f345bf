/* SPDX-License-Identifier: MIT */
/*
 * The client side of NBD for integration tests: libnbd handles that a
 * test's teardown can close even when an assertion aborted the test, and
 * raw-socket protocol pieces for what libnbd cannot express.
 *
 * Every helper asserts on failure, like those of harness.h.
 */
#ifndef FLASHTIER_TEST_NBD_CLIENT_H
#define FLASHTIER_TEST_NBD_CLIENT_H

#include <endian.h>
#include <libnbd.h>
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>

#include "flashtier/nbd_proto.h"
#include "harness.h"

#define TH_MAX_HANDLES 64

/* Every libnbd handle opened with th_nbd_new() and not yet closed. */
static struct nbd_handle *th_handles[TH_MAX_HANDLES];

/* A new libnbd handle, remembered for th_nbd_close_all(). */
static inline struct nbd_handle *th_nbd_new(void)
{
	struct nbd_handle *h = nbd_create();

	cr_assert_not_null(h, "nbd_create: %s", nbd_get_error());
	for (int i = 0; i < TH_MAX_HANDLES; i++)
		if (!th_handles[i]) {
			th_handles[i] = h;
			return h;
		}
	nbd_close(h);
	cr_assert_fail("more than %d libnbd handles open", TH_MAX_HANDLES);
	return NULL;
}

/* Close a handle from th_nbd_new() and forget it. */
static inline void th_nbd_close(struct nbd_handle *h)
{
	for (int i = 0; i < TH_MAX_HANDLES; i++)
		if (th_handles[i] == h)
			th_handles[i] = NULL;
	nbd_close(h);
}

/* Teardown: close every handle a test left open (sanitizer runs then report only real leaks). */
static inline void th_nbd_close_all(void)
{
	for (int i = 0; i < TH_MAX_HANDLES; i++)
		if (th_handles[i]) {
			nbd_close(th_handles[i]);
			th_handles[i] = NULL;
		}
}

/* A handle connected to export @name of the agent's unix socket. */
static inline struct nbd_handle *th_nbd_connect(const struct ft_agent *a, const char *name)
{
	struct nbd_handle *h = th_nbd_new();

	cr_assert_eq(nbd_set_export_name(h, name), 0, "%s", nbd_get_error());
	cr_assert_eq(nbd_connect_unix(h, a->sock), 0, "connect to '%s': %s", name, nbd_get_error());
	return h;
}

/* A clean NBD_CMD_DISC (asserted), then close the handle. */
static inline void th_nbd_disconnect(struct nbd_handle *h)
{
	cr_assert_eq(nbd_shutdown(h, 0), 0, "nbd_shutdown: %s", nbd_get_error());
	th_nbd_close(h);
}

/* Poll until every request queued on @h has been sent to the server. */
static inline void th_nbd_send_queued(struct nbd_handle *h)
{
	while (nbd_aio_get_direction(h) & LIBNBD_AIO_DIRECTION_WRITE)
		cr_assert_geq(nbd_poll(h, 100), 0, "%s", nbd_get_error());
}

/* Poll @h until none of its requests is in flight; fail with message @why after @timeout_ms. */
static inline void th_nbd_wait_idle(struct nbd_handle *h, int timeout_ms, const char *why)
{
	double end = th_now_ms() + timeout_ms;

	while (nbd_aio_in_flight(h) > 0) {
		cr_assert_lt(th_now_ms(), end, "%s", why);
		cr_assert_geq(nbd_poll(h, 100), 0, "%s", nbd_get_error());
	}
}

/* ---- a suite's test environment: one agent, at most one nbdkit, one temp dir ---- */

/* Teardown after every test, also one an assertion aborted: leave nothing running. */
static inline void th_env_teardown(struct ft_agent *a, pid_t *kit, char *dir)
{
	th_nbd_close_all();
	th_agent_kill(a);
	th_kill(kit);
	if (dir[0])
		th_rm_rf(dir);
	dir[0] = '\0';
}

/* End of a test: stop the agent (asserting exit 0; it removes @dir), then nbdkit. */
static inline void th_env_finish(struct ft_agent *a, pid_t *kit, char *dir)
{
	ft_agent_finish(a);
	th_nbdkit_stop(*kit);
	*kit = 0;
	dir[0] = '\0';
}

/* ---- raw sockets ---- */

/* A raw connection to the unix socket @sock. */
static inline int th_raw_open(const char *sock)
{
	int fd = th_unix_connect(sock);

	cr_assert_geq(fd, 0, "connect: %s", strerror(errno));
	return fd;
}

/* Read exactly @len bytes; each wait for data is at most 10 s. */
static inline void th_raw_read(int fd, void *buf, size_t len)
{
	size_t done = 0;

	while (done < len) {
		struct pollfd p = { .fd = fd, .events = POLLIN };
		ssize_t n;

		cr_assert_eq(poll(&p, 1, 10000), 1, "nothing from flashtierd within 10 s");
		n = read(fd, (char *)buf + done, len - done);
		cr_assert_gt(n, 0, "read from flashtierd: %s", n < 0 ? strerror(errno) : "EOF");
		done += (size_t)n;
	}
}

/* Write all of @buf (no SIGPIPE if the server has gone). */
static inline void th_raw_write(int fd, const void *buf, size_t len)
{
	size_t done = 0;

	while (done < len) {
		ssize_t n = send(fd, (const char *)buf + done, len - done, MSG_NOSIGNAL);

		cr_assert_gt(n, 0, "write to flashtierd: %s", strerror(errno));
		done += (size_t)n;
	}
}

/* Read and check the fixed-newstyle greeting. */
static inline void th_raw_greeting(int fd)
{
	struct nbd_new_handshake g;

	th_raw_read(fd, &g, sizeof(g));
	cr_assert_eq(be64toh(g.nbdmagic), NBD_MAGIC);
	cr_assert_eq(be64toh(g.version), NBD_IHAVEOPT);
	cr_assert(be16toh(g.gflags) & NBD_FLAG_FIXED_NEWSTYLE);
}

/* Send the client flags: fixed newstyle, no zeroes. */
static inline void th_raw_client_flags(int fd)
{
	uint32_t f = htobe32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);

	th_raw_write(fd, &f, 4);
}

/* Send option @opt with @len bytes of @data. */
static inline void th_raw_option(int fd, uint32_t opt, const void *data, uint32_t len)
{
	struct nbd_option_header h = { htobe64(NBD_IHAVEOPT), htobe32(opt), htobe32(len) };

	th_raw_write(fd, &h, sizeof(h));
	if (len)
		th_raw_write(fd, data, len);
}

/* Read option replies to @opt until NBD_REP_ACK; assert no error reply. */
static inline void th_raw_option_ack(int fd, uint32_t opt)
{
	for (;;) {
		struct nbd_option_reply r;
		uint8_t payload[4096];
		uint32_t len;

		th_raw_read(fd, &r, sizeof(r));
		cr_assert_eq(be64toh(r.magic), NBD_REP_MAGIC);
		cr_assert_eq(be32toh(r.option), opt);
		len = be32toh(r.length);
		cr_assert_leq(len, sizeof(payload));
		th_raw_read(fd, payload, len);
		cr_assert_eq(be32toh(r.type) & (1u << 31), 0, "option %u refused: %x", opt,
			     be32toh(r.type));
		if (be32toh(r.type) == NBD_REP_ACK)
			return;
	}
}

/* NBD_OPT_GO data for @export with no information requests, in @out (64 bytes); its length. */
static inline uint32_t th_raw_go_data(const char *export, uint8_t *out)
{
	uint32_t nl = (uint32_t)strlen(export), nl_be = htobe32(nl);

	cr_assert_leq(nl, 64 - 6, "export name too long: %s", export);
	memcpy(out, &nl_be, 4);
	memcpy(out + 4, export, nl);
	memset(out + 4 + nl, 0, 2);
	return 6 + nl;
}

/* NBD_OPT_GO for @export, acknowledged: the connection is in transmission. */
static inline void th_raw_go(int fd, const char *export)
{
	uint8_t data[64];
	uint32_t len = th_raw_go_data(export, data);

	th_raw_option(fd, NBD_OPT_GO, data, len);
	th_raw_option_ack(fd, NBD_OPT_GO);
}

/* A raw connection already in transmission on @export, with structured replies if asked. */
static inline int th_raw_connect(const char *sock, const char *export, bool structured)
{
	int fd = th_raw_open(sock);

	th_raw_greeting(fd);
	th_raw_client_flags(fd);
	if (structured) {
		th_raw_option(fd, NBD_OPT_STRUCTURED_REPLY, NULL, 0);
		th_raw_option_ack(fd, NBD_OPT_STRUCTURED_REPLY);
	}
	th_raw_go(fd, export);
	return fd;
}

/* Send a request header (a WRITE's payload is up to the caller). */
static inline void th_raw_request(int fd, uint16_t type, uint16_t flags, uint64_t cookie,
				  uint64_t off, uint32_t len)
{
	struct nbd_request r = {
		.magic = htobe32(NBD_REQUEST_MAGIC),
		.flags = htobe16(flags),
		.type = htobe16(type),
		.cookie = htobe64(cookie),
		.offset = htobe64(off),
		.length = htobe32(len),
	};

	th_raw_write(fd, &r, sizeof(r));
}

#endif
