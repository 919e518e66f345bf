/* SPDX-License-Identifier: MIT */
/* Cache device superblock: layout, encoding, validation, open and format. */
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "flashtier/cachedev.h"
#include "flashtier/crc32c.h"
#include "flashtier/wlog.h"

static uint64_t round_up(uint64_t v, uint64_t a)
{
	return (v + a - 1) / a * a;
}

/* Where data starts when @n slots need metadata records. */
static uint64_t data_offset_for(uint64_t n)
{
	uint64_t meta = round_up(n * FT_CACHE_META_BYTES, FT_CACHE_BLOCK);

	return round_up(2 * FT_CACHE_SB_BYTES + meta, FT_CACHE_DATA_ALIGN);
}

uint64_t ft_cache_default_log_bytes(uint64_t device_bytes)
{
	return device_bytes / 4 / FT_WLOG_SEG_BYTES * FT_WLOG_SEG_BYTES;
}

int ft_cache_geometry(uint64_t device_bytes, uint64_t log_bytes, struct ft_cache_geometry *g)
{
	uint64_t lo = 0, hi, log_offset;

	if (device_bytes < FT_CACHE_MIN_BYTES)
		return -ENOSPC;
	log_bytes = log_bytes / FT_WLOG_SEG_BYTES * FT_WLOG_SEG_BYTES;
	log_offset = device_bytes / FT_CACHE_DATA_ALIGN * FT_CACHE_DATA_ALIGN;
	if (log_bytes > log_offset)
		return -ENOSPC;
	log_offset -= log_bytes;
	/* The most slots whose data and metadata fit: the space used grows with n. */
	hi = log_offset / FT_CACHE_BLOCK;
	while (lo < hi) {
		uint64_t mid = lo + (hi - lo + 1) / 2;

		if (data_offset_for(mid) + mid * FT_CACHE_BLOCK <= log_offset)
			lo = mid;
		else
			hi = mid - 1;
	}
	memset(g, 0, sizeof(*g));
	g->device_bytes = device_bytes;
	g->meta_offset = 2 * FT_CACHE_SB_BYTES;
	g->meta_bytes = round_up(lo * FT_CACHE_META_BYTES, FT_CACHE_BLOCK);
	g->data_offset = data_offset_for(lo);
	g->nslots = lo;
	g->log_offset = log_offset;
	g->log_bytes = log_bytes;
	return lo >= 16 ? 0 : -ENOSPC;
}

void ft_cache_sb_encode(struct ft_cache_sb *sb, const struct ft_cache_geometry *g,
			const uint8_t uuid[16], uint64_t seq, uint32_t flags)
{
	memset(sb, 0, sizeof(*sb));
	memcpy(sb->magic, FT_CACHE_MAGIC, sizeof(sb->magic));
	sb->version = htole32(FT_CACHE_VERSION);
	sb->sb_bytes = htole32(FT_CACHE_SB_BYTES);
	memcpy(sb->uuid, uuid, 16);
	sb->seq = htole64(seq);
	sb->device_bytes = htole64(g->device_bytes);
	sb->block_bytes = htole32(FT_CACHE_BLOCK);
	sb->meta_record_bytes = htole32(FT_CACHE_META_BYTES);
	sb->meta_offset = htole64(g->meta_offset);
	sb->meta_bytes = htole64(g->meta_bytes);
	sb->data_offset = htole64(g->data_offset);
	sb->nslots = htole64(g->nslots);
	sb->flags = htole32(flags);
	sb->log_offset = htole64(g->log_offset);
	sb->log_bytes = htole64(g->log_bytes);
	sb->crc = htole32(ft_crc32c(0, sb, offsetof(struct ft_cache_sb, crc)));
}

