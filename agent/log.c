/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "flashtier/log.h"

static int log_level = FT_LOG_INFO;

void ft_log_set_level(enum ft_log_level level)
{
	__atomic_store_n(&log_level, (int)level, __ATOMIC_RELAXED);
}

enum ft_log_level ft_log_get_level(void)
{
	return (enum ft_log_level)__atomic_load_n(&log_level, __ATOMIC_RELAXED);
}

static const char *const level_names[] = { "error", "warn", "info", "debug" };

int ft_log_parse_level(const char *name, enum ft_log_level *out)
{
	for (unsigned i = 0; i < sizeof(level_names) / sizeof(level_names[0]); i++) {
		if (strcmp(name, level_names[i]) == 0) {
			*out = (enum ft_log_level)i;
			return 0;
		}
	}
	return -EINVAL;
}

void ft_log(enum ft_log_level level, const char *fmt, ...)
{
	char line[2048];
	struct timespec ts;
	struct tm tm;
	size_t n;
	va_list ap;
	int saved_errno = errno;

	if ((int)level > __atomic_load_n(&log_level, __ATOMIC_RELAXED))
		return;

	clock_gettime(CLOCK_REALTIME, &ts);
	gmtime_r(&ts.tv_sec, &tm);
	n = strftime(line, sizeof(line), "%Y-%m-%dT%H:%M:%S", &tm);
	n += (size_t)snprintf(line + n, sizeof(line) - n, ".%03ldZ flashtierd %s: ",
			      ts.tv_nsec / 1000000, level_names[level]);
	va_start(ap, fmt);
	int m = vsnprintf(line + n, sizeof(line) - n, fmt, ap);
	va_end(ap);
	if (m < 0)
		m = 0;
	n += (size_t)m;
	if (n > sizeof(line) - 2)
		n = sizeof(line) - 2; /* truncated: keep the newline */
	line[n++] = '\n';
	/* One write per line: lines from several threads stay whole. */
	if (write(STDERR_FILENO, line, n) < 0) {
		/* Nowhere left to report it. */
	}
	errno = saved_errno;
}
