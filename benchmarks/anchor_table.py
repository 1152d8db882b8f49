#!/usr/bin/env python3
"""Compares a cuda_fused_moe_benchmark JSON run (--benchmark_format=json) with the anchors of
../shared/reference/perf-anchors.md and prints the markdown table of benchmarks/RESULTS.md.

usage: benchmarks/anchor_table.py RUN.json [perf-anchors.md]
"""
import json
import math
import re
import sys


def anchors(path):
    rows = {}
    for line in open(path):
        m = re.match(r"\|\s*(\w+) \([^)]*\)\s*\|\s*(\d+)\s*\|\s*([^|]+?)\s*\|\s*(\d+)\s*\|", line)
        if m:
            rows[(m.group(1), int(m.group(2)))] = (m.group(3), float(m.group(4)))
    return rows


def main():
    run = json.load(open(sys.argv[1]))
    ref = anchors(sys.argv[2] if len(sys.argv) > 2 else "../shared/reference/perf-anchors.md")
    ceilings = {}
    lines = ["| shape | M | moe µs | TFLOP/s | GB/s | SOL% | anchor µs | speedup |", "|---|---|---|---|---|---|---|---|"]
    ratios = []
    for b in run["benchmarks"]:
        name = b["name"]
        if name.startswith("ceiling/"):
            ceilings[name.split("/")[1]] = b.get("GB/s") or b.get("TFLOP/s")
            continue
        m = re.match(r"bf16_forward_graph/(\w+)/(\d+)/", name)
        if not m:
            continue
        shape, tokens = m.group(1), int(m.group(2))
        us = b["us"]
        anchor = ref.get((shape, tokens))
        speedup = anchor[1] / us if anchor else float("nan")
        if anchor:
            ratios.append(speedup)
        lines.append(f"| {shape} | {tokens} | {us:.0f} | {b['TFLOP/s']:.0f} | {b['GB/s']:.0f} | {b['SOL%']:.0f}% | "
                     f"{anchor[1]:.0f} | {speedup:.2f}× |" if anchor else f"| {shape} | {tokens} | {us:.0f} | | | | | |")
    print("ceilings:", ", ".join(f"{k} {v:.0f}" for k, v in ceilings.items()))
    print("\n".join(lines))
    if ratios:
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        print(f"\ngeometric-mean speedup over {len(ratios)} rows: {geo:.3f}×; rows faster than the anchor: "
              f"{sum(r > 1 for r in ratios)}/{len(ratios)}; slowest {min(ratios):.2f}×, fastest {max(ratios):.2f}×")


if __name__ == "__main__":
    main()
