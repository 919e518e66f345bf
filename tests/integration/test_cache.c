/* SPDX-License-Identifier: MIT */
/*
 * The read cache from the outside: the real flashtierd with a cache device
 * (a file, or an nbdkit RAM disk behind nbdfuse for device failures), real
 * backing stores (files, or nbdkit with the log filter so that backing
 * store reads are counted outside the agent), libnbd clients.
 *
 *  - warm restart after SIGTERM and after kill -9: hits, no backing reads;
 *  - no stale data after kill -9 right after an acknowledged write, trim or
 *    zeroing, in write-through and write-around;
 *  - corrupt cached data or records: correct data from the store, counted;
 *  - a device with foreign data, a newer format or too small is refused and
 *    left untouched;
 *  - modes, read-only volumes, a size that is not whole cache blocks,
 *    quotas, the sequential cutoff;
 *  - cached data follows a volume's identity (name, store, size) across
 *    restarts, not its place in the config;
 *  - concurrent readers never see data older than an acknowledged write;
 *  - a failing cache device: no request fails, the volume goes pass-through,
 *    and its cached copies do not come back once the device recovers.
 *
 * Every volume runs on one reactor ("reactors": 1) so that all of them share
 * one partition of the cache, as the quota test needs.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <sys/random.h>

#include "flashtier/cachedev.h"
#include "flashtier/cachedir.h"
#include "nbd_client.h"

#define KiB 1024
#define MiB (1024 * 1024)
#define BLK 4096u
#define SEED_BACKING 7u

/* What a failed test must not leave running or mounted; see cleanup(). */
static struct ft_agent agent;
static char tdir[256];
static pid_t kits[2];
static int n_kits;
static pid_t run_pid;     /* a flashtierd run to completion */
static pid_t fuse_pid;    /* nbdfuse serving the cache device */
static char fuse_mnt[320]; /* set while mounted */

static char cache_path[320];
static char agent_vols[4096];  /* "volumes" of the running agent, for restarts */
static char agent_extra[1024]; /* top-level members: reactors, cache */

static void fuse_unmount(void);

static void cleanup(void)
{
	th_nbd_close_all();
	th_agent_kill(&agent);
	th_kill(&run_pid);
	fuse_unmount();
	for (int i = 0; i < n_kits; i++)
		th_kill(&kits[i]);
	n_kits = 0;
	/* Never recurse into a FUSE mount that is still there. */
	if (tdir[0] && !fuse_mnt[0])
		th_rm_rf(tdir);
	tdir[0] = '\0';
}

TestSuite(cache, .fini = cleanup, .timeout = 60);

/* ---- files ---- */

