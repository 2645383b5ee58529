/*
 * DPDK's side of the aligned-allocation row of `bench/compare malloc`:
 * after rte_eal_init() with the EAL arguments given on the command line,
 * rte_malloc(NULL, 4096, 4096) back to back up to 10000 times (stopping at
 * the first NULL, which stays inside the timed loop as in
 * test_malloc_perf.c), then rte_free() of every block. Timed as
 * test_malloc_perf.c times: rte_rdtsc_precise() around each loop, converted
 * with rte_get_tsc_hz() to microseconds per block. Prints one line:
 *
 *     aligned size=4096 align=4096 blocks=<n> alloc_us=<a> free_us=<f> total_us=<a+f>
 *
 * then, with one 64-byte anchor block allocated (so the heap keeps its page
 * and no pair maps or unmaps one), 1000000 back-to-back pairs of
 * rte_malloc(NULL, size, 0) + rte_free() for size 64, 256 and 1024, one
 * line each:
 *
 *     pair size=<s> count=<n> pair_us=<us per malloc+free>
 *
 * then rte_eal_cleanup(). Arguments after `--` (after the EAL ones):
 * `<blocks> <size> <align>` to change the workload.
 *
 * The runner builds this with `gcc $(pkg-config --cflags --libs libdpdk)`.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include <rte_cycles.h>
#include <rte_eal.h>
#include <rte_malloc.h>

static double tsc_to_us(uint64_t tsc, size_t runs)
{
	return (double)tsc / (double)rte_get_tsc_hz() * 1e6 / (double)runs;
}

int main(int argc, char **argv)
{
	size_t max_runs = 10000, size = 4096, align = 4096, runs, j;
	uint64_t t0, t_alloc, t_free;
	void **ptrs;
	int ret;

	ret = rte_eal_init(argc, argv);
	if (ret < 0) {
		fprintf(stderr, "malloc_aligned: rte_eal_init failed\n");
		return 1;
	}
	argc -= ret;
	argv += ret;
	if (argc > 1)
		max_runs = strtoul(argv[1], NULL, 0);
	if (argc > 2)
		size = strtoul(argv[2], NULL, 0);
	if (argc > 3)
		align = strtoul(argv[3], NULL, 0);

	ptrs = calloc(max_runs, sizeof(ptrs[0]));
	if (ptrs == NULL) {
		fprintf(stderr, "malloc_aligned: no memory for %zu pointers\n", max_runs);
		rte_eal_cleanup();
		return 1;
	}

	t0 = rte_rdtsc_precise();
	for (j = 0; j < max_runs; j++) {
		ptrs[j] = rte_malloc(NULL, size, align);
		if (ptrs[j] == NULL)
			break;
	}
	t_alloc = rte_rdtsc_precise() - t0;
	runs = j;

	t0 = rte_rdtsc_precise();
	for (j = 0; j < runs; j++)
		rte_free(ptrs[j]);
	t_free = rte_rdtsc_precise() - t0;

	if (runs == 0) {
		fprintf(stderr, "malloc_aligned: the first rte_malloc(%zu, %zu) failed\n",
			size, align);
		free(ptrs);
		rte_eal_cleanup();
		return 1;
	}
	printf("aligned size=%zu align=%zu blocks=%zu alloc_us=%.3f free_us=%.3f total_us=%.3f\n",
	       size, align, runs, tsc_to_us(t_alloc, runs), tsc_to_us(t_free, runs),
	       tsc_to_us(t_alloc + t_free, runs));
	free(ptrs);

	{
		static const size_t pair_sizes[] = { 64, 256, 1024 };
		const size_t pairs = 1000000;
		void *anchor = rte_malloc(NULL, 64, 0);
		size_t k;

		if (anchor == NULL) {
			fprintf(stderr, "malloc_aligned: the anchor rte_malloc failed\n");
			rte_eal_cleanup();
			return 1;
		}
		for (k = 0; k < sizeof(pair_sizes) / sizeof(pair_sizes[0]); k++) {
			t0 = rte_rdtsc_precise();
			for (j = 0; j < pairs; j++) {
				void *p = rte_malloc(NULL, pair_sizes[k], 0);

				if (p == NULL) {
					fprintf(stderr, "malloc_aligned: pair rte_malloc failed\n");
					rte_eal_cleanup();
					return 1;
				}
				/* Keep the compiler from eliding the pair. */
				__asm__ volatile("" : : "r"(p) : "memory");
				rte_free(p);
			}
			printf("pair size=%zu count=%zu pair_us=%.4f\n", pair_sizes[k], pairs,
			       tsc_to_us(rte_rdtsc_precise() - t0, pairs));
		}
		rte_free(anchor);
	}
	ret = rte_eal_cleanup();
	if (ret != 0) {
		fprintf(stderr, "malloc_aligned: rte_eal_cleanup failed (%d)\n", ret);
		return 1;
	}
	return 0;
}
