"""Benchmark plots: a measure against a swept size, one line per method."""
from __future__ import annotations

from typing import Callable, Sequence, Tuple

DEFAULT_METRICS = (("time_ms", "time fwd+bwd (ms)"), ("peak_mib", "peak memory (MiB)"))


def sweep_figure(rows: Sequence, path, *, panel_rows: Sequence[str], panel_of: Callable, x_of: Callable,
                 x_label: str, title: str, metrics: Sequence[Tuple[str, str]] = DEFAULT_METRICS,
                 column_of: Callable = lambda row: f"{row.head} head") -> bool:
    """A grid of log-log panels: a row per panel_rows entry, a column per metric and column_of
    value. Rows whose status is not "ok" become legend notes ("OOM at x=..."). False when there
    is nothing to draw (a single x value) or matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    columns = list(dict.fromkeys(column_of(r) for r in rows))
    grid = [(metric, label, column) for metric, label in metrics for column in columns]
    figure, axes = plt.subplots(len(panel_rows), len(grid), figsize=(4.2 * len(grid), 3.4 * len(panel_rows)),
                                squeeze=False)
    methods = list(dict.fromkeys(r.method for r in rows))
    colors = {method: f"C{index}" for index, method in enumerate(methods)}
    for row_index, panel in enumerate(panel_rows):
        for col_index, (metric, label, column) in enumerate(grid):
            ax = axes[row_index][col_index]
            for method in methods:
                mine = sorted((r for r in rows if panel_of(r) == panel and column_of(r) == column and r.method == method),
                              key=x_of)
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
            ax.set_xlabel(x_label)
            ax.set_ylabel(label)
            ax.set_title(f"{panel}: {column}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
