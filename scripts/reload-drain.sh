#!/usr/bin/env bash
# Reload and drain under load: CONNECTIONS (default 9,000) idle WebSockets through a release
# edge, and traffic beside them in loops (streams, echo round trips, proxied GETs) from before
# the reload until 5 s after it; then SIGHUP with a changed config (a route added: none of the
# open connections may end, and no run of the traffic may fail or lose a message), then SIGTERM
# (every idle one must be closed with 1001 inside drain_timeout). Prints one summary JSON line;
# BENCHMARKS.md has the figures.
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

"$LOAD" upstream --listen 127.0.0.1:29101 --http-listen 127.0.0.1:29111 2>"$OUT/upstream.log" &
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
message_rate = "off"
[[route]]
path = "/api"
match = "prefix"
upstream = "ws://127.0.0.1:29111/api"
auth = "main"
http = "proxy"
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
# Traffic in loops, each run one JSON line with its start and end (ms) appended to traffic.jsonl.
touch "$OUT/loading"
# An early exit stops the loops too (common.sh's cleanup waits for every process it kills).
trap 'rm -f "$OUT/loading"; cleanup' EXIT
traffic() { # mode, args…
    while [ -e "$OUT/loading" ]; do
        local start end line
        start=$(date +%s%3N)
        line=$("$LOAD" "$@" --jwt-secret "$SECRET" --label "$1" 2>>"$OUT/traffic.log" || true)
        end=$(date +%s%3N)
        echo "{\"start\": $start, \"end\": $end, \"result\": ${line:-null}}" >>"$OUT/traffic.jsonl"
    done
}
traffic stream --url ws://127.0.0.1:29105/ws --connections 10 --messages 100000 &
TRAFFIC=($!)
traffic rtt --url ws://127.0.0.1:29105/ws --connections 10 --round-trips 2000 &
TRAFFIC+=($!)
traffic http --url http://127.0.0.1:29105/api/answer --connections 10 --requests 2000 &
TRAFFIC+=($!)
PIDS+=("${TRAFFIC[@]}")
sleep 3
before=$(open_connections 29109)
rss_before=$(awk '/VmRSS/ { print $2 }' "/proc/$EDGE_PID/status")

# Reload with a route added; the open connections stay, and the new route serves.
config $'[[route]]\npath = "/ws2"\nupstream = "ws://127.0.0.1:29101/ws"\nauth = "main"' >"$OUT/wsedge.toml"
kill -HUP "$EDGE_PID"
until grep -q "config reloaded" "$OUT/edge.log"; do sleep 0.1; done
reloaded=$(date +%s%3N)
sleep 5
after_reload=$(open_connections 29109)
rm "$OUT/loading"
wait "${TRAFFIC[@]}"
new_route=$("$LOAD" handshake --url ws://127.0.0.1:29105/ws2 --jwt-secret "$SECRET" --count 100 --concurrency 10)

# Drain: every client gets 1001 before the edge exits, inside drain_timeout.
signalled=$(date +%s%3N)
kill -TERM "$EDGE_PID"
wait "$EDGE_PID" && edge_status=0 || edge_status=$?
exited=$(date +%s%3N)
wait "$IDLE_PID" || true

python3 - "$OUT/idle.json" "$CONNECTIONS" "$before" "$after_reload" "$signalled" "$exited" \
    "$edge_status" "$rss_before" "$new_route" "$OUT/traffic.jsonl" "$reloaded" <<'PY'
import json, sys
idle = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
connections, before, after, signalled, exited, status, rss = map(int, sys.argv[2:9])
new_route = json.loads(sys.argv[9])
reloaded = int(sys.argv[11])
runs = [json.loads(line) for line in open(sys.argv[10])]
def whole(run):
    result = run["result"]
    if not result or result.get("errors") != 0:
        return False
    # Every message, round trip or request the run set out to make.
    expected = {"stream": lambda r: r["connections"] * r["messages"],
                "rtt": lambda r: r["connections"] * r["round_trips"],
                "http": lambda r: r["connections"] * r["requests"]}[result["mode"]]
    done = result.get("received", result.get("completed"))
    return done == expected(result)
traffic = {}
for run in runs:
    mode = (run["result"] or {}).get("mode", "failed")
    entry = traffic.setdefault(mode, {"runs": 0, "whole": 0, "across_the_reload": 0})
    entry["runs"] += 1
    entry["whole"] += whole(run)
    entry["across_the_reload"] += run["start"] < reloaded < run["end"]
summary = {
    "connections": connections,
    # The gauge counts the traffic's connections too, which come and go.
    "open_before_reload": before,
    "open_5s_after_reload": after,
    # None of the idle connections ended before SIGTERM: the reload dropped none.
    "idle_ended_before_sigterm": idle["first_end_unix_ms"] is not None
        and idle["first_end_unix_ms"] < signalled,
    "new_route_handshakes": new_route.get("completed"),
    "edge_rss_kib_with_all_open": rss,
    "close_codes_at_drain": idle["close_codes"],
    "still_open_after_drain": idle["held"],
    "last_close_after_sigterm_ms": (idle["last_end_unix_ms"] or signalled) - signalled,
    "edge_exit_after_sigterm_ms": exited - signalled,
    "edge_exit_status": status,
    "traffic": traffic,
}
print(json.dumps(summary))
ok = (not summary["idle_ended_before_sigterm"] and idle["close_codes"] == {"1001": connections}
      and status == 0 and idle["errors"] == 0 and runs
      and all(whole(run) for run in runs)
      and all(traffic.get(mode, {}).get("across_the_reload", 0) >= 1 for mode in ("stream", "rtt", "http")))
sys.exit(0 if ok else 1)
PY
