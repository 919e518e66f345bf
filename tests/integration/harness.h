/* SPDX-License-Identifier: MIT */
/*
 * Test harness for integration tests: runs the real flashtierd binary (path
 * in $AGENT) and real nbdkit servers in a private temporary directory.
 *
 * Every helper asserts on failure (Criterion cr_assert), so a test that
 * cannot set up fails loudly instead of passing vacuously. The NBD client
 * side (libnbd handles, raw protocol pieces) is in nbd_client.h.
 */
#ifndef FLASHTIER_TEST_HARNESS_H
#define FLASHTIER_TEST_HARNESS_H

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/prctl.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct ft_agent {
	pid_t pid;
	char dir[256];    /* private temp dir, removed by ft_agent_cleanup() */
	char sock[320];   /* NBD unix socket */
	char config[320]; /* config file written for this run */
	char log[320];    /* agent stderr */
	int metrics_port;
};

/* Sleep for @ms milliseconds. */
static inline void th_sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

/* Milliseconds on the monotonic clock, for deadlines. */
static inline double th_now_ms(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* snprintf() into @out that asserts the result fit: no silently truncated path. */
static inline __attribute__((format(printf, 3, 4))) void th_fmt(char *out, size_t len,
								const char *fmt, ...)
{
	va_list ap;
	int n;

	va_start(ap, fmt);
	n = vsnprintf(out, len, fmt, ap);
	va_end(ap);
	cr_assert(n >= 0 && (size_t)n < len, "'%s...' needs %d bytes, has %zu", out, n + 1, len);
}

/* A private directory for one test. */
static inline void th_mkdtemp(char *out, size_t len)
{
	th_fmt(out, len, "/tmp/ft-test.XXXXXX");
	cr_assert_not_null(mkdtemp(out), "mkdtemp: %s", strerror(errno));
}

/* Read @len bytes at @off of the file @path (a backing store at rest). */
static inline void th_file_read(const char *path, uint64_t off, void *buf, size_t len)
{
	int fd = open(path, O_RDONLY);

	cr_assert_geq(fd, 0, "open %s: %s", path, strerror(errno));
	cr_assert_eq(pread(fd, buf, len, (off_t)off), (ssize_t)len, "read %s", path);
	close(fd);
}

/* The whole file @path, malloc'd, NUL-terminated; its size in *@len if @len. */
static inline char *th_slurp(const char *path, size_t *len)
{
	struct stat st;
	char *buf;
	int fd = open(path, O_RDONLY);

	cr_assert_geq(fd, 0, "open %s: %s", path, strerror(errno));
	cr_assert_eq(fstat(fd, &st), 0);
	buf = malloc((size_t)st.st_size + 1);
	cr_assert_not_null(buf);
	cr_assert_eq(pread(fd, buf, (size_t)st.st_size, 0), st.st_size, "read %s", path);
	buf[st.st_size] = '\0';
	close(fd);
	if (len)
		*len = (size_t)st.st_size;
	return buf;
}

/* Create a file of @size bytes (sparse) at @dir/@name; returns its path in @out. */
static inline void th_make_file(const char *dir, const char *name, long long size, char *out,
				size_t len)
{
	int fd;

	th_fmt(out, len, "%s/%s", dir, name);
	fd = open(out, O_RDWR | O_CREAT | O_TRUNC, 0644);
	cr_assert_geq(fd, 0, "create %s: %s", out, strerror(errno));
	cr_assert_eq(ftruncate(fd, size), 0, "ftruncate %s: %s", out, strerror(errno));
	close(fd);
}

/* A TCP port that was free a moment ago. */
static inline int th_free_port(void)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t sl = sizeof(sa);
	int fd = socket(AF_INET, SOCK_STREAM, 0), port;

	cr_assert_geq(fd, 0);
	cr_assert_eq(bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0);
	cr_assert_eq(getsockname(fd, (struct sockaddr *)&sa, &sl), 0);
	port = ntohs(sa.sin_port);
	close(fd);
	return port;
}

