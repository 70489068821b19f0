#!/usr/bin/env bash
# DOMAIN.md B2 row F1 — SIGKILL at random moments during ingest and delivery, many times over.
#
# Three loops, each killing the real caregate binary ITERATIONS times (all three by default):
#   curl      this script's own ingest loop with curl clients (below);
#   ingest    the test suite's ingest loop (tests/tests/durability.rs,
#             f1_repeated_sigkill_during_ingest_…), run with CAREGATE_CRASH_ITERATIONS=ITERATIONS;
#   delivery  the test suite's delivery loop (durability.rs,
#             f1_f5_repeated_sigkill_during_delivery_…): the gateway pushes what the shipped
#             policy allows to a spawned HTTPS partner while it is killed; every allowed record
#             must arrive, repeats only with the record's one idempotency key, per-patient order
#             kept. Same environment variable.
# CI runs the last two with the default of 20 kills each (cargo nextest … --test durability).
#
# The curl loop, each iteration: start the real caregate binary on the same data directory, get a
# token, let several concurrent curl clients submit Observations (each with its own X-Request-Id
# and a unique value) over keep-alive HTTPS, SIGKILL the gateway at a random moment, restart it.
# Then:
#   - every record the clients saw acknowledged (201 + Location) is read back (GET) and must be
#     the same content that was submitted (ignoring the server's id and meta) -> else "lost";
#   - each client's request that was in flight at the kill (outcome unknown) is retried with the
#     same X-Request-Id, as a real client would, and must succeed;
#   - at the end, after a clean SIGTERM, the store must hold exactly one record per submitted
#     value (sqlite3 over the data directory) -> else "duplicated".
# Prints `lost: L, duplicated: D, iterations: N` and exits 1 unless both are 0 and nothing else
# went wrong.
#
# Usage: tests/crash-loop.sh [ITERATIONS] [curl|ingest|delivery ...]
#        (default 20 iterations, all three loops; hundreds are fine)
# Environment: CAREGATE_BIN (default: target/release/caregate if built, else a debug build),
#              CRASH_LOOP_CLIENTS (default 4), CRASH_LOOP_MAX_DELAY_MS (default 800),
#              CRASH_LOOP_KEEP=1 to keep the work directory.
# Needs: curl (7.84+), jq, and sqlite3 for the duplicate count (skipped with a warning if absent);
# cargo (and cargo-nextest if installed) for the suite's loops.
set -euo pipefail

iterations="${1:-20}"
shift || true
loops=("$@")
[ ${#loops[@]} -gt 0 ] || loops=(curl ingest delivery)
for loop in "${loops[@]}"; do
  case "$loop" in
    curl | ingest | delivery) ;;
    *) echo "crash-loop: unknown loop '$loop' (curl, ingest or delivery)" >&2; exit 2 ;;
  esac
done
wants() { [[ " ${loops[*]} " == *" $1 "* ]]; }
clients="${CRASH_LOOP_CLIENTS:-4}"
max_delay_ms="${CRASH_LOOP_MAX_DELAY_MS:-800}"
per_client=1000 # requests prepared per client per iteration; the kill comes long before
root="$(cd "$(dirname "$0")/.." && pwd)"

if wants curl; then
  for tool in curl jq; do
    command -v "$tool" >/dev/null || { echo "crash-loop: $tool is required" >&2; exit 2; }
  done
fi

bin="${CAREGATE_BIN:-}"
if [ -z "$bin" ]; then
  target="${CARGO_TARGET_DIR:-$root/target}"
  if [ -x "$target/release/caregate" ]; then
    bin="$target/release/caregate"
  else
    (cd "$root" && cargo build --quiet -p caregate --bin caregate)
    bin="$target/debug/caregate"
  fi
fi