/* A backing file of @size bytes (a multiple of 1 MiB) at tdir/@name holding th_fill(@seed). */
static void make_backing_seed(const char *name, uint64_t size, uint32_t seed, char *out,
			      size_t len)
{
	char *buf = malloc(MiB);
	int fd;

	cr_assert_not_null(buf);
	th_fmt(out, len, "%s/%s", tdir, name);
	fd = open(out, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	cr_assert_geq(fd, 0, "create %s: %s", out, strerror(errno));
	for (uint64_t off = 0; off < size; off += MiB) {
		th_fill(buf, MiB, off, seed);
		cr_assert_eq(pwrite(fd, buf, MiB, (off_t)off), MiB, "write %s", out);
	}
	close(fd);
	free(buf);
}

/* The usual backing file: th_fill(SEED_BACKING). */
static void make_backing(const char *name, uint64_t size, char *out, size_t len)
{
	make_backing_seed(name, size, SEED_BACKING, out, len);
}

static long file_size(const char *path)
{
	struct stat st;

	cr_assert_eq(stat(path, &st), 0, "stat %s: %s", path, strerror(errno));
	return (long)st.st_size;
}

static void write_text(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	cr_assert_not_null(f, "create %s: %s", path, strerror(errno));
	fputs(text, f);
	cr_assert_eq(fclose(f), 0);
}

/* The agent's log from byte @from on (what one run of it said). */
static char *log_since(long from)
{
	size_t len;
	char *all = th_slurp(agent.log, &len), *out;

	if ((size_t)from > len)
		from = (long)len;
	out = strdup(all + from);
	cr_assert_not_null(out);
	free(all);
	return out;
}

static long log_mark(void)
{
	return access(agent.log, F_OK) == 0 ? file_size(agent.log) : 0;
}

/* ---- the cache device, read and damaged behind the agent's back ---- */

/* @len bytes at @off of @path into an aligned buffer (O_DIRECT where it works). */
static void *dev_read(const char *path, uint64_t off, size_t len)
{
	void *buf = NULL;
	int fd = open(path, O_RDONLY | O_DIRECT);

	if (fd < 0)
		fd = open(path, O_RDONLY);
	cr_assert_geq(fd, 0, "open %s: %s", path, strerror(errno));
	cr_assert_eq(posix_memalign(&buf, BLK, len), 0);
	cr_assert_eq(pread(fd, buf, len, (off_t)off), (ssize_t)len, "read %s at %llu: %s", path,
		     (unsigned long long)off, strerror(errno));
	close(fd);
	return buf;
}

/* Write @len bytes (aligned buffer) at @off of @path, durably. */
static void dev_write(const char *path, uint64_t off, const void *buf, size_t len)
{
	int fd = open(path, O_WRONLY | O_DIRECT);

	if (fd < 0)
		fd = open(path, O_WRONLY);
	cr_assert_geq(fd, 0, "open %s: %s", path, strerror(errno));
	cr_assert_eq(pwrite(fd, buf, len, (off_t)off), (ssize_t)len, "write %s: %s", path,
		     strerror(errno));
	cr_assert_eq(fdatasync(fd), 0);
	close(fd);
}

struct dev_layout {
	struct ft_cache_geometry g;
	uint8_t uuid[16];
};

/* Geometry and uuid from the newest valid superblock copy of @path. */
static void dev_layout(const char *path, struct dev_layout *d)
{
	struct ft_cache_sb *sb = dev_read(path, 0, 2 * FT_CACHE_SB_BYTES);
	uint64_t seq, best_seq = 0;
	int best = -1;

	for (int i = 0; i < 2; i++) {
		struct ft_cache_geometry g;
		uint8_t uuid[16];

		if (ft_cache_sb_decode(&sb[i], &g, uuid, &seq, NULL) != FT_SB_VALID)
			continue;
		if (best < 0 || seq > best_seq) {
			best = i;
			best_seq = seq;
			d->g = g;
			memcpy(d->uuid, uuid, 16);
		}
	}
	free(sb);
	cr_assert_geq(best, 0, "%s has no valid superblock", path);
}

/*
 * Device slots of @n blocks (block numbers, any volume: tests give their
 * volumes disjoint block ranges) per the valid mapping records now on the
 * device, -1 where none. Returns how many were found.
 */
static unsigned dev_record_slots(const char *path, const struct dev_layout *d,
				 const uint64_t *blocks, unsigned n, int64_t *slots)
{
	struct ft_cache_rec *recs = dev_read(path, d->g.meta_offset, d->g.meta_bytes);
	unsigned found = 0;

	for (unsigned i = 0; i < n; i++)
		slots[i] = -1;
	for (uint64_t s = 0; s < d->g.nslots; s++) {
		uint64_t key;
		uint32_t crc;

		if (ft_cache_rec_decode(&recs[s], d->uuid, s, &key, &crc) != FT_REC_VALID)
			continue;
		for (unsigned i = 0; i < n; i++)
			if (slots[i] < 0 && FT_CACHE_KEY_BLOCK(key) == blocks[i]) {
				slots[i] = (int64_t)s;
				found++;
			}
	}
	free(recs);
	return found;
}

/* Poll until a mapping record for each of @blocks is on the device. */
static void wait_records(const char *path, const uint64_t *blocks, unsigned n, int64_t *slots,
			 int timeout_ms)
{
	double end = th_now_ms() + timeout_ms;
	struct dev_layout d;
	unsigned found;

	dev_layout(path, &d);
	for (;;) {
		found = dev_record_slots(path, &d, blocks, n, slots);
		if (found == n)
			return;
		if (th_now_ms() > end)
			break;
		th_sleep_ms(5);
	}
	cr_assert_fail("only %u of %u mapping records reached the cache device within %d ms "
		       "(records are written lazily, but must be written)",
		       found, n, timeout_ms);
}

/* ---- agents ---- */

/* Top-level members for a cache at cache_path of @size plus @more (", \"k\": v" or ""). */
static void set_cache(const char *size, const char *more)
{
	if (size)
		th_fmt(agent_extra, sizeof(agent_extra),
		       "\"reactors\": 1, \"cache\": { \"path\": \"%s\", \"size\": \"%s\"%s },",
		       cache_path, size, more);
	else
		th_fmt(agent_extra, sizeof(agent_extra),
		       "\"reactors\": 1, \"cache\": { \"path\": \"%s\"%s },", cache_path, more);
}

/* The usual set-up: a cache file of @size in the test's directory. */
static void cache_in_tdir(const char *size)
{
	th_fmt(cache_path, sizeof(cache_path), "%s/cache.img", tdir);
	set_cache(size, "");
}

static void agent_start(void)
{
	ft_agent_start_in(&agent, tdir, agent_vols, agent_extra);
}

static void agent_stop_clean(void)
{
	int rc = ft_agent_stop(&agent);

	cr_assert_eq(rc, 0, "flashtierd exited with %d after SIGTERM (log above)", rc);
}

/* kill -9 and reap; the stale socket is removed so a restart is not mistaken for this agent. */
static void agent_kill9(void)
{
	int status = 0;

	cr_assert_eq(kill(agent.pid, SIGKILL), 0);
	cr_assert_eq(waitpid(agent.pid, &status, 0), agent.pid);
	agent.pid = 0;
	if (!WIFSIGNALED(status)) {
		th_dump_file(agent.log);
		cr_assert_fail("flashtierd had exited (status %#x) before kill -9", status);
	}
	unlink(agent.sock);
}

/* ---- metrics ---- */

static void cache_prefix(char *out, size_t len, const char *name, const char *vol)
{
	th_fmt(out, len, "%s{volume=\"%s\",domain=\"\"}", name, vol);
}

/* A cache metric of @vol (asserted present). */
static double cm(const char *name, const char *vol)
{
	return th_vol_metric(&agent, name, vol, NULL);
}

/* Poll until cache metric @name of @vol is @want. */
static void wait_cm(const char *name, const char *vol, double want, int timeout_ms)
{
	char prefix[256];

	cache_prefix(prefix, sizeof(prefix), name, vol);
	th_wait_metric(&agent, prefix, want, timeout_ms);
}

#define HITS     "flashtier_cache_hits_total"
#define MISSES   "flashtier_cache_misses_total"
#define HITBYTES "flashtier_cache_hit_bytes_total"
#define FILLS    "flashtier_cache_fills_total"
#define DROPPED  "flashtier_cache_fills_dropped_total"
#define BYPASSES "flashtier_cache_bypasses_total"
#define OCCUPIED "flashtier_cache_occupancy_bytes"
#define QUOTA    "flashtier_cache_quota_bytes"
#define CKSUM    "flashtier_cache_checksum_errors_total"
#define DEVERR   "flashtier_cache_device_errors_total"
#define PASSTHRU "flashtier_cache_passthrough"

/* ---- client I/O ---- */

/* Read [@off, @off+@len) and expect th_fill(@seed) there. */
static void read_expect(struct nbd_handle *h, uint64_t off, size_t len, uint32_t seed,
			const char *what)
{
	char *buf = malloc(len), *want = malloc(len);

	cr_assert(buf && want);
	cr_assert_eq(nbd_pread(h, buf, len, off, 0), 0, "%s: read %zu at %llu: %s", what, len,
		     (unsigned long long)off, nbd_get_error());
	th_fill(want, len, off, seed);
	cr_assert(memcmp(buf, want, len) == 0, "%s: wrong data read at %llu (+%zu)", what,
		  (unsigned long long)off, len);
	free(buf);
	free(want);
}

/* Read [@off, @off+@len) and expect what the file @backing holds there. */
static void read_expect_file(struct nbd_handle *h, const char *backing, uint64_t off, size_t len,
			     const char *what)
{
	char *buf = malloc(len), *want = malloc(len);

	cr_assert(buf && want);
	cr_assert_eq(nbd_pread(h, buf, len, off, 0), 0, "%s: read %zu at %llu: %s", what, len,
		     (unsigned long long)off, nbd_get_error());
	th_file_read(backing, off, want, len);
	cr_assert(memcmp(buf, want, len) == 0,
		  "%s: read at %llu (+%zu) does not return what the backing store holds "
		  "(stale cached data?)",
		  what, (unsigned long long)off, len);
	free(buf);
	free(want);
}

static void write_seed(struct nbd_handle *h, uint64_t off, size_t len, uint32_t seed)
{
	char *buf = malloc(len);

	cr_assert_not_null(buf);
	th_fill(buf, len, off, seed);
	cr_assert_eq(nbd_pwrite(h, buf, len, off, 0), 0, "write %zu at %llu: %s", len,
		     (unsigned long long)off, nbd_get_error());
	free(buf);
}

/* ---- a backing store whose reads are counted outside the agent ---- */

static char kit_log[320];

/* nbdkit serving the file @backing with the log filter; returns the nbd+unix URI in @uri. */
static void logged_backing(const char *backing, char *uri, size_t len)
{
	char sock[320], file_arg[400];
	const char *args[] = { "--filter=log", "file", backing, file_arg, NULL };

	th_fmt(kit_log, sizeof(kit_log), "%s/backing-requests.log", tdir);
	th_fmt(file_arg, sizeof(file_arg), "logfile=%s", kit_log);
	cr_assert_lt(n_kits, 2);
	kits[n_kits++] = th_nbdkit_start(tdir, "backing", sock, sizeof(sock), args);
	th_fmt(uri, len, "nbd+unix:///?socket=%s", sock);
}

/* READ requests the backing store has received so far (the log filter's "Read" lines). */
static unsigned backing_reads(void)
{
	char *log = th_slurp(kit_log, NULL);
	unsigned n = 0;

	for (const char *p = log; (p = strstr(p, " Read id=")); p++)
		n++;
	free(log);
	return n;
}

/* ---- 1, 2: warm restart ---- */

enum { WARM_REQS = 32, WARM_REQ_LEN = 8 * KiB };

/* Request i of the warm-restart read set: 8 KiB at 72 KiB steps (no sequential run). */
static uint64_t warm_off(int i)
{
	return (uint64_t)i * 72 * KiB;
}

static void warm_read_all(struct nbd_handle *h, const char *what)
{
	for (int i = 0; i < WARM_REQS; i++)
		read_expect(h, warm_off(i), WARM_REQ_LEN, SEED_BACKING, what);
}

static void warm_restart(bool kill9)
{
	const unsigned nblocks = WARM_REQS * WARM_REQ_LEN / BLK;
	char backing[320], uri[400];
	struct nbd_handle *h;
	unsigned reads0, reads1;
	long mark;
	char *log;

	th_mkdtemp(tdir, sizeof(tdir));
	make_backing("backing.img", 16 * MiB, backing, sizeof(backing));
	logged_backing(backing, uri, sizeof(uri));
	cache_in_tdir("16M");
	th_fmt(agent_vols, sizeof(agent_vols), "{ \"disk\": { \"backing\": \"%s\" } }", uri);
	agent_start();

	/* Cold: every request misses and reaches the backing store. */
	h = th_nbd_connect(&agent, "disk");
	reads0 = backing_reads();
	warm_read_all(h, "cold read");
	reads1 = backing_reads();
	cr_assert_eq(cm(MISSES, "disk"), WARM_REQS);
	cr_assert_eq(cm(HITS, "disk"), 0);
	cr_assert_geq(reads1 - reads0, WARM_REQS, "the backing store saw %u reads for %d misses",
		      reads1 - reads0, WARM_REQS);
	wait_cm(FILLS, "disk", nblocks, 5000);
	cr_assert_eq(cm(OCCUPIED, "disk"), nblocks * BLK);

	/* Still running: the same reads are hits and the store sees none of them. */
	reads0 = backing_reads();
	warm_read_all(h, "warm read before restart");
	cr_assert_eq(cm(HITS, "disk"), WARM_REQS);
	cr_assert_eq(backing_reads(), reads0, "hits went to the backing store");
	th_nbd_disconnect(h);

	if (kill9) {
		/* The records are written lazily, but must reach the device without any trigger. */
		uint64_t blocks[WARM_REQS * WARM_REQ_LEN / BLK];
		int64_t slots[WARM_REQS * WARM_REQ_LEN / BLK];

		for (unsigned i = 0; i < nblocks; i++)
			blocks[i] = warm_off((int)(i / 2)) / BLK + i % 2;
		wait_records(cache_path, blocks, nblocks, slots, 5000);
		agent_kill9();
	} else {
		agent_stop_clean();
	}

	/* Restarted: warm. Every read is a hit with the right data, none reaches the store. */
	mark = log_mark();
	agent_start();
	cr_assert_eq(cm(OCCUPIED, "disk"), nblocks * BLK,
		     "the restarted agent did not reattach the cached blocks");
	h = th_nbd_connect(&agent, "disk");
	reads0 = backing_reads();
	warm_read_all(h, "read after restart");
	/* Unaligned reads inside cached blocks are hits as well (served through a bounce buffer). */
	read_expect(h, warm_off(3) + 512, BLK, SEED_BACKING, "unaligned hit");
	read_expect(h, warm_off(5) + BLK + 1024, 1024, SEED_BACKING, "small unaligned hit");
	cr_assert_eq(cm(MISSES, "disk"), 0, "reads after a %s restart missed",
		     kill9 ? "kill -9" : "clean");
	cr_assert_eq(cm(HITS, "disk"), WARM_REQS + 2);
	cr_assert_eq(cm(HITBYTES, "disk"), WARM_REQS * WARM_REQ_LEN + BLK + 1024);
	/*
	 * Then one read of a block never cached: the store's log shows exactly
	 * that one (so the log is current and the hits above reached no store).
	 */
	read_expect(h, 8 * MiB, BLK, SEED_BACKING, "sentinel miss");
	cr_assert_eq(cm(MISSES, "disk"), 1);
	reads1 = backing_reads();
	cr_assert_eq(reads1 - reads0, 1,
		     "the backing store saw %u reads for one miss after a warm restart",
		     reads1 - reads0);
	th_nbd_disconnect(h);
	log = log_since(mark);
	cr_assert(strstr(log, "reattached"), "no reattach in the log:\n%s", log);
	if (kill9)
		cr_assert(strstr(log, "not clean"), "a kill -9 went unnoticed:\n%s", log);
	else
		cr_assert_null(strstr(log, "not clean"), "a clean stop was taken for a crash:\n%s",
			       log);
	free(log);
	agent_stop_clean();
}

Test(cache, warm_restart_after_sigterm)
{
	warm_restart(false);
}

Test(cache, warm_restart_after_kill9)
{
	warm_restart(true);
}

/* ---- 3: no stale data after kill -9 ---- */

enum stale_op { OP_WRITE, OP_WRITE_PARTIAL, OP_WRITE_ZEROES, OP_TRIM, OP_WRITE_SPAN, N_OPS };
static const char *const stale_op_name[] = { "4K write", "512-byte write", "write_zeroes",
					     "trim", "12K write over cached blocks" };

/* Start @op on block @b of @h (asynchronously); returns the cookie. */
static int64_t stale_op_start(struct nbd_handle *h, enum stale_op op, uint64_t b, uint32_t seed,
			      char *buf)
{
	uint64_t off = b * BLK;
	int64_t c = -1;

	switch (op) {
	case OP_WRITE:
		th_fill(buf, BLK, off, seed);
		c = nbd_aio_pwrite(h, buf, BLK, off, NBD_NULL_COMPLETION, 0);
		break;
	case OP_WRITE_PARTIAL:
		th_fill(buf, 512, off + 1024, seed);
		c = nbd_aio_pwrite(h, buf, 512, off + 1024, NBD_NULL_COMPLETION, 0);
		break;
	case OP_WRITE_ZEROES:
		c = nbd_aio_zero(h, BLK, off, NBD_NULL_COMPLETION, 0);
		break;
	case OP_TRIM:
		c = nbd_aio_trim(h, BLK, off, NBD_NULL_COMPLETION, 0);
		break;
	case OP_WRITE_SPAN: /* from the middle of b-1 to the middle of b+2: partial, whole, partial */
		th_fill(buf, 3 * BLK, off - BLK / 2, seed);
		c = nbd_aio_pwrite(h, buf, 3 * BLK, off - BLK / 2, NBD_NULL_COMPLETION, 0);
		break;
	default:
		break;
	}
	cr_assert_gt(c, 0, "%s: %s", stale_op_name[op], nbd_get_error());
	return c;
}

/*
 * Blocks are cached (and their records are on the device), then overwritten
 * (write, partial write, zeroes, trim); the agent is killed the moment the
 * last request is acknowledged. After the restart every read must return
 * what the backing store holds, in both modes; untouched blocks must still
 * be hits (the cache did come back warm, so a stale record would be used).
 */
Test(cache, no_stale_data_after_kill9, .timeout = 60)
{
	enum { ITER = 50, PER = 3 }; /* blocks cached per volume and iteration: b-1, b, b+1 */
	static const char *const vol[2] = { "wt", "wa" };
	const uint64_t base[2] = { 0, 2048 }; /* disjoint block ranges, see dev_record_slots() */
	char backing[2][320], *bufs[2];

	th_mkdtemp(tdir, sizeof(tdir));
	make_backing("wt.img", 16 * MiB, backing[0], sizeof(backing[0]));
	make_backing("wa.img", 16 * MiB, backing[1], sizeof(backing[1]));
	cache_in_tdir("16M");
	th_fmt(agent_vols, sizeof(agent_vols),
	       "{ \"wt\": { \"backing\": \"%s\", \"cache\": { \"mode\": \"write-through\" } },"
	       "  \"wa\": { \"backing\": \"%s\", \"cache\": { \"mode\": \"write-around\" } } }",
	       backing[0], backing[1]);
	for (int v = 0; v < 2; v++) {
		bufs[v] = malloc(3 * BLK);
		cr_assert_not_null(bufs[v]);
	}
	agent_start();

	for (int it = 0; it < ITER; it++) {
		enum stale_op op = (enum stale_op)(it % N_OPS);
		uint64_t blocks[2 * PER], b[2];
		int64_t slots[2 * PER], cookie[2];
		struct nbd_handle *h[2];
		double misses[2];
		char what[160];

		for (int v = 0; v < 2; v++) {
			b[v] = base[v] + 16 + (uint64_t)it * 8;
			h[v] = th_nbd_connect(&agent, vol[v]);
			misses[v] = cm(MISSES, vol[v]);
			/* Cache b-1, b, b+1 (three misses, three fills). */
			for (int k = 0; k < PER; k++) {
				blocks[v * PER + k] = b[v] - 1 + (uint64_t)k;
				read_expect_file(h[v], backing[v], blocks[v * PER + k] * BLK, BLK,
						 "caching read");
			}
			cr_assert_eq(cm(MISSES, vol[v]), misses[v] + PER);
		}
		/* Only VALID (filled) blocks get records: this waits for the fills as well. */
		wait_records(cache_path, blocks, 2 * PER, slots, 5000);

		/* The overwrite, on both volumes at once; kill -9 as soon as both are acknowledged. */
		for (int v = 0; v < 2; v++)
			cookie[v] = stale_op_start(h[v], op, b[v], 1000u + (unsigned)it, bufs[v]);
		for (int v = 0; v < 2; v++) {
			th_nbd_wait_idle(h[v], 10000, "overwrite not acknowledged");
			cr_assert_eq(nbd_aio_command_completed(h[v], (uint64_t)cookie[v]), 1,
				     "%s on %s: %s", stale_op_name[op], vol[v], nbd_get_error());
		}
		agent_kill9();
		for (int v = 0; v < 2; v++)
			th_nbd_close(h[v]);

		/* The writes did reach the stores (else the check below proves nothing). */
		if (op == OP_WRITE || op == OP_WRITE_SPAN) {
			for (int v = 0; v < 2; v++) {
				char got[BLK], want[BLK];

				th_file_read(backing[v], b[v] * BLK, got, BLK);
				th_fill(want, BLK, b[v] * BLK, 1000u + (unsigned)it);
				cr_assert(memcmp(got, want, BLK) == 0, "%s: the %s is not in the store",
					  vol[v], stale_op_name[op]);
			}
		}

		agent_start();
		for (int v = 0; v < 2; v++) {
			double hits;

			h[v] = th_nbd_connect(&agent, vol[v]);
			th_fmt(what, sizeof(what), "iteration %d, %s, after a %s and kill -9", it,
			       vol[v], stale_op_name[op]);
			/*
			 * First a block next to the overwrite, never touched: it must be a
			 * hit, so the cache did come back warm and a stale record of the
			 * overwritten block would have been used too.
			 */
			if (op != OP_WRITE_SPAN) {
				hits = cm(HITS, vol[v]);
				read_expect_file(h[v], backing[v], (b[v] + 1) * BLK, BLK, what);
				cr_assert_eq(cm(HITS, vol[v]), hits + 1,
					     "%s: the cache did not come back warm (untouched block %llu "
					     "missed)",
					     what, (unsigned long long)(b[v] + 1));
			}
			for (int k = 0; k < PER; k++)
				read_expect_file(h[v], backing[v], blocks[v * PER + k] * BLK, BLK,
						 what);
			/* The overwritten block as part of a larger read, too. */
			read_expect_file(h[v], backing[v], (b[v] - 1) * BLK, 3 * BLK, what);
			th_nbd_disconnect(h[v]);
		}
	}
	agent_stop_clean();
	for (int v = 0; v < 2; v++)
		free(bufs[v]);
}

/* ---- 4: corruption ---- */

Test(cache, corrupt_data_and_records_are_not_served)
{
	enum { N = 16 };
	char backing[320], garbage_seed[BLK];
	uint64_t blocks[N];
	int64_t slots[N];
	struct dev_layout d;
	struct nbd_handle *h;
	void *garbage = NULL;
	long mark;
	char *log;

	th_mkdtemp(tdir, sizeof(tdir));
	make_backing("disk.img", 16 * MiB, backing, sizeof(backing));
	cache_in_tdir("16M");
	th_fmt(agent_vols, sizeof(agent_vols), "{ \"disk\": { \"backing\": \"%s\" } }", backing);
	agent_start();
	h = th_nbd_connect(&agent, "disk");
	for (int i = 0; i < N; i++) {
		blocks[i] = 100 + (uint64_t)i * 3;
		read_expect(h, blocks[i] * BLK, BLK, SEED_BACKING, "caching read");
	}
	wait_cm(FILLS, "disk", N, 5000);
	th_nbd_disconnect(h);
	agent_stop_clean();

	/* Where each block lives, per the records; garbage over two blocks' data, one record. */
	dev_layout(cache_path, &d);
	cr_assert_eq(dev_record_slots(cache_path, &d, blocks, N, slots), N,
		     "a clean stop did not persist every record");
	cr_assert_eq(posix_memalign(&garbage, BLK, BLK), 0);
	cr_assert_eq(getrandom(garbage_seed, sizeof(garbage_seed), 0), (ssize_t)sizeof(garbage_seed));
	memcpy(garbage, garbage_seed, BLK);
	dev_write(cache_path, d.g.data_offset + (uint64_t)slots[3] * BLK, garbage, BLK);
	dev_write(cache_path, d.g.data_offset + (uint64_t)slots[7] * BLK, garbage, BLK);
	{
		/* Record of block 11: its page, one record scribbled on. */
		uint64_t page_off = d.g.meta_offset + (uint64_t)slots[11] * FT_CACHE_META_BYTES /
							      BLK * BLK;
		char *page = dev_read(cache_path, page_off, BLK);

		memset(page + (uint64_t)slots[11] * FT_CACHE_META_BYTES % BLK + 8, 0x5a, 4);
		dev_write(cache_path, page_off, page, BLK);
		free(page);
	}

	mark = log_mark();
	agent_start();
	/* Blocks 3 and 7 are still mapped (their records are fine); 11 is not. */
	cr_assert_eq(cm(OCCUPIED, "disk"), (N - 1) * BLK);
	h = th_nbd_connect(&agent, "disk");
	for (int i = 0; i < N; i++)
		read_expect(h, blocks[i] * BLK, BLK, SEED_BACKING, "read after corruption");
	cr_assert_eq(cm(CKSUM, "disk"), 2, "corrupt cached blocks were not counted");
	cr_assert_eq(cm(HITS, "disk"), N - 3);
	cr_assert_eq(cm(MISSES, "disk"), 3);
	/* The damaged blocks are cached again, correctly. */
	wait_cm(FILLS, "disk", 3, 5000);
	for (int i = 0; i < N; i++)
		read_expect(h, blocks[i] * BLK, BLK, SEED_BACKING, "second read after corruption");
	cr_assert_eq(cm(HITS, "disk"), 2 * N - 3);
	cr_assert_eq(cm(MISSES, "disk"), 3);

	/* Corruption while running (behind the agent's back): the next hit notices it. */
	memcpy(garbage, garbage_seed, BLK);
	((char *)garbage)[0] ^= 1;
	dev_write(cache_path, d.g.data_offset + (uint64_t)slots[5] * BLK, garbage, BLK);
	read_expect(h, blocks[5] * BLK, BLK, SEED_BACKING, "read of a block corrupted live");
	cr_assert_eq(cm(CKSUM, "disk"), 3);
	cr_assert_eq(cm(MISSES, "disk"), 4);
	wait_cm(FILLS, "disk", 4, 5000);
	/* A multi-block hit with one damaged block in the middle is served right as well. */
	{
		uint64_t run[8];
		int64_t run_slots[8];
		double hits;

		read_expect(h, 200 * BLK, 8 * BLK, SEED_BACKING, "caching a 32K run");
		wait_cm(FILLS, "disk", 12, 5000);
		for (int i = 0; i < 8; i++)
			run[i] = 200 + (uint64_t)i;
		wait_records(cache_path, run, 8, run_slots, 5000);
		hits = cm(HITS, "disk");
		read_expect(h, 200 * BLK, 8 * BLK, SEED_BACKING, "32K hit");
		cr_assert_eq(cm(HITS, "disk"), hits + 1);
		dev_write(cache_path, d.g.data_offset + (uint64_t)run_slots[5] * BLK, garbage, BLK);
		read_expect(h, 200 * BLK, 8 * BLK, SEED_BACKING, "32K read over a damaged block");
		cr_assert_eq(cm(CKSUM, "disk"), 4);
		cr_assert_eq(cm(HITS, "disk"), hits + 1);
		read_expect(h, 203 * BLK + 512, 3 * BLK, SEED_BACKING,
			    "unaligned read over a damaged block");
	}
	th_nbd_disconnect(h);
	log = log_since(mark);
	cr_assert(strstr(log, "checksum"), "no checksum warning in the log:\n%s", log);
	free(log);
	free(garbage);
	agent_stop_clean();
}

/* ---- 5: devices that must be refused ---- */

struct run {
	int status;
	char *err;
};

/* Run flashtierd on config @cfg to completion (it must exit within 10 s). */
static void run_once(const char *cfg, struct run *r)
{
	const char *bin = getenv("AGENT");
	char err_path[320];
	double end;
	int status = 0;

	cr_assert_not_null(bin, "AGENT is not set: run through 'make check'");
	th_fmt(err_path, sizeof(err_path), "%s/run.err", tdir);
	run_pid = fork();
	cr_assert_geq(run_pid, 0);
	if (run_pid == 0) {
		int fd = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);

		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (fd < 0)
			_exit(126);
		dup2(fd, 1);
		dup2(fd, 2);
		execl(bin, "flashtierd", "--config", cfg, (char *)NULL);
		_exit(127);
	}
	end = th_now_ms() + 10000;
	while (waitpid(run_pid, &status, WNOHANG) != run_pid) {
		if (th_now_ms() > end) {
			th_kill(&run_pid);
			th_dump_file(err_path);
			cr_assert_fail("flashtierd still running after 10 s: it should have refused "
				       "the cache");
		}
		th_sleep_ms(10);
	}
	run_pid = 0;
	r->status = status;
	r->err = th_slurp(err_path, NULL);
}

