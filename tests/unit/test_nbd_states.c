/* SPDX-License-Identifier: MIT */
/*
 * Every NBD protocol state, byte by byte, over raw unix sockets against the
 * real flashtierd (doc/proto.md of the NBD project).
 *
 * Each test starts its own agent with three volumes:
 *   disk0  1 MiB, read-write, with a description   (reactor 0: no hand-off)
 *   disk1  2 MiB, read-write                        (reactor 1: hand-off)
 *   ro     1 MiB, "readonly": true                  (reactor 0)
 * Backing files hold a known pattern so reads can be checked exactly.
 * Every read from the agent has a deadline (poll), so a hang fails instead
 * of blocking; every test ends with ft_agent_finish(), so a crash or an
 * unclean exit fails the test.
 */
#include <poll.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include "../integration/harness.h"
#include "flashtier/nbd_proto.h"

#define TMO_MS 5000

#define DISK0_SIZE (1ull << 20)
#define DISK1_SIZE (2ull << 20)
#define RO_SIZE	   (1ull << 20)

#define RW_FLAGS                                                                                   \
	(NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM |       \
	 NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO | NBD_FLAG_SEND_CACHE |              \
	 NBD_FLAG_CAN_MULTI_CONN)
#define RO_FLAGS                                                                                   \
	(NBD_FLAG_HAS_FLAGS | NBD_FLAG_READ_ONLY | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |       \
	 NBD_FLAG_SEND_CACHE | NBD_FLAG_CAN_MULTI_CONN)

#define CFLAGS_ALL (NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)

static struct ft_agent agent;
static char disk0_path[320], disk1_path[320], ro_path[320];

/* ---- byte order ---- */

static void put16(uint8_t *p, uint16_t v)
{
	p[0] = (uint8_t)(v >> 8);
	p[1] = (uint8_t)v;
}

static void put32(uint8_t *p, uint32_t v)
{
	put16(p, (uint16_t)(v >> 16));
	put16(p + 2, (uint16_t)v);
}

static void put64(uint8_t *p, uint64_t v)
{
	put32(p, (uint32_t)(v >> 32));
	put32(p + 4, (uint32_t)v);
}

static uint16_t get16(const uint8_t *p)
{
	return (uint16_t)(p[0] << 8 | p[1]);
}

static uint32_t get32(const uint8_t *p)
{
	return (uint32_t)get16(p) << 16 | get16(p + 2);
}

static uint64_t get64(const uint8_t *p)
{
	return (uint64_t)get32(p) << 32 | get32(p + 4);
}

/* ---- the agent ---- */

/* The byte every backing file holds at @off before the test touches it. */
static uint8_t pat(uint64_t off, unsigned seed)
{
	return (uint8_t)(off * 131 + (off >> 9) * 7 + seed);
}

static void fill_pattern(const char *path, uint64_t size, unsigned seed)
{
	uint8_t *buf = malloc(size);
	int fd = open(path, O_WRONLY);

	cr_assert_not_null(buf);
	cr_assert_geq(fd, 0, "%s: %s", path, strerror(errno));
	for (uint64_t i = 0; i < size; i++)
		buf[i] = pat(i, seed);
	cr_assert_eq(pwrite(fd, buf, size, 0), (ssize_t)size);
	close(fd);
	free(buf);
}

static void setup(void)
{
	char dir[256], vols[2048];

	th_mkdtemp(dir, sizeof(dir));
	th_make_file(dir, "disk0.img", DISK0_SIZE, disk0_path, sizeof(disk0_path));
	th_make_file(dir, "disk1.img", DISK1_SIZE, disk1_path, sizeof(disk1_path));
	th_make_file(dir, "ro.img", RO_SIZE, ro_path, sizeof(ro_path));
	fill_pattern(disk0_path, DISK0_SIZE, 1);
	fill_pattern(disk1_path, DISK1_SIZE, 2);
	fill_pattern(ro_path, RO_SIZE, 3);
	snprintf(vols, sizeof(vols),
		 "{ \"disk0\": { \"backing\": \"%s\", \"description\": \"test disk zero\" },"
		 "  \"disk1\": { \"backing\": \"%s\" },"
		 "  \"ro\": { \"backing\": \"%s\", \"readonly\": true } }",
		 disk0_path, disk1_path, ro_path);
	ft_agent_start_in(&agent, dir, vols, "\"reactors\": 2,");
}

/* Only after a failed assertion: the test body did not get to finish(). */
static void teardown(void)
{
	th_agent_kill(&agent);
	if (agent.dir[0])
		th_rm_rf(agent.dir);
}

/* Clean SIGTERM, exit status 0, temp dir removed. */
static void finish(void)
{
	cr_assert(ft_agent_alive(&agent), "flashtierd died during the test");
	ft_agent_finish(&agent);
}

TestSuite(nbd, .init = setup, .fini = teardown, .timeout = 120);

/* ---- raw socket I/O ---- */

static int64_t now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void send_all(int fd, const void *buf, size_t len)
{
	const uint8_t *p = buf;
	int64_t deadline = now_ms() + TMO_MS;

	while (len) {
		struct pollfd pfd = { .fd = fd, .events = POLLOUT };
		int64_t left = deadline - now_ms();
		ssize_t n;

		cr_assert_gt(left, 0, "send: timed out with %zu bytes left", len);
		if (poll(&pfd, 1, (int)left) <= 0)
			continue;
		n = send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		cr_assert_gt(n, 0, "send: %s", strerror(errno));
		p += n;
		len -= (size_t)n;
	}
}

/*
 * Receive up to @len bytes before the deadline. Returns the count (short on
 * EOF or reset), or -1 on timeout with nothing more arriving.
 */
static ssize_t recv_upto(int fd, void *buf, size_t len, int tmo_ms)
{
	uint8_t *p = buf;
	size_t got = 0;
	int64_t deadline = now_ms() + tmo_ms;

	while (got < len) {
		struct pollfd pfd = { .fd = fd, .events = POLLIN };
		int64_t left = deadline - now_ms();
		ssize_t n;

		if (left <= 0)
			return -1;
		if (poll(&pfd, 1, (int)left) <= 0)
			continue;
		n = recv(fd, p + got, len - got, MSG_DONTWAIT);
		if (n < 0 && (errno == EINTR || errno == EAGAIN))
			continue;
		if (n < 0 && errno == ECONNRESET)
			break;
		cr_assert_geq(n, 0, "recv: %s", strerror(errno));
		if (n == 0)
			break;
		got += (size_t)n;
	}
	return (ssize_t)got;
}

static void recv_exact(int fd, void *buf, size_t len)
{
	ssize_t n = recv_upto(fd, buf, len, TMO_MS);

	cr_assert_neq(n, -1, "recv: timed out waiting for %zu bytes", len);
	cr_assert_eq((size_t)n, len, "recv: connection closed after %zd of %zu bytes", n, len);
}

/* The server must close the connection, sending nothing more. */
static void expect_closed(int fd)
{
	uint8_t b;
	ssize_t n = recv_upto(fd, &b, 1, TMO_MS);

	cr_assert_neq(n, -1, "the server did not close the connection");
	cr_assert_eq(n, 0, "expected the connection to close, got byte 0x%02x", b);
	close(fd);
}

/* ---- handshake ---- */

static const uint8_t greeting[18] = { 'N', 'B', 'D', 'M', 'A', 'G', 'I', 'C',  'I',
				      'H', 'A', 'V', 'E', 'O', 'P', 'T', 0x00, 0x03 };

/* Like th_unix_connect(), but a socket path that does not fit fails loudly. */
static int connect_agent(void)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	size_t len = strlen(agent.sock);
	int fd;

	cr_assert_lt(len, sizeof(sa.sun_path), "socket path too long: %s", agent.sock);
	memcpy(sa.sun_path, agent.sock, len + 1);
	fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	cr_assert_geq(fd, 0, "socket: %s", strerror(errno));
	cr_assert_eq(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0, "connect %s: %s",
		     agent.sock, strerror(errno));
	return fd;
}

/* Connect, check the greeting byte for byte, send the client flags. */
static int hs_open(uint32_t cflags)
{
	uint8_t g[18], f[4];
	int fd = connect_agent();

	recv_exact(fd, g, sizeof(g));
	cr_assert_arr_eq(g, greeting, sizeof(g), "greeting is not NBDMAGIC IHAVEOPT 0x0003");
	put32(f, cflags);
	send_all(fd, f, sizeof(f));
	return fd;
}

static void send_opt_magic(int fd, uint64_t magic, uint32_t opt, const void *data, uint32_t len)
{
	uint8_t *buf = malloc(16 + (size_t)len);

	cr_assert_not_null(buf);
	put64(buf, magic);
	put32(buf + 8, opt);
	put32(buf + 12, len);
	if (len)
		memcpy(buf + 16, data, len);
	send_all(fd, buf, 16 + (size_t)len);
	free(buf);
}

static void send_opt(int fd, uint32_t opt, const void *data, uint32_t len)
{
	send_opt_magic(fd, NBD_IHAVEOPT, opt, data, len);
}

struct orep {
	uint32_t opt, type, len;
	uint8_t data[8192];
};

static void recv_orep(int fd, struct orep *r)
{
	uint8_t h[20];

	recv_exact(fd, h, sizeof(h));
	cr_assert_eq(get64(h), NBD_REP_MAGIC, "option reply magic 0x%016llx",
		     (unsigned long long)get64(h));
	r->opt = get32(h + 8);
	r->type = get32(h + 12);
	r->len = get32(h + 16);
	cr_assert_leq(r->len, sizeof(r->data) - 1, "option reply of %u bytes", r->len);
	if (r->len)
		recv_exact(fd, r->data, r->len);
	r->data[r->len] = '\0';
}

/* The next reply must answer @opt with @type. Error replies carry a message. */
static void expect_orep(int fd, uint32_t opt, uint32_t type, struct orep *r)
{
	recv_orep(fd, r);
	cr_assert_eq(r->opt, opt, "reply is for option %u, want %u", r->opt, opt);
	cr_assert_eq(r->type, type, "option %u: reply type 0x%x, want 0x%x (data '%s')", opt,
		     r->type, type, (char *)r->data);
	if (type & (1u << 31)) {
		/* Optional per the spec, but flashtierd promises a reason; it is a string. */
		cr_assert_gt(r->len, 0, "option %u: error reply without a message", opt);
		cr_assert_eq(strlen((char *)r->data), r->len, "NUL in error message");
	}
}

static void expect_ack(int fd, uint32_t opt)
{
	struct orep r;

	expect_orep(fd, opt, NBD_REP_ACK, &r);
	cr_assert_eq(r.len, 0, "NBD_REP_ACK carries %u bytes", r.len);
}

