//! Primary and secondary processes on real hugepages. The test binary
//! re-executes itself as the secondary (`MP_CHILD_ROLE` selects what it
//! does); the two sides talk over the child's stdin/stdout, one line per
//! step.

// Zones are 64-byte aligned: u64 reads and writes at their start are fine.
#![allow(clippy::cast_ptr_alignment)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memplane::heap::SOCKET_ID_ANY;
use memplane::memseg::{MemEvent, MemEventKind, PageRequest};
use memplane::memzone::MemzoneFlags;
use memplane::mp::MpError;
use memplane::{Error, MemOptions, Memory, PageSize};

use common::{need_hugepages, pool_lock};

const ROLE: &str = "MP_CHILD_ROLE";
const PREFIX: &str = "MP_CHILD_PREFIX";
const RUNDIR: &str = "MP_CHILD_RUNDIR";
const MB: usize = 1 << 20;

fn opts(prefix: &str, rundir: &str, extra: &[&str]) -> MemOptions {
    let mut args = vec!["--file-prefix", prefix, "--runtime-dir", rundir];
    args.extend_from_slice(extra);
    MemOptions::parse_args(&args).unwrap()
}

/// A secondary child process and the line channel to it.
struct Secondary {
    child: Child,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
}

impl Secondary {
    fn spawn(role: &str, prefix: &str, rundir: &str) -> Secondary {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "secondary_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE, role)
            .env(PREFIX, prefix)
            .env(RUNDIR, rundir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let to = child.stdin.take().unwrap();
        let from = BufReader::new(child.stdout.take().unwrap());
        Secondary { child, to, from }
    }

    /// The next line the child printed that starts with "@" (the test
    /// harness prints its own lines too).
    fn expect(&mut self, want: &str) -> String {
        let mut line = String::new();
        let mut other = String::new();
        loop {
            line.clear();
            let n = self.from.read_line(&mut line).unwrap();
            if n == 0 {
                let st = self.child.wait().unwrap();
                panic!("secondary exited ({st}) before saying {want:?}; its output:\n{other}");
            }
            other.push_str(&line);
            // The harness may print "test secondary_child ... " first.
            if let Some(msg) = line.trim().split_once('@').map(|(_, m)| m) {
                assert!(
                    msg.starts_with(want),
                    "secondary said {msg:?}, expected {want:?}"
                );
                return msg.to_string();
            }
        }
    }

    fn say(&mut self, what: &str) {
        writeln!(self.to, "{what}").unwrap();
        self.to.flush().unwrap();
    }

    fn wait_ok(mut self) {
        let st = self.child.wait().unwrap();
        assert!(st.success(), "secondary failed: {st}");
    }
}

impl Drop for Secondary {
    fn drop(&mut self) {
        // A failed test must not leave a child holding hugepages.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Child side: prints `@...` lines, reads commands from stdin.
fn tell(what: &str) {
    println!("\n@{what}");
    std::io::stdout().flush().unwrap();
}

fn hear() -> String {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    line.trim().to_string()
}

#[test]
fn secondary_child() {
    let Ok(role) = std::env::var(ROLE) else {
        return; // not a child: nothing to do
    };
    let prefix = std::env::var(PREFIX).unwrap();
    let rundir = std::env::var(RUNDIR).unwrap();
    match role.as_str() {
        "share" => child_share(&prefix, &rundir),
        "events" => child_events(&prefix, &rundir),
        "churn" => child_churn(&prefix, &rundir),
        "primary" => {
            // Far from the default base: the test process attaches to it
            // while other tests' primaries sit at the default.
            let mem = Memory::init(&opts(
                &prefix,
                &rundir,
                &["--base-virtaddr", "0x600000000000"],
            ))
            .unwrap();
            let z = mem
                .memzone_reserve("p", 4096, 0, MemzoneFlags::NONE)
                .unwrap();
            // SAFETY: our zone.
            unsafe { z.as_mut_ptr().write(42) };
            tell("ready");
            let _ = hear(); // killed before anything comes
            drop(mem);
        }
        "auto" => {
            let mem = Memory::init(&opts(&prefix, &rundir, &["--proc-type", "auto"])).unwrap();
            assert!(mem.is_secondary());
            tell(&format!("auto {}", mem.memzone_count()));
        }
        "idle" => {
            let mem = Memory::init(&opts(&prefix, &rundir, &["--proc-type", "secondary"])).unwrap();
            tell("ready");
            let _ = hear();
            drop(mem);
        }
        other => panic!("unknown role {other}"),
    }
}

fn child_share(prefix: &str, rundir: &str) {
    let mem = Memory::init(&opts(prefix, rundir, &["--proc-type", "secondary"])).unwrap();
    assert!(mem.is_secondary());
    // The primary's zone and its contents.
    let z = mem.memzone_lookup("from-primary").expect("primary's zone");
    // SAFETY: the primary wrote it before starting us and does not touch it.
    let bytes = unsafe { z.as_slice() };
    assert!(bytes.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    // Heap growth from here: the primary maps the pages for everybody.
    let p = mem.malloc(8 * MB, 0).unwrap();
    // SAFETY: our fresh block.
    unsafe { std::ptr::write_bytes(p.as_ptr(), 0x5c, 8 * MB) };
    let z2 = mem
        .memzone_reserve("from-secondary", 64, SOCKET_ID_ANY, MemzoneFlags::NONE)
        .unwrap();
    // SAFETY: our zone.
    unsafe { z2.as_mut_ptr().cast::<u64>().write(p.as_ptr() as u64) };
    mem.heap_validate().unwrap();
    tell("done");
    // Wait until the primary looked, then free the block here: the heap
    // gives pages back through the primary.
    assert_eq!(hear(), "free");
    // SAFETY: our block, not used after.
    unsafe { mem.free(p).unwrap() };
    mem.heap_validate().unwrap();
    tell("freed");
}

fn child_events(prefix: &str, rundir: &str) {
    let mem = Memory::init(&opts(prefix, rundir, &["--proc-type", "secondary"])).unwrap();
    let seen = Arc::new(Mutex::new(Vec::<MemEvent>::new()));
    let s = Arc::clone(&seen);
    mem.register_event_callback("rec", move |e| s.lock().unwrap().push(*e))
        .unwrap();
    tell("ready");
    // The primary maps 4 pages, writes them, then frees them.
    let va: usize = hear().parse().unwrap();
    // Mapped here already: read what the primary wrote.
    // SAFETY: the primary mapped and filled these pages and waits for us.
    let v = unsafe { std::ptr::read_volatile(va as *const u64) };
    assert_eq!(v, 0xfeed_f00d);
    tell("read");
    assert_eq!(hear(), "check");
    let evs = seen.lock().unwrap().clone();
    let kinds: Vec<(MemEventKind, usize, usize)> =
        evs.iter().map(|e| (e.kind, e.addr, e.len)).collect();
    tell(&format!("events {kinds:?}"));
    assert_eq!(
        kinds,
        vec![
            (MemEventKind::Alloc, va, 8 * MB),
            (MemEventKind::Free, va, 8 * MB)
        ]
    );
}

/// Allocates, frees, reserves and frees zones forever (until killed).
fn child_churn(prefix: &str, rundir: &str) {
    let mem = Memory::init(&opts(prefix, rundir, &["--proc-type", "secondary"])).unwrap();
    let me = std::process::id();
    let mut live = Vec::new();
    let mut zones = Vec::new();
    let mut seed = u64::from(me) | 1;
    for i in 0u64.. {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let size = match seed % 16 {
            0 => 3 * MB,
            1..=4 => 64 << (seed % 12),
            _ => 64 + (seed % 2000) as usize,
        };
        if let Ok(p) = mem.malloc(size, 0) {
            // SAFETY: our fresh block.
            unsafe { std::ptr::write_bytes(p.as_ptr(), 0xa5, size.min(4096)) };
            live.push(p);
        }
        if live.len() > 64 || seed % 3 == 0 {
            if let Some(p) = live.pop() {
                // SAFETY: our block, not used after.
                unsafe { mem.free(p).unwrap() };
            }
        }
        if seed % 5 == 0 {
            if let Ok(z) = mem.memzone_reserve(
                &format!("churn-{me}-{i}"),
                64 + (seed % 5000) as usize,
                SOCKET_ID_ANY,
                MemzoneFlags::NONE,
            ) {
                zones.push(z);
            }
        }
        if zones.len() > 8 {
            zones.remove(0).free().unwrap();
        }
        if i == 50 {
            tell("ready");
        }
    }
}

fn setup(tag: &str) -> (String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (format!("mp_{tag}_{}", std::process::id()), dir)
}

#[test]
fn secondary_sees_zones_allocates_through_the_primary_and_frees() {
    if !need_hugepages(2048, 16) {
        return;
    }
    let _pool = pool_lock(false);
    let (prefix, dir) = setup("share");
    let rundir = dir.path().to_str().unwrap().to_string();
    let mem = Memory::init(&opts(&prefix, &rundir, &[])).unwrap();
    let z = mem
        .memzone_reserve("from-primary", 100_000, 0, MemzoneFlags::NONE)
        .unwrap();
    // SAFETY: our fresh zone.
    let bytes = unsafe { z.as_mut_slice() };
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let total_before = mem.heap_stats(0).unwrap().total_bytes;
    let mut sec = Secondary::spawn("share", &prefix, &rundir);
    sec.expect("done");
    // The secondary's block: allocated there, visible here.
    let zs = mem.memzone_lookup("from-secondary").unwrap();
    // SAFETY: the secondary wrote the address and waits.
    let addr = unsafe { zs.as_ptr().cast::<u64>().read() } as usize;
    // SAFETY: the block is 8 MiB, mapped here by the primary's growth.
    let block = unsafe { std::slice::from_raw_parts(addr as *const u8, 8 * MB) };
    assert!(block.iter().all(|&b| b == 0x5c));
    assert!(mem.heap_stats(0).unwrap().total_bytes >= total_before + 8 * MB as u64);
    sec.say("free");
    sec.expect("freed");
    sec.wait_ok();
    mem.heap_validate().unwrap();
    // The secondary's zone may sit in the last page its block needed.
    zs.free().unwrap();
    mem.heap_cache_flush();
    assert_eq!(
        mem.heap_stats(0).unwrap().total_bytes,
        total_before,
        "the pages the secondary's block needed went back"
    );
    z.free().unwrap();
}

#[test]
fn secondary_follows_page_changes_with_events_in_order() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(false);
    let (prefix, dir) = setup("ev");
    let rundir = dir.path().to_str().unwrap().to_string();
    let mem = Memory::init(&opts(&prefix, &rundir, &[])).unwrap();
    let mut sec = Secondary::spawn("events", &prefix, &rundir);
    sec.expect("ready");
    let runs = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 4))
        .unwrap();
    let run = runs[0];
    // SAFETY: our fresh pages.
    unsafe { (run.va as *mut u64).write_volatile(0xfeed_f00d) };
    sec.say(&run.va.to_string());
    sec.expect("read");
    mem.free_pages(run.va, run.len).unwrap();
    sec.say("check");
    let got = sec.expect("events");
    eprintln!("secondary saw: {got}");
    sec.wait_ok();
}

#[test]
fn auto_becomes_secondary_and_a_killed_secondary_does_not_wedge_the_primary() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(false);
    let (prefix, dir) = setup("kill");
    let rundir = dir.path().to_str().unwrap().to_string();
    let mem = Memory::init(&opts(&prefix, &rundir, &[])).unwrap();
    let z = mem.memzone_reserve("z", 64, 0, MemzoneFlags::NONE).unwrap();
    let mut auto = Secondary::spawn("auto", &prefix, &rundir);
    assert_eq!(auto.expect("auto"), "auto 1");
    auto.wait_ok();
    // A secondary killed while attached: the next page change skips it.
    let mut idle = Secondary::spawn("idle", &prefix, &rundir);
    idle.expect("ready");
    idle.child.kill().unwrap();
    idle.child.wait().unwrap();
    let t = Instant::now();
    let runs = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 1))
        .unwrap();
    mem.free_pages(runs[0].va, runs[0].len).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "a dead secondary held up the primary for {:?}",
        t.elapsed()
    );
    z.free().unwrap();
    mem.heap_validate().unwrap();
}

