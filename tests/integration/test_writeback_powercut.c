/* SPDX-License-Identifier: MIT */
/*
 * Power cuts of the cache device under a mixed workload (DESIGN.md,
 * "Durability contract", rule 2): no write acknowledged before a completed
 * FLUSH, and no acknowledged FUA write, is ever lost, and nothing that was
 * never written (or is older than that) ever comes back.
 *
 * The agent runs with FLASHTIER_TEST_POWERCUT=N[:tear] (cache/powercut.c):
 * its cache device keeps every write not covered by a completed device
 * FLUSH volatile and, at the N-th device write, the process dies (exit 86)
 * losing them all (":tear": a prefix of whole sectors of that N-th write
 * reaches the file first). The volume's backing store is a file, which
 * keeps what it was given (a process dies, the host's page cache does not).
 *
 * One crash point (workload seed, N, tear):
 *  1. fresh files: a 4 MiB store holding th_fill(seed 1) ("initial
 *     content"), no cache file (the agent formats a 64M one, 16M log);
 *  2. start the agent with the hook at N; one libnbd connection issues a
 *     deterministic seeded workload at queue depth up to 8: 4 KiB writes,
 *     overwrites of a hot set, sub-block and unaligned writes, multi-block
 *     writes, WRITE_ZEROES, TRIM, reads (checked exactly as they complete),
 *     FLUSH every few ops, FUA on some writes, now and then a SIGUSR1
 *     (drain); a small dirty limit and low watermarks keep destaging busy
 *     during the workload; the client records which requests were sent and
 *     which were acknowledged before the socket died;
 *     if the workload ends first (it ends with a FLUSH), SIGTERM: the crash
 *     may still come in the shutdown; a clean exit means N lay past the
 *     workload's end, which is not counted as a crash point;
 *  3. the store file as the cut left it may only hold, per sector, the
 *     initial content, zeroes, or data some write to that sector sent;
 *     then restart without the hook (recovery), read the whole volume, one
 *     4 KiB request per block (so that every block cached is served from
 *     the read cache), and check every 512-byte sector against the model
 *     (below);
 *  4. on every VERIFY_EVERY-th point (default: all), a further write, FUA
 *     write and FLUSH round trip must work and read back; on every third
 *     of those, after a drain (SIGUSR1, in write-back) the volume must read
 *     the same again, and the store file itself must hold exactly that;
 *     and a second restart (after SIGTERM or SIGKILL, alternately) must
 *     read exactly the same volume.
 *
 * Values: the op with index i writes th_fill(seed ID_BASE + i) (the
 * position and the op's id in every 8 bytes), so every sector decodes back
 * to the op that wrote it, to "initial content", to zeroes, or to garbage.
 * Two ops never overlap at sector granularity while in flight (an op waits
 * for conflicting ones; ops are sent strictly in list order), so per
 * sector the writes are totally ordered by their index.
 *
 * The model, per sector, after the crash:
 *  - a write is durable if it was acknowledged with FUA, or acknowledged
 *    before a FLUSH was sent that was itself acknowledged (NBD: a flush
 *    covers the writes completed before it); with the strict model
 *    (write-through, where an ack means the store has it) every
 *    acknowledged write is durable;
 *  - the floor is the newest durable write to the sector (else the
 *    initial content);
 *  - accepted: the floor, or any write to the sector sent after it
 *    (acknowledged but not flushed, or in flight at the crash);
 *  - anything else fails: an older value ("LOST"), garbage or a value no
 *    write to this sector produced ("CORRUPT");
 *  - WRITE_ZEROES reads back as zeroes, and so does TRIM in write-through
 *    (the store is a file and the file backend punches holes);
 *  - but in write-back a TRIM is advisory where it does not cover a whole
 *    4 KiB block: the engine logs only the whole blocks of a TRIM ("a
 *    partial TRIM may leave data as it is", cache/writeback.c), which NBD
 *    allows (a client may assume nothing about trimmed data). Such a
 *    sector of a TRIM reads as zeroes or as the value it had before the
 *    TRIM, so such a TRIM never raises the floor, and adds only "zeroes" to
 *    the accepted values. Whole blocks of a TRIM are checked strictly.
 *    FT_POWERCUT_TRIM=advisory makes every TRIM sector advisory (an engine
 *    that drops TRIMs), =strict none.
 *
 * Crash points: a count-only run (FLASHTIER_TEST_POWERCUT=0) of each
 * workload seed gives W, its number of device writes ("powercut: W device
 * writes" at exit); the points are spread evenly over 1..W of each seed,
 * every third one torn. Environment:
 *   FT_POWERCUT_POINTS=P   crash points (default 1000; the test tops up
 *                          until P points really crashed)
 *   FT_SOAK=1              20000 points over 167 seeds (run the binary with
 *                          --timeout 0 or a large one; make check's is 600 s)
 *   FT_POWERCUT_SEEDS=S    workload seeds (default 8, or P/120)
 *   FT_POWERCUT_SEED=X     the first seed (the others follow from it)
 *   FT_POWERCUT_JOBS=J     crash points run in parallel (default 2)
 *   FT_POWERCUT_MODE=M     the volume's cache mode (default write-back)
 *   FT_POWERCUT_ONLY=S:N[:tear]  replay one crash point (seed S, as printed)
 *   FT_POWERCUT_REPEAT=R   ... R times, FT_POWERCUT_JOBS side by side (timing
 *                          decides some failures: this says how often)
 *   FT_POWERCUT_VERIFY_EVERY=K   round trip + second restart every K-th point
 *   FT_POWERCUT_DRAIN_EVERY=D    of those, the drain check on every D-th
 *                          (default 3: a drain takes ~100 ms, the engine's tick)
 *   FT_POWERCUT_KEEP=1     keep the directory of a failed point
 *   FT_POWERCUT_KEEP_GOING=1  run every point, list every failure
 *   FT_POWERCUT_TIMING=1   per-phase timestamps of every point on stderr
 *   FT_POWERCUT_DUMP_OPS=1 print a failed run's requests and their outcome
 *   FT_POWERCUT_SNAPSHOT=1 copy cache and store as the power cut left them
 *                          (*.at-cut) before the recovery (debugging)
 *   FT_POWERCUT_TMP=DIR    where the files go (default: /dev/shm for
 *                          crash_points, /tmp for the write-through self-test)
 * Every failure names its seed and N and the FT_POWERCUT_ONLY that replays
 * it (the workload replays exactly; the agent's timing, and so which device
 * write is the N-th, may differ a little).
 *
 * Files live on /dev/shm by default: each crash point starts the agent two
 * or three times, and on a disk every start's fdatasync()s triple the run
 * time. The cache device's I/O goes through the hook either way (blocking
 * I/O under its lock); only the backing store's file backend then runs
 * inline instead of through io_uring, which the write-through self-test
 * below (on /tmp) still covers.
 *
 * Other tests here: selftest_write_through runs the same harness against
 * the read cache's write-through mode with the strict model (60 points),
 * and powercut_layer drives the hook in-process through a file backend:
 * what it keeps (flushed, FUA), loses (the rest), reads back before a
 * flush, and how it tears (a reproducible prefix of 1..n-1 sectors).
 *
 * That the check can fail was shown with three temporary mutations, each
 * caught within the first crash points: the hook's FLUSH making nothing
 * durable, the hook losing the last write before each FLUSH, and the
 * engine acknowledging a FLUSH without a device flush.
 */
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>

#include "flashtier/backend.h"
#include "flashtier/powercut.h"
#include "nbd_client.h"

extern char **environ;

#define SECTOR	    512u
#define BLK	    4096u
#define BLK_SECS    8u
#define VOL_SIZE    (4u << 20)
#define NSEC	    (VOL_SIZE / SECTOR)
#define NBLK	    (VOL_SIZE / BLK)
#define MAX_QD	    8
#define MAX_OP_SECS 128u /* 64 KiB */
#define HOT_BLOCKS  24
#define NOPS	    300
#define SEED_INIT   1u		/* the store's initial content */
#define ID_BASE	    2u		/* op i writes seed ID_BASE + i */
#define RT_BASE	    0x40000000u /* seeds of the post-recovery round trips */
#define DEC_ZERO    0u
#define DEC_BAD	    UINT32_MAX
#define PC_EXIT	    86
#define MAX_JOBS    8
#define MAX_SEEDS   512
#define ERRLEN	    8192

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

/* ---- the workload ---- */

enum kind {
	K_WRITE,
	K_ZERO,
	K_TRIM,
	K_FLUSH,
	K_READ,
	K_DRAIN, /* not an NBD request: SIGUSR1 to the agent (destage everything now) */
};

static const char *const kind_name[] = {
	"WRITE", "WRITE_ZEROES", "TRIM", "FLUSH", "READ", "SIGUSR1"
};

struct wop {
	uint8_t kind;
	bool fua;
	uint32_t sec, nsec;
};

struct workload {
	uint64_t seed;
	uint32_t nops;
	struct wop *ops;
	uint64_t count_writes; /* W of the count-only run */
	uint64_t count_flushes;
};

static bool is_write(const struct wop *o)
{
	return o->kind == K_WRITE || o->kind == K_ZERO || o->kind == K_TRIM;
}

static bool covers(const struct wop *o, uint32_t x)
{
	return is_write(o) && x >= o->sec && x - o->sec < o->nsec;
}

/* TRIM sectors that may keep their data: see the top of the file. */
enum trim_model {
	TRIM_STRICT,	   /* every trimmed sector reads as zeroes */
	TRIM_WHOLE_BLOCKS, /* sectors of a partly trimmed 4 KiB block may keep their data */
	TRIM_ADVISORY,	   /* every trimmed sector may keep its data */
};

static enum trim_model g_trim = TRIM_STRICT;

static bool trim_advisory(const struct wop *o, uint32_t x)
{
	uint32_t b0 = x / BLK_SECS * BLK_SECS;

	if (o->kind != K_TRIM || g_trim == TRIM_STRICT)
		return false;
	return g_trim == TRIM_ADVISORY || b0 < o->sec || b0 + BLK_SECS > o->sec + o->nsec;
}

/* A range of whole blocks or, one time in three, of sectors inside one block. */
static void zero_range(struct rng *r, struct wop *o, uint32_t b)
{
	if (rng_below(r, 3) == 0) {
		o->nsec = rng_range(r, 1, BLK_SECS - 1);
		o->sec = b * BLK_SECS + rng_below(r, BLK_SECS - o->nsec + 1);
	} else {
		o->sec = b * BLK_SECS;
		o->nsec = rng_range(r, 1, 16) * BLK_SECS;
	}
}

