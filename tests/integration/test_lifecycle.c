/* SPDX-License-Identifier: MIT */
/*
 * flashtierd's life from the outside: configuration errors (refused before
 * anything is bound or written), the command line, draining on SIGTERM and
 * SIGINT with requests in flight, stale and busy sockets, SIGHUP.
 */
#include <sys/time.h>

#include "flashtier/version.h"
#include "nbd_client.h"

#define MiB (1024 * 1024)

static struct ft_agent agent;
static char tdir[256];
static pid_t kit;
static pid_t extra_pid; /* a second agent or a one-shot run */

static void cleanup(void)
{
	th_kill(&extra_pid);
	th_env_teardown(&agent, &kit, tdir);
}

TestSuite(lifecycle, .fini = cleanup, .timeout = 60);

static char *slurp(const char *path)
{
	FILE *f = fopen(path, "r");
	char *buf;
	size_t n;

	cr_assert_not_null(f, "open %s: %s", path, strerror(errno));
	buf = calloc(1, 1 << 16);
	cr_assert_not_null(buf);
	n = fread(buf, 1, (1 << 16) - 1, f);
	buf[n] = '\0';
	fclose(f);
	return buf;
}

static void write_file(const char *path, const char *text)
{
	FILE *f = fopen(path, "w");

	cr_assert_not_null(f, "create %s: %s", path, strerror(errno));
	fputs(text, f);
	cr_assert_eq(fclose(f), 0);
}

/* Copy @tmpl to @out replacing every "@DIR@" with @dir. */
static void subst_dir(const char *tmpl, const char *dir, char *out, size_t len)
{
	size_t o = 0;

	for (const char *p = tmpl; *p;) {
		if (strncmp(p, "@DIR@", 5) == 0) {
			size_t dl = strlen(dir);

			cr_assert_lt(o + dl, len);
			memcpy(out + o, dir, dl);
			o += dl;
			p += 5;
		} else {
			cr_assert_lt(o + 1, len);
			out[o++] = *p++;
		}
	}
	out[o] = '\0';
}

struct run {
	int status; /* raw waitpid status */
	char *out, *err;
};

/*
 * Run flashtierd with @args (NULL-terminated) in @dir to completion, stdout
 * and stderr captured; fail if it is still running after @timeout_ms (a bad
 * config must not start serving).
 */
