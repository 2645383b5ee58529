/*
 * DPDK's side of `bench/compare mempool`: the loops of DPDK 22.11's
 * app/test/test_mempool_perf.c (mempool_perf_autotest) for 1 and 2 cores,
 * on their own, because dpdk-test runs every row for 1, 2 and all cores at
 * 5 s each (~45 min here). Run with `-l 0-1` (2 lcores, as the autotest
 * is run here). After rte_eal_init():
 *
 * - pools "perf_test_nocache" (cache 0) and "perf_test_cache" (cache 512)
 *   of rte_lcore_count() x (512 + 512) - 1 objects of 2048 bytes, default
 *   ops (ring_mp_mc), SOCKET_ID_ANY, obj_init as the autotest's;
 * - sections "without cache", "with cache", "with user-owned cache" (the
 *   no-cache pool through one rte_mempool_cache_create(512) per lcore),
 *   each for 1 and 2 cores, n_get_bulk/n_put_bulk in {1, 4, 8, 32} (8 =
 *   the autotest's CACHE_LINE_BURST; by default only get == put, `all` as
 *   the second argument gives the autotest's full cross product) and
 *   n_keep in {32, 128, 512}; rows with get == put are replayed with
 *   compile-time constant sizes (constant_n=1), as the autotest does.
 *   Per row: check the pool is full, launch the per-lcore loop on the
 *   main lcore and (2 cores) one worker, released together; each repeats
 *   test_loop (N/n_keep rounds of get n_keep objects in bulks of
 *   n_get_bulk, put them back in bulks of n_put_bulk; N = 65536) until
 *   <secs> elapsed, adding N per pass; rate_persec = sum over lcores of
 *   count x hz / cycles (the autotest divides by its nominal 5 s).
 *
 * Prints the autotest's lines ("mempool_autotest cache=... cores=..
 * n_get_bulk=.. n_put_bulk=.. n_keep=.. constant_n=.. rate_persec=..").
 * Arguments after `--`: seconds per row (default 1), then optionally `all`.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <rte_cycles.h>
#include <rte_eal.h>
#include <rte_launch.h>
#include <rte_lcore.h>
#include <rte_mempool.h>

#define N 65536
#define ELT 2048
#define MAX_KEEP 512
#define CACHE RTE_MEMPOOL_CACHE_MAX_SIZE
#define MEMPOOL_SIZE ((rte_lcore_count() * (MAX_KEEP + CACHE)) - 1)
#define CACHE_LINE_BURST (RTE_CACHE_LINE_SIZE / sizeof(uintptr_t))

static double secs = 1.0;
static int use_external_cache, use_constant_values;
static unsigned n_get_bulk, n_put_bulk, n_keep;
static volatile uint32_t synchro;

struct __rte_cache_aligned stat {
	uint64_t count, cycles;
};
static struct stat stats[RTE_MAX_LCORE];

static void my_obj_init(struct rte_mempool *mp, void *arg, void *obj, unsigned i)
{
	uint32_t *objnum = obj;
	(void)arg;
	memset(obj, 0, mp->elt_size);
	*objnum = i;
}

static __rte_always_inline int test_loop(struct rte_mempool *mp, struct rte_mempool_cache *cache,
					 unsigned x_keep, unsigned x_get_bulk, unsigned x_put_bulk)
{
	void *obj_table[MAX_KEEP] __rte_cache_aligned;
	unsigned idx, i;
	int ret;

	for (i = 0; likely(i < (N / x_keep)); i++) {
		for (idx = 0; idx < x_keep; idx += x_get_bulk) {
			ret = rte_mempool_generic_get(mp, &obj_table[idx], x_get_bulk, cache);
			if (unlikely(ret < 0))
				return ret;
		}
		for (idx = 0; idx < x_keep; idx += x_put_bulk)
			rte_mempool_generic_put(mp, &obj_table[idx], x_put_bulk, cache);
	}
	return 0;
}

static int per_lcore(void *arg)
{
	struct rte_mempool *mp = arg;
	unsigned lcore_id = rte_lcore_id();
	struct rte_mempool_cache *cache;
	uint64_t hz = rte_get_timer_hz(), start, diff = 0, count = 0;
	uint64_t limit = (uint64_t)(secs * (double)hz);
	int ret = 0;

	cache = use_external_cache ? rte_mempool_cache_create(CACHE, SOCKET_ID_ANY)
				   : rte_mempool_default_cache(mp, lcore_id);
	if (use_external_cache && cache == NULL)
		return -1;
	if (lcore_id != rte_get_main_lcore())
		while (synchro == 0)
			rte_pause();
	start = rte_get_timer_cycles();
	while (diff < limit) {
		if (!use_constant_values)
			ret = test_loop(mp, cache, n_keep, n_get_bulk, n_put_bulk);
		else if (n_get_bulk == 1)
			ret = test_loop(mp, cache, n_keep, 1, 1);
		else if (n_get_bulk == 4)
			ret = test_loop(mp, cache, n_keep, 4, 4);
		else if (n_get_bulk == CACHE_LINE_BURST)
			ret = test_loop(mp, cache, n_keep, CACHE_LINE_BURST, CACHE_LINE_BURST);
		else if (n_get_bulk == 32)
			ret = test_loop(mp, cache, n_keep, 32, 32);
		else
			ret = -1;
		if (ret < 0)
			break;
		diff = rte_get_timer_cycles() - start;
		count += N;
	}
	stats[lcore_id].count = count;
	stats[lcore_id].cycles = diff;
	if (use_external_cache) {
		rte_mempool_cache_flush(cache, mp);
		rte_mempool_cache_free(cache);
	}
	return ret;
}

static int launch_cores(struct rte_mempool *mp, unsigned cores)
{
	unsigned lcore_id, left = cores;
	double rate = 0;
	int ret;

	synchro = 0;
	memset(stats, 0, sizeof(stats));
	printf("mempool_autotest cache=%u cores=%u n_get_bulk=%u n_put_bulk=%u n_keep=%u "
	       "constant_n=%u ",
	       use_external_cache ? CACHE : mp->cache_size, cores, n_get_bulk, n_put_bulk, n_keep,
	       use_constant_values);
	if (rte_mempool_avail_count(mp) != MEMPOOL_SIZE) {
		printf("mempool is not full\n");
		return -1;
	}
	RTE_LCORE_FOREACH_WORKER(lcore_id) {
		if (left == 1)
			break;
		left--;
		rte_eal_remote_launch(per_lcore, mp, lcore_id);
	}
	synchro = 1;
	ret = per_lcore(mp);
	rte_eal_mp_wait_lcore();
	RTE_LCORE_FOREACH(lcore_id) {
		if (stats[lcore_id].cycles)
			rate += (double)stats[lcore_id].count * (double)rte_get_timer_hz() /
				(double)stats[lcore_id].cycles;
	}
	if (ret < 0) {
		printf("per-lcore test returned -1\n");
		return -1;
	}
	printf("rate_persec=%" PRIu64 "\n", (uint64_t)rate);
	fflush(stdout);
	return 0;
}

static int do_one(struct rte_mempool *mp, unsigned cores, int all)
{
	static const unsigned bulk[] = {1, 4, CACHE_LINE_BURST, 32}, keeps[] = {32, 128, 512};
	unsigned g, p, k;

	for (g = 0; g < 4; g++)
		for (p = 0; p < 4; p++) {
			if (!all && g != p)
				continue;
			for (k = 0; k < 3; k++) {
				use_constant_values = 0;
				n_get_bulk = bulk[g];
				n_put_bulk = bulk[p];
				n_keep = keeps[k];
				if (launch_cores(mp, cores) < 0)
					return -1;
				if (n_get_bulk == n_put_bulk) {
					use_constant_values = 1;
					if (launch_cores(mp, cores) < 0)
						return -1;
				}
			}
		}
	return 0;
}

int main(int argc, char **argv)
{
	struct rte_mempool *nocache, *cache;
	int ret, s, all = 0, only_s = -1, only_c = -1;
	unsigned cores;

	ret = rte_eal_init(argc, argv);
	if (ret < 0) {
		fprintf(stderr, "rte_eal_init failed\n");
		return 1;
	}
	if (ret + 1 < argc)
		secs = atof(argv[ret + 1]);
	if (ret + 2 < argc && strcmp(argv[ret + 2], "all") == 0)
		all = 1;
	/* One block only: "S,C" = section S (0 no cache, 1 cache, 2 user-owned
	 * cache) on C cores (bench/compare interleaves blocks of both sides). */
	if (ret + 3 < argc && sscanf(argv[ret + 3], "%d,%d", &only_s, &only_c) != 2) {
		fprintf(stderr, "bad block %s (want S,C)\n", argv[ret + 3]);
		return 1;
	}
	nocache = rte_mempool_create("perf_test_nocache", MEMPOOL_SIZE, ELT, 0, 0, NULL, NULL,
				     my_obj_init, NULL, SOCKET_ID_ANY, 0);
	cache = rte_mempool_create("perf_test_cache", MEMPOOL_SIZE, ELT, CACHE, 0, NULL, NULL,
				   my_obj_init, NULL, SOCKET_ID_ANY, 0);
	if (!nocache || !cache) {
		fprintf(stderr, "cannot create the pools\n");
		return 1;
	}
	for (s = 0; s < 3; s++) {
		struct rte_mempool *mp = s == 1 ? cache : nocache;

		if (only_s >= 0 && s != only_s)
			continue;
		use_external_cache = s == 2;
		printf("start performance test (%s)\n",
		       s == 0 ? "without cache" : s == 1 ? "with cache" : "with user-owned cache");
		for (cores = 1; cores <= 2 && cores <= rte_lcore_count(); cores++)
			if ((only_c < 0 || (int)cores == only_c) && do_one(mp, cores, all) < 0)
				return 1;
	}
	rte_mempool_free(nocache);
	rte_mempool_free(cache);
	rte_eal_cleanup();
	return 0;
}
