/*
 * DPDK's side of `bench/demo_vs_dpdk.sh`: the packet pipeline of
 * `memplane demo` (crates/memplane-cli/src/demo/) over DPDK 22.11.
 *
 * One binary, two processes. The primary (rte_eal_init with --proc-type
 * primary) creates
 *   - "demo_pkts": rte_pktmbuf_pool_create(8191 mbufs, cache 256, priv 0,
 *     RTE_MBUF_DEFAULT_BUF_SIZE, SOCKET_ID_ANY),
 *   - "demo_to_sec" and "demo_to_pri": rte_ring_create(8192,
 *     RING_F_SP_ENQ | RING_F_SC_DEQ) (a DPDK ring holds count - 1: 8191
 *     slots, as memplane's exact rings of 8191),
 *   - "demo_control": a memzone with the control block,
 * then starts itself (fork + exec) as the secondary (--proc-type
 * secondary, same --file-prefix, the other lcore), which looks them up.
 * For --duration seconds the primary allocates bursts of 32 mbufs
 * (rte_pktmbuf_alloc_bulk, rte_pktmbuf_append) while at most 1024 packets
 * are in flight, fills each packet, enqueues the burst; the secondary
 * dequeues bursts of 32, checks and rewrites each packet and enqueues them
 * back; the primary dequeues, checks every byte of each, and frees them
 * (rte_pktmbuf_free_bulk). The packet code is a byte-for-byte port of
 * demo/packet.rs (Ethernet/IPv4/UDP headers, the 16-byte demo header,
 * payload pattern, IPv4 and UDP checksums, the same checks and rewrite);
 * the loops are ports of primary.rs's packet_loop and secondary.rs's loop
 * (same burst, window, periodic clock/signal/child checks every 256
 * iterations, sched_yield every 64 idle polls, secondary liveness checks
 * every 4096 iterations).
 *
 * It prints a `result:` line in memplane demo's format and exits 0 only
 * when every packet came back intact, the secondary checked all of them
 * without a fault and exited 0, and the pool is full again. At the end the
 * primary frees the pool, rings and memzone, calls rte_eal_cleanup and
 * removes what is left of its prefix: <huge-dir>/<prefix>map_* and
 * /var/run/dpdk/<prefix>.
 *
 *   demo_pipeline [--duration S] [--packet-size B] [--burst N] [--mbufs N]
 *                 [--file-prefix P] [--lcores A,B] [--huge-dir DIR]
 *                 [-- extra EAL options for the primary]
 *   demo_pipeline --dump SIZE SEQ     packet SEQ in hex, sent and rewritten
 *   demo_pipeline --bench SIZE N      the packet work alone, ns per packet
 *
 * Defaults: 5 s, 64 bytes, 32, 8191, prefix "dpdkdemo<pid>", lcores 0,1
 * (primary -l A, secondary -l B), huge-dir /dev/hugepages (2 MiB pages).
 * EAL memory is dynamic (no -m): pages are mapped as the pool needs them,
 * as memplane's demo does.
 *
 * Build: gcc -O2 -Wall -o demo_pipeline demo_pipeline.c \
 *            $(pkg-config --cflags --libs libdpdk)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <rte_eal.h>
#include <rte_errno.h>
#include <rte_lcore.h>
#include <rte_mbuf.h>
#include <rte_memzone.h>
#include <rte_mempool.h>
#include <rte_ring.h>

/* ---- demo/packet.rs, byte for byte ---- */

#define HEADERS (14 + 20 + 8)
#define DEMO_HEADER 16
#define MIN_PACKET (HEADERS + DEMO_HEADER)
#define MAX_PACKET 1514

#define MAGIC 0x6d706c6eu /* "mpln" */
#define STAGE_SENT 1u
#define STAGE_RETURNED 2u

static const uint8_t MAC_PRIMARY[6] = {0x02, 0x6d, 0x70, 0x00, 0x00, 0x01};
static const uint8_t MAC_SECONDARY[6] = {0x02, 0x6d, 0x70, 0x00, 0x00, 0x02};
static const uint8_t IP_PRIMARY[4] = {10, 0, 0, 1};
static const uint8_t IP_SECONDARY[4] = {10, 0, 0, 2};
#define PORT_PRIMARY 4791
#define PORT_SECONDARY 9

#define ETH 0
#define IP 14
#define UDP 34
#define DEMO HEADERS
#define PAYLOAD (HEADERS + DEMO_HEADER)

/* Why a packet failed its check (the first one is described in `why`). */
enum bad {
	OK = 0,
	BAD_LENGTH,
	BAD_MAGIC,
	BAD_STAGE,
	BAD_SEQUENCE,
	BAD_ADDRESSES,
	BAD_IP_CHECKSUM,
	BAD_UDP_CHECKSUM,
	BAD_PAYLOAD,
};

#define WHY_LEN 160

static inline uint8_t pattern(uint64_t seq, size_t i)
{
	return (uint8_t)((uint8_t)seq * 31u + (uint8_t)i);
}

/* One's-complement sum of big-endian 16-bit words, unfolded (8 bytes at a
 * time, then pairs, then an odd last byte), as packet.rs's sum16. */
