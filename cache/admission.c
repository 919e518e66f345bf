/* SPDX-License-Identifier: MIT */
#include <string.h>

#include "flashtier/admission.h"

void ft_seqdetect_init(struct ft_seqdetect *d, uint64_t cutoff)
{
	memset(d, 0, sizeof(*d));
	d->cutoff = cutoff;
}

bool ft_seqdetect_admit(struct ft_seqdetect *d, uint64_t offset, uint64_t len)
{
	struct ft_seq_stream *s, *lru = &d->s[0];

	if (d->cutoff == 0)
		return true;
	d->clock++;
	for (unsigned i = 0; i < FT_SEQ_STREAMS; i++) {
		s = &d->s[i];
		if (s->run && s->next == offset) {
			s->run += len;
			s->next = offset + len;
			s->last_use = d->clock;
			/* Admit up to the cutoff: a short sequential read is still worth caching. */
			return s->run <= d->cutoff;
		}
		if (s->last_use < lru->last_use)
			lru = s;
	}
	/* A new stream replaces the least recently used one. */
	lru->next = offset + len;
	lru->run = len;
	lru->last_use = d->clock;
	return len <= d->cutoff;
}
