#!/usr/bin/env bash
# The main job: set up (build, hugepages when root), then run memplane.
# Today that is the hugepage status; it becomes the primary/secondary packet
# demo once mbufs land. Extra arguments go to `memplane hugepages`.
set -euo pipefail
cd "$(dirname "$0")"
bin=$(scripts/setup.sh)
exec "$bin" hugepages status "$@"
