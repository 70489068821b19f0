#!/usr/bin/env bash
# Seed the fuzz corpora from real FHIR data outside the project (../shared/corpora beside the
# checkout, or $CAREGATE_CORPORA), read at run time and never copied into the repository: the
# generated files are named gen-* and ignored by git (tests/fuzz/.gitignore). The committed,
# hand-written seeds are corpus/<target>/seed-*.
#
# Usage: tests/fuzz/seed.sh            (idempotent; rewrites the gen-* files)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
corpora="${CAREGATE_CORPORA:-$(cd "$here/../../.." && pwd)/shared/corpora}"
if [ ! -d "$corpora" ]; then
  echo "seed.sh: no corpora at $corpora; only the committed seeds will be used" >&2
  exit 0
fi
max_bytes=65536
rm -f "$here"/corpus/*/gen-*
mkdir -p "$here"/corpus/{fhir_intake,strict_json,nhs_number,auth_assertion,token_form}

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
done < <(find "$corpora/uk-core" "$corpora/fhir-r4/examples" "$corpora/nhs-apis" \
  -type f -name '*.json' -print0 2>/dev/null | sort -z)

# Synthea bulk data: the first 20 lines of every NDJSON file, one resource each.
for file in "$corpora"/synthea-bulk-10/*.ndjson; do
  [ -f "$file" ] || continue
  head -n 20 "$file" | while IFS= read -r line; do
    n=$((n + 1))
    [ "${#line}" -le "$max_bytes" ] || continue
    { printf '\x00'; printf '%s' "$line"; } > "$here/corpus/fhir_intake/gen-s${RANDOM}${n}"
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
