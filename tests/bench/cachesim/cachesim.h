/* SPDX-License-Identifier: MIT */
/*
 * cachesim: trace-replay cache simulator (tests/bench/cachesim).
 *
 * Every policy sits behind struct policy_ops. A trace is an array of 4 KiB
 * block numbers on one volume; policies see them as 64-bit keys.
 */
#ifndef CACHESIM_H
#define CACHESIM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define BLOCK_SIZE 4096u
#define NIL	   UINT32_MAX

/* ---- policies ---- */

/* What a policy reports after a replay. */
struct pstats {
	uint64_t used;	   /* blocks resident now */
	uint64_t evicted;  /* blocks evicted to make room (ghost bookkeeping excluded) */
	uint64_t bypassed; /* misses not inserted (admission) */
	size_t memory;	   /* bytes of metadata, if the implementation reports it */
};

struct policy_ops {
	const char *name;
	/* A cache of @capacity blocks, or NULL on allocation failure. */
	void *(*create)(uint64_t capacity);
	/* Account one access; true on a hit. A miss inserts (unless bypassed). */
	bool (*access)(void *p, uint64_t key, uint32_t size);
	void (*destroy)(void *p);
	void (*stats)(void *p, struct pstats *st);
	/* Optional hint: @key will be accessed soon (prefetch its hash slot). */
	void (*prefetch)(void *p, uint64_t key);
};

extern const struct policy_ops lru_ops;
extern const struct policy_ops arc_ops;
extern const struct policy_ops twoq_ops;
extern const struct policy_ops s3fifo_ops;
extern const struct policy_ops flashtier_ops;
extern const struct policy_ops flashtier_noadm_ops;

/*
 * Policy keys are trace block numbers: below 2^32 - 1 (the hash map and the
 * nodes store 32 bits, which halves their cache footprint).
 */
#define KEY_MAX (UINT32_MAX - 1)

/* ---- key -> index hash map (open addressing, linear probing) ---- */

struct hmap_ent {
	uint32_t key;
	uint32_t val;
};

struct hmap {
	struct hmap_ent *e;
	uint32_t mask;
	uint32_t shift;
	uint64_t count;
};

int hmap_init(struct hmap *m, uint64_t max_entries);
void hmap_free(struct hmap *m);
uint32_t hmap_get(const struct hmap *m, uint32_t key);
void hmap_put(struct hmap *m, uint32_t key, uint32_t val);
bool hmap_del(struct hmap *m, uint32_t key);

static inline void hmap_prefetch(const struct hmap *m, uint32_t key)
{
	__builtin_prefetch(&m->e[((uint64_t)key * 0x9e3779b97f4a7c15ull) >> m->shift]);
}

/*
 * Policy entries live in one array of nodes (one cache line access per
 * node); a queue links them by index: head = newest / MRU, tail = oldest.
 */
struct node {
	uint32_t key;
	uint32_t prev, next;
	uint8_t where; /* which queue */
	uint8_t freq;
};

struct queue {
	uint32_t head, tail;
	uint64_t size;
};

static inline void q_init(struct queue *q)
{
	q->head = NIL;
	q->tail = NIL;
	q->size = 0;
}

static inline void q_push_head(struct queue *q, struct node *n, uint32_t i)
{
	n[i].prev = NIL;
	n[i].next = q->head;
	if (q->head != NIL)
		n[q->head].prev = i;
	else
		q->tail = i;
	q->head = i;
	q->size++;
}

static inline void q_unlink(struct queue *q, struct node *n, uint32_t i)
{
	if (n[i].prev != NIL)
		n[n[i].prev].next = n[i].next;
	else
		q->head = n[i].next;
	if (n[i].next != NIL)
		n[n[i].next].prev = n[i].prev;
	else
		q->tail = n[i].prev;
	q->size--;
}

/* ---- PRNG: xoshiro256** seeded through splitmix64 ---- */

struct rng {
	uint64_t s[4];
};

void rng_seed(struct rng *r, uint64_t seed);
uint64_t rng_next(struct rng *r);
/* Uniform in [0, 1) with 53 random bits. */
double rng_double(struct rng *r);
/* Uniform in [0, n). */
uint64_t rng_below(struct rng *r, uint64_t n);

/* ---- traces ---- */

