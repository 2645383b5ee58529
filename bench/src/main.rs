//! memplane benchmark driver.
//!
//! - `memplane-bench ring-perf [--sizes 8,32]`: memplane's mirror of DPDK
//!   22.11 `ring_perf_autotest`, printing lines in DPDK's own format.
//! - `memplane-bench compare ring [--runs N] [--sizes ..]`: runs
//!   `dpdk-test ring_perf_autotest` and the mirror alternately N times and
//!   prints medians side by side with the ratio.
//! - `memplane-bench compare mempool --mempool-bin B [--runs N] [--secs S]
//!   [--all-bulks] [--tracking] [--dpdk-output FILE]`: DPDK 22.11
//!   `mempool_perf_autotest` 1- and 2-core rows (B =
//!   `bench/dpdk/mempool_perf.c`) vs memplane's mirror (`mempool-perf
//!   [--secs S] [--all-bulks] [--leak-tracking] [--stats] [--only SUBSTRING]`).
//! - `memplane-bench compare mbuf --mbuf-bin B [--runs N] [--secs S]`:
//!   `rte_pktmbuf_alloc_bulk` + `rte_pktmbuf_free_bulk` (B =
//!   `bench/dpdk/mbuf_perf.c`) vs memplane's `MbufPool::alloc_bulk` +
//!   `Mbuf::free_bulk` (`mbuf-perf [--secs S]`), bulks 1/8/32/64, cache
//!   256 and 0, one core.
//! - `memplane-bench regime-probe`: cache-line round trips per second
//!   between CPUs 0 and 1 (50 ms); on a VM whose 2-CPU rows switch
//!   between a fast and a 3-4x slower regime, says which is on.
//! - `memplane-bench overcommit`: MP/MC vs RTS vs HTS with more threads than
//!   CPUs (memplane only; DPDK's perf test has no such row).
//! - `memplane-bench compare memseg [--runs N] [--memplane-hugetlbfs]`: DPDK 22.11
//!   `malloc_perf_autotest` rte_malloc rows (2M..1G) vs memplane's page
//!   allocator running the same workload (`memseg-perf --prefix P`), with
//!   per-page latency and the kernel floor.
//! - `memplane-bench compare startup --eal-bin B [--eal-bin-static S]
//!   [--runs N]`: `rte_eal_init -m 1024` (B = `bench/dpdk/eal_startup.c`,
//!   built by bench/compare) vs `Memory::init` with 1 GiB
//!   (`startup-once --prefix P`), with the kernel floor.
//! - `memplane-bench compare malloc --aligned-bin B --scale-bin Z [--runs N]`:
//!   DPDK 22.11 `malloc_perf_autotest` rte_malloc, rte_zmalloc and
//!   rte_memzone_reserve tables vs memplane's mirror (`malloc-perf --prefix
//!   P`), 4 KiB blocks aligned to 4 KiB (B = `bench/dpdk/malloc_aligned.c` vs
//!   `malloc-aligned --prefix P`), and 2500 memzones reserved, looked up and
//!   freed (Z = `bench/dpdk/memzone_scale.c` vs `memzone-scale --prefix P`).
//! - `memplane-bench compare init --eal-bin B [--eal-bin-static S]
//!   [--runs N]`: process start to a ready `rte_eal_init` vs `Memory::init`
//!   (`init-once --prefix P --mem MIB|none`), nothing / 1 GiB / 4 GiB
//!   preallocated.