static inline uint64_t sum16(const uint8_t *b, size_t len, uint64_t acc)
{
	size_t i = 0;
	for (; i + 8 <= len; i += 8) {
		uint64_t w;
		memcpy(&w, b + i, 8);
		w = __builtin_bswap64(w);
		acc += (w >> 48) + ((w >> 32) & 0xffff) + ((w >> 16) & 0xffff) + (w & 0xffff);
	}
	for (; i + 2 <= len; i += 2)
		acc += (uint64_t)((b[i] << 8) | b[i + 1]);
	if (i < len)
		acc += (uint64_t)b[i] << 8;
	return acc;
}

static inline uint16_t fold(uint64_t acc)
{
	while (acc > 0xffff)
		acc = (acc & 0xffff) + (acc >> 16);
	return (uint16_t)~(uint16_t)acc;
}

static inline uint16_t ip_checksum(const uint8_t *p)
{
	return fold(sum16(p + IP, 20, 0));
}

static inline uint64_t udp_sum(const uint8_t *p, size_t len)
{
	uint64_t udp_len = len - UDP;
	uint64_t pseudo = sum16(p + IP + 12, 8, 17 + udp_len);
	return sum16(p + UDP, len - UDP, pseudo);
}

static inline uint16_t udp_checksum(const uint8_t *p, size_t len)
{
	uint16_t c = fold(udp_sum(p, len));
	return c == 0 ? 0xffff : c;
}

static inline void put16(uint8_t *p, size_t at, uint16_t v)
{
	p[at] = (uint8_t)(v >> 8);
	p[at + 1] = (uint8_t)v;
}

static inline uint16_t get16(const uint8_t *p, size_t at)
{
	return (uint16_t)((p[at] << 8) | p[at + 1]);
}

static inline uint32_t get32le(const uint8_t *p, size_t at)
{
	uint32_t v;
	memcpy(&v, p + at, 4);
	return v;
}

static inline void seal(uint8_t *p, size_t len)
{
	put16(p, IP + 10, 0);
	put16(p, IP + 10, ip_checksum(p));
	put16(p, UDP + 6, 0);
	put16(p, UDP + 6, udp_checksum(p, len));
}

/* packet::fill: packet `seq` as the primary sends it. */
static void fill(uint8_t *p, size_t len, uint64_t seq)
{
	uint32_t magic = MAGIC, stage = STAGE_SENT;
	memcpy(p + ETH, MAC_SECONDARY, 6);
	memcpy(p + ETH + 6, MAC_PRIMARY, 6);
	put16(p, ETH + 12, 0x0800);
	p[IP] = 0x45;
	p[IP + 1] = 0;
	put16(p, IP + 2, (uint16_t)(len - IP));
	put16(p, IP + 4, (uint16_t)seq); /* identification */
	put16(p, IP + 6, 0x4000);        /* don't fragment */
	p[IP + 8] = 64;
	p[IP + 9] = 17;
	memcpy(p + IP + 12, IP_PRIMARY, 4);
	memcpy(p + IP + 16, IP_SECONDARY, 4);
	put16(p, UDP, PORT_PRIMARY);
	put16(p, UDP + 2, PORT_SECONDARY);
	put16(p, UDP + 4, (uint16_t)(len - UDP));
	memcpy(p + DEMO, &magic, 4);
	memcpy(p + DEMO + 4, &stage, 4);
	memcpy(p + DEMO + 8, &seq, 8);
	for (size_t i = 0; i < len - PAYLOAD; i++)
		p[PAYLOAD + i] = pattern(seq, i);
	seal(p, len);
}

/* packet.rs check_common: framing of both directions; *seq out. */
static enum bad check_common(const uint8_t *p, size_t len, uint32_t stage, uint64_t *seq,
			     char *why)
{
	if (len < MIN_PACKET) {
		snprintf(why, WHY_LEN, "length %zu but the IPv4 header says 0", len);
		return BAD_LENGTH;
	}
	size_t ip_len = get16(p, IP + 2);
	if (ip_len + IP != len || (size_t)get16(p, UDP + 4) + UDP != len) {
		snprintf(why, WHY_LEN, "length %zu but the IPv4 header says %zu", len, ip_len + IP);
		return BAD_LENGTH;
	}
	if (get16(p, ETH + 12) != 0x0800) {
		snprintf(why, WHY_LEN, "addresses or ports not as expected");
		return BAD_ADDRESSES;
	}
	if (ip_checksum(p) != 0) {
		snprintf(why, WHY_LEN, "IPv4 header checksum wrong");
		return BAD_IP_CHECKSUM;
	}
	if (get16(p, UDP + 6) == 0 || fold(udp_sum(p, len)) != 0) {
		snprintf(why, WHY_LEN, "UDP checksum wrong");
		return BAD_UDP_CHECKSUM;
	}
	uint32_t magic = get32le(p, DEMO);
	if (magic != MAGIC) {
		snprintf(why, WHY_LEN, "magic %#x is not the demo's", magic);
		return BAD_MAGIC;
	}
	uint32_t got = get32le(p, DEMO + 4);
	if (got != stage) {
		snprintf(why, WHY_LEN, "stage %u, expected %u", got, stage);
		return BAD_STAGE;
	}
	memcpy(seq, p + DEMO + 8, 8);
	return OK;
}