struct trace_params {
	uint64_t blocks;   /* working set (distinct blocks the popularity laws draw from) */
	uint64_t accesses; /* trace length */
	uint64_t seed;
	double scan_frac;   /* zipf+scan: fraction of accesses that are scan accesses */
	double scan_region; /* zipf+scan: scanned region, as a multiple of blocks */
	uint64_t scan_len;  /* zipf+scan: blocks per scan (0: one pass over the region) */
	uint64_t scan_chunk; /* zipf+scan: blocks per scan request (0: a scan back to back) */
	double scan_duty;   /* zipf+scan: scan's share of the accesses while it runs (0: all along) */
	double scan_zipf;   /* zipf-S+scan (TRACE_ZIPFS_SCAN): its Zipf exponent S */
	double loop_frac;   /* loop: loop length as a multiple of blocks */
};

/*
 * Trace kinds, in the order they run. The scan traces share their parameters
 * (--scan-*) and differ in the working set's Zipf exponent: 0.9 and 1.1 run
 * by default, and --scan-zipf S adds a third, zipf-S+scan.
 */
enum trace_kind {
	TRACE_ZIPF09,
	TRACE_ZIPF11,
	TRACE_ZIPF12,
	TRACE_PARETO,
	TRACE_ZIPF09_SCAN, /* carries the +5-over-LRU criterion */
	TRACE_ZIPF11_SCAN, /* +5 over LRU printed for information only */
	TRACE_ZIPFS_SCAN,  /* --scan-zipf S; +5 printed for information only */
	TRACE_LOOP,
	TRACE_NKINDS,
};

#define TRACE_MAX_SIZES 8

struct trace {
	enum trace_kind kind;
	char name[32];
	char desc[384];
	uint32_t *blk; /* block numbers, accesses of them */
	uint64_t n;
	uint64_t distinct; /* distinct blocks in blk[] */
	uint64_t base;	   /* what cache sizes are relative to */
	int nsizes;
	double sizes[TRACE_MAX_SIZES]; /* fractions of base */
	bool scan_trace;	       /* one of the zipf+scan traces */
	double scan_zipf;	       /* zipf+scan: the working set's Zipf exponent */
	uint64_t scan_len;	       /* zipf+scan: blocks per scan */
	uint64_t scan_chunk;	       /* zipf+scan: blocks per scan request */
	uint32_t scan_first;	       /* zipf+scan: blocks >= this are scan blocks */
};

extern const char *const trace_names[TRACE_NKINDS];

/* Generate trace @kind into @t; 0 or -ENOMEM. */
int trace_generate(enum trace_kind kind, const struct trace_params *tp, struct trace *t);
void trace_free(struct trace *t);
/* "zipf-S+scan" with S printed (one decimal at least) into @buf. */
void trace_scan_name(char *buf, size_t len, double s);

/* Zipf(s) over ranks 1..n by rejection-inversion (Hörmann & Derflinger 1996). */
struct zipf {
	double s, n;
	double h_x1, h_n, sq;
};

void zipf_init(struct zipf *z, uint64_t n, double s);
uint64_t zipf_sample(const struct zipf *z, struct rng *r);

/* ---- reference bounds for zipf+scan (bounds.c) ---- */

enum bound_kind {
	BOUND_OPT, /* Belady's MIN with bypass */
	BOUND_LFU, /* LFU knowing every block's count so far, admitting by count */
};

/* next[i]: index of the next access to blk[i], UINT32_MAX if none; 0, -EINVAL or -ENOMEM. */
int bound_next_use(const uint32_t *blk, uint64_t n, uint32_t **next);
/* Replay with blocks >= scan_first never cached; hits, and hits below scan_first. */
int bound_run(enum bound_kind kind, const uint32_t *blk, const uint32_t *next, uint64_t n,
	      uint32_t scan_first, uint64_t cap, uint64_t *hits, uint64_t *ws_hits);

/* Self-tests of the samplers and the hash map: print to stdout (and @also), return failures. */
int trace_selftest(void);

/* Distinct blocks among the first @n of @blk (0 if out of memory). */
uint64_t trace_count_distinct(const uint32_t *blk, uint64_t n);

/* printf to stdout and, with --out, to the markdown file too. */
void sim_print(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
