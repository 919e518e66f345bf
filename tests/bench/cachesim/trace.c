// SPDX-License-Identifier: MIT
/*
 * Deterministic synthetic traces: a seeded xoshiro256** drives every choice,
 * so a (kind, parameters, seed) triple always gives the same trace.
 *
 * Popularity ranks are mapped to block numbers through a fixed random
 * permutation of the working set, so that popular blocks are not adjacent
 * (a sequential detector must not mistake hot blocks for a stream).
 */
#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cachesim.h"

const char *const trace_names[TRACE_NKINDS] = {
	[TRACE_ZIPF09] = "zipf-0.9",
	[TRACE_ZIPF11] = "zipf-1.1",
	[TRACE_ZIPF12] = "zipf-1.2",
	[TRACE_PARETO] = "pareto-1.2",
	[TRACE_ZIPF09_SCAN] = "zipf-0.9+scan",
	[TRACE_ZIPF11_SCAN] = "zipf-1.1+scan",
	[TRACE_ZIPFS_SCAN] = "zipf-S+scan", /* printed with --scan-zipf's S */
	[TRACE_LOOP] = "loop",
};

/*
 * Each trace's random stream (seed * 0x100 + stream). The scan traces share
 * one: they use the same random numbers (common random numbers), so they
 * differ only by the exponent, and zipf-0.9+scan and zipf-1.1+scan are
 * exactly the single zipf+scan trace of the previous version run with
 * --scan-zipf 0.9 and 1.1.
 */
static const uint64_t trace_stream[TRACE_NKINDS] = {
	[TRACE_ZIPF09] = 0,	 [TRACE_ZIPF11] = 1,	  [TRACE_ZIPF12] = 2,
	[TRACE_PARETO] = 3,	 [TRACE_ZIPF09_SCAN] = 4, [TRACE_ZIPF11_SCAN] = 4,
	[TRACE_ZIPFS_SCAN] = 4, [TRACE_LOOP] = 5,
};

/* A scan trace's name: zipf-0.9+scan, zipf-1.05+scan (one decimal at least). */
void trace_scan_name(char *buf, size_t len, double s)
{
	if (fabs(s * 10 - nearbyint(s * 10)) < 1e-9)
		snprintf(buf, len, "zipf-%.1f+scan", s);
	else
		snprintf(buf, len, "zipf-%g+scan", s);
}

#define PARETO_SHAPE 1.2

/* ---- PRNG ---- */