static enum bad check_payload(const uint8_t *p, size_t len, uint64_t seq, uint8_t invert,
			      char *why)
{
	for (size_t i = 0; i < len - PAYLOAD; i++) {
		uint8_t want = pattern(seq, i) ^ invert;
		if (p[PAYLOAD + i] != want) {
			snprintf(why, WHY_LEN, "payload byte %zu is %#04x, expected %#04x",
				 PAYLOAD + i, p[PAYLOAD + i], want);
			return BAD_PAYLOAD;
		}
	}
	return OK;
}

/* packet::check_and_rewrite: the secondary's work. */
static enum bad check_and_rewrite(uint8_t *p, size_t len, char *why)
{
	uint64_t seq;
	uint32_t stage = STAGE_RETURNED;
	enum bad r = check_common(p, len, STAGE_SENT, &seq, why);
	if (r != OK)
		return r;
	if (memcmp(p + ETH, MAC_SECONDARY, 6) != 0 || memcmp(p + ETH + 6, MAC_PRIMARY, 6) != 0 ||
	    memcmp(p + IP + 16, IP_SECONDARY, 4) != 0 || get16(p, UDP + 2) != PORT_SECONDARY) {
		snprintf(why, WHY_LEN, "addresses or ports not as expected");
		return BAD_ADDRESSES;
	}
	r = check_payload(p, len, seq, 0, why);
	if (r != OK)
		return r;
	memcpy(p + ETH, MAC_PRIMARY, 6);
	memcpy(p + ETH + 6, MAC_SECONDARY, 6);
	memcpy(p + IP + 12, IP_SECONDARY, 4);
	memcpy(p + IP + 16, IP_PRIMARY, 4);
	put16(p, UDP, PORT_SECONDARY);
	put16(p, UDP + 2, PORT_PRIMARY);
	memcpy(p + DEMO + 4, &stage, 4);
	for (size_t i = PAYLOAD; i < len; i++)
		p[i] = (uint8_t)~p[i];
	seal(p, len);
	return OK;
}

/* packet::check_returned: the primary's check of a returned packet. */
static enum bad check_returned(const uint8_t *p, size_t len, uint64_t want_seq,
			       size_t want_len, char *why)
{
	uint64_t seq;
	if (len != want_len) {
		snprintf(why, WHY_LEN, "length %zu but the IPv4 header says %zu", len, want_len);
		return BAD_LENGTH;
	}
	enum bad r = check_common(p, len, STAGE_RETURNED, &seq, why);
	if (r != OK)
		return r;
	if (seq != want_seq) {
		snprintf(why, WHY_LEN, "sequence %" PRIu64 ", expected %" PRIu64, seq, want_seq);
		return BAD_SEQUENCE;
	}
	if (memcmp(p + ETH, MAC_PRIMARY, 6) != 0 || memcmp(p + ETH + 6, MAC_SECONDARY, 6) != 0 ||
	    memcmp(p + IP + 12, IP_SECONDARY, 4) != 0 || memcmp(p + IP + 16, IP_PRIMARY, 4) != 0 ||
	    get16(p, UDP) != PORT_SECONDARY || get16(p, UDP + 2) != PORT_PRIMARY) {
		snprintf(why, WHY_LEN, "addresses or ports not as expected");
		return BAD_ADDRESSES;
	}
	return check_payload(p, len, seq, 0xff, why);
}

/* ---- the demo ---- */

#define POOL "demo_pkts"
#define TO_SECONDARY "demo_to_sec"
#define TO_PRIMARY "demo_to_pri"
#define CONTROL "demo_control"
#define WINDOW 1024u
#define POOL_CACHE 256u
#define MAX_BURST 512

/* demo/mod.rs Control, in a memzone both processes map. */
struct control {
	uint32_t ready;
	uint32_t stop;
	uint32_t secondary_pid;
	uint32_t packet_size;
	uint64_t processed;
	uint64_t bad;
} __rte_cache_aligned;

struct plan {
	double duration;
	unsigned packet_size;
	unsigned burst;
	unsigned mbufs;
	char prefix[64];
	unsigned lcore_primary, lcore_secondary;
	char huge_dir[PATH_MAX];
	pid_t secondary_of;
	int extra_argc;
	char **extra_argv;
};

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void si(char *out, size_t n, double v)
{
	if (v >= 1e9)
		snprintf(out, n, "%.2f G", v / 1e9);
	else if (v >= 1e6)
		snprintf(out, n, "%.2f M", v / 1e6);
	else if (v >= 1e3)
		snprintf(out, n, "%.1f k", v / 1e3);
	else
		snprintf(out, n, "%.0f ", v);
}

static int usage(const char *why)
{
	fprintf(stderr,
		"demo_pipeline: %s\n"
		"usage: demo_pipeline [--duration S] [--packet-size %d..%d] [--burst 1..%d]\n"
		"                     [--mbufs N] [--file-prefix P] [--lcores A,B] [--huge-dir DIR]\n"
		"                     [-- extra EAL options]\n",
		why, MIN_PACKET, MAX_PACKET, MAX_BURST);
	return 2;
}

static bool parse_uint(const char *s, unsigned long min, unsigned long max, unsigned long *out)
{
	char *end;
	errno = 0;
	unsigned long v = strtoul(s, &end, 10);
	if (errno || end == s || *end || v < min || v > max || s[0] == '-')
		return false;
	*out = v;
	return true;
}

