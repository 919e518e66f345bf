// SPDX-License-Identifier: MIT
/*
 * Open-addressing hash map from 32-bit keys to 32-bit values: linear
 * probing, load factor <= 1/2, Fibonacci hashing, backward-shift deletion
 * (no tombstones, so long runs never degrade).
 */
#include <errno.h>
#include <stdlib.h>

#include "cachesim.h"

#define HMAP_EMPTY UINT32_MAX

/* Fibonacci hashing; hmap_prefetch() in cachesim.h computes the same slot. */
static inline uint32_t hmap_home(const struct hmap *m, uint32_t key)
{
	return (uint32_t)(((uint64_t)key * 0x9e3779b97f4a7c15ull) >> m->shift);
}

int hmap_init(struct hmap *m, uint64_t max_entries)
{
	uint64_t cap = 16;
	uint32_t bits = 4;

	while (cap < 2 * max_entries) {
		cap <<= 1;
		bits++;
	}
	m->e = malloc(cap * sizeof(*m->e));
	if (!m->e)
		return -ENOMEM;
	for (uint64_t i = 0; i < cap; i++)
		m->e[i].key = HMAP_EMPTY;
	m->mask = (uint32_t)(cap - 1);
	m->shift = 64 - bits;
	m->count = 0;
	return 0;
}

void hmap_free(struct hmap *m)
{
	free(m->e);
	m->e = NULL;
}

uint32_t hmap_get(const struct hmap *m, uint32_t key)
{
	for (uint32_t i = hmap_home(m, key);; i = (i + 1) & m->mask) {
		if (m->e[i].key == key)
			return m->e[i].val;
		if (m->e[i].key == HMAP_EMPTY)
			return NIL;
	}
}

void hmap_put(struct hmap *m, uint32_t key, uint32_t val)
{
	for (uint32_t i = hmap_home(m, key);; i = (i + 1) & m->mask) {
		if (m->e[i].key == key) {
			m->e[i].val = val;
			return;
		}
		if (m->e[i].key == HMAP_EMPTY) {
			m->e[i].key = key;
			m->e[i].val = val;
			m->count++;
			return;
		}
	}
}

bool hmap_del(struct hmap *m, uint32_t key)
{
	uint32_t i, j, k;

	for (i = hmap_home(m, key);; i = (i + 1) & m->mask) {
		if (m->e[i].key == key)
			break;
		if (m->e[i].key == HMAP_EMPTY)
			return false;
	}
	/* Shift back every later entry of the run that may move into the hole. */
	for (j = i;;) {
		j = (j + 1) & m->mask;
		if (m->e[j].key == HMAP_EMPTY)
			break;
		k = hmap_home(m, m->e[j].key);
		/* Stays if its home lies cyclically in (i, j]. */
		if (i <= j ? (i < k && k <= j) : (i < k || k <= j))
			continue;
		m->e[i] = m->e[j];
		i = j;
	}
	m->e[i].key = HMAP_EMPTY;
	m->count--;
	return true;
}