static void gen_workload(struct workload *w, uint64_t seed, uint32_t nops)
{
	struct rng r = { seed };
	uint32_t hot[HOT_BLOCKS], until_flush = rng_range(&r, 3, 12);

	w->seed = seed;
	w->nops = nops;
	cr_assert_leq(nops, NOPS * 4);
	w->ops = calloc(nops, sizeof(*w->ops));
	cr_assert_not_null(w->ops);
	for (int i = 0; i < HOT_BLOCKS; i++)
		hot[i] = rng_below(&r, NBLK);
	for (uint32_t i = 0; i + 1 < nops; i++) {
		struct wop *o = &w->ops[i];
		uint32_t p = rng_below(&r, 100);
		uint32_t b = rng_below(&r, 10) < 6 ? hot[rng_below(&r, HOT_BLOCKS)]
						   : rng_below(&r, NBLK);

		if (--until_flush == 0) {
			o->kind = K_FLUSH;
			until_flush = rng_range(&r, 3, 12);
			continue;
		}
		if (rng_below(&r, 150) == 0) {
			o->kind = K_DRAIN;
			continue;
		}
		o->kind = K_WRITE;
		if (p < 30) { /* one block */
			o->sec = b * BLK_SECS;
			o->nsec = BLK_SECS;
		} else if (p < 44) { /* overwrite a hot block */
			o->sec = hot[rng_below(&r, HOT_BLOCKS)] * BLK_SECS;
			o->nsec = BLK_SECS;
		} else if (p < 56) { /* sub-block: 1-7 sectors inside one block */
			o->nsec = rng_range(&r, 1, BLK_SECS - 1);
			o->sec = b * BLK_SECS + rng_below(&r, BLK_SECS - o->nsec + 1);
		} else if (p < 66) { /* 2-16 blocks, aligned or not */
			uint32_t nb = rng_range(&r, 2, 16);

			o->sec = b * BLK_SECS;
			o->nsec = nb * BLK_SECS;
			if (rng_below(&r, 2)) {
				o->sec += rng_range(&r, 1, BLK_SECS - 1);
				o->nsec -= rng_below(&r, BLK_SECS);
			}
		} else if (p < 73) {
			o->kind = K_ZERO;
			zero_range(&r, o, b);
		} else if (p < 80) {
			o->kind = K_TRIM;
			zero_range(&r, o, b);
		} else if (p < 92) {
			o->kind = K_READ;
			o->nsec = rng_range(&r, 1, 32);
			o->sec = rng_below(&r, 2) ? b * BLK_SECS : rng_below(&r, NSEC);
		} else { /* a FUA overwrite of a hot block */
			o->sec = hot[rng_below(&r, HOT_BLOCKS)] * BLK_SECS;
			o->nsec = BLK_SECS;
			o->fua = true;
		}
		if (is_write(o) && rng_below(&r, 10) == 0)
			o->fua = true;
		if (o->sec >= NSEC)
			o->sec = NSEC - 1;
		if (o->sec + o->nsec > NSEC)
			o->nsec = NSEC - o->sec;
	}
	w->ops[nops - 1].kind = K_FLUSH; /* everything acknowledged is durable at the end */
}

/* ---- sector contents ---- */

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

/* ---- one run of a workload against an agent ---- */

struct ost {
	bool sent, done;
	int err;
	uint64_t send_ev, ack_ev;
	int slot;
};

struct run;

struct cbarg {
	struct run *r;
	uint32_t i;
};

struct run {
	const struct workload *w;
	struct ost *st;
	struct cbarg *cb;
	uint64_t ev;
	uint32_t *cur;	/* per sector: newest acknowledged value (seed) */
	uint32_t *firm; /* per sector: the same, advisory TRIMs left out */
	uint16_t *busy; /* per sector: ops in flight over it */
	uint8_t *slotbuf[MAX_QD];
	bool slot_used[MAX_QD];
	int inflight;
	uint32_t next;
	pid_t agent; /* for K_DRAIN */
	bool failed;
	char err[ERRLEN];
	uint64_t reads_checked;
};

static void run_init(struct run *r)
{
	memset(r, 0, sizeof(*r));
	r->st = calloc(NOPS * 4, sizeof(*r->st));
	r->cb = calloc(NOPS * 4, sizeof(*r->cb));
	r->cur = malloc(NSEC * sizeof(uint32_t));
	r->firm = malloc(NSEC * sizeof(uint32_t));
	r->busy = calloc(NSEC, sizeof(uint16_t));
	cr_assert(r->st && r->cb && r->cur && r->firm && r->busy);
	for (int i = 0; i < MAX_QD; i++) {
		r->slotbuf[i] = aligned_alloc(4096, MAX_OP_SECS * SECTOR);
		cr_assert_not_null(r->slotbuf[i]);
	}
}

static void run_reset(struct run *r, const struct workload *w)
{
	r->w = w; /* w->nops <= NOPS * 4: checked by gen_workload() */
	memset(r->st, 0, w->nops * sizeof(*r->st));
	for (uint32_t x = 0; x < NSEC; x++)
		r->cur[x] = r->firm[x] = SEED_INIT;
	memset(r->busy, 0, NSEC * sizeof(uint16_t));
	memset(r->slot_used, 0, sizeof(r->slot_used));
	r->ev = 0;
	r->inflight = 0;
	r->next = 0;
	r->failed = false;
	r->err[0] = '\0';
}

static __attribute__((format(printf, 2, 3))) void run_fail(struct run *r, const char *fmt, ...)
{
	va_list ap;

	if (r->failed)
		return;
	r->failed = true;
	va_start(ap, fmt);
	vsnprintf(r->err, sizeof(r->err), fmt, ap);
	va_end(ap);
}

static bool zero_kind(const struct workload *w, uint32_t s)
{
	return s >= ID_BASE && s - ID_BASE < w->nops && w->ops[s - ID_BASE].kind != K_WRITE;
}

static int op_cb(void *user_data, int *error)
{
	struct cbarg *a = user_data;
	struct run *r = a->r;
	const struct wop *o = &r->w->ops[a->i];
	struct ost *s = &r->st[a->i];

	s->done = true;
	s->err = *error;
	s->ack_ev = ++r->ev;
	r->inflight--;
	if (o->kind != K_FLUSH)
		for (uint32_t x = o->sec; x < o->sec + o->nsec; x++)
			r->busy[x]--;
	if (!*error && is_write(o))
		for (uint32_t x = o->sec; x < o->sec + o->nsec; x++) {
			r->cur[x] = ID_BASE + a->i;
			if (!trim_advisory(o, x))
				r->firm[x] = ID_BASE + a->i;
		}
	if (!*error && o->kind == K_READ) {
		/* Nothing overlapping was in flight: exactly the newest acknowledged value. */
		for (uint32_t k = 0; k < o->nsec; k++) {
			uint32_t x = o->sec + k, want = r->cur[x], alt = r->firm[x];
			uint32_t got = decode(r->slotbuf[s->slot] + (size_t)k * SECTOR,
					      (uint64_t)x * SECTOR);

			if (zero_kind(r->w, want) ? got == DEC_ZERO : got == want)
				continue;
			/* After an advisory TRIM: zeroes, or the value from before it. */
			if (want != alt && (zero_kind(r->w, alt) ? got == DEC_ZERO : got == alt))
				continue;
			run_fail(r,
				 "READ op #%u (sectors %u+%u), before the crash: sector %u read "
				 "seed 0x%x, want %s 0x%x%s (nothing overlapping was in flight)",
				 a->i, o->sec, o->nsec, x, got,
				 zero_kind(r->w, want) ? "zeroes, written by" : "seed", want,
				 want != alt ? " or what it held before that advisory TRIM" : "");
			break;
		}
		r->reads_checked += o->nsec;
	}
	if (s->slot >= 0)
		r->slot_used[s->slot] = false;
	return 1;
}

/* Send op @i. Returns 0, or -1 when the connection is gone (the op counts as not sent). */
static int issue(struct run *r, struct nbd_handle *h, uint32_t i)
{
	const struct wop *o = &r->w->ops[i];
	struct ost *s = &r->st[i];
	nbd_completion_callback cb = { .callback = op_cb, .user_data = &r->cb[i] };
	uint64_t off = (uint64_t)o->sec * SECTOR, len = (uint64_t)o->nsec * SECTOR;
	uint32_t fl = o->fua ? LIBNBD_CMD_FLAG_FUA : 0;
	int64_t cookie = -1;

	r->cb[i] = (struct cbarg){ r, i };
	s->slot = -1;
	if (o->kind == K_DRAIN) {
		s->sent = s->done = true;
		s->send_ev = s->ack_ev = ++r->ev;
		kill(r->agent, SIGUSR1);
		return 0;
	}
	if (o->kind == K_WRITE || o->kind == K_READ) {
		for (int k = 0; k < MAX_QD && s->slot < 0; k++)
			if (!r->slot_used[k])
				s->slot = k;
		if (s->slot < 0)
			abort(); /* cannot happen: at most MAX_QD in flight */
		r->slot_used[s->slot] = true;
	}
	s->sent = true;
	s->send_ev = ++r->ev;
	r->inflight++;
	if (o->kind != K_FLUSH)
		for (uint32_t x = o->sec; x < o->sec + o->nsec; x++)
			r->busy[x]++;
	switch (o->kind) {
	case K_WRITE:
		th_fill(r->slotbuf[s->slot], len, off, ID_BASE + i);
		cookie = nbd_aio_pwrite(h, r->slotbuf[s->slot], len, off, cb, fl);
		break;
	case K_ZERO:
		cookie = nbd_aio_zero(h, len, off, cb, fl);
		break;
	case K_TRIM:
		cookie = nbd_aio_trim(h, len, off, cb, fl);
		break;
	case K_FLUSH:
		cookie = nbd_aio_flush(h, cb, 0);
		break;
	case K_READ:
		memset(r->slotbuf[s->slot], 0xa5, len);
		cookie = nbd_aio_pread(h, r->slotbuf[s->slot], len, off, cb, 0);
		break;
	}
	if (cookie >= 0)
		return 0;
	/* Refused by libnbd: never sent, and its callback will not run. */
	s->sent = false;
	r->inflight--;
	if (o->kind != K_FLUSH)
		for (uint32_t x = o->sec; x < o->sec + o->nsec; x++)
			r->busy[x]--;
	if (s->slot >= 0)
		r->slot_used[s->slot] = false;
	return -1;
}

static bool range_busy(const struct run *r, const struct wop *o)
{
	if (o->kind == K_FLUSH || o->kind == K_DRAIN)
		return false;
	for (uint32_t x = o->sec; x < o->sec + o->nsec; x++)
		if (r->busy[x])
			return true;
	return false;
}

/*
 * Issue the workload, in order, up to MAX_QD in flight, until it is done
 * (returns 0, *@dead false) or the connection dies (0, *@dead true).
 * -1: a check failed (r->err).
 */
