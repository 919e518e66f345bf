/* SPDX-License-Identifier: MIT */
/*
 * The cached-volume backend: reads served from the cache device, misses
 * filled from the backing store, writes kept coherent (internal.h names
 * the invariants; this file keeps them).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "flashtier/crc32c.h"
#include "flashtier/log.h"
#include "internal.h"

#define BLK FT_CACHE_BLOCK

/* A read issued by NBD_CMD_CACHE: always admitted, not counted as a VM read. */
#define BIO_PREFETCH	   (1u << 31)
#define PREFETCH_CHUNK	   (4u << 20)
#define HIT_SLOTS_ON_STACK 64

struct cache_fill {
	struct ft_bio bio;
	struct cache_vol *v;
	uint32_t slot;
	uint32_t crc;
	/* A write-through fill ends when both its device write and the store's write are done. */
	bool write_through, dev_done, store_done;
	int dev_error, store_error;
};

static inline struct cache_vol *to_vol(struct ft_backend *b)
{
	return (struct cache_vol *)b;
}

static struct cache_vol *vol_by_id(const struct ft_cache *c, uint16_t id)
{
	return id >= 1 && id <= FT_CACHE_MAX_VOLUMES ? c->by_id[id] : NULL;
}

static uint64_t slot_offset(const struct cache_part *p, uint32_t slot)
{
	return p->cache->dev->geo.data_offset + (p->first_slot + slot) * (uint64_t)BLK;
}

static void occupancy(struct cache_vol *v, int delta)
{
	v->used += (uint32_t)delta;
	ft_stat_add(&v->stats->occupancy_blocks, (uint64_t)(int64_t)delta);
}

static void device_error(struct cache_vol *v, const char *what, int err)
{
	ft_stat_add(&v->stats->device_errors, 1);
	if (v->device_errors++ < 10)
		ft_warn("volume '%s': cache device %s failed: %s", v->cfg->name, what,
			strerror(-err));
	if (v->device_errors >= v->cache->cfg->error_threshold)
		vol_go_passthrough(v, "too many cache device errors");
}

/* ---- slots ---- */

static bool readable(uint8_t state)
{
	return state == SLOT_VALID || state == SLOT_PENDING;
}

/* Unmap a VALID block: its record must be rewritten (empty) before a write passes it. */
static void unmap_valid(struct cache_part *p, uint32_t slot, ft_cache_key key)
{
	struct cache_vol *owner = vol_by_id(p->cache, FT_CACHE_KEY_VOLUME(key));

	p->state[slot] = SLOT_FREE;
	part_mark_dirty(p, slot);
	part_note_unmapped(p, key);
	if (owner)
		occupancy(owner, -1);
}

/* A FILLING or STALE slot whose fill ended without becoming VALID. */
static void drop_fill(struct cache_part *p, uint32_t slot)
{
	ft_cache_key key = ft_cachedir_key(p->dir, slot);
	struct cache_vol *owner = vol_by_id(p->cache, FT_CACHE_KEY_VOLUME(key));

	ft_cachedir_remove(p->dir, key);
	p->state[slot] = SLOT_FREE;
	if (owner) {
		occupancy(owner, -1);
		ft_stat_add(&owner->stats->fills_dropped, 1);
	}
}

/*
 * Give @key a slot in FILLING state (pinned), evicting within the volume's
 * quota or the partition. Returns FT_CACHEDIR_NONE if nothing can leave.
 */
