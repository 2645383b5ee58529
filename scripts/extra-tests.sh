#!/usr/bin/env bash
# Model checks that need their own build flags: loom permutes thread
# interleavings of the lock-free and process-shared code.
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTFLAGS="--cfg loom"
export CARGO_TARGET_DIR=target/loom
cargo test --quiet --release -p memplane --lib shm::lock::loom_tests
cargo test --quiet --release -p memplane --lib shm::seqlock::loom_tests
LOOM_MAX_PREEMPTIONS=2 cargo test --quiet --release -p memplane-ring --test loom
LOOM_MAX_PREEMPTIONS=3 cargo test --quiet --release -p memplane-mempool --test loom
LOOM_MAX_PREEMPTIONS=3 cargo test --quiet --release -p memplane-mempool --lib bucket_core::loom_tests
