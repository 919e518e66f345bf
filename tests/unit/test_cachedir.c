/* SPDX-License-Identifier: MIT */
/* Unit tests: the S3-FIFO cache directory and the sequential-cutoff admission. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "flashtier/admission.h"
#include "flashtier/cachedir.h"

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static uint64_t rnd(void)
{
	uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static struct ft_cachedir *mk(uint32_t n)
{
	struct ft_cachedir *d = NULL;

	cr_assert_eq(ft_cachedir_create(n, &d), 0);
	cr_assert_not_null(d);
	return d;
}

/* Insert @k, which must be absent; returns its slot. */
static uint32_t put(struct ft_cachedir *d, ft_cache_key k)
{
	bool ev;
	ft_cache_key victim = 0;
	uint32_t s;

	cr_assert_eq(ft_cachedir_find(d, k), FT_CACHEDIR_NONE, "key %llx already present",
		     (unsigned long long)k);
	s = ft_cachedir_insert(d, k, &ev, &victim);
	cr_assert_neq(s, FT_CACHEDIR_NONE);
	cr_assert_eq(ft_cachedir_find(d, k), s);
	cr_assert_eq(ft_cachedir_key(d, s), k);
	if (ev)
		cr_assert_eq(ft_cachedir_find(d, victim), FT_CACHEDIR_NONE, "victim still indexed");
	return s;
}

Test(cachedir, rejects_bad_sizes)
{
	struct ft_cachedir *d = NULL;

	cr_assert_eq(ft_cachedir_create(0, &d), -EINVAL);
	cr_assert_eq(ft_cachedir_create(1u << 31, &d), -EINVAL);
}

Test(cachedir, key_packing)
{
	ft_cache_key k = FT_CACHE_KEY(7, 123456789ull);

	cr_assert_eq(FT_CACHE_KEY_VOLUME(k), 7);
	cr_assert_eq(FT_CACHE_KEY_BLOCK(k), 123456789ull);
	cr_assert_neq(FT_CACHE_KEY(1, 5), FT_CACHE_KEY(2, 5));
}

Test(cachedir, fills_every_slot_before_evicting)
{
	struct ft_cachedir *d = mk(100);
	bool seen[100] = { false };

	for (uint32_t i = 0; i < 100; i++) {
		bool ev = true;
		ft_cache_key v;
		uint32_t s = ft_cachedir_insert(d, FT_CACHE_KEY(1, i), &ev, &v);

		cr_assert_lt(s, 100);
		cr_assert_not(ev, "evicted before the cache was full");
		cr_assert_not(seen[s], "slot %u handed out twice", s);
		seen[s] = true;
	}
	cr_assert_eq(ft_cachedir_used(d), 100);
	for (uint32_t i = 100; i < 400; i++) {
		bool ev = false;
		ft_cache_key v = 0;
		uint32_t s = ft_cachedir_insert(d, FT_CACHE_KEY(1, i), &ev, &v);

		cr_assert(ev, "full cache must evict");
		cr_assert_lt(s, 100);
		cr_assert_eq(ft_cachedir_find(d, v), FT_CACHEDIR_NONE);
		cr_assert_eq(ft_cachedir_used(d), 100);
	}
	ft_cachedir_destroy(d);
}

Test(cachedir, find_does_not_count_lookup_does)
{
	/* A block looked up while in the small FIFO survives its eviction; a block only found does not. */
	struct ft_cachedir *d = mk(100);

	put(d, FT_CACHE_KEY(1, 0));
	put(d, FT_CACHE_KEY(1, 1));
	cr_assert_neq(ft_cachedir_lookup(d, FT_CACHE_KEY(1, 0)), FT_CACHEDIR_NONE);
	cr_assert_neq(ft_cachedir_find(d, FT_CACHE_KEY(1, 1)), FT_CACHEDIR_NONE);
	for (uint32_t i = 2; i < 150; i++)
		put(d, FT_CACHE_KEY(1, i));
	cr_assert_neq(ft_cachedir_find(d, FT_CACHE_KEY(1, 0)), FT_CACHEDIR_NONE,
		      "re-read block was evicted by one-time blocks");
	cr_assert_eq(ft_cachedir_find(d, FT_CACHE_KEY(1, 1)), FT_CACHEDIR_NONE,
		     "unread block outlived 148 newer one-time blocks");
	ft_cachedir_destroy(d);
}

