#!/usr/bin/env bash
# The main job: set up (build; hugepages when root), then run the memplane
# demo: a primary and a secondary process move packets through shared
# hugepage memory for a few seconds, every byte checked, and report where the
# memory came from, a memory map, pool usage and throughput.
# Without free hugepages the demo says so in one line and runs on 4 KiB
# pages (--no-huge). Arguments go to `memplane demo`, e.g.
#   ./run.sh --duration 10 --packet-size 1514
set -euo pipefail
cd "$(dirname "$0")"
bin=$(scripts/setup.sh)
exec "$bin" demo "$@"
