/* SPDX-License-Identifier: MIT */
/*
 * Every NBD command and flag against the real flashtierd, with libnbd as
 * the client, on both backends: a file volume and an nbd volume backed by
 * "nbdkit memory". Data is checked three ways: read back through the
 * agent, read straight from the backing store, and counted in /metrics.
 */
#include "nbd_client.h"

#define VOL_SIZE    (64ull << 20)
#define MAX_PAYLOAD (32u << 20)

enum backing {
	B_FILE,
	B_NBD,
};

struct env {
	struct ft_agent a;
	char dir[256];
	char file[320];	    /* B_FILE: the backing file */
	char kit_sock[320]; /* B_NBD: nbdkit's socket */
	pid_t kit;
	enum backing kind;
};

/*
 * One environment per test. Criterion runs each test in its own process;
 * the .fini hook below cleans up even when an assertion aborted the test,
 * so a failing test leaves no agent or nbdkit behind.
 */
static struct env g_env;

static void env_teardown(void)
{
	th_env_teardown(&g_env.a, &g_env.kit, g_env.dir);
}

/* A hung agent fails the test instead of blocking the run. */
TestSuite(commands, .fini = env_teardown, .timeout = 60);

/* Flags for env_start(). */
#define ENV_WITH_RO    (1u << 0) /* also a read-only volume "ro" on the same store */
#define ENV_WITH_OTHER (1u << 1) /* also a third volume "w" */
#define ENV_SIZE_1000  (1u << 2) /* B_FILE: a 1000-byte backing file */

/* The "backing" value for the environment's store. */
static void env_backing(const struct env *e, char *out, size_t len)
{
	if (e->kind == B_FILE)
		snprintf(out, len, "%s", e->file);
	else
		snprintf(out, len, "nbd+unix:///?socket=%s", e->kit_sock);
}

/*
 * @kit_args: nbdkit's filters, plugin and parameters for B_NBD (NULL:
 * "memory 64M"); "DIR/" at the start of a "key=DIR/..." value stands for
 * the test's directory.
 */
static void env_start_kit(struct env *e, enum backing kind, unsigned flags,
			  const char *const *kit_args)
{
	static const char *const mem_args[] = { "memory", "64M", NULL };
	char backing[400], vols[2048];
	int n;

	memset(e, 0, sizeof(*e));
	e->kind = kind;
	th_mkdtemp(e->dir, sizeof(e->dir));
	if (kind == B_FILE) {
		th_make_file(e->dir, "disk.img",
			     (flags & ENV_SIZE_1000) ? 1000 : (long long)VOL_SIZE, e->file,
			     sizeof(e->file));
	} else {
		static char bufs[8][400];
		const char *args[16];
		int i;

		if (!kit_args)
			kit_args = mem_args;
		for (i = 0; kit_args[i] && i < 15; i++) {
			const char *eq = strchr(kit_args[i], '=');

			args[i] = kit_args[i];
			if (i < 8 && eq && strncmp(eq + 1, "DIR/", 4) == 0) {
				th_fmt(bufs[i], sizeof(bufs[i]), "%.*s%s/%s",
				       (int)(eq + 1 - kit_args[i]), kit_args[i], e->dir, eq + 5);
				args[i] = bufs[i];
			}
		}
		args[i] = NULL;
		e->kit = th_nbdkit_start(e->dir, "kit", e->kit_sock, sizeof(e->kit_sock), args);
	}
	env_backing(e, backing, sizeof(backing));
	n = snprintf(vols, sizeof(vols),
		     "{ \"v\": { \"backing\": \"%s\", \"description\": \"primary test disk\" }",
		     backing);
	if (flags & ENV_WITH_RO)
		n += snprintf(vols + n, sizeof(vols) - (size_t)n,
			      ", \"ro\": { \"backing\": \"%s\", \"readonly\": true }", backing);
	if (flags & ENV_WITH_OTHER)
		n += snprintf(vols + n, sizeof(vols) - (size_t)n,
			      ", \"w\": { \"backing\": \"%s\", \"domain\": \"vm1\" }", backing);
	snprintf(vols + n, sizeof(vols) - (size_t)n, " }");
	ft_agent_start_in(&e->a, e->dir, vols, "");
}

static void env_start(struct env *e, enum backing kind, unsigned flags)
{
	env_start_kit(e, kind, flags, NULL);
}

/* Stop the agent (asserting exit 0 after SIGTERM), then nbdkit. */
static void env_finish(struct env *e)
{
	th_env_finish(&e->a, &e->kit, e->dir);
}

static struct nbd_handle *connect_export(struct env *e, const char *export, bool structured)
{
	struct nbd_handle *h = th_nbd_new();
	char uri[512];

	cr_assert_eq(nbd_set_request_structured_replies(h, structured), 0);
	cr_assert_eq(nbd_set_full_info(h, true), 0);
	th_uri(&e->a, export, uri, sizeof(uri));
	cr_assert_eq(nbd_connect_uri(h, uri), 0, "connect %s: %s", uri, nbd_get_error());
	cr_assert_eq(nbd_get_structured_replies_negotiated(h), structured ? 1 : 0);
	return h;
}

/* ---- data patterns ---- */

/* Assert @buf holds what th_fill(@off, @seed) wrote. */
static void expect_fill(const void *buf, size_t len, uint64_t off, uint32_t seed, const char *what)
{
	const uint64_t *p = buf;

	for (size_t i = 0; i < len / 8; i++) {
		uint64_t want = th_fill_word(off + 8 * i, seed);

		if (p[i] != want)
			cr_assert_fail(
				"%s: mismatch at offset %llu (+%zu): got %016llx want %016llx",
				what, (unsigned long long)off, i * 8, (unsigned long long)p[i],
				(unsigned long long)want);
	}
}

static void expect_zero(const void *buf, size_t len, uint64_t off, const char *what)
{
	const uint8_t *p = buf;

	for (size_t i = 0; i < len; i++)
		if (p[i])
			cr_assert_fail("%s: byte at offset %llu is 0x%02x, want 0", what,
				       (unsigned long long)(off + i), p[i]);
}

static void *xmalloc(size_t len)
{
	void *p = malloc(len);

	cr_assert_not_null(p);
	return p;
}

/* ---- the backing store, read directly (not through the agent) ---- */

static void store_read(struct env *e, void *buf, size_t len, uint64_t off)
{
	if (e->kind == B_FILE) {
		int fd = open(e->file, O_RDONLY);
		size_t done = 0;

		cr_assert_geq(fd, 0, "open %s: %s", e->file, strerror(errno));
		while (done < len) {
			ssize_t n = pread(fd, (char *)buf + done, len - done, (off_t)(off + done));

			cr_assert_gt(n, 0, "pread backing file: %s",
				     n < 0 ? strerror(errno) : "EOF");
			done += (size_t)n;
		}
		close(fd);
	} else {
		struct nbd_handle *h = th_nbd_new();

		cr_assert_eq(nbd_connect_unix(h, e->kit_sock), 0, "nbdkit: %s", nbd_get_error());
		for (size_t done = 0; done < len;) {
			size_t n = len - done > MAX_PAYLOAD ? MAX_PAYLOAD : len - done;

			cr_assert_eq(nbd_pread(h, (char *)buf + done, n, off + done, 0), 0,
				     "nbdkit pread: %s", nbd_get_error());
			done += n;
		}
		th_nbd_disconnect(h);
	}
}