/* Expect @cfg to be refused: non-zero exit, each of @expect in the output, no socket. */
static void expect_refused(const char *cfg, const char *const *expect)
{
	char sock[320];
	struct run r;

	run_once(cfg, &r);
	cr_assert(WIFEXITED(r.status), "flashtierd died from a signal: %s", r.err);
	cr_assert_neq(WEXITSTATUS(r.status), 0, "flashtierd accepted the cache: %s", r.err);
	for (int i = 0; expect[i]; i++)
		cr_assert(strstr(r.err, expect[i]), "message lacks '%s': %s", expect[i], r.err);
	th_fmt(sock, sizeof(sock), "%s/nbd.sock", tdir);
	cr_assert_eq(access(sock, F_OK), -1, "the socket was created");
	free(r.err);
}

/* A config (no metrics) on tdir/nbd.sock with cache members @cache, one volume on @backing. */
static void write_cfg(const char *path, const char *cache, const char *backing)
{
	char text[2048];

	th_fmt(text, sizeof(text),
	       "{ \"listen\": \"%s/nbd.sock\", \"reactors\": 1, \"cache\": { %s },"
	       "  \"volumes\": { \"disk\": { \"backing\": \"%s\" } } }\n",
	       tdir, cache, backing);
	write_text(path, text);
}

