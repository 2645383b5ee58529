//! Single-threaded behaviour: geometry, counts, bulk/burst semantics,
//! wrap-around, element sizes, raw face, peek, role claims, and every bad
//! input returning a typed error with nothing changed.
#![cfg(not(loom))]

use memplane_ring::RingMemory;
use memplane_ring::{
    memsize, BulkError, HeapRegion, RawRing, Ring, RingConfig, RingError, SyncMode, MAGIC,
};

fn region(bytes: usize) -> HeapRegion {
    HeapRegion::new(bytes).unwrap()
}

fn ring<T: memplane_ring::Element>(cap: usize, cfg: RingConfig) -> Ring<T, HeapRegion> {
    let bytes = Ring::<T, HeapRegion>::memsize(cap, cfg.exact).unwrap();
    Ring::init(region(bytes), "test", cap, cfg).unwrap()
}

/// Every sync mode, in both layouts.
const ALL: [RingConfig; 8] = [
    RingConfig::MPMC,
    RingConfig::SPSC,
    RingConfig::RTS,
    RingConfig::HTS,
    RingConfig::MPMC.compact(true),
    RingConfig::SPSC.compact(true),
    RingConfig::RTS.compact(true),
    RingConfig::HTS.compact(true),
];

#[test]
fn counts_and_capacity() {
    for cfg in ALL {
        let r = ring::<u64>(8, cfg);
        assert_eq!(r.capacity(), 8);
        assert_eq!(r.size(), 8);
        assert!(r.is_empty() && !r.is_full());
        assert_eq!((r.count(), r.free_count()), (0, 8));
        let p = r.producer().unwrap();
        assert_eq!(p.enqueue_bulk(&[1, 2, 3]).unwrap(), 5);
        assert_eq!((r.count(), r.free_count()), (3, 5));
        assert_eq!(p.enqueue_bulk(&[4, 5, 6, 7, 8]).unwrap(), 0);
        assert!(r.is_full());
        assert_eq!(p.try_enqueue(9), Err(9));
        let c = r.consumer().unwrap();
        let mut out = [0u64; 8];
        assert_eq!(c.dequeue_bulk(&mut out).unwrap(), 0);
        assert_eq!(out, [1, 2, 3, 4, 5, 6, 7, 8]);
        assert!(r.is_empty());
        assert_eq!(c.dequeue(), None);
        assert_eq!(r.name(), "test");
        assert_eq!(r.producer_mode(), cfg.producer);
        assert_eq!(r.consumer_mode(), cfg.consumer);
    }
}

#[test]
fn exact_capacity() {
    let r = ring::<u32>(
        100,
        RingConfig {
            exact: true,
            ..RingConfig::MPMC
        },
    );
    assert_eq!((r.capacity(), r.size()), (100, 128));
    let p = r.producer().unwrap();
    let items: Vec<u32> = (0..100).collect();
    assert_eq!(p.enqueue_bulk(&items).unwrap(), 0);
    assert_eq!(p.try_enqueue(7), Err(7));
    let t = p.enqueue_burst(&[1, 2]);
    assert_eq!((t.count, t.remaining), (0, 0));
    let c = r.consumer().unwrap();
    let mut out = vec![0u32; 100];
    assert_eq!(c.dequeue_bulk(&mut out).unwrap(), 0);
    assert_eq!(out, items);
}

#[test]
fn bulk_is_all_or_nothing_burst_is_partial() {
    for cfg in ALL {
        let r = ring::<u64>(16, cfg);
        let p = r.producer().unwrap();
        let c = r.consumer().unwrap();
        p.enqueue_bulk(&[0; 10]).unwrap();
        // Bulk of 7 does not fit in 6 free: nothing moves.
        assert_eq!(
            p.enqueue_bulk(&[1; 7]),
            Err(BulkError::Insufficient {
                requested: 7,
                available: 6
            })
        );
        assert_eq!(r.count(), 10);
        // Burst of 7 moves 6.
        let t = p.enqueue_burst(&[2; 7]);
        assert_eq!((t.count, t.remaining), (6, 0));
        let mut out = [9u64; 20];
        let t = c.dequeue_burst(&mut out[..4]);
        assert_eq!((t.count, t.remaining), (4, 12));
        out = [9u64; 20];
        assert_eq!(
            c.dequeue_bulk(&mut out[..13]),
            Err(BulkError::Insufficient {
                requested: 13,
                available: 12
            })
        );
        assert_eq!(out, [9; 20], "failed bulk wrote nothing");
        let t = c.dequeue_burst(&mut out);
        assert_eq!((t.count, t.remaining), (12, 0));
        assert_eq!(&out[..12], &[0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2]);
        let t = c.dequeue_burst(&mut out);
        assert_eq!((t.count, t.remaining), (0, 0));
    }
}

