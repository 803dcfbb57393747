#!/usr/bin/env bash
# Soak: DURATION (default 30m) of mixed load through a release edge — streams, echo round
# trips, handshake churn, clients that lose their connection and resume, slow readers, proxied
# GETs and SSE streams, and a floor of idle connections — with the edge's RSS and open
# connections sampled every 10 s (rss.csv in OUT). Prints a table with one sample a minute,
# a plot of every sample, and a summary line (RSS must stay flat: the slope fitted to the
# second half is the figure to watch). Not part of the test command.
#
# SETTLE keeps the edge, idle, for that long after the load (sampled as before): with SETTLE
# past the 600 s the edge remembers ended sessions for, what RSS falls back to tells memory the
# edge still holds (a leak) from memory it held for the load.
#
#   scripts/soak.sh                      # 30 minutes
#   DURATION=2m scripts/soak.sh          # a quick look
#   SETTLE=11m scripts/soak.sh           # then 11 minutes without load
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-30m}
SETTLE=${SETTLE:-0s}
IDLE=${IDLE:-2000}
SECRET=soak-secret-0123456789abcdef0123456789
OUT=${OUT:-$(mktemp -d /tmp/wsedge-soak.XXXXXX)}
to_seconds() {
    python3 -c "
import re, sys
n, unit = re.fullmatch(r'(\d+)([smh])', sys.argv[1]).groups()
print(int(n) * {'s': 1, 'm': 60, 'h': 3600}[unit])" "$1"
}
seconds=$(to_seconds "$DURATION")
settle_seconds=$(to_seconds "$SETTLE")

. scripts/common.sh

"$LOAD" upstream --listen 127.0.0.1:29201 --http-listen 127.0.0.1:29211 2>"$OUT/upstream.log" &
PIDS+=($!)
cat >"$OUT/wsedge.toml" <<CONFIG
[server]
listen = ["127.0.0.1:29205"]
max_connections_per_user = 0
handshake_rate_per_ip = "off"
[admin]
listen = "127.0.0.1:29209"
[log]
level = "warn"
[auth.main]
kind = "jwt"
algorithms = ["HS256"]
secret = "$SECRET"
[[route]]
path = "/ws"
upstream = "ws://127.0.0.1:29201/ws"
auth = "main"
message_rate = "off"
[[route]]
path = "/resume"
upstream = "ws://127.0.0.1:29201/ws"
auth = "main"
message_rate = "off"
resume = { window = "30s", max_messages = 5000, max_bytes = "4MiB" }
[[route]]
path = "/api"
match = "prefix"
upstream = "ws://127.0.0.1:29211/api"
auth = "main"
http = "proxy"
CONFIG
"$EDGE" --config "$OUT/wsedge.toml" 2>"$OUT/edge.log" &
EDGE_PID=$!
PIDS+=($EDGE_PID)
wait_port 29209

