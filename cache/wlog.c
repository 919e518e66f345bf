/* SPDX-License-Identifier: MIT */
/* Write-back log pages: encoding and validation (format in wlog.h). */
#include <endian.h>
#include <string.h>

#include "flashtier/crc32c.h"
#include "flashtier/wlog.h"

static uint32_t page_crc(const struct ft_wlog_page *pg, const uint8_t uuid[16])
{
	return ft_crc32c(ft_crc32c(0, uuid, 16), pg, offsetof(struct ft_wlog_page, crc));
}

static void rec_swap(struct ft_wlog_rec *r, bool to_le)
{
	if (to_le) {
		r->offset = htole64(r->offset);
		r->length = htole32(r->length);
		r->data_crc = htole32(r->data_crc);
		r->seq = htole64(r->seq);
		r->volume = htole16(r->volume);
	} else {
		r->offset = le64toh(r->offset);
		r->length = le32toh(r->length);
		r->data_crc = le32toh(r->data_crc);
		r->seq = le64toh(r->seq);
		r->volume = le16toh(r->volume);
	}
}

static void page_swap(struct ft_wlog_page *pg, bool to_le)
{
	uint16_t n = to_le ? pg->nrecs : le16toh(pg->nrecs);

	if (to_le) {
		pg->version = htole32(pg->version);
		pg->volume = htole16(pg->volume);
		pg->nrecs = htole16(pg->nrecs);
		pg->epoch = htole32(pg->epoch);
		pg->ndata = htole32(pg->ndata);
		pg->seg_seq = htole64(pg->seg_seq);
		pg->page_seq = htole64(pg->page_seq);
		pg->durable_seq = htole64(pg->durable_seq);
		pg->tail_seg = htole64(pg->tail_seg);
	} else {
		pg->version = le32toh(pg->version);
		pg->volume = le16toh(pg->volume);
		pg->nrecs = le16toh(pg->nrecs);
		pg->epoch = le32toh(pg->epoch);
		pg->ndata = le32toh(pg->ndata);
		pg->seg_seq = le64toh(pg->seg_seq);
		pg->page_seq = le64toh(pg->page_seq);
		pg->durable_seq = le64toh(pg->durable_seq);
		pg->tail_seg = le64toh(pg->tail_seg);
	}
	for (uint16_t i = 0; i < n && i < FT_WLOG_RECS_PER_PAGE; i++)
		rec_swap(&pg->recs[i], to_le);
}

void ft_wlog_page_seal(struct ft_wlog_page *pg, const uint8_t uuid[16])
{
	memcpy(pg->magic, FT_WLOG_MAGIC, sizeof(pg->magic));
	pg->version = FT_WLOG_VERSION;
	page_swap(pg, true);
	pg->crc = htole32(page_crc(pg, uuid));
}

enum ft_wlog_page_state ft_wlog_page_open(struct ft_wlog_page *pg, const uint8_t uuid[16])
{
	uint32_t ndata = 0;

	if (memcmp(pg->magic, FT_WLOG_MAGIC, sizeof(pg->magic)) != 0)
		return FT_WLOG_PAGE_BLANK;
	if (le32toh(pg->crc) != page_crc(pg, uuid)) {
		/* Another device's (or an older format's) page is not ours at all. */
		return FT_WLOG_PAGE_CORRUPT;
	}
	page_swap(pg, false);
	if (pg->version != FT_WLOG_VERSION || pg->nrecs > FT_WLOG_RECS_PER_PAGE)
		return FT_WLOG_PAGE_CORRUPT;
	for (uint16_t i = 0; i < pg->nrecs; i++) {
		const struct ft_wlog_rec *r = &pg->recs[i];

		if (r->volume != pg->volume || r->length == 0 || r->offset % 512 ||
		    r->offset + r->length < r->offset)
			return FT_WLOG_PAGE_CORRUPT;
		switch (r->type) {
		case FT_WLOG_DATA:
			if (r->offset % FT_CACHE_BLOCK || r->length != FT_CACHE_BLOCK)
				return FT_WLOG_PAGE_CORRUPT;
			ndata++;
			break;
		case FT_WLOG_ZERO:
		case FT_WLOG_TRIM:
			if (r->offset % FT_CACHE_BLOCK || r->length % FT_CACHE_BLOCK)
				return FT_WLOG_PAGE_CORRUPT;
			break;
		default:
			return FT_WLOG_PAGE_CORRUPT;
		}
	}
	if (ndata != pg->ndata || 1 + ndata > FT_WLOG_SEG_BLOCKS)
		return FT_WLOG_PAGE_CORRUPT;
	return FT_WLOG_PAGE_VALID;
}
