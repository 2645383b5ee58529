/*
 * DPDK's side of the memzone scaling rows of `bench/compare malloc`: how
 * rte_memzone_reserve, rte_memzone_lookup and rte_memzone_free behave with
 * a full memzone table. After rte_eal_init() with the EAL arguments given
 * on the command line:
 *
 * 1. rte_memzone_reserve("mz-scale-<i>", 64, SOCKET_ID_ANY, 0) for
 *    i = 0 .. 2499, each call timed on its own (rte_rdtsc_precise() just
 *    before and just after; the names are formatted before the clock
 *    starts); any NULL is an error;
 * 2. with all 2500 zones present, rte_memzone_lookup() of every name once,
 *    in a strided order (index (k * stride) % zones, stride = the first
 *    number from 7919 up coprime with zones), one timed loop; each result
 *    is checked against the reserved zone (inside the loop, as memplane
 *    does);
 * 3. rte_memzone_free() of every zone in reservation order, one timed loop.
 *
 * Times are converted as test_malloc_perf.c converts them (cycles /
 * rte_get_tsc_hz() * 1e6). Prints one line:
 *
 *     memzone-scale zones=<n> size=<s> first100_us=<mean of reserves 0..99>
 *         last100_us=<mean of the last 100> reserve_us=<mean of all>
 *         lookup_us=<per lookup> free_us=<per free> first_us=<reserve 0 alone>
 *
 * (one line; the first reserve may grow the heap by a page), then rte_eal_cleanup(). Arguments after `--` (after the EAL
 * ones): `<zones> <size>` to change the workload.
 *
 * The runner builds this with `gcc $(pkg-config --cflags --libs libdpdk)`.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include <rte_cycles.h>
#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_memory.h>
#include <rte_memzone.h>

#define WINDOW 100

static double tsc_to_us(uint64_t tsc, size_t runs)
{
	return (double)tsc / (double)rte_get_tsc_hz() * 1e6 / (double)runs;
}

static size_t gcd(size_t a, size_t b)
{
	while (b != 0) {
		size_t t = a % b;

		a = b;
		b = t;
	}
	return a;
}

int main(int argc, char **argv)
{
	size_t zones = 2500, size = 64, stride, window, i, bad = 0;
	uint64_t t0, t, first = 0, last = 0, all = 0, t_first = 0, t_lookup, t_free;
	const struct rte_memzone **mz;
	char (*names)[RTE_MEMZONE_NAMESIZE];
	int ret, status = 1;

	ret = rte_eal_init(argc, argv);
	if (ret < 0) {
		fprintf(stderr, "memzone_scale: rte_eal_init failed\n");
		return 1;
	}
	argc -= ret;
	argv += ret;
	if (argc > 1)
		zones = strtoul(argv[1], NULL, 0);
	if (argc > 2)
		size = strtoul(argv[2], NULL, 0);
	if (zones == 0) {
		fprintf(stderr, "memzone_scale: zones must be at least 1\n");
		rte_eal_cleanup();
		return 1;
	}
	window = zones < WINDOW ? zones : WINDOW;
	for (stride = 7919; gcd(stride, zones) != 1; stride++)
		;

	mz = calloc(zones, sizeof(mz[0]));
	names = calloc(zones, sizeof(names[0]));
	if (mz == NULL || names == NULL) {
		fprintf(stderr, "memzone_scale: no memory for %zu zones\n", zones);
		goto out;
	}
	for (i = 0; i < zones; i++)
		snprintf(names[i], sizeof(names[i]), "mz-scale-%zu", i);

	for (i = 0; i < zones; i++) {
		t0 = rte_rdtsc_precise();
		mz[i] = rte_memzone_reserve(names[i], size, SOCKET_ID_ANY, 0);
		t = rte_rdtsc_precise() - t0;
		if (mz[i] == NULL) {
			fprintf(stderr, "memzone_scale: rte_memzone_reserve(%s, %zu) failed: %s\n",
				names[i], size, rte_strerror(rte_errno));
			goto free_zones;
		}
		all += t;
		if (i == 0)
			t_first = t;
		if (i < window)
			first += t;
		if (i >= zones - window)
			last += t;
	}

	t0 = rte_rdtsc_precise();
	for (i = 0; i < zones; i++) {
		size_t k = (size_t)(((uint64_t)i * stride) % zones);

		if (rte_memzone_lookup(names[k]) != mz[k])
			bad++;
	}
	t_lookup = rte_rdtsc_precise() - t0;
	if (bad != 0) {
		fprintf(stderr, "memzone_scale: %zu lookups did not find their zone\n", bad);
		goto free_zones;
	}

	t0 = rte_rdtsc_precise();
	for (i = 0; i < zones; i++) {
		if (rte_memzone_free(mz[i]) != 0)
			bad++;
		mz[i] = NULL;
	}
	t_free = rte_rdtsc_precise() - t0;
	if (bad != 0) {
		fprintf(stderr, "memzone_scale: %zu frees failed\n", bad);
		goto out;
	}
	printf("memzone-scale zones=%zu size=%zu first100_us=%.3f last100_us=%.3f reserve_us=%.3f "
	       "lookup_us=%.3f free_us=%.3f first_us=%.3f\n",
	       zones, size, tsc_to_us(first, window), tsc_to_us(last, window),
	       tsc_to_us(all, zones), tsc_to_us(t_lookup, zones), tsc_to_us(t_free, zones),
	       tsc_to_us(t_first, 1));
	status = 0;
	goto out;

free_zones:
	for (i = 0; i < zones; i++)
		if (mz[i] != NULL)
			rte_memzone_free(mz[i]);
out:
	free(mz);
	free(names);
	ret = rte_eal_cleanup();
	if (ret != 0) {
		fprintf(stderr, "memzone_scale: rte_eal_cleanup failed (%d)\n", ret);
		return 1;
	}
	return status;
}
