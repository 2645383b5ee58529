//! Endpoints, their threads, and the request/answer bookkeeping.

use std::collections::{HashMap, VecDeque};
use std::io::IoSliceMut;
use std::mem::MaybeUninit;
use std::ops::Deref;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{JoinHandle, ThreadId};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{self, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};

use super::sock::{self, Out, Probe, SendFail};
use super::wire::{self, Kind, MAX_DATAGRAM};
use super::{check_name, IpcError, Message, Peer, PRIMARY_SOCKET, SEND_TIMEOUT};

/// Messages waiting for the worker.
const WORK_QUEUE: usize = 256;
/// How long the receiver may spend on one answer it sends itself ("no
/// handler", "busy"): it must get back to routing answers.
const RECEIVER_SEND_BUDGET: Duration = Duration::from_millis(20);
/// How long close waits for an action that is running.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Recently abandoned request ids remembered, so that a late answer is not
/// taken for a rogue one.
const ABANDONED: usize = 256;
/// Control buffer: credentials and the most descriptors the kernel passes.
const CMSG_SPACE: usize = rustix::cmsg_space!(ScmRights(super::MAX_FDS), ScmCredentials(1));

/// Secondary endpoints created by this process (the `<n>` in the name).
static SECONDARY_SEQ: AtomicU32 = AtomicU32::new(0);

type Action = Arc<dyn Fn(Incoming) + Send + Sync + 'static>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How a request was answered.
enum Answer {
    Reply(Message),
    NoHandler(u32),
    NoReply(u32),
    Busy(u32),
}

struct Pending {
    peer: PathBuf,
    tx: SyncSender<Answer>,
}

struct Inner {
    sock: OwnedFd,
    path: PathBuf,
    dir: PathBuf,
    ino: u64,
    primary: bool,
    euid: u32,
    actions: Mutex<HashMap<String, Action>>,
    pending: Mutex<HashMap<u64, Pending>>,
    abandoned: Mutex<VecDeque<u64>>,
    next_id: AtomicU64,
    rejected: AtomicU64,
    closed: AtomicBool,
}

/// The sending side of an endpoint, and its action registry: everything but
/// the threads. Cheap to clone; an action gets one in
/// [`Incoming::handle`]. After the endpoint is closed every call fails with
/// [`IpcError::Closed`].
#[derive(Clone)]
pub struct Handle {
    inner: Arc<Inner>,
}

/// One process's IPC endpoint: a socket in the runtime directory, a receiver
/// thread and a handler thread. Dereferences to its [`Handle`], which has
/// the methods to register actions and to send.
///
/// ```no_run
/// use std::time::Duration;
/// use memplane::ipc::{Endpoint, Message};
///
/// let dir = std::path::Path::new("/var/run/memplane/mp");
/// let primary = Endpoint::bind_primary(dir)?;
/// primary.register_action("ping", |req| {
///     let _ = req.reply(Message::new("pong", b"hello".to_vec()));
/// })?;
///
/// // In another process:
/// let me = Endpoint::bind_secondary(dir)?;
/// let answer = me.request(
///     &Endpoint::primary_path(dir),
///     Message::new("ping", Vec::new()),
///     Duration::from_secs(5),
/// )?;
/// assert_eq!(answer.payload, b"hello");
/// # Ok::<(), memplane::ipc::IpcError>(())
/// ```
pub struct Endpoint {
    handle: Handle,
    threads: Mutex<Threads>,
}

#[derive(Default)]
struct Threads {
    receiver: Option<JoinHandle<()>>,
    worker: Option<JoinHandle<()>>,
}

impl Deref for Endpoint {
    type Target = Handle;
    fn deref(&self) -> &Handle {
        &self.handle
    }
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("path", &self.inner.path)
            .field("primary", &self.inner.primary)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// The primary's socket path in `dir`.
    pub fn primary_path(dir: &Path) -> PathBuf {
        dir.join(PRIMARY_SOCKET)
    }

    /// Binds the primary's socket `<dir>/mp_socket`. A socket file left by
    /// a dead process is replaced; a live one is [`IpcError::InUse`],
    /// naming the process when it can be found.
    pub fn bind_primary(dir: &Path) -> Result<Endpoint, IpcError> {
        let dir = canonical_dir(dir)?;
        let path = Endpoint::primary_path(&dir);
        Endpoint::start(dir, path, true)
    }