work="$(mktemp -d)"
pid=""
cleanup() {
  if [ -n "$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
  if [ "${CRASH_LOOP_KEEP:-0}" = 1 ]; then echo "crash-loop: work directory kept: $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# --- the curl loop -----------------------------------------------------------------------------
curl_loop() {
partner="gp-crash"
"$bin" partner-key --partner "$partner" --alg ES256 --out "$work/keys" >/dev/null
cat >"$work/caregate.toml" <<EOF
[server]
listen = "127.0.0.1:0"
data_dir = "data"
shutdown_grace_secs = 10

[[partner]]
id = "$partner"
name = "Crash loop GP"
ods_code = "A81001"
kind = "gp"
scopes = ["system/Observation.cr"]
jwks_file = "keys/$partner.jwks.json"
EOF

# The Observation every request sends; VALUE is unique per request.
template='{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"http://snomed.info/sct","code":"271649006","display":"Systolic blood pressure"}]},"subject":{"identifier":{"system":"https://fhir.nhs.uk/Id/nhs-number","value":"9434765919"}},"effectiveDateTime":"2026-11-20T09:30:00Z","valueQuantity":{"value":VALUE,"unit":"mmHg","system":"http://unitsofmeasure.org","code":"mm[Hg]"}}'
body_for() { printf '%s' "${template/VALUE/$1}"; }
# Canonical form (sorted keys, no id/meta) for comparing what was sent with what is read back.
canonical_for() { body_for "$1" | jq -c -S 'del(.id, .meta)'; }

url=""
token=""
start_gateway() {
  : >"$work/stdout"
  "$bin" serve --config "$work/caregate.toml" >"$work/stdout" 2>>"$work/stderr" &
  pid=$!
  local deadline=$((SECONDS + 120))
  url=""
  while [ -z "$url" ]; do
    url="$(sed -n 's/^caregate listening on //p' "$work/stdout" | head -n 1)"
    if [ -z "$url" ]; then
      if ! kill -0 "$pid" 2>/dev/null; then
        echo "crash-loop: the gateway exited during start-up; stderr:" >&2
        tail -n 20 "$work/stderr" >&2
        exit 1
      fi
      [ "$SECONDS" -lt "$deadline" ] || { echo "crash-loop: the gateway did not start" >&2; exit 1; }
      sleep 0.05 # polling the start-up line, not timing anything
    fi
  done
  token="$("$bin" token --config "$work/caregate.toml" --partner "$partner" --url "$url" \
    --ca-cert "$work/data/dev-certificate.pem" --raw)"
}

# A curl config of requests; each block ends with `next` so every transfer has its own options.
# Arguments: output config path, then "request-id value" lines on stdin.
write_requests() {
  local out="$1" id value body
  {
    while read -r id value; do
      body="${template/VALUE/$value}"
      printf 'url = "%s/fhir/Observation"\n' "$url"
      printf 'cacert = "%s"\n' "$work/data/dev-certificate.pem"
      printf 'header = "Authorization: Bearer %s"\n' "$token"
      printf 'header = "Content-Type: application/fhir+json"\n'
      printf 'header = "X-Request-Id: %s"\n' "$id"
      printf 'data-binary = "%s"\n' "${body//\"/\\\"}"
      printf 'output = "/dev/null"\n'
      printf 'write-out = "%%{http_code} %%header{location}\\n"\n'
      printf 'next\n'
    done
  } >"$out"
}

acked="$work/acked"       # request-id value location, for every acknowledged record
: >"$acked"
: >"$work/acked.now"      # the same, for the last round only
pending="$work/pending"   # request-id value, in flight at the last kill
: >"$pending"
lost=0
errors=0
kills=0

# Read back `request-id value location` lines; count those missing or changed. One curl (keep-
# alive) for all the GETs and one jq for all the bodies, so hundreds of iterations stay fast.
canonical_template="$(canonical_for 987654321)"
verify() {
  local list="$1" cfg="$work/verify.cfg" got="$work/got" n=0
  [ -s "$list" ] || return 0
  rm -rf "$got"; mkdir -p "$got"
  local path
  while read -r id value location; do
    n=$((n + 1))
    # The port changes at every restart: keep only the resource's path (read the current version).
    path="${location#*/fhir/}"
    path="${path%%/_history*}"
    printf 'url = "%s/fhir/%s"\ncacert = "%s"\nheader = "Authorization: Bearer %s"\noutput = "%s/%d.json"\nwrite-out = "%%{http_code}\\n"\nnext\n' \
      "$url" "$path" "$work/data/dev-certificate.pem" "$token" "$got" "$n"
  done <"$list" >"$cfg"
  curl -s -K "$cfg" >"$work/verify.status" 2>/dev/null || true
  # n.json -> canonical body, for the records that answered 200.
  declare -A bodies=()
  local files=() i=0 status
  while read -r status; do
    i=$((i + 1))
    [ "$status" = 200 ] && files+=("$got/$i.json")
  done <"$work/verify.status"
  if [ ${#files[@]} -gt 0 ]; then
    # One sorted line per file, in order (jq 1.6's -S does not sort inside `tojson`, so the
    # file name cannot share the line).
    local k=0
    while IFS= read -r body; do
      bodies["${files[$k]}"]="$body"
      k=$((k + 1))
    done < <(jq -c -S 'del(.id, .meta)' "${files[@]}")
  fi
  i=0
  while read -r id value location status; do
    i=$((i + 1))
    if [ "$status" != 200 ]; then
      echo "LOST: $id (value $value) at $location answered ${status:-nothing}" >&2
      lost=$((lost + 1))
    elif [ "${bodies["$got/$i.json"]:-}" != "${canonical_template/987654321/$value}" ]; then
      echo "CHANGED: $id (value $value) at $location" >&2
      lost=$((lost + 1))
    fi
  done < <(paste -d' ' "$list" "$work/verify.status")
}

started=$SECONDS
for ((iteration = 1; iteration <= iterations; iteration++)); do
  start_gateway
  # The previous round's acknowledged records, read back right after the restart.
  verify "$work/acked.now"

  # Retry what was in flight at the last kill, with the same X-Request-Id.
  if [ -s "$pending" ]; then
    write_requests "$work/retry.cfg" <"$pending"
    results="$(curl -s -K "$work/retry.cfg" 2>/dev/null || true)"
    paste -d' ' "$pending" <(printf '%s\n' "$results") | while read -r id value status location; do
      if [ "$status" = 201 ] || [ "$status" = 200 ]; then
        printf '%s %s %s\n' "$id" "$value" "$location" >>"$acked"
      else
        echo "RETRY FAILED: $id answered $status" >&2
        echo x >>"$work/retry-errors"
      fi
    done
    : >"$pending"
  fi

  # Concurrent clients, each one keep-alive curl working through its list.
  client_pids=()
  for ((c = 1; c <= clients; c++)); do
    list="$work/list.$c"
    for ((n = 0; n < per_client; n++)); do
      # value = iteration * 100000 + client * 10000 + n, unique per request.
      printf 'i%dc%dn%d %d\n' "$iteration" "$c" "$n" $((iteration * 100000 + c * 10000 + n))
    done >"$list"
    write_requests "$work/requests.$c.cfg" <"$list"
    curl -s -K "$work/requests.$c.cfg" >"$work/out.$c" 2>/dev/null &
    client_pids+=($!)
  done

  # SIGKILL at a random moment (this is the fault being injected, not synchronisation).
  delay_ms=$((RANDOM % max_delay_ms + 20))
  sleep "$(printf '%d.%03d' $((delay_ms / 1000)) $((delay_ms % 1000)))"
  kill -KILL "$pid"
  wait "$pid" 2>/dev/null || true
  pid=""
  kills=$((kills + 1))
  for client_pid in "${client_pids[@]}"; do wait "$client_pid" || true; done

  # Line k of a client's output is the outcome of its request k (curl works through its list in
  # order): 201 = acknowledged; the first failure is the one in flight; later ones never left.
  : >"$work/acked.now"
  for ((c = 1; c <= clients; c++)); do
    paste -d' ' <(head -n "$(wc -l <"$work/out.$c")" "$work/list.$c") "$work/out.$c" |
      awk -v acked="$work/acked.now" -v pending="$pending" '
        $3 == "201" && !failed { print $1, $2, $4 >> acked; next }
        $3 == "201" && failed  { print "ACK AFTER FAILURE: " $1 > "/dev/stderr"; print $1, $2, $4 >> acked; next }
        !failed { failed = 1; print $1, $2 >> pending; if ($3 != "000") print "UNEXPECTED STATUS " $3 " for " $1 > "/dev/stderr" }
      '
  done
  cat "$work/acked.now" >>"$acked"
  printf 'iteration %d: %d acknowledged this round, %d in total, lost so far %d (%ds)\n' \
    "$iteration" "$(wc -l <"$work/acked.now")" "$(wc -l <"$acked")" "$lost" $((SECONDS - started))
done

# Final pass: every acknowledged record of every iteration, after one more restart.
start_gateway
if [ -s "$pending" ]; then
  write_requests "$work/retry.cfg" <"$pending"
  results="$(curl -s -K "$work/retry.cfg" 2>/dev/null || true)"
  paste -d' ' "$pending" <(printf '%s\n' "$results") | while read -r id value status location; do
    if [ "$status" = 201 ] || [ "$status" = 200 ]; then
      printf '%s %s %s\n' "$id" "$value" "$location" >>"$acked"
    else
      echo x >>"$work/retry-errors"
    fi
  done
fi
lost=0
verify "$acked"
kill -TERM "$pid"
wait "$pid" 2>/dev/null || true
pid=""

# Duplicates: one stored Observation per submitted value. Reads the store's own table (the
# only place a second copy could hide), after a clean shutdown.
duplicated=0
if command -v sqlite3 >/dev/null; then
  duplicated="$(sqlite3 "$work/data/caregate.db" \
    "SELECT count(*) FROM (SELECT json_extract(CAST(content AS TEXT), '\$.valueQuantity.value') AS v
       FROM log WHERE resource_type = 'Observation' GROUP BY v HAVING count(DISTINCT id) > 1);")"
  stored="$(sqlite3 "$work/data/caregate.db" \
    "SELECT count(DISTINCT id) FROM log WHERE resource_type = 'Observation';")"
else
  echo "crash-loop: WARNING sqlite3 not found; duplicates NOT counted" >&2
  stored="?"
fi
retry_errors=0
[ -f "$work/retry-errors" ] && retry_errors="$(wc -l <"$work/retry-errors")"
acknowledged="$(wc -l <"$acked")"
# Every acknowledged request id is distinct; two acks pointing at one record would be a merge.
merged=$(($(cut -d' ' -f3 "$acked" | sed 's#/_history.*##' | sort | uniq -d | wc -l)))

echo "acknowledged: $acknowledged, stored: $stored, kills: $kills, retry failures: $retry_errors, merged: $merged, time: $((SECONDS - started))s"
echo "lost: $lost, duplicated: $duplicated, iterations: $iterations"
if [ "$lost" -ne 0 ] || [ "$duplicated" -ne 0 ] || [ "$retry_errors" -ne 0 ] || [ "$merged" -ne 0 ]; then
  return 1
fi
}

# --- the suite's loops (tests/tests/durability.rs) ---------------------------------------------
# Runs one test of durability.rs with CAREGATE_CRASH_ITERATIONS raised, against the same binary;
# the test prints its figures (kills, acknowledged, lost, repeats, time) to stderr.
suite_loop() {
  local test_name="$1"
  echo "crash-loop: $test_name with CAREGATE_CRASH_ITERATIONS=$iterations"
  if cargo nextest --version >/dev/null 2>&1; then
    (cd "$root" && CAREGATE_BIN="$bin" CAREGATE_CRASH_ITERATIONS="$iterations" \
      cargo nextest run --no-capture -p caregate-e2e --test durability -E "test(=$test_name)")
  else
    (cd "$root" && CAREGATE_BIN="$bin" CAREGATE_CRASH_ITERATIONS="$iterations" \
      cargo test -p caregate-e2e --test durability -- --exact "$test_name" --nocapture)
  fi
}

# Each loop in a subshell with `set -e` in force (it would be off inside `cmd || …`), so one
# failing loop is reported and the others still run; the subshell kills its own gateway on exit.
failed=()
run_loop() {
  local name="$1" status=0
  shift
  set +e
  (
    set -e
    trap 'if [ -n "$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; fi' EXIT
    "$@"
  )
  status=$?
  set -e
  [ "$status" -eq 0 ] || failed+=("$name")
}
if wants curl; then run_loop curl curl_loop; fi
if wants ingest; then
  run_loop ingest suite_loop f1_repeated_sigkill_during_ingest_loses_and_duplicates_no_acknowledged_record
fi
if wants delivery; then
  run_loop delivery suite_loop f1_f5_repeated_sigkill_during_delivery_delivers_every_allowed_record_with_one_key
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "crash-loop: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "crash-loop: passed: ${loops[*]} ($iterations kills each)"
