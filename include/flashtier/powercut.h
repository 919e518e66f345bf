/* SPDX-License-Identifier: MIT */
/*
 * A test hook: simulated power loss of the cache device.
 *
 * Enabled only by the environment variable FLASHTIER_TEST_POWERCUT
 * ("N" or "N:tear", read once): the cache device's data-path handles then
 * keep every write not yet covered by a completed FLUSH in RAM (reads see
 * them), apply them to the file in order when a FLUSH arrives, and at the
 * N-th device write the process exits at once (status 86), losing every
 * unflushed write; with ":tear" a prefix of that N-th write (whole 512-byte
 * sectors) reaches the file first. "0" only counts. A line
 * "powercut: W device writes, F flushes" goes to stderr at exit.
 */
#ifndef FLASHTIER_POWERCUT_H
#define FLASHTIER_POWERCUT_H

#include "flashtier/backend.h"

/*
 * Wrap the cache device handle *@dev if the hook is enabled (the wrapper
 * owns the original); otherwise leave it alone. Main thread, before the
 * reactors start. Returns 0 or a negative errno.
 */
int ft_powercut_wrap(struct ft_backend **dev);

#endif
