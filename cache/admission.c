/* SPDX-License-Identifier: MIT */
#include <string.h>

#include "flashtier/admission.h"

void ft_seqdetect_init(struct ft_seqdetect *d, uint64_t cutoff)
{
	memset(d, 0, sizeof(*d));
	d->cutoff = cutoff;
}

/*
 * The entry a new stream takes: an unused one; else the least recently used
 * entry that is unproved or idle; else (every entry is a live stream) the
 * least recently used, if @proven, or none.
 */
static struct ft_seq_stream *victim(struct ft_seqdetect *d, bool proven)
{
	struct ft_seq_stream *open = NULL, *any = NULL;

	for (unsigned i = 0; i < FT_SEQ_STREAMS; i++) {
		struct ft_seq_stream *s = &d->s[i];

		if (!s->run)
			return s;
		if ((!s->proven || d->clock - s->last_use > FT_SEQ_IDLE) &&
		    (!open || s->last_use < open->last_use))
			open = s;
		if (!any || s->last_use < any->last_use)
			any = s;
	}
	return open ? open : proven ? any : NULL;
}

bool ft_seqdetect_admit(struct ft_seqdetect *d, uint64_t offset, uint64_t len)
{
	struct ft_seq_stream *s;
	bool proven = len >= FT_SEQ_PROVEN;

	if (d->cutoff == 0)
		return true;
	d->clock++;
	for (unsigned i = 0; i < FT_SEQ_STREAMS; i++) {
		s = &d->s[i];
		if (s->run && s->next == offset) {
			s->run += len;
			s->next = offset + len;
			s->last_use = d->clock;
			s->proven = true;
			/* Admit up to the cutoff: a short sequential read is still worth caching.
			 */
			return s->run <= d->cutoff;
		}
	}
	/* A new stream (or a random request, for all we know yet). */
	s = victim(d, proven);
	if (s) {
		s->next = offset + len;
		s->run = len;
		s->last_use = d->clock;
		s->proven = proven;
	}
	return len <= d->cutoff;
}
