"""What a user sees of a run: metrics as JSONL (TRL's keys), optional TensorBoard, plots, and a
warning when likelihood displacement sets in."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np


class MetricsLog:
    """Appends one JSON object per logged step; on resume, drops records past the resumed step
    so that the file reads as one uninterrupted run."""

    def __init__(self, path: Path, *, resume_step: Optional[int] = None, tensorboard_dir: Optional[Path] = None,
                 enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._writer = None
        if not enabled:  # another process writes this run's log
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise RuntimeError("TensorBoard logging needs the tensorboard package (pip install tensorboard)") from exc
            self._writer = SummaryWriter(str(tensorboard_dir))

    def write(self, record: Dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: Path) -> List[Dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _moving_average(values, window: int) -> np.ndarray:
    """Trailing mean over up to `window` values (shorter at the start), same length as values."""
    values = np.asarray(values, dtype=float)
    sums = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def plot_metrics(metrics_path: Path, png_path: Path) -> Path:
    """Loss, reward accuracy, margins and chosen/rejected log-probs against the step, train and eval."""
    metrics_figure(read_metrics(metrics_path)).savefig(png_path, dpi=110)
    return Path(png_path)


def metrics_figure(records: List[Dict]):
    """The matplotlib figure of :func:`plot_metrics`, of metrics records (made without pyplot: no
    display, and nothing global to close)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [("loss", ["loss"]), ("reward accuracy", ["rewards/accuracies"]),
              ("reward margin", ["rewards/margins"]), ("log-probs", ["logps/chosen", "logps/rejected"])]
    fig = Figure(figsize=(11, 7), constrained_layout=True)
    axes = fig.subplots(2, 2)
    for ax, (title, keys) in zip(axes.flat, panels):
        for split, style in (("train", "-"), ("eval", "o--")):
            for key in keys:
                points = [(r["step"], r[key]) for r in records if r.get("split") == split and key in r]
                if not points:
                    continue
                steps, values = zip(*points)
                if split == "train" and len(values) > 20:
                    # per-step values are noisy: faint raw curve, and its moving average on top
                    raw = ax.plot(steps, values, style, alpha=0.25, linewidth=0.8)[0]
                    ax.plot(steps, _moving_average(values, max(5, len(values) // 25)), style,
                            color=raw.get_color(), label=f"{split} {key} (moving average)")
                else:
                    ax.plot(steps, values, style, label=f"{split} {key}", markersize=4)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        # plain values: a flat curve's offset notation ("1e-5+6.931e-1") hides what they are
        ax.ticklabel_format(style="plain", useOffset=False)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    return fig


class DisplacementMonitor:
    """Likelihood displacement: chosen log-probs falling steadily while margins grow.

    The best-known DPO failure mode: the policy widens the margin by pushing both responses
    down, the chosen one included. Over a window of logged steps, a negative least-squares slope
    of the chosen log-probs that adds up to a real drop (at least `min_drop` nats and
    `min_relative_drop` of their size), together with a positive margin slope, raises the
    warning (once).
    """

    def __init__(self, window: int = 20, min_drop: float = 1.0, min_relative_drop: float = 0.02,
                 suggest_sft: bool = True):
        """`suggest_sft`: whether the warning suggests an SFT term (a paired loss can add one; KTO cannot)."""
        self.window, self.min_drop, self.min_relative_drop = window, min_drop, min_relative_drop
        self.suggest_sft = suggest_sft
        self.chosen: List[float] = []
        self.margins: List[float] = []
        self.warned = False

    def update(self, chosen_logps: float, margin: float) -> Optional[str]:
        self.chosen.append(chosen_logps)
        self.margins.append(margin)
        if self.warned or len(self.chosen) < self.window:
            return None
        x = np.arange(self.window, dtype=float)
        chosen_slope = np.polyfit(x, self.chosen[-self.window:], 1)[0]
        margin_slope = np.polyfit(x, self.margins[-self.window:], 1)[0]
        drop = -chosen_slope * (self.window - 1)
        threshold = max(self.min_drop, self.min_relative_drop * abs(float(np.mean(self.chosen[-self.window:]))))
        if margin_slope > 0 and drop >= threshold:
            self.warned = True
            return (f"likelihood displacement: the chosen responses' log-probability fell by "
                    f"{drop:.2f} over the last {self.window} logged steps "
                    "while the margin grew; consider a lower learning rate"
                    + (", a larger beta, or an SFT term (--loss-type sigmoid sft)" if self.suggest_sft
                       else " or a larger beta"))
        return None
