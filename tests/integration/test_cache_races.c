/* SPDX-License-Identifier: MIT */
/*
 * The read cache under concurrency and kill -9 (cache/internal.h names the
 * invariants, cachedev.h the crash ordering): a read never returns data
 * older than the newest write acknowledged before it was sent, and an idle
 * cached volume always reads exactly what its backing store holds.
 *
 * Every test drives the real flashtierd with libnbd's async API at a high
 * queue depth, mostly over a backing store slowed down by nbdkit's delay
 * filter so that backing-store reads (cache fills) and writes really
 * overlap in time, and checks every 512-byte sector of every read against
 * a model:
 *
 *  - every write gets a unique, increasing seed at issue time; a sector it
 *    wrote holds th_fill() data for (position, seed), so a read sector
 *    decodes back to the seed that wrote it (or to "zeroes" after TRIM and
 *    WRITE_ZEROES, or to "garbage");
 *  - writes to one sector are never in flight together (except in the
 *    overlapping-writes test, which settles the winner from the store), so
 *    the seeds that hit a sector increase with time;
 *  - a read sent when the sector's newest acknowledged seed was F may
 *    return F or any later seed written to that sector (a write in flight
 *    while the read was, in either order), never anything older; racing a
 *    write, it may also be torn between such values (the stores do not
 *    make a sector atomic), every byte still the same byte of one of them;
 *  - when nothing is in flight, the agent must return exactly the model's
 *    value and exactly what the backing file holds (read directly);
 *  - TRIM reads back as zeroes: both backing stores used here (the file
 *    backend and nbdkit's file plugin) punch holes, and the direct
 *    comparison with the backing file would say so if not.
 *
 * The tests: fills racing WRITE/TRIM/WRITE_ZEROES round by round (also
 * with two writes to the same blocks in flight), many clients at QD16, and
 * crash loops: kill -9 of the agent, and kill -9 plus a power cut of the
 * cache device (which then loses what was not flushed).
 *
 * Random choices come from one seed per test, printed at the start and in
 * every failure; FT_RACE_SEED=N replays a test's choices (timing differs).
 */
#include <poll.h>
#include <sys/mount.h>
#include <sys/types.h>

#include "nbd_client.h"

#define SECTOR	    512u
#define BLK_SECS    8u /* sectors per 4 KiB cache block */
#define MAX_OP_LEN  (128u << 10)
#define MAX_OP_SECS (MAX_OP_LEN / SECTOR)
#define MAX_VOLS    4
#define MAX_CONNS   24
#define MAX_OPS	    512
#define CACHE_SIZE  "16M"

/* ---- deterministic randomness (splitmix64) ---- */

struct rng {
	uint64_t s;
};

static uint64_t rng_next(struct rng *r)
{
	uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static uint32_t rng_below(struct rng *r, uint32_t n)
{
	return (uint32_t)(rng_next(r) % n);
}

static uint32_t rng_range(struct rng *r, uint32_t lo, uint32_t hi)
{
	return lo + rng_below(r, hi - lo + 1);
}

/* Context printed with every failure: test, seed, round. */
static char g_ctx[256];
static uint64_t g_seed;

static void seed_init(struct rng *r, const char *test, uint64_t dflt)
{
	const char *s = getenv("FT_RACE_SEED");

	g_seed = s && *s ? strtoull(s, NULL, 0) : dflt;
	r->s = g_seed;
	fprintf(stderr, "%s: random seed 0x%llx (FT_RACE_SEED=0x%llx replays it)\n", test,
		(unsigned long long)g_seed, (unsigned long long)g_seed);
	th_fmt(g_ctx, sizeof(g_ctx), "%s seed=0x%llx", test, (unsigned long long)g_seed);
}

/* ---- the model ---- */

#define SEED_INIT 1u /* the backing files' initial content */
#define DEC_ZERO  0u
#define DEC_BAD	  UINT32_MAX

enum wkind {
	W_DATA,
	W_ZERO,
	W_TRIM,
};

/* What seed N wrote: volume, sectors, kind. */
struct wrec {
	uint16_t vol;
	uint8_t kind;
	uint32_t sec, nsec;
};

static struct wrec *g_wrec;
static uint32_t g_wrec_cap;
static uint32_t g_next_seed = SEED_INIT + 1;

struct model {
	uint16_t id;
	char name[32];
	const char *mode;
	uint64_t size;
	uint32_t nsec;
	uint32_t *cur;	     /* newest acknowledged seed per sector */
	uint32_t *pend;	     /* seed of the write in flight to the sector, 0 = none */
	uint32_t *last_zero; /* newest zero-kind seed ever issued to the sector */
	uint32_t *pin;	     /* nonzero: the floor for reads (overlapping-writes rounds) */
	char store[320];     /* backing file, read directly for comparison */
};

static struct model g_models[MAX_VOLS];
static int g_nmodels;

static uint32_t seed_new(const struct model *m, uint32_t sec, uint32_t nsec, enum wkind kind)
{
	if (g_next_seed >= g_wrec_cap) {
		g_wrec_cap = g_wrec_cap ? 2 * g_wrec_cap : 1u << 16;
		g_wrec = realloc(g_wrec, (size_t)g_wrec_cap * sizeof(*g_wrec));
		cr_assert_not_null(g_wrec);
	}
	g_wrec[g_next_seed] = (struct wrec){ m->id, (uint8_t)kind, sec, nsec };
	return g_next_seed++;
}

static bool seed_covers(const struct model *m, uint32_t s, uint32_t x)
{
	const struct wrec *w;

	if (s == SEED_INIT)
		return true;
	if (s <= SEED_INIT || s >= g_next_seed)
		return false;
	w = &g_wrec[s];
	return w->vol == m->id && x >= w->sec && x - w->sec < w->nsec;
}

static bool seed_zero(uint32_t s)
{
	return s > SEED_INIT && s < g_next_seed && g_wrec[s].kind != W_DATA;
}

/* Which seed wrote the sector at byte @pos: DEC_ZERO, DEC_BAD or the seed. */
static uint32_t decode(const void *p, uint64_t pos)
{
	const uint64_t *w = p;
	uint64_t x = w[0] ^ th_fill_word(pos, 0);
	uint32_t s = (uint32_t)x;
	bool zero = true;

	for (unsigned i = 0; i < SECTOR / 8 && zero; i++)
		zero = w[i] == 0;
	if (zero)
		return DEC_ZERO;
	if ((x >> 32) != s || s == 0)
		return DEC_BAD;
	for (unsigned i = 1; i < SECTOR / 8; i++)
		if (w[i] != th_fill_word(pos + 8 * i, s))
			return DEC_BAD;
	return s;
}

/* May a read whose floor (newest acknowledged seed when it was sent) was @floor see @got? */
static bool sector_ok(const struct model *m, uint32_t x, uint32_t got, uint32_t floor)
{
	if (got == DEC_BAD)
		return false;
	if (got == DEC_ZERO)
		return seed_zero(floor) || m->last_zero[x] > floor;
	return got >= floor && !seed_zero(got) && seed_covers(m, got, x);
}

/*
 * A read racing a write may see a sector torn between values: neither the
 * backing stores (buffered pread/pwrite) nor NBD make a sector atomic. The
 * values are those of its intact 8-byte words that sector_ok() accepts,
 * plus the floor and zeroes when they are acceptable; accept the sector if
 * every byte is the same byte of one of them.
 */
static bool sector_torn_ok(const struct model *m, uint32_t x, const void *sec, uint32_t floor)
{
	const uint64_t *w = sec;
	const uint8_t *b = sec;
	uint64_t pos = (uint64_t)x * SECTOR;
	bool zero_ok = sector_ok(m, x, DEC_ZERO, floor);
	uint32_t cand[8];
	int nc = 0;

	if (!seed_zero(floor) && sector_ok(m, x, floor, floor))
		cand[nc++] = floor;
	for (unsigned i = 0; i < SECTOR / 8 && nc < 8; i++) {
		uint64_t y = w[i] ^ th_fill_word(pos + 8 * i, 0);
		bool known = false;

		if (w[i] == 0 || (y >> 32) != (uint32_t)y || !sector_ok(m, x, (uint32_t)y, floor))
			continue;
		for (int k = 0; k < nc; k++)
			known = known || cand[k] == (uint32_t)y;
		if (!known)
			cand[nc++] = (uint32_t)y;
	}
	for (unsigned i = 0; i < SECTOR; i++) {
		bool ok = zero_ok && b[i] == 0;

		for (int k = 0; k < nc && !ok; k++)
			ok = b[i] ==
			     (uint8_t)(th_fill_word(pos + (i & ~7u), cand[k]) >> (8 * (i % 8)));
		if (!ok)
			return false;
	}
	return true;
}

/* The model value a sector reading @got now has (sector_ok() held with @floor). */
static uint32_t resolve(const struct model *m, uint32_t x, uint32_t got, uint32_t floor)
{
	if (got != DEC_ZERO)
		return got;
	return seed_zero(floor) ? floor : m->last_zero[x];
}

static void describe(char *out, size_t len, uint32_t s)
{
	static const char *const kinds[] = { "WRITE", "WRITE_ZEROES", "TRIM" };

	if (s == DEC_BAD)
		snprintf(out, len, "garbage (no write's data)");
	else if (s == DEC_ZERO)
		snprintf(out, len, "zeroes");
	else if (s == SEED_INIT)
		snprintf(out, len, "seed 1 (initial content)");
	else if (s < g_next_seed)
		snprintf(out, len, "seed %u (%s of sectors %u+%u on volume %u)", s,
			 kinds[g_wrec[s].kind], g_wrec[s].sec, g_wrec[s].nsec, g_wrec[s].vol);
	else
		snprintf(out, len, "seed %u (never issued)", s);
}

/* Which seed each 8-byte word of a sector came from, as runs ("words 0-9: seed 7, ..."). */
static void describe_words(char *out, size_t len, const void *sec, uint64_t pos)
{
	const uint64_t *w = sec;
	size_t n = 0;

	out[0] = '\0';
	for (unsigned i = 0; i < SECTOR / 8 && n < len;) {
		uint64_t x = w[i] ^ th_fill_word(pos + 8 * i, 0);
		uint32_t s = w[i] == 0 ? 0 : (x >> 32) == (uint32_t)x ? (uint32_t)x : UINT32_MAX;
		unsigned j = i + 1;

		for (; j < SECTOR / 8; j++) {
			uint64_t y = w[j] ^ th_fill_word(pos + 8 * j, 0);
			uint32_t t = w[j] == 0			? 0
				     : (y >> 32) == (uint32_t)y ? (uint32_t)y
								: UINT32_MAX;

			if (t != s)
				break;
		}
		if (s == UINT32_MAX)
			n += (size_t)snprintf(out + n, len - n, "%swords %u-%u: %016llx...",
					      i ? ", " : "", i, j - 1, (unsigned long long)w[i]);
		else
			n += (size_t)snprintf(out + n, len - n, "%swords %u-%u: %s %u",
					      i ? ", " : "", i, j - 1, s ? "seed" : "zero", s);
		i = j;
	}
}

static __attribute__((noreturn)) void fail_sector(const struct model *m, uint32_t x, uint32_t got,
						  uint32_t floor, const char *what, const void *sec)
{
	char g[160], f[160], c[160], p[160], words[1024] = "";

	if (sec && got == DEC_BAD)
		describe_words(words, sizeof(words), sec, (uint64_t)x * SECTOR);
	describe(g, sizeof(g), got);
	describe(f, sizeof(f), floor);
	describe(c, sizeof(c), m->cur[x]);
	describe(p, sizeof(p), m->pend[x]);
	cr_assert_fail("%s: volume '%s' (%s), sector %u (byte %llu, cache block %u): %s returned "
		       "%s%s%s%s; the newest acknowledged write when the read was sent was %s "
		       "(model now: %s; in flight: %s) [%s]",
		       what, m->name, m->mode, x, (unsigned long long)x * SECTOR, x / BLK_SECS,
		       what, g, words[0] ? " (" : "", words, words[0] ? ")" : "", f, c,
		       m->pend[x] ? p : "none", g_ctx);
	abort();
}

static void model_init(struct model *m, uint16_t id, const char *name, const char *mode,
		       uint64_t size)
{
	memset(m, 0, sizeof(*m));
	m->id = id;
	th_fmt(m->name, sizeof(m->name), "%s", name);
	m->mode = mode;
	m->size = size;
	m->nsec = (uint32_t)(size / SECTOR);
	m->cur = malloc(m->nsec * sizeof(uint32_t));
	m->pend = calloc(m->nsec, sizeof(uint32_t));
	m->last_zero = calloc(m->nsec, sizeof(uint32_t));
	m->pin = calloc(m->nsec, sizeof(uint32_t));
	cr_assert(m->cur && m->pend && m->last_zero && m->pin);
	for (uint32_t i = 0; i < m->nsec; i++)
		m->cur[i] = SEED_INIT;
}

static bool range_pending(const struct model *m, uint32_t x, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++)
		if (m->pend[x + i])
			return true;
	return false;
}