static void store_expect_fill(struct env *e, size_t len, uint64_t off, uint32_t seed)
{
	void *buf = xmalloc(len);

	store_read(e, buf, len, off);
	expect_fill(buf, len, off, seed, "backing store");
	free(buf);
}

static void store_expect_zero(struct env *e, size_t len, uint64_t off)
{
	void *buf = xmalloc(len);

	store_read(e, buf, len, off);
	expect_zero(buf, len, off, "backing store");
	free(buf);
}

/* ---- metrics ---- */

/* What a test issued, to compare with flashtier_requests_total and friends. */
struct counts {
	uint64_t n[6];	    /* requests by op (errors included, as the agent counts them) */
	uint64_t bytes[6];  /* bytes of successful requests by op */
	uint64_t errors[6]; /* requests that failed */
};

enum {
	OP_READ,
	OP_WRITE,
	OP_FLUSH,
	OP_TRIM,
	OP_ZERO,
	OP_CACHE,
};

static const char *const op_label[6] = {
	"read", "write", "flush", "trim", "write_zeroes", "cache"
};

static void count(struct counts *c, int op, uint64_t bytes)
{
	c->n[op]++;
	c->bytes[op] += bytes;
}

static void count_error(struct counts *c, int op)
{
	c->n[op]++;
	c->errors[op]++;
}

static void expect_metrics(struct env *e, const char *vol, const struct counts *c)
{
	for (int op = 0; op < 6; op++) {
		double n = th_vol_metric(&e->a, "flashtier_requests_total", vol, op_label[op]);
		double b = th_vol_metric(&e->a, "flashtier_request_bytes_total", vol, op_label[op]);
		double err =
			th_vol_metric(&e->a, "flashtier_request_errors_total", vol, op_label[op]);

		cr_expect_eq((uint64_t)n, c->n[op], "requests_total{op=%s} = %.0f, issued %llu",
			     op_label[op], n, (unsigned long long)c->n[op]);
		cr_expect_eq((uint64_t)b, c->bytes[op],
			     "request_bytes_total{op=%s} = %.0f, issued %llu bytes", op_label[op],
			     b, (unsigned long long)c->bytes[op]);
		cr_expect_eq((uint64_t)err, c->errors[op],
			     "request_errors_total{op=%s} = %.0f, want %llu", op_label[op], err,
			     (unsigned long long)c->errors[op]);
	}
	cr_expect_eq(th_vol_metric(&e->a, "flashtier_invalid_requests_total", vol, NULL), 0);
	cr_expect_eq(th_vol_metric(&e->a, "flashtier_requests_in_flight", vol, NULL), 0);
}

/* ---- synchronous command wrappers that assert success and count ---- */

static void do_pwrite(struct nbd_handle *h, struct counts *c, size_t len, uint64_t off,
		      uint32_t seed, uint32_t flags)
{
	void *buf = xmalloc(len);

	th_fill(buf, len, off, seed);
	cr_assert_eq(nbd_pwrite(h, buf, len, off, flags), 0, "pwrite %zu@%llu flags=%u: %s", len,
		     (unsigned long long)off, flags, nbd_get_error());
	count(c, OP_WRITE, len);
	free(buf);
}

static void do_expect_read(struct nbd_handle *h, struct counts *c, size_t len, uint64_t off,
			   uint32_t seed)
{
	void *buf = xmalloc(len);

	memset(buf, 0xa5, len);
	cr_assert_eq(nbd_pread(h, buf, len, off, 0), 0, "pread %zu@%llu: %s", len,
		     (unsigned long long)off, nbd_get_error());
	count(c, OP_READ, len);
	if (seed)
		expect_fill(buf, len, off, seed, "read through the agent");
	else
		expect_zero(buf, len, off, "read through the agent");
	free(buf);
}

static void do_flush(struct nbd_handle *h, struct counts *c)
{
	cr_assert_eq(nbd_flush(h, 0), 0, "flush: %s", nbd_get_error());
	count(c, OP_FLUSH, 0);
}

static void do_zero(struct nbd_handle *h, struct counts *c, size_t len, uint64_t off,
		    uint32_t flags)
{
	cr_assert_eq(nbd_zero(h, len, off, flags), 0, "zero %zu@%llu flags=%u: %s", len,
		     (unsigned long long)off, flags, nbd_get_error());
	count(c, OP_ZERO, len);
}

static void do_trim(struct nbd_handle *h, struct counts *c, size_t len, uint64_t off,
		    uint32_t flags)
{
	cr_assert_eq(nbd_trim(h, len, off, flags), 0, "trim %zu@%llu flags=%u: %s", len,
		     (unsigned long long)off, flags, nbd_get_error());
	count(c, OP_TRIM, len);
}

static void do_cache(struct nbd_handle *h, struct counts *c, size_t len, uint64_t off)
{
	cr_assert_eq(nbd_cache(h, len, off, 0), 0, "cache %zu@%llu: %s", len,
		     (unsigned long long)off, nbd_get_error());
	count(c, OP_CACHE, len);
}

/* ---- read/write round trips ---- */

struct span {
	size_t len;
	uint64_t off;
};

/*
 * Sizes from one sector to the maximum payload, at the start, at odd
 * sector offsets, straddling the middle and flush against the end.
 */
static const struct span rw_spans[] = {
	{ 512, 0 },
	{ 512, 512 * 77 },
	{ 512, VOL_SIZE - 512 },
	{ 4096, 4096 },
	{ 4096, 512 * 1001 }, /* sector- but not page-aligned */
	{ 4096, VOL_SIZE - 4096 },
	{ 1u << 20, 3u << 20 },
	{ 1u << 20, (5u << 20) + 512 },
	{ 1u << 20, VOL_SIZE - (1u << 20) },
	{ MAX_PAYLOAD, 16u << 20 },
	{ MAX_PAYLOAD, VOL_SIZE - MAX_PAYLOAD },
	{ MAX_PAYLOAD, 0 },
};

#define N_SPANS (sizeof(rw_spans) / sizeof(rw_spans[0]))

struct chunks {
	int n;
	uint64_t offset;
	size_t count;
	unsigned status;
};

static int chunk_cb(void *user_data, const void *subbuf, size_t cnt, uint64_t offset,
		    unsigned status, int *error)
{
	struct chunks *ch = user_data;

	(void)subbuf;
	(void)error;
	ch->n++;
	ch->offset = offset;
	ch->count = cnt;
	ch->status = status;
	return 0;
}