#[test]
fn attach_errors_name_the_problem() {
    if !need_hugepages(2048, 4) {
        return;
    }
    let _pool = pool_lock(false);
    let (prefix, dir) = setup("err");
    let rundir = dir.path().to_str().unwrap().to_string();
    // No primary.
    let e = Memory::init(&opts(&prefix, &rundir, &["--proc-type", "secondary"])).unwrap_err();
    assert!(matches!(e, Error::Mp(MpError::NoPrimary { .. })), "{e}");
    assert!(e.to_string().contains("start the primary first"), "{e}");
    let mem = Memory::init(&opts(&prefix, &rundir, &[])).unwrap();
    // Options that must agree.
    let e = Memory::init(&opts(
        &prefix,
        &rundir,
        &["--proc-type", "secondary", "--single-file-segments"],
    ))
    .unwrap_err();
    assert!(matches!(e, Error::Mp(MpError::Refused { .. })), "{e}");
    assert!(
        e.to_string().contains("--single-file-segments") && e.to_string().contains("primary"),
        "{e}"
    );
    // In this very process the primary's range is taken (by the primary):
    // the error names the mapping and a base that is free.
    let e = Memory::init(&opts(&prefix, &rundir, &["--proc-type", "secondary"])).unwrap_err();
    match &e {
        Error::Mp(MpError::VaConflict { base, suggest, .. }) => {
            assert_eq!(*base, mem.base_va());
            assert_ne!(suggest, base);
            assert!(e.to_string().contains("--base-virtaddr"), "{e}");
        }
        other => panic!("expected a VA conflict, got {other}"),
    }
    drop(mem);
}

