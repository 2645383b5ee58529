#!/usr/bin/env bash
# memplane demo vs the same packet pipeline over DPDK 22.11.
#
#   bench/demo_vs_dpdk.sh [--runs N] [--secs S] [--packet-size B]
#                         [--memplane-any-pages]
#
# Runs `memplane demo` (crates/memplane-cli/src/demo/) and
# bench/dpdk/demo_pipeline.c (its port to DPDK, built with gcc -O2 and
# with -O3) alternately N times (default 5; odd runs memplane first, even
# runs DPDK first), S seconds each (default 3), for 64- and 1514-byte
# packets and the --packet-size asked, and prints one table: median Mpps
# of each, the ratios memplane/DPDK (median of the per-run ratios) and the target (>= 1.0), then the best
# run and the range of each. Needs root, DPDK 22.11 (pkg-config libdpdk,
# gcc, rustc) and ~40 free 2 MiB hugepages; takes about
# N x sizes x 3 x (S + 1.5) s (2 min with the defaults).
#
# What it mirrors: both sides run a primary that creates a packet pool
# (8191 buffers, per-lcore cache 256), two single-producer/single-consumer
# rings of 8191 slots and a control memzone, and a secondary process (the
# same binary) that looks them up. The primary allocates bursts of 32
# (at most 1024 in flight), fills each packet, enqueues; the secondary
# dequeues 32, checks and rewrites each, enqueues back; the primary
# dequeues, checks every byte, frees. The packet work is identical: before
# measuring, the script builds demo_packet_dump.rs (packet.rs itself) with
# rustc and checks that `demo_pipeline --dump` (the C port) produces the
# same bytes for several sizes and sequence numbers. The loops match too
# (periodic clock/signal/child checks every 256 iterations, sched_yield
# every 64 empty polls, the secondary's liveness checks).
#
# What differs:
# - buffers: both use mbufs of DPDK 22.11's layout: DPDK rte_mbuf
#   (rte_pktmbuf_alloc_bulk, which resets each mbuf, rte_pktmbuf_append,
#   rte_pktmbuf_free_bulk), memplane the memplane-mbuf crate
#   (alloc_bulk_raw, which resets each mbuf, the append's two stores,
#   free_bulk_raw). One difference: a free memplane mbuf has refcount 0
#   (DPDK keeps 1), so free writes the refcount and a double free is
#   caught.
# - pool element: both 8191 mbufs of 2176 bytes of data room, cache 256,
#   handler ring_mp_mc (element sizes differ by the pools' own object
#   headers).
# - memory: both on 2 MiB hugepages mapped as needed; DPDK with hugetlbfs
#   files in /dev/hugepages (secondaries need the files; the primary removes
#   what is left of its prefix after rte_eal_cleanup), memplane with a
#   hugetlb memfd and --pagesz-mem 1G:0 (left alone, it puts the 17 MiB of
#   pool objects on a 1 GiB page when one is free: --memplane-any-pages).
#   Each run's log names the pages it used (summary below the table).
# - compiler: the per-packet work (fill, checksums, byte checks) is
#   compiled by gcc on one side and LLVM on the other, and that alone
#   moves the 1514-byte rate by 1.5-2x. So the C program is built twice,
#   gcc -O2 -Wall (as asked) and gcc -O3 -Wall (what DPDK's own release
#   build and Rust's release profile use), both with pkg-config's
#   -march=corei7; Rust release has opt-level 3 and the default x86-64
#   target. The table has both DPDK columns; the verdict is against the
#   faster.
# - pinning: DPDK pins each process itself (primary -l 0, secondary -l 1).
#   memplane does not pin, so the script starts its primary under
#   `taskset -c 0,1` and, as soon as the secondary appears (polling
#   /proc/<pid>/task/<pid>/children), moves all the secondary's threads to
#   CPU 1 and all the primary's to CPU 0 (`taskset -a -p`); the affinity
#   seen and the secondary's age when pinned are checked and printed (the
#   packet loop starts when the secondary has attached: until it is
#   pinned, both processes float over CPUs 0 and 1). DPDK's control threads
#   (interrupt, multi-process) and memplane's IPC threads are idle here.
#
# Last, the per-packet work alone is timed on one core for each build
# (demo_packet_dump bench / demo_pipeline --bench: fill, check_and_rewrite,
# check_returned on one buffer, no pool or ring), to show how much of a
# ratio comes from compiling packet.rs vs its C port.
#
# The machine may be shared and noisy: medians, with the run count in the
# output. Each run is checked (exit 0, "all packets intact") and counted
# only then; afterwards no hugepage file of the run's prefix may remain in
# /dev/hugepages, and HugePages_Free is compared with the value before the
# runs (a warning only: other programs may hold pages meanwhile).
# Outputs: $CARGO_TARGET_DIR/dpdk/demo_vs_dpdk/<side>-<size>-<run>.log.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
cd "$root"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"

