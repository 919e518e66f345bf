/* SPDX-License-Identifier: MIT */
/*
 * Faulty and slow backing stores behind nbd volumes: errors reach the client
 * as EIO and are counted, one volume's trouble never stalls or breaks
 * another, and the agent survives a backend that dies under it.
 *
 * Every backend is a real nbdkit (memory plugin) with the error or delay
 * filter; the client is libnbd.
 */
#include <pthread.h>

#include "nbd_client.h"

#define MiB (1024 * 1024)

/* What a failed test must not leave running; see cleanup(). */
static struct ft_agent agent;
static char tdir[256];
static pid_t kits[4];
static int n_kits;

static void cleanup(void)
{
	th_nbd_close_all();
	th_agent_kill(&agent);
	for (int i = 0; i < n_kits; i++)
		th_kill(&kits[i]);
	n_kits = 0;
	if (tdir[0])
		th_rm_rf(tdir);
	tdir[0] = '\0';
}

/* nbdkit on tdir/NAME.sock; returns its pid (also remembered for cleanup). */
static pid_t kit_start(const char *name, char *sock, size_t len, const char *const *args)
{
	pid_t pid = th_nbdkit_start(tdir, name, sock, len, args);

	cr_assert_lt(n_kits, 4);
	kits[n_kits++] = pid;
	return pid;
}

static void kit_forget(pid_t pid)
{
	for (int i = 0; i < n_kits; i++)
		if (kits[i] == pid)
			kits[i] = 0;
}

/*
 * Run @h until none of its commands is in flight. Returns 0, -1 on timeout,
 * -2 if the handle failed with commands still outstanding.
 */
static int drain_handle(struct nbd_handle *h, int timeout_ms)
{
	double end = th_now_ms() + timeout_ms;

	while (nbd_aio_in_flight(h) > 0) {
		double left = end - th_now_ms();

		if (left <= 0)
			return -1;
		if (nbd_poll(h, left < 100 ? (int)left + 1 : 100) < 0 && nbd_aio_in_flight(h) > 0)
			return -2;
	}
	return 0;
}

static void touch(const char *path)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);

	cr_assert_geq(fd, 0, "create %s: %s", path, strerror(errno));
	close(fd);
}

/* ---- concurrent workers (no cr_assert off the main thread: results only) ---- */

struct worker {
	const char *export;
	struct nbd_handle *h;
	unsigned rounds;
	uint64_t base;
	bool expect_fail;
	/* results */
	unsigned ok, failed, wrong_errno, bad_data;
	int last_errno;
};

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	char *wbuf = malloc(64 * 1024), *rbuf = malloc(64 * 1024);

	if (!wbuf || !rbuf) {
		w->failed = ~0u;
		free(wbuf);
		free(rbuf);
		return NULL;
	}
	for (unsigned i = 0; i < w->rounds; i++) {
		uint64_t off = w->base + (uint64_t)(i % 64) * 65536;
		size_t len = 4096u << (i % 5); /* 4k .. 64k */
		int rc;

		th_fill(wbuf, len, off, i + 1);
		rc = nbd_pwrite(w->h, wbuf, len, off, 0);
		if (rc < 0) {
			w->failed++;
			w->last_errno = nbd_get_errno();
			if (w->last_errno != EIO)
				w->wrong_errno++;
		} else {
			w->ok++;
		}
		rc = nbd_pread(w->h, rbuf, len, off, 0);
		if (rc < 0) {
			w->failed++;
			w->last_errno = nbd_get_errno();
			if (w->last_errno != EIO)
				w->wrong_errno++;
		} else {
			w->ok++;
			if (!w->expect_fail && memcmp(wbuf, rbuf, len) != 0)
				w->bad_data++;
		}
	}
	free(wbuf);
	free(rbuf);
	return NULL;
}

/* ---- tests ---- */

TestSuite(backend_faults, .fini = cleanup, .timeout = 60);

