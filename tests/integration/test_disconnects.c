/* SPDX-License-Identifier: MIT */
/*
 * Clients that vanish at every phase of the protocol, driven over raw
 * sockets: during the handshake, between options, mid request, mid
 * payload, and with replies still owed. For each one:
 *  - a libnbd client connected before the disconnect keeps working
 *    during and after it (its data is checked);
 *  - a new client can connect and do I/O;
 *  - flashtierd stays alive, its connection gauges return to the number
 *    of open clients, and SIGTERM still ends it with exit status 0.
 */
#include "nbd_client.h"

#define VOL_SIZE    (64ull << 20)
#define MAX_PAYLOAD (32u << 20)

struct env {
	struct ft_agent a;
	char dir[256];
	char file[320];
	char kit_sock[320];
	pid_t kit;
};

static struct env g_env;

/* Runs after every test, also one an assertion aborted: leave nothing running. */
static void env_teardown(void)
{
	th_env_teardown(&g_env.a, &g_env.kit, g_env.dir);
}

/* A hung agent fails the test instead of blocking the run. */
TestSuite(disconnects, .fini = env_teardown, .timeout = 60);

/* Two volumes: "v" on a file, "n" on nbdkit's memory plugin. */
static void env_start(struct env *e)
{
	static const char *const args[] = { "memory", "64M", NULL };
	char vols[1024];

	memset(e, 0, sizeof(*e));
	th_mkdtemp(e->dir, sizeof(e->dir));
	th_make_file(e->dir, "disk.img", (long long)VOL_SIZE, e->file, sizeof(e->file));
	e->kit = th_nbdkit_start(e->dir, "kit", e->kit_sock, sizeof(e->kit_sock), args);
	snprintf(vols, sizeof(vols),
		 "{ \"v\": { \"backing\": \"%s\" }, "
		 "\"n\": { \"backing\": \"nbd+unix:///?socket=%s\" } }",
		 e->file, e->kit_sock);
	ft_agent_start_in(&e->a, e->dir, vols, "");
}

static void env_finish(struct env *e)
{
	cr_assert(ft_agent_alive(&e->a), "flashtierd died");
	th_env_finish(&e->a, &e->kit, e->dir);
}

/* ---- metrics ---- */

/* The agent tears connections down asynchronously: gauges are polled for up to 5 s. */
#define GAUGE_WAIT_MS 5000

#define CONNS_V	      "flashtier_connections{volume=\"v\",domain=\"\"}"
#define CONNS_N	      "flashtier_connections{volume=\"n\",domain=\"\"}"
#define CONNS_TOTAL_V "flashtier_connections_total{volume=\"v\",domain=\"\"}"
#define CONNS_TOTAL_N "flashtier_connections_total{volume=\"n\",domain=\"\"}"
#define ACCEPTED      "flashtier_accepted_connections_total"
#define HS_FAILURES   "flashtier_handshake_failures_total"

/* ---- a libnbd client whose I/O is checked ---- */

struct client {
	struct nbd_handle *h;
	uint64_t base; /* this client's private area */
	uint32_t rounds;
};

#define IO_LEN (64u * 1024)

static void client_open(struct client *c, struct env *e, const char *export, uint64_t base)
{
	char uri[512];

	c->h = th_nbd_new();
	c->base = base;
	c->rounds = 0;
	th_uri(&e->a, export, uri, sizeof(uri));
	cr_assert_eq(nbd_connect_uri(c->h, uri), 0, "connect %s: %s", uri, nbd_get_error());
}

/* One more round: write a new block, then read back every block so far. */
static void client_io(struct client *c, const char *when)
{
	static uint8_t buf[IO_LEN], want[IO_LEN];
	uint64_t off = c->base + (uint64_t)c->rounds * IO_LEN;

	cr_assert_lt(c->rounds, 64);
	th_fill(buf, IO_LEN, off, c->rounds + 1);
	cr_assert_eq(nbd_pwrite(c->h, buf, IO_LEN, off, 0), 0, "%s: write: %s", when,
		     nbd_get_error());
	c->rounds++;
	for (uint32_t r = 0; r < c->rounds; r++) {
		off = c->base + (uint64_t)r * IO_LEN;
		th_fill(want, IO_LEN, off, r + 1);
		cr_assert_eq(nbd_pread(c->h, buf, IO_LEN, off, 0), 0, "%s: read: %s", when,
			     nbd_get_error());
		cr_assert_arr_eq(buf, want, IO_LEN, "%s: wrong data at %llu", when,
				 (unsigned long long)off);
	}
	cr_assert_eq(nbd_flush(c->h, 0), 0, "%s: flush: %s", when, nbd_get_error());
}

