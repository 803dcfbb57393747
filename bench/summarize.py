#!/usr/bin/env python3
"""Summarises bench/compare.sh results: median (min–max) per target and figure, the ratio of
wsedge's medians to nginx's, and the goals of the performance work with their ratios, as
Markdown tables."""

import json
import statistics
import sys
from collections import defaultdict

TARGETS = ["direct", "nginx", "haproxy", "haproxy-jwt", "wsedge", "wsedge-resume", "wsedge-rs256"]
FIGURES = [
    # (title, mode, extractor, higher is better, format)
    ("streamed msgs/s", "stream", lambda r: r["messages_per_second"], True, "{:,.0f}"),
    ("echo msgs/s", "rtt", lambda r: r["messages_per_second"], True, "{:,.0f}"),
    ("echo p50 µs", "rtt", lambda r: r["latency_us"]["p50"], False, "{:,.0f}"),
    ("echo p99 µs", "rtt", lambda r: r["latency_us"]["p99"], False, "{:,.0f}"),
    ("handshakes/s", "handshake", lambda r: r["handshakes_per_second"], True, "{:,.0f}"),
    ("handshake p99 µs", "handshake", lambda r: r["latency_us"]["p99"], False, "{:,.0f}"),
    ("KiB per idle connection", "idle", lambda r: r["kib_per_connection"], False, "{:,.1f}"),
    ("HTTP requests/s", "http", lambda r: r["requests_per_second"], True, "{:,.0f}"),
    ("HTTP p50 µs", "http", lambda r: r["latency_us"]["p50"], False, "{:,.0f}"),
    ("HTTP p99 µs", "http", lambda r: r["latency_us"]["p99"], False, "{:,.0f}"),
    ("SSE events/s", "sse", lambda r: r["events_per_second"], True, "{:,.0f}"),
]
# (goal, figure, peer, wsedge's median must be at least (True) or at most (False) the peer's)
GOALS = [
    ("streamed msgs/s ≥ nginx", "streamed msgs/s", "nginx", True),
    ("echo msgs/s ≥ nginx", "echo msgs/s", "nginx", True),
    ("echo p99 ≤ nginx", "echo p99 µs", "nginx", False),
    ("handshakes/s ≥ HAProxy + jwt_verify", "handshakes/s", "haproxy-jwt", True),
    ("KiB per idle connection ≤ HAProxy", "KiB per idle connection", "haproxy", False),
    ("HTTP requests/s ≥ nginx", "HTTP requests/s", "nginx", True),
    ("HTTP p99 ≤ nginx", "HTTP p99 µs", "nginx", False),
    ("SSE events/s ≥ nginx", "SSE events/s", "nginx", True),
]


def main(path):
    runs = [json.loads(line) for line in open(path) if line.strip()]
    values = defaultdict(list)
    errors = defaultdict(int)
    for run in runs:
        errors[run["label"]] += run.get("errors", 0)
        for title, mode, extract, _, _ in FIGURES:
            if run["mode"] == mode:
                values[(title, run["label"])].append(extract(run))
    medians = {
        key: statistics.median(samples) for key, samples in values.items() if samples
    }
    print("| figure | " + " | ".join(TARGETS) + " | wsedge / nginx |")
    print("|---|" + "---|" * (len(TARGETS) + 1))
    for title, _, _, _, fmt in FIGURES:
        cells = []
        for target in TARGETS:
            samples = values.get((title, target))
            if not samples:
                cells.append("—")
                continue
            cell = fmt.format(medians[(title, target)])
            if len(samples) > 1:
                cell += f" ({fmt.format(min(samples))}–{fmt.format(max(samples))})"
            cells.append(cell)
        ratio = "—"
        if medians.get((title, "nginx")) and (title, "wsedge") in medians:
            ratio = f"{medians[(title, 'wsedge')] / medians[(title, 'nginx')]:.2f}×"
        print(f"| {title} | " + " | ".join(cells) + f" | {ratio} |")
    print()
    print("| goal | wsedge / peer | met? |")
    print("|---|---|---|")
    for goal, title, peer, at_least in GOALS:
        ours, theirs = medians.get((title, "wsedge")), medians.get((title, peer))
        if ours is None or not theirs:
            print(f"| {goal} | — | — |")
            continue
        ratio = ours / theirs
        met = ratio >= 1.0 if at_least else ratio <= 1.0
        print(f"| {goal} | {ratio:.2f}× | {'yes' if met else 'no'} |")
    idle = medians.get(("KiB per idle connection", "wsedge"))
    if idle is not None:
        print(f"| KiB per idle connection ≤ 8 | {idle:.1f} KiB | {'yes' if idle <= 8 else 'no'} |")
    total_errors = sum(errors[t] for t in TARGETS)
    print(f"| no errors in any run | {total_errors} | {'yes' if total_errors == 0 else 'no'} |")
    print()
    print("errors: " + ", ".join(f"{t} {errors[t]}" for t in TARGETS))


if __name__ == "__main__":
    main(sys.argv[1])
