//! `HugepageGlobalAlloc` as this test binary's `#[global_allocator]`.
//!
//! The instance it serves from is leaked (a global allocator needs one for
//! the rest of the program), so its hugepages only go back when the process
//! exits. The test therefore runs the real work in a child process (this
//! same binary, told so by an environment variable) and checks from the
//! parent that every hugepage came back and nothing was left on disk.
//!
//! No libtest harness (`harness = false`): the child counts the heap's
//! blocks exactly, which needs a process where no other thread allocates
//! (libtest's main thread does its bookkeeping while the test runs).

mod common;

use std::alloc::Layout;
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use memplane::heap::{HugepageGlobalAlloc, InstallError};
use memplane::{MemOptions, Memory};

use common::{need_hugepages, pool_lock, real_counter};

#[global_allocator]
static HUGE: HugepageGlobalAlloc = HugepageGlobalAlloc::new();

/// Set in the child: the runtime directory to use.
const CHILD_ENV: &str = "MEMPLANE_GLOBAL_ALLOC_CHILD";
const TEST_NAME: &str = "std_collections_live_in_hugepages_once_installed";

fn free_2m() -> u64 {
    real_counter(2048, "free_hugepages")
}

/// A minimal stand-in for libtest's command line: `--list` (as nextest
/// asks), name filters, and libtest's result line (which `test.sh` sums).
fn main() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child(&dir.to_string_lossy());
        return;
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        if !args.iter().any(|a| a == "--ignored") {
            println!("{TEST_NAME}: test");
        }
        return;
    }
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let selected = !args.iter().any(|a| a == "--ignored")
        && (filters.is_empty() || filters.iter().any(|f| TEST_NAME.contains(f.as_str())));
    if !selected {
        println!("\nrunning 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out\n");
        return;
    }
    println!("\nrunning 1 test");
    let start = Instant::now();
    if need_hugepages(2048, 16) {
        std_collections_live_in_hugepages_once_installed();
    }
    println!("test {TEST_NAME} ... ok");
    println!(
        "\ntest result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in {:.2}s\n",
        start.elapsed().as_secs_f64()
    );
}

fn std_collections_live_in_hugepages_once_installed() {
    let _pool = pool_lock(true);
    let before = free_2m();
    let rt = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env(CHILD_ENV, rt.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let child_pid = child.id();
    // A deadlock in the allocator would hang the child: give it a minute.
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the child hung (deadlock?):\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("child: all checks passed"),
        "child did not run the checks:\n{stdout}\n{stderr}"
    );
    assert_eq!(
        free_2m(),
        before,
        "the leaked instance's hugepages went back when the child exited"
    );
    // memfd backing: no file in any hugetlbfs mount carries our prefix.
    let prefix = format!("ga_{child_pid}");
    if let Ok(rd) = std::fs::read_dir("/dev/hugepages") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with(&prefix), "left over: {name}");
        }
    }
    let dir = rt.path().to_path_buf();
    rt.close().unwrap();
    assert!(!dir.exists(), "the runtime dir is removed");
}

fn allocs(mem: &Memory) -> u64 {
    mem.heap_stats(0).unwrap().alloc_count
}

