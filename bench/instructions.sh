#!/usr/bin/env bash
# Instructions the edge executes per proxied GET: a figure that, unlike requests per second,
# does not move with the machine's load. Runs the release edge under callgrind (one worker, an
# HTTP route with a JWT policy, as in bench/compare.sh) in front of the load tool's HTTP
# upstream, twice: with LOW and with HIGH GETs per connection on 10 keep-alive connections, each
# with its own HS256 token in the query. What the two runs share (start, config, certificates,
# the first verification of each token, the drain) cancels out of the difference:
#
#   instructions per GET = (Ir(HIGH) - Ir(LOW)) / (10 × (HIGH - LOW))
#
#   bench/instructions.sh                 # LOW=100 HIGH=600: 5,000 GETs apart, ~1 minute
#   BIN=/path/to/other/wsedge bench/instructions.sh   # another build, for an A/B
#   BEARER=1 bench/instructions.sh        # the token in Authorization, as REST clients send it
set -euo pipefail
cd "$(dirname "$0")/.."

LOW=${LOW:-100}
HIGH=${HIGH:-600}
CONNECTIONS=10
SECRET=bench-secret-0123456789abcdef0123456789

if ! command -v valgrind >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends valgrind
fi
# The release binaries, PIDS and cleanup, wait_port.
. scripts/common.sh
BIN=${BIN:-$EDGE}
OUT=$(mktemp -d /tmp/wsedge-instructions.XXXXXX)

cat >"$OUT/edge.toml" <<EOF
[server]
listen = ["127.0.0.1:19305"]
workers = 1
max_connections_per_user = 0
handshake_rate_per_ip = "off"
[log]
level = "warn"
[auth.main]
kind = "jwt"
algorithms = ["HS256"]
secret = "$SECRET"
[[route]]
path = "/api"
match = "prefix"
upstream = "ws://127.0.0.1:19311/api"
auth = "main"
http = "proxy"
EOF

"$LOAD" upstream --listen 127.0.0.1:19301 --http-listen 127.0.0.1:19311 2>"$OUT/upstream.log" &
PIDS+=($!)
wait_port 19311

# Ir of one run of the edge serving $1 GETs per connection.
instructions() {
    local requests=$1 edge
    valgrind --tool=callgrind --callgrind-out-file="$OUT/callgrind.$requests" \
        "$BIN" --config "$OUT/edge.toml" 2>"$OUT/valgrind.$requests.log" &
    edge=$!
    # Slow to start under valgrind.
    for _ in $(seq 1 600); do
        (exec 3<>/dev/tcp/127.0.0.1/19305) 2>/dev/null && break
        sleep 0.05
    done
    "$LOAD" http --url "http://127.0.0.1:19305/api/answer" --jwt-secret "$SECRET" \
        --connections "$CONNECTIONS" --requests "$requests" $([ "${BEARER:-0}" = 1 ] && echo --bearer) >"$OUT/load.$requests.json"
    kill -TERM "$edge"
    wait "$edge" || true
    awk '/^(summary|totals):/ { print $2; exit }' "$OUT/callgrind.$requests"
}

low=$(instructions "$LOW")
high=$(instructions "$HIGH")
python3 -c "
import json
low, high, gets = $low, $high, $CONNECTIONS * ($HIGH - $LOW)
print(json.dumps({'instructions_per_get': round((high - low) / gets), 'gets_apart': gets,
                  'ir_low': low, 'ir_high': high, 'binary': '$BIN'}))"
echo "callgrind files: $OUT" >&2
