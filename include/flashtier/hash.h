/* SPDX-License-Identifier: MIT */
/*
 * Hashing of cache keys (volume id and block number packed in 64 bits) for
 * the in-RAM tables: the directory's buckets and ghosts, the engine's
 * stale-record Bloom filter. Pure functions; any thread.
 */
#ifndef FLASHTIER_HASH_H
#define FLASHTIER_HASH_H

#include <stdint.h>

/* The splitmix64 finaliser: every input bit affects every output bit. */
static inline uint64_t ft_mix64(uint64_t x)
{
	x ^= x >> 30;
	x *= 0xbf58476d1ce4e5b9ull;
	x ^= x >> 27;
	x *= 0x94d049bb133111ebull;
	x ^= x >> 31;
	return x;
}

#endif
