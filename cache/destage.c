/* SPDX-License-Identifier: MIT */
/*
 * The destager: writes a write-back volume's dirty data to its store,
 * oldest segment first, and gives log segments back (internal.h: W3-W5).
 *
 * When it runs: while the volume's log use is above dirty_high (until it
 * is below dirty_low), while writes wait for log space, while a drain is
 * asked for, and for any segment older than dirty_max_age. At most
 * DESTAGE_DEPTH writes are in flight per volume, paced by the bandwidth
 * budget (except drains). A store error keeps the data dirty and backs off
 * (100 ms doubling to 10 s) before the next try.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "flashtier/log.h"
#include "internal.h"

#define BLK	      FT_CACHE_BLOCK
#define DESTAGE_DEPTH 16
#define DESTAGE_RUN   64 /* blocks in one destage write */
#define TICK_NS	      (100ull * 1000 * 1000)
#define BACKOFF_MIN   100
#define BACKOFF_MAX   10000

struct destage_io {
	struct ft_bio rd, wr;
	struct cache_vol *v;
	struct destage_io *prev, *next;
	uint64_t b0;
	uint32_t n;
	uint32_t ring; /* the segment read from (pinned) */
	uint8_t type;
	void *buf;
	struct wb_range *range; /* a large ZERO or TRIM, or NULL */
	uint64_t seqs[DESTAGE_RUN];
};

static void pump(struct cache_vol *v);
static void void_stream(struct cache_vol *v);
static void update_age(struct cache_vol *v, uint64_t now);
static void pump_some(struct cache_vol *v, uint64_t now, uint64_t aged_before);

static bool in_flight(const struct cache_vol *v, uint64_t b)
{
	for (const struct destage_io *d = v->wb.destages; d; d = d->next)
		if (b >= d->b0 && b < d->b0 + d->n)
			return true;
	return false;
}

static void tick_fn(struct ft_timer *t)
{
	struct cache_vol *v = (struct cache_vol *)((char *)t - offsetof(struct cache_vol, wb.tick));

	update_age(v, ft_now_ns());
	pump(v);
	if (v->wb.throttled)
		wb_kick_build(v);
	wb_seg_check_reclaim(v);
	wb_write_marker(v);
}

static void arm_tick(struct cache_vol *v)
{
	struct wb_vol *w = &v->wb;

	if (!w->tick.armed && v->part->reactor && !ft_reactor_stopping(v->part->reactor)) {
		w->tick.fn = tick_fn;
		ft_timer_arm(v->part->reactor, &w->tick, TICK_NS);
	}
}

/* The oldest dirty entry's age: the first one still current in the oldest live segment. */
static void update_age(struct cache_vol *v, uint64_t now)
{
	struct wb_vol *w = &v->wb;
	uint64_t age = 0, now_t = wb_ticks(v->cache, now);

	for (uint64_t s = w->tail; s <= w->head && w->head >= w->tail; s++) {
		struct wb_seg *g = wb_seg_of(v, s);
		uint32_t ring = (uint32_t)(s % w->ring_cap);

		if (!g->live)
			continue;
		for (uint32_t i = 0; i < g->nblocks; i++) {
			struct wb_ent *e = wb_map_find(&w->map, g->blocks[i]);

			if (e && e->ring == ring) {
				age = e->t ? (now_t - e->t) * WB_TICK_NS / 1000000000ull
					   : (now - g->opened_ns) / 1000000000ull;
				break;
			}
		}
		break;
	}
	if (w->ranges && !age)
		age = 1;
	__atomic_store_n(&v->stats->dirty_oldest_seconds, age, __ATOMIC_RELAXED);
}