/// The work, in the child process.
#[allow(clippy::too_many_lines)]
fn child(runtime_dir: &str) {
    assert!(HUGE.memory().is_none());
    let early: Vec<u64> = (0..1000).collect();
    assert!(!HUGE.owns(early.as_ptr().cast()));

    let prefix = format!("ga_{}", std::process::id());
    let opts =
        MemOptions::parse_args(&["--file-prefix", &prefix, "--runtime-dir", runtime_dir]).unwrap();
    let mem: &'static Memory = Box::leak(Box::new(Memory::init(&opts).unwrap()));
    HUGE.install(mem).unwrap();
    HUGE.install(mem).unwrap(); // the same instance again: fine
    assert!(std::ptr::eq(HUGE.memory().unwrap(), mem));
    let base = allocs(mem);

    // std collections land in the reservation.
    let mut v: Vec<u64> = (0..200_000).collect();
    let s = String::from("a string in a hugepage");
    let mut map: HashMap<String, Vec<u8>> = HashMap::new();
    for i in 0..10_000 {
        map.insert(format!("key {i}"), vec![i as u8; 100]);
    }
    let boxed = Box::new([7u8; 4096]);
    for p in [
        v.as_ptr().cast::<u8>(),
        s.as_ptr(),
        map.get("key 9999").unwrap().as_ptr(),
        map.keys().next().unwrap().as_ptr(),
        boxed.as_ptr(),
    ] {
        assert!(HUGE.owns(p), "{p:p} is not in the reservation");
        assert!((p as usize).wrapping_sub(mem.base_va()) < mem.va_len());
    }
    assert!(allocs(mem) >= base + 20_000, "{} blocks", allocs(mem));
    mem.heap_validate().unwrap();

    // Growth reallocates inside the heap; contents are kept.
    let old = v.as_ptr();
    v.extend(200_000..1_000_000);
    assert!(HUGE.owns(v.as_ptr().cast()));
    assert_ne!(old, v.as_ptr());
    assert!(v.iter().copied().eq(0..1_000_000));

    // A pointer made before install still goes back to the system, and
    // grows there.
    let mut early = early;
    early.extend(0..100_000);
    assert!(!HUGE.owns(early.as_ptr().cast()));
    drop(early);

    // Large alignment through the raw API.
    let layout = Layout::from_size_align(10_000, 1 << 16).unwrap();
    // SAFETY: a non-zero-sized layout; freed below with the same layout.
    let p = unsafe { std::alloc::alloc_zeroed(layout) };
    assert!(!p.is_null() && HUGE.owns(p));
    assert_eq!(p as usize % (1 << 16), 0);
    // SAFETY: the block holds 10 000 bytes.
    assert!(unsafe { std::slice::from_raw_parts(p, 10_000) }
        .iter()
        .all(|&b| b == 0));
    // SAFETY: allocated above with `layout`.
    unsafe { std::alloc::dealloc(p, layout) };

    // Heap calls on the installed instance allocate under the heap lock
    // (element lists, dumps, the out-of-memory explanation): the allocator
    // sees the lock held and uses the system allocator instead of waiting.
    let elems = mem.heap_elements(0).unwrap();
    assert!(elems.len() as u64 >= allocs(mem));
    let mut dump = Vec::new();
    mem.heap_dump(&mut dump, false).unwrap();
    assert!(String::from_utf8_lossy(&dump).contains("socket_0"));
    assert!(mem.malloc(1 << 50, 0).is_err());
    drop((elems, dump));

    // Inside bypass, allocations go to the system.
    let sys = HugepageGlobalAlloc::bypass(|| vec![1u8; 1000]);
    assert!(!HUGE.owns(sys.as_ptr()));
    drop(sys);

    // Everything freed: back to where we started.
    drop((v, s, map, boxed));
    assert_eq!(allocs(mem), base);
    assert_eq!(HUGE.pending_frees(), 0);
    mem.heap_validate().unwrap();

    // A memory event callback that allocates, fired while the heap grows
    // for a global allocation: its allocation goes to the system (the
    // thread holds the hotplug lock), no deadlock. Registering changes the
    // callback registry: done inside bypass, as documented.
    // (No panic inside the callback: it runs inside the allocator.)
    let seen = Arc::new(AtomicUsize::new(0));
    let in_heap = Arc::new(AtomicUsize::new(0));
    let (seen2, in_heap2) = (Arc::clone(&seen), Arc::clone(&in_heap));
    HugepageGlobalAlloc::bypass(|| {
        mem.register_event_callback("ga-test", move |e| {
            let note = format!("{:?} {:#x}", e.kind, e.addr);
            if HUGE.owns(note.as_ptr()) {
                in_heap2.fetch_add(1, Ordering::SeqCst);
            }
            seen2.fetch_add(1, Ordering::SeqCst);
        })
    })
    .unwrap();
    let big = vec![3u8; 16 << 20];
    assert!(HUGE.owns(big.as_ptr()));
    assert!(seen.load(Ordering::SeqCst) >= 1, "the heap grew");
    assert_eq!(in_heap.load(Ordering::SeqCst), 0);
    drop(big);
    HugepageGlobalAlloc::bypass(|| mem.unregister_event_callback("ga-test")).unwrap();

    // Threads allocating at once: some allocations may go to the system
    // while another thread holds the heap lock; all are freed correctly.
    let (heap0, sys0) = HUGE.counts();
    std::thread::scope(|sc| {
        for t in 0..4u64 {
            sc.spawn(move || {
                let mut keep = Vec::new();
                for i in 0..20_000u64 {
                    let mut x = vec![t; (i % 50) as usize + 1];
                    x.push(i);
                    if i % 7 == 0 {
                        keep.push(x);
                    }
                    if keep.len() > 100 {
                        keep.clear();
                    }
                }
            });
        }
    });
    let (heap1, sys1) = HUGE.counts();
    assert!(heap1 > heap0);
    let touch = vec![0u8; 10]; // drains frees left pending by the threads
    drop(touch);
    assert_eq!(HUGE.pending_frees(), 0);
    mem.heap_validate().unwrap();

    // Another instance cannot be installed.
    let other_rt = tempfile::tempdir().unwrap();
    let other_prefix = format!("ga2_{}", std::process::id());
    let o2 = MemOptions::parse_args(&[
        "--file-prefix",
        &other_prefix,
        "--runtime-dir",
        &other_rt.path().display().to_string(),
    ])
    .unwrap();
    let other: &'static Memory = Box::leak(Box::new(Memory::init(&o2).unwrap()));
    assert!(matches!(
        HUGE.install(other),
        Err(InstallError::AlreadyInstalled { .. })
    ));

    println!(
        "child: all checks passed ({} heap and {} system allocations by the threads)",
        heap1 - heap0,
        sys1 - sys0
    );
}
