/* SPDX-License-Identifier: MIT */
/*
 * Unit tests of the configuration parser and validation (agent/config.c).
 *
 * Every rejection is checked three ways: the return value, a NULL result,
 * and the message naming the file, the key and the reason. Runs under ASan
 * with leak detection, so every accepted config is freed.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include "flashtier/config.h"

#define ORIGIN "/etc/flashtier/test.json"

/* ---- helpers ---- */

static struct ft_config *parse_ok(const char *json, bool check_paths)
{
	struct ft_config *cfg = (struct ft_config *)0x1;
	char err[1024] = "";
	int rc;

	rc = ft_config_parse(json, ORIGIN, check_paths, &cfg, err, sizeof(err));
	cr_assert_eq(rc, 0, "parse failed (%d): %s\nconfig: %s", rc, err, json);
	cr_assert_not_null(cfg);
	return cfg;
}

/*
 * Parse @json, expect -EINVAL and no config, and expect every one of the
 * NULL-terminated needles in the message.
 */
static void __attribute__((sentinel)) expect_fail(const char *json, bool check_paths, ...)
{
	struct ft_config *cfg = (struct ft_config *)0x1;
	char err[1024] = "";
	const char *needle;
	va_list ap;
	int rc;

	rc = ft_config_parse(json, ORIGIN, check_paths, &cfg, err, sizeof(err));
	cr_assert_eq(rc, -EINVAL, "rc %d, want -EINVAL; message '%s'\nconfig: %s", rc, err, json);
	cr_assert_null(cfg, "a failed parse must leave *out NULL");
	cr_assert(strncmp(err, ORIGIN, strlen(ORIGIN)) == 0,
		  "message does not start with the file name: '%s'", err);
	cr_assert(strchr(err, '\n') == NULL, "message is not one line: '%s'", err);
	va_start(ap, check_paths);
	while ((needle = va_arg(ap, const char *)))
		cr_assert(strstr(err, needle), "message '%s' lacks '%s'\nconfig: %s", err, needle,
			  json);
	va_end(ap);
}

/* A private directory, world-traversable so an unprivileged uid can use it too. */
static void make_dir(char *out, size_t len)
{
	snprintf(out, len, "/tmp/ft-cfg.XXXXXX");
	cr_assert_not_null(mkdtemp(out), "mkdtemp: %s", strerror(errno));
	cr_assert_eq(chmod(out, 0755), 0);
}

static void write_file(const char *path, const void *data, size_t len, mode_t mode)
{
	int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);

	cr_assert_geq(fd, 0, "create %s: %s", path, strerror(errno));
	cr_assert_eq(write(fd, data, len), (ssize_t)len);
	cr_assert_eq(close(fd), 0);
	cr_assert_eq(chmod(path, mode), 0);
}

static void rm_rf(const char *dir)
{
	char cmd[512];

	if (strncmp(dir, "/tmp/ft-cfg.", 12) != 0)
		return;
	snprintf(cmd, sizeof(cmd), "rm -rf '%s'", dir);
	if (system(cmd) != 0)
		fprintf(stderr, "cleanup of %s failed\n", dir);
}

/*
 * access() honours the real uid and root passes every permission check, so
 * permission tests run as nobody. Each Criterion test has its own process.
 */
static void drop_root(void)
{
	if (getuid() != 0 && geteuid() != 0)
		return;
	cr_assert_eq(setresgid(65534, 65534, 65534), 0, "setresgid: %s", strerror(errno));
	cr_assert_eq(setresuid(65534, 65534, 65534), 0, "setresuid: %s", strerror(errno));
	/* LeakSanitizer must still be able to ptrace this process at exit. */
	prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
}

static char *str_repeat(char c, size_t n)
{
	char *s = malloc(n + 1);

	cr_assert_not_null(s);
	memset(s, c, n);
	s[n] = '\0';
	return s;
}

/* ---- valid configs ---- */

Test(config, minimal)
{
	struct ft_config *cfg = parse_ok("{\"listen\": \"/run/ft.sock\","
					 " \"volumes\": {\"d\": {\"backing\": \"/no/such/file\"}}}",
					 false);

	cr_assert_str_eq(cfg->path, ORIGIN);
	cr_assert_eq(cfg->listen.kind, FT_ADDR_UNIX);
	cr_assert_str_eq(cfg->listen.path, "/run/ft.sock");
	cr_assert_null(cfg->listen.host);
	cr_assert_null(cfg->listen.port);
	cr_assert_eq(cfg->has_metrics, false);
	cr_assert_null(cfg->metrics.host);
	cr_assert_eq(cfg->reactors, 0);
	cr_assert_eq(cfg->has_log_level, false);
	cr_assert_eq(cfg->n_volumes, 1);
	cr_assert_str_eq(cfg->volumes[0].name, "d");
	cr_assert_eq(cfg->volumes[0].backing_kind, FT_BACKING_FILE);
	cr_assert_str_eq(cfg->volumes[0].backing, "/no/such/file");
	cr_assert_eq(cfg->volumes[0].readonly, false);
	cr_assert_null(cfg->volumes[0].description);
	cr_assert_null(cfg->volumes[0].domain);
	ft_config_free(cfg);
}

Test(config, full)
{
	struct ft_config *cfg = parse_ok(
		"{\n"
		"  \"listen\": \"tcp:0.0.0.0:10809\",\n"
		"  \"metrics\": \"[::1]:9810\",\n"
		"  \"reactors\": 3,\n"
		"  \"log_level\": \"debug\",\n"
		"  \"volumes\": {\n"
		"    \"vm1-root\": { \"backing\": \"/dev/vg/vm1\", \"readonly\": true,\n"
		"                  \"description\": \"VM one \\u00e9\", \"domain\": \"vm1\" },\n"
		"    \"remote\": { \"backing\": \"nbd://10.0.0.2:10809/exp\", \"readonly\": false },\n"
		"    \"sock\": { \"backing\": \"nbd+unix:///e?socket=/run/n.sock\" }\n"
		"  }\n"
		"}\n",
		false);
	const struct ft_volume_config *v;

	cr_assert_str_eq(cfg->path, ORIGIN);
	cr_assert_eq(cfg->listen.kind, FT_ADDR_TCP);
	cr_assert_str_eq(cfg->listen.host, "0.0.0.0");
	cr_assert_str_eq(cfg->listen.port, "10809");
	cr_assert_null(cfg->listen.path);
	cr_assert_eq(cfg->has_metrics, true);
	cr_assert_eq(cfg->metrics.kind, FT_ADDR_TCP);
	cr_assert_str_eq(cfg->metrics.host, "::1");
	cr_assert_str_eq(cfg->metrics.port, "9810");
	cr_assert_eq(cfg->reactors, 3);
	cr_assert_eq(cfg->has_log_level, true);
	cr_assert_eq(cfg->log_level, FT_LOG_DEBUG);
	cr_assert_eq(cfg->n_volumes, 3);

	/* Volumes keep the file's order. */
	cr_assert_str_eq(cfg->volumes[0].name, "vm1-root");
	cr_assert_str_eq(cfg->volumes[1].name, "remote");
	cr_assert_str_eq(cfg->volumes[2].name, "sock");

	v = &cfg->volumes[0];
	cr_assert_eq(v->backing_kind, FT_BACKING_FILE);
	cr_assert_str_eq(v->backing, "/dev/vg/vm1");
	cr_assert_eq(v->readonly, true);
	cr_assert_str_eq(v->description, "VM one \xc3\xa9");
	cr_assert_str_eq(v->domain, "vm1");

	v = &cfg->volumes[1];
	cr_assert_eq(v->backing_kind, FT_BACKING_NBD);
	cr_assert_str_eq(v->backing, "nbd://10.0.0.2:10809/exp");
	cr_assert_eq(v->readonly, false);
	cr_assert_null(v->description);
	cr_assert_null(v->domain);

	v = &cfg->volumes[2];
	cr_assert_eq(v->backing_kind, FT_BACKING_NBD);
	cr_assert_str_eq(v->backing, "nbd+unix:///e?socket=/run/n.sock");
	cr_assert_eq(v->readonly, false);
	ft_config_free(cfg);
}

