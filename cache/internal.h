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
#include "flashtier/wlog.h"

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
	struct ft_msg drain_msg;
	int drain_posted;     /* atomic: drain_msg is queued */
};

struct cache_vol;
struct cache_fill;
/* One device read of a run of consecutive slots on the hit path. */
struct hit_run {
	struct ft_bio bio;
	struct cache_op *op;
};

struct cache_op {
	struct ft_bio *parent;
	struct cache_vol *v;
	struct ft_bio child; /* to the backing store */
	struct cache_waiter wait;
	struct cache_op *wprev, *wnext; /* the volume's in-flight writes */
	struct cache_op *qnext;          /* the volume's queued writes */
	bool overlapped;                 /* another write to the same blocks was in flight */
	bool admit;
	uint32_t pending;
	int error;
	/* Hit path. */
	void *dst;    /* where block b0 lands: the caller's buffer or a bounce buffer */
	void *bounce;
	uint32_t nblocks;
	uint32_t *slots;
	uint32_t *crcs;
	struct hit_run *runs;
	/* Miss path: slots being filled, FT_CACHEDIR_NONE where none. */
	uint32_t nfills;
	uint32_t *fill_slots;
	/* Write-through: the fills carrying this write's data. */
	struct cache_fill **wt_fills;
	uint32_t nwt;
	/* Write-back: up to three pieces (partial head block, body, partial tail block). */
	struct wb_unit {
		uint8_t type;       /* FT_WLOG_DATA, _ZERO, _TRIM */
		uint64_t b0, b1;    /* blocks */
		const char *data;   /* DATA: block b0's new content, then b0 + 1's, ... */
	} units[3];
	uint32_t nunits, unit, unit_next; /* logging progress: unit, next block in it */
	uint32_t pages;                   /* page writes of this op in flight */
	void *rmw;                        /* merged partial blocks */
	uint32_t rmw_pending;
	struct cache_op *bnext;           /* the volume's batch */
	bool throttled;
};


/*
 * ---- write-back (writeback.c, destage.c, recovery.c) ----
 *
 * Each write-back volume appends its writes to its own stream of log
 * segments (format in wlog.h) and keeps, in RAM, a dirty map: for every
 * block not yet on the store, the newest record for it (its seq, and where
 * its data is in the log, or that it reads as zeroes).
 *
 * Invariants:
 *  W1 a WRITE is acknowledged only after its page write completed (FUA:
 *     and a device flush after that); FLUSH completes after a device flush
 *     that started after every acknowledged write's page completed;
 *  W2 the dirty map names the newest acknowledged data of every block it
 *     holds; a block not in it has its newest data in the store (or, clean,
 *     in the read cache); reads look in that order;
 *  W3 at most one destage of a block is in flight, and an entry leaves the
 *     map only when the store acknowledged the very record it holds (its
 *     seq is unchanged); a newer record stays dirty;
 *  W4 segments are given back oldest first, and only after (a) every
 *     record in them is destaged or superseded, (b) the store was flushed
 *     since, and (c) a flushed record round made the clean-cache
 *     invalidations durable since: so replaying a stream from any segment
 *     still on disk never brings back data older than what the store, or
 *     the read cache, holds;
 *  W6 a record is written back only once it is durable in the log and the
 *     clean-cache invalidation its write made is durable too: otherwise a
 *     power cut could leave the store newer than both the log (which lost
 *     the record) and a clean record still vouching for the old data;
 *  W5 a page is written with the volume's current epoch; an epoch is
 *     bumped (voiding every older record) only when the volume has no
 *     dirty data, after steps (b) and (c), and no page is written while
 *     that is under way.
 */
#define WB_LOC_ZERO UINT32_MAX
#define WB_LOC_TRIM (UINT32_MAX - 1)

struct wb_ent {
	uint64_t key;  /* block + 1; 0 = an empty slot */
	uint64_t seq;  /* its record's seq */
	uint32_t loc;  /* log block of its data (from the log's start), or WB_LOC_ZERO/TRIM */
	uint32_t ring; /* its segment's place in the stream ring */
	uint32_t t;    /* when it was logged, in WB_TICK_NS since start; 0 = replayed */
};

#define WB_TICK_NS (10ull * 1000 * 1000)

