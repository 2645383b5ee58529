//! A ring in a memzone shared by two real processes: the primary creates
//! it and produces sequence-numbered elements, a secondary process (this
//! test binary re-executed) finds it by name and consumes them, checking
//! that nothing is lost, duplicated or reordered, and answers through a
//! second ring.
#![cfg(not(loom))]

use std::process::Command;

use memplane::heap::SOCKET_ID_ANY;
use memplane::{MemOptions, Memory};
use memplane_ring::{Ring, RingConfig, ZoneRegion};

const ROLE: &str = "RING_XP_ROLE";
const PREFIX: &str = "RING_XP_PREFIX";
const RUNDIR: &str = "RING_XP_RUNDIR";

fn total() -> u64 {
    if cfg!(debug_assertions) {
        200_000
    } else {
        10_000_000
    }
}

fn opts(prefix: &str, rundir: &str, secondary: bool) -> MemOptions {
    let mut a = vec!["--file-prefix", prefix, "--runtime-dir", rundir];
    if secondary {
        a.extend(["--proc-type", "secondary"]);
    }
    MemOptions::parse_args(&a).unwrap()
}

#[test]
fn consumer_child() {
    let Ok(role) = std::env::var(ROLE) else {
        return;
    };
    assert_eq!(role, "consumer");
    let mem = Memory::init(&opts(
        &std::env::var(PREFIX).unwrap(),
        &std::env::var(RUNDIR).unwrap(),
        true,
    ))
    .unwrap();
    let data: Ring<u64, ZoneRegion<'_>> = Ring::lookup(&mem, "xp-data").unwrap();
    let done: Ring<u64, ZoneRegion<'_>> = Ring::lookup(&mem, "xp-done").unwrap();
    let cons = data.consumer().unwrap();
    let mut next = 0u64;
    let mut buf = [0u64; 64];
    while next < total() {
        let t = cons.dequeue_burst(&mut buf);
        for &v in &buf[..t.count as usize] {
            assert_eq!(v, next, "lost, duplicated or reordered");
            next += 1;
        }
        if t.count == 0 {
            std::thread::yield_now();
        }
    }
    done.producer().unwrap().try_enqueue(next).unwrap();
}

#[test]
fn a_ring_in_a_memzone_carries_elements_between_two_processes() {
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .map_or(0, |t| t.trim().parse().unwrap_or(0));
    if free < 4 {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and no free 2 MiB hugepages"
        );
        eprintln!("SKIPPED: needs 4 free 2 MiB hugepages, found {free}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rundir = dir.path().to_str().unwrap().to_string();
    let prefix = format!("ringxp_{}", std::process::id());
    let mem = Memory::init(&opts(&prefix, &rundir, false)).unwrap();
    let data: Ring<u64, ZoneRegion<'_>> =
        Ring::create(&mem, "xp-data", 1024, SOCKET_ID_ANY, RingConfig::SPSC).unwrap();
    let done: Ring<u64, ZoneRegion<'_>> =
        Ring::create(&mem, "xp-done", 4, SOCKET_ID_ANY, RingConfig::SPSC).unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "consumer_child", "--nocapture"])
        .env(ROLE, "consumer")
        .env(PREFIX, &prefix)
        .env(RUNDIR, &rundir)
        .spawn()
        .unwrap();
    let prod = data.producer().unwrap();
    let mut seq = 0u64;
    let mut buf = [0u64; 64];
    while seq < total() {
        let n = (total() - seq).min(64) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = seq + i as u64;
        }
        let t = prod.enqueue_burst(&buf[..n]);
        seq += u64::from(t.count);
        if t.count == 0 {
            std::thread::yield_now();
            assert!(
                child.try_wait().unwrap().is_none(),
                "the consumer process died"
            );
        }
    }
    let st = child.wait().unwrap();
    assert!(st.success(), "consumer failed: {st}");
    assert_eq!(done.consumer().unwrap().dequeue(), Some(total()));
    drop(prod);
    data.free().unwrap();
    done.free().unwrap();
}
