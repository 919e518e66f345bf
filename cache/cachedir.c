/* SPDX-License-Identifier: MIT */
/*
 * S3-FIFO cache directory (see include/flashtier/cachedir.h).
 *
 * Layout (structure of arrays, so a slot costs 17 bytes, not a padded struct):
 *   key[slot]    the block held
 *   hnext[slot]  next slot in the same hash bucket
 *   qnext[slot]  next (newer) slot in its FIFO, or in the free list
 *   state[slot]  in use, queue (small/main), pinned, 2-bit access counter
 * FIFOs are singly linked from oldest (head) to newest (tail): eviction pops
 * the head, insertion and reinsertion push at the tail. A removed block
 * (invalidation) leaves its slot in its FIFO as a tombstone, so removal is
 * O(1) without a second link per slot; the slot also goes on the free stack
 * (linked through hnext, unused while a slot is out of the index). Reused
 * from there, it keeps its FIFO position; eviction unqueues any tombstone it
 * meets.
 *
 * The ghost FIFO stores no keys: a table of 32-bit cells, each a 16-bit key
 * fingerprint and the 16-bit "epoch" in which it was evicted. An epoch is
 * 1/16384th of the ghost's capacity in evictions, so a fingerprint is a live
 * ghost while fewer than ghost_cap evictions happened since (to within one
 * epoch): the same window a FIFO of ghost_cap keys would give, in 4 bytes a
 * ghost. A fingerprint collision only makes a block look like a returning
 * one, which costs nothing but a slightly early promotion.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "flashtier/cachedir.h"
#include "flashtier/hash.h"

#define NONE FT_CACHEDIR_NONE

/* state bits */
#define ST_USED	      0x01
#define ST_MAIN	      0x02 /* in the main FIFO (else the small one) */
#define ST_PINNED     0x04
#define ST_QUEUED     0x08 /* on a FIFO (a tombstone if not ST_USED) */
#define ST_FREQ_SHIFT 4
#define ST_FREQ_MASK  (3u << ST_FREQ_SHIFT)

/* A block read again while in the small FIFO is promoted on eviction. */
#define PROMOTE_FREQ 1
#define GHOST_PROBES 8
#define GHOST_EPOCHS 16384u

struct fifo {
	uint32_t head, tail, len;
};

struct ft_cachedir {
	uint32_t nslots, used;
	uint32_t small_target; /* 10% of the slots */
	uint64_t *key;
	uint32_t *hnext;
	uint32_t *qnext;
	uint8_t *state;
	uint32_t *bucket;
	uint32_t nbuckets;
	struct fifo small, main;
	uint32_t free_head;

	uint32_t *ghost;
	uint32_t nghost;
	uint32_t ghost_cap;    /* remembered evictions (= the main FIFO's size) */
	uint32_t ghost_window; /* epochs a ghost stays live */
	uint32_t epoch_len;    /* evictions per epoch */
	uint32_t epoch_count;  /* evictions into the current epoch */
	uint16_t epoch;
};

/* Map a 32-bit hash onto [0, n) without a division (Lemire's multiply-shift). */
static uint32_t range(uint32_t h, uint32_t n)
{
	return (uint32_t)(((uint64_t)h * n) >> 32);
}

static unsigned freq(const struct ft_cachedir *d, uint32_t s)
{
	return (d->state[s] & ST_FREQ_MASK) >> ST_FREQ_SHIFT;
}

static void set_freq(struct ft_cachedir *d, uint32_t s, unsigned f)
{
	d->state[s] = (uint8_t)((d->state[s] & ~ST_FREQ_MASK) | (f << ST_FREQ_SHIFT));
}

/* ---- FIFOs ---- */

static void fifo_push(struct ft_cachedir *d, struct fifo *q, uint32_t s)
{
	d->qnext[s] = NONE;
	if (q->tail == NONE)
		q->head = s;
	else
		d->qnext[q->tail] = s;
	q->tail = s;
	q->len++;
}

static uint32_t fifo_pop(struct ft_cachedir *d, struct fifo *q)
{
	uint32_t s = q->head;

	if (s == NONE)
		return NONE;
	q->head = d->qnext[s];
	if (q->head == NONE)
		q->tail = NONE;
	q->len--;
	return s;
}

/* ---- hash index ---- */

static uint32_t bucket_of(const struct ft_cachedir *d, ft_cache_key k)
{
	return range((uint32_t)ft_mix64(k), d->nbuckets);
}