runs=5
secs=3
sizes=(64 1514)
# 2 MiB pages only on memplane's side too (DPDK's has no 1 GiB mount here).
memplane_pages="--pagesz-mem 1G:0"
usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
    case "$1" in
        --runs) runs="${2:-}"; shift 2 || usage ;;
        --secs) secs="${2:-}"; shift 2 || usage ;;
        --packet-size) extra_size="${2:-}"; shift 2 || usage ;;
        --memplane-any-pages) memplane_pages=""; shift ;;
        -h | --help) usage ;;
        *) echo "demo_vs_dpdk: unknown argument '$1'" >&2; usage ;;
    esac
done
[[ "$runs" =~ ^[1-9][0-9]*$ ]] || { echo "demo_vs_dpdk: --runs wants a whole number >= 1, not '$runs'" >&2; exit 2; }
[[ "$secs" =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v s="$secs" 'BEGIN { exit !(s > 0 && s <= 3600) }' ||
    { echo "demo_vs_dpdk: --secs wants seconds from 0 to 3600, not '$secs'" >&2; exit 2; }
if [ -n "${extra_size:-}" ]; then
    if ! [[ "$extra_size" =~ ^[0-9]+$ ]] || [ "$extra_size" -lt 58 ] || [ "$extra_size" -gt 1514 ]; then
        echo "demo_vs_dpdk: --packet-size wants bytes from 58 to 1514, not '$extra_size'" >&2; exit 2
    fi
    case " ${sizes[*]} " in *" $extra_size "*) ;; *) sizes+=("$extra_size") ;; esac
fi
[ "$(id -u)" = 0 ] || { echo "demo_vs_dpdk: needs root (DPDK's hugetlbfs files, taskset of the secondary)" >&2; exit 3; }
pkg-config --exists libdpdk 2>/dev/null || { echo "demo_vs_dpdk: DPDK 22.11 (pkg-config libdpdk) is not installed: apt-get install libdpdk-dev" >&2; exit 3; }
command -v gcc >/dev/null 2>&1 || { echo "demo_vs_dpdk: gcc is needed" >&2; exit 3; }
[ "$(nproc)" -ge 2 ] || { echo "demo_vs_dpdk: needs 2 CPUs (one per process)" >&2; exit 3; }
huge_dir=/dev/hugepages
grep -qs " $huge_dir hugetlbfs .*pagesize=2M" /proc/mounts ||
    { echo "demo_vs_dpdk: DPDK's side wants a 2 MiB hugetlbfs mount at $huge_dir" >&2; exit 3; }

out="$CARGO_TARGET_DIR/dpdk"
logs="$out/demo_vs_dpdk"
mkdir -p "$out" "$logs"
dpdk_bin="$out/demo_pipeline"
dpdk_o3_bin="$out/demo_pipeline_O3"
dump_bin="$out/demo_packet_dump"
src="$here/dpdk/demo_pipeline.c"
for opt in O2 O3; do
    bin="$dpdk_bin"
    [ "$opt" = O2 ] || bin="${dpdk_bin}_$opt"
    if [ ! -x "$bin" ] || [ "$src" -nt "$bin" ]; then
        echo "building $bin ..." >&2
        # shellcheck disable=SC2046 # pkg-config output is a word list
        gcc "-$opt" -Wall -o "$bin" "$src" $(pkg-config --cflags --libs libdpdk) >&2
    fi
done
packet_rs="$root/crates/memplane-cli/src/demo/packet.rs"
if [ ! -x "$dump_bin" ] || [ "$here/dpdk/demo_packet_dump.rs" -nt "$dump_bin" ] || [ "$packet_rs" -nt "$dump_bin" ]; then
    # opt-level 3, as the release profile that builds memplane.
    rustc --edition 2021 -C opt-level=3 -o "$dump_bin" "$here/dpdk/demo_packet_dump.rs" >&2
