/* SPDX-License-Identifier: MIT */
/*
 * Write-back mode from the outside: the real flashtierd with a cache device
 * file, a real nbdkit (file plugin, with its delay and error filters) as the
 * SAN whose backing file the test reads directly, libnbd clients.
 *
 *  - writes are acknowledged from the log and read back at once, while the
 *    store does not have them; FLUSH does not destage; SIGUSR1 drains;
 *  - dirty_max_age destages old data without a drain;
 *  - SIGTERM and kill -9 with dirty data: the restart replays the log;
 *  - writes smaller than a block, unaligned writes, WRITE_ZEROES and TRIM
 *    over cached, uncached, dirty and clean blocks match a byte model,
 *    in the log and in the store after a drain (file and nbd backends);
 *  - watermarks and the dirty limit: throttled, never failed, log bounded;
 *  - a failing SAN (EIO, ENOSPC) while destaging: retried, VM unaffected,
 *    nothing lost;
 *  - leaving write-back at a restart, removed volumes with dirty data,
 *    corrupt and torn log pages, bad values for the new config keys.
 *
 * A store "at rest" is read straight from its file (nbdkit's file plugin
 * writes through the page cache, so what it acknowledged is visible).
 */
#include <stddef.h>

#include "flashtier/cachedev.h"
#include "flashtier/wlog.h"
#include "nbd_client.h"

#define KiB	   1024
#define MiB	   (1024 * 1024)
#define BLK	   4096u
#define SEED_STORE 7u

/* What a failed test must not leave running; see cleanup(). */
static struct ft_agent agent;
static char tdir[256];
static pid_t kits[4];
static int n_kits;
static pid_t run_pid; /* a flashtierd run to completion (refused configs) */

static char cache_path[320];
static char agent_vols[4096];  /* "volumes" of the running agent, for restarts */
static char agent_extra[1024]; /* top-level members: reactors, cache */

static void cleanup(void)
{
	th_nbd_close_all();
	th_agent_kill(&agent);
	th_kill(&run_pid);
	for (int i = 0; i < n_kits; i++)
		th_kill(&kits[i]);
	n_kits = 0;
	if (tdir[0])
		th_rm_rf(tdir);
	tdir[0] = '\0';
}

TestSuite(writeback, .fini = cleanup, .timeout = 60);

/* ---- metrics ---- */

#define DIRTY	  "flashtier_cache_dirty_bytes"
#define OLDEST	  "flashtier_cache_dirty_oldest_seconds"
#define DESTAGED  "flashtier_cache_destaged_bytes_total"
#define DERRORS	  "flashtier_cache_destage_errors_total"
#define RETRYING  "flashtier_cache_destage_retrying"
#define LOGUSED	  "flashtier_cache_log_used_bytes"
#define LOGLIMIT  "flashtier_cache_log_limit_bytes"
#define THROTTLED "flashtier_cache_throttled_writes_total"
#define DRAINING  "flashtier_cache_draining"
#define LOGSIZE	  "flashtier_cache_log_size_bytes"
#define FILLS	  "flashtier_cache_fills_total"

/* A per-volume metric, asserted present. */
static double m(const char *name, const char *vol)
{
	return th_vol_metric(&agent, name, vol, NULL);
}

/* A global metric (no labels), asserted present. */
static double mg(const char *name)
{
	return th_agent_metric(&agent, name);
}

enum cmp { EQ, GE, LE, GT };

static bool cmp_ok(double v, enum cmp c, double want)
{
	switch (c) {
	case EQ:
		return v == want;
	case GE:
		return v >= want;
	case LE:
		return v <= want;
	case GT:
		return v > want;
	}
	return false;
}

/* Poll (10 ms steps) until metric @name of @vol compares @c to @want; fail after @timeout_ms. */
static double wait_m(const char *name, const char *vol, enum cmp c, double want, int timeout_ms,
		     const char *why)
{
	static const char *const op[] = { "==", ">=", "<=", ">" };
	double end = th_now_ms() + timeout_ms, v;

	for (;;) {
		v = m(name, vol);
		if (cmp_ok(v, c, want))
			return v;
		if (th_now_ms() >= end)
			break;
		th_sleep_ms(10);
	}
	cr_assert_fail("%s: %s{volume=\"%s\"} is %.0f after %d ms, want %s %.0f", why, name, vol, v,
		       timeout_ms, op[c], want);
	return v;
}

/*
 * Poll until dirty_bytes + destaged_bytes_total of @vol (from one scrape)
 * is @want: every dirty byte is either still dirty or was destaged.
 */
static void wait_dirty_accounted(const char *vol, double want, int timeout_ms, const char *why)
{
	char pd[256], pt[256];
	double end = th_now_ms() + timeout_ms, d = -1, t = -1;

	th_fmt(pd, sizeof(pd), "%s{volume=\"%s\",domain=\"\"}", DIRTY, vol);
	th_fmt(pt, sizeof(pt), "%s{volume=\"%s\",domain=\"\"}", DESTAGED, vol);
	do {
		char *text = th_http_get(agent.metrics_port, "/metrics");

		d = th_metric(text, pd);
		t = th_metric(text, pt);
		free(text);
		if (d >= 0 && t >= 0 && d + t == want)
			return;
		th_sleep_ms(10);
	} while (th_now_ms() < end);
	cr_assert_fail("%s: %.0f bytes dirty + %.0f destaged, want %.0f in all", why, d, t, want);
}

/* ---- files ---- */

/* A file of @size bytes (a multiple of 1 MiB) at tdir/@name holding th_fill(@seed). */
static void make_store(const char *name, uint64_t size, uint32_t seed, char *out, size_t len)
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

static void write_text(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	cr_assert_not_null(f, "create %s: %s", path, strerror(errno));
	fputs(text, f);
	cr_assert_eq(fclose(f), 0);
}

static void touch(const char *path)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);

	cr_assert_geq(fd, 0, "create %s: %s", path, strerror(errno));
	close(fd);
}

/* ---- the agent's log ---- */