/* INFO/GO data: u32 name length, name, u16 count, count x u16. */
static uint32_t info_data(uint8_t *buf, const char *name, const uint16_t *reqs, unsigned n)
{
	uint32_t nl = (uint32_t)strlen(name), off;

	put32(buf, nl);
	memcpy(buf + 4, name, nl);
	put16(buf + 4 + nl, (uint16_t)n);
	off = 6 + nl;
	for (unsigned i = 0; i < n; i++, off += 2)
		put16(buf + off, reqs[i]);
	return off;
}

struct xinfo {
	int n_export, n_bs, n_name, n_desc;
	uint64_t size;
	uint16_t eflags;
	uint32_t bs_min, bs_pref, bs_max;
	char name[4097], desc[4097];
};

/* Read NBD_REP_INFO replies up to the final NBD_REP_ACK, checking each length. */
static void read_infos(int fd, uint32_t opt, struct xinfo *xi)
{
	struct orep r;

	memset(xi, 0, sizeof(*xi));
	for (;;) {
		recv_orep(fd, &r);
		cr_assert_eq(r.opt, opt, "reply is for option %u, want %u", r.opt, opt);
		if (r.type == NBD_REP_ACK) {
			cr_assert_eq(r.len, 0);
			break;
		}
		cr_assert_eq(r.type, NBD_REP_INFO, "option %u: reply 0x%x '%s'", opt, r.type,
			     (char *)r.data);
		cr_assert_geq(r.len, 2);
		switch (get16(r.data)) {
		case NBD_INFO_EXPORT:
			cr_assert_eq(r.len, 12, "NBD_INFO_EXPORT length %u", r.len);
			xi->n_export++;
			xi->size = get64(r.data + 2);
			xi->eflags = get16(r.data + 10);
			break;
		case NBD_INFO_BLOCK_SIZE:
			cr_assert_eq(r.len, 14, "NBD_INFO_BLOCK_SIZE length %u", r.len);
			xi->n_bs++;
			xi->bs_min = get32(r.data + 2);
			xi->bs_pref = get32(r.data + 6);
			xi->bs_max = get32(r.data + 10);
			break;
		case NBD_INFO_NAME:
			xi->n_name++;
			memcpy(xi->name, r.data + 2, r.len - 2);
			xi->name[r.len - 2] = '\0';
			break;
		case NBD_INFO_DESCRIPTION:
			xi->n_desc++;
			memcpy(xi->desc, r.data + 2, r.len - 2);
			xi->desc[r.len - 2] = '\0';
			break;
		default:
			break; /* clients ignore unknown information */
		}
	}
	cr_assert_eq(xi->n_export, 1, "NBD_INFO_EXPORT sent %d times", xi->n_export);
	cr_assert_leq(xi->n_bs, 1);
	cr_assert_leq(xi->n_name, 1);
	cr_assert_leq(xi->n_desc, 1);
}

static void info_go(int fd, uint32_t opt, const char *name, const uint16_t *reqs, unsigned n,
		    struct xinfo *xi)
{
	uint8_t buf[4096 + 64];

	send_opt(fd, opt, buf, info_data(buf, name, reqs, n));
	read_infos(fd, opt, xi);
}

static void negotiate_structured(int fd)
{
	send_opt(fd, NBD_OPT_STRUCTURED_REPLY, NULL, 0);
	expect_ack(fd, NBD_OPT_STRUCTURED_REPLY);
}

/* A connection in transmission on @name via NBD_OPT_GO. */
static int connect_go(const char *name, bool structured, struct xinfo *xi)
{
	static const uint16_t bs = NBD_INFO_BLOCK_SIZE;
	struct xinfo tmp;
	int fd = hs_open(CFLAGS_ALL);

	if (structured)
		negotiate_structured(fd);
	info_go(fd, NBD_OPT_GO, name, &bs, 1, xi ? xi : &tmp);
	return fd;
}

/* ---- transmission ---- */

static void send_req(int fd, uint16_t flags, uint16_t type, uint64_t cookie, uint64_t off,
		     uint32_t len, const void *data)
{
	size_t dl = data ? len : 0;
	uint8_t *buf = malloc(28 + dl);

	cr_assert_not_null(buf);
	put32(buf, NBD_REQUEST_MAGIC);
	put16(buf + 4, flags);
	put16(buf + 6, type);
	put64(buf + 8, cookie);
	put64(buf + 16, off);
	put32(buf + 24, len);
	if (dl)
		memcpy(buf + 28, data, dl);
	send_all(fd, buf, 28 + dl);
	free(buf);
}

/* A simple reply for @cookie with @err; on success of a read, its @len data bytes into @data. */
static void expect_simple(int fd, uint64_t cookie, uint32_t err, void *data, uint32_t len)
{
	uint8_t h[16];

	recv_exact(fd, h, sizeof(h));
	cr_assert_eq(get32(h), NBD_SIMPLE_REPLY_MAGIC, "reply magic 0x%08x, want simple", get32(h));
	cr_assert_eq(get64(h + 8), cookie, "cookie 0x%llx, want 0x%llx",
		     (unsigned long long)get64(h + 8), (unsigned long long)cookie);
	cr_assert_eq(get32(h + 4), err, "cookie 0x%llx: error %u, want %u",
		     (unsigned long long)cookie, get32(h + 4), err);
	if (data && err == 0)
		recv_exact(fd, data, len);
}

struct chunk {
	uint16_t flags, type;
	uint64_t cookie;
	uint32_t len;
	uint8_t *payload; /* malloc'd, NUL-terminated */
};

static void recv_chunk_rest(int fd, const uint8_t *magic4, struct chunk *c)
{
	uint8_t h[20];

	memcpy(h, magic4, 4);
	recv_exact(fd, h + 4, 16);
	cr_assert_eq(get32(h), NBD_STRUCTURED_REPLY_MAGIC, "reply magic 0x%08x, want structured",
		     get32(h));
	c->flags = get16(h + 4);
	c->type = get16(h + 6);
	c->cookie = get64(h + 8);
	c->len = get32(h + 16);
	cr_assert_leq(c->len, (32u << 20) + 8, "chunk of %u bytes", c->len);
	c->payload = malloc((size_t)c->len + 1);
	cr_assert_not_null(c->payload);
	if (c->len)
		recv_exact(fd, c->payload, c->len);
	c->payload[c->len] = '\0';
}

static void recv_chunk(int fd, struct chunk *c)
{
	uint8_t m[4];

	recv_exact(fd, m, 4);
	recv_chunk_rest(fd, m, c);
}

/* Structured READ success: one OFFSET_DATA chunk with DONE, covering the request. */
static void expect_read_chunk(int fd, uint64_t cookie, uint64_t off, void *data, uint32_t len)
{
	struct chunk c;

	recv_chunk(fd, &c);
	cr_assert_eq(c.cookie, cookie, "cookie 0x%llx, want 0x%llx", (unsigned long long)c.cookie,
		     (unsigned long long)cookie);
	cr_assert_eq(c.type, NBD_REPLY_TYPE_OFFSET_DATA, "chunk type 0x%x (payload '%s')", c.type,
		     c.type & 0x8000 ? (char *)c.payload + 6 : "");
	cr_assert_eq(c.flags, NBD_REPLY_FLAG_DONE, "chunk flags 0x%x", c.flags);
	cr_assert_eq(c.len, 8 + len, "OFFSET_DATA length %u, want %u", c.len, 8 + len);
	cr_assert_eq(get64(c.payload), off, "OFFSET_DATA offset");
	memcpy(data, c.payload + 8, len);
	free(c.payload);
}

/*
 * Success of a command without payload: a simple reply, or (structured)
 * a single NBD_REPLY_TYPE_NONE chunk with DONE. Both are allowed.
 */
static void expect_ok(int fd, bool structured, uint64_t cookie)
{
	uint8_t m[4];

	recv_exact(fd, m, 4);
	if (get32(m) == NBD_SIMPLE_REPLY_MAGIC || !structured) {
		uint8_t h[12];

		cr_assert_eq(get32(m), NBD_SIMPLE_REPLY_MAGIC, "reply magic 0x%08x", get32(m));
		recv_exact(fd, h, 12);
		cr_assert_eq(get64(h + 4), cookie, "cookie 0x%llx, want 0x%llx",
			     (unsigned long long)get64(h + 4), (unsigned long long)cookie);
		cr_assert_eq(get32(h), 0, "cookie 0x%llx failed with %u",
			     (unsigned long long)cookie, get32(h));
	} else {
		struct chunk c;

		recv_chunk_rest(fd, m, &c);
		cr_assert_eq(c.cookie, cookie);
		cr_assert_eq(c.type, NBD_REPLY_TYPE_NONE, "chunk type 0x%x (payload '%s')", c.type,
			     c.type & 0x8000 ? (char *)c.payload + 6 : "");
		cr_assert_eq(c.flags, NBD_REPLY_FLAG_DONE);
		cr_assert_eq(c.len, 0);
		free(c.payload);
	}
}

/* A structured NBD_REPLY_TYPE_ERROR chunk with DONE, @err and a message. */
static void check_error_chunk(const struct chunk *c, uint64_t cookie, uint32_t err)
{
	uint16_t ml;

	cr_assert_eq(c->cookie, cookie, "cookie 0x%llx, want 0x%llx", (unsigned long long)c->cookie,
		     (unsigned long long)cookie);
	cr_assert_eq(c->type, NBD_REPLY_TYPE_ERROR, "chunk type 0x%x, want ERROR", c->type);
	cr_assert_eq(c->flags, NBD_REPLY_FLAG_DONE, "chunk flags 0x%x", c->flags);
	cr_assert_geq(c->len, 6, "ERROR chunk length %u < 6", c->len);
	cr_assert_eq(get32(c->payload), err, "cookie 0x%llx: error %u, want %u",
		     (unsigned long long)cookie, get32(c->payload), err);
	ml = get16(c->payload + 4);
	cr_assert_eq(c->len, 6u + ml, "ERROR chunk length %u with message length %u", c->len, ml);
	cr_assert_gt(ml, 0, "error chunk without a message");
	for (unsigned i = 0; i < ml; i++)
		cr_assert(c->payload[6 + i] >= 0x20 && c->payload[6 + i] < 0x7f,
			  "message byte %u is 0x%02x", i, c->payload[6 + i]);
}

/*
 * Failure with @err: a simple reply with no payload, or with structured
 * replies an ERROR chunk (a READ must never get a simple reply then).
 */
