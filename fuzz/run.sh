#!/usr/bin/env bash
# The fuzzing gate: builds every cargo-fuzz target once and runs each from
# its seed corpus for a bounded time; fails on the first crash, timeout or
# out-of-memory. See docs/security.md, "Fuzzing".
#
#   fuzz/run.sh                          every target, 20 s each, two at a time
#   fuzz/run.sh http1_front xds_response only these
#   POSTERN_FUZZ_SECONDS=3600 fuzz/run.sh route_match
set -euo pipefail
cd "$(dirname "$0")"

seconds="${POSTERN_FUZZ_SECONDS:-20}"
jobs="${POSTERN_FUZZ_JOBS:-2}"
# The sanitizer-coverage build needs nightly; it cannot be downloaded here,
# so it must already be installed.
toolchain="${POSTERN_FUZZ_TOOLCHAIN:-nightly}"
rustup run "$toolchain" rustc --version >/dev/null 2>&1 || {
  echo "fuzz/run.sh: the $toolchain toolchain is not installed" >&2
  exit 1
}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install --locked --quiet cargo-fuzz
# A workspace CARGO_TARGET_DIR would mix instrumented builds into it.
export CARGO_TARGET_DIR="${POSTERN_FUZZ_TARGET_DIR:-$PWD/target}"

# `--dev` with the opt-level 1 profile of fuzz/Cargo.toml: about half the
# build time of cargo-fuzz's release mode for a similar speed. No
# sanitizer: the workspace forbids unsafe code.
flags=(--dev --sanitizer none)
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo +"$toolchain" fuzz list)
fi
cargo +"$toolchain" fuzz build "${flags[@]}"

mkdir -p logs
run() {
  local target=$1
  # New inputs go to corpus/ (not committed); seeds/ is only read.
  mkdir -p "corpus/$target"
  cargo +"$toolchain" fuzz run "${flags[@]}" "$target" "corpus/$target" "seeds/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"logs/$target.log" 2>&1
}

failed=()
pids=()
names=()
reap() {
  local i=$1
  if wait "${pids[$i]}"; then
    echo "fuzz ${names[$i]}: ok ($(grep -o 'Done [0-9]* runs' "logs/${names[$i]}.log" || true))"
  else
    failed+=("${names[$i]}")
    echo "fuzz ${names[$i]}: FAILED" >&2
  fi
}
for target in "${targets[@]}"; do
  if [ ${#pids[@]} -ge "$jobs" ]; then
    reap 0
    pids=("${pids[@]:1}")
    names=("${names[@]:1}")
  fi
  run "$target" &
  pids+=($!)
  names+=("$target")
done
for i in "${!pids[@]}"; do
  reap "$i"
done

if [ ${#failed[@]} -gt 0 ]; then
  for target in "${failed[@]}"; do
    echo "---- $target" >&2
    grep -v '^#' "logs/$target.log" | tail -40 >&2
    for crash in artifacts/"$target"/*; do
      [ -f "$crash" ] || continue
      # The input itself, so it can be turned into a regression test.
      echo "---- $crash (base64)" >&2
      base64 "$crash" >&2
    done
  done
  exit 1
fi