static long log_mark(void)
{
	struct stat st;

	return stat(agent.log, &st) == 0 ? (long)st.st_size : 0;
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

static bool log_has(long mark, const char *needle)
{
	char *log = log_since(mark);
	bool found = strstr(log, needle) != NULL;

	free(log);
	return found;
}

static void wait_log(long mark, const char *needle, int timeout_ms, const char *why)
{
	double end = th_now_ms() + timeout_ms;
	char *log;

	while (th_now_ms() < end) {
		if (log_has(mark, needle))
			return;
		th_sleep_ms(20);
	}
	log = log_since(mark);
	cr_assert_fail("%s: no \"%s\" in the agent's log within %d ms:\n%s", why, needle,
		       timeout_ms, log);
	free(log);
}

/* A line of the agent's log since @mark at level @level ("warn") that contains all of @words. */
static bool log_line_with(long mark, const char *level, const char *const *words)
{
	char *log = log_since(mark), *save = NULL, tag[32];
	bool found = false;

	th_fmt(tag, sizeof(tag), "flashtierd %s:", level);
	for (char *line = strtok_r(log, "\n", &save); line && !found;
	     line = strtok_r(NULL, "\n", &save)) {
		bool all = strstr(line, tag) != NULL;

		for (int i = 0; all && words[i]; i++)
			all = strstr(line, words[i]) != NULL;
		found = all;
	}
	free(log);
	return found;
}

/* ---- agents ---- */

/* Top-level members: @reactors, a cache at cache_path of @size with a log of @log_size, @more. */
static void set_cache(int reactors, const char *size, const char *log_size, const char *more)
{
	th_fmt(agent_extra, sizeof(agent_extra),
	       "\"reactors\": %d, \"cache\": { \"path\": \"%s\", \"size\": \"%s\","
	       " \"log_size\": \"%s\"%s },",
	       reactors, cache_path, size, log_size, more);
}

static void cache_in_tdir(const char *size, const char *log_size)
{
	th_fmt(cache_path, sizeof(cache_path), "%s/cache.img", tdir);
	set_cache(2, size, log_size, "");
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

/*
 * SIGUSR1, then wait until every volume of @vols (NULL-terminated) logged
 * "volume 'NAME': drained" and has no dirty bytes left.
 */
static void drain(const char *const *vols, int timeout_ms)
{
	long mark = log_mark();
	char needle[128];

	cr_assert(ft_agent_alive(&agent), "flashtierd is not running");
	cr_assert_eq(kill(agent.pid, SIGUSR1), 0);
	for (int i = 0; vols[i]; i++) {
		th_fmt(needle, sizeof(needle), "volume '%s': drained", vols[i]);
		wait_log(mark, needle, timeout_ms, "drain after SIGUSR1");
		cr_assert(ft_agent_alive(&agent), "flashtierd died after SIGUSR1");
	}
	for (int i = 0; vols[i]; i++) {
		wait_m(DIRTY, vols[i], EQ, 0, 2000, "dirty bytes after 'drained'");
		wait_m(DRAINING, vols[i], EQ, 0, 2000, "draining after 'drained'");
	}
}

/* One write-back volume's JSON member; @more: extra "cache" members (", \"k\": v"). */
static void wb_vol(char *out, size_t len, const char *name, const char *backing, const char *more)
{
	th_fmt(out, len,
	       "\"%s\": { \"backing\": \"%s\", \"cache\": { \"mode\": \"write-back\","
	       " \"sequential_cutoff\": 0%s } }",
	       name, backing, more);
}

/* Max age and watermarks that keep a small amount of dirty data in the log. */
#define KEEP_DIRTY ", \"dirty_max_age\": 3600, \"dirty_high\": \"90%\", \"dirty_low\": \"80%\""

/* ---- the SAN: nbdkit's file plugin over a file the test reads directly ---- */

/*
 * nbdkit serving @file on tdir/@name.sock with @filters (e.g.
 * "--filter=delay", NULL-terminated, may be NULL) and filter parameters
 * @params; the URI for "backing" in @uri.
 */
static void san_start(const char *name, const char *file, const char *const *filters,
		      const char *const *params, char *uri, size_t len)
{
	const char *args[32];
	char sock[320];
	int n = 0;

	for (int i = 0; filters && filters[i]; i++)
		args[n++] = filters[i];
	args[n++] = "file";
	args[n++] = file;
	for (int i = 0; params && params[i] && n < 31; i++)
		args[n++] = params[i];
	args[n] = NULL;
	cr_assert_lt(n_kits, 4);
	kits[n_kits++] = th_nbdkit_start(tdir, name, sock, sizeof(sock), args);
	th_fmt(uri, len, "nbd+unix:///?socket=%s", sock);
}

/*
 * The usual start: tdir, a store of @size bytes of th_fill(SEED_STORE)
 * served by a SAN (nbdkit file behind @filters with @params, both may be
 * NULL), a cache of @cache_size with a @log_size log, one write-back
 * volume "disk" on the SAN with the extra cache members @more, and the
 * agent running. The store's path goes to @store, the SAN's URI to @uri
 * (both 320 and 400 bytes, as the tests declare them).
 */
static void disk_on_san(uint64_t size, const char *const *filters, const char *const *params,
			const char *cache_size, const char *log_size, const char *more,
			char store[320], char uri[400])
{
	char vol[1024];

	th_mkdtemp(tdir, sizeof(tdir));
	make_store("san.img", size, SEED_STORE, store, 320);
	san_start("san", store, filters, params, uri, 400);
	cache_in_tdir(cache_size, log_size);
	wb_vol(vol, sizeof(vol), "disk", uri, more);
	th_fmt(agent_vols, sizeof(agent_vols), "{ %s }", vol);
	agent_start();
}

/* ---- a byte model of a volume ---- */

/*
 * b: the content. loose: bytes a TRIM covered only partly -- a partial
 * TRIM may leave data as it is (NBD makes no promise about trimmed data),
 * so they read as b or as zeroes; a whole block trimmed reads as zeroes
 * (wlog.h: a TRIM record reads as zeroes; both test stores punch holes).
 */
struct model {
	uint8_t *b, *loose;
	uint64_t size;
};

/* The model of a store that holds th_fill(@seed) over @size bytes. */
static void model_init(struct model *md, uint64_t size, uint32_t seed)
{
	md->size = size;
	md->b = malloc(size);
	md->loose = calloc(1, size);
	cr_assert(md->b && md->loose);
	th_fill(md->b, size, 0, seed);
}

static void model_free(struct model *md)
{
	free(md->b);
	free(md->loose);
	md->b = md->loose = NULL;
}

/* First byte of @got (@len bytes at @off) that the model does not allow, or -1. */
static long model_diff(const struct model *md, uint64_t off, const uint8_t *got, uint64_t len)
{
	for (uint64_t i = 0; i < len; i++)
		if (got[i] != md->b[off + i] && !(md->loose[off + i] && got[i] == 0))
			return (long)i;
	return -1;
}

/* WRITE th_fill(@seed) over [@off, @off+@len) (@len a multiple of 8) on @h and the model. */
static void mwrite(struct nbd_handle *h, struct model *md, uint64_t off, uint32_t len,
		   uint32_t seed)
{
	cr_assert_leq(off + len, md->size);
	th_fill(md->b + off, len, off, seed);
	memset(md->loose + off, 0, len);
	cr_assert_eq(nbd_pwrite(h, md->b + off, len, off, 0), 0, "write %u at %llu: %s", len,
		     (unsigned long long)off, nbd_get_error());
}

static void mzero(struct nbd_handle *h, struct model *md, uint64_t off, uint32_t len,
		  uint32_t flags)
{
	memset(md->b + off, 0, len);
	memset(md->loose + off, 0, len);
	cr_assert_eq(nbd_zero(h, len, off, flags), 0, "write_zeroes %u at %llu: %s", len,
		     (unsigned long long)off, nbd_get_error());
}

/* TRIM: whole blocks read as zeroes, the partial head and tail are loose (see struct model). */
static void mtrim(struct nbd_handle *h, struct model *md, uint64_t off, uint32_t len)
{
	uint64_t b0 = (off + BLK - 1) / BLK * BLK, b1 = (off + len) / BLK * BLK;

	if (b1 <= b0) {
		memset(md->loose + off, 1, len);
	} else {
		memset(md->loose + off, 1, b0 - off);
		memset(md->b + b0, 0, b1 - b0);
		memset(md->loose + b0, 0, b1 - b0);
		memset(md->loose + b1, 1, off + len - b1);
	}
	cr_assert_eq(nbd_trim(h, len, off, 0), 0, "trim %u at %llu: %s", len,
		     (unsigned long long)off, nbd_get_error());
}

/* Read [@off, @off+@len) through @h and compare with the model. */
static void mcheck(struct nbd_handle *h, const struct model *md, uint64_t off, uint64_t len,
		   const char *what)
{
	uint8_t *buf = malloc(len < 4 * MiB ? len : 4 * MiB);

	cr_assert_not_null(buf);
	for (uint64_t done = 0; done < len;) {
		uint64_t n = len - done < 4 * MiB ? len - done : 4 * MiB;
		long d;

		cr_assert_eq(nbd_pread(h, buf, n, off + done, 0), 0, "%s: read %llu at %llu: %s",
			     what, (unsigned long long)n, (unsigned long long)(off + done),
			     nbd_get_error());
		d = model_diff(md, off + done, buf, n);
		cr_assert_eq(d, -1,
			     "%s: read returns wrong data at byte %llu (block %llu, +%llu): "
			     "got %02x, want %02x",
			     what, (unsigned long long)(off + done + (uint64_t)d),
			     (unsigned long long)((off + done + (uint64_t)d) / BLK),
			     (unsigned long long)((off + done + (uint64_t)d) % BLK),
			     d >= 0 ? buf[d] : 0, d >= 0 ? md->b[off + done + (uint64_t)d] : 0);
		done += n;
	}
	free(buf);
}

/* The file @path (at rest) over [@off, @off+@len) against the model. */
static void mcheck_store(const char *path, const struct model *md, uint64_t off, uint64_t len,
			 const char *what)
{
	uint8_t *buf = malloc(len);
	long d;

	cr_assert_not_null(buf);
	th_file_read(path, off, buf, len);
	d = model_diff(md, off, buf, len);
	cr_assert_eq(d, -1,
		     "%s: the store %s holds wrong data at byte %llu (block %llu): got %02x, "
		     "want %02x",
		     what, path, (unsigned long long)(off + (uint64_t)d),
		     (unsigned long long)((off + (uint64_t)d) / BLK), d >= 0 ? buf[d] : 0,
		     d >= 0 ? md->b[off + (uint64_t)d] : 0);
	free(buf);
}

/* Does the file @path hold th_fill(@seed) over [@off, @off+@len)? */
static bool store_has_seed(const char *path, uint64_t off, size_t len, uint32_t seed)
{
	uint8_t *buf = malloc(len), *want = malloc(len);
	bool same;

	cr_assert(buf && want);
	th_file_read(path, off, buf, len);
	th_fill(want, len, off, seed);
	same = memcmp(buf, want, len) == 0;
	free(buf);
	free(want);
	return same;
}

/* The store file @path is exactly th_fill(SEED_STORE) over @size bytes: nothing destaged yet. */
static void assert_store_untouched(const char *path, uint64_t size, const char *what)
{
	for (uint64_t off = 0; off < size; off += MiB)
		cr_assert(store_has_seed(path, off, MiB, SEED_STORE),
			  "%s: the store %s already changed in [%llu, +1M): data was destaged "
			  "(dirty_max_age and the watermarks say it must not be yet)",
			  what, path, (unsigned long long)off);
}

/* ---- asynchronous writes ---- */

struct aio_write {
	uint64_t off;
	uint32_t len, seed;
};

/*
 * Send @n writes of th_fill(seed) with at most @qd in flight (requests in
 * flight together must not overlap); apply them to @md. @tick (may be NULL)
 * runs every 5 ms or so meanwhile. Returns how many failed.
 */
static unsigned aio_writes(struct nbd_handle *h, struct model *md, const struct aio_write *w, int n,
			   int qd, void (*tick)(void), int timeout_ms)
{
	int64_t *cookie = calloc((size_t)n, sizeof(*cookie));
	bool *done = calloc((size_t)n, sizeof(*done));
	uint8_t **bufs = calloc((size_t)n, sizeof(*bufs));
	double end = th_now_ms() + timeout_ms, last_tick = 0;
	int next = 0, completed = 0;
	unsigned failed = 0;

	cr_assert(cookie && done && bufs);
	while (completed < n) {
		cr_assert_lt(th_now_ms(), end, "%d of %d writes completed within %d ms", completed,
			     n, timeout_ms);
		while (next < n && next - completed < qd) {
			bufs[next] = malloc(w[next].len);
			cr_assert_not_null(bufs[next]);
			th_fill(bufs[next], w[next].len, w[next].off, w[next].seed);
			memcpy(md->b + w[next].off, bufs[next], w[next].len);
			cookie[next] = nbd_aio_pwrite(h, bufs[next], w[next].len, w[next].off,
						      NBD_NULL_COMPLETION, 0);
			cr_assert_gt(cookie[next], 0, "aio_pwrite: %s", nbd_get_error());
			next++;
		}
		cr_assert_geq(nbd_poll(h, 5), 0, "%s", nbd_get_error());
		for (int i = 0; i < next; i++) {
			int r;

			if (done[i])
				continue;
			r = nbd_aio_command_completed(h, (uint64_t)cookie[i]);
			if (r == 0)
				continue;
			if (r < 0) {
				failed++;
				fprintf(stderr, "write %u at %llu failed: %s\n", w[i].len,
					(unsigned long long)w[i].off, nbd_get_error());
			}
			done[i] = true;
			free(bufs[i]);
			bufs[i] = NULL;
			completed++;
		}
		if (tick && th_now_ms() - last_tick >= 5) {
			tick();
			last_tick = th_now_ms();
		}
	}
	free(cookie);
	free(done);
	free(bufs);
	return failed;
}

/* ---- 1: basics ---- */

/*
 * Writes are acknowledged from the log: read back at once (also on another
 * connection), dirty bytes counted, while the store has none of them, not
 * even after a FLUSH. SIGUSR1 destages everything.
 */
Test(writeback, writes_are_acknowledged_from_the_log_and_drained_on_sigusr1)
{
	enum { N = 32, BIG = 64 * KiB };
	const uint64_t size = 16 * MiB, big_off = 8 * MiB;
	static const char *const vols[] = { "disk", NULL };
	char store[320], uri[400];
	struct nbd_handle *h, *h2;
	struct model md;
	double dirty;

	disk_on_san(size, NULL, NULL, "64M", "16M", KEEP_DIRTY, store, uri);
	model_init(&md, size, SEED_STORE);

	cr_assert_eq(mg(LOGSIZE), 16 * MiB, "log size");
	cr_assert_eq(m(LOGLIMIT, "disk"), 16 * MiB,
		     "the only write-back volume's default limit is the whole log");
	cr_assert_eq(m(DIRTY, "disk"), 0);
	cr_assert_eq(m(DESTAGED, "disk"), 0);
	cr_assert_eq(m(OLDEST, "disk"), 0);
	cr_assert_eq(m(DRAINING, "disk"), 0);
	cr_assert_eq(m(RETRYING, "disk"), 0);

	h = th_nbd_connect(&agent, "disk");
	h2 = th_nbd_connect(&agent, "disk");
	/* 32 scattered blocks (37 is prime to 4096: all distinct) and one 64 KiB run. */
	for (int i = 0; i < N; i++) {
		uint64_t off = (uint64_t)(i * 37 % 2048) * BLK;

		mwrite(h, &md, off, BLK, 100u + (unsigned)i);
		mcheck(h, &md, off, BLK, "read right after a write");
	}
	mwrite(h, &md, big_off, BIG, 200);
	mcheck(h, &md, big_off, BIG, "read right after a 64K write");
	mcheck(h2, &md, 0, size, "whole volume, on a second connection");
	dirty = wait_m(DIRTY, "disk", EQ, N * BLK + BIG, 2000, "dirty bytes after the writes");
	cr_assert_gt(m(LOGUSED, "disk"), 0, "dirty data but no log space used");
	assert_store_untouched(store, size, "after the writes");

	/* A FLUSH makes the log durable; it does not destage. */
	cr_assert_eq(nbd_flush(h, 0), 0, "flush: %s", nbd_get_error());
	th_sleep_ms(500);
	assert_store_untouched(store, size, "after a FLUSH and 0.5 s");
	cr_assert_eq(m(DESTAGED, "disk"), 0);

	/* Overwriting a dirty block does not make more bytes dirty. */
	mwrite(h2, &md, 37 * BLK, BLK, 300);
	mcheck(h, &md, 37 * BLK, BLK, "read after overwriting a dirty block (other connection)");
	cr_assert_eq(m(DIRTY, "disk"), dirty, "an overwritten dirty block was counted twice");
	/* A write with FUA: durable in the log, still not in the store. */
	th_fill(md.b + 3 * MiB, BLK, 3 * MiB, 301);
	cr_assert_eq(nbd_pwrite(h, md.b + 3 * MiB, BLK, 3 * MiB, LIBNBD_CMD_FLAG_FUA), 0, "%s",
		     nbd_get_error());
	dirty += BLK;
	cr_assert_eq(m(DIRTY, "disk"), dirty);
	assert_store_untouched(store, size, "after a FUA write");
	mcheck(h, &md, 0, size, "whole volume before the drain");

	drain(vols, 20000);
	cr_assert_geq(m(DESTAGED, "disk"), dirty, "destaged_bytes_total after the drain");
	cr_assert_eq(m(OLDEST, "disk"), 0);
	cr_assert_eq(m(DRAINING, "disk"), 0);
	mcheck_store(store, &md, 0, size, "after the drain");
	mcheck(h, &md, 0, size, "whole volume after the drain");
	mcheck(h2, &md, 0, size, "whole volume after the drain, second connection");

	/* Written again after the drain: dirty again, the store keeps the drained data. */
	mwrite(h, &md, 0, BLK, 400);
	wait_m(DIRTY, "disk", EQ, BLK, 2000, "a write after the drain");
	cr_assert(store_has_seed(store, 0, BLK, 100), "a write after the drain reached the store");
	drain(vols, 20000);
	mcheck_store(store, &md, 0, size, "after the second drain");
	th_nbd_disconnect(h);
	th_nbd_disconnect(h2);
	agent_stop_clean();
	model_free(&md);
}

/* ---- 2: dirty_max_age ---- */

Test(writeback, dirty_max_age_destages_old_data_without_a_drain)
{
	/*
	 * 2 s rather than 1: the gauge may count whole seconds, and at 2 s the
	 * data is still dirty for a whole second in which it must read >= 1.
	 */
	const uint64_t size = 16 * MiB;
	char store[320], uri[400];
	struct nbd_handle *h;
	struct model md;
	double t0, t_acked, t_store = 0, oldest_max = 0, oldest_late = -1, end;
	long mark;

	disk_on_san(size, NULL, NULL, "64M", "16M",
		    ", \"dirty_max_age\": 2, \"dirty_high\": \"90%\", \"dirty_low\": \"80%\"",
		    store, uri);
	mark = log_mark();
	model_init(&md, size, SEED_STORE);
	h = th_nbd_connect(&agent, "disk");

	t0 = th_now_ms();
	mwrite(h, &md, 0, 64 * KiB, 10);
	for (int i = 0; i < 8; i++)
		mwrite(h, &md, (uint64_t)(100 + i * 50) * BLK, BLK, 11u + (unsigned)i);
	t_acked = th_now_ms();
	if (t_acked - t0 < 500)
		assert_store_untouched(store, size, "right after the writes");
	cr_assert_gt(m(DIRTY, "disk"), 0);

	end = t0 + 15000;
	for (;;) {
		double now = th_now_ms(), dirty = m(DIRTY, "disk"), oldest = m(OLDEST, "disk");
		bool in_store = store_has_seed(store, 0, 64 * KiB, 10);

		for (int i = 0; in_store && i < 8; i++)
			in_store = store_has_seed(store, (uint64_t)(100 + i * 50) * BLK, BLK,
						  11u + (unsigned)i);
		if (dirty > 0 && oldest > oldest_max)
			oldest_max = oldest;
		if (dirty > 0 && now - t_acked >= 1200 && oldest_late < 0)
			oldest_late = oldest;
		if (in_store && !t_store)
			t_store = now;
		if (in_store && dirty == 0)
			break;
		cr_assert_lt(now, end,
			     "15 s after the writes: store %s them, %.0f bytes still dirty "
			     "(dirty_max_age 2 s)",
			     in_store ? "has" : "does not have", dirty);
		th_sleep_ms(50);
	}
	cr_assert_geq(t_store - t0, 1500,
		      "data reached the store %.0f ms after the first write: before dirty_max_age",
		      t_store - t0);
	cr_assert_geq(oldest_late, 1.0,
		      "1.2 s after the writes, dirty_oldest_seconds read %g (still dirty)",
		      oldest_late);
	cr_assert_gt(oldest_max, 0);
	wait_m(OLDEST, "disk", EQ, 0, 2000, "dirty_oldest_seconds with nothing dirty");
	cr_assert_geq(m(DESTAGED, "disk"), 64 * KiB + 8 * BLK);
	cr_assert(!log_has(mark, "drained"), "the agent logged a drain nobody asked for");
	mcheck_store(store, &md, 0, size, "after max-age destaging");
	mcheck(h, &md, 0, size, "whole volume after max-age destaging");

	/*
	 * New data has its own age, not that of the data destaged before it:
	 * 0 at first, and it stays dirty for dirty_max_age.
	 */
	t0 = th_now_ms();
	mwrite(h, &md, 5 * MiB, BLK, 20);
	oldest_late = m(OLDEST, "disk");
	while (th_now_ms() < t0 + 1000)
		th_sleep_ms(20);
	cr_assert(!store_has_seed(store, 5 * MiB, BLK, 20),
		  "data written 1 s ago is already in the store (dirty_max_age is 2 s); "
		  "dirty_oldest_seconds said %g right after the write",
		  oldest_late);
	cr_assert_lt(oldest_late, 1.0, "fresh dirty data reported as %g s old", oldest_late);
	th_nbd_disconnect(h);
	agent_stop_clean();
	model_free(&md);
}

/* ---- 3: restart with dirty data ---- */

static void restart_keeps_dirty_data(bool kill9)
{
	enum { ASYNC = 32 };
	const uint64_t size = 16 * MiB;
	static const char *const vols[] = { "disk", NULL };
	char store[320], uri[400];
	struct aio_write w[ASYNC];
	struct nbd_handle *h;
	struct model md;
	double dirty;
	long mark;

	disk_on_san(size, NULL, NULL, "64M", "16M", KEEP_DIRTY, store, uri);
	model_init(&md, size, SEED_STORE);
	h = th_nbd_connect(&agent, "disk");

	/* Some blocks are clean in the cache first. */
	mcheck(h, &md, 2 * MiB, 64 * KiB, "caching read");
	for (int i = 0; i < 48; i++)
		mwrite(h, &md, (uint64_t)(i * 53 % 3000) * BLK, BLK, 1000u + (unsigned)i);
	mwrite(h, &md, 2 * MiB + 4 * BLK, 4 * BLK, 1100);    /* over clean cached blocks */
	mwrite(h, &md, 500 * BLK + 3 * 512, 512, 1101);	     /* one sector, uncached block */
	mwrite(h, &md, 601 * BLK - 1024, 2048, 1102);	     /* across two uncached blocks */
	mzero(h, &md, 700 * BLK, 2 * BLK, 0);		     /* zeroes over store data */
	mtrim(h, &md, 710 * BLK, BLK);			     /* trim over store data */
	mzero(h, &md, 0 * BLK + 5 * 512, 512, 0);	     /* zeroes inside a dirty block */
	mwrite(h, &md, 2 * MiB + 6 * BLK + 512, 1024, 1103); /* sectors of a dirty block */
	/* Then a burst of concurrent writes; the agent dies the moment they are acknowledged. */
	for (int i = 0; i < ASYNC; i++)
		w[i] = (struct aio_write){ (uint64_t)(1000 + i * 3) * BLK, BLK,
					   1200u + (unsigned)i };
	cr_assert_eq(aio_writes(h, &md, w, ASYNC, ASYNC, NULL, 10000), 0);
	dirty = m(DIRTY, "disk");
	cr_assert_geq(dirty, (48 + ASYNC) * BLK);

	if (kill9) {
		agent_kill9();
		th_nbd_close(h);
	} else {
		th_nbd_disconnect(h);
		agent_stop_clean();
	}
	assert_store_untouched(store, size, kill9 ? "after kill -9" : "after SIGTERM");

	/*
	 * Restarted: the replayed data is dirty again (the destager may already
	 * be writing it back: "destaging resumes"), and reads return it.
	 */
	mark = log_mark();
	agent_start();
	wait_dirty_accounted("disk", dirty, 3000, "after the restart");
	h = th_nbd_connect(&agent, "disk");
	/* Newer writes over replayed dirty blocks at once: destaging must not undo them. */
	for (int i = 0; i < 4; i++)
		mwrite(h, &md, (uint64_t)(i * 53 % 3000) * BLK, BLK, 1900u + (unsigned)i);
	mcheck(h, &md, 0, size,
	       kill9 ? "whole volume after kill -9 and restart"
		     : "whole volume after SIGTERM and restart");
	for (int i = 0; i < 8; i++) {
		mwrite(h, &md, (uint64_t)(i * 53 % 3000) * BLK, BLK, 2000u + (unsigned)i);
		mwrite(h, &md, (uint64_t)(1000 + i * 3) * BLK + 512, 512, 2100u + (unsigned)i);
	}
	mwrite(h, &md, 12 * MiB, 16 * KiB, 2200);
	mcheck(h, &md, 0, size, "whole volume after writes over replayed data");
	drain(vols, 20000);
	mcheck_store(store, &md, 0, size, "after the drain");
	mcheck(h, &md, 0, size, "whole volume after the drain");
	th_nbd_disconnect(h);
	agent_stop_clean();
	if (kill9)
		cr_assert(log_has(mark, "not clean"), "a kill -9 went unnoticed");
	model_free(&md);
}

Test(writeback, sigterm_keeps_dirty_data_for_the_restart)
{
	restart_keeps_dirty_data(false);
}

Test(writeback, kill9_loses_no_acknowledged_write)
{
	restart_keeps_dirty_data(true);
}

/* ---- 4: writes smaller than a block, zeroes, trims ---- */

struct xorshift {
	uint64_t s;
};

static uint64_t xs_next(struct xorshift *x)
{
	x->s ^= x->s << 13;
	x->s ^= x->s >> 7;
	x->s ^= x->s << 17;
	return x->s;
}

enum { S4_BLOCKS = 64, S4_REGION = S4_BLOCKS * BLK, S4_SECTORS = S4_REGION / 512 };

struct s4_vol {
	const char *name;
	const char *store;
	struct nbd_handle *h;
	struct model md;
};

/* One random operation on both volumes; returns a description for failure messages. */
static void s4_random_op(struct s4_vol *v, int nv, struct xorshift *x, unsigned seed, char *what,
			 size_t len)
{
	uint64_t r = xs_next(x), kind = r % 100, s = (r >> 8) % S4_SECTORS, n;
	uint64_t pick = (r >> 24) % 10;

	if (pick < 3)
		n = 1;
	else if (pick < 5)
		n = 2 + (r >> 32) % 6;
	else if (pick < 7) {
		s &= ~7ull; /* whole blocks */
		n = 8 * (1 + (r >> 32) % 3);
	} else if (pick < 9)
		n = 9 + (r >> 32) % 16;
	else
		n = 25 + (r >> 32) % 40;
	if (s + n > S4_SECTORS)
		n = S4_SECTORS - s;
	for (int i = 0; i < nv; i++) {
		if (kind < 50)
			mwrite(v[i].h, &v[i].md, s * 512, (uint32_t)(n * 512), seed);
		else if (kind < 65)
			mzero(v[i].h, &v[i].md, s * 512, (uint32_t)(n * 512), 0);
		else if (kind < 75)
			mzero(v[i].h, &v[i].md, s * 512, (uint32_t)(n * 512),
			      LIBNBD_CMD_FLAG_NO_HOLE);
		else
			mtrim(v[i].h, &v[i].md, s * 512, (uint32_t)(n * 512));
	}
	th_fmt(what, len, "after random op %u (%s of %llu sectors at sector %llu)", seed,
	       kind < 50   ? "write"
	       : kind < 75 ? "write_zeroes"
			   : "trim",
	       (unsigned long long)n, (unsigned long long)s);
}

/* Check [0, @len) of every volume (@len 0: all of it). */
static void s4_check_all(struct s4_vol *v, int nv, uint64_t len, const char *what)
{
	char msg[300];

	for (int i = 0; i < nv; i++) {
		th_fmt(msg, sizeof(msg), "%s: %s", v[i].name, what);
		mcheck(v[i].h, &v[i].md, 0, len ? len : v[i].md.size, msg);
	}
}

static void s4_check_stores(struct s4_vol *v, int nv, const char *what)
{
	char msg[300];

	for (int i = 0; i < nv; i++) {
		th_fmt(msg, sizeof(msg), "%s: %s", v[i].name, what);
		mcheck_store(v[i].store, &v[i].md, 0, v[i].md.size, msg);
	}
}

/*
 * The same operations on a file-backed and an nbd-backed write-back volume.
 * Blocks 0-15 start clean in the cache, 16-31 dirty, 32-63 uncached.
 */
Test(writeback, partial_writes_zeroes_and_trims_match_a_byte_model)
{
	const uint64_t size = 4 * MiB;
	static const char *const names[] = { "file", "nbd", NULL };
	char stores[2][320], uri[400], v0[1024], v1[1024], what[200];
	struct s4_vol v[2];
	struct xorshift x = { 0x9e3779b97f4a7c15ull };
	const int nv = 2;

	th_mkdtemp(tdir, sizeof(tdir));
	make_store("file.img", size, SEED_STORE, stores[0], sizeof(stores[0]));
	make_store("san.img", size, SEED_STORE, stores[1], sizeof(stores[1]));
	san_start("san", stores[1], NULL, NULL, uri, sizeof(uri));
	cache_in_tdir("64M", "16M");
	wb_vol(v0, sizeof(v0), "file", stores[0], KEEP_DIRTY);
	wb_vol(v1, sizeof(v1), "nbd", uri, KEEP_DIRTY);
	th_fmt(agent_vols, sizeof(agent_vols), "{ %s, %s }", v0, v1);
	agent_start();
	for (int i = 0; i < nv; i++) {
		v[i].name = names[i];
		v[i].store = stores[i];
		model_init(&v[i].md, size, SEED_STORE);
		v[i].h = th_nbd_connect(&agent, names[i]);
		mcheck(v[i].h, &v[i].md, 0, 16 * BLK, "caching read");
		wait_m(FILLS, names[i], GE, 16, 5000, "fills of blocks 0-15");
		for (uint64_t b = 16; b < 32; b++)
			mwrite(v[i].h, &v[i].md, b * BLK, BLK, 500u + (unsigned)b);
	}

	/* Directed: every sector position of clean, dirty and uncached blocks. */
	for (int i = 0; i < nv; i++) {
		struct nbd_handle *h = v[i].h;
		struct model *md = &v[i].md;

		for (unsigned sec = 0; sec < 8; sec++) {
			mwrite(h, md, (2 + sec) * BLK + sec * 512, 512, 600 + sec);  /* clean */
			mwrite(h, md, (18 + sec) * BLK + sec * 512, 512, 610 + sec); /* dirty */
			mwrite(h, md, (34 + sec) * BLK + sec * 512, 512, 620 + sec); /* uncached */
		}
		/* Unaligned writes across block boundaries: clean|dirty, dirty|uncached, 3 blocks.
		 */
		mwrite(h, md, 16 * BLK - 1536, 3072, 630);
		mwrite(h, md, 32 * BLK - 512, 1024, 631);
		mwrite(h, md, 44 * BLK + 3584, BLK + 1024, 632);
		mwrite(h, md, 12 * BLK + 512, 3 * BLK + 2048, 633);
		/* Zeroes and trims: partial and whole blocks, over each kind. */
		mzero(h, md, 3 * BLK + 1024, 512, 0);			      /* partial, clean */
		mzero(h, md, 19 * BLK + 2048, 1024, LIBNBD_CMD_FLAG_NO_HOLE); /* partial, dirty */
		mzero(h, md, 36 * BLK + 512, 2048, 0);		  /* partial, uncached */
		mzero(h, md, 20 * BLK, 2 * BLK, 0);		  /* whole, dirty */
		mzero(h, md, 46 * BLK - 1024, 2 * BLK + 2048, 0); /* spanning, uncached */
		mtrim(h, md, 5 * BLK + 512, 1024);		  /* partial, clean */
		mtrim(h, md, 22 * BLK + 3072, 1024);		  /* partial, dirty */
		mtrim(h, md, 38 * BLK, BLK);			  /* whole, uncached */
		mtrim(h, md, 23 * BLK - 2048, 3 * BLK);		  /* spanning, dirty */
		mtrim(h, md, 7 * BLK, 2 * BLK);			  /* whole, clean */
		/* Data again over zeroed and trimmed ranges, partly. */
		mwrite(h, md, 20 * BLK + 1024, 512, 640);
		mwrite(h, md, 38 * BLK + 3584, 1024, 641);
		mwrite(h, md, 7 * BLK, BLK, 642);
	}
	s4_check_all(v, nv, 0, "after the directed operations");

	/* Random operations, checked every 8. */
	for (unsigned op = 0; op < 160; op++) {
		s4_random_op(v, nv, &x, 1000 + op, what, sizeof(what));
		if (op % 8 == 7)
			s4_check_all(v, nv, S4_REGION, what);
	}
	s4_check_all(v, nv, 0, "after the random operations");
	for (int i = 0; i < nv; i++)
		assert_store_untouched(v[i].store, size, v[i].name);

	drain(names, 20000);
	s4_check_stores(v, nv, "after the first drain");
	s4_check_all(v, nv, 0, "after the first drain");

	/* Again, now over clean (destaged) blocks; then a restart before the drain. */
	for (unsigned op = 0; op < 80; op++) {
		s4_random_op(v, nv, &x, 2000 + op, what, sizeof(what));
		if (op % 8 == 7)
			s4_check_all(v, nv, S4_REGION, what);
	}
	for (int i = 0; i < nv; i++)
		th_nbd_disconnect(v[i].h);
	agent_stop_clean();
	agent_start();
	for (int i = 0; i < nv; i++)
		v[i].h = th_nbd_connect(&agent, names[i]);
	s4_check_all(v, nv, 0, "after a restart");
	drain(names, 20000);
	s4_check_stores(v, nv, "after the second drain");
	s4_check_all(v, nv, 0, "after the second drain");
	for (int i = 0; i < nv; i++) {
		th_nbd_disconnect(v[i].h);
		model_free(&v[i].md);
	}
	agent_stop_clean();
}

/* ---- 5: dirty limit, throttling, watermarks ---- */

static double thr_used_max, thr_dirty_max, thr_limit;
static unsigned thr_samples;

static void throttle_sample(void)
{
	double used = m(LOGUSED, "disk"), dirty = m(DIRTY, "disk");

	if (used > thr_used_max)
		thr_used_max = used;
	if (dirty > thr_dirty_max)
		thr_dirty_max = dirty;
	thr_samples++;
	cr_assert_leq(used, thr_limit, "log_used_bytes %.0f above the limit %.0f", used, thr_limit);
}

/*
 * A 4 MiB dirty limit, a SAN that takes 5 ms per write, 20 MiB of writes
 * at queue depth 8: writes wait for log space (counted), none fails, the
 * volume never holds more log than its limit, and the data is right.
 */
Test(writeback, dirty_limit_throttles_writes_without_failing_them)
{
	enum { CHUNK = 64 * KiB, NCHUNKS = 512, PASS1 = 256, PASS2 = 64 };
	const uint64_t size = (uint64_t)NCHUNKS * CHUNK;
	static const char *const vols[] = { "disk", NULL };
	static const char *const filters[] = { "--filter=delay", NULL };
	static const char *const params[] = { "wdelay=5ms", NULL };
	char store[320], uri[400];
	struct aio_write w[PASS1];
	unsigned perm[NCHUNKS], failed;
	struct xorshift x = { 12345 };
	struct nbd_handle *h;
	struct model md;
	double t0;

	disk_on_san(size, filters, params, "48M", "16M",
		    ", \"dirty_limit\": \"4M\", \"dirty_max_age\": 3600", store, uri);
	model_init(&md, size, SEED_STORE);
	thr_limit = m(LOGLIMIT, "disk");
	cr_assert_eq(thr_limit, 4 * MiB);
	cr_assert_eq(mg(LOGSIZE), 16 * MiB);
	thr_used_max = thr_dirty_max = 0;
	thr_samples = 0;

	for (unsigned i = 0; i < NCHUNKS; i++)
		perm[i] = i;
	for (unsigned i = NCHUNKS - 1; i > 0; i--) {
		unsigned j = (unsigned)(xs_next(&x) % (i + 1)), t = perm[i];

		perm[i] = perm[j];
		perm[j] = t;
	}
	h = th_nbd_connect(&agent, "disk");
	t0 = th_now_ms();
	for (int i = 0; i < PASS1; i++)
		w[i] = (struct aio_write){ (uint64_t)perm[i] * CHUNK, CHUNK, 100u + (unsigned)i };
	failed = aio_writes(h, &md, w, PASS1, 8, throttle_sample, 45000);
	cr_assert_eq(failed, 0, "%u writes failed at the dirty limit", failed);
	/* Rewrites of chunks written above (some dirty, some destaged meanwhile). */
	for (int i = 0; i < PASS2; i++)
		w[i] = (struct aio_write){ (uint64_t)perm[i * 3] * CHUNK, CHUNK,
					   900u + (unsigned)i };
	failed = aio_writes(h, &md, w, PASS2, 8, throttle_sample, 30000);
	cr_assert_eq(failed, 0, "%u rewrites failed at the dirty limit", failed);
	fprintf(stderr, "throttle: %d MiB written in %.0f ms, %u samples, log used max %.0f\n",
		(PASS1 + PASS2) * CHUNK / MiB, th_now_ms() - t0, thr_samples, thr_used_max);
	throttle_sample();

	cr_assert_gt(m(THROTTLED, "disk"), 0, "20 MiB through a 4 MiB limit, no write throttled");
	cr_assert_gt(thr_used_max, 0, "log_used_bytes never rose");
	cr_assert_leq(thr_used_max, thr_limit);
	cr_assert_leq(thr_dirty_max, thr_limit, "more dirty bytes than the limit");
	cr_assert_gt(m(DESTAGED, "disk"), 0);
	cr_assert_eq(th_vol_metric(&agent, "flashtier_request_errors_total", "disk", "write"), 0);
	mcheck(h, &md, 0, size, "whole volume after the throttled writes");
	drain(vols, 40000);
	mcheck_store(store, &md, 0, size, "after the drain");
	th_nbd_disconnect(h);
	agent_stop_clean();
	model_free(&md);
}

/* @n random whole-block writes over the first @nblocks blocks (distinct within any 32). */
static void random_block_writes(struct aio_write *w, int n, uint64_t nblocks, uint32_t seed0,
				struct xorshift *x)
{
	for (int i = 0; i < n; i++) {
		uint64_t b;
		bool clash;

		do { /* requests in flight together must not overlap */
			b = xs_next(x) % nblocks;
			clash = false;
			for (int j = i > 31 ? i - 31 : 0; j < i; j++)
				clash = clash || w[j].off == b * BLK;
		} while (clash);
		w[i] = (struct aio_write){ b * BLK, BLK, seed0 + (uint32_t)i };
	}
}

/*
 * The smallest log (4 segments), all of it this volume's limit, 4 KiB
 * random writes at queue depth 32 over four times the log: the log fills
 * up, every segment goes through limbo again and again, and the writes must
 * keep completing (a full head with the pool empty and segments waiting for
 * a tail claim once wedged the volume for good). Then kill -9 with the log
 * full, and the restart -- which finds every segment in use -- must go on
 * taking writes too.
 */
Test(writeback, a_full_log_never_wedges_the_volume)
{
	enum { N = 4096, QD = 32 };
	const uint64_t size = 16 * MiB;
	static const char *const vols[] = { "disk", NULL };
	static const char *const filters[] = { "--filter=delay", NULL };
	static const char *const params[] = { "wdelay=1ms", NULL };
	char store[320], uri[400];
	struct aio_write *w = calloc(N, sizeof(*w));
	struct xorshift x = { 777 };
	struct nbd_handle *h;
	struct model md;
	unsigned failed;
	double t0, used;

	cr_assert_not_null(w);
	disk_on_san(size, filters, params, "32M", "4M", ", \"dirty_max_age\": 3600", store, uri);
	cr_assert_eq(m(LOGLIMIT, "disk"), 4 * MiB);
	model_init(&md, size, SEED_STORE);
	h = th_nbd_connect(&agent, "disk");

	t0 = th_now_ms();
	random_block_writes(w, N, size / BLK, 5000, &x);
	failed = aio_writes(h, &md, w, N, QD, NULL, 60000);
	cr_assert_eq(failed, 0);
	fprintf(stderr, "full log: %d writes in %.0f ms, %.0f throttled\n", N, th_now_ms() - t0,
		m(THROTTLED, "disk"));
	cr_assert_gt(m(THROTTLED, "disk"), 0, "16 MiB through a 4 MiB log, no write throttled");

	/* Fill it again and kill -9 while it is full. */
	random_block_writes(w, 1024, size / BLK, 9000, &x);
	cr_assert_eq(aio_writes(h, &md, w, 1024, QD, NULL, 60000), 0);
	used = m(LOGUSED, "disk");
	agent_kill9();
	th_nbd_close(h);
	fprintf(stderr, "full log: killed with %.0f of %d bytes of log in use\n", used, 4 * MiB);

	agent_start();
	h = th_nbd_connect(&agent, "disk");
	random_block_writes(w, N, size / BLK, 13000, &x);
	failed = aio_writes(h, &md, w, N, QD, NULL, 60000);
	cr_assert_eq(failed, 0);
	mcheck(h, &md, 0, size, "whole volume after the restart and more writes");
	drain(vols, 40000);
	mcheck_store(store, &md, 0, size, "after the drain");
	th_nbd_disconnect(h);
	agent_stop_clean();
	model_free(&md);
	free(w);
}

/*
 * Below dirty_high nothing is destaged; above it destaging starts, and it
 * stops again at dirty_low, keeping the rest dirty.
 */
Test(writeback, watermarks_start_and_stop_destaging)
{
	enum { CHUNK = 64 * KiB };
	const uint64_t size = 16 * MiB, limit = 8 * MiB;
	static const char *const vols[] = { "disk", NULL };
	char store[320], uri[400];
	struct nbd_handle *h;
	struct model md;
	double destaged, dirty, stable_since, end;

	disk_on_san(size, NULL, NULL, "64M", "16M",
		    ", \"dirty_limit\": \"8M\", \"dirty_high\": \"50%\", \"dirty_low\": \"25%\","
		    " \"dirty_max_age\": 3600",
		    store, uri);
	model_init(&md, size, SEED_STORE);
	cr_assert_eq(m(LOGLIMIT, "disk"), limit);
	h = th_nbd_connect(&agent, "disk");

	/* 2 MiB dirty: a quarter of the limit, below the high watermark (4 MiB). */
	for (uint64_t off = 0; off < 2 * MiB; off += CHUNK)
		mwrite(h, &md, off, CHUNK, 10);
	th_sleep_ms(500);
	cr_assert_eq(m(DESTAGED, "disk"), 0, "destaging started below dirty_high");
	assert_store_untouched(store, size, "2 MiB dirty of an 8 MiB limit");

	/* 6 MiB dirty: above it. */
	for (uint64_t off = 2 * MiB; off < 6 * MiB; off += CHUNK)
		mwrite(h, &md, off, CHUNK, 11);
	wait_m(DESTAGED, "disk", GT, 0, 10000, "destaging above dirty_high");
	/* Wait until destaging stops (no progress for 1 s). */
	destaged = m(DESTAGED, "disk");
	stable_since = th_now_ms();
	end = th_now_ms() + 20000;
	while (th_now_ms() - stable_since < 1000) {
		double d = m(DESTAGED, "disk");

		cr_assert_lt(th_now_ms(), end, "destaging never settled");
		if (d != destaged) {
			destaged = d;
			stable_since = th_now_ms();
		}
		th_sleep_ms(50);
	}
	dirty = m(DIRTY, "disk");
	fprintf(stderr, "watermarks: settled at %.0f dirty, %.0f destaged, %.0f log used\n", dirty,
		destaged, m(LOGUSED, "disk"));
	cr_assert_gt(dirty, 0, "destaging went on below dirty_low (everything destaged)");
	cr_assert_leq(dirty, limit / 2, "destaging stopped above dirty_high: %.0f dirty", dirty);
	cr_assert_leq(m(LOGUSED, "disk"), limit / 2 + 1 * MiB);
	cr_assert_eq(m(DRAINING, "disk"), 0);
	mcheck(h, &md, 0, size, "whole volume after the watermark destage");
	drain(vols, 20000);
	mcheck_store(store, &md, 0, size, "after the drain");
	th_nbd_disconnect(h);
	agent_stop_clean();
	model_free(&md);
}

/* ---- 6: a failing SAN while destaging ---- */

/*
 * Two SANs whose writes, zeroes and trims fail (EIO, ENOSPC) while a
 * trigger file exists. Destaging fails, is counted and retried with a
 * warning, while the VM keeps writing, flushing and reading; once the
 * trigger is gone everything reaches the stores.
 */
Test(writeback, destage_errors_are_retried_and_lose_nothing)
{
	const uint64_t size = 16 * MiB;
	static const char *const names[] = { "eio", "enospc", NULL };
	static const char *const errs[] = { "EIO", "ENOSPC" };
	char stores[2][320], uris[2][400], trig[2][320], v[2][1024], params[2][9][400];
	struct nbd_handle *h[2];
	struct model md[2];
	double errs_then[2];
	long mark;

	th_mkdtemp(tdir, sizeof(tdir));
	for (int i = 0; i < 2; i++) {
		const char *p[10];
		char file[64];
		static const char *const filters[] = { "--filter=error", NULL };
		static const char *const ops[] = { "pwrite", "zero", "trim" };

		th_fmt(file, sizeof(file), "%s.img", names[i]);
		make_store(file, size, SEED_STORE, stores[i], sizeof(stores[i]));
		th_fmt(trig[i], sizeof(trig[i]), "%s/%s.errors", tdir, names[i]);
		touch(trig[i]);
		for (int o = 0; o < 3; o++) {
			th_fmt(params[i][3 * o], sizeof(params[i][0]), "error-%s=%s", ops[o],
			       errs[i]);
			th_fmt(params[i][3 * o + 1], sizeof(params[i][0]), "error-%s-rate=100%%",
			       ops[o]);
			th_fmt(params[i][3 * o + 2], sizeof(params[i][0]), "error-%s-file=%s",
			       ops[o], trig[i]);
		}
		for (int k = 0; k < 9; k++)
			p[k] = params[i][k];
		p[9] = NULL;
		san_start(names[i], stores[i], filters, p, uris[i], sizeof(uris[i]));
		wb_vol(v[i], sizeof(v[i]), names[i], uris[i], KEEP_DIRTY);
		model_init(&md[i], size, SEED_STORE);
	}
	cache_in_tdir("64M", "16M");
	th_fmt(agent_vols, sizeof(agent_vols), "{ %s, %s }", v[0], v[1]);
	agent_start();
	for (int i = 0; i < 2; i++) {
		h[i] = th_nbd_connect(&agent, names[i]);
		for (int k = 0; k < 32; k++)
			mwrite(h[i], &md[i], (uint64_t)(k * 7) * BLK, BLK, 10u + (unsigned)k);
		mzero(h[i], &md[i], 1 * MiB, 8 * BLK, 0);
		mtrim(h[i], &md[i], 2 * MiB, 4 * BLK);
		mwrite(h[i], &md[i], 3 * MiB + 512, 1024, 50);
	}

	/* Drain: every destage write fails. */
	mark = log_mark();
	cr_assert_eq(kill(agent.pid, SIGUSR1), 0);
	for (int i = 0; i < 2; i++) {
		wait_m(DERRORS, names[i], GT, 0, 10000, "destage errors with a failing SAN");
		wait_m(RETRYING, names[i], EQ, 1, 5000, "destage_retrying with a failing SAN");
	}
	for (int i = 0; i < 2; i++) {
		const char *words[] = { names[i], NULL };

		cr_assert(log_line_with(mark, "warn", words),
			  "no warning naming volume '%s' about failed destaging:\n%s", names[i],
			  log_since(mark));
	}
	{
		const char *words[] = { "enospc", "No space left", NULL };

		cr_assert(log_line_with(mark, "warn", words),
			  "the ENOSPC warning does not give the cause:\n%s", log_since(mark));
	}

	/* The VM notices nothing: writes, flushes and reads work (reads of the store too). */
	for (int i = 0; i < 2; i++) {
		errs_then[i] = m(DERRORS, names[i]);
		for (int k = 0; k < 16; k++)
			mwrite(h[i], &md[i], (uint64_t)(k * 7 + 1) * BLK, BLK, 100u + (unsigned)k);
		mwrite(h[i], &md[i], 0, BLK, 150);	       /* over dirty data */
		mwrite(h[i], &md[i], 1 * MiB + 512, 512, 151); /* over dirty zeroes */
		cr_assert_eq(nbd_flush(h[i], 0), 0, "%s: flush while destaging fails: %s", names[i],
			     nbd_get_error());
		mcheck(h[i], &md[i], 0, size, "whole volume while destaging fails");
		cr_assert_eq(
			th_vol_metric(&agent, "flashtier_request_errors_total", names[i], "write"),
			0);
		cr_assert_eq(
			th_vol_metric(&agent, "flashtier_request_errors_total", names[i], "read"),
			0);
		cr_assert_gt(m(DIRTY, names[i]), 0);
	}
	/* It keeps retrying. */
	for (int i = 0; i < 2; i++) {
		wait_m(DERRORS, names[i], GT, errs_then[i], 5000, "destage retried");
		cr_assert_eq(m(RETRYING, names[i]), 1);
		assert_store_untouched(stores[i], size, names[i]);
	}

	/* The SANs recover: everything reaches them, the drain completes. */
	for (int i = 0; i < 2; i++)
		cr_assert_eq(unlink(trig[i]), 0);
	for (int i = 0; i < 2; i++) {
		char needle[64];

		wait_m(DIRTY, names[i], EQ, 0, 25000, "dirty bytes once the SAN works again");
		wait_m(RETRYING, names[i], EQ, 0, 2000,
		       "destage_retrying once the SAN works again");
		th_fmt(needle, sizeof(needle), "volume '%s': drained", names[i]);
		wait_log(mark, needle, 5000, "the drain asked for while the SAN failed");
		mcheck_store(stores[i], &md[i], 0, size, "after the SAN recovered");
		mcheck(h[i], &md[i], 0, size, "whole volume after the SAN recovered");
		th_nbd_disconnect(h[i]);
		model_free(&md[i]);
	}
	agent_stop_clean();
}

/* ---- 7: leaving write-back at a restart ---- */

Test(writeback, mode_switch_at_restart_destages_then_writes_through)
{
	const uint64_t size = 16 * MiB;
	char store[320], uri[400], vol[1024];
	struct nbd_handle *h;
	struct model md;
	long mark;

	disk_on_san(size, NULL, NULL, "64M", "16M", KEEP_DIRTY, store, uri);
	model_init(&md, size, SEED_STORE);
	h = th_nbd_connect(&agent, "disk");
	for (int i = 0; i < 64; i++)
		mwrite(h, &md, (uint64_t)(i * 11) * BLK, BLK, 10u + (unsigned)i);
	mwrite(h, &md, 4 * MiB + 1024, 2048, 80);
	mzero(h, &md, 5 * MiB, 4 * BLK, 0);
	th_nbd_disconnect(h);
	agent_stop_clean();
	assert_store_untouched(store, size, "after SIGTERM in write-back");

	/* Restart in write-through: right data at once, the log is destaged, then it switches. */
	th_fmt(agent_vols, sizeof(agent_vols),
	       "{ \"disk\": { \"backing\": \"%s\", \"cache\": { \"mode\": \"write-through\","
	       " \"sequential_cutoff\": 0 } } }",
	       uri);
	mark = log_mark();
	agent_start();
	h = th_nbd_connect(&agent, "disk");
	mcheck(h, &md, 0, size, "whole volume right after the restart in write-through");
	wait_log(mark, "volume 'disk': drained; now write-through", 20000,
		 "switch to write-through");
	mcheck_store(store, &md, 0, size, "after the switch");
	mcheck(h, &md, 0, size, "whole volume after the switch");

	/* Now writes go straight to the store, also over formerly dirty blocks. */
	mwrite(h, &md, 0, BLK, 500);
	mwrite(h, &md, 11 * BLK + 512, 512, 501);
	mwrite(h, &md, 9 * MiB, 64 * KiB, 502);
	mzero(h, &md, 22 * BLK, BLK, 0);
	mcheck_store(store, &md, 0, size, "right after write-through writes");
	mcheck(h, &md, 0, size, "whole volume after write-through writes");
	th_nbd_disconnect(h);
	agent_stop_clean();

	/* Back in write-back: the old log's records must not come back over the newer data. */
	wb_vol(vol, sizeof(vol), "disk", uri, KEEP_DIRTY);
	th_fmt(agent_vols, sizeof(agent_vols), "{ %s }", vol);
	agent_start();
	cr_assert_eq(m(DIRTY, "disk"), 0, "dirty data came back after the switch");
	h = th_nbd_connect(&agent, "disk");
	mcheck(h, &md, 0, size, "whole volume back in write-back");
	th_nbd_disconnect(h);
	agent_stop_clean();
	mcheck_store(store, &md, 0, size, "at the end");
	model_free(&md);
}

/* ---- runs that must be refused ---- */

struct run {
	int status;
	char *err;
};

/* Run flashtierd on config @cfg to completion (it must exit within 10 s). */
static void run_once(const char *cfg, struct run *r, const char *why)
{
	const char *bin = getenv("AGENT");
	char err_path[320], sock[320];
	double end;
	int status = 0;

	cr_assert_not_null(bin, "AGENT is not set: run through 'make check'");
	th_fmt(err_path, sizeof(err_path), "%s/run.err", tdir);
	th_fmt(sock, sizeof(sock), "%s/nbd.sock", tdir);
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
		/* Listening (every config here listens on tdir/nbd.sock): it did start. */
		bool serving = access(sock, F_OK) == 0;

		if (serving || th_now_ms() > end) {
			th_kill(&run_pid);
			unlink(sock);
			th_dump_file(err_path);
			cr_assert_fail(
				"%s: flashtierd %s (output above): it should have refused to "
				"start",
				why, serving ? "started and listens" : "still running after 10 s");
		}
		th_sleep_ms(10);
	}
	run_pid = 0;
	r->status = status;
	r->err = th_slurp(err_path, NULL);
}

/*
 * Expect the agent to refuse config @cfg: non-zero exit, every string of
 * @expect in its output, no socket at @sock. Returns the output (free it).
 */
static char *expect_refused(const char *cfg, const char *sock, const char *const *expect,
			    const char *why)
{
	struct run r;

	run_once(cfg, &r, why);
	cr_assert(WIFEXITED(r.status), "%s: flashtierd died from a signal:\n%s", why, r.err);
	cr_assert_neq(WEXITSTATUS(r.status), 0, "%s: flashtierd started (exit 0):\n%s", why, r.err);
	for (int i = 0; expect[i]; i++)
		cr_assert(strstr(r.err, expect[i]), "%s: the message lacks \"%s\":\n%s", why,
			  expect[i], r.err);
	cr_assert_eq(access(sock, F_OK), -1, "%s: the socket was created", why);
	return r.err;
}

/* The agent's config (as ft_agent_start_in writes it, no metrics) with @vols and @extra. */
static void write_agent_cfg(const char *path, const char *vols, const char *extra)
{
	char text[8192];

	th_fmt(text, sizeof(text), "{ \"listen\": \"%s/nbd.sock\", %s \"volumes\": %s }\n", tdir,
	       extra, vols);
	write_text(path, text);
}

/* The volume id the agent's log gave @vol ("volume 'NAME': ... (id N)"), or 0. */
static unsigned volume_id_from_log(const char *vol)
{
	char *log = log_since(0), needle[128];
	const char *p = log, *id;
	unsigned out = 0;

	th_fmt(needle, sizeof(needle), "volume '%s':", vol);
	while ((p = strstr(p, needle))) {
		const char *eol = strchr(p, '\n');

		id = strstr(p, "(id ");
		if (id && (!eol || id < eol))
			out = (unsigned)strtoul(id + 4, NULL, 10);
		p += strlen(needle);
	}
	free(log);
	return out;
}

/* ---- 8: a removed volume with dirty data ---- */

/* The cache file past its two superblock copies (log, records, data) equals @before. */
static void assert_same_past_sb(const char *path, const char *before, size_t len, const char *why)
{
	size_t now_len;
	char *now = th_slurp(path, &now_len);
	long d = -1;

	cr_assert_eq(now_len, len, "%s: %s changed size", why, path);
	for (size_t i = 2 * FT_CACHE_SB_BYTES; i < len && d < 0; i++)
		if (now[i] != before[i])
			d = (long)i;
	cr_assert_eq(d, -1, "%s: %s was modified at byte %ld (past the superblocks)", why, path, d);
	free(now);
}

/*
 * A volume with dirty data removed from the config, or moved to another
 * store: the agent refuses to start, every time (a refusal must not
 * forget the volume), and with the volume put back as it was its data is
 * all there. "discard_dirty": true starts and drops that data for good.
 */
Test(writeback, removed_volume_with_dirty_data_is_refused_unless_discarded)
{
	const uint64_t size = 4 * MiB;
	char a[320], b[320], c[320], va[1024], vb[1024], vc[1024], cfg[320], sock[320], vols[4096];
	char idtext[32], why[128], *before, *out;
	struct nbd_handle *h;
	struct model ma, mb;
	size_t len;
	unsigned id;
	long mark;

	th_mkdtemp(tdir, sizeof(tdir));
	make_store("a.img", size, SEED_STORE, a, sizeof(a));
	make_store("b.img", size, SEED_STORE, b, sizeof(b));
	make_store("c.img", size, SEED_STORE, c, sizeof(c));
	cache_in_tdir("48M", "16M");
	wb_vol(va, sizeof(va), "a", a, KEEP_DIRTY);
	wb_vol(vb, sizeof(vb), "b", b, KEEP_DIRTY);
	wb_vol(vc, sizeof(vc), "a", c, KEEP_DIRTY); /* a on another store of the same size */
	th_fmt(agent_vols, sizeof(agent_vols), "{ %s, %s }", va, vb);
	agent_start();
	model_init(&ma, size, SEED_STORE);
	model_init(&mb, size, SEED_STORE);
	h = th_nbd_connect(&agent, "a");
	for (int i = 0; i < 32; i++)
		mwrite(h, &ma, (uint64_t)(i * 3) * BLK, BLK, 10u + (unsigned)i);
	th_nbd_disconnect(h);
	h = th_nbd_connect(&agent, "b");
	mwrite(h, &mb, 0, 8 * BLK, 50);
	th_nbd_disconnect(h);
	wait_m(DIRTY, "a", EQ, 32 * BLK, 2000, "a's dirty bytes");
	agent_stop_clean();
	id = volume_id_from_log("a");
	cr_assert_gt(id, 0, "the log does not say which id volume 'a' got");
	th_fmt(idtext, sizeof(idtext), "%u", id);

	th_fmt(cfg, sizeof(cfg), "%s/refused.json", tdir);
	th_fmt(sock, sizeof(sock), "%s/nbd.sock", tdir);
	before = th_slurp(cache_path, &len);
	for (int variant = 0; variant < 2; variant++) {
		const char *expect[] = { "dirty", "discard_dirty", idtext, NULL };

		if (variant == 0)
			th_fmt(vols, sizeof(vols), "{ %s }", vb);
		else
			th_fmt(vols, sizeof(vols), "{ %s, %s }", vc, vb);
		write_agent_cfg(cfg, vols, agent_extra);
		for (int attempt = 1; attempt <= 2; attempt++) {
			th_fmt(why, sizeof(why), "volume with dirty data %s, start attempt %d",
			       variant ? "moved to another store" : "removed", attempt);
			out = expect_refused(cfg, sock, expect, why);
			free(out);
			assert_same_past_sb(cache_path, before, len, why);
		}
		/* Put back as it was: it starts, and a's data is all there. */
		agent_start();
		cr_assert_eq(m(DIRTY, "a"), 32 * BLK,
			     "a's dirty data after refused starts (%s) and putting it back",
			     variant ? "moved" : "removed");
		h = th_nbd_connect(&agent, "a");
		mcheck(h, &ma, 0, size, "a put back after refused starts");
		th_nbd_disconnect(h);
		agent_stop_clean();
		free(before);
		before = th_slurp(cache_path, &len);
	}
	free(before);
	cr_assert(store_has_seed(a, 0, size, SEED_STORE), "a's store changed");
	cr_assert(store_has_seed(c, 0, size, SEED_STORE), "a's data went to another store");

	/* discard_dirty: starts, b keeps its dirty data, a's is dropped. */
	set_cache(2, "48M", "16M", ", \"discard_dirty\": true");
	th_fmt(agent_vols, sizeof(agent_vols), "{ %s }", vb);
	mark = log_mark();
	agent_start();
	cr_assert(log_has(mark, "discard"), "the log does not say dirty data was discarded:\n%s",
		  log_since(mark));
	cr_assert_eq(m(DIRTY, "b"), 8 * BLK, "b lost its dirty data to discard_dirty");
	h = th_nbd_connect(&agent, "b");
	mcheck(h, &mb, 0, size, "b after discard_dirty");
	th_nbd_disconnect(h);
	agent_stop_clean();

	/* a comes back (without discard_dirty): it starts, from its store's old data only. */
	set_cache(2, "48M", "16M", "");
	th_fmt(agent_vols, sizeof(agent_vols), "{ %s, %s }", va, vb);
	agent_start();
	cr_assert_eq(m(DIRTY, "a"), 0, "discarded dirty data came back");
	h = th_nbd_connect(&agent, "a");
	model_free(&ma);
	model_init(&ma, size, SEED_STORE);
	mcheck(h, &ma, 0, size, "a after its dirty data was discarded");
	th_nbd_disconnect(h);
	h = th_nbd_connect(&agent, "b");
	mcheck(h, &mb, 0, size, "b");
	th_nbd_disconnect(h);
	agent_stop_clean();
	cr_assert(store_has_seed(a, 0, size, SEED_STORE), "a's discarded data reached its store");
	model_free(&ma);
	model_free(&mb);
}

/* ---- 9: corrupt and torn log pages ---- */

struct log_page {
	uint64_t dev_off; /* of its header block */
	struct ft_wlog_page pg;
};

/* The log as the device holds it: one volume's valid, current pages. */
struct log_scan {
	struct ft_cache_geometry g;
	uint8_t uuid[16];
	uint32_t epoch;		/* the volume's, per the superblock */
	struct log_page *pages; /* live pages of the volume's current epoch */
	unsigned n;
	uint64_t max_durable; /* over those pages */
};

/* Geometry, uuid and volume @id's epoch from the newest valid superblock copy of @path. */
static void dev_layout(const char *path, uint16_t id, struct log_scan *s)
{
	struct ft_cache_sb sb[2];
	uint64_t seq, best_seq = 0;
	int best = -1;
	bool found = false;

	th_file_read(path, 0, sb, sizeof(sb));
	for (int i = 0; i < 2; i++) {
		struct ft_cache_geometry g;
		uint8_t uuid[16];

		if (ft_cache_sb_decode(&sb[i], &g, uuid, &seq, NULL) != FT_SB_VALID)
			continue;
		if (best < 0 || seq > best_seq) {
			best = i;
			best_seq = seq;
			s->g = g;
			memcpy(s->uuid, uuid, 16);
		}
	}
	cr_assert_geq(best, 0, "%s has no valid superblock", path);
	cr_assert_gt(s->g.log_bytes, 0, "the superblock has no log region");
	cr_assert_eq(s->g.log_offset % BLK, 0);
	cr_assert_leq(s->g.log_offset + s->g.log_bytes, s->g.device_bytes);
	/* Little-endian on disk, as on the machines this runs on. */
	for (uint32_t v = 0; v < sb[best].nvolumes && v < FT_CACHE_MAX_VOLUMES; v++)
		if (sb[best].volumes[v].id == id) {
			s->epoch = sb[best].volumes[v].epoch;
			found = true;
		}
	cr_assert(found, "volume id %u is not in the superblock's volume table", id);
}

/*
 * The valid page headers of volume @id's current epoch on the device that
 * are still live: in segments at or after the newest page's tail_seg.
 */
static void log_scan(const char *path, uint16_t id, struct log_scan *s)
{
	uint8_t *log;
	unsigned cap = 64, n = 0, newest = 0;

	memset(s, 0, sizeof(*s));
	dev_layout(path, id, s);
	log = malloc(s->g.log_bytes);
	cr_assert_not_null(log);
	th_file_read(path, s->g.log_offset, log, s->g.log_bytes);
	s->pages = malloc(cap * sizeof(*s->pages));
	cr_assert_not_null(s->pages);
	for (uint64_t off = 0; off < s->g.log_bytes; off += BLK) {
		struct ft_wlog_page pg;

		if (memcmp(log + off, FT_WLOG_MAGIC, 8) != 0)
			continue;
		memcpy(&pg, log + off, sizeof(pg));
		if (ft_wlog_page_open(&pg, s->uuid) != FT_WLOG_PAGE_VALID)
			continue;
		if (pg.volume != id || pg.epoch != s->epoch)
			continue;
		if (n == cap) {
			cap *= 2;
			s->pages = realloc(s->pages, cap * sizeof(*s->pages));
			cr_assert_not_null(s->pages);
		}
		s->pages[n].dev_off = s->g.log_offset + off;
		s->pages[n].pg = pg;
		if (pg.page_seq > s->pages[newest].pg.page_seq)
			newest = n;
		n++;
	}
	free(log);
	cr_assert_gt(n, 0, "no log page of volume %u (epoch %u) on the device", id, s->epoch);
	/* Keep the live ones. */
	{
		uint64_t tail = s->pages[newest].pg.tail_seg;

		for (unsigned i = 0; i < n; i++) {
			if (s->pages[i].pg.seg_seq < tail)
				continue;
			s->pages[s->n++] = s->pages[i];
			if (s->pages[i].pg.durable_seq > s->max_durable)
				s->max_durable = s->pages[i].pg.durable_seq;
		}
	}
}

/* Does page @p hold a DATA record for a block in [@b0, @b1)? */
static bool page_has_block(const struct log_page *p, uint64_t b0, uint64_t b1)
{
	for (unsigned r = 0; r < p->pg.nrecs && r < FT_WLOG_RECS_PER_PAGE; r++) {
		const struct ft_wlog_rec *rec = &p->pg.recs[r];

		if (rec->type == FT_WLOG_DATA && rec->offset / BLK >= b0 && rec->offset / BLK < b1)
			return true;
	}
	return false;
}

/* The live page with the smallest (@first) or largest page_seq with DATA for [@b0, @b1). */
static const struct log_page *log_pick(const struct log_scan *s, bool first, uint64_t b0,
				       uint64_t b1)
{
	const struct log_page *best = NULL;

	for (unsigned i = 0; i < s->n; i++) {
		const struct log_page *p = &s->pages[i];

		if (p->pg.ndata == 0 || !page_has_block(p, b0, b1))
			continue;
		if (!best || (first ? p->pg.page_seq < best->pg.page_seq
				    : p->pg.page_seq > best->pg.page_seq))
			best = p;
	}
	cr_assert_not_null(best, "no live log page holds blocks %llu-%llu (%u live pages)",
			   (unsigned long long)b0, (unsigned long long)b1 - 1, s->n);
	return best;
}

/* XOR one byte of the file @path at @off with @mask, durably. */
static void flip_byte(const char *path, uint64_t off, uint8_t mask)
{
	int fd = open(path, O_RDWR);
	uint8_t c;

	cr_assert_geq(fd, 0, "open %s: %s", path, strerror(errno));
	cr_assert_eq(pread(fd, &c, 1, (off_t)off), 1);
	c ^= mask;
	cr_assert_eq(pwrite(fd, &c, 1, (off_t)off), 1);
	cr_assert_eq(fdatasync(fd), 0);
	close(fd);
}

static bool contains_any_ci(const char *text, const char *const *words)
{
	for (int i = 0; words[i]; i++)
		if (strcasestr(text, words[i]))
			return true;
	return false;
}

/* Two batches of 16 one-block writes at blocks @b0.. and @b0+100.., each followed by a FLUSH. */
static void two_flushed_batches(struct nbd_handle *h, struct model *md, uint64_t b0, uint32_t seed)
{
	for (int k = 0; k < 2; k++) {
		for (int i = 0; i < 16; i++)
			mwrite(h, md, (b0 + 100u * (uint64_t)k + (uint64_t)i) * BLK, BLK,
			       seed + 16u * (unsigned)k + (unsigned)i);
		cr_assert_eq(nbd_flush(h, 0), 0, "flush: %s", nbd_get_error());
	}
}

/*
 * Flip one byte at @off of the cache device: the agent must refuse to
 * start, saying what is wrong, leave the log and data alone; with the byte
 * restored it must start and serve the model.
 */
static void corrupt_refused_restored(uint64_t off, const struct model *md, uint64_t size,
				     const char *what)
{
	static const char *const problem[] = { "corrupt", "checksum",	     "crc",
					       "damaged", "does not verify", NULL };
	const char *expect[] = { "log", "disk", NULL };
	char cfg[320], sock[320], *before, *out;
	struct nbd_handle *h;
	size_t len;

	th_fmt(cfg, sizeof(cfg), "%s/again.json", tdir);
	th_fmt(sock, sizeof(sock), "%s/nbd.sock", tdir);
	write_agent_cfg(cfg, agent_vols, agent_extra);
	flip_byte(cache_path, off, 0x10);
	before = th_slurp(cache_path, &len);
	for (int attempt = 1; attempt <= 2; attempt++) {
		out = expect_refused(cfg, sock, expect, what);
		cr_assert(contains_any_ci(out, problem),
			  "%s: the message does not name the "
			  "problem:\n%s",
			  what, out);
		free(out);
		assert_same_past_sb(cache_path, before, len, what);
	}
	free(before);
	flip_byte(cache_path, off, 0x10);

	agent_start();
	h = th_nbd_connect(&agent, "disk");
	mcheck(h, md, 0, size, "whole volume with the damaged byte restored");
	th_nbd_disconnect(h);
}

/*
 * A corrupt page that a completed FLUSH covered: the agent refuses to start
 * (and leaves the log alone) rather than skip acknowledged, flushed data;
 * with the byte restored it starts and serves everything. Once in a data
 * block, once in a page header.
 */
Test(writeback, corrupt_flushed_log_page_is_refused)
{
	const uint64_t size = 4 * MiB;
	static const char *const vols[] = { "disk", NULL };
	char store[320], vol[1024], what[256];
	struct log_scan s;
	const struct log_page *p;
	struct nbd_handle *h;
	struct model md;
	uint64_t off;
	uint16_t id;

	th_mkdtemp(tdir, sizeof(tdir));
	make_store("disk.img", size, SEED_STORE, store, sizeof(store));
	cache_in_tdir("48M", "16M");
	wb_vol(vol, sizeof(vol), "disk", store, ", \"dirty_max_age\": 86400");
	th_fmt(agent_vols, sizeof(agent_vols), "{ %s }", vol);
	agent_start();
	id = (uint16_t)volume_id_from_log("disk");
	cr_assert_gt(id, 0);
	model_init(&md, size, SEED_STORE);
	h = th_nbd_connect(&agent, "disk");
	two_flushed_batches(h, &md, 0, 10);
	th_nbd_disconnect(h);
	agent_stop_clean();

	/* One byte of the first data block of the first page (blocks 0-15). */
	log_scan(cache_path, id, &s);
	p = log_pick(&s, true, 0, 16);
	cr_assert_geq(s.max_durable, p->pg.page_seq,
		      "no page records the flush that covered page %llu (largest durable_seq %llu)",
		      (unsigned long long)p->pg.page_seq, (unsigned long long)s.max_durable);
	off = p->dev_off + BLK + 100;
	th_fmt(what, sizeof(what),
	       "a flushed log page with a corrupt data block (page %llu at device byte %llu, "
	       "durable_seq up to %llu)",
	       (unsigned long long)p->pg.page_seq, (unsigned long long)p->dev_off,
	       (unsigned long long)s.max_durable);
	free(s.pages);
	corrupt_refused_restored(off, &md, size, what);
	drain(vols, 20000);
	mcheck_store(store, &md, 0, size, "after the first drain");

	/* New data, flushed; one byte of the header of its first page (its first record). */
	h = th_nbd_connect(&agent, "disk");
	two_flushed_batches(h, &md, 400, 50);
	th_nbd_disconnect(h);
	agent_stop_clean();
	log_scan(cache_path, id, &s);
	p = log_pick(&s, true, 400, 416);
	cr_assert_geq(s.max_durable, p->pg.page_seq,
		      "no page records the flush that covered page %llu (largest durable_seq %llu)",
		      (unsigned long long)p->pg.page_seq, (unsigned long long)s.max_durable);
	off = p->dev_off + offsetof(struct ft_wlog_page, recs) + 8;
	th_fmt(what, sizeof(what),
	       "a flushed log page with a corrupt header (page %llu, epoch %u, at device byte "
	       "%llu, durable_seq up to %llu)",
	       (unsigned long long)p->pg.page_seq, p->pg.epoch, (unsigned long long)p->dev_off,
	       (unsigned long long)s.max_durable);
	free(s.pages);
	corrupt_refused_restored(off, &md, size, what);
	drain(vols, 20000);
	mcheck_store(store, &md, 0, size, "after the second drain");
	agent_stop_clean();
	model_free(&md);
}

/*
 * A torn page after the last FLUSH (kill -9, then the newest page damaged,
 * as a power cut would leave it) is ignored: the agent starts, flushed data
 * is intact, the torn page's blocks read as before it; and it stays ignored
 * once newer pages are written after it.
 */
Test(writeback, torn_log_tail_after_the_last_flush_is_ignored)
{
	const uint64_t size = 4 * MiB;
	static const char *const vols[] = { "disk", NULL };
	char store[320], vol[1024];
	struct log_scan s;
	const struct log_page *p;
	struct nbd_handle *h;
	struct model md, before_tail;
	uint64_t torn_seq;
	bool torn[4] = { false };
	uint16_t id;
	long mark;

	th_mkdtemp(tdir, sizeof(tdir));
	make_store("disk.img", size, SEED_STORE, store, sizeof(store));
	cache_in_tdir("48M", "16M");
	wb_vol(vol, sizeof(vol), "disk", store, ", \"dirty_max_age\": 86400");
	th_fmt(agent_vols, sizeof(agent_vols), "{ %s }", vol);
	agent_start();
	id = (uint16_t)volume_id_from_log("disk");
	cr_assert_gt(id, 0);
	model_init(&md, size, SEED_STORE);
	h = th_nbd_connect(&agent, "disk");
	for (int i = 0; i < 16; i++)
		mwrite(h, &md, (uint64_t)i * BLK, BLK, 10u + (unsigned)i);
	cr_assert_eq(nbd_flush(h, 0), 0, "%s", nbd_get_error());
	model_init(&before_tail, size, SEED_STORE);
	memcpy(before_tail.b, md.b, size);
	/* After the flush: blocks 100-103, one write each, no flush. */
	for (int i = 0; i < 4; i++)
		mwrite(h, &md, (uint64_t)(100 + i) * BLK, BLK, 40u + (unsigned)i);
	agent_kill9();
	th_nbd_close(h);

	log_scan(cache_path, id, &s);
	p = log_pick(&s, false, 0, size / BLK);
	torn_seq = p->pg.page_seq;
	cr_assert_gt(torn_seq, s.max_durable,
		     "the newest page (%llu) is covered by a flush (durable_seq %llu) without any "
		     "FLUSH after its write",
		     (unsigned long long)torn_seq, (unsigned long long)s.max_durable);
	for (unsigned r = 0; r < p->pg.nrecs; r++) {
		const struct ft_wlog_rec *rec = &p->pg.recs[r];
		uint64_t b = rec->offset / BLK;

		if (rec->type != FT_WLOG_DATA)
			continue;
		cr_assert(b >= 100 && b < 104,
			  "the newest log page holds block %llu, written before the FLUSH",
			  (unsigned long long)b);
		torn[b - 100] = true;
	}
	/* Tear it: damage its header (the first record), as a partial write would. */
	flip_byte(cache_path, p->dev_off + offsetof(struct ft_wlog_page, recs) + 8, 0x10);
	free(s.pages);

	mark = log_mark();
	agent_start();
	h = th_nbd_connect(&agent, "disk");
	mcheck(h, &before_tail, 0, 16 * BLK, "flushed data after a torn tail");
	for (int i = 0; i < 4; i++) {
		uint64_t off = (uint64_t)(100 + i) * BLK;
		uint8_t buf[BLK];

		cr_assert_eq(nbd_pread(h, buf, BLK, off, 0), 0, "%s", nbd_get_error());
		if (torn[i]) {
			/* Ignored: the block reads as before (the write was never flushed). */
			cr_assert(memcmp(buf, before_tail.b + off, BLK) == 0 ||
					  memcmp(buf, md.b + off, BLK) == 0,
				  "block %d of the torn page reads neither old nor new data",
				  100 + i);
			memcpy(md.b + off, buf, BLK);
		} else {
			cr_assert(memcmp(buf, md.b + off, BLK) == 0,
				  "block %d (a valid page before the torn one) lost its write",
				  100 + i);
		}
	}
	mcheck(h, &md, 0, size, "whole volume after a torn tail");
	cr_assert(log_has(mark, "not clean"), "a kill -9 went unnoticed");

	/* Newer pages after the torn one, flushed; a clean restart must still start. */
	two_flushed_batches(h, &md, 300, 70);
	th_nbd_disconnect(h);
	agent_stop_clean();
	agent_start();
	h = th_nbd_connect(&agent, "disk");
	mcheck(h, &md, 0, size, "whole volume after newer pages and a restart");
	drain(vols, 20000);
	mcheck_store(store, &md, 0, size, "after the drain");
	th_nbd_disconnect(h);
	agent_stop_clean();
	model_free(&md);
	model_free(&before_tail);
}

/* ---- 10: bad values for the new keys, end to end ---- */

struct bad_case {
	const char *vol_cache; /* members of volume d's "cache" (after "mode") */
	const char *mode;
	const char *cache_more; /* more members of the top-level "cache" */
	const char *key;	/* the key the message must name */
};

Test(writeback, bad_config_values_are_refused_naming_the_key)
{
	static const struct bad_case cases[] = {
		{ "", "write-behind", "", "volumes.d.cache.mode" },
		{ ", \"dirty_limit\": \"1M\"", "write-back", "", "volumes.d.cache.dirty_limit" },
		{ ", \"dirty_limit\": \"lots\"", "write-back", "", "volumes.d.cache.dirty_limit" },
		{ ", \"dirty_limit\": \"0%\"", "write-back", "", "volumes.d.cache.dirty_limit" },
		{ ", \"dirty_limit\": -1", "write-back", "", "volumes.d.cache.dirty_limit" },
		{ ", \"dirty_high\": \"150%\"", "write-back", "", "volumes.d.cache.dirty_high" },
		{ ", \"dirty_high\": \"2M\"", "write-back", "", "volumes.d.cache.dirty_high" },
		{ ", \"dirty_low\": \"60%\"", "write-back", "", "volumes.d.cache.dirty_low" },
		{ ", \"dirty_high\": \"40%\", \"dirty_low\": \"40%\"", "write-back", "",
		  "volumes.d.cache.dirty_low" },
		{ ", \"dirty_max_age\": 0", "write-back", "", "volumes.d.cache.dirty_max_age" },
		{ ", \"dirty_max_age\": -5", "write-back", "", "volumes.d.cache.dirty_max_age" },
		{ ", \"dirty_max_age\": \"30\"", "write-back", "",
		  "volumes.d.cache.dirty_max_age" },
		{ ", \"dirty_max_age\": 100000", "write-back", "",
		  "volumes.d.cache.dirty_max_age" },
		{ ", \"destage_bandwidth\": \"512K\"", "write-back", "",
		  "volumes.d.cache.destage_bandwidth" },
		{ ", \"destage_bandwidth\": \"fast\"", "write-back", "",
		  "volumes.d.cache.destage_bandwidth" },
		{ ", \"dirty_max_age\": 5", "write-through", "", "volumes.d.cache.dirty_max_age" },
		{ ", \"dirty_limit\": \"8M\"", "write-around", "", "volumes.d.cache.dirty_limit" },
		{ "", "write-back", ", \"log_size\": \"2M\"", "cache.log_size" },
		{ "", "write-back", ", \"log_size\": \"95%\"", "cache.log_size" },
		{ "", "write-back", ", \"log_size\": \"big\"", "cache.log_size" },
		{ "", "write-back", ", \"log_size\": true", "cache.log_size" },
		{ "", "write-back", ", \"discard_dirty\": \"yes\"", "cache.discard_dirty" },
		{ "", "write-back", ", \"discard_dirty\": 1", "cache.discard_dirty" },
		/* A log that does not fit the device: found when it is formatted. */
		{ "", "write-back", ", \"log_size\": \"64M\"", "log_size" },
	};
	char store[320], cfg[320], sock[320], cache[320], text[4096], why[512], *out;

	th_mkdtemp(tdir, sizeof(tdir));
	make_store("disk.img", 4 * MiB, SEED_STORE, store, sizeof(store));
	th_fmt(cfg, sizeof(cfg), "%s/bad.json", tdir);
	th_fmt(sock, sizeof(sock), "%s/nbd.sock", tdir);
	th_fmt(cache, sizeof(cache), "%s/cache.img", tdir);
	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		const struct bad_case *c = &cases[i];
		const char *expect[] = { c->key, NULL };

		th_fmt(text, sizeof(text),
		       "{ \"listen\": \"%s\", \"reactors\": 1,"
		       "  \"cache\": { \"path\": \"%s\", \"size\": \"32M\"%s },"
		       "  \"volumes\": { \"d\": { \"backing\": \"%s\","
		       "    \"cache\": { \"mode\": \"%s\"%s } } } }\n",
		       sock, cache, c->cache_more, store, c->mode, c->vol_cache);
		write_text(cfg, text);
		th_fmt(why, sizeof(why), "case %zu (mode %s%s%s)", i, c->mode, c->vol_cache,
		       c->cache_more);
		out = expect_refused(cfg, sock, expect, why);
		free(out);
		if (strncmp(c->key, "volumes.", 8) == 0 || strncmp(c->key, "cache.", 6) == 0)
			cr_assert_eq(access(cache, F_OK), -1,
				     "%s: a config error created the cache file", why);
		unlink(cache);
	}

	/* The same keys with good values: it starts, with the limits asked for. */
	{
		char va[1024], vb[1024];

		th_fmt(cache_path, sizeof(cache_path), "%s", cache);
		set_cache(1, "48M", "16M", ", \"discard_dirty\": false");
		wb_vol(va, sizeof(va), "a", store,
		       ", \"dirty_limit\": \"6M\", \"dirty_high\": \"60%\", \"dirty_low\": \"10%\","
		       " \"dirty_max_age\": 0.5, \"destage_bandwidth\": \"8M\"");
		make_store("b.img", 4 * MiB, SEED_STORE, text, sizeof(text));
		wb_vol(vb, sizeof(vb), "b", text, "");
		th_fmt(agent_vols, sizeof(agent_vols), "{ %s, %s }", va, vb);
		agent_start();
		cr_assert_eq(mg(LOGSIZE), 16 * MiB);
		cr_assert_eq(m(LOGLIMIT, "a"), 6 * MiB);
		cr_assert_eq(m(LOGLIMIT, "b"), 8 * MiB,
			     "default dirty_limit: the log divided by the write-back volumes");
		agent_stop_clean();
	}
}
