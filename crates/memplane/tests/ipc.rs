//! IPC between real processes: the test binary re-executes itself (the same
//! test, selected with `--exact`, a role in `MEMPLANE_IPC_TEST_ROLE`) as
//! secondaries in the test's own runtime directory. A secondary prints
//! `MPIPC-READY <socket>` once its actions are registered and then follows
//! commands ("cmd" messages) until told to quit.
#![cfg(not(loom))]

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, IoSlice};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use memplane::ipc::{Endpoint, Incoming, IpcError, Message, MAX_FDS, MAX_PAYLOAD};
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix};

const ROLE_ENV: &str = "MEMPLANE_IPC_TEST_ROLE";
const DIR_ENV: &str = "MEMPLANE_IPC_TEST_DIR";
const READY: &str = "MPIPC-READY ";
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- helpers

fn memfd_with(content: &[u8]) -> OwnedFd {
    let fd = rustix::fs::memfd_create("mp-ipc-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    let f = std::fs::File::from(fd);
    f.write_all_at(content, 0).unwrap();
    f.into()
}

fn read_fd(fd: &OwnedFd) -> Vec<u8> {
    let f = std::fs::File::from(fd.try_clone().unwrap());
    let len = f.metadata().unwrap().len() as usize;
    let mut v = vec![0; len];
    f.read_exact_at(&mut v, 0).unwrap();
    v
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// The role this process plays: `None` in the parent.
fn role() -> Option<String> {
    std::env::var(ROLE_ENV).ok()
}

struct Child {
    proc: std::process::Child,
    out: BufReader<ChildStdout>,
    path: PathBuf,
    pid: u32,
}

impl Child {
    /// Tells the secondary to quit and checks that it exited cleanly.
    fn finish(mut self, primary: &Endpoint) {
        primary
            .send(&self.path, Message::new("cmd", b"quit".to_vec()))
            .unwrap();
        let st = self.proc.wait().unwrap();
        assert!(st.success(), "secondary {} failed: {st}", self.pid);
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        // On a failed test: do not leave the process behind.
        let _ = self.proc.kill();
        let _ = self.proc.wait();
        // Keep the pipe open until the child is gone (a closed stdout would
        // make its test harness fail on printing).
        let _ = std::io::copy(&mut self.out, &mut std::io::sink());
    }
}

fn spawn_role(test: &str, role: &str, dir: &Path, stdout: Stdio) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env(ROLE_ENV, role)
        .env(DIR_ENV, dir)
        .stdout(stdout)
        .spawn()
        .unwrap()
}

/// Starts `n` secondaries running `test` in `dir` and waits until each has
/// bound its socket and registered its actions.
fn spawn_secondaries(test: &str, dir: &Path, n: usize) -> Vec<Child> {
    let procs: Vec<_> = (0..n)
        .map(|_| spawn_role(test, "secondary", dir, Stdio::piped()))
        .collect();
    procs
        .into_iter()
        .map(|mut proc| {
            let pid = proc.id();
            let mut out = BufReader::new(proc.stdout.take().unwrap());
            let mut line = String::new();
            let path = loop {
                line.clear();
                let n = out.read_line(&mut line).unwrap();
                assert!(n > 0, "secondary {pid} exited before it was ready");
                // The harness may have printed "test <name> ... " without
                // a newline before it.
                if let Some(i) = line.find(READY) {
                    break PathBuf::from(line[i + READY.len()..].trim_end());
                }
            };
            Child {
                proc,
                out,
                path,
                pid,
            }
        })
        .collect()
}

fn primary_in(dir: &Path) -> Endpoint {
    Endpoint::bind_primary(dir).unwrap()
}

/// An action that forwards one-way messages' payloads to a channel.
fn collect(ep: &Endpoint, name: &str) -> mpsc::Receiver<(u32, String)> {
    let (tx, rx) = mpsc::channel();
    ep.register_action(name, move |inc: Incoming| {
        let _ = tx.send((
            inc.peer.pid,
            String::from_utf8_lossy(&inc.msg.payload).into_owned(),
        ));
    })
    .unwrap();
    rx
}

// ------------------------------------------------------------ the secondary

/// Body of a secondary process.
fn secondary() {
    let dir = PathBuf::from(std::env::var(DIR_ENV).unwrap());
    let primary = Endpoint::primary_path(&dir);
    let ep = Endpoint::bind_secondary(&dir).unwrap();
    let pid = std::process::id();

    // echo: payload prefixed; one memfd back holding what the sent fds held.
    ep.register_action("echo", move |mut inc| {
        let msg = inc.take_msg();
        let mut payload = b"echo:".to_vec();
        payload.extend_from_slice(&msg.payload);
        let mut fds = Vec::new();
        if !msg.fds.is_empty() {
            let mut seen = format!("child {pid} saw: ").into_bytes();
            for fd in &msg.fds {
                seen.extend(read_fd(fd));
            }
            fds.push(memfd_with(&seen));
        }
        inc.reply(Message::with_fds("echo", payload, fds)).unwrap();
    })
    .unwrap();
    ep.register_action("fds", |inc| {
        let n = inc.msg.fds.len().to_string();
        inc.reply(Message::new("fds", n)).unwrap();
    })
    .unwrap();
    // nested: asks the primary while handling the primary's request.
    let to = primary.clone();
    ep.register_action("nested", move |inc| {
        let inner = inc
            .handle()
            .request(
                &to,
                Message::new("inner", inc.msg.payload.clone()),
                Duration::from_secs(5),
            )
            .unwrap();
        let mut payload = b"nested:".to_vec();
        payload.extend_from_slice(&inner.payload);
        inc.reply(Message::new("nested", payload)).unwrap();
    })
    .unwrap();
    // hang: keeps the request and never answers.
    let kept = Mutex::new(Vec::new());
    ep.register_action("hang", move |inc| kept.lock().unwrap().push(inc))
        .unwrap();
    ep.register_action("slow", |inc| {
        std::thread::sleep(Duration::from_millis(400));
        let _ = inc.reply(Message::new("slow", b"late".to_vec()));
    })
    .unwrap();
    ep.register_action("drop", drop).unwrap();
    ep.register_action("sync", move |inc| {
        inc.reply(Message::new("sync", pid.to_string())).unwrap();
    })
    .unwrap();
    // note (one-way, with a memfd): acknowledged with a one-way "ack".
    let to = primary.clone();
    ep.register_action("note", move |inc| {
        let content = String::from_utf8(read_fd(&inc.msg.fds[0])).unwrap();
        inc.handle()
            .send(&to, Message::new("ack", format!("{pid}:{content}")))
            .unwrap();
    })
    .unwrap();
    let (cmd_tx, cmd_rx) = mpsc::channel::<String>();
    ep.register_action("cmd", move |inc| {
        let _ = cmd_tx.send(String::from_utf8(inc.msg.payload.clone()).unwrap());
    })
    .unwrap();

    println!("{READY}{}", ep.path().display());
    // Commands run on this thread, not in a handler: a request from here
    // leaves the worker free to serve the primary's sync requests.
    loop {
        let cmd = cmd_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("no command from the primary for 60 s");
        match cmd.as_str() {
            "quit" => break,
            "alloc" => {
                let r = ep.request(
                    &primary,
                    Message::new("alloc", b"64K".to_vec()),
                    Duration::from_secs(5),
                );
                let report = match r {
                    Ok(m) => String::from_utf8(m.payload).unwrap(),
                    Err(e) => format!("error: {e}"),
                };
                ep.send(&primary, Message::new("alloc-done", report))
                    .unwrap();
            }
            "to-primary" => {
                let r = ep.request(
                    &primary,
                    Message::with_fds(
                        "p-echo",
                        b"from child".to_vec(),
                        vec![memfd_with(b"child memfd")],
                    ),
                    Duration::from_secs(5),
                );
                let report = match r {
                    Ok(m) if m.payload == b"p:from child" && m.fds.len() == 1 => {
                        String::from_utf8(read_fd(&m.fds[0])).unwrap()
                    }
                    Ok(m) => format!("bad reply {m:?}"),
                    Err(e) => format!("error: {e}"),
                };
                ep.send(&primary, Message::new("check", report)).unwrap();
            }
            other => panic!("unknown command {other}"),
        }
    }
}

// ------------------------------------------------------------------ tests

#[test]
fn request_reply_with_payload_and_fds_both_directions() {
    if role().is_some() {
        return secondary();
    }
    let test = "request_reply_with_payload_and_fds_both_directions";
    let dir = tempfile::tempdir().unwrap();
    let primary = primary_in(dir.path());
    let (pid_tx, pid_rx) = mpsc::channel();
    primary
        .register_action("p-echo", move |mut inc| {
            let msg = inc.take_msg();
            pid_tx.send(inc.peer.pid).unwrap();
            let content = read_fd(&msg.fds[0]).to_ascii_uppercase();
            let mut payload = b"p:".to_vec();
            payload.extend_from_slice(&msg.payload);
            inc.reply(Message::with_fds(
                "p-echo",
                payload,
                vec![memfd_with(&content)],
            ))
            .unwrap();
        })
        .unwrap();
    let checks = collect(&primary, "check");
    let kids = spawn_secondaries(test, dir.path(), 1);
    let kid = &kids[0];

    // Primary -> secondary: payload and two memfds.
    let reply = primary
        .request(
            &kid.path,
            Message::with_fds(
                "echo",
                b"hello".to_vec(),
                vec![memfd_with(b"parent "), memfd_with(b"data")],
            ),
            WAIT,
        )
        .unwrap();
    assert_eq!(reply.payload, b"echo:hello");
    assert_eq!(reply.fds.len(), 1);
    assert_eq!(
        read_fd(&reply.fds[0]),
        format!("child {} saw: parent data", kid.pid).as_bytes()
    );

    // The largest payload and the most fds go through.
    let big: Vec<u8> = (0..MAX_PAYLOAD - 5).map(|i| i as u8).collect();
    let reply = primary
        .request(&kid.path, Message::new("echo", big.clone()), WAIT)
        .unwrap();
    assert_eq!(reply.payload.len(), MAX_PAYLOAD);
    assert_eq!(&reply.payload[5..], &big[..]);
    let one = memfd_with(b"x");
    let many: Vec<OwnedFd> = (0..MAX_FDS).map(|_| one.try_clone().unwrap()).collect();
    let reply = primary
        .request(&kid.path, Message::with_fds("fds", Vec::new(), many), WAIT)
        .unwrap();
    assert_eq!(reply.payload, MAX_FDS.to_string().as_bytes());

    // Over the limits: refused before sending.
    let e = primary
        .request(
            &kid.path,
            Message::new("echo", vec![0; MAX_PAYLOAD + 1]),
            WAIT,
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            IpcError::TooLarge {
                what: "payload",
                ..
            }
        ),
        "{e}"
    );
    let e = primary
        .send(&kid.path, Message::new("bad\nname", Vec::new()))
        .unwrap_err();
    assert!(matches!(e, IpcError::BadName { .. }), "{e}");

    // Secondary -> primary: the child requests, the primary's handler sees
    // its pid, and the child reports what came back.
    primary
        .send(&kid.path, Message::new("cmd", b"to-primary".to_vec()))
        .unwrap();
    assert_eq!(pid_rx.recv_timeout(WAIT).unwrap(), kid.pid);
    let (from, report) = checks.recv_timeout(WAIT).unwrap();
    assert_eq!(from, kid.pid);
    assert_eq!(report, "CHILD MEMFD");

    assert_eq!(primary.rejected(), 0);
    for k in kids {
        k.finish(&primary);
    }
}

