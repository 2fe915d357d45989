"""Bar chart of an end-to-end report with one pairs-per-step value: per method, the largest pairs
per step under the memory budget, the step's peak memory and its tokens/s.

Usage: python benchmarks/plot_max_pairs.py STEM   (reads STEM.json, writes STEM.png)
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(stem: str) -> None:
    rows = [r for r in json.load(open(f"{stem}.json"))["rows"] if r["status"] == "ok"]
    methods = [r["method"] for r in rows]
    # ">= N" (the search stopped at its limit) is drawn as N, hatched
    reached_limit = [str(r["max_pairs"]).startswith(">=") for r in rows]
    max_pairs = [int(str(r["max_pairs"]).lstrip(">= ")) for r in rows]
    panels = [("largest pairs per step in the budget", max_pairs),
              (f"peak memory of one step with {rows[0]['pairs']} pair(s) (MiB)", [r["peak_mib"] for r in rows]),
              ("tokens/s", [r["tokens_per_s"] for r in rows])]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), constrained_layout=True)
    for ax, (title, values) in zip(axes, panels):
        bars = ax.barh(methods, values, color="tab:blue")
        if title.startswith("largest"):
            for bar, limited in zip(bars, reached_limit):
                if limited:
                    bar.set_hatch("//")
                    bar.set_facecolor("tab:green")
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{rows[0]['model']}, one DPO step, sequences of <= {rows[0]['seq_len']} tokens "
                 "(hatched: the search's limit was reached)", fontsize=11)
    fig.savefig(f"{stem}.png", dpi=110)


if __name__ == "__main__":
    main(sys.argv[1])
