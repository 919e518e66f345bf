/* SPDX-License-Identifier: MIT */
/*
 * The NBD server: fixed newstyle handshake and transmission phase, serving
 * each volume on its owning reactor.
 *
 * Connections are accepted and negotiated on reactor 0, then handed to the
 * reactor that owns the chosen volume; from there on every request of that
 * connection runs on that reactor only.
 *
 * Threads: ft_nbd_server_create()/_start()/_destroy() on the main thread;
 * ft_nbd_server_drain() runs on each reactor's thread as it stops.
 */
#ifndef FLASHTIER_NBD_SERVER_H
#define FLASHTIER_NBD_SERVER_H

#include <stddef.h>
#include <stdint.h>

#include "flashtier/config.h"
#include "flashtier/metrics.h"
#include "flashtier/reactor.h"
#include "flashtier/volume.h"

struct ft_nbd_server;

/*
 * Bind and listen on @addr. A stale unix socket left by a dead agent is
 * replaced; one that still answers is an error (-EADDRINUSE). @vols and
 * @reactors are borrowed and must outlive the server. Returns 0 or a
 * negative errno after logging.
 */
int ft_nbd_server_create(const struct ft_listen_addr *addr, struct ft_volume **vols, size_t n_vols,
			 struct ft_reactor **reactors, unsigned n_reactors,
			 struct ft_server_stats *stats, struct ft_nbd_server **out);

/* Start accepting (on reactor 0). */
void ft_nbd_server_start(struct ft_nbd_server *s);

/*
 * On reactor @r's thread, at stop: stop accepting, finish in-flight
 * requests of every connection the reactor owns, answer nothing new, and
 * close each connection once its replies are sent. Holds the reactor until
 * then (bounded by a drain timeout).
 */
void ft_nbd_server_drain(struct ft_reactor *r);

/* Close the listening socket (and remove a unix socket). Main thread, after the reactors stopped. */
void ft_nbd_server_destroy(struct ft_nbd_server *s);

/*
 * The one place where an internal error (negative errno) becomes an NBD
 * wire error. Callers log the real cause first.
 */
uint32_t ft_nbd_errno_to_wire(int err);

#endif
