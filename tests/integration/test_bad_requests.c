/* SPDX-License-Identifier: MIT */
/*
 * Bad requests, really sent: libnbd with its client-side checks off
 * (nbd_set_strict_mode(h, 0)), and a raw socket for what libnbd cannot
 * express. Each rejection must carry the errno the spec names
 * (doc/proto.md, "Error values"), and the connection must stay usable:
 * every bad request is followed by a good read whose data is checked.
 *
 *   writes and write-zeroes past the end      ENOSPC
 *   reads, trims, caches past the end          EINVAL
 *   misaligned, zero length, oversized         EINVAL
 *   unknown flags or commands                  EINVAL
 *   writes of any kind to a read-only export   EPERM
 */
#include "nbd_client.h"

#define VOL_SIZE     (64ull << 20)
#define MAX_PAYLOAD  (32u << 20)
#define FLAG_UNKNOWN (1u << 7) /* no NBD command flag is defined at bit 7 */

enum backing {
	B_FILE,
	B_NBD,
};

struct env {
	struct ft_agent a;
	char dir[256];
	char file[320];
	char kit_sock[320];
	pid_t kit;
	enum backing kind;
	uint64_t rejected; /* requests we expect flashtierd to have rejected on "v" */
	uint64_t rejected_ro;
};

static struct env g_env;

/* Runs after every test, also one an assertion aborted: leave nothing running. */
static void env_teardown(void)
{
	th_env_teardown(&g_env.a, &g_env.kit, g_env.dir);
}

/* A hung agent fails the test instead of blocking the run. */
TestSuite(bad_requests, .fini = env_teardown, .timeout = 60);

/* Volume "v" (read-write) and "ro" (read-only), on one file or one nbdkit. */
static void env_start(struct env *e, enum backing kind, const char *const *kit_args)
{
	static const char *const mem_args[] = { "memory", "64M", NULL };
	char backing[400], vols[1024];

	memset(e, 0, sizeof(*e));
	e->kind = kind;
	th_mkdtemp(e->dir, sizeof(e->dir));
	if (kind == B_FILE) {
		th_make_file(e->dir, "disk.img", (long long)VOL_SIZE, e->file, sizeof(e->file));
		snprintf(backing, sizeof(backing), "%s", e->file);
	} else {
		e->kit = th_nbdkit_start(e->dir, "kit", e->kit_sock, sizeof(e->kit_sock),
					 kit_args ? kit_args : mem_args);
		snprintf(backing, sizeof(backing), "nbd+unix:///?socket=%s", e->kit_sock);
	}
	snprintf(vols, sizeof(vols),
		 "{ \"v\": { \"backing\": \"%s\" }, "
		 "\"ro\": { \"backing\": \"%s\", \"readonly\": true } }",
		 backing, backing);
	ft_agent_start_in(&e->a, e->dir, vols, "");
}

static void env_finish(struct env *e)
{
	th_env_finish(&e->a, &e->kit, e->dir);
}

/* Sum of flashtier_request_errors_total over every op of @vol. */
static double vol_errors(struct env *e, const char *vol)
{
	static const char *const ops[] = {
		"read", "write", "flush", "trim", "write_zeroes", "cache"
	};
	double sum = 0;

	for (int i = 0; i < 6; i++)
		sum += th_vol_metric(&e->a, "flashtier_request_errors_total", vol, ops[i]);
	return sum;
}

/* ---- libnbd client with strict mode off ---- */

static struct nbd_handle *connect_loose(struct env *e, const char *export, bool structured)
{
	struct nbd_handle *h = th_nbd_new();
	char uri[512];

	cr_assert_eq(nbd_set_request_structured_replies(h, structured), 0);
	/* Every client-side check off: the server must do the checking. */
	cr_assert_eq(nbd_set_strict_mode(h, 0), 0, "%s", nbd_get_error());
	th_uri(&e->a, export, uri, sizeof(uri));
	cr_assert_eq(nbd_connect_uri(h, uri), 0, "connect %s: %s", uri, nbd_get_error());
	cr_assert_eq(nbd_get_structured_replies_negotiated(h), structured ? 1 : 0);
	cr_assert_eq(nbd_get_size(h), (int64_t)VOL_SIZE);
	cr_assert_eq(nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM), 512);
	return h;
}

#define PROBE_OFF  (1u << 20)
#define PROBE_LEN  8192u
#define PROBE_SEED 77u

/* A libnbd connection, with what it takes to open it again. */
struct client {
	struct env *e;
	struct nbd_handle *h;
	const char *export;
	bool structured;
};

