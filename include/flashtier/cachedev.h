/* SPDX-License-Identifier: MIT */
/*
 * The cache device's on-disk format: superblock and geometry.
 *
 *   offset 0        superblock copy A (4 KiB)
 *   offset 4 KiB    superblock copy B (4 KiB)
 *   meta_offset     per-slot mapping records (FT_CACHE_META_BYTES each)
 *   data_offset     slot 0, slot 1, ... (4 KiB each), 1 MiB aligned
 *   log_offset      the write-back log: log_bytes of 1 MiB segments, at the end
 *                   (see wlog.h)
 *
 * The superblock carries magic, version, uuid, geometry, a sequence number
 * and a CRC32C; both copies are written on every update (A, flush, B), so a
 * torn write damages at most one and the other, valid one is used (the
 * newest by sequence number when both are valid).
 *
 * Opening never overwrites anything that is not blank or ours unless asked:
 * a foreign or newer-format device, or one whose superblocks are both
 * corrupt, is refused with a message saying why and how to reformat.
 *
 * Threads: open/format/close run on the main thread at start-up (blocking
 * I/O); the geometry is immutable afterwards.
 */
#ifndef FLASHTIER_CACHEDEV_H
#define FLASHTIER_CACHEDEV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define FT_CACHE_MAGIC      "FTIERCD\x01"
/* 2: the write-back log region and per-volume epochs. A version 1 device
 * held only clean data and is reformatted on sight. */
#define FT_CACHE_VERSION    2u
#define FT_CACHE_BLOCK      4096u
#define FT_CACHE_SB_BYTES   4096u
#define FT_CACHE_META_BYTES 16u
#define FT_CACHE_DATA_ALIGN (1u << 20)
/* Smallest useful device: the superblocks, metadata and 16 data blocks. */
#define FT_CACHE_MIN_BYTES  (2u * FT_CACHE_DATA_ALIGN)

/*
 * The volume table: which volume id a (volume name, backing store, size)
 * has on this device. Ids are the top 16 bits of every mapping record's
 * key; a volume that leaves the table (removed from the config, its backing
 * store or size changed, or its cache dropped after device errors) takes
 * its records with it: they are cleared at the next start, before an id is
 * ever handed out again.
 */
#define FT_CACHE_MAX_VOLUMES 240

struct ft_cache_sb_volume {
	uint64_t ident; /* hash of name, backing and size (ft_cache_volume_ident) */
	uint16_t id;    /* >= 1 */
	uint32_t epoch; /* write-back log records of other epochs are void (wlog.h) */
	uint8_t reserved[2];
} __attribute__((packed));

/* Superblock as stored: little-endian fields, CRC32C over all bytes before crc. */
struct ft_cache_sb {
	char magic[8];
	uint32_t version;
	uint32_t sb_bytes;
	uint8_t uuid[16];
	uint64_t seq;
	uint64_t device_bytes;
	uint32_t block_bytes;
	uint32_t meta_record_bytes;
	uint64_t meta_offset;
	uint64_t meta_bytes;
	uint64_t data_offset;
	uint64_t nslots;
	uint32_t flags;
	uint32_t nvolumes;
	struct ft_cache_sb_volume volumes[FT_CACHE_MAX_VOLUMES];
	uint64_t log_offset;
	uint64_t log_bytes;
	uint32_t epoch_next; /* every epoch ever handed out is below it */
	uint8_t reserved[FT_CACHE_SB_BYTES - 120 - 16 * FT_CACHE_MAX_VOLUMES];
	uint32_t crc;
} __attribute__((packed));
_Static_assert(sizeof(struct ft_cache_sb) == FT_CACHE_SB_BYTES, "superblock is one 4 KiB block");

/* superblock flags */
#define FT_CACHE_SB_CLEAN (1u << 0) /* last shutdown was clean */

struct ft_cache_geometry {
	uint64_t device_bytes;
	uint64_t meta_offset, meta_bytes;
	uint64_t data_offset;
	uint64_t nslots;
	uint64_t log_offset, log_bytes; /* the write-back log (whole segments) */
};

/*
 * Lay out a device of @device_bytes with a write-back log of @log_bytes
 * (rounded down to whole 1 MiB segments). Returns 0, or -ENOSPC if it is
 * smaller than FT_CACHE_MIN_BYTES or the log leaves fewer than 16 slots.
 */
int ft_cache_geometry(uint64_t device_bytes, uint64_t log_bytes, struct ft_cache_geometry *g);

/* The log a device gets by default: a quarter of it, in whole segments. */
uint64_t ft_cache_default_log_bytes(uint64_t device_bytes);

/* A volume id's entry in RAM. */
struct ft_cache_volent {
	uint64_t ident;
	uint16_t id;
	uint32_t epoch;
};