#[test]
#[allow(clippy::many_single_char_names)] // r/p/c/n/t read as the ring protocol's names
fn wraps_around_many_times() {
    for cfg in ALL {
        let r = ring::<u64>(8, cfg);
        let p = r.producer().unwrap();
        let c = r.consumer().unwrap();
        let mut next_in = 0u64;
        let mut next_out = 0u64;
        for round in 0..1000u64 {
            let n = (round % 7 + 1) as usize;
            let items: Vec<u64> = (next_in..next_in + n as u64).collect();
            let t = p.enqueue_burst(&items);
            next_in += u64::from(t.count);
            let mut out = vec![0u64; (round % 5 + 1) as usize];
            let t = c.dequeue_burst(&mut out);
            for &v in &out[..t.count as usize] {
                assert_eq!(v, next_out);
                next_out += 1;
            }
            assert_eq!(u64::from(r.count()), next_in - next_out);
        }
    }
}

#[test]
fn sixteen_byte_and_odd_sized_elements() {
    let r = ring::<[u64; 2]>(4, RingConfig::MPMC);
    let p = r.producer().unwrap();
    let c = r.consumer().unwrap();
    for i in 0..10u64 {
        p.enqueue_bulk(&[[i, !i], [i + 100, i]]).unwrap();
        let mut out = [[0u64; 2]; 2];
        c.dequeue_bulk(&mut out).unwrap();
        assert_eq!(out, [[i, !i], [i + 100, i]]);
    }
    let r = ring::<[u32; 3]>(4, RingConfig::SPSC);
    let p = r.producer().unwrap();
    let c = r.consumer().unwrap();
    for i in 0..10u32 {
        p.try_enqueue([i, i + 1, i + 2]).unwrap();
        p.try_enqueue([i, 0, 0]).unwrap();
        p.try_enqueue([7, 7, i]).unwrap();
        assert_eq!(c.dequeue(), Some([i, i + 1, i + 2]));
        assert_eq!(c.dequeue(), Some([i, 0, 0]));
        assert_eq!(c.dequeue(), Some([7, 7, i]));
    }
}

#[test]
fn raw_ring_moves_bytes() {
    let bytes = memsize(12, 8, false).unwrap();
    let r = RawRing::init(region(bytes), "raw", 12, 8, RingConfig::MPMC).unwrap();
    assert_eq!(r.element_size(), 12);
    let p = r.producer().unwrap();
    let c = r.consumer().unwrap();
    let data: Vec<u8> = (0..36).collect();
    assert_eq!(p.enqueue_bulk(&data).unwrap(), 5);
    assert_eq!(
        p.enqueue_bulk(&data[..5]),
        Err(BulkError::BadLength { len: 5, esize: 12 })
    );
    let mut out = vec![0u8; 24];
    assert_eq!(c.dequeue_bulk(&mut out).unwrap(), 1);
    assert_eq!(out, data[..24]);
    let t = c.dequeue_burst(&mut out).unwrap();
    assert_eq!(t.count, 1);
    assert_eq!(out[..12], data[24..]);
}

#[test]
fn peek_single_consumer_only() {
    let r = ring::<u64>(8, RingConfig::SPSC);
    let p = r.producer().unwrap();
    let c = r.consumer().unwrap();
    p.enqueue_bulk(&[5, 6, 7]).unwrap();
    let mut out = [0u64; 2];
    assert_eq!(c.peek(&mut out).unwrap(), 2);
    assert_eq!(out, [5, 6]);
    assert_eq!(r.count(), 3);
    assert_eq!(c.dequeue(), Some(5));
    let r = ring::<u64>(8, RingConfig::MPMC);
    let c = r.consumer().unwrap();
    assert!(matches!(c.peek(&mut out), Err(RingError::WrongMode { .. })));
}

#[test]
fn single_roles_are_exclusive_until_dropped() {
    let r = ring::<u64>(8, RingConfig::SPSC);
    let p = r.producer().unwrap();
    assert!(matches!(
        r.producer(),
        Err(RingError::RoleTaken {
            role: "producer",
            ..
        })
    ));
    let c = r.consumer().unwrap();
    assert!(matches!(
        r.consumer(),
        Err(RingError::RoleTaken {
            role: "consumer",
            ..
        })
    ));
    drop(p);
    drop(c);
    let _p = r.producer().unwrap();
    let _c = r.consumer().unwrap();
    // Multi sides hand out any number of handles.
    let r = ring::<u64>(8, RingConfig::MPMC);
    let _a = r.producer().unwrap();
    let _b = r.producer().unwrap();
}

