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
};

/* "none", "write-around", "write-through"; NULL for an unknown mode. */
const char *ft_cache_mode_name(enum ft_cache_mode m);

/* Parse a mode name. Returns 0 or -EINVAL. */
int ft_cache_mode_parse(const char *s, enum ft_cache_mode *out);

#endif
