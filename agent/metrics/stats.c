/* SPDX-License-Identifier: MIT */
#include "flashtier/metrics.h"

const uint64_t ft_lat_bucket_ns[FT_LAT_BUCKETS] = {
	10000,	   25000,     50000,	 100000,    250000,	500000,	    1000000,
	2500000,   5000000,   10000000,	 25000000,  50000000,	100000000,  250000000,
	500000000, 1000000000, 2500000000, 5000000000, 10000000000,
};

void ft_stats_record(struct ft_volume_stats *s, enum ft_op op, uint64_t bytes, uint64_t lat_ns,
		     bool error)
{
	struct ft_op_stats *o = &s->op[op];
	unsigned b = 0;

	while (b < FT_LAT_BUCKETS && lat_ns > ft_lat_bucket_ns[b])
		b++;
	ft_stat_add(&o->requests, 1);
	ft_stat_add(&o->bytes, bytes);
	if (error)
		ft_stat_add(&o->errors, 1);
	ft_stat_add(&o->lat_sum_ns, lat_ns);
	ft_stat_add(&o->lat_bucket[b], 1);
}
