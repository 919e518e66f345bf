/* SPDX-License-Identifier: MIT */
/*
 * Simulated power loss of the cache device (see powercut.h): a test hook,
 * enabled only by FLASHTIER_TEST_POWERCUT.
 *
 * Every wrapped handle (one per reactor) shares one state under a mutex and
 * does its I/O synchronously with pread/pwrite on its own descriptor of the
 * cache file; the inner file backend is kept for its geometry (size, caps,
 * min_block, max_request), attach() and close(). Completions are delivered on
 * the owning reactor's thread through ft_reactor_defer(), after submit() has
 * returned, as a real asynchronous device would.
 *
 * What a power cut loses is kept as an undo log rather than as a redo log:
 * a WRITE goes to the file at once, and the layer keeps the content it
 * replaced (its pre-image) until a FLUSH covers it. At the crash the
 * pre-images are written back newest first, which restores exactly the
 * content of the last FLUSH; FUA writes are then applied again in order;
 * then (":tear") a prefix of the N-th write. The file then holds what a
 * redo log ("keep unflushed writes in RAM, apply them at FLUSH") would have
 * left: flushed writes, FUA writes, the torn prefix, nothing else. The undo
 * form has one property the redo form lacks: the file always holds every
 * completed write, as the page cache would, so the cache's own blocking
 * I/O on its other descriptor (record pages written at a clean shutdown,
 * after the reactors stopped) lands on top of them instead of being
 * overwritten by older unflushed writes when the handles close. Reads need
 * no overlay either.
 *
 * A FLUSH covers every write submitted before it (they are all complete in
 * this layer; only the delivery of their completions is deferred). That is
 * a little stronger than a real device, which need not persist a write
 * whose completion it has not reported yet: an engine that flushes before
 * its write completed would not be caught here.
 *
 * The tear (":tear") keeps k whole 512-byte sectors of the N-th write, k
 * from 1 to n-1 where the write has n sectors, k a hash of N (the same N
 * tears the same way); a one-sector write cannot tear, and the line says
 * so. The crash line then reads, e.g. (one line):
 *   powercut: 57 device writes, 20 flushes; tore write 57 (50749440+4096):
 *   3 of 8 sectors
 *
 * The cache file's path comes from ft_backend_file_path().
 *
 * Counting: WRITE and WRITE_ZEROES are device writes (counted from 1 across
 * all reactors); FLUSH is a flush; TRIM is advisory and a no-op here (the
 * data stays); READ and CACHE are not counted.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "flashtier/log.h"
#include "flashtier/powercut.h"

#define PC_SECTOR    512u
#define PC_EXIT_CODE 86

/* One write not yet covered by a FLUSH. */
struct pc_undo {
	uint64_t off;
	uint64_t len;
	void *old; /* the content it replaced */
	void *fua; /* FUA writes: their own content, applied again after the undo */
};

static struct {
	pthread_once_t once;
	int env_rc;	/* parse result: 1 enabled, 0 unset, < 0 invalid */
	uint64_t limit; /* crash at this device write; 0 counts only */
	bool tear;

	pthread_mutex_t lock;
	int fd; /* our own descriptor of the cache file, -1 until the first wrap */
	dev_t st_dev;
	ino_t st_ino;
	unsigned handles;
	uint64_t writes, flushes;
	struct pc_undo *undo;
	size_t nundo, undo_cap;
	bool atexit_set;
} pc = {
	.once = PTHREAD_ONCE_INIT,
	.lock = PTHREAD_MUTEX_INITIALIZER,
	.fd = -1,
};

struct pc_handle {
	struct ft_backend b;
	struct ft_backend *inner;
	struct ft_deferred deliver;
	struct ft_bio *done_head, **done_tail; /* owning reactor's thread only */
};

static void parse_env(void)
{
	const char *s = getenv("FLASHTIER_TEST_POWERCUT");
	char *end;
	unsigned long long n;

	if (!s || !*s) {
		pc.env_rc = 0;
		return;
	}
	errno = 0;
	n = strtoull(s, &end, 10);
	if (errno || end == s || *s == '-' || (*end && strcmp(end, ":tear") != 0)) {
		ft_err("FLASHTIER_TEST_POWERCUT='%s': want N or N:tear (N >= 0)", s);
		pc.env_rc = -EINVAL;
		return;
	}
	pc.limit = n;
	pc.tear = *end != '\0';
	pc.env_rc = 1;
}

/* ---- blocking I/O on our descriptor (lock held) ---- */

static int pc_pread(void *buf, uint64_t len, uint64_t off)
{
	uint64_t done = 0;

	while (done < len) {
		ssize_t n = pread(pc.fd, (char *)buf + done, len - done, (off_t)(off + done));

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0) { /* past the end of the file: zeroes */
			memset((char *)buf + done, 0, len - done);
			break;
		}
		done += (uint64_t)n;
	}
	return 0;
}