static void client_close(struct client *c)
{
	th_nbd_disconnect(c->h);
	c->h = NULL;
}

/* ---- the scenarios ---- */

enum phase {
	PH_CLOSE_AT_ONCE,
	PH_AFTER_GREETING,
	PH_MID_CLIENT_FLAGS,
	PH_MID_OPT_HEADER,
	PH_MID_OPT_DATA,
	PH_AFTER_OPTION, /* a complete option (LIST) answered, then gone */
	PH_AFTER_GO,
	PH_MID_REQUEST_HEADER,
	PH_MID_WRITE_PAYLOAD,
	PH_READS_IN_FLIGHT,
	PH_BIG_WRITE_IN_FLIGHT,
	PH_MID_BIG_WRITE_PAYLOAD,
};

/* Where the raw client's writes land, [24 MiB, 56 MiB): never touched by anyone else. */
#define RAW_OFF (24ull << 20)

/*
 * Take a raw connection to @ph on @export and return its descriptor,
 * still open. Returns whether it reached transmission.
 */
static bool raw_to_phase(struct env *e, enum phase ph, const char *export, int *fdp)
{
	static uint8_t payload[MAX_PAYLOAD];
	int fd = th_raw_open(e->a.sock);

	*fdp = fd;
	if (ph == PH_CLOSE_AT_ONCE)
		return false;
	th_raw_greeting(fd);
	if (ph == PH_AFTER_GREETING)
		return false;
	if (ph == PH_MID_CLIENT_FLAGS) {
		uint32_t f = htobe32(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES);

		th_raw_write(fd, &f, 2);
		return false;
	}
	th_raw_client_flags(fd);
	if (ph == PH_MID_OPT_HEADER) {
		struct nbd_option_header h = { htobe64(NBD_IHAVEOPT), htobe32(NBD_OPT_GO),
					       htobe32(7) };

		th_raw_write(fd, &h, 8);
		return false;
	}
	if (ph == PH_MID_OPT_DATA) {
		uint8_t data[64];
		uint32_t len = th_raw_go_data(export, data);
		struct nbd_option_header h = { htobe64(NBD_IHAVEOPT), htobe32(NBD_OPT_GO),
					       htobe32(len) };

		th_raw_write(fd, &h, sizeof(h));
		th_raw_write(fd, data, 3);
		return false;
	}
	if (ph == PH_AFTER_OPTION) {
		th_raw_option(fd, NBD_OPT_LIST, NULL, 0);
		for (;;) {
			struct nbd_option_reply r;
			uint8_t buf[4096];

			th_raw_read(fd, &r, sizeof(r));
			cr_assert_eq(be64toh(r.magic), NBD_REP_MAGIC);
			cr_assert_leq(be32toh(r.length), sizeof(buf));
			th_raw_read(fd, buf, be32toh(r.length));
			if (be32toh(r.type) == NBD_REP_ACK)
				break;
			cr_assert_eq(be32toh(r.type), NBD_REP_SERVER);
		}
		return false;
	}
	th_raw_go(fd, export);
	switch (ph) {
	case PH_AFTER_GO:
		break;
	case PH_MID_REQUEST_HEADER: {
		struct nbd_request r = { .magic = htobe32(NBD_REQUEST_MAGIC),
					 .type = htobe16(NBD_CMD_READ),
					 .length = htobe32(4096) };

		th_raw_write(fd, &r, 10);
		break;
	}
	case PH_MID_WRITE_PAYLOAD:
		th_fill(payload, 64 * 1024, RAW_OFF, 999);
		th_raw_request(fd, NBD_CMD_WRITE, 0, 1, RAW_OFF, 1u << 20);
		th_raw_write(fd, payload, 64 * 1024);
		break;
	case PH_READS_IN_FLIGHT:
		/* Sent, and never read: the replies have nowhere to go. */
		for (int i = 0; i < 16; i++)
			th_raw_request(fd, NBD_CMD_READ, 0, 100 + (uint64_t)i, (uint64_t)i << 20,
				       1u << 20);
		break;
	case PH_BIG_WRITE_IN_FLIGHT:
		th_fill(payload, MAX_PAYLOAD, 0, 998);
		th_raw_request(fd, NBD_CMD_WRITE, 0, 2, RAW_OFF, MAX_PAYLOAD);
		th_raw_write(fd, payload, MAX_PAYLOAD);
		break;
	case PH_MID_BIG_WRITE_PAYLOAD:
		th_fill(payload, MAX_PAYLOAD, 0, 997);
		th_raw_request(fd, NBD_CMD_WRITE, 0, 3, RAW_OFF, MAX_PAYLOAD);
		th_raw_write(fd, payload, MAX_PAYLOAD / 2);
		break;
	default:
		break;
	}
	return true;
}