static void destage_done(struct destage_io *d, int error)
{
	struct cache_vol *v = d->v;
	struct wb_vol *w = &v->wb;

	if (d->prev)
		d->prev->next = d->next;
	else
		w->destages = d->next;
	if (d->next)
		d->next->prev = d->prev;
	w->destage_inflight--;
	if (d->type == FT_WLOG_DATA)
		w->ring[d->ring].busy--;
	if (d->range)
		d->range->inflight = false;
	if (error) {
		ft_stat_add(&v->stats->destage_errors, 1);
		if (!w->backoff_ms) {
			ft_warn("volume '%s': writing dirty data back to the store failed: %s; it stays "
				"in the cache and is retried",
				v->cfg->name, strerror(-error));
			w->backoff_ms = BACKOFF_MIN;
			ft_stat_add(&v->stats->destage_retrying, 1);
		} else if (ft_now_ns() < w->retry_at_ns) {
			/* Another write of the same try failed: one try, one doubling. */
		} else if (w->backoff_ms < BACKOFF_MAX) {
			w->backoff_ms =
				w->backoff_ms * 2 > BACKOFF_MAX ? BACKOFF_MAX : w->backoff_ms * 2;
		}
		w->retry_at_ns = ft_now_ns() + (uint64_t)w->backoff_ms * 1000000ull;
		/* Rescan: the blocks are still dirty. */
		for (uint64_t s = w->tail; s <= w->head && w->head >= w->tail; s++)
			wb_seg_of(v, s)->cursor = 0;
	} else if (d->range) {
		struct wb_range **pp = &w->ranges;

		while (*pp != d->range)
			pp = &(*pp)->next;
		*pp = d->range->next;
		if (!*pp)
			w->ranges_tail = pp;
		w->ring[d->range->ring].live--;
		ft_stat_sub(&v->stats->dirty_bytes, (d->range->b1 - d->range->b0) * BLK);
		ft_stat_add(&v->stats->destaged_bytes, (d->range->b1 - d->range->b0) * BLK);
		free(d->range);
	} else {
		for (uint32_t i = 0; i < d->n; i++) {
			struct wb_ent *e = wb_map_find(&w->map, d->b0 + i);

			/* W3: only the record that was written back leaves the map. */
			if (!e || e->seq != d->seqs[i])
				continue;
			w->ring[e->ring].live--;
			wb_map_del(&w->map, e);
			w->dirty_blocks--;
			ft_stat_sub(&v->stats->dirty_bytes, BLK);
		}
		ft_stat_add(&v->stats->destaged_bytes, (uint64_t)d->n * BLK);
	}
	if (!error && w->backoff_ms) {
		ft_info("volume '%s': writing back to the store works again", v->cfg->name);
		w->backoff_ms = 0;
		ft_stat_sub(&v->stats->destage_retrying, 1);
	}
	if (!w->dirty_blocks && !w->ranges) /* the tick, which keeps it, stops now */
		__atomic_store_n(&v->stats->dirty_oldest_seconds, 0, __ATOMIC_RELAXED);
	free(d->buf);
	free(d);
	part_io_put(v->part);
	wb_seg_check_reclaim(v);
	pump(v);
}

static void wr_end_io(struct ft_bio *bio, int error)
{
	destage_done((struct destage_io *)((char *)bio - offsetof(struct destage_io, wr)), error);
}

static void rd_end_io(struct ft_bio *bio, int error)
{
	struct destage_io *d = (struct destage_io *)((char *)bio - offsetof(struct destage_io, rd));

	if (error) {
		/* The log cannot be read back: keep it dirty; a later try may succeed. */
		ft_stat_add(&d->v->stats->device_errors, 1);
		ft_err("volume '%s': reading dirty data from the log failed: %s", d->v->cfg->name,
		       strerror(-error));
		destage_done(d, error);
		return;
	}
	ft_bio_submit(d->v->inner, &d->wr);
}

/*
 * Start one destage write from segment @s's scan position. False if nothing
 * there, or the next entry is not older than @young (a time in WB_TICK_NS).
 */