#[test]
fn broadcast_request_all_and_the_secondary_alloc_flow() {
    if role().is_some() {
        return secondary();
    }
    let test = "broadcast_request_all_and_the_secondary_alloc_flow";
    let dir = tempfile::tempdir().unwrap();
    let primary = primary_in(dir.path());
    let acks = collect(&primary, "ack");
    let done = collect(&primary, "alloc-done");
    // The DPDK secondary-allocation shape: the primary's handler asks every
    // secondary (the requester included) to resync and waits for all.
    primary
        .register_action("alloc", |inc| {
            let all = inc
                .handle()
                .request_all(Message::new("sync", Vec::new()), Duration::from_secs(5));
            let ok = all.iter().filter(|(_, r)| r.is_ok()).count();
            let size = String::from_utf8_lossy(&inc.msg.payload).into_owned();
            inc.reply(Message::new(
                "alloc",
                format!("{size} synced {ok}/{}", all.len()),
            ))
            .unwrap();
        })
        .unwrap();
    let kids = spawn_secondaries(test, dir.path(), 3);
    let mut paths: Vec<PathBuf> = kids.iter().map(|k| k.path.clone()).collect();
    paths.sort();
    let pids: BTreeSet<u32> = kids.iter().map(|k| k.pid).collect();
    assert_eq!(primary.peers(), paths);

    // Broadcast with a memfd: every secondary reads it and acknowledges.
    let res = primary.broadcast(Message::with_fds(
        "note",
        Vec::new(),
        vec![memfd_with(b"bcast")],
    ));
    assert_eq!(res.len(), 3);
    assert!(res.iter().all(|(_, r)| r.is_ok()), "{res:?}");
    let mut seen = BTreeSet::new();
    for _ in 0..3 {
        let (from, text) = acks.recv_timeout(WAIT).unwrap();
        assert_eq!(text, format!("{from}:bcast"));
        seen.insert(from);
    }
    assert_eq!(seen, pids);

    // request_all: one answer per secondary, each from the right one.
    let t = Instant::now();
    let res = primary.request_all(Message::new("sync", Vec::new()), WAIT);
    assert!(t.elapsed() < Duration::from_secs(2));
    let mut got = BTreeSet::new();
    for (path, r) in res {
        let pid: u32 = String::from_utf8(r.unwrap().payload)
            .unwrap()
            .parse()
            .unwrap();
        let kid = kids.iter().find(|k| k.path == path).unwrap();
        assert_eq!(pid, kid.pid);
        got.insert(pid);
    }
    assert_eq!(got, pids);

    // A secondary requests an allocation; the primary's handler syncs all.
    primary
        .send(&kids[1].path, Message::new("cmd", b"alloc".to_vec()))
        .unwrap();
    let (from, report) = done.recv_timeout(WAIT).unwrap();
    assert_eq!(from, kids[1].pid);
    assert_eq!(report, "64K synced 3/3");

    // A secondary's peers are the other secondaries.
    assert_eq!(primary.rejected(), 0);
    for k in kids {
        k.finish(&primary);
    }
    assert!(primary.peers().is_empty());
}

