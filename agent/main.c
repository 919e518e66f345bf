/* SPDX-License-Identifier: MIT */
/*
 * flashtierd: the host agent. Runs in the foreground, logs to stderr, drains
 * and exits 0 on SIGTERM or SIGINT.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "flashtier/cache.h"
#include "flashtier/config.h"
#include "flashtier/log.h"
#include "flashtier/metrics.h"
#include "flashtier/nbd_server.h"
#include "flashtier/reactor.h"
#include "flashtier/version.h"
#include "flashtier/volume.h"

#define DEFAULT_DISK_SIZE (1ull << 30)

static void usage(FILE *f)
{
	fprintf(f, "Usage: flashtierd [--config FILE] [--log-level LEVEL] [--check-config]\n"
		   "\n"
		   "  -c, --config FILE      JSON configuration (default: a built-in demo that\n"
		   "                         serves ./var/disk0.img on ./var/flashtierd.sock)\n"
		   "  -l, --log-level LEVEL  error, warn, info or debug (overrides the config)\n"
		   "      --check-config     validate the configuration and exit\n"
		   "  -V, --version          print the version and exit\n"
		   "  -h, --help             this text\n"
		   "\n"
		   "Signals: SIGTERM/SIGINT drain in-flight requests and exit 0.\n");
}

/* The built-in demo serves a sparse file under ./var; create it on first use. */
static int prepare_builtin_files(void)
{
	int fd;

	if (mkdir("var", 0755) < 0 && errno != EEXIST) {
		fprintf(stderr, "flashtierd: cannot create ./var: %s\n", strerror(errno));
		return -1;
	}
	fd = open("var/disk0.img", O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	if (fd < 0) {
		if (errno == EEXIST)
			return 0;
		fprintf(stderr, "flashtierd: cannot create ./var/disk0.img: %s\n",
			strerror(errno));
		return -1;
	}
	if (ftruncate(fd, (off_t)DEFAULT_DISK_SIZE) < 0) {
		fprintf(stderr, "flashtierd: cannot size ./var/disk0.img: %s\n", strerror(errno));
		close(fd);
		return -1;
	}
	close(fd);
	return 0;
}

static unsigned default_reactors(void)
{
	cpu_set_t set;

	if (sched_getaffinity(0, sizeof(set), &set) == 0 && CPU_COUNT(&set) > 0)
		return (unsigned)CPU_COUNT(&set);
	return 1;
}

static void print_connect_help(const struct ft_config *cfg)
{
	char path[PATH_MAX];
	const char *sock = cfg->listen.path;
	const char *name = cfg->volumes[0].name;

	if (cfg->listen.kind != FT_ADDR_UNIX)
		return;
	if (sock[0] != '/' && realpath(sock, path))
		sock = path;
	fprintf(stderr,
		"\nflashtierd is serving. Connect with, for example:\n"
		"  nbdinfo 'nbd+unix:///%s?socket=%s'\n"
		"  qemu-img info 'nbd+unix:///%s?socket=%s'\n"
		"  qemu-io -f raw -c 'write -P 0xab 0 64k' 'nbd+unix:///%s?socket=%s'\n",
		name, sock, name, sock, name, sock);
	if (cfg->has_metrics)
		fprintf(stderr, "  curl http://%s:%s/metrics\n", cfg->metrics.host,
			cfg->metrics.port);
	fprintf(stderr, "Stop it with Ctrl-C (SIGINT) or SIGTERM.\n\n");
}

int main(int argc, char **argv)
{
	static const struct option opts[] = {
		{ "config", required_argument, NULL, 'c' },
		{ "log-level", required_argument, NULL, 'l' },
		{ "check-config", no_argument, NULL, 'k' },
		{ "version", no_argument, NULL, 'V' },
		{ "help", no_argument, NULL, 'h' },
		{ NULL, 0, NULL, 0 },
	};
	const char *config_path = NULL, *level_arg = NULL;
	bool check_only = false;
	struct ft_config *cfg = NULL;
	struct ft_volume **vols = NULL;
	struct ft_metrics_volume *mvols = NULL;
	struct ft_reactor **reactors = NULL;
	struct ft_nbd_server *server = NULL;
	struct ft_metrics_http *http = NULL;
	struct ft_cache *cache = NULL;
	struct ft_server_stats srv_stats = { 0 };
	enum ft_log_level level;
	unsigned n_reactors = 0;
	size_t opened = 0;
	char err[1024];
	sigset_t sigs;
	int c, rc, status = 1;

	while ((c = getopt_long(argc, argv, "c:l:Vh", opts, NULL)) != -1) {
		switch (c) {
		case 'c':
			config_path = optarg;
			break;
		case 'l':
			level_arg = optarg;
			break;
		case 'k':
			check_only = true;
			break;
		case 'V':
			printf("flashtierd %s\n", FLASHTIER_VERSION);
			return 0;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	if (optind != argc) {
		fprintf(stderr, "flashtierd: unexpected argument '%s'\n", argv[optind]);
		usage(stderr);
		return 2;
	}
	if (level_arg) {
		if (ft_log_parse_level(level_arg, &level) < 0) {
			fprintf(stderr, "flashtierd: --log-level: '%s' is not error, warn, info or debug\n",
				level_arg);
			return 2;
		}
		ft_log_set_level(level);
	}

	/* 1. Configuration: fully validated before anything is bound or opened for writing. */
	if (config_path) {
		rc = ft_config_load(config_path, &cfg, err, sizeof(err));
	} else {
		if (!check_only && prepare_builtin_files() < 0)
			return 1;
		rc = ft_config_parse(ft_config_builtin, "<built-in config>", !check_only, &cfg, err,
				     sizeof(err));
	}
	if (rc < 0) {
		fprintf(stderr, "flashtierd: invalid configuration: %s\n", err);
		return 1;
	}
	if (check_only) {
		printf("%s: OK (%zu volume%s)\n", cfg->path, cfg->n_volumes,
		       cfg->n_volumes == 1 ? "" : "s");
		ft_config_free(cfg);
		return 0;
	}
	if (cfg->has_log_level && !level_arg)
		ft_log_set_level(cfg->log_level);

	/* Signals are taken synchronously by this thread; every other thread blocks them. */
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGHUP);
	sigaddset(&sigs, SIGUSR1);
	pthread_sigmask(SIG_BLOCK, &sigs, NULL);
	signal(SIGPIPE, SIG_IGN);

	ft_info("flashtierd %s starting with %s", FLASHTIER_VERSION, cfg->path);

	/* 2. The cache device, then the backing stores (each cached one behind the cache). */
	n_reactors = cfg->reactors ? cfg->reactors : default_reactors();
	if (cfg->has_cache && ft_cache_open(&cfg->cache, &cache) < 0)
		goto out;
	vols = calloc(cfg->n_volumes, sizeof(*vols));
	mvols = calloc(cfg->n_volumes, sizeof(*mvols));
	if (!vols || !mvols) {
		ft_err("out of memory");
		goto out;
	}
	for (opened = 0; opened < cfg->n_volumes; opened++) {
		if (ft_volume_open(&cfg->volumes[opened], &vols[opened]) < 0)
			goto out;
		if (cache && cfg->volumes[opened].policy.mode != FT_CACHE_NONE) {
			struct ft_volume *v = vols[opened];

			if (ft_cache_add_volume(cache, v->cfg, v->size, (unsigned)(opened % n_reactors),
						&v->stats.cache, &v->backend) < 0) {
				opened++;
				goto out;
			}
			v->stats.cached = true;
		}
		mvols[opened] = (struct ft_metrics_volume){
			.name = cfg->volumes[opened].name,
			.domain = cfg->volumes[opened].domain,
			.size = vols[opened]->size,
			.stats = &vols[opened]->stats,
		};
	}

	if (cache) {
		if (ft_cache_start(cache, n_reactors) < 0)
			goto out;
		srv_stats.has_cache = true;
		ft_cache_global_stats(cache, &srv_stats.cache);
	}

	/* 3. Reactors; each volume is owned by one of them. */
	ft_reactor_on_stop = ft_nbd_server_drain;
	rc = ft_reactors_start(n_reactors, &reactors);
	if (rc < 0) {
		ft_err("cannot start %u reactors: %s", n_reactors, strerror(-rc));
		reactors = NULL;
		goto out;
	}
	for (size_t i = 0; i < cfg->n_volumes; i++) {
		ft_volume_attach(vols[i], reactors[i % n_reactors]);
		ft_info("volume '%s': %llu bytes on reactor %zu, backing %s, cache %s",
			cfg->volumes[i].name, (unsigned long long)vols[i]->size, i % n_reactors,
			cfg->volumes[i].backing,
			vols[i]->stats.cached ? ft_cache_mode_name(cfg->volumes[i].policy.mode)
					      : "none");
	}

	/* 4. Endpoints: metrics first, so they are up once the NBD socket answers. */
	if (cfg->has_metrics &&
	    ft_metrics_http_start(&cfg->metrics, mvols, cfg->n_volumes, &srv_stats, &http) < 0)
		goto out;
	if (ft_nbd_server_create(&cfg->listen, vols, cfg->n_volumes, reactors, n_reactors,
				 &srv_stats, &server) < 0)
		goto out;
	ft_nbd_server_start(server);
	ft_info("ready: %zu volume%s, %u reactor%s", cfg->n_volumes,
		cfg->n_volumes == 1 ? "" : "s", n_reactors, n_reactors == 1 ? "" : "s");
	if (!config_path)
		print_connect_help(cfg);

	for (;;) {
		siginfo_t si;
		int sig = sigwaitinfo(&sigs, &si);

		if (sig < 0) {
			if (errno == EINTR)
				continue;
			ft_err("sigwaitinfo: %s", strerror(errno));
			break;
		}
		if (sig == SIGUSR1) {
			if (cache) {
				ft_info("SIGUSR1: draining every write-back volume");
				ft_cache_drain(cache, reactors);
			} else {
				ft_info("SIGUSR1: no cache, nothing to drain");
			}
			continue;
		}
		if (sig == SIGHUP) {
			ft_info("SIGHUP: nothing to reload in this version (volumes come from --config at start)");
			continue;
		}
		ft_info("%s: draining in-flight requests", sig == SIGTERM ? "SIGTERM" : "SIGINT");
		break;
	}
	status = 0;
out:
	if (reactors)
		ft_reactors_stop_and_join(reactors, n_reactors);
	ft_metrics_http_stop(http);
	ft_nbd_server_destroy(server);
	for (size_t i = 0; i < opened; i++)
		ft_volume_close(vols[i]);
	ft_cache_close(cache);
	free(vols);
	free(mvols);
	if (status == 0)
		ft_info("stopped cleanly");
	ft_config_free(cfg);
	return status;
}
