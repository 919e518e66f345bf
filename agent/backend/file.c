/* SPDX-License-Identifier: MIT */
/*
 * The file backend: a regular file or a block device, driven through the
 * owning reactor's io_uring.
 *
 * Two descriptors: a buffered one, and an O_DIRECT one used whenever a
 * request's offset, length and buffer meet the device's direct-I/O
 * alignment. Mixing them is coherent for completed I/O: direct I/O writes
 * back and invalidates overlapping page-cache pages first. A request
 * flagged FT_BIO_BUFFERED always takes the buffered descriptor.
 *
 * FLUSH is fdatasync; FUA is RWF_DSYNC on the write (or fdatasync after a
 * fallocate); TRIM and WRITE_ZEROES are fallocate, with a fallback to
 * writing zeroes when the file system or device cannot.
 *
 * Memory-backed files (tmpfs, ramfs) are the one exception to "all I/O
 * through io_uring": they do not support non-blocking buffered I/O, so
 * io_uring would hand every read and write to a worker thread, while the
 * operation itself is a memcpy that can never wait for a device. There,
 * READ, WRITE and FLUSH run inline on the reactor.
 */
#include <stddef.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <linux/stat.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/uio.h>
#include <unistd.h>

#include "flashtier/backend.h"
#include "flashtier/log.h"

struct file_backend {
	struct ft_backend b;
	char *path;
	int fd;
	int dfd;	    /* O_DIRECT descriptor, or -1 */
	uint32_t dio_align; /* offset, length and memory alignment for dfd */
	bool is_blk;
	bool mem_backed;    /* tmpfs/ramfs: READ, WRITE and FLUSH run inline */
	bool no_punch;	    /* PUNCH_HOLE known to be unsupported */
	bool no_zero_range; /* ZERO_RANGE known to be unsupported */
};

/* WRITE_ZEROES stages */
enum {
	WZ_PUNCH,
	WZ_ZERO_RANGE,
	WZ_WRITE,
	WZ_SYNC,
};

static struct file_backend *to_fb(struct ft_backend *b)
{
	return (struct file_backend *)b;
}

static struct ft_bio *bio_of(struct ft_completion *c)
{
	return (struct ft_bio *)((char *)c - offsetof(struct ft_bio, c));
}

static bool fallocate_unsupported(int res)
{
	return res == -EOPNOTSUPP || res == -EINVAL || res == -ENODEV || res == -ENOSYS;
}

static bool direct_ok(const struct file_backend *fb, const struct ft_bio *bio, const void *buf)
{
	uint64_t mask = fb->dio_align - 1;

	return fb->dfd >= 0 && !(bio->flags & FT_BIO_BUFFERED) &&
	       ((bio->offset + bio->done) & mask) == 0 && ((bio->len - bio->done) & mask) == 0 &&
	       ((uintptr_t)buf & mask) == 0;
}

static void file_rw_done(struct ft_completion *c, int res, uint32_t flags);

#define BIO_FB(bio) to_fb((bio)->backend)

/*
 * Inline READ/WRITE for memory-backed files (see the top of this file).
 * Returns the bio's result: 0 or a negative errno.
 */
static int file_rw_inline(struct file_backend *fb, struct ft_bio *bio)
{
	bool zeroes = bio->op == FT_BIO_WRITE_ZEROES;
	int flags = (bio->op != FT_BIO_READ && (bio->flags & FT_BIO_FUA)) ? RWF_DSYNC : 0;

	while (bio->done < bio->len) {
		uint64_t left = bio->len - bio->done;
		struct iovec iov = {
			.iov_base = zeroes ? (void *)ft_zero_buf() : (char *)bio->buf + bio->done,
			.iov_len = left > (1u << 30) ? (1u << 30) : left,
		};
		ssize_t n;

		if (zeroes && iov.iov_len > FT_ZERO_BUF_SIZE)
			iov.iov_len = FT_ZERO_BUF_SIZE;
		if (bio->op == FT_BIO_READ)
			n = preadv2(fb->fd, &iov, 1, (off_t)(bio->offset + bio->done), 0);
		else
			n = pwritev2(fb->fd, &iov, 1, (off_t)(bio->offset + bio->done), flags);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			return -errno;
		if (n == 0) {
			if (bio->op != FT_BIO_READ)
				return -EIO;
			/* The file shrank under us: what lies past its end reads as zeroes. */
			memset((char *)bio->buf + bio->done, 0, left);
			n = (ssize_t)left;
		}
		bio->done += (uint64_t)n;
	}
	return 0;
}

