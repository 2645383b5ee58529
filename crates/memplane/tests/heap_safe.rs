//! The safe face of the heap on real hugepages: `HeapBox` values and
//! slices, `HeapAllocator` under `allocator_api2::vec::Vec` and
//! `hashbrown::HashMap`. Every test frees everything: the heap ends with no
//! allocation and every hugepage is back with the kernel.

#![allow(clippy::many_single_char_names)]

mod common;

use std::alloc::Layout;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use allocator_api2::alloc::Allocator;
use memplane::heap::{HeapAllocator, HeapBox, HeapError, HeapSlice, SOCKET_ID_ANY};
use memplane::{Error, MemOptions, Memory};

use common::{need_hugepages, pool_lock, real_counter};

const MB: usize = 1 << 20;

fn free_2m() -> u64 {
    real_counter(2048, "free_hugepages")
}

fn opts(name: &str) -> (MemOptions, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let prefix = format!("hs_{name}_{}", std::process::id());
    let args = [
        "--file-prefix".to_string(),
        prefix,
        "--runtime-dir".into(),
        dir.path().display().to_string(),
    ];
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    (MemOptions::parse_args(&refs).unwrap(), dir)
}

fn allocs(mem: &Memory) -> u64 {
    mem.heap_stats(0).unwrap().alloc_count
}

fn in_reservation(mem: &Memory, p: *const u8) -> bool {
    (p as usize).wrapping_sub(mem.base_va()) < mem.va_len()
}

/// Checks the end state of every test: nothing allocated, heap sane, and
/// (after the instance is gone) every hugepage back.
fn finish(mem: Memory, before: u64) {
    mem.heap_validate().unwrap();
    assert_eq!(allocs(&mem), 0, "every block was freed");
    // Small freed blocks wait in this thread's cache until flushed.
    mem.heap_cache_flush();
    mem.heap_validate().unwrap();
    assert_eq!(
        mem.heap_stats(0).unwrap().total_bytes,
        0,
        "every page given back"
    );
    drop(mem);
    assert_eq!(free_2m(), before, "every hugepage is back with the kernel");
}

