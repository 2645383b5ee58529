//! The demo's primary: memory set-up (hugepages, or `--no-huge` with one
//! line saying why), the pool, the rings, the secondary, the packet loop,
//! and the final checks.

use std::fmt::Write as _;
use std::io::{IsTerminal as _, Write as _};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use memplane::hugepages::{reserve, Discovery};
use memplane::memseg::BackingKind;
use memplane::memzone::Memzone;
use memplane::units::format_size;
use memplane::{Error, MemOptions, Memory, PageSize};
use memplane_ring::{Ring, RingConfig, SyncMode, ZoneRegion};

use super::control_in;
use super::packet;
use super::pkts::PacketPool;
use super::{
    free_pages, si, wait_for, Control, Plan, Signals, CONTROL, POOL, TO_PRIMARY, TO_SECONDARY,
};

/// Packets in flight at most: enough to keep both cores busy, few enough
/// that they stay in the CPU caches.
const WINDOW: u64 = 1024;
/// Per-lcore cache of the packet pool (DPDK's examples use 256).
const POOL_CACHE: u32 = 256;

/// How memory was chosen, for the summary.
enum MemoryChoice {
    /// Hugepages (free already, or reserved now).
    Hugepages,
    /// `--no-huge`, as asked.
    NoHugeAsked,
    /// `--no-huge` because hugepages were short; the line was printed.
    NoHugeFallback,
}

/// 2 MiB pages the demo wants free: the pool's footprint plus room for
/// the rings, the control block and heap growth in 2 MiB steps.
fn pages_needed(plan: &Plan) -> u64 {
    let bytes = PacketPool::footprint(plan.mbufs, &plan.eal)
        + 2 * (plan.mbufs as usize + 64) * 8
        + (8 << 20);
    bytes.div_ceil(2 << 20) as u64
}

/// Picks hugepages or `--no-huge`, reserving 2 MiB pages first when asked
/// (`--reserve`, as root). Adds the options to `eal`.
fn choose_memory(discovery: &Discovery, plan: &Plan, eal: &mut Vec<String>) -> MemoryChoice {
    let sys = &discovery.roots().sys;
    let mb = (PacketPool::footprint(plan.mbufs, eal) >> 20) + 64;
    let no_huge_args = |eal: &mut Vec<String>| {
        if !eal
            .iter()
            .any(|a| a == "-m" || a.starts_with("--socket-mem"))
        {
            eal.extend(["-m".to_string(), mb.to_string()]);
        }
    };
    if plan.has("--no-huge") {
        no_huge_args(eal);
        return MemoryChoice::NoHugeAsked;
    }
    let need = pages_needed(plan);
    // 1 GiB pages count too: one holds the whole demo.
    let have = |sys| free_pages(sys, PageSize::SIZE_2M) + free_pages(sys, PageSize::SIZE_1G) * 512;
    let mut free = have(sys);
    if free < need && plan.reserve {
        let total: u64 =
            std::fs::read_to_string(sys.join("kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"))
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
        let want = total + (need - free);
        match reserve::set_pool_size(discovery, PageSize::SIZE_2M, None, want) {
            Ok(out) => println!(
                "reserved 2 MiB hugepages: pool {} -> {} pages (asked {})",
                out.before, out.granted, out.requested
            ),
            Err(e) => println!(
                "--reserve: could not reserve {} more 2 MiB hugepages: {e}",
                need - free
            ),
        }
        free = have(sys);
    }
    if free >= need {
        return MemoryChoice::Hugepages;
    }
    let how = if rustix::process::geteuid().is_root() {
        "`memplane demo --reserve` or `memplane hugepages reserve 2M=1024`"
    } else {
        "`sudo memplane demo --reserve` or `sudo memplane hugepages reserve 2M=1024`"
    };
    println!(
        "no hugepages: {free} free 2 MiB pages, {need} needed; running with --no-huge (4 KiB pages) instead. For hugepages: {how}"
    );
    eal.push("--no-huge".into());
    no_huge_args(eal);
    MemoryChoice::NoHugeFallback
}

