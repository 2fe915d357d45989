"""Benchmark plots: each method's measures against the swept size, one line per method, or, when
one size was measured, a bar per method at that size."""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

DEFAULT_METRICS = (("time_ms", "time fwd+bwd (ms)"), ("peak_mib", "peak memory (MiB)"))


class NoPlot(Exception):
    """Why a benchmark has no plot; the console says so instead."""


def method_figure(rows: Sequence, path, *, panel_rows: Sequence[str], panel_of: Callable, x_of: Callable,
                  x_label: str, title: str, metrics: Sequence[Tuple[str, str]] = DEFAULT_METRICS,
                  column_of: Callable = lambda row: f"{row.head} head",
                  method_of: Callable = lambda row: row.method) -> None:
    """A grid of panels: a row per panel_rows entry, a column per metric and column_of value. Over
    several x values, log-log lines against x; at one, a bar per method. Rows whose status is not
    "ok" are named with their status ("OOM at x=...+" beside a line, "OOM" for a bar). Raises
    NoPlot when no row has a measured value or matplotlib is missing."""
    if not any(row.status == "ok" and getattr(row, metric) for row in rows for metric, _ in metrics):
        raise NoPlot("no method has a measured value to draw (every row failed or cannot run here)")
    plt = _pyplot()
    columns = list(dict.fromkeys(column_of(r) for r in rows))
    grid = [(metric, label, column) for metric, label in metrics for column in columns]
    methods = list(dict.fromkeys(method_of(r) for r in rows))
    xs = sorted({x_of(r) for r in rows})
    bars = len(xs) == 1
    height = max(3.4, 0.3 * len(methods) + 1.2) if bars else 3.4
    figure, axes = plt.subplots(len(panel_rows), len(grid), figsize=(4.2 * len(grid), height * len(panel_rows)),
                                squeeze=False)
    colors = {method: f"C{index}" for index, method in enumerate(methods)}
    for row_index, panel in enumerate(panel_rows):
        for col_index, (metric, label, column) in enumerate(grid):
            ax = axes[row_index][col_index]
            mine = [r for r in rows if panel_of(r) == panel and column_of(r) == column]
            if bars:
                _bars(ax, mine, methods, metric, colors, method_of)
                ax.set_xlabel(label)
            else:
                _lines(ax, mine, methods, metric, colors, method_of, x_of)
                ax.set_xlabel(x_label)
                ax.set_ylabel(label)
            ax.set_title(f"{panel}: {column}", fontsize=9)
    figure.suptitle(f"{title}, {x_label} = {xs[0]}" if bars else title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NoPlot("matplotlib is not installed (pip install matplotlib)") from None
    return plt


def _lines(ax, rows: Sequence, methods: Sequence[str], metric: str, colors, method_of: Callable,
           x_of: Callable) -> None:
    for method in methods:
        mine = sorted((r for r in rows if method_of(r) == method), key=x_of)
        points = [(x_of(r), getattr(r, metric)) for r in mine if r.status == "ok" and getattr(r, metric)]
        first_failed = next((r for r in mine if r.status != "ok"), None)
        name = method if first_failed is None else f"{method} ({first_failed.status} at {x_of(first_failed)}+)"
        if points:
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o", color=colors[method], label=name)
        elif first_failed is not None:
            ax.plot([], [], color=colors[method], label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _bars(ax, rows: Sequence, methods: Sequence[str], metric: str, colors, method_of: Callable) -> None:
    """A horizontal bar per method, its value written beside it; a method without a value is a
    row that names its status."""
    by_method = {method_of(r): r for r in rows}
    shown = [method for method in methods if method in by_method]
    values = [getattr(by_method[m], metric) if by_method[m].status == "ok" else None for m in shown]
    positions = range(len(shown))
    ax.barh(positions, [value or 0 for value in values], color=[colors[m] for m in shown])
    ax.set_yticks(list(positions), shown, fontsize=7)
    ax.invert_yaxis()  # the table's order, top to bottom
    for position, method, value in zip(positions, shown, values):
        status = by_method[method].status
        if value is None:
            text = "n/a" if status == "ok" else status.split(":")[0]
        else:
            text = f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
        ax.text(value or 0, position, f" {text}", va="center", fontsize=7)
    ax.margins(x=0.25)
    ax.grid(True, axis="x", alpha=0.3)
