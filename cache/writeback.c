/* SPDX-License-Identifier: MIT */
/*
 * Write-back: the dirty map, the log stream's segments, logging writes,
 * reading dirty data back, and FLUSH (internal.h names the invariants W1-W6,
 * wlog.h the format).
 *
 * Log pages are written, and read back, through the page cache
 * (FT_BIO_BUFFERED), and a write is acknowledged once its page is there.
 * That is the disk with a volatile write cache the durability contract
 * describes: the kernel keeps the page when the agent dies (kill -9 loses
 * nothing), and only a FLUSH or FUA promises it survives a power cut -- and
 * those wait for a record round, whose device flush is an fdatasync of the
 * whole device, log pages included. An O_DIRECT page write would put a
 * device write inside every acknowledgement: about 2.5x the latency of a
 * 4 KiB write at queue depth 1 on the machine this was measured on. Once a
 * device flush has failed, no later one proves the earlier pages reached
 * the device (the kernel reports a failed write-back once), so FLUSH and
 * FUA fail from then on (part->failed, see durability_lost()).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "flashtier/crc32c.h"
#include "flashtier/hash.h"
#include "flashtier/log.h"
#include "internal.h"

#define BLK	      FT_CACHE_BLOCK
#define MAX_RANGE     (1u << 18) /* blocks in one ZERO/TRIM record (1 GiB) */
#define MAX_PAGE_DATA (FT_WLOG_RECS_PER_PAGE - 1)

/* ---- the dirty map: open addressing, linear probing, backward-shift delete ---- */

int wb_map_init(struct wb_map *m, uint32_t size)
{
	m->t = calloc(size, sizeof(*m->t));
	m->mask = size - 1;
	m->n = 0;
	return m->t ? 0 : -ENOMEM;
}

struct wb_ent *wb_map_find(const struct wb_map *m, uint64_t block)
{
	uint32_t i = (uint32_t)ft_mix64(block) & m->mask;

	for (;; i = (i + 1) & m->mask) {
		struct wb_ent *e = &m->t[i];

		if (e->key == 0)
			return NULL;
		if (e->key == block + 1)
			return e;
	}
}

static int map_grow(struct wb_map *m)
{
	struct wb_map bigger;

	if (wb_map_init(&bigger, (m->mask + 1) * 2) < 0)
		return -ENOMEM;
	for (uint32_t i = 0; i <= m->mask; i++) {
		const struct wb_ent *e = &m->t[i];
		uint32_t j;

		if (!e->key)
			continue;
		for (j = (uint32_t)ft_mix64(e->key - 1) & bigger.mask; bigger.t[j].key;
		     j = (j + 1) & bigger.mask)
			;
		bigger.t[j] = *e;
		bigger.n++;
	}
	free(m->t);
	*m = bigger;
	return 0;
}

struct wb_ent *wb_map_get(struct wb_map *m, uint64_t block)
{
	struct wb_ent *e = wb_map_find(m, block);
	uint32_t i;

	if (e)
		return e;
	if ((m->n + 1) * 2 > m->mask + 1 && map_grow(m) < 0)
		return NULL;
	for (i = (uint32_t)ft_mix64(block) & m->mask; m->t[i].key; i = (i + 1) & m->mask)
		;
	e = &m->t[i];
	memset(e, 0, sizeof(*e));
	e->key = block + 1;
	m->n++;
	return e;
}

void wb_map_del(struct wb_map *m, struct wb_ent *e)
{
	uint32_t i = (uint32_t)(e - m->t), j = i;

	/* Shift later members of the probe run back so no lookup stops early. */
	for (;;) {
		uint32_t home;

		j = (j + 1) & m->mask;
		if (!m->t[j].key)
			break;
		home = (uint32_t)ft_mix64(m->t[j].key - 1) & m->mask;
		/* Can t[j] move to the hole at i? Only if its home is not in (i, j]. */
		if ((j > i && (home <= i || home > j)) || (j < i && home <= i && home > j)) {
			m->t[i] = m->t[j];
			i = j;
		}
	}
	m->t[i].key = 0;
	m->n--;
}

/* ---- segments ---- */

uint32_t wb_seg_alloc(struct ft_cache *c, bool claim)
{
	/* One segment is held back for tail claims (see open_segment()). */
	uint32_t keep = claim || c->nsegs < 2 ? 0 : 1;
	uint32_t idx = UINT32_MAX;

	pthread_mutex_lock(&c->seg_lock);
	if (c->nfree > keep) {
		idx = c->seg_free[--c->nfree];
		c->seg_used[idx] = 1;
	}
	pthread_mutex_unlock(&c->seg_lock);
	return idx;
}

void wb_seg_release(struct ft_cache *c, uint32_t index)
{
	if (index == UINT32_MAX)
		return; /* a segment recovery found missing */
	pthread_mutex_lock(&c->seg_lock);
	if (c->seg_used[index]) {
		c->seg_used[index] = 0;
		c->seg_free[c->nfree++] = index;
	}
	pthread_mutex_unlock(&c->seg_lock);
}