/* Every byte of [off, off+len) on @h reads as zero. */
static void expect_zero_area(struct nbd_handle *h, uint64_t off, uint32_t len, const char *why)
{
	uint8_t *buf = malloc(len);

	cr_assert_not_null(buf);
	cr_assert_eq(nbd_pread(h, buf, len, off, 0), 0, "%s", nbd_get_error());
	for (uint32_t i = 0; i < len; i++)
		if (buf[i])
			cr_assert_fail("%s: byte %llu is 0x%02x", why,
				       (unsigned long long)(off + i), buf[i]);
	free(buf);
}

static void disconnect_at(enum phase ph, const char *export)
{
	struct env *e = &g_env;
	struct client obs, obs_other, fresh;
	const char *other = strcmp(export, "v") == 0 ? "n" : "v";
	const char *conns = strcmp(export, "v") == 0 ? CONNS_V : CONNS_N;
	const char *total = strcmp(export, "v") == 0 ? CONNS_TOTAL_V : CONNS_TOTAL_N;
	bool transmission;
	int fd;

	env_start(e);
	/* Startup probed the socket once: one accepted connection, one "failed" handshake. */
	th_wait_metric(&e->a, HS_FAILURES, 1, GAUGE_WAIT_MS);
	client_open(&obs, e, export, 0);
	client_open(&obs_other, e, other, 0);
	client_io(&obs, "before");
	client_io(&obs_other, "before");
	th_wait_metric(&e->a, conns, 1, GAUGE_WAIT_MS);

	transmission = raw_to_phase(e, ph, export, &fd);
	client_io(&obs, "during");
	client_io(&obs_other, "during");
	if (transmission)
		th_wait_metric(&e->a, conns, 2, GAUGE_WAIT_MS);
	close(fd);
	client_io(&obs, "after");
	client_io(&obs_other, "after");

	/* The gauges come back to the clients still open; the counters are exact. */
	th_wait_metric(&e->a, conns, 1, GAUGE_WAIT_MS);
	th_wait_metric(&e->a, ACCEPTED, 4, GAUGE_WAIT_MS);
	th_wait_metric(&e->a, HS_FAILURES, transmission ? 1 : 2, GAUGE_WAIT_MS);
	cr_expect_eq(th_agent_metric(&e->a, total), transmission ? 2 : 1);
	cr_expect_eq(th_agent_metric(&e->a, strcmp(export, "v") == 0 ? CONNS_N : CONNS_V), 1);

	/* An incomplete WRITE must not have been applied, not even in part. */
	if (ph == PH_MID_WRITE_PAYLOAD)
		expect_zero_area(obs.h, RAW_OFF, 1u << 20, "a half-received WRITE");
	if (ph == PH_MID_BIG_WRITE_PAYLOAD)
		expect_zero_area(obs.h, RAW_OFF, MAX_PAYLOAD, "a half-received WRITE");
	cr_expect_eq(
		th_agent_metric(&e->a,
				strcmp(export, "v") == 0
					? "flashtier_requests_in_flight{volume=\"v\",domain=\"\"}"
					: "flashtier_requests_in_flight{volume=\"n\",domain=\"\"}"),
		0, "requests still counted in flight after the client left");

	/* A newcomer gets in and works. */
	client_open(&fresh, e, export, 8u << 20);
	client_io(&fresh, "new client");
	client_io(&obs, "with a new client");
	cr_expect_eq(th_agent_metric(&e->a, conns), 2);
	client_close(&fresh);
	client_close(&obs);
	client_close(&obs_other);
	th_wait_metric(&e->a, CONNS_V, 0, GAUGE_WAIT_MS);
	th_wait_metric(&e->a, CONNS_N, 0, GAUGE_WAIT_MS);
	cr_assert(ft_agent_alive(&e->a), "flashtierd died");
	env_finish(e);
}

