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
	fprintf(f, "# flashtier: do not trust this cache device's contents at the next start\n"
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
	rc = ft_cachedev_open(cc->path, cc->size, cc->reformat, &c->dev, msg, sizeof(msg));
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
		rc = ft_cachedev_open(cc->path, cc->size, true, &c->dev, msg, sizeof(msg));
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
	pthread_mutex_init(&c->sb_lock, NULL);
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
			used[id] = true;
			ft_info("volume '%s': new to the cache (id %u)", v->cfg->name, id);
		}
		table[n++] = (struct ft_cache_volent){ v->ident, v->id };
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
	return ft_backend_file_open(c->cfg->path, false, &p->dev);
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

int ft_cache_start(struct ft_cache *c, unsigned n_reactors)
{
	bool kept[FT_CACHE_MAX_VOLUMES];
	int rc;

	assign_ids(c, kept);
	rc = partition(c, n_reactors);
	if (rc < 0) {
		ft_err("cache %s: cannot set up: %s", c->cfg->path, strerror(-rc));
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
	ft_info("cache %s: %llu blocks, %.1f bytes of RAM per block", c->cfg->path,
		(unsigned long long)c->dev->geo.nslots,
		c->dev->geo.nslots ? (double)c->memory / (double)c->dev->geo.nslots : 0.0);
	return 0;
}

void ft_cache_global_stats(const struct ft_cache *c, struct ft_cache_global_stats *out)
{
	out->slots = c->dev->geo.nslots;
	out->memory_bytes = c->memory;
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
			off_t off = (off_t)(c->dev->geo.meta_offset +
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
	if (c->parts) {
		rc = persist_records(c);
		if (rc == 0)
			rc = ft_cachedev_write_sb(c->dev, c->dev->flags | FT_CACHE_SB_CLEAN);
		if (rc < 0)
			ft_warn("cache %s: could not record a clean shutdown: %s", c->cfg->path,
				strerror(-rc));
		for (unsigned r = 0; r < c->nparts; r++)
			part_destroy(c->parts[r]);
		free(c->parts);
	}
	for (size_t i = 0; i < c->nvols; i++)
		free(c->vols[i]);
	pthread_mutex_destroy(&c->sb_lock);
	ft_cachedev_close(c->dev);
	free(c);
}
