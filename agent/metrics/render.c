/* SPDX-License-Identifier: MIT */
/*
 * Prometheus text exposition (format 0.0.4). Names follow the project's
 * conventions: prefix flashtier_, base units (bytes, seconds), _total on
 * counters, labels volume and domain.
 */
#include <stddef.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "flashtier/metrics.h"
#include "flashtier/version.h"

static const char *const op_names[FT_OP_COUNT] = {
	[FT_OP_READ] = "read",	 [FT_OP_WRITE] = "write",	      [FT_OP_FLUSH] = "flush",
	[FT_OP_TRIM] = "trim",	 [FT_OP_WRITE_ZEROES] = "write_zeroes", [FT_OP_CACHE] = "cache",
};

struct out {
	char *buf;
	size_t len, cap;
	bool failed;
};

static void put(struct out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void put(struct out *o, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (o->failed)
		return;
	for (;;) {
		va_start(ap, fmt);
		n = vsnprintf(o->buf + o->len, o->cap - o->len, fmt, ap);
		va_end(ap);
		if (n < 0) {
			o->failed = true;
			return;
		}
		if ((size_t)n < o->cap - o->len) {
			o->len += (size_t)n;
			return;
		}
		size_t ncap = o->cap * 2 + (size_t)n;
		char *nb = realloc(o->buf, ncap);

		if (!nb) {
			o->failed = true;
			return;
		}
		o->buf = nb;
		o->cap = ncap;
	}
}

/* Label values escape backslash, double quote and newline. */
static void put_escaped(struct out *o, const char *s)
{
	for (; s && *s; s++) {
		switch (*s) {
		case '\\':
			put(o, "\\\\");
			break;
		case '"':
			put(o, "\\\"");
			break;
		case '\n':
			put(o, "\\n");
			break;
		default:
			put(o, "%c", *s);
		}
	}
}

static void put_labels(struct out *o, const struct ft_metrics_volume *v, const char *op)
{
	put(o, "{volume=\"");
	put_escaped(o, v->name);
	put(o, "\",domain=\"");
	put_escaped(o, v->domain);
	put(o, "\"");
	if (op)
		put(o, ",op=\"%s\"", op);
}

static void header(struct out *o, const char *name, const char *type, const char *help)
{
	put(o, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* One counter per volume and operation: @field_offset locates it in struct ft_op_stats. */
static void per_op_counter(struct out *o, const struct ft_metrics_volume *vols, size_t n,
			   const char *name, const char *help, size_t field_offset)
{
	header(o, name, "counter", help);
	for (size_t i = 0; i < n; i++)
		for (unsigned op = 0; op < FT_OP_COUNT; op++) {
			const uint64_t *p = (const uint64_t *)((const char *)&vols[i].stats->op[op] +
							       field_offset);

			put(o, "%s", name);
			put_labels(o, &vols[i], op_names[op]);
			put(o, "} %llu\n", (unsigned long long)ft_stat_get(p));
		}
}

static void per_volume(struct out *o, const struct ft_metrics_volume *vols, size_t n,
		       const char *name, const char *type, const char *help, size_t field_offset)
{
	header(o, name, type, help);
	for (size_t i = 0; i < n; i++) {
		const uint64_t *p =
			(const uint64_t *)((const char *)vols[i].stats + field_offset);

		put(o, "%s", name);
		put_labels(o, &vols[i], NULL);
		put(o, "} %llu\n", (unsigned long long)ft_stat_get(p));
	}
}

/* One value per cached volume: @field_offset locates it in struct ft_cache_stats. */
static void per_cached_volume(struct out *o, const struct ft_metrics_volume *vols, size_t n,
			      const char *name, const char *type, const char *help,
			      size_t field_offset, uint64_t scale)
{
	header(o, name, type, help);
	for (size_t i = 0; i < n; i++) {
		const uint64_t *p;

		if (!vols[i].stats->cached)
			continue;
		p = (const uint64_t *)((const char *)&vols[i].stats->cache + field_offset);
		put(o, "%s", name);
		put_labels(o, &vols[i], NULL);
		put(o, "} %llu\n", (unsigned long long)(ft_stat_get(p) * scale));
	}
}

static void cache_metrics(struct out *o, const struct ft_metrics_volume *vols, size_t n,
			  const struct ft_server_stats *srv)
{
	static const struct {
		const char *name, *type, *help;
		size_t offset;
		uint64_t scale;
	} m[] = {
		{ "flashtier_cache_hits_total", "counter",
		  "READ requests served wholly from the cache.",
		  offsetof(struct ft_cache_stats, hits), 1 },
		{ "flashtier_cache_misses_total", "counter",
		  "READ requests that went to the backing store.",
		  offsetof(struct ft_cache_stats, misses), 1 },
		{ "flashtier_cache_hit_bytes_total", "counter", "Bytes read from the cache.",
		  offsetof(struct ft_cache_stats, hit_bytes), 1 },
		{ "flashtier_cache_miss_bytes_total", "counter",
		  "Bytes of READs served from the backing store.",
		  offsetof(struct ft_cache_stats, miss_bytes), 1 },
		{ "flashtier_cache_bypasses_total", "counter",
		  "READ requests kept out of the cache by the sequential cutoff.",
		  offsetof(struct ft_cache_stats, bypasses), 1 },
		{ "flashtier_cache_fills_total", "counter",
		  "4 KiB blocks written into the cache (read misses and write-through).",
		  offsetof(struct ft_cache_stats, fills), 1 },
		{ "flashtier_cache_fills_dropped_total", "counter",
		  "Fills abandoned because a write raced them, the device failed, or no room.",
		  offsetof(struct ft_cache_stats, fills_dropped), 1 },
		{ "flashtier_cache_evictions_total", "counter",
		  "Cached blocks evicted to make room.",
		  offsetof(struct ft_cache_stats, evictions), 1 },
		{ "flashtier_cache_invalidations_total", "counter",
		  "Cached blocks dropped because a write, trim or zeroing replaced them.",
		  offsetof(struct ft_cache_stats, invalidations), 1 },
		{ "flashtier_cache_checksum_errors_total", "counter",
		  "Cached blocks that failed their checksum on a hit (served from the store).",
		  offsetof(struct ft_cache_stats, checksum_errors), 1 },
		{ "flashtier_cache_device_errors_total", "counter",
		  "Cache device I/O errors met while serving the volume.",
		  offsetof(struct ft_cache_stats, device_errors), 1 },
		{ "flashtier_cache_occupancy_bytes", "gauge", "Cache space the volume holds.",
		  offsetof(struct ft_cache_stats, occupancy_blocks), 4096 },
		{ "flashtier_cache_quota_bytes", "gauge", "Most cache space the volume may hold.",
		  offsetof(struct ft_cache_stats, quota_blocks), 4096 },
		{ "flashtier_cache_passthrough", "gauge",
		  "1 if the volume stopped using the cache after device errors.",
		  offsetof(struct ft_cache_stats, passthrough), 1 },
		{ "flashtier_cache_write_back", "gauge",
		  "1 while the volume runs in write-back mode (configured, or draining old data).",
		  offsetof(struct ft_cache_stats, write_back), 1 },
		{ "flashtier_cache_dirty_bytes", "gauge",
		  "Write-back data not yet written to the backing store.",
		  offsetof(struct ft_cache_stats, dirty_bytes), 1 },
		{ "flashtier_cache_dirty_oldest_seconds", "gauge",
		  "Age of the oldest dirty data (0 when none).",
		  offsetof(struct ft_cache_stats, dirty_oldest_seconds), 1 },
		{ "flashtier_cache_destaged_bytes_total", "counter",
		  "Bytes written back to the backing store.",
		  offsetof(struct ft_cache_stats, destaged_bytes), 1 },
		{ "flashtier_cache_destage_errors_total", "counter",
		  "Backing-store errors while writing back (the data stays dirty).",
		  offsetof(struct ft_cache_stats, destage_errors), 1 },
		{ "flashtier_cache_destage_retrying", "gauge",
		  "1 while writing back backs off after backing-store errors.",
		  offsetof(struct ft_cache_stats, destage_retrying), 1 },
		{ "flashtier_cache_log_used_bytes", "gauge",
		  "Write-back log space the volume holds (whole segments).",
		  offsetof(struct ft_cache_stats, log_used_bytes), 1 },
		{ "flashtier_cache_log_limit_bytes", "gauge",
		  "Most write-back log space the volume may hold (dirty_limit).",
		  offsetof(struct ft_cache_stats, log_limit_bytes), 1 },
		{ "flashtier_cache_throttled_writes_total", "counter",
		  "Writes that had to wait for write-back log space.",
		  offsetof(struct ft_cache_stats, throttled_writes), 1 },
		{ "flashtier_cache_draining", "gauge", "1 while a drain of the volume runs.",
		  offsetof(struct ft_cache_stats, draining), 1 },
	};

	if (!srv->has_cache)
		return;
	header(o, "flashtier_cache_size_bytes", "gauge", "Data space of the cache device.");
	put(o, "flashtier_cache_size_bytes %llu\n", (unsigned long long)srv->cache.slots * 4096);
	header(o, "flashtier_cache_memory_bytes", "gauge",
	       "RAM used by the cache directory and per-block state.");
	put(o, "flashtier_cache_memory_bytes %llu\n", (unsigned long long)srv->cache.memory_bytes);
	header(o, "flashtier_cache_log_size_bytes", "gauge", "Size of the write-back log.");
	put(o, "flashtier_cache_log_size_bytes %llu\n", (unsigned long long)srv->cache.log_bytes);
	for (size_t i = 0; i < sizeof(m) / sizeof(m[0]); i++)
		per_cached_volume(o, vols, n, m[i].name, m[i].type, m[i].help, m[i].offset,
				  m[i].scale);
}

static void histograms(struct out *o, const struct ft_metrics_volume *vols, size_t n)
{
	const char *name = "flashtier_request_duration_seconds";

	header(o, name, "histogram",
	       "Time from receiving an NBD request to queueing its reply, by operation.");
	for (size_t i = 0; i < n; i++) {
		for (unsigned op = 0; op < FT_OP_COUNT; op++) {
			const struct ft_op_stats *s = &vols[i].stats->op[op];
			uint64_t cum = 0;

			for (unsigned b = 0; b <= FT_LAT_BUCKETS; b++) {
				cum += ft_stat_get(&s->lat_bucket[b]);
				put(o, "%s_bucket", name);
				put_labels(o, &vols[i], op_names[op]);
				if (b < FT_LAT_BUCKETS)
					put(o, ",le=\"%g\"} %llu\n", (double)ft_lat_bucket_ns[b] / 1e9,
					    (unsigned long long)cum);
				else
					put(o, ",le=\"+Inf\"} %llu\n", (unsigned long long)cum);
			}
			put(o, "%s_sum", name);
			put_labels(o, &vols[i], op_names[op]);
			put(o, "} %.9f\n", (double)ft_stat_get(&s->lat_sum_ns) / 1e9);
			put(o, "%s_count", name);
			put_labels(o, &vols[i], op_names[op]);
			/* Count equals the +Inf bucket, read once so they agree. */
			put(o, "} %llu\n", (unsigned long long)cum);
		}
	}
}

char *ft_metrics_render(const struct ft_metrics_volume *vols, size_t n,
			const struct ft_server_stats *srv, size_t *len_out)
{
	struct out o = { .cap = 16384 };

	o.buf = malloc(o.cap);
	if (!o.buf)
		return NULL;
	o.buf[0] = '\0';

	header(&o, "flashtier_build_info", "gauge", "Always 1; labels give the agent's version.");
	put(&o, "flashtier_build_info{version=\"%s\"} 1\n", FLASHTIER_VERSION);

	header(&o, "flashtier_volume_size_bytes", "gauge", "Size of the exported volume.");
	for (size_t i = 0; i < n; i++) {
		put(&o, "flashtier_volume_size_bytes");
		put_labels(&o, &vols[i], NULL);
		put(&o, "} %llu\n", (unsigned long long)vols[i].size);
	}

	per_op_counter(&o, vols, n, "flashtier_requests_total",
		       "NBD requests completed, by operation (errors included).",
		       offsetof(struct ft_op_stats, requests));
	per_op_counter(&o, vols, n, "flashtier_request_bytes_total",
		       "Bytes read, written, trimmed, zeroed or cached by successful requests.",
		       offsetof(struct ft_op_stats, bytes));
	per_op_counter(&o, vols, n, "flashtier_request_errors_total",
		       "NBD requests that completed with an error, by operation.",
		       offsetof(struct ft_op_stats, errors));
	histograms(&o, vols, n);
	per_volume(&o, vols, n, "flashtier_requests_in_flight", "gauge",
		   "NBD requests received and not yet answered.",
		   offsetof(struct ft_volume_stats, in_flight));
	per_volume(&o, vols, n, "flashtier_invalid_requests_total", "counter",
		   "NBD requests rejected before reaching the backing store.",
		   offsetof(struct ft_volume_stats, invalid_requests));
	per_volume(&o, vols, n, "flashtier_connections", "gauge",
		   "NBD client connections open on the volume.",
		   offsetof(struct ft_volume_stats, connections));
	per_volume(&o, vols, n, "flashtier_connections_total", "counter",
		   "NBD client connections that entered transmission on the volume.",
		   offsetof(struct ft_volume_stats, connections_total));

	cache_metrics(&o, vols, n, srv);

	header(&o, "flashtier_accepted_connections_total", "counter",
	       "Connections accepted on the NBD socket.");
	put(&o, "flashtier_accepted_connections_total %llu\n",
	    (unsigned long long)ft_stat_get(&srv->accepted_total));
	header(&o, "flashtier_handshake_failures_total", "counter",
	       "Connections that ended before entering transmission (aborts included).");
	put(&o, "flashtier_handshake_failures_total %llu\n",
	    (unsigned long long)ft_stat_get(&srv->handshake_failures_total));

	if (o.failed) {
		free(o.buf);
		return NULL;
	}
	*len_out = o.len;
	return o.buf;
}