static uint32_t alloc_slot(struct cache_vol *v, ft_cache_key key)
{
	struct cache_part *p = v->part;
	ft_cache_key victim;
	bool evicted;
	uint32_t slot;

	if (v->used >= v->quota) {
		slot = ft_cachedir_evict_volume(p->dir, v->id, &v->clock_hand, &victim);
		if (slot == FT_CACHEDIR_NONE)
			return FT_CACHEDIR_NONE;
		unmap_valid(p, slot, victim);
		ft_stat_add(&v->stats->evictions, 1);
	}
	slot = ft_cachedir_insert(p->dir, key, &evicted, &victim);
	if (slot == FT_CACHEDIR_NONE)
		return FT_CACHEDIR_NONE;
	if (evicted) {
		struct cache_vol *owner = vol_by_id(p->cache, FT_CACHE_KEY_VOLUME(victim));

		unmap_valid(p, slot, victim);
		if (owner)
			ft_stat_add(&owner->stats->evictions, 1);
	}
	p->state[slot] = SLOT_FILLING;
	ft_cachedir_pin(p->dir, slot, true);
	occupancy(v, 1);
	return slot;
}

/* Both halves of a fill are done: the block becomes VALID, or goes. */
static void fill_finish(struct cache_fill *f)
{
	struct cache_vol *v = f->v;
	struct cache_part *p = v->part;
	uint8_t st = p->state[f->slot];

	if (f->dev_error || f->store_error || (st != SLOT_FILLING && st != SLOT_PENDING) ||
	    v->passthrough) {
		drop_fill(p, f->slot);
	} else {
		ft_cachedir_pin(p->dir, f->slot, false);
		p->state[f->slot] = SLOT_VALID;
		p->crc[f->slot] = f->crc;
		part_mark_dirty(p, f->slot);
		ft_stat_add(&v->stats->fills, 1);
	}
	p->fills_inflight--;
	free(f->bio.buf);
	free(f);
	part_io_put(p);
}

static void fill_end_io(struct ft_bio *bio, int error)
{
	struct cache_fill *f = (struct cache_fill *)bio;
	struct cache_vol *v = f->v;
	struct cache_part *p = v->part;

	f->dev_done = true;
	f->dev_error = error;
	if (error)
		device_error(v, "write", error);
	if (f->write_through && !f->store_done) {
		/* Readable while the write travels on; its record waits for the store. */
		if (!error && p->state[f->slot] == SLOT_FILLING && !v->passthrough) {
			p->crc[f->slot] = f->crc;
			p->state[f->slot] = SLOT_PENDING;
		}
		return;
	}
	fill_finish(f);
}

/* The store acknowledged (or failed) the write a write-through fill carries. */
static void fill_store_done(struct cache_fill *f, int error)
{
	f->store_done = true;
	f->store_error = error;
	if (f->dev_done)
		fill_finish(f);
}

/* Write @data (one block, copied) into FILLING @slot. Returns the fill, or NULL (dropped). */
static struct cache_fill *fill_start(struct cache_vol *v, uint32_t slot, const void *data,
				     bool write_through)
{
	struct cache_part *p = v->part;
	struct cache_fill *f = calloc(1, sizeof(*f));
	void *buf = NULL;

	if (!f || posix_memalign(&buf, BLK, BLK) != 0) {
		free(f);
		drop_fill(p, slot);
		return NULL;
	}
	memcpy(buf, data, BLK);
	f->v = v;
	f->slot = slot;
	f->crc = ft_crc32c(0, buf, BLK);
	f->write_through = write_through;
	f->bio.op = FT_BIO_WRITE;
	f->bio.flags = 0;
	f->bio.offset = slot_offset(p, slot);
	f->bio.len = BLK;
	f->bio.buf = buf;
	f->bio.end_io = fill_end_io;
	p->fills_inflight++;
	part_io_get(p);
	ft_bio_submit(p->dev, &f->bio);
	return f;
}

/* ---- ops ---- */

