/* SPDX-License-Identifier: MIT */
/* Unit tests: CRC32C, cache device geometry, superblock encode/decode, open/format/refuse/repair. */
#include <criterion/criterion.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "flashtier/cachedev.h"
#include "flashtier/crc32c.h"

#define DEV_BYTES (64ull << 20)

static char dir[64], path[128];

static void setup(void)
{
	snprintf(dir, sizeof(dir), "/tmp/ft-cachedev.XXXXXX");
	cr_assert_not_null(mkdtemp(dir));
	snprintf(path, sizeof(path), "%s/cache.img", dir);
}

static void teardown(void)
{
	unlink(path);
	rmdir(dir);
}

TestSuite(cachedev, .init = setup, .fini = teardown);

Test(crc32c, known_vectors)
{
	/* RFC 3720 (iSCSI) test vectors and the classic check value. */
	uint8_t zeros[32] = { 0 }, ones[32], inc[32];

	memset(ones, 0xff, sizeof(ones));
	for (int i = 0; i < 32; i++)
		inc[i] = (uint8_t)i;
	cr_assert_eq(ft_crc32c(0, "123456789", 9), 0xe3069283u);
	cr_assert_eq(ft_crc32c(0, zeros, 32), 0x8a9136aau);
	cr_assert_eq(ft_crc32c(0, ones, 32), 0x62a8ab43u);
	cr_assert_eq(ft_crc32c(0, inc, 32), 0x46dd794eu);
	/* Chaining equals one pass. */
	cr_assert_eq(ft_crc32c(ft_crc32c(0, "12345", 5), "6789", 4), 0xe3069283u);
}

Test(cachedev, geometry_fits_and_aligns)
{
	static const uint64_t sizes[] = { FT_CACHE_MIN_BYTES, 3ull << 20, 256ull << 20,
					  (1ull << 40) + 12345 };

	for (unsigned i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		struct ft_cache_geometry g;

		cr_assert_eq(ft_cache_geometry(sizes[i], ft_cache_default_log_bytes(sizes[i]), &g), 0, "size %llu",
			     (unsigned long long)sizes[i]);
		cr_assert_eq(g.data_offset % FT_CACHE_DATA_ALIGN, 0);
		cr_assert_geq(g.data_offset, g.meta_offset + g.meta_bytes);
		cr_assert_geq(g.meta_bytes, g.nslots * FT_CACHE_META_BYTES);
		cr_assert_leq(g.data_offset + g.nslots * FT_CACHE_BLOCK, g.log_offset);
		cr_assert_eq(g.log_offset + g.log_bytes, sizes[i] / FT_CACHE_DATA_ALIGN * FT_CACHE_DATA_ALIGN);
		/* Maximal: one more slot would not fit (its metadata may move the data start). */
		uint64_t n1 = g.nslots + 1;
		uint64_t meta1 = (n1 * FT_CACHE_META_BYTES + FT_CACHE_BLOCK - 1) / FT_CACHE_BLOCK *
				 FT_CACHE_BLOCK;
		uint64_t off1 = (g.meta_offset + meta1 + FT_CACHE_DATA_ALIGN - 1) /
				FT_CACHE_DATA_ALIGN * FT_CACHE_DATA_ALIGN;

		cr_assert_gt(off1 + n1 * FT_CACHE_BLOCK, g.log_offset, "size %llu: %llu slots is not the most",
			     (unsigned long long)sizes[i], (unsigned long long)g.nslots);
	}
	struct ft_cache_geometry g;

	cr_assert_eq(ft_cache_geometry(FT_CACHE_MIN_BYTES - 1, ft_cache_default_log_bytes(FT_CACHE_MIN_BYTES - 1), &g), -ENOSPC);
}

Test(cachedev, encode_decode_roundtrip_and_every_bit_matters)
{
	struct ft_cache_geometry g, got;
	struct ft_cache_sb sb, bad;
	uint8_t uuid[16] = { 1, 2, 3 }, u2[16];
	uint64_t seq;
	uint32_t flags;

	cr_assert_eq(ft_cache_geometry(DEV_BYTES, ft_cache_default_log_bytes(DEV_BYTES), &g), 0);
	ft_cache_sb_encode(&sb, &g, uuid, 42, FT_CACHE_SB_CLEAN);
	cr_assert_eq(ft_cache_sb_decode(&sb, &got, u2, &seq, &flags), FT_SB_VALID);
	cr_assert_arr_eq(&got, &g, sizeof(g));
	cr_assert_arr_eq(u2, uuid, 16);
	cr_assert_eq(seq, 42);
	cr_assert_eq(flags, FT_CACHE_SB_CLEAN);
	/* Flip single bits after the magic (which would make it foreign): each is caught. */
	for (size_t byte = 8; byte < sizeof(sb); byte += 37) {
		bad = sb;
		((uint8_t *)&bad)[byte] ^= 0x10;
		enum ft_cache_sb_state s = ft_cache_sb_decode(&bad, NULL, NULL, NULL, NULL);

		cr_assert(s == FT_SB_CORRUPT || s == FT_SB_NEWER, "bit flip at byte %zu not detected",
			  byte);
	}
	memset(&bad, 0, sizeof(bad));
	cr_assert_eq(ft_cache_sb_decode(&bad, NULL, NULL, NULL, NULL), FT_SB_BLANK);
	memcpy(bad.magic, "EXT4FS!!", 8);
	cr_assert_eq(ft_cache_sb_decode(&bad, NULL, NULL, NULL, NULL), FT_SB_FOREIGN);
}

