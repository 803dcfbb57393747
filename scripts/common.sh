# Sourced by the long-run scripts: the release binaries, the processes to stop at exit, and
# what they read off a running edge.

# Each proxied connection costs the edge two descriptors.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

cargo build --release --bins
LOAD=$PWD/target/release/wsedge-load
# EDGE=/path/to/another/build runs the scripts against it (an A/B of the same load).
EDGE=${EDGE:-$PWD/target/release/wsedge}

PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# Waits until something listens on 127.0.0.1:PORT.
wait_port() {
    for _ in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    echo "nothing listens on $1" >&2
    exit 1
}

# The edge's open WebSocket connections, from its admin listener on PORT.
open_connections() {
    curl -s "http://127.0.0.1:$1/metrics" |
        awk '$1 ~ /^wsedge_open_connections/ { s += $2 } END { print s + 0 }'
}
