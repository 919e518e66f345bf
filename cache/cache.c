/* SPDX-License-Identifier: MIT */
/*
 * Cache set-up and tear-down: the device, volume ids, partitions, and the
 * warm restart from the mapping records.
 */
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "flashtier/log.h"
#include "flashtier/powercut.h"
#include "internal.h"

#define SCAN_CHUNK (1u << 20) /* bytes of records read at a time at start-up */

static void uuid_hex(const uint8_t u[16], char out[33])
{
	for (int i = 0; i < 16; i++)
		snprintf(out + 2 * i, 3, "%02x", u[i]);
}

static int fsync_parent(const char *path)
{
	char *copy = strdup(path);
	int fd, rc = 0;

	if (!copy)
		return -ENOMEM;
	fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	free(copy);
	if (fd < 0)
		return -errno;
	if (fsync(fd) < 0)
		rc = -errno;
	close(fd);
	return rc;
}

int cache_mark_untrusted(struct ft_cache *c, const char *why)
{
	const char *path = c->cfg->state_file;
	char tmp[4096], u[33], *dir;
	int fd, rc = 0;
	FILE *f;

	uuid_hex(c->dev->uuid, u);
	dir = strdup(path);
	if (dir) {
		(void)mkdir(dirname(dir), 0755); /* /var/lib/flashtier may not exist yet */
		free(dir);
	}
	if (snprintf(tmp, sizeof(tmp), "%s.tmp", path) >= (int)sizeof(tmp))
		return -ENAMETOOLONG;
	fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	if (fd < 0)
		return -errno;
	f = fdopen(fd, "w");
	if (!f) {
		close(fd);
		return -ENOMEM;
	}
	fprintf(f,
		"# flashtier: do not trust this cache device's contents at the next start\n"
		"uuid=%s\nreason=%s\n",
		u, why);
	if (fflush(f) != 0 || fsync(fd) < 0)
		rc = -errno;
	if (fclose(f) != 0 && rc == 0)
		rc = -errno;
	if (rc == 0 && rename(tmp, path) < 0)
		rc = -errno;
	if (rc == 0)
		rc = fsync_parent(path);
	return rc;
}

/*
 * The previous run could not write to the device while volumes carried on
 * without it: their backing stores may now be newer than its records. Does
 * the state file name this device?
 */
static bool marked_untrusted(const struct ft_cache_config *cc, const struct ft_cachedev *dev)
{
	char line[256], u[33], want[40];
	bool hit = false;
	FILE *f = fopen(cc->state_file, "re");

	if (!f)
		return false;
	uuid_hex(dev->uuid, u);
	snprintf(want, sizeof(want), "uuid=%s\n", u);
	while (fgets(line, sizeof(line), f))
		hit = hit || strcmp(line, want) == 0;
	fclose(f);
	return hit;
}

int ft_cache_open(const struct ft_cache_config *cc, struct ft_cache **out)
{
	struct ft_cache *c = calloc(1, sizeof(*c));
	char msg[1024];
	int rc;

	*out = NULL;
	if (!c)
		return -ENOMEM;
	rc = ft_cachedev_open(cc->path, cc->size, cc->log_bytes, cc->log_percent, cc->reformat,
			      &c->dev, msg, sizeof(msg));
	if (rc < 0) {
		ft_err("cache: %s", msg);
		free(c);
		return rc;
	}
	if (!c->dev->formatted_now && marked_untrusted(cc, c->dev)) {
		ft_warn("cache %s: the last run lost the ability to write to it while volumes went "
			"on without it (%s); discarding its contents",
			cc->path, cc->state_file);
		ft_cachedev_close(c->dev);
		rc = ft_cachedev_open(cc->path, cc->size, cc->log_bytes, cc->log_percent, true,
				      &c->dev, msg, sizeof(msg));
		if (rc < 0) {
			ft_err("cache: %s", msg);
			free(c);
			return rc;
		}
	}
	if (access(cc->state_file, F_OK) == 0) {
		/* Acted on, or about another device: either way it has served its purpose. */
		if (unlink(cc->state_file) < 0 || fsync_parent(cc->state_file) < 0)
			ft_warn("cache: cannot remove %s: %s", cc->state_file, strerror(errno));
	}
	if (c->dev->formatted_now)
		ft_info("cache %s: formatted, %llu blocks of 4 KiB", cc->path,
			(unsigned long long)c->dev->geo.nslots);
	else
		ft_info("cache: %s%s%s", msg,
			c->dev->flags & FT_CACHE_SB_CLEAN ? "" : " (last shutdown was not clean)",
			c->dev->repaired_copy ? "; one damaged superblock copy was repaired" : "");
	if (c->dev->upgraded_from)
		ft_info("cache %s: it held format version %u (read cache only); reformatted for "
			"version %u",
			cc->path, c->dev->upgraded_from, FT_CACHE_VERSION);
	pthread_mutex_init(&c->sb_lock, NULL);
	pthread_mutex_init(&c->seg_lock, NULL);
	c->nsegs = (uint32_t)(c->dev->geo.log_bytes / FT_WLOG_SEG_BYTES);
	c->seg_used = calloc(c->nsegs ? c->nsegs : 1, 1);
	c->seg_free = calloc(c->nsegs ? c->nsegs : 1, sizeof(*c->seg_free));
	if (!c->seg_used || !c->seg_free) {
		ft_cache_close(c);
		return -ENOMEM;
	}
	c->cfg = cc;
	*out = c;
	return 0;
}

