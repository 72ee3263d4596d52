#!/usr/bin/env bash
# The HTTP layer's cost, measured with wrk on loopback against
# http-bench-server (examples/order-service/src/bin/http-bench-server.rs):
#
#   bare          a handler that parses an order and answers 201, no layer
#   bare+layer    the same behind IdempotencyLayer (MemoryStore), fresh keys
#   bare+layer    replays of one key
#   orders        the order service's POST /orders on SQLite, no layer
#   orders+layer  the same behind the layer, fresh keys, then replays
#
# Each figure is requests/s; the layer's overhead is 1 - layer/bare in the same
# run. Settings: IDEM_BENCH_SECS (default 5), IDEM_BENCH_CONNS (default 32),
# IDEM_BENCH_ROUNDS (default 3; modes alternate each round, best round kept).
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${IDEM_BENCH_SECS:-5}
conns=${IDEM_BENCH_CONNS:-32}
rounds=${IDEM_BENCH_ROUNDS:-3}

command -v curl >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null; }
command -v wrk >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cargo build -q --release -p order-service --bin http-bench-server
server_bin=target/release/http-bench-server
tmp=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$tmp"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# measure MODE SCRIPT: prints requests/s (fails on any non-2xx answer). For
# replays, the request is sent once first, so every measured one is a replay.
measure() {
    local mode=$1 script=$2 port
    port=$(free_port)
    "$server_bin" "$mode" "127.0.0.1:$port" "sqlite://$tmp/$RANDOM$RANDOM.db" >/dev/null &
    local pid=$!
    for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    if [ "$script" = replay.lua ]; then
        curl -sf -o /dev/null -X POST "http://127.0.0.1:$port/orders" -H 'Content-Type: application/json' \
            -H 'Idempotency-Key: replay-1' -d '{"user_id":"u-424242","product_id":"SKU-0001","quantity":1}'
    fi
    local out cpu0 cpu1
    cpu0=$(cpu_ticks "$pid")
    out=$(wrk -t1 -c"$conns" -d"${secs}s" -s "scripts/wrk/$script" "http://127.0.0.1:$port/orders")
    cpu1=$(cpu_ticks "$pid")
    kill "$pid"; wait "$pid" 2>/dev/null || true
    if grep -q "Non-2xx" <<<"$out"; then echo "error: $mode $script: $(grep Non-2xx <<<"$out")" >&2; exit 1; fi
    local rps requests
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    requests=$(awk '/requests in/ {print $1}' <<<"$out")
    # Server CPU (user + system) per request, in microseconds.
    echo "$rps $(awk -v t=$((cpu1 - cpu0)) -v hz="$(getconf CLK_TCK)" -v n="$requests" 'BEGIN{printf "%.2f", t / hz * 1e6 / n}')"
}

# cpu_ticks PID: user + system clock ticks the process has used.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# Best requests/s and least server CPU per request, over the rounds.
declare -A best cpu
cases=("bare fresh.lua" "bare+layer fresh.lua" "bare+layer replay.lua" "orders fresh.lua" "orders+layer fresh.lua" "orders+layer replay.lua")
for round in $(seq 1 "$rounds"); do
    for case in "${cases[@]}"; do
        set -- $case
        read -r rps us <<<"$(measure "$1" "$2")"
        echo "round $round: $1 ${2%.lua}: $rps req/s, $us us of server CPU per request"
        if [ -z "${best[$case]:-}" ] || awk -v a="$rps" -v b="${best[$case]}" 'BEGIN{exit !(a>b)}'; then best[$case]=$rps; fi
        if [ -z "${cpu[$case]:-}" ] || awk -v a="$us" -v b="${cpu[$case]}" 'BEGIN{exit !(a<b)}'; then cpu[$case]=$us; fi
    done
done

r() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", a/b}'; }
echo
echo "best of $rounds rounds, wrk -t1 -c$conns -d${secs}s, $(nproc) cores shared by server and wrk"
printf '%-34s %10s %9s %12s %9s\n' "case" "req/s" "vs floor" "CPU us/req" "vs floor"
row() { # label case floor-case
    printf '%-34s %10.0f %9s %12s %9s\n' "$1" "${best[$2]}" "$(r "${best[$2]}" "${best[$3]}")" "${cpu[$2]}" "$(r "${cpu[$2]}" "${cpu[$3]}")"
}
row "bare handler (floor)" "bare fresh.lua" "bare fresh.lua"
row "bare + layer, fresh keys" "bare+layer fresh.lua" "bare fresh.lua"
row "bare + layer, replays" "bare+layer replay.lua" "bare fresh.lua"
row "POST /orders on SQLite (floor)" "orders fresh.lua" "orders fresh.lua"
row "POST /orders + layer, fresh keys" "orders+layer fresh.lua" "orders fresh.lua"
row "POST /orders + layer, replays" "orders+layer replay.lua" "orders fresh.lua"
echo
for c in bare orders; do
    echo "layer overhead, $c: $(awk -v a="${best[$c+layer fresh.lua]}" -v b="${best[$c fresh.lua]}" 'BEGIN{printf "%.1f%%", (1-a/b)*100}') of throughput," \
        "$(awk -v a="${cpu[$c+layer fresh.lua]}" -v b="${cpu[$c fresh.lua]}" 'BEGIN{printf "%.1f%%", (a/b-1)*100}') more server CPU per request"
done
