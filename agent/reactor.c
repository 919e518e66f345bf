/* SPDX-License-Identifier: MIT */
#include <stddef.h>
#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "flashtier/log.h"
#include "flashtier/reactor.h"

#define RING_ENTRIES 1024

struct ft_reactor {
	unsigned id;
	pthread_t thread;
	struct io_uring ring;
	sem_t ready;
	int start_error;

	/* Cross-thread mailbox: the only lock, off the per-request path. */
	pthread_mutex_t mbox_lock;
	struct ft_msg *mbox;
	int wake_fd;
	uint64_t wake_buf;
	struct ft_completion wake_c;

	struct ft_deferred *deferred;
	unsigned holds;
	bool stopping;
	struct ft_msg stop_msg;
};

void (*ft_reactor_on_stop)(struct ft_reactor *r);

static __thread struct ft_reactor *current_reactor;

uint64_t ft_now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

unsigned ft_reactor_id(const struct ft_reactor *r)
{
	return r->id;
}

struct ft_reactor *ft_reactor_self(void)
{
	return current_reactor;
}

struct io_uring_sqe *ft_reactor_sqe(struct ft_reactor *r, struct ft_completion *c)
{
	struct io_uring_sqe *sqe;

	while (!(sqe = io_uring_get_sqe(&r->ring))) {
		int rc = io_uring_submit(&r->ring);

		if (rc < 0 && rc != -EAGAIN && rc != -EBUSY && rc != -EINTR) {
			/* Only on a kernel bug or exhausted memory: nothing sane left to do. */
			ft_err("reactor %u: io_uring_submit: %s", r->id, strerror(-rc));
			abort();
		}
	}
	io_uring_sqe_set_data(sqe, c);
	return sqe;
}

static void arm_wake(struct ft_reactor *r)
{
	struct io_uring_sqe *sqe = ft_reactor_sqe(r, &r->wake_c);

	io_uring_prep_read(sqe, r->wake_fd, &r->wake_buf, sizeof(r->wake_buf), 0);
}

static void on_wake(struct ft_completion *c, int res, uint32_t flags)
{
	struct ft_reactor *r = (struct ft_reactor *)((char *)c - offsetof(struct ft_reactor, wake_c));

	(void)flags;
	if (res < 0 && res != -EINTR && res != -EAGAIN)
		ft_warn("reactor %u: wake read: %s", r->id, strerror(-res));
	arm_wake(r);
}

void ft_reactor_post(struct ft_reactor *r, struct ft_msg *m)
{
	uint64_t one = 1;
	bool was_empty;

	pthread_mutex_lock(&r->mbox_lock);
	/* LIFO push; run_mailbox() reverses to keep posting order. */
	m->next = r->mbox;
	was_empty = r->mbox == NULL;
	r->mbox = m;
	pthread_mutex_unlock(&r->mbox_lock);
	if (was_empty && write(r->wake_fd, &one, sizeof(one)) < 0)
		ft_warn("reactor %u: wake write: %s", r->id, strerror(errno));
}

static void run_mailbox(struct ft_reactor *r)
{
	struct ft_msg *list, *rev = NULL;

	pthread_mutex_lock(&r->mbox_lock);
	list = r->mbox;
	r->mbox = NULL;
	pthread_mutex_unlock(&r->mbox_lock);
	while (list) {
		struct ft_msg *next = list->next;

		list->next = rev;
		rev = list;
		list = next;
	}
	while (rev) {
		struct ft_msg *next = rev->next;

		rev->fn(r, rev);
		rev = next;
	}
}

void ft_reactor_defer(struct ft_reactor *r, struct ft_deferred *d)
{
	if (d->queued)
		return;
	d->queued = true;
	d->next = r->deferred;
	r->deferred = d;
}

static void run_deferred(struct ft_reactor *r)
{
	while (r->deferred) {
		struct ft_deferred *d = r->deferred;

		r->deferred = d->next;
		d->queued = false;
		d->fn(d);
	}
}

static void on_timer(struct ft_completion *c, int res, uint32_t flags)
{
	struct ft_timer *t = (struct ft_timer *)c;

	(void)flags;
	t->armed = false;
	if (res == -ETIME || res == 0)
		t->fn(t);
}

void ft_timer_arm(struct ft_reactor *r, struct ft_timer *t, uint64_t ns)
{
	struct io_uring_sqe *sqe;

	t->c.fn = on_timer;
	t->ts.tv_sec = (long long)(ns / 1000000000ull);
	t->ts.tv_nsec = (long long)(ns % 1000000000ull);
	t->armed = true;
	sqe = ft_reactor_sqe(r, &t->c);
	io_uring_prep_timeout(sqe, &t->ts, 0, 0);
}

