//! Options (placeholder; being written).
/// Options error.
#[derive(Debug, thiserror::Error)]
#[error("options")]
pub struct OptionsError;
/// Options.
#[derive(Debug, Default)]
pub struct MemOptions;
