//! The crate's error type.
//!
//! Every error names what was asked, what was found, and where it helps, the
//! fix. Library code returns these; it never panics on user input.

use std::path::PathBuf;

/// Result alias used across memplane.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in memplane.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An option or a combination of options is invalid.
    #[error(transparent)]
    Options(#[from] crate::options::OptionsError),

    /// The memory request cannot be served by this machine; the message
    /// explains why for every (node, page size) that falls short and how to
    /// fix it.
    #[error(transparent)]
    Preflight(#[from] crate::preflight::PreflightError),

    /// A shared-memory array operation failed (bad index, double free, lock
    /// held by a dead process, ...).
    #[error(transparent)]
    FbArray(#[from] crate::fbarray::FbArrayError),

    /// A process-shared lock could not be taken (timeout naming the holder,
    /// or a holder that died).
    #[error(transparent)]
    Lock(#[from] crate::shm::lock::LockError),

    /// A memseg list or page allocation error.
    #[error(transparent)]
    Memseg(#[from] crate::memseg::MemsegError),

    /// A malloc heap operation was refused (bad size or alignment, out of
    /// memory with the reason, bad pointer, double free, corruption).
    #[error(transparent)]
    Heap(#[from] crate::heap::HeapError),

    /// A memzone operation was refused (bad name, flags, alignment or
    /// bound, name in use, table full, stale handle, no memory).
    #[error(transparent)]
    Memzone(#[from] crate::memzone::MemzoneError),

    /// An IPC message could not be sent or answered (peer gone, timeout,
    /// malformed).
    #[error(transparent)]
    Ipc(#[from] crate::ipc::IpcError),

    /// A multi-process operation failed: no primary, attach refused, VA
    /// conflict, primary gone, sync failed.
    #[error(transparent)]
    Mp(#[from] crate::mp::MpError),

    /// A system file or directory could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What memplane was doing ("reading", "creating", ...).
        action: &'static str,
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A system file had content memplane could not understand.
    #[error("cannot parse {path}: {detail}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong with it.
        detail: String,
    },

    /// A request named something the machine does not have (a NUMA node, a
    /// page size).
    #[error("{what}")]
    NotFound {
        /// Full explanation including what does exist.
        what: String,
    },

    /// The operation needs privileges this process lacks.
    #[error("{what}: permission denied; {fix}")]
    Permission {
        /// What was attempted.
        what: String,
        /// How to get it done.
        fix: String,
    },

    /// The kernel refused or only partly granted a request.
    #[error("{0}")]
    System(String),

    /// The runtime directory is held by a live process of the same prefix.
    #[error("file prefix '{prefix}' is in use by a live primary process (pid {pid}); choose another --file-prefix or start with --proc-type secondary")]
    PrefixInUse {
        /// The prefix.
        prefix: String,
        /// The pid holding the primary lock, when known (0 if unknown).
        pid: u32,
    },
}

impl Error {
    /// Wraps an I/O error with the action and path it concerns.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
