//! Preflight (placeholder; being written).
/// Preflight error.
#[derive(Debug, thiserror::Error)]
#[error("preflight")]
pub struct PreflightError;
