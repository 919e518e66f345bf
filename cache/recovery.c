/* SPDX-License-Identifier: MIT */
/*
 * Write-back recovery: replay each volume's log stream into its dirty map
 * at start (blocking, before anything is served).
 *
 * A stream is the run of segments with consecutive seg_seq ending at the
 * newest one (a gap means everything before it was given back, W4), from
 * the newest tail_seg claim on. Pages are replayed in page_seq order.
 * Where the pages stop verifying (a torn or corrupt page, or simply the end
 * of what was written) at page e:
 *   - if a page already replayed says a completed flush covered e
 *     (durable_seq >= e), or any later page of the stream does, acknowledged
 *     data is missing: fatal, reported, never skipped;
 *   - otherwise e and everything after it were never covered by a flush:
 *     ignored. The pages after the cut stay on disk, so the next start must
 *     not read them as part of the stream: the first page written after a
 *     recovery carries a "resume" flag and a page_seq above every page seen,
 *     and a replay that meets a cut skips to the next resume page.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "flashtier/crc32c.h"
#include "flashtier/log.h"
#include "internal.h"

#define BLK	    FT_CACHE_BLOCK
#define PAGE_RESUME 1u

struct seg_head {
	bool valid;
	bool damaged;		/* its first page is not: pg is a later page of the segment */
	struct ft_wlog_page pg; /* host order when valid */
};

struct replay {
	struct ft_cache *c;
	struct cache_vol *v;
	const char *name;
	uint16_t id;
	uint32_t epoch;
	struct seg_head *heads;
	uint32_t *segs; /* segment indices of the stream, by seg_seq */
	uint32_t nsegs;
	char *buf; /* one segment */
	uint64_t expected, durable_max, max_seen, last_valid;
};

static int read_seg(struct replay *r, uint32_t index)
{
	const struct ft_cache_geometry *g = &r->c->dev->geo;
	ssize_t n = pread(r->c->dev->fd, r->buf, FT_WLOG_SEG_BYTES,
			  (off_t)(g->log_offset + (uint64_t)index * FT_WLOG_SEG_BYTES));

	return n == FT_WLOG_SEG_BYTES ? 0 : n < 0 ? -errno : -EIO;
}

/* Is block @blk of the buffer a valid page of this stream? (@pg receives it.) */
static bool page_at(const struct replay *r, uint32_t blk, struct ft_wlog_page *pg)
{
	memcpy(pg, r->buf + (size_t)blk * BLK, BLK);
	return ft_wlog_page_open(pg, r->c->dev->uuid) == FT_WLOG_PAGE_VALID &&
	       pg->volume == r->id && pg->epoch == r->epoch;
}

static bool data_ok(const struct replay *r, uint32_t blk, const struct ft_wlog_page *pg)
{
	uint32_t d = 0;

	if (blk + 1 + pg->ndata > FT_WLOG_SEG_BLOCKS)
		return false;
	for (uint16_t i = 0; i < pg->nrecs; i++) {
		if (pg->recs[i].type != FT_WLOG_DATA)
			continue;
		if (ft_crc32c(0, r->buf + (size_t)(blk + 1 + d++) * BLK, BLK) !=
		    pg->recs[i].data_crc)
			return false;
	}
	return true;
}

/*
 * Look for proof that page @r->expected was covered by a completed flush:
 * in blocks [@from, end) of the segment in the buffer, then in segments
 * [@next_i, @end_i) of the stream (a later recovery's pages, from the
 * next resume segment on, legitimately claim more). Returns -EBADMSG
 * (after logging) if found.
 */
static int fatal_check(struct replay *r, uint64_t seg_seq, uint32_t from, uint32_t next_i,
		       uint32_t end_i)
{
	struct ft_wlog_page pg;
	uint64_t e = r->expected;
	int rc;

	if (r->durable_max >= e)
		goto fatal;
	for (uint32_t i = next_i;; i++) {
		for (uint32_t b = from; b < FT_WLOG_SEG_BLOCKS; b++) {
			if (!page_at(r, b, &pg) || pg.page_seq <= e)
				continue;
			if (pg.page_seq > r->max_seen)
				r->max_seen = pg.page_seq;
			if (pg.durable_seq >= e)
				goto fatal;
		}
		if (i >= end_i)
			return 0;
		rc = read_seg(r, r->segs[i]);
		if (rc < 0)
			return rc;
		from = 0;
	}
fatal:
	ft_err("cache %s: the write-back log of volume '%s' is damaged: page %llu (segment %llu) "
	       "does not verify, yet a completed flush covered it (pages up to %llu were durable); "
	       "acknowledged writes would be lost, so the agent will not start. Keep the device "
	       "as it is for a recovery by hand; \"reformat\": true discards the cache (and that "
	       "data)",
	       r->c->cfg->path, r->name, (unsigned long long)e, (unsigned long long)seg_seq,
	       (unsigned long long)(r->durable_max > e ? r->durable_max : e));
	return -EBADMSG;
}