Test(config, log_levels)
{
	static const char *const names[] = { "error", "warn", "info", "debug" };
	static const enum ft_log_level want[] = { FT_LOG_ERROR, FT_LOG_WARN, FT_LOG_INFO,
						  FT_LOG_DEBUG };
	char json[256];

	for (unsigned i = 0; i < 4; i++) {
		struct ft_config *cfg;

		snprintf(json, sizeof(json),
			 "{\"listen\": \"s\", \"log_level\": \"%s\","
			 " \"volumes\": {\"d\": {\"backing\": \"f\"}}}",
			 names[i]);
		cfg = parse_ok(json, false);
		cr_assert_eq(cfg->has_log_level, true);
		cr_assert_eq(cfg->log_level, want[i], "%s", names[i]);
		ft_config_free(cfg);
	}
}

Test(config, reactors_bounds_accepted)
{
	struct ft_config *cfg;

	cfg = parse_ok(
		"{\"listen\": \"s\", \"reactors\": 1, \"volumes\": {\"d\": {\"backing\": \"f\"}}}",
		false);
	cr_assert_eq(cfg->reactors, 1);
	ft_config_free(cfg);
	cfg = parse_ok(
		"{\"listen\": \"s\", \"reactors\": 256, \"volumes\": {\"d\": {\"backing\": \"f\"}}}",
		false);
	cr_assert_eq(cfg->reactors, 256);
	ft_config_free(cfg);
}

Test(config, builtin_parses)
{
	struct ft_config *cfg = parse_ok(ft_config_builtin, false);

	cr_assert_eq(cfg->listen.kind, FT_ADDR_UNIX);
	cr_assert_str_eq(cfg->listen.path, "var/flashtierd.sock");
	cr_assert_eq(cfg->has_metrics, true);
	cr_assert_str_eq(cfg->metrics.host, "127.0.0.1");
	cr_assert_str_eq(cfg->metrics.port, "9810");
	cr_assert_eq(cfg->n_volumes, 1);
	cr_assert_str_eq(cfg->volumes[0].name, "disk0");
	cr_assert_str_eq(cfg->volumes[0].backing, "var/disk0.img");
	ft_config_free(cfg);
}

Test(config, nbd_uris_are_nbd_backings)
{
	struct ft_config *cfg = parse_ok("{\"listen\": \"s\", \"volumes\": {"
					 " \"a\": {\"backing\": \"nbd://host/exp\"},"
					 " \"b\": {\"backing\": \"nbd+unix:///exp?socket=/x\"}}}",
					 true); /* URIs are never stat()ed */

	cr_assert_eq(cfg->volumes[0].backing_kind, FT_BACKING_NBD);
	cr_assert_eq(cfg->volumes[1].backing_kind, FT_BACKING_NBD);
	ft_config_free(cfg);
}

/* ---- listen / host:port ---- */

Test(config, listen_forms)
{
	struct ft_listen_addr a;

	cr_assert_eq(ft_config_parse_listen("/run/flashtier/nbd.sock", &a), 0);
	cr_assert_eq(a.kind, FT_ADDR_UNIX);
	cr_assert_str_eq(a.path, "/run/flashtier/nbd.sock");
	cr_assert_null(a.host);
	cr_assert_null(a.port);
	ft_listen_addr_clear(&a);
	cr_assert_null(a.path, "clear must reset the struct");

	cr_assert_eq(ft_config_parse_listen("unix:/tmp/x.sock", &a), 0);
	cr_assert_eq(a.kind, FT_ADDR_UNIX);
	cr_assert_str_eq(a.path, "/tmp/x.sock");
	ft_listen_addr_clear(&a);

	cr_assert_eq(ft_config_parse_listen("relative/x.sock", &a), 0);
	cr_assert_eq(a.kind, FT_ADDR_UNIX);
	cr_assert_str_eq(a.path, "relative/x.sock");
	ft_listen_addr_clear(&a);

	cr_assert_eq(ft_config_parse_listen("tcp:127.0.0.1:10809", &a), 0);
	cr_assert_eq(a.kind, FT_ADDR_TCP);
	cr_assert_str_eq(a.host, "127.0.0.1");
	cr_assert_str_eq(a.port, "10809");
	cr_assert_null(a.path);
	ft_listen_addr_clear(&a);

	cr_assert_eq(ft_config_parse_listen("tcp:[::1]:1", &a), 0);
	cr_assert_eq(a.kind, FT_ADDR_TCP);
	cr_assert_str_eq(a.host, "::1");
	cr_assert_str_eq(a.port, "1");
	ft_listen_addr_clear(&a);

	cr_assert_eq(ft_config_parse_listen("tcp:localhost:65535", &a), 0);
	cr_assert_str_eq(a.host, "localhost");
	cr_assert_str_eq(a.port, "65535");
	ft_listen_addr_clear(&a);
}

Test(config, listen_rejects)
{
	static const char *const bad[] = {
		"",
		"unix:",
		"tcp:",
		"tcp:host",
		"tcp:host:",
		"tcp::10809",
		"tcp:host:0",
		"tcp:host:65536",
		"tcp:host:abc",
		"tcp:host:80x",
		"tcp:host:-1",
		"tcp:::1:80",
		"tcp:[::1]80",
		"tcp:[::1]:",
		"tcp:[]:80",
		"tcp:[::1:80",
		"tcp:host:99999999999999999999",
	};
	struct ft_listen_addr a;

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		int rc = ft_config_parse_listen(bad[i], &a);

		cr_assert_eq(rc, -EINVAL, "'%s' gave %d", bad[i], rc);
		/* Nothing allocated on failure. */
		cr_assert_null(a.path, "'%s'", bad[i]);
		cr_assert_null(a.host, "'%s'", bad[i]);
		cr_assert_null(a.port, "'%s'", bad[i]);
	}
}