static int run_workload(struct run *r, struct nbd_handle *h, bool *dead)
{
	double deadline = th_now_ms() + 30000;
	const struct workload *w = r->w;

	*dead = false;
	while (r->next < w->nops || r->inflight > 0) {
		while (r->next < w->nops && r->inflight < MAX_QD &&
		       !range_busy(r, &w->ops[r->next])) {
			if (issue(r, h, r->next) < 0) {
				*dead = true;
				return r->failed ? -1 : 0;
			}
			r->next++;
		}
		if (r->failed)
			return -1;
		if (nbd_aio_is_dead(h) || nbd_aio_is_closed(h)) {
			*dead = true;
			return 0;
		}
		if (nbd_poll(h, 200) < 0) {
			*dead = true;
			return r->failed ? -1 : 0;
		}
		if (th_now_ms() > deadline) {
			run_fail(r, "workload stuck: op %u of %u next, %d in flight after 30 s",
				 r->next, w->nops, r->inflight);
			return -1;
		}
	}
	return r->failed ? -1 : 0;
}

/* ---- the model ---- */

static bool durable(const struct run *r, uint32_t i, uint64_t flush_ev, bool strict)
{
	const struct ost *s = &r->st[i];

	return s->sent && s->done && !s->err &&
	       (strict || r->w->ops[i].fua || s->ack_ev < flush_ev);
}

static int describe_op(char *out, size_t len, const struct run *r, uint32_t i, uint64_t flush_ev,
		       bool strict)
{
	const struct wop *o = &r->w->ops[i];
	const struct ost *s = &r->st[i];
	const char *state = !s->sent   ? "not sent"
			    : !s->done ? "in flight (no reply)"
			    : s->err   ? "in flight (failed as the agent died)"
			    : durable(r, i, flush_ev, strict) ? "acknowledged, durable"
							      : "acknowledged, not flushed";

	return snprintf(out, len, "op #%u %s%s of sectors %u+%u [%s]", i, kind_name[o->kind],
			o->fua ? "+FUA" : "", o->sec, o->nsec, state);
}

static void describe_value(char *out, size_t len, const struct run *r, uint32_t v,
			   uint64_t flush_ev, bool strict)
{
	if (v == DEC_ZERO)
		snprintf(out, len, "zeroes");
	else if (v == DEC_BAD)
		snprintf(out, len, "garbage (no write's data for this sector)");
	else if (v == SEED_INIT)
		snprintf(out, len, "the initial content");
	else if (v >= ID_BASE && v - ID_BASE < r->w->nops)
		describe_op(out, len, r, v - ID_BASE, flush_ev, strict);
	else
		snprintf(out, len, "seed 0x%x (never written by this workload)", v);
}

/*
 * Check the recovered volume @img against the model. Returns 0, or -1
 * with the first failing sector explained in r->err. Counts in *@exact the
 * sectors that read their newest acknowledged value.
 */
static int check_image(struct run *r, const uint8_t *img, bool strict, uint64_t *exact)
{
	const struct workload *w = r->w;
	uint64_t flush_ev = 0;
	int32_t *floor = malloc(NSEC * sizeof(int32_t)); /* op index, -1: initial content */
	bool *zero_ok = calloc(NSEC, sizeof(bool));
	int rc = 0;

	cr_assert(floor && zero_ok);
	for (uint32_t i = 0; i < w->nops; i++)
		if (w->ops[i].kind == K_FLUSH && r->st[i].done && !r->st[i].err &&
		    r->st[i].send_ev > flush_ev)
			flush_ev = r->st[i].send_ev;
	for (uint32_t x = 0; x < NSEC; x++)
		floor[x] = -1;
	for (uint32_t i = 0; i < w->nops; i++)
		if (is_write(&w->ops[i]) && durable(r, i, flush_ev, strict))
			for (uint32_t x = w->ops[i].sec; x < w->ops[i].sec + w->ops[i].nsec; x++)
				if (!trim_advisory(&w->ops[i], x))
					floor[x] = (int32_t)i;
	for (uint32_t i = 0; i < w->nops; i++) {
		const struct wop *o = &w->ops[i];

		if (!is_write(o) || o->kind == K_WRITE || !r->st[i].sent)
			continue;
		for (uint32_t x = o->sec; x < o->sec + o->nsec; x++)
			if ((int32_t)i >= floor[x])
				zero_ok[x] = true;
	}
	for (uint32_t x = 0; x < NSEC && rc == 0; x++) {
		uint32_t got = decode(img + (size_t)x * SECTOR, (uint64_t)x * SECTOR);
		bool ok;

		if (got == DEC_ZERO) {
			ok = zero_ok[x];
		} else if (got == SEED_INIT) {
			ok = floor[x] < 0;
		} else if (got >= ID_BASE && got - ID_BASE < w->nops) {
			uint32_t i = got - ID_BASE;

			ok = w->ops[i].kind == K_WRITE && covers(&w->ops[i], x) && r->st[i].sent &&
			     (int32_t)i >= floor[x];
		} else {
			ok = false;
		}
		if (ok) {
			if (got == r->cur[x] || (got == DEC_ZERO && zero_kind(w, r->cur[x])) ||
			    (got == r->firm[x] && r->cur[x] != r->firm[x]))
				(*exact)++;
			continue;
		}
		{
			char g[256], f[256];
			size_t n;
			bool older =
				got == SEED_INIT || (got >= ID_BASE && got - ID_BASE < w->nops &&
						     covers(&w->ops[got - ID_BASE], x) &&
						     w->ops[got - ID_BASE].kind == K_WRITE &&
						     (int32_t)(got - ID_BASE) < floor[x]);

			describe_value(g, sizeof(g), r, got, flush_ev, strict);
			if (floor[x] < 0)
				snprintf(f, sizeof(f), "the initial content");
			else
				describe_op(f, sizeof(f), r, (uint32_t)floor[x], flush_ev, strict);
			n = (size_t)snprintf(r->err, sizeof(r->err),
					     "%s: sector %u (byte %u, block %u) reads %s; expected "
					     "the durable floor %s or a later write to it:",
					     older ? "LOST (older than the durable floor)"
					     : got == DEC_ZERO ? "CORRUPT (zeroes no write allows)"
							       : "CORRUPT",
					     x, x * SECTOR, x / BLK_SECS, g, f);
			for (uint32_t i = floor[x] < 0 ? 0 : (uint32_t)floor[x] + 1;
			     i < w->nops && n < sizeof(r->err) - 300; i++)
				if (is_write(&w->ops[i]) && covers(&w->ops[i], x) &&
				    r->st[i].sent) {
					n += (size_t)snprintf(r->err + n, sizeof(r->err) - n, " ");
					n += (size_t)describe_op(r->err + n, sizeof(r->err) - n, r,
								 i, flush_ev, strict);
					n += (size_t)snprintf(r->err + n, sizeof(r->err) - n, ";");
				}
			if (n < sizeof(r->err) - 64)
				snprintf(r->err + n, sizeof(r->err) - n, "%s",
					 floor[x] < 0 ? " (no write to it was durable)"
						      : " (none)");
			rc = -1;
		}
	}
	free(floor);
	free(zero_ok);
	return rc;
}

/* ---- agents ---- */

struct worker {
	int id;
	void *camp;
	char dir[256];
	char sock[320], cfg[320], log[320], log2[320], log3[320], store[320], cache[320],
		state[320];
	pid_t pid;
	uint8_t *img, *img2;
	struct run r;
	const uint8_t *init_img;
	/* statistics */
	uint64_t crashed, tore, no_crash, in_shutdown, sectors, exact, acked, inflight_at_crash,
		roundtrips, points, store_sectors, dirty_found, drains;
	double ms;
};

static const char *g_agent;

/* Where the workers' directories go: FT_POWERCUT_TMP, else the test's default. */
static const char *g_tmp = "/tmp";

static void pc_mkdtemp(char *out, size_t len)
{
	const char *base = getenv("FT_POWERCUT_TMP");

	if (!base || !*base)
		base = access(g_tmp, W_OK) == 0 ? g_tmp : "/tmp";
	th_fmt(out, len, "%s/ft-test.XXXXXX", base);
	cr_assert_not_null(mkdtemp(out), "mkdtemp %s: %s", out, strerror(errno));
}

static void pc_rm_rf(const char *dir)
{
	char cmd[512];

	if (!strstr(dir, "/ft-test."))
		return;
	th_fmt(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "cleanup of %s failed\n", dir);
}
static const char *g_mode = "write-back";

/* Thread-safe: returns -1 instead of asserting. */
static int write_config(struct worker *wk, const char *mode)
{
	FILE *f = fopen(wk->cfg, "w");
	const char *wb = strcmp(mode, "write-back") == 0
				 ? ", \"dirty_limit\": \"4M\", \"dirty_high\": \"10%\", "
				   "\"dirty_low\": \"5%\", \"dirty_max_age\": 0.1"
				 : "";

	if (!f)
		return -1;
	fprintf(f,
		"{ \"listen\": \"%s\", \"reactors\": 1, \"log_level\": \"info\",\n"
		"  \"volumes\": { \"v\": { \"backing\": \"%s\",\n"
		"    \"cache\": { \"mode\": \"%s\", \"sequential_cutoff\": \"0\"%s } } },\n"
		"  \"cache\": { \"path\": \"%s\", \"size\": \"64M\", \"log_size\": \"16M\",\n"
		"    \"state_file\": \"%s\" } }\n",
		wk->sock, wk->store, mode, wb, wk->cache, wk->state);
	return fclose(f) == 0 ? 0 : -1;
}

static void worker_init(struct worker *wk, int id, const char *mode, const uint8_t *init_img)
{
	memset(wk, 0, sizeof(*wk));
	wk->id = id;
	pc_mkdtemp(wk->dir, sizeof(wk->dir));
	th_fmt(wk->sock, sizeof(wk->sock), "%s/nbd.sock", wk->dir);
	th_fmt(wk->cfg, sizeof(wk->cfg), "%s/flashtierd.json", wk->dir);
	th_fmt(wk->log, sizeof(wk->log), "%s/agent-crash.log", wk->dir);
	th_fmt(wk->log2, sizeof(wk->log2), "%s/agent-recovery.log", wk->dir);
	th_fmt(wk->log3, sizeof(wk->log3), "%s/agent-restart.log", wk->dir);
	th_fmt(wk->store, sizeof(wk->store), "%s/store.img", wk->dir);
	th_fmt(wk->cache, sizeof(wk->cache), "%s/cache.img", wk->dir);
	th_fmt(wk->state, sizeof(wk->state), "%s/cache.state", wk->dir);
	wk->img = aligned_alloc(4096, VOL_SIZE);
	wk->img2 = aligned_alloc(4096, VOL_SIZE);
	cr_assert(wk->img && wk->img2);
	wk->init_img = init_img;
	run_init(&wk->r);
	cr_assert_eq(write_config(wk, mode), 0, "cannot write %s", wk->cfg);
}

/* A fresh store (initial content) and no cache file. Thread-safe (no assertions). */
static int reset_files(struct worker *wk, char *err, size_t len)
{
	int fd = open(wk->store, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);

	if (fd < 0 || pwrite(fd, wk->init_img, VOL_SIZE, 0) != VOL_SIZE) {
		snprintf(err, len, "cannot write %s: %s", wk->store, strerror(errno));
		if (fd >= 0)
			close(fd);
		return -1;
	}
	close(fd);
	unlink(wk->cache);
	unlink(wk->state);
	unlink(wk->sock);
	return 0;
}

