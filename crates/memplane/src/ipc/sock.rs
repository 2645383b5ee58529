//! The system calls: sockets, bind with stale-file replacement, probing,
//! sending with a deadline.

use std::ffi::OsStr;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{
    self, sockopt, AddressFamily, SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
    SocketAddrUnix, SocketFlags, SocketType,
};

use super::wire::{self, Kind, MAX_DATAGRAM};
use super::IpcError;

/// How long one blocking `sendmsg` may wait for room (SO_SNDTIMEO); callers
/// loop until their own deadline.
const SEND_SLICE: Duration = Duration::from_millis(10);
/// How long one blocking `recvmsg` may wait (SO_RCVTIMEO) before the
/// receiver re-checks whether the endpoint closed. Shutdown wakes it at
/// once; this is only a fallback.
const RECV_SLICE: Duration = Duration::from_millis(500);
/// Socket buffer size asked for (the kernel caps it at `net.core.wmem_max`).
const BUFFER: usize = 1 << 20;

/// Why a send failed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SendFail {
    /// ECONNREFUSED, ENOENT, EPIPE (the peer shut down): nobody listens.
    NoPeer,
    /// The deadline passed while the peer's queue or our buffer was full.
    Timeout,
    Io(Errno),
}

/// An AF_UNIX datagram socket, close-on-exec.
pub(crate) fn socket() -> Result<OwnedFd, Errno> {
    net::socket_with(
        AddressFamily::UNIX,
        SocketType::DGRAM,
        SocketFlags::CLOEXEC,
        None,
    )
}

/// The address of `path`, or an error naming the limit.
pub(crate) fn addr(path: &Path) -> Result<SocketAddrUnix, IpcError> {
    SocketAddrUnix::new(path).map_err(|e| {
        IpcError::io(
            format!(
                "socket path {} ({} bytes; at most 107 fit in sun_path)",
                path.display(),
                path.as_os_str().len()
            ),
            e,
        )
    })
}

/// Options every endpoint socket gets: credentials on receipt, bounded
/// blocking, buffers large enough for the largest datagram.
pub(crate) fn configure(fd: &OwnedFd, path: &Path) -> Result<(), IpcError> {
    let op = |what: &str| format!("{what} on {}", path.display());
    sockopt::set_socket_passcred(fd, true).map_err(|e| IpcError::io(op("SO_PASSCRED"), e))?;
    sockopt::set_socket_timeout(fd, sockopt::Timeout::Send, Some(SEND_SLICE))
        .map_err(|e| IpcError::io(op("SO_SNDTIMEO"), e))?;
    sockopt::set_socket_timeout(fd, sockopt::Timeout::Recv, Some(RECV_SLICE))
        .map_err(|e| IpcError::io(op("SO_RCVTIMEO"), e))?;
    // Both are best effort: the kernel caps them at net.core.{w,r}mem_max.
    if let Err(e) = sockopt::set_socket_send_buffer_size(fd, BUFFER) {
        tracing::debug!(error = %e, "SO_SNDBUF refused");
    }
    if let Err(e) = sockopt::set_socket_recv_buffer_size(fd, BUFFER) {
        tracing::debug!(error = %e, "SO_RCVBUF refused");
    }
    // A datagram larger than SO_SNDBUF - 32 fails with EMSGSIZE; check now
    // rather than on the first large message.
    let sndbuf =
        sockopt::socket_send_buffer_size(fd).map_err(|e| IpcError::io(op("SO_SNDBUF"), e))?;
    let need = MAX_DATAGRAM + 32;
    if sndbuf < need {
        return Err(IpcError::io(
            format!(
                "the socket send buffer of {} is {sndbuf} bytes, too small for {MAX_DATAGRAM}-byte messages; raise net.core.wmem_default to at least {need}",
                path.display()
            ),
            Errno::NOBUFS,
        ));
    }
    Ok(())
}

/// What is behind a socket path.
pub(crate) enum Probe {
    /// A socket listens there.
    Live,
    /// The file exists but nobody listens (ECONNREFUSED).
    Stale,
    /// No such file.
    Gone,
    Err(Errno),
}

/// Probes `path` with `connect()` from `probe` (an unbound datagram socket;
/// connecting a datagram socket sends nothing and may be repeated).
pub(crate) fn probe(probe: &OwnedFd, path: &Path) -> Probe {
    let Ok(a) = SocketAddrUnix::new(path) else {
        return Probe::Err(Errno::NAMETOOLONG);
    };
    match net::connect(probe, &a) {
        Ok(()) => Probe::Live,
        Err(Errno::CONNREFUSED) => Probe::Stale,
        Err(Errno::NOENT) => Probe::Gone,
        Err(e) => Probe::Err(e),
    }
}