/* Parses the demo's flags; returns 0, or 2 after printing why. */
static int parse(int argc, char **argv, struct plan *pl)
{
	unsigned long v;
	pl->duration = 5;
	pl->packet_size = 64;
	pl->burst = 32;
	pl->mbufs = 8191;
	snprintf(pl->prefix, sizeof(pl->prefix), "dpdkdemo%d", (int)getpid());
	pl->lcore_primary = 0;
	pl->lcore_secondary = 1;
	snprintf(pl->huge_dir, sizeof(pl->huge_dir), "/dev/hugepages");
	pl->secondary_of = 0;
	pl->extra_argc = 0;
	pl->extra_argv = NULL;
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (strcmp(a, "--") == 0) {
			pl->extra_argc = argc - i - 1;
			pl->extra_argv = argv + i + 1;
			break;
		}
		if (i + 1 >= argc)
			return usage("a flag without its value (or an unknown flag)");
		const char *val = argv[++i];
		if (strcmp(a, "--duration") == 0) {
			char *end;
			pl->duration = strtod(val, &end);
			if (end == val || *end || !(pl->duration >= 0 && pl->duration <= 86400))
				return usage("--duration: expected seconds from 0 to 86400");
		} else if (strcmp(a, "--packet-size") == 0) {
			if (!parse_uint(val, MIN_PACKET, MAX_PACKET, &v))
				return usage("--packet-size: expected bytes from 58 to 1514");
			pl->packet_size = (unsigned)v;
		} else if (strcmp(a, "--burst") == 0) {
			if (!parse_uint(val, 1, MAX_BURST, &v))
				return usage("--burst: expected 1 to 512");
			pl->burst = (unsigned)v;
		} else if (strcmp(a, "--mbufs") == 0) {
			if (!parse_uint(val, 64, 1u << 22, &v))
				return usage("--mbufs: expected 64 to 4194304");
			pl->mbufs = (unsigned)v;
		} else if (strcmp(a, "--file-prefix") == 0) {
			if (strlen(val) == 0 || strlen(val) >= sizeof(pl->prefix) || strchr(val, '/'))
				return usage("--file-prefix: expected a short name without '/'");
			snprintf(pl->prefix, sizeof(pl->prefix), "%s", val);
		} else if (strcmp(a, "--lcores") == 0) {
			unsigned x, y;
			char tail;
			if (sscanf(val, "%u,%u%c", &x, &y, &tail) != 2 || x == y || x >= RTE_MAX_LCORE ||
			    y >= RTE_MAX_LCORE)
				return usage("--lcores: expected two different lcores, e.g. 0,1");
			pl->lcore_primary = x;
			pl->lcore_secondary = y;
		} else if (strcmp(a, "--huge-dir") == 0) {
			if (strlen(val) >= sizeof(pl->huge_dir))
				return usage("--huge-dir: path too long");
			snprintf(pl->huge_dir, sizeof(pl->huge_dir), "%s", val);
		} else if (strcmp(a, "--secondary-of") == 0) {
			if (!parse_uint(val, 1, INT_MAX, &v))
				return usage("--secondary-of: expected a pid");
			pl->secondary_of = (pid_t)v;
		} else {
			return usage("unknown flag");
		}
	}
	if (pl->burst * 4 > pl->mbufs)
		return usage("--burst: a pool needs bursts of at most a quarter of it");
	return 0;
}

static void block_signals(sigset_t *set)
{
	sigemptyset(set);
	sigaddset(set, SIGINT);
	sigaddset(set, SIGTERM);
	pthread_sigmask(SIG_BLOCK, set, NULL);
}

static int take_signal(const sigset_t *set)
{
	struct timespec zero = {0, 0};
	int r = sigtimedwait(set, NULL, &zero);
	return r > 0 ? r : 0;
}

/* ---- secondary ---- */

static bool primary_alive(pid_t pid)
{
	return kill(pid, 0) == 0 && getppid() == pid;
}

