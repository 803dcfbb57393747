#!/usr/bin/env python3
"""Summarises bench/compare.sh results: median (min–max) per target and figure, and the ratio
of each median to nginx's, as a Markdown table."""

import json
import statistics
import sys
from collections import defaultdict

TARGETS = ["direct", "nginx", "haproxy", "haproxy-jwt", "wsedge"]
FIGURES = [
    # (title, mode, extractor, higher is better, format)
    ("streamed msgs/s", "stream", lambda r: r["messages_per_second"], True, "{:,.0f}"),
    ("echo msgs/s", "rtt", lambda r: r["messages_per_second"], True, "{:,.0f}"),
    ("echo p50 µs", "rtt", lambda r: r["latency_us"]["p50"], False, "{:,.0f}"),
    ("echo p99 µs", "rtt", lambda r: r["latency_us"]["p99"], False, "{:,.0f}"),
    ("handshakes/s", "handshake", lambda r: r["handshakes_per_second"], True, "{:,.0f}"),
    ("handshake p99 µs", "handshake", lambda r: r["latency_us"]["p99"], False, "{:,.0f}"),
    ("KiB per idle connection", "idle", lambda r: r["kib_per_connection"], False, "{:,.1f}"),
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
    print("| figure | " + " | ".join(TARGETS) + " | wsedge / nginx |")
    print("|---|" + "---|" * (len(TARGETS) + 1))
    for title, _, _, higher, fmt in FIGURES:
        cells = []
        medians = {}
        for target in TARGETS:
            samples = values.get((title, target))
            if not samples:
                cells.append("—")
                continue
            median = statistics.median(samples)
            medians[target] = median
            cell = fmt.format(median)
            if len(samples) > 1:
                cell += f" ({fmt.format(min(samples))}–{fmt.format(max(samples))})"
            cells.append(cell)
        ratio = "—"
        if medians.get("nginx") and "wsedge" in medians:
            ratio = f"{medians['wsedge'] / medians['nginx']:.2f}×"
        print(f"| {title} | " + " | ".join(cells) + f" | {ratio} |")
    print()
    print("errors: " + ", ".join(f"{t} {errors[t]}" for t in TARGETS))


if __name__ == "__main__":
    main(sys.argv[1])