/// "2 MiB hugepages, hugetlb memfd, node 0: 12 pages (24 MiB)" per memory
/// type in use.
fn memory_sources(mem: &Memory) -> String {
    let mut o = String::new();
    for l in mem.layout().lists.iter().filter(|l| l.used > 0) {
        let bytes = u64::from(l.used) * l.page_size.bytes();
        let _ = writeln!(
            o,
            "memory: {} pages, {}, node {}: {} pages mapped ({})",
            l.page_size,
            l.backing.as_str(),
            l.node,
            l.used,
            format_size(bytes)
        );
    }
    o
}

struct Shared<'m> {
    pool: PacketPool<'m>,
    to_secondary: Ring<usize, ZoneRegion<'m>>,
    to_primary: Ring<usize, ZoneRegion<'m>>,
    control: Memzone<'m>,
}

fn create_shared<'m>(mem: &'m Memory, plan: &Plan) -> Result<Shared<'m>, Error> {
    let pool = PacketPool::create(mem, POOL, plan.mbufs, POOL_CACHE)?;
    let cfg = RingConfig {
        producer: SyncMode::Single,
        consumer: SyncMode::Single,
        exact: true,
        // A pipeline: each side polls the other's tail, which must not
        // share a line with the head its owner keeps moving.
        compact: false,
    };
    let ring = |name: &str| {
        Ring::<usize, _>::create(
            mem,
            name,
            plan.mbufs as usize,
            memplane::heap::SOCKET_ID_ANY,
            cfg,
        )
        .map_err(|e| Error::System(format!("creating ring {name}: {e}")))
    };
    let to_secondary = ring(TO_SECONDARY)?;
    let to_primary = ring(TO_PRIMARY)?;
    let control = mem
        .memzone_reserve(
            CONTROL,
            std::mem::size_of::<Control>(),
            memplane::heap::SOCKET_ID_ANY,
            memplane::memzone::MemzoneFlags::ZERO,
        )
        .map_err(|e| Error::System(format!("reserving {CONTROL}: {e}")))?;
    Ok(Shared {
        pool,
        to_secondary,
        to_primary,
        control,
    })
}

/// Counters of the packet loop.
#[derive(Default)]
struct Tally {
    sent: u64,
    returned: u64,
    bad: u64,
    first_bad: Option<String>,
}

/// How the loop ended.
enum Ending {
    Duration,
    Interrupted(i32),
    SecondaryExited(ExitStatus),
}

fn spawn_secondary(plan: &Plan, eal: &[String]) -> Result<Child, Error> {
    let exe =
        std::env::current_exe().map_err(|e| Error::System(format!("finding this binary: {e}")))?;
    let mut cmd = Command::new(exe);
    cmd.arg("demo")
        .arg("--secondary-of")
        .arg(std::process::id().to_string())
        .arg("--packet-size")
        .arg(plan.packet_size.to_string())
        .arg("--burst")
        .arg(plan.burst.to_string())
        .arg("--mbufs")
        .arg(plan.mbufs.to_string())
        .args(eal.iter().filter(|a| !a.starts_with("--proc-type")))
        .arg("--proc-type")
        .arg("secondary")
        .stdin(Stdio::null());
    cmd.spawn()
        .map_err(|e| Error::System(format!("starting the secondary process: {e}")))
}