static void assert_same_file(const char *path, const char *before, size_t len, const char *why)
{
	size_t now_len;
	char *now = th_slurp(path, &now_len);

	cr_assert_eq(now_len, len, "%s: %s changed size from %zu to %zu", why, path, len, now_len);
	cr_assert(memcmp(now, before, len) == 0, "%s: %s was modified", why, path);
	free(now);
}

Test(cache, foreign_newer_and_small_devices_are_refused)
{
	char backing[320], cfg[320], cache[800], small[320], *before;
	size_t len;
	int fd;

	th_mkdtemp(tdir, sizeof(tdir));
	make_backing("disk.img", 1 * MiB, backing, sizeof(backing));
	th_fmt(cfg, sizeof(cfg), "%s/ft.json", tdir);

	/* Foreign data: random bytes in the first 8 KiB of a 16 MiB file. */
	th_make_file(tdir, "foreign.img", 16 * MiB, cache_path, sizeof(cache_path));
	{
		char rnd[8192];

		cr_assert_eq(getrandom(rnd, sizeof(rnd), 0), (ssize_t)sizeof(rnd));
		fd = open(cache_path, O_WRONLY);
		cr_assert_geq(fd, 0);
		cr_assert_eq(pwrite(fd, rnd, sizeof(rnd), 0), (ssize_t)sizeof(rnd));
		close(fd);
	}
	before = th_slurp(cache_path, &len);
	{
		const char *expect[] = { cache_path, "not a flashtier cache", "reformat", NULL };

		th_fmt(cache, sizeof(cache), "\"path\": \"%s\"", cache_path);
		write_cfg(cfg, cache, backing);
		expect_refused(cfg, expect);
		assert_same_file(cache_path, before, len, "foreign data, no size");
		th_fmt(cache, sizeof(cache), "\"path\": \"%s\", \"size\": \"16M\"", cache_path);
		write_cfg(cfg, cache, backing);
		expect_refused(cfg, expect);
		assert_same_file(cache_path, before, len, "foreign data, same size");
	}
	free(before);

	/* With "reformat": true the same file becomes a cache and the agent serves. */
	th_fmt(agent_vols, sizeof(agent_vols), "{ \"disk\": { \"backing\": \"%s\" } }", backing);
	set_cache(NULL, ", \"reformat\": true");
	agent_start();
	{
		struct nbd_handle *h = th_nbd_connect(&agent, "disk");

		read_expect(h, 0, 64 * KiB, SEED_BACKING, "read with a reformatted cache");
		th_nbd_disconnect(h);
	}
	wait_cm(FILLS, "disk", 16, 5000);
	agent_stop_clean();
	{
		char *sb = th_slurp(cache_path, &len);

		cr_assert_eq(len, 16 * MiB);
		cr_assert(memcmp(sb, FT_CACHE_MAGIC, 8) == 0, "no flashtier superblock after reformat");
		free(sb);
	}
	/* A valid cache of ours starts without "reformat" (and is not reformatted: still warm). */
	set_cache(NULL, "");
	agent_start();
	cr_assert_eq(cm(OCCUPIED, "disk"), 16 * BLK, "the cache was reformatted again");
	agent_stop_clean();

	/* Newer format: bump the version of both superblock copies (offset 8, u32 LE). */
	fd = open(cache_path, O_RDWR);
	cr_assert_geq(fd, 0);
	for (int copy = 0; copy < 2; copy++) {
		uint32_t v;
		off_t off = (off_t)copy * FT_CACHE_SB_BYTES + 8;

		cr_assert_eq(pread(fd, &v, 4, off), 4);
		cr_assert_eq(le32toh(v), FT_CACHE_VERSION);
		v = htole32(FT_CACHE_VERSION + 1);
		cr_assert_eq(pwrite(fd, &v, 4, off), 4);
	}
	close(fd);
	before = th_slurp(cache_path, &len);
	{
		const char *expect[] = { cache_path, "newer", NULL };

		th_fmt(cache, sizeof(cache), "\"path\": \"%s\"", cache_path);
		write_cfg(cfg, cache, backing);
		expect_refused(cfg, expect);
		assert_same_file(cache_path, before, len, "newer format");
	}
	free(before);

	/* Too small: refused by the config check, or by the device check for an existing file. */
	th_fmt(small, sizeof(small), "%s/small.img", tdir);
	{
		const char *expect[] = { "cache.size", "2M", NULL };

		th_fmt(cache, sizeof(cache), "\"path\": \"%s\", \"size\": \"1M\"", small);
		write_cfg(cfg, cache, backing);
		expect_refused(cfg, expect);
		cr_assert_eq(access(small, F_OK), -1, "a refused cache file was created");
	}
	th_make_file(tdir, "small.img", 1 * MiB, small, sizeof(small));
	{
		const char *expect[] = { small, "too small", NULL };

		th_fmt(cache, sizeof(cache), "\"path\": \"%s\"", small);
		write_cfg(cfg, cache, backing);
		expect_refused(cfg, expect);
		cr_assert_eq(file_size(small), 1 * MiB);
	}
}

/*
 * A "size" larger than an existing file with foreign data: refused like any
 * foreign device, and the file is not grown either (it is not ours; think of
 * a disk image named by mistake).
 */
Test(cache, foreign_device_is_not_resized)
{
	char backing[320], cfg[320], cache[800], *before;
	size_t len;
	char rnd[8192];
	int fd;
	const char *expect[] = { NULL, "not a flashtier cache", NULL };

	th_mkdtemp(tdir, sizeof(tdir));
	make_backing("disk.img", 1 * MiB, backing, sizeof(backing));
	th_fmt(cfg, sizeof(cfg), "%s/ft.json", tdir);
	th_make_file(tdir, "image.raw", 4 * MiB, cache_path, sizeof(cache_path));
	cr_assert_eq(getrandom(rnd, sizeof(rnd), 0), (ssize_t)sizeof(rnd));
	fd = open(cache_path, O_WRONLY);
	cr_assert_geq(fd, 0);
	cr_assert_eq(pwrite(fd, rnd, sizeof(rnd), 0), (ssize_t)sizeof(rnd));
	close(fd);
	before = th_slurp(cache_path, &len);
	expect[0] = cache_path;
	th_fmt(cache, sizeof(cache), "\"path\": \"%s\", \"size\": \"16M\"", cache_path);
	write_cfg(cfg, cache, backing);
	expect_refused(cfg, expect);
	assert_same_file(cache_path, before, len, "foreign data, \"size\" larger than the file");
	free(before);
}