/* ---- asynchronous operations ---- */

enum opkind {
	OP_READ,
	OP_WRITE,
	OP_ZERO,
	OP_TRIM,
	OP_FLUSH,
	OP_CACHE, /* NBD_CMD_CACHE: prefetches into the cache (fills like a read miss) */
};

struct op {
	struct model *m;
	int conn;
	enum opkind kind;
	uint64_t off;
	uint32_t len;
	uint32_t flags;
	uint32_t seed;
	bool busy, done;
	int err;
	uint8_t *buf;
	uint32_t *floor; /* OP_READ: per sector, the floor when it was sent */
};

struct conn {
	struct nbd_handle *h;
	struct model *m;
	bool dead;
};

static struct op g_ops[MAX_OPS];
static struct conn g_conns[MAX_CONNS];
static int g_nconns;
static bool g_killing; /* the agent is being killed: connection errors are expected */

/* Statistics for the summary line. */
static struct {
	uint64_t reads, writes, zeroes, trims, flushes, caches, sectors_checked, torn;
} g_st;

static void ops_init(void)
{
	for (int i = 0; i < MAX_OPS; i++) {
		g_ops[i].buf = aligned_alloc(4096, MAX_OP_LEN);
		g_ops[i].floor = malloc(MAX_OP_SECS * sizeof(uint32_t));
		cr_assert(g_ops[i].buf && g_ops[i].floor);
	}
}

/* Completion: runs inside libnbd, so it only records (and updates the model on an ack). */
static int op_cb(void *user_data, int *error)
{
	struct op *o = user_data;

	o->err = *error;
	o->done = true;
	if (!*error && o->kind >= OP_WRITE && o->kind <= OP_TRIM) {
		struct model *m = o->m;
		uint32_t x0 = (uint32_t)(o->off / SECTOR), n = o->len / SECTOR;

		for (uint32_t i = x0; i < x0 + n; i++) {
			if (o->seed > m->cur[i])
				m->cur[i] = o->seed;
			if (m->pend[i] == o->seed)
				m->pend[i] = 0;
		}
	}
	return 1;
}