static void hash_add(struct ft_cachedir *d, uint32_t s)
{
	uint32_t b = bucket_of(d, d->key[s]);

	d->hnext[s] = d->bucket[b];
	d->bucket[b] = s;
}

static void hash_del(struct ft_cachedir *d, uint32_t s)
{
	uint32_t *p = &d->bucket[bucket_of(d, d->key[s])];

	while (*p != NONE) {
		if (*p == s) {
			*p = d->hnext[s];
			return;
		}
		p = &d->hnext[*p];
	}
}

uint32_t ft_cachedir_find(const struct ft_cachedir *d, ft_cache_key key)
{
	for (uint32_t s = d->bucket[bucket_of(d, key)]; s != NONE; s = d->hnext[s])
		if (d->key[s] == key)
			return s;
	return NONE;
}

/* ---- ghost ---- */

static uint32_t ghost_fp(ft_cache_key k)
{
	uint32_t fp = (uint32_t)(ft_mix64(k) >> 48);

	return fp ? fp : 1; /* 0 marks an empty cell */
}

static uint32_t ghost_home(const struct ft_cachedir *d, ft_cache_key k)
{
	return range((uint32_t)(ft_mix64(k) >> 16), d->nghost);
}

static bool ghost_live(const struct ft_cachedir *d, uint32_t cell)
{
	uint16_t age = (uint16_t)(d->epoch - (uint16_t)cell);

	return (cell >> 16) != 0 && age < d->ghost_window;
}

static void ghost_add(struct ft_cachedir *d, ft_cache_key k)
{
	uint32_t home = ghost_home(d, k), victim = home;
	uint16_t oldest_age = 0;

	for (unsigned i = 0; i < GHOST_PROBES; i++) {
		uint32_t c = home + i < d->nghost ? home + i : home + i - d->nghost;
		uint16_t age;

		if (!ghost_live(d, d->ghost[c])) {
			victim = c;
			break;
		}
		age = (uint16_t)(d->epoch - (uint16_t)d->ghost[c]);
		if (age >= oldest_age) {
			oldest_age = age;
			victim = c;
		}
	}
	d->ghost[victim] = (ghost_fp(k) << 16) | d->epoch;
	if (++d->epoch_count >= d->epoch_len) {
		d->epoch_count = 0;
		d->epoch++;
	}
}

/* Was @k evicted recently? Consumes the ghost if so. */
static bool ghost_take(struct ft_cachedir *d, ft_cache_key k)
{
	uint32_t home = ghost_home(d, k), fp = ghost_fp(k);

	for (unsigned i = 0; i < GHOST_PROBES; i++) {
		uint32_t c = home + i < d->nghost ? home + i : home + i - d->nghost;

		if ((d->ghost[c] >> 16) == fp && ghost_live(d, d->ghost[c])) {
			d->ghost[c] = 0;
			return true;
		}
	}
	return false;
}

static bool ghost_has(const struct ft_cachedir *d, ft_cache_key k)
{
	uint32_t home = ghost_home(d, k), fp = ghost_fp(k);

	for (unsigned i = 0; i < GHOST_PROBES; i++) {
		uint32_t c = home + i < d->nghost ? home + i : home + i - d->nghost;

		if ((d->ghost[c] >> 16) == fp && ghost_live(d, d->ghost[c]))
			return true;
	}
	return false;
}

void ft_cachedir_note_bypass(struct ft_cachedir *d, ft_cache_key key)
{
	if (!ghost_has(d, key))
		ghost_add(d, key);
}

bool ft_cachedir_returning(const struct ft_cachedir *d, ft_cache_key key)
{
	return ghost_has(d, key);
}

/* ---- eviction ---- */

/* Drop @s from the index; it stays on its FIFO (as a tombstone) if queued. */
static void release_slot(struct ft_cachedir *d, uint32_t s)
{
	hash_del(d, s);
	d->state[s] &= ST_QUEUED;
	d->used--;
}

/*
 * Evict one block from the main FIFO: blocks with a nonzero counter get
 * another round (counter - 1); pinned blocks always do. Returns the freed
 * slot, or NONE if the FIFO holds only pinned blocks.
 */
static uint32_t evict_main(struct ft_cachedir *d)
{
	for (uint32_t guard = 4 * d->main.len + 4; guard && d->main.len; guard--) {
		uint32_t s = fifo_pop(d, &d->main);

		if (!(d->state[s] & ST_USED)) {
			d->state[s] = 0; /* a tombstone: already on the free stack */
			continue;
		}
		if (d->state[s] & ST_PINNED) {
			fifo_push(d, &d->main, s);
			continue;
		}
		if (freq(d, s) > 0) {
			set_freq(d, s, freq(d, s) - 1);
			fifo_push(d, &d->main, s);
			continue;
		}
		return s;
	}
	return NONE;
}

