//! The same stress across real processes: the parent creates a hugetlb
//! memfd (falling back to a plain memfd, with a note, where hugetlb pages
//! are unavailable), initialises an MP/MC ring in it, and re-executes this
//! test binary as two producer and two consumer children that inherit the
//! fd, map it at addresses of their own choosing (a guard mapping shifts
//! them) and attach by validating the header. Consumers check per-producer
//! order; a bitmap placed in the same memfd after the ring proves nothing
//! was lost or duplicated.
#![cfg(not(loom))]
// The shared file is 2 MiB-page aligned and offsets are multiples of 8.
#![allow(clippy::cast_ptr_alignment)]

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use memplane_ring::{memfd_hugetlb, MmapRegion, Ring, RingConfig, RingMemory};

const ROLE_ENV: &str = "MEMPLANE_RING_TEST_ROLE";
const FD_ENV: &str = "MEMPLANE_RING_TEST_FD";
const PRODUCERS: u64 = 2;
const CONSUMERS: u64 = 2;
const CAP: usize = 4096;
const REGION: usize = 4 << 20;

fn per_producer() -> u64 {
    if cfg!(debug_assertions) {
        50_000
    } else {
        2_500_000
    }
}

/// Layout of the shared file: ring at 0, counters then bitmaps after it.
fn ring_bytes() -> usize {
    Ring::<u64, MmapRegion>::memsize(CAP, false).unwrap()
}

struct Shared {
    base: *mut u8,
}

impl Shared {
    fn received(&self) -> &AtomicU64 {
        // SAFETY: the word after the ring, inside the 4 MiB mapping, 64-aligned.
        unsafe { &*self.base.add(ring_bytes()).cast::<AtomicU64>() }
    }
    fn bitmap(&self, p: u64) -> &[AtomicU64] {
        let words = per_producer().div_ceil(64) as usize;
        let off = ring_bytes() + 64 + (p as usize) * words * 8;
        assert!(off + words * 8 <= REGION);
        // SAFETY: inside the mapping, 8-aligned, only accessed atomically.
        unsafe { std::slice::from_raw_parts(self.base.add(off).cast::<AtomicU64>(), words) }
    }
}

fn make_fd() -> OwnedFd {
    match memfd_hugetlb("memplane-ring-test", REGION, true) {
        Ok((fd, _)) => fd,
        Err(e) => {
            eprintln!("note: hugetlb memfd unavailable ({e}); using a plain memfd");
            let fd =
                rustix::fs::memfd_create("memplane-ring-test", rustix::fs::MemfdFlags::empty())
                    .unwrap();
            rustix::fs::ftruncate(&fd, REGION as u64).unwrap();
            fd
        }
    }
}

fn child(role: &str) {
    let fd: i32 = std::env::var(FD_ENV).unwrap().parse().unwrap();
    // SAFETY: the parent passed us this open fd; we only borrow it.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    // Occupy some address space first so our mapping lands elsewhere than
    // the parent's: the ring must be position independent.
    let _guard = MmapRegion::anonymous(64 << 20).unwrap();
    // SAFETY: everyone maps this memfd only to use the ring and atomics.
    let region = unsafe { MmapRegion::map_fd(fd, REGION) }.unwrap();
    eprintln!("child {role}: mapped at {:p}", region.as_ptr());
    let shared = Shared {
        base: region.as_ptr(),
    };
    let ring = Ring::<u64, _>::attach(region).unwrap();
    let per = per_producer();
    let (kind, id) = role.split_once(':').unwrap();
    let id: u64 = id.parse().unwrap();
    match kind {
        "producer" => {
            let prod = ring.producer().unwrap();
            let mut seq = 0;
            let mut buf = [0u64; 32];
            while seq < per {
                let n = (per - seq).min(32) as usize;
                for (i, b) in buf[..n].iter_mut().enumerate() {
                    *b = (id << 48) | (seq + i as u64);
                }
                let t = prod.enqueue_burst(&buf[..n]);
                if t.count == 0 {
                    std::thread::yield_now();
                }
                seq += u64::from(t.count);
            }
        }
        "consumer" => {
            let cons = ring.consumer().unwrap();
            let mut last = [None::<u64>; PRODUCERS as usize];
            let mut buf = [0u64; 32];
            while shared.received().load(Ordering::Relaxed) < per * PRODUCERS {
                let t = cons.dequeue_burst(&mut buf);
                if t.count == 0 {
                    std::thread::yield_now();
                    continue;
                }
                for &v in &buf[..t.count as usize] {
                    let (p, seq) = (v >> 48, v & ((1 << 48) - 1));
                    assert!(p < PRODUCERS && seq < per, "garbage {v:#x}");
                    if let Some(l) = last[p as usize] {
                        assert!(seq > l, "producer {p}: {seq} after {l}");
                    }
                    last[p as usize] = Some(seq);
                    let bit = 1u64 << (seq % 64);
                    let old =
                        shared.bitmap(p)[(seq / 64) as usize].fetch_or(bit, Ordering::Relaxed);
                    assert_eq!(old & bit, 0, "producer {p} seq {seq} twice");
                }
                shared
                    .received()
                    .fetch_add(u64::from(t.count), Ordering::Relaxed);
            }
        }
        _ => panic!("unknown role {role}"),
    }
}

#[test]
fn two_processes_share_a_hugetlb_ring() {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        child(&role);
        return;
    }
    let fd = make_fd();
    // SAFETY: the fd is ours and only used for this ring.
    let region = unsafe { MmapRegion::map_fd(&fd, REGION) }.unwrap();
    let ring = Ring::<u64, _>::init(region, "mp-test", CAP, RingConfig::MPMC).unwrap();
    let exe = std::env::current_exe().unwrap();
    let roles: Vec<String> = (0..PRODUCERS)
        .map(|i| format!("producer:{i}"))
        .chain((0..CONSUMERS).map(|i| format!("consumer:{i}")))
        .collect();
    let children: Vec<_> = roles
        .iter()
        .map(|role| {
            Command::new(&exe)
                .args([
                    "two_processes_share_a_hugetlb_ring",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(ROLE_ENV, role)
                .env(FD_ENV, fd.as_raw_fd().to_string())
                .spawn()
                .unwrap()
        })
        .collect();
    for (mut c, role) in children.into_iter().zip(&roles) {
        let st = c.wait().unwrap();
        assert!(st.success(), "child {role} failed: {st}");
    }
    let shared = Shared {
        base: ring.memory().as_ptr(),
    };
    for p in 0..PRODUCERS {
        let got: u64 = shared
            .bitmap(p)
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        assert_eq!(got, per_producer(), "producer {p}");
    }
    assert!(ring.is_empty());
    assert_eq!(
        shared.received().load(Ordering::Relaxed),
        per_producer() * PRODUCERS
    );
}
