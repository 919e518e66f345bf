/* SPDX-License-Identifier: MIT */
/*
 * Mapping-record pages and rounds (see internal.h for why they exist).
 *
 * A round snapshots every dirty record page, encoding it from RAM, and
 * writes them all; if a waiter registered before the round started, the
 * round then flushes the device and completes those waiters. At most one
 * round runs per partition, so two writes of one page are never in flight
 * together and the later snapshot always lands last.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "flashtier/hash.h"
#include "flashtier/log.h"
#include "internal.h"

/* ---- stale-record filter ---- */

static void bloom_set(uint64_t *b, uint64_t h)
{
	uint32_t i = (uint32_t)h % BLOOM_BITS, j = (uint32_t)(h >> 32) % BLOOM_BITS;

	b[i / 64] |= 1ull << (i % 64);
	b[j / 64] |= 1ull << (j % 64);
}

static bool bloom_test(const uint64_t *b, uint64_t h)
{
	uint32_t i = (uint32_t)h % BLOOM_BITS, j = (uint32_t)(h >> 32) % BLOOM_BITS;

	return (b[i / 64] >> (i % 64) & 1) && (b[j / 64] >> (j % 64) & 1);
}

void part_note_unmapped(struct cache_part *p, ft_cache_key key)
{
	bloom_set(p->bloom_new, ft_mix64(key));
	p->bloom_new_any = true;
}

bool part_maybe_unmapped(const struct cache_part *p, ft_cache_key key)
{
	uint64_t h;

	if (!p->bloom_new_any && !p->bloom_old_any)
		return false;
	h = ft_mix64(key);
	return (p->bloom_new_any && bloom_test(p->bloom_new, h)) ||
	       (p->bloom_old_any && bloom_test(p->bloom_old, h));
}

/* ---- pages ---- */

void part_encode_page(const struct cache_part *p, uint32_t page, void *buf)
{
	struct ft_cache_rec *rec = buf;
	const uint8_t *uuid = p->cache->dev->uuid;

	for (uint32_t i = 0; i < RECS_PER_PAGE; i++) {
		uint32_t slot = page * RECS_PER_PAGE + i;

		if (slot < p->nslots && p->state[slot] == SLOT_VALID)
			ft_cache_rec_encode(&rec[i], uuid, p->first_slot + slot,
					    ft_cachedir_key(p->dir, slot), p->crc[slot]);
		else
			ft_cache_rec_clear(&rec[i]);
	}
}

void part_io_get(struct cache_part *p)
{
	if (p->io_inflight++ == 0)
		ft_reactor_hold(p->reactor);
}

void part_io_put(struct cache_part *p)
{
	if (--p->io_inflight == 0)
		ft_reactor_release(p->reactor);
}

static void kick(struct cache_part *p)
{
	if (p->reactor)
		ft_reactor_defer(p->reactor, &p->kick);
}

void part_mark_dirty(struct cache_part *p, uint32_t slot)
{
	uint32_t page = slot / RECS_PER_PAGE;

	if (!p->page_dirty[page]) {
		p->page_dirty[page] = 1;
		p->dirty_list[p->ndirty++] = page;
	}
	if (!p->round_active)
		kick(p);
}

/* ---- rounds ---- */

static void round_start(struct cache_part *p);

static void fire_waiters(struct cache_part *p, uint64_t upto, int error)
{
	while (p->waiters && p->waiters->need_round <= upto) {
		struct cache_waiter *w = p->waiters;

		p->waiters = w->next;
		if (!p->waiters)
			p->waiters_tail = &p->waiters;
		w->fn(w, error);
	}
}

static void round_end(struct cache_part *p)
{
	uint64_t r = p->rounds_started;
	int error = p->round_error;

	p->round_active = false;
	if (error) {
		/* The records on disk are unknown now: nothing here may be trusted again. */
		part_fail(p, "a mapping record write or a flush failed");
		/*
		 * part_fail() dropped the read-cache volumes' ids durably (or said it
		 * could not): their waiters go on regardless. A write-back FLUSH or
		 * FUA waiting here must fail: its log pages are not known durable.
		 */
	}
	if (p->waiters && p->waiters->need_round <= r) {
		/* Everything the flushed round covered is on disk: forget those keys. */
		memset(p->bloom_old, 0, BLOOM_BITS / 8);
		p->bloom_old_any = false;
		p->rounds_flushed = r;
		if (p->round_flushing && !error)
			wb_part_flush_done(p);
		fire_waiters(p, r, error);
	}
	if (p->ndirty || p->waiters)
		kick(p);
	part_io_put(p);
}