static struct cache_op *op_new(struct cache_vol *v, struct ft_bio *parent, uint32_t nblocks,
			       bool hit_arrays)
{
	/* A hit may turn into a miss (checksum, device error): fill slots always fit. */
	size_t extra = (size_t)nblocks * (sizeof(uint32_t) + sizeof(struct cache_fill *));
	struct cache_op *op;

	if (hit_arrays)
		extra += (size_t)nblocks * (2 * sizeof(uint32_t) + sizeof(struct hit_run));
	op = calloc(1, sizeof(*op) + extra);
	if (!op)
		return NULL;
	op->parent = parent;
	op->v = v;
	op->nblocks = nblocks;
	/* 8-byte members first, then the 4-byte arrays: every array stays aligned. */
	op->wt_fills = (struct cache_fill **)(op + 1);
	if (hit_arrays) {
		op->runs = (struct hit_run *)(op->wt_fills + nblocks);
		op->slots = (uint32_t *)(op->runs + nblocks);
		op->crcs = op->slots + nblocks;
		op->fill_slots = op->crcs + nblocks;
	} else {
		op->fill_slots = (uint32_t *)(op->wt_fills + nblocks);
	}
	return op;
}

static void op_finish(struct cache_op *op, int error)
{
	struct ft_bio *parent = op->parent;

	free(op->bounce);
	free(op->rmw);
	free(op);
	parent->end_io(parent, error);
}

/* Is a write to [off, end) in flight on @v? */
static bool write_in_flight(const struct cache_vol *v, uint64_t off, uint64_t end)
{
	for (const struct cache_op *w = v->writes; w; w = w->wnext)
		if (w->child.offset < end && off < w->child.offset + w->child.len)
			return true;
	return false;
}

/* ---- reads ---- */

static void miss_end_io(struct ft_bio *bio, int error)
{
	struct cache_op *op = (struct cache_op *)((char *)bio - offsetof(struct cache_op, child));
	struct cache_vol *v = op->v;
	struct cache_part *p = v->part;
	uint64_t first = (op->parent->offset + BLK - 1) / BLK;

	for (uint32_t i = 0; i < op->nfills; i++) {
		uint32_t slot = op->fill_slots[i];

		if (slot == FT_CACHEDIR_NONE)
			continue;
		if (error || p->state[slot] != SLOT_FILLING || v->passthrough) {
			drop_fill(p, slot);
			continue;
		}
		fill_start(v, slot,
			   (const char *)op->parent->buf + ((first + i) * BLK - op->parent->offset),
			   false);
	}
	part_io_put(p);
	op_finish(op, error);
}

/* Read from the backing store, filling the whole blocks the cache may take. */
static void read_miss(struct cache_op *op)
{
	struct cache_vol *v = op->v;
	struct cache_part *p = v->part;
	struct ft_bio *parent = op->parent;
	uint64_t off = parent->offset, end = off + parent->len;
	uint64_t first = (off + BLK - 1) / BLK, last = end / BLK; /* whole blocks: [first, last) */

	if (!(parent->flags & BIO_PREFETCH)) {
		ft_stat_add(&v->stats->misses, 1);
		ft_stat_add(&v->stats->miss_bytes, parent->len);
	}
	if (last > v->nblocks)
		last = v->nblocks;
	op->nfills = 0;
	if (!op->admit) {
		ft_stat_add(&v->stats->bypasses, 1);
		for (uint64_t b = first; b < last; b++)
			ft_cachedir_note_bypass(p->dir, FT_CACHE_KEY(v->id, b));
	} else if (first < last && !v->passthrough && !write_in_flight(v, off, end) &&
		   p->fills_inflight + (last - first) <= MAX_FILL_BLOCKS) {
		op->nfills = (uint32_t)(last - first);
		for (uint64_t b = first; b < last; b++) {
			ft_cache_key key = FT_CACHE_KEY(v->id, b);
			uint32_t slot = FT_CACHEDIR_NONE;

			if (ft_cachedir_find(p->dir, key) == FT_CACHEDIR_NONE)
				slot = alloc_slot(v, key);
			op->fill_slots[b - first] = slot;
		}
	}
	op->child.op = FT_BIO_READ;
	op->child.flags = 0;
	op->child.offset = off;
	op->child.len = parent->len;
	op->child.buf = parent->buf;
	op->child.end_io = miss_end_io;
	part_io_get(p);
	ft_bio_submit(v->inner, &op->child);
}

