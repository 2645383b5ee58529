//! Random operation sequences on mbuf chains against a byte-level model:
//! append, prepend, adj, trim, chain (segments from two pools with
//! different data rooms), linearize, read, clone and clone drops. After
//! every step the chain's bytes, pkt_len, nb_segs, head- and tailroom, the
//! clones' bytes and every pool's in-use count must match the model, and
//! refused operations must change nothing.

// The mempool crate's test support (hugepage check, instances, pool lock).
#[path = "../../memplane-mempool/tests/common.rs"]
mod common;

use bytes::BufMut;
use common::{have_hugepages, instance};
use memplane_mbuf::{Mbuf, MbufError, MbufPool, MbufPoolConfig};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

const ROOM_A: usize = 256;
const ROOM_B: usize = 200;
const HEADROOM: usize = 128;

#[derive(Debug, Clone)]
enum Op {
    Append(usize),
    Prepend(usize),
    Adj(usize),
    Trim(usize),
    Chain { len: usize, from_b: bool },
    Linearize,
    Read { off: usize, len: usize },
    Clone,
    DropClone(usize),
    Copy { off: usize, len: usize },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0usize..140).prop_map(Op::Append),
        2 => (0usize..140).prop_map(Op::Prepend),
        2 => (0usize..200).prop_map(Op::Adj),
        2 => (0usize..200).prop_map(Op::Trim),
        2 => (0usize..80, any::<bool>()).prop_map(|(len, from_b)| Op::Chain { len, from_b }),
        1 => Just(Op::Linearize),
        2 => (0usize..400, 0usize..200).prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Clone),
        1 => (0usize..8).prop_map(Op::DropClone),
        1 => (0usize..400, prop_oneof![0usize..300, Just(usize::MAX)])
            .prop_map(|(off, len)| Op::Copy { off, len }),
    ]
}

/// One segment of the model: which buffer, from which pool, the bytes
/// around the data.
#[derive(Debug, Clone)]
struct Seg {
    buf: usize,
    from_b: bool,
    head: usize,
    data: Vec<u8>,
    tail: usize,
}

/// A clone: the (buffer, from pool b) pairs it holds, and its bytes.
type CloneModel = (Vec<(usize, bool)>, Vec<u8>);

#[derive(Default)]
struct Model {
    segs: Vec<Seg>,
    /// Per clone: (buffers it holds, its bytes).
    clones: Vec<CloneModel>,
    next_buf: usize,
    next_byte: u8,
}

impl Model {
    fn bytes(&self) -> Vec<u8> {
        self.segs
            .iter()
            .flat_map(|s| s.data.iter().copied())
            .collect()
    }
    fn shared(&self, buf: usize) -> bool {
        self.clones
            .iter()
            .any(|(b, _)| b.iter().any(|&(x, _)| x == buf))
    }
    fn pattern(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.next_byte = self.next_byte.wrapping_add(1);
                self.next_byte
            })
            .collect()
    }
    fn new_seg(&mut self, from_b: bool) -> Seg {
        self.next_buf += 1;
        let room = if from_b { ROOM_B } else { ROOM_A };
        Seg {
            buf: self.next_buf,
            from_b,
            head: HEADROOM,
            data: Vec::new(),
            tail: room - HEADROOM,
        }
    }
    /// Direct buffers alive per pool (chain or clones) and clone mbufs.
    fn in_use(&self) -> (u32, u32, u32) {
        let mut bufs: Vec<(usize, bool)> = self.segs.iter().map(|s| (s.buf, s.from_b)).collect();
        for (b, _) in &self.clones {
            bufs.extend(b.iter().copied());
        }
        bufs.sort_unstable();
        bufs.dedup();
        let a = bufs.iter().filter(|b| !b.1).count() as u32;
        let b = bufs.iter().filter(|b| b.1).count() as u32;
        let c: usize = self.clones.iter().map(|(b, _)| b.len()).sum();
        (a, b, c as u32)
    }
}