static void rw_roundtrip(enum backing kind, bool structured)
{
	struct env *e = &g_env;
	struct counts c = { 0 };
	struct nbd_handle *h;

	env_start(e, kind, 0);
	h = connect_export(e, "v", structured);
	cr_assert_eq(nbd_get_size(h), (int64_t)VOL_SIZE);

	/* Later spans overlap earlier ones: each is written, then read back at once. */
	for (size_t i = 0; i < N_SPANS; i++) {
		const struct span *s = &rw_spans[i];
		uint32_t flags = (i % 2) ? LIBNBD_CMD_FLAG_FUA : 0;

		do_pwrite(h, &c, s->len, s->off, 100 + (uint32_t)i, flags);
		do_expect_read(h, &c, s->len, s->off, 100 + (uint32_t)i);
	}
	/* The last span covered the first half with seed 100 + N_SPANS - 1. */
	do_pwrite(h, &c, 512, 512 * 3, 7, 0);
	do_pwrite(h, &c, 4096, 1u << 20, 8, LIBNBD_CMD_FLAG_FUA);
	do_flush(h, &c);

	/* Straight from the store: the data really got there. */
	store_expect_fill(e, 512 * 3, 0, 100 + N_SPANS - 1);
	store_expect_fill(e, 512, 512 * 3, 7);
	store_expect_fill(e, (1u << 20) - 512 * 4, 512 * 4, 100 + N_SPANS - 1);
	store_expect_fill(e, 4096, 1u << 20, 8);
	store_expect_fill(e, MAX_PAYLOAD - (1u << 20) - 4096, (1u << 20) + 4096, 100 + N_SPANS - 1);
	store_expect_fill(e, MAX_PAYLOAD, VOL_SIZE - MAX_PAYLOAD, 100 + N_SPANS - 2);

	/* Reads of the whole export in maximum-payload pieces agree with the store. */
	do_expect_read(h, &c, 512, 512 * 3, 7);
	do_expect_read(h, &c, MAX_PAYLOAD, VOL_SIZE - MAX_PAYLOAD, 100 + N_SPANS - 2);

	/* Structured: a read comes back as one data chunk at the right offset, DF or not. */
	if (structured) {
		for (uint32_t df = 0; df <= LIBNBD_CMD_FLAG_DF; df += LIBNBD_CMD_FLAG_DF) {
			struct chunks ch = { 0 };
			void *buf = xmalloc(1u << 20);

			cr_assert_eq(
				nbd_pread_structured(h, buf, 1u << 20, 512 * 4,
						     (nbd_chunk_callback){ .callback = chunk_cb,
									   .user_data = &ch },
						     df),
				0, "pread_structured: %s", nbd_get_error());
			count(&c, OP_READ, 1u << 20);
			cr_expect_eq(ch.n, 1, "%d chunks for one read", ch.n);
			cr_expect_eq(ch.offset, 512 * 4);
			cr_expect_eq(ch.count, 1u << 20);
			cr_expect_eq(ch.status, LIBNBD_READ_DATA);
			expect_fill(buf, (1u << 20) - 2048, 2048, 100 + N_SPANS - 1,
				    "structured read");
			expect_fill((char *)buf + (1u << 20) - 2048, 2048, 1u << 20, 8,
				    "structured read");
			free(buf);
		}
	}

	cr_expect_eq(th_vol_metric(&e->a, "flashtier_connections", "v", NULL), 1);
	expect_metrics(e, "v", &c);
	th_nbd_disconnect(h);
	env_finish(e);
}

Test(commands, rw_file_structured)
{
	rw_roundtrip(B_FILE, true);
}

Test(commands, rw_file_simple)
{
	rw_roundtrip(B_FILE, false);
}

Test(commands, rw_nbd_structured)
{
	rw_roundtrip(B_NBD, true);
}

Test(commands, rw_nbd_simple)
{
	rw_roundtrip(B_NBD, false);
}

/* ---- write zeroes, trim, cache ---- */

static void zero_trim_cache(enum backing kind, bool structured)
{
	struct env *e = &g_env;
	struct counts c = { 0 };
	const size_t mib = 1u << 20;
	struct nbd_handle *h;
	int fast;

	env_start(e, kind, 0);
	h = connect_export(e, "v", structured);

	/* 8 MiB of data, then zero pieces of it with each flag combination. */
	do_pwrite(h, &c, 8 * mib, 0, 1, 0);
	do_zero(h, &c, 64 * 1024, 4096, 0);			 /* may punch */
	do_zero(h, &c, 512, mib + 512, LIBNBD_CMD_FLAG_NO_HOLE); /* must allocate */
	do_zero(h, &c, 4096, 2 * mib, LIBNBD_CMD_FLAG_FUA);
	do_zero(h, &c, 128 * 1024, 3 * mib - 512, LIBNBD_CMD_FLAG_NO_HOLE | LIBNBD_CMD_FLAG_FUA);

	/* Exactly the zeroed ranges read as zero; their neighbours keep their data. */
	do_expect_read(h, &c, 4096, 0, 1);
	do_expect_read(h, &c, 64 * 1024, 4096, 0);
	do_expect_read(h, &c, mib - 4096 - 64 * 1024, 4096 + 64 * 1024, 1);
	do_expect_read(h, &c, 512, mib, 1);
	do_expect_read(h, &c, 512, mib + 512, 0);
	do_expect_read(h, &c, mib - 1024, mib + 1024, 1);
	do_expect_read(h, &c, 4096, 2 * mib, 0);
	do_expect_read(h, &c, mib - 512 - 4096, 2 * mib + 4096, 1);
	do_expect_read(h, &c, 128 * 1024, 3 * mib - 512, 0);
	do_expect_read(h, &c, 5 * mib - 128 * 1024 + 512, 3 * mib - 512 + 128 * 1024, 1);

	/*
	 * FAST_ZERO: ENOTSUP is allowed by the spec and must then leave the
	 * data alone; success must zero. On a file on ext4/tmpfs punching or
	 * ZERO_RANGE is fast, so there it must succeed.
	 */
	fast = nbd_can_fast_zero(h);
	if (kind == B_FILE)
		cr_assert_eq(fast, 1, "a file volume advertises FAST_ZERO");
	if (fast == 1) {
		static const uint32_t fz_flags[2] = {
			LIBNBD_CMD_FLAG_FAST_ZERO,
			LIBNBD_CMD_FLAG_FAST_ZERO | LIBNBD_CMD_FLAG_NO_HOLE,
		};

		for (int i = 0; i < 2; i++) {
			uint64_t off = (4 + (uint64_t)i) * mib;
			int rc = nbd_zero(h, mib / 2, off, fz_flags[i]);

			if (rc == 0) {
				count(&c, OP_ZERO, mib / 2);
				do_expect_read(h, &c, mib / 2, off, 0);
			} else {
				cr_assert_eq(nbd_get_errno(), ENOTSUP, "fast zero: %s",
					     nbd_get_error());
				cr_assert_neq(kind, B_FILE, "fast zero failed on a file volume: %s",
					      nbd_get_error());
				count_error(&c, OP_ZERO);
				do_expect_read(h, &c, mib / 2, off, 1);
			}
			do_expect_read(h, &c, mib / 2, off + mib / 2, 1);
		}
	}

	/* Zero beyond the maximum payload: no payload travels, so it is allowed. */
	do_pwrite(h, &c, 4096, 24 * mib, 2, 0);
	do_pwrite(h, &c, 4096, 58 * mib - 4096, 3, 0);
	do_pwrite(h, &c, 4096, 58 * mib, 4, 0);
	do_zero(h, &c, 48 * mib, 10 * mib, 0); /* [10 MiB, 58 MiB) */
	do_expect_read(h, &c, 4096, 24 * mib, 0);
	do_expect_read(h, &c, 4096, 58 * mib - 4096, 0);
	do_expect_read(h, &c, 4096, 58 * mib, 4);

	do_flush(h, &c);
	store_expect_fill(e, 4096, 0, 1);
	store_expect_zero(e, 64 * 1024, 4096);
	store_expect_fill(e, 512, mib, 1);
	store_expect_zero(e, 512, mib + 512);
	store_expect_zero(e, 128 * 1024, 3 * mib - 512);
	store_expect_zero(e, 48 * mib, 10 * mib);
	store_expect_fill(e, 4096, 58 * mib, 4);

	/* TRIM: contents afterwards are unspecified, but a later write must land. */
	do_pwrite(h, &c, mib, 60 * mib, 5, 0);
	do_trim(h, &c, mib, 60 * mib, 0);
	do_trim(h, &c, 4096, 61 * mib, LIBNBD_CMD_FLAG_FUA);
	do_trim(h, &c, 40 * mib, 20 * mib, 0); /* larger than the maximum payload */
	do_pwrite(h, &c, mib, 60 * mib, 6, 0);
	do_pwrite(h, &c, 4096, 61 * mib, 7, LIBNBD_CMD_FLAG_FUA);
	do_expect_read(h, &c, mib, 60 * mib, 6);
	do_expect_read(h, &c, 4096, 61 * mib, 7);

	/* CACHE is a hint: small, large, the whole export, the last sector. */
	do_cache(h, &c, 4096, 0);
	do_cache(h, &c, mib, 8 * mib);
	do_cache(h, &c, VOL_SIZE, 0);
	do_cache(h, &c, 512, VOL_SIZE - 512);

	do_flush(h, &c);
	store_expect_fill(e, mib, 60 * mib, 6);
	store_expect_fill(e, 4096, 61 * mib, 7);

	expect_metrics(e, "v", &c);
	th_nbd_disconnect(h);
	env_finish(e);
}

