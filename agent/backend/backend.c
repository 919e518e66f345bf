/* SPDX-License-Identifier: MIT */
#include <stddef.h>
#include <errno.h>
#include <stdlib.h>

#include "flashtier/backend.h"

/* Zeroes for writing zeroes where a store cannot do it natively. */
static _Alignas(4096) const unsigned char zero_buf[FT_ZERO_BUF_SIZE];

const void *ft_zero_buf(void)
{
	return zero_buf;
}

int ft_backend_open(const struct ft_volume_config *vc, struct ft_backend **out)
{
	switch (vc->backing_kind) {
	case FT_BACKING_FILE:
		return ft_backend_file_open(vc->backing, vc->readonly, out);
	case FT_BACKING_NBD:
		return ft_backend_nbd_open(vc->backing, vc->readonly, out);
	}
	return -EINVAL;
}