Test(backend_faults, error_filter_eio_counted_and_recovers)
{
	char bad_sock[320], good_sock[320], inject[320], vols[1400], *text;
	char data[65536], back[65536];
	struct nbd_handle *hb, *hg;
	struct worker wb = { 0 }, wg = { 0 };
	pthread_t tb, tg;
	const unsigned rounds = 40;

	th_mkdtemp(tdir, sizeof(tdir));
	snprintf(inject, sizeof(inject), "%s/inject", tdir);
	{
		char rate[] = "error-rate=100%", file[400];
		const char *bad_args[] = {
			"--filter=error", "memory", "64M", "error=EIO", rate, file, NULL
		};
		const char *good_args[] = { "memory", "64M", NULL };

		snprintf(file, sizeof(file), "error-file=%s", inject);
		kit_start("bad", bad_sock, sizeof(bad_sock), bad_args);
		kit_start("good", good_sock, sizeof(good_sock), good_args);
	}
	snprintf(
		vols, sizeof(vols),
		"{ \"bad\":  { \"backing\": \"nbd+unix:///?socket=%s\", \"domain\": \"vm-bad\" },"
		"  \"good\": { \"backing\": \"nbd+unix:///?socket=%s\", \"domain\": \"vm-good\" } }",
		bad_sock, good_sock);
	ft_agent_start_in(&agent, tdir, vols, "");

	hb = th_nbd_connect(&agent, "bad");
	hg = th_nbd_connect(&agent, "good");

	/* Healthy at first (no trigger file): data goes in and comes back. */
	th_fill(data, sizeof(data), 0, 99);
	cr_assert_eq(nbd_pwrite(hb, data, sizeof(data), 0, 0), 0, "%s", nbd_get_error());
	cr_assert_eq(nbd_pread(hb, back, sizeof(back), 0, 0), 0, "%s", nbd_get_error());
	cr_assert_arr_eq(data, back, sizeof(data));

	/* Errors on: every request to "bad" fails with EIO while "good" keeps serving. */
	touch(inject);
	wb = (struct worker){
		.export = "bad", .h = hb, .rounds = rounds, .base = 8 * MiB, .expect_fail = true
	};
	wg = (struct worker){ .export = "good", .h = hg, .rounds = rounds * 4, .base = 0 };
	cr_assert_eq(pthread_create(&tb, NULL, worker_main, &wb), 0);
	cr_assert_eq(pthread_create(&tg, NULL, worker_main, &wg), 0);
	pthread_join(tb, NULL);
	pthread_join(tg, NULL);

	cr_expect_eq(wb.ok, 0, "bad volume: %u requests succeeded with errors injected", wb.ok);
	cr_expect_eq(wb.failed, 2 * rounds, "bad volume: %u of %u requests failed", wb.failed,
		     2 * rounds);
	cr_expect_eq(wb.wrong_errno, 0, "bad volume: errno %d (%s), not EIO", wb.last_errno,
		     strerror(wb.last_errno));
	cr_expect_eq(wg.failed, 0, "good volume: %u requests failed (errno %d)", wg.failed,
		     wg.last_errno);
	cr_expect_eq(wg.bad_data, 0, "good volume: %u reads returned wrong data", wg.bad_data);
	cr_expect_eq(wg.ok, 2 * 4 * rounds);
	cr_assert(ft_agent_alive(&agent), "flashtierd died");

	/* The failures are counted, per volume and operation. */
	text = th_http_get(agent.metrics_port, "/metrics");
	cr_expect_eq(
		th_metric(
			text,
			"flashtier_request_errors_total{volume=\"bad\",domain=\"vm-bad\",op=\"read\"}"),
		rounds, "%s", text);
	cr_expect_eq(
		th_metric(
			text,
			"flashtier_request_errors_total{volume=\"bad\",domain=\"vm-bad\",op=\"write\"}"),
		rounds);
	cr_expect_eq(
		th_metric(text,
			  "flashtier_requests_total{volume=\"bad\",domain=\"vm-bad\",op=\"read\"}"),
		rounds + 1);
	cr_expect_eq(
		th_metric(
			text,
			"flashtier_request_errors_total{volume=\"good\",domain=\"vm-good\",op=\"read\"}"),
		0);
	cr_expect_eq(
		th_metric(
			text,
			"flashtier_request_errors_total{volume=\"good\",domain=\"vm-good\",op=\"write\"}"),
		0);
	cr_expect_eq(
		th_metric(
			text,
			"flashtier_requests_total{volume=\"good\",domain=\"vm-good\",op=\"read\"}"),
		4 * rounds);
	/* Failed requests move no bytes. */
	cr_expect_eq(
		th_metric(
			text,
			"flashtier_request_bytes_total{volume=\"bad\",domain=\"vm-bad\",op=\"read\"}"),
		sizeof(data));
	cr_expect_eq(
		th_metric(text, "flashtier_requests_in_flight{volume=\"bad\",domain=\"vm-bad\"}"),
		0);
	free(text);

	/* Errors off: the same connection recovers, and the earlier data is intact. */
	cr_assert_eq(unlink(inject), 0);
	cr_assert_eq(nbd_pread(hb, back, sizeof(back), 0, 0), 0, "after recovery: %s",
		     nbd_get_error());
	cr_assert_arr_eq(data, back, sizeof(data));
	th_fill(data, sizeof(data), 1 * MiB, 7);
	cr_assert_eq(nbd_pwrite(hb, data, sizeof(data), 1 * MiB, 0), 0, "%s", nbd_get_error());
	cr_assert_eq(nbd_pread(hb, back, sizeof(back), 1 * MiB, 0), 0, "%s", nbd_get_error());
	cr_assert_arr_eq(data, back, sizeof(data));
	cr_assert_eq(nbd_flush(hb, 0), 0, "%s", nbd_get_error());

	/* On again, off again. */
	touch(inject);
	cr_assert_eq(nbd_pread(hb, back, 4096, 0, 0), -1, "read succeeded with errors injected");
	cr_assert_eq(nbd_get_errno(), EIO, "errno %d", nbd_get_errno());
	cr_assert_eq(nbd_flush(hb, 0), 0, "flush is not an injected operation: %s",
		     nbd_get_error());
	cr_assert_eq(unlink(inject), 0);
	cr_assert_eq(nbd_pread(hb, back, sizeof(back), 1 * MiB, 0), 0, "%s", nbd_get_error());
	cr_assert_arr_eq(data, back, sizeof(data));

	cr_assert_eq(
		th_agent_metric(
			&agent,
			"flashtier_request_errors_total{volume=\"bad\",domain=\"vm-bad\",op=\"read\"}"),
		rounds + 1);

	th_nbd_disconnect(hb);
	th_nbd_disconnect(hg);
	cr_assert(ft_agent_alive(&agent), "flashtierd died");
	cr_assert_eq(ft_agent_stop(&agent), 0, "flashtierd did not exit 0 after SIGTERM");
}