static bool destage_one(struct cache_vol *v, struct wb_seg *s, uint32_t young)
{
	struct wb_vol *w = &v->wb;
	struct destage_io *d;
	struct wb_ent *e = NULL;
	uint64_t b0 = 0;
	uint32_t ring = (uint32_t)(s->seq % w->ring_cap), n = 1;
	uint8_t type;

	while (s->cursor < s->nblocks) {
		b0 = s->blocks[s->cursor];
		e = wb_map_find(&w->map, b0);
		if (e && e->ring == ring && w->ranges && wb_range_of(v, b0))
			return false; /* newer than a ZERO/TRIM not yet on the store: after it */
		if (e && e->ring == ring && in_flight(v, b0))
			return false; /* an older record of it is on its way: this one after it */
		if (e && e->ring == ring && e->t >= young)
			return false; /* too young to go for its age alone */
		if (e && e->ring == ring && e->seq > w->durable_rec) {
			w->need_durable = true; /* W6: after the next flushed round */
			return false;
		}
		if (e && e->ring == ring)
			break;
		s->cursor++;
		e = NULL;
	}
	if (!e)
		return false;
	type = e->loc == WB_LOC_ZERO   ? FT_WLOG_ZERO
	       : e->loc == WB_LOC_TRIM ? FT_WLOG_TRIM
				       : FT_WLOG_DATA;
	d = calloc(1, sizeof(*d));
	if (!d)
		return false;
	d->seqs[0] = e->seq;
	/* Extend over the following blocks recorded next to it (a sequential write). */
	while (n < DESTAGE_RUN && s->cursor + n < s->nblocks &&
	       s->blocks[s->cursor + n] == b0 + n) {
		struct wb_ent *f = wb_map_find(&w->map, b0 + n);
		uint8_t ft;

		if (!f || f->ring != ring || in_flight(v, b0 + n) || f->seq > w->durable_rec ||
		    (w->ranges && wb_range_of(v, b0 + n)))
			break;
		ft = f->loc == WB_LOC_ZERO   ? FT_WLOG_ZERO
		     : f->loc == WB_LOC_TRIM ? FT_WLOG_TRIM
					     : FT_WLOG_DATA;
		if (ft != type || (type == FT_WLOG_DATA && f->loc != e->loc + n))
			break;
		d->seqs[n++] = f->seq;
	}
	s->cursor += n;
	if (type == FT_WLOG_DATA && posix_memalign(&d->buf, BLK, (size_t)n * BLK) != 0) {
		free(d);
		return false;
	}
	d->v = v;
	d->b0 = b0;
	d->n = n;
	d->ring = ring;
	d->type = type;
	d->next = w->destages;
	if (w->destages)
		w->destages->prev = d;
	w->destages = d;
	w->destage_inflight++;
	part_io_get(v->part);
	d->wr.op = type == FT_WLOG_DATA	  ? FT_BIO_WRITE
		   : type == FT_WLOG_ZERO ? FT_BIO_WRITE_ZEROES
					  : FT_BIO_TRIM;
	d->wr.offset = b0 * BLK;
	d->wr.len = (uint64_t)n * BLK;
	d->wr.buf = d->buf;
	d->wr.end_io = wr_end_io;
	if (type == FT_WLOG_TRIM && !(v->inner->caps & FT_BACKEND_CAN_TRIM)) {
		destage_done(d, 0); /* a store that cannot TRIM keeps its data: allowed */
		return true;
	}
	if (type != FT_WLOG_DATA) {
		ft_bio_submit(v->inner, &d->wr);
		return true;
	}
	w->ring[ring].busy++;
	d->rd.op = FT_BIO_READ;
	d->rd.flags = FT_BIO_BUFFERED;
	d->rd.offset = v->cache->dev->geo.log_offset + (uint64_t)e->loc * BLK;
	d->rd.len = (uint64_t)n * BLK;
	d->rd.buf = d->buf;
	d->rd.end_io = rd_end_io;
	ft_bio_submit(v->part->dev, &d->rd);
	return true;
}

