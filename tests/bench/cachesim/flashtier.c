// SPDX-License-Identifier: MIT
/*
 * The agent's own policy, linked from build/libflashtier.a: the cache
 * directory (ft_cachedir_*, S3-FIFO) behind the sequential-cutoff admission
 * (ft_seqdetect_*, cutoff FT_SEQ_DEFAULT_CUTOFF = 1 MiB).
 *
 * Each access is a 4 KiB read at byte offset block * 4096 of volume 1. The
 * detector sees every access (hit or miss). A miss the detector rejects is
 * served from the backing store and not inserted (a bypass); an admitted
 * miss is inserted. "flashtier-noadm" is the directory alone.
 */
#include <stdlib.h>

#include "cachesim.h"
#include "flashtier/admission.h"
#include "flashtier/cachedir.h"

#define SIM_VOLUME 1

struct ftpol {
	struct ft_cachedir *dir;
	struct ft_seqdetect sd;
	bool admission;
	uint64_t evicted, bypassed;
};

static void *ft_create_common(uint64_t cap, bool admission)
{
	struct ftpol *f = calloc(1, sizeof(*f));

	if (!f)
		return NULL;
	if (cap >= UINT32_MAX || ft_cachedir_create((uint32_t)cap, &f->dir)) {
		free(f);
		return NULL;
	}
	ft_seqdetect_init(&f->sd, FT_SEQ_DEFAULT_CUTOFF);
	f->admission = admission;
	return f;
}

static void *ft_create(uint64_t cap)
{
	return ft_create_common(cap, true);
}

static void *ft_create_noadm(uint64_t cap)
{
	return ft_create_common(cap, false);
}

static void ft_destroy(void *p)
{
	struct ftpol *f = p;

	if (!f)
		return;
	ft_cachedir_destroy(f->dir);
	free(f);
}

static bool ft_access(void *p, uint64_t block, uint32_t size)
{
	struct ftpol *f = p;
	ft_cache_key key = FT_CACHE_KEY(SIM_VOLUME, block);
	bool admit = true, evicted = false;
	ft_cache_key victim;

	if (f->admission)
		admit = ft_seqdetect_admit(&f->sd, block * BLOCK_SIZE, size);
	if (ft_cachedir_lookup(f->dir, key) != FT_CACHEDIR_NONE)
		return true;
	/* A bypassed block seen again while remembered is reuse: admit it. */
	if (!admit && ft_cachedir_returning(f->dir, key))
		admit = true;
	if (!admit) {
		ft_cachedir_note_bypass(f->dir, key);
		f->bypassed++;
		return false;
	}
	if (ft_cachedir_insert(f->dir, key, &evicted, &victim) == FT_CACHEDIR_NONE)
		f->bypassed++; /* every slot pinned: cannot happen here (nothing is pinned) */
	f->evicted += evicted;
	return false;
}

static void ft_stats(void *p, struct pstats *st)
{
	struct ftpol *f = p;

	st->used = ft_cachedir_used(f->dir);
	st->evicted = f->evicted;
	st->bypassed = f->bypassed;
	st->memory = ft_cachedir_memory(f->dir); /* every array the directory allocated */
}

const struct policy_ops flashtier_ops = {
	.name = "flashtier",
	.create = ft_create,
	.access = ft_access,
	.destroy = ft_destroy,
	.stats = ft_stats,
};

const struct policy_ops flashtier_noadm_ops = {
	.name = "flashtier-noadm",
	.create = ft_create_noadm,
	.access = ft_access,
	.destroy = ft_destroy,
	.stats = ft_stats,
};
