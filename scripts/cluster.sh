#!/usr/bin/env bash
# Three edges sharing one Redis, behind HAProxy without any affinity (plain round robin), on
# loopback. Runs the load tool's resume mode through HAProxy (every reconnect may land on
# another edge: the cluster carries it to the edge holding its session), then prints what each
# edge counted. With MEASURE=1 it also measures, against the edges directly:
#   - handshakes per second with [cluster] on and off (max_connections_per_user set: each
#     handshake takes a lease in Redis),
#   - the time from a resume's connect to its first replayed message, resumed on the same edge
#     and on another one, one session at a time and fifty at once.
# Prints one JSON line per run; BENCHMARKS.md has the figures.
#
#   scripts/cluster.sh              # the demonstration
#   SESSIONS=2000 ROUNDS=5 scripts/cluster.sh   # a heavier one
#   MEASURE=1 scripts/cluster.sh    # and the figures (REPS=3 runs each)
set -euo pipefail
cd "$(dirname "$0")/.."

SECRET=cluster-demo-secret-0123456789abcdef0123
CLUSTER_SECRET=cluster-link-secret-0123456789abcdef0123
REPS=${REPS:-3}
SESSIONS=${SESSIONS:-200}
ROUNDS=${ROUNDS:-3}
MESSAGES=${MESSAGES:-3000}
OUT=$(mktemp -d /tmp/wsedge-cluster.XXXXXX)

for tool in redis-server haproxy curl; do
    command -v "$tool" >/dev/null || { echo "cluster.sh needs $tool (apt-get install redis-server haproxy curl)" >&2; exit 1; }
done

. scripts/common.sh

redis-server --port 0 --unixsocket "$OUT/redis.sock" --unixsocketperm 700 --save "" \
    --appendonly no --loglevel warning >"$OUT/redis.log" 2>&1 &
PIDS+=($!)
until [ -S "$OUT/redis.sock" ]; do sleep 0.05; done

"$LOAD" upstream --listen 127.0.0.1:29201 2>"$OUT/upstream.log" &
PIDS+=($!)

# edge NUMBER [cluster|standalone]: listens on 2921N, admin 2922N, link 2923N.
edge_config() {
    cat <<CONFIG
[server]
listen = ["127.0.0.1:2921$1"]
max_connections_per_user = 1000
handshake_rate_per_ip = "off"
[admin]
listen = "127.0.0.1:2922$1"
[auth.main]
kind = "jwt"
algorithms = ["HS256"]
secret = "$SECRET"
[[route]]
path = "/ws"
upstream = "ws://127.0.0.1:29201/ws"
auth = "main"
resume = { window = "30s", max_messages = 20000, max_bytes = "8MiB" }
CONFIG
    if [ "$2" = cluster ]; then
        cat <<CONFIG
[cluster]
redis = "redis+unix://$OUT/redis.sock"
node = "edge-$1"
secret = "$CLUSTER_SECRET"
link = "127.0.0.1:2923$1"
node_ttl = "15s"
CONFIG
    fi
}

start_edge() { # number, cluster|standalone
    edge_config "$1" "$2" >"$OUT/edge-$1.toml"
    "$EDGE" --config "$OUT/edge-$1.toml" 2>"$OUT/edge-$1.log" &
    PIDS+=($!)
    EDGE_PIDS[$1]=$!
    wait_port "2922$1"
}

stop_edge() {
    kill "${EDGE_PIDS[$1]}"
    wait "${EDGE_PIDS[$1]}" 2>/dev/null || true
}

declare -A EDGE_PIDS
for n in 1 2 3; do start_edge "$n" cluster; done

cat >"$OUT/haproxy.cfg" <<CONFIG
global
  maxconn 9000
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend fe
  bind 127.0.0.1:29200
  default_backend edges
backend edges
  balance roundrobin
  server edge-1 127.0.0.1:29211
  server edge-2 127.0.0.1:29212
  server edge-3 127.0.0.1:29213
CONFIG
haproxy -f "$OUT/haproxy.cfg" -db >"$OUT/haproxy.log" 2>&1 &
PIDS+=($!)
wait_port 29200

counted() { # admin port, metric name prefix
    curl -s "http://127.0.0.1:$1/metrics" | awk -v name="$2" 'index($1, name) == 1 { printf "%s=%s ", $1, $2 }'
}

echo "# through HAProxy, round robin, no affinity: $SESSIONS sessions, each cut and resumed $ROUNDS times" >&2
"$LOAD" resume --url ws://127.0.0.1:29200/ws --jwt-secret "$SECRET" --label haproxy-3-edges \
    --connections "$SESSIONS" --messages "$MESSAGES" --rounds "$ROUNDS"
for n in 1 2 3; do
    echo "edge-$n: $(counted "2922$n" wsedge_cluster_remote_resumes)$(counted "2922$n" 'wsedge_resumes_total')" >&2
done

[ "${MEASURE:-0}" = 1 ] || exit 0

for rep in $(seq 1 "$REPS"); do
    # One session at a time: what a resume costs by itself.
    "$LOAD" resume --url ws://127.0.0.1:29211/ws --jwt-secret "$SECRET" --label same-edge-alone \
        --connections 1 --messages 5000 --rounds 100
    "$LOAD" resume --url ws://127.0.0.1:29211/ws --resume-url ws://127.0.0.1:29212/ws \
        --jwt-secret "$SECRET" --label cross-edge-alone --connections 1 --messages 5000 --rounds 100
    # Fifty at once, each streaming.
    "$LOAD" resume --url ws://127.0.0.1:29211/ws --jwt-secret "$SECRET" --label same-edge \
        --connections 50 --messages 2000 --rounds 4
    "$LOAD" resume --url ws://127.0.0.1:29211/ws --resume-url ws://127.0.0.1:29212/ws \
        --jwt-secret "$SECRET" --label cross-edge --connections 50 --messages 2000 --rounds 4
    "$LOAD" handshake --url ws://127.0.0.1:29211/ws --jwt-secret "$SECRET" --label cluster-on \
        --count 20000 --concurrency 50
    stop_edge 1
    start_edge 1 standalone
    "$LOAD" handshake --url ws://127.0.0.1:29211/ws --jwt-secret "$SECRET" --label cluster-off \
        --count 20000 --concurrency 50
    stop_edge 1
    start_edge 1 cluster
done