/*
 * Start the agent with FLASHTIER_TEST_POWERCUT=@pc (NULL: unset), stderr to
 * @log; wait for its socket. Thread-safe: no assertions, the environment
 * is built before fork(). Returns 0, or -1 with *@status set if it exited.
 */
static int agent_spawn(struct worker *wk, const char *pc, const char *log, int *status)
{
	char pcvar[96];
	char **env;
	size_t n = 0, k = 0;

	*status = -1;
	while (environ[n])
		n++;
	env = calloc(n + 2, sizeof(char *));
	if (!env)
		return -1;
	for (size_t i = 0; i < n; i++)
		if (strncmp(environ[i], "FLASHTIER_TEST_POWERCUT=", 24) != 0)
			env[k++] = environ[i];
	if (pc) {
		snprintf(pcvar, sizeof(pcvar), "FLASHTIER_TEST_POWERCUT=%s", pc);
		env[k++] = pcvar;
	}
	env[k] = NULL;
	unlink(wk->sock);
	wk->pid = fork();
	if (wk->pid < 0) {
		free(env);
		return -1;
	}
	if (wk->pid == 0) {
		int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (fd >= 0) {
			dup2(fd, 1);
			dup2(fd, 2);
		}
		execle(g_agent, "flashtierd", "--config", wk->cfg, (char *)NULL, env);
		_exit(127);
	}
	free(env);
	for (double end = th_now_ms() + 15000; th_now_ms() < end;) {
		int fd = th_unix_connect(wk->sock);

		if (fd >= 0) {
			close(fd);
			return 0;
		}
		if (waitpid(wk->pid, status, WNOHANG) == wk->pid) {
			wk->pid = 0;
			return -1;
		}
		th_sleep_ms(2);
	}
	kill(wk->pid, SIGKILL);
	waitpid(wk->pid, status, 0);
	wk->pid = 0;
	*status = -2;
	return -1;
}

/* Wait up to @ms for the agent to exit; SIGKILL it after that. Returns the wait status, or -2. */
static int agent_wait(struct worker *wk, int ms)
{
	int status = 0;

	if (wk->pid <= 0)
		return -3;
	for (double end = th_now_ms() + ms; th_now_ms() < end;) {
		if (waitpid(wk->pid, &status, WNOHANG) == wk->pid) {
			wk->pid = 0;
			return status;
		}
		th_sleep_ms(1);
	}
	kill(wk->pid, SIGKILL);
	waitpid(wk->pid, &status, 0);
	wk->pid = 0;
	return -2;
}

static void agent_kill(struct worker *wk)
{
	if (wk->pid > 0) {
		kill(wk->pid, SIGKILL);
		waitpid(wk->pid, NULL, 0);
		wk->pid = 0;
	}
}

static void describe_status(char *out, size_t len, int status)
{
	if (status == -2)
		snprintf(out, len, "did not exit in time (SIGKILLed)");
	else if (status < 0)
		snprintf(out, len, "status unknown");
	else if (WIFEXITED(status))
		snprintf(out, len, "exit status %d", WEXITSTATUS(status));
	else
		snprintf(out, len, "killed by signal %d", WTERMSIG(status));
}

/* The "powercut:" line of @log: writes, flushes, torn. Returns 0 if found. */
static int parse_powercut(const char *log, uint64_t *writes, uint64_t *flushes, bool *tore,
			  bool *too_short)
{
	char line[1024];
	FILE *f = fopen(log, "r");
	int rc = -1;

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		const char *p = strstr(line, "powercut: ");
		unsigned long long w, fl;

		if (p && sscanf(p, "powercut: %llu device writes, %llu flushes", &w, &fl) == 2) {
			*writes = w;
			*flushes = fl;
			*tore = strstr(p, "; tore write") != NULL;
			*too_short = strstr(p, "too short to tear") != NULL;
			rc = 0;
		}
	}
	fclose(f);
	return rc;
}

/* The last @max bytes of @path, for failure messages. */
static void log_tail(const char *path, char *out, size_t max)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	off_t size;
	ssize_t n;

	out[0] = '\0';
	if (fd < 0)
		return;
	size = lseek(fd, 0, SEEK_END);
	if (size > (off_t)max - 1)
		lseek(fd, size - (off_t)max + 1, SEEK_SET);
	else
		lseek(fd, 0, SEEK_SET);
	n = read(fd, out, max - 1);
	out[n > 0 ? n : 0] = '\0';
	close(fd);
}

static struct nbd_handle *nbd_open(struct worker *wk, char *err, size_t len)
{
	struct nbd_handle *h = nbd_create();

	if (!h) {
		snprintf(err, len, "nbd_create: %s", nbd_get_error());
		return NULL;
	}
	if (nbd_set_export_name(h, "v") < 0 || nbd_connect_unix(h, wk->sock) < 0) {
		snprintf(err, len, "connect to the agent: %s", nbd_get_error());
		nbd_close(h);
		return NULL;
	}
	return h;
}

static int read_done_cb(void *user_data, int *error)
{
	int *failed = user_data;

	if (*error)
		*failed = *error;
	return 1;
}

/*
 * Read the whole volume one 4 KiB block per request (up to 64 in flight):
 * the engine serves a read from the read cache only when it holds every
 * block of it, so only block-sized reads see every cached copy (a stale
 * one included) rather than the store's.
 */
static int read_volume(struct nbd_handle *h, uint8_t *img, char *err, size_t len)
{
	nbd_completion_callback cb = { .callback = read_done_cb };
	uint64_t off = 0;
	int failed = 0;

	cb.user_data = &failed;
	while ((off < VOL_SIZE || nbd_aio_in_flight(h) > 0) && !failed) {
		while (off < VOL_SIZE && nbd_aio_in_flight(h) < 64) {
			if (nbd_aio_pread(h, img + off, BLK, off, cb, 0) < 0) {
				snprintf(err, len, "reading the volume at %" PRIu64 ": %s", off,
					 nbd_get_error());
				return -1;
			}
			off += BLK;
		}
		if (nbd_poll(h, 10000) <= 0) {
			snprintf(err, len, "reading the volume: %s",
				 nbd_get_error() ? nbd_get_error() : "no reply within 10 s");
			return -1;
		}
	}
	if (failed) {
		snprintf(err, len, "reading the volume: %s", strerror(failed));
		return -1;
	}
	return 0;
}

/*
 * The agent keeps working after recovery: a block write, a FUA sub-block
 * write and an unaligned multi-block write, a FLUSH, read back exactly;
 * applied to @img.
 */
static int roundtrip(struct nbd_handle *h, uint8_t *img, uint32_t salt, char *err, size_t len)
{
	struct {
		uint32_t sec, nsec;
		uint32_t flags;
	} ex[3] = {
		{ (salt * 7919u % NBLK) * BLK_SECS, BLK_SECS, 0 },
		{ (salt * 104729u % NBLK) * BLK_SECS + 3, 3, LIBNBD_CMD_FLAG_FUA },
		{ (salt * 1299709u % (NBLK - 4)) * BLK_SECS + 5, 3 * BLK_SECS, 0 },
	};
	static __thread uint8_t buf[3 * BLK + BLK] __attribute__((aligned(4096)));

	for (int k = 0; k < 3; k++) {
		uint64_t off = (uint64_t)ex[k].sec * SECTOR, n = (uint64_t)ex[k].nsec * SECTOR;

		th_fill(img + off, n, off, RT_BASE + salt * 4 + (uint32_t)k);
		if (nbd_pwrite(h, img + off, n, off, ex[k].flags) < 0) {
			snprintf(err, len, "after recovery: WRITE %" PRIu64 "+%" PRIu64 ": %s", off,
				 n, nbd_get_error());
			return -1;
		}
	}
	if (nbd_flush(h, 0) < 0) {
		snprintf(err, len, "after recovery: FLUSH: %s", nbd_get_error());
		return -1;
	}
	for (int k = 0; k < 3; k++) {
		uint64_t off = (uint64_t)ex[k].sec * SECTOR, n = (uint64_t)ex[k].nsec * SECTOR;

		if (nbd_pread(h, buf, n, off, 0) < 0) {
			snprintf(err, len, "after recovery: READ %" PRIu64 "+%" PRIu64 ": %s", off,
				 n, nbd_get_error());
			return -1;
		}
		if (memcmp(buf, img + off, n) != 0) {
			snprintf(
				err, len,
				"after recovery: READ %" PRIu64 "+%" PRIu64
				" right after WRITE and "
				"FLUSH returned other data (first sector decodes to 0x%x, want 0x%x)",
				off, n, decode(buf, off), RT_BASE + salt * 4 + (uint32_t)k);
			return -1;
		}
	}
	return 0;
}

/*
 * Count the store's sectors that destaging changed, and check each holds
 * the initial content, zeroes, or data of a write sent to that sector.
 */
static int scan_store(struct worker *wk, struct run *r, char *err, size_t len)
{
	int fd = open(wk->store, O_RDONLY | O_CLOEXEC);
	ssize_t n = fd >= 0 ? pread(fd, wk->img2, VOL_SIZE, 0) : -1;

	if (fd >= 0)
		close(fd);
	if (n != VOL_SIZE) {
		snprintf(err, len, "cannot read the store %s", wk->store);
		return -1;
	}
	for (uint32_t x = 0; x < NSEC; x++) {
		uint32_t got = decode(wk->img2 + (size_t)x * SECTOR, (uint64_t)x * SECTOR);
		uint32_t i = got - ID_BASE;
		bool ok = got == SEED_INIT || got == DEC_ZERO ||
			  (got >= ID_BASE && i < r->w->nops && r->w->ops[i].kind == K_WRITE &&
			   covers(&r->w->ops[i], x) && r->st[i].sent);

		if (!ok) {
			char g[256];

			describe_value(g, sizeof(g), r, got, 0, false);
			snprintf(
				err, len,
				"the backing store at the power cut: sector %u (byte %u) holds %s, "
				"which no write to it sent",
				x, x * SECTOR, g);
			return -1;
		}
		if (got != SEED_INIT)
			wk->store_sectors++;
	}
	return 0;
}

/* The "N dirty bytes found in the write-back log" of a recovery log. */
static uint64_t recovered_dirty(const char *log)
{
	char line[1024];
	FILE *f = fopen(log, "r");
	uint64_t sum = 0;

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f)) {
		const char *p = strstr(line, "': ");

		if (p && strstr(line, "dirty bytes found in the write-back log"))
			sum += strtoull(p + 3, NULL, 10);
	}
	fclose(f);
	return sum;
}

static int count_in_file(const char *path, const char *needle)
{
	char line[1024];
	FILE *f = fopen(path, "r");
	int n = 0;

	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f))
		n += strstr(line, needle) != NULL;
	fclose(f);
	return n;
}