Test(cachedir, scan_does_not_flush_the_working_set)
{
	const uint32_t n = 1000, hot = 500;
	struct ft_cachedir *d = mk(n);
	uint32_t kept = 0;

	/* A working set read several times... */
	for (int round = 0; round < 4; round++)
		for (uint32_t i = 0; i < hot; i++)
			if (ft_cachedir_lookup(d, FT_CACHE_KEY(1, i)) == FT_CACHEDIR_NONE)
				put(d, FT_CACHE_KEY(1, i));
	/* ...then a one-time scan ten times the cache's size. */
	for (uint32_t i = 0; i < 10 * n; i++)
		put(d, FT_CACHE_KEY(2, i));
	for (uint32_t i = 0; i < hot; i++)
		kept += ft_cachedir_find(d, FT_CACHE_KEY(1, i)) != FT_CACHEDIR_NONE;
	/* LRU or FIFO would keep none of them. */
	cr_assert_geq(kept, hot * 9 / 10, "only %u of %u hot blocks survived the scan", kept, hot);
	ft_cachedir_destroy(d);
}

Test(cachedir, ghost_sends_returning_blocks_to_main)
{
	const uint32_t n = 1000;
	struct ft_cachedir *d = mk(n);
	uint32_t kept = 0;

	/* 50 blocks enter once and are evicted from the small FIFO as one-time blocks... */
	for (uint32_t i = 0; i < 50; i++)
		put(d, FT_CACHE_KEY(1, i));
	for (uint32_t i = 0; i < n + 200; i++)
		put(d, FT_CACHE_KEY(2, i));
	for (uint32_t i = 0; i < 50; i++)
		cr_assert_eq(ft_cachedir_find(d, FT_CACHE_KEY(1, i)), FT_CACHEDIR_NONE);
	/* ...come back while their ghosts are remembered: they go to the main FIFO... */
	for (uint32_t i = 0; i < 50; i++)
		put(d, FT_CACHE_KEY(1, i));
	/* ...so a further one-time stream, longer than the small FIFO, does not flush them. */
	for (uint32_t i = 0; i < n / 2; i++)
		put(d, FT_CACHE_KEY(3, i));
	for (uint32_t i = 0; i < 50; i++)
		kept += ft_cachedir_find(d, FT_CACHE_KEY(1, i)) != FT_CACHEDIR_NONE;
	cr_assert_geq(kept, 45, "only %u of 50 returning blocks were kept", kept);
	ft_cachedir_destroy(d);
}

Test(cachedir, pinned_blocks_are_never_evicted)
{
	const uint32_t n = 64;
	struct ft_cachedir *d = mk(n);
	uint32_t slots[64];
	bool ev;
	ft_cache_key v;

	for (uint32_t i = 0; i < n; i++)
		slots[i] = put(d, FT_CACHE_KEY(1, i));
	for (uint32_t i = 0; i < n - 1; i++)
		ft_cachedir_pin(d, slots[i], true);
	/* Only one slot can turn over. */
	for (uint32_t i = 0; i < 500; i++)
		put(d, FT_CACHE_KEY(2, i));
	for (uint32_t i = 0; i < n - 1; i++)
		cr_assert_eq(ft_cachedir_find(d, FT_CACHE_KEY(1, i)), slots[i], "pinned block %u lost",
			     i);
	/* Everything pinned: nothing can be inserted. */
	ft_cachedir_pin(d, ft_cachedir_find(d, FT_CACHE_KEY(2, 499)), true);
	cr_assert_eq(ft_cachedir_insert(d, FT_CACHE_KEY(3, 0), &ev, &v), FT_CACHEDIR_NONE);
	/* Unpinned again, it turns over. */
	ft_cachedir_pin(d, slots[0], false);
	cr_assert_neq(ft_cachedir_insert(d, FT_CACHE_KEY(3, 0), &ev, &v), FT_CACHEDIR_NONE);
	cr_assert(ev);
	cr_assert_eq(v, FT_CACHE_KEY(1, 0));
	ft_cachedir_destroy(d);
}