/// Runs the primary side.
pub(crate) fn run(
    discovery: &Discovery,
    plan: &Plan,
    signals: &Signals,
) -> Result<ExitCode, Error> {
    let sys = discovery.roots().sys.clone();
    let mut eal = plan.eal.clone();
    if !plan.has("--file-prefix") {
        eal.extend([
            "--file-prefix".to_string(),
            format!("demo{}", std::process::id()),
        ]);
    }
    // Files in a hugetlbfs mount: one per page cannot be handed to the
    // secondary (memplane passes one descriptor per memory type), so the
    // demo asks for one file per memory type.
    if plan.has("--huge-dir") && !plan.has("--single-file-segments") && !plan.has("--no-huge") {
        println!(
            "--huge-dir: adding --single-file-segments (the secondary attaches to one file per memory type, not one per page)"
        );
        eal.push("--single-file-segments".into());
    }
    let mut choice = choose_memory(discovery, plan, &mut eal);
    let free_before = free_pages(&sys, PageSize::SIZE_2M);
    let t0 = Instant::now();
    let mem = match Memory::init_with_roots(&MemOptions::parse_args(&eal)?, discovery.roots()) {
        Ok(m) => m,
        Err(e) if matches!(choice, MemoryChoice::Hugepages) && !plan.has("--socket-mem") => {
            println!("hugepage memory failed ({e}); running with --no-huge (4 KiB pages) instead");
            eal.push("--no-huge".into());
            eal.extend([
                "-m".to_string(),
                ((PacketPool::footprint(plan.mbufs, &eal) >> 20) + 64).to_string(),
            ]);
            choice = MemoryChoice::NoHugeFallback;
            Memory::init_with_roots(&MemOptions::parse_args(&eal)?, discovery.roots())?
        }
        Err(e) => return Err(e),
    };
    let prefix = mem.layout().prefix.clone();
    let _ = memplane_mempool::register_thread(&mem);
    let shared = create_shared(&mem, plan)?;
    let init = t0.elapsed();
    let control = control_in(&shared.control)
        .ok_or_else(|| Error::System(format!("{CONTROL} is too small or misaligned")))?;
    control
        .packet_size
        .store(plan.packet_size as u32, Ordering::Release);

    println!(
        "memplane demo: primary pid {}, prefix '{prefix}': {} packets of {} bytes in bursts of {} for {:?}",
        std::process::id(),
        if matches!(choice, MemoryChoice::Hugepages) { "hugepage" } else { "4 KiB-page" },
        plan.packet_size,
        plan.burst,
        plan.duration
    );
    print!("{}", memory_sources(&mem));
    println!("{}", shared.pool.describe());
    println!(
        "rings: {TO_SECONDARY} and {TO_PRIMARY}, {} slots each, single producer / single consumer; set up in {:.1} ms",
        plan.mbufs,
        init.as_secs_f64() * 1e3
    );
    println!("\n--- memory map ---");
    print!("{}", crate::info::render_instance(&mem, &prefix));
    println!("------------------\n");

    let t_spawn = Instant::now();
    let mut child = spawn_secondary(plan, &eal)?;
    let attached = wait_for(Duration::from_secs(30), || {
        control.ready.load(Ordering::Acquire) == 1 || matches!(child.try_wait(), Ok(Some(_)))
    });
    if control.ready.load(Ordering::Acquire) != 1 {
        let status = if attached { child.wait().ok() } else { None };
        let _ = child.kill();
        let _ = child.wait();
        return Err(Error::System(format!(
            "the secondary process did not attach ({}); see its messages above",
            status.map_or_else(|| "no answer in 30 s".to_string(), |s| s.to_string())
        )));
    }
    println!(
        "secondary: pid {} attached in {:.0} ms. While this runs: memplane info --file-prefix {prefix}",
        child.id(),
        t_spawn.elapsed().as_secs_f64() * 1e3
    );

    let (tally, ending, elapsed) = packet_loop(plan, &shared, &mut child, signals);

    // Drained (or given up on): tell the secondary to finish.
    control.stop.store(1, Ordering::Release);
    let status = if let Ending::SecondaryExited(s) = ending {
        Some(s)
    } else {
        {
            let done = wait_for(Duration::from_secs(10), || {
                matches!(child.try_wait(), Ok(Some(_)))
            });
            if !done {
                println!("the secondary did not exit within 10 s: killing it");
                let _ = child.kill();
            }
            child.wait().ok()
        }
    };
    let _ = shared.pool.flush_cache();
    let report = Report {
        plan,
        tally: &tally,
        elapsed,
        ending: &ending,
        status,
        control,
        pool: &shared.pool,
    };
    let ok = report.print();
    let layout = mem.layout();
    let mapped = layout.total_mapped;
    let files = layout.lists.iter().any(|l| {
        matches!(
            l.backing,
            BackingKind::HugetlbfsFilePerList | BackingKind::HugetlbfsFilePerPage
        )
    });
    let t_down = Instant::now();
    drop(shared);
    drop(mem);
    let t_down = t_down.elapsed();
    let free_after = free_pages(&sys, PageSize::SIZE_2M);
    if matches!(choice, MemoryChoice::Hugepages) {
        println!(
            "teardown: {} unmapped in {:.1} ms; 2 MiB hugepages free {free_before} before start, {free_after} now ({})",
            format_size(mapped),
            t_down.as_secs_f64() * 1e3,
            if files {
                "its hugetlbfs files removed"
            } else {
                "memfd backing: no files in hugetlbfs mounts"
            }
        );
    }
    Ok(match (&ending, ok) {
        (_, false) => ExitCode::FAILURE,
        (Ending::Interrupted(_), true) => ExitCode::from(130),
        _ => ExitCode::SUCCESS,
    })
}