/* Replay the records of page @pg at block @blk of segment @seg_seq (index @index). */
static void apply_page(struct replay *r, const struct ft_wlog_page *pg, uint32_t index,
		       uint32_t blk, uint64_t seg_seq)
{
	struct cache_vol *v = r->v;
	uint32_t d = 0;

	for (uint16_t i = 0; i < pg->nrecs; i++) {
		const struct ft_wlog_rec *rec = &pg->recs[i];
		uint64_t b = rec->offset / BLK, nb = rec->length / BLK;

		if (b + nb > v->nblocks || b + nb < b) {
			ft_warn("volume '%s': log record beyond the volume's end ignored", r->name);
			continue;
		}
		if (rec->type == FT_WLOG_DATA) {
			wb_apply(v, b, rec->seq, index * FT_WLOG_SEG_BLOCKS + blk + 1 + d++,
				 seg_seq);
			continue;
		}
		wb_apply_range(v, b, nb, rec->seq, rec->type, seg_seq);
	}
	if (pg->durable_seq > r->durable_max)
		r->durable_max = pg->durable_seq;
	if (pg->page_seq > r->max_seen)
		r->max_seen = pg->page_seq;
	r->last_valid = pg->page_seq;
	if (pg->nrecs && r->v->wb.next_rec_seq <= pg->recs[pg->nrecs - 1].seq)
		r->v->wb.next_rec_seq = pg->recs[pg->nrecs - 1].seq + 1;
}

static int cmp_seq(const void *a, const void *b, void *arg)
{
	const struct seg_head *h = arg;
	uint64_t x = h[*(const uint32_t *)a].pg.seg_seq, y = h[*(const uint32_t *)b].pg.seg_seq;

	return x < y ? -1 : x > y;
}

/* The largest tail claim of any page in the newest segment (read into the buffer). */
static int newest_tail_claim(struct replay *r, uint64_t *claim)
{
	uint32_t newest = r->segs[r->nsegs - 1];
	uint64_t seq = r->heads[newest].pg.seg_seq;
	struct ft_wlog_page pg;
	int rc = read_seg(r, newest);

	if (rc < 0)
		return rc;
	for (uint32_t b = 0; b < FT_WLOG_SEG_BLOCKS; b++)
		if (page_at(r, b, &pg) && pg.seg_seq == seq && pg.tail_seg > *claim)
			*claim = pg.tail_seg;
	return 0;
}

/*
 * The pages of the stream stop continuing before segment @next_i (a torn
 * or corrupt page, or a missing segment): fatal if a flush covered page
 * @e; otherwise skip to the next resume segment. Returns its index (or
 * nsegs), or a negative errno.
 */
static int cut(struct replay *r, uint64_t e, uint64_t seg_seq, uint32_t from, uint32_t next_i)
{
	uint32_t end_i = next_i;
	int rc;

	while (end_i < r->nsegs && !(r->heads[r->segs[end_i]].pg.reserved & PAGE_RESUME))
		end_i++;
	r->expected = e;
	rc = fatal_check(r, seg_seq, from, next_i, end_i);
	return rc < 0 ? rc : (int)end_i;
}