#[test]
fn secondaries_killed_at_random_moments_leave_a_working_primary() {
    if !need_hugepages(2048, 64) {
        return;
    }
    let _pool = pool_lock(true);
    let free_before = common::real_counter(2048, "free_hugepages");
    let (prefix, dir) = setup("churn");
    let rundir = dir.path().to_str().unwrap().to_string();
    let rounds: u64 = std::env::var("MP_KILL_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    {
        let mem = Arc::new(Memory::init(&opts(&prefix, &rundir, &[])).unwrap());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // The primary keeps allocating and freeing meanwhile.
        let worker = {
            let (mem, stop) = (Arc::clone(&mem), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let p = mem.malloc(1000 + (n % 300_000) as usize, 0).unwrap();
                    let z = mem
                        .memzone_reserve(&format!("prim-{}", n % 4), 256, 0, MemzoneFlags::NONE)
                        .unwrap();
                    // SAFETY: our block, not used after.
                    unsafe { mem.free(p).unwrap() };
                    z.free().unwrap();
                    n += 1;
                }
                n
            })
        };
        let mut seed = 0x1234_5678_u64;
        let t = Instant::now();
        for round in 0..rounds {
            eprintln!("round {round}: spawn at {:?}", t.elapsed());
            let mut child = Secondary::spawn("churn", &prefix, &rundir);
            child.expect("ready");
            eprintln!("round {round}: ready at {:?}", t.elapsed());
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            std::thread::sleep(Duration::from_micros(seed % 20_000));
            child.child.kill().unwrap();
            child.child.wait().unwrap();
            eprintln!("round {round}: killed at {:?}", t.elapsed());
            let r = Instant::now();
            let p = mem.malloc(5 * MB, 0).unwrap();
            // SAFETY: our block.
            unsafe { mem.free(p).unwrap() };
            mem.heap_trim();
            mem.heap_validate()
                .unwrap_or_else(|e| panic!("round {round}: heap invalid after a kill: {e}"));
            eprintln!("round {round}: primary ok after {:?}", r.elapsed());
            assert!(
                r.elapsed() < Duration::from_secs(8),
                "round {round}: the primary needed {:?} after the kill",
                r.elapsed()
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let n = worker.join().unwrap();
        eprintln!(
            "{rounds} kills in {:?}; the primary's worker did {n} rounds meanwhile",
            t.elapsed()
        );
        // Zones of the dead stay (zones outlive their creator) until freed.
        let mut freed = 0;
        mem.memzone_walk(|z| {
            if z.name.starts_with("churn-") {
                freed += 1;
            }
        });
        for z in mem.memzones() {
            if z.name.starts_with("churn-") {
                mem.memzone_lookup(&z.name).unwrap().free().unwrap();
            }
        }
        eprintln!("{freed} zones of killed secondaries freed");
        mem.heap_validate().unwrap();
        let mem = Arc::try_unwrap(mem).unwrap();
        drop(mem);
    }
    assert_eq!(
        common::real_counter(2048, "free_hugepages"),
        free_before,
        "hugepages lost after the kills"
    );
}