/* ---- 6: modes ---- */

/* Does the metrics text have any flashtier_cache_* sample for volume @vol? */
static bool has_cache_sample(const char *text, const char *vol)
{
	char label[128];

	th_fmt(label, sizeof(label), "{volume=\"%s\"", vol);
	for (const char *p = text; p && *p; p = strchr(p, '\n'), p = p ? p + 1 : NULL) {
		const char *eol = strchr(p, '\n');
		const char *l = strstr(p, label);

		if (strncmp(p, "flashtier_cache_", 16) == 0 && l && (!eol || l < eol))
			return true;
	}
	return false;
}

Test(cache, modes_and_readonly)
{
	static const char *const names[] = { "wt", "wa", "none", "ro" };
	char backing[4][320], name[32], odd[320];
	struct nbd_handle *h;
	char *text;

	th_mkdtemp(tdir, sizeof(tdir));
	for (int i = 0; i < 4; i++) {
		th_fmt(name, sizeof(name), "%s.img", names[i]);
		make_backing(name, 4 * MiB, backing[i], sizeof(backing[i]));
	}
	/* A volume whose size is not a whole number of cache blocks: 1 MiB + 512. */
	make_backing("odd.img", 2 * MiB, odd, sizeof(odd));
	cr_assert_eq(truncate(odd, 1 * MiB + 512), 0);
	cache_in_tdir("16M");
	th_fmt(agent_vols, sizeof(agent_vols),
	       "{ \"wt\": { \"backing\": \"%s\", \"cache\": { \"mode\": \"write-through\" } },"
	       "  \"wa\": { \"backing\": \"%s\", \"cache\": { \"mode\": \"write-around\" } },"
	       "  \"none\": { \"backing\": \"%s\", \"cache\": { \"mode\": \"none\" } },"
	       "  \"ro\": { \"backing\": \"%s\", \"readonly\": true },"
	       "  \"odd\": { \"backing\": \"%s\" } }",
	       backing[0], backing[1], backing[2], backing[3], odd);
	agent_start();

	/* The partial last block is never cached, and reads and writes around it stay right. */
	h = th_nbd_connect(&agent, "odd");
	cr_assert_eq(nbd_get_size(h), 1 * MiB + 512);
	read_expect(h, 1 * MiB - BLK, BLK + 512, SEED_BACKING, "odd: read over the tail");
	wait_cm(FILLS, "odd", 1, 5000);
	read_expect(h, 1 * MiB - BLK, BLK + 512, SEED_BACKING, "odd: read over the tail again");
	read_expect(h, 1 * MiB - BLK, BLK, SEED_BACKING, "odd: last whole block");
	read_expect(h, 1 * MiB, 512, SEED_BACKING, "odd: the tail");
	cr_assert_eq(cm(HITS, "odd"), 1, "odd: the last whole block was not a hit");
	write_seed(h, 1 * MiB - 512, 1024, 61);
	read_expect(h, 1 * MiB - 512, 1024, 61, "odd: read after a write over the tail");
	read_expect(h, 1 * MiB - BLK, BLK - 512, SEED_BACKING, "odd: rest of the last block");
	cr_assert_eq(cm(OCCUPIED, "odd"), 0);
	th_nbd_disconnect(h);

	/* write-through: a write fills; the next read of it is a hit with the new data. */
	h = th_nbd_connect(&agent, "wt");
	write_seed(h, 10 * BLK, 2 * BLK, 21);
	cr_assert_eq(cm(OCCUPIED, "wt"), 2 * BLK, "wt: a write did not fill the cache");
	wait_cm(FILLS, "wt", 2, 5000);
	read_expect(h, 10 * BLK, 2 * BLK, 21, "wt: read after write");
	cr_assert_eq(cm(HITS, "wt"), 1, "wt: a written block was not served from the cache");
	cr_assert_eq(cm(MISSES, "wt"), 0);
	/* A cached block overwritten: the cache follows (a hit, new data). */
	write_seed(h, 10 * BLK, BLK, 22);
	wait_cm(FILLS, "wt", 3, 5000);
	read_expect(h, 10 * BLK, BLK, 22, "wt: read after overwrite");
	cr_assert_eq(cm(HITS, "wt"), 2);
	cr_assert_eq(cm(MISSES, "wt"), 0);
	cr_assert_geq(cm("flashtier_cache_invalidations_total", "wt"), 1);
	th_nbd_disconnect(h);

	/*
	 * write-around: a write does not fill; the next read misses, then fills.
	 * (A fill takes its slot before the write is answered, so occupancy
	 * tells at once whether a write filled; fills_total only counts them
	 * later.)
	 */
	h = th_nbd_connect(&agent, "wa");
	write_seed(h, 10 * BLK, 2 * BLK, 31);
	cr_assert_eq(cm(OCCUPIED, "wa"), 0, "wa: a write filled the cache");
	read_expect(h, 10 * BLK, 2 * BLK, 31, "wa: read after write");
	cr_assert_eq(cm(MISSES, "wa"), 1, "wa: the read after a write did not miss");
	cr_assert_eq(cm(HITS, "wa"), 0, "wa: a write filled the cache");
	wait_cm(FILLS, "wa", 2, 5000);
	read_expect(h, 10 * BLK, 2 * BLK, 31, "wa: second read");
	cr_assert_eq(cm(HITS, "wa"), 1);
	/* A cached block overwritten: invalidated, the next read misses and has the new data. */
	cr_assert_eq(cm(OCCUPIED, "wa"), 2 * BLK);
	write_seed(h, 11 * BLK, BLK, 32);
	cr_assert_eq(cm(OCCUPIED, "wa"), BLK, "wa: an overwritten block stayed in the cache");
	read_expect(h, 11 * BLK, BLK, 32, "wa: read after overwrite");
	cr_assert_eq(cm(MISSES, "wa"), 2, "wa: an overwritten block was served from the cache");
	wait_cm(FILLS, "wa", 3, 5000);
	read_expect(h, 11 * BLK, BLK, 32, "wa: read after overwrite, refilled");
	cr_assert_eq(cm(HITS, "wa"), 2);
	th_nbd_disconnect(h);

	/* none: served, but no cache metrics at all and nothing in the cache. */
	h = th_nbd_connect(&agent, "none");
	read_expect(h, 0, 64 * KiB, SEED_BACKING, "none: read");
	write_seed(h, 0, BLK, 41);
	read_expect(h, 0, BLK, 41, "none: read after write");
	read_expect(h, 0, BLK, 41, "none: read after write");
	th_nbd_disconnect(h);
	text = th_http_get(agent.metrics_port, "/metrics");
	cr_assert(!has_cache_sample(text, "none"), "cache metrics for volume 'none':\n%s", text);
	cr_assert(has_cache_sample(text, "wt") && has_cache_sample(text, "ro"));
	cr_assert_geq(th_metric(text, "flashtier_requests_total{volume=\"none\",domain=\"\",op=\"read\"}"),
		      3);
	free(text);

	/* read-only with the default mode: reads are cached, writes refused. */
	h = th_nbd_connect(&agent, "ro");
	cr_assert_eq(nbd_is_read_only(h), 1);
	read_expect(h, 64 * KiB, 32 * KiB, SEED_BACKING, "ro: first read");
	wait_cm(FILLS, "ro", 8, 5000);
	read_expect(h, 64 * KiB, 32 * KiB, SEED_BACKING, "ro: second read");
	cr_assert_eq(cm(HITS, "ro"), 1);
	cr_assert_eq(cm(MISSES, "ro"), 1);
	th_nbd_disconnect(h);
	{
		/* A write on the raw protocol: EPERM, and the cached data is unchanged. */
		int fd = th_raw_connect(agent.sock, "ro", false);
		struct nbd_simple_reply rep;
		char buf[BLK];

		memset(buf, 0xee, sizeof(buf));
		th_raw_request(fd, NBD_CMD_WRITE, 0, 1, 64 * KiB, BLK);
		th_raw_write(fd, buf, BLK);
		th_raw_read(fd, &rep, sizeof(rep));
		cr_assert_eq(be32toh(rep.error), NBD_EPERM, "write to a read-only volume: error %u",
			     be32toh(rep.error));
		close(fd);
	}
	h = th_nbd_connect(&agent, "ro");
	read_expect(h, 64 * KiB, 32 * KiB, SEED_BACKING, "ro: read after refused write");
	cr_assert_eq(cm(HITS, "ro"), 2);
	th_nbd_disconnect(h);
	agent_stop_clean();
}

/* ---- 7: quotas ---- */

