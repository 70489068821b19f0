#!/usr/bin/env bash
# Run every caregate fuzz target for SECONDS each (default 20) with libFuzzer's -max_total_time,
# one after another (each uses one core). Fails (exit 1) if any target finds a crash, a panic,
# a timeout or an out-of-memory; the reproducer is left in tests/fuzz/artifacts/<target>/.
#
# Usage:  tests/fuzz/run.sh [SECONDS] [TARGET...]
#         tests/fuzz/run.sh 5                 # the CI short mode: a few seconds per target
#         tests/fuzz/run.sh 300 fhir_intake   # a longer run of one target
# Reproduce a crash:  cd tests/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run <target> artifacts/<target>/<file>
#
# Toolchain: caregate builds with stable Rust only. cargo-fuzz needs nightly-only rustc flags
# (`-Zsanitizer=address` and sanitizer-coverage instrumentation), so this script sets
# RUSTC_BOOTSTRAP=1, which lets the stable compiler accept them. We chose that over
# `--sanitizer none` because AddressSanitizer also catches stack overflows (deep JSON) and
# out-of-bounds reads in the C code linked in (aws-lc) with a precise report. RUSTC_BOOTSTRAP is
# set only for this fuzz build, which has its own workspace and target directory; the product is
# never built with it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
seconds="${1:-20}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(fhir_intake strict_json nhs_number auth_assertion token_form policy_decide feed_transform
    audit_verify)
fi
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
# Seed from ../shared/corpora, policies/tests/records and `caregate synth` once (each source is
# skipped if absent; the committed seeds always exist).
if ! compgen -G "corpus/policy_decide/gen-*" >/dev/null; then
  bash "$here/seed.sh"
fi

echo "==> building fuzz targets (cargo fuzz build, AddressSanitizer, debug assertions)"
cargo fuzz build

failed=()
summary=()
for target in "${targets[@]}"; do
  echo "==> fuzzing $target for ${seconds}s"
  mkdir -p "corpus/$target" "artifacts/$target"
  log="$(mktemp)"
  status=0
  # -timeout: one input taking >10 s is a hang; -rss_limit_mb: memory is bounded by design.
  cargo fuzz run "$target" "corpus/$target" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
    -print_final_stats=1 >"$log" 2>&1 || status=$?
  runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo "?")
  speed=$(grep -oE 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo "?")
  cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -n 1 || echo "cov: ?")
  corpus=$(find "corpus/$target" -type f | wc -l)
  if [ "$status" -ne 0 ]; then
    failed+=("$target")
    echo "---- $target FAILED (exit $status); last lines of the libFuzzer log:"
    tail -n 60 "$log"
    summary+=("$(printf '%-15s FAILED  runs=%s exec/s=%s %s corpus=%s' "$target" "$runs" "$speed" "$cov" "$corpus")")
  else
    summary+=("$(printf '%-15s ok      runs=%s exec/s=%s %s corpus=%s' "$target" "$runs" "$speed" "$cov" "$corpus")")
  fi
  rm -f "$log"
done

echo
echo "==> fuzz summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "crashes found in: ${failed[*]} (reproducers in tests/fuzz/artifacts/)" >&2
  exit 1
fi
