#!/usr/bin/env bash
# Side-by-side benchmark: direct / nginx / HAProxy / HAProxy+JWT / wsedge (with JWT) / wsedge with
# session resume on, in front of the same upstream, driven by the same load tool, interleaved
# A B C A B C, REPS repetitions. The HTTP row (proxied GETs and SSE events) runs through the
# same proxies to the load tool's HTTP upstream (wsedge: a route with http = "proxy"; nginx and
# HAProxy: keep-alive to the upstream, nginx unbuffered as SSE needs).
# Prints one JSON line per run into $OUT/results.jsonl and a summary table (medians, min–max,
# ratios to nginx) at the end. See BENCHMARKS.md for the method and the latest figures.
#
#   bench/compare.sh                       # full run (~14 minutes on 2 cores)
#   REPS=1 STREAM_MESSAGES=20000 IDLE=1000 bench/compare.sh   # quick look
#   MODES="http sse" bench/compare.sh                          # the HTTP row alone
set -euo pipefail
cd "$(dirname "$0")/.."

REPS=${REPS:-5}
STREAM_CONNECTIONS=${STREAM_CONNECTIONS:-20}
# 20 × 1,000,000 tokens: a couple of seconds per run, not a few hundred milliseconds.
STREAM_MESSAGES=${STREAM_MESSAGES:-1000000}
STREAM_SIZE=${STREAM_SIZE:-32}
RTT_CONNECTIONS=${RTT_CONNECTIONS:-50}
# 2,000 round trips: runs of seconds, long enough that medians hold still.
RTT_ROUND_TRIPS=${RTT_ROUND_TRIPS:-2000}
HANDSHAKES=${HANDSHAKES:-5000}
HANDSHAKE_CONCURRENCY=${HANDSHAKE_CONCURRENCY:-50}
IDLE=${IDLE:-5000}
HTTP_CONNECTIONS=${HTTP_CONNECTIONS:-50}
# 4,000 GETs per connection: runs of seconds (nginx closes a keep-alive connection after
# 1,000 requests; the load tool opens another, as clients do).
HTTP_REQUESTS=${HTTP_REQUESTS:-4000}
SSE_CONNECTIONS=${SSE_CONNECTIONS:-20}
SSE_EVENTS=${SSE_EVENTS:-200000}
SSE_SIZE=${SSE_SIZE:-32}
# Which figures to measure, of: stream rtt handshake idle http sse.
MODES=${MODES:-stream rtt handshake idle http sse}
SECRET=bench-secret-0123456789abcdef0123456789
OUT=${OUT:-$(mktemp -d /tmp/wsedge-bench.XXXXXX)}

if ! command -v nginx >/dev/null || ! command -v haproxy >/dev/null || ! command -v openssl >/dev/null; then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx haproxy openssl
fi
# The release binaries, PIDS and cleanup, wait_port, the descriptor limit.
. scripts/common.sh

# --- the upstream, shared by all: WebSockets on 19001, HTTP on 19011
"$LOAD" upstream --listen 127.0.0.1:19001 --http-listen 127.0.0.1:19011 2>"$OUT/upstream.log" &
PIDS+=($!)

# --- nginx: an opaque tunnel after the upgrade, one worker per core
cat >"$OUT/nginx.conf" <<EOF
worker_processes $(nproc);
daemon off;
user root;
pid $OUT/nginx.pid;
error_log $OUT/nginx-error.log warn;
events { worker_connections 20000; }
http {
  access_log off;
  map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
  upstream api { server 127.0.0.1:19011; keepalive 64; }
  server {
    listen 127.0.0.1:19002;
    location /api/ {
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }
    location / {
      proxy_pass http://127.0.0.1:19001;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection \$connection_upgrade;
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
    }
  }
}
EOF