static void expect_err(int fd, bool structured, bool is_read, uint64_t cookie, uint32_t err)
{
	uint8_t m[4];

	recv_exact(fd, m, 4);
	if (!structured || (!is_read && get32(m) == NBD_SIMPLE_REPLY_MAGIC)) {
		uint8_t h[12];

		cr_assert_eq(get32(m), NBD_SIMPLE_REPLY_MAGIC, "reply magic 0x%08x, want simple",
			     get32(m));
		recv_exact(fd, h, 12);
		cr_assert_eq(get64(h + 4), cookie, "cookie 0x%llx, want 0x%llx",
			     (unsigned long long)get64(h + 4), (unsigned long long)cookie);
		cr_assert_eq(get32(h), err, "cookie 0x%llx: error %u, want %u",
			     (unsigned long long)cookie, get32(h), err);
	} else {
		struct chunk c;

		recv_chunk_rest(fd, m, &c);
		check_error_chunk(&c, cookie, err);
		free(c.payload);
	}
}

static void expect_pattern(const uint8_t *buf, uint64_t off, uint32_t len, unsigned seed)
{
	for (uint32_t i = 0; i < len; i++)
		cr_assert_eq(buf[i], pat(off + i, seed),
			     "byte at offset %llu is 0x%02x, want 0x%02x",
			     (unsigned long long)(off + i), buf[i], pat(off + i, seed));
}

/* Read [@off, @off+@len) and compare with the original pattern. */
static void read_check(int fd, bool structured, uint64_t cookie, uint64_t off, uint32_t len,
		       unsigned seed)
{
	uint8_t *buf = malloc(len);

	cr_assert_not_null(buf);
	send_req(fd, 0, NBD_CMD_READ, cookie, off, len, NULL);
	if (structured)
		expect_read_chunk(fd, cookie, off, buf, len);
	else
		expect_simple(fd, cookie, 0, buf, len);
	expect_pattern(buf, off, len, seed);
	free(buf);
}

static void disconnect(int fd)
{
	send_req(fd, 0, NBD_CMD_DISC, 0xd15c, 0, 0, NULL);
	expect_closed(fd);
}

/* After a connection was closed on us: the agent still serves a fresh one. */
static void check_serves(void)
{
	int fd;

	cr_assert(ft_agent_alive(&agent), "flashtierd died");
	fd = connect_go("disk0", false, NULL);
	read_check(fd, false, 0xa11e, 0, 512, 1);
	disconnect(fd);
	fd = connect_go("disk1", true, NULL);
	read_check(fd, true, 0xa11f, 4096, 512, 2);
	disconnect(fd);
}

/* ====================================================================== */
/* Handshake                                                              */
/* ====================================================================== */

Test(nbd, greeting_is_exact)
{
	int fd = hs_open(CFLAGS_ALL);

	/* Nothing else precedes the first option reply: the greeting is exactly 18 bytes. */
	send_opt(fd, NBD_OPT_ABORT, NULL, 0);
	expect_ack(fd, NBD_OPT_ABORT);
	expect_closed(fd);
	finish();
}

Test(nbd, unknown_client_flags_close)
{
	static const uint32_t bad[] = { 1u << 2, 1u << 31, 0xffffffffu, CFLAGS_ALL | 0x100 };

	for (unsigned i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		int fd = hs_open(bad[i]);

		expect_closed(fd);
	}
	check_serves();
	finish();
}

Test(nbd, bad_option_magic_closes)
{
	int fd = hs_open(CFLAGS_ALL);

	send_opt_magic(fd, NBD_IHAVEOPT ^ 1, NBD_OPT_LIST, NULL, 0);
	expect_closed(fd);

	/* Also after a successful option. */
	fd = hs_open(CFLAGS_ALL);
	negotiate_structured(fd);
	send_opt_magic(fd, NBD_REP_MAGIC, NBD_OPT_GO, NULL, 0);
	expect_closed(fd);
	check_serves();
	finish();
}

Test(nbd, opt_list)
{
	static const char *const names[] = { "disk0", "disk1", "ro" };
	/* After the name, the spec's free-form tail: the description, if any. */
	static const char *const descs[] = { "test disk zero", "", "" };
	int fd = hs_open(CFLAGS_ALL);
	struct orep r;

	send_opt(fd, NBD_OPT_LIST, NULL, 0);
	for (unsigned i = 0; i < 3; i++) {
		uint32_t nl = (uint32_t)strlen(names[i]);
		uint32_t dl = (uint32_t)strlen(descs[i]);

		expect_orep(fd, NBD_OPT_LIST, NBD_REP_SERVER, &r);
		cr_assert_eq(r.len, 4 + nl + dl, "REP_SERVER length %u for '%s'", r.len, names[i]);
		cr_assert_eq(get32(r.data), nl);
		cr_assert_arr_eq(r.data + 4, names[i], nl, "export %u is '%.*s', want '%s'", i,
				 (int)nl, (char *)r.data + 4, names[i]);
		cr_assert_arr_eq(r.data + 4 + nl, descs[i], dl, "export %u description", i);
	}
	expect_ack(fd, NBD_OPT_LIST);

	/* LIST again: the handshake continues after it. */
	send_opt(fd, NBD_OPT_LIST, NULL, 0);
	for (unsigned i = 0; i < 3; i++)
		expect_orep(fd, NBD_OPT_LIST, NBD_REP_SERVER, &r);
	expect_ack(fd, NBD_OPT_LIST);
	send_opt(fd, NBD_OPT_ABORT, NULL, 0);
	expect_ack(fd, NBD_OPT_ABORT);
	expect_closed(fd);
	finish();
}

Test(nbd, opt_list_with_data_invalid)
{
	int fd = hs_open(CFLAGS_ALL);
	struct orep r;
	struct xinfo xi;

	send_opt(fd, NBD_OPT_LIST, "abcd", 4);
	expect_orep(fd, NBD_OPT_LIST, NBD_REP_ERR_INVALID, &r);
	/* The session goes on. */
	send_opt(fd, NBD_OPT_LIST, NULL, 0);
	for (unsigned i = 0; i < 3; i++)
		expect_orep(fd, NBD_OPT_LIST, NBD_REP_SERVER, &r);
	expect_ack(fd, NBD_OPT_LIST);
	info_go(fd, NBD_OPT_GO, "disk0", NULL, 0, &xi);
	read_check(fd, false, 1, 0, 4096, 1);
	disconnect(fd);
	finish();
}

Test(nbd, opt_info_exact_replies)
{
	uint8_t buf[64];
	struct orep r;
	int fd = hs_open(CFLAGS_ALL);
	/* clang-format off */
	static const uint8_t export_info[12] = { 0, 0, /* NBD_INFO_EXPORT */
						 0, 0, 0, 0, 0, 0x10, 0, 0, /* 1 MiB */
						 (RW_FLAGS >> 8) & 0xff, RW_FLAGS & 0xff };
	static const uint8_t bs_info[14] = { 0, 3, /* NBD_INFO_BLOCK_SIZE */
					     0, 0, 0x02, 0,	/* 512 */
					     0, 0, 0x10, 0,	/* 4096 */
					     0x02, 0, 0, 0 };	/* 32 MiB */
	/* clang-format on */
	bool seen_export = false, seen_bs = false;

	/* No information requests: INFO_EXPORT is mandatory; BLOCK_SIZE is non-default here. */
	send_opt(fd, NBD_OPT_INFO, buf, info_data(buf, "disk0", NULL, 0));
	for (;;) {
		recv_orep(fd, &r);
		cr_assert_eq(r.opt, NBD_OPT_INFO);
		if (r.type == NBD_REP_ACK)
			break;
		cr_assert_eq(r.type, NBD_REP_INFO, "reply 0x%x '%s'", r.type, (char *)r.data);
		if (get16(r.data) == NBD_INFO_EXPORT) {
			cr_assert_eq(r.len, 12);
			cr_assert_arr_eq(r.data, export_info, 12,
					 "INFO_EXPORT: size %llu flags 0x%x",
					 (unsigned long long)get64(r.data + 2), get16(r.data + 10));
			seen_export = true;
		} else if (get16(r.data) == NBD_INFO_BLOCK_SIZE) {
			cr_assert_eq(r.len, 14);
			cr_assert_arr_eq(r.data, bs_info, 14, "INFO_BLOCK_SIZE: %u/%u/%u",
					 get32(r.data + 2), get32(r.data + 6), get32(r.data + 10));
			seen_bs = true;
		} else {
			cr_assert_fail("unrequested information type %u", get16(r.data));
		}
	}
	cr_assert_eq(r.len, 0);
	cr_assert(seen_export, "no NBD_INFO_EXPORT before NBD_REP_ACK");
	cr_assert(seen_bs, "no NBD_INFO_BLOCK_SIZE (the agent needs 512-byte alignment)");

	/* INFO did not enter transmission: options are still answered. */
	send_opt(fd, NBD_OPT_LIST, NULL, 0);
	for (unsigned i = 0; i < 3; i++)
		expect_orep(fd, NBD_OPT_LIST, NBD_REP_SERVER, &r);
	expect_ack(fd, NBD_OPT_LIST);
	send_opt(fd, NBD_OPT_ABORT, NULL, 0);
	expect_ack(fd, NBD_OPT_ABORT);
	expect_closed(fd);
	finish();
}

Test(nbd, opt_info_name_and_description)
{
	static const uint16_t reqs[] = { NBD_INFO_NAME, 0x7777 /* unknown: ignored */,
					 NBD_INFO_DESCRIPTION, NBD_INFO_BLOCK_SIZE };
	struct xinfo xi;
	int fd = hs_open(CFLAGS_ALL);

	info_go(fd, NBD_OPT_INFO, "disk0", reqs, 4, &xi);
	cr_assert_eq(xi.size, DISK0_SIZE);
	cr_assert_eq(xi.eflags, RW_FLAGS, "eflags 0x%x", xi.eflags);
	cr_assert_eq(xi.n_bs, 1);
	cr_assert_eq(xi.bs_min, 512);
	cr_assert_eq(xi.bs_pref, 4096);
	cr_assert_eq(xi.bs_max, 33554432);
	cr_assert_eq(xi.n_name, 1, "NBD_INFO_NAME requested but not sent");
	cr_assert_str_eq(xi.name, "disk0");
	cr_assert_eq(xi.n_desc, 1, "NBD_INFO_DESCRIPTION requested but not sent");
	cr_assert_str_eq(xi.desc, "test disk zero");

	/* disk1 has no description: none is sent; the name still is. */
	info_go(fd, NBD_OPT_INFO, "disk1", reqs, 4, &xi);
	cr_assert_eq(xi.size, DISK1_SIZE);
	cr_assert_eq(xi.n_name, 1);
	cr_assert_str_eq(xi.name, "disk1");
	cr_assert_eq(xi.n_desc, 0);

	/* Not requested: neither name nor description. */
	info_go(fd, NBD_OPT_INFO, "disk0", NULL, 0, &xi);
	cr_assert_eq(xi.n_name, 0, "NBD_INFO_NAME sent unrequested");
	cr_assert_eq(xi.n_desc, 0, "NBD_INFO_DESCRIPTION sent unrequested");

	/* GO answers the same way and then enters transmission. */
	info_go(fd, NBD_OPT_GO, "disk0", reqs, 4, &xi);
	cr_assert_str_eq(xi.name, "disk0");
	cr_assert_str_eq(xi.desc, "test disk zero");
	cr_assert_eq(xi.eflags, RW_FLAGS);
	read_check(fd, false, 7, 512, 1024, 1);
	disconnect(fd);
	finish();
}

