/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "flashtier/config.h"
#include "flashtier/wlog.h"
#include "flashtier/nbd_proto.h"

#define MAX_REACTORS 256

const char ft_config_builtin[] = "{\n"
				 "  \"listen\": \"var/flashtierd.sock\",\n"
				 "  \"metrics\": \"127.0.0.1:9810\",\n"
				 "  \"cache\": { \"path\": \"var/cache.img\", \"size\": \"256M\" },\n"
				 "  \"volumes\": {\n"
				 "    \"disk0\": {\n"
				 "      \"backing\": \"var/disk0.img\",\n"
				 "      \"description\": \"flashtier built-in demo volume\"\n"
				 "    }\n"
				 "  }\n"
				 "}\n";

struct parse_ctx {
	const char *origin;
	char *err;
	size_t err_len;
};

static int fail(struct parse_ctx *p, const char *key, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

static int fail(struct parse_ctx *p, const char *key, const char *fmt, ...)
{
	char reason[512];
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(reason, sizeof(reason), fmt, ap);
	va_end(ap);
	if (key)
		snprintf(p->err, p->err_len, "%s: key '%s': %s", p->origin, key, reason);
	else
		snprintf(p->err, p->err_len, "%s: %s", p->origin, reason);
	return -EINVAL;
}

void ft_listen_addr_clear(struct ft_listen_addr *a)
{
	free(a->path);
	free(a->host);
	free(a->port);
	memset(a, 0, sizeof(*a));
}

static int parse_port(const char *s)
{
	char *end;
	long v;

	if (*s == '\0')
		return -EINVAL;
	errno = 0;
	v = strtol(s, &end, 10);
	if (errno || *end != '\0' || v < 1 || v > 65535)
		return -EINVAL;
	return 0;
}

int ft_config_parse_hostport(const char *s, struct ft_listen_addr *out)
{
	const char *colon, *host = s;
	size_t host_len;

	memset(out, 0, sizeof(*out));
	if (s[0] == '[') {
		const char *close = strchr(s, ']');

		if (!close || close[1] != ':')
			return -EINVAL;
		host = s + 1;
		host_len = (size_t)(close - host);
		colon = close + 1;
	} else {
		colon = strrchr(s, ':');
		if (!colon)
			return -EINVAL;
		host_len = (size_t)(colon - s);
		if (memchr(s, ':', host_len))
			return -EINVAL; /* bare IPv6 needs brackets */
	}
	if (host_len == 0 || parse_port(colon + 1) < 0)
		return -EINVAL;
	out->kind = FT_ADDR_TCP;
	out->host = strndup(host, host_len);
	out->port = strdup(colon + 1);
	if (!out->host || !out->port) {
		ft_listen_addr_clear(out);
		return -ENOMEM;
	}
	return 0;
}

int ft_config_parse_listen(const char *s, struct ft_listen_addr *out)
{
	memset(out, 0, sizeof(*out));
	if (strncmp(s, "tcp:", 4) == 0)
		return ft_config_parse_hostport(s + 4, out);
	if (strncmp(s, "unix:", 5) == 0)
		s += 5;
	if (*s == '\0')
		return -EINVAL;
	/* sockaddr_un.sun_path is 108 bytes including the NUL. */
	if (strlen(s) >= 108)
		return -ENAMETOOLONG;
	out->kind = FT_ADDR_UNIX;
	out->path = strdup(s);
	return out->path ? 0 : -ENOMEM;
}

/* Fetch an optional string member; a present non-string is an error. */
static int get_string(struct parse_ctx *p, json_t *obj, const char *key, const char *label,
		      bool required, const char **out)
{
	json_t *v = json_object_get(obj, key);

	*out = NULL;
	if (!v) {
		if (required)
			return fail(p, label, "is required");
		return 0;
	}
	if (!json_is_string(v))
		return fail(p, label, "must be a string");
	/* jansson rejects \u0000 without JSON_ALLOW_NUL, so the string has no NUL. */
	*out = json_string_value(v);
	return 0;
}

static int check_keys(struct parse_ctx *p, json_t *obj, const char *prefix,
		      const char *const *allowed)
{
	const char *key;
	json_t *v;

	json_object_foreach(obj, key, v)
	{
		bool known = false;

		for (const char *const *a = allowed; *a; a++)
			if (strcmp(*a, key) == 0)
				known = true;
		if (!known) {
			char label[512];

			snprintf(label, sizeof(label), "%s%s", prefix, key);
			return fail(p, label, "unknown key");
		}
	}
	return 0;
}

static int check_backing_path(struct parse_ctx *p, const char *label, const char *path,
			      bool readonly)
{
	struct stat st;

	if (stat(path, &st) < 0)
		return fail(p, label, "cannot use '%s': %s", path, strerror(errno));
	if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
		return fail(p, label, "'%s' is not a regular file or block device", path);
	if (access(path, readonly ? R_OK : R_OK | W_OK) < 0)
		return fail(p, label, "'%s' is not %s: %s", path,
			    readonly ? "readable" : "readable and writable", strerror(errno));
	return 0;
}

int ft_config_parse_size(const char *s, uint64_t *out)
{
	uint64_t v = 0;
	unsigned shift = 0;
	const char *p = s;

	if (*p < '0' || *p > '9')
		return -EINVAL;
	for (; *p >= '0' && *p <= '9'; p++) {
		if (v > (UINT64_MAX - 9) / 10)
			return -EINVAL;
		v = v * 10 + (uint64_t)(*p - '0');
	}
	switch (*p) {
	case '\0':
		break;
	case 'k': case 'K':
		shift = 10;
		break;
	case 'm': case 'M':
		shift = 20;
		break;
	case 'g': case 'G':
		shift = 30;
		break;
	case 't': case 'T':
		shift = 40;
		break;
	default:
		return -EINVAL;
	}
	if (shift) {
		p++;
		if (*p == 'i' && p[1] == 'B')
			p += 2;
		else if (*p == 'B')
			p++;
		if (*p != '\0')
			return -EINVAL;
		if (v > (UINT64_MAX >> shift))
			return -EINVAL;
		v <<= shift;
	}
	*out = v;
	return 0;
}

/* A size member: a non-negative integer or a string ft_config_parse_size() takes. */
static int get_size(struct parse_ctx *p, json_t *obj, const char *key, const char *label,
		    bool *present, uint64_t *out)
{
	json_t *v = json_object_get(obj, key);

	*present = v != NULL;
	if (!v)
		return 0;
	if (json_is_integer(v) && json_integer_value(v) >= 0) {
		*out = (uint64_t)json_integer_value(v);
		return 0;
	}
	if (json_is_string(v) && ft_config_parse_size(json_string_value(v), out) == 0)
		return 0;
	return fail(p, label, "must be a byte count or a size like \"512M\" or \"8G\"");
}

static int get_bool(struct parse_ctx *p, json_t *obj, const char *key, const char *label,
		    bool *out)
{
	json_t *v = json_object_get(obj, key);

	if (!v)
		return 0;
	if (!json_is_boolean(v))
		return fail(p, label, "must be true or false");
	*out = json_is_true(v);
	return 0;
}

/* "NN%" (1-100) into *@pct, or a size into *@bytes; absent leaves both alone. */
static int get_size_or_percent(struct parse_ctx *p, json_t *obj, const char *key,
			       const char *label, uint64_t *bytes, uint32_t *pct)
{
	json_t *v = json_object_get(obj, key);
	bool present;

	if (v && json_is_string(v) && strchr(json_string_value(v), '%')) {
		const char *s = json_string_value(v);
		char *end;
		long n;

		errno = 0;
		n = strtol(s, &end, 10);
		if (errno || end == s || strcmp(end, "%") != 0 || n < 1 || n > 100)
			return fail(p, label, "'%s' is not a percentage from 1%% to 100%%", s);
		*pct = (uint32_t)n;
		*bytes = 0;
		return 0;
	}
	if (get_size(p, obj, key, label, &present, bytes) < 0)
		return fail(p, label, "must be a percentage like \"25%%\" or a size like \"2G\"");
	if (present)
		*pct = 0;
	return 0;
}

/* A percentage only ("50%"). */
static int get_percent(struct parse_ctx *p, json_t *obj, const char *key, const char *label,
		       uint32_t *pct)
{
	json_t *v = json_object_get(obj, key);
	uint64_t bytes = 0;

	if (!v)
		return 0;
	if (!json_is_string(v) || !strchr(json_string_value(v), '%'))
		return fail(p, label, "must be a percentage like \"50%%\"");
	return get_size_or_percent(p, obj, key, label, &bytes, pct);
}

static int parse_write_back(struct parse_ctx *p, const char *cprefix, json_t *obj,
			    struct ft_volume_policy *pol)
{
	static const char *const keys[] = { "dirty_limit", "dirty_high", "dirty_low",
					    "dirty_max_age", "destage_bandwidth" };
	char label[NBD_MAX_STRING + 96];
	bool present;
	json_t *v;
	int rc;

	for (size_t i = 0; i < sizeof(keys) / sizeof(keys[0]); i++) {
		if (pol->mode != FT_CACHE_WRITE_BACK && json_object_get(obj, keys[i])) {
			snprintf(label, sizeof(label), "%s%s", cprefix, keys[i]);
			return fail(p, label, "only applies to \"mode\": \"write-back\"");
		}
	}
	snprintf(label, sizeof(label), "%sdirty_limit", cprefix);
	rc = get_size_or_percent(p, obj, "dirty_limit", label, &pol->dirty_limit_bytes,
				 &pol->dirty_limit_percent);
	if (rc < 0)
		return rc;
	if (json_object_get(obj, "dirty_limit") && !pol->dirty_limit_percent &&
	    pol->dirty_limit_bytes < FT_WLOG_MIN_LIMIT)
		return fail(p, label, "must be at least 4M (four log segments)");
	snprintf(label, sizeof(label), "%sdirty_high", cprefix);
	rc = get_percent(p, obj, "dirty_high", label, &pol->dirty_high_percent);
	if (rc < 0)
		return rc;
	snprintf(label, sizeof(label), "%sdirty_low", cprefix);
	rc = get_percent(p, obj, "dirty_low", label, &pol->dirty_low_percent);
	if (rc < 0)
		return rc;
	if (pol->dirty_low_percent >= pol->dirty_high_percent)
		return fail(p, label, "must be below dirty_high (%u%%)", pol->dirty_high_percent);
	snprintf(label, sizeof(label), "%sdirty_max_age", cprefix);
	v = json_object_get(obj, "dirty_max_age");
	if (v) {
		double secs = json_is_number(v) ? json_number_value(v) : -1;

		if (secs < 0.1 || secs > 86400)
			return fail(p, label, "must be a number of seconds from 0.1 to 86400");
		pol->dirty_max_age_ms = (uint64_t)(secs * 1000 + 0.5);
	}
	snprintf(label, sizeof(label), "%sdestage_bandwidth", cprefix);
	rc = get_size(p, obj, "destage_bandwidth", label, &present, &pol->destage_bandwidth);
	if (rc < 0)
		return rc;
	if (present && pol->destage_bandwidth && pol->destage_bandwidth < (1u << 20))
		return fail(p, label, "must be 0 (unlimited) or at least 1M (per second)");
	return 0;
}

static int parse_volume_cache(struct parse_ctx *p, const char *prefix, json_t *obj,
			      bool have_cache, struct ft_volume_policy *pol)
{
	static const char *const allowed[] = { "mode",	      "sequential_cutoff", "quota",
					       "dirty_limit", "dirty_high",	   "dirty_low",
					       "dirty_max_age", "destage_bandwidth", NULL };
	char cprefix[NBD_MAX_STRING + 64], label[NBD_MAX_STRING + 96];
	const char *s;
	bool present;
	int rc;

	pol->mode = have_cache ? FT_CACHE_WRITE_THROUGH : FT_CACHE_NONE;
	pol->sequential_cutoff = 1u << 20;
	pol->quota_bytes = 0;
	pol->quota_percent = 100;
	pol->dirty_limit_bytes = 0;
	pol->dirty_limit_percent = 0;
	pol->dirty_high_percent = 50;
	pol->dirty_low_percent = 25;
	pol->dirty_max_age_ms = 30000;
	pol->destage_bandwidth = 0;
	if (!obj)
		return 0;
	snprintf(cprefix, sizeof(cprefix), "%scache", prefix);
	if (!json_is_object(obj))
		return fail(p, cprefix, "must be an object");
	snprintf(cprefix, sizeof(cprefix), "%scache.", prefix);
	rc = check_keys(p, obj, cprefix, allowed);
	if (rc < 0)
		return rc;

	snprintf(label, sizeof(label), "%smode", cprefix);
	rc = get_string(p, obj, "mode", label, false, &s);
	if (rc < 0)
		return rc;
	if (s && ft_cache_mode_parse(s, &pol->mode) < 0)
		return fail(p, label, "'%s' is not write-back, write-through, write-around or none",
			    s);
	if (pol->mode != FT_CACHE_NONE && !have_cache)
		return fail(p, label, "'%s' needs a cache device (a top-level \"cache\" object)", s);

	snprintf(label, sizeof(label), "%ssequential_cutoff", cprefix);
	rc = get_size(p, obj, "sequential_cutoff", label, &present, &pol->sequential_cutoff);
	if (rc < 0)
		return rc;

	snprintf(label, sizeof(label), "%squota", cprefix);
	rc = get_size_or_percent(p, obj, "quota", label, &pol->quota_bytes, &pol->quota_percent);
	if (rc < 0)
		return rc;
	if (!pol->quota_percent && pol->quota_bytes < FT_CACHE_MIN_QUOTA)
		return fail(p, label, "must be at least 1M");
	return parse_write_back(p, cprefix, obj, pol);
}

/*
 * /var/lib/flashtier/<the cache's absolute path, '/' as '-'>.state: off the
 * cache device (which is what may be failing when it is written) and one
 * per cache.
 */
static char *default_state_file(const char *path)
{
	char cwd[4096], *abs = NULL, *out = NULL;

	if (path[0] == '/')
		abs = strdup(path);
	else if (getcwd(cwd, sizeof(cwd)) && asprintf(&abs, "%s/%s", cwd, path) < 0)
		abs = NULL;
	if (!abs)
		return NULL;
	for (char *c = abs; *c; c++)
		if (*c == '/')
			*c = '-';
	if (asprintf(&out, "/var/lib/flashtier/%s.state", abs + 1) < 0)
		out = NULL;
	free(abs);
	return out;
}

static int parse_cache(struct parse_ctx *p, json_t *obj, struct ft_cache_config *cc,
		       bool check_paths)
{
	static const char *const allowed[] = { "path",	     "size",	     "reformat",
					       "error_threshold", "state_file", "log_size",
					       "discard_dirty",	  NULL };
	const char *path, *state;
	bool present;
	json_t *v;
	int rc;

	if (!json_is_object(obj))
		return fail(p, "cache", "must be an object with at least \"path\"");
	rc = check_keys(p, obj, "cache.", allowed);
	if (rc < 0)
		return rc;
	rc = get_string(p, obj, "path", "cache.path", true, &path);
	if (rc < 0)
		return rc;
	if (*path == '\0')
		return fail(p, "cache.path", "must not be empty");
	rc = get_size(p, obj, "size", "cache.size", &present, &cc->size);
	if (rc < 0)
		return rc;
	if (present && cc->size < FT_CACHE_MIN_DEVICE)
		return fail(p, "cache.size", "must be at least 2M");
	rc = get_bool(p, obj, "reformat", "cache.reformat", &cc->reformat);
	if (rc < 0)
		return rc;
	rc = get_bool(p, obj, "discard_dirty", "cache.discard_dirty", &cc->discard_dirty);
	if (rc < 0)
		return rc;
	rc = get_size_or_percent(p, obj, "log_size", "cache.log_size", &cc->log_bytes,
				 &cc->log_percent);
	if (rc < 0)
		return rc;
	if (cc->log_percent > 90)
		return fail(p, "cache.log_size", "must leave room for the read cache (at most 90%%)");
	if (json_object_get(obj, "log_size") && !cc->log_percent &&
	    cc->log_bytes < FT_WLOG_MIN_LIMIT)
		return fail(p, "cache.log_size", "must be at least 4M (four 1 MiB segments)");
	cc->error_threshold = 16;
	v = json_object_get(obj, "error_threshold");
	if (v) {
		if (!json_is_integer(v) || json_integer_value(v) < 1 ||
		    json_integer_value(v) > 1000000)
			return fail(p, "cache.error_threshold", "must be an integer from 1 to 1000000");
		cc->error_threshold = (uint32_t)json_integer_value(v);
	}
	if (check_paths) {
		struct stat st;

		if (stat(path, &st) == 0) {
			if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
				return fail(p, "cache.path", "'%s' is not a regular file or block device",
					    path);
			if (access(path, R_OK | W_OK) < 0)
				return fail(p, "cache.path", "'%s' is not readable and writable: %s",
					    path, strerror(errno));
		} else if (errno == ENOENT) {
			if (!present)
				return fail(p, "cache.path",
					    "'%s' does not exist; give \"size\" to create it", path);
		} else {
			return fail(p, "cache.path", "cannot use '%s': %s", path, strerror(errno));
		}
	}
	rc = get_string(p, obj, "state_file", "cache.state_file", false, &state);
	if (rc < 0)
		return rc;
	if (state && *state == '\0')
		return fail(p, "cache.state_file", "must not be empty");
	cc->path = strdup(path);
	if (!cc->path)
		return fail(p, NULL, "out of memory");
	if (state)
		cc->state_file = strdup(state);
	else
		cc->state_file = default_state_file(path);
	if (!cc->state_file)
		return fail(p, NULL, "out of memory");
	return 0;
}

static int parse_volume(struct parse_ctx *p, const char *name, json_t *obj,
			struct ft_volume_config *vol, bool check_paths, bool have_cache)
{
	static const char *const allowed[] = { "backing", "readonly", "description", "domain",
					       "cache", NULL };
	char prefix[NBD_MAX_STRING + 32], label[NBD_MAX_STRING + 64];
	const char *backing, *desc, *domain;
	json_t *ro;
	int rc;

	snprintf(prefix, sizeof(prefix), "volumes.%s.", name);
	if (!json_is_object(obj)) {
		snprintf(label, sizeof(label), "volumes.%s", name);
		return fail(p, label, "must be an object");
	}
	rc = check_keys(p, obj, prefix, allowed);
	if (rc < 0)
		return rc;

	snprintf(label, sizeof(label), "%sbacking", prefix);
	rc = get_string(p, obj, "backing", label, true, &backing);
	if (rc < 0)
		return rc;
	if (*backing == '\0')
		return fail(p, label, "must not be empty");

	snprintf(label, sizeof(label), "%sreadonly", prefix);
	ro = json_object_get(obj, "readonly");
	if (ro && !json_is_boolean(ro))
		return fail(p, label, "must be true or false");
	vol->readonly = ro && json_is_true(ro);

	snprintf(label, sizeof(label), "%sdescription", prefix);
	rc = get_string(p, obj, "description", label, false, &desc);
	if (rc < 0)
		return rc;
	if (desc && strlen(desc) > NBD_MAX_STRING)
		return fail(p, label, "longer than %u bytes", NBD_MAX_STRING);

	snprintf(label, sizeof(label), "%sdomain", prefix);
	rc = get_string(p, obj, "domain", label, false, &domain);
	if (rc < 0)
		return rc;

	rc = parse_volume_cache(p, prefix, json_object_get(obj, "cache"), have_cache, &vol->policy);
	if (rc < 0)
		return rc;

	snprintf(label, sizeof(label), "%sbacking", prefix);
	if (strstr(backing, "://")) {
		if (strncmp(backing, "nbd://", 6) != 0 && strncmp(backing, "nbd+unix://", 11) != 0)
			return fail(p, label,
				    "unsupported URI '%s' (use nbd:// or nbd+unix://, or a path)",
				    backing);
		vol->backing_kind = FT_BACKING_NBD;
	} else {
		vol->backing_kind = FT_BACKING_FILE;
		if (check_paths) {
			rc = check_backing_path(p, label, backing, vol->readonly);
			if (rc < 0)
				return rc;
		}
	}

	vol->name = strdup(name);
	vol->backing = strdup(backing);
	vol->description = desc ? strdup(desc) : NULL;
	vol->domain = domain ? strdup(domain) : NULL;
	if (!vol->name || !vol->backing || (desc && !vol->description) ||
	    (domain && !vol->domain))
		return fail(p, NULL, "out of memory");
	return 0;
}

static int parse_root(struct parse_ctx *p, json_t *root, struct ft_config *cfg, bool check_paths)
{
	static const char *const allowed[] = { "listen", "metrics", "reactors", "log_level",
					       "cache", "volumes", NULL };
	const char *s, *name;
	json_t *v, *vols;
	size_t i;
	int rc;

	if (!json_is_object(root))
		return fail(p, NULL, "top level must be a JSON object");
	rc = check_keys(p, root, "", allowed);
	if (rc < 0)
		return rc;

	rc = get_string(p, root, "listen", "listen", true, &s);
	if (rc < 0)
		return rc;
	rc = ft_config_parse_listen(s, &cfg->listen);
	if (rc == -ENAMETOOLONG)
		return fail(p, "listen", "socket path longer than 107 bytes");
	if (rc < 0)
		return fail(p, "listen", "'%s' is neither a unix socket path nor tcp:HOST:PORT", s);

	rc = get_string(p, root, "metrics", "metrics", false, &s);
	if (rc < 0)
		return rc;
	if (s) {
		if (ft_config_parse_hostport(s, &cfg->metrics) < 0)
			return fail(p, "metrics", "'%s' is not HOST:PORT", s);
		cfg->has_metrics = true;
	}

	v = json_object_get(root, "reactors");
	if (v) {
		if (!json_is_integer(v) || json_integer_value(v) < 1 ||
		    json_integer_value(v) > MAX_REACTORS)
			return fail(p, "reactors", "must be an integer from 1 to %d", MAX_REACTORS);
		cfg->reactors = (unsigned)json_integer_value(v);
	}

	rc = get_string(p, root, "log_level", "log_level", false, &s);
	if (rc < 0)
		return rc;
	if (s) {
		if (ft_log_parse_level(s, &cfg->log_level) < 0)
			return fail(p, "log_level", "'%s' is not error, warn, info or debug", s);
		cfg->has_log_level = true;
	}

	v = json_object_get(root, "cache");
	if (v) {
		rc = parse_cache(p, v, &cfg->cache, check_paths);
		if (rc < 0)
			return rc;
		cfg->has_cache = true;
	}

	vols = json_object_get(root, "volumes");
	if (!vols)
		return fail(p, "volumes", "is required");
	if (!json_is_object(vols))
		return fail(p, "volumes", "must be an object mapping export names to volumes");
	if (json_object_size(vols) == 0)
		return fail(p, "volumes", "must define at least one volume");
	cfg->volumes = calloc(json_object_size(vols), sizeof(*cfg->volumes));
	if (!cfg->volumes)
		return fail(p, NULL, "out of memory");
	i = 0;
	json_object_foreach(vols, name, v)
	{
		if (strlen(name) > NBD_MAX_STRING)
			return fail(p, "volumes", "export name longer than %u bytes",
				    NBD_MAX_STRING);
		rc = parse_volume(p, name, v, &cfg->volumes[i], check_paths, cfg->has_cache);
		cfg->n_volumes = ++i; /* so ft_config_free() sees partial entries */
		if (rc < 0)
			return rc;
	}
	return 0;
}

int ft_config_parse(const char *text, const char *origin, bool check_paths, struct ft_config **out,
		    char *err, size_t err_len)
{
	struct parse_ctx p = { .origin = origin, .err = err, .err_len = err_len };
	struct ft_config *cfg;
	json_error_t jerr;
	json_t *root;
	int rc;

	*out = NULL;
	root = json_loads(text, JSON_REJECT_DUPLICATES, &jerr);
	if (!root) {
		/* jansson says "duplicate object key" with the key in 'near'. */
		if (strstr(jerr.text, "duplicate object key")) {
			/* jansson's text ends with: near '"KEY"' */
			const char *near = strstr(jerr.text, "near '");
			int klen = near ? (int)strlen(near + 6) - 1 : 0;

			snprintf(err, err_len, "%s:%d:%d: duplicate key %.*s", origin, jerr.line,
				 jerr.column, klen > 0 ? klen : 0, near ? near + 6 : "");
		} else {
			snprintf(err, err_len, "%s:%d:%d: invalid JSON: %s", origin, jerr.line,
				 jerr.column, jerr.text);
		}
		return -EINVAL;
	}
	cfg = calloc(1, sizeof(*cfg));
	if (!cfg) {
		json_decref(root);
		return fail(&p, NULL, "out of memory");
	}
	cfg->path = strdup(origin);
	rc = cfg->path ? parse_root(&p, root, cfg, check_paths) : fail(&p, NULL, "out of memory");
	json_decref(root);
	if (rc < 0) {
		ft_config_free(cfg);
		return rc;
	}
	*out = cfg;
	return 0;
}

int ft_config_load(const char *path, struct ft_config **out, char *err, size_t err_len)
{
	FILE *f = fopen(path, "re");
	char *text = NULL;
	size_t len = 0, cap = 0;
	int rc;

	*out = NULL;
	if (!f) {
		snprintf(err, err_len, "%s: cannot open: %s", path, strerror(errno));
		return -errno;
	}
	for (;;) {
		if (cap - len < 4096) {
			char *n;

			if (cap > (16u << 20)) {
				fclose(f);
				free(text);
				snprintf(err, err_len, "%s: larger than 16 MiB", path);
				return -EFBIG;
			}
			n = realloc(text, cap + 65536);
			if (!n) {
				fclose(f);
				free(text);
				snprintf(err, err_len, "%s: out of memory", path);
				return -ENOMEM;
			}
			text = n;
			cap += 65536;
		}
		size_t got = fread(text + len, 1, cap - len - 1, f);
		len += got;
		if (got == 0)
			break;
	}
	if (ferror(f)) {
		rc = -EIO;
		snprintf(err, err_len, "%s: read error", path);
		fclose(f);
		free(text);
		return rc;
	}
	fclose(f);
	text[len] = '\0';
	if (strlen(text) != len) {
		free(text);
		snprintf(err, err_len, "%s: contains a NUL byte", path);
		return -EINVAL;
	}
	rc = ft_config_parse(text, path, true, out, err, err_len);
	free(text);
	return rc;
}

void ft_config_free(struct ft_config *cfg)
{
	if (!cfg)
		return;
	for (size_t i = 0; i < cfg->n_volumes; i++) {
		free(cfg->volumes[i].name);
		free(cfg->volumes[i].backing);
		free(cfg->volumes[i].description);
		free(cfg->volumes[i].domain);
	}
	free(cfg->volumes);
	free(cfg->cache.path);
	free(cfg->cache.state_file);
	ft_listen_addr_clear(&cfg->listen);
	ft_listen_addr_clear(&cfg->metrics);
	free(cfg->path);
	free(cfg);
}

const struct ft_volume_config *ft_config_find_volume(const struct ft_config *cfg, const char *name)
{
	for (size_t i = 0; i < cfg->n_volumes; i++)
		if (strcmp(cfg->volumes[i].name, name) == 0)
			return &cfg->volumes[i];
	return NULL;
}