/* Fill @sb (encoding little-endian fields and the CRC) with an empty volume table. */
void ft_cache_sb_encode(struct ft_cache_sb *sb, const struct ft_cache_geometry *g,
			const uint8_t uuid[16], uint64_t seq, uint32_t flags);

/* Identity of a volume's contents as far as the cache can tell (never 0). */
uint64_t ft_cache_volume_ident(const char *name, const char *backing, uint64_t size);

enum ft_cache_sb_state {
	FT_SB_VALID,   /* ours, this version, CRC good */
	FT_SB_BLANK,   /* all zeroes: never written */
	FT_SB_FOREIGN, /* not our magic, not blank */
	FT_SB_NEWER,   /* our magic, a version this build does not know */
	FT_SB_OLDER,   /* our magic, an older version (clean data only: reformat) */
	FT_SB_CORRUPT, /* our magic, bad CRC or impossible geometry */
};

/* Classify one copy; on FT_SB_VALID fill @g, @uuid, @seq and @flags (any may be NULL). */
enum ft_cache_sb_state ft_cache_sb_decode(const struct ft_cache_sb *sb, struct ft_cache_geometry *g,
					  uint8_t uuid[16], uint64_t *seq, uint32_t *flags);

struct ft_cachedev {
	int fd;
	char *path;
	struct ft_cache_geometry geo;
	uint8_t uuid[16];
	uint64_t seq;
	uint32_t flags;      /* as found at open */
	uint32_t nvolumes;   /* the volume table, written by ft_cachedev_write_sb() */
	uint32_t epoch_next;
	struct ft_cache_volent volumes[FT_CACHE_MAX_VOLUMES];
	bool formatted_now;  /* a new cache (nothing to reattach) */
	bool repaired_copy;  /* one superblock copy was bad and has been rewritten */
	uint32_t upgraded_from; /* an older format version found and reformatted, or 0 */
};

/*
 * Open (creating a regular file of @size bytes if missing; @size 0 = use
 * the existing file's or device's size), then attach to an existing cache
 * or format a blank device with a log of @log_bytes, or if 0 @log_percent
 * of the device, or if 0 the default. @reformat: overwrite whatever is
 * there. An existing cache keeps its log size.
 * Returns 0 and *@out, or a negative errno with a one-line reason in @err:
 * -EEXIST foreign data, -EPROTONOSUPPORT newer format, -EBADMSG both
 * superblocks corrupt, -ENOSPC too small, or the I/O error.
 */
int ft_cachedev_open(const char *path, uint64_t size, uint64_t log_bytes, uint32_t log_percent,
		     bool reformat, struct ft_cachedev **out, char *err, size_t err_len);

/*
 * Write both superblock copies with @flags, the volume table in @dev and
 * seq + 1 (A, fdatasync, B, fdatasync).
 */
int ft_cachedev_write_sb(struct ft_cachedev *dev, uint32_t flags);

void ft_cachedev_close(struct ft_cachedev *dev);

/*
 * Mapping records: one per slot, at meta_offset + slot * 16, saying which
 * block the slot holds and the CRC32C of its 4 KiB. A record's own CRC is
 * seeded with the device uuid and covers the slot number, so a record from
 * an earlier format, or one written to the wrong place, is never valid. An
 * all-zero record is an empty slot (volume ids start at 1, so no valid key
 * is 0).
 *
 * How the engine keeps records and data honest across a crash (the rules the
 * read cache follows):
 *  - fill: write the data, then the record; no flush. A lost or torn data
 *    write fails the data CRC on the next hit, which is then a miss.
 *  - a WRITE, TRIM or WRITE_ZEROES to a cached block: the block's record is
 *    overwritten with an empty one and made durable (group-committed: one
 *    device flush covers every invalidation waiting for it) BEFORE the
 *    request is sent to the backing store. So no crash can leave the
 *    backing store newer than a record that still vouches for old data.
 *    Write-through then writes the new data and record without a flush.
 *  - every hit checks the data CRC; a mismatch is a miss, counted.
 * After kill -9 or a power cut, a restart reads every record and rebuilds
 * the directory from the valid ones: the cache comes back warm.
 */
struct ft_cache_rec {
	uint64_t key;
	uint32_t data_crc;
	uint32_t rec_crc;
} __attribute__((packed));
_Static_assert(sizeof(struct ft_cache_rec) == FT_CACHE_META_BYTES, "mapping record size");

enum ft_cache_rec_state {
	FT_REC_VALID,
	FT_REC_EMPTY,
	FT_REC_CORRUPT,
};

void ft_cache_rec_encode(struct ft_cache_rec *rec, const uint8_t uuid[16], uint64_t slot,
			 uint64_t key, uint32_t data_crc);
void ft_cache_rec_clear(struct ft_cache_rec *rec);
enum ft_cache_rec_state ft_cache_rec_decode(const struct ft_cache_rec *rec, const uint8_t uuid[16],
					    uint64_t slot, uint64_t *key, uint32_t *data_crc);

#endif
