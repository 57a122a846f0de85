"""The files `vitdeploy bench` writes: bench.json (the whole report), bench.csv (one row
per backend x precision x mode x batch size) and bench.png (latency and throughput against
batch size), each written whole or not at all."""

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


def plot_png(report: dict[str, Any]) -> bytes:
    """p50 latency and images/s against batch size, one line per backend/precision/mode."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib import ticker

    lines: dict[str, list[dict[str, Any]]] = {}
    for r in report["records"]:
        lines.setdefault(f"{r['backend']} {r['precision']} {r['mode']}", []).append(r)
    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(12, 4.8))
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
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()