fn check(
    m: &Mbuf<'_>,
    model: &Model,
    clones: &[Mbuf<'_>],
    pools: (&MbufPool<'_>, &MbufPool<'_>, &MbufPool<'_>),
) -> Result<(), TestCaseError> {
    prop_assert_eq!(m.to_vec(), model.bytes());
    prop_assert_eq!(m.pkt_len() as usize, model.bytes().len());
    prop_assert_eq!(m.nb_segs() as usize, model.segs.len());
    for (s, ms) in m.segments().zip(&model.segs) {
        prop_assert_eq!(s.headroom() as usize, ms.head);
        prop_assert_eq!(s.tailroom() as usize, ms.tail);
    }
    prop_assert_eq!(clones.len(), model.clones.len());
    for (c, (_, bytes)) in clones.iter().zip(&model.clones) {
        prop_assert_eq!(&c.to_vec(), bytes);
        prop_assert!(c.is_indirect());
    }
    let (a, b, i) = model.in_use();
    prop_assert_eq!(
        (
            pools.0.in_use_count(),
            pools.1.in_use_count(),
            pools.2.in_use_count()
        ),
        (a, b, i)
    );
    Ok(())
}

#[test]
fn random_operation_sequences_match_the_byte_model() {
    if !have_hugepages(16) {
        return;
    }
    let inst = instance("mb_model");
    let mem = &inst.mem;
    let pa = MbufPool::create(
        mem,
        "a",
        &MbufPoolConfig::new(2048).data_room(ROOM_A as u32),
    )
    .unwrap();
    let pb = MbufPool::create(
        mem,
        "b",
        &MbufPoolConfig::new(2048).data_room(ROOM_B as u32),
    )
    .unwrap();
    let pi = MbufPool::create(mem, "i", &MbufPoolConfig::new(4096).data_room(0)).unwrap();
    let pools = (&pa, &pb, &pi);
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128);
    let mut runner = TestRunner::new(Config {
        cases,
        ..Config::default()
    });
    runner
        .run(&proptest::collection::vec(op(), 1..60), |ops| {
            let mut model = Model::default();
            let first = model.new_seg(false);
            model.segs.push(first);
            let mut m = pa.alloc().unwrap();
            let mut clones: Vec<Mbuf<'_>> = Vec::new();
            let mut scratch = vec![0u8; 512];
            for op in ops {
                match op {
                    Op::Append(n) => {
                        let last = model.segs.last().unwrap().clone();
                        let shared = model.shared(last.buf);
                        let bytes = model.pattern(n);
                        // Even lengths through append, odd ones through BufMut.
                        let r = if n % 2 == 0 {
                            m.append(n).map(|b| b.copy_from_slice(&bytes))
                        } else if m.writer().remaining_mut() >= n {
                            m.writer().put_slice(&bytes);
                            Ok(())
                        } else {
                            m.append(n).map(|_| ())
                        };
                        if n > last.tail {
                            prop_assert!(matches!(r, Err(MbufError::NoTailroom { .. })), "{r:?}");
                        } else if shared {
                            prop_assert!(matches!(r, Err(MbufError::NotWritable { .. })), "{r:?}");
                        } else {
                            prop_assert!(r.is_ok(), "{r:?}");
                            let last = model.segs.last_mut().unwrap();
                            last.tail -= n;
                            last.data.extend_from_slice(&bytes);
                        }
                    }
                    Op::Prepend(n) => {
                        let shared = model.shared(model.segs[0].buf);
                        let r = m.prepend(n).map(|b| b.len());
                        if n > model.segs[0].head {
                            prop_assert!(matches!(r, Err(MbufError::NoHeadroom { .. })), "{r:?}");
                        } else if shared {
                            prop_assert!(matches!(r, Err(MbufError::NotWritable { .. })), "{r:?}");
                        } else {
                            prop_assert_eq!(r.unwrap(), n);
                            let bytes = model.pattern(n);
                            m.data_mut().unwrap()[..n].copy_from_slice(&bytes);
                            let s = &mut model.segs[0];
                            s.head -= n;
                            s.data.splice(0..0, bytes);
                        }
                    }
                    Op::Adj(n) => {
                        let r = m.adj(n);
                        let total = model.bytes().len();
                        if n > total {
                            prop_assert!(matches!(r, Err(MbufError::OutOfRange { .. })), "{r:?}");
                        } else if n > model.segs[0].data.len() {
                            prop_assert!(
                                matches!(r, Err(MbufError::SegmentTooShort { .. })),
                                "{r:?}"
                            );
                        } else {
                            prop_assert!(r.is_ok());
                            let s = &mut model.segs[0];
                            s.data.drain(..n);
                            s.head += n;
                        }
                    }
                    Op::Trim(n) => {
                        let r = m.trim(n);
                        let total = model.bytes().len();
                        let last = model.segs.last_mut().unwrap();
                        if n > total {
                            prop_assert!(matches!(r, Err(MbufError::OutOfRange { .. })), "{r:?}");
                        } else if n > last.data.len() {
                            prop_assert!(
                                matches!(r, Err(MbufError::SegmentTooShort { .. })),
                                "{r:?}"
                            );
                        } else {
                            prop_assert!(r.is_ok());
                            let l = last.data.len() - n;
                            last.data.truncate(l);
                            last.tail += n;
                        }
                    }
                    Op::Chain { len, from_b } => {
                        let mut seg = model.new_seg(from_b);
                        let len = len.min(seg.tail);
                        let bytes = model.pattern(len);
                        let mut t = if from_b { pb.alloc() } else { pa.alloc() }.unwrap();
                        t.append(len).unwrap().copy_from_slice(&bytes);
                        seg.data = bytes;
                        seg.tail -= len;
                        m = m.chain(t).map_err(|e| TestCaseError::fail(e.to_string()))?;
                        model.segs.push(seg);
                    }
                    Op::Linearize => {
                        let r = m.linearize();
                        let total = model.bytes().len();
                        let first = &model.segs[0];
                        let room = first.data.len() + first.tail;
                        if model.segs.len() == 1 {
                            prop_assert!(r.is_ok());
                        } else if model.shared(first.buf) {
                            prop_assert!(matches!(r, Err(MbufError::NotWritable { .. })), "{r:?}");
                        } else if total > room {
                            prop_assert!(matches!(r, Err(MbufError::NoRoom { .. })), "{r:?}");
                        } else {
                            prop_assert!(r.is_ok(), "{r:?}");
                            let bytes = model.bytes();
                            let s = &mut model.segs[0];
                            s.tail = room - total;
                            s.data = bytes;
                            model.segs.truncate(1);
                        }
                    }
                    Op::Read { off, len } => {
                        let bytes = model.bytes();
                        let r = m.read(off, len, &mut scratch);
                        if off + len > bytes.len() {
                            prop_assert!(matches!(r, Err(MbufError::OutOfRange { .. })), "{r:?}");
                        } else {
                            prop_assert_eq!(r.unwrap(), &bytes[off..off + len]);
                        }
                    }
                    Op::Clone => {
                        if model.clones.len() < 8 {
                            let c = m.clone_in(&pi).unwrap();
                            model.clones.push((
                                model.segs.iter().map(|s| (s.buf, s.from_b)).collect(),
                                model.bytes(),
                            ));
                            clones.push(c);
                        }
                    }
                    Op::Copy { off, len } => {
                        let bytes = model.bytes();
                        let r = m.copy_in(&pa, off, len);
                        if off > bytes.len() {
                            prop_assert!(matches!(r, Err(MbufError::OutOfRange { .. })), "{r:?}");
                        } else {
                            let c = r.unwrap();
                            let end = off + len.min(bytes.len() - off);
                            prop_assert_eq!(c.to_vec(), &bytes[off..end]);
                            let n = end - off;
                            let room = ROOM_A - HEADROOM;
                            prop_assert_eq!(c.nb_segs() as usize, n.div_ceil(room).max(1));
                            prop_assert!(c.is_direct());
                            prop_assert_eq!(c.port(), m.port());
                        }
                    }
                    Op::DropClone(k) => {
                        if k < clones.len() {
                            drop(clones.remove(k));
                            model.clones.remove(k);
                        }
                    }
                }
                check(&m, &model, &clones, pools)?;
            }
            // Free in a random-ish order: the owner first, then the clones.
            drop(m);
            model.segs.clear();
            check_counts(&model, pools)?;
            Mbuf::free_bulk(clones);
            prop_assert!(pa.is_full() && pb.is_full() && pi.is_full());
            Ok(())
        })
        .unwrap();
    pa.free().unwrap();
    pb.free().unwrap();
    pi.free().unwrap();
}

fn check_counts(
    model: &Model,
    pools: (&MbufPool<'_>, &MbufPool<'_>, &MbufPool<'_>),
) -> Result<(), TestCaseError> {
    let (a, b, i) = model.in_use();
    prop_assert_eq!(
        (
            pools.0.in_use_count(),
            pools.1.in_use_count(),
            pools.2.in_use_count()
        ),
        (a, b, i)
    );
    Ok(())
}
