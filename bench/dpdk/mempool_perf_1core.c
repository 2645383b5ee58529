/*
 * DPDK's side of `bench/compare mempool`: the 1-core loop of DPDK 22.11's
 * test_mempool_perf.c (mempool_perf_autotest), on its own, because
 * dpdk-test runs every row for 1, 2 and all cores at 5 s each (~45 min
 * here). After rte_eal_init() with the EAL arguments given:
 *
 * - pools "perf_test_nocache" (cache 0) and "perf_test_cache" (cache 512)
 *   of 2 x (512 + 512) - 1 objects of 2048 bytes, default ops
 *   (ring_mp_mc), SOCKET_ID_ANY, as the autotest creates them;
 * - sections "without cache", "with cache", "with user-owned cache" (the
 *   no-cache pool through rte_mempool_cache_create(512)), each with
 *   n_get_bulk, n_put_bulk in {1, 4, 32} and n_keep in {32, 128}:
 *   check the pool is full, then on the main lcore repeat until <secs>
 *   elapsed: N/n_keep rounds of [rte_mempool_generic_get n_keep objects in
 *   bulks of n_get_bulk; rte_mempool_generic_put them in bulks of
 *   n_put_bulk], N = 65536, adding N after each pass (the autotest's
 *   loop); rate_persec = objects * hz / cycles.
 *
 * Prints the autotest's lines ("mempool_autotest cache=... cores=1
 * n_get_bulk=.. n_put_bulk=.. n_keep=.. constant_n=0 rate_persec=..").
 * Argument after `--`: seconds per row (default 1).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include <rte_cycles.h>
#include <rte_eal.h>
#include <rte_lcore.h>
#include <rte_mempool.h>

#define N 65536
#define ELT 2048
#define MAX_KEEP 512
#define CACHE RTE_MEMPOOL_CACHE_MAX_SIZE
#define SIZE (2 * (MAX_KEEP + CACHE) - 1)

static void *table[MAX_KEEP];

static int one(struct rte_mempool *mp, struct rte_mempool_cache *uc, unsigned get,
	       unsigned put, unsigned keep, double secs, uint64_t *rate)
{
	struct rte_mempool_cache *cache = uc ? uc : rte_mempool_default_cache(mp, rte_lcore_id());
	uint64_t hz = rte_get_timer_hz(), start = rte_get_timer_cycles(), diff = 0, count = 0;
	unsigned i, idx;

	while (diff < (uint64_t)(secs * (double)hz)) {
		for (i = 0; i < N / keep; i++) {
			for (idx = 0; idx < keep; idx += get)
				if (rte_mempool_generic_get(mp, &table[idx], get, cache) < 0)
					return -1;
			for (idx = 0; idx < keep; idx += put)
				rte_mempool_generic_put(mp, &table[idx], put, cache);
		}
		diff = rte_get_timer_cycles() - start;
		count += N;
	}
	*rate = (uint64_t)((double)count * (double)hz / (double)diff);
	if (uc)
		rte_mempool_cache_flush(uc, mp);
	return 0;
}

int main(int argc, char **argv)
{
	static const unsigned bulk[] = {1, 4, 32}, keeps[] = {32, 128};
	struct rte_mempool *nocache, *cache;
	struct rte_mempool_cache *uc;
	double secs = 1.0;
	int ret, s;
	unsigned g, p, k;

	ret = rte_eal_init(argc, argv);
	if (ret < 0) {
		fprintf(stderr, "rte_eal_init failed\n");
		return 1;
	}
	if (ret + 1 < argc)
		secs = atof(argv[ret + 1]);
	nocache = rte_mempool_create("perf_test_nocache", SIZE, ELT, 0, 0, NULL, NULL, NULL, NULL,
				     SOCKET_ID_ANY, 0);
	cache = rte_mempool_create("perf_test_cache", SIZE, ELT, CACHE, 0, NULL, NULL, NULL, NULL,
				   SOCKET_ID_ANY, 0);
	uc = rte_mempool_cache_create(CACHE, SOCKET_ID_ANY);
	if (!nocache || !cache || !uc) {
		fprintf(stderr, "cannot create the pools\n");
		return 1;
	}
	for (s = 0; s < 3; s++) {
		struct rte_mempool *mp = s == 1 ? cache : nocache;

		printf("start performance test (%s)\n",
		       s == 0 ? "without cache" : s == 1 ? "with cache" : "with user-owned cache");
		for (g = 0; g < 3; g++)
			for (p = 0; p < 3; p++)
				for (k = 0; k < 2; k++) {
					uint64_t rate;

					if (rte_mempool_avail_count(mp) != SIZE) {
						printf("mempool is not full\n");
						return 1;
					}
					if (one(mp, s == 2 ? uc : NULL, bulk[g], bulk[p], keeps[k], secs,
						&rate) < 0) {
						printf("get failed\n");
						return 1;
					}
					printf("mempool_autotest cache=%u cores=1 n_get_bulk=%u "
					       "n_put_bulk=%u n_keep=%u constant_n=0 rate_persec=%" PRIu64
					       "\n",
					       s == 0 ? 0 : CACHE, bulk[g], bulk[p], keeps[k], rate);
					fflush(stdout);
				}
	}
	rte_mempool_cache_free(uc);
	rte_mempool_free(nocache);
	rte_mempool_free(cache);
	rte_eal_cleanup();
	return 0;
}