Test(config, listen_socket_path_length)
{
	struct ft_listen_addr a;
	char *p107 = str_repeat('a', 107), *p108 = str_repeat('a', 108);
	char prefixed[200];

	p107[0] = '/';
	p108[0] = '/';
	/* sun_path holds 108 bytes including the NUL: 107 fits, 108 does not. */
	cr_assert_eq(ft_config_parse_listen(p107, &a), 0);
	cr_assert_str_eq(a.path, p107);
	ft_listen_addr_clear(&a);
	cr_assert_eq(ft_config_parse_listen(p108, &a), -ENAMETOOLONG);
	cr_assert_null(a.path);
	snprintf(prefixed, sizeof(prefixed), "unix:%s", p107);
	cr_assert_eq(ft_config_parse_listen(prefixed, &a), 0, "the unix: prefix does not count");
	ft_listen_addr_clear(&a);
	snprintf(prefixed, sizeof(prefixed), "unix:%s", p108);
	cr_assert_eq(ft_config_parse_listen(prefixed, &a), -ENAMETOOLONG);
	free(p107);
	free(p108);
}

Test(config, listen_too_long_in_config)
{
	char *p = str_repeat('s', 120);
	char json[512];

	p[0] = '/';
	snprintf(json, sizeof(json),
		 "{\"listen\": \"%s\", \"volumes\": {\"d\": {\"backing\": \"f\"}}}", p);
	expect_fail(json, false, "key 'listen'", "longer than 107 bytes", NULL);
	free(p);
}

Test(config, hostport)
{
	struct ft_listen_addr a;

	cr_assert_eq(ft_config_parse_hostport("127.0.0.1:9810", &a), 0);
	cr_assert_eq(a.kind, FT_ADDR_TCP);
	cr_assert_str_eq(a.host, "127.0.0.1");
	cr_assert_str_eq(a.port, "9810");
	ft_listen_addr_clear(&a);

	cr_assert_eq(ft_config_parse_hostport("[::1]:9810", &a), 0);
	cr_assert_str_eq(a.host, "::1");
	cr_assert_str_eq(a.port, "9810");
	ft_listen_addr_clear(&a);

	cr_assert_eq(ft_config_parse_hostport("[fe80::1%eth0]:65535", &a), 0);
	cr_assert_str_eq(a.host, "fe80::1%eth0");
	cr_assert_str_eq(a.port, "65535");
	ft_listen_addr_clear(&a);

	static const char *const bad[] = { "9810",	":9810",   "host:0",	 "host:65536",
					   "host:http", "host:",   "::1:9810",	 "[::1]9810",
					   "[::1]",	"[]:9810", "host:9810 ", "host:1e3" };

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		int rc = ft_config_parse_hostport(bad[i], &a);

		cr_assert_eq(rc, -EINVAL, "'%s' gave %d", bad[i], rc);
		cr_assert_null(a.host, "'%s'", bad[i]);
		cr_assert_null(a.port, "'%s'", bad[i]);
	}
}

/* ---- syntax errors ---- */

Test(config, invalid_json_has_position)
{
	/* The stray comma sits on line 3, column 20 ("}" right after it). */
	expect_fail("{\n  \"listen\": \"s\",\n  \"volumes\": {},}\n", false,
		    ORIGIN ":3:", "invalid JSON", NULL);
	expect_fail("{ \"listen\": ", false, ORIGIN ":1:", "invalid JSON", NULL);
	expect_fail("", false, ORIGIN ":", "invalid JSON", NULL);
	expect_fail("listen = s", false, ORIGIN ":1:", "invalid JSON", NULL);
}

Test(config, invalid_json_exact_position)
{
	struct ft_config *cfg;
	char err[512];
	int rc;

	rc = ft_config_parse("{\"a\" 1}", "f.json", false, &cfg, err, sizeof(err));
	cr_assert_eq(rc, -EINVAL);
	cr_assert(strncmp(err, "f.json:1:6: invalid JSON", 24) == 0, "got '%s'", err);
}

Test(config, duplicate_key)
{
	expect_fail("{\"listen\": \"a\",\n \"volumes\": {\"d\": {\"backing\": \"f\"}},\n"
		    " \"listen\": \"b\"}",
		    false, ORIGIN ":3:", "duplicate key", "listen", NULL);
	/* Inside a volume too. */
	expect_fail(
		"{\"listen\": \"a\", \"volumes\": {\"d\": {\"backing\": \"f\", \"backing\": \"g\"}}}",
		false, ORIGIN ":1:", "duplicate key", "backing", NULL);
	/* And duplicate export names. */
	expect_fail("{\"listen\": \"a\", \"volumes\": {\"d\": {\"backing\": \"f\"},"
		    " \"d\": {\"backing\": \"g\"}}}",
		    false, "duplicate key", "\"d\"", NULL);
}

Test(config, unknown_keys)
{
	expect_fail(
		"{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"f\"}}, \"listne\": 1}",
		false, ORIGIN ": key 'listne': unknown key", NULL);
	expect_fail(
		"{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"f\", \"read_only\": true}}}",
		false, ORIGIN ": key 'volumes.d.read_only': unknown key", NULL);
}

Test(config, top_level_not_object)
{
	expect_fail("[1, 2]", false, "top level must be a JSON object", NULL);
	/* jansson itself refuses a bare scalar at the top. */
	expect_fail("\"listen\"", false, ORIGIN ":1:", "invalid JSON", NULL);
}

/* ---- wrong types and missing members ---- */