Test(cache, quota_caps_a_volume_and_spares_others)
{
	enum { REQ = 64 * KiB };
	char backing[3][320];
	struct nbd_handle *ha, *hb, *hc;
	double quota_a, quota_c, hits_b, slots;
	char *text;

	th_mkdtemp(tdir, sizeof(tdir));
	make_backing("a.img", 8 * MiB, backing[0], sizeof(backing[0]));
	make_backing("b.img", 8 * MiB, backing[1], sizeof(backing[1]));
	make_backing("c.img", 8 * MiB, backing[2], sizeof(backing[2]));
	cache_in_tdir("10M"); /* 8 MiB of slots besides the 2 MiB write-back log */
	th_fmt(agent_vols, sizeof(agent_vols),
	       "{ \"a\": { \"backing\": \"%s\", \"cache\": { \"quota\": \"25%%\","
	       "                                             \"sequential_cutoff\": 0 } },"
	       "  \"b\": { \"backing\": \"%s\", \"cache\": { \"sequential_cutoff\": 0 } },"
	       "  \"c\": { \"backing\": \"%s\", \"cache\": { \"quota\": \"1M\","
	       "                                             \"sequential_cutoff\": 0 } } }",
	       backing[0], backing[1], backing[2]);
	agent_start();

	text = th_http_get(agent.metrics_port, "/metrics");
	slots = th_metric(text, "flashtier_cache_size_bytes") / BLK;
	free(text);
	cr_assert_gt(slots, 1024, "a 10M cache has only %g blocks", slots);
	quota_a = cm(QUOTA, "a");
	quota_c = cm(QUOTA, "c");
	cr_assert_eq(quota_a, (double)((uint64_t)slots * 25 / 100 * BLK), "quota of a: %g", quota_a);
	cr_assert_eq(quota_c, 1 * MiB, "quota of c: %g", quota_c);
	cr_assert_eq(cm(QUOTA, "b"), slots * BLK);

	/* b caches 3 MiB. */
	hb = th_nbd_connect(&agent, "b");
	for (uint64_t off = 0; off < 3 * MiB; off += REQ)
		read_expect(hb, off, REQ, SEED_BACKING, "b: caching read");
	wait_cm(FILLS, "b", 3 * MiB / BLK, 5000);

	/* a and c read their whole 8 MiB, in a scattered order, twice over. */
	ha = th_nbd_connect(&agent, "a");
	hc = th_nbd_connect(&agent, "c");
	for (int pass = 0; pass < 2; pass++) {
		for (uint64_t i = 0; i < 8 * MiB / REQ; i++) {
			uint64_t off = (i * 37 % (8 * MiB / REQ)) * REQ;

			read_expect(ha, off, REQ, SEED_BACKING, "a: big read");
			read_expect(hc, off, REQ, SEED_BACKING, "c: big read");
			if (i % 16 == 0) {
				cr_assert_leq(cm(OCCUPIED, "a"), quota_a, "a holds more than its quota");
				cr_assert_leq(cm(OCCUPIED, "c"), quota_c, "c holds more than its quota");
			}
		}
	}
	/* They did use the cache, up to the quota (so the bound above meant something). */
	wait_cm(OCCUPIED, "a", quota_a, 5000);
	wait_cm(OCCUPIED, "c", quota_c, 5000);
	cr_assert_gt(cm("flashtier_cache_evictions_total", "a"), 0);
	th_nbd_disconnect(ha);
	th_nbd_disconnect(hc);

	/* b lost nothing: all of it is still cached and read from the cache. */
	cr_assert_eq(cm(OCCUPIED, "b"), 3 * MiB);
	hits_b = cm(HITS, "b");
	for (uint64_t off = 0; off < 3 * MiB; off += REQ)
		read_expect(hb, off, REQ, SEED_BACKING, "b: read after a's and c's");
	cr_assert_eq(cm(HITS, "b"), hits_b + 3 * MiB / REQ,
		     "b's cached data was evicted by other volumes' reads");
	cr_assert_eq(cm(MISSES, "b"), 3 * MiB / REQ);
	th_nbd_disconnect(hb);
	agent_stop_clean();
}

/* ---- 8: sequential cutoff ---- */

Test(cache, sequential_cutoff_bypasses_long_streams)
{
	enum { REQ = 64 * KiB, TOTAL = 4 * MiB };
	char backing[2][320];
	struct nbd_handle *h;
	double occ;

	th_mkdtemp(tdir, sizeof(tdir));
	make_backing("seq.img", 8 * MiB, backing[0], sizeof(backing[0]));
	make_backing("nocut.img", 8 * MiB, backing[1], sizeof(backing[1]));
	cache_in_tdir("16M");
	th_fmt(agent_vols, sizeof(agent_vols),
	       "{ \"seq\": { \"backing\": \"%s\", \"cache\": { \"sequential_cutoff\": \"1M\" } },"
	       "  \"nocut\": { \"backing\": \"%s\", \"cache\": { \"sequential_cutoff\": 0 } } }",
	       backing[0], backing[1]);
	agent_start();

	h = th_nbd_connect(&agent, "seq");
	for (uint64_t off = 0; off < TOTAL; off += REQ)
		read_expect(h, off, REQ, SEED_BACKING, "seq: sequential read");
	th_nbd_disconnect(h);
	/* The first 1 MiB of the stream is cached, the rest bypasses. */
	wait_cm(FILLS, "seq", 1 * MiB / BLK, 5000);
	cr_assert_eq(cm(BYPASSES, "seq"), (TOTAL - 1 * MiB) / REQ);
	occ = cm(OCCUPIED, "seq");
	cr_assert_leq(occ, 1 * MiB, "a 4 MiB scan with a 1M cutoff occupies %g bytes", occ);

	/* The same scan without a cutoff is cached whole (the cutoff made the difference). */
	h = th_nbd_connect(&agent, "nocut");
	for (uint64_t off = 0; off < TOTAL; off += REQ)
		read_expect(h, off, REQ, SEED_BACKING, "nocut: sequential read");
	th_nbd_disconnect(h);
	wait_cm(FILLS, "nocut", TOTAL / BLK, 5000);
	cr_assert_eq(cm(BYPASSES, "nocut"), 0);
	cr_assert_eq(cm(OCCUPIED, "nocut"), TOTAL);
	agent_stop_clean();
}

/* ---- 9: a failing cache device ---- */

/* Unmount the nbdfuse mount (if any) and reap nbdfuse. */
static void fuse_unmount(void)
{
	char cmd[1100];
	double end;

	if (fuse_mnt[0]) {
		th_fmt(cmd, sizeof(cmd),
		       "umount '%s' 2>/dev/null || fusermount3 -u '%s' 2>/dev/null || "
		       "umount -l '%s'",
		       fuse_mnt, fuse_mnt, fuse_mnt);
		if (system(cmd) == 0)
			fuse_mnt[0] = '\0';
		else
			fprintf(stderr, "could not unmount %s\n", fuse_mnt);
	}
	if (fuse_pid > 0) {
		end = th_now_ms() + 5000;
		while (waitpid(fuse_pid, NULL, WNOHANG) != fuse_pid) {
			if (th_now_ms() > end) {
				th_kill(&fuse_pid);
				break;
			}
			th_sleep_ms(10);
		}
		fuse_pid = 0;
	}
}

/*
 * Mount a 16 MiB nbdkit RAM disk at tdir/mnt/cache.img (cache_path) with
 * nbdfuse; every read and write of it fails with EIO while @trigger exists.
 */
static void fuse_mount(const char *trigger)
{
	char log[320], errfile[400];
	double end;
	struct stat st;

	th_fmt(fuse_mnt, sizeof(fuse_mnt), "%s/mnt", tdir);
	cr_assert_eq(mkdir(fuse_mnt, 0755), 0);
	th_fmt(cache_path, sizeof(cache_path), "%s/cache.img", fuse_mnt);
	th_fmt(log, sizeof(log), "%s/nbdfuse.log", tdir);
	th_fmt(errfile, sizeof(errfile), "error-file=%s", trigger);
	fuse_pid = fork();
	cr_assert_geq(fuse_pid, 0);
	if (fuse_pid == 0) {
		int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);

		/* A crashed test must not leave the mount behind: SIGTERM unmounts. */
		prctl(PR_SET_PDEATHSIG, SIGTERM);
		if (fd >= 0) {
			dup2(fd, 1);
			dup2(fd, 2);
		}
		execlp("nbdfuse", "nbdfuse", cache_path, "--command", "nbdkit", "-s",
		       "--exit-with-parent", "--filter=error", "memory", "16M", "error=EIO",
		       "error-rate=100%", errfile, (char *)NULL);
		_exit(127);
	}
	end = th_now_ms() + 10000;
	while (stat(cache_path, &st) != 0 || st.st_size != 16 * MiB) {
		if (waitpid(fuse_pid, NULL, WNOHANG) == fuse_pid) {
			fuse_pid = 0;
			fuse_mnt[0] = '\0';
			th_dump_file(log);
			cr_assert_fail("nbdfuse could not mount %s (log above): this test needs "
				       "nbdfuse (libnbd-bin), nbdkit and a usable /dev/fuse",
				       cache_path);
		}
		cr_assert_lt(th_now_ms(), end, "nbdfuse did not mount %s within 10 s", cache_path);
		th_sleep_ms(10);
	}
}

/*
 * A test's directory, a 16 MiB backing store there (@backing, 320 bytes)
 * and the cache file on the nbdfuse device that fails while @trigger (320
 * bytes, tdir/inject-errors) exists.
 */
static void failing_device_setup(char *backing, char *trigger)
{
	th_mkdtemp(tdir, sizeof(tdir));
	make_backing("disk.img", 16 * MiB, backing, 320);
	th_fmt(trigger, 320, "%s/inject-errors", tdir);
	fuse_mount(trigger);
}

static void touch(const char *path)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);

	cr_assert_geq(fd, 0, "create %s: %s", path, strerror(errno));
	close(fd);
}

