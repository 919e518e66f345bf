/* SPDX-License-Identifier: MIT */
/*
 * Per-volume statistics and the Prometheus /metrics endpoint.
 *
 * Each counter has a single writer, the thread that owns it (a volume's
 * counters: its reactor; the server-wide ones: the accepting reactor), so
 * updates are plain relaxed atomic stores with no read-modify-write and no
 * lock. The HTTP thread reads them with relaxed atomic loads: a scrape may
 * see a request counted in one metric and not yet in another, never a torn
 * value.
 */
#ifndef FLASHTIER_METRICS_H
#define FLASHTIER_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "flashtier/config.h"

enum ft_op {
	FT_OP_READ,
	FT_OP_WRITE,
	FT_OP_FLUSH,
	FT_OP_TRIM,
	FT_OP_WRITE_ZEROES,
	FT_OP_CACHE,
	FT_OP_COUNT,
};

/* Latency histogram upper bounds, in nanoseconds (+Inf is implicit). */
#define FT_LAT_BUCKETS 19
extern const uint64_t ft_lat_bucket_ns[FT_LAT_BUCKETS];

struct ft_op_stats {
	uint64_t requests;
	uint64_t bytes;
	uint64_t errors;
	uint64_t lat_sum_ns;
	uint64_t lat_bucket[FT_LAT_BUCKETS + 1]; /* non-cumulative; last is +Inf */
};

/* A cached volume's cache counters (written by its reactor). */
struct ft_cache_stats {
	uint64_t hits, hit_bytes;     /* READs served wholly from the cache */
	uint64_t misses, miss_bytes;  /* READs that went to the backing store */
	uint64_t bypasses;            /* READs kept out by the sequential cutoff */
	uint64_t fills;               /* blocks written into the cache */
	uint64_t fills_dropped;       /* fills abandoned (raced a write, device error, no room) */
	uint64_t evictions;           /* blocks evicted to make room */
	uint64_t invalidations;       /* cached blocks dropped because they were overwritten */
	uint64_t checksum_errors;     /* hits whose data failed its CRC (served from the store) */
	uint64_t device_errors;       /* cache device I/O errors */
	uint64_t occupancy_blocks;    /* gauge: 4 KiB blocks held */
	uint64_t quota_blocks;        /* gauge: the most it may hold */
	uint64_t passthrough;         /* gauge: 1 once the volume stopped using the cache */
	/* Write-back. */
	uint64_t dirty_bytes;          /* gauge: not yet on the backing store */
	uint64_t dirty_oldest_seconds; /* gauge: age of the oldest dirty data */
	uint64_t destaged_bytes;       /* written back to the store */
	uint64_t destage_errors;       /* store errors while writing back */
	uint64_t destage_retrying;     /* gauge: 1 while backing off after errors */
	uint64_t log_used_bytes;       /* gauge: log space held */
	uint64_t log_limit_bytes;      /* gauge: dirty_limit */
	uint64_t throttled_writes;     /* writes that waited for log space */
	uint64_t draining;             /* gauge: 1 while a drain runs */
	uint64_t write_back;           /* gauge: 1 while in write-back mode */
};

/* Cache-wide figures. */
struct ft_cache_global_stats {
	uint64_t slots;        /* 4 KiB blocks of cache space */
	uint64_t memory_bytes; /* RAM the directory and per-block state use */
	uint64_t log_bytes;    /* the write-back log */
};

struct ft_volume_stats {
	struct ft_op_stats op[FT_OP_COUNT];
	uint64_t in_flight;
	uint64_t connections;       /* open now */
	uint64_t connections_total; /* ever attached */
	uint64_t invalid_requests;  /* rejected by validation (EINVAL, EPERM, ...) */
	bool cached;                /* set before serving: the cache counters are live */
	struct ft_cache_stats cache;
};

struct ft_server_stats {
	uint64_t accepted_total;
	uint64_t handshake_failures_total;
	bool has_cache; /* set before the endpoint starts */
	struct ft_cache_global_stats cache;
};

/* Single-writer updates (owner thread only). */
static inline void ft_stat_add(uint64_t *p, uint64_t v)
{
	__atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) + v, __ATOMIC_RELAXED);
}

static inline void ft_stat_sub(uint64_t *p, uint64_t v)
{
	__atomic_store_n(p, __atomic_load_n(p, __ATOMIC_RELAXED) - v, __ATOMIC_RELAXED);
}

static inline uint64_t ft_stat_get(const uint64_t *p)
{
	return __atomic_load_n(p, __ATOMIC_RELAXED);
}

/* Record one completed request. Owner thread only. */
void ft_stats_record(struct ft_volume_stats *s, enum ft_op op, uint64_t bytes, uint64_t lat_ns,
		     bool error);

/* What the exporter needs to know of one volume. */
struct ft_metrics_volume {
	const char *name;
	const char *domain; /* may be NULL */
	uint64_t size;
	const struct ft_volume_stats *stats;
};

/*
 * Render every metric in Prometheus text format 0.0.4 into a malloc'd,
 * NUL-terminated buffer (caller frees). Returns NULL on allocation failure.
 * Any thread.
 */
char *ft_metrics_render(const struct ft_metrics_volume *vols, size_t n,
			const struct ft_server_stats *srv, size_t *len_out);

struct ft_metrics_http;

/*
 * Serve /metrics on @addr (FT_ADDR_TCP) from libmicrohttpd's own thread.
 * @vols and @srv must outlive ft_metrics_http_stop(). Returns 0 or a
 * negative errno after logging. Main thread only.
 */
int ft_metrics_http_start(const struct ft_listen_addr *addr, const struct ft_metrics_volume *vols,
			  size_t n, const struct ft_server_stats *srv, struct ft_metrics_http **out);
void ft_metrics_http_stop(struct ft_metrics_http *h);

#endif