static void round_io_done(struct cache_part *p, int error)
{
	if (error && !p->round_error)
		p->round_error = error;
	if (--p->round_pending)
		return;
	if (!p->round_flushing && !p->round_error && p->waiters &&
	    p->waiters->need_round <= p->rounds_started) {
		/* Page writes are done: one flush makes them durable for every waiter. */
		p->round_flushing = true;
		p->round_pending = 1;
		ft_bio_submit(p->dev, &p->flush_bio);
		return;
	}
	round_end(p);
}

static void flush_end_io(struct ft_bio *bio, int error)
{
	struct cache_part *p =
		(struct cache_part *)((char *)bio - offsetof(struct cache_part, flush_bio));

	if (error) {
		ft_err("cache %s: flush failed: %s", p->cache->cfg->path, strerror(-error));
		p->round_error = error;
	}
	round_io_done(p, 0);
}

static void page_end_io(struct ft_bio *bio, int error)
{
	struct meta_io *io = (struct meta_io *)bio;
	struct cache_part *p = io->part;

	if (error)
		ft_err("cache %s: record page %u write failed: %s", p->cache->cfg->path,
		       (unsigned)(p->first_slot / RECS_PER_PAGE + io->page), strerror(-error));
	free(io->buf);
	free(io);
	round_io_done(p, error);
}

static void round_start(struct cache_part *p)
{
	uint32_t n = p->ndirty;

	if (p->round_active || (!n && !p->waiters) || !p->attached)
		return;
	p->round_active = true;
	p->rounds_started++;
	wb_part_round_started(p);
	p->round_error = 0;
	p->round_flushing = false;
	/* Keys unmapped before this snapshot are covered by it once it is flushed. */
	if (p->bloom_new_any) {
		for (uint32_t i = 0; i < BLOOM_BITS / 64; i++)
			p->bloom_old[i] |= p->bloom_new[i];
		memset(p->bloom_new, 0, BLOOM_BITS / 8);
		p->bloom_old_any = true;
		p->bloom_new_any = false;
	}
	part_io_get(p);
	p->round_pending = 1; /* held until every write is submitted */
	p->ndirty = 0;
	for (uint32_t i = 0; i < n; i++) {
		uint32_t page = p->dirty_list[i];
		struct meta_io *io = calloc(1, sizeof(*io));
		void *buf = NULL;

		p->page_dirty[page] = 0;
		if (!io || posix_memalign(&buf, FT_CACHE_BLOCK, FT_CACHE_BLOCK) != 0) {
			free(io);
			p->round_error = p->round_error ? p->round_error : -ENOMEM;
			continue;
		}
		part_encode_page(p, page, buf);
		io->part = p;
		io->page = page;
		io->buf = buf;
		io->bio.op = FT_BIO_WRITE;
		io->bio.flags = 0;
		io->bio.offset = p->cache->dev->geo.meta_offset +
				 (p->first_slot / RECS_PER_PAGE + page) * (uint64_t)FT_CACHE_BLOCK;
		io->bio.len = FT_CACHE_BLOCK;
		io->bio.buf = buf;
		io->bio.end_io = page_end_io;
		p->round_pending++;
		ft_bio_submit(p->dev, &io->bio);
	}
	round_io_done(p, 0);
}

static void kick_fn(struct ft_deferred *d)
{
	round_start((struct cache_part *)((char *)d - offsetof(struct cache_part, kick)));
}

void part_wait_round(struct cache_part *p, struct cache_waiter *w)
{
	w->next = NULL;
	w->need_round = p->rounds_started + 1;
	*p->waiters_tail = w;
	p->waiters_tail = &w->next;
	if (!p->round_active)
		kick(p);
}

int part_meta_init(struct cache_part *p)
{
	p->npages = (p->nslots + RECS_PER_PAGE - 1) / RECS_PER_PAGE;
	p->page_dirty = calloc(p->npages ? p->npages : 1, 1);
	p->dirty_list = malloc((p->npages ? p->npages : 1) * sizeof(*p->dirty_list));
	p->bloom_new = calloc(BLOOM_BITS / 64, sizeof(uint64_t));
	p->bloom_old = calloc(BLOOM_BITS / 64, sizeof(uint64_t));
	p->waiters = NULL;
	p->waiters_tail = &p->waiters;
	p->kick.fn = kick_fn;
	p->flush_bio.op = FT_BIO_FLUSH;
	p->flush_bio.end_io = flush_end_io;
	p->flush_bio.offset = 0;
	p->flush_bio.len = 0;
	p->flush_bio.buf = NULL;
	p->flush_bio.flags = 0;
	if (!p->page_dirty || !p->dirty_list || !p->bloom_new || !p->bloom_old)
		return -ENOMEM;
	return 0;
}

void part_meta_free(struct cache_part *p)
{
	free(p->page_dirty);
	free(p->dirty_list);
	free(p->bloom_new);
	free(p->bloom_old);
}