    /// Binds a secondary's socket `<dir>/mp_socket_<pid>_<n>`, `n` counting
    /// the endpoints this process created.
    pub fn bind_secondary(dir: &Path) -> Result<Endpoint, IpcError> {
        let dir = canonical_dir(dir)?;
        let n = SECONDARY_SEQ.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{PRIMARY_SOCKET}_{}_{n}", std::process::id()));
        Endpoint::start(dir, path, false)
    }

    fn start(dir: PathBuf, path: PathBuf, primary: bool) -> Result<Endpoint, IpcError> {
        let (sock, ino) = sock::bind_at(&path)?;
        let pid = u64::from(std::process::id());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let inner = Arc::new(Inner {
            sock,
            path,
            dir,
            ino,
            primary,
            euid: rustix::process::geteuid().as_raw(),
            actions: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            abandoned: Mutex::new(VecDeque::with_capacity(ABANDONED)),
            next_id: AtomicU64::new(((pid << 32) ^ u64::from(nanos)) | 1),
            rejected: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        });
        let endpoint = Endpoint {
            handle: Handle {
                inner: Arc::clone(&inner),
            },
            threads: Mutex::new(Threads::default()),
        };
        // From here on, dropping `endpoint` cleans up (socket file, threads).
        let (tx, rx) = mpsc::sync_channel::<Incoming>(WORK_QUEUE);
        let spawn_err = |e| IpcError::io("spawning an IPC thread", e);
        // Both threads are running before `bind` returns, so whatever
        // std allocates when a thread starts (its name) is allocated now,
        // not later from a heap that may have become the global allocator.
        let (started, running) = mpsc::channel::<()>();
        let worker = {
            let inner = Arc::clone(&inner);
            let started = started.clone();
            std::thread::Builder::new()
                .name("mp-ipc-worker".into())
                .spawn(move || {
                    // The IPC threads never allocate from the hugepage heap
                    // (when it is the global allocator): a sync handler
                    // runs while the primary holds the hotplug lock, and
                    // growing the heap from here would wait for it.
                    block_async_signals();
                    crate::heap::HugepageGlobalAlloc::bypass(|| {
                        let _ = started.send(());
                        work(&inner, &rx);
                    });
                })
                .map_err(spawn_err)?
        };
        lock(&endpoint.threads).worker = Some(worker);
        let receiver = {
            std::thread::Builder::new()
                .name("mp-ipc-rx".into())
                .spawn(move || {
                    block_async_signals();
                    crate::heap::HugepageGlobalAlloc::bypass(|| {
                        let _ = started.send(());
                        receive(&inner, &tx);
                    });
                })
                .map_err(spawn_err)?
        };
        lock(&endpoint.threads).receiver = Some(receiver);
        for _ in 0..2 {
            let _ = running.recv_timeout(Duration::from_secs(5));
        }
        tracing::debug!(path = %endpoint.inner.path.display(), primary, "IPC endpoint bound");
        Ok(endpoint)
    }

    /// A handle for sending and registering actions, e.g. for another
    /// thread.
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Whether this is the primary's endpoint.
    pub fn is_primary(&self) -> bool {
        self.inner.primary
    }

    /// Stops the endpoint: see the module docs ("Closing"). Idempotent;
    /// drop calls it.
    pub fn close(&self) {
        let inner = &self.inner;
        if !inner.closed.swap(true, Ordering::SeqCst) {
            // Wakes the receiver; peers sending to us now get EPIPE.
            if let Err(e) = net::shutdown(&inner.sock, net::Shutdown::Read) {
                tracing::debug!(error = %e, "shutdown of the IPC socket");
            }
            if let Err(e) = sock::remove_stale(&inner.path, Some(inner.ino)) {
                tracing::warn!(path = %inner.path.display(), error = %e, "cannot remove the IPC socket file");
            }
            // Waiting requesters see their channel close: Closed.
            lock(&inner.pending).clear();
            // Breaks reference cycles through actions that captured a handle.
            let actions = std::mem::take(&mut *lock(&inner.actions));
            drop(actions);
        }
        let me = std::thread::current().id();
        let (receiver, worker) = {
            let mut t = lock(&self.threads);
            (t.receiver.take(), t.worker.take())
        };
        if let Some(r) = receiver {
            if r.thread().id() != me && r.join().is_err() {
                tracing::error!("the IPC receiver thread panicked");
            }
        }
        if let Some(w) = worker {
            join_worker(w, me);
        }
    }
}