struct wb_map {
	struct wb_ent *t;
	uint32_t mask; /* table size - 1 (a power of two) */
	uint32_t n;
};

struct wb_seg {
	uint32_t index;     /* segment number in the log region */
	uint64_t seq;       /* seg_seq */
	uint32_t live;      /* dirty-map entries pointing here */
	uint32_t busy;      /* page writes and log reads in flight */
	uint32_t used;      /* blocks written: the next page starts here */
	uint64_t opened_ns;
	uint64_t *blocks;   /* blocks recorded here, in record order (the destage scan) */
	uint32_t nblocks, cap;
	uint32_t cursor;    /* destage scan position in blocks[] */
};

/* A large ZERO or TRIM not yet on the store (smaller ones are per-block entries). */
#define WB_RANGE_INLINE 256
struct wb_range {
	struct wb_range *next;
	uint64_t b0, b1, seq;
	uint32_t ring;
	uint8_t type;
	bool inflight;
};

struct wb_page_io;
struct destage_io;

struct wb_vol {
	bool on;              /* write-back in effect (configured, or old dirty data drains) */
	enum ft_cache_mode switch_to; /* mode once the old dirty data is drained */
	uint32_t epoch;
	/* The stream: segments tail..head (seg_seq), ring[seq % ring_cap]. */
	struct wb_seg *ring;
	uint32_t ring_cap;
	uint64_t tail, head;  /* no segment held when head < tail */
	bool resume;          /* the next page starts a stream after a recovery cut */
	uint64_t next_page_seq, next_rec_seq;
	uint64_t completed_seq; /* every page up to it has completed */
	uint64_t durable_seq, flush_snap;
	/*
	 * Records up to durable_rec are on stable storage together with the
	 * clean-cache invalidations their writes made: only those may be
	 * written back (W6). completed_rec: every page holding a record up to it
	 * has completed.
	 */
	uint64_t completed_rec, flush_snap_rec, durable_rec;
	bool durable_waiting, need_durable;
	struct cache_waiter durable_wait;
	uint64_t reclaim_upto;
	uint64_t cut_seq, cut_end; /* pages in [cut_seq, cut_end) failed or follow a failed one */
	uint64_t marked_durable;   /* durable_seq carried by the last page written */
	/*
	 * Segments given back wait here until a durable page claims the tail
	 * past them (W4: a replay never finds one of its own segments reused).
	 */
	uint32_t *limbo;
	uint32_t nlimbo;
	uint64_t limbo_page; /* the first page written after the tail moved, or 0 */
	struct cache_waiter limbo_wait;
	struct cache_waiter reclaim_wait;
	struct ft_bio store_flush;
	struct wb_page_io *pages; /* in flight, oldest first */
	struct wb_page_io **pages_tail;
	struct wb_map map;
	uint64_t dirty_blocks;
	uint32_t apply_t; /* the time wb_apply() stamps entries with */
	struct wb_range *ranges, **ranges_tail; /* oldest first */
	/* Writes ready to be logged, oldest first. */
	struct cache_op *batch, **batch_tail;
	struct ft_deferred build;
	/* Limits (bytes of log) and destage state. */
	uint64_t limit, high, low;
	bool above_high, draining, drain_logged, throttled;
	bool reclaiming, voiding, failed_logged;
	uint32_t destage_inflight;
	struct destage_io *destages; /* in flight */
	double tokens;
	uint64_t tokens_ns;
	uint32_t backoff_ms;
	uint64_t retry_at_ns;
	struct ft_timer tick;
	struct ft_reactor *reactor;
};

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
	struct wb_vol wb;
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
	/* Log segments: which are free (shared by every reactor, under seg_lock). */
	pthread_mutex_t seg_lock;
	uint32_t nsegs;
	uint8_t *seg_used;
	uint32_t *seg_free;
	uint32_t nfree;
	unsigned n_wb; /* volumes in write-back at start */
	bool started;  /* ft_cache_start() succeeded: the device may be written at close */
	uint64_t t0_ns; /* the origin of write-back entry times */
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

/* ---- writeback.c ---- */

