// SPDX-License-Identifier: MIT
/* LRU: hash map + doubly linked list; the list's tail is evicted. */
#include <stdlib.h>

#include "cachesim.h"

struct lru {
	uint64_t cap;
	struct hmap map;
	uint64_t evicted;
	struct node *n;
	struct queue q; /* head = most recently used */
};

static void lru_destroy(void *p)
{
	struct lru *c = p;

	if (!c)
		return;
	hmap_free(&c->map);
	free(c->n);
	free(c);
}

static void *lru_create(uint64_t cap)
{
	struct lru *c = calloc(1, sizeof(*c));

	if (!c)
		return NULL;
	c->cap = cap;
	c->n = malloc(cap * sizeof(*c->n));
	if (!c->n || hmap_init(&c->map, cap)) {
		lru_destroy(c);
		return NULL;
	}
	q_init(&c->q);
	return c;
}

static bool lru_access(void *p, uint64_t key, uint32_t size)
{
	struct lru *c = p;
	uint32_t i = hmap_get(&c->map, (uint32_t)key);

	(void)size;
	if (i != NIL) {
		q_unlink(&c->q, c->n, i);
		q_push_head(&c->q, c->n, i);
		return true;
	}
	if (c->q.size == c->cap) {
		i = c->q.tail;
		q_unlink(&c->q, c->n, i);
		hmap_del(&c->map, c->n[i].key);
		c->evicted++;
	} else {
		i = (uint32_t)c->q.size; /* nothing leaves before the cache is full */
	}
	c->n[i].key = (uint32_t)key;
	q_push_head(&c->q, c->n, i);
	hmap_put(&c->map, (uint32_t)key, i);
	return false;
}

static void lru_stats(void *p, struct pstats *st)
{
	struct lru *c = p;

	st->used = c->q.size;
	st->evicted = c->evicted;
}

static void lru_prefetch(void *p, uint64_t key)
{
	hmap_prefetch(&((struct lru *)p)->map, (uint32_t)key);
}

const struct policy_ops lru_ops = {
	.name = "LRU",
	.create = lru_create,
	.access = lru_access,
	.destroy = lru_destroy,
	.stats = lru_stats,
	.prefetch = lru_prefetch,
};
