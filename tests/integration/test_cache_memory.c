/* SPDX-License-Identifier: MIT */
/*
 * RAM per cached block, as the agent measures it (every array the cache
 * allocates, summed at start and exported as flashtier_cache_memory_bytes),
 * for caches of several sizes: the budget is 32 bytes per 4 KiB block.
 */
#include "nbd_client.h"

static struct ft_agent agent;
static char tdir[256];
static pid_t kit;

static void cleanup(void)
{
	th_env_teardown(&agent, &kit, tdir);
}

TestSuite(cache_memory, .fini = cleanup, .timeout = 60);

static double bytes_per_block(const char *size)
{
	char disk[512], extra[768], vols[1024];
	double mem, slots;

	th_mkdtemp(tdir, sizeof(tdir));
	th_make_file(tdir, "disk.img", 64ll << 20, disk, sizeof(disk));
	th_fmt(extra, sizeof(extra), "\"cache\": {\"path\": \"%s/cache.img\", \"size\": \"%s\"},",
	       tdir, size);
	th_fmt(vols, sizeof(vols), "{\"d\": {\"backing\": \"%s\"}}", disk);
	ft_agent_start_in(&agent, tdir, vols, extra);
	mem = th_agent_metric(&agent, "flashtier_cache_memory_bytes");
	slots = th_agent_metric(&agent, "flashtier_cache_size_bytes") / 4096;
	cr_assert_gt(slots, 0);
	cr_assert_eq(ft_agent_stop(&agent), 0);
	th_rm_rf(tdir);
	tdir[0] = '\0';
	cr_log_info("cache %s: %.0f blocks, %.0f bytes of RAM, %.2f bytes per block", size, slots,
		    mem, mem / slots);
	return mem / slots;
}

Test(cache_memory, under_32_bytes_per_block)
{
	static const char *const sizes[] = { "64M", "1G", "16G" };

	for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++) {
		double b = bytes_per_block(sizes[i]);

		/* The directory alone is 23.5 bytes: less would mean the figure is not real. */
		cr_assert_geq(b, 23.5, "%s: %.2f bytes per block is below the directory's own size",
			      sizes[i], b);
		cr_assert_leq(b, 32.0, "%s: %.2f bytes per block is over the 32-byte budget",
			      sizes[i], b);
	}
}
