/* SPDX-License-Identifier: MIT */
/*
 * flashtierd configuration: a JSON file, parsed and validated in one place.
 *
 *   {
 *     "listen":  "/run/flashtier/nbd.sock" | "unix:PATH" | "tcp:HOST:PORT",
 *     "metrics": "127.0.0.1:9810",            (optional; absent = no endpoint)
 *     "reactors": 2,                           (optional; default = CPUs)
 *     "log_level": "info",                     (optional)
 *     "cache": { "path": PATH, "size": "8G",  (optional; absent = no cache)
 *                "reformat": false, "error_threshold": 16, "state_file": PATH,
 *                "log_size": "25%" | "4G", "discard_dirty": false },
 *     "volumes": {
 *       "EXPORT": { "backing": PATH | "nbd://..." | "nbd+unix://...",
 *                   "readonly": false, "description": "...", "domain": "...",
 *                   "cache": { "mode": "write-back" | "write-through" | "write-around"
 *                                      | "none",
 *                              "sequential_cutoff": "1M", "quota": "50%" | "2G",
 *                              write-back only:
 *                              "dirty_limit": "25%" | "1G", "dirty_high": "50%",
 *                              "dirty_low": "25%", "dirty_max_age": 30,
 *                              "destage_bandwidth": "0" | "100M" } }
 *     }
 *   }
 *
 * Sizes are a byte count or a string with a binary suffix (K, M, G, T).
 * A volume's cache mode defaults to write-through when a cache is
 * configured and must be "none" (the default) when not.
 *
 * Unknown keys, duplicate keys, wrong types and bad values are errors; the
 * message names the file, the key and the reason. Validation checks that a
 * backing path exists and is a regular file or block device, but opens
 * nothing for writing and binds nothing.
 *
 * Threading: these functions are called from the main thread before any
 * other thread exists. The resulting struct is immutable afterwards and may
 * be read from any thread.
 */
#ifndef FLASHTIER_CONFIG_H
#define FLASHTIER_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "flashtier/log.h"
#include "flashtier/policy.h"

enum ft_addr_kind {
	FT_ADDR_UNIX,
	FT_ADDR_TCP,
};

struct ft_listen_addr {
	enum ft_addr_kind kind;
	char *path; /* FT_ADDR_UNIX */
	char *host; /* FT_ADDR_TCP: without brackets */
	char *port; /* FT_ADDR_TCP */
};

enum ft_backing_kind {
	FT_BACKING_FILE, /* regular file or block device */
	FT_BACKING_NBD,  /* nbd:// or nbd+unix:// URI, served through libnbd */
};

struct ft_volume_config {
	char *name; /* NBD export name */
	enum ft_backing_kind backing_kind;
	char *backing; /* path or URI */
	bool readonly;
	char *description; /* may be NULL */
	char *domain;      /* libvirt domain name; may be NULL */
	struct ft_volume_policy policy;
};

/* The shared cache device ("cache" at the top level). */
#define FT_CACHE_MIN_DEVICE (2ull << 20)
#define FT_CACHE_MIN_QUOTA  (1ull << 20)

struct ft_cache_config {
	char *path;               /* file or block device */
	uint64_t size;            /* bytes to create a missing file with; 0 = existing size */
	bool reformat;            /* overwrite whatever is on the device */
	uint32_t error_threshold; /* device errors before a volume goes pass-through */
	/*
	 * Where to note, when the device itself cannot be written, that its
	 * contents must not be trusted at the next start. Default:
	 * /var/lib/flashtier/<absolute cache path, '/' as '-'>.state (off the device).
	 */
	char *state_file;
	/* The write-back log, when the device is formatted: bytes, else percent (0: 25%). */
	uint64_t log_bytes;
	uint32_t log_percent;
	/* Start even if the device holds dirty data of volumes no longer configured. */
	bool discard_dirty;
};

struct ft_config {
	char *path; /* file it came from, for messages ("<builtin>" for the default) */
	struct ft_listen_addr listen;
	bool has_metrics;
	struct ft_listen_addr metrics; /* always FT_ADDR_TCP when present */
	unsigned reactors;             /* 0 = one per CPU */
	bool has_log_level;
	enum ft_log_level log_level;
	bool has_cache;
	struct ft_cache_config cache;
	size_t n_volumes;
	struct ft_volume_config *volumes;
};

/*
 * Parse and validate @text. @origin names the source in messages.
 * Returns 0 and sets *@out (caller frees with ft_config_free()), or a
 * negative errno with a one-line, human-readable reason in @err.
 * @check_paths: also stat() every backing path (off in unit tests that
 * only exercise syntax).
 */
int ft_config_parse(const char *text, const char *origin, bool check_paths, struct ft_config **out,
		    char *err, size_t err_len);

/* Read @path and parse it as above. */
int ft_config_load(const char *path, struct ft_config **out, char *err, size_t err_len);

/* The embedded default used when flashtierd runs without --config. */
extern const char ft_config_builtin[];

/* Parse a size: digits with an optional K/M/G/T (binary) suffix. Returns 0 or -EINVAL. */
int ft_config_parse_size(const char *s, uint64_t *out);

/* Parse "HOST:PORT" ("[v6]:PORT" for IPv6). Returns 0 or -EINVAL. */
int ft_config_parse_hostport(const char *s, struct ft_listen_addr *out);

/* Parse a "listen" value. Returns 0 or -EINVAL. */
int ft_config_parse_listen(const char *s, struct ft_listen_addr *out);

void ft_listen_addr_clear(struct ft_listen_addr *a);
void ft_config_free(struct ft_config *cfg);

const struct ft_volume_config *ft_config_find_volume(const struct ft_config *cfg, const char *name);

#endif