Test(nbd, opt_info_go_unknown_export)
{
	struct orep r;
	uint8_t buf[64];
	struct xinfo xi;
	int fd = hs_open(CFLAGS_ALL);

	send_opt(fd, NBD_OPT_INFO, buf, info_data(buf, "nope", NULL, 0));
	expect_orep(fd, NBD_OPT_INFO, NBD_REP_ERR_UNKNOWN, &r); /* and no INFO before it */
	send_opt(fd, NBD_OPT_GO, buf, info_data(buf, "nope", NULL, 0));
	expect_orep(fd, NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, &r);
	/* A prefix of a real name is not that name. */
	send_opt(fd, NBD_OPT_GO, buf, info_data(buf, "disk", NULL, 0));
	expect_orep(fd, NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, &r);
	/* An embedded NUL does not truncate the name. */
	memcpy(buf,
	       "\0\0\0\x06"
	       "disk0\0"
	       "\0\0",
	       12);
	send_opt(fd, NBD_OPT_GO, buf, 12);
	expect_orep(fd, NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, &r);
	/* Three volumes, none named "": there is no default export. */
	send_opt(fd, NBD_OPT_GO, buf, info_data(buf, "", NULL, 0));
	expect_orep(fd, NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, &r);

	/* Still negotiating: GO on a real export works. */
	info_go(fd, NBD_OPT_GO, "disk1", NULL, 0, &xi);
	cr_assert_eq(xi.size, DISK1_SIZE);
	read_check(fd, false, 9, 0, 4096, 2);
	disconnect(fd);
	finish();
}

Test(nbd, opt_info_go_malformed)
{
	/* clang-format off */
	struct {
		uint32_t len;
		uint8_t data[32];
	} bad[] = {
		{ 0, { 0 } },						/* empty */
		{ 4, { 0, 0, 0, 0 } },					/* no count */
		{ 5, { 0, 0, 0, 0, 0 } },				/* half a count */
		{ 10, { 0, 0, 0, 100, 'a', 'b', 'c', 'd', 0, 0 } },	/* name overruns */
		{ 10, { 0, 0, 0, 5, 'd', 'i', 's', 'k', '0', 0 } },	/* name eats the count */
		{ 10, { 0xff, 0xff, 0xff, 0xff, 'd', 'i', 's', 'k', 0, 0 } }, /* huge name */
		{ 11, { 0, 0, 0, 5, 'd', 'i', 's', 'k', '0', 0, 1 } },	/* 1 request, none sent */
		{ 12, { 0, 0, 0, 5, 'd', 'i', 's', 'k', '0', 0, 2, 0 } }, /* 2 requests, 0.5 sent */
		{ 13, { 0, 0, 0, 5, 'd', 'i', 's', 'k', '0', 0, 0, 0, 1 } }, /* trailing bytes */
		{ 15, { 0, 0, 0, 5, 'd', 'i', 's', 'k', '0', 0, 1, 0, 0, 0, 1 } }, /* trailing */
	};
	/* clang-format on */
	static const uint32_t opts[] = { NBD_OPT_INFO, NBD_OPT_GO };
	struct orep r;
	struct xinfo xi;
	int fd = hs_open(CFLAGS_ALL);

	for (unsigned o = 0; o < 2; o++) {
		for (unsigned i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
			send_opt(fd, opts[o], bad[i].data, bad[i].len);
			recv_orep(fd, &r);
			cr_assert_eq(r.opt, opts[o]);
			cr_assert_eq(r.type, NBD_REP_ERR_INVALID,
				     "option %u, malformed case %u: reply 0x%x '%s'", opts[o], i,
				     r.type, (char *)r.data);
		}
	}
	info_go(fd, NBD_OPT_GO, "disk0", NULL, 0, &xi);
	read_check(fd, false, 3, 0, 512, 1);
	disconnect(fd);
	finish();
}

Test(nbd, go_enters_transmission_without_padding)
{
	struct xinfo xi;
	uint8_t buf[512];
	int fd;

	/* Without NO_ZEROES too: GO never sends zero padding after its ACK. */
	fd = hs_open(NBD_FLAG_C_FIXED_NEWSTYLE);
	info_go(fd, NBD_OPT_GO, "disk0", NULL, 0, &xi);
	cr_assert_eq(xi.size, DISK0_SIZE);
	cr_assert_eq(xi.eflags, RW_FLAGS);
	/* The very next bytes are the reply to this request. */
	send_req(fd, 0, NBD_CMD_READ, 0x0102030405060708ull, 512, 512, NULL);
	expect_simple(fd, 0x0102030405060708ull, 0, buf, 512);
	expect_pattern(buf, 512, 512, 1);
	disconnect(fd);
	check_serves();
	finish();
}

Test(nbd, go_handoff_to_other_reactor)
{
	struct xinfo xi;
	uint8_t w[4096];
	int fd;

	/* disk1 lives on reactor 1: the connection moves there after GO. */
	for (int round = 0; round < 20; round++) {
		fd = connect_go("disk1", round & 1, &xi);
		cr_assert_eq(xi.size, DISK1_SIZE);
		cr_assert_eq(xi.eflags, RW_FLAGS | ((round & 1) ? NBD_FLAG_SEND_DF : 0));
		read_check(fd, round & 1, 100 + (uint64_t)round, (uint64_t)round * 4096, 4096, 2);
		disconnect(fd);
	}
	fd = connect_go("disk1", false, NULL);
	memset(w, 0x5a, sizeof(w));
	send_req(fd, 0, NBD_CMD_WRITE, 1, DISK1_SIZE - 4096, 4096, w);
	expect_simple(fd, 1, 0, NULL, 0);
	send_req(fd, 0, NBD_CMD_READ, 2, DISK1_SIZE - 4096, 4096, NULL);
	memset(w, 0, sizeof(w));
	expect_simple(fd, 2, 0, w, 4096);
	for (int i = 0; i < 4096; i++)
		cr_assert_eq(w[i], 0x5a);
	disconnect(fd);
	finish();
}

static void export_name(int fd, const char *name)
{
	send_opt(fd, NBD_OPT_EXPORT_NAME, name, (uint32_t)strlen(name));
}

/*
 * The first request in the same segment as the option that ends the
 * handshake: the agent must keep those bytes across the switch (and the
 * hand-off to disk1's reactor).
 */
Test(nbd, request_pipelined_after_final_option)
{
	static const char *const vols[] = { "disk0", "disk1" };
	uint8_t buf[128], r[10], data[4096];
	struct xinfo xi;

	for (unsigned v = 0; v < 2; v++) {
		uint32_t nl = (uint32_t)strlen(vols[v]), n;
		int fd = hs_open(CFLAGS_ALL);

		/* EXPORT_NAME: the client is in transmission as soon as it is sent. */
		put64(buf, NBD_IHAVEOPT);
		put32(buf + 8, NBD_OPT_EXPORT_NAME);
		put32(buf + 12, nl);
		memcpy(buf + 16, vols[v], nl);
		n = 16 + nl;
		put32(buf + n, NBD_REQUEST_MAGIC);
		put16(buf + n + 4, 0);
		put16(buf + n + 6, NBD_CMD_READ);
		put64(buf + n + 8, 0xaa);
		put64(buf + n + 16, 4096);
		put32(buf + n + 24, 4096);
		send_all(fd, buf, n + 28);
		recv_exact(fd, r, sizeof(r));
		expect_simple(fd, 0xaa, 0, data, 4096);
		expect_pattern(data, 4096, 4096, v + 1);
		disconnect(fd);

		/* GO: the request rides behind it. */
		fd = hs_open(CFLAGS_ALL);
		n = info_data(buf + 16, vols[v], NULL, 0);
		put64(buf, NBD_IHAVEOPT);
		put32(buf + 8, NBD_OPT_GO);
		put32(buf + 12, n);
		n += 16;
		put32(buf + n, NBD_REQUEST_MAGIC);
		put16(buf + n + 4, 0);
		put16(buf + n + 6, NBD_CMD_READ);
		put64(buf + n + 8, 0xbb);
		put64(buf + n + 16, 8192);
		put32(buf + n + 24, 4096);
		send_all(fd, buf, n + 28);
		read_infos(fd, NBD_OPT_GO, &xi);
		expect_simple(fd, 0xbb, 0, data, 4096);
		expect_pattern(data, 8192, 4096, v + 1);
		disconnect(fd);
	}
	finish();
}

Test(nbd, export_name_with_zeroes)
{
	uint8_t r[134], zero[124] = { 0 };
	int fd = hs_open(NBD_FLAG_C_FIXED_NEWSTYLE);

	export_name(fd, "disk0");
	recv_exact(fd, r, sizeof(r));
	cr_assert_eq(get64(r), DISK0_SIZE, "size %llu", (unsigned long long)get64(r));
	cr_assert_eq(get16(r + 8), RW_FLAGS, "eflags 0x%x", get16(r + 8));
	cr_assert_arr_eq(r + 10, zero, 124, "the 124 reserved bytes are not zero");
	/* Exactly 124: the next bytes are a reply. */
	read_check(fd, false, 0xe1, 1024, 512, 1);
	disconnect(fd);
	finish();
}

