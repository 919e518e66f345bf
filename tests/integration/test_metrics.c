/* SPDX-License-Identifier: MIT */
/*
 * The /metrics endpoint of a live agent: valid Prometheus text format
 * (checked by promtool itself), the documented names and labels, exact
 * counts after known I/O, consistent histograms, escaping of awkward label
 * values, and the HTTP surface (404 elsewhere, 405 for other methods).
 */
#include "flashtier/version.h"
#include "nbd_client.h"

#define MiB	  (1024 * 1024)
#define DISK_SIZE (16 * MiB)

/* An export name and a domain with a quote, a backslash (and a newline). */
#define WEIRD_NAME_JSON	  "we\\\"ird\\\\name" /* we"ird\name as JSON */
#define WEIRD_NAME	  "we\"ird\\name"
#define WEIRD_NAME_PROM	  "we\\\"ird\\\\name"  /* escaped label value */
#define WEIRD_DOMAIN_JSON "dom\\\"a\\\\in\\nx" /* dom"a\in<LF>x */
#define WEIRD_DOMAIN_PROM "dom\\\"a\\\\in\\nx"

static struct ft_agent agent;
static char tdir[256];
static pid_t kit;

static void cleanup(void)
{
	th_env_teardown(&agent, &kit, tdir);
}

TestSuite(metrics, .fini = cleanup, .timeout = 60);

/* The body of an HTTP response (after the blank line), or NULL. */
static const char *http_body(const char *resp)
{
	const char *p = strstr(resp, "\r\n\r\n");

	return p ? p + 4 : NULL;
}

/* The status code of an HTTP response, or -1. */
static int http_status(const char *resp)
{
	int code;

	if (sscanf(resp, "HTTP/%*d.%*d %d", &code) != 1)
		return -1;
	return code;
}