static int run_secondary(const struct plan *pl, const sigset_t *signals)
{
	pid_t me = getpid();
	prctl(PR_SET_PDEATHSIG, SIGTERM);
	if (!primary_alive(pl->secondary_of)) {
		fprintf(stderr, "[secondary %d] the primary (pid %d) is already gone\n", (int)me,
			(int)pl->secondary_of);
		return 3;
	}
	struct rte_mempool *pool = rte_mempool_lookup(POOL);
	struct rte_ring *rx = rte_ring_lookup(TO_SECONDARY);
	struct rte_ring *tx = rte_ring_lookup(TO_PRIMARY);
	const struct rte_memzone *mz = rte_memzone_lookup(CONTROL);
	if (!pool || !rx || !tx || !mz) {
		fprintf(stderr, "[secondary %d] lookup failed: pool %p rings %p %p control %p\n",
			(int)me, (void *)pool, (void *)rx, (void *)tx, (const void *)mz);
		return 1;
	}
	struct control *control = mz->addr;
	size_t size = __atomic_load_n(&control->packet_size, __ATOMIC_ACQUIRE);
	__atomic_store_n(&control->secondary_pid, (uint32_t)me, __ATOMIC_RELEASE);
	__atomic_store_n(&control->ready, 1, __ATOMIC_RELEASE);

	struct rte_mbuf *burst[MAX_BURST];
	uint64_t processed = 0, bad = 0, iter = 0;
	uint32_t idle = 0;
	bool gone = false;
	char why[WHY_LEN], first_bad[WHY_LEN] = "";
	double started = now_s();
	for (;;) {
		unsigned n = rte_ring_dequeue_burst(rx, (void **)burst, pl->burst, NULL);
		for (unsigned k = 0; k < n; k++) {
			struct rte_mbuf *m = burst[k];
			uint8_t *data = rte_pktmbuf_mtod(m, uint8_t *);
			size_t len = rte_pktmbuf_data_len(m);
			if (len != size) {
				if (bad++ == 0)
					snprintf(first_bad, sizeof(first_bad),
						 "length %zu instead of %zu", len, size);
			} else if (check_and_rewrite(data, len, why) != OK) {
				if (bad++ == 0)
					memcpy(first_bad, why, sizeof(why));
			}
		}
		unsigned sent = 0;
		while (sent < n)
			sent += rte_ring_enqueue_burst(tx, (void **)burst + sent, n - sent, NULL);
		processed += n;
		iter++;
		if (n != 0 && iter % 64 != 0)
			continue;
		__atomic_store_n(&control->processed, processed, __ATOMIC_RELEASE);
		__atomic_store_n(&control->bad, bad, __ATOMIC_RELEASE);
		if (__atomic_load_n(&control->stop, __ATOMIC_ACQUIRE) == 1 && rte_ring_empty(rx))
			break;
		if (iter % 4096 == 0 &&
		    (take_signal(signals) == SIGTERM || !primary_alive(pl->secondary_of))) {
			gone = true;
			break;
		}
		if (n == 0) {
			idle++;
			if (idle % 64 == 0)
				sched_yield();
		} else {
			idle = 0;
		}
	}
	__atomic_store_n(&control->processed, processed, __ATOMIC_RELEASE);
	__atomic_store_n(&control->bad, bad, __ATOMIC_RELEASE);
	if (first_bad[0])
		fprintf(stderr, "[secondary %d] first bad packet: %s\n", (int)me, first_bad);
	if (gone) {
		fprintf(stderr,
			"[secondary %d] the primary (pid %d) is gone: exiting after %" PRIu64
			" packets in %.1f s\n",
			(int)me, (int)pl->secondary_of, processed, now_s() - started);
		_exit(3);
	}
	return 0;
}

/* ---- primary ---- */

static pid_t spawn_secondary(const struct plan *pl)
{
	char exe[PATH_MAX];
	ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
	if (n <= 0)
		return -1;
	exe[n] = 0;
	char pid[16], size[16], burst[16], mbufs[16], lcore[16];
	snprintf(pid, sizeof(pid), "%d", (int)getpid());
	snprintf(size, sizeof(size), "%u", pl->packet_size);
	snprintf(burst, sizeof(burst), "%u", pl->burst);
	snprintf(mbufs, sizeof(mbufs), "%u", pl->mbufs);
	snprintf(lcore, sizeof(lcore), "%u", pl->lcore_secondary);
	char *argv[] = {exe,
			"--secondary-of", pid,
			"--packet-size", size,
			"--burst", burst,
			"--mbufs", mbufs,
			"--",
			"-l", lcore,
			"--proc-type", "secondary",
			"--file-prefix", (char *)pl->prefix,
			"--huge-dir", (char *)pl->huge_dir,
			"--no-pci",
			"--no-telemetry",
			"--log-level", "lib.eal:warning",
			NULL};
	pid_t child = fork();
	if (child == 0) {
		/* Not the primary's hugepage fds, locks and sockets. */
		if (syscall(SYS_close_range, 3u, ~0u, 0u) != 0)
			for (int fd = 3; fd < 1024; fd++)
				close(fd);
		sigset_t none;
		sigemptyset(&none);
		sigprocmask(SIG_SETMASK, &none, NULL);
		execv(exe, argv);
		_exit(127);
	}
	return child;
}

struct tally {
	uint64_t sent, returned, bad;
	char first_bad[WHY_LEN + 32];
};

enum ending { END_DURATION, END_INTERRUPTED, END_SECONDARY_EXITED };