Test(commands, zero_trim_cache_file_structured)
{
	zero_trim_cache(B_FILE, true);
}

Test(commands, zero_trim_cache_file_simple)
{
	zero_trim_cache(B_FILE, false);
}

Test(commands, zero_trim_cache_nbd_structured)
{
	zero_trim_cache(B_NBD, true);
}

Test(commands, zero_trim_cache_nbd_simple)
{
	zero_trim_cache(B_NBD, false);
}

/*
 * A remote that cannot zero (nbdkit's nozero filter): the agent still
 * offers WRITE_ZEROES, emulated with writes of zeroes (split into
 * pieces), but not FAST_ZERO, which it could not honour.
 */
Test(commands, zero_emulated_nbd)
{
	static const char *const args[] = { "--filter=nozero", "memory", "64M", NULL };
	struct env *e = &g_env;
	struct counts c = { 0 };
	const size_t mib = 1u << 20;
	struct nbd_handle *h;

	env_start_kit(e, B_NBD, 0, args);
	h = connect_export(e, "v", true);
	cr_assert_eq(nbd_can_zero(h), 1);
	cr_assert_eq(nbd_can_fast_zero(h), 0);
	do_pwrite(h, &c, MAX_PAYLOAD, 0, 1, 0);
	do_pwrite(h, &c, MAX_PAYLOAD, MAX_PAYLOAD, 2, 0);
	do_zero(h, &c, 4096, 4096, 0);
	do_zero(h, &c, 512, mib + 512, LIBNBD_CMD_FLAG_NO_HOLE | LIBNBD_CMD_FLAG_FUA);
	do_zero(h, &c, 40 * mib, 20 * mib, 0); /* more than the maximum payload */
	do_expect_read(h, &c, 4096, 0, 1);
	do_expect_read(h, &c, 4096, 4096, 0);
	do_expect_read(h, &c, mib - 8192, 8192, 1);
	do_expect_read(h, &c, 512, mib + 512, 0);
	do_expect_read(h, &c, 19 * mib - 1024, mib + 1024, 1);
	do_expect_read(h, &c, MAX_PAYLOAD, 20 * mib, 0);
	do_expect_read(h, &c, 8 * mib, 52 * mib, 0);
	do_expect_read(h, &c, 4 * mib, 60 * mib, 2);
	do_flush(h, &c);
	store_expect_zero(e, 40 * mib, 20 * mib);
	store_expect_fill(e, 4 * mib, 60 * mib, 2);
	store_expect_fill(e, 4 * mib, 16 * mib, 1);
	expect_metrics(e, "v", &c);
	th_nbd_disconnect(h);
	env_finish(e);
}

/*
 * A remote that advertises FAST_ZERO but always fails it (nozero filter,
 * fastzeromode=slow): the agent passes ENOTSUP through, and the data is
 * left alone ("SHOULD NOT alter the contents of the export").
 */
Test(commands, fast_zero_enotsup_nbd)
{
	static const char *const args[] = { "--filter=nozero",	 "memory", "64M", "zeromode=plugin",
					    "fastzeromode=slow", NULL };
	struct env *e = &g_env;
	struct counts c = { 0 };
	struct nbd_handle *h;

	env_start_kit(e, B_NBD, 0, args);
	h = connect_export(e, "v", false);
	cr_assert_eq(nbd_can_zero(h), 1);
	cr_assert_eq(nbd_can_fast_zero(h), 1);
	do_pwrite(h, &c, 1u << 20, 0, 3, 0);
	cr_assert_eq(nbd_zero(h, 65536, 4096, LIBNBD_CMD_FLAG_FAST_ZERO), -1,
		     "a fast zero the remote refuses succeeded");
	cr_assert_eq(nbd_get_errno(), ENOTSUP, "%s", nbd_get_error());
	count_error(&c, OP_ZERO);
	do_expect_read(h, &c, 1u << 20, 0, 3);
	/* Without FAST_ZERO the same request must succeed. */
	do_zero(h, &c, 65536, 4096, 0);
	do_expect_read(h, &c, 65536, 4096, 0);
	do_expect_read(h, &c, 4096, 0, 3);
	expect_metrics(e, "v", &c);
	th_nbd_disconnect(h);
	env_finish(e);
}

/* ---- advertised flags and block sizes ---- */

static void expect_block_sizes(struct nbd_handle *h)
{
	cr_expect_eq(nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM), 512);
	cr_expect_eq(nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED), 4096);
	cr_expect_eq(nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM), 33554432);
}

