/* SPDX-License-Identifier: MIT */
/*
 * Private to the cache engine: partitions, per-slot state, the record
 * writer, and the cached-volume wrapper.
 *
 * Per-slot state (besides the directory's 23.5 bytes): a CRC32C of the
 * block (4 bytes) and a state byte, 28.5 bytes per cached 4 KiB block.
 *
 * Slot states:
 *   FREE     not in the directory.
 *   FILLING  in the directory and pinned; its data is being written. Its
 *            mapping record is empty in RAM, so no record page written from
 *            now on can vouch for it. Not readable.
 *   STALE    a FILLING slot that a WRITE, TRIM or WRITE_ZEROES overlapped:
 *            the fill in flight may hold old data; when it ends, the slot
 *            is freed instead of becoming VALID. Not readable.
 *   PENDING  a write-through WRITE's new data, on the device while the
 *            WRITE is still on its way to the backing store. Readable (a read
 *            concurrent with a write may return the new data), pinned, its
 *            record still empty: it becomes VALID only once the store has
 *            acknowledged the write, so no record ever vouches for data the
 *            store may not have.
 *   VALID    readable; its record (key, crc) goes to disk with the next
 *            write of its record page.
 *
 * Keeping the device honest across a crash (the "stale record" rule): a
 * record on disk that names block B in slot S must never outlive the
 * moment a write to B reaches the backing store. Records change on disk
 * only through "rounds": snapshot every dirty record page from RAM, write
 * them, and, if anyone waits, flush the device. A write to B therefore
 * first makes sure no record naming B can still be on disk:
 *   - B VALID in the directory: remove it (its page turns dirty) and wait
 *     for the next flushed round;
 *   - B evicted or removed recently (its old record may not be overwritten
 *     on disk yet): a Bloom filter of such keys since the last flushed
 *     round says so, and the write waits the same way. A false positive
 *     only costs a wait.
 * One flushed round serves every write waiting for it (group commit).
 *
 * Fill races: a fill may only become VALID if no write to its block was in
 * flight at any moment between the fill's backing-store read being sent
 * and the fill completing. Writes sent after the fill started find it
 * FILLING (or PENDING) and mark it STALE; writes already in flight are
 * found in the volume's list of in-flight writes when the read miss starts
 * (then no fill). A write-through update is a fill whose data comes from
 * the write itself, started with the write (so reads during the write's
 * trip to the store are hits), allowed only if no other write to the same
 * blocks was in flight when it started, and dropped if one starts before
 * it completes: with two writes in flight the store's final order is
 * unknown, so the cache keeps neither.
 */
#ifndef FLASHTIER_CACHE_INTERNAL_H
#define FLASHTIER_CACHE_INTERNAL_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include "flashtier/admission.h"
#include "flashtier/backend.h"
#include "flashtier/cache.h"
#include "flashtier/cachedev.h"
#include "flashtier/cachedir.h"
#include "flashtier/policy.h"

enum slot_state {
	SLOT_FREE = 0,
	SLOT_FILLING,
	SLOT_STALE,
	SLOT_PENDING,
	SLOT_VALID,
};

#define RECS_PER_PAGE (FT_CACHE_BLOCK / FT_CACHE_META_BYTES)
#define BLOOM_BITS    (1u << 16)
#define MAX_FILL_BLOCKS 4096 /* fills in flight per partition (16 MiB of buffers) */

struct cache_part;

/* Something waiting for a flushed record round (a write about to reach the store). */
struct cache_waiter {
	struct cache_waiter *next;
	uint64_t need_round; /* the first round that covers it */
	void (*fn)(struct cache_waiter *w, int error);
};

/* One record page write of a round. */
struct meta_io {
	struct ft_bio bio;
	struct cache_part *part;
	uint32_t page;
	void *buf;
};

struct cache_vol;

struct cache_part {
	struct ft_cache *cache;
	unsigned index;
	struct ft_reactor *reactor;
	struct ft_backend *dev; /* this reactor's handle on the cache device */
	bool attached;
	uint64_t first_slot;    /* device slot of local slot 0 (a multiple of RECS_PER_PAGE) */
	uint32_t nslots;
	struct ft_cachedir *dir;
	uint32_t *crc;
	uint8_t *state;
	struct cache_vol **vols; /* volumes served here, by id lookup */
	size_t nvols;

