//! Errors of the IPC layer.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong when talking to another process of the
/// instance.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IpcError {
    /// No answer arrived in time (the peer is alive but its handler is slow
    /// or stuck, or it kept the request without replying).
    #[error(
        "no answer to \"{name}\" from {} within {after:?}; the peer is alive but its handler is slow or stuck",
        peer.display()
    )]
    Timeout {
        /// The message name.
        name: String,
        /// The peer's socket.
        peer: PathBuf,
        /// The timeout that expired.
        after: Duration,
    },

    /// A one-way message or an answer could not be queued: the peer's receive
    /// queue (and this socket's send buffer) stayed full.
    #[error(
        "cannot deliver \"{name}\" to {}: its receive queue stayed full for {after:?}; is that process stuck?",
        peer.display()
    )]
    SendTimeout {
        /// The message name.
        name: String,
        /// The peer's socket.
        peer: PathBuf,
        /// How long delivery was retried.
        after: Duration,
    },

    /// Nobody listens on the socket (ECONNREFUSED: a stale file, or ENOENT).
    #[error(
        "no process listens on {}; is the primary running (same --file-prefix and runtime directory)? a secondary's socket disappears when it exits",
        path.display()
    )]
    NoPeer {
        /// The socket path.
        path: PathBuf,
    },

    /// The peer has no action registered under this name.
    #[error("{} (pid {pid}) has no handler for \"{name}\"", peer.display())]
    NoHandler {
        /// The message name.
        name: String,
        /// The peer's socket.
        peer: PathBuf,
        /// The peer's pid.
        pid: u32,
    },

    /// The peer's handler returned without replying to the request.
    #[error("the handler for \"{name}\" in {} (pid {pid}) finished without replying", peer.display())]
    NoReply {
        /// The message name.
        name: String,
        /// The peer's socket.
        peer: PathBuf,
        /// The peer's pid.
        pid: u32,
    },

    /// The peer's handler queue was full; the request was not handled.
    #[error("{} (pid {pid}) is too busy to take \"{name}\" (its handler queue is full); retry later", peer.display())]
    Busy {
        /// The message name.
        name: String,
        /// The peer's socket.
        peer: PathBuf,
        /// The peer's pid.
        pid: u32,
    },

    /// A message is over a limit.
    #[error("{what} is {len} bytes/items; at most {max} are allowed")]
    TooLarge {
        /// What is too large ("payload", "fd count").
        what: &'static str,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },

    /// A message or action name is not valid.
    #[error("bad IPC name {name:?}: {why} (1..=63 bytes, no control characters)")]
    BadName {
        /// The name.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },

    /// An action of this name is registered already.
    #[error("an IPC action named \"{name}\" is registered already")]
    DuplicateAction {
        /// The name.
        name: String,
    },

    /// A reply to a one-way message.
    #[error("\"{name}\" was a one-way message; it cannot be replied to")]
    NotRequest {
        /// The message name.
        name: String,
    },

    /// A live endpoint listens on the socket already.
    #[error(
        "{} is in use by {}; another primary of this prefix is running (use another --file-prefix, or start as a secondary)",
        path.display(),
        match pid { Some(p) => format!("pid {p}"), None => "a live process".to_owned() }
    )]
    InUse {
        /// The socket path.
        path: PathBuf,
        /// The process holding it, when it could be found.
        pid: Option<u32>,
    },

    /// The endpoint was closed.
    #[error("the IPC endpoint is closed")]
    Closed,

    /// A system call failed.
    #[error("{op}: {source}")]
    Io {
        /// What was being done, naming the path or peer.
        op: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl IpcError {
    pub(crate) fn io(op: impl Into<String>, e: impl Into<std::io::Error>) -> IpcError {
        IpcError::Io {
            op: op.into(),
            source: e.into(),
        }
    }
}