static void op_issue(struct op *o)
{
	struct conn *c = &g_conns[o->conn];
	struct model *m = o->m;
	nbd_completion_callback cb = { .callback = op_cb, .user_data = o };
	uint32_t x0 = (uint32_t)(o->off / SECTOR), n = o->len / SECTOR;
	int64_t cookie = -1;

	cr_assert(o->len <= MAX_OP_LEN && o->off + o->len <= m->size && o->len % SECTOR == 0);
	o->busy = true;
	o->done = false;
	o->err = 0;
	o->seed = 0;
	switch (o->kind) {
	case OP_READ:
		for (uint32_t i = 0; i < n; i++)
			o->floor[i] = m->pin[x0 + i] ? m->pin[x0 + i] : m->cur[x0 + i];
		memset(o->buf, 0xa5, o->len);
		cookie = nbd_aio_pread(c->h, o->buf, o->len, o->off, cb, 0);
		g_st.reads++;
		break;
	case OP_WRITE:
	case OP_ZERO:
	case OP_TRIM:
		o->seed = seed_new(m, x0, n,
				   o->kind == OP_WRITE	? W_DATA
				   : o->kind == OP_ZERO ? W_ZERO
							: W_TRIM);
		for (uint32_t i = x0; i < x0 + n; i++) {
			m->pend[i] = o->seed;
			if (o->kind != OP_WRITE)
				m->last_zero[i] = o->seed;
		}
		if (o->kind == OP_WRITE) {
			th_fill(o->buf, o->len, o->off, o->seed);
			cookie = nbd_aio_pwrite(c->h, o->buf, o->len, o->off, cb, o->flags);
			g_st.writes++;
		} else if (o->kind == OP_ZERO) {
			cookie = nbd_aio_zero(c->h, o->len, o->off, cb, o->flags);
			g_st.zeroes++;
		} else {
			cookie = nbd_aio_trim(c->h, o->len, o->off, cb, o->flags);
			g_st.trims++;
		}
		break;
	case OP_FLUSH:
		cookie = nbd_aio_flush(c->h, cb, 0);
		g_st.flushes++;
		break;
	case OP_CACHE:
		cookie = nbd_aio_cache(c->h, o->len, o->off, cb, 0);
		g_st.caches++;
		break;
	}
	if (cookie < 0) {
		cr_assert(g_killing, "aio command %d on connection %d to '%s': %s [%s]", o->kind,
			  o->conn, m->name, nbd_get_error(), g_ctx);
		o->done = true;
		o->err = ENOTCONN;
	}
}

/*
 * A completed op: check a read's every sector against its floors; any error
 * fails. @exact: nothing was in flight, so no torn sector either.
 */
static void op_finish_checked(struct op *o, bool exact)
{
	struct model *m = o->m;

	cr_assert(o->busy && o->done);
	o->busy = false;
	if (o->err) {
		cr_assert(g_killing, "command %d at %llu+%u on '%s' failed: %s [%s]", o->kind,
			  (unsigned long long)o->off, o->len, m->name, strerror(o->err), g_ctx);
		return; /* outcome unknown: a write's sectors stay pending */
	}
	if (o->kind != OP_READ)
		return;
	for (uint32_t i = 0; i < o->len / SECTOR; i++) {
		uint32_t x = (uint32_t)(o->off / SECTOR) + i;
		uint32_t got = decode(o->buf + (size_t)i * SECTOR, (uint64_t)x * SECTOR);

		if (sector_ok(m, x, got, o->floor[i]))
			continue;
		if (got == DEC_BAD && !exact &&
		    sector_torn_ok(m, x, o->buf + (size_t)i * SECTOR, o->floor[i])) {
			g_st.torn++;
			continue;
		}
		fail_sector(m, x, got, o->floor[i], "READ", o->buf + (size_t)i * SECTOR);
	}
	g_st.sectors_checked += o->len / SECTOR;
}

static void op_finish(struct op *o)
{
	op_finish_checked(o, false);
}

