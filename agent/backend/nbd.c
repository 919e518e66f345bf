/* SPDX-License-Identifier: MIT */
/*
 * The nbd backend: a remote NBD export reached through libnbd's async API,
 * its socket polled by the owning reactor's io_uring.
 *
 * libnbd runs completion callbacks with the handle locked, so a callback
 * must not issue new commands on the same handle. Callbacks therefore only
 * queue the finished bio; a deferred step on the reactor runs end_io once
 * libnbd has returned (and may then submit new work freely).
 *
 * Capabilities the remote lacks are emulated: FUA by a flush after the
 * write, WRITE_ZEROES by writing zeroes; TRIM and CACHE are hints and
 * succeed as no-ops. Requests larger than the remote's maximum payload are
 * split.
 */
#include <stddef.h>
#include <errno.h>
#include <libnbd.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include "flashtier/backend.h"
#include "flashtier/log.h"

#define NBD_DEFAULT_MAX (32u << 20)

struct nbd_backend {
	struct ft_backend b;
	struct nbd_handle *h;
	char *uri;
	int fd;
	bool can_flush, can_fua, can_trim, can_zero, can_fast_zero, can_cache;
	bool dead;

	struct ft_completion rpoll, wpoll;
	bool r_armed, w_armed;
	struct ft_deferred kick; /* re-arm polls, then complete finished bios */
	struct ft_bio *done_head, *done_tail;
};

/* stages of a bio */
enum {
	NB_MAIN,      /* the command itself (possibly in pieces) */
	NB_FUA_FLUSH, /* emulated FUA: the flush after the write */
};

static struct nbd_backend *to_nb(struct ft_backend *b)
{
	return (struct nbd_backend *)b;
}

static void nb_kick(struct nbd_backend *nb)
{
	ft_reactor_defer(nb->b.reactor, &nb->kick);
}

static void nb_queue_done(struct nbd_backend *nb, struct ft_bio *bio, int error)
{
	bio->error = error;
	bio->next_done = NULL;
	if (nb->done_tail)
		nb->done_tail->next_done = bio;
	else
		nb->done_head = bio;
	nb->done_tail = bio;
	nb_kick(nb);
}

static void nb_issue(struct nbd_backend *nb, struct ft_bio *bio);
static void nb_mark_dead(struct nbd_backend *nb);

/* libnbd completion callback: runs inside libnbd, handle locked. */
static int nb_piece_done(void *user_data, int *error)
{
	struct ft_bio *bio = user_data;

	if (*error && !bio->error)
		bio->error = -*error;
	if (--bio->pending == 0) {
		struct nbd_backend *nb = to_nb(bio->backend);
		int e = bio->error;

		bio->error = 0;
		nb_queue_done(nb, bio, e);
	}
	return 1; /* retire the command */
}

static nbd_completion_callback piece_cb(struct ft_bio *bio)
{
	return (nbd_completion_callback){ .callback = nb_piece_done, .user_data = bio };
}

/* Issue one libnbd command for @bio covering [off, off+len). Returns >= 0 or -1. */
static int64_t nb_command(struct nbd_backend *nb, struct ft_bio *bio, uint64_t off, uint64_t len,
			  void *buf, uint32_t nflags)
{
	switch (bio->op) {
	case FT_BIO_READ:
		return nbd_aio_pread(nb->h, buf, len, off, piece_cb(bio), 0);
	case FT_BIO_WRITE:
		return nbd_aio_pwrite(nb->h, buf, len, off, piece_cb(bio), nflags);
	case FT_BIO_FLUSH:
		return nbd_aio_flush(nb->h, piece_cb(bio), 0);
	case FT_BIO_TRIM:
		return nbd_aio_trim(nb->h, len, off, piece_cb(bio), nflags);
	case FT_BIO_CACHE:
		return nbd_aio_cache(nb->h, len, off, piece_cb(bio), 0);
	case FT_BIO_WRITE_ZEROES:
		if (!nb->can_zero) /* emulated: buf is the shared zero buffer */
			return nbd_aio_pwrite(nb->h, buf, len, off, piece_cb(bio), nflags);
		if (bio->flags & FT_BIO_NO_HOLE)
			nflags |= LIBNBD_CMD_FLAG_NO_HOLE;
		if (bio->flags & FT_BIO_FAST_ZERO)
			nflags |= LIBNBD_CMD_FLAG_FAST_ZERO;
		return nbd_aio_zero(nb->h, len, off, piece_cb(bio), nflags);
	}
	return -1;
}