static void client_open(struct client *c, struct env *e, const char *export, bool structured)
{
	c->e = e;
	c->export = export;
	c->structured = structured;
	c->h = connect_loose(e, export, structured);
}

static void client_close(struct client *c)
{
	th_nbd_disconnect(c->h);
	c->h = NULL;
}

/*
 * The connection still works and still returns the right data. If it
 * died, that is a failure; reconnect so the remaining cases still run
 * and report their own results.
 */
static void expect_usable(struct client *c, const char *after)
{
	static uint8_t got[PROBE_LEN], want[PROBE_LEN];

	th_fill(want, sizeof(want), PROBE_OFF, PROBE_SEED);
	memset(got, 0, sizeof(got));
	if (nbd_aio_is_ready(c->h) != 1 || nbd_pread(c->h, got, sizeof(got), PROBE_OFF, 0) != 0) {
		cr_expect_fail("after %s: the connection is no longer usable: %s", after,
			       nbd_get_error());
		th_nbd_close(c->h);
		c->h = connect_loose(c->e, c->export, c->structured);
		return;
	}
	cr_expect_arr_eq(got, want, sizeof(got), "after %s: the good read returned wrong data",
			 after);
}

/*
 * @rc is what a libnbd call returned for a bad request: it must have
 * failed with exactly @want, and the connection must carry on.
 */
static void expect_reject(struct client *c, int rc, int want, const char *what)
{
	int err = nbd_get_errno();
	const char *msg = nbd_get_error();

	cr_expect_eq(rc, -1, "%s: succeeded, want %s", what, strerror(want));
	if (rc == -1)
		cr_expect_eq(err, want, "%s: errno %d (%s; %s), want %d (%s)", what, err,
			     strerror(err), msg ? msg : "", want, strerror(want));
	expect_usable(c, what);
}

/* Write the probe pattern through a well-behaved connection. */
static void write_probe(struct env *e)
{
	uint8_t buf[PROBE_LEN];
	struct nbd_handle *h = th_nbd_new();
	char uri[512];

	th_uri(&e->a, "v", uri, sizeof(uri));
	cr_assert_eq(nbd_connect_uri(h, uri), 0, "%s", nbd_get_error());
	th_fill(buf, sizeof(buf), PROBE_OFF, PROBE_SEED);
	cr_assert_eq(nbd_pwrite(h, buf, sizeof(buf), PROBE_OFF, LIBNBD_CMD_FLAG_FUA), 0, "%s",
		     nbd_get_error());
	cr_assert_eq(nbd_shutdown(h, 0), 0);
	th_nbd_close(h);
}

/* ---- the matrix of bad requests ---- */

static const uint64_t OFF_WRAP = UINT64_MAX - 511; /* aligned; + 1024 wraps past 2^64 */

