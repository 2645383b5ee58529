//! The demo's secondary: attaches to the primary's instance, takes packets
//! from one ring, checks and rewrites them, and returns them through the
//! other, until told to stop or until the primary is gone.

use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::Instant;

use memplane::hugepages::Discovery;
use memplane::{Error, MemOptions, Memory};
use memplane_ring::Ring;

use super::packet;
use super::pkts::PacketPool;
use super::{control_in, Plan, Signals, CONTROL, POOL, TO_PRIMARY, TO_SECONDARY};

/// Exit code when the primary died under us.
const PRIMARY_GONE: u8 = 3;

fn primary_alive(pid: u32) -> bool {
    // Signal 0: existence check only.
    rustix::process::test_kill_process(rustix::process::Pid::from_raw(pid as i32).expect("pid > 0"))
        .is_ok()
        && rustix::process::getppid().is_some_and(|p| p.as_raw_nonzero().get() as u32 == pid)
}

/// Runs the secondary side for primary `primary`.
pub(crate) fn run(
    discovery: &Discovery,
    plan: &Plan,
    primary: u32,
    signals: &Signals,
) -> Result<ExitCode, Error> {
    let me = std::process::id();
    // Ask the kernel to tell us (SIGTERM, blocked and polled) when the
    // primary dies, then check it did not die before we asked.
    let _ = rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::TERM));
    if !primary_alive(primary) {
        eprintln!("[secondary {me}] the primary (pid {primary}) is already gone");
        return Ok(ExitCode::from(PRIMARY_GONE));
    }
    let mem = Memory::init_with_roots(&MemOptions::parse_args(&plan.eal)?, discovery.roots())?;
    let _ = memplane_mempool::register_thread(&mem);
    let pool = PacketPool::lookup(&mem, POOL)?;
    let lookup = |name: &str| {
        Ring::<usize, _>::lookup(&mem, name)
            .map_err(|e| Error::System(format!("looking up ring {name}: {e}")))
    };
    let from_primary = lookup(TO_SECONDARY)?;
    let to_primary = lookup(TO_PRIMARY)?;
    let zone = mem.memzone_lookup(CONTROL).ok_or_else(|| {
        Error::System(format!(
            "no memzone {CONTROL}: is the primary a memplane demo?"
        ))
    })?;
    let control = control_in(&zone)
        .ok_or_else(|| Error::System(format!("{CONTROL} is too small or misaligned")))?;
    let rx = from_primary
        .consumer()
        .map_err(|e| Error::System(format!("ring {TO_SECONDARY}: {e}")))?;
    let tx = to_primary
        .producer()
        .map_err(|e| Error::System(format!("ring {TO_PRIMARY}: {e}")))?;
    let size = control.packet_size.load(Ordering::Acquire) as usize;
    control.secondary_pid.store(me, Ordering::Release);
    control.ready.store(1, Ordering::Release);

    let mut burst = vec![0usize; plan.burst];
    let mut processed = 0u64;
    let mut bad = 0u64;
    let mut first_bad = None;
    let mut iter = 0u64;
    let mut gone = false;
    let mut idle = 0u32;
    let started = Instant::now();
    loop {
        let n = rx.dequeue_burst(&mut burst).count as usize;
        for &m in &burst[..n] {
            // SAFETY: the primary handed the packet over through the ring
            // and does not touch it until we hand it back.
            let data = unsafe { pool.data_mut(m) };
            if data.len() != size {
                bad += 1;
                first_bad.get_or_insert_with(|| format!("length {} instead of {size}", data.len()));
            } else if let Err(why) = packet::check_and_rewrite(data) {
                bad += 1;
                first_bad.get_or_insert_with(|| why.to_string());
            }
        }
        let mut sent = 0;
        while sent < n {
            sent += tx.enqueue_burst(&burst[sent..n]).count as usize;
        }
        processed += n as u64;
        iter += 1;
        if n != 0 && iter % 64 != 0 {
            continue;
        }
        control.processed.store(processed, Ordering::Release);
        control.bad.store(bad, Ordering::Release);
        if control.stop.load(Ordering::Acquire) == 1 && from_primary.is_empty() {
            break;
        }
        if iter % 4096 == 0 && (signals.take() == Some(libc::SIGTERM) || !primary_alive(primary)) {
            gone = true;
            break;
        }
        if n == 0 {
            idle += 1;
            // Polling, as a data plane does; but on a machine with fewer
            // free cores than busy threads, give the time slice away.
            if idle % 64 == 0 {
                std::thread::yield_now();
            }
        } else {
            idle = 0;
        }
    }
    control.processed.store(processed, Ordering::Release);
    control.bad.store(bad, Ordering::Release);
    if let Some(why) = first_bad {
        eprintln!("[secondary {me}] first bad packet: {why}");
    }
    if gone {
        eprintln!(
            "[secondary {me}] the primary (pid {primary}) is gone: exiting after {processed} packets in {:.1} s; the kernel takes the memory back",
            started.elapsed().as_secs_f64()
        );
        // No detach handshake with a dead primary: exit now.
        std::process::exit(i32::from(PRIMARY_GONE));
    }
    // Cached buffers go back so the primary sees a full pool.
    let _ = pool.flush_cache();
    let _ = memplane_mempool::unregister_thread(&mem);
    drop((rx, tx));
    drop((from_primary, to_primary, zone, pool));
    drop(mem);
    Ok(ExitCode::SUCCESS)
}
