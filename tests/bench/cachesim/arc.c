// SPDX-License-Identifier: MIT
/*
 * ARC (Megiddo & Modha, "ARC: A Self-Tuning, Low Overhead Replacement
 * Cache", FAST '03), following the paper's Figure 4 case by case.
 *
 * T1/T2 hold cached blocks (seen once / at least twice recently), B1/B2 are
 * their ghosts (keys only). p is the adaptive target size of T1. Invariants:
 * |T1| + |T2| <= c, |T1| + |B1| <= c, |T1| + |T2| + |B1| + |B2| <= 2c.
 */
#include <assert.h>
#include <stdlib.h>

#include "cachesim.h"

enum { T1, T2, B1, B2 };

struct arc {
	uint64_t c;
	double p;
	struct hmap map;
	uint64_t evicted;
	struct node *n;
	struct queue q[4]; /* head = MRU, tail = LRU */
	uint32_t free_head;
	uint64_t nalloc;
};

static void arc_destroy(void *p)
{
	struct arc *a = p;

	if (!a)
		return;
	hmap_free(&a->map);
	free(a->n);
	free(a);
}

static void *arc_create(uint64_t c)
{
	struct arc *a = calloc(1, sizeof(*a));
	uint64_t n = 2 * c;

	if (!a)
		return NULL;
	a->c = c;
	a->n = malloc(n * sizeof(*a->n));
	if (!a->n || hmap_init(&a->map, n)) {
		arc_destroy(a);
		return NULL;
	}
	for (int i = 0; i < 4; i++)
		q_init(&a->q[i]);
	a->free_head = NIL;
	return a;
}

static void arc_move(struct arc *a, uint32_t i, int to)
{
	q_unlink(&a->q[a->n[i].where], a->n, i);
	q_push_head(&a->q[to], a->n, i);
	a->n[i].where = (uint8_t)to;
}

/* Forget the LRU entry of @list entirely. */
static void arc_drop_lru(struct arc *a, int list)
{
	uint32_t i = a->q[list].tail;

	assert(i != NIL);
	q_unlink(&a->q[list], a->n, i);
	hmap_del(&a->map, a->n[i].key);
	a->n[i].next = a->free_head;
	a->free_head = i;
}

/* REPLACE(x, p): evict the LRU of T1 into B1 or the LRU of T2 into B2. */
static void arc_replace(struct arc *a, bool x_in_b2)
{
	double t1 = (double)a->q[T1].size;

	a->evicted++;
	if (a->q[T1].size >= 1 && ((x_in_b2 && t1 == a->p) || t1 > a->p)) {
		arc_move(a, a->q[T1].tail, B1);
	} else {
		assert(a->q[T2].size >= 1);
		arc_move(a, a->q[T2].tail, B2);
	}
}

static bool arc_access(void *p, uint64_t key64, uint32_t size)
{
	struct arc *a = p;
	uint32_t key = (uint32_t)key64;
	uint32_t i = hmap_get(&a->map, key);
	double b1 = (double)a->q[B1].size, b2 = (double)a->q[B2].size, c = (double)a->c;
	uint64_t l1, total;

	(void)size;
	if (i != NIL) {
		switch (a->n[i].where) {
		case T1:
		case T2: /* Case I: a hit */
			arc_move(a, i, T2);
			return true;
		case B1: /* Case II: adapt towards recency */
			a->p += b1 >= b2 ? 1 : b2 / b1;
			if (a->p > c)
				a->p = c;
			arc_replace(a, false);
			arc_move(a, i, T2);
			return false;
		default: /* Case III (B2): adapt towards frequency */
			a->p -= b2 >= b1 ? 1 : b1 / b2;
			if (a->p < 0)
				a->p = 0;
			arc_replace(a, true);
			arc_move(a, i, T2);
			return false;
		}
	}

	/* Case IV: in none of the four lists */
	l1 = a->q[T1].size + a->q[B1].size;
	total = l1 + a->q[T2].size + a->q[B2].size;
	if (l1 == a->c) {
		if (a->q[T1].size < a->c) {
			arc_drop_lru(a, B1);
			arc_replace(a, false);
		} else {
			arc_drop_lru(a, T1); /* B1 is empty: evict without a ghost */
			a->evicted++;
		}
	} else if (total >= a->c) {
		if (total == 2 * a->c)
			arc_drop_lru(a, B2);
		arc_replace(a, false);
	}
	if (a->free_head != NIL) {
		i = a->free_head;
		a->free_head = a->n[i].next;
	} else {
		i = (uint32_t)a->nalloc++;
	}
	a->n[i].key = key;
	a->n[i].where = T1;
	q_push_head(&a->q[T1], a->n, i);
	hmap_put(&a->map, key, i);
	return false;
}

static void arc_stats(void *p, struct pstats *st)
{
	struct arc *a = p;

	st->used = a->q[T1].size + a->q[T2].size;
	st->evicted = a->evicted;
}

static void arc_prefetch(void *p, uint64_t key)
{
	hmap_prefetch(&((struct arc *)p)->map, (uint32_t)key);
}

const struct policy_ops arc_ops = {
	.name = "ARC",
	.create = arc_create,
	.access = arc_access,
	.destroy = arc_destroy,
	.stats = arc_stats,
	.prefetch = arc_prefetch,
};