/// Counts drops.
struct Counted(Arc<AtomicUsize>, #[allow(dead_code)] u64);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[repr(C, align(4096))]
struct PageAligned([u8; 100]);

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
struct Unit;

#[test]
fn heap_box_values_live_in_hugepages_and_are_freed_on_drop() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(true);
    let before = free_2m();
    let (o, _rt) = opts("box");
    let mem = Memory::init(&o).unwrap();

    // A plain value: in the reservation, 64-aligned at least, with an IOVA.
    let mut b = HeapBox::new_in(&mem, 41u64).unwrap();
    *b += 1;
    assert_eq!(*b, 42);
    let p = HeapBox::as_ptr(&b).cast::<u8>();
    assert!(in_reservation(&mem, p));
    assert_eq!(p as usize % 64, 0);
    assert!(HeapBox::iova(&b).is_some());
    assert_eq!(HeapBox::iova(&b), mem.virt2iova(p as usize));
    assert!(std::ptr::eq(HeapBox::memory(&b), std::ptr::from_ref(&mem)));
    assert_eq!(allocs(&mem), 1);
    assert_eq!(format!("{b:?} {b}"), "42 42");
    drop(b);
    assert_eq!(allocs(&mem), 0);

    // Alignment above the heap's 64 comes from align_of::<T>().
    let a = HeapBox::new_in(&mem, PageAligned([7; 100])).unwrap();
    assert_eq!(HeapBox::as_ptr(&a) as usize % 4096, 0);
    assert_eq!(a.0[99], 7);

    // Drop runs once, then the block is freed.
    let drops = Arc::new(AtomicUsize::new(0));
    let c = HeapBox::new_on(&mem, Counted(Arc::clone(&drops), 5), 0).unwrap();
    assert_eq!(allocs(&mem), 2);
    drop(c);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
    assert_eq!(allocs(&mem), 1);

    // A value owning system memory (a String) is dropped properly.
    let s = HeapBox::new_in(&mem, String::from("hello hugepages")).unwrap();
    assert_eq!(s.len(), 15);
    assert_eq!(HeapBox::into_inner(s), "hello hugepages");
    assert_eq!(allocs(&mem), 1);

    // An unknown socket is an error and the value is dropped, not leaked.
    let Err(e) = HeapBox::new_on(&mem, Counted(Arc::clone(&drops), 6), 999) else {
        panic!("socket 999 does not exist")
    };
    assert!(
        matches!(e, Error::Heap(HeapError::NoSuchSocket { socket: 999, .. })),
        "{e}"
    );
    assert_eq!(drops.load(Ordering::SeqCst), 2);

    // Zero-sized values never touch the heap (it refuses 0 bytes).
    let z1 = HeapBox::new_in(&mem, ()).unwrap();
    let z2 = HeapBox::new_in(&mem, Unit).unwrap();
    let z3 = HeapBox::new_in(&mem, [0u64; 0]).unwrap();
    assert_eq!(allocs(&mem), 1);
    assert_eq!(HeapBox::iova(&z1), None);
    assert_eq!(*z2, Unit);
    assert_eq!(HeapBox::as_ptr(&z3) as usize % 8, 0, "dangling but aligned");
    drop((z1, z2, z3));
    assert_eq!(allocs(&mem), 1);

    // into_raw / from_raw, and leak + free by hand.
    let raw = HeapBox::into_raw(HeapBox::new_in(&mem, [1u32; 64]).unwrap());
    assert_eq!(allocs(&mem), 2);
    // SAFETY: `raw` came from `into_raw` on this instance, taken back once.
    let back = unsafe { HeapBox::from_raw(&mem, raw) };
    assert_eq!(back[63], 1);
    drop(back);
    let leaked: &mut u64 = HeapBox::leak(HeapBox::new_in(&mem, 3u64).unwrap());
    *leaked += 1;
    assert_eq!(allocs(&mem), 2);
    // SAFETY: the leaked block is this heap's and not used afterwards.
    unsafe { mem.free(std::ptr::NonNull::from(leaked).cast()).unwrap() };

    // Uninit and write.
    let u = HeapBox::<[u16; 300]>::new_uninit_on(&mem, SOCKET_ID_ANY).unwrap();
    let u = HeapBox::write(u, [9; 300]);
    assert!(u.iter().all(|&x| x == 9));
    drop(u);

    // Zeroed: all-zero even on memory a previous block dirtied.
    let mut dirty = HeapBox::new_in(&mem, [0xffu8; 3 * 4096]).unwrap();
    dirty[0] = 0xfe;
    drop(dirty);
    let z = HeapBox::<[u64; 1536]>::try_new_zeroed(&mem).unwrap();
    assert!(z.iter().all(|&x| x == 0));
    let zu = HeapBox::<[u8; 5000]>::new_zeroed_in(&mem).unwrap();
    // SAFETY: zero bytes are valid u8s.
    let zu = unsafe { zu.assume_init() };
    assert!(zu.iter().all(|&x| x == 0));
    drop((a, z, zu));

    // Comparisons and hashing go to the value.
    let x = HeapBox::new_in(&mem, 5i32).unwrap();
    let y = HeapBox::new_in(&mem, 7i32).unwrap();
    assert!(x < y);
    assert_ne!(x, y);
    let hash = |v: &dyn Fn(&mut std::hash::DefaultHasher)| {
        let mut h = std::hash::DefaultHasher::new();
        v(&mut h);
        std::hash::Hasher::finish(&h)
    };
    assert_eq!(
        hash(&|h| std::hash::Hash::hash(&x, h)),
        hash(&|h| std::hash::Hash::hash(&5i32, h))
    );
    assert_eq!(std::borrow::Borrow::<i32>::borrow(&x), &5);
    drop((x, y));

    // Boxes move between threads.
    let boxes: Vec<_> = (0..8u64)
        .map(|i| HeapBox::new_in(&mem, i).unwrap())
        .collect();
    let sum: u64 = std::thread::scope(|s| {
        s.spawn(move || boxes.into_iter().map(|b| *b).sum())
            .join()
            .unwrap()
    });
    assert_eq!(sum, 28);

    finish(mem, before);
}

