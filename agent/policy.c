/* SPDX-License-Identifier: MIT */
#include <errno.h>
#include <string.h>

#include "flashtier/policy.h"

static const char *const mode_names[] = {
	[FT_CACHE_NONE] = "none",
	[FT_CACHE_WRITE_AROUND] = "write-around",
	[FT_CACHE_WRITE_THROUGH] = "write-through",
	[FT_CACHE_WRITE_BACK] = "write-back",
};

const char *ft_cache_mode_name(enum ft_cache_mode m)
{
	return (unsigned)m < sizeof(mode_names) / sizeof(mode_names[0]) ? mode_names[m] : NULL;
}

int ft_cache_mode_parse(const char *s, enum ft_cache_mode *out)
{
	for (unsigned i = 0; i < sizeof(mode_names) / sizeof(mode_names[0]); i++) {
		if (strcmp(s, mode_names[i]) == 0) {
			*out = (enum ft_cache_mode)i;
			return 0;
		}
	}
	return -EINVAL;
}