struct wb_seg *wb_seg_of(struct cache_vol *v, uint64_t seq)
{
	return &v->wb.ring[seq % v->wb.ring_cap];
}

uint64_t wb_dirty_bytes(const struct cache_vol *v)
{
	uint64_t n = v->wb.dirty_blocks;

	for (const struct wb_range *r = v->wb.ranges; r; r = r->next)
		n += r->b1 - r->b0;
	return n * BLK;
}

uint64_t wb_log_used(const struct cache_vol *v)
{
	const struct wb_vol *w = &v->wb;

	return w->head >= w->tail ? (w->head - w->tail + 1) * (uint64_t)FT_WLOG_SEG_BYTES : 0;
}

static void build_fn(struct ft_deferred *d);

int wb_vol_init(struct cache_vol *v, uint32_t ring_cap)
{
	struct wb_vol *w = &v->wb;

	w->ring_cap = ring_cap ? ring_cap : 1;
	w->ring = calloc(w->ring_cap, sizeof(*w->ring));
	w->limbo = calloc(w->ring_cap, sizeof(*w->limbo));
	w->tail = 1;
	w->head = 0;
	w->next_page_seq = 1;
	w->next_rec_seq = 1;
	w->batch_tail = &w->batch;
	w->pages_tail = &w->pages;
	w->ranges_tail = &w->ranges;
	w->build.fn = build_fn;
	if (!w->ring || !w->limbo)
		return -ENOMEM;
	return wb_map_init(&w->map, 1024);
}

void wb_vol_free(struct cache_vol *v)
{
	struct wb_vol *w = &v->wb;

	for (uint32_t i = 0; w->ring && i < w->ring_cap; i++)
		free(w->ring[i].blocks);
	while (w->ranges) {
		struct wb_range *r = w->ranges;

		w->ranges = r->next;
		free(r);
	}
	free(w->ring);
	free(w->limbo);
	free(w->map.t);
	w->ring = NULL;
	w->map.t = NULL;
}

static void seg_note_block(struct wb_seg *s, uint64_t block)
{
	if (s->nblocks == s->cap) {
		uint32_t cap = s->cap ? s->cap * 2 : 64;
		uint64_t *b = realloc(s->blocks, cap * sizeof(*b));

		if (!b)
			return; /* the destage scan falls back to the map walk (see destage.c) */
		s->blocks = b;
		s->cap = cap;
	}
	s->blocks[s->nblocks++] = block;
}

void wb_apply(struct cache_vol *v, uint64_t block, uint64_t seq, uint32_t loc, uint64_t seg_seq)
{
	struct wb_vol *w = &v->wb;
	struct wb_ent *e = wb_map_get(&w->map, block);
	struct wb_seg *s = wb_seg_of(v, seg_seq);

	if (!e) {
		/* Cannot happen short of running out of memory, and then nothing is safe. */
		ft_err("volume '%s': out of memory for the dirty map; stopping", v->cfg->name);
		abort();
	}
	if (w->ranges) {
		struct wb_range *r = wb_range_of(v, block);

		if (r && r->seq > seq) {
			if (!e->seq)
				wb_map_del(&w->map, e);
			return; /* a newer ZERO or TRIM holds the block */
		}
	}
	if (e->seq) {
		if (e->seq > seq)
			return; /* a newer record already holds the block */
		w->ring[e->ring].live--;
	} else {
		w->dirty_blocks++;
		ft_stat_add(&v->stats->dirty_bytes, BLK);
	}
	e->seq = seq;
	e->loc = loc;
	e->t = w->apply_t;
	e->ring = (uint32_t)(seg_seq % w->ring_cap);
	s->live++;
	seg_note_block(s, block);
}

struct wb_range *wb_range_of(const struct cache_vol *v, uint64_t b)
{
	struct wb_range *found = NULL;

	for (struct wb_range *r = v->wb.ranges; r; r = r->next)
		if (b >= r->b0 && b < r->b1)
			found = r; /* the newest one wins */
	return found;
}

static void drop_entry(struct cache_vol *v, struct wb_ent *e)
{
	v->wb.ring[e->ring].live--;
	wb_map_del(&v->wb.map, e);
	v->wb.dirty_blocks--;
	ft_stat_sub(&v->stats->dirty_bytes, BLK);
}

