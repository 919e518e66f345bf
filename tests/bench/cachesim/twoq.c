// SPDX-License-Identifier: MIT
/*
 * Full 2Q (Johnson & Shasha, VLDB '94, section 2.2 "Full Version"):
 *   A1in  FIFO of blocks seen once, |A1in| target Kin = 25% of the slots;
 *   A1out FIFO of keys (a ghost, no slot) evicted from A1in, Kout = 50%;
 *   Am    LRU of blocks re-referenced after leaving A1in.
 * A hit in A1in does not move the block (correlated references).
 */
#include <stdlib.h>

#include "cachesim.h"

#define TWOQ_KIN_PCT  25
#define TWOQ_KOUT_PCT 50

enum { A1IN, A1OUT, AM };

struct twoq {
	uint64_t c, kin, kout;
	struct hmap map;
	uint64_t evicted;
	struct node *n;
	struct queue q[3]; /* head = newest / MRU */
	uint32_t free_head;
	uint64_t nalloc;
};

static void twoq_destroy(void *p)
{
	struct twoq *t = p;

	if (!t)
		return;
	hmap_free(&t->map);
	free(t->n);
	free(t);
}

static void *twoq_create(uint64_t c)
{
	struct twoq *t = calloc(1, sizeof(*t));
	uint64_t n;

	if (!t)
		return NULL;
	t->c = c;
	t->kin = c * TWOQ_KIN_PCT / 100;
	t->kout = c * TWOQ_KOUT_PCT / 100;
	if (t->kin < 1)
		t->kin = 1;
	if (t->kout < 1)
		t->kout = 1;
	/* c slots, kout ghosts, and one ghost in flight before the trim */
	n = c + t->kout + 1;
	t->n = malloc(n * sizeof(*t->n));
	if (!t->n || hmap_init(&t->map, n)) {
		twoq_destroy(t);
		return NULL;
	}
	for (int i = 0; i < 3; i++)
		q_init(&t->q[i]);
	t->free_head = NIL;
	return t;
}

static void twoq_release(struct twoq *t, int list, uint32_t i)
{
	q_unlink(&t->q[list], t->n, i);
	hmap_del(&t->map, t->n[i].key);
	t->n[i].next = t->free_head;
	t->free_head = i;
}

static uint32_t twoq_alloc(struct twoq *t)
{
	uint32_t i = t->free_head;

	if (i != NIL)
		t->free_head = t->n[i].next;
	else
		i = (uint32_t)t->nalloc++;
	return i;
}

/* reclaimfor(): make room for one block when every slot is in use. */
static void twoq_reclaim(struct twoq *t)
{
	uint32_t y;

	if (t->q[A1IN].size + t->q[AM].size < t->c)
		return; /* a free slot */
	t->evicted++;
	/* (Am is empty only while a tiny cache has Kin >= every slot) */
	if (t->q[A1IN].size > t->kin || !t->q[AM].size) {
		/* page out A1in's tail, remember its key in A1out */
		y = t->q[A1IN].tail;
		q_unlink(&t->q[A1IN], t->n, y);
		q_push_head(&t->q[A1OUT], t->n, y);
		t->n[y].where = A1OUT;
		if (t->q[A1OUT].size > t->kout)
			twoq_release(t, A1OUT, t->q[A1OUT].tail);
	} else {
		/* page out Am's tail, not remembered */
		twoq_release(t, AM, t->q[AM].tail);
	}
}

static bool twoq_access(void *p, uint64_t key64, uint32_t size)
{
	struct twoq *t = p;
	uint32_t key = (uint32_t)key64;
	uint32_t i = hmap_get(&t->map, key);

	(void)size;
	if (i != NIL) {
		switch (t->n[i].where) {
		case AM:
			q_unlink(&t->q[AM], t->n, i);
			q_push_head(&t->q[AM], t->n, i);
			return true;
		case A1IN:
			return true;
		default: /* A1OUT: a miss, admitted to Am */
			q_unlink(&t->q[A1OUT], t->n, i);
			/* the ghost's node is reused; keep it out of reclaim's way */
			twoq_reclaim(t);
			q_push_head(&t->q[AM], t->n, i);
			t->n[i].where = AM;
			return false;
		}
	}
	twoq_reclaim(t);
	i = twoq_alloc(t);
	t->n[i].key = key;
	t->n[i].where = A1IN;
	q_push_head(&t->q[A1IN], t->n, i);
	hmap_put(&t->map, key, i);
	return false;
}

static void twoq_stats(void *p, struct pstats *st)
{
	struct twoq *t = p;

	st->used = t->q[A1IN].size + t->q[AM].size;
	st->evicted = t->evicted;
}

static void twoq_prefetch(void *p, uint64_t key)
{
	hmap_prefetch(&((struct twoq *)p)->map, (uint32_t)key);
}

const struct policy_ops twoq_ops = {
	.name = "2Q",
	.create = twoq_create,
	.access = twoq_access,
	.destroy = twoq_destroy,
	.stats = twoq_stats,
	.prefetch = twoq_prefetch,
};
