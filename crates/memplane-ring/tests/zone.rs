//! Rings in memzones on real hugepages: create, look up and free by name,
//! typed and raw faces, bad input leaving no zone behind, and a
//! multi-thread sequence-checked stress through a ring found by name.
#![cfg(not(loom))]

use std::sync::atomic::{AtomicU64, Ordering};

use memplane::heap::SOCKET_ID_ANY;
use memplane::memzone::MemzoneError;
use memplane::{Error, MemOptions, Memory};
use memplane_ring::{
    rings, BulkError, RawRing, Ring, RingConfig, RingError, SyncMode, ZoneRegion, ZoneRingError,
};

type ZRing<'m, T> = Ring<T, ZoneRegion<'m>>;

/// Free 2 MiB pages; under CI=true a shortage fails the test.
fn have_hugepages(n: u64) -> bool {
    let free: u64 =
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
            .map_or(0, |t| t.trim().parse().unwrap_or(0));
    if free >= n {
        return true;
    }
    let msg = format!(
        "needs {n} free 2 MiB hugepages, found {free}; reserve them with: memplane hugepages reserve 2M={n} (as root)"
    );
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true and this test {msg}"
    );
    eprintln!("SKIPPED: this test {msg}");
    false
}

fn instance(tag: &str) -> (Memory, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("rz_{tag}_{}", std::process::id());
    let rt = dir.path().display().to_string();
    let opts = MemOptions::parse_args(&["--file-prefix", &prefix, "--runtime-dir", &rt]).unwrap();
    (Memory::init(&opts).unwrap(), dir)
}

#[test]
fn create_lookup_transfer_and_free_by_name() {
    if !have_hugepages(4) {
        return;
    }
    let (mem, _rt) = instance("basic");
    let ring: ZRing<'_, u64> =
        Ring::create(&mem, "rx", 1024, SOCKET_ID_ANY, RingConfig::MPMC).unwrap();
    assert_eq!(ring.capacity(), 1024);
    let zone = ring.memory().zone();
    assert_eq!(zone.name(), "RG_rx");
    assert_eq!(zone.as_ptr() as usize % 64, 0);
    assert!(zone.page_size() >= 2 << 20, "on hugepages");
    let p = ring.producer().unwrap();
    for i in 0..1000u64 {
        p.try_enqueue(i).unwrap();
    }
    // Another handle, found by name, sees the same ring.
    let same: ZRing<'_, u64> = Ring::lookup(&mem, "rx").unwrap();
    assert_eq!(same.count(), 1000);
    let c = same.consumer().unwrap();
    let mut out = [0u64; 1000];
    assert_eq!(c.dequeue_bulk(&mut out).unwrap(), 0);
    assert!(out.iter().enumerate().all(|(i, &v)| v == i as u64));
    let info = rings(&mem);
    assert_eq!(info.len(), 1);
    assert_eq!(
        (
            info[0].name.as_str(),
            info[0].capacity,
            info[0].element_size
        ),
        ("rx", 1024, 8)
    );
    drop((c, p));
    let _ = same;
    ring.free().unwrap();
    assert_eq!(mem.memzone_count(), 0);
    assert!(matches!(
        ZRing::<u64>::lookup(&mem, "rx"),
        Err(ZoneRingError::NotFound { .. })
    ));
}

