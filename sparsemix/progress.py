"""Progress of long fits: a printer for the optimizer's (evaluation, deviance, seconds) callback.

Off by default in the API (`lmer(..., verbose=True)` or `progress=callable` turns it on); the fit's whole log is
always kept (`results.fit_log`).
"""

from __future__ import annotations

import sys
import time

__all__ = ["ProgressPrinter"]


class ProgressPrinter:
    """Prints at most one line per `every` seconds: evaluations so far, best deviance, elapsed time."""

    def __init__(self, stream=None, every: float = 1.0):
        self.stream = sys.stderr if stream is None else stream
        self.every = every
        self._last = -float("inf")

    def __call__(self, evaluation: int, deviance: float, seconds: float) -> None:
        now = time.perf_counter()
        if now - self._last >= self.every:
            self._last = now
            print(
                f"sparsemix: evaluation {evaluation:5d}  deviance {deviance:.6f}  {seconds:8.2f} s",
                file=self.stream,
                flush=True,
            )
