#!/usr/bin/env bash
# The end-to-end load benchmark (`caregate bench`) against cluster mode: N `caregate serve`
# instances (default 2) on one hermetic PostgreSQL, on loopback only.
#
#   benches/cluster-bench.sh                         # 2 instances, the bench's default parameters
#   INSTANCES=3 benches/cluster-bench.sh --sizes 2048 --duration 10 --warmup 2
#
# Arguments are passed to `caregate bench` (its defaults are the parameters of the SQLite-mode
# figures in BENCHMARKS.md: HTTP/1.1, 32 connections spread round-robin over the instances,
# 2 KB and 8 KB, 3 s warm-up + 15 s maximum + 7 s at 70 %).
#
# What it does: starts PostgreSQL (initdb + pg_ctl from `pg_config --bindir` or the newest
# /usr/lib/postgresql/*/bin) in a temp dir on a free loopback port with the durable settings
# (fsync = on, synchronous_commit = on, full_page_writes = on: every acknowledged commit is on
# disk), writes one config per instance from deploy/example/caregate.toml (same partners, keys
# and policy; its own listen and admin ports, data dir and instance_id), runs
# `caregate db migrate`, starts the instances, waits for /readyz on each admin listener, runs
# `caregate bench` across all URLs (each instance's own dev certificate, admin /metrics, the
# instances' and PostgreSQL's pids for CPU accounting, the fsync probe in PostgreSQL's file
# system), and always tears everything down (trap): the instances (SIGTERM), PostgreSQL
# (pg_ctl stop) and the temp dir (kept with KEEP=1).
#
# Environment: INSTANCES (default 2); CAREGATE_BIN (default: `cargo build --release -p caregate`
# and use ${CARGO_TARGET_DIR:-target}/release/caregate); PG_BINDIR (default: found as above);
# KEEP=1 keeps the temp dir (configs, logs, PostgreSQL data).
# As root, PostgreSQL runs as the `postgres` user (else `nobody`) through runuser, as in
# crates/testkit/src/postgres.rs.

set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
INSTANCES="${INSTANCES:-2}"
EXAMPLE="$REPO/deploy/example/caregate.toml"

die() {
    echo "cluster-bench: $*" >&2
    exit 2
}

[[ "$INSTANCES" =~ ^[1-9][0-9]*$ ]] || die "INSTANCES must be a positive number, not '$INSTANCES'"
command -v curl >/dev/null || die "curl is needed (to wait for /readyz)"

