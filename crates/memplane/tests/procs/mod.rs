//! Real child processes for multi-process tests.
//!
//! A test binary spawns itself: `<exe> <test name> --exact` with
//! [`ROLE_ENV`] set, and the named test acts out the role when it sees the
//! variable (and returns at once in a normal run). A child that must stay
//! alive prints [`READY`] and waits until its stdin closes, so it also exits
//! if the parent dies without killing it.

#![allow(dead_code)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Selects a child's role; unset in a normal test run.
pub const ROLE_ENV: &str = "MEMPLANE_TEST_ROLE";
/// Printed by a child once it is in the state the parent waits for.
pub const READY: &str = "MEMPLANE-CHILD-READY";
/// Printed by a one-shot child before its result.
pub const RESULT: &str = "MEMPLANE-CHILD-RESULT:";

/// The role this process was started for, if any.
pub fn role() -> Option<String> {
    std::env::var(ROLE_ENV).ok()
}

/// The command that runs test `test` of this binary as a child with `role`.
pub fn self_command(test: &str, role: &str) -> Command {
    let exe = std::env::current_exe().expect("current_exe");
    let mut cmd = Command::new(exe);
    cmd.args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, role);
    cmd
}

/// A long-lived child; killed (SIGKILL) and reaped on drop.
pub struct Child {
    child: std::process::Child,
    /// Its pid.
    pub pid: u32,
}

/// How long a child may take to get ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

impl Child {
    /// Starts `cmd` and waits until it prints [`READY`]; panics with its
    /// output if it exits first or takes longer than a minute.
    pub fn start(mut cmd: Command) -> Child {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        // The reader keeps draining the pipe after READY, so the child never
        // blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut seen = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                // libtest may print "test <name> ... " on the same line.
                Ok(line) if line.contains(READY) => break,
                Ok(line) => {
                    seen.push_str(&line);
                    seen.push('\n');
                }
                Err(e) => {
                    let _ = child.kill();
                    let status = child.wait().expect("wait");
                    panic!("child {pid} not ready ({e:?}, {status}); output:\n{seen}");
                }
            }
        }
        Child { child, pid }
    }

    /// SIGKILLs the child and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
    }
}

/// In a child: tells the parent it is ready, then waits until the parent
/// kills it or closes its stdin, and exits.
pub fn ready_and_wait() -> ! {
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n{READY}").expect("write READY");
    out.flush().expect("flush");
    drop(out);
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    std::process::exit(0);
}

/// In a one-shot child: prints the result line and exits successfully.
pub fn report_and_exit(result: &str) -> ! {
    let mut out = std::io::stdout().lock();
    writeln!(out, "\n{RESULT}{result}").expect("write result");
    out.flush().expect("flush");
    std::process::exit(0);
}

/// Runs a one-shot child to completion and returns what it reported with
/// [`report_and_exit`]; panics with its output if it reported nothing.
pub fn run_for_result(mut cmd: Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect("run child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    for line in stdout.lines() {
        if let Some(at) = line.find(RESULT) {
            return line[at + RESULT.len()..].to_string();
        }
    }
    panic!(
        "child reported no result ({}); stdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs test `test` of this binary as `role` inside a private mount
/// namespace (`unshare --mount --propagation private`), so mounts it makes
/// are invisible to everything else and vanish when it exits. Panics with
/// the child's output if it fails.
pub fn run_in_mount_namespace(test: &str, role: &str) {
    let exe = std::env::current_exe().expect("current_exe");
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private"])
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, role)
        .stdin(Stdio::null())
        .output()
        .expect("run unshare (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "isolated run of {test} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    // Let the parent's captured output show what the child said.
    print!("{stdout}");
    eprint!("{stderr}");
}
