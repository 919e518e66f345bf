/* SPDX-License-Identifier: MIT */
/* The write-back log's page format and the dirty map (cache/wlog.c, cache/writeback.c). */
#include <criterion/criterion.h>
#include <stdlib.h>
#include <string.h>

#include "../../cache/internal.h"
#include "flashtier/wlog.h"

static const uint8_t uuid[16] = { 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16 };

static void sample(struct ft_wlog_page *pg)
{
	memset(pg, 0, sizeof(*pg));
	pg->volume = 7;
	pg->nrecs = 3;
	pg->epoch = 42;
	pg->ndata = 2;
	pg->seg_seq = 5;
	pg->page_seq = 99;
	pg->durable_seq = 97;
	pg->tail_seg = 3;
	pg->recs[0] = (struct ft_wlog_rec){ .offset = 8192, .length = 4096, .data_crc = 0xabcd,
					    .seq = 1000, .volume = 7, .type = FT_WLOG_DATA };
	pg->recs[1] = (struct ft_wlog_rec){ .offset = 1 << 20, .length = 1 << 21, .seq = 1001,
					    .volume = 7, .type = FT_WLOG_ZERO };
	pg->recs[2] = (struct ft_wlog_rec){ .offset = 4096, .length = 4096, .data_crc = 0x1234,
					    .seq = 1002, .volume = 7, .type = FT_WLOG_DATA };
}

Test(wlog, seal_and_open_round_trip)
{
	struct ft_wlog_page pg;

	sample(&pg);
	ft_wlog_page_seal(&pg, uuid);
	cr_assert_eq(ft_wlog_page_open(&pg, uuid), FT_WLOG_PAGE_VALID);
	cr_assert_eq(pg.volume, 7);
	cr_assert_eq(pg.page_seq, 99);
	cr_assert_eq(pg.durable_seq, 97);
	cr_assert_eq(pg.recs[1].length, 1u << 21);
	cr_assert_eq(pg.recs[2].seq, 1002);
	cr_assert_eq(pg.recs[0].data_crc, 0xabcd);
}

Test(wlog, every_flipped_bit_is_caught)
{
	struct ft_wlog_page pg, bad;

	sample(&pg);
	ft_wlog_page_seal(&pg, uuid);
	/* The magic's bits make it "not a page"; every other bit makes it corrupt. */
	for (size_t bit = 8 * 8; bit < 8 * sizeof(pg); bit += 7) {
		memcpy(&bad, &pg, sizeof(pg));
		((uint8_t *)&bad)[bit / 8] ^= (uint8_t)(1u << (bit % 8));
		cr_assert_eq(ft_wlog_page_open(&bad, uuid), FT_WLOG_PAGE_CORRUPT, "bit %zu", bit);
	}
}

Test(wlog, another_device_or_blank_is_not_ours)
{
	struct ft_wlog_page pg;
	uint8_t other[16] = { 0 };

	sample(&pg);
	ft_wlog_page_seal(&pg, uuid);
	cr_assert_eq(ft_wlog_page_open(&pg, other), FT_WLOG_PAGE_CORRUPT);
	memset(&pg, 0, sizeof(pg));
	cr_assert_eq(ft_wlog_page_open(&pg, uuid), FT_WLOG_PAGE_BLANK);
}

Test(wlog, impossible_records_are_refused_even_with_a_good_crc)
{
	struct ft_wlog_page pg;

	sample(&pg);
	pg.recs[0].length = 512; /* DATA is always a whole block */
	ft_wlog_page_seal(&pg, uuid);
	cr_assert_eq(ft_wlog_page_open(&pg, uuid), FT_WLOG_PAGE_CORRUPT);
	sample(&pg);
	pg.ndata = 3; /* does not match the DATA records */
	ft_wlog_page_seal(&pg, uuid);
	cr_assert_eq(ft_wlog_page_open(&pg, uuid), FT_WLOG_PAGE_CORRUPT);
	sample(&pg);
	pg.recs[1].volume = 8; /* another volume's record in this volume's page */
	ft_wlog_page_seal(&pg, uuid);
	cr_assert_eq(ft_wlog_page_open(&pg, uuid), FT_WLOG_PAGE_CORRUPT);
	sample(&pg);
	pg.recs[1].type = 9;
	ft_wlog_page_seal(&pg, uuid);
	cr_assert_eq(ft_wlog_page_open(&pg, uuid), FT_WLOG_PAGE_CORRUPT);
}

/* The dirty map against a plain array, through growth and backward-shift deletes. */
Test(wlog, dirty_map_agrees_with_a_reference)
{
	enum { N = 20000 };
	static uint64_t ref[N]; /* seq + 1 per block, 0 = absent */
	struct wb_map m;
	uint64_t x = 88172645463325252ull;
	uint32_t count = 0;

	cr_assert_eq(wb_map_init(&m, 16), 0);
	memset(ref, 0, sizeof(ref));
	for (int i = 0; i < 400000; i++) {
		uint64_t b;
		struct wb_ent *e;

		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		/* Clustered keys make long probe runs, where deletes can go wrong. */
		b = (x % 4 == 0) ? (x >> 8) % N : ((x >> 8) % 64) * 313 % N;
		e = wb_map_find(&m, b);
		cr_assert_eq(e != NULL, ref[b] != 0, "block %llu at step %d",
			     (unsigned long long)b, i);
		if (e)
			cr_assert_eq(e->seq + 1, ref[b]);
		if ((x >> 40) % 3 == 0) {
			if (e) {
				wb_map_del(&m, e);
				ref[b] = 0;
				count--;
			}
		} else {
			e = wb_map_get(&m, b);
			cr_assert_not_null(e);
			if (!ref[b])
				count++;
			e->seq = (uint64_t)i;
			ref[b] = (uint64_t)i + 1;
		}
		cr_assert_eq(m.n, count);
	}
	for (uint64_t b = 0; b < N; b++) {
		struct wb_ent *e = wb_map_find(&m, b);

		cr_assert_eq(e != NULL, ref[b] != 0, "block %llu at the end", (unsigned long long)b);
	}
	free(m.t);
}