static void flags_and_sizes(enum backing kind, bool structured)
{
	struct env *e = &g_env;
	struct nbd_handle *h, *ro;
	int want_fast = 1;

	env_start(e, kind, ENV_WITH_RO);
	if (kind == B_NBD) {
		/* The agent advertises FAST_ZERO only when the remote has it. */
		struct nbd_handle *k = th_nbd_new();

		cr_assert_eq(nbd_connect_unix(k, e->kit_sock), 0, "%s", nbd_get_error());
		want_fast = nbd_can_fast_zero(k) == 1 && nbd_can_zero(k) == 1;
		th_nbd_disconnect(k);
	}

	h = connect_export(e, "v", structured);
	cr_expect_eq(nbd_get_size(h), (int64_t)VOL_SIZE);
	cr_expect_eq(nbd_is_read_only(h), 0);
	cr_expect_eq(nbd_can_flush(h), 1);
	cr_expect_eq(nbd_can_fua(h), 1);
	cr_expect_eq(nbd_can_trim(h), 1);
	cr_expect_eq(nbd_can_zero(h), 1);
	cr_expect_eq(nbd_can_fast_zero(h), want_fast);
	cr_expect_eq(nbd_can_cache(h), 1);
	cr_expect_eq(nbd_can_multi_conn(h), 1);
	cr_expect_eq(nbd_is_rotational(h), 0);
	/* DF only means something with structured replies. */
	cr_expect_eq(nbd_can_df(h), structured ? 1 : 0);
	expect_block_sizes(h);
	{
		char *name = nbd_get_canonical_export_name(h);
		char *desc = nbd_get_export_description(h);

		cr_assert_not_null(name, "%s", nbd_get_error());
		cr_expect_str_eq(name, "v");
		cr_assert_not_null(desc, "%s", nbd_get_error());
		cr_expect_str_eq(desc, "primary test disk");
		free(name);
		free(desc);
	}
	th_nbd_disconnect(h);

	ro = connect_export(e, "ro", structured);
	cr_expect_eq(nbd_get_size(ro), (int64_t)VOL_SIZE);
	cr_expect_eq(nbd_is_read_only(ro), 1);
	cr_expect_eq(nbd_can_trim(ro), 0);
	cr_expect_eq(nbd_can_zero(ro), 0);
	cr_expect_eq(nbd_can_fast_zero(ro), 0);
	cr_expect_eq(nbd_can_flush(ro), 1);
	cr_expect_eq(nbd_can_fua(ro), 1);
	cr_expect_eq(nbd_can_cache(ro), 1);
	cr_expect_eq(nbd_can_df(ro), structured ? 1 : 0);
	expect_block_sizes(ro);
	/* No description configured: none is sent. */
	{
		char *desc = nbd_get_export_description(ro);

		cr_expect_null(desc, "unexpected description '%s'", desc ? desc : "");
		free(desc);
	}
	/* A read-only volume still reads, flushes and caches. */
	{
		char buf[4096];

		cr_expect_eq(nbd_pread(ro, buf, sizeof(buf), 0, 0), 0, "%s", nbd_get_error());
		cr_expect_eq(nbd_flush(ro, 0), 0, "%s", nbd_get_error());
		cr_expect_eq(nbd_cache(ro, 4096, 0, 0), 0, "%s", nbd_get_error());
	}
	th_nbd_disconnect(ro);
	env_finish(e);
}

Test(commands, flags_file_structured)
{
	flags_and_sizes(B_FILE, true);
}

Test(commands, flags_file_simple)
{
	flags_and_sizes(B_FILE, false);
}

Test(commands, flags_nbd_structured)
{
	flags_and_sizes(B_NBD, true);
}

Test(commands, flags_nbd_simple)
{
	flags_and_sizes(B_NBD, false);
}

/*
 * Count the requests of one kind the agent sent to nbdkit, from the log
 * filter's file: lines "connection=N Write id=K offset=0x.. count=0x.. fua=F".
 * The agent's backend is the first connection that completed a handshake.
 */
static int kit_log_count(struct env *e, const char *cmd, const char *must_have)
{
	char path[400], line[1024], conn[32] = "", pat[64];
	FILE *f;
	int n = 0;

	snprintf(path, sizeof(path), "%s/io.log", e->dir);
	f = fopen(path, "r");
	cr_assert_not_null(f, "%s: %s", path, strerror(errno));
	snprintf(pat, sizeof(pat), " %s id=", cmd);
	while (fgets(line, sizeof(line), f)) {
		const char *p = strstr(line, "connection=");

		if (!p)
			continue;
		if (!conn[0] && strstr(line, " Connect export=")) {
			sscanf(p, "%31s", conn);
			continue;
		}
		if (conn[0] && strncmp(p, conn, strlen(conn)) == 0 && p[strlen(conn)] == ' ' &&
		    strstr(line, pat) /* not " ...Write id=" */ &&
		    (!must_have || strstr(line, must_have)))
			n++;
	}
	fclose(f);
	cr_assert(conn[0], "no connection in %s", path);
	return n;
}

/*
 * A remote with a 1 MiB maximum payload and no CACHE: the agent still
 * offers 32 MiB and CACHE, splits reads and writes into pieces the remote
 * accepts (each keeping its FUA), and answers CACHE itself.
 */
Test(commands, nbd_remote_limits)
{
	static const char *const args[] = {
		"--filter=log", "--filter=blocksize-policy", "--filter=nocache",     "memory",
		"64M",		"logfile=DIR/io.log",	     "blocksize-maximum=1M", NULL
	};
	struct env *e = &g_env;
	struct counts c = { 0 };
	struct nbd_handle *h;

	env_start_kit(e, B_NBD, 0, args);
	h = connect_export(e, "v", true);
	expect_block_sizes(h);
	cr_assert_eq(nbd_can_cache(h), 1);
	do_pwrite(h, &c, MAX_PAYLOAD, 0, 41, LIBNBD_CMD_FLAG_FUA);
	do_pwrite(h, &c, (1u << 20) + 4096, MAX_PAYLOAD, 42, 0);
	do_expect_read(h, &c, MAX_PAYLOAD, 0, 41);
	do_cache(h, &c, 4u << 20, 0);
	do_zero(h, &c, 4u << 20, 48u << 20, 0);

	cr_expect_eq(kit_log_count(e, "Write", "count=0x100000 fua=1"), 32,
		     "a 32 MiB FUA write should reach the remote as 32 x 1 MiB FUA writes");
	cr_expect_eq(kit_log_count(e, "Write", "fua=0"), 2);
	cr_expect_eq(kit_log_count(e, "Write", NULL), 34);
	cr_expect_eq(kit_log_count(e, "Read", "count=0x100000"), 32);
	cr_expect_eq(kit_log_count(e, "Cache", NULL), 0);
	cr_expect_eq(kit_log_count(e, "Zero", NULL), 1);
	store_expect_fill(e, MAX_PAYLOAD, 0, 41);
	store_expect_fill(e, (1u << 20) + 4096, MAX_PAYLOAD, 42);
	store_expect_zero(e, 4u << 20, 48u << 20);
	expect_metrics(e, "v", &c);
	th_nbd_disconnect(h);
	env_finish(e);
}

/*
 * A store whose size is not a multiple of 512: the volume advertises the
 * store's own minimum block size (1) so the tail stays reachable, and the
 * bounds are exact to the byte.
 */