Test(config, wrong_types)
{
	expect_fail("{\"listen\": 5, \"volumes\": {\"d\": {\"backing\": \"f\"}}}", false,
		    "key 'listen'", "must be a string", NULL);
	expect_fail(
		"{\"listen\": \"s\", \"metrics\": 9810, \"volumes\": {\"d\": {\"backing\": \"f\"}}}",
		false, "key 'metrics'", "must be a string", NULL);
	expect_fail(
		"{\"listen\": \"s\", \"reactors\": \"2\", \"volumes\": {\"d\": {\"backing\": \"f\"}}}",
		false, "key 'reactors'", "must be an integer from 1 to 256", NULL);
	expect_fail(
		"{\"listen\": \"s\", \"reactors\": 2.0, \"volumes\": {\"d\": {\"backing\": \"f\"}}}",
		false, "key 'reactors'", "must be an integer", NULL);
	expect_fail(
		"{\"listen\": \"s\", \"log_level\": 3, \"volumes\": {\"d\": {\"backing\": \"f\"}}}",
		false, "key 'log_level'", "must be a string", NULL);
	expect_fail("{\"listen\": \"s\", \"volumes\": [\"d\"]}", false, "key 'volumes'",
		    "must be an object", NULL);
	expect_fail("{\"listen\": \"s\", \"volumes\": {\"d\": \"/dev/sda\"}}", false,
		    "key 'volumes.d'", "must be an object", NULL);
	expect_fail("{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": 7}}}", false,
		    "key 'volumes.d.backing'", "must be a string", NULL);
	expect_fail(
		"{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"f\", \"readonly\": \"yes\"}}}",
		false, "key 'volumes.d.readonly'", "must be true or false", NULL);
	expect_fail(
		"{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"f\", \"readonly\": 1}}}",
		false, "key 'volumes.d.readonly'", "must be true or false", NULL);
	expect_fail(
		"{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"f\", \"description\": 1}}}",
		false, "key 'volumes.d.description'", "must be a string", NULL);
	expect_fail(
		"{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"f\", \"domain\": []}}}",
		false, "key 'volumes.d.domain'", "must be a string", NULL);
	expect_fail("{\"listen\": null, \"volumes\": {\"d\": {\"backing\": \"f\"}}}", false,
		    "key 'listen'", "must be a string", NULL);
}

/* An escaped NUL never reaches the key checks: jansson rejects it, with a position. */
Test(config, nul_in_string)
{
	expect_fail("{\"listen\": \"a\\u0000b\", \"volumes\": {\"d\": {\"backing\": \"f\"}}}",
		    false, ORIGIN ":1:", "invalid JSON", NULL);
	expect_fail("{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"f\\u0000x\"}}}",
		    false, ORIGIN ":1:", "invalid JSON", NULL);
}

Test(config, missing_members)
{
	expect_fail("{\"volumes\": {\"d\": {\"backing\": \"f\"}}}", false, "key 'listen'",
		    "is required", NULL);
	expect_fail("{\"listen\": \"s\"}", false, "key 'volumes'", "is required", NULL);
	expect_fail("{\"listen\": \"s\", \"volumes\": {}}", false, "key 'volumes'",
		    "at least one volume", NULL);
	expect_fail("{\"listen\": \"s\", \"volumes\": {\"d\": {}}}", false,
		    "key 'volumes.d.backing'", "is required", NULL);
	expect_fail("{\"listen\": \"s\", \"volumes\": {\"d\": {\"readonly\": true}}}", false,
		    "key 'volumes.d.backing'", "is required", NULL);
	expect_fail("{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"\"}}}", false,
		    "key 'volumes.d.backing'", "must not be empty", NULL);
	expect_fail("{}", false, "key 'listen'", "is required", NULL);
}

/* ---- bad values ---- */

Test(config, bad_listen_values)
{
	static const char *const bad[] = {
		"tcp:host:0", "tcp:host:65536", "tcp:host:abc", "tcp:host", "", "unix:"
	};
	char json[256];

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(json, sizeof(json),
			 "{\"listen\": \"%s\", \"volumes\": {\"d\": {\"backing\": \"f\"}}}",
			 bad[i]);
		expect_fail(json, false, "key 'listen'",
			    "neither a unix socket path nor tcp:HOST:PORT", NULL);
		if (*bad[i]) /* the offending value is quoted back */
			expect_fail(json, false, bad[i], NULL);
	}
}

Test(config, bad_metrics_values)
{
	static const char *const bad[] = { "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:http",
					   "9810",	  "::1:9810",	     "" };
	char json[256];

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(
			json, sizeof(json),
			"{\"listen\": \"s\", \"metrics\": \"%s\", \"volumes\": {\"d\": {\"backing\": \"f\"}}}",
			bad[i]);
		expect_fail(json, false, "key 'metrics'", "is not HOST:PORT", NULL);
	}
	/* metrics is host:port only, never tcp: or a socket path. */
	expect_fail("{\"listen\": \"s\", \"metrics\": \"tcp:127.0.0.1:9810\","
		    " \"volumes\": {\"d\": {\"backing\": \"f\"}}}",
		    false, "key 'metrics'", NULL);
}

Test(config, reactors_out_of_range)
{
	static const char *const bad[] = { "0", "-1", "257", "100000", "4294967297", "true" };
	char json[256];

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(
			json, sizeof(json),
			"{\"listen\": \"s\", \"reactors\": %s, \"volumes\": {\"d\": {\"backing\": \"f\"}}}",
			bad[i]);
		expect_fail(json, false, "key 'reactors'", "must be an integer from 1 to 256",
			    NULL);
	}
}

Test(config, bad_log_level)
{
	static const char *const bad[] = { "verbose", "INFO", "", "warning", "debug " };
	char json[256];

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(
			json, sizeof(json),
			"{\"listen\": \"s\", \"log_level\": \"%s\", \"volumes\": {\"d\": {\"backing\": \"f\"}}}",
			bad[i]);
		expect_fail(json, false, "key 'log_level'", "is not error, warn, info or debug",
			    NULL);
	}
}

Test(config, unsupported_uri_scheme)
{
	static const char *const bad[] = { "nbds://host/exp", "http://host/disk.img",
					   "file:///var/disk.img", "nbd+tcp://host/e",
					   "NBD://host/e" };
	char json[256];

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(json, sizeof(json),
			 "{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"%s\"}}}",
			 bad[i]);
		expect_fail(json, false, "key 'volumes.d.backing'", "unsupported URI", bad[i],
			    NULL);
	}
}

Test(config, long_strings)
{
	char *name = str_repeat('n', 4097), *desc = str_repeat('x', 4097);
	size_t len = 3 * 4097 + 256;
	char *json = malloc(len);
	struct ft_config *cfg;

	cr_assert_not_null(json);
	snprintf(json, len, "{\"listen\": \"s\", \"volumes\": {\"%s\": {\"backing\": \"f\"}}}",
		 name);
	expect_fail(json, false, "key 'volumes'", "export name longer than 4096 bytes", NULL);

	snprintf(
		json, len,
		"{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"f\", \"description\": \"%s\"}}}",
		desc);
	expect_fail(json, false, "key 'volumes.d.description'", "longer than 4096 bytes", NULL);

	/* Exactly 4096 is the protocol's limit and is allowed for both. */
	name[4096] = '\0';
	desc[4096] = '\0';
	snprintf(
		json, len,
		"{\"listen\": \"s\", \"volumes\": {\"%s\": {\"backing\": \"f\", \"description\": \"%s\"}}}",
		name, desc);
	cfg = parse_ok(json, false);
	cr_assert_eq(strlen(cfg->volumes[0].name), 4096);
	cr_assert_eq(strlen(cfg->volumes[0].description), 4096);
	ft_config_free(cfg);
	free(json);
	free(name);
	free(desc);
}