static void write_at(off_t off, const void *buf, size_t len)
{
	int fd = open(path, O_RDWR | O_CREAT, 0600);

	cr_assert_geq(fd, 0);
	cr_assert_eq(pwrite(fd, buf, len, off), (ssize_t)len);
	close(fd);
}

static void read_at(off_t off, void *buf, size_t len)
{
	int fd = open(path, O_RDONLY);

	cr_assert_geq(fd, 0);
	cr_assert_eq(pread(fd, buf, len, off), (ssize_t)len);
	close(fd);
}

static struct ft_cachedev *open_ok(bool reformat)
{
	struct ft_cachedev *dev = NULL;
	char err[512];
	int rc = ft_cachedev_open(path, DEV_BYTES, 0, 0, reformat, &dev, err, sizeof(err));

	cr_assert_eq(rc, 0, "open: %s", err);
	return dev;
}

static void open_fails(int want, const char *needle)
{
	struct ft_cachedev *dev = NULL;
	char err[512] = "";
	int rc = ft_cachedev_open(path, DEV_BYTES, 0, 0, false, &dev, err, sizeof(err));

	cr_assert_eq(rc, want, "open gave %d (%s), want %d", rc, err, want);
	cr_assert_null(dev);
	cr_assert_not_null(strstr(err, needle), "message '%s' lacks '%s'", err, needle);
	cr_assert_not_null(strstr(err, path), "message '%s' does not name the device", err);
}

Test(cachedev, blank_device_is_formatted_then_reattached)
{
	struct ft_cachedev *dev = open_ok(false);
	uint8_t uuid[16];
	uint64_t seq;

	cr_assert(dev->formatted_now);
	cr_assert_eq(dev->geo.device_bytes, DEV_BYTES);
	memcpy(uuid, dev->uuid, 16);
	seq = dev->seq;
	cr_assert_eq(ft_cachedev_write_sb(dev, FT_CACHE_SB_CLEAN), 0);
	ft_cachedev_close(dev);

	dev = open_ok(false);
	cr_assert_not(dev->formatted_now, "an existing cache was formatted again");
	cr_assert_not(dev->repaired_copy);
	cr_assert_arr_eq(dev->uuid, uuid, 16, "reattached to a different cache");
	cr_assert_eq(dev->seq, seq + 1);
	cr_assert_eq(dev->flags, FT_CACHE_SB_CLEAN);
	ft_cachedev_close(dev);
}

Test(cachedev, one_corrupt_copy_is_survived_and_repaired)
{
	struct ft_cachedev *dev = open_ok(false);
	struct ft_cache_sb sb[2];
	uint8_t uuid[16], junk[100];

	memcpy(uuid, dev->uuid, 16);
	ft_cachedev_close(dev);
	memset(junk, 0xa5, sizeof(junk));
	for (int copy = 0; copy < 2; copy++) {
		write_at((off_t)copy * FT_CACHE_SB_BYTES + 200, junk, sizeof(junk));
		dev = open_ok(false);
		cr_assert(dev->repaired_copy, "copy %d damage went unnoticed", copy);
		cr_assert_arr_eq(dev->uuid, uuid, 16);
		ft_cachedev_close(dev);
		read_at(0, sb, sizeof(sb));
		cr_assert_eq(ft_cache_sb_decode(&sb[0], NULL, NULL, NULL, NULL), FT_SB_VALID);
		cr_assert_eq(ft_cache_sb_decode(&sb[1], NULL, NULL, NULL, NULL), FT_SB_VALID);
	}
}

Test(cachedev, both_copies_corrupt_are_refused_until_reformat)
{
	struct ft_cachedev *dev = open_ok(false);
	uint8_t junk[64], before[2 * FT_CACHE_SB_BYTES], after[2 * FT_CACHE_SB_BYTES];

	ft_cachedev_close(dev);
	memset(junk, 0x5a, sizeof(junk));
	write_at(300, junk, sizeof(junk));
	write_at(FT_CACHE_SB_BYTES + 300, junk, sizeof(junk));
	read_at(0, before, sizeof(before));
	open_fails(-EBADMSG, "corrupt");
	read_at(0, after, sizeof(after));
	cr_assert_arr_eq(before, after, sizeof(before), "a refused open wrote to the device");
	dev = open_ok(true);
	cr_assert(dev->formatted_now);
	ft_cachedev_close(dev);
}

