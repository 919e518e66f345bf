/* SPDX-License-Identifier: MIT */
/*
 * A volume: one VM disk, exported under one NBD name, owned by one reactor.
 *
 * Created and destroyed by the main thread while no reactor serves it;
 * between ft_volume_attach() and the owning reactor's stop, it is touched
 * only from the owning reactor's thread (statistics are also read, with
 * relaxed atomics, by the metrics thread).
 */
#ifndef FLASHTIER_VOLUME_H
#define FLASHTIER_VOLUME_H

#include <stdint.h>

#include "flashtier/backend.h"
#include "flashtier/config.h"
#include "flashtier/metrics.h"
#include "flashtier/reactor.h"

struct ft_volume {
	const struct ft_volume_config *cfg; /* borrowed from the config */
	struct ft_backend *backend;
	struct ft_reactor *reactor;
	uint64_t size;
	uint32_t min_block;   /* advertised NBD minimum block size */
	uint32_t pref_block;  /* advertised NBD preferred block size */
	uint32_t max_payload; /* advertised NBD maximum payload */
	uint16_t eflags;      /* NBD transmission flags, without per-connection ones */
	struct ft_volume_stats stats;
	unsigned error_log_budget;     /* backend errors still loggable this second */
	unsigned error_log_suppressed; /* backend errors not logged this second */
	uint64_t error_log_second;
	struct ft_msg attach_msg;
};

/*
 * Open the volume's backing store and derive what it advertises. Main
 * thread; blocks. Returns 0 and *@out, or a negative errno after logging.
 */
int ft_volume_open(const struct ft_volume_config *cfg, struct ft_volume **out);

/* Post the volume to its owning reactor @r; attaches the backend there. */
void ft_volume_attach(struct ft_volume *v, struct ft_reactor *r);

/* Close the backing store (flushing it) and free. Main thread, reactor stopped. */
void ft_volume_close(struct ft_volume *v);

#endif