void wb_apply_range(struct cache_vol *v, uint64_t b0, uint64_t nb, uint64_t seq, uint8_t type,
		    uint64_t seg_seq)
{
	struct wb_vol *w = &v->wb;
	struct wb_range *r;

	if (nb <= WB_RANGE_INLINE) {
		for (uint64_t b = b0; b < b0 + nb; b++)
			wb_apply(v, b, seq, type == FT_WLOG_ZERO ? WB_LOC_ZERO : WB_LOC_TRIM,
				 seg_seq);
		return;
	}
	/* Older entries inside it are superseded: walk whichever is smaller. */
	if (w->map.n < nb) {
		for (uint32_t i = 0; i <= w->map.mask;) {
			struct wb_ent *e = &w->map.t[i];

			if (e->key && e->key - 1 >= b0 && e->key - 1 < b0 + nb && e->seq < seq)
				drop_entry(v, e); /* slot i now holds a shifted entry: look again */
			else
				i++;
		}
	} else {
		for (uint64_t b = b0; b < b0 + nb; b++) {
			struct wb_ent *e = wb_map_find(&w->map, b);

			if (e && e->seq < seq)
				drop_entry(v, e);
		}
	}
	r = calloc(1, sizeof(*r));
	if (!r) {
		ft_err("volume '%s': out of memory for the dirty map; stopping", v->cfg->name);
		abort();
	}
	r->b0 = b0;
	r->b1 = b0 + nb;
	r->seq = seq;
	r->type = type;
	r->ring = (uint32_t)(seg_seq % w->ring_cap);
	*w->ranges_tail = r;
	w->ranges_tail = &r->next;
	w->ring[r->ring].live++;
	ft_stat_add(&v->stats->dirty_bytes, nb * BLK);
}

/*
 * Open a new head segment. False if the volume is at its limit or the pool
 * is empty.
 *
 * Segments given back wait in limbo until a durable page claims the tail
 * past them (W4), and that page needs room in the log: with the head full
 * and every other segment in use or in limbo, nothing could ever be freed
 * again. So the pool holds one segment back that only a page carrying
 * such a claim may take; the claim frees at least one segment, which
 * refills the reserve. A crash before the claim is durable leaves the
 * reserve segment outside every stream (nothing in it verifies as a later
 * page of one), so a restart always finds a segment free to resume in.
 */
static bool open_segment(struct cache_vol *v)
{
	struct wb_vol *w = &v->wb;
	struct wb_seg *s;
	uint32_t idx;

	if (wb_log_used(v) + FT_WLOG_SEG_BYTES > w->limit)
		return false;
	idx = wb_seg_alloc(v->cache, w->nlimbo && !w->limbo_page);
	if (idx == UINT32_MAX)
		return false;
	s = wb_seg_of(v, w->head + 1);
	free(s->blocks);
	memset(s, 0, sizeof(*s));
	s->index = idx;
	s->seq = ++w->head;
	s->opened_ns = ft_now_ns();
	ft_stat_add(&v->stats->log_used_bytes, FT_WLOG_SEG_BYTES);
	return true;
}

/* ---- logging ---- */

struct wb_pent {
	struct cache_op *op;
	uint64_t block, nblocks;
	uint64_t seq;
	uint32_t loc;
	uint8_t type;
};

struct wb_page_io {
	struct ft_bio bio;
	struct cache_vol *v;
	struct wb_page_io *next;
	uint64_t page_seq, seg_seq;
	uint64_t last_rec; /* the largest record seq in it (0: none) */
	bool done;
	int error;
	uint32_t n;
	struct wb_pent ents[];
};

static void op_logged(struct cache_op *op);

/* The device failed (part->failed): no FLUSH or FUA is durable any more. */
static int durability_lost(struct cache_vol *v)
{
	if (!v->part->failed)
		return 0;
	ft_err("volume '%s': FLUSH/FUA failed: the cache device failed earlier, so the "
	       "write-back log cannot be made durable (restart the agent once it works)",
	       v->cfg->name);
	return -EIO;
}

static void fua_done(struct cache_waiter *wt, int error)
{
	struct cache_op *op = (struct cache_op *)((char *)wt - offsetof(struct cache_op, wait));

	if (!error)
		error = durability_lost(op->v);
	op_write_done(op, op->error ? op->error : error);
}

/* Every piece of @op is in the log (or failed). */
static void op_logged(struct cache_op *op)
{
	if (!op->error && (op->parent->flags & FT_BIO_FUA)) {
		op->wait.fn = fua_done;
		part_wait_round(op->v->part, &op->wait);
		return;
	}
	op_write_done(op, op->error);
}

/*
 * A page's writes are done: apply its records and complete its ops. Pages
 * are processed in page order, only once every earlier page completed: a
 * replay stops at the first page missing, so a write must not be
 * acknowledged while a page before its own could still be lost (kill -9
 * loses no acknowledged write).
 */