Test(disconnects, close_at_once)
{
	disconnect_at(PH_CLOSE_AT_ONCE, "v");
}

Test(disconnects, after_greeting)
{
	disconnect_at(PH_AFTER_GREETING, "v");
}

Test(disconnects, mid_client_flags)
{
	disconnect_at(PH_MID_CLIENT_FLAGS, "v");
}

Test(disconnects, mid_option_header)
{
	disconnect_at(PH_MID_OPT_HEADER, "v");
}

Test(disconnects, mid_option_data)
{
	disconnect_at(PH_MID_OPT_DATA, "v");
}

Test(disconnects, after_option)
{
	disconnect_at(PH_AFTER_OPTION, "v");
}

Test(disconnects, after_go)
{
	disconnect_at(PH_AFTER_GO, "v");
}

Test(disconnects, mid_request_header)
{
	disconnect_at(PH_MID_REQUEST_HEADER, "v");
}

Test(disconnects, mid_write_payload_file)
{
	disconnect_at(PH_MID_WRITE_PAYLOAD, "v");
}

Test(disconnects, mid_write_payload_nbd)
{
	disconnect_at(PH_MID_WRITE_PAYLOAD, "n");
}

Test(disconnects, reads_in_flight_file)
{
	disconnect_at(PH_READS_IN_FLIGHT, "v");
}

Test(disconnects, reads_in_flight_nbd)
{
	disconnect_at(PH_READS_IN_FLIGHT, "n");
}

Test(disconnects, big_write_in_flight_file)
{
	disconnect_at(PH_BIG_WRITE_IN_FLIGHT, "v");
}

Test(disconnects, big_write_in_flight_nbd)
{
	disconnect_at(PH_BIG_WRITE_IN_FLIGHT, "n");
}

Test(disconnects, mid_big_write_payload_file)
{
	disconnect_at(PH_MID_BIG_WRITE_PAYLOAD, "v");
}

Test(disconnects, mid_big_write_payload_nbd)
{
	disconnect_at(PH_MID_BIG_WRITE_PAYLOAD, "n");
}

/*
 * Every phase, one after another, against one agent, with the observers
 * doing I/O throughout: disconnects must not accumulate damage.
 */
