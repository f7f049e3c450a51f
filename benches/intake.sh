#!/usr/bin/env bash
# Runs `herald bench intake` (or, as benches/delivery.sh, benches/stream.sh or
# benches/filters.sh, `herald bench delivery` / `stream` / `filters`) against
# throwaway PostgreSQL and Redis servers (temp dir, free ports, 127.0.0.1),
# then stops exactly the processes it started.
# Usage: benches/intake.sh [--seconds N] [--concurrency N]
#        benches/delivery.sh [--events N] [--concurrency N] [--rounds N]
#        benches/stream.sh [--clients N] [--jobs N] [--interval-ms N]
#        benches/filters.sh [--jobs N] [--requests N] [--concurrency N]
set -euo pipefail
cd "$(dirname "$0")/.."

pgbin=$(dirname "$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -1)")
[ -x "$pgbin/initdb" ] || { echo "PostgreSQL not installed (scripts/test installs it)" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "redis-server not installed (scripts/test installs it)" >&2; exit 1; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# PostgreSQL refuses to run as root: as root, run it as the postgres user.
# setpriv execs, so the PID we record is the server's own.
runas=()
[ "$(id -u)" -eq 0 ] && runas=(setpriv --reuid=postgres --regid=postgres --clear-groups --)

if [ "$(basename "$0")" = delivery.sh ]; then
    # The BullMQ peer runs on Debian's Node.js, installed here as scripts/test
    # installs its own packages.
    if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
        echo "benches/delivery.sh: installing nodejs and npm (the BullMQ peer needs them)" >&2
        sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
    fi
    if ! [ -d benches/bullmq/node_modules ]; then
        echo "benches/delivery.sh: installing the BullMQ peer (npm ci in benches/bullmq)" >&2
        # Loud on failure: npm's own error, then ours, then a non-zero exit.
        (cd benches/bullmq && npm ci --no-audit --no-fund) || {
            rm -rf benches/bullmq/node_modules
            echo "benches/delivery.sh: npm ci failed in benches/bullmq (see above)" >&2
            exit 1
        }
    fi
fi
cargo build --release --quiet
tmp=$(mktemp -d /tmp/herald-bench.XXXXXX)
pids=()
# SIGINT is PostgreSQL's fast shutdown (SIGTERM would wait for clients).
cleanup() { for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
[ "$(id -u)" -eq 0 ] && chown postgres "$tmp"

pg_port=$(free_port); redis_port=$(free_port)
"${runas[@]}" "$pgbin/initdb" -D "$tmp/pg" -U herald --auth=trust -E UTF8 --no-sync >/dev/null
# Durable settings (fsync on), as production would run. Every lock wait
# past 100 ms is logged ("still waiting for"), and counted after the run.
"${runas[@]}" "$pgbin/postgres" -D "$tmp/pg" -p "$pg_port" -k "$tmp" -c listen_addresses=127.0.0.1 \
    -c max_connections=200 -c log_lock_waits=on -c deadlock_timeout=100ms >"$tmp/pg.log" 2>&1 &
pids+=($!)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null &
pids+=($!)
for _ in $(seq 100); do "$pgbin/pg_isready" -q -h 127.0.0.1 -p "$pg_port" && break; sleep 0.1; done

export HERALD_DATABASE_URL="postgres://herald@127.0.0.1:$pg_port/postgres"
# NO_REDIS=1 measures Herald with the database tier alone.
[ -n "${NO_REDIS:-}" ] || export HERALD_REDIS_URL="redis://127.0.0.1:$redis_port"
bench=$(basename "$0" .sh)
PATH="$pgbin:$PATH" target/release/herald bench "$bench" "$@"
waits=$(grep -c "still waiting for" "$tmp/pg.log" || true)
echo "postgres lock waits over 100 ms: $waits"
if [ "$waits" -gt 0 ]; then
    grep -A2 "still waiting for" "$tmp/pg.log" | head -12
fi