static void page_process(struct cache_vol *v, struct wb_page_io *pio)
{
	struct wb_vol *w = &v->wb;
	int error = pio->error;

	if (error) {
		ft_stat_add(&v->stats->device_errors, 1);
		ft_err("volume '%s': write-back log write failed: %s; failing the writes in it",
		       v->cfg->name, strerror(-error));
		if (!w->cut_seq) {
			/*
			 * A hole in the stream: a replay stops there. Pages after it are
			 * failed too (their data would not be replayed), and the stream
			 * goes on in a new segment that a replay resumes at.
			 */
			w->cut_seq = pio->page_seq;
			w->cut_end = UINT64_MAX;
			w->resume = true;
			if (w->head >= w->tail)
				wb_seg_of(v, w->head)->used = FT_WLOG_SEG_BLOCKS;
		}
	}
	if (w->cut_seq && pio->page_seq >= w->cut_seq && pio->page_seq < w->cut_end)
		error = error ? error : -EIO;
	w->apply_t = wb_ticks(v->cache, ft_now_ns()) | 1; /* never 0: that means replayed */
	for (uint32_t i = 0; i < pio->n; i++) {
		struct wb_pent *e = &pio->ents[i];
		struct cache_op *op = e->op;

		if (!error) {
			if (e->type == FT_WLOG_DATA)
				wb_apply(v, e->block, e->seq, e->loc, pio->seg_seq);
			else
				wb_apply_range(v, e->block, e->nblocks, e->seq, e->type,
					       pio->seg_seq);
		} else if (!op->error) {
			op->error = -EIO;
		}
		/* The op's last page entry: is it done? */
		if ((i + 1 == pio->n || pio->ents[i + 1].op != op) && --op->pages == 0 &&
		    op->unit == op->nunits)
			op_logged(op);
	}
	if (w->limbo_page && pio->page_seq == w->limbo_page) {
		if (error)
			w->limbo_page = 0; /* the next page (the stream resumes) carries the tail */
		else
			part_wait_round(v->part, &w->limbo_wait);
	}
	/* Never past a failed page: no flush may claim it (recovery.c). */
	if (!error) {
		w->completed_seq = pio->page_seq;
		if (pio->last_rec > w->completed_rec)
			w->completed_rec = pio->last_rec;
	}
}

static void page_end_io(struct ft_bio *bio, int error)
{
	struct wb_page_io *pio = (struct wb_page_io *)bio;
	struct cache_vol *v = pio->v;
	struct wb_vol *w = &v->wb;
	struct cache_part *p = v->part;

	wb_seg_of(v, pio->seg_seq)->busy--;
	pio->error = error;
	pio->done = true;
	while (w->pages && w->pages->done) {
		struct wb_page_io *d = w->pages;

		w->pages = d->next;
		if (!w->pages)
			w->pages_tail = &w->pages;
		page_process(v, d);
		free(d->bio.buf);
		free(d);
	}
	part_io_put(p);
	wb_destage_kick(v);
}

/*
 * Put as much of the batch as fits into one page of the head segment and
 * write it. @marker: write a page even with no record (it carries the new
 * durable_seq to disk, see recovery.c).
 */
