#!/usr/bin/env python3
"""CPU time per proxied GET, split into user and system time, for nginx and wsedge side by side.

Requests per second on a shared machine say who won; this says where each proxy spends its
time. nginx (one worker per core, keep-alive to the upstream) and the release edge (an HS256
policy, a route with http = "proxy") run in front of the load tool's HTTP upstream, alternately,
REPS times each; every run is CONNECTIONS keep-alive connections x REQUESTS GETs. Before and after
each run the script reads the utime and stime of every thread of the proxy and of the upstream
(from /proc) and the load tool's own, and prints microseconds per request.

    bench/cpu_per_request.py              # REPS=3, 50 x 4000 GETs a run
    EDGE=/path/to/wsedge bench/cpu_per_request.py
    BEARER=1 bench/cpu_per_request.py     # wsedge's token in Authorization, not the query

Needs the release binaries (cargo build --release) and nginx.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOAD = os.path.join(ROOT, "target/release/wsedge-load")
EDGE = os.environ.get("EDGE", os.path.join(ROOT, "target/release/wsedge"))
REPS = int(os.environ.get("REPS", "3"))
CONNECTIONS = int(os.environ.get("CONNECTIONS", "50"))
REQUESTS = int(os.environ.get("REQUESTS", "4000"))
SECRET = "cpu-secret-0123456789abcdef0123456789"
TICKS = os.sysconf("SC_CLK_TCK")

NGINX = """worker_processes {cores};
daemon off;
user root;
pid {out}/nginx.pid;
error_log {out}/nginx-error.log warn;
events {{ worker_connections 20000; }}
http {{
  access_log off;
  upstream api {{ server 127.0.0.1:29411; keepalive 64; }}
  server {{
    listen 127.0.0.1:29402;
    location /api/ {{
      proxy_pass http://api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}
}}
"""

WSEDGE = """[server]
listen = ["127.0.0.1:29405"]
max_connections_per_user = 0
handshake_rate_per_ip = "off"
[log]
level = "warn"
[auth.main]
kind = "jwt"
algorithms = ["HS256"]
secret = "{secret}"
[[route]]
path = "/api"
match = "prefix"
upstream = "ws://127.0.0.1:29411/api"
auth = "main"
http = "proxy"
"""


def cpu(pids):
    """User and system seconds of the processes `pids` (all their threads, exited ones too)."""
    user = system = 0
    for pid in pids:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user / TICKS, system / TICKS


def wait_port(port):
    import socket

    for _ in range(200):
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    sys.exit(f"nothing listens on {port}")


def main():
    if not shutil.which("nginx"):
        sys.exit("nginx is not installed")
    out = tempfile.mkdtemp(prefix="wsedge-cpu.")
    with open(f"{out}/nginx.conf", "w") as f:
        f.write(NGINX.format(cores=os.cpu_count(), out=out))
    with open(f"{out}/wsedge.toml", "w") as f:
        f.write(WSEDGE.format(secret=SECRET))
    quiet = subprocess.DEVNULL
    upstream = subprocess.Popen(
        [LOAD, "upstream", "--listen", "127.0.0.1:29401", "--http-listen", "127.0.0.1:29411"],
        stderr=quiet,
    )
    nginx = subprocess.Popen(["nginx", "-c", f"{out}/nginx.conf"])
    edge = subprocess.Popen([EDGE, "--config", f"{out}/wsedge.toml"], stderr=quiet)
    try:
        for port in (29411, 29402, 29405):
            wait_port(port)
        workers = []
        for _ in range(100):
            workers = subprocess.run(
                ["pgrep", "-P", str(nginx.pid)], capture_output=True, text=True
            ).stdout.split()
            if len(workers) == os.cpu_count():
                break
            time.sleep(0.05)
        proxies = {
            "nginx": ([int(pid) for pid in workers], 29402, []),
            "wsedge": (
                [edge.pid],
                29405,
                ["--jwt-secret", SECRET] + (["--bearer"] if os.environ.get("BEARER") == "1" else []),
            ),
        }
        rows = {name: [] for name in proxies}
        for rep in range(REPS):
            for name, (pids, port, auth) in proxies.items():
                proxy_before, upstream_before = cpu(pids), cpu([upstream.pid])
                load_before = os.times()
                run = subprocess.run(
                    [LOAD, "http", "--url", f"http://127.0.0.1:{port}/api/answer", "--label", name,
                     "--connections", str(CONNECTIONS), "--requests", str(REQUESTS), *auth],
                    capture_output=True, text=True, check=True,
                )
                load_after = os.times()
                proxy_after, upstream_after = cpu(pids), cpu([upstream.pid])
                result = json.loads(run.stdout.strip().splitlines()[-1])
                n = result["completed"]
                if n == 0:
                    sys.exit(f"{name}: no request completed: {result['first_error']}")
                per = lambda after, before, i: round(1e6 * (after[i] - before[i]) / n, 2)
                row = {
                    "proxy": name, "rep": rep + 1, "errors": result["errors"],
                    "requests_per_second": round(result["requests_per_second"]),
                    "proxy_user_us": per(proxy_after, proxy_before, 0),
                    "proxy_sys_us": per(proxy_after, proxy_before, 1),
                    "upstream_user_us": per(upstream_after, upstream_before, 0),
                    "upstream_sys_us": per(upstream_after, upstream_before, 1),
                    "load_user_us": round(1e6 * (load_after.children_user - load_before.children_user) / n, 2),
                    "load_sys_us": round(1e6 * (load_after.children_system - load_before.children_system) / n, 2),
                }
                rows[name].append(row)
                print(json.dumps(row), flush=True)
        keys = [key for key in rows["nginx"][0] if key.endswith("_us") or key == "requests_per_second"]
        print("\n| per proxied GET (median) | nginx | wsedge | wsedge / nginx |")
        print("|---|---|---|---|")
        for key in keys:
            a = statistics.median(row[key] for row in rows["nginx"])
            b = statistics.median(row[key] for row in rows["wsedge"])
            print(f"| {key} | {a:,} | {b:,} | {b / a:.2f}× |" if a else f"| {key} | {a} | {b} | — |")
    finally:
        for process in (edge, nginx, upstream):
            process.terminate()
            process.wait()
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