Test(nbd, export_name_no_zeroes)
{
	uint8_t r[10];
	int fd = hs_open(CFLAGS_ALL);

	export_name(fd, "disk0");
	recv_exact(fd, r, sizeof(r));
	cr_assert_eq(get64(r), DISK0_SIZE);
	cr_assert_eq(get16(r + 8), RW_FLAGS, "eflags 0x%x", get16(r + 8));
	/* No padding at all: the next 16 bytes are the simple reply header. */
	read_check(fd, false, 0xe2, 0, 4096, 1);
	disconnect(fd);

	/* Also on the volume behind a hand-off, and after STRUCTURED_REPLY. */
	fd = hs_open(CFLAGS_ALL);
	negotiate_structured(fd);
	export_name(fd, "disk1");
	recv_exact(fd, r, sizeof(r));
	cr_assert_eq(get64(r), DISK1_SIZE);
	cr_assert_eq(get16(r + 8), RW_FLAGS | NBD_FLAG_SEND_DF, "eflags 0x%x", get16(r + 8));
	read_check(fd, true, 0xe3, 8192, 4096, 2);
	disconnect(fd);
	finish();
}

Test(nbd, export_name_unknown_closes)
{
	int fd = hs_open(CFLAGS_ALL);

	export_name(fd, "nope");
	expect_closed(fd);
	fd = hs_open(NBD_FLAG_C_FIXED_NEWSTYLE);
	export_name(fd, ""); /* no default export with three volumes */
	expect_closed(fd);
	check_serves();
	finish();
}

Test(nbd, abort_acks_then_closes)
{
	int fd = hs_open(CFLAGS_ALL);

	send_opt(fd, NBD_OPT_ABORT, NULL, 0);
	expect_ack(fd, NBD_OPT_ABORT);
	expect_closed(fd);

	/* Data with ABORT SHOULD be ignored, not rejected. */
	fd = hs_open(CFLAGS_ALL);
	negotiate_structured(fd);
	send_opt(fd, NBD_OPT_ABORT, "xyz", 3);
	expect_ack(fd, NBD_OPT_ABORT);
	expect_closed(fd);
	check_serves();
	finish();
}

Test(nbd, structured_reply_option)
{
	struct orep r;
	struct xinfo xi;
	int fd = hs_open(CFLAGS_ALL);

	/* With data: invalid, and structured replies stay off. */
	send_opt(fd, NBD_OPT_STRUCTURED_REPLY, "x", 1);
	expect_orep(fd, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_INVALID, &r);
	info_go(fd, NBD_OPT_GO, "disk0", NULL, 0, &xi);
	cr_assert_eq(xi.eflags, RW_FLAGS, "SEND_DF without structured replies: 0x%x", xi.eflags);
	read_check(fd, false, 1, 0, 512, 1);
	disconnect(fd);

	/* Without data: a bare ACK, then DF is advertised and reads are structured. */
	fd = hs_open(CFLAGS_ALL);
	send_opt(fd, NBD_OPT_STRUCTURED_REPLY, NULL, 0);
	expect_ack(fd, NBD_OPT_STRUCTURED_REPLY);
	info_go(fd, NBD_OPT_GO, "disk0", NULL, 0, &xi);
	cr_assert_eq(xi.eflags, RW_FLAGS | NBD_FLAG_SEND_DF, "eflags 0x%x", xi.eflags);
	read_check(fd, true, 2, 0, 512, 1);
	disconnect(fd);
	finish();
}

Test(nbd, starttls_unsupported)
{
	struct orep r;
	struct xinfo xi;
	int fd = hs_open(CFLAGS_ALL);

	send_opt(fd, NBD_OPT_STARTTLS, NULL, 0);
	expect_orep(fd, NBD_OPT_STARTTLS, NBD_REP_ERR_UNSUP, &r);
	/* With data it is invalid (the spec's own example). */
	send_opt(fd, NBD_OPT_STARTTLS, "tls", 3);
	expect_orep(fd, NBD_OPT_STARTTLS, NBD_REP_ERR_INVALID, &r);
	/* Still in plain negotiation. */
	info_go(fd, NBD_OPT_GO, "disk0", NULL, 0, &xi);
	read_check(fd, false, 1, 0, 512, 1);
	disconnect(fd);
	finish();
}

/* LIST/SET_META_CONTEXT data: export name and queries. */
static uint32_t meta_data(uint8_t *buf, const char *name, const char *const *q, unsigned n)
{
	uint32_t nl = (uint32_t)strlen(name), off;

	put32(buf, nl);
	memcpy(buf + 4, name, nl);
	put32(buf + 4 + nl, n);
	off = 8 + nl;
	for (unsigned i = 0; i < n; i++) {
		uint32_t ql = (uint32_t)strlen(q[i]);

		put32(buf + off, ql);
		memcpy(buf + off + 4, q[i], ql);
		off += 4 + ql;
	}
	return off;
}

Test(nbd, meta_context)
{
	static const char *const q[] = { "base:allocation", "x-unknown:thing" };
	uint8_t buf[256];
	struct orep r;
	struct xinfo xi;
	uint32_t len;
	int fd = hs_open(CFLAGS_ALL);

	len = meta_data(buf, "disk0", q, 1);
	/* Before structured replies: SET is invalid. */
	send_opt(fd, NBD_OPT_SET_META_CONTEXT, buf, len);
	expect_orep(fd, NBD_OPT_SET_META_CONTEXT, NBD_REP_ERR_INVALID, &r);

	negotiate_structured(fd);
	/* After: no namespace is served, so the answer is a bare ACK. */
	send_opt(fd, NBD_OPT_SET_META_CONTEXT, buf, len);
	expect_ack(fd, NBD_OPT_SET_META_CONTEXT);
	send_opt(fd, NBD_OPT_SET_META_CONTEXT, buf, meta_data(buf, "disk0", q, 2));
	expect_ack(fd, NBD_OPT_SET_META_CONTEXT);
	send_opt(fd, NBD_OPT_LIST_META_CONTEXT, buf, meta_data(buf, "disk0", NULL, 0));
	expect_ack(fd, NBD_OPT_LIST_META_CONTEXT);
	send_opt(fd, NBD_OPT_SET_META_CONTEXT, buf, meta_data(buf, "disk0", NULL, 0));
	expect_ack(fd, NBD_OPT_SET_META_CONTEXT);

	/* Syntax errors: a query overrunning the data, trailing bytes, short data. */
	len = meta_data(buf, "disk0", q, 1);
	put32(buf + 13, 200);
	send_opt(fd, NBD_OPT_SET_META_CONTEXT, buf, len);
	expect_orep(fd, NBD_OPT_SET_META_CONTEXT, NBD_REP_ERR_INVALID, &r);
	len = meta_data(buf, "disk0", q, 1);
	put32(buf + 9, 2); /* claims two queries, carries one */
	send_opt(fd, NBD_OPT_LIST_META_CONTEXT, buf, len);
	expect_orep(fd, NBD_OPT_LIST_META_CONTEXT, NBD_REP_ERR_INVALID, &r);
	len = meta_data(buf, "disk0", NULL, 0);
	send_opt(fd, NBD_OPT_SET_META_CONTEXT, buf, len + 3);
	expect_orep(fd, NBD_OPT_SET_META_CONTEXT, NBD_REP_ERR_INVALID, &r);
	send_opt(fd, NBD_OPT_SET_META_CONTEXT, buf, 7);
	expect_orep(fd, NBD_OPT_SET_META_CONTEXT, NBD_REP_ERR_INVALID, &r);
	put32(buf, 0xfffffff0);
	send_opt(fd, NBD_OPT_LIST_META_CONTEXT, buf, 8);
	expect_orep(fd, NBD_OPT_LIST_META_CONTEXT, NBD_REP_ERR_INVALID, &r);
	/* Unknown export. */
	send_opt(fd, NBD_OPT_SET_META_CONTEXT, buf, meta_data(buf, "nope", q, 1));
	expect_orep(fd, NBD_OPT_SET_META_CONTEXT, NBD_REP_ERR_UNKNOWN, &r);

	info_go(fd, NBD_OPT_GO, "disk0", NULL, 0, &xi);
	read_check(fd, true, 1, 0, 512, 1);
	disconnect(fd);
	finish();
}

Test(nbd, unknown_option_unsupported)
{
	static const uint32_t opts[] = { 99,	     NBD_OPT_PEEK_EXPORT, NBD_OPT_EXTENDED_HEADERS,
					 0x7fffffff, 0xffffffff,	  0 };
	struct orep r;
	struct xinfo xi;
	int fd = hs_open(CFLAGS_ALL);

	for (unsigned i = 0; i < sizeof(opts) / sizeof(opts[0]); i++) {
		send_opt(fd, opts[i], "hello", 5);
		expect_orep(fd, opts[i], NBD_REP_ERR_UNSUP, &r);
		send_opt(fd, opts[i], NULL, 0);
		expect_orep(fd, opts[i], NBD_REP_ERR_UNSUP, &r);
	}
	info_go(fd, NBD_OPT_GO, "disk0", NULL, 0, &xi);
	cr_assert_eq(xi.size, DISK0_SIZE);
	read_check(fd, false, 1, 4096, 4096, 1);
	disconnect(fd);
	finish();
}

Test(nbd, option_too_big_is_skipped)
{
	static const uint32_t opts[] = { 99, NBD_OPT_INFO, NBD_OPT_LIST, NBD_OPT_GO };
	static const uint32_t lens[] = { 100000, 65537, 300000, 1u << 20 };
	uint8_t *big = malloc(1u << 20);
	struct orep r;
	struct xinfo xi;
	int fd = hs_open(CFLAGS_ALL);

	cr_assert_not_null(big);
	/* Data that would parse as an option header if it were not skipped. */
	for (uint32_t i = 0; i < (1u << 20); i += 16) {
		put64(big + i, NBD_IHAVEOPT);
		put32(big + i + 8, NBD_OPT_ABORT);
		put32(big + i + 12, 0);
	}
	for (unsigned i = 0; i < 4; i++) {
		send_opt(fd, opts[i], big, lens[i]);
		expect_orep(fd, opts[i], NBD_REP_ERR_TOO_BIG, &r);
	}
	/* 64 KiB exactly is still parsed. */
	send_opt(fd, 99, big, 65536);
	expect_orep(fd, 99, NBD_REP_ERR_UNSUP, &r);
	send_opt(fd, NBD_OPT_LIST, big, 65536);
	expect_orep(fd, NBD_OPT_LIST, NBD_REP_ERR_INVALID, &r);
	free(big);
	info_go(fd, NBD_OPT_GO, "disk0", NULL, 0, &xi);
	read_check(fd, false, 1, 0, 4096, 1);
	disconnect(fd);
	finish();
}

/* ====================================================================== */
/* Transmission flags                                                     */
/* ====================================================================== */

