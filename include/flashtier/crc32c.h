/* SPDX-License-Identifier: MIT */
/*
 * CRC32C (Castagnoli), the checksum of every on-disk and on-wire structure
 * and of every cached block. Uses the CPU's crc32 instruction when present
 * (SSE4.2), a table otherwise; both give the same result. Any thread.
 */
#ifndef FLASHTIER_CRC32C_H
#define FLASHTIER_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Continue a CRC: start with crc = 0; crc32c(crc32c(0, a), b) == crc32c(0, a||b). */
uint32_t ft_crc32c(uint32_t crc, const void *buf, size_t len);

#endif