#[test]
fn raw_rings_of_other_element_sizes_and_sync_modes() {
    if !have_hugepages(4) {
        return;
    }
    let (mem, _rt) = instance("raw");
    let cfg = RingConfig {
        exact: true,
        ..RingConfig::SPSC
    };
    let raw = RawRing::create(&mem, "sixteen", 16, 100, 0, cfg).unwrap();
    assert_eq!((raw.capacity(), raw.element_size()), (100, 16));
    assert_eq!(raw.producer_mode(), SyncMode::Single);
    let p = raw.producer().unwrap();
    let bytes: Vec<u8> = (0..16 * 10).map(|i| i as u8).collect();
    assert_eq!(p.enqueue_bulk(&bytes).unwrap(), 90);
    // SP role is held: a second producer handle is refused.
    let again = RawRing::lookup(&mem, "sixteen").unwrap();
    assert!(matches!(again.producer(), Err(RingError::RoleTaken { .. })));
    let c = again.consumer().unwrap();
    let mut out = vec![0u8; 16 * 10];
    c.dequeue_bulk(&mut out).unwrap();
    assert_eq!(out, bytes);
    // Typed lookup with the wrong element size.
    assert!(matches!(
        ZRing::<u64>::lookup(&mem, "sixteen"),
        Err(ZoneRingError::Ring(RingError::ElementSizeMismatch {
            ring: 16,
            expected: 8
        }))
    ));
    // 12-byte elements, HTS.
    let r12 = RawRing::create(&mem, "twelve", 12, 64, SOCKET_ID_ANY, RingConfig::HTS).unwrap();
    assert_eq!(r12.element_size(), 12);
    drop((p, c));
    let _ = again;
    raw.free().unwrap();
    r12.free().unwrap();
    assert_eq!(mem.memzone_count(), 0);
}