#[test]
fn handler_makes_a_nested_blocking_request() {
    if role().is_some() {
        return secondary();
    }
    let test = "handler_makes_a_nested_blocking_request";
    let dir = tempfile::tempdir().unwrap();
    let primary = primary_in(dir.path());
    primary
        .register_action("inner", |inc| {
            let mut p = b"inner:".to_vec();
            p.extend_from_slice(&inc.msg.payload);
            inc.reply(Message::new("inner", p)).unwrap();
        })
        .unwrap();
    let kids = spawn_secondaries(test, dir.path(), 1);
    // The primary's thread waits for "nested"; meanwhile the secondary's
    // handler asks the primary "inner", which the primary's worker serves.
    for i in 0..20 {
        let reply = primary
            .request(&kids[0].path, Message::new("nested", format!("x{i}")), WAIT)
            .unwrap();
        assert_eq!(reply.payload, format!("nested:inner:x{i}").as_bytes());
    }
    for k in kids {
        k.finish(&primary);
    }
}

#[test]
fn timeouts_no_handler_and_no_reply_are_typed_and_prompt() {
    if role().is_some() {
        return secondary();
    }
    let test = "timeouts_no_handler_and_no_reply_are_typed_and_prompt";
    let dir = tempfile::tempdir().unwrap();
    let primary = primary_in(dir.path());
    let kids = spawn_secondaries(test, dir.path(), 1);
    let kid = &kids[0];

    // The peer keeps the request and never answers.
    let timeout = Duration::from_millis(300);
    let t = Instant::now();
    let e = primary
        .request(&kid.path, Message::new("hang", Vec::new()), timeout)
        .unwrap_err();
    let took = t.elapsed();
    match &e {
        IpcError::Timeout { name, peer, after } => {
            assert_eq!(name, "hang");
            assert_eq!(peer, &kid.path);
            assert_eq!(*after, timeout);
        }
        e => panic!("expected a timeout, got {e}"),
    }
    assert!(took >= timeout && took < timeout * 4, "took {took:?}");
    assert!(e.to_string().contains("hang"), "{e}");

    // No action of that name: answered at once, even with a long timeout,
    // and even while the peer's worker is busy (for 400 ms with "slow").
    primary
        .send(&kid.path, Message::new("slow", Vec::new()))
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    let e = primary
        .request(&kid.path, Message::new("nope", Vec::new()), WAIT)
        .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(200),
        "{:?}",
        t.elapsed()
    );
    match &e {
        IpcError::NoHandler { name, peer, pid } => {
            assert_eq!((name.as_str(), peer, *pid), ("nope", &kid.path, kid.pid));
        }
        e => panic!("expected NoHandler, got {e}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains("nope") && msg.contains(&kid.pid.to_string()),
        "{msg}"
    );

    // The handler drops the request: NoReply at once.
    let t = Instant::now();
    let e = primary
        .request(&kid.path, Message::new("drop", Vec::new()), WAIT)
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(
        matches!(e, IpcError::NoReply { ref name, .. } if name == "drop"),
        "{e}"
    );

    // An answer that comes after the timeout is dropped quietly (not
    // counted as rogue), and the endpoint keeps working.
    let e = primary
        .request(
            &kid.path,
            Message::new("slow", Vec::new()),
            Duration::from_millis(100),
        )
        .unwrap_err();
    assert!(matches!(e, IpcError::Timeout { .. }), "{e}");
    std::thread::sleep(Duration::from_millis(500));
    let reply = primary
        .request(&kid.path, Message::new("echo", b"after".to_vec()), WAIT)
        .unwrap();
    assert_eq!(reply.payload, b"echo:after");
    assert_eq!(primary.rejected(), 0);
    for k in kids {
        k.finish(&primary);
    }
}