uint64_t ft_cache_volume_ident(const char *name, const char *backing, uint64_t size)
{
	uint64_t size_le = htole64(size);
	uint32_t a = ft_crc32c(0, name, strlen(name) + 1);
	uint32_t b = ft_crc32c(0x9e3779b9u, backing, strlen(backing) + 1);
	uint64_t h;

	a = ft_crc32c(a, &size_le, sizeof(size_le));
	b = ft_crc32c(b, name, strlen(name) + 1);
	b = ft_crc32c(b, &size_le, sizeof(size_le));
	h = ((uint64_t)a << 32) | b;
	return h ? h : 1;
}

static bool all_zero(const void *p, size_t n)
{
	const unsigned char *c = p;

	for (size_t i = 0; i < n; i++)
		if (c[i])
			return false;
	return true;
}

enum ft_cache_sb_state ft_cache_sb_decode(const struct ft_cache_sb *sb, struct ft_cache_geometry *g,
					  uint8_t uuid[16], uint64_t *seq, uint32_t *flags)
{
	struct ft_cache_geometry want, got;

	if (memcmp(sb->magic, FT_CACHE_MAGIC, sizeof(sb->magic)) != 0)
		return all_zero(sb, sizeof(*sb)) ? FT_SB_BLANK : FT_SB_FOREIGN;
	/* The version is read before the CRC: a newer layout may checksum differently. */
	if (le32toh(sb->version) > FT_CACHE_VERSION)
		return FT_SB_NEWER;
	if (le32toh(sb->version) < FT_CACHE_VERSION)
		return FT_SB_OLDER;
	if (le32toh(sb->crc) != ft_crc32c(0, sb, offsetof(struct ft_cache_sb, crc)))
		return FT_SB_CORRUPT;
	if (le32toh(sb->version) != FT_CACHE_VERSION ||
	    le32toh(sb->sb_bytes) != FT_CACHE_SB_BYTES ||
	    le32toh(sb->block_bytes) != FT_CACHE_BLOCK ||
	    le32toh(sb->meta_record_bytes) != FT_CACHE_META_BYTES ||
	    le32toh(sb->nvolumes) > FT_CACHE_MAX_VOLUMES)
		return FT_SB_CORRUPT;
	for (uint32_t i = 0; i < le32toh(sb->nvolumes); i++)
		if (le16toh(sb->volumes[i].id) == 0)
			return FT_SB_CORRUPT;
	got.device_bytes = le64toh(sb->device_bytes);
	got.meta_offset = le64toh(sb->meta_offset);
	got.meta_bytes = le64toh(sb->meta_bytes);
	got.data_offset = le64toh(sb->data_offset);
	got.nslots = le64toh(sb->nslots);
	got.log_offset = le64toh(sb->log_offset);
	got.log_bytes = le64toh(sb->log_bytes);
	/* Geometry is a function of the sizes: anything else was not written by us. */
	if (ft_cache_geometry(got.device_bytes, got.log_bytes, &want) < 0 ||
	    memcmp(&want, &got, sizeof(got)) != 0)
		return FT_SB_CORRUPT;
	if (g)
		*g = got;
	if (uuid)
		memcpy(uuid, sb->uuid, 16);
	if (seq)
		*seq = le64toh(sb->seq);
	if (flags)
		*flags = le32toh(sb->flags);
	return FT_SB_VALID;
}

static int pwrite_all(int fd, const void *buf, size_t len, off_t off)
{
	while (len) {
		ssize_t n = pwrite(fd, buf, len, off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		buf = (const char *)buf + n;
		len -= (size_t)n;
		off += n;
	}
	return 0;
}

static int pread_all(int fd, void *buf, size_t len, off_t off)
{
	while (len) {
		ssize_t n = pread(fd, buf, len, off);

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0) { /* short device or file: what is missing reads as zeroes */
			memset(buf, 0, len);
			return 0;
		}
		buf = (char *)buf + n;
		len -= (size_t)n;
		off += n;
	}
	return 0;
}