static int replay_stream(struct replay *r)
{
	struct cache_vol *v = r->v;
	struct wb_vol *w = &v->wb;
	uint64_t tail = 0, want;
	uint32_t first = 0, i;
	bool started = false;
	int rc;

	qsort_r(r->segs, r->nsegs, sizeof(r->segs[0]), cmp_seq, r->heads);
	/*
	 * The tail: segments below the newest claim were given back (their
	 * records are on the store). Segments are reused only after a durable
	 * page claimed a tail past them, so every segment from the claim to the
	 * newest is ours: one missing is damage, handled as a cut.
	 */
	for (i = 0; i < r->nsegs; i++)
		if (r->heads[r->segs[i]].pg.tail_seg > tail)
			tail = r->heads[r->segs[i]].pg.tail_seg;
	rc = newest_tail_claim(r, &tail);
	if (rc < 0)
		return rc;
	while (first < r->nsegs - 1 && r->heads[r->segs[first]].pg.seg_seq < tail)
		first++;
	memmove(r->segs, r->segs + first, (r->nsegs - first) * sizeof(r->segs[0]));
	r->nsegs -= first;
	if (tail == 0 || tail > r->heads[r->segs[0]].pg.seg_seq)
		tail = r->heads[r->segs[0]].pg.seg_seq;

	w->tail = tail;
	w->head = r->heads[r->segs[r->nsegs - 1]].pg.seg_seq;
	for (uint64_t sq = w->tail; sq <= w->head; sq++) {
		struct wb_seg *s = wb_seg_of(v, sq);

		memset(s, 0, sizeof(*s));
		s->index = UINT32_MAX; /* missing (damaged): nothing to give back */
		s->seq = sq;
		s->used = FT_WLOG_SEG_BLOCKS; /* never appended to again */
	}
	want = tail;
	for (i = 0; i < r->nsegs;) {
		uint32_t index = r->segs[i];
		const struct ft_wlog_page *h0 = &r->heads[index].pg;
		struct wb_seg *s = wb_seg_of(v, h0->seg_seq);
		struct ft_wlog_page pg;
		uint32_t blk = 0;

		s->index = index;
		s->opened_ns = 0; /* replayed data is old: destage it soon */
		if (h0->seg_seq != want) {
			/* Segments [want, seg_seq) are missing: the stream breaks before them. */
			rc = cut(r, started ? r->expected : h0->page_seq - 1, want,
				 FT_WLOG_SEG_BLOCKS, i);
			if (rc < 0)
				return rc;
			want = h0->seg_seq; /* the loop goes on at the resume segment, if any */
			if ((uint32_t)rc != i) {
				for (; i < (uint32_t)rc; i++)
					wb_seg_of(v, r->heads[r->segs[i]].pg.seg_seq)->index =
						r->segs[i];
				want = i < r->nsegs ? r->heads[r->segs[i]].pg.seg_seq : want;
				continue;
			}
		}
		if ((h0->reserved & PAGE_RESUME) && (!started || h0->page_seq > r->expected))
			r->expected = h0->page_seq; /* after a cut, accepted by an earlier start */
		else if (!started)
			r->expected = h0->page_seq - (r->heads[index].damaged ? 1 : 0);
		started = true;
		want = h0->seg_seq + 1;
		rc = read_seg(r, index);
		if (rc < 0)
			return rc;
		while (blk < FT_WLOG_SEG_BLOCKS && page_at(r, blk, &pg) && pg.seg_seq == s->seq &&
		       pg.page_seq == r->expected && data_ok(r, blk, &pg)) {
			apply_page(r, &pg, index, blk, s->seq);
			r->expected++;
			blk += 1 + pg.ndata;
		}
		i++;
		/* The next segment normally starts with the next page. */
		if (i < r->nsegs) {
			const struct ft_wlog_page *n0 = &r->heads[r->segs[i]].pg;

			if (n0->seg_seq != want || n0->page_seq == r->expected ||
			    (n0->reserved & PAGE_RESUME))
				continue; /* a gap is handled at the top */
		}
		rc = cut(r, r->expected, s->seq, blk, i);
		if (rc < 0)
			return rc;
		for (; i < (uint32_t)rc; i++)
			wb_seg_of(v, r->heads[r->segs[i]].pg.seg_seq)->index = r->segs[i];
		if (i < r->nsegs)
			want = r->heads[r->segs[i]].pg.seg_seq;
	}
	return 0;
}