Test(cachedir, remove_frees_the_slot)
{
	struct ft_cachedir *d = mk(10);
	bool ev;
	ft_cache_key v;

	for (uint32_t i = 0; i < 10; i++)
		put(d, FT_CACHE_KEY(1, i));
	ft_cachedir_remove(d, FT_CACHE_KEY(1, 3));
	ft_cachedir_remove(d, FT_CACHE_KEY(1, 3)); /* absent: no-op */
	cr_assert_eq(ft_cachedir_find(d, FT_CACHE_KEY(1, 3)), FT_CACHEDIR_NONE);
	cr_assert_eq(ft_cachedir_used(d), 9);
	/* Re-inserting the removed key works and the directory stays consistent. */
	put(d, FT_CACHE_KEY(1, 3));
	cr_assert_eq(ft_cachedir_used(d), 10);
	cr_assert_neq(ft_cachedir_insert(d, FT_CACHE_KEY(1, 100), &ev, &v), FT_CACHEDIR_NONE);
	cr_assert_eq(ft_cachedir_used(d), 10);
	ft_cachedir_destroy(d);
}

Test(cachedir, restore_then_insert)
{
	const uint32_t n = 64;
	struct ft_cachedir *d = mk(n);
	bool restored[64] = { false }, seen[64] = { false };
	uint32_t count = 0;
	bool ev;
	ft_cache_key v;

	/* A warm restart puts every third slot back, keys of volume 2. */
	for (uint32_t s = 0; s < n; s += 3) {
		ft_cachedir_restore(d, s, FT_CACHE_KEY(2, 1000 + s));
		restored[s] = true;
		count++;
	}
	ft_cachedir_restore_done(d);
	cr_assert_eq(ft_cachedir_used(d), count);
	for (uint32_t s = 0; s < n; s += 3) {
		cr_assert_eq(ft_cachedir_find(d, FT_CACHE_KEY(2, 1000 + s)), s);
		cr_assert_eq(ft_cachedir_key(d, s), FT_CACHE_KEY(2, 1000 + s));
	}
	cr_assert_eq(ft_cachedir_find(d, FT_CACHE_KEY(2, 1001)), FT_CACHEDIR_NONE);
	/* The free list gives exactly the other slots, in slot order, with no eviction. */
	for (uint32_t i = 0, last = 0; i < n - count; i++) {
		uint32_t s = ft_cachedir_insert(d, FT_CACHE_KEY(1, i), &ev, &v);

		cr_assert_lt(s, n);
		cr_assert_not(ev, "insert %u evicted with free slots left", i);
		cr_assert_not(restored[s], "slot %u of a restored block handed out", s);
		cr_assert_not(seen[s], "slot %u handed out twice", s);
		cr_assert(i == 0 || s > last, "free slots not in slot order: %u after %u", s, last);
		seen[s] = true;
		last = s;
	}
	cr_assert_eq(ft_cachedir_used(d), n);
	for (uint32_t s = 0; s < n; s += 3)
		cr_assert_eq(ft_cachedir_lookup(d, FT_CACHE_KEY(2, 1000 + s)), s);
	/* Full now: inserts evict, and restored blocks (main FIFO) outlive one-time ones. */
	for (uint32_t i = 0; i < 100; i++) {
		uint32_t s = ft_cachedir_insert(d, FT_CACHE_KEY(3, i), &ev, &v);

		cr_assert_neq(s, FT_CACHEDIR_NONE);
		cr_assert(ev);
		cr_assert_eq(ft_cachedir_find(d, v), FT_CACHEDIR_NONE);
		cr_assert_neq(FT_CACHE_KEY_VOLUME(v), 2, "restored block %llx evicted by a scan",
			      (unsigned long long)v);
	}
	for (uint32_t s = 0; s < n; s += 3)
		cr_assert_eq(ft_cachedir_find(d, FT_CACHE_KEY(2, 1000 + s)), s);
	ft_cachedir_destroy(d);
}