#[test]
fn dead_peer_is_no_peer_and_its_socket_is_removed() {
    if role().is_some() {
        return secondary();
    }
    let test = "dead_peer_is_no_peer_and_its_socket_is_removed";
    let dir = tempfile::tempdir().unwrap();
    let primary = primary_in(dir.path());
    let mut kids = spawn_secondaries(test, dir.path(), 2);
    let mut dead = kids.remove(0);
    dead.proc.kill().unwrap(); // SIGKILL: no cleanup in the child
    dead.proc.wait().unwrap();
    assert!(
        dead.path.exists(),
        "a SIGKILLed process leaves its socket file"
    );

    let t = Instant::now();
    let e = primary
        .request(&dead.path, Message::new("echo", Vec::new()), WAIT)
        .unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(1));
    assert!(
        matches!(e, IpcError::NoPeer { ref path } if path == &dead.path),
        "{e}"
    );
    assert!(e.to_string().contains("is the primary running"), "{e}");
    let e = primary
        .send(&dead.path, Message::new("echo", Vec::new()))
        .unwrap_err();
    assert!(matches!(e, IpcError::NoPeer { .. }), "{e}");

    // peers() skips it and removes its file; broadcast does not reach it.
    assert_eq!(primary.peers(), vec![kids[0].path.clone()]);
    assert!(!dead.path.exists());
    let res = primary.request_all(Message::new("sync", Vec::new()), WAIT);
    assert_eq!(res.len(), 1);
    assert!(res[0].1.is_ok());
    drop(dead);
    for k in kids {
        k.finish(&primary);
    }
}

