/* SPDX-License-Identifier: MIT */
/*
 * The read cache: a cache device shared by every volume of the host, in
 * front of each volume's backing store.
 *
 * A cached volume's backing store is wrapped in a cache backend (the same
 * struct ft_backend table), so the NBD server drives cached and uncached
 * volumes alike. Modes (struct ft_volume_policy): write-through (writes go
 * to the store, then update the cache), write-around (writes go to the
 * store and invalidate the cache), none (no wrapper at all).
 *
 * Partitions: the device's slots are split between the reactors that own
 * cached volumes, in proportion to how many they own, so each reactor
 * serves its volumes' cache state without a lock. Inside a partition,
 * volumes share the slots under S3-FIFO, each capped by its quota.
 *
 * Guarantees (see cachedev.h for the on-disk ordering that gives them):
 *  - a read never returns data older than the newest write acknowledged
 *    before the read was sent, across kill -9 and power loss;
 *  - every hit is checked against its CRC32C; a mismatch is a miss;
 *  - no VM request fails because of the cache: a device read error is a
 *    miss, a device write error drops the block, and past the error
 *    threshold the volume goes pass-through (its cached data is dropped
 *    from the device first).
 *
 * Lifecycle (main thread unless said otherwise):
 *   ft_cache_open()        open or format the device; refuses foreign data.
 *   ft_cache_add_volume()  for each cached volume, with its reactor index;
 *                          wraps the volume's backend.
 *   ft_cache_start()       assign volume ids, partition, reattach cached
 *                          data from the mapping records, write the
 *                          superblock. Before any reactor serves a volume.
 *   ... reactors serve; each wrapper's attach() runs on its reactor ...
 *   ft_cache_close()       after the reactors stopped and the volumes were
 *                          closed: persist the records, mark the device
 *                          clean, free.
 */
#ifndef FLASHTIER_CACHE_H
#define FLASHTIER_CACHE_H

#include <stddef.h>
#include <stdint.h>

#include "flashtier/backend.h"
#include "flashtier/config.h"
#include "flashtier/metrics.h"

struct ft_cache;

/*
 * Open the device @cc names (creating a file of cc->size if missing). On a
 * foreign, newer-format or corrupt device, logs why and returns the
 * negative errno of ft_cachedev_open(); nothing is overwritten unless
 * cc->reformat. @cc must outlive the cache.
 */
int ft_cache_open(const struct ft_cache_config *cc, struct ft_cache **out);

/*
 * Put the cache in front of @*backend for volume @vc (policy mode must not
 * be none), whose size is @size and which reactor number @reactor will
 * own. On success *@backend is replaced by the wrapper, which owns the
 * original; closing the wrapper closes both. @stats receives the volume's
 * cache counters and must outlive the cache. Returns 0 or -ENOMEM, -ENOSPC
 * (more than FT_CACHE_MAX_VOLUMES volumes).
 */
int ft_cache_add_volume(struct ft_cache *c, const struct ft_volume_config *vc, uint64_t size,
			unsigned reactor, struct ft_cache_stats *stats, struct ft_backend **backend);

/* See above. Returns 0, or a negative errno after logging. */
int ft_cache_start(struct ft_cache *c, unsigned n_reactors);

/*
 * Drain every write-back volume (SIGUSR1): write all dirty data back to the
 * stores at full speed; each volume logs "drained" when it has none left.
 * Main thread, while the reactors run; @reactors as given to the volumes.
 * A drain already under way is not restarted.
 */
void ft_cache_drain(struct ft_cache *c, struct ft_reactor **reactors);

/* Cache-wide figures for the metrics endpoint (valid after ft_cache_start()). */
void ft_cache_global_stats(const struct ft_cache *c, struct ft_cache_global_stats *out);

/* See above. NULL is a no-op. */
void ft_cache_close(struct ft_cache *c);

#endif