static void run_agent(const char *dir, const char *const *args, int timeout_ms, struct run *r)
{
	const char *bin = getenv("AGENT");
	char out_path[320], err_path[320];
	const char *argv[32];
	int n = 0, status = 0;
	double end;

	cr_assert_not_null(bin, "AGENT is not set");
	snprintf(out_path, sizeof(out_path), "%s/run.out", dir);
	snprintf(err_path, sizeof(err_path), "%s/run.err", dir);
	argv[n++] = "flashtierd";
	for (int i = 0; args[i] && n < 31; i++)
		argv[n++] = args[i];
	argv[n] = NULL;
	extra_pid = fork();
	cr_assert_geq(extra_pid, 0);
	if (extra_pid == 0) {
		int fo = open(out_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
		int fe = open(err_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);

		if (fo < 0 || fe < 0 || chdir(dir) < 0)
			_exit(126);
		dup2(fo, 1);
		dup2(fe, 2);
		execv(bin, (char *const *)argv);
		_exit(127);
	}
	end = th_now_ms() + timeout_ms;
	for (;;) {
		pid_t w = waitpid(extra_pid, &status, WNOHANG);

		if (w == extra_pid)
			break;
		if (th_now_ms() > end) {
			th_kill(&extra_pid);
			th_dump_file(err_path);
			cr_assert_fail(
				"flashtierd still running after %d ms (it should have exited)",
				timeout_ms);
		}
		th_sleep_ms(10);
	}
	extra_pid = 0;
	r->status = status;
	r->out = slurp(out_path);
	r->err = slurp(err_path);
	unlink(out_path);
	unlink(err_path);
}

static void run_free(struct run *r)
{
	free(r->out);
	free(r->err);
}

static int exit_code(const struct run *r)
{
	cr_assert(WIFEXITED(r->status), "flashtierd died from signal %d",
		  WIFSIGNALED(r->status) ? WTERMSIG(r->status) : 0);
	return WEXITSTATUS(r->status);
}

/* Any unix socket in @dir? */
static bool dir_has_socket(const char *dir, char *found, size_t len)
{
	char cmd[400];
	FILE *p;
	bool any;

	snprintf(cmd, sizeof(cmd), "find '%s' -type s", dir);
	p = popen(cmd, "r");
	cr_assert_not_null(p);
	any = fgets(found, (int)len, p) != NULL;
	pclose(p);
	return any;
}

/* ---- configuration errors ---- */

struct backing_snapshot {
	char path[320];
	struct stat st;
	char *data;
	size_t len;
};

/* A 1 MiB backing file with known bytes and an old mtime. */
static void make_backing(const char *dir, const char *name, struct backing_snapshot *s)
{
	struct timespec old[2] = { { 946684800, 0 }, { 946684800, 0 } }; /* 2000-01-01 */
	int fd;

	snprintf(s->path, sizeof(s->path), "%s/%s", dir, name);
	s->len = MiB;
	s->data = malloc(s->len);
	cr_assert_not_null(s->data);
	for (size_t i = 0; i < s->len; i++)
		s->data[i] = (char)(i * 7 + 3);
	fd = open(s->path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	cr_assert_geq(fd, 0);
	cr_assert_eq(write(fd, s->data, s->len), (ssize_t)s->len);
	cr_assert_eq(futimens(fd, old), 0);
	close(fd);
	cr_assert_eq(stat(s->path, &s->st), 0);
}

static void assert_backing_untouched(const struct backing_snapshot *s)
{
	struct stat st;
	char *now;
	int fd;

	cr_assert_eq(stat(s->path, &st), 0, "%s vanished", s->path);
	cr_assert_eq(st.st_size, s->st.st_size, "%s changed size", s->path);
	cr_assert(st.st_mtim.tv_sec == s->st.st_mtim.tv_sec &&
			  st.st_mtim.tv_nsec == s->st.st_mtim.tv_nsec,
		  "%s: mtime changed", s->path);
	cr_assert(st.st_ctim.tv_sec == s->st.st_ctim.tv_sec &&
			  st.st_ctim.tv_nsec == s->st.st_ctim.tv_nsec,
		  "%s: ctime changed", s->path);
	now = malloc(s->len);
	cr_assert_not_null(now);
	fd = open(s->path, O_RDONLY);
	cr_assert_geq(fd, 0);
	cr_assert_eq(read(fd, now, s->len), (ssize_t)s->len);
	close(fd);
	cr_assert_arr_eq(now, s->data, s->len, "%s: contents changed", s->path);
	free(now);
}

/*
 * Write @tmpl (with @DIR@) as the config, run flashtierd on it, and check:
 * non-zero exit, every string of @expect in stderr, no socket, backing file
 * untouched. With @check_only, run --check-config instead.
 */
static void expect_bad_config(const char *tmpl, const char *const *expect, bool check_only)
{
	char cfg_path[320], text[4096], sock[320], found[400];
	struct backing_snapshot disk;
	struct run r;
	const char *args[] = { "--config", cfg_path, check_only ? "--check-config" : NULL, NULL };

	th_mkdtemp(tdir, sizeof(tdir));
	make_backing(tdir, "disk.img", &disk);
	snprintf(cfg_path, sizeof(cfg_path), "%s/flashtierd.json", tdir);
	snprintf(sock, sizeof(sock), "%s/nbd.sock", tdir);
	subst_dir(tmpl, tdir, text, sizeof(text));
	write_file(cfg_path, text);

	run_agent(tdir, args, 10000, &r);
	cr_assert_neq(exit_code(&r), 0, "flashtierd accepted:\n%s\nstderr: %s", text, r.err);
	cr_assert(strstr(r.err, cfg_path), "message does not name the file %s: %s", cfg_path,
		  r.err);
	for (int i = 0; expect[i]; i++)
		cr_assert(strstr(r.err, expect[i]), "message lacks '%s': %s", expect[i], r.err);
	cr_assert_eq(access(sock, F_OK), -1, "the socket %s was created", sock);
	cr_assert(!dir_has_socket(tdir, found, sizeof(found)), "a socket was created: %s", found);
	assert_backing_untouched(&disk);
	run_free(&r);
	free(disk.data);
}

Test(lifecycle, bad_config_invalid_json)
{
	const char *expect[] = { "invalid JSON", NULL };

	expect_bad_config("{ \"listen\": \"@DIR@/nbd.sock\",\n"
			  "  \"volumes\": { \"disk0\": { \"backing\": \"@DIR@/disk.img\" } }\n",
			  expect, false);
}

Test(lifecycle, bad_config_trailing_comma)
{
	const char *expect[] = { "invalid JSON", NULL };

	expect_bad_config("{ \"listen\": \"@DIR@/nbd.sock\",\n"
			  "  \"volumes\": { \"disk0\": { \"backing\": \"@DIR@/disk.img\", } } }\n",
			  expect, false);
}

Test(lifecycle, bad_config_unknown_top_level_key)
{
	const char *expect[] = { "listn", "unknown key", NULL };

	expect_bad_config("{ \"listen\": \"@DIR@/nbd.sock\", \"listn\": \"x\",\n"
			  "  \"volumes\": { \"disk0\": { \"backing\": \"@DIR@/disk.img\" } } }\n",
			  expect, false);
}

Test(lifecycle, bad_config_unknown_volume_key)
{
	const char *expect[] = { "volumes.disk0.sizee", "unknown key", NULL };

	expect_bad_config("{ \"listen\": \"@DIR@/nbd.sock\",\n"
			  "  \"volumes\": { \"disk0\": { \"backing\": \"@DIR@/disk.img\",\n"
			  "                            \"sizee\": 5 } } }\n",
			  expect, false);
}

Test(lifecycle, bad_config_duplicate_key)
{
	const char *expect[] = { "duplicate", "listen", NULL };

	expect_bad_config("{ \"listen\": \"@DIR@/nbd.sock\",\n"
			  "  \"listen\": \"@DIR@/other.sock\",\n"
			  "  \"volumes\": { \"disk0\": { \"backing\": \"@DIR@/disk.img\" } } }\n",
			  expect, false);
}

Test(lifecycle, bad_config_duplicate_volume)
{
	const char *expect[] = { "duplicate", "disk0", NULL };

	expect_bad_config("{ \"listen\": \"@DIR@/nbd.sock\",\n"
			  "  \"volumes\": { \"disk0\": { \"backing\": \"@DIR@/disk.img\" },\n"
			  "                 \"disk0\": { \"backing\": \"@DIR@/disk.img\" } } }\n",
			  expect, false);
}

Test(lifecycle, bad_config_missing_backing_file)
{
	const char *expect[] = { "volumes.disk1.backing", "missing.img",
				 "No such file or directory", NULL };

	/* disk0 is valid and listed first: it must not be opened either. */
	expect_bad_config(
		"{ \"listen\": \"@DIR@/nbd.sock\",\n"
		"  \"volumes\": { \"disk0\": { \"backing\": \"@DIR@/disk.img\" },\n"
		"                 \"disk1\": { \"backing\": \"@DIR@/missing.img\" } } }\n",
		expect, false);
}

Test(lifecycle, bad_config_unsupported_uri)
{
	const char *expect[] = { "volumes.disk1.backing", "unsupported URI",
				 "http://example.com/disk.img", NULL };

	expect_bad_config("{ \"listen\": \"@DIR@/nbd.sock\",\n"
			  "  \"volumes\": { \"disk0\": { \"backing\": \"@DIR@/disk.img\" },\n"
			  "    \"disk1\": { \"backing\": \"http://example.com/disk.img\" } } }\n",
			  expect, false);
}

Test(lifecycle, bad_config_wrong_type)
{
	const char *expect[] = { "volumes.disk0.readonly", "true or false", NULL };

	expect_bad_config("{ \"listen\": \"@DIR@/nbd.sock\",\n"
			  "  \"volumes\": { \"disk0\": { \"backing\": \"@DIR@/disk.img\",\n"
			  "                            \"readonly\": \"yes\" } } }\n",
			  expect, false);
}

Test(lifecycle, bad_config_missing_file)
{
	char cfg_path[320];
	struct run r;
	const char *args[] = { "--config", cfg_path, NULL };

	th_mkdtemp(tdir, sizeof(tdir));
	snprintf(cfg_path, sizeof(cfg_path), "%s/nonexistent.json", tdir);
	run_agent(tdir, args, 10000, &r);
	cr_assert_neq(exit_code(&r), 0);
	cr_assert(strstr(r.err, cfg_path) && strstr(r.err, "No such file"), "%s", r.err);
	run_free(&r);
}

Test(lifecycle, check_config_rejects_bad_config)
{
	const char *expect[] = { "volumes.disk0.bogus", "unknown key", NULL };

	expect_bad_config("{ \"listen\": \"@DIR@/nbd.sock\",\n"
			  "  \"volumes\": { \"disk0\": { \"backing\": \"@DIR@/disk.img\",\n"
			  "                            \"bogus\": true } } }\n",
			  expect, true);
}

Test(lifecycle, check_config_ok)
{
	char cfg_path[320], text[2048], sock[320], found[400];
	struct backing_snapshot disk;
	struct run r;
	const char *args[] = { "--config", cfg_path, "--check-config", NULL };

	th_mkdtemp(tdir, sizeof(tdir));
	make_backing(tdir, "disk.img", &disk);
	snprintf(cfg_path, sizeof(cfg_path), "%s/flashtierd.json", tdir);
	snprintf(sock, sizeof(sock), "%s/nbd.sock", tdir);
	subst_dir(
		"{ \"listen\": \"@DIR@/nbd.sock\", \"metrics\": \"127.0.0.1:9\",\n"
		"  \"reactors\": 1, \"log_level\": \"warn\",\n"
		"  \"volumes\": { \"disk0\": { \"backing\": \"@DIR@/disk.img\", \"domain\": \"vm\" },\n"
		"                 \"ro\": { \"backing\": \"@DIR@/disk.img\", \"readonly\": true },\n"
		"                 \"remote\": { \"backing\": \"nbd+unix:///x?socket=/nonexistent\" } } }\n",
		tdir, text, sizeof(text));
	write_file(cfg_path, text);
	run_agent(tdir, args, 10000, &r);
	cr_assert_eq(exit_code(&r), 0, "--check-config failed: %s", r.err);
	cr_assert(strstr(r.out, "OK"), "no OK in: %s", r.out);
	cr_assert(strstr(r.out, cfg_path), "does not name the file: %s", r.out);
	cr_assert(strstr(r.out, "3 volumes"), "volume count missing: %s", r.out);
	cr_assert_eq(access(sock, F_OK), -1, "--check-config created the socket");
	cr_assert(!dir_has_socket(tdir, found, sizeof(found)), "a socket was created: %s", found);
	assert_backing_untouched(&disk);
	run_free(&r);
	free(disk.data);
}

/* ---- command line ---- */

static void expect_usage_error(const char *const *args, const char *expect)
{
	struct run r;

	th_mkdtemp(tdir, sizeof(tdir));
	run_agent(tdir, args, 10000, &r);
	cr_assert_eq(exit_code(&r), 2, "exit %d for bad usage; stderr: %s", exit_code(&r), r.err);
	cr_assert(strstr(r.err, expect), "stderr lacks '%s': %s", expect, r.err);
	cr_assert(strstr(r.err, "Usage"), "no usage text: %s", r.err);
	run_free(&r);
	/* Nothing was created (the built-in config's ./var stays absent). */
	{
		char var[320];

		snprintf(var, sizeof(var), "%s/var", tdir);
		cr_assert_eq(access(var, F_OK), -1, "bad usage still created %s", var);
	}
}

Test(lifecycle, unknown_option_exits_2)
{
	const char *args[] = { "--bogus-option", NULL };

	expect_usage_error(args, "bogus-option");
}

Test(lifecycle, unknown_short_option_exits_2)
{
	const char *args[] = { "-Z", NULL };

	expect_usage_error(args, "Z");
}

Test(lifecycle, stray_argument_exits_2)
{
	const char *args[] = { "--check-config", "stray", NULL };

	expect_usage_error(args, "stray");
}

Test(lifecycle, bad_log_level_exits_2)
{
	const char *args[] = { "--log-level", "loud", NULL };
	struct run r;

	th_mkdtemp(tdir, sizeof(tdir));
	run_agent(tdir, args, 10000, &r);
	cr_assert_eq(exit_code(&r), 2, "stderr: %s", r.err);
	cr_assert(strstr(r.err, "loud"), "%s", r.err);
	run_free(&r);
}

Test(lifecycle, version)
{
	const char *args[] = { "--version", NULL };
	const char *args_short[] = { "-V", NULL };
	char want[64];
	struct run r;

	th_mkdtemp(tdir, sizeof(tdir));
	snprintf(want, sizeof(want), "flashtierd %s\n", FLASHTIER_VERSION);
	run_agent(tdir, args, 10000, &r);
	cr_assert_eq(exit_code(&r), 0);
	cr_assert_str_eq(r.out, want);
	cr_assert_str_eq(r.err, "");
	run_free(&r);
	run_agent(tdir, args_short, 10000, &r);
	cr_assert_eq(exit_code(&r), 0);
	cr_assert_str_eq(r.out, want);
	run_free(&r);
}

Test(lifecycle, help)
{
	const char *args[] = { "--help", NULL };
	struct run r;

	th_mkdtemp(tdir, sizeof(tdir));
	run_agent(tdir, args, 10000, &r);
	cr_assert_eq(exit_code(&r), 0);
	cr_assert(strstr(r.out, "Usage") && strstr(r.out, "--check-config"), "%s", r.out);
	run_free(&r);
}

/* ---- signals with requests in flight ---- */

/* Wait for the agent to exit by itself (no signal sent); returns the exit code. */
static int wait_exit(struct ft_agent *a, int timeout_ms)
{
	double end = th_now_ms() + timeout_ms;
	int status = 0;

	for (;;) {
		pid_t w = waitpid(a->pid, &status, WNOHANG);

		if (w == a->pid)
			break;
		if (th_now_ms() > end) {
			th_dump_file(a->log);
			cr_assert_fail("flashtierd did not exit within %d ms", timeout_ms);
		}
		th_sleep_ms(10);
	}
	a->pid = 0;
	if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
		th_dump_file(a->log);
	cr_assert(WIFEXITED(status), "flashtierd killed by signal %d",
		  WIFSIGNALED(status) ? WTERMSIG(status) : 0);
	return WEXITSTATUS(status);
}

/*
 * Reads and writes that take 1 s at the store are in flight when @sig
 * arrives: every one completes successfully (reads with the right data),
 * then the agent exits 0 and removes its socket, and the writes are in the
 * store afterwards.
 */
static void drain_on_signal(int sig)
{
	enum { N = 6, LEN = 65536 };
	const char *name = sig == SIGTERM ? "SIGTERM" : "SIGINT";
	char kit_sock[320], vols[700], *bufs[2 * N], *want;
	int64_t cookies[2 * N];
	struct nbd_handle *h;
	double t_sig, end;

	th_mkdtemp(tdir, sizeof(tdir));
	{
		const char *args[] = { "--filter=delay", "memory",	  "64M",
				       "rdelay=1000ms",	 "wdelay=1000ms", NULL };

		kit = th_nbdkit_start(tdir, "slow", kit_sock, sizeof(kit_sock), args);
	}
	snprintf(vols, sizeof(vols),
		 "{ \"slow\": { \"backing\": \"nbd+unix:///?socket=%s\", \"domain\": \"vm-s\" } }",
		 kit_sock);
	ft_agent_start_in(&agent, tdir, vols, "");
	h = th_nbd_connect(&agent, "slow");

	/* Data to read back: written first (all at once; each write takes 1 s). */
	for (int i = 0; i < 2 * N; i++) {
		bufs[i] = malloc(LEN);
		cr_assert_not_null(bufs[i]);
	}
	for (int i = 0; i < N; i++) {
		th_fill(bufs[i], LEN, (uint64_t)i * MiB, (unsigned)i);
		cookies[i] =
			nbd_aio_pwrite(h, bufs[i], LEN, (uint64_t)i * MiB, NBD_NULL_COMPLETION, 0);
		cr_assert_gt(cookies[i], 0, "%s", nbd_get_error());
	}
	th_nbd_wait_idle(h, 10000, "setup writes did not finish");
	for (int i = 0; i < N; i++)
		cr_assert_eq(nbd_aio_command_completed(h, (uint64_t)cookies[i]), 1, "%s",
			     nbd_get_error());

	/* N reads of that data and N new writes, all in flight together. */
	for (int i = 0; i < N; i++) {
		memset(bufs[i], 0, LEN);
		cookies[i] =
			nbd_aio_pread(h, bufs[i], LEN, (uint64_t)i * MiB, NBD_NULL_COMPLETION, 0);
		cr_assert_gt(cookies[i], 0, "%s", nbd_get_error());
		th_fill(bufs[N + i], LEN, (uint64_t)i * MiB + MiB / 2, 100 + (unsigned)i);
		cookies[N + i] = nbd_aio_pwrite(h, bufs[N + i], LEN, (uint64_t)i * MiB + MiB / 2,
						NBD_NULL_COMPLETION, 0);
		cr_assert_gt(cookies[N + i], 0, "%s", nbd_get_error());
	}
	th_nbd_send_queued(h);
	/* All of them reached the agent and are waiting on the store. */
	end = th_now_ms() + 900;
	while (th_agent_metric(&agent,
			       "flashtier_requests_in_flight{volume=\"slow\",domain=\"vm-s\"}") !=
	       2 * N) {
		cr_assert_lt(th_now_ms(), end,
			     "the requests never were all in flight at the agent");
		th_sleep_ms(5);
	}

	t_sig = th_now_ms();
	cr_assert_eq(kill(agent.pid, sig), 0);

	/* Every request completes, successfully. */
	end = th_now_ms() + 15000;
	while (nbd_aio_in_flight(h) > 0) {
		cr_assert_lt(th_now_ms(), end, "requests still pending %.0f ms after %s",
			     th_now_ms() - t_sig, name);
		if (nbd_poll(h, 100) < 0)
			break; /* connection ended; the loop below says how the requests fared */
	}
	want = malloc(LEN);
	cr_assert_not_null(want);
	for (int i = 0; i < 2 * N; i++) {
		int rc = nbd_aio_command_completed(h, (uint64_t)cookies[i]);

		cr_assert_eq(rc, 1, "%s %d in flight at %s: %s (completed=%d)",
			     i < N ? "read" : "write", i % N, name, nbd_get_error(), rc);
		if (i < N) {
			th_fill(want, LEN, (uint64_t)i * MiB, (unsigned)i);
			cr_assert_arr_eq(bufs[i], want, LEN, "read %d returned wrong data", i);
		}
	}
	th_nbd_close(h);

	cr_assert_eq(wait_exit(&agent, 15000), 0, "flashtierd did not exit 0 after %s", name);
	cr_assert_eq(access(agent.sock, F_OK), -1, "flashtierd left its socket %s behind",
		     agent.sock);
	{
		char *log = slurp(agent.log);

		cr_assert(strstr(log, name), "log: %s", log);
		cr_assert(strstr(log, "stopped cleanly"), "log: %s", log);
		free(log);
	}

	/* The drained writes are in the store (read straight from nbdkit). */
	h = th_nbd_new();
	cr_assert_eq(nbd_connect_unix(h, kit_sock), 0, "%s", nbd_get_error());
	for (int i = 0; i < N; i++) {
		memset(bufs[i], 0, LEN);
		cookies[i] = nbd_aio_pread(h, bufs[i], LEN, (uint64_t)i * MiB + MiB / 2,
					   NBD_NULL_COMPLETION, 0);
		cr_assert_gt(cookies[i], 0, "%s", nbd_get_error());
	}
	th_nbd_wait_idle(h, 10000, "reads from nbdkit did not finish");
	for (int i = 0; i < N; i++) {
		cr_assert_eq(nbd_aio_command_completed(h, (uint64_t)cookies[i]), 1, "%s",
			     nbd_get_error());
		cr_assert_arr_eq(bufs[i], bufs[N + i], LEN,
				 "write %d drained at %s is not in the store", i, name);
	}
	th_nbd_close(h);
	for (int i = 0; i < 2 * N; i++)
		free(bufs[i]);
	free(want);
}

Test(lifecycle, sigterm_drains_in_flight_requests)
{
	drain_on_signal(SIGTERM);
}

Test(lifecycle, sigint_drains_in_flight_requests)
{
	drain_on_signal(SIGINT);
}

/* After SIGTERM while a client is connected and idle, the agent still exits promptly. */
Test(lifecycle, sigterm_with_idle_client)
{
	char disk[320], vols[700];
	struct nbd_handle *h;
	char buf[4096];

	th_mkdtemp(tdir, sizeof(tdir));
	th_make_file(tdir, "disk.img", 16 * MiB, disk, sizeof(disk));
	snprintf(vols, sizeof(vols), "{ \"disk0\": { \"backing\": \"%s\" } }", disk);
	ft_agent_start_in(&agent, tdir, vols, "");
	h = th_nbd_connect(&agent, "disk0");
	cr_assert_eq(nbd_pread(h, buf, sizeof(buf), 0, 0), 0, "%s", nbd_get_error());
	cr_assert_eq(kill(agent.pid, SIGTERM), 0);
	cr_assert_eq(wait_exit(&agent, 5000), 0);
	cr_assert_eq(access(agent.sock, F_OK), -1, "socket left behind");
	th_nbd_close(h);
}

/* ---- sockets ---- */

static void io_roundtrip(const char *export, unsigned seed)
{
	struct nbd_handle *h = th_nbd_connect(&agent, export);
	char w[8192], r[8192];

	th_fill(w, sizeof(w), 4096 * seed, seed);
	cr_assert_eq(nbd_pwrite(h, w, sizeof(w), 4096 * seed, 0), 0, "%s", nbd_get_error());
	cr_assert_eq(nbd_pread(h, r, sizeof(r), 4096 * seed, 0), 0, "%s", nbd_get_error());
	cr_assert_arr_eq(w, r, sizeof(w));
	th_nbd_disconnect(h);
}

/* Start an agent on @vols in tdir, serve a little, kill -9 it and reap it. */
static void start_and_kill9(const char *vols)
{
	struct stat st;
	int status;

	ft_agent_start_in(&agent, tdir, vols, "");
	io_roundtrip("disk0", 1);
	cr_assert_eq(kill(agent.pid, SIGKILL), 0);
	cr_assert_eq(waitpid(agent.pid, &status, 0), agent.pid);
	cr_assert(WIFSIGNALED(status));
	agent.pid = 0;
	cr_assert_eq(lstat(agent.sock, &st), 0, "no stale socket left by kill -9");
	cr_assert(S_ISSOCK(st.st_mode));
}

/*
 * The restarted agent must come up and serve: poll until a client completes
 * a handshake with it (a connection may still land on the dead agent's
 * socket for a moment), failing at once if the new agent exits.
 */
static void expect_restart_serves(void)
{
	double end;

	agent.pid = fork();
	cr_assert_geq(agent.pid, 0);
	if (agent.pid == 0) {
		int fd = open(agent.log, O_WRONLY | O_CREAT | O_APPEND, 0644);

		if (fd >= 0) {
			dup2(fd, 2);
			dup2(fd, 1);
		}
		execl(getenv("AGENT"), "flashtierd", "--config", agent.config, "--log-level",
		      "debug", (char *)NULL);
		_exit(127);
	}
	end = th_now_ms() + 10000;
	for (;;) {
		struct nbd_handle *h;

		if (!ft_agent_alive(&agent)) {
			agent.pid = 0;
			th_dump_file(agent.log);
			cr_assert_fail("the restarted flashtierd exited instead of replacing the "
				       "stale socket (log above)");
		}
		h = th_nbd_new();
		nbd_set_export_name(h, "disk0");
		if (nbd_connect_unix(h, agent.sock) == 0) {
			th_nbd_close(h);
			break;
		}
		th_nbd_close(h);
		cr_assert_lt(th_now_ms(), end, "the restarted flashtierd never served");
		th_sleep_ms(20);
	}
	io_roundtrip("disk0", 2);
	cr_assert_eq(ft_agent_stop(&agent), 0);
	cr_assert_eq(access(agent.sock, F_OK), -1, "socket left behind");
}

/* The usual case: the dead agent's socket file is left over and refuses connections. */
Test(lifecycle, stale_socket_is_replaced)
{
	char disk[320], vols[700];
	double end;
	int fd;

	th_mkdtemp(tdir, sizeof(tdir));
	th_make_file(tdir, "disk.img", 16 * MiB, disk, sizeof(disk));
	snprintf(vols, sizeof(vols), "{ \"disk0\": { \"backing\": \"%s\" } }", disk);
	start_and_kill9(vols);
	/* The kernel may keep the dead agent's listener for a moment (io_uring teardown). */
	end = th_now_ms() + 5000;
	while ((fd = th_unix_connect(agent.sock)) >= 0) {
		close(fd);
		cr_assert_lt(th_now_ms(), end, "the dead agent's socket still accepts after 5 s");
		th_sleep_ms(5);
	}
	cr_assert_eq(access(agent.sock, F_OK), 0, "stale socket file vanished");
	expect_restart_serves();
}

/*
 * Restart right after the dead agent was reaped (what "kill -9; wait;
 * flashtierd" or a supervisor does): the agent must still replace the
 * socket, not mistake the dead agent's lingering listener (the kernel tears
 * down its io_uring, which holds the listening socket, a few ms after the
 * process is gone) for a running server. The window is short, so the cycle
 * runs several times.
 */
Test(lifecycle, restart_immediately_after_kill9)
{
	char disk[320], vols[700];

	th_mkdtemp(tdir, sizeof(tdir));
	th_make_file(tdir, "disk.img", 16 * MiB, disk, sizeof(disk));
	snprintf(vols, sizeof(vols), "{ \"disk0\": { \"backing\": \"%s\" } }", disk);
	for (int round = 0; round < 10; round++) {
		start_and_kill9(vols);
		expect_restart_serves();
	}
}

Test(lifecycle, second_agent_on_same_socket_fails)
{
	char disk[320], vols[700], cfg2[320], text[1400];
	struct run r;
	const char *args[] = { "--config", cfg2, NULL };

	th_mkdtemp(tdir, sizeof(tdir));
	th_make_file(tdir, "disk.img", 16 * MiB, disk, sizeof(disk));
	snprintf(vols, sizeof(vols), "{ \"disk0\": { \"backing\": \"%s\" } }", disk);
	ft_agent_start_in(&agent, tdir, vols, "");
	io_roundtrip("disk0", 1);

	/* Same socket, its own metrics port. */
	snprintf(cfg2, sizeof(cfg2), "%s/second.json", tdir);
	snprintf(text, sizeof(text),
		 "{ \"listen\": \"%s\", \"metrics\": \"127.0.0.1:%d\", \"volumes\": %s }\n",
		 agent.sock, th_free_port(), vols);
	write_file(cfg2, text);
	run_agent(tdir, args, 10000, &r);
	cr_assert_neq(exit_code(&r), 0, "a second agent started on a busy socket: %s", r.err);
	cr_assert(strstr(r.err, agent.sock), "message does not name the socket: %s", r.err);
	cr_assert(strstr(r.err, "in use"), "message does not say it is in use: %s", r.err);
	run_free(&r);

	/* The first one is unharmed: socket in place, serving, clean exit. */
	cr_assert(ft_agent_alive(&agent));
	cr_assert_eq(access(agent.sock, F_OK), 0, "the second agent removed the socket");
	io_roundtrip("disk0", 2);
	cr_assert_eq(ft_agent_stop(&agent), 0);
	cr_assert_eq(access(agent.sock, F_OK), -1, "socket left behind");
}

Test(lifecycle, listen_path_that_is_not_a_socket_is_kept)
{
	char disk[320], cfg[320], sock[320], text[1400];
	struct run r;
	const char *args[] = { "--config", cfg, NULL };
	char *after;

	th_mkdtemp(tdir, sizeof(tdir));
	th_make_file(tdir, "disk.img", 16 * MiB, disk, sizeof(disk));
	snprintf(sock, sizeof(sock), "%s/nbd.sock", tdir);
	write_file(sock, "not a socket\n");
	snprintf(cfg, sizeof(cfg), "%s/flashtierd.json", tdir);
	snprintf(text, sizeof(text),
		 "{ \"listen\": \"%s\", \"volumes\": { \"disk0\": { \"backing\": \"%s\" } } }\n",
		 sock, disk);
	write_file(cfg, text);
	run_agent(tdir, args, 10000, &r);
	cr_assert_neq(exit_code(&r), 0, "started on top of a regular file");
	cr_assert(strstr(r.err, sock) && strstr(r.err, "not a socket"), "%s", r.err);
	after = slurp(sock);
	cr_assert_str_eq(after, "not a socket\n", "the regular file was changed");
	free(after);
	run_free(&r);
}

Test(lifecycle, sighup_keeps_serving)
{
	char disk[320], vols[700];
	char *log;
	double end;

	th_mkdtemp(tdir, sizeof(tdir));
	th_make_file(tdir, "disk.img", 16 * MiB, disk, sizeof(disk));
	snprintf(vols, sizeof(vols), "{ \"disk0\": { \"backing\": \"%s\" } }", disk);
	ft_agent_start_in(&agent, tdir, vols, "");
	cr_assert_eq(kill(agent.pid, SIGHUP), 0);
	/* The agent logs SIGHUP; wait for that rather than sleeping. */
	end = th_now_ms() + 5000;
	for (;;) {
		log = slurp(agent.log);
		if (strstr(log, "SIGHUP"))
			break;
		free(log);
		cr_assert_lt(th_now_ms(), end, "SIGHUP not acknowledged in the log");
		th_sleep_ms(10);
	}
	free(log);
	cr_assert(ft_agent_alive(&agent), "SIGHUP killed flashtierd");
	io_roundtrip("disk0", 3);
	cr_assert_eq(ft_agent_stop(&agent), 0);
}