Test(disconnects, all_phases_one_agent)
{
	struct env *e = &g_env;
	struct client obs_v, obs_n;
	int hs_failures = 1, accepted = 3, total_v = 1, total_n = 1;

	env_start(e);
	client_open(&obs_v, e, "v", 0);
	client_open(&obs_n, e, "n", 0);
	for (int ph = PH_CLOSE_AT_ONCE; ph <= PH_MID_BIG_WRITE_PAYLOAD; ph++) {
		for (int vol = 0; vol < 2; vol++) {
			char when[64];
			int fd;
			bool tx = raw_to_phase(e, (enum phase)ph, vol ? "n" : "v", &fd);

			snprintf(when, sizeof(when), "phase %d on %s", ph, vol ? "n" : "v");
			accepted++;
			if (tx)
				*(vol ? &total_n : &total_v) += 1;
			else
				hs_failures++;
			client_io(&obs_v, when);
			close(fd);
			client_io(&obs_n, when);
		}
		/* 64 KiB rounds, 64 at most: restart the observers' areas halfway. */
		if (obs_v.rounds > 20) {
			obs_v.rounds = 0;
			obs_n.rounds = 0;
		}
	}
	th_wait_metric(&e->a, CONNS_V, 1, GAUGE_WAIT_MS);
	th_wait_metric(&e->a, CONNS_N, 1, GAUGE_WAIT_MS);
	th_wait_metric(&e->a, ACCEPTED, accepted, GAUGE_WAIT_MS);
	th_wait_metric(&e->a, HS_FAILURES, hs_failures, GAUGE_WAIT_MS);
	cr_expect_eq(th_agent_metric(&e->a, CONNS_TOTAL_V), total_v);
	cr_expect_eq(th_agent_metric(&e->a, CONNS_TOTAL_N), total_n);
	cr_expect_eq(
		th_agent_metric(&e->a, "flashtier_requests_in_flight{volume=\"v\",domain=\"\"}"),
		0);
	cr_expect_eq(
		th_agent_metric(&e->a, "flashtier_requests_in_flight{volume=\"n\",domain=\"\"}"),
		0);
	client_close(&obs_v);
	client_close(&obs_n);
	env_finish(e);
}

/*
 * 50 connect / GO / disconnect cycles, half ending with NBD_CMD_DISC and
 * half by just closing the socket: the gauge returns to the open clients.
 */
Test(disconnects, fifty_cycles)
{
	struct env *e = &g_env;
	struct client obs;
	char uri[512];

	env_start(e);
	client_open(&obs, e, "v", 0);
	th_uri(&e->a, "v", uri, sizeof(uri));
	for (int i = 0; i < 50; i++) {
		struct nbd_handle *h = th_nbd_new();

		cr_assert_eq(nbd_connect_uri(h, uri), 0, "cycle %d: %s", i, nbd_get_error());
		if (i % 2 == 0)
			cr_assert_eq(nbd_shutdown(h, 0), 0, "%s", nbd_get_error());
		th_nbd_close(h);
		if (i % 10 == 9)
			client_io(&obs, "cycles");
	}
	th_wait_metric(&e->a, CONNS_V, 1, GAUGE_WAIT_MS);
	th_wait_metric(&e->a, ACCEPTED, 52, GAUGE_WAIT_MS);
	cr_expect_eq(th_agent_metric(&e->a, CONNS_TOTAL_V), 51);
	cr_expect_eq(th_agent_metric(&e->a, HS_FAILURES), 1);
	client_io(&obs, "after the cycles");
	client_close(&obs);
	th_wait_metric(&e->a, CONNS_V, 0, GAUGE_WAIT_MS);
	env_finish(e);
}

/*
 * SIGTERM with clients in every state: idle in transmission, idle in the
 * handshake, and stalled halfway through a WRITE payload. The agent must
 * still exit 0 (the stalled one ends at the drain timeout).
 */
Test(disconnects, sigterm_with_clients_connected)
{
	struct env *e = &g_env;
	struct client obs;
	int fd_hs, fd_tx, fd_payload;
	uint8_t buf[4096] = { 0 };

	env_start(e);
	client_open(&obs, e, "v", 0);
	client_io(&obs, "before");
	raw_to_phase(e, PH_MID_OPT_HEADER, "v", &fd_hs);
	raw_to_phase(e, PH_AFTER_GO, "n", &fd_tx);
	fd_payload = th_raw_connect(e->a.sock, "v", false);
	th_raw_request(fd_payload, NBD_CMD_WRITE, 0, 1, RAW_OFF, 1u << 20);
	th_raw_write(fd_payload, buf, sizeof(buf));
	th_wait_metric(&e->a, CONNS_V, 2, GAUGE_WAIT_MS);
	th_wait_metric(&e->a, CONNS_N, 1, GAUGE_WAIT_MS);
	client_io(&obs, "before SIGTERM");
	env_finish(e);
	close(fd_hs);
	close(fd_tx);
	close(fd_payload);
	th_nbd_close(obs.h);
}