# --- PostgreSQL binaries -------------------------------------------------------------------
find_pg_bindir() {
    if [[ -n "${PG_BINDIR:-}" ]]; then
        echo "$PG_BINDIR"
        return
    fi
    if command -v pg_config >/dev/null; then
        local dir
        dir="$(pg_config --bindir 2>/dev/null || true)"
        if [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then
            echo "$dir"
            return
        fi
    fi
    # The newest version (sorted as versions: 9.6 < 10 < 15).
    for dir in /usr/lib/postgresql/*/bin; do
        if [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then echo "$dir"; fi
    done | sort -t/ -k5,5V | tail -n1
}
PG_BIN="$(find_pg_bindir)"
if [[ -z "$PG_BIN" || ! -x "$PG_BIN/initdb" || ! -x "$PG_BIN/pg_ctl" || ! -x "$PG_BIN/postgres" ]]; then
    die "PostgreSQL server binaries not found (initdb, pg_ctl, postgres): install Debian's \`postgresql\` package (e.g. apt-get install postgresql-15) or set PG_BINDIR"
fi

# --- the caregate binary -------------------------------------------------------------------
if [[ -n "${CAREGATE_BIN:-}" ]]; then
    BIN="$CAREGATE_BIN"
else
    (cd "$REPO" && cargo build --release -p caregate)
    BIN="${CARGO_TARGET_DIR:-$REPO/target}/release/caregate"
fi
[[ -x "$BIN" ]] || die "no caregate binary at $BIN"

# --- teardown, always ------------------------------------------------------------------------
WORK="$(mktemp -d "${TMPDIR:-/tmp}/caregate-cluster-bench.XXXXXX")"
PGROOT="$WORK/pg"
GATEWAY_PIDS=()
BENCH_PID=""
PG_STARTED=0

as_pg() {
    if [[ -n "$RUN_AS" ]]; then
        runuser -u "$RUN_AS" -- "$@"
    else
        "$@"
    fi
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    set +e
    if [[ -n "$BENCH_PID" ]]; then
        kill -TERM "$BENCH_PID" 2>/dev/null
        wait "$BENCH_PID" 2>/dev/null
    fi
    for pid in "${GATEWAY_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${GATEWAY_PIDS[@]}"; do
        for _ in $(seq 1 300); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
    if [[ "$PG_STARTED" == 1 ]]; then
        (cd "$PGROOT" && as_pg "$PG_BIN/pg_ctl" -D "$PGROOT/data" -m fast -w stop >/dev/null)
    fi
    if [[ "${KEEP:-0}" == 1 ]]; then
        echo "cluster-bench: kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A loopback port nothing listens on and this script has not handed out yet.
TAKEN=" "
free_port() {
    local port
    for _ in $(seq 1 200); do
        port=$((20000 + RANDOM % 40000))
        [[ "$TAKEN" == *" $port "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            TAKEN="$TAKEN$port "
            echo "$port"
            return
        fi
    done
    die "no free loopback port"
}

# --- PostgreSQL ------------------------------------------------------------------------------
RUN_AS=""
if [[ "$(id -u)" == 0 ]]; then
    if id postgres >/dev/null 2>&1; then RUN_AS=postgres; else RUN_AS=nobody; fi
fi
mkdir -p "$PGROOT/socket"
if [[ -n "$RUN_AS" ]]; then
    chmod o+x "$WORK"
    chown -R "$RUN_AS" "$PGROOT"
fi
echo "== PostgreSQL: $PG_BIN ($("$PG_BIN/postgres" --version)) in $PGROOT${RUN_AS:+, as $RUN_AS}"
(cd "$PGROOT" && as_pg "$PG_BIN/initdb" -D "$PGROOT/data" -U caregate --auth=trust \
    --encoding=UTF8 --no-locale >"$PGROOT/initdb.log" 2>&1) ||
    {
        cat "$PGROOT/initdb.log" >&2
        die "initdb failed"
    }
PGPORT="$(free_port)"
# Durability as in production: every commit flushed to disk before it is acknowledged. Only
# the size of the connection table is set (several instances' pools); nothing weakens it.
PG_OPTIONS="-h 127.0.0.1 -p $PGPORT -k $PGROOT/socket -c fsync=on -c synchronous_commit=on -c full_page_writes=on -c max_connections=200"
(cd "$PGROOT" && as_pg "$PG_BIN/pg_ctl" -D "$PGROOT/data" -l "$PGROOT/server.log" \
    -o "$PG_OPTIONS" -w -t 60 start >/dev/null) ||
    {
        cat "$PGROOT/server.log" >&2
        die "PostgreSQL did not start"
    }
PG_STARTED=1
(cd "$PGROOT" && as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$PGPORT" -U caregate caregate)
PSQL=("$PG_BIN/psql" -h 127.0.0.1 -p "$PGPORT" -U caregate -d caregate -Atq)
echo "   port $PGPORT; $(cd "$PGROOT" && as_pg "${PSQL[@]}" -c "select string_agg(name || '=' || setting, ', ' order by name) from pg_settings where name in ('fsync','synchronous_commit','full_page_writes','wal_sync_method','shared_buffers','commit_delay','max_connections')")"
DB_URL="host=127.0.0.1 port=$PGPORT user=caregate dbname=caregate"

# --- the instances' configs ------------------------------------------------------------------
for i in $(seq 1 "$INSTANCES"); do
    dir="$WORK/gw-$i"
    mkdir -p "$dir/data"
    port="$(free_port)"
    admin="$(free_port)"
    echo "$port" >"$dir/port"
    echo "$admin" >"$dir/admin-port"
    # The example ICS with absolute paths, its own ports and data dir, on the shared database.
    sed -e "s|^listen = \"127.0.0.1:8443\"|listen = \"127.0.0.1:$port\"|" \
        -e "s|^data_dir = \"[^\"]*\"|data_dir = \"$dir/data\"|" \
        -e "s|^dir = \"../../policies\"|dir = \"$REPO/policies\"|" \
        -e "s|^jwks_file = \"keys/|jwks_file = \"$REPO/deploy/example/keys/|" \
        "$EXAMPLE" >"$dir/caregate.toml"
    grep -q "127.0.0.1:$port" "$dir/caregate.toml" || die "could not rewrite listen in $EXAMPLE"
    cat >>"$dir/caregate.toml" <<EOF

# --- cluster-bench.sh: instance $i of $INSTANCES ---
[admin]
listen = "127.0.0.1:$admin"

[store]
backend = "postgres"

[store.postgres]
url = "$DB_URL"
instance_id = "gw-$i"
EOF
done

echo "== caregate db migrate"
"$BIN" db migrate --config "$WORK/gw-1/caregate.toml"

# --- start and wait for /readyz --------------------------------------------------------------
URL_ARGS=()
for i in $(seq 1 "$INSTANCES"); do
    dir="$WORK/gw-$i"
    CAREGATE_LOG="${CAREGATE_LOG:-warn}" "$BIN" serve --config "$dir/caregate.toml" \
        >"$dir/stdout" 2>"$dir/log" &
    GATEWAY_PIDS+=("$!")
done
for i in $(seq 1 "$INSTANCES"); do
    dir="$WORK/gw-$i"
    port="$(cat "$dir/port")"
    admin="$(cat "$dir/admin-port")"
    pid="${GATEWAY_PIDS[$((i - 1))]}"
    ready=0
    for _ in $(seq 1 600); do
        kill -0 "$pid" 2>/dev/null || {
            cat "$dir/log" >&2
            die "instance $i exited during start-up (log above)"
        }
        if [[ -f "$dir/data/dev-certificate.pem" ]] &&
            curl -fsS --max-time 2 --cacert "$dir/data/dev-certificate.pem" \
                "https://localhost:$admin/readyz" >/dev/null 2>&1; then
            ready=1
            break
        fi
        sleep 0.1
    done
    [[ "$ready" == 1 ]] || {
        cat "$dir/log" >&2
        die "instance $i not ready after 60 s"
    }
    echo "== instance gw-$i ready: https://localhost:$port (admin $admin, pid $pid)"
    URL_ARGS+=(--url "https://localhost:$port" --ca-cert "$dir/data/dev-certificate.pem"
        --admin-url "https://localhost:$admin" --gateway-pid "$pid")
done

# PostgreSQL's processes now (the postmaster and its children, e.g. the instances' backends),
# for CPU accounting.
POSTMASTER="$(head -n1 "$PGROOT/data/postmaster.pid")"
DB_PID_ARGS=(--db-pid "$POSTMASTER")
for pid in $(ps -o pid= --ppid "$POSTMASTER"); do
    DB_PID_ARGS+=(--db-pid "$pid")
done

# --- the benchmark -----------------------------------------------------------------------------
echo "== $(nproc) CPU(s); load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== caregate bench ${URL_ARGS[*]} $*"
# In the background and waited for, so that a signal tears everything down at once.
"$BIN" bench --config "$EXAMPLE" "${URL_ARGS[@]}" "${DB_PID_ARGS[@]}" \
    --fsync-dir "$WORK" "$@" &
BENCH_PID=$!
BENCH_STATUS=0
wait "$BENCH_PID" || BENCH_STATUS=$?
BENCH_PID=""
echo "== load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "== records in the shared log: $(cd "$PGROOT" && as_pg "${PSQL[@]}" -c "select count(*) from log" 2>/dev/null || echo '?')"
exit "$BENCH_STATUS"