static void file_rw_issue(struct file_backend *fb, struct ft_bio *bio)
{
	const void *zeroes = ft_zero_buf();
	bool writing_zeroes = bio->op == FT_BIO_WRITE_ZEROES;
	char *buf = writing_zeroes ? (char *)zeroes : (char *)bio->buf + bio->done;
	uint64_t left = bio->len - bio->done;
	uint32_t n = left > (1u << 30) ? (1u << 30) : (uint32_t)left;
	struct io_uring_sqe *sqe;
	int fd;

	if (writing_zeroes && n > FT_ZERO_BUF_SIZE)
		n = FT_ZERO_BUF_SIZE;
	if (fb->mem_backed) {
		bio->end_io(bio, file_rw_inline(fb, bio));
		return;
	}
	fd = direct_ok(fb, bio, buf) ? fb->dfd : fb->fd;
	bio->c.fn = file_rw_done;
	sqe = ft_reactor_sqe(fb->b.reactor, &bio->c);
	if (bio->op == FT_BIO_READ) {
		io_uring_prep_read(sqe, fd, buf, n, bio->offset + bio->done);
	} else {
		io_uring_prep_write(sqe, fd, buf, n, bio->offset + bio->done);
		if (bio->flags & FT_BIO_FUA)
			sqe->rw_flags = RWF_DSYNC;
	}
}

static void file_rw_done(struct ft_completion *c, int res, uint32_t flags)
{
	struct ft_bio *bio = bio_of(c);
	struct file_backend *fb = BIO_FB(bio);

	(void)flags;
	if (res == -EAGAIN || res == -EINTR) {
		file_rw_issue(fb, bio);
		return;
	}
	if (res < 0) {
		bio->end_io(bio, res);
		return;
	}
	if (res == 0) {
		if (bio->op != FT_BIO_READ) {
			bio->end_io(bio, -EIO);
			return;
		}
		/* The file shrank under us: what lies past its end reads as zeroes. */
		memset((char *)bio->buf + bio->done, 0, bio->len - bio->done);
		res = (int)(bio->len - bio->done);
	}
	bio->done += (uint64_t)res;
	if (bio->done < bio->len) {
		file_rw_issue(fb, bio);
		return;
	}
	bio->end_io(bio, 0);
}

static void file_simple_done(struct ft_completion *c, int res, uint32_t flags)
{
	struct ft_bio *bio = bio_of(c);

	(void)flags;
	bio->end_io(bio, res < 0 ? res : 0);
}

static void file_fsync(struct file_backend *fb, struct ft_bio *bio,
		       void (*fn)(struct ft_completion *, int, uint32_t))
{
	struct io_uring_sqe *sqe;

	bio->c.fn = fn;
	sqe = ft_reactor_sqe(fb->b.reactor, &bio->c);
	io_uring_prep_fsync(sqe, fb->fd, IORING_FSYNC_DATASYNC);
}

static void file_trim_done(struct ft_completion *c, int res, uint32_t flags)
{
	struct ft_bio *bio = bio_of(c);
	struct file_backend *fb = BIO_FB(bio);

	(void)flags;
	if (res < 0 && fallocate_unsupported(res)) {
		/* TRIM is advisory: a store that cannot discard simply keeps the data. */
		fb->no_punch = true;
		res = 0;
	}
	if (res == 0 && (bio->flags & FT_BIO_FUA)) {
		file_fsync(fb, bio, file_simple_done);
		return;
	}
	bio->end_io(bio, res);
}

static void file_wz_done(struct ft_completion *c, int res, uint32_t flags);

static void file_fallocate(struct file_backend *fb, struct ft_bio *bio, int mode)
{
	struct io_uring_sqe *sqe;

	bio->c.fn = file_wz_done;
	sqe = ft_reactor_sqe(fb->b.reactor, &bio->c);
	io_uring_prep_fallocate(sqe, fb->fd, mode, (off_t)bio->offset, (off_t)bio->len);
}

/*
 * WRITE_ZEROES: without NO_HOLE a hole is the cheapest zero; ZERO_RANGE
 * keeps the blocks allocated. When neither works, write zeroes, unless the
 * client asked for a fast zero, which must then fail quickly with ENOTSUP
 * and change nothing. On a block device ZERO_RANGE may itself fall back to
 * writing zeroes in the kernel, so it does not count as fast there.
 */
