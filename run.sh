#!/usr/bin/env bash
# The main job: set up (build, hugepages when root), then run memplane.
# Today that is the hugepage status, then a real instance started and torn
# down by `memplane memory` (where its memory went, and that every page came
# back); it becomes the primary/secondary packet demo once mbufs land.
# Extra arguments go to `memplane hugepages`.
set -euo pipefail
cd "$(dirname "$0")"
bin=$(scripts/setup.sh)
"$bin" hugepages status "$@"

# 64M preallocated (32 x 2M) plus 4 x 2M mapped at run time.
need=36
free=$(cat /sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages 2>/dev/null || echo 0)
echo
if [ "$free" -ge "$need" ]; then
  echo "== memplane memory --socket-mem 64 --alloc 2M=4"
  exec "$bin" memory --socket-mem 64 --alloc 2M=4
fi
if [ ! -d /sys/kernel/mm/hugepages/hugepages-2048kB ]; then
  why="this kernel has no 2M hugepages"
elif [ "$(id -u)" -ne 0 ]; then
  why="not root, so setup could not reserve hugepages, and only $free 2M pages are free (need $need)"
else
  why="only $free 2M hugepages are free (need $need; setup could not reserve more, see above)"
fi
echo "== $why: showing an instance without hugepages instead"
echo "== memplane memory --no-huge -m 64"
exec "$bin" memory --no-huge -m 64