#[test]
fn bad_input_leaves_no_zone_behind() {
    if !have_hugepages(4) {
        return;
    }
    let (mem, _rt) = instance("bad");
    let cfg = RingConfig::MPMC;
    let e = ZRing::<u64>::create(&mem, "zero", 0, 0, cfg).unwrap_err();
    assert!(
        matches!(e, ZoneRingError::Ring(RingError::ZeroCapacity)),
        "{e}"
    );
    let e = ZRing::<u64>::create(&mem, "npot", 1000, 0, cfg).unwrap_err();
    assert!(
        matches!(e, ZoneRingError::Ring(RingError::NotPowerOfTwo(1000))),
        "{e}"
    );
    let e = ZRing::<u64>::create(&mem, "huge", 1 << 31, 0, cfg).unwrap_err();
    assert!(
        matches!(e, ZoneRingError::Ring(RingError::CapacityTooLarge { .. })),
        "{e}"
    );
    let e = RawRing::create(&mem, "odd", 6, 64, 0, cfg).unwrap_err();
    assert!(
        matches!(e, ZoneRingError::Ring(RingError::ElementSize(6))),
        "{e}"
    );
    let long = "r".repeat(29);
    let e = ZRing::<u64>::create(&mem, &long, 64, 0, cfg).unwrap_err();
    assert!(
        matches!(e, ZoneRingError::NameTooLong { len: 29, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("at most 28"), "{e}");
    assert!(ZRing::<u64>::create(&mem, &"r".repeat(28), 64, 0, cfg)
        .unwrap()
        .free()
        .is_ok());
    let e = ZRing::<u64>::create(&mem, "", 64, 0, cfg).unwrap_err();
    assert!(
        matches!(e, ZoneRingError::Ring(RingError::Invalid(_))),
        "{e}"
    );
    let e = ZRing::<u64>::create(&mem, "sock", 64, 9, cfg).unwrap_err();
    assert!(e.to_string().contains("socket"), "{e}");
    assert_eq!(mem.memzone_count(), 0, "a failed create left a zone");
    // Name clash: with a ring, and with a plain zone of the same name.
    let a = ZRing::<u64>::create(&mem, "clash", 64, 0, cfg).unwrap();
    let e = ZRing::<u64>::create(&mem, "clash", 64, 0, cfg).unwrap_err();
    assert!(
        matches!(
            e,
            ZoneRingError::Memory(Error::Memzone(MemzoneError::Exists { .. }))
        ),
        "{e}"
    );
    // A bulk larger than the ring can never succeed.
    let mut big = vec![0u64; 65];
    assert!(matches!(
        a.producer().unwrap().enqueue_bulk(&big),
        Err(BulkError::TooLarge {
            requested: 65,
            capacity: 64
        })
    ));
    assert!(matches!(
        a.consumer().unwrap().dequeue_bulk(&mut big),
        Err(BulkError::TooLarge { .. })
    ));
    a.free().unwrap();
    // A zone that is not a ring under the ring prefix.
    let z = mem
        .memzone_reserve("RG_fake", 4096, 0, memplane::memzone::MemzoneFlags::NONE)
        .unwrap();
    assert!(matches!(
        ZRing::<u64>::lookup(&mem, "fake"),
        Err(ZoneRingError::Ring(RingError::BadMagic { .. }))
    ));
    assert!(rings(&mem).is_empty());
    z.free().unwrap();
}

/// Producers push `producer << 48 | seq` through a ring each of them
/// found by name; consumers check per-producer order; a bitmap proves
/// nothing was lost or duplicated.
fn stress(cfg: RingConfig, producers: u64, consumers: u64, total: u64) {
    let (mem, _rt) = instance("stress");
    let ring: ZRing<'_, u64> = Ring::create(&mem, "stress", 1024, 0, cfg).unwrap();
    let per = total / producers;
    let seen: Vec<Vec<AtomicU64>> = (0..producers)
        .map(|_| (0..per.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
        .collect();
    let received = AtomicU64::new(0);
    std::thread::scope(|s| {
        for p in 0..producers {
            let mem = &mem;
            s.spawn(move || {
                let ring: ZRing<'_, u64> = Ring::lookup(mem, "stress").unwrap();
                let prod = ring.producer().unwrap();
                let mut seq = 0;
                let mut buf = [0u64; 32];
                while seq < per {
                    let n = (per - seq).min(32) as usize;
                    for (i, b) in buf[..n].iter_mut().enumerate() {
                        *b = p << 48 | (seq + i as u64);
                    }
                    let t = prod.enqueue_burst(&buf[..n]);
                    seq += u64::from(t.count);
                    if t.count == 0 {
                        std::thread::yield_now();
                    }
                }
            });
        }
        for _ in 0..consumers {
            let (mem, seen, received) = (&mem, &seen, &received);
            s.spawn(move || {
                let ring: ZRing<'_, u64> = Ring::lookup(mem, "stress").unwrap();
                let cons = ring.consumer().unwrap();
                let mut last = vec![None::<u64>; producers as usize];
                let mut buf = [0u64; 32];
                while received.load(Ordering::Relaxed) < per * producers {
                    let t = cons.dequeue_burst(&mut buf);
                    if t.count == 0 {
                        std::thread::yield_now();
                        continue;
                    }
                    for &v in &buf[..t.count as usize] {
                        let (p, seq) = ((v >> 48) as usize, v & ((1 << 48) - 1));
                        assert!(last[p].is_none_or(|l| seq > l), "producer {p} reordered");
                        last[p] = Some(seq);
                        let bit = 1 << (seq % 64);
                        let old = seen[p][(seq / 64) as usize].fetch_or(bit, Ordering::Relaxed);
                        assert_eq!(old & bit, 0, "producer {p} seq {seq} twice");
                    }
                    received.fetch_add(u64::from(t.count), Ordering::Relaxed);
                }
            });
        }
    });
    for (p, words) in seen.iter().enumerate() {
        let got: u64 = words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        assert_eq!(got, per, "producer {p} lost elements");
    }
    assert!(ring.is_empty());
    ring.free().unwrap();
}

#[test]
fn stress_mpmc_through_a_ring_found_by_name() {
    if !have_hugepages(4) {
        return;
    }
    let total = if cfg!(debug_assertions) {
        200_000
    } else {
        20_000_000
    };
    stress(RingConfig::MPMC, 2, 2, total);
}

#[test]
fn stress_spsc_and_rts_through_rings_in_zones() {
    if !have_hugepages(4) {
        return;
    }
    let total = if cfg!(debug_assertions) {
        100_000
    } else {
        5_000_000
    };
    stress(RingConfig::SPSC, 1, 1, total);
    stress(RingConfig::RTS, 2, 2, total);
}
