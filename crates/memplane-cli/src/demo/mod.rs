//! `memplane demo`: the whole stack at work. A primary process creates a
//! packet-buffer pool and two rings in shared hugepage memory and starts a
//! secondary process (this same binary); the primary fills packets and
//! sends them through one ring, the secondary checks and rewrites them and
//! sends them back through the other, the primary checks every byte and
//! frees them. It prints where the memory came from, a memory map, pool
//! usage and throughput, and at the end checks that every packet came back
//! intact and the pool is full again.
//!
//! Ctrl-C ends the run early with the same checks; a SIGKILLed primary is
//! noticed by the secondary (parent-death signal, then a liveness check),
//! which exits, and the kernel takes the memory back (memfd backing: no
//! files in any hugetlbfs mount).

mod packet;
mod pkts;
mod primary;
mod secondary;

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, AtomicU64};
use std::time::{Duration, Instant};

use memplane::hugepages::Discovery;
use memplane::options::OptionsError;
use memplane::{Error, PageSize};

/// Arguments of `memplane demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// EAL-style memory options (`--file-prefix`, `--socket-mem`,
    /// `--no-huge`, `--huge-dir`, …) and the demo's own flags, in any
    /// order: `--duration SECS` (default 5), `--packet-size BYTES` (58 to
    /// 1514, default 64), `--burst N` (1 to 512, default 32), `--mbufs N`
    /// (pool size, default 8191), `--reserve` (as root: reserve the 2 MiB
    /// hugepages the demo needs when too few are free).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "OPTIONS"
    )]
    options: Vec<String>,
}

/// What the demo was asked to do.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    duration: Duration,
    packet_size: usize,
    burst: usize,
    mbufs: u32,
    reserve: bool,
    /// Internal: run as the secondary of primary `pid`.
    secondary_of: Option<u32>,
    eal: Vec<String>,
}

/// Names of the shared objects (the pool and rings carry the prefix's
/// instance, so two demos with different prefixes never meet).
pub(crate) const POOL: &str = "demo_pkts";
pub(crate) const TO_SECONDARY: &str = "demo_to_sec";
pub(crate) const TO_PRIMARY: &str = "demo_to_pri";
pub(crate) const CONTROL: &str = "demo_control";

/// The control block, in a memzone both processes map.
#[repr(C, align(64))]
#[derive(Default)]
pub(crate) struct Control {
    /// Set by the secondary once it has attached and looked everything up.
    pub ready: AtomicU32,
    /// Set by the primary: drain and exit.
    pub stop: AtomicU32,
    /// The secondary's pid.
    pub secondary_pid: AtomicU32,
    /// Packet size the primary sends (the secondary checks it).
    pub packet_size: AtomicU32,
    /// Packets the secondary checked and returned.
    pub processed: AtomicU64,
    /// Packets that failed the secondary's check (returned unrewritten).
    pub bad: AtomicU64,
}

fn bad(option: &str, value: &str, reason: impl Into<String>) -> Error {
    OptionsError::BadValue {
        option: option.into(),
        value: value.into(),
        reason: reason.into(),
    }
    .into()
}

fn parse_num<T: std::str::FromStr + PartialOrd + std::fmt::Display + Copy>(
    option: &str,
    value: &str,
    min: T,
    max: T,
) -> Result<T, Error> {
    match value.trim().parse::<T>() {
        Ok(v) if v >= min && v <= max => Ok(v),
        _ => Err(bad(
            option,
            value,
            format!("expected a whole number from {min} to {max}"),
        )),
    }
}

impl Plan {
    /// Takes the demo's flags out of the argument list; the rest are EAL
    /// options (judged by the EAL parser). A `--` ends the demo's flags.
    fn from_args(args: Vec<String>) -> Result<Plan, Error> {
        let mut plan = Plan {
            duration: Duration::from_secs(5),
            packet_size: 64,
            burst: 32,
            mbufs: 8191,
            reserve: false,
            secondary_of: None,
            eal: Vec::new(),
        };
        let mut it = args.into_iter();
        while let Some(arg) = it.next() {
            if arg == "--" {
                plan.eal.extend(it.by_ref());
                break;
            }
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let mut value = |expected: &str| -> Result<String, Error> {
                match inline.clone() {
                    Some(v) => Ok(v),
                    None => it.next().ok_or_else(|| {
                        OptionsError::MissingValue {
                            option: name.clone(),
                            expected: expected.into(),
                        }
                        .into()
                    }),
                }
            };
            match name.as_str() {
                "--duration" => {
                    let v = value("seconds, e.g. --duration 5")?;
                    plan.duration = v
                        .trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|s| (0.0..=86_400.0).contains(s))
                        .map(Duration::from_secs_f64)
                        .ok_or_else(|| {
                            bad(
                                "--duration",
                                &v,
                                "expected seconds from 0 to 86400, e.g. 5 or 0.5",
                            )
                        })?;
                }
                "--packet-size" => {
                    let v = value("bytes, e.g. --packet-size 64")?;
                    plan.packet_size =
                        parse_num("--packet-size", &v, packet::MIN_PACKET, packet::MAX_PACKET)?;
                }
                "--burst" => {
                    let v = value("packets, e.g. --burst 32")?;
                    plan.burst = parse_num("--burst", &v, 1, 512)?;
                }
                "--mbufs" => {
                    let v = value("packet buffers, e.g. --mbufs 8191")?;
                    plan.mbufs = parse_num("--mbufs", &v, 64, 1 << 22)?;
                }
                "--secondary-of" => {
                    let v = value("a pid")?;
                    plan.secondary_of = Some(parse_num("--secondary-of", &v, 1, u32::MAX)?);
                }
                "--reserve" => {
                    if let Some(v) = inline {
                        return Err(OptionsError::UnexpectedValue {
                            option: name,
                            value: v,
                        }
                        .into());
                    }
                    plan.reserve = true;
                }
                _ => plan.eal.push(arg),
            }
        }
        if plan.burst as u32 * 4 > plan.mbufs {
            return Err(bad(
                "--burst",
                &plan.burst.to_string(),
                format!(
                    "a pool of {} buffers needs bursts of at most a quarter of it",
                    plan.mbufs
                ),
            ));
        }
        Ok(plan)
    }

    /// True when the EAL options name `flag` (alone or as `flag=value`).
    fn has(&self, flag: &str) -> bool {
        self.eal
            .iter()
            .any(|a| a == flag || a.strip_prefix(flag).is_some_and(|r| r.starts_with('=')))
    }
}