Test(cache, failing_device_goes_passthrough_without_failing_requests)
{
	enum { N = 16, THRESHOLD = 4 };
	char backing[320], trigger[320], more[64];
	struct nbd_handle *h;
	long mark;
	char *log;

	failing_device_setup(backing, trigger);
	th_fmt(more, sizeof(more), ", \"error_threshold\": %d", THRESHOLD);
	set_cache(NULL, more);
	th_fmt(agent_vols, sizeof(agent_vols), "{ \"disk\": { \"backing\": \"%s\" } }", backing);
	mark = log_mark();
	agent_start();

	/* Healthy device: blocks are cached and hit. */
	h = th_nbd_connect(&agent, "disk");
	for (int i = 0; i < N; i++)
		read_expect(h, (uint64_t)i * 2 * BLK, BLK, SEED_BACKING, "read, healthy device");
	wait_cm(FILLS, "disk", N, 5000);
	for (int i = 0; i < N; i++)
		read_expect(h, (uint64_t)i * 2 * BLK, BLK, SEED_BACKING, "hit, healthy device");
	cr_assert_eq(cm(HITS, "disk"), N, "the cache on nbdfuse did not serve hits");
	cr_assert_eq(cm(DEVERR, "disk"), 0);
	cr_assert_eq(cm(PASSTHRU, "disk"), 0);

	/*
	 * The device fails. The agent reads a cache file on FUSE through the
	 * page cache (no O_DIRECT there), so drop that file's pages first: hits
	 * must reach the failing device, as they would on a real one.
	 */
	{
		int fd = open(cache_path, O_RDWR);

		cr_assert_geq(fd, 0, "open %s: %s", cache_path, strerror(errno));
		cr_assert_eq(fdatasync(fd), 0);
		cr_assert_eq(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
		close(fd);
	}
	touch(trigger);
	for (int i = 0; i < N; i++)
		read_expect(h, (uint64_t)i * 2 * BLK, BLK, SEED_BACKING, "read, failing device");
	cr_assert_gt(cm(DEVERR, "disk"), 0, "device errors were not counted");
	cr_assert_geq(cm(DEVERR, "disk"), THRESHOLD);
	cr_assert_eq(cm(PASSTHRU, "disk"), 1, "the volume did not go pass-through past %d errors",
		     THRESHOLD);
	cr_assert_eq(cm(HITS, "disk"), N, "a read was counted as a hit on a failing device");

	/* Writes work, and what they wrote is read back (from the store). */
	for (int i = 0; i < 4; i++) {
		write_seed(h, (uint64_t)i * 2 * BLK, BLK, 50u + (unsigned)i);
		read_expect(h, (uint64_t)i * 2 * BLK, BLK, 50u + (unsigned)i,
			    "read after write, failing device");
	}
	read_expect(h, 1 * MiB, 256 * KiB, SEED_BACKING, "big read, failing device");
	cr_assert_eq(nbd_flush(h, 0), 0, "flush: %s", nbd_get_error());
	th_nbd_disconnect(h);
	cr_assert_eq(th_vol_metric(&agent, "flashtier_request_errors_total", "disk", "read"), 0);
	cr_assert_eq(th_vol_metric(&agent, "flashtier_request_errors_total", "disk", "write"), 0);

	/* Even with the device healthy again, the volume stays off the cache until restarted. */
	cr_assert_eq(unlink(trigger), 0);
	h = th_nbd_connect(&agent, "disk");
	read_expect(h, 0, BLK, 50, "read, device back");
	read_expect(h, 0, BLK, 50, "read, device back");
	cr_assert_eq(cm(PASSTHRU, "disk"), 1);
	th_nbd_disconnect(h);

	log = log_since(mark);
	cr_assert(strstr(log, "without the cache"), "the log does not say the volume went "
						    "pass-through:\n%s",
		  log);
	free(log);
	agent_stop_clean();
	fuse_unmount();
	cr_assert_eq(fuse_mnt[0], '\0', "could not unmount the nbdfuse mount");
}

/*
 * Write-back on a cache device that fails for a moment: a FLUSH whose
 * record round could not be written fails, and so does every later one,
 * also once the device works again -- the log pages go through the page
 * cache, and a failed write-back is reported only once, so no later flush
 * proves they reached the device. Reads and writes go on, and the data
 * acknowledged reads back right.
 */
Test(cache, writeback_flush_fails_for_good_after_a_device_failure)
{
	char backing[320], trigger[320];
	struct nbd_handle *h;
	long mark;
	char *log;

	failing_device_setup(backing, trigger);
	set_cache(NULL, "");
	th_fmt(agent_vols, sizeof(agent_vols),
	       "{ \"disk\": { \"backing\": \"%s\", \"cache\": { \"mode\": \"write-back\","
	       " \"dirty_max_age\": 3600 } } }",
	       backing);
	mark = log_mark();
	agent_start();
	h = th_nbd_connect(&agent, "disk");
	/* Block 100 clean in the read cache: a write to it must rewrite its record. */
	read_expect(h, 100 * BLK, BLK, SEED_BACKING, "read, healthy device");
	wait_cm(FILLS, "disk", 1, 5000);
	for (int i = 0; i < 4; i++)
		write_seed(h, (uint64_t)i * BLK, BLK, 70u + (unsigned)i);
	cr_assert_eq(nbd_flush(h, 0), 0, "flush, healthy device: %s", nbd_get_error());

	touch(trigger);
	(void)nbd_pwrite(h, (char[BLK]){ 0 }, BLK, 100 * BLK, 0); /* may fail: the device does */
	cr_assert_lt(nbd_flush(h, 0), 0, "FLUSH succeeded while the cache device fails");
	cr_assert_eq(unlink(trigger), 0);

	/* The device works again: writes and reads do, FLUSH does not. */
	write_seed(h, 8 * BLK, BLK, 80);
	for (int i = 0; i < 4; i++)
		read_expect(h, (uint64_t)i * BLK, BLK, 70u + (unsigned)i, "read after the failure");
	read_expect(h, 8 * BLK, BLK, 80, "read of a write after the failure");
	cr_assert_lt(nbd_flush(h, 0), 0, "FLUSH succeeded after the device had failed");
	th_nbd_disconnect(h);

	log = log_since(mark);
	cr_assert(strstr(log, "cannot be made durable"),
		  "the log does not say why FLUSH fails:\n%s", log);
	free(log);
	agent_stop_clean();
	fuse_unmount();
	cr_assert_eq(fuse_mnt[0], '\0', "could not unmount the nbdfuse mount");
}

/* ---- which cached data belongs to which volume across restarts ---- */

/*
 * Cached data follows a volume's identity (name, backing store, size), not
 * its place in the config: reordered volumes stay warm; a volume whose
 * backing store changed, or that left the config, loses its cached data
 * (never served for the new store), also when it comes back.
 */
Test(cache, cached_data_follows_volume_identity)
{
	char a[320], b[320], c[320];
	struct nbd_handle *h;
	long mark;
	char *log;

	th_mkdtemp(tdir, sizeof(tdir));
	/* Three stores of one size, each with its own contents. */
	make_backing_seed("a.img", 4 * MiB, 97, a, sizeof(a));
	make_backing_seed("b.img", 4 * MiB, 98, b, sizeof(b));
	make_backing_seed("c.img", 4 * MiB, 99, c, sizeof(c));
	cache_in_tdir("16M");
	th_fmt(agent_vols, sizeof(agent_vols),
	       "{ \"x\": { \"backing\": \"%s\" }, \"y\": { \"backing\": \"%s\" } }", a, b);
	agent_start();
	for (int v = 0; v < 2; v++) {
		const char *name = v ? "y" : "x";

		h = th_nbd_connect(&agent, name);
		read_expect(h, 0, 64 * KiB, v ? 98 : 97, "caching read");
		th_nbd_disconnect(h);
		wait_cm(FILLS, name, 16, 5000);
	}
	agent_stop_clean();

	/* Reordered: both stay warm. */
	th_fmt(agent_vols, sizeof(agent_vols),
	       "{ \"y\": { \"backing\": \"%s\" }, \"x\": { \"backing\": \"%s\" } }", b, a);
	agent_start();
	for (int v = 0; v < 2; v++) {
		const char *name = v ? "y" : "x";

		h = th_nbd_connect(&agent, name);
		read_expect(h, 0, 64 * KiB, v ? 98 : 97, "read after reordering");
		th_nbd_disconnect(h);
		cr_assert_eq(cm(HITS, name), 1, "%s: not warm after the volumes were reordered", name);
	}
	agent_stop_clean();

	/* x now on another store of the same size; y gone: nothing cached may be served. */
	th_fmt(agent_vols, sizeof(agent_vols), "{ \"x\": { \"backing\": \"%s\" } }", c);
	mark = log_mark();
	agent_start();
	cr_assert_eq(cm(OCCUPIED, "x"), 0, "x kept cached data of its old backing store");
	h = th_nbd_connect(&agent, "x");
	read_expect(h, 0, 64 * KiB, 99, "x on its new backing store");
	cr_assert_eq(cm(HITS, "x"), 0);
	th_nbd_disconnect(h);
	wait_cm(FILLS, "x", 16, 5000);
	log = log_since(mark);
	cr_assert(strstr(log, "dropping the cached data"), "log:\n%s", log);
	free(log);
	agent_stop_clean();

	/* x back on a, y back: both start cold (their old records were cleared), data right. */
	th_fmt(agent_vols, sizeof(agent_vols),
	       "{ \"x\": { \"backing\": \"%s\" }, \"y\": { \"backing\": \"%s\" } }", a, b);
	agent_start();
	for (int v = 0; v < 2; v++) {
		const char *name = v ? "y" : "x";

		cr_assert_eq(cm(OCCUPIED, name), 0, "%s: old cached data came back", name);
		h = th_nbd_connect(&agent, name);
		read_expect(h, 0, 64 * KiB, v ? 98 : 97, "read after coming back");
		th_nbd_disconnect(h);
		cr_assert_eq(cm(HITS, name), 0);
	}
	agent_stop_clean();
}

/* ---- concurrent reads and writes ---- */

/*
 * Block b of a race volume at version v holds words (v << 24 | b << 12 | i);
 * version 0 is written before the agent starts.
 */
enum { RACE_BLOCKS = 8, RACE_WRITES = 1500, RACE_MIN_WRITES = 200, RACE_READERS = 2 };
#define RACE_MS 1500.0 /* the writers stop after RACE_WRITES or this long */

static void race_fill(uint64_t *w, uint64_t b, uint64_t version)
{
	for (uint64_t i = 0; i < BLK / 8; i++)
		w[i] = version << 24 | b << 12 | i;
}

struct race_vol {
	const char *name;
	struct nbd_handle *hw, *hr[RACE_READERS];
	_Atomic uint64_t acked[RACE_BLOCKS];   /* newest version acknowledged, per block */
	_Atomic uint64_t started[RACE_BLOCKS]; /* newest version sent */
	_Atomic bool done;
	/* results */
	unsigned writes, write_errors;
};

struct race_reader {
	struct race_vol *v;
	int index;
	unsigned reads, read_errors, stale, garbled;
	char problem[256];
};

static void *race_writer_main(void *arg)
{
	struct race_vol *v = arg;
	uint64_t *buf;

	if (posix_memalign((void **)&buf, BLK, BLK) != 0) {
		v->write_errors = ~0u;
		atomic_store(&v->done, true);
		return NULL;
	}
	double end = th_now_ms() + RACE_MS;

	for (unsigned n = 0; n < RACE_WRITES && (n < RACE_MIN_WRITES || th_now_ms() < end); n++) {
		uint64_t b = n * 5 % RACE_BLOCKS, ver = atomic_load(&v->started[b]) + 1;

		race_fill(buf, b, ver);
		atomic_store(&v->started[b], ver);
		if (nbd_pwrite(v->hw, buf, BLK, b * BLK, 0) < 0) {
			v->write_errors++;
			continue;
		}
		atomic_store(&v->acked[b], ver);
		v->writes++;
	}
	free(buf);
	atomic_store(&v->done, true);
	return NULL;
}

static void *race_reader_main(void *arg)
{
	struct race_reader *r = arg;
	struct race_vol *v = r->v;
	unsigned seed = 12345u + (unsigned)r->index;
	uint64_t *buf;

	if (posix_memalign((void **)&buf, BLK, 2 * BLK) != 0) {
		r->read_errors = ~0u;
		return NULL;
	}
	while (!atomic_load(&v->done)) {
		/* Reader 0 reads single blocks, reader 1 pairs (multi-block hits and misses). */
		unsigned n = r->index == 0 ? 1 : 2;
		uint64_t b0 = (uint64_t)rand_r(&seed) % (RACE_BLOCKS - n + 1), floor[2];

		for (unsigned k = 0; k < n; k++)
			floor[k] = atomic_load(&v->acked[b0 + k]);
		if (nbd_pread(v->hr[r->index], buf, n * BLK, b0 * BLK, 0) < 0) {
			r->read_errors++;
			continue;
		}
		r->reads++;
		for (unsigned k = 0; k < n; k++) {
			uint64_t b = b0 + k, ceil = atomic_load(&v->started[b]);

			for (uint64_t i = 0; i < BLK / 8; i++) {
				uint64_t w = buf[k * BLK / 8 + i], ver = w >> 24;

				if ((w & 0xffffff) != (b << 12 | i) || ver > ceil) {
					if (!r->garbled++)
						snprintf(r->problem, sizeof(r->problem),
							 "block %llu word %llu: %#llx is no version of it",
							 (unsigned long long)b, (unsigned long long)i,
							 (unsigned long long)w);
					break;
				}
				if (ver < floor[k]) {
					if (!r->stale++)
						snprintf(r->problem, sizeof(r->problem),
							 "block %llu: read version %llu after version "
							 "%llu was acknowledged",
							 (unsigned long long)b, (unsigned long long)ver,
							 (unsigned long long)floor[k]);
					break;
				}
			}
		}
	}
	free(buf);
	return NULL;
}

/*
 * One writer rewrites a few blocks while two readers read them, on each
 * mode: no read may return data older than the newest write acknowledged
 * before it was sent (fills racing writes must never become hits).
 */
Test(cache, concurrent_reads_never_see_overwritten_data)
{
	static struct race_vol vols[2];
	struct race_reader readers[2][RACE_READERS];
	pthread_t tw[2], tr[2][RACE_READERS];
	char backing[2][320];

	th_mkdtemp(tdir, sizeof(tdir));
	for (int v = 0; v < 2; v++) {
		uint64_t *buf = malloc(RACE_BLOCKS * BLK);
		int fd;

		cr_assert_not_null(buf);
		th_make_file(tdir, v ? "wa.img" : "wt.img", 4 * MiB, backing[v], sizeof(backing[v]));
		for (uint64_t b = 0; b < RACE_BLOCKS; b++)
			race_fill(buf + b * BLK / 8, b, 0);
		fd = open(backing[v], O_WRONLY);
		cr_assert_geq(fd, 0);
		cr_assert_eq(pwrite(fd, buf, RACE_BLOCKS * BLK, 0), RACE_BLOCKS * BLK);
		close(fd);
		free(buf);
	}
	cache_in_tdir("16M");
	th_fmt(agent_vols, sizeof(agent_vols),
	       "{ \"wt\": { \"backing\": \"%s\", \"cache\": { \"mode\": \"write-through\","
	       "                                             \"sequential_cutoff\": 0 } },"
	       "  \"wa\": { \"backing\": \"%s\", \"cache\": { \"mode\": \"write-around\","
	       "                                             \"sequential_cutoff\": 0 } } }",
	       backing[0], backing[1]);
	agent_start();

	memset(vols, 0, sizeof(vols));
	for (int v = 0; v < 2; v++) {
		vols[v].name = v ? "wa" : "wt";
		vols[v].hw = th_nbd_connect(&agent, vols[v].name);
		for (int i = 0; i < RACE_READERS; i++) {
			vols[v].hr[i] = th_nbd_connect(&agent, vols[v].name);
			readers[v][i] = (struct race_reader){ .v = &vols[v], .index = i };
		}
	}
	for (int v = 0; v < 2; v++) {
		for (int i = 0; i < RACE_READERS; i++)
			cr_assert_eq(pthread_create(&tr[v][i], NULL, race_reader_main, &readers[v][i]),
				     0);
		cr_assert_eq(pthread_create(&tw[v], NULL, race_writer_main, &vols[v]), 0);
	}
	for (int v = 0; v < 2; v++) {
		pthread_join(tw[v], NULL);
		for (int i = 0; i < RACE_READERS; i++)
			pthread_join(tr[v][i], NULL);
	}

	for (int v = 0; v < 2; v++) {
		unsigned reads = 0;

		cr_assert_eq(vols[v].write_errors, 0, "%s: %u writes failed", vols[v].name,
			     vols[v].write_errors);
		cr_assert_geq(vols[v].writes, RACE_MIN_WRITES);
		for (int i = 0; i < RACE_READERS; i++) {
			struct race_reader *r = &readers[v][i];

			cr_assert_eq(r->read_errors, 0, "%s: %u reads failed", vols[v].name,
				     r->read_errors);
			cr_assert_eq(r->stale, 0, "%s, reader %d: %u stale reads; first: %s",
				     vols[v].name, i, r->stale, r->problem);
			cr_assert_eq(r->garbled, 0, "%s, reader %d: %u garbled reads; first: %s",
				     vols[v].name, i, r->garbled, r->problem);
			reads += r->reads;
		}
		cr_assert_gt(reads, 100, "%s: only %u reads ran alongside the writes", vols[v].name,
			     reads);
		/* The cache took part: some reads were hits, some fills were dropped or done. */
		cr_assert_gt(cm(HITS, vols[v].name), 0, "%s: no read was a hit", vols[v].name);
		cr_assert_gt(cm(FILLS, vols[v].name), 0);
	}
	/* Quiet now: every block reads back as its last version, in both modes. */
	for (int v = 0; v < 2; v++) {
		uint64_t *buf = NULL, *want = NULL;

		cr_assert_eq(posix_memalign((void **)&buf, BLK, BLK), 0);
		cr_assert_eq(posix_memalign((void **)&want, BLK, BLK), 0);
		for (uint64_t b = 0; b < RACE_BLOCKS; b++) {
			for (int pass = 0; pass < 2; pass++) {
				cr_assert_eq(nbd_pread(vols[v].hw, buf, BLK, b * BLK, 0), 0, "%s",
					     nbd_get_error());
				race_fill(want, b, atomic_load(&vols[v].acked[b]));
				cr_assert(memcmp(buf, want, BLK) == 0,
					  "%s: block %llu is not its last version (pass %d)",
					  vols[v].name, (unsigned long long)b, pass);
			}
		}
		free(buf);
		free(want);
		th_nbd_disconnect(vols[v].hw);
		for (int i = 0; i < RACE_READERS; i++)
			th_nbd_disconnect(vols[v].hr[i]);
	}
	agent_stop_clean();
}

/*
 * The cache device fails, the volume goes pass-through (and cannot drop its
 * records from the failing device), the VM overwrites cached blocks, the
 * agent is restarted once the device works again: the overwritten blocks
 * must not come back from the cache.
 */
Test(cache, passthrough_writes_are_not_shadowed_after_device_recovers)
{
	enum { N = 16, THRESHOLD = 4 };
	char backing[320], trigger[320], more[64];
	uint64_t blocks[N];
	int64_t slots[N];
	struct nbd_handle *h;

	failing_device_setup(backing, trigger);
	th_fmt(more, sizeof(more), ", \"error_threshold\": %d", THRESHOLD);
	set_cache(NULL, more);
	th_fmt(agent_vols, sizeof(agent_vols), "{ \"disk\": { \"backing\": \"%s\" } }", backing);
	agent_start();

	h = th_nbd_connect(&agent, "disk");
	for (int i = 0; i < N; i++) {
		blocks[i] = (uint64_t)i * 2;
		read_expect(h, blocks[i] * BLK, BLK, SEED_BACKING, "caching read");
	}
	wait_records(cache_path, blocks, N, slots, 5000);
	{
		int fd = open(cache_path, O_RDWR);

		cr_assert_geq(fd, 0, "open %s: %s", cache_path, strerror(errno));
		cr_assert_eq(fdatasync(fd), 0);
		cr_assert_eq(posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED), 0);
		close(fd);
	}
	touch(trigger);
	for (int i = 0; i < N; i++)
		read_expect(h, blocks[i] * BLK, BLK, SEED_BACKING, "read, failing device");
	cr_assert_eq(cm(PASSTHRU, "disk"), 1);
	/* Pass-through: the VM rewrites every block that is still recorded on the device. */
	for (int i = 0; i < N; i++) {
		write_seed(h, blocks[i] * BLK, BLK, 70);
		read_expect(h, blocks[i] * BLK, BLK, 70, "read after write, failing device");
	}
	th_nbd_disconnect(h);
	agent_stop_clean();

	/* The device works again; the agent is restarted (as an operator or supervisor would). */
	cr_assert_eq(unlink(trigger), 0);
	agent_start();
	h = th_nbd_connect(&agent, "disk");
	for (int i = 0; i < N; i++)
		read_expect(h, blocks[i] * BLK, BLK, 70,
			    "read after restart on the recovered device (a stale cached copy?)");
	th_nbd_disconnect(h);
	agent_stop_clean();
	fuse_unmount();
	cr_assert_eq(fuse_mnt[0], '\0', "could not unmount the nbdfuse mount");
}