#[test]
fn heap_slices_copy_fill_zero_and_clean_up_after_a_panic() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(true);
    let before = free_2m();
    let (o, _rt) = opts("slice");
    let mem = Memory::init(&o).unwrap();

    let src: Vec<u32> = (0..10_000).collect();
    let s = HeapSlice::new_slice_copied(&mem, &src).unwrap();
    assert_eq!(&*s, &src[..]);
    assert!(in_reservation(&mem, s.as_ptr().cast()));
    assert!(HeapSlice::iova(&s).is_some());
    assert_eq!(allocs(&mem), 1);

    // 3 MiB of bytes: crosses a 2 MiB page.
    let mut bytes = HeapSlice::new_zeroed_bytes(&mem, 3 * MB).unwrap();
    assert_eq!(bytes.len(), 3 * MB);
    assert!(bytes.iter().all(|&b| b == 0));
    bytes[3 * MB - 1] = 1;
    let words = HeapSlice::<u64>::new_zeroed_slice(&mem, 1000).unwrap();
    assert_eq!(words.iter().sum::<u64>(), 0);

    let strings = HeapSlice::from_fn(&mem, 1000, |i| format!("item {i}")).unwrap();
    assert_eq!(strings[999], "item 999");
    let cloned = HeapSlice::new_slice_cloned(&mem, &strings).unwrap();
    assert_eq!(cloned, strings);
    assert_eq!(allocs(&mem), 5);

    let mut un = HeapSlice::<u8>::new_uninit_slice(&mem, 3, 0).unwrap();
    for (i, x) in un.iter_mut().enumerate() {
        x.write(i as u8);
    }
    // SAFETY: every element was written.
    let un = unsafe { un.assume_init() };
    assert_eq!(&*un, &[0, 1, 2]);

    // Empty and zero-sized slices take no block.
    let empty = HeapSlice::<u64>::new_slice_copied(&mem, &[]).unwrap();
    let units = HeapSlice::from_fn(&mem, 1000, |_| Unit).unwrap();
    let no_bytes = HeapSlice::new_zeroed_bytes(&mem, 0).unwrap();
    assert_eq!((empty.len(), units.len(), no_bytes.len()), (0, 1000, 0));
    assert_eq!(HeapSlice::iova(&empty), None);
    assert_eq!(allocs(&mem), 6);
    drop((empty, units, no_bytes, un));

    // A length whose byte count overflows is an error, not a panic.
    let e = HeapSlice::<u64>::new_uninit_slice(&mem, usize::MAX / 2, SOCKET_ID_ANY).unwrap_err();
    assert!(matches!(e, Error::Heap(HeapError::TooLarge { .. })), "{e}");

    // `from_fn` panicking half way: the elements made so far are dropped
    // and the block is freed.
    let drops = Arc::new(AtomicUsize::new(0));
    let r = catch_unwind(AssertUnwindSafe(|| {
        HeapSlice::from_fn(&mem, 100, |i| {
            assert!(i != 60, "boom");
            Counted(Arc::clone(&drops), i as u64)
        })
    }));
    assert!(r.is_err());
    drop(r);
    assert_eq!(drops.load(Ordering::SeqCst), 60);
    assert_eq!(allocs(&mem), 5);

    // A slice of droppable values drops each one.
    let c = HeapSlice::from_fn(&mem, 40, |i| Counted(Arc::clone(&drops), i as u64)).unwrap();
    drop(c);
    assert_eq!(drops.load(Ordering::SeqCst), 100);

    mem.heap_validate().unwrap();
    drop((s, bytes, words, strings, cloned));
    finish(mem, before);
}