Test(cachedir, restore_of_an_empty_cache)
{
	struct ft_cachedir *d = mk(10);
	bool ev;
	ft_cache_key v;

	ft_cachedir_restore_done(d);
	cr_assert_eq(ft_cachedir_used(d), 0);
	for (uint32_t i = 0; i < 10; i++) {
		cr_assert_eq(ft_cachedir_insert(d, FT_CACHE_KEY(1, i), &ev, &v), i);
		cr_assert_not(ev);
	}
	ft_cachedir_destroy(d);
}

Test(cachedir, evict_volume)
{
	const uint32_t n = 40;
	struct ft_cachedir *d = mk(n);
	uint32_t hand = 0, order[20], nev = 0, s;
	bool gone[20] = { false }, ev;
	ft_cache_key v;

	/* Volumes 1 and 2 alternate: volume 1's block b is in slot 2b. */
	for (uint32_t b = 0; b < 20; b++) {
		cr_assert_eq(put(d, FT_CACHE_KEY(1, b)), 2 * b);
		put(d, FT_CACHE_KEY(2, b));
	}
	ft_cachedir_pin(d, 0, true); /* volume 1, block 0 */
	for (uint32_t b = 1; b <= 8; b++)
		cr_assert_eq(ft_cachedir_lookup(d, FT_CACHE_KEY(1, b)), 2 * b);
	cr_assert_eq(ft_cachedir_evict_volume(d, 3, &hand, &v), FT_CACHEDIR_NONE,
		     "a volume with no blocks gave a victim");
	while ((s = ft_cachedir_evict_volume(d, 1, &hand, &v)) != FT_CACHEDIR_NONE) {
		uint32_t b = (uint32_t)FT_CACHE_KEY_BLOCK(v);

		cr_assert_lt(nev, 19, "more victims than evictable blocks");
		cr_assert_eq(FT_CACHE_KEY_VOLUME(v), 1, "victim %llx of another volume",
			     (unsigned long long)v);
		cr_assert_neq(b, 0, "pinned block evicted");
		cr_assert_not(gone[b], "block %u evicted twice", b);
		cr_assert_eq(s, 2 * b, "victim's slot");
		cr_assert_eq(ft_cachedir_find(d, v), FT_CACHEDIR_NONE);
		cr_assert_lt(hand, n);
		gone[b] = true;
		order[nev++] = b;
		cr_assert_eq(ft_cachedir_used(d), n - nev);
	}
	cr_assert_eq(nev, 19, "%u victims: every unpinned block of volume 1", nev);
	/* Blocks never read since they were filled go first; the 8 read ones get a second turn. */
	for (uint32_t i = 0; i < 11; i++)
		cr_assert_geq(order[i], 9, "victim %u was block %u, read recently", i, order[i]);
	cr_assert_eq(ft_cachedir_find(d, FT_CACHE_KEY(1, 0)), 0);
	for (uint32_t b = 0; b < 20; b++)
		cr_assert_eq(ft_cachedir_find(d, FT_CACHE_KEY(2, b)), 2 * b + 1,
			     "volume 2's block %u lost", b);
	/* The freed slots are taken by inserts, without evicting anything. */
	for (uint32_t i = 0; i < 19; i++) {
		s = ft_cachedir_insert(d, FT_CACHE_KEY(3, i), &ev, &v);
		cr_assert_neq(s, FT_CACHEDIR_NONE);
		cr_assert_not(ev, "insert %u evicted with free slots left", i);
		cr_assert_eq(s % 2, 0, "slot %u was not one volume 1 gave up", s);
	}
	cr_assert_eq(ft_cachedir_used(d), n);
	put(d, FT_CACHE_KEY(3, 100)); /* full again: evicts */
	/* Only a pinned block left: none. */
	cr_assert_eq(ft_cachedir_evict_volume(d, 1, &hand, &v), FT_CACHEDIR_NONE);
	ft_cachedir_pin(d, 0, false);
	cr_assert_eq(ft_cachedir_evict_volume(d, 1, &hand, &v), 0);
	cr_assert_eq(v, FT_CACHE_KEY(1, 0));
	ft_cachedir_destroy(d);
}

