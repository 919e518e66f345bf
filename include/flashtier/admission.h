/* SPDX-License-Identifier: MIT */
/*
 * Admission: keep long sequential streams (backups, scans, copies) out of
 * the cache. A per-volume detector follows up to FT_SEQ_STREAMS concurrent
 * streams; once a stream has run for @cutoff bytes in a row, the rest of it
 * bypasses the cache (reads are served from the backing store and not
 * filled). The cutoff is a per-volume policy value (default 1 MiB; 0 turns
 * the detector off).
 *
 * A scan rarely has the volume to itself: a backup's requests arrive between
 * the VM's own random ones. Each request that continues no stream takes an
 * entry, so random requests would push a live stream out of a plain LRU
 * table before its next request came, and the scan would never be seen as
 * one. Hence an entry that has proved to be a stream (it was continued, or
 * its first request was FT_SEQ_PROVEN bytes or more) is only replaced by
 * another proved stream, or once it has been idle for FT_SEQ_IDLE requests;
 * unproved entries (random requests, so far) replace each other.
 *
 * Threads: a detector belongs to its volume's reactor; no locking.
 */
#ifndef FLASHTIER_ADMISSION_H
#define FLASHTIER_ADMISSION_H

#include <stdbool.h>
#include <stdint.h>

#define FT_SEQ_STREAMS        16
#define FT_SEQ_DEFAULT_CUTOFF (1u << 20)
#define FT_SEQ_PROVEN         (64u << 10) /* a first request this large is a stream */
#define FT_SEQ_IDLE           4096u       /* requests after which a stream is dead */

struct ft_seq_stream {
	uint64_t next;     /* byte offset the stream would continue at */
	uint64_t run;      /* bytes it has run so far (0: the entry is unused) */
	uint64_t last_use; /* for replacing the least recently used entry */
	bool proven;       /* continued at least once, or began with a large request */
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