/*
 * A volume whose store answers in 1.5 s must not delay another one, on the
 * same reactor or not: a burst of fast reads and writes completes while the
 * slow requests are still out.
 */
static void slow_volume_isolation(unsigned reactors)
{
	enum { N_SLOW = 8, BURST = 200 };
	const double delay_ms = 1500;
	char slow_sock[320], fast_sock[320], vols[1400], extra[64], prefix[200];
	char *slow_buf[N_SLOW], wbuf[4096], rbuf[4096];
	int64_t cookies[N_SLOW];
	struct nbd_handle *hs, *hf;
	double t_issue, t_burst_start, t_burst_end, t_slow_done;

	th_mkdtemp(tdir, sizeof(tdir));
	{
		const char *slow_args[] = { "--filter=delay", "memory",	       "64M",
					    "rdelay=1500ms",  "wdelay=1500ms", NULL };
		const char *fast_args[] = { "memory", "64M", NULL };

		kit_start("slow", slow_sock, sizeof(slow_sock), slow_args);
		kit_start("fast", fast_sock, sizeof(fast_sock), fast_args);
	}
	snprintf(vols, sizeof(vols),
		 "{ \"slow\": { \"backing\": \"nbd+unix:///?socket=%s\", \"domain\": \"vm-s\" },"
		 "  \"fast\": { \"backing\": \"nbd+unix:///?socket=%s\", \"domain\": \"vm-f\" } }",
		 slow_sock, fast_sock);
	snprintf(extra, sizeof(extra), "\"reactors\": %u,", reactors);
	ft_agent_start_in(&agent, tdir, vols, extra);
	hs = th_nbd_connect(&agent, "slow");
	hf = th_nbd_connect(&agent, "fast");

	/* Half reads, half writes, all on the slow volume, all in flight at once. */
	t_issue = th_now_ms();
	for (int i = 0; i < N_SLOW; i++) {
		slow_buf[i] = malloc(65536);
		cr_assert_not_null(slow_buf[i]);
		th_fill(slow_buf[i], 65536, (uint64_t)i * MiB, 1000 + (unsigned)i);
		if (i % 2)
			cookies[i] = nbd_aio_pwrite(hs, slow_buf[i], 65536, (uint64_t)i * MiB,
						    NBD_NULL_COMPLETION, 0);
		else
			cookies[i] = nbd_aio_pread(hs, slow_buf[i], 65536, (uint64_t)i * MiB,
						   NBD_NULL_COMPLETION, 0);
		cr_assert_gt(cookies[i], 0, "%s", nbd_get_error());
	}
	/* Wait until the agent holds all of them (it counts them as in flight). */
	th_nbd_send_queued(hs);
	snprintf(prefix, sizeof(prefix),
		 "flashtier_requests_in_flight{volume=\"slow\",domain=\"vm-s\"}");
	th_wait_metric(&agent, prefix, N_SLOW, 1000);

	t_burst_start = th_now_ms();
	for (int i = 0; i < BURST; i++) {
		uint64_t off = (uint64_t)(i % 128) * 4096;

		if (i % 4 == 0) {
			th_fill(wbuf, sizeof(wbuf), off, (unsigned)i);
			cr_assert_eq(nbd_pwrite(hf, wbuf, sizeof(wbuf), off, 0), 0, "%s",
				     nbd_get_error());
			cr_assert_eq(nbd_pread(hf, rbuf, sizeof(rbuf), off, 0), 0, "%s",
				     nbd_get_error());
			cr_assert_arr_eq(wbuf, rbuf, sizeof(wbuf));
		} else {
			cr_assert_eq(nbd_pread(hf, rbuf, sizeof(rbuf), off, 0), 0, "%s",
				     nbd_get_error());
		}
	}
	t_burst_end = th_now_ms();

	/* None of the slow requests may have finished yet... */
	cr_assert_geq(nbd_poll(hs, 0), 0, "%s", nbd_get_error());
	cr_assert_eq(nbd_aio_in_flight(hs), N_SLOW,
		     "slow requests finished during the fast burst (%.0f ms after issue)",
		     th_now_ms() - t_issue);
	/* ...and the burst must not have waited for them. */
	cr_assert_lt(t_burst_end - t_issue, delay_ms * 0.6,
		     "fast burst of %d requests ended %.0f ms after the slow ones were issued "
		     "(burst itself: %.0f ms); slow store delay is %.0f ms",
		     BURST, t_burst_end - t_issue, t_burst_end - t_burst_start, delay_ms);

	cr_assert_eq(drain_handle(hs, 10000), 0, "slow requests did not finish: %s",
		     nbd_get_error());
	t_slow_done = th_now_ms();
	/* Sanity: the slow store really was slow, so the comparison above meant something. */
	cr_assert_geq(t_slow_done - t_issue, delay_ms * 0.9, "slow requests took only %.0f ms",
		      t_slow_done - t_issue);
	for (int i = 0; i < N_SLOW; i++) {
		cr_assert_eq(nbd_aio_command_completed(hs, (uint64_t)cookies[i]), 1,
			     "slow request %d: %s", i, nbd_get_error());
		if (i % 2 == 0) {
			/* memory plugin starts zeroed and these ranges were never written before */
			static const char zero[65536];

			cr_assert_arr_eq(slow_buf[i], zero, 65536, "slow read %d: wrong data", i);
		}
	}
	/* The slow writes landed. */
	for (int i = 1; i < N_SLOW; i += 2) {
		char *chk = malloc(65536);

		cr_assert_not_null(chk);
		cr_assert_eq(nbd_pread(hs, chk, 65536, (uint64_t)i * MiB, 0), 0, "%s",
			     nbd_get_error());
		th_fill(slow_buf[i], 65536, (uint64_t)i * MiB, 1000 + (unsigned)i);
		cr_assert_arr_eq(chk, slow_buf[i], 65536, "slow write %d not stored", i);
		free(chk);
	}
	for (int i = 0; i < N_SLOW; i++)
		free(slow_buf[i]);
	th_wait_metric(&agent, prefix, 0, 1000);
	th_nbd_disconnect(hs);
	th_nbd_disconnect(hf);
	cr_assert_eq(ft_agent_stop(&agent), 0, "flashtierd did not exit 0 after SIGTERM");
}