	/* Record pages: dirty set as a bitmap plus a list. */
	uint32_t npages;
	uint8_t *page_dirty;
	uint32_t *dirty_list;
	uint32_t ndirty;

	/* Rounds. */
	uint64_t rounds_started, rounds_flushed;
	bool round_active;
	bool round_flushing;    /* the running round's page writes are done; its flush is out */
	uint32_t round_pending; /* page writes (and the flush) outstanding */
	int round_error;
	struct ft_bio flush_bio;
	struct cache_waiter *waiters, **waiters_tail;
	struct ft_deferred kick;

	/* Keys whose old record may still be on disk: since the running round started / before. */
	uint64_t *bloom_new, *bloom_old;
	bool bloom_new_any, bloom_old_any;

	uint32_t fills_inflight;
	uint32_t io_inflight; /* device I/O and rounds: holds the reactor */
	bool failed;          /* a record write failed: every volume here is pass-through */
};

/* A write (WRITE, TRIM, WRITE_ZEROES) in flight to a cached volume's store. */
struct cache_op;

struct cache_vol {
	struct ft_backend base; /* must be first: the volume sees this */
	struct ft_backend *inner;
	struct ft_cache *cache;
	struct cache_part *part;
	const struct ft_volume_config *cfg;
	struct ft_volume_policy policy;
	unsigned reactor;
	uint16_t id;
	uint64_t ident;
	uint64_t nblocks; /* whole 4 KiB blocks of the store (a partial tail is never cached) */
	uint32_t quota;   /* blocks */
	uint32_t used;    /* blocks in the directory (any state) */
	uint32_t clock_hand;
	struct ft_seqdetect seq;
	struct ft_cache_stats *stats;
	struct cache_op *writes; /* in flight, doubly linked */
	struct cache_op *queued; /* waiting for a write to the same blocks, oldest first */
	bool queue_running, queue_again;
	uint32_t device_errors;
	bool passthrough;
};

struct ft_cache {
	const struct ft_cache_config *cfg;
	struct ft_cachedev *dev;
	pthread_mutex_t sb_lock; /* superblock rewrites from a reactor (volume drop) */
	struct cache_vol *vols[FT_CACHE_MAX_VOLUMES];
	size_t nvols;
	struct cache_vol *by_id[FT_CACHE_MAX_VOLUMES + 1]; /* ids are 1..FT_CACHE_MAX_VOLUMES */
	struct cache_part **parts;
	unsigned nparts;
	uint64_t memory;
};

/* ---- meta.c: record pages, rounds, the stale-record filter ---- */

int part_meta_init(struct cache_part *p);
void part_meta_free(struct cache_part *p);
/* The record of local slot @slot changed in RAM: its page must be written. */
void part_mark_dirty(struct cache_part *p, uint32_t slot);
/* @key's record may still be on disk (it was evicted or invalidated). */
void part_note_unmapped(struct cache_part *p, ft_cache_key key);
/* Might a record for @key still be on disk without being in the directory? */
bool part_maybe_unmapped(const struct cache_part *p, ft_cache_key key);
/* Call @w->fn once a flushed round that started after now completes (or fails). */
void part_wait_round(struct cache_part *p, struct cache_waiter *w);
/* Encode the record page @page of @p from RAM into @buf. */
void part_encode_page(const struct cache_part *p, uint32_t page, void *buf);
/* Track device I/O in flight (holds the reactor so a stop waits for it). */
void part_io_get(struct cache_part *p);
void part_io_put(struct cache_part *p);

/* ---- cache.c ---- */

/*
 * The device cannot be written: note in the state file (durably) that its
 * records must not be trusted at the next start. Returns 0 or a negative errno.
 */
int cache_mark_untrusted(struct ft_cache *c, const char *why);

/* ---- engine.c ---- */

extern const struct ft_backend_ops cache_backend_ops;
/* Stop caching @v (device errors): drop its id from the device first. Reactor thread. */
void vol_go_passthrough(struct cache_vol *v, const char *why);
/* Every volume of @p goes pass-through (a record write failed). */
void part_fail(struct cache_part *p, const char *why);

#endif