/*
 * Evict one block from the small FIFO: a block read again while there moves
 * to the main FIFO; a one-time block leaves and becomes a ghost. Returns the
 * freed slot, or NONE if nothing could leave the small FIFO.
 */
static uint32_t evict_small(struct ft_cachedir *d)
{
	for (uint32_t guard = d->small.len + 1; guard && d->small.len; guard--) {
		uint32_t s = fifo_pop(d, &d->small);

		if (!(d->state[s] & ST_USED)) {
			d->state[s] = 0; /* a tombstone: already on the free stack */
			continue;
		}
		if (d->state[s] & ST_PINNED) {
			fifo_push(d, &d->small, s);
			continue;
		}
		if (freq(d, s) >= PROMOTE_FREQ) {
			set_freq(d, s, 0);
			d->state[s] |= ST_MAIN;
			fifo_push(d, &d->main, s);
			continue;
		}
		ghost_add(d, d->key[s]);
		return s;
	}
	return NONE;
}

static uint32_t evict(struct ft_cachedir *d)
{
	uint32_t s = NONE;

	if (d->small.len >= d->small_target || d->main.len == 0)
		s = evict_small(d);
	if (s == NONE)
		s = evict_main(d);
	if (s == NONE)
		s = evict_small(d); /* main was all pinned; small may still give */
	return s;
}

/* ---- public ---- */

uint32_t ft_cachedir_lookup(struct ft_cachedir *d, ft_cache_key key)
{
	uint32_t s = ft_cachedir_find(d, key);

	if (s != NONE && freq(d, s) < 3)
		set_freq(d, s, freq(d, s) + 1);
	return s;
}

uint32_t ft_cachedir_insert(struct ft_cachedir *d, ft_cache_key key, bool *evicted,
			    ft_cache_key *victim)
{
	uint32_t s;

	*evicted = false;
	if (d->free_head != NONE) {
		s = d->free_head;
		d->free_head = d->hnext[s];
		if (d->state[s] & ST_QUEUED) {
			/* A tombstone: the new block takes its place in its FIFO. */
			d->key[s] = key;
			d->state[s] = (uint8_t)(ST_USED | ST_QUEUED | (d->state[s] & ST_MAIN));
			hash_add(d, s);
			d->used++;
			ghost_take(d, key);
			return s;
		}
	} else {
		s = evict(d);
		if (s == NONE)
			return NONE;
		*evicted = true;
		*victim = d->key[s];
		release_slot(d, s);
	}
	d->key[s] = key;
	d->state[s] = ST_USED | ST_QUEUED;
	hash_add(d, s);
	d->used++;
	if (ghost_take(d, key)) {
		d->state[s] |= ST_MAIN;
		fifo_push(d, &d->main, s);
	} else {
		fifo_push(d, &d->small, s);
	}
	return s;
}

void ft_cachedir_remove(struct ft_cachedir *d, ft_cache_key key)
{
	uint32_t s = ft_cachedir_find(d, key);

	if (s == NONE)
		return;
	release_slot(d, s); /* a tombstone until reused or its FIFO reaches it */
	d->hnext[s] = d->free_head;
	d->free_head = s;
}

void ft_cachedir_restore(struct ft_cachedir *d, uint32_t slot, ft_cache_key key)
{
	/* Restored blocks enter the main FIFO with no history; the free list is rebuilt later. */
	d->key[slot] = key;
	d->state[slot] = ST_USED | ST_QUEUED | ST_MAIN;
	hash_add(d, slot);
	d->used++;
	fifo_push(d, &d->main, slot);
}

void ft_cachedir_restore_done(struct ft_cachedir *d)
{
	d->free_head = NONE;
	for (uint32_t s = d->nslots; s-- > 0;) {
		if (d->state[s] & ST_USED)
			continue;
		d->hnext[s] = d->free_head;
		d->free_head = s;
	}
}