/// Sends, receives and checks until the duration is over (or a signal,
/// or the secondary exits), then drains what is in flight.
fn packet_loop(
    plan: &Plan,
    shared: &Shared<'_>,
    child: &mut Child,
    signals: &Signals,
) -> (Tally, Ending, Duration) {
    let pool = &shared.pool;
    let tx = shared
        .to_secondary
        .producer()
        .expect("single producer: only the primary");
    let rx = shared
        .to_primary
        .consumer()
        .expect("single consumer: only the primary");
    let tty = std::io::stdout().is_terminal();
    let window = WINDOW.min(u64::from(plan.mbufs) - 2 * plan.burst as u64);
    let mut t = Tally::default();
    let mut pending: Vec<usize> = Vec::with_capacity(plan.burst);
    let mut received = vec![0usize; plan.burst];
    let start = Instant::now();
    let mut deadline = start + plan.duration;
    let mut ending = Ending::Duration;
    let mut draining = false;
    let mut last_report = start;
    let mut last_returned = 0;
    let mut iter = 0u64;
    let mut idle = 0u32;
    loop {
        if !draining && pending.is_empty() && t.sent - t.returned + plan.burst as u64 <= window {
            let first = pending.len();
            if pool.alloc_bulk(&mut pending, plan.burst, plan.packet_size) {
                for (k, &m) in pending[first..].iter().enumerate() {
                    // SAFETY: just allocated by us, not shared yet.
                    packet::fill(unsafe { pool.data_mut(m) }, t.sent + k as u64);
                }
                t.sent += plan.burst as u64;
            }
        }
        if !pending.is_empty() {
            let moved = tx.enqueue_burst(&pending).count as usize;
            pending.drain(..moved);
        }
        let got = rx.dequeue_burst(&mut received).count as usize;
        for &m in &received[..got] {
            // SAFETY: the secondary handed the packet back through the ring
            // and no longer touches it.
            let data = unsafe { pool.data_mut(m) };
            if let Err(why) = packet::check_returned(data, t.returned, plan.packet_size) {
                t.bad += 1;
                t.first_bad
                    .get_or_insert_with(|| format!("packet {}: {why}", t.returned));
            }
            t.returned += 1;
        }
        if got != 0 {
            pool.free_bulk(&received[..got]);
        }
        if got == 0 {
            idle += 1;
            // See the secondary: yield when the other side is not running.
            if idle % 64 == 0 {
                std::thread::yield_now();
            }
        } else {
            idle = 0;
        }

        iter += 1;
        if iter % 256 != 0 {
            continue;
        }
        let now = Instant::now();
        if draining && t.returned == t.sent && pending.is_empty() {
            break;
        }
        if let Some(sig) = signals.take() {
            if draining {
                println!("\nsecond signal: giving up on the packets in flight");
                break;
            }
            ending = Ending::Interrupted(sig);
        }
        if let Ok(Some(status)) = child.try_wait() {
            ending = Ending::SecondaryExited(status);
            break;
        }
        if !draining && (now >= deadline || matches!(ending, Ending::Interrupted(_))) {
            draining = true;
            deadline = now + Duration::from_secs(5);
            // The drain time does not count in the rate.
        } else if draining && now >= deadline {
            break;
        }
        if now.duration_since(last_report) >= Duration::from_millis(if tty { 250 } else { 1000 })
            && !draining
        {
            let secs = now.duration_since(last_report).as_secs_f64();
            let pps = (t.returned - last_returned) as f64 / secs;
            let line = format!(
                "  {:5.1} s  {}pps  {}bit/s each way  in flight {:4}  pool {}/{} in use",
                now.duration_since(start).as_secs_f64(),
                si(pps),
                si(pps * plan.packet_size as f64 * 8.0),
                t.sent - t.returned,
                pool.in_use(),
                pool.size()
            );
            if tty {
                print!("\r{line}");
            } else {
                println!("{line}");
            }
            let _ = std::io::stdout().flush();
            last_report = now;
            last_returned = t.returned;
        }
    }
    if tty {
        println!();
    }
    // Packets filled but never sent go straight back.
    pool.free_bulk(&pending);
    let elapsed = start.elapsed();
    (t, ending, elapsed)
}