fi
echo "building memplane (cargo build --release -p memplane-cli) ..." >&2
cargo build --release -q -p memplane-cli >&2
memplane_bin="$CARGO_TARGET_DIR/release/memplane"

# The C port must build the very bytes packet.rs builds.
for size in 58 59 64 65 1513 1514 "${sizes[@]}"; do
    for seq in 0 1 255 256 65537 18446744073709551615; do
        if ! cmp -s <("$dpdk_bin" --dump "$size" "$seq") <("$dump_bin" "$size" "$seq"); then
            echo "demo_vs_dpdk: the C port's packet $seq of $size bytes differs from packet.rs's: not the same work" >&2
            exit 1
        fi
    done
done
echo "packet check: demo_pipeline.c builds and rewrites the same bytes as packet.rs (sizes 58..1514, 6 sequence numbers)" >&2

free_2m() { cat /sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages; }
free_before="$(free_2m)"
[ "$free_before" -ge 40 ] || { echo "demo_vs_dpdk: $free_before free 2 MiB hugepages; both sides want ~40 (memplane would fall back to 4 KiB pages)" >&2; exit 3; }

# Mpps from a log's result line: packets / seconds.
mpps_of() {
    awk '/^result: / { printf "%.4f\n", $2 / $8 / 1e6; found = 1 } END { exit !found }' "$1"
}

failures=0
clk_tck="$(getconf CLK_TCK)"
# run_one <side> <size> <run>: runs one side once; appends its Mpps to
# $results/<side>-<size>, or counts a failure.
run_one() {
    local side="$1" size="$2" run="$3" log rc=0 prefix
    log="$logs/$side-$size-$run.log"
    prefix="dvd${side:0:1}$$r$run"
    case "$side" in
        dpdk | dpdkO3)
            local bin="$dpdk_bin"
            [ "$side" = dpdk ] || bin="$dpdk_o3_bin"
            "$bin" --duration "$secs" --packet-size "$size" --file-prefix "$prefix" \
                --lcores 0,1 --huge-dir "$huge_dir" >"$log" 2>&1 || rc=$?
            ;;
        memplane)
            # shellcheck disable=SC2086 # $memplane_pages is a word list
            taskset -c 0,1 "$memplane_bin" demo --duration "$secs" --packet-size "$size" \
                --file-prefix "$prefix" $memplane_pages >"$log" 2>&1 &
            local pid=$! child="" t=0
            while [ -z "$child" ] && [ $t -lt 20000 ] && kill -0 "$pid" 2>/dev/null; do
                child=""
                # (no newline at the end of the file: read fails but sets child)
                read -r child _ <"/proc/$pid/task/$pid/children" 2>/dev/null || true
                [ -n "$child" ] || { sleep 0.001; t=$((t + 1)); }
            done
            if [ -n "$child" ]; then
                taskset -a -p -c 1 "$child" >/dev/null 2>&1 || true
                local pri sec age
                # The secondary's age once pinned (10 ms ticks; an upper
                # bound), to compare with the "attached in X ms" its primary
                # prints: the packet loop starts at the attach.
                age="$(awk -v hz="$clk_tck" 'NR == FNR { up = $1; next } { sub(/.*\) /, ""); printf "%.0f", (up - $20 / hz) * 1000 }' /proc/uptime "/proc/$child/stat" 2>/dev/null || echo '?')"
                taskset -a -p -c 0 "$pid" >/dev/null 2>&1 || true
                pri="$(awk '/^Cpus_allowed_list/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)"
                sec="$(awk '/^Cpus_allowed_list/ { print $2 }' "/proc/$child/status" 2>/dev/null || true)"
                echo "pinning: primary on CPU $pri, secondary on CPU $sec (re-pinned when ~${age} ms old)" >>"$log.pin"
                [ "$pri" = 0 ] && [ "$sec" = 1 ] || echo "demo_vs_dpdk: memplane run $run: pinning not as intended (primary '$pri', secondary '$sec')" >&2
            else
                echo "demo_vs_dpdk: memplane run $run: no secondary process seen to pin" >&2
            fi
            wait "$pid" || rc=$?
            ;;
    esac
    if ls "$huge_dir" 2>/dev/null | grep -q "^${prefix}"; then
        echo "demo_vs_dpdk: $side left files in $huge_dir: $(ls "$huge_dir" | grep "^${prefix}" | tr '\n' ' ')" >&2
        failures=$((failures + 1))
    fi
    local mpps
    if [ "$rc" = 0 ] && grep -q '^all packets intact' "$log" && mpps="$(mpps_of "$log")"; then
        echo "$run $mpps" >>"$results/$side-$size"
        printf '  run %d/%d  %4d B  %-8s %8.3f Mpps\n' "$run" "$runs" "$size" "$side" "$mpps" >&2
    else
        failures=$((failures + 1))
        echo "demo_vs_dpdk: $side, $size-byte packets, run $run FAILED (exit $rc); last lines of $log:" >&2
        tail -n 8 "$log" | sed 's/^/    /' >&2
    fi
}