static void odd_size(enum backing kind)
{
	static const char *const args[] = { "memory", "1000", NULL };
	struct env *e = &g_env;
	struct nbd_handle *h;
	uint8_t buf[1000], want[1000];

	env_start_kit(e, kind, ENV_SIZE_1000, args);
	h = connect_export(e, "v", true);
	cr_assert_eq(nbd_set_strict_mode(h, 0), 0);
	cr_assert_eq(nbd_get_size(h), 1000);
	cr_expect_eq(nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM), 1);
	cr_expect_eq(nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED), 4096);
	cr_expect_eq(nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM), 33554432);

	for (int i = 0; i < 1000; i++)
		want[i] = (uint8_t)(i * 7 + 3);
	cr_assert_eq(nbd_pwrite(h, want, 1000, 0, 0), 0, "%s", nbd_get_error());
	cr_assert_eq(nbd_pwrite(h, "xyz", 3, 997, LIBNBD_CMD_FLAG_FUA), 0, "%s", nbd_get_error());
	memcpy(want + 997, "xyz", 3);
	cr_assert_eq(nbd_zero(h, 10, 13, 0), 0, "%s", nbd_get_error());
	memset(want + 13, 0, 10);
	cr_assert_eq(nbd_pread(h, buf, 1000, 0, 0), 0, "%s", nbd_get_error());
	cr_expect_arr_eq(buf, want, 1000);
	cr_assert_eq(nbd_pread(h, buf, 1, 999, 0), 0, "%s", nbd_get_error());
	cr_expect_eq(buf[0], 'z');

	/* One byte past the end. */
	cr_expect_eq(nbd_pread(h, buf, 1, 1000, 0), -1);
	cr_expect_eq(nbd_get_errno(), EINVAL, "%s", nbd_get_error());
	cr_expect_eq(nbd_pread(h, buf, 2, 999, 0), -1);
	cr_expect_eq(nbd_get_errno(), EINVAL, "%s", nbd_get_error());
	cr_expect_eq(nbd_pwrite(h, buf, 2, 999, 0), -1);
	cr_expect_eq(nbd_get_errno(), ENOSPC, "%s", nbd_get_error());
	cr_expect_eq(nbd_zero(h, 1, 1000, 0), -1);
	cr_expect_eq(nbd_get_errno(), ENOSPC, "%s", nbd_get_error());

	cr_assert_eq(nbd_flush(h, 0), 0, "%s", nbd_get_error());
	store_read(e, buf, 1000, 0);
	cr_expect_arr_eq(buf, want, 1000, "backing store");
	th_nbd_disconnect(h);
	env_finish(e);
}

Test(commands, odd_size_file)
{
	odd_size(B_FILE);
}

Test(commands, odd_size_nbd)
{
	odd_size(B_NBD);
}

/* ---- export listing, NBD_OPT_INFO, the default export ---- */

struct listing {
	int n;
	char names[8][64];
};

static int list_cb(void *user_data, const char *name, const char *description)
{
	struct listing *l = user_data;

	(void)description;
	if (l->n < 8)
		snprintf(l->names[l->n], sizeof(l->names[0]), "%s", name);
	l->n++;
	return 0;
}

static bool listed(const struct listing *l, const char *name)
{
	for (int i = 0; i < l->n && i < 8; i++)
		if (strcmp(l->names[i], name) == 0)
			return true;
	return false;
}

static void listing(enum backing kind, bool structured)
{
	struct env *e = &g_env;
	struct listing l = { 0 };
	struct nbd_handle *h = th_nbd_new();
	char uri[512];

	env_start(e, kind, ENV_WITH_RO | ENV_WITH_OTHER);
	cr_assert_eq(nbd_set_request_structured_replies(h, structured), 0);
	cr_assert_eq(nbd_set_opt_mode(h, true), 0);
	cr_assert_eq(nbd_set_full_info(h, true), 0);
	th_uri(&e->a, "", uri, sizeof(uri));
	cr_assert_eq(nbd_connect_uri(h, uri), 0, "%s", nbd_get_error());
	cr_assert_eq(nbd_aio_is_negotiating(h), 1);

	cr_assert_eq(nbd_opt_list(h, (nbd_list_callback){ .callback = list_cb, .user_data = &l }),
		     3, "opt_list: %s", nbd_get_error());
	cr_expect_eq(l.n, 3);
	cr_expect(listed(&l, "v") && listed(&l, "ro") && listed(&l, "w"), "listed: %s %s %s",
		  l.names[0], l.names[1], l.names[2]);

	/* INFO on an unknown export fails and leaves negotiation usable. */
	cr_assert_eq(nbd_set_export_name(h, "no-such-export"), 0);
	cr_expect_eq(nbd_opt_info(h), -1, "NBD_OPT_INFO on an unknown export succeeded");
	cr_assert_eq(nbd_aio_is_negotiating(h), 1, "%s", nbd_get_error());

	/* INFO on a known one reports what GO will. */
	cr_assert_eq(nbd_set_export_name(h, "v"), 0);
	cr_assert_eq(nbd_opt_info(h), 0, "opt_info: %s", nbd_get_error());
	cr_expect_eq(nbd_get_size(h), (int64_t)VOL_SIZE);
	{
		char *desc = nbd_get_export_description(h);

		cr_assert_not_null(desc, "%s", nbd_get_error());
		cr_expect_str_eq(desc, "primary test disk");
		free(desc);
	}
	cr_expect_eq(nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM), 33554432);

	/* With three volumes there is no default export. */
	cr_assert_eq(nbd_set_export_name(h, ""), 0);
	cr_expect_eq(nbd_opt_info(h), -1, "the default export resolved among three volumes");
	cr_assert_eq(nbd_aio_is_negotiating(h), 1);

	cr_assert_eq(nbd_set_export_name(h, "w"), 0);
	cr_assert_eq(nbd_opt_go(h), 0, "opt_go: %s", nbd_get_error());
	cr_assert_eq(nbd_aio_is_ready(h), 1);
	{
		char buf[512];

		cr_expect_eq(nbd_pread(h, buf, sizeof(buf), 0, 0), 0, "%s", nbd_get_error());
	}
	cr_expect_eq(th_vol_metric(&e->a, "flashtier_connections", "v", NULL), 0);
	cr_expect_eq(th_vol_metric(&e->a, "flashtier_connections", "ro", NULL), 0);
	{
		/* Volume "w" has a domain label, so look it up with its own labels. */
		char *text = th_http_get(e->a.metrics_port, "/metrics");

		cr_expect_eq(th_metric(text, "flashtier_connections{volume=\"w\",domain=\"vm1\"}"),
			     1, "metrics:\n%s", text);
		free(text);
	}
	th_nbd_disconnect(h);
	env_finish(e);
}

Test(commands, list_file_structured)
{
	listing(B_FILE, true);
}

Test(commands, list_nbd_simple)
{
	listing(B_NBD, false);
}

static void default_export(enum backing kind)
{
	struct env *e = &g_env;
	struct counts c = { 0 };
	struct nbd_handle *named, *dflt;

	env_start(e, kind, 0);
	named = connect_export(e, "v", true);
	dflt = connect_export(e, "", true);
	cr_expect_eq(nbd_get_size(dflt), (int64_t)VOL_SIZE);
	{
		char *name = nbd_get_canonical_export_name(dflt);

		cr_assert_not_null(name, "%s", nbd_get_error());
		cr_expect_str_eq(name, "v", "the default export is the only volume");
		free(name);
	}
	/* Same store: a write through one name reads back through the other. */
	do_pwrite(named, &c, 64 * 1024, 1u << 20, 11, 0);
	do_expect_read(dflt, &c, 64 * 1024, 1u << 20, 11);
	do_pwrite(dflt, &c, 4096, 2u << 20, 12, LIBNBD_CMD_FLAG_FUA);
	do_expect_read(named, &c, 4096, 2u << 20, 12);
	cr_expect_eq(th_vol_metric(&e->a, "flashtier_connections", "v", NULL), 2);
	expect_metrics(e, "v", &c);
	th_nbd_disconnect(dflt);
	th_nbd_disconnect(named);
	env_finish(e);
}

Test(commands, default_export_file)
{
	default_export(B_FILE);
}

Test(commands, default_export_nbd)
{
	default_export(B_NBD);
}

/* ---- async I/O across connections ---- */

/* One asynchronous command and what to check when it completes. */
struct aop {
	int op;
	uint64_t off;
	uint32_t len;
	uint32_t seed; /* OP_WRITE: what was written; OP_READ: what to expect (0 = zeroes) */
	void *buf;
	int conn;
	bool busy;
	bool done;
	int err;
};

