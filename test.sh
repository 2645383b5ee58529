#!/usr/bin/env bash
# The whole test suite: set up (build, hugepages when root), lint, test, then
# check that no hugepage and no hugetlbfs file was leaked.
set -euo pipefail
cd "$(dirname "$0")"
export MEMPLANE_PROFILE=${MEMPLANE_PROFILE:-release}
bin=$(scripts/setup.sh)

step() { printf '\n== %s\n' "$*"; }
step "snapshot before tests"
"$bin" hugepages status | head -20 || true
before_free=$(for d in /sys/kernel/mm/hugepages/hugepages-*; do echo "$d $(cat "$d/free_hugepages")"; done)

step "format and lints"
cargo fmt --all -- --check
cargo clippy --quiet --workspace --all-targets -- -D warnings
# rustdoc: no broken, private or redundant intra-doc links, no stray HTML.
# (cargo's "output filename collision" warning, the CLI bin `memplane` vs
# the lib `memplane`, is cargo's own and does not fail this.)
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --workspace --quiet

step "tests"
cargo test --workspace --release 2>&1 | tee target/test-output.txt | grep -vE '^test .* \.\.\. ok$'

if [ -x scripts/extra-tests.sh ]; then
  step "extra tests (loom models)"
  scripts/extra-tests.sh
fi

step "leak check"
leaks=0
while read -r d free; do
  now=$(cat "$d/free_hugepages")
  if [ "$now" -lt "$free" ]; then
    echo "LEAK: ${d##*/}: $free free before the tests, $now after" >&2; leaks=1
  fi
done <<< "$before_free"
while read -r m; do
  n=$(find "$m" -maxdepth 2 -type f | wc -l)
  if [ "$n" -gt 0 ]; then echo "LEAK: $n file(s) left in $m: $(ls "$m" | head -5 | tr '\n' ' ')" >&2; leaks=1; fi
done < <(awk '$3=="hugetlbfs"{print $2}' /proc/mounts)
[ "$leaks" -eq 0 ] || { echo "hugepages or hugetlbfs files leaked by the tests" >&2; exit 1; }
echo "no hugepages leaked"

# Children of the multi-process tests print into the same stdout, so a
# summary line can come out garbled; count the whole ones, and say how many
# were not (cargo test's exit status, not this count, decides the run).
summary='^test result: (ok|FAILED)\. [0-9]+ passed; [0-9]+ failed; [0-9]+ ignored;'
passed=$(grep -E "$summary" target/test-output.txt | awk '{p+=$4; f+=$6; i+=$8} END{print p" passed, "f" failed, "i" skipped"}')
garbled=$(grep -E '^test result:' target/test-output.txt | grep -cvE "$summary" || true)
note=""
[ "$garbled" -gt 0 ] && note=" ($garbled summary line(s) garbled by the output of child processes, not counted)"
echo "tests: $passed$note"
