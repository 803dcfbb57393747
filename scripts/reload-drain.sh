#!/usr/bin/env bash
# Reload and drain under load: CONNECTIONS (default 9,000) idle WebSockets through a release
# edge, then SIGHUP with a changed config (a route added: none of the open connections may
# end), then SIGTERM (every one must be closed with 1001 inside drain_timeout). Prints one
# summary JSON line; BENCHMARKS.md has the figures.
#
#   scripts/reload-drain.sh                   # 9,000 connections
#   CONNECTIONS=2000 scripts/reload-drain.sh  # a quick look
set -euo pipefail
cd "$(dirname "$0")/.."

CONNECTIONS=${CONNECTIONS:-9000}
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-30s}
SECRET=soak-secret-0123456789abcdef0123456789
OUT=$(mktemp -d /tmp/wsedge-reload.XXXXXX)

. scripts/common.sh

"$LOAD" upstream --listen 127.0.0.1:29101 2>"$OUT/upstream.log" &
PIDS+=($!)
config() { # extra route lines
    cat <<CONFIG
[server]
listen = ["127.0.0.1:29105"]
max_connections_per_user = 0
handshake_rate_per_ip = "off"
drain_timeout = "$DRAIN_TIMEOUT"
[admin]
listen = "127.0.0.1:29109"
[auth.main]
kind = "jwt"
algorithms = ["HS256"]
secret = "$SECRET"
[[route]]
path = "/ws"
upstream = "ws://127.0.0.1:29101/ws"
auth = "main"
$1
CONFIG
}
config "" >"$OUT/wsedge.toml"
"$EDGE" --config "$OUT/wsedge.toml" 2>"$OUT/edge.log" &
EDGE_PID=$!
PIDS+=($EDGE_PID)
wait_port 29109

"$LOAD" idle --url ws://127.0.0.1:29105/ws --jwt-secret "$SECRET" --connections "$CONNECTIONS" \
    --hold 300s --sources 32 >"$OUT/idle.json" 2>"$OUT/idle.log" &
IDLE_PID=$!
until grep -q ready "$OUT/idle.log"; do
    kill -0 "$IDLE_PID" 2>/dev/null || { cat "$OUT/idle.log"; exit 1; }
    sleep 0.2
done
before=$(open_connections 29109)
rss_before=$(awk '/VmRSS/ { print $2 }' "/proc/$EDGE_PID/status")

# Reload with a route added; the open connections stay, and the new route serves.
config $'[[route]]\npath = "/ws2"\nupstream = "ws://127.0.0.1:29101/ws"\nauth = "main"' >"$OUT/wsedge.toml"
kill -HUP "$EDGE_PID"
until grep -q "config reloaded" "$OUT/edge.log"; do sleep 0.1; done
sleep 5
after_reload=$(open_connections 29109)
new_route=$("$LOAD" handshake --url ws://127.0.0.1:29105/ws2 --jwt-secret "$SECRET" --count 100 --concurrency 10)

# Drain: every client gets 1001 before the edge exits, inside drain_timeout.
signalled=$(date +%s%3N)
kill -TERM "$EDGE_PID"
wait "$EDGE_PID" && edge_status=0 || edge_status=$?
exited=$(date +%s%3N)
wait "$IDLE_PID" || true

python3 - "$OUT/idle.json" "$CONNECTIONS" "$before" "$after_reload" "$signalled" "$exited" \
    "$edge_status" "$rss_before" "$new_route" <<'PY'
import json, sys
idle = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
connections, before, after, signalled, exited, status, rss = map(int, sys.argv[2:9])
new_route = json.loads(sys.argv[9])
summary = {
    "connections": connections,
    "open_before_reload": before,
    "open_5s_after_reload": after,
    "dropped_by_reload": before - after,
    "new_route_handshakes": new_route.get("completed"),
    "edge_rss_kib_with_all_open": rss,
    "close_codes_at_drain": idle["close_codes"],
    "still_open_after_drain": idle["held"],
    "last_close_after_sigterm_ms": (idle["last_end_unix_ms"] or signalled) - signalled,
    "edge_exit_after_sigterm_ms": exited - signalled,
    "edge_exit_status": status,
}
print(json.dumps(summary))
ok = (summary["dropped_by_reload"] == 0 and idle["close_codes"] == {"1001": connections}
      and status == 0 and idle["errors"] == 0)
sys.exit(0 if ok else 1)
PY