static int aop_done(void *user_data, int *error)
{
	struct aop *o = user_data;

	/* Runs inside libnbd with the handle locked: only record the result. */
	o->err = *error;
	o->done = true;
	return 1;
}

static nbd_completion_callback aop_cb(struct aop *o)
{
	return (nbd_completion_callback){ .callback = aop_done, .user_data = o };
}

static void aop_issue(struct nbd_handle *h, struct aop *o, struct counts *c)
{
	int64_t cookie = -1;

	o->busy = true;
	o->done = false;
	o->err = 0;
	switch (o->op) {
	case OP_WRITE:
		th_fill(o->buf, o->len, o->off, o->seed);
		cookie = nbd_aio_pwrite(h, o->buf, o->len, o->off, aop_cb(o), 0);
		break;
	case OP_READ:
		memset(o->buf, 0x5a, o->len);
		cookie = nbd_aio_pread(h, o->buf, o->len, o->off, aop_cb(o), 0);
		break;
	case OP_ZERO:
		cookie = nbd_aio_zero(h, o->len, o->off, aop_cb(o), 0);
		break;
	case OP_FLUSH:
		cookie = nbd_aio_flush(h, aop_cb(o), 0);
		break;
	}
	cr_assert_geq(cookie, 0, "aio command %d: %s", o->op, nbd_get_error());
	count(c, o->op, o->op == OP_FLUSH ? 0 : o->len);
}

/* Drive every handle until at least one event happened; asserts progress within 10 s. */
static void poll_handles(struct nbd_handle **hs, int n)
{
	struct pollfd pfd[16];
	int rc;

	for (int i = 0; i < n; i++) {
		unsigned dir = nbd_aio_get_direction(hs[i]);

		pfd[i].fd = nbd_aio_get_fd(hs[i]);
		pfd[i].events = 0;
		pfd[i].revents = 0;
		if (dir & LIBNBD_AIO_DIRECTION_READ)
			pfd[i].events |= POLLIN;
		if (dir & LIBNBD_AIO_DIRECTION_WRITE)
			pfd[i].events |= POLLOUT;
	}
	rc = poll(pfd, (nfds_t)n, 10000);
	cr_assert_gt(rc, 0, "no progress on %d connections for 10 s", n);
	for (int i = 0; i < n; i++) {
		unsigned dir = nbd_aio_get_direction(hs[i]);

		if ((dir & LIBNBD_AIO_DIRECTION_READ) &&
		    (pfd[i].revents & (POLLIN | POLLHUP | POLLERR)))
			cr_assert_neq(nbd_aio_notify_read(hs[i]), -1, "conn %d: %s", i,
				      nbd_get_error());
		else if ((dir & LIBNBD_AIO_DIRECTION_WRITE) && (pfd[i].revents & POLLOUT))
			cr_assert_neq(nbd_aio_notify_write(hs[i]), -1, "conn %d: %s", i,
				      nbd_get_error());
	}
}

static bool all_done(struct aop *ops, int n)
{
	for (int i = 0; i < n; i++)
		if (ops[i].busy && !ops[i].done)
			return false;
	return true;
}

static void run_until_done(struct nbd_handle **hs, int nh, struct aop *ops, int nops)
{
	while (!all_done(ops, nops))
		poll_handles(hs, nh);
	for (int i = 0; i < nops; i++) {
		if (!ops[i].busy)
			continue;
		cr_assert_eq(ops[i].err, 0, "aio op %d (type %d, %u@%llu on conn %d) failed: %s", i,
			     ops[i].op, ops[i].len, (unsigned long long)ops[i].off, ops[i].conn,
			     strerror(ops[i].err));
		if (ops[i].op == OP_READ) {
			if (ops[i].seed)
				expect_fill(ops[i].buf, ops[i].len, ops[i].off, ops[i].seed,
					    "async read");
			else
				expect_zero(ops[i].buf, ops[i].len, ops[i].off, "async read");
		}
		ops[i].busy = false;
	}
}

static void two_connections(enum backing kind)
{
	struct env *e = &g_env;
	struct counts c = { 0 };
	struct nbd_handle *hs[2];
	struct aop ops[68];
	const uint32_t blk = 64 * 1024;
	int n;

	env_start(e, kind, 0);
	hs[0] = connect_export(e, "v", true);
	hs[1] = connect_export(e, "v", false);
	cr_assert_eq(nbd_can_multi_conn(hs[0]), 1);
	cr_expect_eq(th_vol_metric(&e->a, "flashtier_connections", "v", NULL), 2);

	/* Write on one, flush on the other (multi-conn), read on the other. */
	do_pwrite(hs[0], &c, 1u << 20, 0, 21, 0);
	do_flush(hs[1], &c);
	do_expect_read(hs[1], &c, 1u << 20, 0, 21);
	store_expect_fill(e, 1u << 20, 0, 21);
	do_pwrite(hs[1], &c, 4096, 8192, 22, LIBNBD_CMD_FLAG_FUA);
	do_flush(hs[0], &c);
	do_expect_read(hs[0], &c, 4096, 8192, 22);
	store_expect_fill(e, 4096, 8192, 22);

	/* Interleaved: each connection writes its own 32 blocks while the other does too. */
	memset(ops, 0, sizeof(ops));
	for (int i = 0; i < 64; i++) {
		ops[i].op = OP_WRITE;
		ops[i].conn = i % 2;
		ops[i].off = (4u << 20) + (uint64_t)i * blk;
		ops[i].len = blk;
		ops[i].seed = 300 + (uint32_t)i;
		ops[i].buf = xmalloc(blk);
	}
	for (int i = 0; i < 64; i++)
		aop_issue(hs[ops[i].conn], &ops[i], &c);
	run_until_done(hs, 2, ops, 64);

	/* Cross-read: each connection reads the other's blocks, plus flushes in between. */
	for (int i = 0; i < 64; i++) {
		ops[i].op = OP_READ;
		ops[i].conn = 1 - ops[i].conn;
	}
	n = 64;
	for (int i = 0; i < 64; i++) {
		aop_issue(hs[ops[i].conn], &ops[i], &c);
		if (i % 16 == 15) {
			ops[n].op = OP_FLUSH;
			ops[n].conn = n % 2;
			aop_issue(hs[ops[n].conn], &ops[n], &c);
			n++;
		}
	}
	run_until_done(hs, 2, ops, 68);
	store_expect_fill(e, blk, (4u << 20) + 5 * blk, 305);
	store_expect_fill(e, blk, (4u << 20) + 62 * blk, 362);

	for (int i = 0; i < 64; i++)
		free(ops[i].buf);
	expect_metrics(e, "v", &c);
	th_nbd_disconnect(hs[0]);
	th_nbd_disconnect(hs[1]);
	env_finish(e);
}

Test(commands, two_connections_file)
{
	two_connections(B_FILE);
}

Test(commands, two_connections_nbd)
{
	two_connections(B_NBD);
}

/*
 * One connection with 1024 commands in flight, far beyond what the agent
 * reads ahead (it throttles, then resumes as replies leave): all complete
 * and all data is right.
 */
#define DQ_N 1024