/* A failure in the second volume must free the first one (ASan checks). */
Test(config, error_after_partial_volumes_frees)
{
	expect_fail("{\"listen\": \"s\", \"metrics\": \"127.0.0.1:1\", \"volumes\": {"
		    " \"a\": {\"backing\": \"f\", \"description\": \"d\", \"domain\": \"x\"},"
		    " \"b\": {\"backing\": \"f\", \"bogus\": 1}}}",
		    false, "key 'volumes.b.bogus'", "unknown key", NULL);
}

/* ---- backing paths (check_paths) ---- */

Test(config, backing_path_checks)
{
	char dir[64], file[128], json[512], missing[128];
	struct ft_config *cfg;

	make_dir(dir, sizeof(dir));
	snprintf(file, sizeof(file), "%s/disk.img", dir);
	snprintf(missing, sizeof(missing), "%s/nope.img", dir);
	write_file(file, "0123456789", 10, 0644);

	snprintf(json, sizeof(json),
		 "{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"%s\"}}}", file);
	cfg = parse_ok(json, true);
	cr_assert_str_eq(cfg->volumes[0].backing, file);
	cr_assert_eq(cfg->volumes[0].backing_kind, FT_BACKING_FILE);
	ft_config_free(cfg);

	snprintf(json, sizeof(json),
		 "{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"%s\"}}}", missing);
	expect_fail(json, true, "key 'volumes.d.backing'", missing, "No such file or directory",
		    NULL);
	/* Without check_paths the same config is fine. */
	cfg = parse_ok(json, false);
	ft_config_free(cfg);

	snprintf(json, sizeof(json),
		 "{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"%s\"}}}", dir);
	expect_fail(json, true, "key 'volumes.d.backing'", dir,
		    "is not a regular file or block device", NULL);

	/* A character device is not a block device. */
	expect_fail("{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"/dev/null\"}}}", true,
		    "key 'volumes.d.backing'", "/dev/null", "is not a regular file or block device",
		    NULL);
	rm_rf(dir);
}

Test(config, readonly_volume_on_read_only_file)
{
	char dir[64], ro[128], none[128], json[512];
	struct ft_config *cfg;

	make_dir(dir, sizeof(dir));
	snprintf(ro, sizeof(ro), "%s/ro.img", dir);
	snprintf(none, sizeof(none), "%s/none.img", dir);
	write_file(ro, "data", 4, 0444);
	write_file(none, "data", 4, 0000);
	/* Owned by nobody so that nobody can still clean up after drop_root(). */
	if (geteuid() == 0)
		cr_assert_eq(chown(dir, 65534, 65534), 0);
	drop_root();

	snprintf(
		json, sizeof(json),
		"{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"%s\", \"readonly\": true}}}",
		ro);
	cfg = parse_ok(json, true);
	cr_assert_eq(cfg->volumes[0].readonly, true);
	ft_config_free(cfg);

	snprintf(
		json, sizeof(json),
		"{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"%s\", \"readonly\": false}}}",
		ro);
	expect_fail(json, true, "key 'volumes.d.backing'", ro, "is not readable and writable",
		    "Permission denied", NULL);

	snprintf(
		json, sizeof(json),
		"{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"%s\", \"readonly\": true}}}",
		none);
	expect_fail(json, true, "key 'volumes.d.backing'", none, "is not readable",
		    "Permission denied", NULL);
	rm_rf(dir);
}

/* ---- ft_config_load ---- */

Test(config, load_missing_file)
{
	struct ft_config *cfg = (struct ft_config *)0x1;
	char err[512] = "";
	int rc;

	rc = ft_config_load("/nonexistent/flashtier.json", &cfg, err, sizeof(err));
	cr_assert_eq(rc, -ENOENT, "rc %d: %s", rc, err);
	cr_assert_null(cfg);
	cr_assert(strstr(err, "/nonexistent/flashtier.json"), "'%s'", err);
	cr_assert(strstr(err, "No such file or directory"), "'%s'", err);
}

Test(config, load_nul_byte)
{
	static const char text[] =
		"{\"listen\": \"s\",\0 \"volumes\": {\"d\": {\"backing\": \"f\"}}}";
	struct ft_config *cfg = (struct ft_config *)0x1;
	char dir[64], path[128], err[512] = "";
	int rc;

	make_dir(dir, sizeof(dir));
	snprintf(path, sizeof(path), "%s/nul.json", dir);
	write_file(path, text, sizeof(text) - 1, 0644);
	rc = ft_config_load(path, &cfg, err, sizeof(err));
	cr_assert_eq(rc, -EINVAL, "rc %d: %s", rc, err);
	cr_assert_null(cfg);
	cr_assert(strstr(err, path), "'%s'", err);
	cr_assert(strstr(err, "NUL byte"), "'%s'", err);
	rm_rf(dir);
}

Test(config, load_valid_and_invalid_files)
{
	char dir[64], path[128], disk[128], text[512], err[512] = "";
	struct ft_config *cfg;
	int rc;

	make_dir(dir, sizeof(dir));
	snprintf(path, sizeof(path), "%s/ft.json", dir);
	snprintf(disk, sizeof(disk), "%s/disk.img", dir);
	write_file(disk, "x", 1, 0644);

	snprintf(
		text, sizeof(text),
		"{\"listen\": \"unix:%s/s.sock\", \"volumes\": {\"disk0\": {\"backing\": \"%s\"}}}\n",
		dir, disk);
	write_file(path, text, strlen(text), 0644);
	rc = ft_config_load(path, &cfg, err, sizeof(err));
	cr_assert_eq(rc, 0, "%s", err);
	cr_assert_str_eq(cfg->path, path);
	cr_assert_str_eq(cfg->volumes[0].backing, disk);
	ft_config_free(cfg);

	/* load checks backing paths. */
	snprintf(text, sizeof(text),
		 "{\"listen\": \"s\", \"volumes\": {\"disk0\": {\"backing\": \"%s/missing\"}}}\n",
		 dir);
	write_file(path, text, strlen(text), 0644);
	rc = ft_config_load(path, &cfg, err, sizeof(err));
	cr_assert_eq(rc, -EINVAL);
	cr_assert_null(cfg);
	cr_assert(strstr(err, path) == err, "message must start with the file: '%s'", err);
	cr_assert(strstr(err, "key 'volumes.disk0.backing'"), "'%s'", err);

	/* Syntax errors name the file with line and column. */
	write_file(path, "{\n\n  \"listen\" \"s\"}", 18, 0644);
	rc = ft_config_load(path, &cfg, err, sizeof(err));
	cr_assert_eq(rc, -EINVAL);
	cr_assert_null(cfg);
	snprintf(text, sizeof(text), "%s:3:", path);
	cr_assert(strstr(err, text) == err, "want '%s...', got '%s'", text, err);

	/* An empty file is invalid JSON, not a crash. */
	write_file(path, "", 0, 0644);
	rc = ft_config_load(path, &cfg, err, sizeof(err));
	cr_assert_eq(rc, -EINVAL);
	cr_assert_null(cfg);
	cr_assert(strstr(err, "invalid JSON"), "'%s'", err);

	/* A directory cannot be loaded. */
	rc = ft_config_load(dir, &cfg, err, sizeof(err));
	cr_assert_lt(rc, 0);
	cr_assert_null(cfg);
	cr_assert(strstr(err, dir), "'%s'", err);
	rm_rf(dir);
}

