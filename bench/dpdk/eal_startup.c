/*
 * Times DPDK's start-up and shutdown for `bench/compare startup`:
 * rte_eal_init() with the EAL arguments given on the command line, then
 * rte_eal_cleanup(), each timed with clock_gettime(CLOCK_MONOTONIC).
 * Prints one line, all in microseconds:
 *
 *     init_us=<t> cleanup_us=<t> mem_us=<t> tsc_us=<t> main_ns=<t> ready_ns=<t>
 *
 * main_ns and ready_ns are CLOCK_MONOTONIC readings in nanoseconds taken on
 * entering main() and right after rte_eal_init() returned, so that a parent
 * that read the same clock before starting this process can tell the time
 * from process start (exec, dynamic linking) to a ready EAL
 * (`bench/compare init`).
 *
 * mem_us and tsc_us split init by the time stamps of EAL's own log lines
 * (run with --log-level=lib.eal:debug; -1 when a line is missing):
 *   mem_us: "Setting up physically contiguous memory" .. "Added <n>M to heap"
 *           (memseg lists, VA reservation, page allocation, heap set-up);
 *   tsc_us: "Added <n>M to heap" .. "TSC frequency is" (tail queues and the
 *           timer init, which calibrates the TSC with a 100 ms sleep when the
 *           CPU does not report its frequency).
 * The log goes to memory through a fopencookie stream (no terminal I/O in
 * the timed region) and is printed to stderr only if something fails.
 *
 * The runner builds this with `gcc $(pkg-config --cflags --libs libdpdk)`
 * (shared DPDK: init also dlopens every PMD of the plugin directory) and,
 * where librte_eal.a is installed, statically against the EAL alone
 * (no plugins).
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <rte_eal.h>
#include <rte_log.h>

#define MAX_LINES 1024
#define LINE_LEN 160

static double now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec * 1e6 + (double)ts.tv_nsec / 1e3;
}

static long long now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static struct {
	double t;
	char text[LINE_LEN];
} log_lines[MAX_LINES];
static int n_lines;

static ssize_t log_write(void *cookie, const char *buf, size_t size)
{
	size_t n = size < LINE_LEN - 1 ? size : LINE_LEN - 1;

	(void)cookie;
	if (n_lines < MAX_LINES) {
		log_lines[n_lines].t = now_us();
		memcpy(log_lines[n_lines].text, buf, n);
		log_lines[n_lines].text[n] = '\0';
		n_lines++;
	}
	return (ssize_t)size;
}

/* Time stamp of the first log line containing `what` (and `what2`). */
static double stamp(const char *what, const char *what2)
{
	int i;

	for (i = 0; i < n_lines; i++)
		if (strstr(log_lines[i].text, what) != NULL &&
		    (what2 == NULL || strstr(log_lines[i].text, what2) != NULL))
			return log_lines[i].t;
	return -1;
}

static void dump_log(void)
{
	int i;

	for (i = 0; i < n_lines; i++)
		fputs(log_lines[i].text, stderr);
}

int main(int argc, char **argv)
{
	long long main_ns = now_ns(), ready_ns;
	cookie_io_functions_t io = { .write = log_write };
	double t0, t1, t2, m0, m1, tsc, mem_us = -1, tsc_us = -1;
	FILE *log;
	int ret;

	log = fopencookie(NULL, "w", io);
	if (log == NULL || rte_openlog_stream(log) != 0) {
		fprintf(stderr, "eal_startup: cannot redirect the EAL log\n");
		return 1;
	}
	t0 = now_us();
	ret = rte_eal_init(argc, argv);
	ready_ns = now_ns();
	t1 = now_us();
	if (ret < 0) {
		dump_log();
		fprintf(stderr, "eal_startup: rte_eal_init failed\n");
		return 1;
	}
	ret = rte_eal_cleanup();
	t2 = now_us();
	if (ret != 0) {
		dump_log();
		fprintf(stderr, "eal_startup: rte_eal_cleanup failed (%d)\n", ret);
		return 1;
	}
	m0 = stamp("Setting up physically contiguous memory", NULL);
	m1 = stamp("Added ", " to heap");
	tsc = stamp("TSC frequency is", NULL);
	if (m0 >= 0 && m1 >= m0)
		mem_us = m1 - m0;
	if (m1 >= 0 && tsc >= m1)
		tsc_us = tsc - m1;
	printf("init_us=%.1f cleanup_us=%.1f mem_us=%.1f tsc_us=%.1f main_ns=%lld ready_ns=%lld\n",
	       t1 - t0, t2 - t1, mem_us, tsc_us, main_ns, ready_ns);
	return 0;
}