static uint64_t splitmix64(uint64_t *x)
{
	uint64_t z = (*x += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

void rng_seed(struct rng *r, uint64_t seed)
{
	for (int i = 0; i < 4; i++)
		r->s[i] = splitmix64(&seed);
}

static inline uint64_t rotl(uint64_t x, int k)
{
	return (x << k) | (x >> (64 - k));
}

uint64_t rng_next(struct rng *r)
{
	uint64_t *s = r->s;
	uint64_t result = rotl(s[1] * 5, 7) * 9;
	uint64_t t = s[1] << 17;

	s[2] ^= s[0];
	s[3] ^= s[1];
	s[1] ^= s[2];
	s[0] ^= s[3];
	s[2] ^= t;
	s[3] = rotl(s[3], 45);
	return result;
}

double rng_double(struct rng *r)
{
	return (double)(rng_next(r) >> 11) * 0x1.0p-53;
}

uint64_t rng_below(struct rng *r, uint64_t n)
{
	/* Lemire's multiply-shift; the bias for n <= 2^32 is below 2^-32. */
	return (uint64_t)(((unsigned __int128)rng_next(r) * n) >> 64);
}

/* ---- Zipf: rejection-inversion (Hörmann & Derflinger, ACM TOMACS 1996) ---- */

/* log1p(x)/x, continuous at 0 */
static double helper1(double x)
{
	if (fabs(x) > 1e-8)
		return log1p(x) / x;
	return 1 - x * (0.5 - x * (1.0 / 3 - 0.25 * x));
}

/* expm1(x)/x, continuous at 0 */
static double helper2(double x)
{
	if (fabs(x) > 1e-8)
		return expm1(x) / x;
	return 1 + x * 0.5 * (1 + x * (1.0 / 3) * (1 + 0.25 * x));
}

/* h(x) = x^-s, the hat function's density */
static double zipf_h(const struct zipf *z, double x)
{
	return exp(-z->s * log(x));
}

/* H(x) = (x^(1-s) - 1) / (1 - s) (log x when s = 1), an antiderivative of h */
static double zipf_hint(const struct zipf *z, double x)
{
	double lx = log(x);

	return helper2((1 - z->s) * lx) * lx;
}

/* H^-1 */
static double zipf_hint_inv(const struct zipf *z, double x)
{
	double t = x * (1 - z->s);

	if (t < -1)
		t = -1;
	return exp(helper1(t) * x);
}

void zipf_init(struct zipf *z, uint64_t n, double s)
{
	z->s = s;
	z->n = (double)n;
	z->h_x1 = zipf_hint(z, 1.5) - 1;
	z->h_n = zipf_hint(z, z->n + 0.5);
	z->sq = 2 - zipf_hint_inv(z, zipf_hint(z, 2.5) - zipf_h(z, 2));
}

/* A rank in 1..n with P(k) proportional to k^-s. */
uint64_t zipf_sample(const struct zipf *z, struct rng *r)
{
	for (;;) {
		/* u uniform in (H(1.5) - 1, H(n + 0.5)] */
		double u = z->h_n + rng_double(r) * (z->h_x1 - z->h_n);
		double x = zipf_hint_inv(z, u);
		double k = floor(x + 0.5);

		if (k < 1)
			k = 1;
		else if (k > z->n)
			k = z->n;
		if (k - x <= z->sq || u >= zipf_hint(z, k + 0.5) - zipf_h(z, k))
			return (uint64_t)k;
	}
}

/* ---- discrete distribution by Walker's alias method (Vose's construction) ---- */

struct alias {
	uint64_t n;
	double *prob;
	uint32_t *alias;
};

static int alias_init(struct alias *a, const double *w, uint64_t n)
{
	double sum = 0;
	uint32_t *small, *large;
	uint64_t ns = 0, nl = 0;

	a->n = n;
	a->prob = malloc(n * sizeof(*a->prob));
	a->alias = malloc(n * sizeof(*a->alias));
	small = malloc(n * sizeof(*small));
	large = malloc(n * sizeof(*large));
	if (!a->prob || !a->alias || !small || !large) {
		free(a->prob);
		free(a->alias);
		free(small);
		free(large);
		return -ENOMEM;
	}
	for (uint64_t i = 0; i < n; i++)
		sum += w[i];
	for (uint64_t i = 0; i < n; i++) {
		a->prob[i] = w[i] * (double)n / sum;
		if (a->prob[i] < 1)
			small[ns++] = (uint32_t)i;
		else
			large[nl++] = (uint32_t)i;
	}
	while (ns && nl) {
		uint32_t s = small[--ns], l = large[nl - 1];

		a->alias[s] = l;
		a->prob[l] -= 1 - a->prob[s];
		if (a->prob[l] < 1) {
			nl--;
			small[ns++] = l;
		}
	}
	/* Leftovers are 1 up to rounding. */
	while (nl)
		a->prob[large[--nl]] = 1;
	while (ns)
		a->prob[small[--ns]] = 1;
	free(small);
	free(large);
	return 0;
}

static uint64_t alias_sample(const struct alias *a, struct rng *r)
{
	uint64_t i = rng_below(r, a->n);

	return rng_double(r) < a->prob[i] ? i : a->alias[i];
}

static void alias_free(struct alias *a)
{
	free(a->prob);
	free(a->alias);
}

/* Pareto(x_m = 1, shape): (1 - U)^(-1/shape), U uniform in [0, 1). */
static double pareto_draw(struct rng *r, double shape)
{
	return pow(1 - rng_double(r), -1 / shape);
}

/* ---- trace generation ---- */

static uint32_t *make_perm(uint64_t n, struct rng *r)
{
	uint32_t *p = malloc(n * sizeof(*p));

	if (!p)
		return NULL;
	for (uint64_t i = 0; i < n; i++)
		p[i] = (uint32_t)i;
	for (uint64_t i = n - 1; i > 0; i--) {
		uint64_t j = rng_below(r, i + 1);
		uint32_t t = p[i];

		p[i] = p[j];
		p[j] = t;
	}
	return p;
}

static void gen_zipf(uint32_t *out, uint64_t n, const struct zipf *z, const uint32_t *perm,
		     struct rng *r)
{
	for (uint64_t i = 0; i < n; i++)
		out[i] = perm[zipf_sample(z, r) - 1];
}

uint64_t trace_count_distinct(const uint32_t *blk, uint64_t n)
{
	uint64_t max = 0, d = 0;
	uint64_t *bits;

	for (uint64_t i = 0; i < n; i++)
		if (blk[i] > max)
			max = blk[i];
	bits = calloc(max / 64 + 1, sizeof(*bits));
	if (!bits)
		return 0;
	for (uint64_t i = 0; i < n; i++) {
		uint64_t b = blk[i];

		if (!(bits[b / 64] & (1ull << (b % 64)))) {
			bits[b / 64] |= 1ull << (b % 64);
			d++;
		}
	}
	free(bits);
	return d;
}

static const double std_sizes[] = { 0.01, 0.05, 0.10, 0.25 };

int trace_generate(enum trace_kind kind, const struct trace_params *tp, struct trace *t)
{
	uint64_t w = tp->blocks, n = tp->accesses;
	struct rng r;
	uint32_t *perm = NULL;
	struct zipf z;
	int err = -ENOMEM;

	memset(t, 0, sizeof(*t));
	if ((unsigned)kind >= TRACE_NKINDS)
		return -EINVAL;
	t->kind = kind;
	t->scan_first = UINT32_MAX;
	snprintf(t->name, sizeof(t->name), "%s", trace_names[kind]);
	/* Each trace has its own stream, so one trace's size does not shift another. */
	rng_seed(&r, tp->seed * 0x100 + trace_stream[kind]);
	t->n = n;
	t->blk = malloc(n * sizeof(*t->blk));
	if (!t->blk)
		goto out;
	if (kind != TRACE_LOOP) {
		perm = make_perm(w, &r);
		if (!perm)
			goto out;
	}
	t->nsizes = 4;
	memcpy(t->sizes, std_sizes, sizeof(std_sizes));

	switch (kind) {
	case TRACE_ZIPF09:
	case TRACE_ZIPF11:
	case TRACE_ZIPF12: {
		double s = kind == TRACE_ZIPF09 ? 0.9 : kind == TRACE_ZIPF11 ? 1.1 : 1.2;

		zipf_init(&z, w, s);
		gen_zipf(t->blk, n, &z, perm, &r);
		snprintf(t->desc, sizeof(t->desc),
			 "Zipf(%.1f) over %llu blocks (rejection-inversion), ranks permuted", s,
			 (unsigned long long)w);
		break;
	}
	case TRACE_PARETO: {
		double *wt = malloc(w * sizeof(*wt));
		struct alias a;

		if (!wt)
			goto out;
		for (uint64_t i = 0; i < w; i++)
			wt[i] = pareto_draw(&r, PARETO_SHAPE);
		err = alias_init(&a, wt, w);
		free(wt);
		if (err)
			goto out;
		for (uint64_t i = 0; i < n; i++)
			t->blk[i] = perm[alias_sample(&a, &r)];
		alias_free(&a);
		snprintf(t->desc, sizeof(t->desc),
			 "%llu blocks with i.i.d. Pareto(x_m=1, shape %.1f) popularity weights; "
			 "accesses drawn in proportion (alias method)",
			 (unsigned long long)w, PARETO_SHAPE);
		break;
	}
	case TRACE_ZIPF09_SCAN:
	case TRACE_ZIPF11_SCAN:
	case TRACE_ZIPFS_SCAN: {
		double s = kind == TRACE_ZIPF09_SCAN ? 0.9
			   : kind == TRACE_ZIPF11_SCAN ? 1.1
						       : tp->scan_zipf;
		uint64_t region = (uint64_t)(tp->scan_region * (double)w);
		uint64_t scan_total = (uint64_t)(tp->scan_frac * (double)n + 0.5);
		uint64_t len = tp->scan_len, nscans, zipf_total, inside = 0;
		uint64_t chunk = tp->scan_chunk, pos = 0, cur = 0, zdone = 0, zin = 0;
		double duty = tp->scan_duty;

		if (region < 1)
			region = 1;
		if (!len)
			len = region;
		if (scan_total > n)
			scan_total = n;
		nscans = scan_total ? (scan_total + len - 1) / len : 0;
		zipf_total = n - scan_total;
		if (!chunk || chunk > len)
			chunk = len;
		/*
		 * Zipf accesses that run while a scan does ("inside"): all of them when
		 * the scan reads at a constant rate for the whole trace (duty 0, or not
		 * above scan_frac); else as many as make the scan @duty of the accesses
		 * while it runs. None when each scan is one back-to-back run.
		 */
		if (chunk < len && scan_total) {
			if (!(duty > tp->scan_frac))
				inside = zipf_total;
			else
				inside = (uint64_t)((double)scan_total * (1 - duty) / duty + 0.5);
			if (inside > zipf_total)
				inside = zipf_total;
		}
		t->scan_len = nscans ? scan_total / nscans : 0;
		t->scan_chunk = chunk;
		t->scan_trace = true;
		t->scan_zipf = s;
		t->scan_first = (uint32_t)w;
		zipf_init(&z, w, s);
		/*
		 * nscans scans spread evenly: zipf, scan, zipf, ..., scan, zipf. A scan
		 * is read in requests of @chunk blocks, each followed by an equal share
		 * of the scan's "inside" Zipf accesses (the VM keeps running while a
		 * backup reads); each scan goes on where the last one stopped, cycling
		 * through the region.
		 */
		for (uint64_t j = 0; j <= nscans; j++) {
			uint64_t zend = (uint64_t)((unsigned __int128)(zipf_total - inside) * (j + 1) /
						   (nscans + 1));
			uint64_t slen = 0, zw = 0, nreq, zwdone = 0;

			if (j < nscans) {
				slen = scan_total / nscans + (j < scan_total % nscans);
				zw = (uint64_t)((unsigned __int128)inside * (j + 1) / nscans) - zin;
			}
			nreq = (slen + chunk - 1) / chunk;

			gen_zipf(t->blk + cur, zend - zdone, &z, perm, &r);
			cur += zend - zdone;
			zdone = zend;
			for (uint64_t q = 0; q < nreq; q++) {
				uint64_t k1 = (q + 1) * chunk < slen ? (q + 1) * chunk : slen;
				uint64_t zto = (uint64_t)((unsigned __int128)zw * (q + 1) / nreq);

				for (uint64_t k = q * chunk; k < k1; k++) {
					t->blk[cur++] = (uint32_t)(w + pos);
					pos = (pos + 1) % region;
				}
				gen_zipf(t->blk + cur, zto - zwdone, &z, perm, &r);
				cur += zto - zwdone;
				zwdone = zto;
			}
			zin += zw;
		}
		if (cur != n) {
			err = -EINVAL; /* cannot happen: the shares above add up to n */
			goto out;
		}
		trace_scan_name(t->name, sizeof(t->name), s);
		snprintf(t->desc, sizeof(t->desc),
			 "Zipf(%g) over %llu blocks, plus %llu sequential scans of ~%llu blocks "
			 "in requests of %llu blocks%s (going on through %llu blocks outside the "
			 "working set): %.1f%% of accesses",
			 s, (unsigned long long)w, (unsigned long long)nscans,
			 (unsigned long long)t->scan_len, (unsigned long long)chunk,
			 chunk == len ? " (back to back)"
			 : inside == zipf_total ? ", interleaved with Zipf accesses all along"
						: ", interleaved with Zipf accesses",
			 (unsigned long long)region, 100.0 * (double)scan_total / (double)n);
		break;
	}
	case TRACE_LOOP: {
		uint64_t len = (uint64_t)(tp->loop_frac * (double)w);

		if (len < 1)
			len = 1;
		for (uint64_t i = 0; i < n; i++)
			t->blk[i] = (uint32_t)(i % len);
		t->sizes[t->nsizes++] = 0.50;
		t->sizes[t->nsizes++] = 2.0 / 3;
		snprintf(t->desc, sizeof(t->desc),
			 "cyclic sequential pass over blocks 0..%llu, %.1f passes",
			 (unsigned long long)len - 1, (double)n / (double)len);
		break;
	}
	default:
		err = -EINVAL;
		goto out;
	}
	t->distinct = trace_count_distinct(t->blk, n);
	t->base = t->distinct;
	err = t->distinct ? 0 : -ENOMEM;
out:
	free(perm);
	if (err)
		trace_free(t);
	return err;
}

void trace_free(struct trace *t)
{
	free(t->blk);
	t->blk = NULL;
}

/* ---- self-tests of the samplers and the hash map ---- */


/* Pearson chi-square of observed counts against probabilities, and its z-score. */
static double chi2_z(const uint64_t *obs, const double *p, uint64_t k, uint64_t total)
{
	double chi2 = 0;

	for (uint64_t i = 0; i < k; i++) {
		double e = p[i] * (double)total;
		double d = (double)obs[i] - e;

		chi2 += d * d / e;
	}
	/* df = k - 1: mean df, variance 2 df */
	return (chi2 - (double)(k - 1)) / sqrt(2.0 * (double)(k - 1));
}

static int selftest_zipf(double s)
{
	const uint64_t k = 1000, samples = 2000000;
	uint64_t obs[1000] = { 0 };
	double p[1000], hsum = 0, zs;
	struct zipf z;
	struct rng r;

	rng_seed(&r, 12345);
	zipf_init(&z, k, s);
	for (uint64_t i = 0; i < samples; i++)
		obs[zipf_sample(&z, &r) - 1]++;
	for (uint64_t i = 0; i < k; i++)
		hsum += p[i] = pow((double)(i + 1), -s);
	for (uint64_t i = 0; i < k; i++)
		p[i] /= hsum;
	zs = chi2_z(obs, p, k, samples);
	sim_print("selftest: zipf s=%.1f n=%llu: P(1) %.5f (expect %.5f), chi-square z=%.2f: %s\n",
		 s, (unsigned long long)k, (double)obs[0] / (double)samples, p[0], zs,
		 fabs(zs) < 6 ? "ok" : "FAIL");
	return fabs(zs) < 6 ? 0 : 1;
}

static int selftest_alias(void)
{
	const uint64_t k = 500, samples = 2000000;
	uint64_t obs[500] = { 0 }, tail = 0, draws = 1000000;
	double w[500], p[500], sum = 0, zs, tailp, want = pow(10, -PARETO_SHAPE);
	struct alias a;
	struct rng r;
	int fail = 0;

	rng_seed(&r, 777);
	for (uint64_t i = 0; i < k; i++)
		sum += w[i] = pareto_draw(&r, PARETO_SHAPE);
	for (uint64_t i = 0; i < k; i++)
		p[i] = w[i] / sum;
	if (alias_init(&a, w, k))
		return 1;
	for (uint64_t i = 0; i < samples; i++)
		obs[alias_sample(&a, &r)]++;
	alias_free(&a);
	zs = chi2_z(obs, p, k, samples);
	fail += fabs(zs) >= 6;
	sim_print("selftest: alias table, %llu Pareto weights: chi-square z=%.2f: %s\n",
		 (unsigned long long)k, zs, fabs(zs) < 6 ? "ok" : "FAIL");
	for (uint64_t i = 0; i < draws; i++)
		tail += pareto_draw(&r, PARETO_SHAPE) > 10;
	tailp = (double)tail / (double)draws;
	/* binomial sd ~ 0.00024; allow 6 sd */
	fail += fabs(tailp - want) > 0.0015;
	sim_print("selftest: Pareto(1, %.1f) P(X > 10) = %.4f (expect %.4f): %s\n", PARETO_SHAPE,
		 tailp, want, fabs(tailp - want) <= 0.0015 ? "ok" : "FAIL");
	return fail;
}

static int selftest_hmap(void)
{
	enum { KEYS = 5000 };
	static uint32_t shadow[KEYS];
	struct hmap m;
	struct rng r;
	uint64_t live = 0;
	int bad = 0;

	if (hmap_init(&m, KEYS))
		return 1;
	rng_seed(&r, 99);
	for (int i = 0; i < KEYS; i++)
		shadow[i] = NIL;
	for (int i = 0; i < 2000000 && !bad; i++) {
		/* half the keys dense, half spread over the 32-bit range */
		uint64_t k = rng_below(&r, KEYS);
		uint32_t key = (k & 1) ? (uint32_t)k * 0x9e3779b1u : (uint32_t)k;

		switch (rng_below(&r, 3)) {
		case 0:
			if (shadow[k] == NIL)
				live++;
			shadow[k] = (uint32_t)i;
			hmap_put(&m, key, (uint32_t)i);
			break;
		case 1:
			bad |= hmap_del(&m, key) != (shadow[k] != NIL);
			if (shadow[k] != NIL)
				live--;
			shadow[k] = NIL;
			break;
		default:
			bad |= hmap_get(&m, key) != shadow[k];
		}
		bad |= m.count != live;
	}
	for (uint64_t k = 0; k < KEYS && !bad; k++)
		bad |= hmap_get(&m, (k & 1) ? (uint32_t)k * 0x9e3779b1u : (uint32_t)k) != shadow[k];
	hmap_free(&m);
	sim_print("selftest: hash map, 2M random put/del/get against a shadow array: %s\n",
		 bad ? "FAIL" : "ok");
	return bad;
}

int trace_selftest(void)
{
	int fail = 0;

	fail += selftest_zipf(0.9);
	fail += selftest_zipf(1.0);
	fail += selftest_zipf(1.1);
	fail += selftest_zipf(1.2);
	fail += selftest_alias();
	fail += selftest_hmap();
	return fail;
}