Test(config, load_large_file)
{
	/* More than one 64 KiB read chunk: a long description padded with spaces. */
	char dir[64], path[128], err[512] = "";
	size_t pad = 200000;
	char *text = malloc(pad + 256);
	struct ft_config *cfg;
	int n, rc;

	cr_assert_not_null(text);
	make_dir(dir, sizeof(dir));
	snprintf(path, sizeof(path), "%s/big.json", dir);
	n = snprintf(text, 256,
		     "{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"nbd://h/e\"}}");
	memset(text + n, ' ', pad);
	memcpy(text + n + pad, "}\n", 2);
	write_file(path, text, (size_t)n + pad + 2, 0644);
	rc = ft_config_load(path, &cfg, err, sizeof(err));
	cr_assert_eq(rc, 0, "%s", err);
	cr_assert_eq(cfg->n_volumes, 1);
	ft_config_free(cfg);
	free(text);
	rm_rf(dir);
}

/* ---- lookup ---- */

Test(config, find_volume)
{
	struct ft_config *cfg = parse_ok("{\"listen\": \"s\", \"volumes\": {"
					 " \"disk0\": {\"backing\": \"a\"},"
					 " \"disk1\": {\"backing\": \"b\"},"
					 " \"\": {\"backing\": \"c\"}}}",
					 false);
	const struct ft_volume_config *v;

	v = ft_config_find_volume(cfg, "disk1");
	cr_assert_not_null(v);
	cr_assert_eq(v, &cfg->volumes[1]);
	cr_assert_str_eq(v->backing, "b");
	v = ft_config_find_volume(cfg, "disk0");
	cr_assert_eq(v, &cfg->volumes[0]);
	v = ft_config_find_volume(cfg, "");
	cr_assert_eq(v, &cfg->volumes[2]);
	cr_assert_null(ft_config_find_volume(cfg, "disk"));
	cr_assert_null(ft_config_find_volume(cfg, "disk00"));
	cr_assert_null(ft_config_find_volume(cfg, "DISK0"));
	ft_config_free(cfg);
}

/* ---- the cache device and per-volume cache policy ---- */

/* A config with the top-level member @cache (may be "") and volume d's extra members @vol. */
static void cache_json(char *out, size_t len, const char *cache, const char *vol)
{
	int n = snprintf(out, len, "{\"listen\": \"s\", %s \"volumes\": {\"d\": {\"backing\": \"f\"%s}}}",
			 cache, vol);

	cr_assert(n > 0 && (size_t)n < len, "test config does not fit");
}

#define CACHE_OK "\"cache\": {\"path\": \"/var/cache/ft.img\", \"size\": \"16M\"},"

Test(config, cache_parsed)
{
	struct ft_config *cfg = parse_ok(
		"{\"listen\": \"s\",\n"
		" \"cache\": {\"path\": \"/dev/nvme0n1p3\", \"size\": \"16M\", \"reformat\": true,\n"
		"             \"error_threshold\": 4},\n"
		" \"volumes\": {\n"
		"  \"dflt\": {\"backing\": \"a\"},\n"
		"  \"wa\": {\"backing\": \"b\", \"cache\": {\"mode\": \"write-around\",\n"
		"          \"sequential_cutoff\": \"4M\", \"quota\": \"25%\"}},\n"
		"  \"wt\": {\"backing\": \"c\", \"cache\": {\"mode\": \"write-through\",\n"
		"          \"sequential_cutoff\": 0, \"quota\": \"2G\"}},\n"
		"  \"off\": {\"backing\": \"d\", \"cache\": {\"mode\": \"none\"}}}}",
		false);

	cr_assert(cfg->has_cache);
	cr_assert_str_eq(cfg->cache.path, "/dev/nvme0n1p3");
	cr_assert_eq(cfg->cache.size, 16ull << 20);
	cr_assert_eq(cfg->cache.reformat, true);
	cr_assert_eq(cfg->cache.error_threshold, 4);
	/* With a cache, write-through is the default, with a 1 MiB cutoff and the whole cache. */
	cr_assert_eq(cfg->volumes[0].policy.mode, FT_CACHE_WRITE_THROUGH);
	cr_assert_eq(cfg->volumes[0].policy.sequential_cutoff, 1u << 20);
	cr_assert_eq(cfg->volumes[0].policy.quota_bytes, 0);
	cr_assert_eq(cfg->volumes[0].policy.quota_percent, 100);
	cr_assert_eq(cfg->volumes[1].policy.mode, FT_CACHE_WRITE_AROUND);
	cr_assert_eq(cfg->volumes[1].policy.sequential_cutoff, 4u << 20);
	cr_assert_eq(cfg->volumes[1].policy.quota_bytes, 0);
	cr_assert_eq(cfg->volumes[1].policy.quota_percent, 25);
	cr_assert_eq(cfg->volumes[2].policy.mode, FT_CACHE_WRITE_THROUGH);
	cr_assert_eq(cfg->volumes[2].policy.sequential_cutoff, 0);
	cr_assert_eq(cfg->volumes[2].policy.quota_bytes, 2ull << 30);
	cr_assert_eq(cfg->volumes[3].policy.mode, FT_CACHE_NONE);
	ft_config_free(cfg);

	/* Defaults of the device: no reformat, threshold 16; no size = use the existing file. */
	cfg = parse_ok("{\"listen\": \"s\", \"cache\": {\"path\": \"c.img\"},"
		       " \"volumes\": {\"d\": {\"backing\": \"f\"}}}",
		       false);
	cr_assert_eq(cfg->cache.size, 0);
	cr_assert_eq(cfg->cache.reformat, false);
	cr_assert_eq(cfg->cache.error_threshold, 16);
	ft_config_free(cfg);

	/* Without a cache, volumes are uncached; "none" is accepted there. */
	cfg = parse_ok("{\"listen\": \"s\", \"volumes\": {\"d\": {\"backing\": \"f\"},"
		       " \"e\": {\"backing\": \"g\", \"cache\": {\"mode\": \"none\"}}}}",
		       false);
	cr_assert_eq(cfg->has_cache, false);
	cr_assert_eq(cfg->volumes[0].policy.mode, FT_CACHE_NONE);
	cr_assert_eq(cfg->volumes[1].policy.mode, FT_CACHE_NONE);
	ft_config_free(cfg);
}

Test(config, cache_mode_needs_cache_device)
{
	char json[512];

	cache_json(json, sizeof(json), "", ", \"cache\": {\"mode\": \"write-through\"}");
	expect_fail(json, false, "key 'volumes.d.cache.mode'", "needs a cache device", NULL);
	cache_json(json, sizeof(json), "", ", \"cache\": {\"mode\": \"write-around\"}");
	expect_fail(json, false, "key 'volumes.d.cache.mode'", "write-around",
		    "needs a cache device", NULL);
	/* An unknown mode, with or without a device. */
	cache_json(json, sizeof(json), CACHE_OK, ", \"cache\": {\"mode\": \"write-sideways\"}");
	expect_fail(json, false, "key 'volumes.d.cache.mode'", "write-sideways", NULL);
	cache_json(json, sizeof(json), CACHE_OK, ", \"cache\": {\"mode\": 1}");
	expect_fail(json, false, "key 'volumes.d.cache.mode'", "must be a string", NULL);
	cache_json(json, sizeof(json), CACHE_OK, ", \"cache\": \"write-through\"");
	expect_fail(json, false, "key 'volumes.d.cache'", "must be an object", NULL);
}

Test(config, cache_bad_quota)
{
	static const char *const bad[] = { "\"0%\"",  "\"101%\"", "\"abc\"", "\"-5%\"",
					   "\"12.5%\"", "\"50%%\"", "\"%\"",    "\"\"",
					   "\"512K\"", "0",	  "-1",	      "true",
					   "\"1X\"" };
	char json[512], vol[128];

	for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
		snprintf(vol, sizeof(vol), ", \"cache\": {\"quota\": %s}", bad[i]);
		cache_json(json, sizeof(json), CACHE_OK, vol);
		expect_fail(json, false, "key 'volumes.d.cache.quota'", NULL);
	}
	/* The boundaries themselves are fine. */
	{
		static const char *const good[] = { "\"1%\"", "\"100%\"", "\"1M\"", "1048576" };

		for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++) {
			struct ft_config *cfg;

			snprintf(vol, sizeof(vol), ", \"cache\": {\"quota\": %s}", good[i]);
			cache_json(json, sizeof(json), CACHE_OK, vol);
			cfg = parse_ok(json, false);
			ft_config_free(cfg);
		}
	}
}

