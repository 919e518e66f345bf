/* SPDX-License-Identifier: MIT */
/*
 * Levelled logging to stderr.
 *
 * Contract: every function here may be called from any thread at any time,
 * including before ft_log_set_level(). A log line is written with a single
 * write(2), so lines from different threads never interleave. Logging never
 * fails visibly: if stderr is gone the line is dropped.
 */
#ifndef FLASHTIER_LOG_H
#define FLASHTIER_LOG_H

enum ft_log_level {
	FT_LOG_ERROR = 0,
	FT_LOG_WARN = 1,
	FT_LOG_INFO = 2,
	FT_LOG_DEBUG = 3,
};

/* Messages above @level are dropped. The default is FT_LOG_INFO. */
void ft_log_set_level(enum ft_log_level level);
enum ft_log_level ft_log_get_level(void);

/* Parses "error", "warn", "info" or "debug". Returns 0, or -EINVAL. */
int ft_log_parse_level(const char *name, enum ft_log_level *out);

void ft_log(enum ft_log_level level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define ft_err(...)   ft_log(FT_LOG_ERROR, __VA_ARGS__)
#define ft_warn(...)  ft_log(FT_LOG_WARN, __VA_ARGS__)
#define ft_info(...)  ft_log(FT_LOG_INFO, __VA_ARGS__)
#define ft_debug(...)                                                                              \
	do {                                                                                       \
		if (ft_log_get_level() >= FT_LOG_DEBUG)                                            \
			ft_log(FT_LOG_DEBUG, __VA_ARGS__);                                         \
	} while (0)

#endif