/*
 * Issue the bio's main command. READ, WRITE and emulated WRITE_ZEROES are
 * split into pieces the remote accepts; the others go in one command.
 * bio->pending counts outstanding pieces plus one guard reference held
 * while issuing, so the bio cannot complete half-issued.
 */
static void nb_issue(struct nbd_backend *nb, struct ft_bio *bio)
{
	uint32_t nflags = ((bio->flags & FT_BIO_FUA) && nb->can_fua) ? LIBNBD_CMD_FLAG_FUA : 0;
	bool split = bio->op == FT_BIO_READ || bio->op == FT_BIO_WRITE ||
		     (bio->op == FT_BIO_WRITE_ZEROES && !nb->can_zero);
	uint64_t piece_max = split ? nb->b.max_request : bio->len;

	if (bio->op == FT_BIO_WRITE_ZEROES && !nb->can_zero && piece_max > FT_ZERO_BUF_SIZE)
		piece_max = FT_ZERO_BUF_SIZE;
	bio->pending = 1;
	bio->error = 0;
	for (uint64_t off = 0; off < bio->len || (off == 0 && bio->len == 0); off += piece_max) {
		uint64_t n = bio->len - off < piece_max ? bio->len - off : piece_max;
		void *buf = bio->op == FT_BIO_WRITE_ZEROES ? (void *)ft_zero_buf()
							   : (char *)bio->buf + off;

		bio->pending++;
		if (nb_command(nb, bio, bio->offset + off, n, buf, nflags) < 0) {
			/*
			 * libnbd does not call the completion of a command it refused.
			 * The request was validated already, so a refusal means the
			 * connection is gone (libnbd then says EINVAL or ENOTCONN):
			 * the client gets EIO, the real cause goes to the log.
			 */
			bio->pending--;
			if (nbd_aio_is_dead(nb->h) || nbd_aio_is_closed(nb->h))
				nb_mark_dead(nb);
			else
				ft_err("nbd backend %s: command refused: %s", nb->uri,
				       nbd_get_error());
			bio->error = -EIO;
			break;
		}
		if (bio->len == 0)
			break;
	}
	nb_piece_done(bio, &(int){ 0 }); /* drop the guard */
	nb_kick(nb);
}

static void nb_submit(struct ft_backend *b, struct ft_bio *bio)
{
	struct nbd_backend *nb = to_nb(b);

	bio->stage = NB_MAIN;
	if (nb->dead) {
		nb_queue_done(nb, bio, -EIO);
		return;
	}
	switch (bio->op) {
	case FT_BIO_FLUSH:
		if (!nb->can_flush) {
			/* A remote without flush is write-through: nothing to do. */
			nb_queue_done(nb, bio, 0);
			return;
		}
		break;
	case FT_BIO_TRIM:
		if (!nb->can_trim) {
			nb_queue_done(nb, bio, 0);
			return;
		}
		break;
	case FT_BIO_CACHE:
		if (!nb->can_cache) {
			nb_queue_done(nb, bio, 0);
			return;
		}
		break;
	case FT_BIO_WRITE_ZEROES:
		if ((bio->flags & FT_BIO_FAST_ZERO) && !(nb->can_zero && nb->can_fast_zero)) {
			nb_queue_done(nb, bio, -ENOTSUP);
			return;
		}
		break;
	default:
		break;
	}
	nb_issue(nb, bio);
}

/* A finished bio, outside libnbd: emulate FUA if needed, else complete it. */
static void nb_finish(struct nbd_backend *nb, struct ft_bio *bio)
{
	bool writes = bio->op == FT_BIO_WRITE || bio->op == FT_BIO_WRITE_ZEROES ||
		      bio->op == FT_BIO_TRIM;

	if (bio->error == 0 && bio->stage == NB_MAIN && writes && (bio->flags & FT_BIO_FUA) &&
	    !nb->can_fua && nb->can_flush) {
		enum ft_bio_op op = bio->op;

		bio->stage = NB_FUA_FLUSH;
		bio->op = FT_BIO_FLUSH;
		nb_issue(nb, bio);
		bio->op = op; /* the flush command is already queued in libnbd */
		return;
	}
	bio->end_io(bio, bio->error);
}