/// Removes a stale socket file, only if it is still the socket `ino` (or any
/// socket when `ino` is `None`).
pub(crate) fn remove_stale(path: &Path, ino: Option<u64>) -> std::io::Result<bool> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() || ino.is_some_and(|i| i != meta.ino()) {
        return Ok(false);
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Binds a new socket at `path`, replacing a stale socket file left by a
/// dead process. Returns the socket and the inode of its file.
pub(crate) fn bind_at(path: &Path) -> Result<(OwnedFd, u64), IpcError> {
    let sock = socket().map_err(|e| IpcError::io("creating an AF_UNIX datagram socket", e))?;
    let address = addr(path)?;
    let bind_op = || format!("binding {}", path.display());
    for _ in 0..4 {
        match net::bind(&sock, &address) {
            Ok(()) => {
                let ino = std::fs::symlink_metadata(path)
                    .map_err(|e| IpcError::io(format!("stat {}", path.display()), e))?
                    .ino();
                configure(&sock, path)?;
                return Ok((sock, ino));
            }
            Err(Errno::ADDRINUSE) => {}
            Err(e) => return Err(IpcError::io(bind_op(), e)),
        }
        // Something is there: a socket file of a live endpoint, a stale one,
        // or some other file.
        let meta = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(IpcError::io(format!("stat {}", path.display()), e)),
        };
        if !meta.file_type().is_socket() {
            return Err(IpcError::io(
                format!("{}: exists and is not a socket; remove it", bind_op()),
                Errno::EXIST,
            ));
        }
        let p = socket().map_err(|e| IpcError::io("creating a probe socket", e))?;
        match probe(&p, path) {
            Probe::Live => {
                return Err(IpcError::InUse {
                    path: path.to_owned(),
                    pid: holder_pid(path),
                })
            }
            Probe::Stale => {
                tracing::info!(path = %path.display(), "replacing a stale IPC socket left by a dead process");
                remove_stale(path, Some(meta.ino()))
                    .map_err(|e| IpcError::io(format!("removing stale {}", path.display()), e))?;
            }
            Probe::Gone => {}
            Probe::Err(e) => {
                return Err(IpcError::io(format!("probing {}", path.display()), e));
            }
        }
    }
    // Lost a race with other processes binding and leaving the same path
    // several times in a row.
    Err(IpcError::InUse {
        path: path.to_owned(),
        pid: holder_pid(path),
    })
}

/// The pid of a process holding the socket bound at `path`, found through
/// `/proc/net/unix` (socket inode) and `/proc/*/fd` (who has it open), as
/// `ss -xp` does. Best effort: `None` when not found or not allowed.
pub(crate) fn holder_pid(path: &Path) -> Option<u32> {
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    let want = path.as_os_str().as_bytes();
    // Num RefCount Protocol Flags Type St Inode Path
    let inode = table.lines().skip(1).find_map(|l| {
        let mut f = l.split_whitespace();
        let inode = f.nth(6)?;
        let p = f.next()?;
        (p.as_bytes() == want).then(|| inode.to_owned())
    })?;
    let target = format!("socket:[{inode}]");
    for proc_ent in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_ent
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc_ent.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if std::fs::read_link(fd.path()).is_ok_and(|l| l.as_os_str() == OsStr::new(&target)) {
                return Some(pid);
            }
        }
    }
    None
}

/// Turns a kernel-reported sender address into a path (`None` for unnamed
/// and abstract sockets).
pub(crate) fn sender_path(a: Option<net::SocketAddrAny>) -> Option<PathBuf> {
    let unix = SocketAddrUnix::try_from(a?).ok()?;
    let bytes = unix.path_bytes()?;
    let bytes = bytes.split(|&b| b == 0).next().unwrap_or(bytes);
    (!bytes.is_empty()).then(|| PathBuf::from(OsStr::from_bytes(bytes)))
}

/// One datagram to send.
pub(crate) struct Out<'a> {
    pub kind: Kind,
    pub id: u64,
    pub name: &'a str,
    pub payload: &'a [u8],
    pub fds: &'a [OwnedFd],
}

/// Sends one datagram to `to`, retrying while the peer's queue (or our send
/// buffer) is full until `deadline`. The caller has checked the limits.
pub(crate) fn send(
    sock: &OwnedFd,
    to: &Path,
    out: &Out<'_>,
    deadline: Instant,
) -> Result<(), SendFail> {
    let address = SocketAddrUnix::new(to).map_err(SendFail::Io)?;
    let header = wire::header(
        out.kind,
        out.id,
        out.name.len(),
        out.payload.len(),
        out.fds.len(),
    );
    let iov = [
        IoSlice::new(&header),
        IoSlice::new(out.name.as_bytes()),
        IoSlice::new(out.payload),
    ];
    let borrowed: Vec<BorrowedFd<'_>> = out.fds.iter().map(AsFd::as_fd).collect();
    let space_len = if borrowed.is_empty() {
        0
    } else {
        rustix::cmsg_space!(ScmRights(borrowed.len()))
    };
    let mut space = vec![MaybeUninit::<u8>::uninit(); space_len];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&borrowed)) {
        return Err(SendFail::Io(Errno::NOBUFS));
    }
    loop {
        match net::sendmsg_addr(sock, &address, &iov, &mut control, SendFlags::NOSIGNAL) {
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => {}
            // SO_SNDTIMEO expired (or the queue was full): retry until the
            // caller's deadline. The kernel wakes a blocked sender as soon
            // as the peer dequeues, so this is not a sleep loop.
            Err(Errno::AGAIN) => {
                if Instant::now() >= deadline {
                    return Err(SendFail::Timeout);
                }
            }
            Err(Errno::CONNREFUSED | Errno::NOENT | Errno::PIPE) => return Err(SendFail::NoPeer),
            Err(e) => return Err(SendFail::Io(e)),
        }
    }
}