Test(nbd, transmission_flags)
{
	struct xinfo xi;
	uint8_t r[10];
	int fd;

	fd = connect_go("disk0", false, &xi);
	cr_assert_eq(xi.eflags, RW_FLAGS, "rw simple: 0x%x, want 0x%x", xi.eflags, RW_FLAGS);
	disconnect(fd);
	fd = connect_go("disk0", true, &xi);
	cr_assert_eq(xi.eflags, RW_FLAGS | NBD_FLAG_SEND_DF, "rw structured: 0x%x", xi.eflags);
	disconnect(fd);
	fd = connect_go("ro", false, &xi);
	cr_assert_eq(xi.size, RO_SIZE);
	cr_assert_eq(xi.eflags, RO_FLAGS, "ro simple: 0x%x, want 0x%x", xi.eflags, RO_FLAGS);
	disconnect(fd);
	fd = connect_go("ro", true, &xi);
	cr_assert_eq(xi.eflags, RO_FLAGS | NBD_FLAG_SEND_DF, "ro structured: 0x%x", xi.eflags);
	disconnect(fd);

	/* NBD_OPT_EXPORT_NAME reports the same flags. */
	fd = hs_open(CFLAGS_ALL);
	export_name(fd, "ro");
	recv_exact(fd, r, sizeof(r));
	cr_assert_eq(get64(r), RO_SIZE);
	cr_assert_eq(get16(r + 8), RO_FLAGS, "ro via EXPORT_NAME: 0x%x", get16(r + 8));
	disconnect(fd);
	finish();
}

/* ====================================================================== */
/* Transmission                                                           */
/* ====================================================================== */

Test(nbd, read_simple_reply_exact)
{
	static const uint8_t hdr[16] = { 0x67, 0x44, 0x66, 0x98, 0,    0,    0,	   0,
					 0xde, 0xad, 0xbe, 0xef, 0x01, 0x23, 0x45, 0x67 };
	uint8_t buf[16 + 4096];
	int fd = connect_go("disk0", false, NULL);

	send_req(fd, 0, NBD_CMD_READ, 0xdeadbeef01234567ull, 8192, 4096, NULL);
	recv_exact(fd, buf, sizeof(buf));
	cr_assert_arr_eq(buf, hdr, 16, "simple reply header");
	expect_pattern(buf + 16, 8192, 4096, 1);
	/* The last block of the export, and one large read. */
	read_check(fd, false, 2, DISK0_SIZE - 512, 512, 1);
	read_check(fd, false, 3, 0, (uint32_t)DISK0_SIZE, 1);
	/* FUA is valid on every command. */
	send_req(fd, NBD_CMD_FLAG_FUA, NBD_CMD_READ, 4, 0, 512, NULL);
	expect_simple(fd, 4, 0, buf, 512);
	expect_pattern(buf, 0, 512, 1);
	disconnect(fd);
	finish();
}

Test(nbd, read_structured_reply_exact)
{
	/* clang-format off */
	static const uint8_t hdr[28] = {
		0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x00, 0x01, /* magic, DONE, OFFSET_DATA */
		0xfe, 0xdc, 0xba, 0x98, 0x76, 0x54, 0x32, 0x10, /* cookie */
		0x00, 0x00, 0x10, 0x08,				/* length 8 + 4096 */
		0, 0, 0, 0, 0, 0, 0x20, 0x00,			/* offset 8192 */
	};
	/* clang-format on */
	uint8_t buf[28 + 4096];
	int fd = connect_go("disk0", true, NULL);

	send_req(fd, 0, NBD_CMD_READ, 0xfedcba9876543210ull, 8192, 4096, NULL);
	recv_exact(fd, buf, sizeof(buf));
	cr_assert_arr_eq(buf, hdr, 28, "OFFSET_DATA chunk header");
	expect_pattern(buf + 28, 8192, 4096, 1);
	/* DF is allowed once structured: still one chunk. */
	send_req(fd, NBD_CMD_FLAG_DF, NBD_CMD_READ, 2, 0, 65536, NULL);
	{
		uint8_t *b = malloc(65536);

		expect_read_chunk(fd, 2, 0, b, 65536);
		expect_pattern(b, 0, 65536, 1);
		free(b);
	}
	read_check(fd, true, 3, DISK0_SIZE - 512, 512, 1);
	disconnect(fd);
	finish();
}

static void write_read_back(bool structured)
{
	uint8_t w[8192], r[8192], f[8192];
	int fd = connect_go("disk0", structured, NULL), bfd;

	for (unsigned i = 0; i < sizeof(w); i++)
		w[i] = (uint8_t)(i * 13 + 5);
	send_req(fd, 0, NBD_CMD_WRITE, 0x11, 4096, 8192, w);
	expect_ok(fd, structured, 0x11);
	send_req(fd, 0, NBD_CMD_READ, 0x12, 4096, 8192, NULL);
	if (structured)
		expect_read_chunk(fd, 0x12, 4096, r, 8192);
	else
		expect_simple(fd, 0x12, 0, r, 8192);
	cr_assert_arr_eq(r, w, 8192, "read back differs from what was written");
	/* Neighbours untouched. */
	read_check(fd, structured, 0x13, 0, 4096, 1);
	read_check(fd, structured, 0x14, 12288, 4096, 1);

	/* FUA write, then FLUSH: on disk for anyone to see. */
	memset(w, 0xc3, 512);
	send_req(fd, NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, 0x15, 0, 512, w);
	expect_ok(fd, structured, 0x15);
	send_req(fd, 0, NBD_CMD_FLUSH, 0x16, 0, 0, NULL);
	expect_ok(fd, structured, 0x16);
	bfd = open(disk0_path, O_RDONLY);
	cr_assert_geq(bfd, 0);
	cr_assert_eq(pread(bfd, f, 512, 0), 512);
	cr_assert_arr_eq(f, w, 512, "FUA write not in the backing file");
	for (unsigned i = 0; i < sizeof(w); i++)
		w[i] = (uint8_t)(i * 13 + 5);
	cr_assert_eq(pread(bfd, f, 8192, 4096), 8192);
	cr_assert_arr_eq(f, w, 8192, "write not in the backing file after FLUSH");
	close(bfd);
	disconnect(fd);
}

Test(nbd, write_read_back_simple)
{
	write_read_back(false);
	finish();
}

Test(nbd, write_read_back_structured)
{
	write_read_back(true);
	finish();
}

Test(nbd, large_write_read_back)
{
	uint32_t len = 1u << 20;
	uint8_t *w = malloc(len), *r = malloc(len);
	int fd = connect_go("disk1", false, NULL);

	cr_assert_not_null(w);
	cr_assert_not_null(r);
	for (uint32_t i = 0; i < len; i++)
		w[i] = (uint8_t)(i * 7 + (i >> 12));
	/* Header and payload in separate sends, so the payload may arrive on its own. */
	send_req(fd, 0, NBD_CMD_WRITE, 0x21, 1u << 20, len, NULL);
	send_all(fd, w, len);
	expect_simple(fd, 0x21, 0, NULL, 0);
	send_req(fd, 0, NBD_CMD_READ, 0x22, 1u << 20, len, NULL);
	expect_simple(fd, 0x22, 0, r, len);
	cr_assert_arr_eq(r, w, len, "1 MiB read back differs");
	read_check(fd, false, 0x23, 0, 1u << 20, 2);
	free(w);
	free(r);
	disconnect(fd);
	finish();
}

Test(nbd, flush_trim_zeroes_cache)
{
	uint8_t r[8192], z[8192] = { 0 };
	bool structured;

	for (int s = 0; s < 2; s++) {
		int fd;

		structured = s;
		fd = connect_go("disk0", structured, NULL);
		send_req(fd, 0, NBD_CMD_FLUSH, 1, 0, 0, NULL);
		expect_ok(fd, structured, 1);
		send_req(fd, NBD_CMD_FLAG_FUA, NBD_CMD_FLUSH, 2, 0, 0, NULL);
		expect_ok(fd, structured, 2);
		send_req(fd, 0, NBD_CMD_CACHE, 3, 0, 65536, NULL);
		expect_ok(fd, structured, 3);
		send_req(fd, 0, NBD_CMD_WRITE_ZEROES, 4, 16384 * (s + 1), 8192, NULL);
		expect_ok(fd, structured, 4);
		send_req(fd, 0, NBD_CMD_READ, 5, 16384 * (s + 1), 8192, NULL);
		if (structured)
			expect_read_chunk(fd, 5, 16384 * (s + 1), r, 8192);
		else
			expect_simple(fd, 5, 0, r, 8192);
		cr_assert_arr_eq(r, z, 8192, "WRITE_ZEROES did not read back as zeroes");
		send_req(fd, NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FUA, NBD_CMD_WRITE_ZEROES, 6,
			 65536, 4096, NULL);
		expect_ok(fd, structured, 6);
		send_req(fd, NBD_CMD_FLAG_FUA, NBD_CMD_TRIM, 7, 131072, 65536, NULL);
		expect_ok(fd, structured, 7);
		/* Neighbours of the zeroed range are untouched. */
		read_check(fd, structured, 8, 16384 * (s + 1) - 512, 512, 1);
		read_check(fd, structured, 9, 16384 * (s + 1) + 8192, 512, 1);
		disconnect(fd);
	}
	finish();
}

Test(nbd, fast_zero)
{
	int fd = connect_go("disk0", false, NULL);
	uint8_t r[4096], z[4096] = { 0 };
	uint8_t h[16];

	/* FAST_ZERO is advertised: either success (then zeroes) or a fast ENOTSUP. */
	send_req(fd, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_WRITE_ZEROES, 1, 4096, 4096, NULL);
	recv_exact(fd, h, 16);
	cr_assert_eq(get32(h), NBD_SIMPLE_REPLY_MAGIC);
	cr_assert_eq(get64(h + 8), 1);
	cr_assert(get32(h + 4) == 0 || get32(h + 4) == NBD_ENOTSUP, "FAST_ZERO error %u",
		  get32(h + 4));
	send_req(fd, 0, NBD_CMD_READ, 2, 4096, 4096, NULL);
	expect_simple(fd, 2, 0, r, 4096);
	if (get32(h + 4) == 0)
		cr_assert_arr_eq(r, z, 4096);
	else
		expect_pattern(r, 4096, 4096, 1); /* ENOTSUP must change nothing */
	disconnect(fd);
	finish();
}