#[test]
fn allocator_vec_of_a_million_grows_through_realloc_across_pages() {
    if !need_hugepages(2048, 16) {
        return;
    }
    let _pool = pool_lock(true);
    let before = free_2m();
    let (o, _rt) = opts("vec");
    let mem = Memory::init(&o).unwrap();
    let alloc = HeapAllocator::new(&mem);

    let mut v: allocator_api2::vec::Vec<u64, HeapAllocator> =
        allocator_api2::vec::Vec::new_in(alloc);
    let (mut grows, mut moves) = (0, 0);
    let (mut cap, mut last) = (v.capacity(), v.as_ptr());
    for i in 0..1_000_000u64 {
        v.push(i);
        if v.capacity() != cap {
            grows += 1;
            cap = v.capacity();
            if v.as_ptr() != last {
                moves += 1;
                last = v.as_ptr();
            }
            assert!(in_reservation(&mem, last.cast()));
        }
    }
    // Doubling from 4 to 2^20 elements: 18 reallocs, some of them in place
    // (the next element was free), the others moved.
    assert!(grows >= 15, "grew {grows} times");
    assert!(
        moves >= 1 && moves < grows,
        "moved {moves} of {grows} times"
    );
    assert_eq!(
        allocs(&mem),
        1,
        "one block at a time: realloc frees the old"
    );
    let st = mem.heap_stats(0).unwrap();
    assert!(
        st.total_bytes >= 8 * MB as u64,
        "8 MB over several 2 MiB pages"
    );
    assert!(st.grow_count >= 2);
    assert!(free_2m() <= before - 4);
    assert!(v.iter().copied().eq(0..1_000_000));
    mem.heap_validate().unwrap();

    // Shrinking goes through the heap too, and keeps the contents.
    v.truncate(1000);
    v.shrink_to_fit();
    assert_eq!(v.capacity(), 1000);
    assert!(v.iter().copied().eq(0..1000));
    assert_eq!(allocs(&mem), 1);

    // An impossible reservation is an error, not an abort.
    assert!(v.try_reserve(1 << 58).is_err());
    drop(v);
    assert_eq!(allocs(&mem), 0);

    // A zeroed vector, and a boxed value through the allocator.
    let z: allocator_api2::vec::Vec<u8, _> = allocator_api2::vec::from_elem_in(0u8, MB, alloc);
    assert!(z.iter().all(|&b| b == 0));
    let b = allocator_api2::boxed::Box::new_in([5u16; 1000], alloc);
    assert!(in_reservation(&mem, b.as_ptr().cast()));
    assert_eq!(allocs(&mem), 2);
    drop((z, b));

    finish(mem, before);
}

#[test]
fn hashbrown_map_of_100k_entries_lives_in_the_heap() {
    if !need_hugepages(2048, 16) {
        return;
    }
    let _pool = pool_lock(true);
    let before = free_2m();
    let (o, _rt) = opts("map");
    let mem = Memory::init(&o).unwrap();

    let mut map = hashbrown::HashMap::new_in(HeapAllocator::on_socket(&mem, 0));
    for i in 0..100_000u64 {
        map.insert(i, i * 3);
    }
    assert_eq!(map.len(), 100_000);
    assert!((0..100_000u64).all(|i| map[&i] == i * 3));
    let (k, _) = map.get_key_value(&77).unwrap();
    assert!(in_reservation(&mem, std::ptr::from_ref(k).cast()));
    assert_eq!(allocs(&mem), 1, "the table is one block");
    assert!(mem.heap_stats(0).unwrap().alloc_bytes >= 100_000 * 16);
    mem.heap_validate().unwrap();

    // Removing and shrinking moves the table to a smaller block.
    map.retain(|k, _| k % 100 == 0);
    map.shrink_to_fit();
    assert_eq!(map.len(), 1000);
    assert_eq!(map[&500], 1500);
    mem.heap_validate().unwrap();
    drop(map);
    assert_eq!(allocs(&mem), 0);

    finish(mem, before);
}

