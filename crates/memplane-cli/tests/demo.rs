//! `memplane demo` run the way a user runs it: short runs on hugepages and
//! without, Ctrl-C, a SIGKILLed primary, and bad flags. Every run must
//! leave the hugepage pools and the hugetlbfs mounts as they were.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn free_of(size_kb: u64) -> u64 {
    std::fs::read_to_string(format!(
        "/sys/kernel/mm/hugepages/hugepages-{size_kb}kB/free_hugepages"
    ))
    .map_or(0, |t| t.trim().parse().unwrap())
}

/// Free pages of every size.
fn free_counts() -> (u64, u64) {
    (free_of(2048), free_of(1_048_576))
}

/// Exclusive hold on the machine-wide test pool lock: these tests assert
/// that free page counts come back exactly.
fn pool_lock() -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("memplane-test-pool.lock"))
        .unwrap();
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive).unwrap();
    f
}

/// Skips (printing why) off CI; fails under CI=true.
fn need_hugepages(pages: u64) -> bool {
    let free = free_of(2048);
    let ok = free >= pages;
    assert!(
        ok || std::env::var("CI").as_deref() != Ok("true"),
        "CI=true and this test needs {pages} free 2 MiB hugepages, found {free}"
    );
    if !ok {
        eprintln!(
            "SKIPPED: needs {pages} free 2 MiB hugepages, found {free}; \
             reserve them with: memplane hugepages reserve 2M={pages} (as root)"
        );
    }
    ok
}

/// Files whose names start with `prefix` in any hugetlbfs mount.
fn files_with_prefix(prefix: &str) -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mut out = Vec::new();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 2 && f[2] == "hugetlbfs" {
            for e in std::fs::read_dir(f[1]).into_iter().flatten().flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if n.starts_with(prefix) {
                    out.push(format!("{}/{n}", f[1]));
                }
            }
        }
    }
    out
}

struct Run {
    prefix: String,
    rundir: tempfile::TempDir,
}

impl Run {
    fn new(tag: &str) -> Run {
        Run {
            prefix: format!("demo{tag}{}", std::process::id()),
            rundir: tempfile::tempdir().unwrap(),
        }
    }

    fn command(&self, extra: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_memplane"));
        c.arg("demo")
            .args(extra)
            .args(["--file-prefix", &self.prefix, "--runtime-dir"])
            .arg(self.rundir.path());
        c
    }

    fn output(&self, extra: &[&str]) -> (Output, String) {
        let o = self.command(extra).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o, text)
    }

    /// Starts a long run in its own process group (as a shell job would
    /// be) and waits for the secondary to attach; returns the child, its
    /// output so far, and the secondary's pid.
    fn start_long(&self) -> (Child, std::sync::mpsc::Receiver<String>, u32) {
        use std::os::unix::process::CommandExt as _;
        let mut child = self
            .command(&["--duration", "60"])
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let t = Instant::now();
        let secondary = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("the demo printed its attach line");
            if let Some(rest) = line.strip_prefix("secondary: pid ") {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
            assert!(t.elapsed() < Duration::from_secs(30));
        };
        // Let some packets flow: wait for a progress line.
        let _ = rx.recv_timeout(Duration::from_secs(10));
        (child, rx, secondary)
    }
}

