#!/usr/bin/env bash
# Interoperability run: the SMART reference Bulk Data client (smart-on-fhir/bulk-data-client)
# against caregate's FHIR Bulk Data `$export`. See docs/bulk-data-client.md.
#
#   BULK_DATA_CLIENT_DIR=/path/to/bulk-data-client tests/bulk-data-client.sh
#
# BULK_DATA_CLIENT_DIR is a checkout of the client with its dependencies installed (`npm ci` or
# `npm install`; it runs `node .` = built/app.js). The client is never copied into this repository.
#
# Optional: CAREGATE (a built binary; default: cargo build -p caregate --bin caregate, then
# $CARGO_TARGET_DIR/debug/caregate), BDC_PORT (19443), BDC_ADMIN_PORT (19444), BDC_PATIENTS (1000; fewer patients can leave every equivalence class below the feed's k, and the files empty),
# BDC_FEED (unset: a plain `--global` export, which builds the ICB's `system_export` feed,
# icb-qe1-population-health; set: `--global -c _feed=BDC_FEED`), BDC_KEEP=1 (keep the work directory).
#
# What it does: `caregate demo --data WORK/data` (a seeded synthetic day submitted, delivered and
# exported), then `caregate serve` on that data directory with its own ports, then four client
# runs as the ICB analytics partner (icb-qe1, SMART Backend Services, ES384 key from
# deploy/example/keys converted to a private JWK; token URL auto-detected by the client from
# /.well-known/smart-configuration; TLS trust by NODE_EXTRA_CA_CERTS = the dev certificate):
#   1. system-level export (`--global`, or `--global -c _feed=FEED` with BDC_FEED); then a kick-off and a
#      cancellation through the client's own API (kickOff(), cancelExport() = DELETE on the
#      status URL); the status URL must then answer 404;
#   2. the same with `_type=Patient,Encounter`;
#   3. the same with `_since` = an instant before the demo (so every record qualifies);
#   4. `_since` = now (nothing qualifies): the server must answer a manifest with no files.
# Every downloaded NDJSON file must parse line by line and hold only its manifest type.
# Exits 0 only if every check held.
set -euo pipefail

: "${BULK_DATA_CLIENT_DIR:?set BULK_DATA_CLIENT_DIR to a checkout of smart-on-fhir/bulk-data-client (npm install done)}"
BDC=$(cd "$BULK_DATA_CLIENT_DIR" && pwd)
[ -f "$BDC/built/app.js" ] || { echo "no built/app.js in $BDC" >&2; exit 2; }
[ -d "$BDC/node_modules" ] || { echo "run npm install in $BDC first" >&2; exit 2; }

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PORT=${BDC_PORT:-19443}
ADMIN_PORT=${BDC_ADMIN_PORT:-19444}
PATIENTS=${BDC_PATIENTS:-1000}
FEED=${BDC_FEED:-icb-qe1-population-health}
FEED_ARGS=()
if [ -n "${BDC_FEED:-}" ]; then FEED_ARGS=(-c "_feed=$FEED"); fi
PARTNER=icb-qe1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/caregate-bdc.XXXXXX")
SERVER_PID=

cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [ "${BDC_KEEP:-0}" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

FAILED=0
PASSED=0
check() { # check NAME CONDITION...
    local name=$1; shift
    if "$@"; then echo "PASS $name"; PASSED=$((PASSED + 1)); else echo "FAIL $name"; FAILED=$((FAILED + 1)); fi
}

if [ -z "${CAREGATE:-}" ]; then
    (cd "$ROOT" && cargo build -q -p caregate --bin caregate)
    CAREGATE="${CARGO_TARGET_DIR:-$ROOT/target}/debug/caregate"
fi

# --- data: a seeded synthetic day, submitted through the real gateway --------------------------
BEFORE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
sleep 1
(cd "$ROOT" && "$CAREGATE" demo --data "$WORK/data" --patients "$PATIENTS") > "$WORK/demo.log" 2>&1 \
    || { tail -40 "$WORK/demo.log"; echo "caregate demo failed" >&2; exit 1; }

# --- serve on that data directory, on our own ports ---------------------------------------------
awk -v listen="127.0.0.1:$PORT" -v admin="127.0.0.1:$ADMIN_PORT" '
    /^\[/ { section = $0 }
    /^listen *=/ && section == "[server]" { print "listen = \"" listen "\""; next }
    /^listen *=/ && section == "[admin]"  { print "listen = \"" admin "\""; next }
    { print }' "$WORK/data/caregate-demo.toml" > "$WORK/caregate.toml"
(cd "$ROOT" && exec "$CAREGATE" serve --config "$WORK/caregate.toml") > "$WORK/serve.log" 2>&1 &
SERVER_PID=$!
CA="$WORK/data/dev-certificate.pem"
BASE="https://127.0.0.1:$PORT"
for _ in $(seq 1 100); do
    curl -fsS --cacert "$CA" "$BASE/fhir/metadata" -o /dev/null 2>/dev/null && break
    kill -0 "$SERVER_PID" 2>/dev/null || { tail -40 "$WORK/serve.log"; exit 1; }
    sleep 0.2
done
curl -fsS --cacert "$CA" "$BASE/.well-known/smart-configuration" -o "$WORK/smart-configuration.json"

# --- client configuration: the ICB partner's key as a private JWK -------------------------------
node -e '
const crypto = require("crypto"), fs = require("fs");
const [pem, jwks, fhirUrl, clientId, out] = process.argv.slice(1);
const jwk = crypto.createPrivateKey(fs.readFileSync(pem)).export({ format: "jwk" });
const pub = JSON.parse(fs.readFileSync(jwks, "utf8")).keys[0];
if (jwk.x !== pub.x || jwk.y !== pub.y) throw new Error("private key does not match the JWKS");
fs.writeFileSync(out, "module.exports = " + JSON.stringify({
    // tokenUrl "" (the shipped defaults name a localhost demo server): the client then finds the
    // token endpoint in /.well-known/smart-configuration (or the CapabilityStatement).
    fhirUrl, tokenUrl: "", clientId, scope: "system/*.rs",
    privateKey: { ...jwk, alg: pub.alg, kid: pub.kid },
    reporter: "text",
    log: { enabled: true, file: out.replace(/\.js$/, ".log.ndjson") },
}, null, 2) + "\n");
' "$ROOT/deploy/example/keys/$PARTNER.key.pem" "$ROOT/deploy/example/keys/$PARTNER.jwks.json" \
  "$BASE/fhir" "$PARTNER" "$WORK/client-config.js"

run_client() { # run_client NAME ARGS...
    local name=$1; shift
    mkdir -p "$WORK/out/$name"
    set +e
    local cmd
    cmd=$(printf '%q ' node . --config "$WORK/client-config.js" --global "${FEED_ARGS[@]}" \
        -d "$WORK/out/$name" "$@")
    (cd "$BDC" && NODE_EXTRA_CA_CERTS="$CA" SHOW_ERRORS=y timeout 120 bash -c "$cmd" </dev/null) \
        > "$WORK/out/$name.log" 2>&1
    local rc=$?
    set -e
    echo "--- client run $name (exit $rc): node . --global ${FEED_ARGS[*]} $*"
    sed 's/^/    /' "$WORK/out/$name.log" | tail -25
    return $rc
}

# Every NDJSON file parses, and each line's resourceType is the file's type.
ndjson_ok() { # ndjson_ok DIR ALLOWED_TYPES(comma list or empty for any)
    python3 - "$1" "$2" <<'PY'
import json, pathlib, sys
root, allowed = pathlib.Path(sys.argv[1]), [t for t in sys.argv[2].split(",") if t]
files = sorted(root.glob("*.ndjson"))
if not files:
    print("    no NDJSON files"); sys.exit(1)
ok = True
for f in files:
    expected = f.name.split(".")[1]          # the client names files N.<Type>.ndjson
    lines = [l for l in f.read_text().splitlines() if l.strip()]
    for n, line in enumerate(lines, 1):
        r = json.loads(line)
        if r.get("resourceType") != expected:
            print(f"    {f.name}:{n} resourceType {r.get('resourceType')}"); ok = False
    if allowed and expected not in allowed:
        print(f"    {f.name}: type {expected} not requested"); ok = False
    print(f"    {f.name}: {len(lines)} resources")
sys.exit(0 if ok else 1)
PY
}

status_url() { { grep -o 'Status endpoint: [^ ]*' "$WORK/out/$1.log" || true; } | head -1 | sed 's/Status endpoint: //'; }
# The client exits 0 even when a request failed (utils.exit with a string message), so a run
# counts as passed only if it printed that every download completed.
completed() { grep -q 'Download completed' "$WORK/out/$1.log"; }

# 1. full system-level export of the feed --------------------------------------------------------
run_client full --reporter text || true
check "full export: client completed its downloads" completed full
check "full export: NDJSON parses, one type per file" ndjson_ok "$WORK/out/full" ""

# 1b. cancellation with the client's own API: kickOff(), then cancelExport() (DELETE on the
# status URL, what the CLI does when its interactive "remove this export?" prompt is answered
# yes; that prompt reads /dev/tty, so it is not driven here). The status URL must then be 404.
(cd "$BDC" && NODE_EXTRA_CA_CERTS="$CA" timeout 60 node -e '
const [bdc, config, feed] = process.argv.slice(1);
const jose = require(bdc + "/node_modules/node-jose");
const Client = require(bdc + "/built/lib/BulkDataClient").default;
const { detectTokenUrl } = require(bdc + "/built/lib/utils");
(async () => {
    const options = { ...require(bdc + "/config/defaults.js"), ...require(config), custom: ["_feed=" + feed] };
    options.fhirUrl = options.fhirUrl.replace(/\/*$/, "/");
    options.tokenUrl = await detectTokenUrl(options.fhirUrl);
    options.privateKey = await jose.JWK.asKey(options.privateKey, "json");
    options.global = true;
    const client = new Client(options);
    const location = await client.kickOff();
    console.log("status endpoint: " + location);
    const res = await client.cancelExport(location);
    console.log("DELETE " + res.statusCode);
})().catch(e => { console.log("error: " + e.message); process.exit(1); });
' "$BDC" "$WORK/client-config.js" "$FEED") > "$WORK/out/cancel.log" 2>&1 || true
grep -v -e 'AWS SDK' -e 'receive updates' -e 'migrate your code' -e 'a.co/' -e 'trace-warnings' -e '^$' \
    "$WORK/out/cancel.log" | sed 's/^/    /'
STATUS=$({ grep -o 'status endpoint: [^ ]*' "$WORK/out/cancel.log" || true; } | head -1 | sed 's/status endpoint: //')
check "cancel: the client's DELETE answered 202" grep -q 'DELETE 202' "$WORK/out/cancel.log"
if [ -n "$STATUS" ]; then
    TOKEN=$("$CAREGATE" token --config "$WORK/caregate.toml" --partner "$PARTNER" \
        --key "$ROOT/deploy/example/keys/$PARTNER.key.pem" --url "https://localhost:$PORT" --ca-cert "$CA" --raw)
    CODE=$(curl -s -o /dev/null -w '%{http_code}' --cacert "$CA" -H "Authorization: Bearer $TOKEN" "$STATUS")
    check "cancel: status URL after the DELETE answers 404 (got $CODE)" [ "$CODE" = 404 ]
else
    check "cancel: kick-off gave a status endpoint" false
fi

# 2. _type -----------------------------------------------------------------------------------------
run_client type --reporter text -t Patient,Encounter || true
check "_type: client completed its downloads" completed type
check "_type: only Patient and Encounter files" ndjson_ok "$WORK/out/type" "Patient,Encounter"

# 3. _since before the demo (every record qualifies) ---------------------------------------------
run_client since --reporter text -s "$BEFORE" || true
check "_since: client completed its downloads" completed since
check "_since: NDJSON parses" ndjson_ok "$WORK/out/since" ""
count() { local n=0 f; for f in "$1"/*.ndjson; do n=$((n + $(grep -c . "$f" || true))); done; echo "$n"; }
FULL=$(count "$WORK/out/full")
SINCE=$(count "$WORK/out/since")
check "_since before the data: same resource count as the full export ($SINCE = $FULL)" [ "$SINCE" = "$FULL" ]

# 4. _since now: the server answers an empty manifest --------------------------------------------
NOW=$(date -u +%Y-%m-%dT%H:%M:%SZ)
run_client empty --reporter text -s "$NOW" || true
check "_since now: status answered 200 with a manifest (client reached the manifest)" \
    grep -q -e 'Received export manifest' -e 'export manifest output contains no files' "$WORK/out/empty.log"

echo "$PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