#[test]
fn htd_max_only_for_rts() {
    let r = ring::<u64>(64, RingConfig::RTS);
    r.set_htd_max(true, 4).unwrap();
    r.set_htd_max(false, 4).unwrap();
    let r = ring::<u64>(64, RingConfig::MPMC);
    assert!(matches!(
        r.set_htd_max(true, 4),
        Err(RingError::WrongMode { .. })
    ));
}

#[test]
fn attach_sees_same_ring() {
    let bytes = Ring::<u64, HeapRegion>::memsize(16, false).unwrap();
    let r = Ring::<u64, _>::init(region(bytes), "shared", 16, RingConfig::MPMC).unwrap();
    r.producer().unwrap().enqueue_bulk(&[1, 2, 3]).unwrap();
    let mem = r.into_memory();
    let r2 = Ring::<u64, _>::attach(mem).unwrap();
    assert_eq!((r2.name(), r2.count()), ("shared".to_string(), 3));
    let mut out = [0u64; 3];
    r2.consumer().unwrap().dequeue_bulk(&mut out).unwrap();
    assert_eq!(out, [1, 2, 3]);
    // Attaching with the wrong element type is refused.
    let mem = r2.into_memory();
    assert_eq!(
        Ring::<u32, _>::attach(mem).unwrap_err(),
        RingError::ElementSizeMismatch {
            ring: 8,
            expected: 4
        }
    );
}

/// Snapshot of a region's bytes, to prove a failed call changed nothing.
fn bytes_of(r: &HeapRegion) -> Vec<u8> {
    use memplane_ring::RingMemory;
    // SAFETY: test-only read of a region no ring handle uses.
    unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len()).to_vec() }
}

#[test]
fn bad_input_is_a_typed_error_and_changes_nothing() {
    let big = region(1 << 16);
    let before = bytes_of(&big);
    let check = |e: RingError, want: &RingError| assert_eq!(&e, want);
    // memsize validation.
    check(memsize(8, 0, false).unwrap_err(), &RingError::ZeroCapacity);
    check(
        memsize(8, 1 << 31, false).unwrap_err(),
        &RingError::CapacityTooLarge {
            requested: 1 << 31,
            max: 0x7fff_ffff,
        },
    );
    check(
        memsize(8, 100, false).unwrap_err(),
        &RingError::NotPowerOfTwo(100),
    );
    check(
        memsize(6, 8, false).unwrap_err(),
        &RingError::ElementSize(6),
    );
    check(
        memsize(0, 8, false).unwrap_err(),
        &RingError::ElementSize(0),
    );
    // init validation, region untouched each time.
    let mut mem = big;
    for (esize, cap, name, exact, want) in [
        (8, 0, "x", false, RingError::ZeroCapacity),
        (
            8,
            1usize << 40,
            "x",
            false,
            RingError::CapacityTooLarge {
                requested: 1 << 40,
                max: 0x7fff_ffff,
            },
        ),
        (8, 12, "x", false, RingError::NotPowerOfTwo(12)),
        (10, 8, "x", false, RingError::ElementSize(10)),
        (
            8,
            8,
            "a-name-that-is-longer-than-31-bytes",
            false,
            RingError::BadName {
                name: "a-name-that-is-longer-than-31-bytes".into(),
                max: 31,
            },
        ),
        (
            8,
            8,
            "nul\0",
            false,
            RingError::BadName {
                name: "nul\0".into(),
                max: 31,
            },
        ),
        (
            8,
            1 << 14,
            "x",
            false,
            RingError::RegionTooSmall {
                needed: 384 + (8 << 14),
                got: 1 << 16,
            },
        ),
        (
            16,
            4000,
            "x",
            true,
            RingError::RegionTooSmall {
                needed: 384 + 16 * 4096,
                got: 1 << 16,
            },
        ),
    ] {
        let cfg = RingConfig {
            exact,
            ..RingConfig::MPMC
        };
        let err = RawRing::init(mem, name, esize, cap, cfg).unwrap_err();
        assert_eq!(err, want);
        // init consumed the region; get a fresh view of the same bytes by
        // re-creating (HeapRegion is owned), so compare a new zeroed one.
        mem = region(1 << 16);
        assert_eq!(bytes_of(&mem), before);
    }
    // Bad magic on attach.
    let e = Ring::<u64, _>::attach(region(4096)).unwrap_err();
    assert_eq!(
        e,
        RingError::BadMagic {
            found: 0,
            expected: MAGIC
        }
    );
    // Too small to even hold a header.
    let e = Ring::<u64, _>::attach(region(100)).unwrap_err();
    assert_eq!(
        e,
        RingError::RegionTooSmall {
            needed: 384,
            got: 100
        }
    );
    // Bulk larger than capacity: typed error, ring unchanged.
    let r = ring::<u64>(8, RingConfig::MPMC);
    let p = r.producer().unwrap();
    p.enqueue_bulk(&[1, 2]).unwrap();
    assert_eq!(
        p.enqueue_bulk(&[0; 9]),
        Err(BulkError::TooLarge {
            requested: 9,
            capacity: 8
        })
    );
    let mut out = [0u64; 9];
    assert_eq!(
        r.consumer().unwrap().dequeue_bulk(&mut out),
        Err(BulkError::TooLarge {
            requested: 9,
            capacity: 8
        })
    );
    assert_eq!(r.count(), 2);
    assert_eq!(out, [0; 9]);
    // Sync-mode independence of errors.
    assert_eq!(r.producer_mode(), SyncMode::Multi);
}