#[test]
fn primary_socket_in_use_stale_or_missing() {
    if role().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // No primary yet: a secondary's request is NoPeer.
    let sec = Endpoint::bind_secondary(dir.path()).unwrap();
    let e = sec
        .request(
            &Endpoint::primary_path(dir.path()),
            Message::new("x", Vec::new()),
            WAIT,
        )
        .unwrap_err();
    assert!(matches!(e, IpcError::NoPeer { .. }), "{e}");

    // A stale socket file (bound, then closed) is replaced.
    let stale = UnixDatagram::bind(Endpoint::primary_path(dir.path())).unwrap();
    drop(stale);
    let primary = Endpoint::bind_primary(dir.path()).unwrap();
    assert!(primary.is_primary());

    // A live primary is named.
    let e = Endpoint::bind_primary(dir.path()).unwrap_err();
    match &e {
        IpcError::InUse { path, pid } => {
            assert_eq!(path, primary.path());
            assert_eq!(*pid, Some(std::process::id()));
        }
        e => panic!("expected InUse, got {e}"),
    }
    assert!(
        e.to_string().contains(&std::process::id().to_string()),
        "{e}"
    );

    // Several secondaries in one process; each sees the others.
    let sec2 = Endpoint::bind_secondary(dir.path()).unwrap();
    assert_ne!(sec.path(), sec2.path());
    assert_eq!(sec.peers(), vec![sec2.path().to_owned()]);
    assert_eq!(primary.peers().len(), 2);

    // Something that is not a socket is never removed.
    drop(primary);
    assert!(!Endpoint::primary_path(dir.path()).exists());
    std::fs::write(Endpoint::primary_path(dir.path()), b"not a socket").unwrap();
    let e = Endpoint::bind_primary(dir.path()).unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert!(Endpoint::primary_path(dir.path()).exists());

    // Actions: duplicates and bad names refused; unregister.
    sec.register_action("a", drop).unwrap();
    assert!(matches!(
        sec.register_action("a", drop),
        Err(IpcError::DuplicateAction { .. })
    ));
    assert!(matches!(
        sec.register_action(&"n".repeat(64), drop),
        Err(IpcError::BadName { .. })
    ));
    assert!(sec.unregister_action("a"));
    assert!(!sec.unregister_action("a"));
    let e = sec2
        .request(sec.path(), Message::new("a", Vec::new()), WAIT)
        .unwrap_err();
    assert!(matches!(e, IpcError::NoHandler { .. }), "{e}");
}