/* Random operations against a reference model: one slot per key, one key per slot. */
Test(cachedir, random_operations_match_a_model)
{
	const uint32_t n = 257, universe = 2000;
	struct ft_cachedir *d = mk(n);
	uint32_t *slot_of = malloc(universe * sizeof(*slot_of));
	int64_t owner[257];
	uint32_t present = 0, hands[3] = { 0, 0, 0 };

	cr_assert_not_null(slot_of);
	for (uint32_t k = 0; k < universe; k++)
		slot_of[k] = FT_CACHEDIR_NONE;
	for (uint32_t s = 0; s < n; s++)
		owner[s] = -1;
	for (int step = 0; step < 200000; step++) {
		uint32_t k = (uint32_t)(rnd() % universe);
		unsigned op = (unsigned)(rnd() % 10);
		ft_cache_key key = FT_CACHE_KEY(k % 3, k);

		if (op < 6) { /* read: hit or fill */
			uint32_t s = ft_cachedir_lookup(d, key);

			cr_assert_eq(s, slot_of[k], "step %d: key %u at %u, model %u", step, k, s,
				     slot_of[k]);
			if (s == FT_CACHEDIR_NONE) {
				bool ev = false;
				ft_cache_key v = 0;

				s = ft_cachedir_insert(d, key, &ev, &v);
				cr_assert_lt(s, n);
				if (ev) {
					uint32_t vk = (uint32_t)FT_CACHE_KEY_BLOCK(v);

					cr_assert_eq(slot_of[vk], s, "victim was not in the slot reused");
					slot_of[vk] = FT_CACHEDIR_NONE;
					present--;
				} else {
					cr_assert_eq(owner[s], -1, "slot %u reused without eviction", s);
				}
				owner[s] = k;
				slot_of[k] = s;
				present++;
			}
		} else if (op < 8) { /* invalidate */
			ft_cachedir_remove(d, key);
			if (slot_of[k] != FT_CACHEDIR_NONE) {
				owner[slot_of[k]] = -1;
				slot_of[k] = FT_CACHEDIR_NONE;
				present--;
			}
		} else if (op < 9) { /* unpin something present */
			uint32_t s = ft_cachedir_find(d, key);

			if (s != FT_CACHEDIR_NONE)
				ft_cachedir_pin(d, s, false);
		} else { /* a quota evicts one block of the key's volume */
			ft_cache_key v = 0;
			uint32_t s = ft_cachedir_evict_volume(d, k % 3, &hands[k % 3], &v);

			if (s != FT_CACHEDIR_NONE) {
				uint32_t vk = (uint32_t)FT_CACHE_KEY_BLOCK(v);

				cr_assert_eq(FT_CACHE_KEY_VOLUME(v), k % 3);
				cr_assert_eq(slot_of[vk], s, "quota victim was not in its slot");
				owner[s] = -1;
				slot_of[vk] = FT_CACHEDIR_NONE;
				present--;
			} else {
				for (uint32_t j = k % 3; j < universe; j += 3)
					cr_assert_eq(slot_of[j], FT_CACHEDIR_NONE,
						     "no quota victim, but key %u is cached", j);
			}
		}
		cr_assert_eq(ft_cachedir_used(d), present);
	}
	free(slot_of);
	ft_cachedir_destroy(d);
}