Test(config, cache_bad_sizes)
{
	char json[512];

	cache_json(json, sizeof(json), "\"cache\": {\"path\": \"c\", \"size\": \"1M\"},", "");
	expect_fail(json, false, "key 'cache.size'", "at least 2M", NULL);
	cache_json(json, sizeof(json), "\"cache\": {\"path\": \"c\", \"size\": 1000},", "");
	expect_fail(json, false, "key 'cache.size'", "at least 2M", NULL);
	cache_json(json, sizeof(json), "\"cache\": {\"path\": \"c\", \"size\": \"16Q\"},", "");
	expect_fail(json, false, "key 'cache.size'", NULL);
	cache_json(json, sizeof(json), "\"cache\": {\"path\": \"c\", \"size\": \"\"},", "");
	expect_fail(json, false, "key 'cache.size'", NULL);
	cache_json(json, sizeof(json), "\"cache\": {\"path\": \"c\", \"size\": -16},", "");
	expect_fail(json, false, "key 'cache.size'", NULL);
	cache_json(json, sizeof(json), "\"cache\": {\"path\": \"c\", \"size\": 1.5},", "");
	expect_fail(json, false, "key 'cache.size'", NULL);
	cache_json(json, sizeof(json), CACHE_OK, ", \"cache\": {\"sequential_cutoff\": \"1 M\"}");
	expect_fail(json, false, "key 'volumes.d.cache.sequential_cutoff'", NULL);
	cache_json(json, sizeof(json), CACHE_OK, ", \"cache\": {\"sequential_cutoff\": -1}");
	expect_fail(json, false, "key 'volumes.d.cache.sequential_cutoff'", NULL);
}

Test(config, cache_bad_device_members)
{
	char json[512];

	cache_json(json, sizeof(json), "\"cache\": {\"path\": \"c\", \"sizee\": \"16M\"},", "");
	expect_fail(json, false, "key 'cache.sizee'", "unknown key", NULL);
	cache_json(json, sizeof(json), CACHE_OK, ", \"cache\": {\"quotaa\": \"5%\"}");
	expect_fail(json, false, "key 'volumes.d.cache.quotaa'", "unknown key", NULL);
	cache_json(json, sizeof(json), "\"cache\": {\"size\": \"16M\"},", "");
	expect_fail(json, false, "key 'cache.path'", "is required", NULL);
	cache_json(json, sizeof(json), "\"cache\": {\"path\": \"\"},", "");
	expect_fail(json, false, "key 'cache.path'", NULL);
	cache_json(json, sizeof(json), "\"cache\": \"/var/cache.img\",", "");
	expect_fail(json, false, "key 'cache'", "must be an object", NULL);
	cache_json(json, sizeof(json), "\"cache\": {\"path\": \"c\", \"reformat\": \"yes\"},", "");
	expect_fail(json, false, "key 'cache.reformat'", "true or false", NULL);
	cache_json(json, sizeof(json), "\"cache\": {\"path\": \"c\", \"error_threshold\": 0},", "");
	expect_fail(json, false, "key 'cache.error_threshold'", NULL);
	cache_json(json, sizeof(json),
		   "\"cache\": {\"path\": \"c\", \"error_threshold\": 1000001},", "");
	expect_fail(json, false, "key 'cache.error_threshold'", NULL);
	cache_json(json, sizeof(json), "\"cache\": {\"path\": \"c\", \"error_threshold\": \"4\"},",
		   "");
	expect_fail(json, false, "key 'cache.error_threshold'", NULL);
}