#[test]
fn allocator_contract_zero_sizes_alignment_grow_and_shrink() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(true);
    let before = free_2m();
    let (o, _rt) = opts("contract");
    let mem = Memory::init(&o).unwrap();
    let a = HeapAllocator::new(&mem);
    assert_eq!(a.socket(), SOCKET_ID_ANY);

    // Zero-sized: aligned, empty, no block.
    let l0 = Layout::from_size_align(0, 4096).unwrap();
    let z = a.allocate(l0).unwrap();
    assert_eq!(z.len(), 0);
    assert_eq!(z.cast::<u8>().as_ptr() as usize % 4096, 0);
    assert_eq!(allocs(&mem), 0);

    // Grow from zero-sized, then with a larger alignment: contents kept.
    let l1 = Layout::from_size_align(100, 8).unwrap();
    // SAFETY: `z` is a block of this allocator that `l0` fits.
    let p = unsafe { a.grow(z.cast(), l0, l1) }.unwrap();
    assert_eq!(p.len(), 100);
    // SAFETY: the block holds 100 bytes.
    unsafe { p.cast::<u8>().as_ptr().write_bytes(0xab, 100) };
    let l2 = Layout::from_size_align(10_000, 1 << 16).unwrap();
    // SAFETY: `p` is live and `l1` fits it.
    let q = unsafe { a.grow_zeroed(p.cast(), l1, l2) }.unwrap();
    let qa = q.cast::<u8>().as_ptr();
    assert_eq!(qa as usize % (1 << 16), 0);
    // SAFETY: the block holds 10 000 bytes.
    let bytes = unsafe { std::slice::from_raw_parts(qa, 10_000) };
    assert!(bytes[..100].iter().all(|&b| b == 0xab));
    assert!(
        bytes[100..].iter().all(|&b| b == 0),
        "grow_zeroed clears the tail"
    );
    assert_eq!(allocs(&mem), 1);

    // Shrink keeps the head; shrinking to zero frees.
    let l3 = Layout::from_size_align(50, 1 << 16).unwrap();
    // SAFETY: `q` is live and `l2` fits it.
    let r = unsafe { a.shrink(q.cast(), l2, l3) }.unwrap();
    // SAFETY: the block holds 50 bytes.
    let head = unsafe { std::slice::from_raw_parts(r.cast::<u8>().as_ptr(), 50) };
    assert!(head.iter().all(|&b| b == 0xab));
    let l4 = Layout::from_size_align(0, 1 << 16).unwrap();
    // SAFETY: `r` is live and `l3` fits it.
    let s = unsafe { a.shrink(r.cast(), l3, l4) }.unwrap();
    assert_eq!(s.len(), 0);
    assert_eq!(allocs(&mem), 0);

    // allocate_zeroed on dirty memory.
    let l5 = Layout::from_size_align(200_000, 64).unwrap();
    let d = a.allocate(l5).unwrap();
    // SAFETY: the block holds 200 000 bytes.
    unsafe { d.cast::<u8>().as_ptr().write_bytes(0xcd, 200_000) };
    // SAFETY: `d` is live and `l5` fits it.
    unsafe { a.deallocate(d.cast(), l5) };
    let k = a.allocate(Layout::new::<u8>()).unwrap(); // keeps the page mapped
    let zz = a.allocate_zeroed(l5).unwrap();
    // SAFETY: the block holds 200 000 bytes.
    let fresh = unsafe { std::slice::from_raw_parts(zz.cast::<u8>().as_ptr(), 200_000) };
    assert!(fresh.iter().all(|&b| b == 0));
    // SAFETY: both are live blocks of this allocator with these layouts.
    unsafe {
        a.deallocate(zz.cast(), l5);
        a.deallocate(k.cast(), Layout::new::<u8>());
    }

    // Out of memory is an AllocError.
    let huge = Layout::from_size_align(1 << 50, 64).unwrap();
    assert!(a.allocate(huge).is_err());

    finish(mem, before);
}