void ft_reactor_hold(struct ft_reactor *r)
{
	r->holds++;
}

void ft_reactor_release(struct ft_reactor *r)
{
	r->holds--;
}

bool ft_reactor_stopping(const struct ft_reactor *r)
{
	return r->stopping;
}

static void on_stop_msg(struct ft_reactor *r, struct ft_msg *m)
{
	(void)m;
	if (r->stopping)
		return;
	r->stopping = true;
	if (ft_reactor_on_stop)
		ft_reactor_on_stop(r);
}

static int ring_init(struct ft_reactor *r)
{
	struct io_uring_params p;
	int rc;

	/* Fastest mode first (kernel >= 6.1), then plainer ones for old kernels. */
	static const unsigned flag_sets[] = {
		IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_SUBMIT_ALL,
		IORING_SETUP_COOP_TASKRUN | IORING_SETUP_SUBMIT_ALL,
		0,
	};
	for (unsigned i = 0; i < sizeof(flag_sets) / sizeof(flag_sets[0]); i++) {
		memset(&p, 0, sizeof(p));
		p.flags = flag_sets[i] | IORING_SETUP_CQSIZE;
		p.cq_entries = RING_ENTRIES * 8;
		rc = io_uring_queue_init_params(RING_ENTRIES, &r->ring, &p);
		if (rc != -EINVAL)
			break;
	}
	return rc;
}

static void *reactor_main(void *arg)
{
	struct ft_reactor *r = arg;
	int rc;

	current_reactor = r;
	rc = ring_init(r);
	r->start_error = rc;
	sem_post(&r->ready);
	if (rc < 0)
		return NULL;

	r->wake_c.fn = on_wake;
	arm_wake(r);
	for (;;) {
		struct io_uring_cqe *cqe;

		run_mailbox(r);
		run_deferred(r);
		if (r->stopping && r->holds == 0)
			break;
		rc = io_uring_submit_and_wait(&r->ring, 1);
		if (rc < 0 && rc != -EINTR && rc != -EAGAIN && rc != -EBUSY && rc != -ETIME) {
			ft_err("reactor %u: io_uring_submit_and_wait: %s", r->id, strerror(-rc));
			abort();
		}
		while (io_uring_peek_cqe(&r->ring, &cqe) == 0) {
			struct ft_completion *c = io_uring_cqe_get_data(cqe);
			int res = cqe->res;
			uint32_t flags = cqe->flags;

			io_uring_cqe_seen(&r->ring, cqe);
			if (c)
				c->fn(c, res, flags);
		}
	}
	/* Flush SQEs that callbacks queued on the way out. */
	io_uring_submit(&r->ring);
	return NULL;
}

int ft_reactors_start(unsigned n, struct ft_reactor ***out)
{
	struct ft_reactor **rs = calloc(n, sizeof(*rs));
	unsigned started = 0;
	int rc = 0;

	if (!rs)
		return -ENOMEM;
	for (unsigned i = 0; i < n; i++) {
		struct ft_reactor *r = calloc(1, sizeof(*r));

		if (!r) {
			rc = -ENOMEM;
			break;
		}
		r->id = i;
		pthread_mutex_init(&r->mbox_lock, NULL);
		sem_init(&r->ready, 0, 0);
		r->wake_fd = eventfd(0, EFD_CLOEXEC);
		if (r->wake_fd < 0) {
			rc = -errno;
			free(r);
			break;
		}
		rs[i] = r;
		rc = -pthread_create(&r->thread, NULL, reactor_main, r);
		if (rc < 0) {
			close(r->wake_fd);
			free(r);
			rs[i] = NULL;
			break;
		}
		sem_wait(&r->ready);
		started++;
		if (r->start_error < 0) {
			rc = r->start_error;
			ft_err("reactor %u: io_uring setup failed: %s", i, strerror(-rc));
			break;
		}
	}
	if (rc < 0) {
		ft_reactors_stop_and_join(rs, started);
		return rc;
	}
	*out = rs;
	return 0;
}

void ft_reactors_stop_and_join(struct ft_reactor **rs, unsigned n)
{
	for (unsigned i = 0; i < n; i++) {
		if (!rs[i])
			continue;
		rs[i]->stop_msg.fn = on_stop_msg;
		ft_reactor_post(rs[i], &rs[i]->stop_msg);
	}
	for (unsigned i = 0; i < n; i++) {
		struct ft_reactor *r = rs[i];

		if (!r)
			continue;
		pthread_join(r->thread, NULL);
		if (r->start_error == 0)
			io_uring_queue_exit(&r->ring);
		close(r->wake_fd);
		pthread_mutex_destroy(&r->mbox_lock);
		sem_destroy(&r->ready);
		free(r);
	}
	free(rs);
}
