/* SPDX-License-Identifier: MIT */
/*
 * Per-volume acceleration policy: what the cache does for one VM disk.
 *
 * Filled from the volume's "cache" object in the config today; per-VM
 * policy files will fill the same struct later. Plain data: validated by
 * whoever fills it, immutable while the volume is served, readable from
 * any thread.
 */
#ifndef FLASHTIER_POLICY_H
#define FLASHTIER_POLICY_H

#include <stdbool.h>
#include <stdint.h>

enum ft_cache_mode {
	FT_CACHE_NONE,          /* pass-through: the cache is not used */
	FT_CACHE_WRITE_AROUND,  /* reads cached; writes go to the store and invalidate */
	FT_CACHE_WRITE_THROUGH, /* reads cached; writes go to the store and update the cache */
	FT_CACHE_WRITE_BACK,    /* writes land in the cache's log; a destager writes them back */
};

struct ft_volume_policy {
	enum ft_cache_mode mode;
	/* Bytes a sequential stream may run before the rest bypasses the cache; 0 = no cutoff. */
	uint64_t sequential_cutoff;
	/*
	 * Largest share of the cache device the volume may hold: quota_bytes if
	 * nonzero, else quota_percent (1-100) of the device.
	 */
	uint64_t quota_bytes;
	uint32_t quota_percent;

	/*
	 * Write-back. dirty_limit: most log space the volume may hold (bytes if
	 * nonzero, else dirty_limit_percent of the log, else its fair share:
	 * the log divided by the write-back volumes); writes past it wait.
	 * Destaging starts above dirty_high_percent of that limit and stops
	 * below dirty_low_percent, and always takes data older than
	 * dirty_max_age_ms. destage_bandwidth: bytes per second, 0 = unlimited.
	 */
	uint64_t dirty_limit_bytes;
	uint32_t dirty_limit_percent;
	uint32_t dirty_high_percent;
	uint32_t dirty_low_percent;
	uint64_t dirty_max_age_ms;
	uint64_t destage_bandwidth;
};

/* "none", "write-around", "write-through", "write-back"; NULL for an unknown mode. */
const char *ft_cache_mode_name(enum ft_cache_mode m);

/* Parse a mode name. Returns 0 or -EINVAL. */
int ft_cache_mode_parse(const char *s, enum ft_cache_mode *out);

#endif