int ft_cache_add_volume(struct ft_cache *c, const struct ft_volume_config *vc, uint64_t size,
			unsigned reactor, struct ft_cache_stats *stats, struct ft_backend **backend)
{
	struct ft_backend *inner = *backend;
	struct cache_vol *v;

	if (c->nvols >= FT_CACHE_MAX_VOLUMES) {
		ft_err("volume '%s': a cache serves at most %u volumes", vc->name,
		       FT_CACHE_MAX_VOLUMES);
		return -ENOSPC;
	}
	v = calloc(1, sizeof(*v));
	if (!v)
		return -ENOMEM;
	v->base.ops = &cache_backend_ops;
	v->base.size = inner->size;
	v->base.caps = inner->caps;
	v->base.min_block = inner->min_block;
	v->base.max_request = inner->max_request;
	v->inner = inner;
	v->cache = c;
	v->cfg = vc;
	v->policy = vc->policy;
	v->reactor = reactor;
	v->ident = ft_cache_volume_ident(vc->name, vc->backing, size);
	v->nblocks = size / FT_CACHE_BLOCK;
	v->stats = stats;
	if (v->policy.mode == FT_CACHE_WRITE_BACK && size % FT_CACHE_BLOCK) {
		ft_warn("volume '%s': write-back needs a size that is a multiple of 4 KiB (it is %llu "
			"bytes); using write-through",
			vc->name, (unsigned long long)size);
		v->policy.mode = FT_CACHE_WRITE_THROUGH;
	}
	v->wb.switch_to = v->policy.mode;
	if (v->policy.mode == FT_CACHE_WRITE_BACK) /* the log gives FLUSH and FUA their meaning */
		v->base.caps |=
			FT_BACKEND_CAN_FLUSH | FT_BACKEND_CAN_FUA | FT_BACKEND_FLUSH_COVERS_ALL;
	v->wb.on = v->policy.mode == FT_CACHE_WRITE_BACK;
	ft_seqdetect_init(&v->seq, v->policy.sequential_cutoff);
	c->vols[c->nvols++] = v;
	*backend = &v->base;
	return 0;
}

/* Ids: volumes the device already knows keep theirs; new ones take the smallest free. */
static void assign_ids(struct ft_cache *c, bool *kept)
{
	struct ft_cachedev *dev = c->dev;
	bool used[FT_CACHE_MAX_VOLUMES + 1] = { false };
	struct ft_cache_volent table[FT_CACHE_MAX_VOLUMES];
	uint32_t n = 0;

	for (size_t i = 0; i < c->nvols; i++) {
		struct cache_vol *v = c->vols[i];

		kept[i] = false;
		for (uint32_t j = 0; j < dev->nvolumes; j++) {
			uint16_t id = dev->volumes[j].id;

			if (dev->volumes[j].ident == v->ident && id <= FT_CACHE_MAX_VOLUMES &&
			    !used[id]) {
				v->id = id;
				v->wb.epoch = dev->volumes[j].epoch;
				used[id] = true;
				kept[i] = true;
				break;
			}
		}
	}
	for (size_t i = 0; i < c->nvols; i++) {
		struct cache_vol *v = c->vols[i];

		if (!kept[i]) {
			uint16_t id = 1;

			while (used[id])
				id++;
			v->id = id;
			v->wb.epoch = dev->epoch_next++; /* no old record of the id can match it */
			used[id] = true;
			ft_info("volume '%s': new to the cache (id %u)", v->cfg->name, id);
		}
		table[n++] = (struct ft_cache_volent){ v->ident, v->id, v->wb.epoch };
		c->by_id[v->id] = v;
	}
	for (uint32_t j = 0; j < dev->nvolumes; j++) {
		bool still = false;

		for (uint32_t k = 0; k < n; k++)
			still = still || table[k].id == dev->volumes[j].id;
		if (!still)
			ft_info("cache: dropping the cached data of a volume that is gone or changed "
				"(id %u)",
				dev->volumes[j].id);
	}
	memcpy(dev->volumes, table, n * sizeof(table[0]));
	dev->nvolumes = n;
}