Test(backend_faults, slow_volume_does_not_stall_other_same_reactor)
{
	slow_volume_isolation(1);
}

Test(backend_faults, slow_volume_does_not_stall_other_two_reactors)
{
	slow_volume_isolation(2);
}

/*
 * The store of one volume is killed with requests in flight: those requests
 * and later ones fail promptly with an error (no hang), the client stays
 * connected, the other volume keeps working, and the agent still exits 0.
 */
Test(backend_faults, backend_killed_fails_io_not_agent)
{
	enum { N_PENDING = 4 };
	char victim_sock[320], other_sock[320], vols[1400], prefix[200];
	char *bufs[N_PENDING], data[65536], back[65536];
	int64_t cookies[N_PENDING], c;
	struct nbd_handle *hv, *ho;
	pid_t victim;
	double t0;
	int rc;

	th_mkdtemp(tdir, sizeof(tdir));
	{
		/* Reads take 2 s, so they are surely in flight when the store dies. */
		const char *victim_args[] = { "--filter=delay", "memory", "64M", "rdelay=2000ms",
					      NULL };
		const char *other_args[] = { "memory", "64M", NULL };

		victim = kit_start("victim", victim_sock, sizeof(victim_sock), victim_args);
		kit_start("other", other_sock, sizeof(other_sock), other_args);
	}
	snprintf(
		vols, sizeof(vols),
		"{ \"victim\": { \"backing\": \"nbd+unix:///?socket=%s\", \"domain\": \"vm-v\" },"
		"  \"other\":  { \"backing\": \"nbd+unix:///?socket=%s\", \"domain\": \"vm-o\" } }",
		victim_sock, other_sock);
	ft_agent_start_in(&agent, tdir, vols, "\"reactors\": 1,");
	hv = th_nbd_connect(&agent, "victim");
	ho = th_nbd_connect(&agent, "other");

	th_fill(data, sizeof(data), 0, 5);
	cr_assert_eq(nbd_pwrite(hv, data, sizeof(data), 0, 0), 0, "%s", nbd_get_error());
	cr_assert_eq(nbd_pwrite(ho, data, sizeof(data), 0, 0), 0, "%s", nbd_get_error());

	for (int i = 0; i < N_PENDING; i++) {
		bufs[i] = malloc(65536);
		cr_assert_not_null(bufs[i]);
		cookies[i] = nbd_aio_pread(hv, bufs[i], 65536, (uint64_t)i * 65536,
					   NBD_NULL_COMPLETION, 0);
		cr_assert_gt(cookies[i], 0, "%s", nbd_get_error());
	}
	th_nbd_send_queued(hv);
	snprintf(prefix, sizeof(prefix),
		 "flashtier_requests_in_flight{volume=\"victim\",domain=\"vm-v\"}");
	th_wait_metric(&agent, prefix, N_PENDING, 1500);

	/* The backing store dies. */
	cr_assert_eq(kill(victim, SIGKILL), 0);
	waitpid(victim, NULL, 0);
	kit_forget(victim);

	/* The pending reads fail, promptly, and the client connection survives. */
	t0 = th_now_ms();
	rc = drain_handle(hv, 10000);
	cr_assert_eq(rc, 0, "pending reads on the dead store %s after %.0f ms: %s",
		     rc == -1 ? "still hang" : "broke the client connection", th_now_ms() - t0,
		     nbd_get_error());
	for (int i = 0; i < N_PENDING; i++) {
		rc = nbd_aio_command_completed(hv, (uint64_t)cookies[i]);
		cr_assert_eq(rc, -1, "read %d on a dead store succeeded", i);
		cr_assert(nbd_get_errno() == EIO || nbd_get_errno() == ESHUTDOWN,
			  "read %d: errno %d (%s)", i, nbd_get_errno(), nbd_get_error());
		free(bufs[i]);
	}
	cr_assert(nbd_aio_is_ready(hv), "client connection to the agent is gone");

	/* New requests fail too, without hanging. */
	c = nbd_aio_pread(hv, back, 4096, 0, NBD_NULL_COMPLETION, 0);
	cr_assert_gt(c, 0, "%s", nbd_get_error());
	cr_assert_eq(drain_handle(hv, 10000), 0, "read on a dead store hangs");
	cr_assert_eq(nbd_aio_command_completed(hv, (uint64_t)c), -1,
		     "read on a dead store succeeded");
	cr_assert_eq(nbd_get_errno(), EIO, "errno %d (%s)", nbd_get_errno(), nbd_get_error());
	c = nbd_aio_pwrite(hv, data, 4096, 0, NBD_NULL_COMPLETION, 0);
	cr_assert_gt(c, 0, "%s", nbd_get_error());
	cr_assert_eq(drain_handle(hv, 10000), 0, "write on a dead store hangs");
	cr_assert_eq(nbd_aio_command_completed(hv, (uint64_t)c), -1,
		     "write on a dead store succeeded");
	cr_assert_eq(nbd_get_errno(), EIO, "errno %d (%s)", nbd_get_errno(), nbd_get_error());
	c = nbd_aio_flush(hv, NBD_NULL_COMPLETION, 0);
	cr_assert_gt(c, 0, "%s", nbd_get_error());
	cr_assert_eq(drain_handle(hv, 10000), 0, "flush on a dead store hangs");
	cr_assert_eq(nbd_aio_command_completed(hv, (uint64_t)c), -1,
		     "flush on a dead store succeeded");

	/* The other volume, on the same reactor, is fine. */
	cr_assert_eq(nbd_pread(ho, back, sizeof(back), 0, 0), 0, "%s", nbd_get_error());
	cr_assert_arr_eq(data, back, sizeof(data));
	th_fill(data, sizeof(data), 65536, 6);
	cr_assert_eq(nbd_pwrite(ho, data, sizeof(data), 65536, 0), 0, "%s", nbd_get_error());
	cr_assert_eq(nbd_pread(ho, back, sizeof(back), 65536, 0), 0, "%s", nbd_get_error());
	cr_assert_arr_eq(data, back, sizeof(data));
	cr_assert_eq(nbd_flush(ho, 0), 0, "%s", nbd_get_error());
	{
		/* A fresh client connection to the other volume works as well. */
		struct nbd_handle *h2 = th_nbd_connect(&agent, "other");

		cr_assert_eq(nbd_pread(h2, back, sizeof(back), 65536, 0), 0, "%s", nbd_get_error());
		cr_assert_arr_eq(data, back, sizeof(data));
		th_nbd_disconnect(h2);
	}

	cr_assert(ft_agent_alive(&agent), "flashtierd died with its backing store");
	cr_assert_geq(
		th_agent_metric(
			&agent,
			"flashtier_request_errors_total{volume=\"victim\",domain=\"vm-v\",op=\"read\"}"),
		N_PENDING + 1);
	cr_assert_eq(
		th_agent_metric(
			&agent,
			"flashtier_request_errors_total{volume=\"other\",domain=\"vm-o\",op=\"read\"}"),
		0);
	th_wait_metric(&agent, prefix, 0, 1000);
	th_nbd_disconnect(hv);
	th_nbd_disconnect(ho);
	cr_assert_eq(ft_agent_stop(&agent), 0, "flashtierd did not exit 0 after SIGTERM");
}
