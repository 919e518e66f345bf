/* SPDX-License-Identifier: MIT */
/*
 * Admission: keep long sequential streams (backups, scans, copies) out of
 * the cache. A per-volume detector follows up to FT_SEQ_STREAMS concurrent
 * streams; once a stream has run for @cutoff bytes in a row, the rest of it
 * bypasses the cache (reads are served from the backing store and not
 * filled). The cutoff is a per-volume policy value (default 1 MiB; 0 turns
 * the detector off).
 *
 * Threads: a detector belongs to its volume's reactor; no locking.
 */
#ifndef FLASHTIER_ADMISSION_H
#define FLASHTIER_ADMISSION_H

#include <stdbool.h>
#include <stdint.h>

#define FT_SEQ_STREAMS        8
#define FT_SEQ_DEFAULT_CUTOFF (1u << 20)

struct ft_seq_stream {
	uint64_t next;     /* byte offset the stream would continue at */
	uint64_t run;      /* bytes it has run so far */
	uint64_t last_use; /* for replacing the least recently used stream */
};

struct ft_seqdetect {
	uint64_t cutoff;
	uint64_t clock;
	struct ft_seq_stream s[FT_SEQ_STREAMS];
};

void ft_seqdetect_init(struct ft_seqdetect *d, uint64_t cutoff);

/*
 * Account an access of @len bytes at @offset. Returns true if it should be
 * admitted to the cache, false if it belongs to a stream past the cutoff.
 */
bool ft_seqdetect_admit(struct ft_seqdetect *d, uint64_t offset, uint64_t len);

#endif