#[test]
fn close_fails_pending_requests_and_does_not_wait_for_a_stuck_handler() {
    if role().is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ep_a = Endpoint::bind_primary(dir.path()).unwrap();
    let ep_b = Endpoint::bind_secondary(dir.path()).unwrap();
    let kept = Mutex::new(Vec::new());
    ep_b.register_action("hang", move |inc| kept.lock().unwrap().push(inc))
        .unwrap();
    ep_b.register_action("stuck", |_inc| std::thread::sleep(Duration::from_secs(4)))
        .unwrap();
    let b_path = ep_b.path().to_owned();
    std::thread::scope(|s| {
        let waiter = s.spawn(|| {
            let t = Instant::now();
            let r = ep_a.request(&b_path, Message::new("hang", Vec::new()), WAIT);
            (r, t.elapsed())
        });
        std::thread::sleep(Duration::from_millis(200));
        ep_a.close();
        let (r, took) = waiter.join().unwrap();
        assert!(matches!(r, Err(IpcError::Closed)), "{r:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    });
    assert!(!ep_a.path().exists());
    assert!(matches!(
        ep_a.send(&b_path, Message::new("x", Vec::new())),
        Err(IpcError::Closed)
    ));
    // A closed peer: NoPeer.
    let e = ep_b
        .request(ep_a.path(), Message::new("x", Vec::new()), WAIT)
        .unwrap_err();
    assert!(matches!(e, IpcError::NoPeer { .. }), "{e}");

    // An idle endpoint closes at once (shutdown wakes its receiver).
    let idle = Endpoint::bind_secondary(dir.path()).unwrap();
    let t = Instant::now();
    drop(idle);
    assert!(
        t.elapsed() < Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );

    // ep_b's worker is stuck in a handler for 4 s: drop still returns soon.
    let c = Endpoint::bind_secondary(dir.path()).unwrap();
    c.send(&b_path, Message::new("stuck", Vec::new())).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    drop(ep_b);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(!b_path.exists());
}

#[test]
fn many_concurrent_requesters_get_their_own_replies() {
    if role().is_some() {
        return secondary();
    }
    let test = "many_concurrent_requesters_get_their_own_replies";
    let dir = tempfile::tempdir().unwrap();
    let primary = Arc::new(primary_in(dir.path()));
    let kids = spawn_secondaries(test, dir.path(), 1);
    let to = kids[0].path.clone();
    let t = Instant::now();
    std::thread::scope(|s| {
        for th in 0..8 {
            let (primary, to) = (&primary, &to);
            s.spawn(move || {
                for i in 0..1000 {
                    let p = format!("{th}:{i}");
                    let r = primary
                        .request(to, Message::new("echo", p.clone()), WAIT)
                        .unwrap();
                    assert_eq!(r.payload, format!("echo:{p}").as_bytes());
                }
            });
        }
    });
    eprintln!("8 x 1000 requests in {:?}", t.elapsed());
    assert_eq!(primary.rejected(), 0);
    for k in kids {
        k.finish(&primary);
    }
}

// -------------------------------------------------------------- rogue input

/// Sends raw bytes with descriptors from `from` to `to`.
fn send_raw(from: &UnixDatagram, to: &Path, bytes: &[u8], fds: &[BorrowedFd<'_>]) {
    let addr = SocketAddrUnix::new(to).unwrap();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len().max(1)))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
    }
    rustix::net::sendmsg_addr(
        from,
        &addr,
        &[IoSlice::new(bytes)],
        &mut control,
        SendFlags::empty(),
    )
    .unwrap();
}

/// A valid datagram, built by hand (the format in docs/ARCHITECTURE.md).
fn datagram(kind: u8, id: u64, name: &[u8], payload: &[u8], fds: u16) -> Vec<u8> {
    let mut v = b"MPIP".to_vec();
    v.extend_from_slice(&1u16.to_le_bytes());
    v.push(kind);
    v.push(0);
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&(name.len() as u16).to_le_bytes());
    v.extend_from_slice(&fds.to_le_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    v.extend_from_slice(name);
    v.extend_from_slice(payload);
    v
}

/// Body of the rogue test, in a process of its own so that counting its
/// descriptors is not disturbed by other tests.
fn rogue() {
    let dir = tempfile::tempdir().unwrap();
    let target = Endpoint::bind_primary(dir.path()).unwrap();
    let (tx, rx) = mpsc::channel();
    target
        .register_action("echo", move |inc| {
            tx.send(inc.msg.payload.clone()).unwrap();
            if inc.is_request() {
                let p = inc.msg.payload.clone();
                inc.reply(Message::new("echo", p)).unwrap();
            }
        })
        .unwrap();
    let legit = Endpoint::bind_secondary(dir.path()).unwrap();
    let to = target.path().to_owned();
    // Canonical, as the paths endpoints compare answers against.
    let cdir = std::fs::canonicalize(dir.path()).unwrap();
    let rogue = UnixDatagram::bind(cdir.join("mp_socket_rogue")).unwrap();
    let rogue2 = UnixDatagram::bind(cdir.join("mp_socket_rogue2")).unwrap();
    let unbound = UnixDatagram::unbound().unwrap();
    let memfd = memfd_with(b"secret");
    let root = rustix::process::geteuid().is_root();
    let other_uid = root.then(|| {
        let s = UnixDatagram::bind(dir.path().join("other-uid")).unwrap();
        s.connect(&to).unwrap();
        s
    });
    let before = fd_count();

    let valid = datagram(1, 0, b"echo", b"ok", 0);
    let mut expected = 0;
    let mut bad = |bytes: &[u8], fds: &[BorrowedFd<'_>]| {
        send_raw(&rogue, &to, bytes, fds);
        expected += 1;
    };
    // Garbage, empty, truncated headers.
    bad(b"hello, this is not a message", &[]);
    bad(b"", &[]);
    bad(&valid[..10], &[]);
    bad(&valid[..23], &[]);
    // Bad magic, version, kind, flags.
    let mut d = valid.clone();
    d[0] = b'X';
    bad(&d, &[]);
    let mut d = valid.clone();
    d[4] = 9;
    bad(&d, &[]);
    let mut d = valid.clone();
    d[6] = 200;
    bad(&d, &[]);
    let mut d = valid.clone();
    d[7] = 1;
    bad(&d, &[]);
    // Oversized: larger than any valid message (MSG_TRUNC).
    let mut big = datagram(1, 0, b"echo", &vec![7; 60_000], 0);
    bad(&big, &[]);
    big.truncate(MAX_PAYLOAD + 200);
    bad(&big, &[]);
    // Lengths that lie.
    let mut d = datagram(1, 0, b"echo", b"0123456789", 0);
    d[20..24].copy_from_slice(&100u32.to_le_bytes());
    bad(&d, &[]);
    let mut d = valid.clone();
    d[16..18].copy_from_slice(&200u16.to_le_bytes());
    bad(&d, &[]);
    let mut d = valid.clone();
    d[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
    bad(&d, &[]);
    // A name that is not UTF-8, one with a NUL.
    bad(&datagram(1, 0, b"ec\xffo", b"", 0), &[]);
    bad(&datagram(1, 0, b"ec\0o", b"", 0), &[]);
    // 200 fds with a bad header; more fds than announced; fewer.
    let fds200: Vec<BorrowedFd<'_>> = (0..200).map(|_| memfd.as_fd()).collect();
    bad(b"garbage with two hundred fds", &fds200);
    bad(&datagram(1, 0, b"echo", b"", 1), &fds200[..3]);
    bad(&datagram(1, 0, b"echo", b"", 5), &fds200[..2]);
    bad(&datagram(2, 0, b"echo", b"", 0), &[]); // request with id 0
                                                // Replies nobody asked for (with an fd, which must be closed).
    bad(&datagram(3, 12345, b"echo", b"forged", 1), &fds200[..1]);
    bad(&datagram(4, 777, b"echo", b"", 0), &[]);
    // A flood of garbage.
    for i in 0..500u32 {
        bad(&i.to_le_bytes(), &[]);
    }
    // A valid request from a socket with no address to answer to.
    unbound
        .send_to(&datagram(2, 99, b"echo", b"unbound", 0), &to)
        .unwrap();
    expected += 1;
    // A valid message from another uid (root only: a thread drops to
    // nobody; uids are per thread in the kernel, and the socket was
    // connected while still root, so no path permission applies).
    if let Some(s) = &other_uid {
        std::thread::scope(|sc| {
            sc.spawn(|| {
                rustix::thread::set_thread_uid(rustix::process::Uid::from_raw(65534)).unwrap();
                s.send(&datagram(1, 0, b"echo", b"other uid", 0)).unwrap();
            });
        });
        expected += 1;
    } else {
        eprintln!("note: not root; the foreign-uid case is not exercised");
    }

    // The endpoint still works, and (the receive queue being FIFO) has seen
    // everything above by the time this answer comes.
    let r = legit
        .request(&to, Message::new("echo", b"still alive".to_vec()), WAIT)
        .unwrap();
    assert_eq!(r.payload, b"still alive");
    assert_eq!(target.rejected(), expected);
    // No rogue message reached the action.
    assert_eq!(
        rx.try_iter().collect::<Vec<_>>(),
        vec![b"still alive".to_vec()]
    );
    // Every descriptor that arrived with a rejected datagram was closed.
    assert_eq!(fd_count(), before, "descriptors leaked");
    // Valid datagrams by hand are accepted (the format is what we think).
    send_raw(&rogue, &to, &valid, &[]);
    assert_eq!(rx.recv_timeout(WAIT).unwrap(), b"ok");
    assert_eq!(target.rejected(), expected);

    // A hand-made peer answers a real request; a forged answer with the
    // right id from another socket is rejected, the genuine one accepted.
    let rogue_path = cdir.join("mp_socket_rogue");
    std::thread::scope(|sc| {
        let h = sc.spawn(|| legit.request(&rogue_path, Message::new("q", b"?".to_vec()), WAIT));
        let mut buf = [0u8; 256];
        let (n, from) = rogue.recv_from(&mut buf).unwrap();
        assert_eq!(from.as_pathname(), Some(legit.path()));
        assert_eq!(
            &buf[..n],
            &datagram(
                2,
                u64::from_le_bytes(buf[8..16].try_into().unwrap()),
                b"q",
                b"?",
                0
            )[..]
        );
        let id = u64::from_le_bytes(buf[8..16].try_into().unwrap());
        send_raw(
            &rogue2,
            legit.path(),
            &datagram(3, id, b"q", b"forged", 0),
            &[],
        );
        send_raw(
            &rogue,
            legit.path(),
            &datagram(3, id, b"q", b"genuine", 0),
            &[],
        );
        let r = h.join().unwrap().unwrap();
        assert_eq!(r.payload, b"genuine");
    });
    assert_eq!(legit.rejected(), 1);
    println!("rogue: {expected} datagrams rejected");
}

#[test]
fn rogue_input_is_rejected_counted_and_its_fds_closed() {
    match role().as_deref() {
        Some("rogue") => return rogue(),
        Some(_) => return,
        None => {}
    }
    let test = "rogue_input_is_rejected_counted_and_its_fds_closed";
    let dir = tempfile::tempdir().unwrap();
    let st = spawn_role(test, "rogue", dir.path(), Stdio::inherit())
        .wait()
        .unwrap();
    assert!(st.success(), "rogue scenario failed: {st}");
}

/// The IPC threads block user signals, so process-directed signals (Ctrl-C)
/// reach the application's threads, which may take them with `sigwait`.
#[test]
fn ipc_threads_block_user_signals() {
    let dir = tempfile::tempdir().unwrap();
    let _ep = primary_in(dir.path());
    let mut seen = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("mp-ipc") {
            continue;
        }
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        let blocked = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap();
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGUSR1] {
            assert!(
                blocked & (1 << (sig - 1)) != 0,
                "{} does not block signal {sig}: SigBlk {blocked:#x}",
                comm.trim()
            );
        }
        seen += 1;
    }
    assert!(seen >= 2, "the receiver and worker threads exist");
}