static void wz_write_fallback(struct file_backend *fb, struct ft_bio *bio)
{
	if (bio->flags & FT_BIO_FAST_ZERO) {
		bio->end_io(bio, -ENOTSUP);
		return;
	}
	bio->stage = WZ_WRITE;
	bio->done = 0;
	file_rw_issue(fb, bio); /* FUA rides on RWF_DSYNC */
}

static void wz_try_zero_range(struct file_backend *fb, struct ft_bio *bio)
{
	if (fb->no_zero_range || (fb->is_blk && (bio->flags & FT_BIO_FAST_ZERO))) {
		wz_write_fallback(fb, bio);
		return;
	}
	bio->stage = WZ_ZERO_RANGE;
	file_fallocate(fb, bio, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE);
}

static void wz_finish(struct file_backend *fb, struct ft_bio *bio)
{
	if (!(bio->flags & FT_BIO_FUA)) {
		bio->end_io(bio, 0);
		return;
	}
	bio->stage = WZ_SYNC;
	file_fsync(fb, bio, file_wz_done);
}

static void file_wz_done(struct ft_completion *c, int res, uint32_t flags)
{
	struct ft_bio *bio = bio_of(c);
	struct file_backend *fb = BIO_FB(bio);

	(void)flags;
	switch (bio->stage) {
	case WZ_PUNCH:
		if (res == 0) {
			wz_finish(fb, bio);
		} else if (fallocate_unsupported(res)) {
			fb->no_punch = true;
			wz_try_zero_range(fb, bio);
		} else {
			bio->end_io(bio, res);
		}
		return;
	case WZ_ZERO_RANGE:
		if (res == 0) {
			wz_finish(fb, bio);
		} else if (fallocate_unsupported(res)) {
			fb->no_zero_range = true;
			wz_write_fallback(fb, bio);
		} else {
			bio->end_io(bio, res);
		}
		return;
	default: /* WZ_SYNC */
		bio->end_io(bio, res);
		return;
	}
}

static void file_submit(struct ft_backend *b, struct ft_bio *bio)
{
	struct file_backend *fb = to_fb(b);
	struct io_uring_sqe *sqe;

	bio->done = 0;
	bio->stage = 0;
	bio->pending = 0;
	switch (bio->op) {
	case FT_BIO_READ:
	case FT_BIO_WRITE:
		file_rw_issue(fb, bio);
		return;
	case FT_BIO_FLUSH:
		if (fb->mem_backed) {
			/* Nothing volatile to write back: returns at once, no worker thread. */
			bio->end_io(bio, fdatasync(fb->fd) < 0 ? -errno : 0);
			return;
		}
		file_fsync(fb, bio, file_simple_done);
		return;
	case FT_BIO_TRIM:
		if (fb->no_punch) {
			file_trim_done(&bio->c, 0, 0);
			return;
		}
		bio->c.fn = file_trim_done;
		sqe = ft_reactor_sqe(b->reactor, &bio->c);
		io_uring_prep_fallocate(sqe, fb->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
					(off_t)bio->offset, (off_t)bio->len);
		return;
	case FT_BIO_WRITE_ZEROES:
		if ((bio->flags & FT_BIO_NO_HOLE) || fb->no_punch) {
			wz_try_zero_range(fb, bio);
			return;
		}
		bio->stage = WZ_PUNCH;
		file_fallocate(fb, bio, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE);
		return;
	case FT_BIO_CACHE:
		bio->c.fn = file_simple_done;
		sqe = ft_reactor_sqe(b->reactor, &bio->c);
		io_uring_prep_fadvise(sqe, fb->fd, bio->offset, (off_t)bio->len,
				      POSIX_FADV_WILLNEED);
		return;
	}
	bio->end_io(bio, -EINVAL);
}

static int file_attach(struct ft_backend *b, struct ft_reactor *r)
{
	b->reactor = r;
	return 0;
}

static void file_close(struct ft_backend *b)
{
	struct file_backend *fb = to_fb(b);

	if (!(b->caps & FT_BACKEND_READ_ONLY) && fdatasync(fb->fd) < 0)
		ft_err("%s: fdatasync at close: %s", fb->path, strerror(errno));
	if (fb->dfd >= 0)
		close(fb->dfd);
	close(fb->fd);
	free(fb->path);
	free(fb);
}

const struct ft_backend_ops ft_backend_file_ops = {
	.name = "file",
	.attach = file_attach,
	.submit = file_submit,
	.close = file_close,
};