static bool build_page(struct cache_vol *v, bool marker)
{
	struct wb_vol *w = &v->wb;
	struct cache_part *p = v->part;
	struct wb_seg *h = w->head >= w->tail ? wb_seg_of(v, w->head) : NULL;
	uint32_t room = h ? FT_WLOG_SEG_BLOCKS - h->used : 0;
	uint32_t max_data, ndata = 0, n = 0;
	struct wb_pent ents[FT_WLOG_RECS_PER_PAGE];
	struct wb_page_io *pio;
	struct ft_wlog_page *pg;
	char *buf;

	if (room < 2) {
		if (!open_segment(v))
			return false;
		h = wb_seg_of(v, w->head);
		room = FT_WLOG_SEG_BLOCKS;
	}
	max_data = room - 1 < MAX_PAGE_DATA ? room - 1 : MAX_PAGE_DATA;
	/* Choose the records: ops in arrival order, split where a page fills up. */
	for (struct cache_op *op = w->batch; op && n < FT_WLOG_RECS_PER_PAGE;) {
		struct wb_unit *u = &op->units[op->unit];
		uint64_t left = u->b1 - u->b0 - op->unit_next, take;

		if (u->type == FT_WLOG_DATA) {
			take = left < max_data - ndata ? left : max_data - ndata;
			take = take < FT_WLOG_RECS_PER_PAGE - n ? take : FT_WLOG_RECS_PER_PAGE - n;
			if (take == 0)
				break;
			for (uint64_t k = 0; k < take; k++) {
				ents[n].op = op;
				ents[n].type = FT_WLOG_DATA;
				ents[n].block = u->b0 + op->unit_next + k;
				ents[n].nblocks = 1;
				ents[n].loc = h->index * FT_WLOG_SEG_BLOCKS + h->used + 1 + ndata;
				ndata++;
				n++;
			}
		} else {
			take = left < MAX_RANGE ? left : MAX_RANGE;
			ents[n].op = op;
			ents[n].type = u->type;
			ents[n].block = u->b0 + op->unit_next;
			ents[n].nblocks = take;
			ents[n].loc = 0;
			n++;
		}
		op->unit_next += (uint32_t)take;
		if (op->unit_next == u->b1 - u->b0) {
			op->unit++;
			op->unit_next = 0;
		}
		if (op->unit == op->nunits) {
			/* Wholly placed: it leaves the batch. */
			w->batch = op->bnext;
			if (!w->batch)
				w->batch_tail = &w->batch;
			op->pages++;
			op = w->batch;
			continue;
		}
		/* Partly placed: the page is full. */
		break;
	}
	if (n == 0 && !marker)
		return false;
	/* Ops partly placed in this page count it too (wholly placed ones did above). */
	if (n && ents[n - 1].op == w->batch && w->batch && w->batch->unit < w->batch->nunits)
		w->batch->pages++;

	pio = malloc(sizeof(*pio) + n * sizeof(pio->ents[0]));
	if (!pio || posix_memalign((void **)&buf, BLK, (size_t)(1 + ndata) * BLK) != 0) {
		ft_err("volume '%s': out of memory writing the log; stopping", v->cfg->name);
		abort();
	}
	pg = (struct ft_wlog_page *)buf;
	memset(pg, 0, sizeof(*pg));
	pg->volume = v->id;
	pg->nrecs = (uint16_t)n;
	pg->epoch = w->epoch;
	pg->ndata = ndata;
	pg->seg_seq = h->seq;
	pg->page_seq = w->next_page_seq++;
	pio->page_seq = pg->page_seq;
	pio->last_rec = 0;
	pg->durable_seq = w->durable_seq;
	pg->tail_seg = w->tail;
	pg->reserved = w->resume ? 1 : 0; /* first page after a recovery or a hole (recovery.c) */
	if (w->resume && w->cut_seq)
		w->cut_end = pg->page_seq;
	w->resume = false;
	w->marked_durable = w->durable_seq;
	if (w->nlimbo && !w->limbo_page)
		w->limbo_page = pg->page_seq;
	for (uint32_t i = 0, d = 0; i < n; i++) {
		struct wb_pent *e = &ents[i];
		struct ft_wlog_rec *r = &pg->recs[i];

		e->seq = w->next_rec_seq++;
		pio->last_rec = e->seq;
		r->offset = e->block * BLK;
		r->length = (uint32_t)(e->nblocks * BLK);
		r->seq = e->seq;
		r->volume = v->id;
		r->type = e->type;
		if (e->type == FT_WLOG_DATA) {
			const struct wb_unit *u = NULL;
			char *dst = buf + (size_t)(1 + d++) * BLK;

			for (uint32_t k = 0; k < e->op->nunits; k++)
				if (e->op->units[k].type == FT_WLOG_DATA &&
				    e->block >= e->op->units[k].b0 && e->block < e->op->units[k].b1)
					u = &e->op->units[k];
			memcpy(dst, u->data + (e->block - u->b0) * BLK, BLK);
			r->data_crc = ft_crc32c(0, dst, BLK);
		}
	}
	ft_wlog_page_seal(pg, v->cache->dev->uuid);
	memcpy(pio->ents, ents, n * sizeof(ents[0]));
	pio->n = n;
	pio->v = v;
	pio->next = NULL;
	pio->done = false;
	pio->seg_seq = h->seq;
	pio->bio.op = FT_BIO_WRITE;
	pio->bio.flags = FT_BIO_BUFFERED; /* see the top of this file */
	pio->bio.offset = v->cache->dev->geo.log_offset +
			  ((uint64_t)h->index * FT_WLOG_SEG_BLOCKS + h->used) * BLK;
	pio->bio.len = (uint64_t)(1 + ndata) * BLK;
	pio->bio.buf = buf;
	pio->bio.end_io = page_end_io;
	h->used += 1 + ndata;
	h->busy++;
	*w->pages_tail = pio;
	w->pages_tail = &pio->next;
	part_io_get(p);
	ft_bio_submit(p->dev, &pio->bio);
	return true;
}

static void build_fn(struct ft_deferred *d)
{
	struct cache_vol *v =
		(struct cache_vol *)((char *)d - offsetof(struct cache_vol, wb.build));
	struct wb_vol *w = &v->wb;

	while (w->batch && !w->voiding) {
		if (!build_page(v, false)) {
			/* No log space: the writes wait (throttled) for the destager. */
			for (struct cache_op *op = w->batch; op; op = op->bnext) {
				if (!op->throttled) {
					op->throttled = true;
					ft_stat_add(&v->stats->throttled_writes, 1);
				}
			}
			w->throttled = true;
			wb_destage_kick(v);
			return;
		}
	}
	w->throttled = false;
}

void wb_write_marker(struct cache_vol *v)
{
	struct wb_vol *w = &v->wb;

	if (w->on && !w->batch && !w->pages && !w->voiding && w->head >= w->tail &&
	    (w->durable_seq > w->marked_durable || (w->nlimbo && !w->limbo_page)))
		build_page(v, true);
}

void wb_kick_build(struct cache_vol *v)
{
	if (v->wb.batch && v->part->reactor)
		ft_reactor_defer(v->part->reactor, &v->wb.build);
}