static void error_replies(bool structured)
{
	int fd = connect_go("disk0", structured, NULL);

	/* Reads past the end, unaligned, empty: EINVAL, and the connection goes on. */
	send_req(fd, 0, NBD_CMD_READ, 0x31, DISK0_SIZE, 512, NULL);
	expect_err(fd, structured, true, 0x31, NBD_EINVAL);
	send_req(fd, 0, NBD_CMD_READ, 0x32, DISK0_SIZE - 512, 1024, NULL);
	expect_err(fd, structured, true, 0x32, NBD_EINVAL);
	send_req(fd, 0, NBD_CMD_READ, 0x33, UINT64_MAX - 511, 512, NULL);
	expect_err(fd, structured, true, 0x33, NBD_EINVAL);
	send_req(fd, 0, NBD_CMD_READ, 0x34, 1, 512, NULL);
	expect_err(fd, structured, true, 0x34, NBD_EINVAL);
	send_req(fd, 0, NBD_CMD_READ, 0x35, 0, 100, NULL);
	expect_err(fd, structured, true, 0x35, NBD_EINVAL);
	send_req(fd, 0, NBD_CMD_READ, 0x36, 0, 0, NULL);
	expect_err(fd, structured, true, 0x36, NBD_EINVAL);
	/* More than the advertised maximum payload. */
	send_req(fd, 0, NBD_CMD_READ, 0x37, 0, (32u << 20) + 512, NULL);
	expect_err(fd, structured, true, 0x37, NBD_EINVAL);
	/* Flags not valid for the command. */
	send_req(fd, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_READ, 0x38, 0, 512, NULL);
	expect_err(fd, structured, true, 0x38, NBD_EINVAL);
	send_req(fd, 0x8000, NBD_CMD_READ, 0x39, 0, 512, NULL);
	expect_err(fd, structured, true, 0x39, NBD_EINVAL);
	send_req(fd, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_TRIM, 0x3a, 0, 512, NULL);
	expect_err(fd, structured, false, 0x3a, NBD_EINVAL);
	send_req(fd, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_CACHE, 0x3b, 0, 512, NULL);
	expect_err(fd, structured, false, 0x3b, NBD_EINVAL);
	if (!structured) {
		/* DF needs SEND_DF, which needs structured replies. */
		send_req(fd, NBD_CMD_FLAG_DF, NBD_CMD_READ, 0x3c, 0, 512, NULL);
		expect_err(fd, structured, true, 0x3c, NBD_EINVAL);
	}
	/* No payload followed any error: the next reply is this read's. */
	read_check(fd, structured, 0x3f, 0, 4096, 1);
	disconnect(fd);
}

Test(nbd, error_replies_simple)
{
	error_replies(false);
	finish();
}

Test(nbd, error_replies_structured)
{
	error_replies(true);
	finish();
}

Test(nbd, unknown_command_einval)
{
	for (int s = 0; s < 2; s++) {
		int fd = connect_go("disk0", s, NULL);

		send_req(fd, 0, 42, 0x42, 0, 512, NULL);
		expect_err(fd, s, false, 0x42, NBD_EINVAL);
		send_req(fd, 0, 0xffff, 0x43, 0, 0, NULL);
		expect_err(fd, s, false, 0x43, NBD_EINVAL);
		/* BLOCK_STATUS without a negotiated meta context. */
		send_req(fd, 0, NBD_CMD_BLOCK_STATUS, 0x44, 0, 4096, NULL);
		expect_err(fd, s, false, 0x44, NBD_EINVAL);
		read_check(fd, s, 0x45, 512, 512, 1);
		disconnect(fd);
	}
	finish();
}

Test(nbd, bad_request_magic_closes)
{
	uint8_t req[28];
	int fd = connect_go("disk0", false, NULL);

	read_check(fd, false, 1, 0, 512, 1);
	memset(req, 0, sizeof(req));
	put32(req, 0x12560953); /* the historic request magic */
	put16(req + 6, NBD_CMD_READ);
	put32(req + 24, 512);
	send_all(fd, req, sizeof(req));
	expect_closed(fd);

	fd = connect_go("disk1", true, NULL);
	put32(req, NBD_SIMPLE_REPLY_MAGIC);
	send_all(fd, req, sizeof(req));
	expect_closed(fd);
	check_serves();
	finish();
}

static void rejected_writes(bool structured)
{
	uint32_t big = 300u << 10; /* larger than the agent's 256 KiB receive buffer */
	uint8_t *w = malloc(big);
	int fd = connect_go("disk0", structured, NULL);

	cr_assert_not_null(w);
	/* Each payload looks like a READ request: if it were parsed, replies would not match. */
	for (uint32_t i = 0; i + 28 <= big; i += 28) {
		put32(w + i, NBD_REQUEST_MAGIC);
		put16(w + i + 4, 0);
		put16(w + i + 6, NBD_CMD_READ);
		put64(w + i + 8, 0xbadbadull);
		put64(w + i + 16, 0);
		put32(w + i + 24, 512);
	}
	/* Past the end: ENOSPC. */
	send_req(fd, 0, NBD_CMD_WRITE, 0x51, DISK0_SIZE, 4096, w);
	expect_err(fd, structured, false, 0x51, NBD_ENOSPC);
	send_req(fd, 0, NBD_CMD_WRITE, 0x52, DISK0_SIZE - 4096, 8192, w);
	expect_err(fd, structured, false, 0x52, NBD_ENOSPC);
	/* Unaligned offset or length: EINVAL. */
	send_req(fd, 0, NBD_CMD_WRITE, 0x53, 100, 512, w);
	expect_err(fd, structured, false, 0x53, NBD_EINVAL);
	send_req(fd, 0, NBD_CMD_WRITE, 0x54, 0, 1000, w);
	expect_err(fd, structured, false, 0x54, NBD_EINVAL);
	/* Bad flag on a write. */
	send_req(fd, NBD_CMD_FLAG_DF, NBD_CMD_WRITE, 0x55, 0, 512, w);
	expect_err(fd, structured, false, 0x55, NBD_EINVAL);
	/* A large rejected payload, header and payload sent apart. */
	send_req(fd, 0, NBD_CMD_WRITE, 0x56, DISK0_SIZE, big, NULL);
	send_all(fd, w, big);
	expect_err(fd, structured, false, 0x56, NBD_ENOSPC);
	send_req(fd, 0, NBD_CMD_WRITE, 0x57, 3, big, w);
	expect_err(fd, structured, false, 0x57, NBD_EINVAL);

	/* Zero length: no payload follows. */
	send_req(fd, 0, NBD_CMD_WRITE, 0x5a, 0, 0, NULL);
	expect_err(fd, structured, false, 0x5a, NBD_EINVAL);
	/* Over the 32 MiB maximum payload: EINVAL, and all 33 MiB are skipped. */
	send_req(fd, 0, NBD_CMD_WRITE, 0x5b, 0, 33u << 20, NULL);
	for (uint32_t left = 33u << 20; left;) {
		uint32_t n = left < big ? left : big;

		send_all(fd, w, n);
		left -= n;
	}
	expect_err(fd, structured, false, 0x5b, NBD_EINVAL);

	/* In sync: the next request is answered, and nothing was written. */
	read_check(fd, structured, 0x58, 0, 8192, 1);
	read_check(fd, structured, 0x59, DISK0_SIZE - 4096, 4096, 1);
	free(w);
	disconnect(fd);
}

Test(nbd, rejected_write_payload_consumed_simple)
{
	rejected_writes(false);
	finish();
}

Test(nbd, rejected_write_payload_consumed_structured)
{
	rejected_writes(true);
	finish();
}

Test(nbd, readonly_export_refuses_writes)
{
	uint8_t w[4096];

	memset(w, 0xee, sizeof(w));
	for (int s = 0; s < 2; s++) {
		int fd = connect_go("ro", s, NULL);

		send_req(fd, 0, NBD_CMD_WRITE, 0x61, 0, 4096, w);
		expect_err(fd, s, false, 0x61, NBD_EPERM);
		send_req(fd, 0, NBD_CMD_TRIM, 0x62, 0, 4096, NULL);
		expect_err(fd, s, false, 0x62, NBD_EPERM);
		send_req(fd, 0, NBD_CMD_WRITE_ZEROES, 0x63, 0, 4096, NULL);
		expect_err(fd, s, false, 0x63, NBD_EPERM);
		/* Reads, FLUSH and CACHE are fine; the payload above was skipped. */
		read_check(fd, s, 0x64, 0, 4096, 3);
		send_req(fd, 0, NBD_CMD_FLUSH, 0x65, 0, 0, NULL);
		expect_ok(fd, s, 0x65);
		send_req(fd, 0, NBD_CMD_CACHE, 0x66, 0, 4096, NULL);
		expect_ok(fd, s, 0x66);
		disconnect(fd);
	}
	finish();
}

Test(nbd, write_zeroes_past_end_enospc)
{
	int fd = connect_go("disk0", true, NULL);

	/* "SHOULD return NBD_ENOSPC if it receives a write zeroes request ... beyond the size" */
	send_req(fd, 0, NBD_CMD_WRITE_ZEROES, 0x71, DISK0_SIZE - 512, 1024, NULL);
	expect_err(fd, true, false, 0x71, NBD_ENOSPC);
	read_check(fd, true, 0x72, DISK0_SIZE - 512, 512, 1);
	disconnect(fd);
	finish();
}

Test(nbd, trim_past_end_einval)
{
	int fd = connect_go("disk0", false, NULL);

	/*
	 * doc/proto.md, "Error values": the server "SHOULD return NBD_EINVAL if it
	 * receives a read or trim request including one or more sectors beyond
	 * the size of the device" (ENOSPC is for writes and write-zeroes).
	 */
	send_req(fd, 0, NBD_CMD_TRIM, 0x81, DISK0_SIZE - 512, 1024, NULL);
	expect_err(fd, false, false, 0x81, NBD_EINVAL);
	send_req(fd, 0, NBD_CMD_TRIM, 0x82, DISK0_SIZE, 512, NULL);
	expect_err(fd, false, false, 0x82, NBD_EINVAL);
	read_check(fd, false, 0x83, DISK0_SIZE - 512, 512, 1);
	disconnect(fd);
	finish();
}

