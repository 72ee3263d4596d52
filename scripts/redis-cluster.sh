#!/usr/bin/env bash
# Starts (or stops) a local 3-master Redis Cluster for the tests, on ports
# 7101-7103 by default, under target/redis-cluster/. Idempotent: a cluster
# that is already up and healthy is left as it is.
#   ./scripts/redis-cluster.sh start   # prints the node URLs
#   ./scripts/redis-cluster.sh stop
# IDEM_CLUSTER_PORTS names other ports; IDEM_CLUSTER_REPLICAS=1 gives every
# master a replica (six ports for three masters), as the chaos harness's
# failovers need:
#   IDEM_CLUSTER_PORTS="7201 7202 7203 7204 7205 7206" IDEM_CLUSTER_REPLICAS=1 ./scripts/redis-cluster.sh start
set -euo pipefail
cd "$(dirname "$0")/.."

PORTS=(${IDEM_CLUSTER_PORTS:-7101 7102 7103})
REPLICAS=${IDEM_CLUSTER_REPLICAS:-0}
DIR="$(pwd)/target/redis-cluster"

healthy() {
    [ "$(redis-cli -p "${PORTS[0]}" cluster info 2>/dev/null | tr -d '\r' | grep -c '^cluster_state:ok')" = 1 ] &&
        [ "$(redis-cli -p "${PORTS[0]}" cluster info 2>/dev/null | tr -d '\r' | grep '^cluster_known_nodes:' | cut -d: -f2)" = "${#PORTS[@]}" ] &&
        # Every replica has joined its master.
        [ "$(redis-cli -p "${PORTS[0]}" cluster nodes 2>/dev/null | grep -c ' slave ')" = "$(( ${#PORTS[@]} * REPLICAS / (REPLICAS + 1) ))" ]
}

start() {
    if healthy; then
        echo "redis cluster: running on ports ${PORTS[*]}"
        return
    fi
    stop >/dev/null 2>&1 || true
    for port in "${PORTS[@]}"; do
        mkdir -p "$DIR/$port"
        rm -f "$DIR/$port/nodes.conf" "$DIR/$port"/*.rdb "$DIR/$port"/*.aof
        redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
            --cluster-config-file "$DIR/$port/nodes.conf" --cluster-node-timeout 5000 \
            --save "" --appendonly no --dir "$DIR/$port" --daemonize yes \
            --logfile "$DIR/$port/redis.log"
    done
    for port in "${PORTS[@]}"; do
        for _ in $(seq 1 50); do
            redis-cli -p "$port" ping >/dev/null 2>&1 && break
            sleep 0.1
        done
    done
    local nodes=()
    for port in "${PORTS[@]}"; do nodes+=("127.0.0.1:$port"); done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas "$REPLICAS" --cluster-yes >"$DIR/create.log" 2>&1
    for _ in $(seq 1 100); do
        if healthy; then
            echo "redis cluster: started on ports ${PORTS[*]}"
            return
        fi
        sleep 0.1
    done
    echo "error: the redis cluster did not become healthy; see $DIR" >&2
    exit 1
}

stop() {
    for port in "${PORTS[@]}"; do
        redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    done
    echo "redis cluster: stopped"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