mod compare;
mod compare_malloc;
mod compare_mem;
mod init_once;
mod malloc_perf;
mod mbuf_perf;
mod mempool_perf;
mod memseg_perf;
mod memzone_perf;
mod overcommit;
mod ring_perf;
mod startup;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sizes = flag(&args, "--sizes").map_or_else(
        || vec![8, 32],
        |s| {
            s.split(',')
                .map(|x| x.parse().expect("--sizes takes numbers like 8,32,64"))
                .collect()
        },
    );
    let runs = || -> usize {
        let n = flag(&args, "--runs").map_or(5, |s| s.parse().expect("--runs N"));
        assert!(n > 0, "--runs must be at least 1");
        n
    };
    let prefix = || flag(&args, "--prefix").unwrap_or_else(|| format!("mpb{}", std::process::id()));
    match (
        args.first().map(String::as_str),
        args.get(1).map(String::as_str),
    ) {
        (Some("ring-perf"), _) => ring_perf::run(&sizes),
        (Some("compare"), Some("ring")) => std::process::exit(compare::ring(runs(), &sizes)),
        (Some("compare"), Some("memseg")) => std::process::exit(compare_mem::memseg(
            runs(),
            args.iter().any(|a| a == "--memplane-hugetlbfs"),
        )),
        (Some("compare"), Some("startup")) => {
            let Some(bin) = flag(&args, "--eal-bin") else {
                eprintln!("compare startup needs --eal-bin <eal_startup binary> (bench/compare builds it)");
                std::process::exit(2);
            };
            let stat = flag(&args, "--eal-bin-static");
            std::process::exit(compare_mem::startup(
                runs(),
                std::path::Path::new(&bin),
                stat.as_deref().map(std::path::Path::new),
            ));
        }
        (Some("compare"), Some("malloc")) => {
            let (Some(bin), Some(scale)) =
                (flag(&args, "--aligned-bin"), flag(&args, "--scale-bin"))
            else {
                eprintln!("compare malloc needs --aligned-bin <malloc_aligned binary> and --scale-bin <memzone_scale binary> (bench/compare builds them)");
                std::process::exit(2);
            };
            std::process::exit(compare_malloc::malloc(
                runs(),
                std::path::Path::new(&bin),
                std::path::Path::new(&scale),
            ));
        }
        (Some("compare"), Some("init")) => {
            let Some(bin) = flag(&args, "--eal-bin") else {
                eprintln!(
                    "compare init needs --eal-bin <eal_startup binary> (bench/compare builds it)"
                );
                std::process::exit(2);
            };
            let stat = flag(&args, "--eal-bin-static");
            std::process::exit(compare_malloc::init(
                runs(),
                std::path::Path::new(&bin),
                stat.as_deref().map(std::path::Path::new),
            ));
        }
        (Some("compare"), Some("mempool")) => {
            let Some(bin) = flag(&args, "--mempool-bin") else {
                eprintln!("compare mempool needs --mempool-bin <bench/dpdk/mempool_perf binary> (bench/compare builds it)");
                std::process::exit(2);
            };
            std::process::exit(mempool_perf::compare(&mempool_perf::CompareOpts {
                bin: &bin,
                runs: flag(&args, "--runs").map_or(3, |s| s.parse().expect("--runs N")),
                secs: flag(&args, "--secs").map_or(0.2, |s| s.parse().expect("--secs S")),
                dpdk_output: flag(&args, "--dpdk-output").as_deref(),
                all_bulks: args.iter().any(|a| a == "--all-bulks"),
                tracking: args.iter().any(|a| a == "--tracking"),
            }))
        }
        (Some("compare"), Some("mbuf")) => {
            let Some(bin) = flag(&args, "--mbuf-bin") else {
                eprintln!(
                    "compare mbuf needs --mbuf-bin <mbuf_perf binary> (bench/compare builds it)"
                );
                std::process::exit(2);
            };
            std::process::exit(mbuf_perf::compare(
                &bin,
                flag(&args, "--runs").map_or(3, |s| s.parse().expect("--runs N")),
                flag(&args, "--secs").map_or(1.0, |s| s.parse().expect("--secs S")),
            ))
        }
        (Some("mbuf-perf"), _) => std::process::exit(mbuf_perf::run(
            &prefix(),
            flag(&args, "--secs").map_or(1.0, |s| s.parse().expect("--secs S")),
        )),
        (Some("mempool-perf"), _) => std::process::exit(mempool_perf::run(
            &prefix(),
            flag(&args, "--secs").map_or(0.2, |s| s.parse().expect("--secs S")),
            args.iter().any(|a| a == "--all-bulks"),
            args.iter().any(|a| a == "--leak-tracking"),
            args.iter().any(|a| a == "--stats"),
            flag(&args, "--only").as_deref(),
        )),
        (Some("regime-probe"), _) => {
            println!(
                "cache-line round trips/s between CPUs 0 and 1: {:.1}M",
                mempool_perf::regime_probe() / 1e6
            );
        }
        (Some("malloc-perf"), _) => std::process::exit(malloc_perf::run(&prefix())),
        (Some("malloc-aligned"), _) => std::process::exit(malloc_perf::run_aligned(&prefix())),
        (Some("memzone-scale"), _) => std::process::exit(memzone_perf::run_scale(&prefix())),
        (Some("init-once"), _) => {
            let mem = match flag(&args, "--mem").as_deref() {
                None | Some("none") => None,
                Some(m) => Some(m.parse::<u64>().expect("--mem takes MiB or none") << 20),
            };
            std::process::exit(init_once::run(&prefix(), mem));
        }
        (Some("memseg-perf"), _) => std::process::exit(memseg_perf::run(
            &prefix(),
            flag(&args, "--huge-dir").as_deref(),
        )),
        (Some("startup-once"), _) => std::process::exit(startup::run(&prefix())),
        (Some("overcommit"), _) => overcommit::run(),
        _ => {
            eprintln!(
                "usage: memplane-bench ring-perf [--sizes 8,32]\n       memplane-bench compare ring [--runs N] [--sizes 8,32,64,128,256]\n       memplane-bench compare memseg [--runs N] [--memplane-hugetlbfs]\n       memplane-bench compare startup --eal-bin B [--eal-bin-static S] [--runs N]\n       memplane-bench memseg-perf [--prefix P] [--huge-dir D]\n       memplane-bench startup-once [--prefix P]\n       memplane-bench compare malloc --aligned-bin B --scale-bin Z [--runs N]\n       memplane-bench compare init --eal-bin B [--eal-bin-static S] [--runs N]\n       memplane-bench malloc-perf [--prefix P]\n       memplane-bench malloc-aligned [--prefix P]\n       memplane-bench memzone-scale [--prefix P]\n       memplane-bench init-once [--prefix P] [--mem MIB|none]\n       memplane-bench compare mbuf --mbuf-bin B [--runs N] [--secs S]\n       memplane-bench mbuf-perf [--secs S]\n       memplane-bench overcommit"
            );
            std::process::exit(2);
        }
    }
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Pins the calling thread to one CPU (as DPDK pins each lcore).
pub fn pin(cpu: usize) {
    let mut set = rustix::thread::CpuSet::new();
    set.set(cpu);
    if let Err(e) = rustix::thread::sched_setaffinity(None, &set) {
        eprintln!("warning: cannot pin to CPU {cpu}: {e}");
    }
}

/// The TSC, read exactly as DPDK's `rte_rdtsc()` (plain `rdtsc`).
#[inline(always)]
#[allow(clippy::inline_always)]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects; every x86_64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}
