#!/usr/bin/env bash
# Shared set-up for ./run.sh and ./test.sh: toolchain check, build, and (as
# root) the hugepages memplane needs. Safe to run again: it only raises pools
# that are too small and never removes anything.
#
# Environment:
#   MEMPLANE_PAGES_2M  2 MiB pages to have in the pool (default 1024 = 2 GiB)
#   MEMPLANE_PAGES_1G  1 GiB pages to try for (default 2; skipped if the
#                      kernel will not grant them)
set -euo pipefail
cd "$(dirname "$0")/.."

want_2m=${MEMPLANE_PAGES_2M:-1024}
want_1g=${MEMPLANE_PAGES_1G:-2}
say() { printf '[setup] %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
  else
    say "cargo is not installed. Install Rust (https://rustup.rs), then run this again."
    exit 1
  fi
fi

profile=${MEMPLANE_PROFILE:-release}
say "building memplane ($profile)"
cargo build --quiet --profile "$profile" -p memplane-cli
bin="target/$profile/memplane"

pool() { cat "/sys/kernel/mm/hugepages/hugepages-$1kB/nr_hugepages" 2>/dev/null || echo 0; }
free_pages() { cat "/sys/kernel/mm/hugepages/hugepages-$1kB/free_hugepages" 2>/dev/null || echo 0; }

if [ "$(id -u)" -eq 0 ]; then
  if [ -d /sys/kernel/mm/hugepages/hugepages-2048kB ]; then
    have=$(pool 2048); used=$(( have - $(free_pages 2048) ))
    target=$(( want_2m + used ))
    if [ "$(free_pages 2048)" -lt "$want_2m" ]; then
      say "reserving 2M pages: pool $have -> $target"
      "$bin" hugepages reserve "2M=$target" >&2 || say "the kernel granted fewer 2M pages than asked (see above)"
    fi
  else
    say "this kernel has no 2M hugepages"
  fi
  if [ -d /sys/kernel/mm/hugepages/hugepages-1048576kB ] && [ "$want_1g" -gt 0 ]; then
    if [ "$(free_pages 1048576)" -lt "$want_1g" ]; then
      have=$(pool 1048576); used=$(( have - $(free_pages 1048576) ))
      say "trying for 1G pages: pool $have -> $(( want_1g + used ))"
      "$bin" hugepages reserve "1G=$(( want_1g + used ))" >&2 || say "1G pages not (fully) granted; tests that need them will say so"
    fi
  fi
  if ! awk '$3=="hugetlbfs"{f=1} END{exit !f}' /proc/mounts; then
    say "mounting hugetlbfs at /dev/hugepages (for --huge-dir users and DPDK)"
    "$bin" hugepages mount /dev/hugepages >&2 || say "could not mount hugetlbfs; memfd backing does not need it"
  fi
else
  say "not root: hugepages were not reserved or mounted. To do it by hand:"
  say "  sudo $bin hugepages reserve 2M=$want_2m 1G=$want_1g && sudo $bin hugepages mount"
  say "  (or: echo $want_2m | sudo tee /proc/sys/vm/nr_hugepages)"
  say "tests that need hugepages will be skipped and say why (they fail under CI=true)."
fi
echo "$bin"
