/*
 * DPDK's side of `bench/compare mbuf`: rte_pktmbuf_alloc_bulk +
 * rte_pktmbuf_free_bulk on one lcore. After rte_eal_init() with the EAL
 * arguments given:
 *
 * - pools "mbuf_perf_c256" (cache 256) and "mbuf_perf_c0" (no cache) of
 *   8191 mbufs, rte_pktmbuf_pool_create(name, 8191, cache, 0,
 *   RTE_MBUF_DEFAULT_BUF_SIZE, SOCKET_ID_ANY) (default ops, ring_mp_mc);
 * - for bulk in {1, 8, 32, 64}: repeat until <secs> elapsed: N/bulk
 *   rounds of [rte_pktmbuf_alloc_bulk(bulk); rte_pktmbuf_free_bulk(bulk)],
 *   N = 65536, then check the pool is full;
 *   rate_persec = mbufs allocated and freed * hz / cycles.
 *
 * Prints "mbuf_perf cache=<c> bulk=<b> rate_persec=<r>" lines.
 * Arguments after `--`: seconds per row (default 1), then optionally
 * "C,B" to run the one row cache=C bulk=B (bench/compare interleaves the
 * two sides row by row).
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include <rte_cycles.h>
#include <rte_eal.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>

#define N 65536
#define NB_MBUF 8191
#define MAX_BULK 64

static struct rte_mbuf *table[MAX_BULK];

static int one(struct rte_mempool *mp, unsigned bulk, double secs, uint64_t *rate)
{
	uint64_t hz = rte_get_timer_hz(), start = rte_get_timer_cycles(), diff = 0, count = 0;
	unsigned i;

	while (diff < (uint64_t)(secs * (double)hz)) {
		for (i = 0; i < N / bulk; i++) {
			if (rte_pktmbuf_alloc_bulk(mp, table, bulk) < 0)
				return -1;
			rte_pktmbuf_free_bulk(table, bulk);
		}
		diff = rte_get_timer_cycles() - start;
		count += N;
	}
	*rate = (uint64_t)((double)count * (double)hz / (double)diff);
	return 0;
}

int main(int argc, char **argv)
{
	static const unsigned bulks[] = {1, 8, 32, 64}, caches[] = {256, 0};
	double secs = 1.0;
	int ret, only_c = -1, only_b = -1;
	unsigned c, b;

	ret = rte_eal_init(argc, argv);
	if (ret < 0) {
		fprintf(stderr, "rte_eal_init failed\n");
		return 1;
	}
	if (ret + 1 < argc)
		secs = atof(argv[ret + 1]);
	if (ret + 2 < argc && sscanf(argv[ret + 2], "%d,%d", &only_c, &only_b) != 2) {
		fprintf(stderr, "bad row %s (want CACHE,BULK)\n", argv[ret + 2]);
		return 1;
	}
	for (c = 0; c < 2; c++) {
		char name[32];
		struct rte_mempool *mp;

		if (only_c >= 0 && (unsigned)only_c != caches[c])
			continue;

		snprintf(name, sizeof(name), "mbuf_perf_c%u", caches[c]);
		mp = rte_pktmbuf_pool_create(name, NB_MBUF, caches[c], 0, RTE_MBUF_DEFAULT_BUF_SIZE,
					     SOCKET_ID_ANY);
		if (!mp) {
			fprintf(stderr, "cannot create %s\n", name);
			return 1;
		}
		for (b = 0; b < 4; b++) {
			uint64_t rate;

			if (only_b >= 0 && (unsigned)only_b != bulks[b])
				continue;
			if (one(mp, bulks[b], secs, &rate) < 0) {
				printf("alloc failed\n");
				return 1;
			}
			rte_mempool_cache_flush(rte_mempool_default_cache(mp, rte_lcore_id()), mp);
			if (rte_mempool_avail_count(mp) != NB_MBUF) {
				printf("mbuf pool is not full\n");
				return 1;
			}
			printf("mbuf_perf cache=%u bulk=%u rate_persec=%" PRIu64 "\n", caches[c],
			       bulks[b], rate);
			fflush(stdout);
		}
		rte_mempool_free(mp);
	}
	rte_eal_cleanup();
	return 0;
}