struct Report<'a, 'm> {
    plan: &'a Plan,
    tally: &'a Tally,
    elapsed: Duration,
    ending: &'a Ending,
    status: Option<ExitStatus>,
    control: &'a Control,
    pool: &'a PacketPool<'m>,
}

impl Report<'_, '_> {
    /// Prints the results; true when every check passed.
    fn print(&self) -> bool {
        let t = self.tally;
        let secs = self.elapsed.as_secs_f64().max(1e-9);
        let pps = t.returned as f64 / secs;
        match self.ending {
            Ending::Duration => {}
            Ending::Interrupted(sig) => println!(
                "interrupted (signal {sig}) after {secs:.1} s: drained the packets in flight"
            ),
            Ending::SecondaryExited(s) => println!("the secondary exited early ({s})"),
        }
        println!(
            "result: {} packets sent and returned in {:.2} s: {}pps, {}bit/s each way ({}-byte packets)",
            t.returned,
            secs,
            si(pps),
            si(pps * self.plan.packet_size as f64 * 8.0),
            self.plan.packet_size
        );
        let processed = self.control.processed.load(Ordering::Acquire);
        let sec_bad = self.control.bad.load(Ordering::Acquire);
        println!(
            "secondary: {processed} packets checked and rewritten, {sec_bad} bad; {}",
            self.status
                .map_or_else(|| "exit status unknown".to_string(), |s| s.to_string())
        );
        let in_use = self.pool.in_use();
        let size = self.pool.size();
        println!(
            "pool: {} of {size} buffers free, {in_use} in use",
            size - in_use
        );
        let lost = t.sent - t.returned;
        let secondary_ok = self.status.is_some_and(|s| s.success());
        if let Some(first) = &t.first_bad {
            println!("first bad packet: {first}");
        }
        let ok = t.bad == 0
            && sec_bad == 0
            && lost == 0
            && in_use == 0
            && secondary_ok
            && t.returned > 0;
        if ok {
            println!(
                "all packets intact: {} sent, {} returned, 0 bad, 0 lost; pool full again ({size} of {size} free)",
                t.sent, t.returned
            );
        } else {
            println!(
                "FAILED: {} sent, {} returned, {} bad here, {sec_bad} bad in the secondary, {lost} lost, {in_use} buffers still in use{}",
                t.sent,
                t.returned,
                t.bad,
                if secondary_ok { "" } else { ", the secondary failed" }
            );
        }
        ok
    }
}