/* Direct-I/O alignment, or 0 when O_DIRECT cannot be used. */
static uint32_t probe_dio_align(struct file_backend *fb)
{
	struct statx stx;
	int lbs = 0;

	if (fb->is_blk) {
		if (ioctl(fb->fd, BLKSSZGET, &lbs) < 0 || lbs <= 0)
			return 0;
		return lbs < 4096 ? 4096 : (uint32_t)lbs; /* 4 KiB also covers memory alignment */
	}
	if (statx(fb->fd, "", AT_EMPTY_PATH, STATX_DIOALIGN, &stx) < 0 ||
	    !(stx.stx_mask & STATX_DIOALIGN) || stx.stx_dio_offset_align == 0)
		return 0;
	uint32_t a = stx.stx_dio_offset_align;

	if (stx.stx_dio_mem_align > a)
		a = stx.stx_dio_mem_align;
	return a < 512 ? 512 : a;
}

int ft_backend_file_open(const char *path, bool readonly, struct ft_backend **out)
{
	struct file_backend *fb = calloc(1, sizeof(*fb));
	int flags = (readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC;
	struct stat st;
	int rc;

	if (!fb)
		return -ENOMEM;
	fb->fd = -1;
	fb->dfd = -1;
	fb->path = strdup(path);
	fb->fd = open(path, flags);
	if (!fb->path || fb->fd < 0) {
		rc = fb->path ? -errno : -ENOMEM;
		ft_err("%s: cannot open: %s", path, strerror(-rc));
		goto fail;
	}
	if (fstat(fb->fd, &st) < 0) {
		rc = -errno;
		ft_err("%s: fstat: %s", path, strerror(-rc));
		goto fail;
	}
	fb->b.min_block = 1;
	if (S_ISBLK(st.st_mode)) {
		uint64_t size;
		int lbs;

		fb->is_blk = true;
		if (ioctl(fb->fd, BLKGETSIZE64, &size) < 0 || ioctl(fb->fd, BLKSSZGET, &lbs) < 0) {
			rc = -errno;
			ft_err("%s: cannot read block device geometry: %s", path, strerror(-rc));
			goto fail;
		}
		fb->b.size = size;
		fb->b.min_block = (uint32_t)lbs;
	} else if (S_ISREG(st.st_mode)) {
		fb->b.size = (uint64_t)st.st_size;
	} else {
		rc = -EINVAL;
		ft_err("%s: not a regular file or block device", path);
		goto fail;
	}

	struct statfs sfs;

	if (!fb->is_blk && fstatfs(fb->fd, &sfs) == 0 &&
	    (sfs.f_type == TMPFS_MAGIC || sfs.f_type == RAMFS_MAGIC))
		fb->mem_backed = true;
	fb->dio_align = fb->mem_backed ? 0 : probe_dio_align(fb);
	if (fb->dio_align) {
		fb->dfd = open(path, flags | O_DIRECT);
		if (fb->dfd < 0) {
			ft_debug("%s: O_DIRECT unavailable (%s): buffered I/O only", path,
				 strerror(errno));
			fb->dio_align = 0;
		}
	}

	fb->b.ops = &ft_backend_file_ops;
	fb->b.max_request = 1u << 30;
	fb->b.caps = FT_BACKEND_CAN_FLUSH | FT_BACKEND_CAN_FUA | FT_BACKEND_CAN_TRIM |
		     FT_BACKEND_CAN_ZERO | FT_BACKEND_CAN_FAST_ZERO | FT_BACKEND_CAN_CACHE |
		     FT_BACKEND_FLUSH_COVERS_ALL;
	if (readonly)
		fb->b.caps |= FT_BACKEND_READ_ONLY;
	ft_info("%s: %s, %llu bytes, %s", path, fb->is_blk ? "block device" : "file",
		(unsigned long long)fb->b.size,
		fb->mem_backed ? "memory-backed (inline I/O)"
		: fb->dfd >= 0 ? "O_DIRECT for aligned requests"
			       : "buffered I/O");
	*out = &fb->b;
	return 0;
fail:
	if (fb->fd >= 0)
		close(fb->fd);
	free(fb->path);
	free(fb);
	return rc;
}

const char *ft_backend_file_path(const struct ft_backend *b)
{
	return b && b->ops == &ft_backend_file_ops ? ((const struct file_backend *)b)->path : NULL;
}
