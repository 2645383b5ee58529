//! Runtime directory (placeholder; being written).