load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
results="$(mktemp -d)"
trap 'rm -rf "$results"' EXIT
rm -f "$logs"/*.log "$logs"/*.pin
echo "runs: $runs per side and packet size, ${secs} s each, alternating; 2 MiB hugepages free: $free_before" >&2
for run in $(seq 1 "$runs"); do
    for size in "${sizes[@]}"; do
        if [ $((run % 2)) = 1 ]; then order=(memplane dpdk dpdkO3); else order=(dpdkO3 dpdk memplane); fi
        for side in "${order[@]}"; do
            run_one "$side" "$size" "$run"
        done
    done
done

# Result files hold "run Mpps" lines.
median() {
    [ -s "$1" ] || { echo "-"; return; }
    awk '{ print $2 }' "$1" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) printf "%.3f", v[(NR + 1) / 2]; else printf "%.3f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
best() { [ -s "$1" ] && awk '{ print $2 }' "$1" | sort -g | tail -1 | awk '{ printf "%.3f", $1 }' || echo "-"; }
spread() { [ -s "$1" ] && awk '{ print $2 }' "$1" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.2f-%.2f", lo, hi }' || echo "-"; }
ratio_of() { [ "$1" = "-" ] || [ "$2" = "-" ] && echo "-" || awk -v m="$1" -v d="$2" 'BEGIN { printf "%.2f", m / d }'; }
# paired_ratio <memplane file> <dpdk file>: the median over runs of
# memplane / DPDK within one run (the sides of a run ran back to back; a
# ratio of medians pairs one side's fast runs with the other's slow ones
# when the machine switches speed between runs, as this one's 2-CPU
# regimes do for minutes at a time).
paired_ratio() {
    [ -s "$1" ] && [ -s "$2" ] || { echo "-"; return; }
    awk 'NR == FNR { m[$1] = $2; next } ($1 in m) && $2 > 0 { print m[$1] / $2 }' "$1" "$2" | sort -g |
        awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) printf "%.2f", v[(NR + 1) / 2]; else printf "%.2f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
count() { [ -s "$1" ] && wc -l <"$1" | tr -d ' ' || echo 0; }

echo
echo "memplane demo vs the same pipeline over DPDK 22.11 (bench/dpdk/demo_pipeline.c)"
echo "medians of $runs alternating runs, ${secs} s each; burst 32, 1024 in flight, pool 8191 / cache 256;"
echo "primary on CPU 0, secondary on CPU 1 (both sides); load average $load_before before, $(cut -d' ' -f1-3 /proc/loadavg) after, on $(nproc) CPUs"
printf '%-11s %9s %12s %8s %12s %8s %7s %4s\n' "" "memplane" "DPDK, C -O2" "" "DPDK, C -O3" "" "" ""
printf '%-11s %9s %12s %8s %12s %8s %7s %4s\n' "packet size" "Mpps" "Mpps" "ratio" "Mpps" "ratio" "target" "met"
worst=""
for size in "${sizes[@]}"; do
    m="$(median "$results/memplane-$size")"
    d="$(median "$results/dpdk-$size")"
    d3="$(median "$results/dpdkO3-$size")"
    ratio="-"
    ratio3="-"
    met="-"
    ratio="$(paired_ratio "$results/memplane-$size" "$results/dpdk-$size")"
    ratio3="$(paired_ratio "$results/memplane-$size" "$results/dpdkO3-$size")"
    # The verdict is against the faster DPDK build (the smaller ratio).
    low="$(awk -v a="$ratio" -v b="$ratio3" 'BEGIN { if (a == "-" || b == "-") print "-"; else print (a + 0 < b + 0) ? a : b }')"
    if [ "$low" != "-" ]; then
        met="$(awk -v r="$low" 'BEGIN { print (r >= 1.0) ? "yes" : "no" }')"
        worst="$(awk -v r="$low" -v w="$worst" 'BEGIN { print (w == "" || r < w) ? r : w }')"
    fi
    nm="$(count "$results/memplane-$size")"
    nd="$(count "$results/dpdk-$size")"
    nd3="$(count "$results/dpdkO3-$size")"
    runs_note=""
    [ "$nm" = "$runs" ] && [ "$nd" = "$runs" ] && [ "$nd3" = "$runs" ] ||
        runs_note="  (good runs: memplane $nm, DPDK -O2 $nd, -O3 $nd3)"
    printf '%-11s %9s %12s %8s %12s %8s %7s %4s%s\n' "$size B" "$m" "$d" "$ratio" "$d3" "$ratio3" ">= 1.0" "$met" "$runs_note"
done
echo "ratio = median over runs of memplane / DPDK in the same run (run back to back); met: the smaller of the two ratios >= 1.0"
echo "worst ratio: ${worst:--}"
echo
echo "best run of each (the least disturbed; the machine is shared), and the range of all runs:"
for size in "${sizes[@]}"; do
    m="$(best "$results/memplane-$size")"
    d="$(best "$results/dpdk-$size")"
    d3="$(best "$results/dpdkO3-$size")"
    printf '%-11s %9s %12s %8s %12s %8s   range: memplane %s, -O2 %s, -O3 %s\n' "$size B" "$m" "$d" \
        "$(ratio_of "$m" "$d")" "$d3" "$(ratio_of "$m" "$d3")" "$(spread "$results/memplane-$size")" \
        "$(spread "$results/dpdk-$size")" "$(spread "$results/dpdkO3-$size")"
done

# What memory each side used, from the first run's logs.
first_size="${sizes[0]}"
mem_line="$(grep -m1 '^memory: ' "$logs/memplane-$first_size-1.log" 2>/dev/null || true)"
dpdk_line="$(grep -m1 '^pool ' "$logs/dpdk-$first_size-1.log" 2>/dev/null || true)"
pool_line="$(grep -m1 '^mbuf pool ' "$logs/memplane-$first_size-1.log" 2>/dev/null || true)"
# The packet work alone (no pool, no ring, one core, one buffer): how much
# of a ratio is the compilation of the per-packet code. Best of 5.
echo
echo "the packet work alone (fill + check_and_rewrite + check_returned on one buffer, CPU 0, best of 5), ns per packet:"
printf '%-11s %22s %12s %12s\n' "packet size" "packet.rs (rustc -O3)" "C, gcc -O2" "C, gcc -O3"
for size in "${sizes[@]}"; do
    count_pkts=$(( size > 512 ? 200000 : 2000000 ))
    for k in 1 2 3 4 5; do
        taskset -c 0 "$dump_bin" bench "$size" "$count_pkts" | awk '{ print $1 }' >>"$results/work-rust-$size"
        taskset -c 0 "$dpdk_bin" --bench "$size" "$count_pkts" | awk '{ print $1 }' >>"$results/work-O2-$size"
        taskset -c 0 "$dpdk_o3_bin" --bench "$size" "$count_pkts" | awk '{ print $1 }' >>"$results/work-O3-$size"
    done
    least() { sort -g "$1" | head -1; }
    printf '%-11s %22s %12s %12s\n' "$size B" "$(least "$results/work-rust-$size")" \
        "$(least "$results/work-O2-$size")" "$(least "$results/work-O3-$size")"
done
echo
echo "memplane: ${mem_line:-?}; ${pool_line:-?}"
echo "DPDK:     2 MiB hugetlbfs files in $huge_dir; ${dpdk_line:-?}"
pin_line="$(head -1 "$logs/memplane-$first_size-1.log.pin" 2>/dev/null || true)"
attach="$(grep -m1 -o 'attached in [0-9]* ms' "$logs/memplane-$first_size-1.log" 2>/dev/null || true)"
[ -z "$pin_line" ] || echo "memplane $pin_line; it $attach (run 1)"
echo "logs: $logs"

free_after="$(free_2m)"
if [ "$free_after" != "$free_before" ]; then
    echo "warning: 2 MiB hugepages free: $free_before before the runs, $free_after after (other programs may hold pages too)" >&2
fi
if [ "$failures" -gt 0 ]; then
    echo "demo_vs_dpdk: $failures run(s) failed; see above" >&2
    exit 1
fi