/* The oldest large ZERO/TRIM goes to the store first: newer blocks inside it wait for it. */
static void destage_range(struct cache_vol *v)
{
	struct wb_vol *w = &v->wb;
	struct wb_range *r = w->ranges;
	struct destage_io *d;

	for (struct destage_io *x = w->destages; x; x = x->next)
		if (x->b0 < r->b1 && r->b0 < x->b0 + x->n)
			return; /* an older block's write is still on its way */
	if (r->seq > w->durable_rec) {
		w->need_durable = true;
		return;
	}
	d = calloc(1, sizeof(*d));
	if (!d)
		return;
	r->inflight = true;
	d->v = v;
	d->range = r;
	d->type = r->type;
	d->b0 = r->b0;
	d->n = (uint32_t)(r->b1 - r->b0);
	d->next = w->destages;
	if (w->destages)
		w->destages->prev = d;
	w->destages = d;
	w->destage_inflight++;
	part_io_get(v->part);
	d->wr.op = r->type == FT_WLOG_ZERO ? FT_BIO_WRITE_ZEROES : FT_BIO_TRIM;
	d->wr.offset = r->b0 * BLK;
	d->wr.len = (r->b1 - r->b0) * BLK;
	d->wr.end_io = wr_end_io;
	if (r->type == FT_WLOG_TRIM && !(v->inner->caps & FT_BACKEND_CAN_TRIM)) {
		destage_done(d, 0);
		return;
	}
	ft_bio_submit(v->inner, &d->wr);
}

static void durable_done(struct cache_waiter *wt, int error)
{
	struct cache_vol *v =
		(struct cache_vol *)((char *)wt - offsetof(struct cache_vol, wb.durable_wait));

	(void)error;
	v->wb.durable_waiting = false;
	pump(v);
}

static void pump(struct cache_vol *v)
{
	struct wb_vol *w = &v->wb;
	const struct ft_volume_policy *pol = &v->policy;
	uint64_t now = ft_now_ns(), dirty = wb_dirty_bytes(v);
	uint64_t aged_before = now > pol->dirty_max_age_ms * 1000000ull
				       ? now - pol->dirty_max_age_ms * 1000000ull
				       : 0;

	if (!w->on || !v->part->reactor)
		return;
	if (w->dirty_blocks || w->ranges || w->throttled || w->draining || w->nlimbo ||
	    w->durable_seq > w->marked_durable)
		arm_tick(v);
	if (ft_reactor_stopping(v->part->reactor))
		return; /* dirty data stays on the device; the next start goes on */
	if (w->draining && !w->dirty_blocks && !w->ranges && !w->destage_inflight && !w->batch &&
	    !w->pages) {
		void_stream(v);
		return;
	}
	if (now < w->retry_at_ns)
		return;
	/* Watermarks on dirty bytes: log space only comes back a segment at a time. */
	if (dirty >= w->high)
		w->above_high = true;
	else if (dirty <= w->low)
		w->above_high = false;
	if (pol->destage_bandwidth && !w->draining) {
		double cap = (double)pol->destage_bandwidth;

		w->tokens += cap * (double)(now - w->tokens_ns) / 1e9;
		if (w->tokens > cap)
			w->tokens = cap; /* at most a second's worth in one burst */
		w->tokens_ns = now;
	}
	w->need_durable = false;
	pump_some(v, now, aged_before);
	if (w->need_durable && !w->durable_waiting) {
		/* Records wait to be durable before they go: ask for a flushed round. */
		w->durable_waiting = true;
		w->durable_wait.fn = durable_done;
		part_wait_round(v->part, &w->durable_wait);
	}
}