Test(cachedir, memory_per_block)
{
	/* The cache engine adds a 4-byte checksum per block; the budget is 32 bytes. */
	const uint32_t n = 1u << 20;
	struct ft_cachedir *d = mk(n);
	double per = (double)ft_cachedir_memory(d) / n;

	cr_log_info("cache directory: %.2f bytes per 4 KiB block at %u blocks", per, n);
	cr_assert_leq(per, 28.0, "%.2f bytes per block", per);
	ft_cachedir_destroy(d);
}

Test(cachedir, memory_per_block_at_awkward_sizes)
{
	/* No power-of-two rounding: just above a power of two costs no more. */
	static const uint32_t sizes[] = { 1000, 32935, (1u << 17) + 1, 3000017 };

	for (unsigned i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		struct ft_cachedir *d = mk(sizes[i]);
		double per = (double)ft_cachedir_memory(d) / sizes[i];

		cr_assert_leq(per, 24.5, "%.2f bytes per block at %u blocks", per, sizes[i]);
		ft_cachedir_destroy(d);
	}
}

/* The agent's admission: sequential cutoff, except for blocks that come back while remembered. */
static bool admit_like_agent(struct ft_cachedir *d, struct ft_seqdetect *sd, uint64_t block)
{
	ft_cache_key key = FT_CACHE_KEY(1, block);
	bool admit = ft_seqdetect_admit(sd, block * 4096, 4096);

	if (ft_cachedir_lookup(d, key) != FT_CACHEDIR_NONE)
		return true;
	if (!admit && !ft_cachedir_returning(d, key)) {
		ft_cachedir_note_bypass(d, key);
		return false;
	}
	put(d, key);
	return false;
}

Test(cachedir, reread_sequential_range_that_fits_is_cached)
{
	const uint32_t n = 10000, range_blocks = 5000;
	struct ft_cachedir *d = mk(n);
	struct ft_seqdetect sd;
	uint32_t hits = 0;

	ft_seqdetect_init(&sd, FT_SEQ_DEFAULT_CUTOFF);
	for (int pass = 0; pass < 3; pass++)
		for (uint32_t b = 0; b < range_blocks; b++)
			hits += admit_like_agent(d, &sd, b) && pass == 2;
	/* Pass 1 bypasses past the cutoff, pass 2 admits the returning blocks, pass 3 hits. */
	cr_assert_geq(hits, range_blocks * 9 / 10, "third pass: %u of %u hits", hits, range_blocks);
	ft_cachedir_destroy(d);
}

Test(admission, sequential_stream_bypasses_after_cutoff)
{
	struct ft_seqdetect sd;
	uint64_t admitted = 0;

	ft_seqdetect_init(&sd, 1u << 20);
	for (uint64_t off = 0; off < (8u << 20); off += 65536)
		admitted += ft_seqdetect_admit(&sd, off, 65536) ? 65536 : 0;
	cr_assert_eq(admitted, 1u << 20, "admitted %llu bytes of a sequential 8 MiB stream",
		     (unsigned long long)admitted);
}

Test(admission, random_access_is_admitted)
{
	struct ft_seqdetect sd;

	ft_seqdetect_init(&sd, 1u << 20);
	for (int i = 0; i < 10000; i++)
		cr_assert(ft_seqdetect_admit(&sd, (rnd() % (1u << 20)) * 4096, 4096));
}

