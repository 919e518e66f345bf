// SPDX-License-Identifier: MIT
/*
 * Reference bounds for the zipf+scan trace (not online policies): what a
 * cache that never keeps a scan block could reach at best.
 *
 *   OPT   Belady's MIN with bypass: on a miss, the block whose next use is
 *         furthest away (possibly the missed one itself, which is then not
 *         inserted) leaves. It knows the future, so no policy can beat it.
 *   LFU*  "perfect" LFU: knows every block's access count so far (unbounded
 *         memory); a miss is inserted only if it has been counted more often
 *         than the least counted cached block, which it then replaces. On
 *         independent Zipf accesses this is about the best an online policy
 *         can do (the count is all the past says about a block).
 *
 * Both are replayed with scan blocks (>= scan_first) never inserted. Cached
 * blocks sit in a binary heap (max by next use for OPT, min by count for
 * LFU*) with lazy deletion: an entry is current only while it matches the
 * block's recorded key, stale ones are dropped when they surface or when the
 * heap is compacted.
 */
#include <errno.h>
#include <stdlib.h>

#include "cachesim.h"

struct hent {
	uint32_t k; /* next use (OPT) or count (LFU*) */
	uint32_t b;
};

struct heap {
	struct hent *e;
	uint64_t n, cap;
	bool max; /* max-heap (OPT) or min-heap (LFU*) */
};

static bool above(const struct heap *h, uint64_t i, uint64_t j)
{
	return h->max ? h->e[i].k > h->e[j].k : h->e[i].k < h->e[j].k;
}

static void swap(struct heap *h, uint64_t i, uint64_t j)
{
	struct hent t = h->e[i];

	h->e[i] = h->e[j];
	h->e[j] = t;
}

static void sift_down(struct heap *h, uint64_t i)
{
	for (;;) {
		uint64_t l = 2 * i + 1, r = l + 1, m = i;

		if (l < h->n && above(h, l, m))
			m = l;
		if (r < h->n && above(h, r, m))
			m = r;
		if (m == i)
			return;
		swap(h, i, m);
		i = m;
	}
}

/* Keep only the entries @cur still vouches for, and re-heapify. */
static void compact(struct heap *h, const uint32_t *cur)
{
	uint64_t k = 0;

	for (uint64_t i = 0; i < h->n; i++)
		if (cur[h->e[i].b] == h->e[i].k)
			h->e[k++] = h->e[i];
	h->n = k;
	for (uint64_t i = h->n / 2 + 1; i-- > 0;)
		sift_down(h, i);
}

static void push(struct heap *h, uint32_t k, uint32_t b, const uint32_t *cur)
{
	uint64_t i;

	if (h->n == h->cap)
		compact(h, cur);
	i = h->n++;
	h->e[i] = (struct hent){ k, b };
	while (i) {
		uint64_t p = (i - 1) / 2;

		if (!above(h, i, p))
			break;
		swap(h, i, p);
		i = p;
	}
}

/* The top entry that is still current (the heap holds at least one). */
static struct hent top(struct heap *h, const uint32_t *cur)
{
	while (cur[h->e[0].b] != h->e[0].k) {
		h->e[0] = h->e[--h->n];
		sift_down(h, 0);
	}
	return h->e[0];
}

static void pop(struct heap *h)
{
	h->e[0] = h->e[--h->n];
	sift_down(h, 0);
}

#define NEVER UINT32_MAX

int bound_next_use(const uint32_t *blk, uint64_t n, uint32_t **out)
{
	uint32_t max = 0, *next, *last;

	if (n >= NEVER)
		return -EINVAL;
	for (uint64_t i = 0; i < n; i++)
		if (blk[i] > max)
			max = blk[i];
	next = malloc(n * sizeof(*next));
	last = malloc(((uint64_t)max + 1) * sizeof(*last));
	if (!next || !last) {
		free(next);
		free(last);
		return -ENOMEM;
	}
	for (uint64_t b = 0; b <= max; b++)
		last[b] = NEVER;
	for (uint64_t i = n; i-- > 0;) {
		next[i] = last[blk[i]];
		last[blk[i]] = (uint32_t)i;
	}
	free(last);
	*out = next;
	return 0;
}

int bound_run(enum bound_kind kind, const uint32_t *blk, const uint32_t *next, uint64_t n,
	      uint32_t scan_first, uint64_t cap, uint64_t *hits_out, uint64_t *ws_hits_out)
{
	struct heap h = { .max = kind == BOUND_OPT };
	uint32_t max = 0, *cur, *cnt = NULL;
	uint64_t used = 0, hits = 0, ws_hits = 0;

	for (uint64_t i = 0; i < n; i++)
		if (blk[i] > max)
			max = blk[i];
	/* cur[b]: the heap key b is cached under, or 0 if not cached (keys are >= 1) */
	cur = calloc((uint64_t)max + 1, sizeof(*cur));
	if (kind == BOUND_LFU)
		cnt = calloc((uint64_t)max + 1, sizeof(*cnt));
	h.cap = 2 * cap + 16;
	h.e = malloc(h.cap * sizeof(*h.e));
	if (!cur || !h.e || (kind == BOUND_LFU && !cnt)) {
		free(cur);
		free(cnt);
		free(h.e);
		return -ENOMEM;
	}
	for (uint64_t i = 0; i < n; i++) {
		uint32_t b = blk[i], k;
		bool hit = cur[b] != 0;

		hits += hit;
		ws_hits += hit && b < scan_first;
		if (kind == BOUND_OPT) {
			k = next[i]; /* > i >= 0, or NEVER */
		} else {
			k = ++cnt[b];
		}
		if (hit) {
			cur[b] = k;
			push(&h, k, b, cur);
			continue;
		}
		if (b >= scan_first)
			continue; /* the scan is never cached */
		if (used == cap) {
			struct hent t = top(&h, cur);

			/* OPT: keep what is used sooner; LFU*: keep the incumbent on a tie */
			if (kind == BOUND_OPT ? t.k <= k : t.k >= k)
				continue;
			cur[t.b] = 0;
			pop(&h);
			used--;
		}
		cur[b] = k;
		used++;
		push(&h, k, b, cur);
	}
	free(cur);
	free(cnt);
	free(h.e);
	*hits_out = hits;
	*ws_hits_out = ws_hits;
	return 0;
}
