#!/usr/bin/env bash
# Runs idem's whole test suite: formatting, lints, docs, and every test.
#
# Tests talk to real servers on 127.0.0.1 (PostgreSQL, Redis, NATS JetStream,
# a Kafka-protocol broker).
# Each is checked first; one that is not running is installed from Debian's
# packages if missing, then started. Run from anywhere: ./scripts/test.sh
set -euo pipefail

cd "$(dirname "$0")/.."
log() { printf '\n==> %s\n' "$*"; }

apt_updated=0
apt_install() {
    if [ "$apt_updated" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# wait_for "what" command...: retries a readiness check for up to 30 s.
wait_for() {
    local what=$1
    shift
    for _ in $(seq 1 60); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    echo "error: $what did not become ready" >&2
    return 1
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

postgres_ready() {
    command -v psql >/dev/null && psql -h 127.0.0.1 -U postgres -d test -tAc 'select 1' 2>/dev/null | grep -q 1
}

ensure_postgres() {
    if postgres_ready; then echo "postgres: running"; return; fi
    command -v pg_ctlcluster >/dev/null || apt_install postgresql postgresql-client
    local ver
    ver=$(ls /etc/postgresql | sort -V | tail -n 1)
    local hba="/etc/postgresql/$ver/main/pg_hba.conf"
    # Tests connect as postgres over loopback without a password.
    sed -i -E 's/^(local[[:space:]]+all[[:space:]]+(postgres|all)[[:space:]]+).*/\1trust/;
               s/^(host[[:space:]]+all[[:space:]]+all[[:space:]]+(127\.0\.0\.1\/32|::1\/128)[[:space:]]+).*/\1trust/' "$hba"
    pg_ctlcluster --skip-systemctl-redirect "$ver" main start 2>/dev/null || pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
    wait_for postgres psql -h 127.0.0.1 -U postgres -tAc 'select 1'
    psql -h 127.0.0.1 -U postgres -tAc "select 1 from pg_database where datname = 'test'" | grep -q 1 ||
        psql -h 127.0.0.1 -U postgres -qc 'create database test'
    postgres_ready
    echo "postgres: started"
}

ensure_redis() {
    if command -v redis-cli >/dev/null && [ "$(redis-cli -h 127.0.0.1 -p 6379 ping 2>/dev/null)" = PONG ]; then
        echo "redis: running"
        return
    fi
    command -v redis-server >/dev/null || apt_install redis-server
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
        --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_for redis sh -c '[ "$(redis-cli -h 127.0.0.1 -p 6379 ping)" = PONG ]'
    echo "redis: started"
}

ensure_nats() {
    # The binary too, even when a server already runs: tests/message/restart.rs
    # starts (and kills) a server of its own.
    command -v nats-server >/dev/null || [ -x /usr/sbin/nats-server ] || apt_install nats-server
    if port_open 4222; then echo "nats: running"; return; fi
    local bin
    bin=$(command -v nats-server || echo /usr/sbin/nats-server)
    mkdir -p /var/lib/nats-server
    start-stop-daemon --start --oknodo --background --exec "$bin" -- \
        -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
    wait_for nats port_open 4222
    echo "nats: started"
}

# A Kafka-protocol broker: tansu (crates.io), built once outside the workspace's
# target dir (about 15 minutes on 2 cores), in-memory storage.
TANSU_VERSION=0.6.0
ensure_kafka() {
    if port_open 9092; then echo "kafka (tansu): running"; return; fi
    if ! command -v tansu >/dev/null; then
        echo "kafka: building tansu $TANSU_VERSION (once)"
        CARGO_TARGET_DIR=/var/tmp/tansu-build cargo install tansu --version "$TANSU_VERSION" \
            --locked --features dynostore --quiet
        # Kept only until it succeeds (a failed build resumes from it): GBs.
        rm -rf /var/tmp/tansu-build
    fi
    mkdir -p /var/log
    nohup tansu broker --listener-url tcp://127.0.0.1:9092 --advertised-listener-url tcp://127.0.0.1:9092 \
        --storage-engine memory://tansu/ >/var/log/tansu.log 2>&1 &
    wait_for kafka port_open 9092
    echo "kafka (tansu): started"
}

# A cold run builds about 12 GB (the workspace three ways, a broker): say
# early when the disk cannot hold it, rather than failing mid-build.
log "disk"
df -h . | tail -n 1
free_kb=$(df -Pk . | awk 'NR == 2 { print $4 }')
if [ "$free_kb" -lt $((12 * 1024 * 1024)) ]; then
    echo "warning: under 12 GB free here; a cold run may fail with 'No space left on device'" >&2
fi

log "services"
ensure_postgres
ensure_redis
ensure_nats
ensure_kafka
./scripts/redis-cluster.sh start
# The chaos harness's cluster: a replica per master, for its failovers.
IDEM_CLUSTER_PORTS="7201 7202 7203 7204 7205 7206" IDEM_CLUSTER_REPLICAS=1 ./scripts/redis-cluster.sh start
# The chaos harness skews service clocks with libfaketime.
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 ] || [ -e /usr/lib/faketime/libfaketimeMT.so.1 ] ||
    apt_install faketime

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (all targets, all features, warnings denied)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

log "cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --all-features -q

log "order-service demo"
cargo run -q -p order-service -- demo

log "gRPC demo (examples/grpc)"
cargo run -q -p grpc-example

log "chaos: the short seeded suite under faults, and a build with fencing disabled it must catch"
# RELIABILITY.md explains the table this prints; `idem-chaos suite --long` is the long run.
cargo build -q -p idem-chaos -p order-service
RUSTFLAGS="--cfg idem_unfenced" CARGO_TARGET_DIR=target/unfenced cargo build -q -p idem-chaos
./target/debug/idem-chaos suite --short --seed 1 --out target/chaos \
    --unfenced-bin target/unfenced/debug/idem-chaos

log "cargo test (workspace, all features)"
mkdir -p target
cargo test --workspace --all-features 2>&1 | tee target/test-output.log

# Every interleaving of MemoryStore's and ReplayCache's shard locks and token
# counter (idem-runtime/src/store/sync.rs). `--cfg idem_loom` swaps std's locks
# for loom's, so it builds in a target dir of its own (about 2 minutes cold).
log "loom (in-process store internals, release)"
RUSTFLAGS="--cfg idem_loom" CARGO_TARGET_DIR=target/loom \
    cargo test -p idem-runtime --release --lib loom 2>&1 | tee -a target/test-output.log
# One closing line for the whole run (cargo prints one per test binary, and the
# last binary may be a crate with no doc tests).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "\nsummary: %d passed, %d failed\n", p, f }' target/test-output.log
echo "build dirs: $(du -sh target 2>/dev/null | cut -f1) in target/; $(df -h . | awk 'NR == 2 { print $4 }') left on the disk"