static void pump_some(struct cache_vol *v, uint64_t now, uint64_t aged_before)
{
	struct wb_vol *w = &v->wb;
	const struct ft_volume_policy *pol = &v->policy;
	bool any;

	(void)now;
	if (w->ranges && !w->ranges->inflight && w->destage_inflight < DESTAGE_DEPTH)
		destage_range(v);
	do {
		any = false;
		for (uint64_t seq = w->tail; seq <= w->head && w->head >= w->tail; seq++) {
			struct wb_seg *s = wb_seg_of(v, seq);
			bool urgent = w->draining || w->throttled || w->above_high;
			uint32_t young = urgent ? UINT32_MAX : wb_ticks(v->cache, aged_before);

			if (!urgent && s->opened_ns >= aged_before)
				break; /* segments only get younger from here */
			if (w->destage_inflight >= DESTAGE_DEPTH)
				return;
			if (pol->destage_bandwidth && !w->draining &&
			    w->tokens < (double)DESTAGE_RUN * BLK)
				return; /* the tick refills */
			if (s->cursor >= s->nblocks)
				continue;
			if (destage_one(v, s, young)) {
				if (pol->destage_bandwidth && !w->draining)
					w->tokens -= (double)w->destages->n * BLK;
				any = true;
				break; /* rescan from the oldest */
			}
		}
	} while (any);
}

void wb_destage_kick(struct cache_vol *v)
{
	pump(v);
}

/* ---- giving segments back (W4) ---- */

static void limbo_done(struct cache_waiter *wt, int error)
{
	struct cache_vol *v =
		(struct cache_vol *)((char *)wt - offsetof(struct cache_vol, wb.limbo_wait));
	struct wb_vol *w = &v->wb;

	if (error) {
		w->limbo_page = 0; /* try again with another page */
		return;
	}
	for (uint32_t i = 0; i < w->nlimbo; i++)
		wb_seg_release(v->cache, w->limbo[i]);
	w->nlimbo = 0;
	w->limbo_page = 0;
	if (w->throttled)
		wb_kick_build(v);
	wb_seg_check_reclaim(v);
}

static void free_upto(struct cache_vol *v, uint64_t upto)
{
	struct wb_vol *w = &v->wb;

	while (w->tail <= upto && w->tail <= w->head) {
		struct wb_seg *s = wb_seg_of(v, w->tail);

		if (s->live || s->busy)
			break;
		if (s->index != UINT32_MAX)
			w->limbo[w->nlimbo++] = s->index;
		w->limbo_page = 0;
		free(s->blocks);
		memset(s, 0, sizeof(*s));
		w->tail++;
		ft_stat_sub(&v->stats->log_used_bytes, FT_WLOG_SEG_BYTES);
	}
	if (w->nlimbo) {
		w->limbo_wait.fn = limbo_done;
		if (w->batch)
			wb_kick_build(v); /* the next page carries the new tail */
		else
			wb_write_marker(v);
	}
}

static void reclaim_round_done(struct cache_waiter *wt, int error)
{
	struct cache_vol *v =
		(struct cache_vol *)((char *)wt - offsetof(struct cache_vol, wb.reclaim_wait));
	struct wb_vol *w = &v->wb;

	if (!error) {
		if (w->voiding)
			void_stream(v);
		else
			free_upto(v, w->reclaim_upto);
	}
	w->reclaiming = false;
	part_io_put(v->part);
	if (w->throttled)
		wb_kick_build(v);
	wb_seg_check_reclaim(v);
	pump(v);
}

static void reclaim_flush_done(struct ft_bio *bio, int error)
{
	struct cache_vol *v =
		(struct cache_vol *)((char *)bio - offsetof(struct cache_vol, wb.store_flush));
	struct wb_vol *w = &v->wb;

	if (error) {
		ft_warn("volume '%s': flushing the store failed (%s); log space is given back later",
			v->cfg->name, strerror(-error));
		w->reclaiming = false;
		if (w->voiding)
			w->voiding = false;
		part_io_put(v->part);
		return;
	}
	/* (c): the clean-cache invalidations these records made are durable after a round. */
	w->reclaim_wait.fn = reclaim_round_done;
	part_wait_round(v->part, &w->reclaim_wait);
}

/* Flush the store, then a record round: then @upto and older may go (or, voiding, all). */
static void start_reclaim(struct cache_vol *v)
{
	struct wb_vol *w = &v->wb;

	w->reclaiming = true;
	part_io_get(v->part);
	memset(&w->store_flush, 0, sizeof(w->store_flush));
	w->store_flush.op = FT_BIO_FLUSH;
	w->store_flush.end_io = reclaim_flush_done;
	if (v->inner->caps & FT_BACKEND_CAN_FLUSH)
		ft_bio_submit(v->inner, &w->store_flush);
	else
		reclaim_flush_done(&w->store_flush, 0);
}