/* @buf NULL: zeroes. */
static int pc_pwrite(const void *buf, uint64_t len, uint64_t off)
{
	uint64_t done = 0;

	while (done < len) {
		const void *src = buf ? (const char *)buf + done : ft_zero_buf();
		uint64_t n = len - done;
		ssize_t w;

		if (!buf && n > FT_ZERO_BUF_SIZE)
			n = FT_ZERO_BUF_SIZE;
		w = pwrite(pc.fd, src, n, (off_t)(off + done));
		if (w < 0 && errno == EINTR)
			continue;
		if (w < 0)
			return -errno;
		if (w == 0)
			return -EIO;
		done += (uint64_t)w;
	}
	return 0;
}

static void undo_free_all(void)
{
	for (size_t i = 0; i < pc.nundo; i++) {
		free(pc.undo[i].old);
		free(pc.undo[i].fua);
	}
	pc.nundo = 0;
}

/* ---- the power cut ---- */

static uint64_t mix64(uint64_t z)
{
	z += 0x9e3779b97f4a7c15ull;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static void say(const char *extra)
{
	char line[256];
	int n = snprintf(line, sizeof(line),
			 "powercut: %" PRIu64 " device writes, %" PRIu64 " flushes%s\n",
			 __atomic_load_n(&pc.writes, __ATOMIC_RELAXED),
			 __atomic_load_n(&pc.flushes, __ATOMIC_RELAXED), extra);

	if (n > 0 && write(STDERR_FILENO, line, (size_t)n) < 0) {
		/* nothing more to do about it */
	}
}

/* Lock held; @bio is the N-th device write. Never returns. */
static void __attribute__((noreturn)) power_cut(const struct ft_bio *bio)
{
	const void *data = bio->op == FT_BIO_WRITE ? bio->buf : NULL;
	char extra[160] = "";

	/* Everything not covered by a FLUSH, newest first... */
	for (size_t i = pc.nundo; i-- > 0;)
		(void)pc_pwrite(pc.undo[i].old, pc.undo[i].len, pc.undo[i].off);
	/* ...except what FUA made durable, in order. */
	for (size_t i = 0; i < pc.nundo; i++)
		if (pc.undo[i].fua)
			(void)pc_pwrite(pc.undo[i].fua, pc.undo[i].len, pc.undo[i].off);
	if (pc.tear) {
		uint64_t nsec = bio->len / PC_SECTOR;

		if (nsec >= 2) {
			uint64_t k = 1 + mix64(pc.limit ^ 0x7465617270637574ull) % (nsec - 1);

			(void)pc_pwrite(data, k * PC_SECTOR, bio->offset);
			snprintf(extra, sizeof(extra),
				 "; tore write %" PRIu64 " (%" PRIu64 "+%" PRIu64 "): %" PRIu64
				 " of %" PRIu64 " sectors",
				 pc.limit, bio->offset, bio->len, k, nsec);
		} else {
			snprintf(extra, sizeof(extra),
				 "; write %" PRIu64 " (%" PRIu64 "+%" PRIu64 ") too short to tear",
				 pc.limit, bio->offset, bio->len);
		}
	}
	say(extra);
	_exit(PC_EXIT_CODE);
}

static void at_exit(void)
{
	say("");
}

/* ---- the backend ---- */

static struct pc_handle *to_h(struct ft_backend *b)
{
	return (struct pc_handle *)b;
}

static void deliver_fn(struct ft_deferred *d)
{
	struct pc_handle *h = (struct pc_handle *)((char *)d - offsetof(struct pc_handle, deliver));
	struct ft_bio *bio = h->done_head;

	h->done_head = NULL;
	h->done_tail = &h->done_head;
	while (bio) {
		struct ft_bio *next = bio->next_done; /* end_io may free or resubmit bio */

		bio->end_io(bio, bio->error);
		bio = next;
	}
}

static void complete(struct pc_handle *h, struct ft_bio *bio, int error)
{
	if (!h->b.reactor) { /* not attached: no reactor to defer to */
		bio->end_io(bio, error);
		return;
	}
	bio->error = error;
	bio->next_done = NULL;
	*h->done_tail = bio;
	h->done_tail = &bio->next_done;
	ft_reactor_defer(h->b.reactor, &h->deliver);
}

/* Lock held. */
static int do_write(const struct ft_bio *bio)
{
	const void *data = bio->op == FT_BIO_WRITE ? bio->buf : NULL;
	struct pc_undo u = { .off = bio->offset, .len = bio->len };
	int rc;

	pc.writes++;
	if (pc.limit && pc.writes == pc.limit)
		power_cut(bio);
	if (pc.limit) {
		if (pc.nundo == pc.undo_cap) {
			size_t cap = pc.undo_cap ? 2 * pc.undo_cap : 256;
			struct pc_undo *n = realloc(pc.undo, cap * sizeof(*n));

			if (!n)
				return -ENOMEM;
			pc.undo = n;
			pc.undo_cap = cap;
		}
		u.old = malloc(bio->len ? bio->len : 1);
		if (!u.old)
			return -ENOMEM;
		rc = pc_pread(u.old, bio->len, bio->offset);
		if (rc == 0 && (bio->flags & FT_BIO_FUA)) {
			u.fua = malloc(bio->len ? bio->len : 1);
			if (!u.fua)
				rc = -ENOMEM;
			else if (data)
				memcpy(u.fua, data, bio->len);
			else
				memset(u.fua, 0, bio->len);
		}
		if (rc < 0) {
			free(u.old);
			free(u.fua);
			return rc;
		}
	}
	rc = pc_pwrite(data, bio->len, bio->offset);
	if (pc.limit) {
		/* Recorded even on failure: part of it may have reached the file. */
		pc.undo[pc.nundo++] = u;
	}
	return rc;
}

static void pc_submit(struct ft_backend *b, struct ft_bio *bio)
{
	struct pc_handle *h = to_h(b);
	int rc = 0;

	bio->done = 0;
	bio->stage = 0;
	bio->pending = 0;
	switch (bio->op) {
	case FT_BIO_READ:
		pthread_mutex_lock(&pc.lock);
		rc = pc_pread(bio->buf, bio->len, bio->offset);
		pthread_mutex_unlock(&pc.lock);
		break;
	case FT_BIO_WRITE:
	case FT_BIO_WRITE_ZEROES:
		pthread_mutex_lock(&pc.lock);
		rc = do_write(bio);
		pthread_mutex_unlock(&pc.lock);
		break;
	case FT_BIO_FLUSH:
		pthread_mutex_lock(&pc.lock);
		pc.flushes++;
		undo_free_all();
		pthread_mutex_unlock(&pc.lock);
		break;
	case FT_BIO_TRIM:  /* advisory: the data simply stays */
	case FT_BIO_CACHE: /* a hint */
		break;
	default:
		rc = -EINVAL;
		break;
	}
	complete(h, bio, rc);
}

static int pc_attach(struct ft_backend *b, struct ft_reactor *r)
{
	struct pc_handle *h = to_h(b);
	int rc = h->inner->ops->attach(h->inner, r);

	if (rc == 0)
		b->reactor = r;
	return rc;
}

static void pc_close(struct ft_backend *b)
{
	struct pc_handle *h = to_h(b);

	pthread_mutex_lock(&pc.lock);
	if (--pc.handles == 0) {
		/* A clean close: what the file holds stays (the inner close syncs it). */
		undo_free_all();
		free(pc.undo);
		pc.undo = NULL;
		pc.undo_cap = 0;
		close(pc.fd);
		pc.fd = -1;
	}
	pthread_mutex_unlock(&pc.lock);
	h->inner->ops->close(h->inner);
	free(h);
}

static const struct ft_backend_ops pc_ops = {
	.name = "powercut",
	.attach = pc_attach,
	.submit = pc_submit,
	.close = pc_close,
};

/* Lock held. Open our descriptor of @inner's file (first wrap), or check it is the same. */
static int open_file(struct ft_backend *inner)
{
	const char *path = ft_backend_file_path(inner);
	struct stat a;
	int fd;

	if (!path || stat(path, &a) < 0) {
		ft_err("powercut: the cache device is not a file backend");
		return -EINVAL;
	}
	if (pc.fd >= 0) {
		if (a.st_dev != pc.st_dev || a.st_ino != pc.st_ino) {
			ft_err("powercut: %s is not the cache file wrapped before", path);
			return -EINVAL;
		}
		return 0;
	}
	fd = open(path, O_RDWR | O_CLOEXEC);
	if (fd < 0) {
		int rc = -errno;

		ft_err("powercut: %s: %s", path, strerror(-rc));
		return rc;
	}
	pc.fd = fd;
	pc.st_dev = a.st_dev;
	pc.st_ino = a.st_ino;
	return 0;
}

int ft_powercut_wrap(struct ft_backend **dev)
{
	struct ft_backend *inner = *dev;
	struct pc_handle *h;
	int rc;

	pthread_once(&pc.once, parse_env);
	if (pc.env_rc <= 0)
		return pc.env_rc;
	h = calloc(1, sizeof(*h));
	if (!h)
		return -ENOMEM;
	pthread_mutex_lock(&pc.lock);
	rc = open_file(inner);
	if (rc == 0) {
		pc.handles++;
		if (!pc.atexit_set) {
			pc.atexit_set = true;
			atexit(at_exit);
			if (pc.limit)
				ft_info("powercut: test hook on: power cut at device write %" PRIu64
					"%s",
					pc.limit, pc.tear ? ", torn" : "");
			else
				ft_info("powercut: test hook on: counting device writes only");
		}
	}
	pthread_mutex_unlock(&pc.lock);
	if (rc < 0) {
		free(h);
		return rc;
	}
	h->inner = inner;
	h->b.ops = &pc_ops;
	h->b.size = inner->size;
	h->b.caps = inner->caps;
	h->b.min_block = inner->min_block;
	h->b.max_request = inner->max_request;
	h->deliver.fn = deliver_fn;
	h->done_tail = &h->done_head;
	*dev = &h->b;
	return 0;
}