static void enqueue(struct cache_op *op)
{
	struct wb_vol *w = &op->v->wb;

	op->bnext = NULL;
	*w->batch_tail = op;
	w->batch_tail = &op->bnext;
	wb_kick_build(op->v);
}

/* ---- writes ---- */

/* The partial blocks' current content has arrived: merge the write into it and log. */
static void rmw_ready(struct cache_op *op)
{
	struct ft_bio *bio = op->parent;
	uint64_t b0 = bio->offset / BLK;

	if (op->error) {
		op_write_done(op, op->error);
		return;
	}
	if (bio->op == FT_BIO_WRITE) {
		memcpy((char *)op->rmw + (bio->offset - b0 * BLK), bio->buf, bio->len);
	} else {
		/* WRITE_ZEROES: zero the covered part of each partial block. */
		for (uint32_t k = 0; k < op->nunits; k++) {
			struct wb_unit *u = &op->units[k];
			uint64_t s, e;

			if (u->type != FT_WLOG_DATA)
				continue;
			s = bio->offset > u->b0 * BLK ? bio->offset : u->b0 * BLK;
			e = bio->offset + bio->len < u->b1 * BLK ? bio->offset + bio->len
								 : u->b1 * BLK;
			memset((char *)u->data + (s - u->b0 * BLK), 0, e - s);
		}
	}
	enqueue(op);
}

struct rmw_read {
	struct ft_bio bio;
	struct cache_op *op;
	uint32_t ring; /* the pinned log segment + 1, or 0 for a store read */
};

static void rmw_end_io(struct ft_bio *bio, int error)
{
	struct rmw_read *rr = (struct rmw_read *)bio;
	struct cache_op *op = rr->op;

	if (error) {
		ft_warn("volume '%s': reading a block to merge a partial write failed: %s",
			op->v->cfg->name, strerror(-error));
		if (!op->error)
			op->error = error;
	}
	if (rr->ring) /* a log read: its segment may go now */
		op->v->wb.ring[rr->ring - 1].busy--;
	free(rr);
	part_io_put(op->v->part);
	if (--op->rmw_pending == 0)
		rmw_ready(op);
}

/* Read block @b's current content into @dst for a merge. */
static void rmw_read(struct cache_op *op, uint64_t b, void *dst)
{
	struct cache_vol *v = op->v;
	struct wb_ent *e = wb_map_find(&v->wb.map, b);
	struct rmw_read *rr;

	if ((e && (e->loc == WB_LOC_ZERO || e->loc == WB_LOC_TRIM)) ||
	    (!e && v->wb.ranges && wb_range_of(v, b))) {
		memset(dst, 0, BLK);
		return;
	}
	rr = calloc(1, sizeof(*rr));
	if (!rr) {
		op->error = -ENOMEM;
		return;
	}
	rr->op = op;
	rr->bio.op = FT_BIO_READ;
	rr->bio.len = BLK;
	rr->bio.buf = dst;
	rr->bio.end_io = rmw_end_io;
	op->rmw_pending++;
	part_io_get(v->part);
	if (e) {
		v->wb.ring[e->ring].busy++;
		rr->ring = e->ring + 1;
		rr->bio.flags = FT_BIO_BUFFERED;
		rr->bio.offset = v->cache->dev->geo.log_offset + (uint64_t)e->loc * BLK;
		ft_bio_submit(v->part->dev, &rr->bio);
	} else {
		rr->bio.offset = b * BLK;
		ft_bio_submit(v->inner, &rr->bio);
	}
}

/*
 * Log @op (a WRITE, TRIM or WRITE_ZEROES at the head of the volume's write
 * queue: no other write to its blocks is in flight). Whole blocks are
 * logged as they are; a partial block is first merged with the block's
 * current content, so every DATA record is a whole block.
 */