fn join_worker(w: JoinHandle<()>, me: ThreadId) {
    // Closing from inside an action: the worker finishes on its own.
    if w.thread().id() == me {
        return;
    }
    let start = Instant::now();
    while !w.is_finished() {
        if start.elapsed() >= CLOSE_GRACE {
            tracing::warn!(
                "an IPC action is still running {CLOSE_GRACE:?} after close; leaving its thread to finish on its own"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if w.join().is_err() {
        tracing::error!("the IPC worker thread panicked");
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.close();
    }
}

fn canonical_dir(dir: &Path) -> Result<PathBuf, IpcError> {
    std::fs::canonicalize(dir)
        .map_err(|e| IpcError::io(format!("runtime directory {}", dir.display()), e))
}

impl Handle {
    /// This endpoint's socket.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The runtime directory (canonical).
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Datagrams rejected so far (see the module docs).
    pub fn rejected(&self) -> u64 {
        self.inner.rejected.load(Ordering::Relaxed)
    }

    /// Registers the action for messages and requests named `name`. It runs
    /// on the endpoint's worker thread, one message at a time.
    pub fn register_action(
        &self,
        name: &str,
        f: impl Fn(Incoming) + Send + Sync + 'static,
    ) -> Result<(), IpcError> {
        check_name(name)?;
        if self.inner.closed.load(Ordering::SeqCst) {
            return Err(IpcError::Closed);
        }
        let mut actions = lock(&self.inner.actions);
        if actions.contains_key(name) {
            return Err(IpcError::DuplicateAction {
                name: name.to_owned(),
            });
        }
        actions.insert(name.to_owned(), Arc::new(f));
        Ok(())
    }

    /// Removes an action; returns whether one was registered. An action
    /// that is running finishes.
    pub fn unregister_action(&self, name: &str) -> bool {
        lock(&self.inner.actions).remove(name).is_some()
    }

    /// Sends a one-way message to the socket `to`. Waits at most
    /// [`SEND_TIMEOUT`] for room in the peer's queue.
    // Takes the message by value: its descriptors are closed once sent.
    #[allow(clippy::needless_pass_by_value)]
    pub fn send(&self, to: &Path, msg: Message) -> Result<(), IpcError> {
        msg.check()?;
        self.inner
            .send_one_way(to, &msg, Instant::now() + SEND_TIMEOUT)
    }

    /// Sends a request to `to` and waits for the answer, at most `timeout`
    /// in all. Any number of threads may have requests in flight.
    // Takes the message by value: its descriptors are closed once sent.
    #[allow(clippy::needless_pass_by_value)]
    pub fn request(&self, to: &Path, msg: Message, timeout: Duration) -> Result<Message, IpcError> {
        msg.check()?;
        let deadline = Instant::now() + timeout;
        let sent = self.inner.submit(to, &msg, deadline, timeout)?;
        self.inner.wait(sent, &msg.name, deadline, timeout)
    }

    /// The other secondaries' sockets in the runtime directory
    /// (`mp_socket_*`, not the primary's, not this one), sorted. Socket
    /// files nobody listens on any more are removed.
    pub fn peers(&self) -> Vec<PathBuf> {
        self.inner.peers()
    }

    /// Sends a one-way message to every [`peer`](Handle::peers); the
    /// message's descriptors go to each (every receiver gets its own).
    /// One result per peer.
    // Takes the message by value: its descriptors are closed once sent.
    #[allow(clippy::needless_pass_by_value)]
    pub fn broadcast(&self, msg: Message) -> Vec<(PathBuf, Result<(), IpcError>)> {
        let peers = self.inner.peers();
        if msg.check().is_err() {
            return peers.into_iter().map(|p| (p, msg.check())).collect();
        }
        let deadline = Instant::now() + SEND_TIMEOUT;
        peers
            .into_iter()
            .map(|p| {
                let r = self.inner.send_one_way(&p, &msg, deadline);
                (p, r)
            })
            .collect()
    }

    /// Sends the request to every [`peer`](Handle::peers) and waits for all
    /// answers, in parallel, with one deadline `timeout` from now. One
    /// result per peer.
    // Takes the message by value: its descriptors are closed once sent.
    #[allow(clippy::needless_pass_by_value)]
    pub fn request_all(
        &self,
        msg: Message,
        timeout: Duration,
    ) -> Vec<(PathBuf, Result<Message, IpcError>)> {
        let peers = self.inner.peers();
        if msg.check().is_err() {
            return peers
                .into_iter()
                .map(|p| (p, msg.check().map(|()| Message::default())))
                .collect();
        }
        let deadline = Instant::now() + timeout;
        let sent: Vec<_> = peers
            .into_iter()
            .map(|p| {
                let s = self.inner.submit(&p, &msg, deadline, timeout);
                (p, s)
            })
            .collect();
        sent.into_iter()
            .map(|(p, s)| {
                let r = s.and_then(|s| self.inner.wait(s, &msg.name, deadline, timeout));
                (p, r)
            })
            .collect()
    }
}

/// A request on its way: what `wait` needs.
struct Sent {
    id: u64,
    peer: PathBuf,
    rx: Receiver<Answer>,
}

impl Inner {
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn send_one_way(&self, to: &Path, msg: &Message, deadline: Instant) -> Result<(), IpcError> {
        if self.is_closed() {
            return Err(IpcError::Closed);
        }
        let out = Out {
            kind: Kind::OneWay,
            id: 0,
            name: &msg.name,
            payload: &msg.payload,
            fds: &msg.fds,
        };
        sock::send(&self.sock, to, &out, deadline)
            .map_err(|f| send_error(f, to, &msg.name, SEND_TIMEOUT))
    }

    /// Registers and sends a request.
    fn submit(
        &self,
        to: &Path,
        msg: &Message,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Sent, IpcError> {
        // Answers are matched against the socket they come from, which the
        // kernel reports as the path the peer bound: canonical, as
        // endpoints bind in a canonical directory.
        let peer = match std::fs::canonicalize(to) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(IpcError::NoPeer {
                    path: to.to_owned(),
                })
            }
            Err(e) => return Err(IpcError::io(format!("resolving {}", to.display()), e)),
        };
        let (tx, rx) = mpsc::sync_channel(1);
        let id = loop {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            if id != 0 {
                break id;
            }
        };
        {
            let mut pending = lock(&self.pending);
            // Checked under the lock that close() takes to fail requests.
            if self.is_closed() {
                return Err(IpcError::Closed);
            }
            pending.insert(
                id,
                Pending {
                    peer: peer.clone(),
                    tx,
                },
            );
        }
        let out = Out {
            kind: Kind::Request,
            id,
            name: &msg.name,
            payload: &msg.payload,
            fds: &msg.fds,
        };
        if let Err(f) = sock::send(&self.sock, &peer, &out, deadline) {
            lock(&self.pending).remove(&id);
            return Err(match f {
                SendFail::Timeout => IpcError::Timeout {
                    name: msg.name.clone(),
                    peer,
                    after: timeout,
                },
                f => send_error(f, to, &msg.name, timeout),
            });
        }
        Ok(Sent { id, peer, rx })
    }

    fn wait(
        &self,
        sent: Sent,
        name: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Message, IpcError> {
        // Wait in slices: a peer that died after taking the request fails
        // the wait at once instead of at the deadline.
        let pid = peer_pid(&sent.peer);
        let mut got = Err(RecvTimeoutError::Timeout);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            got = sent.rx.recv_timeout(left.min(DEATH_POLL));
            if !matches!(got, Err(RecvTimeoutError::Timeout)) {
                break;
            }
            if pid.is_some_and(crate::shm::lock::pid_is_dead) {
                if lock(&self.pending).remove(&sent.id).is_some() {
                    return Err(IpcError::NoPeer { path: sent.peer });
                }
                // The answer arrived meanwhile: take it.
                got = sent.rx.recv().map_err(|_| RecvTimeoutError::Disconnected);
                break;
            }
        }
        let answer = match got {
            Ok(a) => a,
            Err(RecvTimeoutError::Disconnected) => return Err(IpcError::Closed),
            Err(RecvTimeoutError::Timeout) => {
                let was_pending = lock(&self.pending).remove(&sent.id).is_some();
                // Not pending any more: the receiver took the answer out
                // between the timeout and the lock and is handing it over
                // right now (or the endpoint closed).
                let late = if was_pending {
                    None
                } else {
                    sent.rx.recv().ok()
                };
                if let Some(a) = late {
                    a
                } else {
                    let mut ab = lock(&self.abandoned);
                    if ab.len() == ABANDONED {
                        ab.pop_front();
                    }
                    ab.push_back(sent.id);
                    return Err(if self.is_closed() {
                        IpcError::Closed
                    } else {
                        IpcError::Timeout {
                            name: name.to_owned(),
                            peer: sent.peer,
                            after: timeout,
                        }
                    });
                }
            }
        };
        let name = name.to_owned();
        let peer = sent.peer;
        match answer {
            Answer::Reply(m) => Ok(m),
            Answer::NoHandler(pid) => Err(IpcError::NoHandler { name, peer, pid }),
            Answer::NoReply(pid) => Err(IpcError::NoReply { name, peer, pid }),
            Answer::Busy(pid) => Err(IpcError::Busy { name, peer, pid }),
        }
    }

    fn peers(&self) -> Vec<PathBuf> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot list IPC peers");
                return Vec::new();
            }
        };
        let probe = match sock::socket() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "cannot create a probe socket to list IPC peers");
                return Vec::new();
            }
        };
        let prefix = format!("{PRIMARY_SOCKET}_");
        let mut out = Vec::new();
        for ent in rd.flatten() {
            let name = ent.file_name();
            if !name.to_str().is_some_and(|n| n.starts_with(&prefix)) {
                continue;
            }
            let path = self.dir.join(&name);
            if path == self.path || !ent.file_type().is_ok_and(|t| t.is_socket()) {
                continue;
            }
            match sock::probe(&probe, &path) {
                Probe::Live => out.push(path),
                Probe::Gone => {}
                Probe::Stale => {
                    let ino = std::os::unix::fs::DirEntryExt::ino(&ent);
                    match sock::remove_stale(&path, Some(ino)) {
                        Ok(true) => {
                            tracing::info!(path = %path.display(), "removed the stale IPC socket of a dead process");
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::warn!(path = %path.display(), error = %e, "cannot remove a stale IPC socket");
                        }
                    }
                }
                Probe::Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot probe an IPC peer; skipping it");
                }
            }
        }
        out.sort();
        out
    }

    /// Sends a bodiless answer or a reply.
    fn answer(
        &self,
        to: &Path,
        kind: Kind,
        id: u64,
        msg: &Message,
        budget: Duration,
    ) -> Result<(), IpcError> {
        let out = Out {
            kind,
            id,
            name: &msg.name,
            payload: &msg.payload,
            fds: &msg.fds,
        };
        sock::send(&self.sock, to, &out, Instant::now() + budget)
            .map_err(|f| send_error(f, to, &msg.name, budget))
    }
}