static void hit_done(struct cache_op *op)
{
	struct cache_vol *v = op->v;
	struct cache_part *p = v->part;
	struct ft_bio *parent = op->parent;
	uint64_t b0 = parent->offset / BLK;
	bool bad = op->error != 0;

	if (op->error)
		device_error(v, "read", op->error);
	for (uint32_t i = 0; i < op->nblocks && !bad; i++) {
		uint32_t slot = op->slots[i];
		ft_cache_key key = FT_CACHE_KEY(v->id, b0 + i);

		if (ft_crc32c(0, (char *)op->dst + (size_t)i * BLK, BLK) == op->crcs[i])
			continue;
		bad = true;
		/*
		 * The slot may have been reused since the read was sent (an
		 * invalidation, then a fill): that is a race, not corruption.
		 */
		if (ft_cachedir_find(p->dir, key) == slot && readable(p->state[slot]) &&
		    p->crc[slot] == op->crcs[i]) {
			ft_stat_add(&v->stats->checksum_errors, 1);
			ft_warn("volume '%s': cached block %llu failed its checksum; reading the "
				"backing store",
				v->cfg->name, (unsigned long long)(b0 + i));
			if (p->state[slot] == SLOT_VALID) {
				ft_cachedir_remove(p->dir, key);
				unmap_valid(p, slot, key);
			} else {
				p->state[slot] = SLOT_STALE; /* PENDING: its fill will drop it */
			}
		}
	}
	if (bad) {
		/* Never serve it: the backing store has the data. */
		free(op->bounce);
		op->bounce = NULL;
		op->error = 0;
		read_miss(op);
		return;
	}
	if (!(parent->flags & BIO_PREFETCH)) {
		ft_stat_add(&v->stats->hits, 1);
		ft_stat_add(&v->stats->hit_bytes, parent->len);
	}
	if (op->bounce)
		memcpy(parent->buf, (char *)op->bounce + (parent->offset - b0 * BLK), parent->len);
	op_finish(op, 0);
}

static void run_end_io(struct ft_bio *bio, int error)
{
	struct cache_op *op = ((struct hit_run *)bio)->op;

	if (error && !op->error)
		op->error = error;
	part_io_put(op->v->part);
	if (--op->pending == 0)
		hit_done(op);
}

static void vol_read(struct cache_vol *v, struct ft_bio *bio)
{
	struct cache_part *p = v->part;
	uint64_t off = bio->offset, end = off + bio->len;
	uint64_t b0 = off / BLK, b1 = (end + BLK - 1) / BLK;
	uint32_t n = (uint32_t)(b1 - b0);
	bool admit = (bio->flags & BIO_PREFETCH) || v->policy.sequential_cutoff == 0 ||
		     ft_seqdetect_admit(&v->seq, off, bio->len);
	bool hit = b1 <= v->nblocks;
	uint32_t found[HIT_SLOTS_ON_STACK]; /* one lookup per block for the common sizes */
	struct cache_op *op;

	for (uint64_t b = b0; hit && b < b1; b++) {
		uint32_t s = ft_cachedir_lookup(p->dir, FT_CACHE_KEY(v->id, b));

		if (b - b0 < HIT_SLOTS_ON_STACK)
			found[b - b0] = s;
		hit = s != FT_CACHEDIR_NONE && readable(p->state[s]);
	}
	op = op_new(v, bio, n, hit);
	if (!op) {
		ft_bio_submit(v->inner, bio); /* no memory for caching: serve it uncached */
		return;
	}
	op->admit = admit;
	if (!hit) {
		read_miss(op);
		return;
	}
	if (off % BLK == 0 && bio->len % BLK == 0) {
		op->dst = bio->buf;
	} else if (posix_memalign(&op->bounce, BLK, (size_t)n * BLK) == 0) {
		op->dst = op->bounce;
	} else {
		op->bounce = NULL;
		read_miss(op);
		return;
	}
	for (uint32_t i = 0; i < n; i++) {
		op->slots[i] = i < HIT_SLOTS_ON_STACK
				       ? found[i]
				       : ft_cachedir_find(p->dir, FT_CACHE_KEY(v->id, b0 + i));
		op->crcs[i] = p->crc[op->slots[i]];
	}
	/* One device read per run of consecutive slots. */
	op->pending = 1;
	for (uint32_t i = 0; i < n;) {
		uint32_t j = i + 1;
		struct ft_bio *r = &op->runs[i].bio;

		op->runs[i].op = op;
		while (j < n && op->slots[j] == op->slots[j - 1] + 1)
			j++;
		r->op = FT_BIO_READ;
		r->flags = 0;
		r->offset = slot_offset(p, op->slots[i]);
		r->len = (uint64_t)(j - i) * BLK;
		r->buf = (char *)op->dst + (size_t)i * BLK;
		r->end_io = run_end_io;
		op->pending++;
		part_io_get(p);
		ft_bio_submit(p->dev, r);
		i = j;
	}
	if (--op->pending == 0)
		hit_done(op);
}

