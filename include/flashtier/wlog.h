/* SPDX-License-Identifier: MIT */
/*
 * The write-back log's on-disk format.
 *
 * The log region of the cache device (ft_cache_geometry.log_offset,
 * log_bytes) is cut into segments of FT_WLOG_SEG_BYTES. Segments are handed
 * out from one pool; each write-back volume appends to its own stream of
 * segments, numbered 0, 1, 2, ... (seg_seq) in the order it opened them.
 *
 * A segment holds pages, back to back, starting at its first byte: a page
 * is one 4 KiB header block (struct ft_wlog_page) followed by one 4 KiB
 * data block per DATA record, in record order. A page never crosses a
 * segment's end; the unused tail of a segment is left as it was.
 *
 * Records:
 *   DATA   offset and length cover exactly one 4 KiB block of the volume;
 *          the block's new content is the page's next data block, and
 *          data_crc is the CRC32C of that block. (A write smaller than a
 *          block is merged with the block's current content first.)
 *   ZERO   [offset, offset + length) reads as zeroes from now on.
 *   TRIM   the same, destaged to the store as a TRIM.
 * seq numbers the volume's log records (every record, every page), so a
 * newer record for a block always has the larger seq.
 *
 * A page is valid if its magic, version, CRC (seeded with the device uuid,
 * so another device's or an older format's pages never pass) and every
 * DATA block's CRC check out. Pages of a stream are numbered consecutively
 * (page_seq); a page carries:
 *   durable_seq  the largest page_seq such that every page up to it was
 *                on stable storage (a device flush completed) before this
 *                page was written; recovery uses it to tell a torn tail
 *                (ignored) from a lost or corrupt page that a completed
 *                flush covered (fatal: reported, never skipped);
 *   tail_seg     the stream's oldest segment still holding anything not yet
 *                destaged when the page was written: older segments are free.
 *
 * epoch: a volume's records count only if their epoch equals the volume's
 * current epoch in the superblock's volume table. Bumping it (after a
 * drain, durably) voids every older record at once: that is how a volume
 * leaves write-back mode, or is removed, without a replay ever rewriting
 * the store behind newer data.
 */
#ifndef FLASHTIER_WLOG_H
#define FLASHTIER_WLOG_H

#include <stdint.h>

#include "flashtier/cachedev.h"

#define FT_WLOG_MAGIC	      "FTWLOG\x01\x00"
#define FT_WLOG_VERSION	      1u
#define FT_WLOG_SEG_BYTES     (1u << 20)
#define FT_WLOG_SEG_BLOCKS    (FT_WLOG_SEG_BYTES / FT_CACHE_BLOCK)
#define FT_WLOG_RECS_PER_PAGE 126u
/* Smallest log, and smallest per-volume dirty limit: four segments. */
#define FT_WLOG_MIN_LIMIT     (4ull * FT_WLOG_SEG_BYTES)

enum ft_wlog_rec_type {
	FT_WLOG_DATA = 1,
	FT_WLOG_ZERO = 2,
	FT_WLOG_TRIM = 3,
};

/* Little-endian on disk. */
struct ft_wlog_rec {
	uint64_t offset;   /* bytes into the volume */
	uint32_t length;   /* bytes */
	uint32_t data_crc; /* DATA: CRC32C of its data block; 0 otherwise */
	uint64_t seq;      /* the volume's record sequence number */
	uint16_t volume;   /* volume id (superblock volume table) */
	uint8_t type;      /* enum ft_wlog_rec_type */
	uint8_t reserved[5];
} __attribute__((packed));
_Static_assert(sizeof(struct ft_wlog_rec) == 32, "log record size");

struct ft_wlog_page {
	char magic[8];
	uint32_t version;
	uint16_t volume;
	uint16_t nrecs;
	uint32_t epoch;
	uint32_t ndata;	      /* data blocks after this header (DATA records) */
	uint64_t seg_seq;     /* the segment's number in the volume's stream */
	uint64_t page_seq;    /* consecutive within the stream */
	uint64_t durable_seq; /* see above */
	uint64_t tail_seg;    /* see above */
	uint32_t reserved;
	struct ft_wlog_rec recs[FT_WLOG_RECS_PER_PAGE];
	uint32_t crc; /* CRC32C, seeded with the device uuid, of every byte before it */
} __attribute__((packed));
_Static_assert(sizeof(struct ft_wlog_page) == FT_CACHE_BLOCK, "log page header is one block");

/* Fill in magic, version and the CRC of @pg (other fields already set, host order). */
void ft_wlog_page_seal(struct ft_wlog_page *pg, const uint8_t uuid[16]);

enum ft_wlog_page_state {
	FT_WLOG_PAGE_VALID,
	FT_WLOG_PAGE_BLANK,   /* not a log page (never written, or data) */
	FT_WLOG_PAGE_CORRUPT, /* our magic, but the CRC or a field is wrong */
};

/*
 * Check the header block @pg (converting it to host order in place when
 * valid). Data block CRCs are the caller's to check.
 */
enum ft_wlog_page_state ft_wlog_page_open(struct ft_wlog_page *pg, const uint8_t uuid[16]);

#endif
