/* SPDX-License-Identifier: MIT */
/*
 * The cache directory: which (volume, block) lives in which cache slot, and
 * which block leaves when a new one needs room.
 *
 * Replacement is S3-FIFO (Yang et al., SOSP '23): new blocks enter a small
 * FIFO (10% of the slots); a block read again while there is promoted to the
 * main FIFO, the others are evicted and remembered in a ghost FIFO of key
 * fingerprints; a block that comes back while its ghost is remembered goes
 * straight to the main FIFO. The main FIFO gives each block up to three
 * second chances (a 2-bit access counter). One-time blocks of a scan thus
 * pass through the small FIFO without touching the working set.
 *
 * Slots are numbered 0..nslots-1; slot i is the i-th block of cache space,
 * so the caller maps a slot to a device offset directly.
 *
 * Memory: 17 bytes per slot (key, hash chain, queue link, state) + hash
 * buckets (nslots/2, 4 bytes) + ghost table (1.25 x the main FIFO's size,
 * 4 bytes per fingerprint): about 23.5 bytes per 4 KiB block at any size;
 * ft_cachedir_memory() reports it.
 *
 * Threads: a directory belongs to one reactor; no function here locks.
 */
#ifndef FLASHTIER_CACHEDIR_H
#define FLASHTIER_CACHEDIR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* A cached block's identity: volume id in the top 16 bits, 4 KiB block number below. */
typedef uint64_t ft_cache_key;

#define FT_CACHE_KEY(vol, block) (((uint64_t)(vol) << 48) | ((uint64_t)(block) & ((1ull << 48) - 1)))
#define FT_CACHE_KEY_VOLUME(k)   ((uint16_t)((k) >> 48))
#define FT_CACHE_KEY_BLOCK(k)    ((k) & ((1ull << 48) - 1))

#define FT_CACHEDIR_NONE UINT32_MAX

struct ft_cachedir;

/* Returns 0 and *@out, or -EINVAL (nslots 0 or >= 2^31), -ENOMEM. */
int ft_cachedir_create(uint32_t nslots, struct ft_cachedir **out);
void ft_cachedir_destroy(struct ft_cachedir *d);

/* The slot holding @key and record an access (a hit), or FT_CACHEDIR_NONE. */
uint32_t ft_cachedir_lookup(struct ft_cachedir *d, ft_cache_key key);

/* The slot holding @key without recording an access, or FT_CACHEDIR_NONE. */
uint32_t ft_cachedir_find(const struct ft_cachedir *d, ft_cache_key key);

/*
 * Give @key (which must not be present) a slot. When every slot is in use,
 * one block is evicted first: then *@evicted is true and *@victim its key
 * (the returned slot is the one it held). Returns FT_CACHEDIR_NONE only if
 * every slot is pinned.
 */
uint32_t ft_cachedir_insert(struct ft_cachedir *d, ft_cache_key key, bool *evicted,
			    ft_cache_key *victim);

/*
 * A block the admission policy kept out (a long sequential stream): remember
 * it like an evicted one, so that if it comes back while still remembered
 * (a range re-read that fits in the cache) it is recognised as reused.
 */
void ft_cachedir_note_bypass(struct ft_cachedir *d, ft_cache_key key);

/* Was @key evicted or bypassed recently (it has a live ghost)? Changes nothing. */
bool ft_cachedir_returning(const struct ft_cachedir *d, ft_cache_key key);

/* Forget @key (invalidation); its slot becomes free. No-op if absent. */
void ft_cachedir_remove(struct ft_cachedir *d, ft_cache_key key);

/*
 * Warm restart: put @key back in @slot (free, in a directory nothing else has
 * touched yet), in the main FIFO with no access history. After the last
 * one, ft_cachedir_restore_done() rebuilds the free list.
 */
void ft_cachedir_restore(struct ft_cachedir *d, uint32_t slot, ft_cache_key key);
void ft_cachedir_restore_done(struct ft_cachedir *d);

/*
 * Quotas: evict one unpinned block of volume @vol, chosen by CLOCK over the
 * slot array from *@hand (a cursor the caller keeps per volume; blocks with
 * a nonzero access counter get it decremented and are passed over). The
 * slot becomes free (the next insert takes it). Returns the slot and
 * *@victim, or FT_CACHEDIR_NONE if the volume has no evictable block.
 */
uint32_t ft_cachedir_evict_volume(struct ft_cachedir *d, uint16_t vol, uint32_t *hand,
				  ft_cache_key *victim);

/* A pinned slot is never evicted (dirty data, a fill in progress). */
void ft_cachedir_pin(struct ft_cachedir *d, uint32_t slot, bool pinned);

/* The key held by @slot; @slot must be in use. */
ft_cache_key ft_cachedir_key(const struct ft_cachedir *d, uint32_t slot);

uint32_t ft_cachedir_used(const struct ft_cachedir *d);
uint32_t ft_cachedir_slots(const struct ft_cachedir *d);

/* Bytes of RAM the directory uses (every array it allocated). */
size_t ft_cachedir_memory(const struct ft_cachedir *d);

#endif