#[test]
fn init_failure_leaves_existing_ring_intact() {
    // A failed re-init over a live ring must not clobber it.
    let bytes = Ring::<u64, HeapRegion>::memsize(8, false).unwrap();
    let r = Ring::<u64, _>::init(region(bytes), "keep", 8, RingConfig::MPMC).unwrap();
    r.producer().unwrap().enqueue_bulk(&[4, 5]).unwrap();
    let mem = r.into_memory();
    let snapshot = bytes_of(&mem);
    let err = Ring::<u64, _>::init(mem, "keep", 1 << 20, RingConfig::MPMC).unwrap_err();
    assert!(matches!(err, RingError::RegionTooSmall { .. }));
    // The region was consumed by the failed init; rebuild from the snapshot
    // to show the header that was there is still a valid ring.
    let fresh = region(bytes);
    // SAFETY: test-only write into a region no ring uses yet.
    unsafe { std::ptr::copy_nonoverlapping(snapshot.as_ptr(), fresh.as_ptr(), bytes) };
    let r = Ring::<u64, _>::attach(fresh).unwrap();
    assert_eq!(r.count(), 2);
}

/// The handle-less `Multi` bulk calls: all or nothing, FIFO across the
/// wrap, interchangeable with the handles, and `false` with nothing moved
/// when the side is not `Multi` or the request exceeds the capacity.
#[test]
fn handleless_multi_bulk() {
    let r = ring::<u64>(8, RingConfig::MPMC);
    let mut out = [0u64; 8];
    let mut next = 0u64;
    let mut expect = 0u64;
    // Sizes that walk the positions across the wrap many times.
    for round in 0..200u64 {
        let n = (round % 8 + 1) as usize;
        let items: Vec<u64> = (next..next + n as u64).collect();
        assert!(
            r.enqueue_bulk_multi(&items),
            "round {round}: {n} into an empty ring"
        );
        next += n as u64;
        // Too many for the room left: refused whole.
        let room = 8 - n;
        assert!(!r.enqueue_bulk_multi(&vec![u64::MAX; room + 1]));
        assert_eq!(r.count(), n as u32);
        // More than there is: refused, nothing taken.
        if n < 8 {
            assert!(!r.dequeue_bulk_multi(&mut out[..=n]));
            assert_eq!(r.count(), n as u32);
        }
        // Half through the handle-less call, the rest through a consumer.
        let half = n / 2;
        assert!(r.dequeue_bulk_multi(&mut out[..half]));
        r.consumer()
            .unwrap()
            .dequeue_bulk(&mut out[half..n])
            .unwrap();
        for (i, &v) in out[..n].iter().enumerate() {
            assert_eq!(v, expect + i as u64, "round {round}");
        }
        expect += n as u64;
        assert!(r.is_empty());
    }
    // Longer than the capacity: false, not a wrapped-around length.
    assert!(!r.enqueue_bulk_multi(&[0; 9]));
    assert!(!r.dequeue_bulk_multi(&mut [0; 9]));
    assert!(r.is_empty());
    // Other modes: false, nothing moved; the handles still work.
    for cfg in [RingConfig::SPSC, RingConfig::RTS, RingConfig::HTS] {
        let r = ring::<u64>(8, cfg);
        assert!(!r.enqueue_bulk_multi(&[1, 2]), "{cfg:?}");
        assert!(r.is_empty());
        r.producer().unwrap().enqueue_bulk(&[1, 2]).unwrap();
        assert!(!r.dequeue_bulk_multi(&mut out[..2]), "{cfg:?}");
        assert_eq!(r.count(), 2);
    }
}