fn send_error(f: SendFail, to: &Path, name: &str, after: Duration) -> IpcError {
    match f {
        SendFail::NoPeer => IpcError::NoPeer {
            path: to.to_owned(),
        },
        SendFail::Timeout => IpcError::SendTimeout {
            name: name.to_owned(),
            peer: to.to_owned(),
            after,
        },
        SendFail::Io(e) => IpcError::io(format!("sending \"{name}\" to {}", to.display()), e),
    }
}

/// How often a waiting requester checks whether its peer died.
const DEATH_POLL: Duration = Duration::from_millis(50);

/// The pid behind a socket: `mp_socket_<pid>_<n>` names it; the primary's
/// `mp_socket` is named by `primary.pid` next to it.
fn peer_pid(path: &Path) -> Option<u32> {
    let name = path.file_name()?.to_str()?;
    if let Some(rest) = name.strip_prefix("mp_socket_") {
        return rest.split('_').next()?.parse().ok();
    }
    let pid = std::fs::read_to_string(path.with_file_name("primary.pid")).ok()?;
    pid.trim().parse().ok()
}

/// A one-way message or a request, as an action receives it.
///
/// The fields cannot be moved out (the type has a destructor that answers
/// unanswered requests); use [`Incoming::take_msg`] or `std::mem::take` on
/// them.
#[derive(Debug)]
pub struct Incoming {
    /// The message.
    pub msg: Message,
    /// Its sender.
    pub peer: Peer,
    kind: Kind,
    id: u64,
    name: String,
    answered: bool,
    handle: Handle,
}