#[test]
fn a_dead_primary_fails_the_secondarys_next_page_request_cleanly() {
    if !need_hugepages(2048, 8) {
        return;
    }
    let _pool = pool_lock(false);
    let (prefix, dir) = setup("deadp");
    let rundir = dir.path().to_str().unwrap().to_string();
    let mut primary = Secondary::spawn("primary", &prefix, &rundir);
    primary.expect("ready");
    let mem = Memory::init(&opts(&prefix, &rundir, &["--proc-type", "secondary"])).unwrap();
    let z = mem.memzone_lookup("p").unwrap();
    primary.child.kill().unwrap();
    primary.child.wait().unwrap();
    // What is mapped stays readable.
    // SAFETY: the zone's page stays mapped in this process.
    assert_eq!(unsafe { z.as_ptr().read() }, 42);
    let t = Instant::now();
    let e = mem.malloc(64 * MB, 0).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "took {:?}",
        t.elapsed()
    );
    assert!(e.to_string().contains("is gone or not answering"), "{e}");
    let e = mem
        .alloc_pages(&PageRequest::new(0, PageSize::SIZE_2M, 1))
        .unwrap_err();
    assert!(matches!(e, Error::Mp(MpError::PrimaryGone { .. })), "{e}");
    drop(mem);
}