/* ---- NBD_CMD_CACHE: prefetch the range into the cache, a chunk at a time ---- */

struct prefetch {
	struct ft_bio rd;
	struct ft_bio *orig;
	struct cache_vol *v;
	uint64_t next, end;
	bool in_loop; /* a chunk completed inside vol_read(): the loop goes on */
	bool chunk_done;
	int error;
	void *buf;
};

static void prefetch_loop(struct prefetch *pf)
{
	pf->in_loop = true;
	while (!pf->error && pf->next < pf->end) {
		uint64_t len =
			pf->end - pf->next < PREFETCH_CHUNK ? pf->end - pf->next : PREFETCH_CHUNK;

		pf->rd.op = FT_BIO_READ;
		pf->rd.flags = BIO_PREFETCH;
		pf->rd.offset = pf->next;
		pf->rd.len = len;
		pf->rd.buf = pf->buf;
		pf->next += len;
		pf->chunk_done = false;
		vol_read(pf->v, &pf->rd);
		if (!pf->chunk_done) {
			pf->in_loop = false; /* completes later; its end_io resumes the loop */
			return;
		}
	}
	pf->in_loop = false;
	pf->orig->end_io(pf->orig, pf->error);
	free(pf->buf);
	free(pf);
}

static void prefetch_end_io(struct ft_bio *bio, int error)
{
	struct prefetch *pf = (struct prefetch *)bio;

	pf->chunk_done = true;
	if (error)
		pf->error = error;
	if (!pf->in_loop)
		prefetch_loop(pf);
}

static void vol_prefetch(struct cache_vol *v, struct ft_bio *bio)
{
	struct prefetch *pf = calloc(1, sizeof(*pf));

	if (!pf || posix_memalign(&pf->buf, BLK, PREFETCH_CHUNK) != 0) {
		free(pf);
		ft_bio_submit(v->inner, bio); /* the store's own CACHE, if it has one */
		return;
	}
	pf->orig = bio;
	pf->v = v;
	pf->next = bio->offset;
	pf->end = bio->offset + bio->len;
	pf->rd.end_io = prefetch_end_io;
	prefetch_loop(pf);
}

/* ---- writes ---- */

static void run_queue(struct cache_vol *v);

void op_write_done(struct cache_op *op, int error)
{
	struct cache_vol *v = op->v;

	if (op->wprev)
		op->wprev->wnext = op->wnext;
	else
		v->writes = op->wnext;
	if (op->wnext)
		op->wnext->wprev = op->wprev;

	/* Write-through: the fills carrying this write's data may become VALID now. */
	for (uint32_t i = 0; i < op->nwt; i++)
		fill_store_done(op->wt_fills[i], error);
	part_io_put(v->part);
	op_finish(op, error);
	if (v->queued)
		run_queue(v);
}

static void write_end_io(struct ft_bio *bio, int error)
{
	op_write_done((struct cache_op *)((char *)bio - offsetof(struct cache_op, child)), error);
}