/// Free pages of a hugepage size, system-wide.
pub(crate) fn free_pages(sys: &Path, size: PageSize) -> u64 {
    std::fs::read_to_string(
        sys.join("kernel/mm/hugepages")
            .join(format!("hugepages-{}kB", size.bytes() / 1024))
            .join("free_hugepages"),
    )
    .ok()
    .and_then(|t| t.trim().parse().ok())
    .unwrap_or(0)
}

/// Runs `memplane demo`.
pub fn run(discovery: &Discovery, args: Args) -> Result<ExitCode, Error> {
    let plan = Plan::from_args(args.options)?;
    // SIGINT and SIGTERM are taken synchronously (sigtimedwait) by the main
    // loop: blocked here, before any thread exists, so every thread the
    // instance starts inherits the mask and none of them is killed by a
    // Ctrl-C meant for the orderly shutdown.
    let signals = Signals::block();
    match plan.secondary_of {
        Some(pid) => secondary::run(discovery, &plan, pid, &signals),
        None => primary::run(discovery, &plan, &signals),
    }
}

/// SIGINT/SIGTERM blocked in the calling thread (and the threads it
/// starts), polled without a handler.
pub(crate) struct Signals {
    set: libc::sigset_t,
}

impl Signals {
    fn block() -> Signals {
        // SAFETY: sigset_t is plain data initialised by sigemptyset; the
        // calls get pointers to this local only and change this thread's
        // mask, which threads started later inherit.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&raw mut set);
            libc::sigaddset(&raw mut set, libc::SIGINT);
            libc::sigaddset(&raw mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
            Signals { set }
        }
    }

    /// The pending signal taken, if one arrived (never waits).
    pub(crate) fn take(&self) -> Option<i32> {
        let ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: pointers to an initialised set and timespec; no siginfo
        // wanted (null is allowed).
        let r =
            unsafe { libc::sigtimedwait(&raw const self.set, std::ptr::null_mut(), &raw const ts) };
        (r > 0).then_some(r)
    }
}

/// The control block in `zone`, if the zone is big and aligned enough.
pub(crate) fn control_in<'z>(zone: &'z memplane::memzone::Memzone<'_>) -> Option<&'z Control> {
    let p = zone.as_ptr();
    if zone.len() < std::mem::size_of::<Control>() || p.align_offset(64) != 0 {
        return None;
    }
    #[allow(clippy::cast_ptr_alignment)] // checked just above
    // SAFETY: big enough and aligned (checked); the zone stays mapped for
    // 'z; Control is all atomics (any bit pattern valid, shared access is
    // sound across processes), and the creator zeroed it.
    Some(unsafe { &*p.cast::<Control>() })
}

/// Pretty rate: 12.3 M, 456 k.
pub(crate) fn si(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.2} G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2} M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k", v / 1e3)
    } else {
        format!("{v:.0} ")
    }
}

/// Waits up to `d` for `f` to hold, polling every millisecond.
pub(crate) fn wait_for(d: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + d;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Result<Plan, Error> {
        Plan::from_args(args.iter().map(ToString::to_string).collect())
    }

    #[test]
    fn demo_flags_come_out_of_the_eal_options_in_any_order() {
        let p = plan(&[
            "--file-prefix",
            "x",
            "--duration",
            "0.5",
            "--no-huge",
            "--burst=16",
            "--reserve",
        ])
        .unwrap();
        assert_eq!(p.duration, Duration::from_millis(500));
        assert_eq!(p.burst, 16);
        assert!(p.reserve);
        assert_eq!(p.eal, ["--file-prefix", "x", "--no-huge"]);
        assert!(p.has("--no-huge") && p.has("--file-prefix") && !p.has("--socket-mem"));
    }

    #[test]
    fn bad_demo_flags_are_refused_with_the_reason() {
        for (args, want) in [
            (&["--duration", "-1"][..], "seconds from 0"),
            (&["--packet-size", "20"], "from 58 to 1514"),
            (&["--burst", "0"], "from 1 to 512"),
            (&["--burst"], "packets"),
            (&["--mbufs", "100", "--burst", "32"], "a quarter"),
            (&["--reserve=yes"], "yes"),
        ] {
            let e = plan(args).unwrap_err().to_string();
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }
}