void wb_write(struct cache_op *op)
{
	struct ft_bio *bio = op->parent;
	uint64_t off = bio->offset, end = off + bio->len;
	uint64_t b0 = off / BLK, b1 = (end + BLK - 1) / BLK;
	uint64_t i0 = (off + BLK - 1) / BLK, i1 = end / BLK; /* whole blocks */
	bool head_part = off % BLK != 0, tail_part = end % BLK != 0;

	op->nunits = op->unit = op->unit_next = 0;
	op->pages = 0;
	op->rmw_pending = 0;
	op->error = 0;
	if (bio->op == FT_BIO_WRITE && !head_part && !tail_part) {
		op->units[op->nunits++] = (struct wb_unit){ FT_WLOG_DATA, b0, b1, bio->buf };
		enqueue(op);
		return;
	}
	if (bio->op == FT_BIO_TRIM) {
		/* Only whole blocks: a partial TRIM may leave data as it is. */
		if (i0 >= i1) {
			op_write_done(op, 0);
			return;
		}
		op->units[op->nunits++] = (struct wb_unit){ FT_WLOG_TRIM, i0, i1, NULL };
		enqueue(op);
		return;
	}
	if (bio->op == FT_BIO_WRITE) {
		if (posix_memalign(&op->rmw, BLK, (size_t)(b1 - b0) * BLK) != 0) {
			op_write_done(op, -ENOMEM);
			return;
		}
		op->units[op->nunits++] = (struct wb_unit){ FT_WLOG_DATA, b0, b1, op->rmw };
		op->rmw_pending = 1; /* held while the reads are sent */
		if (head_part)
			rmw_read(op, b0, op->rmw);
		if (tail_part && (b1 - 1 != b0 || !head_part))
			rmw_read(op, b1 - 1, (char *)op->rmw + (b1 - 1 - b0) * BLK);
		if (--op->rmw_pending == 0)
			rmw_ready(op);
		return;
	}
	/* WRITE_ZEROES: partial blocks merged, whole blocks one ZERO record. */
	if (posix_memalign(&op->rmw, BLK, 2 * BLK) != 0) {
		op_write_done(op, -ENOMEM);
		return;
	}
	op->rmw_pending = 1;
	if (head_part) {
		op->units[op->nunits++] = (struct wb_unit){ FT_WLOG_DATA, b0, b0 + 1, op->rmw };
		rmw_read(op, b0, op->rmw);
	}
	if (i0 < i1)
		op->units[op->nunits++] = (struct wb_unit){ FT_WLOG_ZERO, i0, i1, NULL };
	if (tail_part && (b1 - 1 != b0 || !head_part)) {
		char *dst = (char *)op->rmw + BLK;

		op->units[op->nunits++] = (struct wb_unit){ FT_WLOG_DATA, b1 - 1, b1, dst };
		rmw_read(op, b1 - 1, dst);
	}
	if (--op->rmw_pending == 0)
		rmw_ready(op);
}

/* ---- FLUSH ---- */

struct flush_wait {
	struct cache_waiter w;
	struct cache_vol *v;
	struct ft_bio *bio;
};

static void flush_done(struct cache_waiter *wt, int error)
{
	struct flush_wait *f = (struct flush_wait *)wt;
	struct ft_bio *bio = f->bio;

	if (!error)
		error = durability_lost(f->v);
	free(f);
	bio->end_io(bio, error);
}

/*
 * Every acknowledged write's page has completed; one flushed record round
 * (its device flush comes after those completions) makes them all durable,
 * shared with every FLUSH and FUA waiting at the time (group commit).
 */
void wb_flush(struct cache_vol *v, struct ft_bio *bio)
{
	int rc = durability_lost(v);
	struct flush_wait *f;

	if (rc < 0) {
		bio->end_io(bio, rc);
		return;
	}
	f = calloc(1, sizeof(*f));
	if (!f) {
		bio->end_io(bio, -ENOMEM);
		return;
	}
	f->v = v;
	f->bio = bio;
	f->w.fn = flush_done;
	part_wait_round(v->part, &f->w);
}

void wb_part_round_started(struct cache_part *p)
{
	for (size_t i = 0; i < p->nvols; i++) {
		struct wb_vol *w = &p->vols[i]->wb;

		w->flush_snap = w->completed_seq;
		w->flush_snap_rec = w->completed_rec;
	}
}

void wb_part_flush_done(struct cache_part *p)
{
	if (p->failed)
		return; /* nothing is durable any more: see the top of this file */
	for (size_t i = 0; i < p->nvols; i++) {
		struct wb_vol *w = &p->vols[i]->wb;

		if (w->flush_snap > w->durable_seq)
			w->durable_seq = w->flush_snap;
		if (w->flush_snap_rec > w->durable_rec)
			w->durable_rec = w->flush_snap_rec;
	}
}

/* ---- reads ---- */

bool wb_any_dirty(const struct cache_vol *v, uint64_t b0, uint64_t b1)
{
	for (const struct wb_range *r = v->wb.ranges; r; r = r->next)
		if (r->b0 < b1 && b0 < r->b1)
			return true;
	for (uint64_t b = b0; b < b1; b++)
		if (wb_map_find(&v->wb.map, b))
			return true;
	return false;
}

struct wb_read_op {
	struct ft_bio *parent;
	struct cache_vol *v;
	struct ft_bio store;
	uint64_t b0;
	uint32_t n, pending;
	int error;
	char *buf;
	uint32_t *loc;	/* per block: log block, WB_LOC_ZERO/TRIM, or UINT32_MAX - 2: clean */
	uint32_t *ring; /* per block: the pinned segment */
};

#define LOC_CLEAN (UINT32_MAX - 2)