static int part_create(struct ft_cache *c, unsigned index, uint64_t first, uint32_t nslots,
		       struct cache_part **out)
{
	struct cache_part *p = calloc(1, sizeof(*p));
	int rc;

	*out = p;
	if (!p)
		return -ENOMEM;
	p->cache = c;
	p->index = index;
	p->first_slot = first;
	p->nslots = nslots;
	p->crc = calloc(nslots, sizeof(*p->crc));
	p->state = calloc(nslots, sizeof(*p->state));
	p->vols = calloc(c->nvols, sizeof(*p->vols));
	if (!p->crc || !p->state || !p->vols)
		return -ENOMEM;
	rc = ft_cachedir_create(nslots, &p->dir);
	if (rc < 0)
		return rc;
	rc = part_meta_init(p);
	if (rc < 0)
		return rc;
	rc = ft_backend_file_open(c->cfg->path, false, &p->dev);
	if (rc < 0)
		return rc;
	return ft_powercut_wrap(&p->dev);
}

static void part_destroy(struct cache_part *p)
{
	if (!p)
		return;
	if (p->dev)
		p->dev->ops->close(p->dev);
	ft_cachedir_destroy(p->dir);
	part_meta_free(p);
	free(p->crc);
	free(p->state);
	free(p->vols);
	free(p);
}

/* Split the slots between reactors in proportion to the cached volumes each owns. */
static int partition(struct ft_cache *c, unsigned n_reactors)
{
	uint64_t total = c->dev->geo.nslots, pages = total / RECS_PER_PAGE, first = 0;
	unsigned *count = calloc(n_reactors, sizeof(*count));
	unsigned last = 0;
	int rc = 0;

	c->parts = calloc(n_reactors, sizeof(*c->parts));
	c->nparts = n_reactors;
	if (!count || !c->parts) {
		free(count);
		return -ENOMEM;
	}
	for (size_t i = 0; i < c->nvols; i++)
		count[c->vols[i]->reactor % n_reactors]++;
	for (unsigned r = 0; r < n_reactors; r++)
		if (count[r])
			last = r;
	for (unsigned r = 0; r < n_reactors && rc == 0; r++) {
		uint64_t n;

		if (!count[r])
			continue;
		/* Whole record pages, so no page is ever written by two reactors. */
		n = r == last ? total - first : pages * count[r] / c->nvols * RECS_PER_PAGE;
		if (n == 0) {
			ft_warn("cache: too small to give reactor %u's volumes any space", r);
			continue;
		}
		rc = part_create(c, r, first, (uint32_t)n, &c->parts[r]);
		first += n;
	}
	free(count);
	if (rc < 0)
		return rc;
	for (size_t i = 0; i < c->nvols; i++) {
		struct cache_vol *v = c->vols[i];
		struct cache_part *p = c->parts[v->reactor % n_reactors];
		uint64_t q = v->policy.quota_bytes ? v->policy.quota_bytes / FT_CACHE_BLOCK
						   : total * v->policy.quota_percent / 100;

		if (!p) {
			v->passthrough = true;
			ft_stat_add(&v->stats->passthrough, 1);
			continue;
		}
		v->part = p;
		p->vols[p->nvols++] = v;
		v->quota = (uint32_t)(q < p->nslots ? q : p->nslots);
		if (v->quota == 0)
			v->quota = 1;
		ft_stat_add(&v->stats->quota_blocks, v->quota);
	}
	return 0;
}

/* Can the record of device slot @g, naming @key, be reattached? */
static struct cache_vol *restorable(struct ft_cache *c, uint64_t g, ft_cache_key key)
{
	uint16_t id = FT_CACHE_KEY_VOLUME(key);
	struct cache_vol *v = id <= FT_CACHE_MAX_VOLUMES ? c->by_id[id] : NULL;
	struct cache_part *p;