/*
 * After recovery and a round trip: in write-back, SIGUSR1 and wait for the
 * drain; then the volume must read exactly as before (a stale clean-cache
 * copy shows here, once no read goes to the log any more), and the store
 * file itself must hold exactly that (everything was written back; in
 * write-through it always is).
 */
static int drain_check(struct worker *wk, struct nbd_handle *h, char *err, size_t len)
{
	if (strcmp(g_mode, "write-back") == 0) {
		int before = count_in_file(wk->log2, "': drained");
		double end = th_now_ms() + 10000;

		kill(wk->pid, SIGUSR1);
		while (count_in_file(wk->log2, "': drained") <= before) {
			if (th_now_ms() > end) {
				snprintf(err, len,
					 "after recovery: no \"drained\" line within 10 s of "
					 "SIGUSR1");
				return -1;
			}
			th_sleep_ms(2);
		}
	}
	if (read_volume(h, wk->img2, err, len) < 0)
		return -1;
	for (uint32_t x = 0; x < NSEC; x++) {
		const uint8_t *a = wk->img + (size_t)x * SECTOR, *b = wk->img2 + (size_t)x * SECTOR;

		if (memcmp(a, b, SECTOR) != 0) {
			snprintf(
				err, len,
				"after recovery, a round trip and a drain: sector %u reads seed 0x%x, "
				"before the drain it read 0x%x (stale data from the read cache?)",
				x, decode(b, (uint64_t)x * SECTOR),
				decode(a, (uint64_t)x * SECTOR));
			return -1;
		}
	}
	{
		int fd = open(wk->store, O_RDONLY | O_CLOEXEC);
		ssize_t n = fd >= 0 ? pread(fd, wk->img2, VOL_SIZE, 0) : -1;

		if (fd >= 0)
			close(fd);
		if (n != VOL_SIZE) {
			snprintf(err, len, "cannot read the store %s", wk->store);
			return -1;
		}
	}
	for (uint32_t x = 0; x < NSEC; x++) {
		const uint8_t *a = wk->img + (size_t)x * SECTOR, *b = wk->img2 + (size_t)x * SECTOR;

		if (memcmp(a, b, SECTOR) != 0) {
			snprintf(
				err, len,
				"after recovery, a round trip and a drain: the store's sector %u holds "
				"seed 0x%x, the volume reads 0x%x",
				x, decode(b, (uint64_t)x * SECTOR),
				decode(a, (uint64_t)x * SECTOR));
			return -1;
		}
	}
	return 0;
}

/* ---- one crash point ---- */

struct point {
	uint16_t seed_idx;
	bool tear;
	uint32_t n;		  /* 0: count only */
	uint64_t writes, flushes; /* the run's "powercut:" line */
};

struct result {
	bool failed;
	bool crashed, tore, in_shutdown;
	uint64_t writes, flushes;
};

/*
 * Run crash point @pt of workload @w in worker @wk. @strict: every
 * acknowledged write is durable (write-through). @verify: round trip and a
 * second restart. Returns 0, or -1 with @err set.
 */
static int run_point(struct worker *wk, const struct workload *w, const struct point *pt,
		     bool strict, int verify, struct result *res, char *err, size_t len)
{
	struct run *r = &wk->r;
	struct nbd_handle *h = NULL;
	char pc[64], st[96], tail[2048];
	bool dead = false, tore = false, too_short = false, second = false;
	uint64_t writes = 0, flushes = 0, exact = 0;
	int status, rc;

	memset(res, 0, sizeof(*res));
	run_reset(r, w);
	if (reset_files(wk, err, len) < 0)
		return -1;
	snprintf(pc, sizeof(pc), "%u%s", pt->n, pt->tear ? ":tear" : "");
	if (getenv("FT_POWERCUT_TIMING"))
		fprintf(stderr, "[%d] N=%u start at %.1f ms\n", wk->id, pt->n, th_now_ms());

	/* 1. The run that loses power at device write N. */
	if (agent_spawn(wk, pc, wk->log, &status) < 0) {
		if (!(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == PC_EXIT)) {
			describe_status(st, sizeof(st), status);
			log_tail(wk->log, tail, sizeof(tail));
			snprintf(err, len, "the agent did not start (%s):\n%s", st, tail);
			return -1;
		}
		dead = true; /* lost power while starting: nothing was sent */
	} else {
		h = nbd_open(wk, err, len);
		if (!h) {
			/* It may have died before our connection was served. */
			status = agent_wait(wk, 5000);
			if (!(status >= 0 && WIFEXITED(status) && WEXITSTATUS(status) == PC_EXIT)) {
				size_t n = strlen(err);

				describe_status(st, sizeof(st), status);
				log_tail(wk->log, tail, sizeof(tail));
				snprintf(err + n, len - n, " (agent: %s); log tail:\n%s", st, tail);
				return -1;
			}
			dead = true;
		} else {
			r->agent = wk->pid;
			rc = run_workload(r, h, &dead);
			if (rc < 0) {
				agent_kill(wk);
				nbd_close(h);
				snprintf(err, len, "%s", r->err);
				return -1;
			}
			if (!dead) {
				/* The workload is done (its last FLUSH acknowledged): a clean stop.
				 */
				nbd_shutdown(h, 0);
				kill(wk->pid, SIGTERM);
			}
			status = agent_wait(wk, 20000);
			nbd_close(h);
			h = NULL;
		}
	}
	if (status < 0 || !WIFEXITED(status) ||
	    (WEXITSTATUS(status) != PC_EXIT && (WEXITSTATUS(status) != 0 || dead))) {
		describe_status(st, sizeof(st), status);
		log_tail(wk->log, tail, sizeof(tail));
		snprintf(err, len,
			 "the power-cut run ended with %s (want %d at the power cut, or 0 after "
			 "SIGTERM)%s; agent log tail:\n%s",
			 st, PC_EXIT, dead ? " after the connection died" : "", tail);
		return -1;
	}
	res->crashed = WEXITSTATUS(status) == PC_EXIT;
	res->in_shutdown = res->crashed && !dead;
	if (parse_powercut(wk->log, &writes, &flushes, &tore, &too_short) < 0) {
		log_tail(wk->log, tail, sizeof(tail));
		snprintf(err, len,
			 "no 'powercut: W device writes, F flushes' line in the agent's "
			 "log:\n%s",
			 tail);
		return -1;
	}
	res->writes = writes;
	res->flushes = flushes;
	res->tore = tore;
	if (res->crashed && writes != pt->n) {
		snprintf(err, len, "the agent lost power at device write %" PRIu64 ", not %u",
			 writes, pt->n);
		return -1;
	}
	if (pt->tear && res->crashed && !tore && !too_short) {
		log_tail(wk->log, tail, sizeof(tail));
		snprintf(err, len, "a :tear power cut neither tore nor said why:\n%s", tail);
		return -1;
	}
	for (uint32_t i = 0; i < w->nops; i++) {
		if (r->st[i].sent && r->st[i].done && !r->st[i].err && is_write(&w->ops[i]))
			wk->acked++;
		if (r->st[i].sent && (!r->st[i].done || r->st[i].err))
			wk->inflight_at_crash++;
		if (r->st[i].done && r->st[i].err && !res->crashed) {
			snprintf(err, len, "op #%u %s failed without a power cut: %s", i,
				 kind_name[w->ops[i].kind], strerror(r->st[i].err));
			return -1;
		}
	}

	if (getenv("FT_POWERCUT_TIMING"))
		fprintf(stderr, "[%d] N=%u crash run done at %.1f ms\n", wk->id, pt->n,
			th_now_ms());
	/*
	 * The store as the power cut left it: what destaging wrote there must
	 * be data some write to that sector sent (the floor comes later).
	 */
	if (scan_store(wk, r, err, len) < 0)
		return -1;
	if (getenv("FT_POWERCUT_SNAPSHOT")) {
		/* Debugging: the files as the power cut left them, next to the live ones. */
		char cmd[1400];

		snprintf(cmd, sizeof(cmd),
			 "cp --sparse=always '%s' '%s.at-cut' && cp '%s' '%s.at-cut'", wk->cache,
			 wk->cache, wk->store, wk->store);
		if (system(cmd) != 0)
			fprintf(stderr, "snapshot failed: %s\n", cmd);
	}

	/* 2. Recovery: every sector against the model. */
	if (agent_spawn(wk, NULL, wk->log2, &status) < 0) {
		describe_status(st, sizeof(st), status);
		log_tail(wk->log2, tail, sizeof(tail));
		snprintf(err, len, "the agent did not restart after the power cut (%s):\n%s", st,
			 tail);
		return -1;
	}
	h = nbd_open(wk, err, len);
	if (!h || read_volume(h, wk->img, err, len) < 0)
		goto fail_agent;
	if (check_image(r, wk->img, strict, &exact) < 0) {
		snprintf(err, len, "%s", r->err);
		goto fail_agent;
	}
	wk->sectors += NSEC;
	wk->exact += exact;
	wk->dirty_found += recovered_dirty(wk->log2);
	if (getenv("FT_POWERCUT_TIMING"))
		fprintf(stderr, "[%d] N=%u recovery checked at %.1f ms\n", wk->id, pt->n,
			th_now_ms());

	/* 3. It keeps working, and a second restart reads the same. */
	if (verify) {
		bool sigkill = (pt->n & 1) != 0;

		if (roundtrip(h, wk->img, pt->n, err, len) < 0)
			goto fail_agent;
		if (getenv("FT_POWERCUT_TIMING"))
			fprintf(stderr, "[%d] N=%u round trip done at %.1f ms\n", wk->id, pt->n,
				th_now_ms());
		if (verify > 1) {
			if (drain_check(wk, h, err, len) < 0)
				goto fail_agent;
			wk->drains++;
		}
		if (getenv("FT_POWERCUT_TIMING"))
			fprintf(stderr, "[%d] N=%u drain checked at %.1f ms\n", wk->id, pt->n,
				th_now_ms());
		nbd_shutdown(h, 0);
		nbd_close(h);
		h = NULL;
		if (sigkill) {
			agent_kill(wk);
		} else {
			kill(wk->pid, SIGTERM);
			status = agent_wait(wk, 20000);
			if (status != 0) {
				describe_status(st, sizeof(st), status);
				snprintf(err, len, "SIGTERM after recovery: %s", st);
				goto fail_agent;
			}
		}
		if (agent_spawn(wk, NULL, wk->log3, &status) < 0) {
			describe_status(st, sizeof(st), status);
			log_tail(wk->log3, tail, sizeof(tail));
			snprintf(err, len, "the agent did not start a second time (%s):\n%s", st,
				 tail);
			return -1;
		}
		second = true;
		if (getenv("FT_POWERCUT_TIMING"))
			fprintf(stderr, "[%d] N=%u restarted at %.1f ms\n", wk->id, pt->n,
				th_now_ms());
		h = nbd_open(wk, err, len);
		if (!h || read_volume(h, wk->img2, err, len) < 0)
			goto fail_agent;
		for (uint32_t x = 0; x < NSEC; x++) {
			const uint8_t *a = wk->img + (size_t)x * SECTOR,
				      *b = wk->img2 + (size_t)x * SECTOR;

			if (memcmp(a, b, SECTOR) != 0) {
				snprintf(
					err, len,
					"second restart (after %s): sector %u reads seed 0x%x, the "
					"first restart (plus a flushed round trip) read 0x%x",
					sigkill ? "SIGKILL" : "SIGTERM", x,
					decode(b, (uint64_t)x * SECTOR),
					decode(a, (uint64_t)x * SECTOR));
				goto fail_agent;
			}
		}
		wk->roundtrips++;
		second = false;
		if (getenv("FT_POWERCUT_TIMING"))
			fprintf(stderr, "[%d] N=%u second restart checked at %.1f ms\n", wk->id,
				pt->n, th_now_ms());
	}
	nbd_shutdown(h, 0);
	nbd_close(h);
	kill(wk->pid, SIGTERM);
	status = agent_wait(wk, 20000);
	if (status != 0) {
		describe_status(st, sizeof(st), status);
		log_tail(wk->log2, tail, sizeof(tail));
		snprintf(err, len, "SIGTERM after the check: %s:\n%s", st, tail);
		return -1;
	}
	return 0;

fail_agent:
	if (h)
		nbd_close(h);
	agent_kill(wk);
	{
		size_t n = strlen(err);

		log_tail(wk->log2, tail, sizeof(tail));
		n += (size_t)snprintf(err + n, len - n, "\nrecovery agent log tail:\n%s", tail);
		if (second && n < len) {
			log_tail(wk->log3, tail, sizeof(tail));
			snprintf(err + n, len - n, "\nsecond restart's agent log tail:\n%s", tail);
		}
	}
	return -1;
}