/// The handle-less calls' two paths (small unwrapped bulks inline, large
/// or wrapping ones out of line) move exactly the elements asked, in
/// order, for every size from 1 to 100 at every phase of a 128-slot ring,
/// and leave the slots around the range alone.
#[test]
fn handleless_multi_bulk_every_size_and_phase() {
    let r = ring::<u64>(128, RingConfig::MPMC.compact(true));
    let mut next = 0u64;
    let mut out = vec![0u64; 128];
    for round in 0..2000u64 {
        let n = (round * 37 % 100 + 1) as usize;
        let items: Vec<u64> = (next..next + n as u64).collect();
        assert!(r.enqueue_bulk_multi(&items), "round {round}: {n}");
        out.fill(u64::MAX);
        assert!(r.dequeue_bulk_multi(&mut out[1..=n]), "round {round}: {n}");
        assert_eq!(&out[1..=n], &items[..], "round {round}: {n}");
        assert_eq!(out[0], u64::MAX, "round {round}: wrote before the range");
        assert_eq!(out[n + 1], u64::MAX, "round {round}: wrote past the range");
        assert!(r.is_empty());
        next += n as u64;
    }
}

/// A compact ring publishes each side's position in the head's cache
/// line (offset 24 of the side), a default ring on the next line (64),
/// and the choice survives attach; a header with a flag bit this build
/// does not know is refused.
#[test]
fn compact_rings_publish_next_to_the_head() {
    fn word(r: &HeapRegion, off: usize) -> u64 {
        let b = bytes_of(r);
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }
    const PROD: usize = 128;
    const CONS: usize = 256;
    for compact in [false, true] {
        for cfg in [
            RingConfig::MPMC,
            RingConfig::SPSC,
            RingConfig::RTS,
            RingConfig::HTS,
        ] {
            let cfg = cfg.compact(compact);
            let bytes = Ring::<u64, HeapRegion>::memsize(16, false).unwrap();
            let r = Ring::<u64, _>::init(region(bytes), "c", 16, cfg).unwrap();
            assert_eq!(r.raw().is_compact(), compact);
            r.producer().unwrap().enqueue_bulk(&[1, 2, 3]).unwrap();
            r.consumer().unwrap().dequeue_bulk(&mut [0u64; 1]).unwrap();
            assert!(r.enqueue_bulk_multi(&[4]) || !matches!(cfg.producer, SyncMode::Multi));
            let mem = r.into_memory();
            let (near, far) = if compact { (24, 64) } else { (64, 24) };
            let (p, c) = (
                word(&mem, PROD + near) as u32,
                word(&mem, CONS + near) as u32,
            );
            let expect_p = if matches!(cfg.producer, SyncMode::Multi) {
                4
            } else {
                3
            };
            assert_eq!((p, c), (expect_p, 1), "{cfg:?}");
            assert_eq!(
                (word(&mem, PROD + far), word(&mem, CONS + far)),
                (0, 0),
                "{cfg:?}"
            );
            let r2 = Ring::<u64, _>::attach(mem).unwrap();
            assert_eq!(r2.raw().is_compact(), compact);
            assert_eq!(r2.count(), expect_p - 1, "{cfg:?}");
            let mut out = vec![0u64; (expect_p - 1) as usize];
            r2.consumer().unwrap().dequeue_bulk(&mut out).unwrap();
            assert_eq!(out[..2], [2, 3], "{cfg:?}");
        }
    }
    // Flag bit 2 (unknown): refused at attach.
    let bytes = Ring::<u64, HeapRegion>::memsize(16, false).unwrap();
    let mem = Ring::<u64, _>::init(region(bytes), "f", 16, RingConfig::MPMC)
        .unwrap()
        .into_memory();
    // SAFETY: test-only write to the flags word (offset 12 of a 64-byte
    // aligned region, so aligned) of a ring nobody uses.
    #[allow(clippy::cast_ptr_alignment)]
    unsafe {
        *mem.as_ptr().add(12).cast::<u32>() |= 4;
    }
    assert_eq!(
        Ring::<u64, _>::attach(mem).unwrap_err(),
        RingError::CorruptHeader("unknown flag bits")
    );
}