static void nb_arm(struct nbd_backend *nb, struct ft_completion *c, short events)
{
	struct io_uring_sqe *sqe = ft_reactor_sqe(nb->b.reactor, c);

	io_uring_prep_poll_add(sqe, nb->fd, (unsigned)events);
}

static void nb_mark_dead(struct nbd_backend *nb)
{
	if (nb->dead)
		return;
	nb->dead = true;
	ft_err("nbd backend %s: connection lost: %s; its volume now fails I/O with EIO",
	       nb->uri, nbd_get_error() ? nbd_get_error() : "closed");
}

static void nb_kick_fn(struct ft_deferred *d)
{
	struct nbd_backend *nb = (struct nbd_backend *)((char *)d - offsetof(struct nbd_backend, kick));

	/* Complete what libnbd finished; end_io may submit more and re-kick. */
	while (nb->done_head) {
		struct ft_bio *bio = nb->done_head;

		nb->done_head = bio->next_done;
		if (!nb->done_head)
			nb->done_tail = NULL;
		nb_finish(nb, bio);
	}
	if (nb->dead)
		return;
	if (nbd_aio_is_dead(nb->h) || nbd_aio_is_closed(nb->h)) {
		nb_mark_dead(nb);
		return;
	}
	unsigned dir = nbd_aio_get_direction(nb->h);

	if ((dir & LIBNBD_AIO_DIRECTION_READ) && !nb->r_armed) {
		nb->r_armed = true;
		nb_arm(nb, &nb->rpoll, POLLIN);
	}
	if ((dir & LIBNBD_AIO_DIRECTION_WRITE) && !nb->w_armed) {
		nb->w_armed = true;
		nb_arm(nb, &nb->wpoll, POLLOUT);
	}
}

/*
 * Is there anything to read (or has the peer closed)? A POLLIN completion
 * can be stale by the time it runs: libnbd reads replies itself while it
 * sends (when a send would block). Notifying libnbd of a read that is not
 * there moves it from READY into REPLY.START, where it waits for a reply
 * and sends no queued command -- with no command out, that wait never ends
 * and the store hangs. So ask the socket first.
 */
static bool socket_has_input(int fd)
{
	char byte;
	ssize_t n = recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);

	return n >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
}

static void nb_poll_done(struct nbd_backend *nb, int res, bool readable)
{
	int rc = 0;

	if (readable)
		nb->r_armed = false;
	else
		nb->w_armed = false;
	if (nb->dead)
		return;
	if (res < 0) {
		ft_err("nbd backend %s: poll: %s", nb->uri, strerror(-res));
		return;
	}
	if (readable && !socket_has_input(nb->fd)) {
		/* Stale: see socket_has_input(). Wait for the next POLLIN. */
	} else if (readable)
		rc = nbd_aio_notify_read(nb->h);
	else if (nbd_aio_get_direction(nb->h) & LIBNBD_AIO_DIRECTION_WRITE)
		rc = nbd_aio_notify_write(nb->h);
	if (rc < 0 && (nbd_aio_is_dead(nb->h) || nbd_aio_is_closed(nb->h)))
		nb_mark_dead(nb);
	nb_kick(nb);
}

static void nb_rpoll_done(struct ft_completion *c, int res, uint32_t flags)
{
	(void)flags;
	nb_poll_done((struct nbd_backend *)((char *)c - offsetof(struct nbd_backend, rpoll)), res,
		     true);
}

static void nb_wpoll_done(struct ft_completion *c, int res, uint32_t flags)
{
	(void)flags;
	nb_poll_done((struct nbd_backend *)((char *)c - offsetof(struct nbd_backend, wpoll)), res,
		     false);
}

static int nb_attach(struct ft_backend *b, struct ft_reactor *r)
{
	struct nbd_backend *nb = to_nb(b);

	b->reactor = r;
	nb->rpoll.fn = nb_rpoll_done;
	nb->wpoll.fn = nb_wpoll_done;
	nb->kick.fn = nb_kick_fn;
	nb_kick(nb);
	return 0;
}