	if (!v || v->passthrough)
		return NULL;
	p = v->part;
	if (g < p->first_slot || g - p->first_slot >= p->nslots ||
	    FT_CACHE_KEY_BLOCK(key) >= v->nblocks || v->used >= v->quota ||
	    ft_cachedir_find(p->dir, key) != FT_CACHEDIR_NONE)
		return NULL;
	/* The log holds newer data of the block: its clean record is stale (W4). */
	if (v->wb.map.t && (wb_map_find(&v->wb.map, FT_CACHE_KEY_BLOCK(key)) ||
			    wb_range_of(v, FT_CACHE_KEY_BLOCK(key))))
		return NULL;
	return v;
}

/*
 * Read every mapping record; reattach the valid ones that still belong
 * where they are, and clear every other non-empty one on the device (and
 * flush) before anything is served, so that no record of an id about to be
 * reused, or of a slot now owned by another reactor, can surface later.
 */
static int restore(struct ft_cache *c, const bool *kept_by_index)
{
	struct ft_cachedev *dev = c->dev;
	bool kept_id[FT_CACHE_MAX_VOLUMES + 1] = { false };
	uint64_t restored = 0, cleared = 0;
	struct ft_cache_rec *buf;
	bool dirty_any = false;
	int rc = 0;

	for (size_t i = 0; i < c->nvols; i++)
		kept_id[c->vols[i]->id] = kept_by_index[i];
	if (posix_memalign((void **)&buf, FT_CACHE_BLOCK, SCAN_CHUNK) != 0)
		return -ENOMEM;
	for (uint64_t off = 0; off < dev->geo.meta_bytes && rc == 0; off += SCAN_CHUNK) {
		uint64_t len = dev->geo.meta_bytes - off < SCAN_CHUNK ? dev->geo.meta_bytes - off
								      : SCAN_CHUNK;
		uint64_t first = off / FT_CACHE_META_BYTES;
		bool dirty = false;
		ssize_t got = pread(dev->fd, buf, len, (off_t)(dev->geo.meta_offset + off));

		if (got != (ssize_t)len) {
			rc = got < 0 ? -errno : -EIO;
			break;
		}
		for (uint64_t i = 0; i < len / FT_CACHE_META_BYTES; i++) {
			uint64_t g = first + i, key;
			uint32_t crc;
			enum ft_cache_rec_state st;
			struct cache_vol *v = NULL;

			if (g >= dev->geo.nslots)
				break;
			st = ft_cache_rec_decode(&buf[i], dev->uuid, g, &key, &crc);
			if (st == FT_REC_EMPTY)
				continue;
			if (st == FT_REC_VALID && kept_id[FT_CACHE_KEY_VOLUME(key)])
				v = restorable(c, g, key);
			if (v) {
				struct cache_part *p = v->part;
				uint32_t s = (uint32_t)(g - p->first_slot);

				ft_cachedir_restore(p->dir, s, key);
				p->crc[s] = crc;
				p->state[s] = SLOT_VALID;
				v->used++;
				ft_stat_add(&v->stats->occupancy_blocks, 1);
				restored++;
				continue;
			}
			ft_cache_rec_clear(&buf[i]);
			dirty = true;
			cleared++;
		}
		if (dirty) {
			got = pwrite(dev->fd, buf, len, (off_t)(dev->geo.meta_offset + off));
			if (got != (ssize_t)len)
				rc = got < 0 ? -errno : -EIO;
			dirty_any = true;
		}
	}
	free(buf);
	if (rc == 0 && dirty_any && fdatasync(dev->fd) < 0)
		rc = -errno;
	if (rc < 0)
		return rc;
	for (unsigned r = 0; r < c->nparts; r++)
		if (c->parts[r])
			ft_cachedir_restore_done(c->parts[r]->dir);
	if (restored || cleared)
		ft_info("cache: reattached %llu cached blocks, cleared %llu stale records",
			(unsigned long long)restored, (unsigned long long)cleared);
	return 0;
}