/* ---- the campaign: count runs, then crash points over parallel workers ---- */

struct campaign {
	const char *test;
	bool strict;
	int verify_every;
	int drain_every;
	struct workload w[MAX_SEEDS];
	int nseeds;
	struct point *pts;
	uint32_t npts;
	atomic_uint next;
	atomic_bool stop;
	bool keep_going; /* FT_POWERCUT_KEEP_GOING=1: run every point, report all failures */
	uint32_t nfailed;
	pthread_mutex_t lock;
	char err[ERRLEN + 4096];
	int failed_worker;
	struct worker wk[MAX_JOBS];
	int jobs;
	uint64_t crashed, tore, no_crash, in_shutdown;
	uint8_t *used[MAX_SEEDS]; /* per seed: bit 0 plain, bit 1 torn, per N */
};

/* FT_POWERCUT_DUMP_OPS=1: the failed run's requests, as sent, with their outcome. */
static void dump_ops(const struct run *r)
{
	uint64_t flush_ev = 0;

	for (uint32_t i = 0; i < r->w->nops; i++)
		if (r->w->ops[i].kind == K_FLUSH && r->st[i].done && !r->st[i].err &&
		    r->st[i].send_ev > flush_ev)
			flush_ev = r->st[i].send_ev;
	fprintf(stderr, "requests of seed 0x%" PRIx64 " (events: send/ack order):\n", r->w->seed);
	for (uint32_t i = 0; i < r->w->nops && r->st[i].sent; i++) {
		char d[256];

		describe_op(d, sizeof(d), r, i, flush_ev, false);
		fprintf(stderr, "  %s, sent at %" PRIu64 ", reply at %" PRIu64 "\n", d,
			r->st[i].send_ev, r->st[i].done ? r->st[i].ack_ev : 0);
	}
}

static void *worker_main(void *arg)
{
	struct worker *wk = arg;
	struct campaign *c = wk->camp;
	char err[ERRLEN + 2048];

	for (;;) {
		unsigned i = atomic_fetch_add(&c->next, 1);
		const struct point *pt;
		struct result res;
		double t0 = th_now_ms();

		if (i >= c->npts || atomic_load(&c->stop))
			break;
		pt = &c->pts[i];
		err[0] = '\0';
		int verify = c->verify_every > 0 && i % (unsigned)c->verify_every == 0;

		if (verify && c->drain_every > 0 && i % (unsigned)c->drain_every == 0)
			verify = 2;
		if (run_point(wk, &c->w[pt->seed_idx], pt, c->strict, verify, &res, err,
			      sizeof(err)) < 0) {
			pthread_mutex_lock(&c->lock);
			if (getenv("FT_POWERCUT_DUMP_OPS"))
				dump_ops(&wk->r);
			c->nfailed++;
			if (c->keep_going)
				fprintf(stderr, "FAILED: seed=0x%" PRIx64 " N=%u%s: %.300s\n",
					c->w[pt->seed_idx].seed, pt->n, pt->tear ? ":tear" : "",
					err);
			if (c->keep_going && c->nfailed > 1) {
				/* keep the first failure's message */
			} else if (!atomic_load(&c->stop)) {
				atomic_store(&c->stop, !c->keep_going);
				c->failed_worker = wk->id;
				snprintf(c->err, sizeof(c->err),
					 "%s: crash point seed=0x%" PRIx64
					 " N=%u%s (mode %s, replay "
					 "with FT_POWERCUT_ONLY=0x%" PRIx64 ":%u%s): %s",
					 c->test, c->w[pt->seed_idx].seed, pt->n,
					 pt->tear ? " torn" : "", g_mode, c->w[pt->seed_idx].seed,
					 pt->n, pt->tear ? ":tear" : "", err);
			}
			pthread_mutex_unlock(&c->lock);
			if (!c->keep_going)
				break;
			agent_kill(wk);
			if (getenv("FT_POWERCUT_KEEP")) {
				/* Keep this failure's files; go on in a fresh directory. */
				char keep[300];

				snprintf(keep, sizeof(keep), "%s.failed-N%u%s", wk->dir, pt->n,
					 pt->tear ? "-tear" : "");
				if (rename(wk->dir, keep) == 0)
					fprintf(stderr, "kept in %s\n", keep);
				if (mkdir(wk->dir, 0700) < 0 || write_config(wk, g_mode) < 0)
					break;
			}
			continue;
		}
		wk->ms += th_now_ms() - t0;
		wk->points++;
		c->pts[i].writes = res.writes;
		c->pts[i].flushes = res.flushes;
		if (res.crashed) {
			wk->crashed++;
			wk->tore += res.tore;
			wk->in_shutdown += res.in_shutdown;
		} else {
			wk->no_crash++;
		}
	}
	return NULL;
}

static uint32_t env_u32(const char *name, uint32_t dflt)
{
	const char *s = getenv(name);

	return s && *s ? (uint32_t)strtoul(s, NULL, 0) : dflt;
}

/* Add the crash point (seed @s, @n, @tear) unless it is already planned. */
static bool plan(struct campaign *c, uint32_t cap, int s, uint32_t n, bool tear)
{
	uint8_t bit = tear ? 2 : 1;

	if (n == 0 || n > c->w[s].count_writes || (c->used[s][n] & bit) || c->npts >= cap)
		return false;
	c->used[s][n] |= bit;
	c->pts[c->npts++] = (struct point){ (uint16_t)s, tear, n, 0, 0 };
	return true;
}

static void run_batch(struct campaign *c)
{
	pthread_t th[MAX_JOBS];

	atomic_store(&c->next, 0);
	for (int j = 0; j < c->jobs; j++)
		cr_assert_eq(pthread_create(&th[j], NULL, worker_main, &c->wk[j]), 0);
	for (int j = 0; j < c->jobs; j++)
		pthread_join(th[j], NULL);
	if (atomic_load(&c->stop)) {
		if (getenv("FT_POWERCUT_KEEP")) {
			char keep[300];

			th_fmt(keep, sizeof(keep), "%s.failed", c->wk[c->failed_worker].dir);
			if (rename(c->wk[c->failed_worker].dir, keep) == 0) {
				c->wk[c->failed_worker].dir[0] = '\0';
				fprintf(stderr, "kept the failed point's files in %s\n", keep);
			} else {
				fprintf(stderr, "cannot keep %s: %s\n", keep, strerror(errno));
			}
		}
		cr_assert_fail("%s", c->err);
	}
}

static struct campaign *g_camp;

static void campaign_teardown(void)
{
	struct campaign *c = g_camp;

	if (!c)
		return;
	for (int j = 0; j < MAX_JOBS; j++) {
		agent_kill(&c->wk[j]);
		if (c->wk[j].dir[0])
			pc_rm_rf(c->wk[j].dir);
		c->wk[j].dir[0] = '\0';
	}
}

/*
 * The whole test: @nseeds workloads, a count-only run of each, then
 * @target crash points that really crash, spread over each workload.
 */