/* primary.rs packet_loop, step for step. */
static double packet_loop(const struct plan *pl, struct rte_mempool *pool, struct rte_ring *tx,
			  struct rte_ring *rx, pid_t child, const sigset_t *signals,
			  struct tally *t, enum ending *ending, int *child_status)
{
	uint64_t window = WINDOW;
	if ((uint64_t)pl->mbufs - 2 * pl->burst < window)
		window = (uint64_t)pl->mbufs - 2 * pl->burst;
	struct rte_mbuf *pending[MAX_BURST], *received[MAX_BURST];
	unsigned npending = 0;
	char why[WHY_LEN];
	double start = now_s(), deadline = start + pl->duration, last_report = start;
	uint64_t last_returned = 0, iter = 0;
	uint32_t idle = 0;
	bool draining = false;
	*ending = END_DURATION;
	for (;;) {
		if (!draining && npending == 0 && t->sent - t->returned + pl->burst <= window) {
			if (rte_pktmbuf_alloc_bulk(pool, pending, pl->burst) == 0) {
				for (unsigned k = 0; k < pl->burst; k++) {
					uint8_t *data = (uint8_t *)rte_pktmbuf_append(
						pending[k], (uint16_t)pl->packet_size);
					fill(data, pl->packet_size, t->sent + k);
				}
				npending = pl->burst;
				t->sent += pl->burst;
			}
		}
		if (npending != 0) {
			unsigned moved = rte_ring_enqueue_burst(tx, (void **)pending, npending, NULL);
			if (moved != 0 && moved < npending)
				memmove(pending, pending + moved, (npending - moved) * sizeof(pending[0]));
			npending -= moved;
		}
		unsigned got = rte_ring_dequeue_burst(rx, (void **)received, pl->burst, NULL);
		for (unsigned k = 0; k < got; k++) {
			struct rte_mbuf *m = received[k];
			if (check_returned(rte_pktmbuf_mtod(m, uint8_t *), rte_pktmbuf_data_len(m),
					   t->returned, pl->packet_size, why) != OK) {
				if (t->bad++ == 0)
					snprintf(t->first_bad, sizeof(t->first_bad),
						 "packet %" PRIu64 ": %s", t->returned, why);
			}
			t->returned++;
		}
		rte_pktmbuf_free_bulk(received, got);
		if (got == 0) {
			idle++;
			if (idle % 64 == 0)
				sched_yield();
		} else {
			idle = 0;
		}

		iter++;
		if (iter % 256 != 0)
			continue;
		double now = now_s();
		if (draining && t->returned == t->sent && npending == 0)
			break;
		int sig = take_signal(signals);
		if (sig) {
			if (draining) {
				printf("\nsecond signal: giving up on the packets in flight\n");
				break;
			}
			*ending = END_INTERRUPTED;
		}
		if (waitpid(child, child_status, WNOHANG) == child) {
			*ending = END_SECONDARY_EXITED;
			break;
		}
		if (!draining && (now >= deadline || *ending == END_INTERRUPTED)) {
			draining = true;
			deadline = now + 5;
		} else if (draining && now >= deadline) {
			break;
		}
		if (now - last_report >= 1.0 && !draining) {
			double pps = (double)(t->returned - last_returned) / (now - last_report);
			char a[32], b[32];
			si(a, sizeof(a), pps);
			si(b, sizeof(b), pps * pl->packet_size * 8.0);
			printf("  %5.1f s  %spps  %sbit/s each way  in flight %4" PRIu64
			       "  pool %u/%u in use\n",
			       now - start, a, b, t->sent - t->returned,
			       rte_mempool_in_use_count(pool), pool->size);
			fflush(stdout);
			last_report = now;
			last_returned = t->returned;
		}
	}
	rte_pktmbuf_free_bulk(pending, npending);
	return now_s() - start;
}

