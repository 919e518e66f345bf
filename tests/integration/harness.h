/* SPDX-License-Identifier: MIT */
/*
 * Test harness for integration tests: runs the real flashtierd binary (path
 * in $AGENT) and real nbdkit servers in a private temporary directory.
 *
 * Every helper asserts on failure (Criterion cr_assert), so a test that
 * cannot set up fails loudly instead of passing vacuously.
 */
#ifndef FLASHTIER_TEST_HARNESS_H
#define FLASHTIER_TEST_HARNESS_H

#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
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

static inline void th_sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };

	nanosleep(&ts, NULL);
}

/* A private directory for one test. */
static inline void th_mkdtemp(char *out, size_t len)
{
	snprintf(out, len, "/tmp/ft-test.XXXXXX");
	cr_assert_not_null(mkdtemp(out), "mkdtemp: %s", strerror(errno));
}

/* Create a file of @size bytes (sparse) at @dir/@name; returns its path in @out. */
static inline void th_make_file(const char *dir, const char *name, long long size, char *out,
				size_t len)
{
	int fd;

	snprintf(out, len, "%s/%s", dir, name);
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
	snprintf(a->dir, sizeof(a->dir), "%s", dir);
	snprintf(a->sock, sizeof(a->sock), "%s/nbd.sock", dir);
	snprintf(a->config, sizeof(a->config), "%s/flashtierd.json", dir);
	snprintf(a->log, sizeof(a->log), "%s/agent.log", dir);
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

static inline void th_rm_rf(const char *dir)
{
	char cmd[512];

	if (strncmp(dir, "/tmp/ft-test.", 13) != 0)
		return;
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
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
	snprintf(out, len, "nbd+unix:///%s?socket=%s", export, a->sock);
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

	snprintf(sock_out, sock_len, "%s/%s.sock", dir, name);
	snprintf(logpath, sizeof(logpath), "%s/%s.log", dir, name);
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

static inline void th_nbdkit_stop(pid_t pid)
{
	if (pid <= 0)
		return;
	kill(pid, SIGTERM);
	waitpid(pid, NULL, 0);
}

/* Fetch http://127.0.0.1:PORT/metrics into a malloc'd string (curl-free, raw HTTP/1.0). */
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
	snprintf(req, sizeof(req), "GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n", path);
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

#endif