Test(nbd, disc_answers_inflight_then_closes)
{
	uint8_t w[4096], buf[28 * 4 + 4096], r[4096];
	struct {
		uint64_t cookie, off;
	} reads[3] = { { 0x91, 0 }, { 0x92, 65536 }, { 0x93, 4096 * 7 } };
	bool seen[3] = { false };
	size_t n = 0;
	int fd = connect_go("disk1", false, NULL);

	/* Three reads and DISC in one segment: all three are answered, then EOF. */
	for (unsigned i = 0; i < 3; i++) {
		put32(buf + n, NBD_REQUEST_MAGIC);
		put16(buf + n + 4, 0);
		put16(buf + n + 6, NBD_CMD_READ);
		put64(buf + n + 8, reads[i].cookie);
		put64(buf + n + 16, reads[i].off);
		put32(buf + n + 24, 4096);
		n += 28;
	}
	memset(buf + n, 0, 28);
	put32(buf + n, NBD_REQUEST_MAGIC);
	put16(buf + n + 6, NBD_CMD_DISC);
	n += 28;
	send_all(fd, buf, n);
	for (unsigned k = 0; k < 3; k++) {
		uint8_t h[16];
		unsigned i;

		recv_exact(fd, h, 16);
		cr_assert_eq(get32(h), NBD_SIMPLE_REPLY_MAGIC);
		cr_assert_eq(get32(h + 4), 0);
		for (i = 0; i < 3 && reads[i].cookie != get64(h + 8); i++)
			;
		cr_assert_lt(i, 3, "reply for unknown cookie 0x%llx",
			     (unsigned long long)get64(h + 8));
		cr_assert_not(seen[i], "two replies for cookie 0x%llx",
			      (unsigned long long)reads[i].cookie);
		seen[i] = true;
		recv_exact(fd, r, 4096);
		expect_pattern(r, reads[i].off, 4096, 2);
	}
	expect_closed(fd);

	/* A write followed at once by DISC is completed and answered before the close. */
	fd = connect_go("disk1", true, NULL);
	memset(w, 0x3c, sizeof(w));
	n = 0;
	put32(buf, NBD_REQUEST_MAGIC);
	put16(buf + 4, NBD_CMD_FLAG_FUA);
	put16(buf + 6, NBD_CMD_WRITE);
	put64(buf + 8, 0x99);
	put64(buf + 16, 0);
	put32(buf + 24, 4096);
	memcpy(buf + 28, w, 4096);
	memset(buf + 28 + 4096, 0, 28);
	put32(buf + 28 + 4096, NBD_REQUEST_MAGIC);
	put16(buf + 28 + 4096 + 6, NBD_CMD_DISC);
	send_all(fd, buf, 28 + 4096 + 28);
	expect_ok(fd, true, 0x99);
	expect_closed(fd);

	fd = connect_go("disk1", false, NULL);
	send_req(fd, 0, NBD_CMD_READ, 0x9a, 0, 4096, NULL);
	expect_simple(fd, 0x9a, 0, r, 4096);
	cr_assert_arr_eq(r, w, 4096, "write before DISC was lost");
	disconnect(fd);
	check_serves();
	finish();
}

/* Pipelined requests on one connection; replies may come in any order. */
static void pipeline(bool structured, const char *vol, unsigned seed)
{
	enum { N = 48 };
	struct {
		uint16_t type;
		uint64_t off;
		uint32_t len;
		bool seen;
	} q[N];
	uint8_t *w = malloc(65536), *r = malloc(65536);
	int fd = connect_go(vol, structured, NULL);
	size_t cap = N * (28 + 4096), n = 0;
	uint8_t *buf = malloc(cap);

	cr_assert_not_null(buf);
	memset(w, 0x77, 65536);
	/* Reads of the pattern in the first half, writes of 0x77 in the second half. */
	for (unsigned i = 0; i < N; i++) {
		q[i].type = (i % 3 == 2) ? NBD_CMD_WRITE : NBD_CMD_READ;
		q[i].off = q[i].type == NBD_CMD_WRITE ? (512u << 10) + i * 4096 : i * 8192;
		q[i].len = q[i].type == NBD_CMD_WRITE ? 4096 : 512 * (1 + i % 8);
		q[i].seen = false;
		put32(buf + n, NBD_REQUEST_MAGIC);
		put16(buf + n + 4, 0);
		put16(buf + n + 6, q[i].type);
		put64(buf + n + 8, 0x1000 + i);
		put64(buf + n + 16, q[i].off);
		put32(buf + n + 24, q[i].len);
		n += 28;
		if (q[i].type == NBD_CMD_WRITE) {
			memcpy(buf + n, w, q[i].len);
			n += q[i].len;
		}
	}
	send_all(fd, buf, n);
	for (unsigned k = 0; k < N; k++) {
		uint8_t m[4];
		uint64_t cookie;
		unsigned i;

		recv_exact(fd, m, 4);
		if (get32(m) == NBD_SIMPLE_REPLY_MAGIC) {
			uint8_t h[12];

			recv_exact(fd, h, 12);
			cookie = get64(h + 4);
			cr_assert(cookie >= 0x1000 && cookie < 0x1000 + N, "cookie 0x%llx",
				  (unsigned long long)cookie);
			i = (unsigned)(cookie - 0x1000);
			cr_assert_eq(get32(h), 0, "request %u failed: %u", i, get32(h));
			cr_assert(!structured || q[i].type != NBD_CMD_READ,
				  "simple reply to a structured READ");
			if (q[i].type == NBD_CMD_READ) {
				recv_exact(fd, r, q[i].len);
				expect_pattern(r, q[i].off, q[i].len, seed);
			}
		} else {
			struct chunk c;

			recv_chunk_rest(fd, m, &c);
			cookie = c.cookie;
			cr_assert(cookie >= 0x1000 && cookie < 0x1000 + N, "cookie 0x%llx",
				  (unsigned long long)cookie);
			i = (unsigned)(cookie - 0x1000);
			cr_assert_eq(c.flags, NBD_REPLY_FLAG_DONE);
			if (q[i].type == NBD_CMD_READ) {
				cr_assert_eq(c.type, NBD_REPLY_TYPE_OFFSET_DATA, "type 0x%x",
					     c.type);
				cr_assert_eq(c.len, 8 + q[i].len);
				cr_assert_eq(get64(c.payload), q[i].off);
				expect_pattern(c.payload + 8, q[i].off, q[i].len, seed);
			} else {
				cr_assert_eq(c.type, NBD_REPLY_TYPE_NONE, "type 0x%x", c.type);
			}
			free(c.payload);
		}
		cr_assert_not(q[i].seen, "two replies for cookie 0x%llx",
			      (unsigned long long)cookie);
		q[i].seen = true;
	}
	/* The writes landed. */
	for (unsigned i = 0; i < N; i++) {
		if (q[i].type != NBD_CMD_WRITE)
			continue;
		send_req(fd, 0, NBD_CMD_READ, 0x2000 + i, q[i].off, q[i].len, NULL);
		if (structured)
			expect_read_chunk(fd, 0x2000 + i, q[i].off, r, q[i].len);
		else
			expect_simple(fd, 0x2000 + i, 0, r, q[i].len);
		cr_assert_arr_eq(r, w, q[i].len, "pipelined write %u lost", i);
	}
	free(buf);
	free(w);
	free(r);
	disconnect(fd);
}

Test(nbd, pipelined_simple)
{
	pipeline(false, "disk0", 1);
	finish();
}

Test(nbd, pipelined_structured_handoff)
{
	pipeline(true, "disk1", 2);
	finish();
}

Test(nbd, pipelined_beyond_inflight_limit)
{
	/* More requests than the agent keeps in flight (128) before reading any reply. */
	enum { N = 400 };
	uint8_t *buf = malloc(N * 28), r[1024];
	bool *seen = calloc(N, sizeof(bool));
	int fd = connect_go("disk0", false, NULL);

	cr_assert_not_null(buf);
	cr_assert_not_null(seen);
	for (unsigned i = 0; i < N; i++) {
		put32(buf + i * 28, NBD_REQUEST_MAGIC);
		put16(buf + i * 28 + 4, 0);
		put16(buf + i * 28 + 6, NBD_CMD_READ);
		put64(buf + i * 28 + 8, 0x5000 + i);
		put64(buf + i * 28 + 16, (uint64_t)(i % 2048) * 512);
		put32(buf + i * 28 + 24, 1024);
	}
	send_all(fd, buf, N * 28);
	for (unsigned k = 0; k < N; k++) {
		uint8_t h[16];
		unsigned i;

		recv_exact(fd, h, 16);
		cr_assert_eq(get32(h), NBD_SIMPLE_REPLY_MAGIC);
		cr_assert_eq(get32(h + 4), 0);
		i = (unsigned)(get64(h + 8) - 0x5000);
		cr_assert_lt(i, N);
		cr_assert_not(seen[i]);
		seen[i] = true;
		recv_exact(fd, r, 1024);
		expect_pattern(r, (uint64_t)(i % 2048) * 512, 1024, 1);
	}
	free(buf);
	free(seen);
	disconnect(fd);
	finish();
}

/* Hard disconnects in awkward places must not hurt the agent, nor its shutdown. */
Test(nbd, hangup_before_option_reply)
{
	int fd = hs_open(CFLAGS_ALL);

	send_opt(fd, NBD_OPT_LIST, NULL, 0);
	close(fd);
	fd = hs_open(CFLAGS_ALL);
	send_all(fd, "IHAVE", 5); /* half an option header */
	close(fd);
	fd = hs_open(CFLAGS_ALL);
	{
		uint8_t h[19];

		put64(h, NBD_IHAVEOPT);
		put32(h + 8, 99);
		put32(h + 12, 1000);
		memcpy(h + 16, "abc", 3); /* 3 of 1000 bytes of option data */
		send_all(fd, h, sizeof(h));
	}
	close(fd);
	check_serves();
	finish();
}

Test(nbd, hangup_with_reply_pending)
{
	int fd = connect_go("disk1", true, NULL);

	send_req(fd, 0, NBD_CMD_READ, 1, 0, 1u << 20, NULL);
	close(fd); /* with a 1 MiB reply on its way */
	fd = connect_go("disk0", false, NULL);
	send_req(fd, 0, NBD_CMD_READ, 1, 0, 4096, NULL);
	send_all(fd, "\x25\x60", 2); /* and half a header */
	close(fd);
	check_serves();
	finish();
}

Test(nbd, hangup_mid_write_payload)
{
	uint8_t w[1024];
	int fd = connect_go("disk0", false, NULL);

	memset(w, 1, sizeof(w));
	send_req(fd, 0, NBD_CMD_WRITE, 1, 0, 4096, NULL);
	send_all(fd, w, sizeof(w));
	close(fd); /* a quarter of the payload */
	check_serves();
	/* The agent must still shut down cleanly within the harness's 30 s. */
	finish();
}

Test(nbd, hangup_mid_rejected_write_payload)
{
	uint8_t w[1024];
	int fd = connect_go("disk0", true, NULL);

	memset(w, 1, sizeof(w));
	send_req(fd, 0, NBD_CMD_WRITE, 1, DISK0_SIZE, 4096, NULL); /* ENOSPC: payload skipped */
	send_all(fd, w, sizeof(w));
	close(fd);
	check_serves();
	finish();
}