Test(config, cache_path_checks)
{
	char dir[64], file[128], missing[128], cache[512], json[1024];
	struct ft_config *cfg;

	make_dir(dir, sizeof(dir));
	snprintf(file, sizeof(file), "%s/cache.img", dir);
	snprintf(missing, sizeof(missing), "%s/nope.img", dir);
	write_file(file, "", 0, 0644);

	/* A missing file without a size: nothing to create it with. */
	snprintf(cache, sizeof(cache), "\"cache\": {\"path\": \"%s\"},", missing);
	snprintf(json, sizeof(json),
		 "{\"listen\": \"s\", %s \"volumes\": {\"d\": {\"backing\": \"%s\"}}}", cache,
		 file);
	expect_fail(json, true, "key 'cache.path'", missing, "size", NULL);
	/* ...nor is it checked without check_paths. */
	cfg = parse_ok(json, false);
	ft_config_free(cfg);

	/* With a size it will be created. */
	snprintf(cache, sizeof(cache), "\"cache\": {\"path\": \"%s\", \"size\": \"16M\"},",
		 missing);
	snprintf(json, sizeof(json),
		 "{\"listen\": \"s\", %s \"volumes\": {\"d\": {\"backing\": \"%s\"}}}", cache,
		 file);
	cfg = parse_ok(json, true);
	cr_assert_str_eq(cfg->cache.path, missing);
	ft_config_free(cfg);
	cr_assert_eq(access(missing, F_OK), -1, "validation created the cache file");

	/* An existing file is fine without a size. */
	snprintf(cache, sizeof(cache), "\"cache\": {\"path\": \"%s\"},", file);
	snprintf(json, sizeof(json),
		 "{\"listen\": \"s\", %s \"volumes\": {\"d\": {\"backing\": \"%s\"}}}", cache,
		 file);
	cfg = parse_ok(json, true);
	ft_config_free(cfg);

	/* A directory or a character device is not a cache device. */
	snprintf(cache, sizeof(cache), "\"cache\": {\"path\": \"%s\", \"size\": \"16M\"},", dir);
	snprintf(json, sizeof(json),
		 "{\"listen\": \"s\", %s \"volumes\": {\"d\": {\"backing\": \"%s\"}}}", cache,
		 file);
	expect_fail(json, true, "key 'cache.path'", dir, "not a regular file or block device",
		    NULL);
	snprintf(json, sizeof(json),
		 "{\"listen\": \"s\", \"cache\": {\"path\": \"/dev/null\"},"
		 " \"volumes\": {\"d\": {\"backing\": \"%s\"}}}",
		 file);
	expect_fail(json, true, "key 'cache.path'", "/dev/null",
		    "not a regular file or block device", NULL);
	rm_rf(dir);
}

/* ---- write-back ---- */

Test(config, write_back_parsed)
{
	struct ft_config *cfg = parse_ok(
		"{\"listen\": \"s\",\n"
		" \"cache\": {\"path\": \"c.img\", \"size\": \"1G\", \"log_size\": \"10%\",\n"
		"             \"discard_dirty\": true},\n"
		" \"volumes\": {\n"
		"  \"dflt\": {\"backing\": \"a\", \"cache\": {\"mode\": \"write-back\"}},\n"
		"  \"set\": {\"backing\": \"b\", \"cache\": {\"mode\": \"write-back\",\n"
		"          \"dirty_limit\": \"64M\", \"dirty_high\": \"80%\", \"dirty_low\": \"60%\",\n"
		"          \"dirty_max_age\": 2.5, \"destage_bandwidth\": \"50M\"}},\n"
		"  \"pct\": {\"backing\": \"c\", \"cache\": {\"mode\": \"write-back\",\n"
		"          \"dirty_limit\": \"40%\"}}}}",
		false);
	const struct ft_volume_policy *d = &cfg->volumes[0].policy, *s = &cfg->volumes[1].policy,
				      *p = &cfg->volumes[2].policy;

	cr_assert_eq(cfg->cache.log_percent, 10);
	cr_assert_eq(cfg->cache.log_bytes, 0);
	cr_assert(cfg->cache.discard_dirty);
	cr_assert_eq(d->mode, FT_CACHE_WRITE_BACK);
	cr_assert_eq(d->dirty_limit_bytes, 0);
	cr_assert_eq(d->dirty_limit_percent, 0, "default: a fair share, decided at start");
	cr_assert_eq(d->dirty_high_percent, 50);
	cr_assert_eq(d->dirty_low_percent, 25);
	cr_assert_eq(d->dirty_max_age_ms, 30000);
	cr_assert_eq(d->destage_bandwidth, 0);
	cr_assert_eq(s->dirty_limit_bytes, 64ull << 20);
	cr_assert_eq(s->dirty_high_percent, 80);
	cr_assert_eq(s->dirty_low_percent, 60);
	cr_assert_eq(s->dirty_max_age_ms, 2500);
	cr_assert_eq(s->destage_bandwidth, 50ull << 20);
	cr_assert_eq(p->dirty_limit_percent, 40);
	ft_config_free(cfg);

	cfg = parse_ok("{\"listen\": \"s\", \"cache\": {\"path\": \"c.img\", \"log_size\": \"8M\"},"
		       " \"volumes\": {\"d\": {\"backing\": \"f\"}}}",
		       false);
	cr_assert_eq(cfg->cache.log_bytes, 8ull << 20);
	cr_assert_eq(cfg->cache.log_percent, 0);
	cr_assert_eq(cfg->cache.discard_dirty, false);
	ft_config_free(cfg);
}

Test(config, write_back_bad_values)
{
	static const struct {
		const char *vol, *needle;
	} cases[] = {
		{ ", \"cache\": {\"mode\": \"write-through\", \"dirty_high\": \"50%\"}",
		  "only applies to \"mode\": \"write-back\"" },
		{ ", \"cache\": {\"mode\": \"write-back\", \"dirty_high\": \"30%\", \"dirty_low\": "
		  "\"30%\"}",
		  "below dirty_high" },
		{ ", \"cache\": {\"mode\": \"write-back\", \"dirty_high\": 50}", "percentage" },
		{ ", \"cache\": {\"mode\": \"write-back\", \"dirty_low\": \"0%\"}", "percentage" },
		{ ", \"cache\": {\"mode\": \"write-back\", \"dirty_limit\": \"1M\"}", "at least 4M" },
		{ ", \"cache\": {\"mode\": \"write-back\", \"dirty_limit\": \"150%\"}", "percentage" },
		{ ", \"cache\": {\"mode\": \"write-back\", \"dirty_max_age\": 0}", "seconds" },
		{ ", \"cache\": {\"mode\": \"write-back\", \"dirty_max_age\": \"30s\"}", "seconds" },
		{ ", \"cache\": {\"mode\": \"write-back\", \"destage_bandwidth\": \"10K\"}",
		  "at least 1M" },
		{ ", \"cache\": {\"mode\": \"write-back\", \"dirty_age\": 3}", "dirty_age" },
	};
	char json[1024];

	for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
		cache_json(json, sizeof(json), CACHE_OK, cases[i].vol);
		expect_fail(json, false, "volumes.d.cache.", cases[i].needle, NULL);
	}
	cache_json(json, sizeof(json),
		   "\"cache\": {\"path\": \"/var/cache/ft.img\", \"log_size\": \"2M\"},", "");
	expect_fail(json, false, "key 'cache.log_size'", "at least 4M", NULL);
	cache_json(json, sizeof(json),
		   "\"cache\": {\"path\": \"/var/cache/ft.img\", \"log_size\": \"95%\"},", "");
	expect_fail(json, false, "key 'cache.log_size'", "at most 90%", NULL);
	cache_json(json, sizeof(json),
		   "\"cache\": {\"path\": \"/var/cache/ft.img\", \"discard_dirty\": 1},", "");
	expect_fail(json, false, "key 'cache.discard_dirty'", "true or false", NULL);
}