static void campaign(const char *test, const char *mode, bool strict, const char *tmp,
		     uint64_t base_seed, int nseeds, uint32_t target, int jobs, int verify_every)
{
	struct campaign *c = calloc(1, sizeof(*c));
	uint8_t *init_img = aligned_alloc(4096, VOL_SIZE);
	const char *only = getenv("FT_POWERCUT_ONLY");
	uint64_t total_w = 0, sectors = 0, exact = 0, acked = 0, inflight = 0, rts = 0;
	uint64_t store_sectors = 0, dirty_found = 0, drains = 0;
	double t0 = th_now_ms(), tcount;
	uint32_t cap;

	cr_assert(c && init_img);
	signal(SIGPIPE, SIG_IGN);
	g_camp = c;
	g_mode = mode;
	g_tmp = tmp;
	g_trim = strcmp(mode, "write-back") == 0 ? TRIM_WHOLE_BLOCKS : TRIM_STRICT;
	if (getenv("FT_POWERCUT_TRIM") && strcmp(getenv("FT_POWERCUT_TRIM"), "advisory") == 0)
		g_trim = TRIM_ADVISORY;
	if (getenv("FT_POWERCUT_TRIM") && strcmp(getenv("FT_POWERCUT_TRIM"), "strict") == 0)
		g_trim = TRIM_STRICT;
	g_agent = getenv("AGENT");
	cr_assert_not_null(g_agent, "AGENT is not set: run through 'make check'");
	th_fill(init_img, VOL_SIZE, 0, SEED_INIT);
	pthread_mutex_init(&c->lock, NULL);
	c->test = test;
	c->strict = strict;
	c->keep_going = getenv("FT_POWERCUT_KEEP_GOING") &&
			strcmp(getenv("FT_POWERCUT_KEEP_GOING"), "0") != 0;
	c->verify_every = verify_every;
	c->drain_every = (int)env_u32("FT_POWERCUT_DRAIN_EVERY", 3);
	c->jobs = jobs < 1 ? 1 : jobs > MAX_JOBS ? MAX_JOBS : jobs;
	for (int j = 0; j < c->jobs; j++) {
		worker_init(&c->wk[j], j, mode, init_img);
		c->wk[j].camp = c;
	}

	if (only && *only) {
		/* Replay one crash point: "SEED:N" or "SEED:N:tear". */
		char *end;
		uint64_t seed = strtoull(only, &end, 0);
		uint32_t n = *end == ':' ? (uint32_t)strtoul(end + 1, &end, 10) : 0;

		uint32_t repeat = env_u32("FT_POWERCUT_REPEAT", 1);
		uint64_t crashed = 0;

		c->nseeds = 1;
		gen_workload(&c->w[0], seed, NOPS);
		c->w[0].count_writes = UINT32_MAX;
		c->pts = calloc(repeat ? repeat : 1, sizeof(*c->pts));
		cr_assert_not_null(c->pts);
		c->npts = repeat ? repeat : 1;
		for (uint32_t i = 0; i < c->npts; i++)
			c->pts[i] = (struct point){ 0, strstr(only, ":tear") != NULL, n, 0, 0 };
		if (c->npts == 1)
			c->jobs =
				1; /* else FT_POWERCUT_JOBS copies side by side, as in a full run */
		else
			c->keep_going = true;
		c->verify_every = 1;
		c->drain_every = 1;
		run_batch(c);
		for (int j = 0; j < c->jobs; j++)
			crashed += c->wk[j].crashed;
		if (c->nfailed)
			cr_assert_fail("%s: seed=0x%" PRIx64
				       " N=%u%s failed %u of %u times; the first: %s",
				       test, seed, n, c->pts[0].tear ? " torn" : "", c->nfailed,
				       c->npts, c->err);
		cr_log_info("%s: replayed seed=0x%" PRIx64 " N=%u%s %u times: %" PRIu64
			    " crashed, all checked",
			    test, seed, n, c->pts[0].tear ? " torn" : "", c->npts, crashed);
		free(init_img);
		return;
	}

	/* Count-only runs: W per seed (each also a clean run, checked exactly). */
	cr_assert_leq(nseeds, MAX_SEEDS);
	c->nseeds = nseeds;
	c->pts = calloc((size_t)nseeds, sizeof(*c->pts));
	cr_assert_not_null(c->pts);
	for (int s = 0; s < nseeds; s++) {
		gen_workload(&c->w[s], base_seed + (uint64_t)s * 0x1000193ull, NOPS);
		c->pts[s] = (struct point){ (uint16_t)s, false, 0, 0, 0 };
	}
	c->npts = (uint32_t)nseeds;
	c->verify_every = 1;
	run_batch(c);
	c->verify_every = verify_every;
	for (int s = 0; s < nseeds; s++) {
		c->w[s].count_writes = c->pts[s].writes;
		c->w[s].count_flushes = c->pts[s].flushes;
		cr_assert_gt(c->pts[s].writes, 0,
			     "%s: seed 0x%" PRIx64 ": the workload made no device write (is the "
			     "hook on?)",
			     test, c->w[s].seed);
		total_w += c->pts[s].writes;
		c->used[s] = calloc(c->pts[s].writes + 1, 1);
		cr_assert_not_null(c->used[s]);
	}
	for (int j = 0; j < c->jobs; j++) {
		struct worker *wk = &c->wk[j];

		cr_assert_eq(wk->crashed, 0, "a count-only run lost power");
		wk->points = wk->no_crash = wk->crashed = wk->tore = wk->in_shutdown = 0;
		wk->sectors = wk->exact = wk->acked = wk->inflight_at_crash = wk->roundtrips = 0;
		wk->store_sectors = wk->dirty_found = wk->drains = 0;
		wk->ms = 0;
	}
	free(c->pts);
	c->pts = NULL;
	tcount = th_now_ms() - t0;

	/* Plan: evenly over 1..W of each seed, every third torn; top up until enough crashed. */
	cap = target * 2 + 64;
	c->pts = calloc(cap, sizeof(*c->pts));
	cr_assert_not_null(c->pts);
	for (uint32_t round = 0, crashed = 0; crashed < target; round++) {
		uint32_t want = (target - crashed) + (target - crashed) / 20 + 2, first = c->npts;
		uint32_t per = (want + (uint32_t)nseeds - 1) / (uint32_t)nseeds;

		cr_assert_lt(round, 8, "%s: only %u of %u crash points crashed after %u rounds",
			     test, crashed, target, round);
		for (int s = 0; s < nseeds; s++) {
			uint64_t wn = c->w[s].count_writes;

			for (uint32_t j = 0, added = 0; added < per && j < 4 * per + wn; j++) {
				/* stride through 1..W, shifted per round so rounds do not repeat */
				uint64_t n =
					1 + ((uint64_t)j * wn / per + round * 7919u + j / per) % wn;
				bool tear = (j + round) % 3 == 2;

				if (plan(c, cap, s, (uint32_t)n, tear) ||
				    plan(c, cap, s, (uint32_t)n, !tear))
					added++;
			}
		}
		if (c->npts == first)
			break; /* every point of every seed is used */
		/* run the new points */
		{
			struct point *all = c->pts;
			uint32_t nall = c->npts;

			c->pts = all + first;
			c->npts = nall - first;
			run_batch(c);
			c->pts = all;
			c->npts = nall;
		}
		crashed = 0;
		for (int j = 0; j < c->jobs; j++)
			crashed += (uint32_t)c->wk[j].crashed;
	}
	for (int j = 0; j < c->jobs; j++) {
		struct worker *wk = &c->wk[j];

		c->crashed += wk->crashed;
		c->tore += wk->tore;
		c->no_crash += wk->no_crash;
		c->in_shutdown += wk->in_shutdown;
		sectors += wk->sectors;
		exact += wk->exact;
		acked += wk->acked;
		inflight += wk->inflight_at_crash;
		rts += wk->roundtrips;
		store_sectors += wk->store_sectors;
		dirty_found += wk->dirty_found;
		drains += wk->drains;
	}
	char summary[2048];

	snprintf(summary, sizeof(summary),
		 "%s (%s): %d seeds x %u ops, %" PRIu64 " device writes in the count runs "
		 "(%.1f s); %" PRIu64 " crash points crashed (%" PRIu64 " torn, %" PRIu64
		 " during the clean stop), %" PRIu64 " planned points past the end (not "
		 "counted); %" PRIu64 " sectors checked after recovery (%" PRIu64
		 " at their newest acknowledged value), %" PRIu64 " acknowledged writes, %" PRIu64
		 " requests in flight at the cut, %" PRIu64
		 " round trips + second restarts (%" PRIu64 " with a drain check); "
		 "%.1f MiB of dirty data replayed by recoveries, %" PRIu64 " store sectors "
		 "changed before the cuts (destaged, in write-back); "
		 "%d jobs, files in %s, %.1f s",
		 test, mode, nseeds, NOPS, total_w, tcount / 1000, c->crashed, c->tore,
		 c->in_shutdown, c->no_crash, sectors, exact, acked, inflight, rts, drains,
		 (double)dirty_found / (1 << 20), store_sectors, c->jobs, c->wk[0].dir,
		 (th_now_ms() - t0) / 1000);
	/* stderr too: make check's logs keep it (Criterion shows info only with --verbose) */
	fprintf(stderr, "%s\n", summary);
	cr_log_info("%s", summary);
	if (c->keep_going)
		fprintf(stderr, "%s: %u crash points failed\n", test, c->nfailed);
	if (c->nfailed)
		cr_assert_fail("%u crash points failed (listed above as FAILED:), the first: %s",
			       c->nfailed, c->err);
	cr_expect_geq(c->crashed, target, "%s: only %" PRIu64 " crash points crashed", test,
		      c->crashed);
	cr_expect_gt(c->tore, 0, "%s: no power cut tore a write", test);
	for (int s = 0; s < nseeds; s++)
		free(c->used[s]);
	free(c->pts);
	free(init_img);
}

TestSuite(writeback_powercut, .fini = campaign_teardown, .timeout = 0);

/* Does this agent's config parser take @mode? */
static bool mode_supported(const char *mode)
{
	char dir[256], cfg[320], store[320], cmd[1024];
	FILE *f;
	int rc;

	th_mkdtemp(dir, sizeof(dir));
	th_make_file(dir, "store.img", 1 << 20, store, sizeof(store));
	th_fmt(cfg, sizeof(cfg), "%s/c.json", dir);
	f = fopen(cfg, "w");
	cr_assert_not_null(f);
	fprintf(f,
		"{ \"listen\": \"%s/s\", \"volumes\": { \"v\": { \"backing\": \"%s\", \"cache\": "
		"{ \"mode\": \"%s\" } } }, \"cache\": { \"path\": \"%s/c.img\", \"size\": \"64M\", "
		"\"log_size\": \"16M\" } }\n",
		dir, store, mode, dir);
	fclose(f);
	th_fmt(cmd, sizeof(cmd), "'%s' --config '%s' --check-config >/dev/null 2>&1",
	       getenv("AGENT"), cfg);
	rc = system(cmd);
	th_rm_rf(dir);
	return rc == 0;
}

/* Is the agent (or this test) built with a sanitizer, which makes every run several times slower?
 */
static bool sanitized(void)
{
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
	return true;
#else
	const char *a = getenv("AGENT");

	return a && (strstr(a, "/tsan/") || strstr(a, "/sanitize/"));
#endif
}

/*
 * The power-cut campaign of the issue: >= 1000 crash points that really
 * crash, over 8 workload seeds (more in a soak), every sector checked after
 * recovery. Under a sanitizer (make check SANITIZE=1 / TSAN=1) 150 points.
 */
Test(writeback_powercut, crash_points)
{
	const char *mode = getenv("FT_POWERCUT_MODE");
	bool soak = getenv("FT_SOAK") && strcmp(getenv("FT_SOAK"), "0") != 0;
	uint32_t target = env_u32("FT_POWERCUT_POINTS", soak ? 20000 : sanitized() ? 150 : 1000);
	/* about 130 device writes per workload today: enough seeds for distinct points */
	int nseeds = (int)env_u32("FT_POWERCUT_SEEDS", target <= 1000 ? 8 : (target + 119) / 120);

	cr_assert_not_null(getenv("AGENT"), "AGENT is not set: run through 'make check'");
	mode = mode && *mode ? mode : "write-back";
	if (!mode_supported(mode))
		cr_skip_test("the agent does not take \"mode\": \"%s\" yet", mode);
	campaign("crash_points", mode, strcmp(mode, "write-back") != 0, "/dev/shm",
		 env_u32("FT_POWERCUT_SEED", 0x9c0ffee), nseeds < MAX_SEEDS ? nseeds : MAX_SEEDS,
		 target, (int)env_u32("FT_POWERCUT_JOBS", 2),
		 (int)env_u32("FT_POWERCUT_VERIFY_EVERY", 1));
}

/*
 * The layer under the write-through mode that exists today, with the
 * strict model (an acknowledged write is on the store, whatever the cache
 * device lost): 60 crash points, a third of them torn.
 */
Test(writeback_powercut, selftest_write_through)
{
	campaign("selftest_write_through", "write-through", true, "/tmp", 0x5e1f7e57ull, 2,
		 env_u32("FT_POWERCUT_SELFTEST_POINTS", 60), (int)env_u32("FT_POWERCUT_JOBS", 2),
		 1);
}