/* A connected unix stream socket to @path, or -1. */
static inline int th_unix_connect(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (fd < 0)
		return -1;
	if (strlen(path) >= sizeof(sa.sun_path)) {
		close(fd);
		return -1;
	}
	memcpy(sa.sun_path, path, strlen(path) + 1);
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

/* Wait until a unix socket accepts connections. */
static inline int th_wait_socket(const char *path, pid_t pid, int timeout_ms)
{
	for (int waited = 0; waited < timeout_ms; waited += 20) {
		int fd = th_unix_connect(path);

		if (fd >= 0) {
			close(fd);
			return 0;
		}
		if (pid > 0 && waitpid(pid, NULL, WNOHANG) == pid)
			return -1; /* died */
		th_sleep_ms(20);
	}
	return -1;
}

/* Copy the file at @path to stderr, each line indented (logs of failed runs). */
static inline void th_dump_file(const char *path)
{
	char buf[4096];
	FILE *f = fopen(path, "r");

	if (!f)
		return;
	while (fgets(buf, sizeof(buf), f))
		fprintf(stderr, "  | %s", buf);
	fclose(f);
}

/*
 * Start flashtierd with @volumes_json (the JSON object for "volumes") and
 * optional extra top-level members @extra_json (e.g. "\"reactors\": 1," or "").
 */
static inline void ft_agent_start_in(struct ft_agent *a, const char *dir, const char *volumes_json,
				     const char *extra_json)
{
	const char *agent = getenv("AGENT");
	FILE *f;

	cr_assert_not_null(agent, "AGENT is not set: run through 'make check'");
	memset(a, 0, sizeof(*a));
	th_fmt(a->dir, sizeof(a->dir), "%s", dir);
	th_fmt(a->sock, sizeof(a->sock), "%s/nbd.sock", dir);
	th_fmt(a->config, sizeof(a->config), "%s/flashtierd.json", dir);
	th_fmt(a->log, sizeof(a->log), "%s/agent.log", dir);
	a->metrics_port = th_free_port();
	f = fopen(a->config, "w");
	cr_assert_not_null(f);
	fprintf(f, "{ \"listen\": \"%s\", \"metrics\": \"127.0.0.1:%d\", %s \"volumes\": %s }\n",
		a->sock, a->metrics_port, extra_json ? extra_json : "", volumes_json);
	fclose(f);
	a->pid = fork();
	cr_assert_geq(a->pid, 0);
	if (a->pid == 0) {
		int fd = open(a->log, O_WRONLY | O_CREAT | O_APPEND, 0644);

		/* A crashed test must not leave agents behind. */
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		if (fd >= 0) {
			dup2(fd, 2);
			dup2(fd, 1);
		}
		execl(agent, "flashtierd", "--config", a->config, "--log-level", "debug",
		      (char *)NULL);
		_exit(127);
	}
	if (th_wait_socket(a->sock, a->pid, 10000) < 0) {
		th_dump_file(a->log);
		cr_assert_fail("flashtierd did not come up (log above)");
	}
}

/* As above, in a fresh temp dir. */
static inline void ft_agent_start(struct ft_agent *a, const char *volumes_json)
{
	char dir[256];

	th_mkdtemp(dir, sizeof(dir));
	ft_agent_start_in(a, dir, volumes_json, "");
}

/* SIGTERM, wait, and return the exit status (-1 if killed by a signal). */
static inline int ft_agent_stop(struct ft_agent *a)
{
	int status = 0;

	if (a->pid <= 0)
		return 0;
	kill(a->pid, SIGTERM);
	for (int i = 0; i < 1500; i++) {
		pid_t r = waitpid(a->pid, &status, WNOHANG);

		if (r == a->pid) {
			a->pid = 0;
			if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
				th_dump_file(a->log);
			return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
		}
		th_sleep_ms(20);
	}
	kill(a->pid, SIGKILL);
	waitpid(a->pid, &status, 0);
	a->pid = 0;
	th_dump_file(a->log);
	return -2; /* did not drain within 30 s */
}

/* Is the agent still running? */
static inline int ft_agent_alive(struct ft_agent *a)
{
	return a->pid > 0 && waitpid(a->pid, NULL, WNOHANG) == 0;
}

/* SIGKILL and reap *@pid if it is set, then clear it (teardown of a failed test). */
static inline void th_kill(pid_t *pid)
{
	if (*pid <= 0)
		return;
	kill(*pid, SIGKILL);
	waitpid(*pid, NULL, 0);
	*pid = 0;
}

/* Teardown of a failed test: show the agent's log, then SIGKILL and reap it. */
static inline void th_agent_kill(struct ft_agent *a)
{
	if (a->pid <= 0)
		return;
	fprintf(stderr, "agent log (%s):\n", a->log);
	th_dump_file(a->log);
	th_kill(&a->pid);
}

/* Remove a test's temp dir (only ever one of ours, under /tmp/ft-test.). */
static inline void th_rm_rf(const char *dir)
{
	char cmd[512];

	if (strncmp(dir, "/tmp/ft-test.", 13) != 0)
		return;
	th_fmt(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "cleanup of %s failed\n", dir);
}

/* Stop (asserting a clean exit 0) and remove the temp dir. */
static inline void ft_agent_finish(struct ft_agent *a)
{
	int rc = ft_agent_stop(a);

	cr_assert_eq(rc, 0, "flashtierd exited with %d after SIGTERM (log above)", rc);
	th_rm_rf(a->dir);
}

/* "nbd+unix:///EXPORT?socket=SOCK" */
static inline void th_uri(const struct ft_agent *a, const char *export, char *out, size_t len)
{
	th_fmt(out, len, "nbd+unix:///%s?socket=%s", export, a->sock);
}

/*
 * Start nbdkit in the foreground on a unix socket @dir/@name.sock with the
 * given argv tail (plugin, filters, params); returns its pid. The socket
 * path is written to @sock_out.
 */
static inline pid_t th_nbdkit_start(const char *dir, const char *name, char *sock_out,
				    size_t sock_len, const char *const *args)
{
	char logpath[320];
	const char *argv[64];
	int n = 0;
	pid_t pid;

	th_fmt(sock_out, sock_len, "%s/%s.sock", dir, name);
	th_fmt(logpath, sizeof(logpath), "%s/%s.log", dir, name);
	unlink(sock_out);
	argv[n++] = "nbdkit";
	argv[n++] = "--foreground";
	argv[n++] = "--exit-with-parent";
	argv[n++] = "--unix";
	argv[n++] = sock_out;
	for (int i = 0; args[i] && n < 62; i++)
		argv[n++] = args[i];
	argv[n] = NULL;
	pid = fork();
	cr_assert_geq(pid, 0);
	if (pid == 0) {
		int fd = open(logpath, O_WRONLY | O_CREAT | O_APPEND, 0644);

		if (fd >= 0) {
			dup2(fd, 2);
			dup2(fd, 1);
		}
		execvp("nbdkit", (char *const *)argv);
		_exit(127);
	}
	if (th_wait_socket(sock_out, pid, 10000) < 0) {
		th_dump_file(logpath);
		cr_assert_fail("nbdkit did not come up");
	}
	return pid;
}

/* SIGTERM an nbdkit from th_nbdkit_start() (if @pid is set) and reap it. */
static inline void th_nbdkit_stop(pid_t pid)
{
	if (pid <= 0)
		return;
	kill(pid, SIGTERM);
	waitpid(pid, NULL, 0);
}

/* Fetch http://127.0.0.1:PORT/PATH into a malloc'd string (curl-free, raw HTTP/1.0). */
static inline char *th_http_get(int port, const char *path)
{
	struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	char req[256];
	size_t cap = 1 << 16, len = 0;
	char *buf = malloc(cap);
	ssize_t n;

	cr_assert_not_null(buf);
	cr_assert_geq(fd, 0);
	cr_assert_eq(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0, "metrics connect: %s",
		     strerror(errno));
	th_fmt(req, sizeof(req), "GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n", path);
	cr_assert_eq(write(fd, req, strlen(req)), (ssize_t)strlen(req));
	while ((n = read(fd, buf + len, cap - len - 1)) > 0) {
		len += (size_t)n;
		if (cap - len < 4096) {
			cap *= 2;
			buf = realloc(buf, cap);
			cr_assert_not_null(buf);
		}
	}
	close(fd);
	buf[len] = '\0';
	return buf;
}

/* The value of the first sample line starting with @prefix (metric name plus labels), or -1. */
static inline double th_metric(const char *text, const char *prefix)
{
	const char *p = text;
	size_t pl = strlen(prefix);

	while ((p = strstr(p, prefix))) {
		if (p == text || p[-1] == '\n') {
			const char *sp = p + pl;

			if (*sp == ' ')
				return strtod(sp + 1, NULL);
		}
		p += pl;
	}
	return -1;
}

/* The value of sample @prefix on the agent's /metrics, asserting the sample exists. */
static inline double th_agent_metric(const struct ft_agent *a, const char *prefix)
{
	char *text = th_http_get(a->metrics_port, "/metrics");
	double v = th_metric(text, prefix);

	free(text);
	cr_assert_geq(v, 0, "metric %s not found", prefix);
	return v;
}

/* Sample @name of volume @vol (no domain): per operation @op, or per volume if NULL. */
static inline double th_vol_metric(const struct ft_agent *a, const char *name, const char *vol,
				   const char *op)
{
	char prefix[256];

	if (op)
		th_fmt(prefix, sizeof(prefix), "%s{volume=\"%s\",domain=\"\",op=\"%s\"}", name, vol,
		       op);
	else
		th_fmt(prefix, sizeof(prefix), "%s{volume=\"%s\",domain=\"\"}", name, vol);
	return th_agent_metric(a, prefix);
}

/* Poll (10 ms steps) until sample @prefix reads @want; fail after @timeout_ms. */
static inline void th_wait_metric(const struct ft_agent *a, const char *prefix, double want,
				  int timeout_ms)
{
	double end = th_now_ms() + timeout_ms, v;

	for (;;) {
		v = th_agent_metric(a, prefix);
		if (v == want)
			return;
		if (th_now_ms() >= end)
			break;
		th_sleep_ms(10);
	}
	cr_assert_fail("%s stayed at %g, want %g", prefix, v, want);
}

/* The 8 bytes th_fill() puts at byte position @pos (a multiple of 8) for @seed. */
static inline uint64_t th_fill_word(uint64_t pos, uint32_t seed)
{
	return (pos + 1) * 0x9e3779b97f4a7c15ull ^ ((uint64_t)seed << 32 | seed);
}

/* Deterministic content for [@off, @off+@len) (@len a multiple of 8): position and seed. */
static inline void th_fill(void *buf, size_t len, uint64_t off, uint32_t seed)
{
	uint64_t *p = buf;

	for (size_t i = 0; i < len / 8; i++)
		p[i] = th_fill_word(off + 8 * i, seed);
}

#endif
