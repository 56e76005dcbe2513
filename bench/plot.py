"""Latency-throughput curves from the JSON lines the bench scripts print.

    python bench/plot.py RESULTS.jsonl [...] --out DIR [--name NAME] [--title TEXT]

One curve per system: each point is one concurrency level (ops/s on the x axis, latency on a
log y axis), p50 on the left panel and p99 on the right, the concurrency written next to its
point. Writes ``DIR/NAME.png`` and ``DIR/NAME.svg``. The rows it understands:

* ``bench/engine_bench.py`` (``"bench": "engine_propose"``): system ``engine``, or the
  ``--system`` label given to that script;
* ``bench/vs_pysyncobj.py`` (``"bench": "vs_pysyncobj"``): system ``<system> <rpc>
  (<client>)``, e.g. ``kvnode stream (grpclib)``;
* ``bench/read_bench.py`` (``"bench": "read"``): system ``<mode> <target>``.

matplotlib is an optional extra (``pip install -e '.[bench]'``), imported only here, when a
plot is asked for; the scripts' ``--plot DIR`` options call :func:`plot_rows`. Figures, not
assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from typing import Any

import attrs


@attrs.frozen
class Point:
    concurrency: int
    ops_per_s: float
    p50_ms: float
    p99_ms: float


def system_of(row: dict[str, Any]) -> str | None:
    """The curve a result row belongs to (None: not a latency-throughput row)."""
    bench = row.get("bench")
    if bench == "engine_propose":
        return str(row.get("system", "engine"))
    if bench == "vs_pysyncobj":
        rpc = f" {row['rpc']}" if row.get("rpc") and row.get("system") != "null" else ""
        return f"{row['system']}{rpc} ({row.get('client', '?')})"
    if bench == "read":
        return f"{row.get('mode', '?')} {row.get('target', '?')}".strip()
    return None


def _ops(row: dict[str, Any]) -> float | None:
    for key in ("proposals_per_s", "ops_per_s", "ops_s"):
        if key in row:
            return float(row[key])
    return None


def curves(rows: Iterable[dict[str, Any]]) -> dict[str, list[Point]]:
    """Rows grouped into curves, each sorted by concurrency. A level measured more than once
    (several runs) keeps the run with the median throughput."""
    grouped: dict[str, dict[int, list[Point]]] = {}
    for row in rows:
        system = system_of(row)
        ops = _ops(row)
        if system is None or ops is None or "p50_ms" not in row or "concurrency" not in row:
            continue
        point = Point(int(row["concurrency"]), ops, float(row["p50_ms"]),
                      float(row.get("p99_ms", row["p50_ms"])))
        grouped.setdefault(system, {}).setdefault(point.concurrency, []).append(point)
    out: dict[str, list[Point]] = {}
    for system, levels in grouped.items():
        pts = []
        for c in sorted(levels):
            runs = sorted(levels[c], key=lambda p: p.ops_per_s)
            pts.append(runs[len(runs) // 2])
        out[system] = pts
    return out


def read_rows(paths: Iterable[str]) -> list[dict[str, Any]]:
    """The JSON objects of every line that holds one (other lines are skipped)."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    value = json.loads(line)
                except ValueError:
                    continue
                if isinstance(value, dict):
                    rows.append(value)
    return rows


def plot_rows(rows: Iterable[dict[str, Any]], out_dir: str, name: str,
              title: str = "") -> list[str]:
    """Draw the curves of ``rows``; returns the files written (PNG and SVG)."""
    data = curves(rows)
    if not data:
        raise SystemExit("plot: no latency-throughput rows to draw")
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("plot: matplotlib is missing; install the bench extra: "
                         "pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, key, label in ((axes[0], "p50_ms", "p50"), (axes[1], "p99_ms", "p99")):
        for system, pts in data.items():
            xs = [p.ops_per_s for p in pts]
            ys = [getattr(p, key) for p in pts]
            (line,) = ax.plot(xs, ys, marker="o", label=system)
            for p, x, y in zip(pts, xs, ys):
                ax.annotate(str(p.concurrency), (x, y), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=line.get_color())
        ax.set_yscale("log")
        ax.set_xlabel("throughput (ops/s)")
        ax.set_title(f"{label} latency")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency (ms, log scale)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8,
               frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for ext in ("png", "svg"):
        path = os.path.join(out_dir, f"{name}.{ext}")
        fig.savefig(path, dpi=110)
        written.append(path)
    plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", nargs="+", help="files of JSON lines printed by bench scripts")
    ap.add_argument("--out", required=True, help="directory for NAME.png and NAME.svg")
    ap.add_argument("--name", default="latency_throughput")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    for path in plot_rows(read_rows(args.results), args.out, args.name, args.title):
        print(json.dumps({"event": "plot", "file": path}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
