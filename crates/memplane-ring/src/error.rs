//! Error types.

use crate::SyncMode;

/// Errors from creating, attaching to or configuring a ring. Nothing in the
/// region is changed when one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RingError {
    /// Capacity 0 was requested.
    #[error("ring capacity must be at least 1")]
    ZeroCapacity,
    /// Capacity above the maximum.
    #[error("ring capacity {requested} exceeds the maximum of {max} elements")]
    CapacityTooLarge {
        /// What was asked.
        requested: u64,
        /// The largest capacity supported.
        max: u32,
    },
    /// A non-power-of-two capacity without `RingConfig::exact`.
    #[error("ring capacity {0} is not a power of two; set RingConfig::exact to get exactly that many slots")]
    NotPowerOfTwo(u32),
    /// Element size not a non-zero multiple of 4 bytes.
    #[error("element size {0} bytes is not a non-zero multiple of 4")]
    ElementSize(usize),
    /// Element alignment above the 64-byte slot alignment.
    #[error("element alignment {0} exceeds the 64-byte alignment of the slot array")]
    ElementAlign(usize),
    /// Name longer than [`NAME_MAX`](crate::NAME_MAX) bytes or containing a NUL byte.
    #[error("ring name {name:?} is invalid: at most {max} bytes and no NUL byte")]
    BadName {
        /// The name given.
        name: String,
        /// The maximum length in bytes.
        max: usize,
    },
    /// The region cannot hold the header and slots.
    #[error("memory region of {got} bytes is too small: the ring needs {needed} bytes")]
    RegionTooSmall {
        /// Bytes needed.
        needed: usize,
        /// Bytes provided.
        got: usize,
    },
    /// The region does not start on a 64-byte boundary.
    #[error("memory region at {addr:#x} is not 64-byte aligned")]
    Misaligned {
        /// Start address of the region in this process.
        addr: usize,
    },
    /// The region does not start with a ring header.
    #[error("bad header magic {found:#x} (expected {expected:#x}): the region holds no initialised memplane ring")]
    BadMagic {
        /// What the header holds.
        found: u64,
        /// What a ring header holds.
        expected: u64,
    },
    /// The header was written by an incompatible layout version.
    #[error("ring layout version {found} is not supported (this build reads version {expected})")]
    BadVersion {
        /// Version in the header.
        found: u32,
        /// Version this build understands.
        expected: u32,
    },
    /// The header is internally inconsistent.
    #[error("corrupt ring header: {0}")]
    CorruptHeader(&'static str),
    /// The ring holds elements of another size than the handle expects.
    #[error(
        "element size mismatch: the ring holds {ring}-byte elements, the handle expects {expected}"
    )]
    ElementSizeMismatch {
        /// Element size recorded in the header.
        ring: u32,
        /// Element size of the handle's type.
        expected: usize,
    },
    /// The single-producer or single-consumer role is held by another handle.
    #[error("the single {role} role of ring {name:?} is already held by another handle (in this or another process)")]
    RoleTaken {
        /// `"producer"` or `"consumer"`.
        role: &'static str,
        /// Ring name.
        name: String,
    },
    /// An operation needs another sync mode.
    #[error("{op} needs sync mode {needed}, but the ring's {role} side is {actual:?}")]
    WrongMode {
        /// The operation.
        op: &'static str,
        /// The modes that support it.
        needed: &'static str,
        /// `"producer"` or `"consumer"`.
        role: &'static str,
        /// The ring's mode.
        actual: SyncMode,
    },
    /// An invalid argument other than the above.
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    /// A system call failed (mapping memory, memfd).
    #[error("{op} failed: {errno}")]
    Os {
        /// The call.
        op: &'static str,
        /// The errno.
        errno: rustix::io::Errno,
    },
}

/// Errors from bulk (all-or-nothing) transfers. Small and `Copy` so the hot
/// path stays cheap. Nothing was transferred when one is returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BulkError {
    /// Not enough free slots (enqueue) or entries (dequeue) right now.
    #[error("asked for {requested} elements but only {available} are available right now")]
    Insufficient {
        /// Elements asked for.
        requested: u32,
        /// Free slots (enqueue) or entries (dequeue) seen.
        available: u32,
    },
    /// The bulk can never succeed: it is larger than the ring.
    #[error("a bulk of {requested} elements can never fit a ring of capacity {capacity}")]
    TooLarge {
        /// Elements asked for.
        requested: usize,
        /// Ring capacity.
        capacity: u32,
    },
    /// A raw byte buffer whose length is not a multiple of the element size.
    #[error("buffer of {len} bytes is not a whole number of {esize}-byte elements")]
    BadLength {
        /// Buffer length in bytes.
        len: usize,
        /// Element size in bytes.
        esize: u32,
    },
}