static void write_submit(struct cache_op *op)
{
	struct ft_bio *parent = op->parent;

	op->child.op = parent->op;
	op->child.flags = parent->flags;
	op->child.offset = parent->offset;
	op->child.len = parent->len;
	op->child.buf = parent->buf;
	op->child.end_io = write_end_io;
	ft_bio_submit(op->v->inner, &op->child);
}

static void write_waited(struct cache_waiter *w, int error)
{
	struct cache_op *op = (struct cache_op *)((char *)w - offsetof(struct cache_op, wait));

	(void)error; /* a failed round made the volume pass-through; the write may go on */
	write_submit(op);
}

/*
 * Make sure no cached copy of [b0, b1) survives the write, in RAM or on the
 * device. Returns true if the write must wait for a flushed record round.
 */
static bool invalidate(struct cache_vol *v, uint64_t b0, uint64_t b1)
{
	struct cache_part *p = v->part;
	bool wait = false;

	if (b1 > v->nblocks)
		b1 = v->nblocks;
	for (uint64_t b = b0; b < b1; b++) {
		ft_cache_key key = FT_CACHE_KEY(v->id, b);
		uint32_t s = ft_cachedir_find(p->dir, key);

		if (s == FT_CACHEDIR_NONE) {
			wait = wait || part_maybe_unmapped(p, key);
			continue;
		}
		switch (p->state[s]) {
		case SLOT_VALID:
			ft_cachedir_remove(p->dir, key);
			unmap_valid(p, s, key);
			ft_stat_add(&v->stats->invalidations, 1);
			wait = true;
			break;
		case SLOT_FILLING:
		case SLOT_PENDING:
			p->state[s] = SLOT_STALE;
			/* Its record was never written, but an evicted one of the key may be. */
			__attribute__((fallthrough));
		default:
			wait = wait || part_maybe_unmapped(p, key);
			break;
		}
	}
	return wait;
}

/* Do two requests touch a common 4 KiB block? */
static bool blocks_overlap(const struct ft_bio *a, const struct ft_bio *b)
{
	uint64_t a0 = a->offset / BLK, a1 = (a->offset + a->len + BLK - 1) / BLK;
	uint64_t b0 = b->offset / BLK, b1 = (b->offset + b->len + BLK - 1) / BLK;

	return a0 < b1 && b0 < a1;
}

/* Send @op on its way: it overlaps no write in flight (see vol_write()). */
static void write_start(struct cache_op *op)
{
	struct cache_vol *v = op->v;
	struct ft_bio *bio = op->parent;
	uint64_t off = bio->offset, end = off + bio->len;
	uint64_t first = (off + BLK - 1) / BLK, last = end / BLK; /* whole blocks written */
	bool wait;

	for (struct cache_op *w = v->writes; w; w = w->wnext) {
		if (w->child.offset < end && off < w->child.offset + w->child.len) {
			w->overlapped = true;
			op->overlapped = true;
		}
	}
	op->wnext = v->writes;
	if (v->writes)
		v->writes->wprev = op;
	v->writes = op;
	part_io_get(v->part);
	wait = invalidate(v, off / BLK, (end + BLK - 1) / BLK);
	if (v->wb.on) {
		/*
		 * No need to wait for the invalidation's round: the log record
		 * supersedes any clean record of these blocks at a replay, and the
		 * log keeps it until a round has made the invalidation durable (W4).
		 */
		wb_write(op);
		return;
	}
	if (op->wt_fills && op->admit && !op->overlapped && !v->passthrough) {
		struct cache_part *p = v->part;

		if (last > v->nblocks)
			last = v->nblocks;
		for (uint64_t b = first; b < last && p->fills_inflight < MAX_FILL_BLOCKS; b++) {
			ft_cache_key key = FT_CACHE_KEY(v->id, b);
			struct cache_fill *f;
			uint32_t slot;

			if (ft_cachedir_find(p->dir, key) != FT_CACHEDIR_NONE)
				continue;
			slot = alloc_slot(v, key);
			if (slot == FT_CACHEDIR_NONE)
				break;
			f = fill_start(v, slot, (const char *)bio->buf + (b * BLK - off), true);
			if (f)
				op->wt_fills[op->nwt++] = f;
		}
	}
	if (wait) {
		op->wait.fn = write_waited;
		part_wait_round(v->part, &op->wait);
		return;
	}
	write_submit(op);
}