/* ---- the layer itself, in-process (no agent): what it keeps, loses and tears ---- */

static char g_ldir[256];

static void layer_teardown(void)
{
	if (g_ldir[0])
		th_rm_rf(g_ldir);
	g_ldir[0] = '\0';
}

static void layer_end_io(struct ft_bio *bio, int error)
{
	bio->stage = 1000 + (uint32_t)(error < 0 ? -error : 0); /* marks completion */
}

static void layer_io(struct ft_backend *b, enum ft_bio_op op, uint32_t flags, uint64_t off,
		     uint64_t len, void *buf)
{
	struct ft_bio bio = { .op = op,
			      .flags = flags,
			      .offset = off,
			      .len = len,
			      .buf = buf,
			      .end_io = layer_end_io };

	ft_bio_submit(b, &bio);
	/* Not attached to a reactor: the layer completes inline. */
	if (bio.stage != 1000) {
		fprintf(stderr, "layer_io: op %d completed with %u\n", op, bio.stage);
		_exit(3);
	}
}

/*
 * In a child: open @path through the layer with FLASHTIER_TEST_POWERCUT=@pc
 * and run the script (writes 1..7, a flush after write 2); returns the
 * child's wait status. The child writes what a read of block A returned
 * (after write 3, before any flush) to @path.read.
 */
static int layer_script(const char *path, const char *pc, const char *logpath)
{
	pid_t pid = fork();
	int status;

	cr_assert_geq(pid, 0);
	if (pid == 0) {
		struct ft_backend *b, *inner, *b2;
		uint8_t *buf = aligned_alloc(4096, 16 * BLK);
		int fd = open(logpath, O_WRONLY | O_CREAT | O_TRUNC, 0644);

		dup2(fd, 2);
		if (pc)
			setenv("FLASHTIER_TEST_POWERCUT", pc, 1);
		else
			unsetenv("FLASHTIER_TEST_POWERCUT");
		if (ft_backend_file_open(path, false, &b) < 0)
			_exit(4);
		inner = b;
		if (ft_powercut_wrap(&b) < 0)
			_exit(5);
		if (!pc)
			exit(b == inner ? 0 : 6); /* unset: must leave the handle alone */
		if (pc &&
		    (b == inner || b->size != inner->size || b->caps != inner->caps ||
		     b->min_block != inner->min_block || b->max_request != inner->max_request))
			_exit(7);
		/* A second handle (as for a second reactor): one count, one set of unflushed
		 * writes. */
		if (ft_backend_file_open(path, false, &b2) < 0 || ft_powercut_wrap(&b2) < 0)
			_exit(9);
		memset(buf, 0xaa, BLK);
		layer_io(b, FT_BIO_WRITE, 0, 0, BLK, buf); /* 1: A = aa */
		memset(buf, 0xbb, BLK);
		layer_io(b2, FT_BIO_WRITE, 0, BLK, BLK, buf); /* 2: B = bb */
		layer_io(b, FT_BIO_FLUSH, 0, 0, 0, NULL);
		memset(buf, 0xcc, BLK);
		layer_io(b, FT_BIO_WRITE, 0, 0, BLK, buf); /* 3: A = cc, lost */
		memset(buf, 0, BLK);
		layer_io(b, FT_BIO_READ, 0, 0, BLK, buf); /* reads see unflushed writes */
		{
			char rp[400];
			int rfd;

			snprintf(rp, sizeof(rp), "%s.read", path);
			rfd = open(rp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
			if (rfd < 0 || write(rfd, buf, BLK) != BLK)
				_exit(8);
			close(rfd);
		}
		memset(buf, 0xdd, BLK);
		layer_io(b2, FT_BIO_WRITE, FT_BIO_FUA, 2 * BLK, BLK, buf); /* 4: C = dd, FUA */
		layer_io(b, FT_BIO_WRITE_ZEROES, 0, 3 * BLK, BLK, NULL);   /* 5: D = 0, lost */
		memset(buf, 0xee, SECTOR);
		layer_io(b2, FT_BIO_WRITE, 0, BLK + SECTOR, SECTOR, buf); /* 6: in B, lost */
		memset(buf, 0x77, 4 * BLK);
		layer_io(b, FT_BIO_WRITE, 0, 4 * BLK, 4 * BLK, buf); /* 7: the cut (or torn) */
		b->ops->close(b);
		b2->ops->close(b2);
		exit(0);
	}
	cr_assert_eq(waitpid(pid, &status, 0), pid);
	return status;
}

static void layer_expect(const uint8_t *img, uint64_t off, uint64_t len, uint8_t v,
			 const char *what)
{
	for (uint64_t i = 0; i < len; i++)
		cr_assert_eq(img[off + i], v, "%s: byte %" PRIu64 " is 0x%02x, want 0x%02x", what,
			     off + i, img[off + i], v);
}

static void layer_file(char *path, size_t len, const char *name, uint8_t **img)
{
	int fd;

	th_make_file(g_ldir, name, 16 * BLK, path, len);
	fd = open(path, O_RDWR);
	cr_assert_geq(fd, 0);
	*img = malloc(16 * BLK);
	memset(*img, 0x11, 16 * BLK);
	cr_assert_eq(pwrite(fd, *img, 16 * BLK, 0), 16 * BLK);
	close(fd);
}

static void layer_read(const char *path, uint8_t *img)
{
	int fd = open(path, O_RDONLY);

	cr_assert_geq(fd, 0);
	cr_assert_eq(pread(fd, img, 16 * BLK, 0), 16 * BLK);
	close(fd);
}

TestSuite(powercut_layer, .fini = layer_teardown, .timeout = 30);

/* N=7: write 7 never lands; 3, 5, 6 (not flushed) are lost; 1, 2 (flushed), 4 (FUA) stay. */
Test(powercut_layer, loses_unflushed_keeps_flushed_and_fua)
{
	char path[320], log[320], rp[400];
	uint8_t *img, rd[BLK];
	uint64_t w = 0, f = 0;
	bool tore = true, sh = false;
	int status, fd;

	th_mkdtemp(g_ldir, sizeof(g_ldir));
	layer_file(path, sizeof(path), "dev.img", &img);
	th_fmt(log, sizeof(log), "%s/log", g_ldir);
	status = layer_script(path, "7", log);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == PC_EXIT,
		  "the layer's child ended with status 0x%x, want exit %d", status, PC_EXIT);
	cr_assert_eq(parse_powercut(log, &w, &f, &tore, &sh), 0, "no powercut line");
	cr_assert_eq(w, 7);
	cr_assert_eq(f, 1);
	cr_assert_not(tore);
	layer_read(path, img);
	layer_expect(img, 0, BLK, 0xaa, "write 1 (flushed)");
	layer_expect(img, BLK, BLK, 0xbb, "write 2 (flushed), write 6 lost");
	layer_expect(img, 2 * BLK, BLK, 0xdd, "write 4 (FUA)");
	layer_expect(img, 3 * BLK, BLK, 0x11, "write 5 (zeroes, not flushed)");
	layer_expect(img, 4 * BLK, 12 * BLK, 0x11, "write 7 (the cut) and beyond");
	th_fmt(rp, sizeof(rp), "%s.read", path);
	fd = open(rp, O_RDONLY);
	cr_assert_geq(fd, 0);
	cr_assert_eq(read(fd, rd, BLK), BLK);
	close(fd);
	layer_expect(rd, 0, BLK, 0xcc, "a read of an unflushed write");
	free(img);
}

/* N=7:tear: a reproducible prefix of 1..31 sectors of write 7 lands, nothing else changes. */
Test(powercut_layer, tear_is_a_reproducible_sector_prefix)
{
	char path[320], log[320];
	uint8_t *img;
	int k[2];

	th_mkdtemp(g_ldir, sizeof(g_ldir));
	for (int run = 0; run < 2; run++) {
		uint64_t w = 0, f = 0;
		bool tore = false, sh = false;
		int status;

		layer_file(path, sizeof(path), run ? "dev2.img" : "dev1.img", &img);
		th_fmt(log, sizeof(log), "%s/log%d", g_ldir, run);
		status = layer_script(path, "7:tear", log);
		cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == PC_EXIT);
		cr_assert_eq(parse_powercut(log, &w, &f, &tore, &sh), 0);
		cr_assert_eq(w, 7);
		cr_assert(tore, "a 16 KiB write was not torn");
		layer_read(path, img);
		layer_expect(img, 0, BLK, 0xaa, "write 1");
		layer_expect(img, BLK, BLK, 0xbb, "write 2");
		layer_expect(img, 2 * BLK, BLK, 0xdd, "write 4 (FUA)");
		layer_expect(img, 3 * BLK, BLK, 0x11, "write 5");
		k[run] = 0;
		while (k[run] < 32 && img[4 * BLK + (size_t)k[run] * SECTOR] == 0x77)
			k[run]++;
		cr_assert(k[run] >= 1 && k[run] < 32, "torn prefix of %d sectors of 32", k[run]);
		layer_expect(img, 4 * BLK, (uint64_t)k[run] * SECTOR, 0x77, "the torn prefix");
		layer_expect(img, 4 * BLK + (uint64_t)k[run] * SECTOR,
			     12 * BLK - (uint64_t)k[run] * SECTOR, 0x11, "past the torn prefix");
		free(img);
	}
	cr_assert_eq(k[0], k[1], "the same N tore %d and %d sectors", k[0], k[1]);
}

/* "0" counts only: everything lands, the line comes at exit; unset: the handle is untouched. */
Test(powercut_layer, count_only_and_unset)
{
	char path[320], log[320];
	uint8_t *img;
	uint64_t w = 0, f = 0;
	bool tore = true, sh = false;
	int status;

	th_mkdtemp(g_ldir, sizeof(g_ldir));
	layer_file(path, sizeof(path), "dev.img", &img);
	th_fmt(log, sizeof(log), "%s/log", g_ldir);
	status = layer_script(path, "0", log);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status 0x%x", status);
	cr_assert_eq(parse_powercut(log, &w, &f, &tore, &sh), 0, "no powercut line at exit");
	cr_assert_eq(w, 7);
	cr_assert_eq(f, 1);
	layer_read(path, img);
	layer_expect(img, 0, BLK, 0xcc, "write 3");
	layer_expect(img, BLK, SECTOR, 0xbb, "write 2");
	layer_expect(img, BLK + SECTOR, SECTOR, 0xee, "write 6");
	layer_expect(img, 2 * BLK, BLK, 0xdd, "write 4");
	layer_expect(img, 3 * BLK, BLK, 0x00, "write 5");
	layer_expect(img, 4 * BLK, 4 * BLK, 0x77, "write 7");
	free(img);

	layer_file(path, sizeof(path), "dev2.img", &img);
	status = layer_script(path, NULL, log);
	cr_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0, "status 0x%x", status);
	cr_assert_neq(parse_powercut(log, &w, &f, &tore, &sh), 0,
		      "a powercut line with the hook off");
	free(img);
}
