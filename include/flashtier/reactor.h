/* SPDX-License-Identifier: MIT */
/*
 * Reactors: one thread per core, each with its own io_uring.
 *
 * Every object on the data path (volume, connection, backend) is owned by
 * exactly one reactor and is touched only from that reactor's thread, so the
 * per-request path takes no lock. The only cross-thread entry point is
 * ft_reactor_post(), used for rare events (handing a connection to its
 * volume's reactor, shutdown).
 *
 * Completions: every SQE carries a pointer to a struct ft_completion as its
 * user_data; when the CQE arrives, the reactor calls c->fn(c, res, flags) on
 * its own thread. The completion (usually embedded in a larger struct) must
 * stay valid until its callback has run; the callback fires exactly once per
 * SQE, on success and on failure alike (res < 0 is a negative errno).
 */
#ifndef FLASHTIER_REACTOR_H
#define FLASHTIER_REACTOR_H

#include <liburing.h>
#include <stdbool.h>
#include <stdint.h>

struct ft_reactor;

struct ft_completion {
	void (*fn)(struct ft_completion *c, int res, uint32_t cqe_flags);
};

/* A message for ft_reactor_post(); fn runs on the target reactor's thread. */
struct ft_msg {
	struct ft_msg *next;
	void (*fn)(struct ft_reactor *r, struct ft_msg *m);
};

/*
 * Work to run on the reactor thread after the current batch of completions
 * and before the reactor sleeps (e.g. re-arming a poll after a library call
 * changed what it waits for). Scheduling it twice before it runs is a no-op.
 */
struct ft_deferred {
	struct ft_deferred *next;
	bool queued;
	void (*fn)(struct ft_deferred *d);
};

/* A one-shot relative timer. */
struct ft_timer {
	struct ft_completion c;
	struct __kernel_timespec ts;
	void (*fn)(struct ft_timer *t); /* called on expiry only, not on cancel */
	bool armed;
};

/*
 * Create @n reactors and start their threads. Each creates its ring on its
 * own thread. Returns 0 or a negative errno (then nothing is left running).
 * Main thread only.
 */
int ft_reactors_start(unsigned n, struct ft_reactor ***out);

/*
 * Ask every reactor to stop once it has nothing left to do (see
 * ft_reactor_hold()), then join and free them. Main thread only.
 */
void ft_reactors_stop_and_join(struct ft_reactor **rs, unsigned n);

unsigned ft_reactor_id(const struct ft_reactor *r);

/* The reactor running on the calling thread, or NULL. */
struct ft_reactor *ft_reactor_self(void);

/*
 * Get an SQE whose completion will call @c. Never returns NULL: when the SQ
 * is full it submits first. Reactor thread only.
 */
struct io_uring_sqe *ft_reactor_sqe(struct ft_reactor *r, struct ft_completion *c);

/* Post @m to @r from any thread. @m must stay valid until m->fn runs. */
void ft_reactor_post(struct ft_reactor *r, struct ft_msg *m);

/* Reactor thread only. */
void ft_reactor_defer(struct ft_reactor *r, struct ft_deferred *d);

/* Arm @t to fire after @ns nanoseconds. Reactor thread only. */
void ft_timer_arm(struct ft_reactor *r, struct ft_timer *t, uint64_t ns);

/*
 * Keep @r alive across ft_reactors_stop_and_join() while something it owns
 * (a connection, a drain) is still busy. Reactor thread only.
 */
void ft_reactor_hold(struct ft_reactor *r);
void ft_reactor_release(struct ft_reactor *r);

/* True once a stop was requested. Reactor thread only. */
bool ft_reactor_stopping(const struct ft_reactor *r);

/*
 * Called on each reactor's thread when a stop is requested (e.g. the NBD
 * server drains connections). Set once by the main thread before
 * ft_reactors_start().
 */
extern void (*ft_reactor_on_stop)(struct ft_reactor *r);

/* Monotonic clock in nanoseconds. */
uint64_t ft_now_ns(void);

#endif