/* Dirty limits and watermarks, in bytes of log. */
static void wb_limits(struct ft_cache *c)
{
	uint64_t log = c->dev->geo.log_bytes;
	unsigned n = 0;

	for (size_t i = 0; i < c->nvols; i++)
		n += c->vols[i]->wb.on;
	for (size_t i = 0; i < c->nvols; i++) {
		struct cache_vol *v = c->vols[i];
		struct wb_vol *w = &v->wb;
		const struct ft_volume_policy *pol = &v->policy;
		uint64_t lim = pol->dirty_limit_bytes	  ? pol->dirty_limit_bytes
			       : pol->dirty_limit_percent ? log / 100 * pol->dirty_limit_percent
							  : log / (n ? n : 1);

		if (!w->on)
			continue;
		lim = lim / FT_WLOG_SEG_BYTES * FT_WLOG_SEG_BYTES;
		if (lim > log)
			lim = log;
		if (lim < FT_WLOG_MIN_LIMIT)
			lim = FT_WLOG_MIN_LIMIT;
		if (log < FT_WLOG_MIN_LIMIT)
			ft_warn("volume '%s': the write-back log is only %llu MiB; writes will wait "
				"for the destager often",
				v->cfg->name, (unsigned long long)(log >> 20));
		w->limit = lim;
		w->high = lim / 100 * pol->dirty_high_percent;
		w->low = lim / 100 * pol->dirty_low_percent;
		ft_stat_add(&v->stats->log_limit_bytes, lim);
		ft_stat_add(&v->stats->write_back, 1);
	}
}

/* Replay the write-back log; volumes without dirty data start a fresh stream. */
static int wb_setup(struct ft_cache *c, const struct ft_cache_volent *old, uint32_t nold)
{
	int rc;

	for (size_t i = 0; i < c->nvols; i++) {
		rc = wb_vol_init(c->vols[i], c->nsegs);
		if (rc < 0)
			return rc;
	}
	rc = wb_recover(c, old, nold);
	if (rc < 0)
		return rc;
	for (size_t i = 0; i < c->nvols; i++) {
		struct cache_vol *v = c->vols[i];
		struct wb_vol *w = &v->wb;

		if (w->dirty_blocks || w->ranges)
			continue;
		/* Nothing to replay: void whatever the stream held (W5 holds trivially). */
		for (uint64_t s = w->tail; s <= w->head && w->head >= w->tail; s++)
			if (wb_seg_of(v, s)->index != UINT32_MAX)
				c->seg_used[wb_seg_of(v, s)->index] = 0;
		w->tail = 1;
		w->head = 0;
		w->resume = false;
		for (uint32_t j = 0; j < c->dev->nvolumes; j++)
			if (c->dev->volumes[j].id == v->id)
				w->epoch = c->dev->volumes[j].epoch = c->dev->epoch_next++;
		if (w->switch_to != FT_CACHE_WRITE_BACK)
			w->on = false;
	}
	c->nfree = 0;
	for (uint32_t i = c->nsegs; i-- > 0;)
		if (!c->seg_used[i])
			c->seg_free[c->nfree++] = i;
	for (size_t i = 0; i < c->nvols; i++) {
		struct cache_vol *v = c->vols[i];

		if (v->wb.on && v->wb.head >= v->wb.tail)
			ft_stat_add(&v->stats->log_used_bytes, wb_log_used(v));
		if (v->wb.on && v->wb.switch_to != FT_CACHE_WRITE_BACK)
			ft_info("volume '%s': configured %s, but %llu bytes of write-back data are "
				"still dirty; writing them back first",
				v->cfg->name, ft_cache_mode_name(v->wb.switch_to),
				(unsigned long long)v->wb.dirty_blocks * FT_CACHE_BLOCK);
	}
	wb_limits(c);
	return 0;
}

int ft_cache_start(struct ft_cache *c, unsigned n_reactors)
{
	bool kept[FT_CACHE_MAX_VOLUMES];
	struct ft_cache_volent old[FT_CACHE_MAX_VOLUMES];
	uint32_t nold = c->dev->nvolumes;
	int rc;

	memcpy(old, c->dev->volumes, nold * sizeof(old[0]));
	c->t0_ns = ft_now_ns();
	assign_ids(c, kept);
	rc = partition(c, n_reactors);
	if (rc < 0) {
		ft_err("cache %s: cannot set up: %s", c->cfg->path, strerror(-rc));
		return rc;
	}
	rc = wb_setup(c, old, nold);
	if (rc < 0) {
		if (rc == -ENOMEM)
			ft_err("cache %s: out of memory", c->cfg->path);
		return rc;
	}
	rc = restore(c, kept);
	if (rc < 0) {
		ft_err("cache %s: cannot read the mapping records: %s (set \"reformat\": true to "
		       "start a new cache)",
		       c->cfg->path, strerror(-rc));
		return rc;
	}
	/* In use from now on: a crash leaves the flag clear. */
	rc = ft_cachedev_write_sb(c->dev, c->dev->flags & ~FT_CACHE_SB_CLEAN);
	if (rc < 0) {
		ft_err("cache %s: cannot write the superblock: %s", c->cfg->path, strerror(-rc));
		return rc;
	}
	c->memory = 0;
	for (unsigned r = 0; r < c->nparts; r++) {
		struct cache_part *p = c->parts[r];

		if (!p)
			continue;
		c->memory += ft_cachedir_memory(p->dir) +
			     (size_t)p->nslots * (sizeof(*p->crc) + sizeof(*p->state)) +
			     p->npages * (sizeof(*p->page_dirty) + sizeof(*p->dirty_list)) +
			     2 * BLOOM_BITS / 8 + sizeof(*p);
	}
	c->started = true;
	ft_info("cache %s: %llu blocks, %.1f bytes of RAM per block", c->cfg->path,
		(unsigned long long)c->dev->geo.nslots,
		c->dev->geo.nslots ? (double)c->memory / (double)c->dev->geo.nslots : 0.0);
	return 0;
}