int wb_recover(struct ft_cache *c, const struct ft_cache_volent *old, uint32_t nold)
{
	const struct ft_cache_geometry *g = &c->dev->geo;
	struct seg_head *heads = calloc(c->nsegs ? c->nsegs : 1, sizeof(*heads));
	uint32_t *segs = calloc(c->nsegs ? c->nsegs : 1, sizeof(*segs));
	char *buf = NULL;
	uint64_t replayed = 0;
	enum ft_wlog_page_state st;
	int rc = 0;

	if (!heads || !segs || posix_memalign((void **)&buf, BLK, FT_WLOG_SEG_BYTES) != 0) {
		rc = -ENOMEM;
		goto out;
	}
	for (uint32_t i = 0; i < c->nsegs; i++) {
		ssize_t n = pread(c->dev->fd, &heads[i].pg, BLK,
				  (off_t)(g->log_offset + (uint64_t)i * FT_WLOG_SEG_BYTES));

		if (n != BLK) {
			rc = n < 0 ? -errno : -EIO;
			goto out;
		}
		st = ft_wlog_page_open(&heads[i].pg, c->dev->uuid);
		heads[i].valid = st == FT_WLOG_PAGE_VALID;
		if (st == FT_WLOG_PAGE_CORRUPT) {
			/*
			 * Our magic, bad CRC: torn, or damaged. A later page of the
			 * segment says whose it was, so the replay can tell whether a
			 * flush covered what is lost.
			 */
			struct replay probe = { .c = c, .buf = buf };
			struct ft_wlog_page pg;

			rc = read_seg(&probe, i);
			if (rc < 0)
				goto out;
			for (uint32_t b = 1; b < FT_WLOG_SEG_BLOCKS && !heads[i].valid; b++) {
				memcpy(&pg, buf + (size_t)b * BLK, BLK);
				if (ft_wlog_page_open(&pg, c->dev->uuid) == FT_WLOG_PAGE_VALID) {
					heads[i].pg = pg;
					heads[i].pg.reserved &= ~PAGE_RESUME;
					heads[i].valid = heads[i].damaged = true;
				}
			}
		}
	}
	for (uint32_t k = 0; k < nold && rc == 0; k++) {
		struct replay r = { .c = c,
				    .id = old[k].id,
				    .epoch = old[k].epoch,
				    .heads = heads,
				    .segs = segs,
				    .buf = buf };
		struct cache_vol *v =
			old[k].id <= FT_CACHE_MAX_VOLUMES ? c->by_id[old[k].id] : NULL;
		struct cache_vol tmp;
		char label[32];

		r.nsegs = 0;
		for (uint32_t i = 0; i < c->nsegs; i++)
			if (heads[i].valid && heads[i].pg.volume == r.id &&
			    heads[i].pg.epoch == r.epoch)
				segs[r.nsegs++] = i;
		if (!r.nsegs)
			continue;
		if (!v || v->ident != old[k].ident || v->wb.epoch != old[k].epoch) {
			/* A volume gone from the config (or changed): count what it left. */
			memset(&tmp, 0, sizeof(tmp));
			tmp.nblocks = UINT64_MAX / BLK;
			tmp.stats = calloc(1, sizeof(*tmp.stats));
			snprintf(label, sizeof(label), "id %u", r.id);
			tmp.cfg = NULL;
			r.name = label;
			v = &tmp;
			if (!tmp.stats || wb_vol_init(v, c->nsegs) < 0) {
				free(tmp.stats);
				rc = -ENOMEM;
				break;
			}
			r.v = v;
			rc = replay_stream(&r);
			if (rc == 0 && (tmp.wb.dirty_blocks || tmp.wb.ranges)) {
				if (!c->cfg->discard_dirty) {
					ft_err("cache %s: it holds %llu bytes of dirty data (not yet written "
					       "back) of a volume that is no longer configured, or whose "
					       "name, backing store or size changed (volume id %u). Put it "
					       "back as it was so the data can be written back (a mode of "
					       "\"write-through\" drains it and switches), or set "
					       "\"discard_dirty\": true to drop that data",
					       c->cfg->path,
					       (unsigned long long)tmp.wb.dirty_blocks * BLK, r.id);
					rc = -EUCLEAN;
				} else {
					ft_warn("cache %s: dropping %llu bytes of dirty data of volume id %u "
						"(\"discard_dirty\")",
						c->cfg->path,
						(unsigned long long)tmp.wb.dirty_blocks * BLK,
						r.id);
				}
			}
			wb_vol_free(v);
			free(tmp.stats);
			continue;
		}
		r.v = v;
		r.name = v->cfg->name;
		rc = replay_stream(&r);
		if (rc < 0)
			break;
		v->wb.next_page_seq = r.max_seen + 1;
		v->wb.completed_seq = r.max_seen;
		v->wb.durable_seq = r.last_valid; /* the start fdatasyncs the device */
		v->wb.completed_rec = v->wb.durable_rec = v->wb.next_rec_seq - 1;
		v->wb.resume = true;
		for (uint64_t s = v->wb.tail; s <= v->wb.head; s++)
			if (wb_seg_of(v, s)->index != UINT32_MAX)
				c->seg_used[wb_seg_of(v, s)->index] = 1;
		replayed += v->wb.dirty_blocks;
		if (v->wb.dirty_blocks || v->wb.ranges) {
			v->wb.on = true;
			ft_info("volume '%s': %llu dirty bytes found in the write-back log", r.name,
				(unsigned long long)v->wb.dirty_blocks * BLK);
		}
	}
out:
	free(heads);
	free(segs);
	free(buf);
	if (rc == -ENOMEM)
		ft_err("cache %s: out of memory reading the write-back log", c->cfg->path);
	else if (rc < 0 && rc != -EBADMSG && rc != -EUCLEAN)
		ft_err("cache %s: cannot read the write-back log: %s", c->cfg->path, strerror(-rc));
	(void)replayed;
	return rc;
}