deadline=$(($(date +%s) + seconds))
WS=(--url ws://127.0.0.1:29205/ws --jwt-secret "$SECRET")
# Each kind of load in a loop of its own until the deadline; one JSON line per run.
repeat() { # name, load arguments…
    local name=$1
    shift
    while [ "$(date +%s)" -lt "$deadline" ]; do
        "$LOAD" "$@" >>"$OUT/$name.jsonl" 2>>"$OUT/$name.log" || echo '{"errors":"exit"}' >>"$OUT/$name.jsonl"
        sleep 1
    done
}
"$LOAD" idle "${WS[@]}" --connections "$IDLE" --hold "${seconds}s" --sources 8 >"$OUT/idle.jsonl" 2>"$OUT/idle.log" &
PIDS+=($!)
repeat stream stream "${WS[@]}" --connections 10 --messages 50000 --size 64 &
PIDS+=($!)
repeat rtt rtt "${WS[@]}" --connections 20 --round-trips 500 &
PIDS+=($!)
repeat handshake handshake "${WS[@]}" --count 2000 --concurrency 20 &
PIDS+=($!)
repeat resume resume --url ws://127.0.0.1:29205/resume --jwt-secret "$SECRET" --connections 20 --messages 3000 --rounds 3 &
PIDS+=($!)
repeat slow slow "${WS[@]}" --connections 5 --messages 20000 --size 512 --batch 200 --pause 20ms &
PIDS+=($!)
HTTP=(--jwt-secret "$SECRET")
repeat http http --url http://127.0.0.1:29205/api/answer "${HTTP[@]}" --connections 10 --requests 2000 &
PIDS+=($!)
repeat sse sse --url http://127.0.0.1:29205/api/sse "${HTTP[@]}" --connections 5 --events 20000 --size 64 &
PIDS+=($!)

echo "elapsed_s,rss_kib,open_connections,load" >"$OUT/rss.csv"
start=$(date +%s)
sample() { # load: 1 while the load runs, 0 as the edge settles
    local rss open
    rss=$(awk '/VmRSS/ { print $2 }' "/proc/$EDGE_PID/status")
    open=$(open_connections 29209)
    echo "$(($(date +%s) - start)),$rss,$open,$1" >>"$OUT/rss.csv"
}
while [ "$(date +%s)" -lt "$deadline" ]; do
    sample 1
    sleep 10
done
# The loops' last runs end within seconds of the deadline.
sleep 5
open_at_end=$(open_connections 29209)
settled=$(($(date +%s) + settle_seconds))
while [ "$(date +%s)" -lt "$settled" ]; do
    sleep 10
    sample 0
done

python3 - "$OUT" "$open_at_end" <<'PY'
import csv, json, os, sys
out, open_at_end = sys.argv[1], int(sys.argv[2])
every = list(csv.DictReader(open(os.path.join(out, "rss.csv"))))
print("| elapsed | RSS (MiB) | open connections | |")
print("|---:|---:|---:|---|")
for row in every[::6] + ([every[-1]] if (len(every) - 1) % 6 else []):
    phase = "" if row["load"] == "1" else "settling"
    print(f"| {int(row['elapsed_s']) // 60}:{int(row['elapsed_s']) % 60:02d} | {int(row['rss_kib']) / 1024:.1f} | {row['open_connections']} | {phase} |")
rows = [r for r in every if r["load"] == "1"]
settling = [int(r["rss_kib"]) / 1024 for r in every if r["load"] == "0"]
rss = [int(r["rss_kib"]) for r in every]
# Every sample, a column of the plot each (RSS from its least to its most, 12 rows).
low, high = min(rss), max(rss)
print(f"\nRSS, every 10 s sample (the load's, then the settling's), {low / 1024:.1f} to {high / 1024:.1f} MiB:")
for level in range(11, -1, -1):
    floor = low + (high - low) * level / 12
    print("".join("#" if r > floor or level == 0 else " " for r in rss))
half_rows = rows[len(rows) // 2:]
xs = [int(r["elapsed_s"]) for r in half_rows]
ys = [int(r["rss_kib"]) / 1024 for r in half_rows]
mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
spread = sum((x - mean_x) ** 2 for x in xs)
slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / spread if spread else 0.0
half = [int(r["rss_kib"]) for r in half_rows]
runs, failed = {}, {}
for name in ["stream", "rtt", "handshake", "resume", "slow", "http", "sse"]:
    path = os.path.join(out, f"{name}.jsonl")
    lines = [json.loads(l) for l in open(path)] if os.path.exists(path) else []
    runs[name] = len(lines)
    failed[name] = sum(1 for l in lines if l.get("errors") not in (0, None))
print(json.dumps({
    "samples": len(rows), "settling_samples": len(settling), "rss_first_mib": rss[0] / 1024, "rss_max_mib": max(rss) / 1024,
    "rss_last_mib": int(rows[-1]["rss_kib"]) / 1024,
    "rss_settled_mib": settling[-1] if settling else None,
    "second_half_growth_mib": (half[-1] - half[0]) / 1024 if half else None,
    "second_half_slope_mib_per_10_min": round(slope * 600, 3),
    "runs": runs, "runs_with_errors": failed, "open_at_end": open_at_end,
    "out": out,
}))
PY
