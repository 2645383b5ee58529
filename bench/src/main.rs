//! memplane benchmark driver.
//!
//! - `memplane-bench ring-perf [--sizes 8,32]`: memplane's mirror of DPDK
//!   22.11 `ring_perf_autotest`, printing lines in DPDK's own format.
//! - `memplane-bench compare ring [--runs N] [--sizes ..]`: runs
//!   `dpdk-test ring_perf_autotest` and the mirror alternately N times and
//!   prints medians side by side with the ratio.
//! - `memplane-bench overcommit`: MP/MC vs RTS vs HTS with more threads than
//!   CPUs (memplane only; DPDK's perf test has no such row).

mod compare;
mod overcommit;
mod ring_perf;

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
    match args.first().map(String::as_str) {
        Some("ring-perf") => ring_perf::run(&sizes),
        Some("compare") if args.get(1).map(String::as_str) == Some("ring") => {
            let runs = flag(&args, "--runs").map_or(5, |s| s.parse().expect("--runs N"));
            std::process::exit(compare::ring(runs, &sizes));
        }
        Some("overcommit") => overcommit::run(),
        _ => {
            eprintln!(
                "usage: memplane-bench ring-perf [--sizes 8,32]\n       memplane-bench compare ring [--runs N] [--sizes 8,32,64,128,256]\n       memplane-bench overcommit"
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