/* Copy A, flush, copy B, flush: a crash leaves at least one valid copy. */
int ft_cachedev_write_sb(struct ft_cachedev *dev, uint32_t flags)
{
	struct ft_cache_sb *sb;
	int rc;

	if (posix_memalign((void **)&sb, 4096, sizeof(*sb)) != 0)
		return -ENOMEM;
	ft_cache_sb_encode(sb, &dev->geo, dev->uuid, dev->seq + 1, flags);
	sb->nvolumes = htole32(dev->nvolumes);
	sb->epoch_next = htole32(dev->epoch_next);
	for (uint32_t i = 0; i < dev->nvolumes; i++) {
		sb->volumes[i].ident = htole64(dev->volumes[i].ident);
		sb->volumes[i].id = htole16(dev->volumes[i].id);
		sb->volumes[i].epoch = htole32(dev->volumes[i].epoch);
	}
	sb->crc = htole32(ft_crc32c(0, sb, offsetof(struct ft_cache_sb, crc)));
	for (int copy = 0; copy < 2; copy++) {
		rc = pwrite_all(dev->fd, sb, sizeof(*sb), (off_t)copy * FT_CACHE_SB_BYTES);
		if (rc == 0 && fdatasync(dev->fd) < 0)
			rc = -errno;
		if (rc < 0)
			break;
	}
	free(sb);
	if (rc == 0) {
		dev->seq++;
		dev->flags = flags;
	}
	return rc;
}

/* The device's size now, and the size a cache formatted on it now would have. */
static int device_size(int fd, uint64_t want, uint64_t *now, uint64_t *fmt)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return -errno;
	if (S_ISBLK(st.st_mode)) {
		if (ioctl(fd, BLKGETSIZE64, now) < 0)
			return -errno;
		*fmt = *now;
		return 0;
	}
	if (!S_ISREG(st.st_mode))
		return -EINVAL;
	*now = (uint64_t)st.st_size;
	*fmt = want ? want : *now;
	return 0;
}

/* Size a regular file for formatting; only ever called right before format(). */
static int grow_for_format(int fd, uint64_t now, uint64_t fmt)
{
	struct stat st;

	if (fstat(fd, &st) < 0)
		return -errno;
	if (S_ISREG(st.st_mode) && now != fmt && ftruncate(fd, (off_t)fmt) < 0)
		return -errno;
	return 0;
}

static int format(struct ft_cachedev *dev)
{
	int rc;

	if (getrandom(dev->uuid, sizeof(dev->uuid), 0) != sizeof(dev->uuid))
		return -EIO;
	dev->seq = 0;
	dev->nvolumes = 0;
	dev->epoch_next = 1;
	dev->formatted_now = true;
	/* Clear the metadata area: no stale mapping may survive a reformat. */
	for (uint64_t off = 0; off < dev->geo.meta_bytes; off += 1u << 20) {
		static const char zero[1u << 20];
		uint64_t n = dev->geo.meta_bytes - off < sizeof(zero) ? dev->geo.meta_bytes - off
								      : sizeof(zero);

		rc = pwrite_all(dev->fd, zero, n, (off_t)(dev->geo.meta_offset + off));
		if (rc < 0)
			return rc;
	}
	return ft_cachedev_write_sb(dev, 0);
}

static const char *uuid_str(const uint8_t u[16], char out[37])
{
	snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x",
		 u[0], u[1], u[2], u[3], u[4], u[5], u[6], u[7], u[8], u[9], u[10], u[11], u[12],
		 u[13], u[14], u[15]);
	return out;
}