/* May queued @op start: no write in flight, nor one queued before it, touches its blocks? */
static bool write_blocked(const struct cache_vol *v, const struct cache_op *op)
{
	for (const struct cache_op *w = v->writes; w; w = w->wnext)
		if (blocks_overlap(&w->child, op->parent))
			return true;
	for (const struct cache_op *q = v->queued; q != op; q = q->qnext)
		if (blocks_overlap(q->parent, op->parent))
			return true;
	return false;
}

/* Start the queued writes that are free to go, oldest first. */
static void run_queue(struct cache_vol *v)
{
	if (v->queue_running) {
		v->queue_again = true; /* a write completed inside write_start() below */
		return;
	}
	v->queue_running = true;
	do {
		struct cache_op **pp = &v->queued;

		v->queue_again = false;
		while (*pp) {
			struct cache_op *op = *pp;

			if (write_blocked(v, op)) {
				pp = &op->qnext;
				continue;
			}
			*pp = op->qnext;
			write_start(op);
			v->queue_again = true; /* the queue may have changed under us: rescan */
			break;
		}
	} while (v->queue_again);
	v->queue_running = false;
}

/*
 * Writes to the same 4 KiB blocks run one after the other, in arrival
 * order (the NBD protocol lets a server order concurrent requests as it
 * likes). So the store's final content is always the last write's, and a
 * write-through cache may keep it: without this, a block written again
 * while a write to it is in flight could not be cached at all, and the
 * hottest blocks of a busy VM are exactly those.
 */
static void vol_write(struct cache_vol *v, struct ft_bio *bio)
{
	uint64_t off = bio->offset, end = off + bio->len;
	uint64_t first = (off + BLK - 1) / BLK, last = end / BLK; /* whole blocks written */
	bool wt = bio->op == FT_BIO_WRITE && v->policy.mode == FT_CACHE_WRITE_THROUGH && !v->wb.on;
	uint32_t nwt = wt && last > first ? (uint32_t)(last - first) : 0;
	struct cache_op *op = op_new(v, bio, nwt, false), **pp;

	if (!op) {
		/* Without an op the write cannot be ordered after invalidation: fail it. */
		bio->end_io(bio, -ENOMEM);
		return;
	}
	if (!nwt)
		op->wt_fills = NULL;
	op->child.offset = off;
	op->child.len = bio->len;
	/* Admission sees writes in arrival order, queued or not. */
	op->admit = bio->op == FT_BIO_WRITE && (v->policy.sequential_cutoff == 0 ||
						ft_seqdetect_admit(&v->seq, off, bio->len));
	for (pp = &v->queued; *pp; pp = &(*pp)->qnext)
		;
	*pp = op;
	run_queue(v);
}

/* ---- the backend table ---- */

static int cache_attach(struct ft_backend *b, struct ft_reactor *r)
{
	struct cache_vol *v = to_vol(b);
	struct cache_part *p = v->part;
	int rc;

	b->reactor = r;
	rc = v->inner->ops->attach(v->inner, r);
	if (rc < 0)
		return rc;
	if (!p->attached) {
		p->reactor = r;
		rc = p->dev->ops->attach(p->dev, r);
		if (rc < 0) {
			vol_go_passthrough(v, "cannot attach the cache device");
			return 0;
		}
		p->attached = true;
	}
	wb_start_volume(v);
	return 0;
}