Test(cachedev, foreign_data_is_refused_and_untouched)
{
	char data[8192], after[8192];

	memset(data, 'x', sizeof(data));
	memcpy(data, "\x7f" "ELF", 4);
	write_at(0, data, sizeof(data));
	cr_assert_eq(truncate(path, (off_t)DEV_BYTES), 0);
	open_fails(-EEXIST, "not a flashtier cache");
	read_at(0, after, sizeof(after));
	cr_assert_arr_eq(data, after, sizeof(data), "foreign data was modified");
}

Test(cachedev, newer_format_is_refused)
{
	struct ft_cachedev *dev = open_ok(false);
	struct ft_cache_sb sb;

	ft_cachedev_close(dev);
	read_at(0, &sb, sizeof(sb));
	sb.version = htole32(FT_CACHE_VERSION + 1);
	write_at(0, &sb, sizeof(sb));
	write_at(FT_CACHE_SB_BYTES, &sb, sizeof(sb));
	open_fails(-EPROTONOSUPPORT, "newer flashtier");
}

Test(cachedev, size_change_is_refused)
{
	struct ft_cachedev *dev = open_ok(false);
	char err[512];

	struct stat st;

	ft_cachedev_close(dev);
	cr_assert_eq(ft_cachedev_open(path, DEV_BYTES * 2, 0, 0, false, &dev, err, sizeof(err)), -EINVAL);
	cr_assert_not_null(strstr(err, "asks for"), "%s", err);
	/* Refused means untouched: the file was not grown first. */
	cr_assert_eq(stat(path, &st), 0);
	cr_assert_eq((uint64_t)st.st_size, (uint64_t)DEV_BYTES);

	/* A file resized behind the cache's back is refused too. */
	cr_assert_eq(truncate(path, (off_t)DEV_BYTES * 2), 0);
	cr_assert_eq(ft_cachedev_open(path, 0, 0, 0, false, &dev, err, sizeof(err)), -EINVAL);
	cr_assert_not_null(strstr(err, "formatted for"), "%s", err);
}

Test(cachedev, too_small_is_refused)
{
	struct ft_cachedev *dev = NULL;
	char err[512];

	cr_assert_eq(ft_cachedev_open(path, 1u << 20, 0, 0, false, &dev, err, sizeof(err)), -ENOSPC);
	cr_assert_not_null(strstr(err, "too small"), "%s", err);
}

Test(cachedev, reformat_clears_old_mappings)
{
	struct ft_cachedev *dev = open_ok(false);
	uint8_t meta[4096], uuid[16];

	memset(meta, 0xee, sizeof(meta));
	write_at((off_t)dev->geo.meta_offset, meta, sizeof(meta));
	memcpy(uuid, dev->uuid, 16);
	ft_cachedev_close(dev);
	dev = open_ok(true);
	cr_assert(memcmp(uuid, dev->uuid, 16) != 0, "reformat kept the old uuid");
	read_at((off_t)dev->geo.meta_offset, meta, sizeof(meta));
	for (size_t i = 0; i < sizeof(meta); i++)
		cr_assert_eq(meta[i], 0, "stale mapping byte at %zu", i);
	ft_cachedev_close(dev);
}

Test(cacherec, roundtrip_and_binding)
{
	static const uint8_t uuid[16] = { 9, 8, 7 }, other[16] = { 1 };
	struct ft_cache_rec rec, bad;
	uint64_t key = 0;
	uint32_t crc = 0;

	ft_cache_rec_encode(&rec, uuid, 1234, (3ull << 48) | 77, 0xdeadbeef);
	cr_assert_eq(ft_cache_rec_decode(&rec, uuid, 1234, &key, &crc), FT_REC_VALID);
	cr_assert_eq(key, (3ull << 48) | 77);
	cr_assert_eq(crc, 0xdeadbeef);
	/* Bound to its slot and to this cache's uuid. */
	cr_assert_eq(ft_cache_rec_decode(&rec, uuid, 1235, &key, &crc), FT_REC_CORRUPT);
	cr_assert_eq(ft_cache_rec_decode(&rec, other, 1234, &key, &crc), FT_REC_CORRUPT);
	/* Any flipped bit is caught. */
	for (unsigned bit = 0; bit < 8 * sizeof(rec); bit++) {
		bad = rec;
		((uint8_t *)&bad)[bit / 8] ^= (uint8_t)(1u << (bit % 8));
		cr_assert_neq(ft_cache_rec_decode(&bad, uuid, 1234, &key, &crc), FT_REC_VALID,
			      "bit %u flip not detected", bit);
	}
	ft_cache_rec_clear(&rec);
	cr_assert_eq(ft_cache_rec_decode(&rec, uuid, 1234, &key, &crc), FT_REC_EMPTY);
	/* Volume id 0 is never a valid key. */
	ft_cache_rec_encode(&rec, uuid, 5, 77, 1);
	cr_assert_eq(ft_cache_rec_decode(&rec, uuid, 5, &key, &crc), FT_REC_CORRUPT);
}