static long hugepages_free_2m(void)
{
	FILE *f = fopen("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "r");
	long v = -1;
	if (f) {
		if (fscanf(f, "%ld", &v) != 1)
			v = -1;
		fclose(f);
	}
	return v;
}

/* Removes <huge-dir>/<prefix>map_* and /var/run/dpdk/<prefix> (whatever
 * rte_eal_cleanup left); returns how many hugepage files were left. */
static int remove_prefix_files(const struct plan *pl)
{
	char want[96], path[PATH_MAX + 512];
	int left = 0;
	snprintf(want, sizeof(want), "%smap_", pl->prefix);
	DIR *d = opendir(pl->huge_dir);
	if (d) {
		struct dirent *e;
		while ((e = readdir(d)) != NULL) {
			if (strncmp(e->d_name, want, strlen(want)) == 0) {
				snprintf(path, sizeof(path), "%s/%s", pl->huge_dir, e->d_name);
				if (unlink(path) == 0)
					left++;
			}
		}
		closedir(d);
	}
	const char *runtime_roots[] = {"/var/run/dpdk", "/run/dpdk"};
	for (size_t r = 0; r < 2; r++) {
		char dir[PATH_MAX];
		snprintf(dir, sizeof(dir), "%s/%s", runtime_roots[r], pl->prefix);
		DIR *rd = opendir(dir);
		if (!rd)
			continue;
		struct dirent *e;
		while ((e = readdir(rd)) != NULL) {
			if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
				continue;
			snprintf(path, sizeof(path), "%s/%s", dir, e->d_name);
			unlink(path);
		}
		closedir(rd);
		rmdir(dir);
	}
	return left;
}

/* The primary's objects; run_primary fills them, main frees them. */
struct shared {
	struct rte_mempool *pool;
	struct rte_ring *to_sec, *to_pri;
	const struct rte_memzone *mz;
};

static void free_shared(struct shared *sh)
{
	rte_memzone_free(sh->mz);
	rte_ring_free(sh->to_pri);
	rte_ring_free(sh->to_sec);
	rte_mempool_free(sh->pool);
}

static int run_primary(const struct plan *pl, const sigset_t *signals, struct shared *sh)
{
	struct rte_mempool *pool = sh->pool = rte_pktmbuf_pool_create(
		POOL, pl->mbufs, POOL_CACHE, 0, RTE_MBUF_DEFAULT_BUF_SIZE, SOCKET_ID_ANY);
	struct rte_ring *to_sec = sh->to_sec = rte_ring_create(
		TO_SECONDARY, pl->mbufs + 1, SOCKET_ID_ANY, RING_F_SP_ENQ | RING_F_SC_DEQ);
	struct rte_ring *to_pri = sh->to_pri = rte_ring_create(
		TO_PRIMARY, pl->mbufs + 1, SOCKET_ID_ANY, RING_F_SP_ENQ | RING_F_SC_DEQ);
	const struct rte_memzone *mz = sh->mz =
		rte_memzone_reserve(CONTROL, sizeof(struct control), SOCKET_ID_ANY, 0);
	if (!pool || !to_sec || !to_pri || !mz) {
		fprintf(stderr, "demo_pipeline: creating the pool, rings or control zone: %s\n",
			rte_strerror(rte_errno));
		return 1;
	}
	struct control *control = mz->addr;
	memset(control, 0, sizeof(*control));
	__atomic_store_n(&control->packet_size, pl->packet_size, __ATOMIC_RELEASE);

	printf("dpdk demo_pipeline: primary pid %d, prefix '%s', lcore %u: hugepage packets of %u "
	       "bytes in bursts of %u for %.3fs\n",
	       (int)getpid(), pl->prefix, pl->lcore_primary, pl->packet_size, pl->burst,
	       pl->duration);
	printf("pool '%s': %u mbufs of %u bytes (%u data room), cache %u per lcore, ops %s; "
	       "memzone on %" PRIu64 " KiB pages\n",
	       pool->name, pool->size, pool->elt_size + pool->header_size + pool->trailer_size,
	       rte_pktmbuf_data_room_size(pool), pool->cache_size,
	       rte_mempool_get_ops(pool->ops_index)->name, mz->hugepage_sz >> 10);
	printf("rings: %s and %s, %u slots each, single producer / single consumer\n",
	       TO_SECONDARY, TO_PRIMARY, rte_ring_get_capacity(to_sec));
	fflush(stdout);

	pid_t child = spawn_secondary(pl);
	if (child < 0) {
		fprintf(stderr, "demo_pipeline: starting the secondary: %s\n", strerror(errno));
		return 1;
	}
	int status = 0;
	bool exited = false;
	double t_spawn = now_s();
	while (__atomic_load_n(&control->ready, __ATOMIC_ACQUIRE) != 1) {
		if (waitpid(child, &status, WNOHANG) == child) {
			exited = true;
			break;
		}
		if (now_s() - t_spawn > 30)
			break;
		usleep(1000);
	}
	if (__atomic_load_n(&control->ready, __ATOMIC_ACQUIRE) != 1) {
		if (!exited) {
			kill(child, SIGKILL);
			waitpid(child, &status, 0);
		}
		fprintf(stderr, "demo_pipeline: the secondary did not attach (status %#x)\n", status);
		return 1;
	}
	printf("secondary: pid %d (lcore %u) attached in %.0f ms\n", (int)child,
	       pl->lcore_secondary, (now_s() - t_spawn) * 1e3);
	fflush(stdout);

	struct tally t = {0};
	enum ending ending;
	double secs = packet_loop(pl, pool, to_sec, to_pri, child, signals, &t, &ending, &status);
	__atomic_store_n(&control->stop, 1, __ATOMIC_RELEASE);
	bool have_status = ending == END_SECONDARY_EXITED;
	if (!have_status) {
		double t_stop = now_s();
		while (!have_status && now_s() - t_stop < 10) {
			if (waitpid(child, &status, WNOHANG) == child)
				have_status = true;
			else
				usleep(1000);
		}
		if (!have_status) {
			printf("the secondary did not exit within 10 s: killing it\n");
			kill(child, SIGKILL);
			have_status = waitpid(child, &status, 0) == child;
		}
	}
	rte_mempool_cache_flush(rte_mempool_default_cache(pool, rte_lcore_id()), pool);

	if (secs < 1e-9)
		secs = 1e-9;
	double pps = (double)t.returned / secs;
	char a[32], b[32];
	si(a, sizeof(a), pps);
	si(b, sizeof(b), pps * pl->packet_size * 8.0);
	if (ending == END_INTERRUPTED)
		printf("interrupted after %.1f s: drained the packets in flight\n", secs);
	else if (ending == END_SECONDARY_EXITED)
		printf("the secondary exited early (status %#x)\n", status);
	printf("result: %" PRIu64 " packets sent and returned in %.2f s: %spps, %sbit/s each way "
	       "(%u-byte packets)\n",
	       t.returned, secs, a, b, pl->packet_size);
	uint64_t processed = __atomic_load_n(&control->processed, __ATOMIC_ACQUIRE);
	uint64_t sec_bad = __atomic_load_n(&control->bad, __ATOMIC_ACQUIRE);
	bool secondary_ok = have_status && WIFEXITED(status) && WEXITSTATUS(status) == 0;
	printf("secondary: %" PRIu64 " packets checked and rewritten, %" PRIu64 " bad; exit %s%d\n",
	       processed, sec_bad,
	       !have_status ? "unknown " : WIFEXITED(status) ? "status " : "signal ",
	       !have_status ? 0 : WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status));
	unsigned in_use = rte_mempool_in_use_count(pool), size = pool->size;
	printf("pool: %u of %u buffers free, %u in use\n", size - in_use, size, in_use);
	if (t.first_bad[0])
		printf("first bad packet: %s\n", t.first_bad);
	uint64_t lost = t.sent - t.returned;
	bool ok = t.bad == 0 && sec_bad == 0 && lost == 0 && in_use == 0 && secondary_ok &&
		  t.returned > 0 && processed == t.returned;
	if (ok)
		printf("all packets intact: %" PRIu64 " sent, %" PRIu64 " returned, 0 bad, 0 lost; "
		       "pool full again (%u of %u free)\n",
		       t.sent, t.returned, size, size);
	else
		printf("FAILED: %" PRIu64 " sent, %" PRIu64 " returned, %" PRIu64 " bad here, %" PRIu64
		       " bad in the secondary, %" PRIu64 " lost, %u buffers still in use%s\n",
		       t.sent, t.returned, t.bad, sec_bad, lost, in_use,
		       secondary_ok ? "" : ", the secondary failed");

	return ok ? (ending == END_INTERRUPTED ? 130 : 0) : 1;
}