static void bad_requests(enum backing kind, bool structured)
{
	struct env *e = &g_env;
	struct client cl;
	uint8_t *buf = calloc(1, MAX_PAYLOAD + 4096); /* libnbd clears a read buffer first */
	uint64_t n = 0;

	cr_assert_not_null(buf);
	env_start(e, kind, NULL);
	write_probe(e);
	client_open(&cl, e, "v", structured);
	expect_usable(&cl, "connecting");

	/* cl.h is re-read each time: expect_reject() may have reconnected. */
#define REJECT(call, want)                                                                         \
	do {                                                                                       \
		expect_reject(&cl, (call), (want), #call);                                         \
		n++;                                                                               \
	} while (0)

	/* Past the end: reads, trims and caches EINVAL, writes ENOSPC. */
	REJECT(nbd_pread(cl.h, buf, 512, VOL_SIZE, 0), EINVAL);
	REJECT(nbd_pread(cl.h, buf, 4096, VOL_SIZE - 512, 0), EINVAL);
	REJECT(nbd_pread(cl.h, buf, 512, 1ull << 62, 0), EINVAL);
	REJECT(nbd_pwrite(cl.h, buf, 512, VOL_SIZE, 0), ENOSPC);
	REJECT(nbd_pwrite(cl.h, buf, 4096, VOL_SIZE - 512, 0), ENOSPC);
	REJECT(nbd_pwrite(cl.h, buf, 512, 1ull << 62, LIBNBD_CMD_FLAG_FUA), ENOSPC);
	REJECT(nbd_zero(cl.h, 512, VOL_SIZE, 0), ENOSPC);
	REJECT(nbd_zero(cl.h, 1u << 20, VOL_SIZE - 512, LIBNBD_CMD_FLAG_NO_HOLE), ENOSPC);
	REJECT(nbd_trim(cl.h, 512, VOL_SIZE, 0), EINVAL);
	REJECT(nbd_trim(cl.h, 8192, VOL_SIZE - 4096, 0), EINVAL);
	REJECT(nbd_cache(cl.h, 512, VOL_SIZE, 0), EINVAL);
	REJECT(nbd_cache(cl.h, 8192, VOL_SIZE - 4096, 0), EINVAL);

	/* offset + length overflows 2^64: still "past the end", not a wrap to the start. */
	REJECT(nbd_pread(cl.h, buf, 1024, OFF_WRAP, 0), EINVAL);
	REJECT(nbd_pwrite(cl.h, buf, 1024, OFF_WRAP, 0), ENOSPC);
	REJECT(nbd_trim(cl.h, 1024, OFF_WRAP, 0), EINVAL);
	REJECT(nbd_zero(cl.h, 1024, OFF_WRAP, 0), ENOSPC);
	REJECT(nbd_cache(cl.h, 1024, OFF_WRAP, 0), EINVAL);
	REJECT(nbd_zero(cl.h, 0xfffffe00u, UINT64_MAX - 0xfffffe00u + 1 + 512, 0), ENOSPC);

	/* Zero length. */
	REJECT(nbd_pread(cl.h, buf, 0, 0, 0), EINVAL);
	REJECT(nbd_pwrite(cl.h, buf, 0, 0, 0), EINVAL);
	REJECT(nbd_trim(cl.h, 0, 0, 0), EINVAL);
	REJECT(nbd_zero(cl.h, 0, 0, 0), EINVAL);
	REJECT(nbd_cache(cl.h, 0, 0, 0), EINVAL);

	/* Not multiples of the 512-byte minimum block size. */
	REJECT(nbd_pread(cl.h, buf, 512, 100, 0), EINVAL);
	REJECT(nbd_pread(cl.h, buf, 100, 0, 0), EINVAL);
	REJECT(nbd_pread(cl.h, buf, 4096 + 1, 4096, 0), EINVAL);
	REJECT(nbd_pwrite(cl.h, buf, 512, 1, 0), EINVAL);
	REJECT(nbd_pwrite(cl.h, buf, 513, 0, 0), EINVAL); /* 513 payload bytes dropped */
	REJECT(nbd_pwrite(cl.h, buf, 1000, 4096, 0), EINVAL);
	REJECT(nbd_trim(cl.h, 512, 256, 0), EINVAL);
	REJECT(nbd_trim(cl.h, 1000, 0, 0), EINVAL);
	REJECT(nbd_zero(cl.h, 512, 511, 0), EINVAL);
	REJECT(nbd_zero(cl.h, 4095, 0, 0), EINVAL);
	REJECT(nbd_cache(cl.h, 512, 7, 0), EINVAL);
	REJECT(nbd_cache(cl.h, 3, 0, 0), EINVAL);

	/* Larger than the 32 MiB maximum payload (writes: see rejected_write_payload). */
	REJECT(nbd_pread(cl.h, buf, MAX_PAYLOAD + 512, 0, 0), EINVAL);

	/* An unknown command flag, on every command. */
	REJECT(nbd_pread(cl.h, buf, 512, 0, FLAG_UNKNOWN), EINVAL);
	REJECT(nbd_pwrite(cl.h, buf, 512, 0, FLAG_UNKNOWN), EINVAL);
	REJECT(nbd_flush(cl.h, FLAG_UNKNOWN), EINVAL);
	REJECT(nbd_trim(cl.h, 512, 0, FLAG_UNKNOWN), EINVAL);
	REJECT(nbd_zero(cl.h, 512, 0, FLAG_UNKNOWN), EINVAL);
	REJECT(nbd_cache(cl.h, 512, 0, FLAG_UNKNOWN), EINVAL);
	REJECT(nbd_pread(cl.h, buf, 512, 0, 1u << 15), EINVAL);

	/* Known flags on commands they do not apply to. */
	REJECT(nbd_pwrite(cl.h, buf, 512, 0, LIBNBD_CMD_FLAG_FAST_ZERO), EINVAL);
	REJECT(nbd_trim(cl.h, 512, 0, LIBNBD_CMD_FLAG_FAST_ZERO), EINVAL);
	REJECT(nbd_cache(cl.h, 512, 0, LIBNBD_CMD_FLAG_FAST_ZERO), EINVAL);
	REJECT(nbd_pread(cl.h, buf, 512, 0, LIBNBD_CMD_FLAG_FAST_ZERO), EINVAL);
	REJECT(nbd_flush(cl.h, LIBNBD_CMD_FLAG_FAST_ZERO), EINVAL);
	REJECT(nbd_pwrite(cl.h, buf, 512, 0, LIBNBD_CMD_FLAG_NO_HOLE), EINVAL);
	REJECT(nbd_trim(cl.h, 512, 0, LIBNBD_CMD_FLAG_NO_HOLE), EINVAL);
	REJECT(nbd_pread(cl.h, buf, 512, 0, LIBNBD_CMD_FLAG_NO_HOLE), EINVAL);
	REJECT(nbd_cache(cl.h, 512, 0, LIBNBD_CMD_FLAG_NO_HOLE), EINVAL);
	REJECT(nbd_pwrite(cl.h, buf, 512, 0, LIBNBD_CMD_FLAG_DF), EINVAL);
	REJECT(nbd_zero(cl.h, 512, 0, LIBNBD_CMD_FLAG_DF), EINVAL);
	REJECT(nbd_pread(cl.h, buf, 512, 0, LIBNBD_CMD_FLAG_REQ_ONE), EINVAL);
	REJECT(nbd_zero(cl.h, 512, 0, LIBNBD_CMD_FLAG_REQ_ONE), EINVAL);
	if (!structured) {
		/* DF is only valid once structured replies are negotiated. */
		REJECT(nbd_pread(cl.h, buf, 512, 0, LIBNBD_CMD_FLAG_DF), EINVAL);
	} else {
		cr_expect_eq(nbd_pread(cl.h, buf, 512, 0, LIBNBD_CMD_FLAG_DF), 0, "DF read: %s",
			     nbd_get_error());
	}
	/* FUA is valid on every command (proto.md: "valid for all commands"). */
	cr_expect_eq(nbd_pread(cl.h, buf, 512, 0, LIBNBD_CMD_FLAG_FUA), 0, "%s", nbd_get_error());
	cr_expect_eq(nbd_flush(cl.h, LIBNBD_CMD_FLAG_FUA), 0, "%s", nbd_get_error());
	cr_expect_eq(nbd_cache(cl.h, 512, 0, LIBNBD_CMD_FLAG_FUA), 0, "%s", nbd_get_error());
	expect_usable(&cl, "FUA on every command");
#undef REJECT

	e->rejected = n;
	cr_expect_eq(th_vol_metric(&e->a, "flashtier_invalid_requests_total", "v", NULL), (double)n,
		     "invalid_requests_total should count all %llu rejections",
		     (unsigned long long)n);
	cr_expect_eq(vol_errors(e, "v"), (double)n);
	/* Rejected writes moved no bytes. */
	cr_expect_eq(th_vol_metric(&e->a, "flashtier_request_bytes_total", "v", "write"),
		     PROBE_LEN);
	cr_expect_eq(th_vol_metric(&e->a, "flashtier_requests_in_flight", "v", NULL), 0);
	cr_assert(ft_agent_alive(&e->a), "flashtierd died");

	client_close(&cl);
	free(buf);
	env_finish(e);
}

Test(bad_requests, file_structured)
{
	bad_requests(B_FILE, true);
}

Test(bad_requests, file_simple)
{
	bad_requests(B_FILE, false);
}

Test(bad_requests, nbd_structured)
{
	bad_requests(B_NBD, true);
}

Test(bad_requests, nbd_simple)
{
	bad_requests(B_NBD, false);
}

/* ---- read-only ---- */

static void read_only(enum backing kind, bool structured)
{
	struct env *e = &g_env;
	struct client cl;
	uint8_t *buf = calloc(1, 1u << 20);
	uint64_t n = 0;

	cr_assert_not_null(buf);
	env_start(e, kind, NULL);
	write_probe(e);
	client_open(&cl, e, "ro", structured);
	cr_assert_eq(nbd_is_read_only(cl.h), 1);
	expect_usable(&cl, "connecting");

#define REJECT(call, want)                                                                         \
	do {                                                                                       \
		expect_reject(&cl, (call), (want), #call);                                         \
		n++;                                                                               \
	} while (0)

	REJECT(nbd_pwrite(cl.h, buf, 512, 0, 0), EPERM);
	REJECT(nbd_pwrite(cl.h, buf, 4096, PROBE_OFF, LIBNBD_CMD_FLAG_FUA), EPERM);
	REJECT(nbd_trim(cl.h, 4096, 0, 0), EPERM);
	REJECT(nbd_trim(cl.h, 1u << 20, PROBE_OFF, LIBNBD_CMD_FLAG_FUA), EPERM);
	REJECT(nbd_zero(cl.h, 4096, 0, 0), EPERM);
	REJECT(nbd_zero(cl.h, PROBE_LEN, PROBE_OFF, LIBNBD_CMD_FLAG_NO_HOLE), EPERM);
	REJECT(nbd_zero(cl.h, 48u << 20, 0, LIBNBD_CMD_FLAG_FUA), EPERM);
#undef REJECT
	/* The probe data is untouched, and reads, flushes and caches still work. */
	expect_usable(&cl, "the rejected writes");
	cr_expect_eq(nbd_flush(cl.h, 0), 0, "%s", nbd_get_error());
	cr_expect_eq(nbd_cache(cl.h, 4096, 0, 0), 0, "%s", nbd_get_error());

	cr_expect_eq(th_vol_metric(&e->a, "flashtier_invalid_requests_total", "ro", NULL),
		     (double)n);
	cr_expect_eq(th_vol_metric(&e->a, "flashtier_request_errors_total", "ro", "write"), 2);
	cr_expect_eq(th_vol_metric(&e->a, "flashtier_request_errors_total", "ro", "trim"), 2);
	cr_expect_eq(th_vol_metric(&e->a, "flashtier_request_errors_total", "ro", "write_zeroes"),
		     3);
	cr_expect_eq(th_vol_metric(&e->a, "flashtier_request_bytes_total", "ro", "write"), 0);
	cr_expect_eq(th_vol_metric(&e->a, "flashtier_invalid_requests_total", "v", NULL), 0);
	cr_assert(ft_agent_alive(&e->a));
	client_close(&cl);
	free(buf);
	env_finish(e);
}

Test(bad_requests, read_only_file_structured)
{
	read_only(B_FILE, true);
}

Test(bad_requests, read_only_file_simple)
{
	read_only(B_FILE, false);
}

Test(bad_requests, read_only_nbd_structured)
{
	read_only(B_NBD, true);
}

/*
 * FAST_ZERO when the volume does not advertise it: an nbd volume whose
 * remote cannot zero (nbdkit's nozero filter) gets WRITE_ZEROES emulated
 * by the agent, and no NBD_FLAG_SEND_FAST_ZERO. The spec: the server
 * "SHOULD fail with NBD_EINVAL if the NBD_CMD_FLAG_FAST_ZERO flag was set".
 */
Test(bad_requests, fast_zero_not_advertised)
{
	static const char *const args[] = { "--filter=nozero", "memory", "64M", NULL };
	struct env *e = &g_env;
	struct client cl;

	env_start(e, B_NBD, args);
	write_probe(e);
	client_open(&cl, e, "v", true);
	cr_assert_eq(nbd_can_zero(cl.h), 1, "zero is emulated, so still advertised");
	cr_assert_eq(nbd_can_fast_zero(cl.h), 0);
	expect_reject(&cl, nbd_zero(cl.h, 4096, PROBE_OFF, LIBNBD_CMD_FLAG_FAST_ZERO), EINVAL,
		      "FAST_ZERO not advertised");
	expect_reject(&cl,
		      nbd_zero(cl.h, 4096, PROBE_OFF,
			       LIBNBD_CMD_FLAG_FAST_ZERO | LIBNBD_CMD_FLAG_NO_HOLE),
		      EINVAL, "FAST_ZERO|NO_HOLE not advertised");
	cr_expect_eq(th_vol_metric(&e->a, "flashtier_invalid_requests_total", "v", NULL), 2);
	client_close(&cl);
	env_finish(e);
}

/*
 * Rejected writes whose payload is too big to sit in the socket buffers:
 * past the end (ENOSPC), oversized (EINVAL), read-only (EPERM). The
 * payload must be consumed and the next command must work. libnbd sends a
 * payload in pieces and, while blocked, reads replies; it only expects a
 * reply to a command whose payload it has finished sending (see the
 * raw_reply_waits_for_payload test for the wire-level check).
 */
static void rejected_write_payload(enum backing kind, bool structured)
{
	struct env *e = &g_env;
	struct client v, ro;
	uint8_t *buf = calloc(1, MAX_PAYLOAD + 4096);

	cr_assert_not_null(buf);
	env_start(e, kind, NULL);
	write_probe(e);
	client_open(&v, e, "v", structured);
	client_open(&ro, e, "ro", structured);

	expect_reject(&v, nbd_pwrite(v.h, buf, 1u << 20, VOL_SIZE - 4096, 0), ENOSPC,
		      "1 MiB write past the end");
	expect_reject(&v, nbd_pwrite(v.h, buf, MAX_PAYLOAD + 512, 0, 0), EINVAL,
		      "32 MiB + 512 write");
	expect_reject(&v, nbd_pwrite(v.h, buf, MAX_PAYLOAD + 4096, 4096, LIBNBD_CMD_FLAG_FUA),
		      EINVAL, "32 MiB + 4 KiB FUA write");
	expect_reject(&v, nbd_pwrite(v.h, buf, 1u << 20, 100, 0), EINVAL, "1 MiB misaligned write");
	expect_reject(&ro, nbd_pwrite(ro.h, buf, 1u << 20, PROBE_OFF, 0), EPERM,
		      "1 MiB write to a read-only volume");
	expect_reject(&ro, nbd_pwrite(ro.h, buf, MAX_PAYLOAD, 0, 0), EPERM,
		      "32 MiB write to a read-only volume");

	cr_expect_eq(th_vol_metric(&e->a, "flashtier_invalid_requests_total", "v", NULL), 4);
	cr_expect_eq(th_vol_metric(&e->a, "flashtier_invalid_requests_total", "ro", NULL), 2);
	cr_assert(ft_agent_alive(&e->a));
	client_close(&v);
	client_close(&ro);
	free(buf);
	env_finish(e);
}

Test(bad_requests, rejected_write_payload_file_structured)
{
	rejected_write_payload(B_FILE, true);
}

Test(bad_requests, rejected_write_payload_nbd_simple)
{
	rejected_write_payload(B_NBD, false);
}

/* ---- raw requests libnbd cannot send ---- */

/*
 * Read the complete reply to @cookie (simple, or structured chunks up to
 * DONE); return its NBD error value. Read data, if any, goes to @data.
 */
static uint32_t raw_reply(int fd, uint64_t cookie, void *data, uint32_t data_len)
{
	uint32_t magic, err = 0;

	for (;;) {
		th_raw_read(fd, &magic, 4);
		if (be32toh(magic) == NBD_SIMPLE_REPLY_MAGIC) {
			struct nbd_simple_reply s;

			memcpy(&s, &magic, 4);
			th_raw_read(fd, (char *)&s + 4, sizeof(s) - 4);
			cr_assert_eq(be64toh(s.cookie), cookie, "reply for the wrong cookie");
			err = be32toh(s.error);
			if (err == 0 && data)
				th_raw_read(fd, data, data_len);
			return err;
		}
		cr_assert_eq(be32toh(magic), NBD_STRUCTURED_REPLY_MAGIC, "bad reply magic %08x",
			     be32toh(magic));
		{
			struct nbd_structured_reply s;
			uint32_t len;
			uint16_t type;

			memcpy(&s, &magic, 4);
			th_raw_read(fd, (char *)&s + 4, sizeof(s) - 4);
			cr_assert_eq(be64toh(s.cookie), cookie, "reply for the wrong cookie");
			len = be32toh(s.length);
			type = be16toh(s.type);
			if (type == NBD_REPLY_TYPE_ERROR) {
				struct nbd_error_chunk ec;
				char msg[1024];

				cr_assert_geq(len, sizeof(ec));
				th_raw_read(fd, &ec, sizeof(ec));
				cr_assert_eq(be16toh(ec.msg_len), len - sizeof(ec));
				cr_assert_leq(len - sizeof(ec), sizeof(msg));
				th_raw_read(fd, msg, len - sizeof(ec));
				err = be32toh(ec.error);
				cr_assert_neq(err, 0, "error chunk with error 0");
			} else if (type == NBD_REPLY_TYPE_OFFSET_DATA) {
				struct nbd_offset_data od;

				cr_assert_eq(len, sizeof(od) + data_len);
				th_raw_read(fd, &od, sizeof(od));
				th_raw_read(fd, data, data_len);
			} else {
				cr_assert_eq(type, NBD_REPLY_TYPE_NONE, "unexpected chunk type %u",
					     type);
				cr_assert_eq(len, 0);
			}
			if (be16toh(s.flags) & NBD_REPLY_FLAG_DONE)
				return err;
		}
	}
}

/* A good raw read of the probe area. */
static void raw_expect_usable(int fd, uint64_t cookie, const char *after)
{
	static uint8_t got[PROBE_LEN], want[PROBE_LEN];

	th_fill(want, sizeof(want), PROBE_OFF, PROBE_SEED);
	th_raw_request(fd, NBD_CMD_READ, 0, cookie, PROBE_OFF, PROBE_LEN);
	cr_assert_eq(raw_reply(fd, cookie, got, PROBE_LEN), 0, "after %s: good read failed", after);
	cr_assert_arr_eq(got, want, PROBE_LEN, "after %s: wrong data", after);
}

static void raw_bad(bool structured)
{
	struct env *e = &g_env;
	uint64_t cookie = 1;
	int fd;
	struct {
		uint16_t type, flags;
		uint64_t off;
		uint32_t len;
		uint32_t want;
		const char *what;
	} cases[] = {
		{ NBD_CMD_FLUSH, 0, 512, 0, NBD_EINVAL, "FLUSH with an offset" },
		{ NBD_CMD_FLUSH, 0, 0, 512, NBD_EINVAL, "FLUSH with a length" },
		{ NBD_CMD_FLUSH, 0, 4096, 4096, NBD_EINVAL, "FLUSH with offset and length" },
		{ NBD_CMD_BLOCK_STATUS, 0, 0, 4096, NBD_EINVAL, "BLOCK_STATUS without a context" },
		{ 8, 0, 0, 4096, NBD_EINVAL, "unknown command 8" },
		{ 9, 0, 0, 4096, NBD_EINVAL, "unknown command 9" },
		{ 0xffff, 0, 0, 0, NBD_EINVAL, "unknown command 0xffff" },
		{ NBD_CMD_READ, 0xffff, 0, 512, NBD_EINVAL, "READ with every flag" },
		{ NBD_CMD_TRIM, 1u << 15, 0, 512, NBD_EINVAL, "TRIM with flag bit 15" },
		{ NBD_CMD_READ, 0, 0, 0xffffffffu, NBD_EINVAL, "READ of 4 GiB - 1" },
		{ NBD_CMD_READ, 0, UINT64_MAX - 511, 512, NBD_EINVAL,
		  "READ of the last 2^64 sector" },
		{ NBD_CMD_CACHE, 0, 0, 0xfffffe00u, NBD_EINVAL, "CACHE of 4 GiB past the end" },
	};
	size_t n = sizeof(cases) / sizeof(cases[0]);

	env_start(e, B_FILE, NULL);
	write_probe(e);
	fd = th_raw_connect(e->a.sock, "v", structured);
	raw_expect_usable(fd, cookie++, "connecting");
	for (size_t i = 0; i < n; i++) {
		uint32_t err;

		th_raw_request(fd, cases[i].type, cases[i].flags, cookie, cases[i].off,
			       cases[i].len);
		err = raw_reply(fd, cookie++, NULL, 0);
		cr_expect_eq(err, cases[i].want, "%s: error %u, want %u", cases[i].what, err,
			     cases[i].want);
		raw_expect_usable(fd, cookie++, cases[i].what);
	}
	/* A good flush (offset and length 0) still works. */
	th_raw_request(fd, NBD_CMD_FLUSH, 0, cookie, 0, 0);
	cr_expect_eq(raw_reply(fd, cookie++, NULL, 0), 0);

	/*
	 * Pipelined: a bad request between two good ones, all sent before any
	 * reply is read. Replies may come in any order, so match by cookie.
	 */
	{
		uint8_t wbuf[4096];
		uint32_t errs[3] = { 99, 99, 99 };

		th_fill(wbuf, sizeof(wbuf), 8192, 5);
		th_raw_request(fd, NBD_CMD_WRITE, 0, 1000, 8192, sizeof(wbuf));
		th_raw_write(fd, wbuf, sizeof(wbuf));
		th_raw_request(fd, NBD_CMD_WRITE, 0, 1001, VOL_SIZE, sizeof(wbuf)); /* ENOSPC */
		th_raw_write(fd, wbuf, sizeof(wbuf));
		th_raw_request(fd, NBD_CMD_FLUSH, 0, 1002, 0, 0);
		for (int i = 0; i < 3; i++) {
			uint32_t magic;
			struct nbd_simple_reply s;
			struct nbd_structured_reply st;
			uint64_t ck;
			uint32_t err = 0;

			/* Write and flush replies: simple, or one structured chunk. */
			th_raw_read(fd, &magic, 4);
			if (be32toh(magic) == NBD_SIMPLE_REPLY_MAGIC) {
				th_raw_read(fd, (char *)&s + 4, sizeof(s) - 4);
				ck = be64toh(s.cookie);
				err = be32toh(s.error);
			} else {
				struct nbd_error_chunk ec;
				char msg[1024];

				cr_assert_eq(be32toh(magic), NBD_STRUCTURED_REPLY_MAGIC);
				th_raw_read(fd, (char *)&st + 4, sizeof(st) - 4);
				ck = be64toh(st.cookie);
				cr_assert_eq(be16toh(st.type), NBD_REPLY_TYPE_ERROR);
				th_raw_read(fd, &ec, sizeof(ec));
				th_raw_read(fd, msg, be32toh(st.length) - sizeof(ec));
				err = be32toh(ec.error);
			}
			cr_assert(ck >= 1000 && ck <= 1002, "unexpected cookie %llu",
				  (unsigned long long)ck);
			errs[ck - 1000] = err;
		}
		cr_expect_eq(errs[0], 0);
		cr_expect_eq(errs[1], NBD_ENOSPC);
		cr_expect_eq(errs[2], 0);
	}
	raw_expect_usable(fd, cookie++, "pipelined requests");

	cr_expect_eq(th_vol_metric(&e->a, "flashtier_invalid_requests_total", "v", NULL),
		     (double)n + 1);
	th_raw_request(fd, NBD_CMD_DISC, 0, cookie, 0, 0);
	close(fd);
	cr_assert(ft_agent_alive(&e->a));
	env_finish(e);
}

Test(bad_requests, raw_structured)
{
	raw_bad(true);
}

Test(bad_requests, raw_simple)
{
	raw_bad(false);
}

/*
 * Wire level: a rejected WRITE's payload is consumed (the next request
 * parses), whatever its size, and the error is exact.
 */
Test(bad_requests, raw_rejected_payload_consumed)
{
	struct env *e = &g_env;
	uint8_t *buf = calloc(1, MAX_PAYLOAD + 512);
	uint64_t cookie = 1;
	int fd;

	cr_assert_not_null(buf);
	env_start(e, B_FILE, NULL);
	write_probe(e);
	fd = th_raw_connect(e->a.sock, "v", true);

	/* Replies are read only after each whole payload is sent: no ordering assumption. */
	th_raw_request(fd, NBD_CMD_WRITE, 0, cookie, VOL_SIZE - 4096, 1u << 20);
	th_raw_write(fd, buf, 1u << 20);
	cr_expect_eq(raw_reply(fd, cookie++, NULL, 0), NBD_ENOSPC);
	raw_expect_usable(fd, cookie++, "1 MiB write past the end");

	th_raw_request(fd, NBD_CMD_WRITE, 0, cookie, 0, MAX_PAYLOAD + 512);
	th_raw_write(fd, buf, MAX_PAYLOAD + 512);
	cr_expect_eq(raw_reply(fd, cookie++, NULL, 0), NBD_EINVAL);
	raw_expect_usable(fd, cookie++, "32 MiB + 512 write");

	th_raw_request(fd, NBD_CMD_WRITE, 1u << 7, cookie, 0, 300000); /* bad flag and misaligned */
	th_raw_write(fd, buf, 300000);
	cr_expect_eq(raw_reply(fd, cookie++, NULL, 0), NBD_EINVAL);
	raw_expect_usable(fd, cookie++, "300000-byte write with an unknown flag");

	cr_expect_eq(th_vol_metric(&e->a, "flashtier_invalid_requests_total", "v", NULL), 3);
	th_raw_request(fd, NBD_CMD_DISC, 0, cookie, 0, 0);
	close(fd);
	free(buf);
	env_finish(e);
}

/*
 * The reply to a rejected WRITE must not be sent before its payload has
 * been received: libnbd (and any client that registers a command as in
 * flight only once it is fully sent) treats such a reply as a reply to
 * an unknown cookie and kills the connection. nbdkit and qemu-nbd both
 * read the payload first. We send the header and 4 KiB of a 1 MiB
 * payload, and no reply may arrive while the rest is outstanding.
 */
Test(bad_requests, raw_reply_waits_for_payload)
{
	struct env *e = &g_env;
	uint8_t *buf = calloc(1, 1u << 20);
	struct pollfd p;
	int fd;

	cr_assert_not_null(buf);
	env_start(e, B_FILE, NULL);
	write_probe(e);
	fd = th_raw_connect(e->a.sock, "v", false);

	th_raw_request(fd, NBD_CMD_WRITE, 0, 1, VOL_SIZE, 1u << 20);
	th_raw_write(fd, buf, 4096);
	/* A negative check needs a wait: 500 ms with nothing on the socket. */
	p = (struct pollfd){ .fd = fd, .events = POLLIN };
	cr_expect_eq(poll(&p, 1, 500), 0,
		     "flashtierd replied to a WRITE whose payload it had not yet received");
	th_raw_write(fd, buf + 4096, (1u << 20) - 4096);
	cr_expect_eq(raw_reply(fd, 1, NULL, 0), NBD_ENOSPC);
	raw_expect_usable(fd, 2, "the early reply");
	th_raw_request(fd, NBD_CMD_DISC, 0, 3, 0, 0);
	close(fd);
	free(buf);
	env_finish(e);
}