static void read_done(struct wb_read_op *r)
{
	struct ft_bio *parent = r->parent;
	struct cache_vol *v = r->v;
	int error = r->error;

	for (uint32_t i = 0; i < r->n; i++)
		if (r->loc[i] < LOC_CLEAN)
			v->wb.ring[r->ring[i]].busy--;
	if (!error) {
		memcpy(parent->buf, r->buf + (parent->offset - r->b0 * BLK), parent->len);
		ft_stat_add(&v->stats->hits, 1);
		ft_stat_add(&v->stats->hit_bytes, parent->len);
	} else {
		ft_stat_add(&v->stats->device_errors, 1);
		ft_err("volume '%s': reading dirty data back from the log failed: %s", v->cfg->name,
		       strerror(-error));
	}
	free(r->buf);
	free(r);
	part_io_put(v->part);
	parent->end_io(parent, error);
}

struct log_read {
	struct ft_bio bio;
	struct wb_read_op *r;
};

static void log_end_io(struct ft_bio *bio, int error)
{
	struct log_read *lr = (struct log_read *)bio;
	struct wb_read_op *r = lr->r;

	if (error && !r->error)
		r->error = error;
	free(lr);
	if (--r->pending == 0)
		read_done(r);
}

/* The dirty blocks: from the log (one read per run of consecutive log blocks) or zeroes. */
static void read_dirty(struct wb_read_op *r)
{
	struct cache_vol *v = r->v;

	r->pending = 1;
	for (uint32_t i = 0; i < r->n;) {
		uint32_t j = i + 1;
		struct log_read *lr;

		if (r->loc[i] == LOC_CLEAN) {
			i++;
			continue;
		}
		if (r->loc[i] == WB_LOC_ZERO || r->loc[i] == WB_LOC_TRIM) {
			memset(r->buf + (size_t)i * BLK, 0, BLK);
			i++;
			continue;
		}
		while (j < r->n && r->loc[j] < LOC_CLEAN && r->loc[j] == r->loc[j - 1] + 1)
			j++;
		lr = calloc(1, sizeof(*lr));
		if (!lr) {
			r->error = -ENOMEM;
			break;
		}
		lr->r = r;
		lr->bio.op = FT_BIO_READ;
		lr->bio.flags = FT_BIO_BUFFERED;
		lr->bio.offset = v->cache->dev->geo.log_offset + (uint64_t)r->loc[i] * BLK;
		lr->bio.len = (uint64_t)(j - i) * BLK;
		lr->bio.buf = r->buf + (size_t)i * BLK;
		lr->bio.end_io = log_end_io;
		r->pending++;
		ft_bio_submit(v->part->dev, &lr->bio);
		i = j;
	}
	if (--r->pending == 0)
		read_done(r);
}

static void store_end_io(struct ft_bio *bio, int error)
{
	struct wb_read_op *r =
		(struct wb_read_op *)((char *)bio - offsetof(struct wb_read_op, store));

	if (error) {
		r->error = error;
		read_done(r);
		return;
	}
	read_dirty(r);
}

/*
 * A read touching dirty blocks. Where each block is (log, zeroes, or not
 * dirty) is decided now and the log segments involved are pinned: a
 * destage finishing during the read must not send us to a store read
 * that was issued before the store got the data (W2), nor may the segment
 * be reused under the log read. Clean blocks come from the store (the read
 * cache never holds anything newer than the store), then the dirty ones
 * are laid over them.
 */
void wb_read(struct cache_vol *v, struct ft_bio *bio)
{
	uint64_t b0 = bio->offset / BLK, b1 = (bio->offset + bio->len + BLK - 1) / BLK;
	uint32_t n = (uint32_t)(b1 - b0);
	struct wb_read_op *r = calloc(1, sizeof(*r) + (size_t)n * 2 * sizeof(uint32_t));
	bool any_clean = false;

	if (!r || posix_memalign((void **)&r->buf, BLK, (size_t)n * BLK) != 0) {
		free(r);
		bio->end_io(bio, -ENOMEM);
		return;
	}
	r->parent = bio;
	r->v = v;
	r->b0 = b0;
	r->n = n;
	r->loc = (uint32_t *)(r + 1);
	r->ring = r->loc + n;
	for (uint32_t i = 0; i < n; i++) {
		struct wb_ent *e = wb_map_find(&v->wb.map, b0 + i);

		if (!e) {
			r->loc[i] =
				v->wb.ranges && wb_range_of(v, b0 + i) ? WB_LOC_ZERO : LOC_CLEAN;
			any_clean = any_clean || r->loc[i] == LOC_CLEAN;
			continue;
		}
		r->loc[i] = e->loc;
		r->ring[i] = e->ring;
		if (e->loc < LOC_CLEAN)
			v->wb.ring[e->ring].busy++;
	}
	part_io_get(v->part);
	if (!any_clean) {
		read_dirty(r);
		return;
	}
	r->store.op = FT_BIO_READ;
	r->store.flags = 0;
	r->store.offset = b0 * BLK;
	r->store.len = (uint64_t)n * BLK;
	r->store.buf = r->buf;
	r->store.end_io = store_end_io;
	ft_bio_submit(v->inner, &r->store);
}
