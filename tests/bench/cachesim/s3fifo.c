// SPDX-License-Identifier: MIT
/*
 * Reference S3-FIFO (Yang et al., "FIFO queues are all you need for cache
 * eviction", SOSP '23), written independently of the agent's directory:
 *
 *   S  small FIFO, S3_SMALL_PCT (10%) of the slots; new blocks enter here
 *   M  main FIFO with a 2-bit frequency (0..3), reinsertion ("second chances")
 *   G  ghost FIFO of evicted keys, as many entries as M has slots (90%)
 *
 * A hit sets freq = min(freq + 1, 3) and moves nothing. A miss whose key is
 * in G goes to M (and leaves G), any other miss to S. Eviction takes from S
 * while S holds at least its 10% share (or M is empty), otherwise from M.
 * Evicting from S: a block with freq >= S3_PROMOTE_MIN moves to M (freq
 * reset to 0; if that makes M exceed its share, M evicts one), others go to
 * G. Evicting from M: a block with freq > 0 is reinserted at M's head with
 * freq - 1, the first with freq 0 leaves.
 *
 * S3_PROMOTE_MIN = 1: "accessed at least once while in S" (the paper's text
 * and libCacheSim's default move-to-main threshold). The paper's Algorithm 1
 * listing writes "freq > 1", which would need two re-accesses.
 */
#include <stdlib.h>

#include "cachesim.h"

#define S3_SMALL_PCT   10
#define S3_PROMOTE_MIN 1
#define S3_FREQ_MAX    3

enum { QS, QM, QG };

struct s3fifo {
	uint64_t c, s_cap, m_cap, g_cap;
	struct hmap map;
	uint64_t evicted;
	struct node *n;
	struct queue q[3]; /* head = newest, tail = oldest */
	uint32_t free_head;
	uint64_t nalloc;
};

static void s3_destroy(void *p)
{
	struct s3fifo *s = p;

	if (!s)
		return;
	hmap_free(&s->map);
	free(s->n);
	free(s);
}

static void *s3_create(uint64_t c)
{
	struct s3fifo *s = calloc(1, sizeof(*s));
	uint64_t n;

	if (!s)
		return NULL;
	s->c = c;
	s->s_cap = c * S3_SMALL_PCT / 100;
	if (s->s_cap < 1)
		s->s_cap = 1;
	s->m_cap = c > s->s_cap ? c - s->s_cap : 1;
	s->g_cap = s->m_cap;
	n = c + s->g_cap + 1;
	s->n = malloc(n * sizeof(*s->n));
	if (!s->n || hmap_init(&s->map, n)) {
		s3_destroy(s);
		return NULL;
	}
	for (int i = 0; i < 3; i++)
		q_init(&s->q[i]);
	s->free_head = NIL;
	return s;
}

static void s3_move(struct s3fifo *s, uint32_t i, int to)
{
	q_unlink(&s->q[s->n[i].where], s->n, i);
	q_push_head(&s->q[to], s->n, i);
	s->n[i].where = (uint8_t)to;
}

static void s3_release(struct s3fifo *s, uint32_t i)
{
	q_unlink(&s->q[s->n[i].where], s->n, i);
	hmap_del(&s->map, s->n[i].key);
	s->n[i].next = s->free_head;
	s->free_head = i;
}

/* Evict one block from M (second chances first). */
static void s3_evict_main(struct s3fifo *s)
{
	for (;;) {
		uint32_t t = s->q[QM].tail;

		if (s->n[t].freq > 0) {
			s->n[t].freq--;
			s3_move(s, t, QM);
		} else {
			s3_release(s, t);
			return;
		}
	}
}

/* Free exactly one slot. */
static void s3_evict(struct s3fifo *s)
{
	s->evicted++;
	while (s->q[QS].size && (s->q[QS].size >= s->s_cap || !s->q[QM].size)) {
		uint32_t t = s->q[QS].tail;

		if (s->n[t].freq >= S3_PROMOTE_MIN) {
			s->n[t].freq = 0;
			s3_move(s, t, QM);
			if (s->q[QM].size > s->m_cap) {
				s3_evict_main(s);
				return;
			}
		} else {
			s3_move(s, t, QG);
			if (s->q[QG].size > s->g_cap)
				s3_release(s, s->q[QG].tail);
			return;
		}
	}
	s3_evict_main(s);
}

static bool s3_access(void *p, uint64_t key64, uint32_t size)
{
	struct s3fifo *s = p;
	uint32_t key = (uint32_t)key64;
	uint32_t i = hmap_get(&s->map, key);
	int to = QS;

	(void)size;
	if (i != NIL && s->n[i].where != QG) {
		if (s->n[i].freq < S3_FREQ_MAX)
			s->n[i].freq++;
		return true;
	}
	if (i != NIL) {
		/* remembered in G: leave G now, enter M below */
		s3_release(s, i);
		to = QM;
	}
	if (s->q[QS].size + s->q[QM].size >= s->c)
		s3_evict(s);
	i = s->free_head;
	if (i != NIL)
		s->free_head = s->n[i].next;
	else
		i = (uint32_t)s->nalloc++;
	s->n[i].key = key;
	s->n[i].freq = 0;
	s->n[i].where = (uint8_t)to;
	q_push_head(&s->q[to], s->n, i);
	hmap_put(&s->map, key, i);
	return false;
}

static void s3_stats(void *p, struct pstats *st)
{
	struct s3fifo *s = p;

	st->used = s->q[QS].size + s->q[QM].size;
	st->evicted = s->evicted;
}

static void s3_prefetch(void *p, uint64_t key)
{
	hmap_prefetch(&((struct s3fifo *)p)->map, (uint32_t)key);
}

const struct policy_ops s3fifo_ops = {
	.name = "S3-FIFO",
	.create = s3_create,
	.access = s3_access,
	.destroy = s3_destroy,
	.stats = s3_stats,
	.prefetch = s3_prefetch,
};