fn alive(pid: u32) -> bool {
    // Zombies count as gone: init reaps them.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

/// Waits until the free counts are back to `before` (the kernel returns
/// memfd pages when the last mapping goes), at most `d`.
fn pages_come_back(before: (u64, u64), d: Duration) -> (u64, u64) {
    let t = Instant::now();
    loop {
        let now = free_counts();
        if now == before || t.elapsed() > d {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn demo_on_hugepages_returns_every_packet_and_page() {
    if !need_hugepages(24) {
        return;
    }
    let _lock = pool_lock();
    let before = free_counts();
    let run = Run::new("huge");
    let (o, text) = run.output(&["--duration", "1"]);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("all packets intact:"), "{text}");
    assert!(
        text.contains("hugetlb memfd"),
        "memory source named: {text}"
    );
    assert!(
        text.contains("--- memory map ---") && text.contains("demo_pkts"),
        "{text}"
    );
    assert!(
        text.contains("rings:") && text.contains("demo_to_sec"),
        "{text}"
    );
    assert!(
        !text.contains("--no-huge"),
        "no fallback with hugepages free: {text}"
    );
    // The numbers add up: sent == returned == what the secondary checked.
    let result = text
        .lines()
        .find(|l| l.starts_with("result: "))
        .expect("result line");
    let returned: u64 = result["result: ".len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(returned > 1000, "{result}");
    assert!(
        text.contains(&format!(
            "secondary: {returned} packets checked and rewritten, 0 bad"
        )),
        "{text}"
    );
    assert_eq!(pages_come_back(before, Duration::from_secs(5)), before);
    assert!(files_with_prefix(&run.prefix).is_empty());
}

#[test]
fn demo_without_hugepages_when_asked() {
    let run = Run::new("nohuge");
    let (o, text) = run.output(&["--duration", "0.5", "--no-huge", "--packet-size", "1000"]);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("anonymous memfd"), "{text}");
    assert!(text.contains("1000-byte packets"), "{text}");
    assert!(text.contains("all packets intact:"), "{text}");
}

#[test]
fn demo_with_huge_dir_uses_one_file_per_memory_type_and_removes_it() {
    let mounted = std::fs::read_to_string("/proc/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| {
            l.split_whitespace().nth(1) == Some("/dev/hugepages") && l.contains(" hugetlbfs ")
        });
    if !need_hugepages(24) {
        return;
    }
    assert!(
        mounted || std::env::var("CI").as_deref() != Ok("true"),
        "CI=true and no hugetlbfs is mounted at /dev/hugepages"
    );
    if !mounted {
        eprintln!("SKIPPED: no hugetlbfs mounted at /dev/hugepages (memplane hugepages mount)");
        return;
    }
    let _lock = pool_lock();
    let before = free_counts();
    let run = Run::new("hugedir");
    let (o, text) = run.output(&["--duration", "0.3", "--huge-dir", "/dev/hugepages"]);
    assert!(o.status.success(), "{text}");
    assert!(text.contains("adding --single-file-segments"), "{text}");
    assert!(text.contains("hugetlbfs file per list"), "{text}");
    assert!(text.contains("all packets intact:"), "{text}");
    assert!(text.contains("its hugetlbfs files removed"), "{text}");
    assert!(files_with_prefix(&run.prefix).is_empty());
    assert_eq!(pages_come_back(before, Duration::from_secs(5)), before);
}

#[test]
fn demo_falls_back_to_no_huge_with_one_line_when_hugepages_are_short() {
    // A sysfs tree where the hugepage pools are empty; the rest of the
    // machine (CPUs, nodes) as it is.
    let sys = tempfile::tempdir().unwrap();
    let real = std::path::Path::new("/sys");
    for dir in ["devices/system/node", "devices/system/cpu"] {
        let to = sys.path().join(dir);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(real.join(dir), &to).unwrap();
    }
    for kb in [2048, 1_048_576] {
        let d = sys
            .path()
            .join(format!("kernel/mm/hugepages/hugepages-{kb}kB"));
        std::fs::create_dir_all(&d).unwrap();
        for f in [
            "nr_hugepages",
            "free_hugepages",
            "resv_hugepages",
            "surplus_hugepages",
            "nr_overcommit_hugepages",
        ] {
            std::fs::write(d.join(f), "0\n").unwrap();
        }
    }
    let run = Run::new("fallback");
    let o = run
        .command(&["--duration", "0.3"])
        .env("MEMPLANE_SYS_ROOT", sys.path())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(o.status.success(), "{text}");
    let fallback: Vec<&str> = text.lines().filter(|l| l.contains("--no-huge")).collect();
    assert_eq!(fallback.len(), 1, "one line says why: {text}");
    assert!(
        fallback[0].contains("0 free 2 MiB pages") && fallback[0].contains("hugepages reserve"),
        "{}",
        fallback[0]
    );
    assert!(text.contains("all packets intact:"), "{text}");
}

#[test]
fn demo_ctrl_c_drains_checks_and_cleans_up() {
    if !need_hugepages(24) {
        return;
    }
    let _lock = pool_lock();
    let before = free_counts();
    let run = Run::new("int");
    let (mut child, rx, secondary) = run.start_long();
    // `memplane info` attaches to the running demo as a third process.
    let o = Command::new(env!("CARGO_BIN_EXE_memplane"))
        .args([
            "info",
            "--json",
            "--file-prefix",
            &run.prefix,
            "--runtime-dir",
        ])
        .arg(run.rundir.path())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["primary_pid"], child.id());
    let rings: Vec<&str> = v["rings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(
        rings.contains(&"demo_to_sec") && rings.contains(&"demo_to_pri"),
        "{v}"
    );
    // Ctrl-C reaches the whole foreground process group: both processes.
    rustix::process::kill_process_group(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::INT,
    )
    .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the demo did not stop"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let text: Vec<String> = rx.try_iter().collect();
    let text = text.join("\n");
    assert_eq!(status.code(), Some(130), "{text}");
    assert!(text.contains("interrupted (signal 2)"), "{text}");
    assert!(text.contains("all packets intact:"), "{text}");
    assert!(!alive(secondary));
    assert_eq!(pages_come_back(before, Duration::from_secs(5)), before);
    assert!(files_with_prefix(&run.prefix).is_empty());
}

#[test]
fn demo_secondary_exits_when_the_primary_is_killed() {
    if !need_hugepages(24) {
        return;
    }
    let _lock = pool_lock();
    let before = free_counts();
    let run = Run::new("kill");
    let (mut child, _rx, secondary) = run.start_long();
    assert!(alive(secondary));
    child.kill().unwrap(); // SIGKILL: no clean-up code runs in the primary
    child.wait().unwrap();
    let t = Instant::now();
    while alive(secondary) {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the secondary {secondary} did not notice its primary died"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The kernel takes everything back: no pages held, no files left.
    assert_eq!(pages_come_back(before, Duration::from_secs(5)), before);
    assert!(files_with_prefix(&run.prefix).is_empty());
}

#[test]
fn demo_refuses_bad_flags_before_touching_memory() {
    let run = Run::new("bad");
    for (args, want) in [
        (&["--burst", "0"][..], "--burst"),
        (&["--packet-size", "9000"], "--packet-size"),
        (&["--duration", "soon"], "--duration"),
        (&["--socket-mem", "x"], "--socket-mem"),
    ] {
        let (o, text) = run.output(args);
        assert!(!o.status.success(), "{args:?}: {text}");
        assert!(text.contains(want), "{args:?}: {text}");
        assert!(!text.contains("secondary:"), "{args:?}: {text}");
    }
}