/* `--dump SIZE SEQ`: packet SEQ of SIZE bytes in hex as sent, then as
 * rewritten by the secondary, without EAL; bench/demo_vs_dpdk.sh compares
 * it with packet.rs's output (bench/dpdk/demo_packet_dump.rs). */
static int dump(const char *size_arg, const char *seq_arg)
{
	unsigned long size, seq;
	char why[WHY_LEN];
	uint8_t p[MAX_PACKET];
	if (!parse_uint(size_arg, MIN_PACKET, MAX_PACKET, &size) ||
	    !parse_uint(seq_arg, 0, ULONG_MAX, &seq))
		return usage("--dump: expected a packet size (58..1514) and a sequence number");
	fill(p, size, seq);
	for (size_t i = 0; i < size; i++)
		printf("%02x", p[i]);
	printf("\n");
	if (check_and_rewrite(p, size, why) != OK) {
		printf("check_and_rewrite: %s\n", why);
		return 1;
	}
	for (size_t i = 0; i < size; i++)
		printf("%02x", p[i]);
	printf("\n");
	if (check_returned(p, size, seq, size, why) != OK) {
		printf("check_returned: %s\n", why);
		return 1;
	}
	return 0;
}

/* `--bench SIZE N`: the per-packet work alone, on one core, one buffer:
 * N x (fill, check_and_rewrite, check_returned); prints ns per packet.
 * bench/demo_vs_dpdk.sh sets it beside packet.rs's (demo_packet_dump.rs
 * bench) to show how much of a ratio is the packet code's compilation. */
static int bench(const char *size_arg, const char *n_arg)
{
	unsigned long size, n;
	char why[WHY_LEN];
	static uint8_t p[MAX_PACKET];
	if (!parse_uint(size_arg, MIN_PACKET, MAX_PACKET, &size) ||
	    !parse_uint(n_arg, 1, ULONG_MAX, &n))
		return usage("--bench: expected a packet size (58..1514) and a packet count");
	double start = now_s();
	for (uint64_t seq = 0; seq < n; seq++) {
		fill(p, size, seq);
		if (check_and_rewrite(p, size, why) != OK ||
		    check_returned(p, size, seq, size, why) != OK) {
			printf("packet %" PRIu64 ": %s\n", seq, why);
			return 1;
		}
	}
	printf("%.1f ns per packet\n", (now_s() - start) * 1e9 / (double)n);
	return 0;
}

int main(int argc, char **argv)
{
	struct plan pl;
	if (argc == 4 && strcmp(argv[1], "--dump") == 0)
		return dump(argv[2], argv[3]);
	if (argc == 4 && strcmp(argv[1], "--bench") == 0)
		return bench(argv[2], argv[3]);
	int r = parse(argc, argv, &pl);
	if (r)
		return r;
	sigset_t signals;
	block_signals(&signals);

	char lcore[16];
	char *eal[64];
	int n = 0;
	if (pl.secondary_of) {
		/* The primary passed our EAL options after "--". */
		eal[n++] = argv[0];
		for (int i = 0; i < pl.extra_argc && n < 63; i++)
			eal[n++] = pl.extra_argv[i];
	} else {
		snprintf(lcore, sizeof(lcore), "%u", pl.lcore_primary);
		eal[n++] = argv[0];
		eal[n++] = "-l";
		eal[n++] = lcore;
		eal[n++] = "--proc-type";
		eal[n++] = "primary";
		eal[n++] = "--file-prefix";
		eal[n++] = pl.prefix;
		eal[n++] = "--huge-dir";
		eal[n++] = pl.huge_dir;
		eal[n++] = "--no-pci";
		eal[n++] = "--no-telemetry";
		eal[n++] = "--log-level";
		eal[n++] = "lib.eal:warning";
		for (int i = 0; i < pl.extra_argc && n < 63; i++)
			eal[n++] = pl.extra_argv[i];
	}
	eal[n] = NULL;
	long free_before = hugepages_free_2m();
	if (rte_eal_init(n, eal) < 0) {
		fprintf(stderr, "demo_pipeline: rte_eal_init: %s\n", rte_strerror(rte_errno));
		if (!pl.secondary_of)
			remove_prefix_files(&pl);
		return 1;
	}
	if (pl.secondary_of) {
		r = run_secondary(&pl, &signals);
		rte_eal_cleanup();
		return r;
	}
	struct shared sh = {0};
	r = run_primary(&pl, &signals, &sh);
	free_shared(&sh);
	rte_eal_cleanup();
	int left = remove_prefix_files(&pl);
	long free_after = hugepages_free_2m();
	printf("teardown: 2 MiB hugepages free %ld before, %ld after; %d hugepage file(s) of prefix "
	       "'%s' left after rte_eal_cleanup, removed\n",
	       free_before, free_after, left, pl.prefix);
	fflush(stdout);
	return r;
}
