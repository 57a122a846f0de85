"""The files `vitdeploy bench` writes: bench.json (the whole report), bench.csv (one row
per backend x precision x token merging x mode x batch size) and bench.png (latency and
throughput against batch size, accuracy against throughput), each written whole or not at all."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from vitdeploy.files import atomic_write_bytes


def write_reports(report: dict[str, Any], out: Path, plot: bool = True) -> list[Path]:
    """Write bench.json, bench.csv and (with `plot`) bench.png into `out`; returns their paths.

    The finished report (`plot`) is also kept as bench-STAMP.{json,csv,png}, STAMP from its creation
    time, so that earlier runs stay side by side with the latest; partial reports only refresh bench.*."""
    out.mkdir(parents=True, exist_ok=True)
    contents = {".json": (json.dumps(report, indent=2) + "\n").encode(), ".csv": records_csv(report["records"]).encode()}
    if plot:
        contents[".png"] = plot_png(report)
    stems = ["bench"] + ([f"bench-{report['created'][:19].replace(':', '').replace('-', '')}"] if plot else [])
    paths = []
    for stem in stems:
        for suffix, data in contents.items():
            atomic_write_bytes(out / f"{stem}{suffix}", data)
            paths.append(out / f"{stem}{suffix}")
    return paths


def records_csv(records: list[dict[str, Any]]) -> str:
    """The records as CSV, columns in record order."""
    buffer = io.StringIO()
    if records:
        writer = csv.DictWriter(buffer, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(records)
    return buffer.getvalue()


def _accuracy_panel(ax: Any, report: dict[str, Any], batch: int) -> None:
    """Accuracy against images/s at the largest batch size: each backend/precision/r one point, each backend
    and precision's points across r joined, so what token merging and precision trade is one picture."""
    rows = [r for r in report["records"] if r["batch_size"] == batch and r["mode"] == "end-to-end"]
    series: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault(f"{r['backend']} {r['precision']}", []).append(r)
    for label, points in series.items():
        points = sorted(points, key=lambda r: r["images_per_s"])
        measured = [p for p in points if p["accuracy_pct"] is not None]
        y_key = "accuracy_pct" if measured else "top1_agreement"
        ys = [p[y_key] if y_key == "accuracy_pct" else 100 * p[y_key] for p in points]
        ax.plot([p["images_per_s"] for p in points], ys, marker="o", label=label)
        for p, y in zip(points, ys, strict=True):
            ax.annotate(f"r={p.get('tome') or 0}", (p["images_per_s"], y), fontsize="x-small",
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("log")
    ax.set_xlabel(f"images/s (batch {batch}, end-to-end)")
    ax.set_ylabel("test accuracy % (top-1 agreement % without labels)")
    ax.set_title(f"{report['model']}: accuracy vs throughput across r")
    ax.grid(True, which="both", alpha=0.3)
    if series:
        ax.legend(fontsize="small")


def plot_png(report: dict[str, Any]) -> bytes:
    """p50 latency and images/s against batch size, one line per backend/precision/r/mode; accuracy
    against images/s across token merging and precisions."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib import ticker

    lines: dict[str, list[dict[str, Any]]] = {}
    for r in report["records"]:
        merged = f" r={r['tome']}" if r.get("tome") else ""
        lines.setdefault(f"{r['backend']} {r['precision']}{merged} {r['mode']}", []).append(r)
    fig, (ax_lat, ax_thr, ax_acc) = plt.subplots(1, 3, figsize=(18, 4.8))
    for label, rows in lines.items():
        rows = sorted(rows, key=lambda r: r["batch_size"])
        sizes = [r["batch_size"] for r in rows]
        ax_lat.plot(sizes, [r["latency_ms_p50"] for r in rows], marker="o", label=label)
        ax_thr.plot(sizes, [r["images_per_s"] for r in rows], marker="o", label=label)
    gpu = report["environment"]["gpu"]
    where = gpu["name"] if gpu else f"{report['environment']['cpu']['cores']}-core CPU"
    sizes_all = sorted({r["batch_size"] for r in report["records"]})
    plain = ticker.FuncFormatter(lambda value, _pos: f"{value:,.0f}" if value >= 10 else f"{value:g}")
    for ax, title, unit in ((ax_lat, "p50 latency per batch", "ms"), (ax_thr, "throughput", "images/s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes_all, [str(b) for b in sizes_all])  # the batch sizes measured, as numbers
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("batch size")
        ax.set_ylabel(unit)
        ax.set_title(f"{report['model']}: {title} ({where})")
        ax.grid(True, which="both", alpha=0.3)
    ax_thr.legend(fontsize="small")
    _accuracy_panel(ax_acc, report, max(sizes_all))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