static void nb_close(struct ft_backend *b)
{
	struct nbd_backend *nb = to_nb(b);

	if (!nb->dead && nb->can_flush && !(b->caps & FT_BACKEND_READ_ONLY) &&
	    nbd_flush(nb->h, 0) < 0)
		ft_err("nbd backend %s: flush at close: %s", nb->uri, nbd_get_error());
	if (!nb->dead && nbd_shutdown(nb->h, 0) < 0)
		ft_debug("nbd backend %s: shutdown: %s", nb->uri, nbd_get_error());
	nbd_close(nb->h);
	free(nb->uri);
	free(nb);
}

const struct ft_backend_ops ft_backend_nbd_ops = {
	.name = "nbd",
	.attach = nb_attach,
	.submit = nb_submit,
	.close = nb_close,
};

static bool flag_of(int v)
{
	return v > 0;
}

int ft_backend_nbd_open(const char *uri, bool readonly, struct ft_backend **out)
{
	struct nbd_backend *nb = calloc(1, sizeof(*nb));
	int64_t size, minb, maxb;

	if (!nb)
		return -ENOMEM;
	nb->uri = strdup(uri);
	nb->h = nbd_create();
	if (!nb->uri || !nb->h) {
		ft_err("nbd backend %s: %s", uri, nb->h ? "out of memory" : nbd_get_error());
		goto fail;
	}
	if (nbd_connect_uri(nb->h, uri) < 0) {
		ft_err("nbd backend %s: cannot connect: %s", uri, nbd_get_error());
		goto fail;
	}
	size = nbd_get_size(nb->h);
	if (size < 0) {
		ft_err("nbd backend %s: cannot get size: %s", uri, nbd_get_error());
		goto fail;
	}
	nb->fd = nbd_aio_get_fd(nb->h);
	nb->can_flush = flag_of(nbd_can_flush(nb->h));
	nb->can_fua = flag_of(nbd_can_fua(nb->h));
	nb->can_trim = flag_of(nbd_can_trim(nb->h));
	nb->can_zero = flag_of(nbd_can_zero(nb->h));
	nb->can_fast_zero = flag_of(nbd_can_fast_zero(nb->h));
	nb->can_cache = flag_of(nbd_can_cache(nb->h));
	minb = nbd_get_block_size(nb->h, LIBNBD_SIZE_MINIMUM);
	maxb = nbd_get_block_size(nb->h, LIBNBD_SIZE_MAXIMUM);

	nb->b.ops = &ft_backend_nbd_ops;
	nb->b.size = (uint64_t)size;
	nb->b.min_block = minb > 0 ? (uint32_t)minb : 1;
	nb->b.max_request = (maxb > 0 && maxb < NBD_DEFAULT_MAX) ? (uint32_t)maxb : NBD_DEFAULT_MAX;
	nb->b.caps = FT_BACKEND_CAN_TRIM | FT_BACKEND_CAN_ZERO | FT_BACKEND_CAN_CACHE |
		     FT_BACKEND_CAN_FLUSH | FT_BACKEND_CAN_FUA;
	if (nb->can_zero && nb->can_fast_zero)
		nb->b.caps |= FT_BACKEND_CAN_FAST_ZERO;
	/* One connection carries every client's I/O, so its flush covers them all. */
	nb->b.caps |= FT_BACKEND_FLUSH_COVERS_ALL;
	if (readonly || flag_of(nbd_is_read_only(nb->h)))
		nb->b.caps |= FT_BACKEND_READ_ONLY;
	if (flag_of(nbd_is_rotational(nb->h)))
		nb->b.caps |= FT_BACKEND_ROTATIONAL;
	ft_info("nbd backend %s: %lld bytes, flush=%d fua=%d trim=%d zero=%d fast_zero=%d cache=%d%s",
		uri, (long long)size, nb->can_flush, nb->can_fua, nb->can_trim, nb->can_zero,
		nb->can_fast_zero, nb->can_cache,
		(nb->b.caps & FT_BACKEND_READ_ONLY) ? " read-only" : "");
	*out = &nb->b;
	return 0;
fail:
	if (nb->h)
		nbd_close(nb->h);
	free(nb->uri);
	free(nb);
	return -EIO;
}