# --- HAProxy, plain and with jwt_verify of the same HS256 token (x-user-id from sub)
haproxy_config() { # port, extra frontend lines
    cat <<EOF
global
  nbthread $(nproc)
  maxconn 9900
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend fe
  bind 127.0.0.1:$1
$2
  use_backend api if { path_beg /api/ }
  default_backend be
backend be
  server upstream 127.0.0.1:19001
backend api
  server api 127.0.0.1:19011
EOF
}
haproxy_config 19003 "" >"$OUT/haproxy.cfg"
haproxy_config 19004 "  http-request set-var(txn.token) url_param(token)
  http-request set-var(txn.alg) var(txn.token),jwt_header_query('\$.alg')
  http-request deny deny_status 401 unless { var(txn.alg) -m str HS256 }
  http-request deny deny_status 401 unless { var(txn.token),jwt_verify(txn.alg,\"$SECRET\") -m int 1 }
  http-request set-header x-user-id %[var(txn.token),jwt_payload_query('\$.sub')]" >"$OUT/haproxy-jwt.cfg"

# --- wsedge with HS256 JWT auth and identity injection (limits off: this measures the relay)
cat >"$OUT/wsedge.toml" <<EOF
[server]
listen = ["127.0.0.1:19005"]
max_connections_per_user = 0
handshake_rate_per_ip = "off"
[log]
level = "warn"
[auth.main]
kind = "jwt"
algorithms = ["HS256"]
secret = "$SECRET"
[[route]]
path = "/ws"
upstream = "ws://127.0.0.1:19001/ws"
auth = "main"
message_rate = "off"
[[route]]
path = "/api"
match = "prefix"
upstream = "ws://127.0.0.1:19011/api"
auth = "main"
http = "proxy"
EOF
# The same edge verifying RS256 tokens with a key from a JWK set (the handshake row only): what
# an identity provider's keys cost per handshake, beside HS256. The set is read from a file; a
# set fetched from a URL is verified the same way.
openssl genrsa -out "$OUT/rs256.pem" 2048 2>/dev/null
MODULUS=$(openssl rsa -in "$OUT/rs256.pem" -noout -modulus | cut -d= -f2)
python3 -c "
import base64, json, sys
n = bytes.fromhex(sys.argv[1])
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b'=').decode()
print(json.dumps({'keys': [{'kty': 'RSA', 'kid': 'bench', 'use': 'sig', 'alg': 'RS256', 'n': b64(n), 'e': 'AQAB'}]}))
" "$MODULUS" >"$OUT/jwks.json"
cat >"$OUT/wsedge-rs256.toml" <<EOF
[server]
listen = ["127.0.0.1:19007"]
max_connections_per_user = 0
handshake_rate_per_ip = "off"
[log]
level = "warn"
[auth.main]
kind = "jwt"
algorithms = ["RS256"]
jwks = { file = "$OUT/jwks.json" }
[[route]]
path = "/ws"
upstream = "ws://127.0.0.1:19001/ws"
auth = "main"
message_rate = "off"
EOF
# The same edge with session resume on (defaults: 1000 messages / 4 MiB kept per client). Every
# connection of the load tool is its own user, so one session_id names a session per connection.
sed -e 's/19005/19006/' -e 's/^message_rate = "off"$/message_rate = "off"\nresume = { window = "30s" }/' \
    "$OUT/wsedge.toml" >"$OUT/wsedge-resume.toml"
declare -A PORT=([direct]=19001 [nginx]=19002 [haproxy]=19003 [haproxy-jwt]=19004 [wsedge]=19005 [wsedge-resume]=19006 [wsedge-rs256]=19007)
declare -A QUERY=([wsedge-resume]="?session_id=bench")
declare -A PROXY_PID=()
start_proxy() {
    case $1 in
        nginx) nginx -c "$OUT/nginx.conf" & ;;
        haproxy) haproxy -f "$OUT/haproxy.cfg" -db >>"$OUT/haproxy.log" 2>&1 & ;;
        haproxy-jwt) haproxy -f "$OUT/haproxy-jwt.cfg" -db >>"$OUT/haproxy-jwt.log" 2>&1 & ;;
        wsedge) "$EDGE" --config "$OUT/wsedge.toml" 2>>"$OUT/wsedge.log" & ;;
        wsedge-resume) "$EDGE" --config "$OUT/wsedge-resume.toml" 2>>"$OUT/wsedge-resume.log" & ;;
        wsedge-rs256) "$EDGE" --config "$OUT/wsedge-rs256.toml" 2>>"$OUT/wsedge-rs256.log" & ;;
    esac
    PROXY_PID[$1]=$!
    PIDS+=($!)
    wait_port "${PORT[$1]}"
}
stop_proxy() {
    kill "${PROXY_PID[$1]}" 2>/dev/null || true
    wait "${PROXY_PID[$1]}" 2>/dev/null || true
    while (exec 3<>"/dev/tcp/127.0.0.1/${PORT[$1]}") 2>/dev/null; do sleep 0.05; done
}

declare -A AUTH=([direct]="" [nginx]="" [haproxy]="" [haproxy-jwt]="--jwt-secret $SECRET" [wsedge]="--jwt-secret $SECRET" [wsedge-resume]="--jwt-secret $SECRET" [wsedge-rs256]="--jwt-rsa-key $OUT/rs256.pem --jwt-kid bench")
TARGETS=(direct nginx haproxy haproxy-jwt wsedge wsedge-resume)
# RS256 from a JWK set is an admission matter: only the handshake row measures that edge.
HANDSHAKE_TARGETS=("${TARGETS[@]}" wsedge-rs256)
# Resume is a WebSocket matter: the HTTP row leaves that edge out.
HTTP_TARGETS=(direct nginx haproxy haproxy-jwt wsedge)
declare -A HTTP_PORT=([direct]=19011 [nginx]=19002 [haproxy]=19003 [haproxy-jwt]=19004 [wsedge]=19005)
PROXIES=(nginx haproxy haproxy-jwt wsedge wsedge-resume)
wait_port 19001
for proxy in "${PROXIES[@]}" wsedge-rs256; do start_proxy "$proxy"; done