static void cache_submit(struct ft_backend *b, struct ft_bio *bio)
{
	struct cache_vol *v = to_vol(b);

	if (v->passthrough) {
		ft_bio_submit(v->inner, bio);
		return;
	}
	switch (bio->op) {
	case FT_BIO_READ:
		if (v->wb.on && v->wb.dirty_blocks &&
		    wb_any_dirty(v, bio->offset / BLK, (bio->offset + bio->len + BLK - 1) / BLK)) {
			wb_read(v, bio);
			return;
		}
		vol_read(v, bio);
		return;
	case FT_BIO_WRITE:
	case FT_BIO_TRIM:
	case FT_BIO_WRITE_ZEROES:
		vol_write(v, bio);
		return;
	case FT_BIO_CACHE:
		vol_prefetch(v, bio);
		return;
	default:
		if (v->wb.on) {
			wb_flush(v, bio);
			return;
		}
		/* FLUSH: the cache holds nothing the store lacks */
		ft_bio_submit(v->inner, bio);
		return;
	}
}

static void cache_close(struct ft_backend *b)
{
	struct cache_vol *v = to_vol(b);

	v->inner->ops->close(v->inner);
	v->inner = NULL;
}

const struct ft_backend_ops cache_backend_ops = {
	.name = "cache",
	.attach = cache_attach,
	.submit = cache_submit,
	.close = cache_close,
};

/* ---- failure ---- */

void vol_go_passthrough(struct cache_vol *v, const char *why)
{
	struct cache_part *p = v->part;
	struct ft_cache *c = v->cache;
	uint32_t n = 0;
	int rc;

	if (v->passthrough)
		return;
	if (v->wb.on) {
		/* Its dirty data lives on the device: dropping the cache would lose it. */
		if (!v->wb.failed_logged)
			ft_err("volume '%s': %s, but it holds write-back data on the device; keeping "
			       "it (writes may fail until the device recovers)",
			       v->cfg->name, why);
		v->wb.failed_logged = true;
		return;
	}
	v->passthrough = true;
	ft_stat_add(&v->stats->passthrough, 1);
	ft_err("volume '%s': %s; serving it without the cache from now on", v->cfg->name, why);

	/*
	 * Drop the volume's id from the device before anything else reaches the
	 * store: its records are then ignored (and cleared) at the next start,
	 * however many of them are still on disk.
	 */
	pthread_mutex_lock(&c->sb_lock);
	for (uint32_t i = 0; i < c->dev->nvolumes; i++) {
		if (c->dev->volumes[i].id == v->id) {
			c->dev->volumes[i] = c->dev->volumes[--c->dev->nvolumes];
			break;
		}
	}
	rc = ft_cachedev_write_sb(c->dev, c->dev->flags);
	if (rc < 0) {
		/* The device is failing: say so where the next start will look first. */
		int rc2 = cache_mark_untrusted(c, why);

		if (rc2 < 0)
			ft_err("cache %s: cannot drop volume '%s' from the device (%s) nor record that "
			       "in %s (%s): reformat the cache (\"reformat\": true) before the next "
			       "start",
			       c->cfg->path, v->cfg->name, strerror(-rc), c->cfg->state_file,
			       strerror(-rc2));
		else
			ft_warn("cache %s: cannot drop volume '%s' from the device (%s); %s says to "
				"discard the cache at the next start",
				c->cfg->path, v->cfg->name, strerror(-rc), c->cfg->state_file);
	}
	pthread_mutex_unlock(&c->sb_lock);

	for (uint32_t s = 0; s < p->nslots; s++) {
		if (p->state[s] == SLOT_FREE)
			continue;
		ft_cache_key key = ft_cachedir_key(p->dir, s);

		if (FT_CACHE_KEY_VOLUME(key) != v->id)
			continue;
		if (p->state[s] == SLOT_VALID) {
			ft_cachedir_remove(p->dir, key);
			unmap_valid(p, s, key);
			n++;
		} else {
			p->state[s] = SLOT_STALE;
		}
	}
	ft_info("volume '%s': dropped %u cached blocks", v->cfg->name, n);
}

void part_fail(struct cache_part *p, const char *why)
{
	if (p->failed)
		return;
	p->failed = true;
	for (size_t i = 0; i < p->nvols; i++)
		vol_go_passthrough(p->vols[i], why);
}