int ft_cachedev_open(const char *path, uint64_t size, uint64_t log_bytes, uint32_t log_percent,
		     bool reformat, struct ft_cachedev **out, char *err, size_t err_len)
{
	struct ft_cachedev *dev = calloc(1, sizeof(*dev));
	struct ft_cache_sb *sb = NULL;
	enum ft_cache_sb_state st[2];
	struct ft_cache_geometry g[2];
	uint8_t uuid[2][16];
	uint64_t seq[2], bytes = 0, fmt_bytes = 0;
	uint32_t flags[2];
	char u[37];
	int rc, best;

	*out = NULL;
	if (!dev || posix_memalign((void **)&sb, 4096, 2 * sizeof(*sb)) != 0) {
		free(dev);
		snprintf(err, err_len, "%s: out of memory", path);
		return -ENOMEM;
	}
	dev->path = strdup(path);
	dev->fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
	if (!dev->path || dev->fd < 0) {
		rc = dev->path ? -errno : -ENOMEM;
		snprintf(err, err_len, "%s: cannot open: %s", path, strerror(-rc));
		goto fail;
	}
	rc = device_size(dev->fd, size, &bytes, &fmt_bytes);
	if (rc == 0) {
		if (!log_bytes)
			log_bytes = log_percent ? fmt_bytes / 100 * log_percent
						: ft_cache_default_log_bytes(fmt_bytes);
		rc = ft_cache_geometry(fmt_bytes, log_bytes, &dev->geo);
	}
	if (rc < 0) {
		snprintf(err, err_len, "%s: %s", path,
			 rc == -ENOSPC ? "too small for a cache with that write-back log (at least "
					 "2 MiB, and room for 16 blocks besides cache.log_size)"
				       : strerror(-rc));
		goto fail;
	}
	rc = pread_all(dev->fd, sb, 2 * sizeof(*sb), 0);
	if (rc < 0) {
		snprintf(err, err_len, "%s: cannot read the superblocks: %s", path, strerror(-rc));
		goto fail;
	}
	if (reformat) {
		rc = grow_for_format(dev->fd, bytes, fmt_bytes);
		if (rc == 0)
			rc = format(dev);
		if (rc < 0)
			snprintf(err, err_len, "%s: format failed: %s", path, strerror(-rc));
		goto done;
	}
	for (int i = 0; i < 2; i++)
		st[i] = ft_cache_sb_decode(&sb[i], &g[i], uuid[i], &seq[i], &flags[i]);

	best = -1;
	for (int i = 0; i < 2; i++)
		if (st[i] == FT_SB_VALID && (best < 0 || seq[i] > seq[best]))
			best = i;
	if (best >= 0) {
		if (g[best].device_bytes == bytes && fmt_bytes != bytes) {
			rc = -EINVAL;
			snprintf(
				err, err_len,
				"%s: the cache file is %llu bytes and the configuration asks for %llu; "
				"set reformat to start a new cache of that size (nothing was changed)",
				path, (unsigned long long)bytes, (unsigned long long)fmt_bytes);
			goto fail;
		}
		if (g[best].device_bytes != bytes) {
			rc = -EINVAL;
			snprintf(err, err_len,
				 "%s: the cache was formatted for %llu bytes, the device has %llu; "
				 "set reformat to start a new cache",
				 path, (unsigned long long)g[best].device_bytes,
				 (unsigned long long)bytes);
			goto fail;
		}
		dev->geo = g[best];
		memcpy(dev->uuid, uuid[best], 16);
		dev->seq = seq[best];
		dev->flags = flags[best];
		dev->nvolumes = le32toh(sb[best].nvolumes);
		dev->epoch_next = le32toh(sb[best].epoch_next);
		for (uint32_t i = 0; i < dev->nvolumes; i++) {
			dev->volumes[i].ident = le64toh(sb[best].volumes[i].ident);
			dev->volumes[i].id = le16toh(sb[best].volumes[i].id);
			dev->volumes[i].epoch = le32toh(sb[best].volumes[i].epoch);
		}
		if (st[!best] != FT_SB_VALID || seq[!best] != seq[best]) {
			/* Rewrite both so the damaged or stale copy matches again. */
			rc = ft_cachedev_write_sb(dev, dev->flags);
			if (rc < 0) {
				snprintf(err, err_len, "%s: cannot repair superblock: %s", path,
					 strerror(-rc));
				goto fail;
			}
			dev->repaired_copy = true;
		}
		snprintf(err, err_len, "%s: cache %s, %llu slots", path, uuid_str(dev->uuid, u),
			 (unsigned long long)dev->geo.nslots);
		rc = 0;
		goto done;
	}
	if (st[0] == FT_SB_OLDER || st[1] == FT_SB_OLDER) {
		/* An older format held clean copies only: nothing is lost by starting anew. */
		dev->upgraded_from = le32toh(sb[st[0] == FT_SB_OLDER ? 0 : 1].version);
		rc = grow_for_format(dev->fd, bytes, fmt_bytes);
		if (rc == 0)
			rc = format(dev);
		if (rc < 0)
			snprintf(err, err_len, "%s: format failed: %s", path, strerror(-rc));
		goto done;
	}
	if (st[0] == FT_SB_NEWER || st[1] == FT_SB_NEWER) {
		rc = -EPROTONOSUPPORT;
		snprintf(
			err, err_len,
			"%s: formatted by a newer flashtier (format version %u; this build knows %u); "
			"nothing was changed",
			path, le32toh(sb[st[0] == FT_SB_NEWER ? 0 : 1].version), FT_CACHE_VERSION);
		goto fail;
	}
	if (st[0] == FT_SB_CORRUPT || st[1] == FT_SB_CORRUPT) {
		rc = -EBADMSG;
		snprintf(err, err_len,
			 "%s: both flashtier superblocks are corrupt; set reformat to start a new "
			 "cache (its contents are lost)",
			 path);
		goto fail;
	}
	if (st[0] == FT_SB_BLANK && st[1] == FT_SB_BLANK) {
		rc = grow_for_format(dev->fd, bytes, fmt_bytes);
		if (rc == 0)
			rc = format(dev);
		if (rc < 0)
			snprintf(err, err_len, "%s: format failed: %s", path, strerror(-rc));
		goto done;
	}
	rc = -EEXIST;
	snprintf(err, err_len,
		 "%s: holds data that is not a flashtier cache; refusing to overwrite it "
		 "(set reformat to use it anyway)",
		 path);
	goto fail;
done:
	if (rc < 0)
		goto fail;
	free(sb);
	*out = dev;
	return 0;
fail:
	free(sb);
	ft_cachedev_close(dev);
	return rc;
}