# The resident memory of a process and all its descendants, in KiB.
tree_rss() {
    local total=0 pid
    for pid in $1 $(pgrep -P "$1" || true); do
        total=$((total + $(awk '/^VmRSS:/ {print $2}' "/proc/$pid/status" 2>/dev/null || echo 0)))
    done
    echo "$total"
}

RESULTS=$OUT/results.jsonl
: >"$RESULTS"
load() { # mode, target, rep, args…
    local mode=$1 target=$2 rep=$3
    shift 3
    # shellcheck disable=SC2086
    "$LOAD" "$mode" --url "ws://127.0.0.1:${PORT[$target]}/ws${QUERY[$target]:-}" --label "$target" ${AUTH[$target]} "$@" |
        python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r['rep']=$rep; print(json.dumps(r))" >>"$RESULTS"
    tail -1 "$RESULTS"
}
load_http() { # mode, target, rep, path, args…
    local mode=$1 target=$2 rep=$3 path=$4
    shift 4
    # shellcheck disable=SC2086
    "$LOAD" "$mode" --url "http://127.0.0.1:${HTTP_PORT[$target]}$path" --label "$target" ${AUTH[$target]} "$@" |
        python3 -c "import json,sys; r=json.loads(sys.stdin.read()); r['rep']=$rep; print(json.dumps(r))" >>"$RESULTS"
    tail -1 "$RESULTS"
}
measuring() { [[ " $MODES " == *" $1 "* ]]; }

for rep in $(seq 1 "$REPS"); do
    # Each repetition starts one target later (A B C, B C A, C A B): no target always runs
    # right after the others have filled the kernel's tables (handshake runs leave tens of
    # thousands of TIME_WAIT sockets toward the shared upstream for a minute).
    shift_by=$(( (rep - 1) % ${#TARGETS[@]} ))
    ORDER=("${TARGETS[@]:shift_by}" "${TARGETS[@]:0:shift_by}")
    if measuring stream; then
        for target in "${ORDER[@]}"; do
            load stream "$target" "$rep" --connections "$STREAM_CONNECTIONS" --messages "$STREAM_MESSAGES" --size "$STREAM_SIZE"
        done
    fi
    if measuring rtt; then
        for target in "${ORDER[@]}"; do
            load rtt "$target" "$rep" --connections "$RTT_CONNECTIONS" --round-trips "$RTT_ROUND_TRIPS"
        done
    fi
    if measuring handshake; then
        shift_by=$(( (rep - 1) % ${#HANDSHAKE_TARGETS[@]} ))
        for target in "${HANDSHAKE_TARGETS[@]:shift_by}" "${HANDSHAKE_TARGETS[@]:0:shift_by}"; do
            load handshake "$target" "$rep" --count "$HANDSHAKES" --concurrency "$HANDSHAKE_CONCURRENCY"
        done
    fi
    shift_by=$(( (rep - 1) % ${#HTTP_TARGETS[@]} ))
    HTTP_ORDER=("${HTTP_TARGETS[@]:shift_by}" "${HTTP_TARGETS[@]:0:shift_by}")
    if measuring http; then
        for target in "${HTTP_ORDER[@]}"; do
            load_http http "$target" "$rep" /api/answer --connections "$HTTP_CONNECTIONS" --requests "$HTTP_REQUESTS"
        done
    fi
    if measuring sse; then
        for target in "${HTTP_ORDER[@]}"; do
            load_http sse "$target" "$rep" /api/sse --connections "$SSE_CONNECTIONS" --events "$SSE_EVENTS" --size "$SSE_SIZE"
        done
    fi
    measuring idle || continue
    for target in "${PROXIES[@]}"; do
        # A fresh process: memory an allocator kept from the streams above would hide the cost.
        stop_proxy "$target"
        start_proxy "$target"
        sleep 0.5
        pid=${PROXY_PID[$target]}
        before=$(tree_rss "$pid")
        # shellcheck disable=SC2086
        "$LOAD" idle --url "ws://127.0.0.1:${PORT[$target]}/ws${QUERY[$target]:-}" --label "$target" ${AUTH[$target]} \
            --connections "$IDLE" --hold 4s >"$OUT/idle.json" 2>"$OUT/idle.err" &
        idle_pid=$!
        until grep -q ready "$OUT/idle.err" 2>/dev/null; do
            kill -0 "$idle_pid" 2>/dev/null || break
            sleep 0.1
        done
        sleep 1.5
        during=$(tree_rss "$pid")
        wait "$idle_pid"
        python3 -c "
import json; r = json.load(open('$OUT/idle.json'))
r.update(rep=$rep, rss_before_kib=$before, rss_during_kib=$during,
         kib_per_connection=($during - $before) / max(r['opened'], 1))
print(json.dumps(r))" >>"$RESULTS"
        tail -1 "$RESULTS"
        # Let the closed sockets drain before the next proxy's turn.
        sleep 1
    done
done

python3 bench/summarize.py "$RESULTS"
echo "raw results: $RESULTS"
