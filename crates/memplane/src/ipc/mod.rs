//! Messages between the processes of one instance (DPDK's `rte_mp`).
//!
//! Every process of an instance owns one [`Endpoint`]: an `AF_UNIX`
//! datagram socket in the instance's runtime directory. The primary's is
//! `<dir>/mp_socket`, each secondary's `<dir>/mp_socket_<pid>_<n>`. Messages
//! are named ([`Message::name`]), carry up to [`MAX_PAYLOAD`] bytes and up to
//! [`MAX_FDS`] file descriptors (passed with `SCM_RIGHTS`, so the receiver
//! gets its own descriptors for the same open files: this is how memfd-backed
//! memory reaches a secondary).
//!
//! A process registers *actions* by name ([`Handle::register_action`]).
//! Others [`send`](Handle::send) it one-way messages, or
//! [`request`](Handle::request) an answer and block until it comes, the
//! timeout passes, or a typed error says why none will come (no handler, the
//! handler returned without replying, the peer is gone or busy).
//! [`broadcast`](Handle::broadcast) and [`request_all`](Handle::request_all)
//! reach every secondary ([`peers`](Handle::peers)).
//!
//! # Threads
//!
//! Each endpoint runs two threads:
//!
//! - the **receiver** reads datagrams, checks them (see below), hands
//!   answers to the thread waiting for them (by request id) and queues
//!   one-way messages and requests for the worker. It never runs user code
//!   and never blocks for long, so answers keep flowing while handlers run.
//!   A request for a name nobody registered is answered "no handler" by the
//!   receiver at once.
//! - the **worker** calls the actions, one at a time, in arrival order. An
//!   action may itself make blocking requests to other processes (the
//!   primary's allocation handler asks every secondary to resync and waits
//!   for all of them). It must not make a request that needs *this*
//!   process's worker (a request to its own endpoint, or to a peer whose
//!   handler calls back into this process's actions while this one waits):
//!   that waits until its timeout. The queue holds at most 256 messages; a
//!   request that finds it full is answered "busy" ([`IpcError::Busy`]).
//!
//! An [`Incoming`] request must be answered with [`Incoming::reply`]. It
//! may be kept and answered later from another thread; dropping it without
//! a reply sends a "no reply" answer, so the requester gets
//! [`IpcError::NoReply`] at once instead of waiting for its timeout.
//!
//! # Closing
//!
//! [`Endpoint::close`] (and drop) stops receiving, removes the socket file,
//! fails requests still waiting with [`IpcError::Closed`], drops the
//! registered actions, and waits for the threads: the receiver stops at
//! once; the worker gets up to one second to finish the action it is
//! running (an action blocked in a request on this endpoint is released at
//! once by the closing), after which it is left to finish on its own
//! (detached; it exits after that action). Requests still queued are
//! answered "no reply". Actions that need to send should use the
//! [`Handle`] passed in [`Incoming::handle`] rather than capture the
//! endpoint.
//!
//! # Checks on what arrives
//!
//! The receive buffer is fixed (the largest valid datagram) and nothing a
//! peer sends can make the receiver allocate more than one message's worth
//! or panic. A datagram is rejected (its descriptors closed, the counter
//! [`Handle::rejected`] bumped, a rate-limited warning logged) when:
//!
//! - the sender's uid (from `SCM_CREDENTIALS`, attached by the kernel to
//!   every datagram because the socket has `SO_PASSCRED`) is neither this
//!   process's effective uid nor root, or no credentials arrived;
//! - the sender has no filesystem address (nowhere to answer);
//! - it was truncated (`MSG_TRUNC`: larger than any valid message;
//!   `MSG_CTRUNC`: descriptors did not fit);
//! - the header is bad: magic, version, kind, flags, request id, name length
//!   (0 or over 63), payload length (over 32 KiB), total length different
//!   from what the header announces, descriptor count different from the
//!   descriptors that arrived, a body on a bodiless answer;
//! - the name is not UTF-8 or has control characters;
//! - it answers a request id nobody waits for, or comes from another socket
//!   than the one the request went to. (A late answer to a request that
//!   timed out recently is dropped quietly, not counted.)
//!
//! The wire format is described in `docs/ARCHITECTURE.md` ("IPC").

mod endpoint;
mod error;
mod sock;
mod wire;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

pub use endpoint::{Endpoint, Handle, Incoming};
pub use error::IpcError;

/// The longest message or action name, in bytes.
pub const MAX_NAME: usize = 63;
/// The largest payload, in bytes.
pub const MAX_PAYLOAD: usize = 32 * 1024;
/// The most descriptors one message can carry (the kernel's `SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;
/// File name of the primary's socket in the runtime directory.
pub const PRIMARY_SOCKET: &str = "mp_socket";
/// How long a one-way message or an answer may wait for room in the
/// peer's receive queue before [`IpcError::SendTimeout`].
pub const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// DPDK's timeout for memory requests; a sensible default for
/// [`Handle::request`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// A message: a name, a payload and descriptors.
#[derive(Debug, Default)]
pub struct Message {
    /// The action name (1..=[`MAX_NAME`] bytes, no control characters).
    pub name: String,
    /// Up to [`MAX_PAYLOAD`] bytes.
    pub payload: Vec<u8>,
    /// Up to [`MAX_FDS`] descriptors. Sending dups them into the receiver;
    /// the sender's copies are closed when the message is dropped.
    pub fds: Vec<OwnedFd>,
}

impl Message {
    /// A message without descriptors. Limits are checked when it is sent.
    pub fn new(name: impl Into<String>, payload: impl Into<Vec<u8>>) -> Message {
        Message {
            name: name.into(),
            payload: payload.into(),
            fds: Vec::new(),
        }
    }

    /// A message with descriptors.
    pub fn with_fds(
        name: impl Into<String>,
        payload: impl Into<Vec<u8>>,
        fds: Vec<OwnedFd>,
    ) -> Message {
        Message {
            name: name.into(),
            payload: payload.into(),
            fds,
        }
    }

    /// A copy with duplicated descriptors.
    pub fn try_clone(&self) -> Result<Message, IpcError> {
        let fds = self
            .fds
            .iter()
            .map(OwnedFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(|e| IpcError::io(format!("duplicating the fds of \"{}\"", self.name), e))?;
        Ok(Message {
            name: self.name.clone(),
            payload: self.payload.clone(),
            fds,
        })
    }

    /// Checks the limits ([`MAX_NAME`], [`MAX_PAYLOAD`], [`MAX_FDS`]).
    pub fn check(&self) -> Result<(), IpcError> {
        check_name(&self.name)?;
        if self.payload.len() > MAX_PAYLOAD {
            return Err(IpcError::TooLarge {
                what: "payload",
                len: self.payload.len(),
                max: MAX_PAYLOAD,
            });
        }
        if self.fds.len() > MAX_FDS {
            return Err(IpcError::TooLarge {
                what: "fd count",
                len: self.fds.len(),
                max: MAX_FDS,
            });
        }
        Ok(())
    }
}

fn check_name(name: &str) -> Result<(), IpcError> {
    wire::check_name(name).map_err(|why| IpcError::BadName {
        name: name.chars().take(80).collect(),
        why,
    })
}

/// Who sent a message: credentials from the kernel (`SCM_CREDENTIALS`) and
/// the sender's socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The sending process.
    pub pid: u32,
    /// Its uid.
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
    /// Its socket: where answers go.
    pub path: PathBuf,
}
