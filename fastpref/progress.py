"""Progress bars of the commands that run for minutes: ``fastpref bench`` and ``fastpref kernels``.

On stderr, so that a report printed to stdout and redirected to a file stays clean; off when
stderr is not a terminal, so that a CI log gets the report and not a bar redrawn hundreds of
times; with the elapsed time and an estimate of the time left.
"""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Iterator, Optional, Tuple

from tqdm.auto import tqdm

# A pseudo-terminal opened without a size reports 0 x 0, and tqdm draws nothing in zero lines.
FALLBACK_COLUMNS = 100
FALLBACK_LINES = 24
# One step can last minutes (a whole compile, a method's run on a busy machine): the bar is
# redrawn this often meanwhile, so that its clock and estimate keep moving.
REDRAW_S = 1.0


def _terminal_size() -> Tuple[Optional[int], Optional[int]]:
    """stderr's columns and lines, the fallbacks for a terminal that reports none, or (None, None)
    when stderr is no terminal (tqdm's defaults then apply)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        return None, None
    return size.columns or FALLBACK_COLUMNS, size.lines or FALLBACK_LINES


@contextlib.contextmanager
def progress_bar(description: str, total: float, *, enabled: bool = True,
                 counting: Optional[str] = None) -> Iterator[tqdm]:
    """A bar over `total`: given what it counts ("binaries"), it shows the count done; else only
    the share done (the total is then an estimate of the work, in whatever units it is counted)."""
    done = "{n_fmt}/{total_fmt} " + counting + " " if counting else ""
    columns, lines = _terminal_size()
    bar = tqdm(desc=description, total=total, file=sys.stderr, disable=None if enabled else True, leave=False,
               smoothing=0.0, ncols=columns, nrows=lines,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| " + done + "[{elapsed} elapsed, {remaining} left]")
    stop = threading.Event()

    def redraw() -> None:
        while not stop.wait(REDRAW_S):
            bar.refresh()

    redrawing = None if bar.disable else threading.Thread(target=redraw, name="progress-redraw", daemon=True)
    if redrawing is not None:
        redrawing.start()
    try:
        yield bar
    finally:
        stop.set()
        if redrawing is not None:
            redrawing.join()
        bar.close()