void ft_cachedev_close(struct ft_cachedev *dev)
{
	if (!dev)
		return;
	if (dev->fd >= 0)
		close(dev->fd);
	free(dev->path);
	free(dev);
}

/* ---- mapping records ---- */

static uint32_t rec_crc(const uint8_t uuid[16], uint64_t slot, uint64_t key_le, uint32_t crc_le)
{
	uint64_t slot_le = htole64(slot);
	uint32_t c = ft_crc32c(0, uuid, 16);

	c = ft_crc32c(c, &slot_le, sizeof(slot_le));
	c = ft_crc32c(c, &key_le, sizeof(key_le));
	return ft_crc32c(c, &crc_le, sizeof(crc_le));
}

void ft_cache_rec_encode(struct ft_cache_rec *rec, const uint8_t uuid[16], uint64_t slot,
			 uint64_t key, uint32_t data_crc)
{
	rec->key = htole64(key);
	rec->data_crc = htole32(data_crc);
	rec->rec_crc = htole32(rec_crc(uuid, slot, rec->key, rec->data_crc));
}

void ft_cache_rec_clear(struct ft_cache_rec *rec)
{
	memset(rec, 0, sizeof(*rec));
}

enum ft_cache_rec_state ft_cache_rec_decode(const struct ft_cache_rec *rec, const uint8_t uuid[16],
					    uint64_t slot, uint64_t *key, uint32_t *data_crc)
{
	if (all_zero(rec, sizeof(*rec)))
		return FT_REC_EMPTY;
	if (le32toh(rec->rec_crc) != rec_crc(uuid, slot, rec->key, rec->data_crc) ||
	    (le64toh(rec->key) >> 48) == 0)
		return FT_REC_CORRUPT;
	*key = le64toh(rec->key);
	*data_crc = le32toh(rec->data_crc);
	return FT_REC_VALID;
}