impl Incoming {
    /// Whether the sender waits for an answer.
    pub fn is_request(&self) -> bool {
        self.kind == Kind::Request
    }

    /// The name the message arrived with (also in `msg.name` unless the
    /// action changed it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Takes the message out, leaving an empty one.
    pub fn take_msg(&mut self) -> Message {
        std::mem::take(&mut self.msg)
    }

    /// The endpoint it arrived on, to send or make requests from the action.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Answers the request. An empty `msg.name` is replaced with the
    /// request's name. Waits at most [`SEND_TIMEOUT`]
    /// for room in the requester's queue.
    pub fn reply(mut self, mut msg: Message) -> Result<(), IpcError> {
        if self.kind != Kind::Request {
            return Err(IpcError::NotRequest {
                name: self.name.clone(),
            });
        }
        if msg.name.is_empty() {
            msg.name.clone_from(&self.name);
        }
        msg.check()?;
        self.answered = true;
        self.handle
            .inner
            .answer(&self.peer.path, Kind::Reply, self.id, &msg, SEND_TIMEOUT)
    }

    /// Sends a bodiless answer unless answered already.
    fn answer_empty(&mut self, kind: Kind, budget: Duration) {
        if self.kind != Kind::Request || self.answered {
            return;
        }
        self.answered = true;
        let msg = Message::new(self.name.clone(), Vec::new());
        if let Err(e) = self
            .handle
            .inner
            .answer(&self.peer.path, kind, self.id, &msg, budget)
        {
            tracing::debug!(error = %e, kind = ?kind, "cannot answer an IPC request");
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.answer_empty(Kind::NoReply, SEND_TIMEOUT);
    }
}

/// The worker: runs actions one at a time.
fn work(inner: &Arc<Inner>, rx: &Receiver<Incoming>) {
    while let Ok(mut inc) = rx.recv() {
        if inner.is_closed() {
            // Dropping answers "no reply".
            continue;
        }
        let action = lock(&inner.actions).get(&inc.name).cloned();
        let Some(action) = action else {
            inc.answer_empty(Kind::NoHandler, SEND_TIMEOUT);
            continue;
        };
        let name = inc.name.clone();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| action(inc)));
        if res.is_err() {
            tracing::error!(action = %name, "IPC action panicked; the request was answered \"no reply\"");
        }
    }
}

