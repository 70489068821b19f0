#!/usr/bin/env bash
# Seed the fuzz corpora from FHIR data read at run time and never copied into the repository:
# real data outside the project (../shared/corpora beside the checkout, or $CAREGATE_CORPORA),
# the policy test records in policies/tests/records, and the synthetic ICS generator
# (`caregate synth`, when a built binary is found: $CAREGATE_BIN, target/release or target/debug).
# The generated files are named gen-* and ignored by git (tests/fuzz/.gitignore). The committed,
# hand-written seeds are corpus/<target>/seed-*.
#
# Record-taking targets get each JSON resource with their input header in front:
#   fhir_intake    1 byte  (0: no type named by the URL)
#   policy_decide  12 bytes of consent state (see fuzz_targets/policy_decide.rs), varied per file
#   feed_transform 1 byte  (submitter and "NHS number indexed")
#
# Usage: tests/fuzz/seed.sh            (idempotent; rewrites the gen-* files)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
corpora="${CAREGATE_CORPORA:-$(cd "$here/../../.." && pwd)/shared/corpora}"
max_bytes=65536
rm -f "$here"/corpus/*/gen-*
mkdir -p "$here"/corpus/{fhir_intake,strict_json,nhs_number,auth_assertion,token_form,policy_decide,feed_transform,audit_verify}

# One JSON resource (file $1, or standard input if $1 is -) as seeds for the record targets;
# $2 names the seed. The headers vary with a counter so the seeds spread over consent states.
records=0
seed_record() {
  records=$((records + 1))
  local body
  if [ "$1" = - ]; then body="$(cat)"; else body="$(cat "$1")"; fi
  [ "${#body}" -le "$max_bytes" ] || return 0
  local k=$records
  local header
  header=$(printf '\\x%02x' $((k % 251)) $(((k * 37) % 128)) $(((k * 7) % 72)) $((k % 5)) $(((k * 3) % 251)) \
    $(((k * 97) % 256)) $(((k * 13) % 256)) $(((k * 29) % 256)) $(((k * 5) % 5)) $(((k * 11) % 256)) \
    $(((k * 17) % 256)) $(((k * 19) % 256)))
  { printf "$header"; printf '%s' "$body"; } > "$here/corpus/policy_decide/gen-$2"
  { printf "\\x$(printf '%02x' $((k % 8)))"; printf '%s' "$body"; } > "$here/corpus/feed_transform/gen-$2"
}

# The policy test records (in the repository, always present).
for file in "$repo"/policies/tests/records/*.json; do
  [ -f "$file" ] || continue
  seed_record "$file" "policy-$(basename "$file" .json)"
done

# The synthetic ICS generator: a few records of every type from every submitting partner.
caregate_bin="${CAREGATE_BIN:-}"
if [ -z "$caregate_bin" ]; then
  for candidate in "$repo/target/release/caregate" "$repo/target/debug/caregate"; do
    if [ -x "$candidate" ]; then caregate_bin="$candidate"; break; fi
  done
fi
if [ -n "$caregate_bin" ] && [ -x "$caregate_bin" ]; then
  synth="$(mktemp -d)"
  if "$caregate_bin" synth --seed 9 --patients 40 --out "$synth" >/dev/null 2>&1; then
    for file in "$synth"/*/*.ndjson; do
      [ -f "$file" ] || continue
      partner="$(basename "$(dirname "$file")")"
      type="$(basename "$file" .ndjson)"
      n=0
      while IFS= read -r line; do
        n=$((n + 1))
        printf '%s' "$line" | seed_record - "synth-$partner-$type-$n"
        { printf '\x00'; printf '%s' "$line"; } > "$here/corpus/fhir_intake/gen-synth-$partner-$type-$n"
      done < <(head -n 3 "$file")
    done
  else
    echo "seed.sh: $caregate_bin synth failed; no synthetic seeds" >&2
  fi
  rm -rf "$synth"
else
  echo "seed.sh: no caregate binary (set CAREGATE_BIN or cargo build -p caregate); no synthetic seeds" >&2
fi

if [ ! -d "$corpora" ]; then
  echo "seed.sh: no corpora at $corpora; only the committed, policy and synthetic seeds will be used" >&2
  exit 0
fi

n=0
# Whole JSON resources and Bundles: UK Core, FHIR R4 examples, NHS API mocks.
while IFS= read -r -d '' file; do
  size=$(stat -c %s "$file")
  [ "$size" -le "$max_bytes" ] || continue
  n=$((n + 1))
  # fhir_intake: byte 0 = 0 means "no type named by the URL" (as the Bundle endpoint and
  # `caregate validate` call the validator).
  { printf '\x00'; cat "$file"; } > "$here/corpus/fhir_intake/gen-$n"
  # strict_json takes every tenth file whole; the parser needs variety, not volume.
  if [ $((n % 10)) -eq 0 ]; then cp "$file" "$here/corpus/strict_json/gen-$n"; fi
  # The policy and feed targets take every fourth file (single resources and Bundles alike).
  if [ $((n % 4)) -eq 0 ]; then seed_record "$file" "c$n"; fi
done < <(find "$corpora/uk-core" "$corpora/fhir-r4/examples" "$corpora/nhs-apis" \
  -type f -name '*.json' -print0 2>/dev/null | sort -z)

# Synthea bulk data: the first 20 lines of every NDJSON file, one resource each.
for file in "$corpora"/synthea-bulk-10/*.ndjson; do
  [ -f "$file" ] || continue
  head -n 20 "$file" | while IFS= read -r line; do
    n=$((n + 1))
    [ "${#line}" -le "$max_bytes" ] || continue
    { printf '\x00'; printf '%s' "$line"; } > "$here/corpus/fhir_intake/gen-s${RANDOM}${n}"
    if [ $((n % 3)) -eq 0 ]; then printf '%s' "$line" | seed_record - "s${RANDOM}$n"; fi
  done
done

# NHS numbers (and other ten-digit identifiers, which make good near misses): every distinct
# 10-digit string value in the corpora, with or without display spaces.
{ grep -rhoE '"value" *: *"[0-9]{3} ?[0-9]{3} ?[0-9]{4}"' "$corpora" 2>/dev/null || true; } |
  grep -oE '"[0-9 ]+"$' | tr -d '"' | sort -u | head -n 200 |
  while IFS= read -r number; do
    printf '%s' "$number" > "$here/corpus/nhs_number/gen-${number// /_}"
  done

echo "seed.sh: seeded from $corpora:"
for dir in "$here"/corpus/*/; do
  printf '  %-16s %5d files\n' "$(basename "$dir")" "$(find "$dir" -type f | wc -l)"
done
