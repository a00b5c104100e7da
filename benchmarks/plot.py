"""
Draw the benchmark figures as PNG from the JSON the scripts write (``--json PATH``).

matplotlib is not in the test or benchmark venvs: run this with the docs venv (``make venv-docs``).
Reading the JSON needs only the standard library, so the smoke tests check the scripts' JSON against
the readers here without matplotlib.

Usage::

    .venvs/docs/bin/python benchmarks/plot.py                   # docs/img/*.png from benchmarks/results/*.json
    .venvs/docs/bin/python benchmarks/plot.py triggerer runs.json [more.json ...] --out growth.png
    .venvs/docs/bin/python benchmarks/plot.py poke poke.json --out poke.png
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
IMAGES = ROOT / "docs" / "img"
OURS, THEIRS = "PrewarmTaskTrigger", "HttpSensorTrigger"
#: The committed figures: output name -> (kind, recorded runs drawn on it).
FIGURES = {
    "triggerer_growth.png": ("triggerer", ["triggerer_growth_f14348a.json", "triggerer_scale_2026-12-01.json"]),
    "poke_cost.png": ("poke", ["poke_cost_2026-12-01.json"]),
}


def load(path: str | Path, benchmark: str) -> dict[str, Any]:
    """
    Read one run's JSON and check it comes from the expected script.

    :param path: A file written by ``--json``.
    :param benchmark: ``triggerer_scale`` or ``poke_cost``.
    """
    data: dict[str, Any] = json.loads(Path(path).read_text())
    if data.get("benchmark") != benchmark:
        raise SystemExit(f"{path}: not a {benchmark} result (benchmark={data.get('benchmark')!r})")
    return data


def growth_series(run: dict[str, Any]) -> dict[tuple[str, str], list[tuple[int, float, float, float]]]:
    """
    Per (scheme, trigger): (N waits, peak RSS MB, CPU per poll µs, events lost) sorted by N, medians over runs.

    :param run: A ``triggerer_scale`` run.
    """
    cells: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for result in run["results"]:
        cells.setdefault((result["scheme"], result["kind"], result["count"]), []).append(result)
    series: dict[tuple[str, str], list[tuple[int, float, float, float]]] = {}
    for (scheme, kind, count), results in sorted(cells.items()):
        rss = _median([r["peak_rss_mb"] for r in results])
        cpu = _median([r["cpu_per_poll_us"] for r in results])
        lost = _median([r["lost"] for r in results])
        series.setdefault((scheme, kind), []).append((count, rss, cpu, lost))
    return series


def poke_series(run: dict[str, Any]) -> dict[str, list[tuple[str, float, float]]]:
    """
    Per server: (contender, CPU µs per poke, wall µs per poke) in the run's order.

    :param run: A ``poke_cost`` run.
    """
    return {
        server["server"]: [(row["contender"], row["cpu_us"], row["wall_us"]) for row in server["contenders"]]
        for server in run["servers"]
    }


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    # No software/version stamp in the file: the same data gives the same PNG.
    fig.savefig(out, dpi=110, bbox_inches="tight", metadata={"Software": None})
    print(f"wrote {out}")


def draw_growth(runs: list[dict[str, Any]], out: Path) -> None:
    """
    Peak RSS and CPU per poll against the number of waits, ours and ``HttpSensorTrigger``, per scheme.

    :param runs: ``triggerer_scale`` runs; each is drawn with its own marker and its ``label``.
    :param out: The PNG to write.
    """
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    schemes = sorted({scheme for run in runs for scheme, _ in growth_series(run)}, reverse=True)  # https first
    fig, axes = plt.subplots(2, len(schemes), figsize=(5.2 * len(schemes), 7.5), squeeze=False)
    markers = ["o", "s", "^", "D"]
    plain = FuncFormatter(lambda value, _: f"{value:,.0f}")
    # Log-scale minor ticks: label 2x, 3x and 5x only, so the labels do not overlap.
    sparse = FuncFormatter(lambda value, _: f"{value:,.0f}" if f"{value:.0e}"[0] in "235" else "")
    colours = {OURS: "tab:blue", THEIRS: "tab:orange"}
    for run_no, run in enumerate(runs):
        for (scheme, kind), points in growth_series(run).items():
            column = schemes.index(scheme)
            counts = [p[0] for p in points]
            style = {
                "color": colours.get(kind, "tab:gray"),
                "marker": markers[run_no % len(markers)],
                "linestyle": "-" if run_no == 0 else ":",
                "fillstyle": "full" if run_no == 0 else "none",
                "label": f"{kind}: {run.get('label', f'run {run_no + 1}')}",
            }
            axes[0][column].plot(counts, [p[1] for p in points], **style)
            axes[1][column].plot(counts, [p[2] for p in points], **style)
            for count, _, cpu, lost in points:
                if lost:
                    axes[1][column].annotate(
                        f"{lost:,.0f} of {count:,} waits lost",
                        (count, cpu),
                        fontsize="small",
                        xytext=(-6, 0),
                        textcoords="offset points",
                        ha="right",
                        va="center",
                    )
    for column, scheme in enumerate(schemes):
        for row, ylabel in enumerate(["peak RSS (MB)", "CPU per poll (µs)"]):
            ax = axes[row][column]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("concurrent waits in one triggerer")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(sparse)
            ax.xaxis.set_major_formatter(plain)
        axes[0][column].set_title(scheme)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize="small", bbox_to_anchor=(0.5, -0.06))
    fig.suptitle("Triggerer: memory and CPU per poll against the number of waits")
    fig.tight_layout()
    _save(fig, out)


def draw_poke(run: dict[str, Any], out: Path) -> None:
    """
    CPU and wall time per poke of each contender, one panel per server.

    :param run: A ``poke_cost`` run.
    :param out: The PNG to write.
    """
    plt = _pyplot()
    series = poke_series(run)
    fig, axes = plt.subplots(1, len(series), figsize=(5.2 * len(series), 3.8), squeeze=False, sharex=True)
    for ax, (server, rows) in zip(axes[0], series.items(), strict=True):
        names = [row[0] for row in rows][::-1]  # first contender on top
        positions = range(len(names))
        ax.barh([p + 0.2 for p in positions], [row[1] for row in rows][::-1], height=0.4, label="CPU")
        ax.barh([p - 0.2 for p in positions], [row[2] for row in rows][::-1], height=0.4, label="wall")
        ax.set_yticks(list(positions), names)
        ax.set_xlabel("µs per poke")
        ax.set_title(f"server: {server}")
        ax.grid(True, axis="x", alpha=0.3)
    axes[0][0].legend(loc="lower right")
    fig.suptitle(f"Poke cost: PrewarmTaskSensor (ppio) vs HttpSensor (http) vs bare requests (floor); {run['label']}")
    fig.tight_layout()
    _save(fig, out)


def main(argv: list[str] | None = None) -> None:
    """Draw the committed figures, or one figure from the given runs."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n\n")[0])
    parser.add_argument("kind", nargs="?", choices=["triggerer", "poke"], help="draw one figure from FILES")
    parser.add_argument("files", nargs="*", help="JSON written by triggerer_scale.py / poke_cost.py --json")
    parser.add_argument("--out", type=Path, help="the PNG to write (with a kind)")
    parser.add_argument("--out-dir", type=Path, default=IMAGES, help="where the committed figures go (no kind)")
    args = parser.parse_args(argv)
    if args.kind is None:
        for name, (kind, files) in FIGURES.items():
            main([kind, *(str(RESULTS / file) for file in files), "--out", str(args.out_dir / name)])
        return
    if not args.files or args.out is None:
        parser.error("a kind needs FILES and --out")
    if args.kind == "triggerer":
        draw_growth([load(path, "triggerer_scale") for path in args.files], args.out)
    else:
        if len(args.files) != 1:
            parser.error("poke draws one run")
        draw_poke(load(args.files[0], "poke_cost"), args.out)


if __name__ == "__main__":
    main()
