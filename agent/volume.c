/* SPDX-License-Identifier: MIT */
#include <stddef.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "flashtier/log.h"
#include "flashtier/nbd_proto.h"
#include "flashtier/volume.h"

/*
 * The minimum block size we advertise: 512 bytes (the sector every VM disk
 * uses, and the granularity the cache tracks), raised to what the store
 * needs. A store whose size is not a multiple of it would hide its tail, so
 * such a volume advertises the store's own minimum instead.
 */
static uint32_t pick_min_block(const struct ft_backend *b)
{
	uint32_t m = b->min_block > 512 ? b->min_block : 512;

	if (m > (1u << NBD_MAX_BLOCK_SHIFT))
		m = 1u << NBD_MAX_BLOCK_SHIFT;
	if (b->size % m != 0)
		m = b->min_block;
	return m;
}

int ft_volume_open(const struct ft_volume_config *cfg, struct ft_volume **out)
{
	struct ft_volume *v = calloc(1, sizeof(*v));
	struct ft_backend *b;
	uint32_t caps;
	int rc;

	if (!v)
		return -ENOMEM;
	rc = ft_backend_open(cfg, &b);
	if (rc < 0) {
		ft_err("volume '%s': cannot open backing store %s", cfg->name, cfg->backing);
		free(v);
		return rc;
	}
	caps = b->caps;
	v->cfg = cfg;
	v->backend = b;
	v->size = b->size;
	v->min_block = pick_min_block(b);
	v->pref_block = v->min_block > 4096 ? v->min_block : 4096;
	v->max_payload = NBD_MAX_PAYLOAD;

	/* Flags tell the truth: only what this volume really does. */
	v->eflags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA |
		    NBD_FLAG_SEND_CACHE;
	if (caps & FT_BACKEND_READ_ONLY) {
		v->eflags |= NBD_FLAG_READ_ONLY;
	} else {
		v->eflags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
		if (caps & FT_BACKEND_CAN_FAST_ZERO)
			v->eflags |= NBD_FLAG_SEND_FAST_ZERO;
	}
	if (caps & FT_BACKEND_FLUSH_COVERS_ALL)
		v->eflags |= NBD_FLAG_CAN_MULTI_CONN;
	if (caps & FT_BACKEND_ROTATIONAL)
		v->eflags |= NBD_FLAG_ROTATIONAL;
	*out = v;
	return 0;
}

static void on_attach(struct ft_reactor *r, struct ft_msg *m)
{
	struct ft_volume *v = (struct ft_volume *)((char *)m - offsetof(struct ft_volume, attach_msg));
	int rc = v->backend->ops->attach(v->backend, r);

	if (rc < 0)
		ft_err("volume '%s': attach to reactor %u failed: %s", v->cfg->name,
		       ft_reactor_id(r), strerror(-rc));
}

void ft_volume_attach(struct ft_volume *v, struct ft_reactor *r)
{
	v->reactor = r;
	v->attach_msg.fn = on_attach;
	ft_reactor_post(r, &v->attach_msg);
}

void ft_volume_close(struct ft_volume *v)
{
	if (!v)
		return;
	v->backend->ops->close(v->backend);
	free(v);
}