/// Logs rejections: at most one warning a second, the rest at debug level.
struct WarnLimit {
    last: Option<Instant>,
    quiet: u64,
}

impl WarnLimit {
    fn reject(
        &mut self,
        inner: &Inner,
        from: Option<&Path>,
        pid: Option<u32>,
        why: &dyn std::fmt::Display,
    ) {
        let total = inner.rejected.fetch_add(1, Ordering::Relaxed) + 1;
        let from = from.map_or_else(|| "an unnamed socket".into(), |p| p.display().to_string());
        let pid = pid.map_or_else(|| "?".into(), |p| p.to_string());
        if self
            .last
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            tracing::warn!(
                endpoint = %inner.path.display(),
                "rejected an IPC datagram from {from} (pid {pid}): {why} ({total} rejected so far, {} not logged since the last warning)",
                self.quiet
            );
            self.last = Some(Instant::now());
            self.quiet = 0;
        } else {
            self.quiet += 1;
            tracing::debug!(endpoint = %inner.path.display(), "rejected an IPC datagram from {from} (pid {pid}): {why}");
        }
    }
}

/// The receiver: reads, checks and routes datagrams until the endpoint
/// closes.
fn receive(inner: &Arc<Inner>, queue: &SyncSender<Incoming>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut space = vec![MaybeUninit::<u8>::uninit(); CMSG_SPACE];
    let mut limit = WarnLimit {
        last: None,
        quiet: 0,
    };
    loop {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let r = net::recvmsg(&inner.sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC);
        if inner.is_closed() {
            return;
        }
        let r = match r {
            Ok(r) => r,
            Err(Errno::INTR | Errno::AGAIN) => continue,
            Err(e) => {
                tracing::warn!(endpoint = %inner.path.display(), error = %e, "IPC recvmsg failed");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let mut fds: Vec<OwnedFd> = Vec::new();
        let mut creds = None;
        for m in control.drain() {
            match m {
                RecvAncillaryMessage::ScmRights(it) => fds.extend(it),
                RecvAncillaryMessage::ScmCredentials(c) => creds = Some(c),
                _ => {}
            }
        }
        drop(control);
        let from = sock::sender_path(r.address);
        let pid = creds.map(|c| c.pid.as_raw_nonzero().get() as u32);
        let mut reject = |why: &dyn std::fmt::Display| {
            limit.reject(inner, from.as_deref(), pid, why);
        };
        // Every early `continue` below drops `fds`, closing them.
        let Some(creds) = creds else {
            reject(&"no sender credentials");
            continue;
        };
        let uid = creds.uid.as_raw();
        if uid != inner.euid && uid != 0 {
            reject(&format_args!(
                "sender uid {uid} is neither ours ({}) nor root",
                inner.euid
            ));
            continue;
        }
        if r.flags.intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC) {
            reject(&format_args!(
                "truncated ({:?}); larger than any valid message",
                r.flags
            ));
            continue;
        }
        let Some(from_path) = from.clone() else {
            reject(&"the sender socket has no path to answer to");
            continue;
        };
        let Some(data) = buf.get(..r.bytes) else {
            reject(&"impossible length");
            continue;
        };
        let d = match wire::decode(data, fds.len()) {
            Ok(d) => d,
            Err(why) => {
                reject(&why);
                continue;
            }
        };
        let peer = Peer {
            pid: pid.unwrap_or(0),
            uid,
            gid: creds.gid.as_raw(),
            path: from_path,
        };
        if d.kind.is_answer() {
            let answer = match d.kind {
                Kind::Reply => Answer::Reply(Message {
                    name: d.name.to_owned(),
                    payload: d.payload.to_vec(),
                    fds: std::mem::take(&mut fds),
                }),
                Kind::NoHandler => Answer::NoHandler(peer.pid),
                Kind::NoReply => Answer::NoReply(peer.pid),
                _ => Answer::Busy(peer.pid),
            };
            let mut pending = lock(&inner.pending);
            match pending.remove(&d.id) {
                Some(p) if p.peer == peer.path => {
                    drop(pending);
                    // Fails only if the requester gave up this instant.
                    let _ = p.tx.try_send(answer);
                }
                Some(p) => {
                    let expected = p.peer.display().to_string();
                    pending.insert(d.id, p);
                    drop(pending);
                    reject(&format_args!(
                        "answer to request {} which went to {expected}",
                        d.id
                    ));
                }
                None => {
                    drop(pending);
                    if lock(&inner.abandoned).contains(&d.id) {
                        tracing::debug!(name = d.name, from = %peer.path.display(), "late answer to a request that timed out");
                    } else {
                        reject(&format_args!("answer to unknown request id {}", d.id));
                    }
                }
            }
            continue;
        }
        let mut inc = Incoming {
            msg: Message {
                name: d.name.to_owned(),
                payload: d.payload.to_vec(),
                fds,
            },
            peer,
            kind: d.kind,
            id: d.id,
            name: d.name.to_owned(),
            answered: false,
            handle: Handle {
                inner: Arc::clone(inner),
            },
        };
        if !lock(&inner.actions).contains_key(d.name) {
            if inc.is_request() {
                inc.answer_empty(Kind::NoHandler, RECEIVER_SEND_BUDGET);
            } else {
                tracing::debug!(name = d.name, from = %inc.peer.path.display(), "one-way IPC message with no action; dropped");
            }
            continue;
        }
        match queue.try_send(inc) {
            Ok(()) => {}
            Err(TrySendError::Full(mut inc)) => {
                tracing::warn!(name = %inc.name, from = %inc.peer.path.display(), "IPC handler queue full ({WORK_QUEUE}); message dropped");
                inc.answer_empty(Kind::Busy, RECEIVER_SEND_BUDGET);
            }
            Err(TrySendError::Disconnected(mut inc)) => {
                inc.answer_empty(Kind::NoReply, RECEIVER_SEND_BUDGET);
            }
        }
    }
}

/// Blocks the signals a user sends (Ctrl-C, kill, job control, alarms) in
/// the calling IPC thread: the kernel then delivers process-directed
/// signals to the application's own threads, so a program that blocks
/// SIGINT to take it with `sigwait` is not killed by the default action
/// through a thread it never made.
fn block_async_signals() {
    // SAFETY: sigset_t is plain data initialised by sigemptyset; the calls
    // get pointers to this local only and change this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&raw mut set);
        for sig in [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
            libc::SIGALRM,
            libc::SIGCHLD,
            libc::SIGPIPE,
            libc::SIGTSTP,
            libc::SIGCONT,
            libc::SIGWINCH,
        ] {
            libc::sigaddset(&raw mut set, sig);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn handles_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<super::Endpoint>();
        send_sync::<super::Handle>();
        send_sync::<super::Incoming>();
    }
}
