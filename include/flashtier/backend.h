/* SPDX-License-Identifier: MIT */
/*
 * Backing stores: a table of function pointers per kind, so that the NBD
 * server (and, later, the cache engine) drive every store the same way.
 *
 * Lifecycle and threads:
 *   ft_backend_open()   main thread, before reactors run; may block (connect).
 *   ops->attach()       once, on the owning reactor's thread.
 *   ops->submit()       owning reactor's thread only.
 *   ops->close()        main thread, after the owning reactor has stopped:
 *                       flushes what the store buffers, then frees @b.
 *
 * I/O contract: submit() takes a bio the caller owns and keeps valid (with
 * its buffer) until bio->end_io runs. end_io runs exactly once per bio, on
 * the owning reactor's thread, on success (error 0) or failure (a negative
 * errno). It may run before submit() returns. A bio's range has been
 * validated by the caller (within the store's size).
 */
#ifndef FLASHTIER_BACKEND_H
#define FLASHTIER_BACKEND_H

#include <stdbool.h>
#include <stdint.h>

#include "flashtier/config.h"
#include "flashtier/reactor.h"

enum ft_bio_op {
	FT_BIO_READ,
	FT_BIO_WRITE,
	FT_BIO_FLUSH,
	FT_BIO_TRIM,
	FT_BIO_WRITE_ZEROES,
	FT_BIO_CACHE,
};

/* bio flags */
#define FT_BIO_FUA       (1u << 0) /* persist before completing */
#define FT_BIO_NO_HOLE   (1u << 1) /* WRITE_ZEROES: keep the range allocated */
#define FT_BIO_FAST_ZERO (1u << 2) /* WRITE_ZEROES: fail with -ENOTSUP unless fast */
/*
 * READ/WRITE: may go through the page cache rather than O_DIRECT (a hint).
 * Completion then means "in the kernel's cache": the data survives the
 * process, and a later FLUSH makes it durable, as on a disk with a
 * volatile write cache.
 */
#define FT_BIO_BUFFERED (1u << 3)

struct ft_bio {
	enum ft_bio_op op;
	uint32_t flags;
	uint64_t offset;
	uint64_t len;
	void *buf; /* READ: filled; WRITE: source; others: unused */
	void (*end_io)(struct ft_bio *bio, int error);

	/* Backend-private progress; the caller need not initialise these. */
	struct ft_backend *backend;
	struct ft_completion c;
	struct ft_bio *next_done;
	uint64_t done;
	uint32_t stage;
	uint32_t pending;
	int error;
};

/* capability bits */
#define FT_BACKEND_CAN_FLUSH      (1u << 0)
#define FT_BACKEND_CAN_FUA        (1u << 1) /* native or emulated with a flush */
#define FT_BACKEND_CAN_TRIM       (1u << 2)
#define FT_BACKEND_CAN_ZERO       (1u << 3) /* native or emulated by writing zeroes */
#define FT_BACKEND_CAN_FAST_ZERO  (1u << 4)
#define FT_BACKEND_CAN_CACHE      (1u << 5)
#define FT_BACKEND_READ_ONLY      (1u << 6)
/* A flush covers every write completed before it, whoever issued it. */
#define FT_BACKEND_FLUSH_COVERS_ALL (1u << 7)
#define FT_BACKEND_ROTATIONAL     (1u << 8)

struct ft_backend;

struct ft_backend_ops {
	const char *name;
	int (*attach)(struct ft_backend *b, struct ft_reactor *r);
	void (*submit)(struct ft_backend *b, struct ft_bio *bio);
	void (*close)(struct ft_backend *b);
};

struct ft_backend {
	const struct ft_backend_ops *ops;
	uint64_t size;
	uint32_t caps;
	uint32_t min_block;   /* power of two; smallest alignment the store needs */
	uint32_t max_request; /* largest READ/WRITE it takes in one piece */
	struct ft_reactor *reactor;
};

/*
 * Open the store a volume names (file, block device or NBD URI). Blocks.
 * Returns 0 and *@out, or a negative errno after logging the cause.
 */
int ft_backend_open(const struct ft_volume_config *vc, struct ft_backend **out);

extern const struct ft_backend_ops ft_backend_file_ops;
extern const struct ft_backend_ops ft_backend_nbd_ops;

int ft_backend_file_open(const char *path, bool readonly, struct ft_backend **out);
int ft_backend_nbd_open(const char *uri, bool readonly, struct ft_backend **out);

/* The path a file backend opened, or NULL if @b is not one. Any thread. */
const char *ft_backend_file_path(const struct ft_backend *b);

static inline void ft_bio_submit(struct ft_backend *b, struct ft_bio *bio)
{
	bio->backend = b;
	b->ops->submit(b, bio);
}

/* A shared, read-only buffer of zeroes, FT_ZERO_BUF_SIZE long and 4 KiB aligned. */
#define FT_ZERO_BUF_SIZE (1u << 20)
const void *ft_zero_buf(void);

#endif