static void drain_fn(struct ft_reactor *r, struct ft_msg *m)
{
	struct cache_part *p =
		(struct cache_part *)((char *)m - offsetof(struct cache_part, drain_msg));

	(void)r;
	__atomic_store_n(&p->drain_posted, 0, __ATOMIC_RELEASE);
	for (size_t i = 0; i < p->nvols; i++)
		wb_drain(p->vols[i]);
}

void ft_cache_drain(struct ft_cache *c, struct ft_reactor **reactors)
{
	for (unsigned r = 0; r < c->nparts; r++) {
		struct cache_part *p = c->parts[r];

		if (!p || __atomic_exchange_n(&p->drain_posted, 1, __ATOMIC_ACQ_REL))
			continue;
		p->drain_msg.fn = drain_fn;
		ft_reactor_post(reactors[r], &p->drain_msg);
	}
}

void ft_cache_global_stats(const struct ft_cache *c, struct ft_cache_global_stats *out)
{
	out->slots = c->dev->geo.nslots;
	out->memory_bytes = c->memory;
	out->log_bytes = c->dev->geo.log_bytes;
}

/* Write every dirty record page (blocking; reactors are stopped). */
static int persist_records(struct ft_cache *c)
{
	void *buf;
	int rc = 0;

	if (posix_memalign(&buf, FT_CACHE_BLOCK, FT_CACHE_BLOCK) != 0)
		return -ENOMEM;
	for (unsigned r = 0; r < c->nparts && rc == 0; r++) {
		struct cache_part *p = c->parts[r];

		if (!p || p->failed)
			continue;
		for (uint32_t i = 0; i < p->ndirty && rc == 0; i++) {
			uint32_t page = p->dirty_list[i];
			off_t off =
				(off_t)(c->dev->geo.meta_offset +
					(p->first_slot / RECS_PER_PAGE + page) * FT_CACHE_BLOCK);

			part_encode_page(p, page, buf);
			if (pwrite(c->dev->fd, buf, FT_CACHE_BLOCK, off) != FT_CACHE_BLOCK)
				rc = -EIO;
			p->page_dirty[page] = 0;
		}
		p->ndirty = 0;
	}
	free(buf);
	if (rc == 0 && fdatasync(c->dev->fd) < 0)
		rc = -errno;
	return rc;
}

void ft_cache_close(struct ft_cache *c)
{
	int rc;

	if (!c)
		return;
	/* A start that failed (refused dirty data, a damaged log) leaves the device as it was. */
	if (c->parts && c->started) {
		rc = persist_records(c);
		if (rc == 0)
			rc = ft_cachedev_write_sb(c->dev, c->dev->flags | FT_CACHE_SB_CLEAN);
		if (rc < 0)
			ft_warn("cache %s: could not record a clean shutdown: %s", c->cfg->path,
				strerror(-rc));
	}
	if (c->parts) {
		for (unsigned r = 0; r < c->nparts; r++)
			part_destroy(c->parts[r]);
		free(c->parts);
	}
	for (size_t i = 0; i < c->nvols; i++) {
		wb_vol_free(c->vols[i]);
		free(c->vols[i]);
	}
	pthread_mutex_destroy(&c->sb_lock);
	pthread_mutex_destroy(&c->seg_lock);
	free(c->seg_used);
	free(c->seg_free);
	ft_cachedev_close(c->dev);
	free(c);
}