uint32_t ft_cachedir_evict_volume(struct ft_cachedir *d, uint16_t vol, uint32_t *hand,
				  ft_cache_key *victim)
{
	bool any = false;

	if (*hand >= d->nslots)
		*hand = 0;
	/*
	 * CLOCK over the slot array: each of the volume's blocks spends its
	 * counter (at most 3) first, so four turns always find one if there is
	 * one; one turn without a candidate means there is none.
	 */
	for (uint64_t step = 0; step < 4ull * d->nslots; step++) {
		uint32_t s = *hand;

		if (step == d->nslots && !any)
			break;
		*hand = s + 1 < d->nslots ? s + 1 : 0;
		if ((d->state[s] & (ST_USED | ST_PINNED)) != ST_USED ||
		    FT_CACHE_KEY_VOLUME(d->key[s]) != vol)
			continue;
		any = true;
		if (freq(d, s) > 0) {
			set_freq(d, s, freq(d, s) - 1);
			continue;
		}
		*victim = d->key[s];
		ghost_add(d, d->key[s]);
		release_slot(d, s);
		d->hnext[s] = d->free_head;
		d->free_head = s;
		return s;
	}
	return NONE;
}

void ft_cachedir_pin(struct ft_cachedir *d, uint32_t slot, bool pinned)
{
	if (pinned)
		d->state[slot] |= ST_PINNED;
	else
		d->state[slot] &= (uint8_t)~ST_PINNED;
}

ft_cache_key ft_cachedir_key(const struct ft_cachedir *d, uint32_t slot)
{
	return d->key[slot];
}

uint32_t ft_cachedir_used(const struct ft_cachedir *d)
{
	return d->used;
}

uint32_t ft_cachedir_slots(const struct ft_cachedir *d)
{
	return d->nslots;
}

size_t ft_cachedir_memory(const struct ft_cachedir *d)
{
	return sizeof(*d) +
	       (size_t)d->nslots * (sizeof(*d->key) + sizeof(*d->hnext) + sizeof(*d->qnext) +
				    sizeof(*d->state)) +
	       (size_t)d->nbuckets * sizeof(*d->bucket) + (size_t)d->nghost * sizeof(*d->ghost);
}

void ft_cachedir_destroy(struct ft_cachedir *d)
{
	if (!d)
		return;
	free(d->key);
	free(d->hnext);
	free(d->qnext);
	free(d->state);
	free(d->bucket);
	free(d->ghost);
	free(d);
}

int ft_cachedir_create(uint32_t nslots, struct ft_cachedir **out)
{
	struct ft_cachedir *d;
	uint32_t nbuckets, nghost;

	if (nslots == 0 || nslots >= (1u << 31))
		return -EINVAL;
	d = calloc(1, sizeof(*d));
	if (!d)
		return -ENOMEM;
	d->nslots = nslots;
	d->small_target = nslots / 10 ? nslots / 10 : 1;
	d->ghost_cap = nslots - d->small_target ? nslots - d->small_target : 1;
	/* Exact sizes (no power-of-two rounding): chains of 2 on average, ghosts at 80% load. */
	nbuckets = nslots / 2 ? nslots / 2 : 1;
	nghost = (uint32_t)((uint64_t)d->ghost_cap * 5 / 4 + GHOST_PROBES);
	d->key = malloc((size_t)nslots * sizeof(*d->key));
	d->hnext = malloc((size_t)nslots * sizeof(*d->hnext));
	d->qnext = malloc((size_t)nslots * sizeof(*d->qnext));
	d->state = calloc(nslots, sizeof(*d->state));
	d->bucket = malloc((size_t)nbuckets * sizeof(*d->bucket));
	d->ghost = calloc(nghost, sizeof(*d->ghost));
	if (!d->key || !d->hnext || !d->qnext || !d->state || !d->bucket || !d->ghost) {
		ft_cachedir_destroy(d);
		return -ENOMEM;
	}
	d->nbuckets = nbuckets;
	d->nghost = nghost;
	memset(d->bucket, 0xff, (size_t)nbuckets * sizeof(*d->bucket));
	/* A ghost lives for about ghost_cap evictions, counted in <= 16384 epochs. */
	d->ghost_window = d->ghost_cap < GHOST_EPOCHS ? d->ghost_cap : GHOST_EPOCHS;
	d->epoch_len = (d->ghost_cap + d->ghost_window - 1) / d->ghost_window;
	/* Start the epoch far from 0 so empty cells (epoch 0) never look live. */
	d->epoch = (uint16_t)(GHOST_EPOCHS * 2);
	d->small = d->main = (struct fifo){ NONE, NONE, 0 };
	/* Free list in slot order: a fresh cache fills the device front to back. */
	for (uint32_t s = 0; s < nslots; s++)
		d->hnext[s] = s + 1 < nslots ? s + 1 : NONE;
	d->free_head = 0;
	*out = d;
	return 0;
}
