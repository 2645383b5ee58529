//! Building blocks that live inside shared memory and are used by several
//! processes at once.

pub mod lock;
pub(crate) mod seqlock;
pub mod vaspace;