Test(admission, interleaved_streams_are_each_followed)
{
	struct ft_seqdetect sd;
	unsigned bypassed[FT_SEQ_STREAMS] = { 0 };

	ft_seqdetect_init(&sd, 1u << 20);
	/* FT_SEQ_STREAMS streams, interleaved, 4 MiB each. */
	for (uint64_t off = 0; off < (4u << 20); off += 4096)
		for (unsigned s = 0; s < FT_SEQ_STREAMS; s++)
			bypassed[s] += !ft_seqdetect_admit(&sd, ((uint64_t)s << 32) + off, 4096);
	for (unsigned s = 0; s < FT_SEQ_STREAMS; s++)
		cr_assert_eq(bypassed[s], (3u << 20) / 4096, "stream %u: %u blocks bypassed", s,
			     bypassed[s]);
}

/* A backup reading while the VM does random I/O: the random requests do not hide the stream. */
Test(admission, stream_interleaved_with_random_requests_bypasses)
{
	struct ft_seqdetect sd;
	uint64_t admitted = 0, random_bypassed = 0;

	ft_seqdetect_init(&sd, 1u << 20);
	/* 4 KiB requests: 64 in a row, then 256 random ones, 32 MiB in all. */
	for (uint64_t off = 0; off < (32u << 20); off += 4096) {
		admitted += ft_seqdetect_admit(&sd, (1ull << 40) + off, 4096) ? 4096 : 0;
		if ((off / 4096) % 64 == 63)
			for (int i = 0; i < 256; i++)
				random_bypassed +=
					!ft_seqdetect_admit(&sd, (rnd() % (1u << 24)) * 4096, 4096);
	}
	cr_assert_eq(admitted, 1u << 20, "admitted %llu bytes of the stream",
		     (unsigned long long)admitted);
	cr_assert_eq(random_bypassed, 0);
	/* 256 KiB requests, each after 300 random ones. */
	admitted = 0;
	for (uint64_t off = 0; off < (32u << 20); off += 256 << 10) {
		admitted += ft_seqdetect_admit(&sd, (2ull << 40) + off, 256 << 10) ? 256 << 10 : 0;
		for (int i = 0; i < 300; i++)
			random_bypassed += !ft_seqdetect_admit(&sd, (rnd() % (1u << 24)) * 4096, 4096);
	}
	cr_assert_eq(admitted, 1u << 20, "admitted %llu bytes of the large-request stream",
		     (unsigned long long)admitted);
	cr_assert_eq(random_bypassed, 0);
}

Test(admission, finished_streams_give_way)
{
	struct ft_seqdetect sd;
	uint64_t admitted = 0;

	ft_seqdetect_init(&sd, 1u << 20);
	/* Every entry holds a stream that then stops... */
	for (unsigned s = 0; s < FT_SEQ_STREAMS; s++)
		for (uint64_t off = 0; off < (2u << 20); off += 65536)
			ft_seqdetect_admit(&sd, ((uint64_t)s << 32) + off, 65536);
	/* ...and after FT_SEQ_IDLE other requests a new stream is followed again. */
	for (unsigned i = 0; i <= FT_SEQ_IDLE; i++)
		cr_assert(ft_seqdetect_admit(&sd, (rnd() % (1u << 24)) * 4096, 4096));
	for (uint64_t off = 0; off < (8u << 20); off += 4096)
		admitted += ft_seqdetect_admit(&sd, (1ull << 40) + off, 4096) ? 4096 : 0;
	cr_assert_eq(admitted, 1u << 20, "admitted %llu bytes of a new 8 MiB stream",
		     (unsigned long long)admitted);
}

Test(admission, cutoff_zero_disables)
{
	struct ft_seqdetect sd;

	ft_seqdetect_init(&sd, 0);
	for (uint64_t off = 0; off < (64u << 20); off += 1u << 20)
		cr_assert(ft_seqdetect_admit(&sd, off, 1u << 20));
}

Test(admission, oversized_single_request_bypasses)
{
	struct ft_seqdetect sd;

	ft_seqdetect_init(&sd, 1u << 20);
	cr_assert_not(ft_seqdetect_admit(&sd, 0, 4u << 20));
	cr_assert(ft_seqdetect_admit(&sd, 1u << 30, 4096));
}