void wb_seg_check_reclaim(struct cache_vol *v)
{
	struct wb_vol *w = &v->wb;
	uint64_t upto = 0;

	if (!w->on || w->reclaiming || w->voiding || w->nlimbo || !v->part->reactor)
		return;
	/* Never the head: writes go on there. */
	for (uint64_t s = w->tail; s < w->head; s++) {
		struct wb_seg *g = wb_seg_of(v, s);

		if (g->live || g->busy)
			break;
		upto = s;
	}
	if (!upto)
		return;
	w->reclaim_upto = upto;
	start_reclaim(v);
}

/*
 * A drain finished: nothing is dirty. Bump the epoch (W5) so no record of
 * the stream counts any more, and give every segment back; a volume that
 * was only draining old dirty data switches to its configured mode.
 */
static void void_stream(struct cache_vol *v)
{
	struct wb_vol *w = &v->wb;
	struct ft_cache *c = v->cache;
	int rc = 0;

	if (!w->voiding) {
		if (w->reclaiming || w->nlimbo)
			return; /* their ends call pump() again (or the tick does) */
		w->voiding = true;
		start_reclaim(v);
		return;
	}
	/* Store flushed and round done (reclaim_round_done). Writes may have come meanwhile. */
	if (w->dirty_blocks || w->ranges || w->batch || w->pages) {
		w->voiding = false;
		wb_kick_build(v);
		return;
	}
	pthread_mutex_lock(&c->sb_lock);
	for (uint32_t i = 0; i < c->dev->nvolumes; i++) {
		if (c->dev->volumes[i].id == v->id) {
			c->dev->volumes[i].epoch = c->dev->epoch_next++;
			w->epoch = c->dev->volumes[i].epoch;
		}
	}
	rc = ft_cachedev_write_sb(c->dev, c->dev->flags);
	pthread_mutex_unlock(&c->sb_lock);
	w->voiding = false;
	if (rc < 0) {
		ft_err("volume '%s': cannot record the finished drain on the cache device: %s",
		       v->cfg->name, strerror(-rc));
		w->draining = false;
		return;
	}
	while (w->tail <= w->head) {
		struct wb_seg *s = wb_seg_of(v, w->tail);

		wb_seg_release(c, s->index);
		free(s->blocks);
		memset(s, 0, sizeof(*s));
		w->tail++;
	}
	ft_stat_sub(&v->stats->log_used_bytes, ft_stat_get(&v->stats->log_used_bytes));
	w->draining = false;
	ft_stat_sub(&v->stats->draining, ft_stat_get(&v->stats->draining));
	if (w->switch_to != FT_CACHE_WRITE_BACK) {
		w->on = false;
		v->policy.mode = w->switch_to;
		ft_info("volume '%s': drained; now %s", v->cfg->name,
			ft_cache_mode_name(w->switch_to));
	} else {
		ft_info("volume '%s': drained", v->cfg->name);
	}
	wb_kick_build(v);
}

void wb_drain(struct cache_vol *v)
{
	struct wb_vol *w = &v->wb;

	if (!w->on)
		return;
	if (!w->draining) {
		w->draining = true;
		ft_stat_add(&v->stats->draining, 1);
		ft_info("volume '%s': draining %llu dirty bytes to the store", v->cfg->name,
			(unsigned long long)w->dirty_blocks * BLK);
	}
	w->retry_at_ns = 0;
	pump(v);
}

/* On the reactor, once attached: start destaging what recovery found. */
void wb_start_volume(struct cache_vol *v)
{
	struct wb_vol *w = &v->wb;

	if (!w->on)
		return;
	w->tokens_ns = ft_now_ns();
	if (w->switch_to != FT_CACHE_WRITE_BACK)
		wb_drain(v);
	pump(v);
}