/* @ns on the monotonic clock as an entry time (WB_TICK_NS since the start; 0 before). */
static inline uint32_t wb_ticks(const struct ft_cache *c, uint64_t ns)
{
	return ns > c->t0_ns ? (uint32_t)((ns - c->t0_ns) / WB_TICK_NS) : 0;
}

int wb_map_init(struct wb_map *m, uint32_t size);
struct wb_ent *wb_map_find(const struct wb_map *m, uint64_t block);
/* Insert or find @block's entry (its key set); NULL without memory. */
struct wb_ent *wb_map_get(struct wb_map *m, uint64_t block);
void wb_map_del(struct wb_map *m, struct wb_ent *e);

/* Set up @v's write-back state (main thread, before recovery). */
int wb_vol_init(struct cache_vol *v, uint32_t ring_cap);
void wb_vol_free(struct cache_vol *v);
struct wb_seg *wb_seg_of(struct cache_vol *v, uint64_t seq);
/* A record replayed or just written: make it @block's dirty entry if newer. */
void wb_apply(struct cache_vol *v, uint64_t block, uint64_t seq, uint32_t loc, uint64_t seg_seq);
/* A ZERO or TRIM record of [@b0, @b0 + @nb) replayed or just written. */
void wb_apply_range(struct cache_vol *v, uint64_t b0, uint64_t nb, uint64_t seq, uint8_t type,
		    uint64_t seg_seq);
/* The pending large range holding @b, if any. */
struct wb_range *wb_range_of(const struct cache_vol *v, uint64_t b);
/*
 * Take a segment from the pool (any thread); UINT32_MAX if none. Only a
 * @claim (a page that will carry a tail claim releasing segments in limbo)
 * may take the last one.
 */
uint32_t wb_seg_alloc(struct ft_cache *c, bool claim);
void wb_seg_release(struct ft_cache *c, uint32_t index);
uint64_t wb_log_used(const struct cache_vol *v);
/* Bytes not yet on the store (blocks and pending ranges). */
uint64_t wb_dirty_bytes(const struct cache_vol *v);
void wb_kick_build(struct cache_vol *v);
/* If a flush made more pages durable than any page on disk says, write an empty page saying so. */
void wb_write_marker(struct cache_vol *v);
void wb_read(struct cache_vol *v, struct ft_bio *bio);
/* Does [b0, b1) hold a dirty block? */
bool wb_any_dirty(const struct cache_vol *v, uint64_t b0, uint64_t b1);
void wb_write(struct cache_op *op);
void wb_flush(struct cache_vol *v, struct ft_bio *bio);
/*
 * Record-round hooks (meta.c): a round snapshots what has completed when it
 * starts (its record pages are encoded then, so they carry every clean-cache
 * invalidation those writes made); once it has flushed, that is durable.
 */
void wb_part_round_started(struct cache_part *p);
void wb_part_flush_done(struct cache_part *p);

/* ---- destage.c ---- */

void wb_destage_kick(struct cache_vol *v);
void wb_start_volume(struct cache_vol *v);
/* Drain @v (SIGUSR1): reactor thread. */
void wb_drain(struct cache_vol *v);
void wb_seg_check_reclaim(struct cache_vol *v);

/* ---- recovery.c ---- */

/*
 * Replay every write-back stream on the device into its volume's dirty map;
 * refuse (-EUCLEAN, after logging) dirty data of a volume not configured
 * unless discard_dirty, and flushed log pages that do not verify (-EBADMSG).
 */
int wb_recover(struct ft_cache *c, const struct ft_cache_volent *old, uint32_t nold);

/* ---- cache.c ---- */

/*
 * The device cannot be written: note in the state file (durably) that its
 * records must not be trusted at the next start. Returns 0 or a negative errno.
 */
int cache_mark_untrusted(struct ft_cache *c, const char *why);

/* ---- engine.c ---- */

extern const struct ft_backend_ops cache_backend_ops;
/* A write @op is done (store or log): leave the in-flight list, complete it, start queued ones. */
void op_write_done(struct cache_op *op, int error);
/* Stop caching @v (device errors): drop its id from the device first. Reactor thread. */
void vol_go_passthrough(struct cache_vol *v, const char *why);
/* Every volume of @p goes pass-through (a record write failed). */
void part_fail(struct cache_part *p, const char *why);

#endif