static void deep_queue(enum backing kind)
{
	struct env *e = &g_env;
	struct counts c = { 0 };
	struct nbd_handle *h;
	struct aop *ops = calloc(DQ_N, sizeof(*ops));

	cr_assert_not_null(ops);
	env_start(e, kind, 0);
	h = connect_export(e, "v", kind == B_FILE);
	for (int i = 0; i < DQ_N; i++) {
		ops[i].op = OP_WRITE;
		ops[i].off = (uint64_t)i * 4096;
		ops[i].len = 4096;
		ops[i].seed = 5000 + (uint32_t)i;
		ops[i].buf = xmalloc(4096);
		aop_issue(h, &ops[i], &c);
	}
	cr_expect_gt(nbd_aio_in_flight(h), 128, "the queue was not deep");
	run_until_done(&h, 1, ops, DQ_N);
	for (int i = 0; i < DQ_N; i++) {
		/* Reads in reverse order, so replies cannot simply trail the writes. */
		ops[i].op = OP_READ;
		ops[i].off = (uint64_t)(DQ_N - 1 - i) * 4096;
		ops[i].seed = 5000 + (uint32_t)(DQ_N - 1 - i);
		aop_issue(h, &ops[i], &c);
	}
	run_until_done(&h, 1, ops, DQ_N);
	for (int i = 0; i < DQ_N; i++)
		free(ops[i].buf);
	free(ops);
	expect_metrics(e, "v", &c);
	th_nbd_disconnect(h);
	env_finish(e);
}

Test(commands, deep_queue_file)
{
	deep_queue(B_FILE);
}

Test(commands, deep_queue_nbd)
{
	deep_queue(B_NBD);
}

/*
 * Eight connections with eight commands in flight each, random reads,
 * writes, zeroes and flushes over 16 MiB, checked against an in-memory
 * model. A block range is locked while a command on it is in flight, so
 * the expected content of every read is exact even though commands on
 * different connections race freely.
 */
#define MC_CONNS  8
#define MC_QD	  8
#define MC_BLOCK  4096u
#define MC_BLOCKS 4096u /* 16 MiB */
#define MC_MAXBLK 16u
#define MC_OPS	  2400

struct mc {
	uint8_t *model;
	uint8_t busy[MC_BLOCKS];
	uint64_t rng;
};

static uint32_t mc_rand(struct mc *m)
{
	m->rng ^= m->rng << 13;
	m->rng ^= m->rng >> 7;
	m->rng ^= m->rng << 17;
	return (uint32_t)(m->rng >> 11);
}

static bool mc_lock(struct mc *m, uint64_t off, uint32_t len)
{
	uint64_t b0 = off / MC_BLOCK, b1 = (off + len) / MC_BLOCK;

	for (uint64_t b = b0; b < b1; b++)
		if (m->busy[b])
			return false;
	for (uint64_t b = b0; b < b1; b++)
		m->busy[b] = 1;
	return true;
}

static void mc_unlock(struct mc *m, uint64_t off, uint32_t len)
{
	memset(m->busy + off / MC_BLOCK, 0, len / MC_BLOCK);
}

static void many_connections(enum backing kind)
{
	struct env *e = &g_env;
	struct counts c = { 0 };
	struct nbd_handle *hs[MC_CONNS];
	struct aop ops[MC_CONNS * MC_QD];
	struct mc m = { .rng = 0x2545f4914f6cdd1dull };
	int issued = 0, retired = 0;
	uint32_t seed = 1000;
	void *buf;

	m.model = calloc(1, (size_t)MC_BLOCKS * MC_BLOCK);
	cr_assert_not_null(m.model);
	env_start(e, kind, 0);
	for (int i = 0; i < MC_CONNS; i++)
		hs[i] = connect_export(e, "v", i % 2 == 0);
	cr_expect_eq(th_vol_metric(&e->a, "flashtier_connections", "v", NULL), MC_CONNS);
	memset(ops, 0, sizeof(ops));
	for (int i = 0; i < MC_CONNS * MC_QD; i++) {
		ops[i].conn = i / MC_QD;
		ops[i].buf = xmalloc(MC_MAXBLK * MC_BLOCK);
	}

	while (retired < issued || issued < MC_OPS) {
		/* Retire completions: check reads against the model, apply writes to it. */
		for (int i = 0; i < MC_CONNS * MC_QD; i++) {
			struct aop *o = &ops[i];

			if (!o->busy || !o->done)
				continue;
			cr_assert_eq(o->err, 0, "op type %d %u@%llu on conn %d: %s", o->op, o->len,
				     (unsigned long long)o->off, o->conn, strerror(o->err));
			switch (o->op) {
			case OP_READ:
				if (memcmp(o->buf, m.model + o->off, o->len) != 0) {
					uint32_t k = 0;

					while (((uint8_t *)o->buf)[k] == m.model[o->off + k])
						k++;
					cr_assert_fail(
						"conn %d: read %u@%llu differs from the model at +%u",
						o->conn, o->len, (unsigned long long)o->off, k);
				}
				break;
			case OP_WRITE:
				memcpy(m.model + o->off, o->buf, o->len);
				break;
			case OP_ZERO:
				memset(m.model + o->off, 0, o->len);
				break;
			}
			if (o->op != OP_FLUSH)
				mc_unlock(&m, o->off, o->len);
			o->busy = false;
			retired++;
		}
		/* Fill free slots with new random commands. */
		for (int i = 0; i < MC_CONNS * MC_QD && issued < MC_OPS; i++) {
			struct aop *o = &ops[i];
			uint32_t r = mc_rand(&m) % 100;

			if (o->busy)
				continue;
			o->op = r < 45 ? OP_WRITE : r < 88 ? OP_READ : r < 96 ? OP_ZERO : OP_FLUSH;
			o->len = (1 + mc_rand(&m) % MC_MAXBLK) * MC_BLOCK;
			o->off = (uint64_t)(mc_rand(&m) % (MC_BLOCKS - o->len / MC_BLOCK + 1)) *
				 MC_BLOCK;
			o->seed = seed++;
			if (o->op == OP_FLUSH)
				o->len = 0;
			else if (!mc_lock(&m, o->off, o->len))
				continue; /* overlaps a command in flight: try again later */
			aop_issue(hs[o->conn], o, &c);
			issued++;
		}
		if (retired < issued)
			poll_handles(hs, MC_CONNS);
	}

	/* Everything the model says must be in the store, after a flush. */
	do_flush(hs[3], &c);
	buf = xmalloc((size_t)MC_BLOCKS * MC_BLOCK);
	store_read(e, buf, (size_t)MC_BLOCKS * MC_BLOCK, 0);
	if (memcmp(buf, m.model, (size_t)MC_BLOCKS * MC_BLOCK) != 0) {
		size_t k = 0;

		while (((uint8_t *)buf)[k] == m.model[k])
			k++;
		cr_assert_fail("backing store differs from the model at offset %zu", k);
	}
	free(buf);
	expect_metrics(e, "v", &c);
	for (int i = 0; i < MC_CONNS; i++)
		th_nbd_disconnect(hs[i]);
	for (int i = 0; i < MC_CONNS * MC_QD; i++)
		free(ops[i].buf);
	free(m.model);
	env_finish(e);
}

Test(commands, many_connections_file)
{
	many_connections(B_FILE);
}

Test(commands, many_connections_nbd)
{
	many_connections(B_NBD);
}