/* One poll over every live connection (up to @timeout_ms); processes what is ready. */
static void drive(int timeout_ms)
{
	struct pollfd pfd[MAX_CONNS];
	int idx[MAX_CONNS], k = 0, rc;

	for (int i = 0; i < g_nconns; i++) {
		struct conn *c = &g_conns[i];
		unsigned dir;

		if (c->dead || !c->h)
			continue;
		if (nbd_aio_is_dead(c->h) || nbd_aio_is_closed(c->h)) {
			cr_assert(g_killing, "connection %d to '%s' died: %s [%s]", i, c->m->name,
				  nbd_get_error(), g_ctx);
			c->dead = true;
			continue;
		}
		dir = nbd_aio_get_direction(c->h);
		pfd[k].fd = nbd_aio_get_fd(c->h);
		pfd[k].events = (short)(((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
					((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0));
		pfd[k].revents = 0;
		idx[k++] = i;
	}
	if (k == 0)
		return;
	rc = poll(pfd, (nfds_t)k, timeout_ms);
	if (rc <= 0)
		return;
	for (int j = 0; j < k; j++) {
		struct conn *c = &g_conns[idx[j]];
		unsigned dir = nbd_aio_get_direction(c->h);
		int r = 0;

		if ((dir & LIBNBD_AIO_DIRECTION_READ) &&
		    (pfd[j].revents & (POLLIN | POLLHUP | POLLERR)))
			r = nbd_aio_notify_read(c->h);
		else if ((dir & LIBNBD_AIO_DIRECTION_WRITE) && (pfd[j].revents & POLLOUT))
			r = nbd_aio_notify_write(c->h);
		if (r < 0) {
			cr_assert(g_killing, "connection %d to '%s': %s [%s]", idx[j], c->m->name,
				  nbd_get_error(), g_ctx);
			c->dead = true;
		}
	}
}

/* Keep the connections moving for @ms milliseconds. */
static void drive_for(double ms)
{
	double end = th_now_ms() + ms;

	for (;;) {
		double left = end - th_now_ms();

		if (left <= 0)
			return;
		drive(left < 1 ? 0 : (int)left);
	}
}

static bool op_pending(const struct op *o)
{
	return o->busy && !o->done;
}

/* Run until ops [first, first + n) are all done, then finish them (checks). */
static void wait_ops(int first, int n, int timeout_ms)
{
	double end = th_now_ms() + timeout_ms;

	for (;;) {
		bool any = false;

		for (int i = first; i < first + n && !any; i++)
			any = op_pending(&g_ops[i]);
		if (!any)
			break;
		cr_assert_lt(th_now_ms(), end, "requests still in flight after %d ms [%s]",
			     timeout_ms, g_ctx);
		drive(50);
	}
	for (int i = first; i < first + n; i++)
		if (g_ops[i].busy)
			op_finish(&g_ops[i]);
}

/* ---- environment: agent, nbdkit (delay filter over a directory of files), cache ---- */

struct vspec {
	const char *name;
	bool kit;	    /* behind nbdkit's delay filter (else a file volume) */
	const char *mode;   /* cache mode */
	const char *cutoff; /* sequential_cutoff */
	const char *quota;
	uint64_t size;
};

static struct {
	struct ft_agent a;
	char dir[256];
	char kitdir[300];
	char kit_sock[320];
	pid_t kit;
	char kit_dirarg[340];
	const char *kit_args[16];
	char vols_json[4096];
	char extra_json[1024];
} g;

static void env_teardown(void)
{
	/* An aborted test: show what the helpers said too. */
	static const char *const logs[] = { "kit.log", "cachedev.log", "nbdfuse.log" };

	for (size_t i = 0; g.dir[0] && i < sizeof(logs) / sizeof(logs[0]); i++) {
		char path[320];

		snprintf(path, sizeof(path), "%s/%s", g.dir, logs[i]);
		if (access(path, R_OK) == 0) {
			fprintf(stderr, "%s:\n", path);
			th_dump_file(path);
		}
	}
	th_env_teardown(&g.a, &g.kit, g.dir);
}

TestSuite(cache_races, .fini = env_teardown, .timeout = 120);

/* Create @path of @size bytes holding th_fill(SEED_INIT) everywhere. */
static void make_store(const char *path, uint64_t size)
{
	const size_t chunk = 1u << 20;
	void *buf = malloc(chunk);
	int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);

	cr_assert(buf && fd >= 0, "create %s: %s", path, strerror(errno));
	for (uint64_t off = 0; off < size; off += chunk) {
		size_t n = size - off < chunk ? (size_t)(size - off) : chunk;

		th_fill(buf, n, off, SEED_INIT);
		cr_assert_eq(pwrite(fd, buf, n, (off_t)off), (ssize_t)n);
	}
	close(fd);
	free(buf);
}

/*
 * Backing files, nbdkit (if any volume is behind it; @delays are the
 * delay filter's parameters) and the config; does not start the agent.
 */
static void env_setup(const struct vspec *vs, int n, const char *const *delays)
{
	char vol[768];
	bool any_kit = false;
	int len = 0;

	memset(&g, 0, sizeof(g));
	th_mkdtemp(g.dir, sizeof(g.dir));
	th_fmt(g.kitdir, sizeof(g.kitdir), "%s/kit", g.dir);
	cr_assert_eq(mkdir(g.kitdir, 0755), 0);
	cr_assert_leq(n, MAX_VOLS);
	g_nmodels = n;
	len += snprintf(g.vols_json + len, sizeof(g.vols_json) - (size_t)len, "{");
	for (int i = 0; i < n; i++) {
		struct model *m = &g_models[i];
		char backing[400];

		model_init(m, (uint16_t)(i + 1), vs[i].name, vs[i].mode, vs[i].size);
		th_fmt(m->store, sizeof(m->store), "%s/%s.img", vs[i].kit ? g.kitdir : g.dir,
		       vs[i].name);
		make_store(m->store, vs[i].size);
		any_kit = any_kit || vs[i].kit;
		if (vs[i].kit)
			th_fmt(backing, sizeof(backing), "nbd+unix:///%s.img?socket=%s/kit.sock",
			       vs[i].name, g.dir);
		else
			th_fmt(backing, sizeof(backing), "%s", m->store);
		th_fmt(vol, sizeof(vol),
		       "%s \"%s\": { \"backing\": \"%s\", \"cache\": { \"mode\": \"%s\", "
		       "\"sequential_cutoff\": \"%s\", \"quota\": \"%s\" } }",
		       i ? "," : "", vs[i].name, backing, vs[i].mode, vs[i].cutoff, vs[i].quota);
		len += snprintf(g.vols_json + len, sizeof(g.vols_json) - (size_t)len, "%s", vol);
	}
	len += snprintf(g.vols_json + len, sizeof(g.vols_json) - (size_t)len, " }");
	cr_assert_lt((size_t)len, sizeof(g.vols_json));
	th_fmt(g.extra_json, sizeof(g.extra_json),
	       "\"reactors\": 2, \"cache\": { \"path\": \"%s/cache.img\", \"size\": \"%s\" },",
	       g.dir, CACHE_SIZE);
	if (any_kit) {
		int k = 0;

		th_fmt(g.kit_dirarg, sizeof(g.kit_dirarg), "dir=%s", g.kitdir);
		g.kit_args[k++] = "--filter=delay";
		g.kit_args[k++] = "file";
		g.kit_args[k++] = g.kit_dirarg;
		for (int i = 0; delays && delays[i] && k < 15; i++)
			g.kit_args[k++] = delays[i];
		g.kit_args[k] = NULL;
		g.kit = th_nbdkit_start(g.dir, "kit", g.kit_sock, sizeof(g.kit_sock), g.kit_args);
	}
}

/*
 * A fresh nbdkit on the same files. nbdkit 1.32 can abort when its client
 * dies with delayed requests in flight ("raw_send_socket: Assertion `sock
 * >= 0' failed"), so the crash tests start a new one after every crash;
 * SIGTERM lets the old one finish what it was doing first.
 */
static void kit_restart(void)
{
	if (!g.kit)
		return;
	th_nbdkit_stop(g.kit);
	g.kit = th_nbdkit_start(g.dir, "kit", g.kit_sock, sizeof(g.kit_sock), g.kit_args);
}

static void agent_start(void)
{
	ft_agent_start_in(&g.a, g.dir, g.vols_json, g.extra_json);
}

/* @per_vol connections to each volume, in volume order. */
static void conns_open(int per_vol)
{
	g_nconns = 0;
	for (int v = 0; v < g_nmodels; v++)
		for (int i = 0; i < per_vol; i++) {
			struct conn *c = &g_conns[g_nconns++];

			cr_assert_leq(g_nconns, MAX_CONNS);
			c->h = th_nbd_connect(&g.a, g_models[v].name);
			c->m = &g_models[v];
			c->dead = false;
		}
}

static void conns_close(bool clean)
{
	for (int i = 0; i < g_nconns; i++) {
		if (!g_conns[i].h)
			continue;
		if (clean)
			th_nbd_disconnect(g_conns[i].h);
		else
			th_nbd_close(g_conns[i].h);
		g_conns[i].h = NULL;
	}
	g_nconns = 0;
}

/* A random connection of model @m. */
static int conn_of(struct rng *r, const struct model *m)
{
	int first = -1, n = 0;

	for (int i = 0; i < g_nconns; i++)
		if (g_conns[i].m == m) {
			if (first < 0)
				first = i;
			n++;
		}
	cr_assert_gt(n, 0);
	return first + (int)rng_below(r, (uint32_t)n);
}

/* ---- metrics ---- */

static double mval(const char *text, const char *name, const char *vol)
{
	char prefix[256];
	double v;

	th_fmt(prefix, sizeof(prefix), "%s{volume=\"%s\",domain=\"\"}", name, vol);
	v = th_metric(text, prefix);
	cr_assert_geq(v, 0, "metric %s missing", prefix);
	return v;
}

struct cstats {
	double hits, misses, fills, dropped, invalidations, evictions, checksum, passthrough;
};

static struct cstats cache_stats(const struct model *m)
{
	char *t = th_http_get(g.a.metrics_port, "/metrics");
	struct cstats s = {
		.hits = mval(t, "flashtier_cache_hits_total", m->name),
		.misses = mval(t, "flashtier_cache_misses_total", m->name),
		.fills = mval(t, "flashtier_cache_fills_total", m->name),
		.dropped = mval(t, "flashtier_cache_fills_dropped_total", m->name),
		.invalidations = mval(t, "flashtier_cache_invalidations_total", m->name),
		.evictions = mval(t, "flashtier_cache_evictions_total", m->name),
		.checksum = mval(t, "flashtier_cache_checksum_errors_total", m->name),
		.passthrough = mval(t, "flashtier_cache_passthrough", m->name),
	};

	free(t);
	return s;
}

/*
 * Wait until no fill is still landing: fills + dropped fills stay put for a
 * while. The bound is generous: on a loaded machine, prefetches through the
 * FUSE-backed device of the power-cut test can keep landing for seconds.
 */
static void settle(void)
{
	double end = th_now_ms() + 30000, prev = -1;
	int stable = 0;

	while (th_now_ms() < end) {
		char *t = th_http_get(g.a.metrics_port, "/metrics");
		double v = 0;

		for (int i = 0; i < g_nmodels; i++)
			v += mval(t, "flashtier_cache_fills_total", g_models[i].name) +
			     mval(t, "flashtier_cache_fills_dropped_total", g_models[i].name);
		free(t);
		if (v == prev) {
			if (++stable >= 3)
				return;
		} else {
			stable = 0;
		}
		prev = v;
		th_sleep_ms(2);
	}
	cr_assert_fail("cache fills did not settle within 30 s [%s]", g_ctx);
}

/* ---- verification of idle ranges: model and backing store ---- */

/*
 * Read sectors [x0, x0 + n) of @m through the agent in pieces of @piece
 * sectors starting @skew sectors early (unaligned reads when @skew is not a
 * multiple of 8), up to 16 at a time on connection @ci; every sector must
 * pass sector_ok() against the model's newest acknowledged value and equal
 * the backing file; then the model takes the value read (which settles
 * writes whose outcome a kill left unknown).
 */
static void verify_range(int ci, struct model *m, uint32_t x0, uint32_t n, uint32_t piece,
			 uint32_t skew)
{
	uint32_t start = x0 > skew ? x0 - skew : 0, end = x0 + n > m->nsec ? m->nsec : x0 + n;
	uint8_t *store = malloc(MAX_OP_LEN);
	int fd = open(m->store, O_RDONLY);
	uint32_t next = start;
	int base = MAX_OPS - 16;

	cr_assert(store && fd >= 0 && piece <= MAX_OP_SECS);
	for (int i = base; i < MAX_OPS; i++)
		cr_assert(!g_ops[i].busy);
	for (;;) {
		bool any = false;

		for (int i = base; i < MAX_OPS; i++) {
			struct op *o = &g_ops[i];

			if (o->busy && o->done) {
				uint32_t ox = (uint32_t)(o->off / SECTOR), on = o->len / SECTOR;

				op_finish_checked(o, true); /* sector_ok() against the floors */
				cr_assert_eq(pread(fd, store, o->len, (off_t)o->off),
					     (ssize_t)o->len);
				for (uint32_t k = 0; k < on; k++) {
					uint32_t x = ox + k;
					const uint8_t *a = o->buf + (size_t)k * SECTOR;
					const uint8_t *b = store + (size_t)k * SECTOR;
					uint32_t got = decode(a, (uint64_t)x * SECTOR);

					if (memcmp(a, b, SECTOR) != 0) {
						char ga[160], gb[160];

						describe(ga, sizeof(ga), got);
						describe(gb, sizeof(gb),
							 decode(b, (uint64_t)x * SECTOR));
						cr_assert_fail(
							"volume '%s' (%s), sector %u (cache block "
							"%u): the agent returned %s but the "
							"backing store holds %s [%s]",
							m->name, m->mode, x, x / BLK_SECS, ga, gb,
							g_ctx);
					}
					m->cur[x] = resolve(m, x, got, o->floor[k]);
					m->pend[x] = 0;
				}
			}
			if (!o->busy && next < end) {
				uint32_t len = end - next < piece ? end - next : piece;

				*o = (struct op){ .m = m,
						  .conn = ci,
						  .kind = OP_READ,
						  .off = (uint64_t)next * SECTOR,
						  .len = len * SECTOR,
						  .buf = o->buf,
						  .floor = o->floor };
				op_issue(o);
				next += len;
			}
			any = any || o->busy;
		}
		if (!any && next >= end)
			break;
		drive(50);
	}
	close(fd);
	free(store);
}

/* Every volume, through its first connection. */
static void verify_all(int piece)
{
	for (int v = 0; v < g_nmodels; v++) {
		int ci = 0;

		while (g_conns[ci].m != &g_models[v])
			ci++;
		verify_range(ci, &g_models[v], 0, g_models[v].nsec, (uint32_t)piece, 0);
	}
}

/* ---- 1. fills racing WRITE / TRIM / WRITE_ZEROES, round by round ---- */

#define REGION_SECS 128u /* 64 KiB: 16 cache blocks */

/* Plan one round's ops for @m on region [rs, rs + REGION_SECS) into g_ops[*n...]. */
static void plan_round(struct rng *r, struct model *m, uint32_t rs, bool overlap, int *n,
		       int *reads, int *nreads, int *writes, int *nwrites)
{
	uint32_t x = rs, end = rs + REGION_SECS;

	/* Writes: disjoint segments of every shape. */
	while (x < end) {
		uint32_t len, a = (x + BLK_SECS - 1) & ~(BLK_SECS - 1), k;
		struct op *o;

		switch (rng_below(r, 7)) {
		case 0:
		case 1:
			len = rng_range(r, 1, 7); /* sub-4K */
			break;
		case 2:
			len = rng_range(r, 9, 40); /* unaligned, several blocks */
			break;
		default:
			/* Whole blocks (up to the next boundary first when unaligned). */
			len = a > x ? a - x : BLK_SECS * rng_range(r, 1, 4);
			break;
		}
		if (len > end - x)
			len = end - x;
		k = rng_below(r, 20);
		if (k < 13) {
			o = &g_ops[(*n)++];
			*o = (struct op){ .m = m,
					  .off = (uint64_t)x * SECTOR,
					  .len = len * SECTOR,
					  .buf = o->buf,
					  .floor = o->floor };
			o->kind = k < 9 ? OP_WRITE : k < 11 ? OP_TRIM : OP_ZERO;
			o->flags = rng_below(r, 8) == 0 ? LIBNBD_CMD_FLAG_FUA : 0;
			o->conn = conn_of(r, m);
			writes[(*nwrites)++] = (int)(o - g_ops);
			/* A second write to the same sectors, in flight together with the first. */
			if (overlap && x % BLK_SECS == 0 && len % BLK_SECS == 0 &&
			    rng_below(r, 2) == 0) {
				struct op *o2 = &g_ops[(*n)++];
				uint32_t sub = rng_below(r, 3) == 0 ? BLK_SECS : len;

				*o2 = (struct op){ .m = m,
						   .off = o->off,
						   .len = sub * SECTOR,
						   .buf = o2->buf,
						   .floor = o2->floor };
				o2->kind = rng_below(r, 4) == 0 ? OP_ZERO : OP_WRITE;
				o2->conn = conn_of(r, m);
				writes[(*nwrites)++] = (int)(o2 - g_ops);
				for (uint32_t i = x; i < x + sub; i++)
					m->pin[i] = m->cur[i];
			}
		}
		x += len;
	}
	/* Reads: the whole region, and pieces reaching a little past its edges. */
	for (uint32_t i = 0, nr = rng_range(r, 3, 7); i < nr; i++) {
		struct op *o = &g_ops[(*n)++];
		uint32_t s, len;

		if (i == 0) {
			s = rs;
			len = REGION_SECS;
		} else if (rng_below(r, 3) == 0) {
			s = rs + BLK_SECS * rng_below(r, REGION_SECS / BLK_SECS);
			len = BLK_SECS * rng_range(r, 1, 2);
		} else {
			s = rs + rng_below(r, REGION_SECS + 16);
			s = s >= 8 ? s - 8 : 0;
			if (s >= m->nsec)
				s = m->nsec - 1;
			len = rng_range(r, 1, 48);
		}
		if (s + len > m->nsec)
			len = m->nsec - s;
		if (s + len > rs + REGION_SECS + 8)
			len = rs + REGION_SECS + 8 - s;
		*o = (struct op){ .m = m,
				  .kind = OP_READ,
				  .off = (uint64_t)s * SECTOR,
				  .len = len * SECTOR,
				  .buf = o->buf,
				  .floor = o->floor };
		/* Now and then a prefetch (NBD_CMD_CACHE) of the range instead. */
		if (i > 0 && rng_below(r, 5) == 0)
			o->kind = OP_CACHE;
		o->conn = conn_of(r, m);
		reads[(*nreads)++] = (int)(o - g_ops);
	}
}

static void shuffle(struct rng *r, int *a, int n)
{
	for (int i = n - 1; i > 0; i--) {
		int j = (int)rng_below(r, (uint32_t)i + 1), t = a[i];

		a[i] = a[j];
		a[j] = t;
	}
}

/* After an overlapping-writes round: the winner of each doubly written sector is the store's. */
static void settle_pins(struct model *m, uint32_t rs, uint32_t first_seed)
{
	int fd = open(m->store, O_RDONLY);
	uint8_t sec[SECTOR];

	cr_assert_geq(fd, 0);
	for (uint32_t x = rs; x < rs + REGION_SECS; x++) {
		uint32_t got, floor = UINT32_MAX;

		if (!m->pin[x])
			continue;
		/* Both writes were acknowledged: the older one of this round is the floor. */
		for (uint32_t s = first_seed; s < g_next_seed; s++)
			if (seed_covers(m, s, x)) {
				floor = s;
				break;
			}
		cr_assert_neq(floor, UINT32_MAX);
		cr_assert_eq(pread(fd, sec, SECTOR, (off_t)x * SECTOR), SECTOR);
		got = decode(sec, (uint64_t)x * SECTOR);
		if (!sector_ok(m, x, got, floor))
			fail_sector(m, x, got, floor, "backing store (direct read)", sec);
		m->cur[x] = resolve(m, x, got, floor);
		m->pin[x] = 0;
	}
	close(fd);
}

static void fill_race_rounds(const char *test, uint64_t dflt_seed, int rounds, bool overlap)
{
	static const struct vspec vs[] = {
		{ "wt", true, "write-through", "0", "100%", 16u << 20 },
		{ "wa", true, "write-around", "1M", "100%", 16u << 20 },
	};
	/* Reads slower than writes, zeroes and trims slower still: every ordering happens. */
	static const char *const delays[] = { "rdelay=3ms", "delay-write=2ms", "delay-zero=5ms",
					      "delay-trim=5ms", NULL };
	uint32_t nreg = (16u << 20) / (REGION_SECS * SECTOR), used = 0;
	uint32_t *order = malloc(nreg * sizeof(uint32_t));
	struct cstats st[2];
	struct rng r;
	double t0 = th_now_ms();

	seed_init(&r, test, dflt_seed);
	ops_init();
	env_setup(vs, 2, delays);
	agent_start();
	conns_open(2);
	for (uint32_t i = 0; i < nreg; i++)
		order[i] = i;
	shuffle(&r, (int *)order, (int)nreg);

	for (int round = 0; round < rounds; round++) {
		int n = 0, reads[MAX_OPS], nreads = 0, writes[MAX_OPS], nwrites = 0, all[MAX_OPS],
		    nall = 0;
		uint32_t rs[2], round_seed = g_next_seed;

		th_fmt(g_ctx, sizeof(g_ctx), "%s seed=0x%llx round=%d", test,
		       (unsigned long long)g_seed, round);
		for (int v = 0; v < 2; v++) {
			/* Mostly fresh regions (misses), sometimes a cached one (hits). */
			uint32_t reg = used < nreg && (used < 4 || rng_below(&r, 10) < 7)
					       ? order[used++]
					       : order[rng_below(&r, used)];

			rs[v] = reg * REGION_SECS;
			plan_round(&r, &g_models[v], rs[v], overlap, &n, reads, &nreads, writes,
				   &nwrites);
		}
		cr_assert_leq(n, MAX_OPS - 16);
		switch (rng_below(&r, 3)) {
		case 0: /* reads first: their fills are in flight when the writes arrive */
			for (int i = 0; i < nreads; i++)
				op_issue(&g_ops[reads[i]]);
			drive_for(rng_range(&r, 0, 3500) / 1000.0);
			for (int i = 0; i < nwrites; i++)
				op_issue(&g_ops[writes[i]]);
			break;
		case 1: /* writes first: reads miss while the writes are in flight */
			for (int i = 0; i < nwrites; i++)
				op_issue(&g_ops[writes[i]]);
			drive_for(rng_range(&r, 0, 3500) / 1000.0);
			for (int i = 0; i < nreads; i++)
				op_issue(&g_ops[reads[i]]);
			break;
		default: /* interleaved */
			for (int i = 0; i < nreads; i++)
				all[nall++] = reads[i];
			for (int i = 0; i < nwrites; i++)
				all[nall++] = writes[i];
			shuffle(&r, all, nall);
			for (int i = 0; i < nall; i++) {
				op_issue(&g_ops[all[i]]);
				if (rng_below(&r, 4) == 0)
					drive_for(rng_range(&r, 0, 800) / 1000.0);
			}
			break;
		}
		wait_ops(0, n, 20000);

		for (int v = 0; v < 2; v++) {
			struct model *m = &g_models[v];
			uint32_t lo = rs[v] >= 8 ? rs[v] - 8 : 0;

			if (overlap)
				settle_pins(m, rs[v], round_seed);
			/* Right away, while fills of the round may still be landing... */
			verify_range(conn_of(&r, m), m, lo, REGION_SECS + 16, REGION_SECS + 16, 0);
		}
		/* ... and again once every fill has landed or been dropped: now mostly hits. */
		settle();
		for (int v = 0; v < 2; v++) {
			struct model *m = &g_models[v];
			uint32_t lo = rs[v] >= 8 ? rs[v] - 8 : 0;

			verify_range(conn_of(&r, m), m, lo, REGION_SECS + 16, BLK_SECS, 0);
			verify_range(conn_of(&r, m), m, lo, REGION_SECS + 16, 13, 3);
		}
	}
	th_fmt(g_ctx, sizeof(g_ctx), "%s seed=0x%llx final", test, (unsigned long long)g_seed);
	settle();
	verify_all(128);
	for (int v = 0; v < 2; v++) {
		st[v] = cache_stats(&g_models[v]);
		fprintf(stderr,
			"%s: volume %s: hits %.0f misses %.0f fills %.0f dropped %.0f "
			"invalidations %.0f\n",
			test, g_models[v].name, st[v].hits, st[v].misses, st[v].fills,
			st[v].dropped, st[v].invalidations);
		cr_expect_gt(st[v].hits, rounds,
			     "volume %s: only %.0f cache hits in %d rounds [%s]", g_models[v].name,
			     st[v].hits, rounds, g_ctx);
		cr_expect_gt(st[v].invalidations, 0, "volume %s: no write met a cached block [%s]",
			     g_models[v].name, g_ctx);
		cr_expect_eq(st[v].checksum, 0, "volume %s: checksum errors [%s]", g_models[v].name,
			     g_ctx);
		cr_expect_eq(st[v].passthrough, 0, "volume %s went pass-through [%s]",
			     g_models[v].name, g_ctx);
	}
	/* The races this test is about really happened: fills overtaken by writes were dropped. */
	cr_expect_gt(st[0].dropped + st[1].dropped, 0, "no fill was ever overtaken by a write [%s]",
		     g_ctx);
	fprintf(stderr,
		"%s: %d rounds, %llu reads (%llu sectors checked, %llu torn by a racing write), "
		"%llu prefetches, %llu writes, %llu zeroes, %llu trims in %.1f s\n",
		test, rounds, (unsigned long long)g_st.reads,
		(unsigned long long)g_st.sectors_checked, (unsigned long long)g_st.torn,
		(unsigned long long)g_st.caches, (unsigned long long)g_st.writes,
		(unsigned long long)g_st.zeroes, (unsigned long long)g_st.trims,
		(th_now_ms() - t0) / 1000);
	conns_close(true);
	th_env_finish(&g.a, &g.kit, g.dir);
	free(order);
}

/*
 * Rounds on fresh and cached 64 KiB regions of a write-through and a
 * write-around volume: READs that miss (fills start) and disjoint WRITE,
 * TRIM and WRITE_ZEROES of every shape (sub-4K, unaligned, whole blocks)
 * to the same blocks, issued together in every order; in-round reads may
 * see old or new data (never older than acknowledged), and afterwards, both
 * right away and once fills settled, every sector must be the newest write
 * and equal the backing store.
 */
Test(cache_races, fill_vs_write_trim_zeroes)
{
	fill_race_rounds("fill_vs_write_trim_zeroes", 0xf111ace5ull, 150, false);
}

/*
 * The same with two writes in flight together to the same whole blocks
 * (either may win): once both are acknowledged, the cache (write-through
 * copies in particular) must agree with whichever one the store kept.
 */
Test(cache_races, overlapping_writes_agree_with_store)
{
	fill_race_rounds("overlapping_writes_agree_with_store", 0x0be71a9ull, 80, true);
}

/* ---- 2. many clients: a random mix on overlapping ranges ---- */

/* A random request for @o on its model: never a write to a sector with a write in flight. */
static void gen_op(struct rng *r, struct op *o, bool allow_flush)
{
	struct model *m = o->m;
	uint32_t w = rng_below(r, 100), x = 0, len = 0;
	enum opkind kind = w < 47		     ? OP_READ
			   : w < 50		     ? OP_CACHE
			   : w < 80		     ? OP_WRITE
			   : w < 87		     ? OP_ZERO
			   : w < 94		     ? OP_TRIM
			   : (w < 97 && allow_flush) ? OP_FLUSH
						     : OP_READ;

	for (int tries = 0; tries < 8; tries++) {
		switch (rng_below(r, 4)) {
		case 0:
			len = rng_range(r, 1, 7);
			break;
		case 1:
			len = BLK_SECS;
			break;
		case 2:
			len = rng_range(r, 9, 64);
			break;
		default:
			len = BLK_SECS * rng_range(r, 2, 16);
			break;
		}
		/* A hot quarter of the volume takes most requests. */
		x = rng_below(r, 10) < 6 ? rng_below(r, m->nsec / 4) : rng_below(r, m->nsec);
		if (len % BLK_SECS == 0)
			x &= ~(BLK_SECS - 1);
		if (x + len > m->nsec)
			len = m->nsec - x;
		if (kind == OP_READ || kind == OP_CACHE || kind == OP_FLUSH ||
		    !range_pending(m, x, len))
			break;
		if (tries == 7)
			kind = OP_READ;
	}
	o->kind = kind;
	o->off = (uint64_t)x * SECTOR;
	o->len = len * SECTOR;
	o->flags = kind >= OP_WRITE && kind <= OP_TRIM && rng_below(r, 10) == 0
			   ? LIBNBD_CMD_FLAG_FUA
			   : 0;
	if (kind == OP_FLUSH)
		o->len = 0, o->off = 0;
}

/*
 * Keep @qd requests in flight on every connection until @ms have passed.
 * With @kill, SIGKILL the agent then (requests still in flight) and collect
 * whatever replies it had sent; otherwise wait for everything.
 */
static void run_mix(struct rng *r, int qd, double ms, bool kill_at_end)
{
	double end = th_now_ms() + ms;

	cr_assert_leq(g_nconns * qd, MAX_OPS - 16);
	for (int i = 0; i < g_nconns * qd; i++) {
		g_ops[i].busy = false;
		g_ops[i].m = g_conns[i / qd].m;
		g_ops[i].conn = i / qd;
	}
	while (th_now_ms() < end) {
		for (int i = 0; i < g_nconns * qd; i++) {
			struct op *o = &g_ops[i];

			if (o->busy && !o->done)
				continue;
			if (o->busy)
				op_finish(o);
			gen_op(r, o, !kill_at_end);
			op_issue(o);
		}
		drive(5);
	}
	if (kill_at_end) {
		g_killing = true;
		kill(g.a.pid, SIGKILL);
		waitpid(g.a.pid, NULL, 0);
		g.a.pid = 0;
		/* Replies the agent sent before it died still count. */
		for (double stop = th_now_ms() + 5000; th_now_ms() < stop;) {
			bool any = false;

			for (int i = 0; i < g_nconns; i++)
				any = any || !g_conns[i].dead;
			if (!any)
				break;
			drive(50);
		}
		for (int i = 0; i < g_nconns * qd; i++)
			if (g_ops[i].busy && g_ops[i].done)
				op_finish(&g_ops[i]);
			else
				g_ops[i].busy = false; /* no reply: outcome unknown */
		return;
	}
	wait_ops(0, g_nconns * qd, 30000);
}

/*
 * 8 connections x QD16 on each of a write-through volume behind a slow
 * store and a write-around file volume whose quota keeps it evicting, for
 * a few seconds: every read is checked against the writes acknowledged
 * before it was sent; then, idle, everything against the model and store.
 */
Test(cache_races, many_clients)
{
	static const struct vspec vs[] = {
		{ "wt", true, "write-through", "0", "100%", 2u << 20 },
		{ "wa", false, "write-around", "1M", "1M", 4u << 20 },
	};
	static const char *const delays[] = { "rdelay=1ms", "delay-write=1ms", "delay-zero=2ms",
					      "delay-trim=2ms", NULL };
	struct rng r;
	double t0 = th_now_ms();

	seed_init(&r, "many_clients", 0xc11e475ull);
	ops_init();
	env_setup(vs, 2, delays);
	agent_start();
	conns_open(8);
	run_mix(&r, 16, 4000, false);
	th_fmt(g_ctx, sizeof(g_ctx), "many_clients seed=0x%llx final", (unsigned long long)g_seed);
	settle();
	verify_all(128);
	settle();
	verify_all(8);
	for (int v = 0; v < 2; v++) {
		struct cstats s = cache_stats(&g_models[v]);

		fprintf(stderr,
			"many_clients: volume %s: hits %.0f misses %.0f fills %.0f dropped %.0f "
			"invalidations %.0f evictions %.0f\n",
			g_models[v].name, s.hits, s.misses, s.fills, s.dropped, s.invalidations,
			s.evictions);
		cr_expect_gt(s.hits, 100, "volume %s: only %.0f hits [%s]", g_models[v].name,
			     s.hits, g_ctx);
		cr_expect_eq(s.checksum, 0);
		cr_expect_eq(s.passthrough, 0);
		if (v == 1)
			cr_expect_gt(s.evictions, 0, "the 1M quota never evicted [%s]", g_ctx);
	}
	fprintf(stderr,
		"many_clients: %llu reads (%llu sectors checked, %llu torn by a racing write), "
		"%llu prefetches, %llu writes, %llu zeroes, %llu trims, %llu flushes in %.1f s\n",
		(unsigned long long)g_st.reads, (unsigned long long)g_st.sectors_checked,
		(unsigned long long)g_st.torn, (unsigned long long)g_st.caches,
		(unsigned long long)g_st.writes, (unsigned long long)g_st.zeroes,
		(unsigned long long)g_st.trims, (unsigned long long)g_st.flushes,
		(th_now_ms() - t0) / 1000);
	conns_close(true);
	th_env_finish(&g.a, &g.kit, g.dir);
}

/* ---- 4. kill -9 at many points ---- */

/* Overwrite a few blocks of each volume in every shape, wait for every ack, SIGKILL at once. */
static void overwrite_then_kill(struct rng *r)
{
	int n = 0;

	for (int v = 0; v < g_nmodels; v++) {
		struct model *m = &g_models[v];
		uint32_t nblk = m->nsec / BLK_SECS;

		for (int i = 0; i < 12; i++) {
			/* Even blocks only: a straddling write may run into the next (odd) one. */
			uint32_t b = 2 * rng_below(r, nblk / 2 - 1), x = b * BLK_SECS,
				 len = BLK_SECS;
			struct op *o = &g_ops[n];
			enum opkind kind = OP_WRITE;

			if (range_pending(m, x, 2 * BLK_SECS))
				continue;
			switch (rng_below(r, 10)) {
			case 0:
			case 1:
			case 2:
			case 3:
				break; /* whole block */
			case 4:
			case 5:
				len = rng_range(r, 1, 7); /* sub-4K */
				x += rng_below(r, BLK_SECS - len + 1);
				break;
			case 6:
				x += 5; /* straddles into block b + 1 */
				len = 6;
				break;
			case 7:
				kind = OP_TRIM;
				break;
			default:
				kind = OP_ZERO;
				len = rng_range(r, 1, 8);
				break;
			}
			*o = (struct op){ .m = m,
					  .kind = kind,
					  .off = (uint64_t)x * SECTOR,
					  .len = len * SECTOR,
					  .buf = o->buf,
					  .floor = o->floor };
			o->conn = conn_of(r, m);
			op_issue(o);
			n++;
		}
	}
	wait_ops(0, n, 20000);
	g_killing = true;
	kill(g.a.pid, SIGKILL);
	waitpid(g.a.pid, NULL, 0);
	g.a.pid = 0;
}

/*
 * A cache device that can lose power: nbdkit (delay filter over the cache
 * filter in writeback mode, over a file) seen as a regular file through
 * nbdfuse. SIGKILLing that nbdkit drops every write it took since the last
 * flush, like a drive's volatile write cache in a power cut.
 */
static struct {
	bool on;
	pid_t kit, fuse;
	char sock[320], mnt[300], file[340], img[320], pidfile[320];
} g_pc;

static bool pc_available(void)
{
	return geteuid() == 0 && access("/dev/fuse", R_OK | W_OK) == 0 &&
	       system("command -v nbdfuse >/dev/null 2>&1") == 0;
}

static void pc_start(void)
{
	char imgarg[340];
	const char *args[] = { "--filter=delay", "--filter=cache",  "file", imgarg,
			       "wdelay=1ms",	 "cache=writeback", NULL };
	char logpath[320];

	th_fmt(imgarg, sizeof(imgarg), "file=%s", g_pc.img);
	g_pc.kit = th_nbdkit_start(g.dir, "cachedev", g_pc.sock, sizeof(g_pc.sock), args);
	th_fmt(logpath, sizeof(logpath), "%s/nbdfuse.log", g.dir);
	unlink(g_pc.pidfile);
	g_pc.fuse = fork();
	cr_assert_geq(g_pc.fuse, 0);
	if (g_pc.fuse == 0) {
		int fd = open(logpath, O_WRONLY | O_CREAT | O_APPEND, 0644);

		if (fd >= 0) {
			dup2(fd, 1);
			dup2(fd, 2);
		}
		execlp("nbdfuse", "nbdfuse", "-P", g_pc.pidfile, g_pc.file, "--unix", g_pc.sock,
		       (char *)NULL);
		_exit(127);
	}
	for (int i = 0; i < 500; i++) {
		struct stat st;

		if (stat(g_pc.pidfile, &st) == 0 && st.st_size > 0 && stat(g_pc.file, &st) == 0 &&
		    st.st_size == (off_t)(16u << 20))
			return;
		cr_assert_eq(waitpid(g_pc.fuse, NULL, WNOHANG), 0, "nbdfuse died (%s)", logpath);
		th_sleep_ms(10);
	}
	th_dump_file(logpath);
	cr_assert_fail("nbdfuse did not come up");
}

/* Unmount and reap nbdfuse; with @cut, SIGKILL the device's nbdkit first (power cut). */
static void pc_stop(bool cut)
{
	if (cut)
		th_kill(&g_pc.kit);
	if (g_pc.fuse > 0) {
		if (umount2(g_pc.mnt, 0) < 0)
			umount2(g_pc.mnt, MNT_DETACH);
		waitpid(g_pc.fuse, NULL, 0);
		g_pc.fuse = 0;
	}
	th_nbdkit_stop(g_pc.kit);
	g_pc.kit = 0;
}

static void pc_teardown(void)
{
	if (g_pc.on) {
		th_agent_kill(&g.a); /* nothing may hold the mount */
		pc_stop(true);
	}
	env_teardown();
}

/*
 * The crash loop of both crash tests: @iters times, start the agent on the
 * cache and backing files of the previous iteration, check every sector,
 * then run a concurrent mixed workload for a random 50-300 ms (or overwrite
 * cached blocks and wait for the acks) and crash. With @power, every crash
 * also cuts the cache device's power (pc_*).
 */
static void crash_loop(const char *test, uint64_t dflt_seed, int iters, bool power)
{
	static const struct vspec vs[] = {
		{ "wt", false, "write-through", "0", "100%", 4u << 20 },
		{ "wa", true, "write-around", "0", "50%", 4u << 20 },
		{ "wq", false, "write-through", "0", "1M", 2u << 20 },
	};
	static const char *const delays[] = { "rdelay=2ms", "delay-write=2ms", "delay-zero=4ms",
					      "delay-trim=4ms", NULL };
	double hits = 0, t0 = th_now_ms(), reattached = 0, csum = 0;
	int after_ack = 0;
	struct rng r;
	char line[512];
	FILE *f;

	seed_init(&r, test, dflt_seed);
	ops_init();
	env_setup(vs, 3, delays);
	if (power) {
		g_pc.on = true;
		th_fmt(g_pc.img, sizeof(g_pc.img), "%s/cachedev.img", g.dir);
		th_fmt(g_pc.mnt, sizeof(g_pc.mnt), "%s/mnt", g.dir);
		th_fmt(g_pc.file, sizeof(g_pc.file), "%s/cache.img", g_pc.mnt);
		th_fmt(g_pc.pidfile, sizeof(g_pc.pidfile), "%s/nbdfuse.pid", g.dir);
		th_make_file(g.dir, "cachedev.img", 16u << 20, line, sizeof(line));
		cr_assert_eq(mkdir(g_pc.mnt, 0755), 0);
		th_fmt(g.extra_json, sizeof(g.extra_json),
		       "\"reactors\": 2, \"cache\": { \"path\": \"%s\", \"size\": \"%s\" },",
		       g_pc.file, CACHE_SIZE);
	}
	for (int it = 0; it <= iters; it++) {
		th_fmt(g_ctx, sizeof(g_ctx), "%s seed=0x%llx iteration=%d", test,
		       (unsigned long long)g_seed, it);
		g_killing = false;
		if (power)
			pc_start();
		agent_start();
		conns_open(2);
		/* Everything reads as acknowledged (or as a write in flight at the crash). */
		verify_all(128);
		for (int v = 0; v < g_nmodels; v++) {
			struct cstats s = cache_stats(&g_models[v]);

			/*
			 * Checksum errors are allowed here: a slot freed by an
			 * invalidation or eviction may be refilled before its
			 * emptied record reaches the device, and the data CRC is
			 * what turns that old record into a miss. The data checks
			 * above are what matters.
			 */
			hits += s.hits;
			csum += s.checksum;
			cr_assert_eq(s.passthrough, 0, "volume %s went pass-through [%s]",
				     g_models[v].name, g_ctx);
		}
		if (it == iters)
			break;
		if (it % 3 == 2) {
			/* Make the blocks cached, then overwrite them and die right after the acks.
			 */
			settle();
			overwrite_then_kill(&r);
			after_ack++;
		} else {
			run_mix(&r, 8, rng_range(&r, 50, 300), true);
		}
		if (power)
			pc_stop(true);
		conns_close(false);
		/* Let the store finish what nbdkit and io_uring still had in hand. */
		th_sleep_ms(100);
		kit_restart();
	}
	th_fmt(g_ctx, sizeof(g_ctx), "%s seed=0x%llx clean restart", test,
	       (unsigned long long)g_seed);
	/* A clean stop and start on top of it all. */
	conns_close(true);
	cr_assert_eq(ft_agent_stop(&g.a), 0);
	agent_start();
	conns_open(1);
	verify_all(64);
	f = fopen(g.a.log, "r");
	cr_assert_not_null(f);
	while (fgets(line, sizeof(line), f)) {
		const char *p = strstr(line, "reattached ");

		if (p)
			reattached += strtod(p + 11, NULL);
	}
	fclose(f);
	fprintf(stderr,
		"%s: %d crashes (%d right after acks), %.0f hits after restarts, "
		"%.0f blocks reattached, %.0f checksum misses, %llu reads, %llu writes, "
		"%llu zeroes, %llu trims in %.1f s\n",
		test, iters, after_ack, hits, reattached, csum, (unsigned long long)g_st.reads,
		(unsigned long long)g_st.writes, (unsigned long long)g_st.zeroes,
		(unsigned long long)g_st.trims, (th_now_ms() - t0) / 1000);
	cr_expect_gt(hits, 0, "restarted agents never served a cache hit [%s]", g_ctx);
	cr_expect_gt(reattached, 0, "no restart reattached cached blocks [%s]", g_ctx);
	conns_close(true);
	cr_assert_eq(ft_agent_stop(&g.a), 0);
	if (power)
		pc_stop(false);
	th_env_finish(&g.a, &g.kit, g.dir);
}

/*
 * Three cached volumes (write-through on a file, write-around behind a slow
 * store, write-through on a file with a 1M quota that keeps evicting), one
 * cache file and the backing files kept across the loop: a concurrent mixed
 * workload on several connections is SIGKILLed after a random 50-300 ms
 * (or right after the acks of overwrites of cached blocks), the agent is
 * restarted on the same cache, and every sector must then read as its last
 * acknowledged value or one of the writes in flight at the kill, and as
 * what the backing store holds. The restarted agents must serve hits.
 */
Test(cache_races, kill9_many_points)
{
	crash_loop("kill9_many_points", 0x4b111e9ull, 24, false);
}

/*
 * The same, but every crash is also a power cut of the cache device: it
 * loses every write not yet flushed (kill -9 alone loses nothing the agent
 * wrote, so this is what tests the flush ordering of cachedev.h: emptied
 * records durable before the store sees the write). The backing stores
 * keep what they acknowledged.
 */
Test(cache_races, power_cut_of_cache_device, .fini = pc_teardown)
{
	if (!pc_available())
		cr_skip_test("needs root, /dev/fuse and nbdfuse to cut the cache device's power");
	crash_loop("power_cut_of_cache_device", 0x90e4c07ull, 12, true);
}