/* Send @req verbatim and return the whole response (malloc'd). */
static char *http_raw(int port, const char *req)
{
	struct sockaddr_in sa = { .sin_family = AF_INET,
				  .sin_port = htons((uint16_t)port),
				  .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	int fd = socket(AF_INET, SOCK_STREAM, 0);
	size_t cap = 1 << 16, len = 0;
	char *buf = malloc(cap);
	ssize_t n;

	cr_assert_not_null(buf);
	cr_assert_geq(fd, 0);
	cr_assert_eq(connect(fd, (struct sockaddr *)&sa, sizeof(sa)), 0, "%s", strerror(errno));
	cr_assert_eq(write(fd, req, strlen(req)), (ssize_t)strlen(req));
	while ((n = read(fd, buf + len, cap - len - 1)) > 0)
		len += (size_t)n;
	close(fd);
	buf[len] = '\0';
	return buf;
}

/* Sample value for the exact series @series ("name{labels}"), asserting it exists. */
static double sample(const char *text, const char *series)
{
	double v = th_metric(text, series);

	cr_assert_geq(v, 0, "no sample %s in:\n%s", series, text);
	return v;
}

/* Write @body to a file and run promtool's linter on it; it must say nothing. */
static void promtool_check(const char *body)
{
	char path[320], out[320], cmd[800], *complaints;
	FILE *f;
	size_t n;
	int rc;

	snprintf(path, sizeof(path), "%s/metrics.txt", tdir);
	snprintf(out, sizeof(out), "%s/promtool.out", tdir);
	f = fopen(path, "w");
	cr_assert_not_null(f);
	fputs(body, f);
	fclose(f);
	snprintf(cmd, sizeof(cmd), "promtool check metrics < '%s' > '%s' 2>&1", path, out);
	rc = system(cmd);
	complaints = calloc(1, 65536);
	cr_assert_not_null(complaints);
	f = fopen(out, "r");
	cr_assert_not_null(f);
	n = fread(complaints, 1, 65535, f);
	complaints[n] = '\0';
	fclose(f);
	cr_assert(WIFEXITED(rc) && WEXITSTATUS(rc) == 0, "promtool check metrics failed (%d):\n%s",
		  rc, complaints);
	cr_assert_str_empty(complaints, "promtool complains:\n%s", complaints);
	free(complaints);
}

/*
 * Every histogram series of flashtier_request_duration_seconds: bucket
 * bounds strictly increase and end in +Inf, counts never decrease, and
 * _count equals the +Inf bucket. Returns the number of series seen.
 */
struct hseries {
	char labels[512];
	int buckets;
	double last_le, last_cum, inf;
	bool has_inf, has_count, has_sum;
};

static int check_histograms(const char *body)
{
	static struct hseries s[64];
	int n = 0, nbuckets = -1;
	const char *line = body;
	const char *bname = "flashtier_request_duration_seconds_bucket{";
	const char *cname = "flashtier_request_duration_seconds_count{";
	const char *sname = "flashtier_request_duration_seconds_sum{";

	memset(s, 0, sizeof(s));
	while (line && *line) {
		const char *eol = strchr(line, '\n');
		size_t len = eol ? (size_t)(eol - line) : strlen(line);
		char l[1024];

		cr_assert_lt(len, sizeof(l));
		memcpy(l, line, len);
		l[len] = '\0';
		line = eol ? eol + 1 : NULL;

		if (strncmp(l, bname, strlen(bname)) == 0) {
			char *le = strstr(l, ",le=\""), *q, *endp;
			char labels[512];
			double lev, v;
			int i;

			cr_assert_not_null(le, "bucket without le: %s", l);
			cr_assert_lt((size_t)(le - l) - strlen(bname), sizeof(labels));
			snprintf(labels, sizeof(labels), "%.*s", (int)(le - l - strlen(bname)),
				 l + strlen(bname));
			le += 5;
			q = strchr(le, '"');
			cr_assert_not_null(q, "%s", l);
			*q = '\0';
			lev = strcmp(le, "+Inf") == 0 ? 1.0 / 0.0 : strtod(le, &endp);
			cr_assert(q[1] == '}' && q[2] == ' ', "%s", l);
			v = strtod(q + 3, &endp);
			cr_assert(*endp == '\0', "trailing junk in: %s", l);
			for (i = 0; i < n; i++)
				if (strcmp(s[i].labels, labels) == 0)
					break;
			if (i == n) {
				cr_assert_lt(n, 64);
				snprintf(s[n].labels, sizeof(s[n].labels), "%s", labels);
				s[n].last_le = -1;
				n++;
			}
			cr_assert(!s[i].has_inf, "bucket after +Inf: %s", l);
			cr_assert_gt(lev, s[i].last_le, "le not increasing: %s", l);
			cr_assert_geq(v, s[i].last_cum,
				      "bucket counts decrease (not cumulative): %s", l);
			s[i].last_le = lev;
			s[i].last_cum = v;
			s[i].buckets++;
			if (strcmp(le, "+Inf") == 0) {
				s[i].has_inf = true;
				s[i].inf = v;
			}
		} else if (strncmp(l, cname, strlen(cname)) == 0 ||
			   strncmp(l, sname, strlen(sname)) == 0) {
			bool is_count = l[strlen("flashtier_request_duration_seconds_")] == 'c';
			char *lab = strchr(l, '{') + 1, *close = strstr(lab, "} ");
			int i;

			cr_assert_not_null(close, "%s", l);
			*close = '\0';
			for (i = 0; i < n; i++)
				if (strcmp(s[i].labels, lab) == 0)
					break;
			cr_assert_lt(i, n, "_count/_sum before its buckets: %s", lab);
			cr_assert(s[i].has_inf, "no +Inf bucket for {%s}", lab);
			if (is_count) {
				double v = strtod(close + 2, NULL);

				cr_assert_eq(v, s[i].inf, "_count %g != +Inf bucket %g for {%s}", v,
					     s[i].inf, lab);
				s[i].has_count = true;
			} else {
				cr_assert_geq(strtod(close + 2, NULL), 0.0);
				s[i].has_sum = true;
			}
		}
	}
	for (int i = 0; i < n; i++) {
		cr_assert(s[i].has_inf && s[i].has_count && s[i].has_sum,
			  "incomplete histogram {%s}", s[i].labels);
		if (nbuckets < 0)
			nbuckets = s[i].buckets;
		cr_assert_eq(s[i].buckets, nbuckets, "bucket layouts differ");
	}
	cr_assert_gt(nbuckets, 2, "histograms have too few buckets");
	return n;
}

/* Fetch /metrics: status 200, the exposition content type, and the body (malloc'd). */
static char *scrape(void)
{
	char *resp = th_http_get(agent.metrics_port, "/metrics"), *body;

	cr_assert_eq(http_status(resp), 200, "%s", resp);
	cr_assert(strstr(resp, "Content-Type: text/plain; version=0.0.4"), "content type: %s",
		  resp);
	body = strdup(http_body(resp));
	cr_assert_not_null(body);
	free(resp);
	return body;
}

static void start_three_volumes(void)
{
	char disk[320], vols[1400];

	th_mkdtemp(tdir, sizeof(tdir));
	th_make_file(tdir, "disk.img", DISK_SIZE, disk, sizeof(disk));
	snprintf(vols, sizeof(vols),
		 "{ \"disk0\": { \"backing\": \"%s\", \"domain\": \"vm-one\" },"
		 "  \"" WEIRD_NAME_JSON
		 "\": { \"backing\": \"%s\", \"domain\": \"" WEIRD_DOMAIN_JSON "\","
		 "                           \"readonly\": true },"
		 "  \"nodom\": { \"backing\": \"%s\", \"readonly\": true } }",
		 disk, disk, disk);
	ft_agent_start_in(&agent, tdir, vols, "");
}

Test(metrics, promtool_clean_and_exact_counts)
{
	enum { R = 10, W = 5 };
	char buf[8192], series[512], *body;
	struct nbd_handle *h, *hw;
	int nseries;

	start_three_volumes();
	h = th_nbd_connect(&agent, "disk0");
	hw = th_nbd_connect(&agent, WEIRD_NAME);

	/* Known I/O: R reads of 4 KiB, W writes of 8 KiB, 1 flush, 2 trims, 1 zero. */
	memset(buf, 0x3c, sizeof(buf));
	for (int i = 0; i < W; i++)
		cr_assert_eq(nbd_pwrite(h, buf, 8192, (uint64_t)i * 8192, 0), 0, "%s",
			     nbd_get_error());
	for (int i = 0; i < R; i++)
		cr_assert_eq(nbd_pread(h, buf, 4096, (uint64_t)i * 4096, 0), 0, "%s",
			     nbd_get_error());
	cr_assert_eq(nbd_flush(h, 0), 0, "%s", nbd_get_error());
	cr_assert_eq(nbd_trim(h, 65536, MiB, 0), 0, "%s", nbd_get_error());
	cr_assert_eq(nbd_trim(h, 65536, 2 * MiB, 0), 0, "%s", nbd_get_error());
	cr_assert_eq(nbd_zero(h, 4096, 3 * MiB, 0), 0, "%s", nbd_get_error());
	for (int i = 0; i < 3; i++)
		cr_assert_eq(nbd_pread(hw, buf, 512, 0, 0), 0, "%s", nbd_get_error());
	/* A rejected request: writing to a read-only export. */
	nbd_set_strict_mode(hw, 0);
	cr_assert_eq(nbd_pwrite(hw, buf, 512, 0, 0), -1, "write to a read-only export worked");

	body = scrape();
	promtool_check(body);

#define S(name, vol, dom, op) name "{volume=\"" vol "\",domain=\"" dom "\",op=\"" op "\"}"
	cr_expect_eq(sample(body, S("flashtier_requests_total", "disk0", "vm-one", "read")), R);
	cr_expect_eq(sample(body, S("flashtier_requests_total", "disk0", "vm-one", "write")), W);
	cr_expect_eq(sample(body, S("flashtier_requests_total", "disk0", "vm-one", "flush")), 1);
	cr_expect_eq(sample(body, S("flashtier_requests_total", "disk0", "vm-one", "trim")), 2);
	cr_expect_eq(sample(body, S("flashtier_requests_total", "disk0", "vm-one", "write_zeroes")),
		     1);
	cr_expect_eq(sample(body, S("flashtier_requests_total", "disk0", "vm-one", "cache")), 0);
	cr_expect_eq(sample(body, S("flashtier_request_bytes_total", "disk0", "vm-one", "read")),
		     R * 4096);
	cr_expect_eq(sample(body, S("flashtier_request_bytes_total", "disk0", "vm-one", "write")),
		     W * 8192);
	cr_expect_eq(sample(body, S("flashtier_request_bytes_total", "disk0", "vm-one", "trim")),
		     2 * 65536);
	cr_expect_eq(sample(body, S("flashtier_request_errors_total", "disk0", "vm-one", "read")),
		     0);
	/* Histogram count agrees with the request counter. */
	cr_expect_eq(sample(body, S("flashtier_request_duration_seconds_count", "disk0", "vm-one",
				    "read")),
		     R);
	cr_expect_eq(sample(body, S("flashtier_request_duration_seconds_count", "disk0", "vm-one",
				    "write")),
		     W);
	/* Escaped label values: quote, backslash and newline. */
	cr_expect_eq(sample(body, S("flashtier_requests_total", WEIRD_NAME_PROM, WEIRD_DOMAIN_PROM,
				    "read")),
		     3, "%s", body);
	cr_expect_eq(sample(body, "flashtier_invalid_requests_total{volume=\"" WEIRD_NAME_PROM
				  "\",domain=\"" WEIRD_DOMAIN_PROM "\"}"),
		     1);
	cr_expect_eq(sample(body,
			    "flashtier_invalid_requests_total{volume=\"disk0\",domain=\"vm-one\"}"),
		     0);
	cr_expect_eq(
		sample(body, "flashtier_volume_size_bytes{volume=\"disk0\",domain=\"vm-one\"}"),
		DISK_SIZE);
	cr_expect_eq(sample(body, "flashtier_connections{volume=\"disk0\",domain=\"vm-one\"}"), 1);
	cr_expect_eq(
		sample(body, "flashtier_connections_total{volume=\"disk0\",domain=\"vm-one\"}"), 1);
	cr_expect_eq(
		sample(body, "flashtier_requests_in_flight{volume=\"disk0\",domain=\"vm-one\"}"),
		0);
	snprintf(series, sizeof(series), "flashtier_build_info{version=\"%s\"}", FLASHTIER_VERSION);
	cr_expect_eq(sample(body, series), 1);
	cr_expect_geq(sample(body, "flashtier_accepted_connections_total"), 2);
	/* The volume without a domain is exported too (with an empty domain label). */
	cr_expect(strstr(body, "\nflashtier_requests_total{volume=\"nodom\","), "%s", body);
	/* No raw newline or unescaped quote leaked into a label. */
	cr_expect_null(strstr(body, "dom\"a"), "unescaped quote in a label value");
	cr_expect_null(strstr(body, "in\nx"), "raw newline in a label value");
#undef S

	/* Every sample line is ours and well-formed: NAME{...} VALUE or NAME VALUE. */
	for (const char *l = body; *l;) {
		const char *eol = strchr(l, '\n');

		cr_assert_not_null(eol, "last line lacks a newline");
		if (*l != '#')
			cr_assert(strncmp(l, "flashtier_", 10) == 0, "foreign sample: %.*s",
				  (int)(eol - l), l);
		l = eol + 1;
	}

	nseries = check_histograms(body);
	cr_assert_eq(nseries, 3 * 6, "histogram series: %d (3 volumes x 6 operations)", nseries);
	free(body);

	/* Connections go back to 0 once the clients leave. */
	th_nbd_disconnect(h);
	th_nbd_disconnect(hw);
	{
		double end = th_now_ms() + 5000;

		for (;;) {
			body = scrape();
			if (th_metric(
				    body,
				    "flashtier_connections{volume=\"disk0\",domain=\"vm-one\"}") ==
			    0)
				break;
			free(body);
			cr_assert_lt(th_now_ms(), end, "connections gauge stuck");
			th_sleep_ms(10);
		}
		promtool_check(body);
		free(body);
	}
	cr_assert_eq(ft_agent_stop(&agent), 0);
}

Test(metrics, http_surface)
{
	char *resp;
	const char *paths[] = { "/",	  "/metric",   "/metrics/", "/metrics/x",
				"/other", "/metricsx", NULL };

	start_three_volumes();
	for (int i = 0; paths[i]; i++) {
		resp = th_http_get(agent.metrics_port, paths[i]);
		cr_expect_eq(http_status(resp), 404, "GET %s: %s", paths[i], resp);
		free(resp);
	}
	resp = http_raw(agent.metrics_port, "POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n");
	cr_expect_eq(http_status(resp), 405, "POST /metrics: %s", resp);
	free(resp);
	resp = http_raw(agent.metrics_port, "HEAD /metrics HTTP/1.0\r\n\r\n");
	cr_expect_eq(http_status(resp), 200, "HEAD /metrics: %s", resp);
	free(resp);
	/* Still serving after all that. */
	resp = scrape();
	free(resp);
	cr_assert(ft_agent_alive(&agent));
	cr_assert_eq(ft_agent_stop(&agent), 0);
}

/* requests_in_flight counts requests held by a slow store, then returns to 0. */
Test(metrics, in_flight_rises_and_returns_to_zero)
{
	enum { N = 6 };
	char kit_sock[320], vols[700], *bufs[N], *body;
	int64_t cookies[N];
	struct nbd_handle *h;
	const char *g = "flashtier_requests_in_flight{volume=\"slow\",domain=\"vm-slow\"}";
	double end;

	th_mkdtemp(tdir, sizeof(tdir));
	{
		const char *args[] = { "--filter=delay", "memory", "64M", "rdelay=800ms", NULL };

		kit = th_nbdkit_start(tdir, "slow", kit_sock, sizeof(kit_sock), args);
	}
	snprintf(
		vols, sizeof(vols),
		"{ \"slow\": { \"backing\": \"nbd+unix:///?socket=%s\", \"domain\": \"vm-slow\" } }",
		kit_sock);
	ft_agent_start_in(&agent, tdir, vols, "");
	h = th_nbd_connect(&agent, "slow");
	for (int i = 0; i < N; i++) {
		bufs[i] = malloc(4096);
		cr_assert_not_null(bufs[i]);
		cookies[i] =
			nbd_aio_pread(h, bufs[i], 4096, (uint64_t)i * 4096, NBD_NULL_COMPLETION, 0);
		cr_assert_gt(cookies[i], 0, "%s", nbd_get_error());
	}
	th_nbd_send_queued(h);
	end = th_now_ms() + 700;
	for (;;) {
		double v;

		body = scrape();
		v = th_metric(body, g);
		if (v == N)
			break;
		free(body);
		cr_assert_lt(th_now_ms(), end, "in_flight never reached %d (last %g)", N, v);
		th_sleep_ms(5);
	}
	/* A scrape taken mid-flight is valid too. */
	promtool_check(body);
	check_histograms(body);
	free(body);

	th_nbd_wait_idle(h, 10000, "slow reads never finished");
	for (int i = 0; i < N; i++) {
		cr_assert_eq(nbd_aio_command_completed(h, (uint64_t)cookies[i]), 1, "%s",
			     nbd_get_error());
		free(bufs[i]);
	}
	body = scrape();
	cr_assert_eq(th_metric(body, g), 0, "in_flight did not return to 0");
	cr_assert_eq(
		th_metric(
			body,
			"flashtier_requests_total{volume=\"slow\",domain=\"vm-slow\",op=\"read\"}"),
		N);
	/* Each read took >= 0.8 s: none can sit in a bucket below 0.5 s. */
	cr_assert_eq(
		th_metric(
			body,
			"flashtier_request_duration_seconds_bucket{volume=\"slow\",domain=\"vm-slow\",op=\"read\",le=\"0.5\"}"),
		0, "%s", body);
	cr_assert_eq(
		th_metric(
			body,
			"flashtier_request_duration_seconds_bucket{volume=\"slow\",domain=\"vm-slow\",op=\"read\",le=\"+Inf\"}"),
		N);
	cr_assert_geq(
		th_metric(
			body,
			"flashtier_request_duration_seconds_sum{volume=\"slow\",domain=\"vm-slow\",op=\"read\"}"),
		N * 0.75);
	free(body);
	th_nbd_disconnect(h);
	cr_assert_eq(ft_agent_stop(&agent), 0);
}
