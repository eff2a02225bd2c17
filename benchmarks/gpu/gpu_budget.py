"""The wall-clock guard and the JSON of ``benchmarks/gpu/run.sh`` (pure parts, unit-tested without a model).

* :class:`Budget`: a total time limit and one budget per section. A section starts only if its budget fits in the
  time left; a step inside a section starts only if its estimate (scaled from a step already measured) fits in what is
  left of the section. Otherwise the reason goes to the JSON and the script goes on with the next section.
* :class:`Watchdog`: when the total limit passes while a step is still running (a CUDA kernel cannot be interrupted),
  it writes the JSON as it stands, naming the step it stopped, and ends the process, so the caller always gets back
  what was measured.
* :data:`FIGURES` / :func:`figures`: the flat list of numbers the run reports (the rows of BENCHMARKS.md it fills);
  a figure whose section was skipped is ``None`` and its reason is in ``skipped``.
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

# (figure, path into the result dict); the order is the printed table's
FIGURES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("load_s", ("load", "seconds")),
    ("scoring_samples", ("scoring", "samples")),
    ("scoring_device_s", ("scoring", "device", "seconds")),
    ("scoring_device_peak_gib", ("scoring", "device", "peak_gib")),
    ("scoring_device_accumulator_gib", ("scoring", "device", "accumulator_gib_on_device")),
    ("scoring_cpu_acc_s", ("scoring", "accumulate_on_cpu", "seconds")),
    ("scoring_cpu_acc_peak_gib", ("scoring", "accumulate_on_cpu", "peak_gib")),
    ("scoring_cpu_acc_accumulator_gib_host", ("scoring", "accumulate_on_cpu", "accumulator_gib_on_cpu")),
    ("scoring_cpu_acc_max_rel_diff", ("scoring", "accumulate_on_cpu", "max_rel_diff_vs_device")),
    ("scoring_passes2_s", ("scoring", "score_passes_2", "seconds")),
    ("scoring_passes2_peak_gib", ("scoring", "score_passes_2", "peak_gib")),
    ("scoring_passes2_accumulator_gib", ("scoring", "score_passes_2", "accumulator_gib_on_device")),
    ("scoring_passes2_max_rel_diff", ("scoring", "score_passes_2", "max_rel_diff_vs_device")),
    ("scoring_large_samples", ("scoring", "device_large", "samples")),
    ("scoring_large_s", ("scoring", "device_large", "seconds")),
    ("scoring_large_peak_gib", ("scoring", "device_large", "peak_gib")),
    ("gen_batch", ("generation", "batch_size")),
    ("gen_dense_tokens_per_s", ("generation", "dense", "tokens_per_s")),
    ("gen_pruned_tokens_per_s", ("generation", "pruned", "tokens_per_s")),
    ("gen_speedup", ("generation", "throughput_speedup")),
    ("gen_dense_prefill_ms", ("generation", "dense", "prefill_ms")),
    ("gen_pruned_prefill_ms", ("generation", "pruned", "prefill_ms")),
    ("gen_dense_ms_per_token", ("generation", "dense", "ms_per_token")),
    ("gen_pruned_ms_per_token", ("generation", "pruned", "ms_per_token")),
    ("gen_pruned_ratio", ("generation", "achieved_ratio")),
    ("distill_step_s", ("distill", "step_s_median")),
    ("distill_samples_per_s", ("distill", "samples_per_s")),
    ("distill_tflops", ("distill", "achieved_tflops")),
    ("distill_mfu", ("distill", "mfu")),
    ("distill_peak_gib", ("distill", "peak_gib")),
)


def _get(res: dict[str, Any], path: tuple[str, ...]) -> Any:
    cur: Any = res
    for k in path:
        if not isinstance(cur, dict) or k not in cur:
            return None
        cur = cur[k]
    return cur


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def figures(res: dict[str, Any]) -> dict[str, float | int | None]:
    """Every figure of :data:`FIGURES` (``None`` where it was not measured)."""
    return {name: (v if is_number(v := _get(res, path)) else None) for name, path in FIGURES}


def unmeasured(res: dict[str, Any]) -> dict[str, str]:
    """Figure -> why it has no number: the skip reason of its section or step, else ``"not measured"``."""
    skipped = res.get("skipped", {})
    out = {}
    for name, path in FIGURES:
        if not is_number(_get(res, path)):
            why = skipped.get("/".join(path[:2])) or skipped.get(path[0]) or "not measured"
            out[name] = why
    return out


class Budget:
    """A total wall-clock limit and per-section budgets (``clock``: for tests)."""

    def __init__(self, total_s: float, sections: dict[str, float], clock: Callable[[], float] = time.monotonic,
                 t0: float | None = None):
        """``t0``: when the clock started (``clock()`` at an earlier moment, e.g. the process start), else now."""
        self.total_s, self.sections, self.clock = float(total_s), dict(sections), clock
        self.t0 = clock() if t0 is None else t0
        self.section_end = self.t0 + self.total_s

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def left(self) -> float:
        return self.total_s - self.elapsed()

    def start(self, section: str) -> str | None:
        """Begin ``section``: ``None`` if its budget fits in the time left (its end is then set), else the reason."""
        need, left = self.sections[section], self.left()
        if need > left:
            return f"skipped: its budget is {need:.0f} s and {left:.0f} s of the {self.total_s:.0f} s total are left"
        self.section_end = min(self.clock() + need, self.t0 + self.total_s)
        return None

    def section_left(self) -> float:
        return self.section_end - self.clock()

    def step(self, estimate_s: float, basis: str) -> str | None:
        """``None`` if a step estimated at ``estimate_s`` (from ``basis``) fits in the section's time left."""
        left = self.section_left()
        if estimate_s > left:
            return f"skipped: estimated {estimate_s:.0f} s ({basis}), {max(left, 0.0):.0f} s left of its section"
        return None


class Watchdog:
    """Calls ``on_expire(step)`` and ends the process (exit code 3) if the deadline passes; ``step`` is what
    :meth:`running` last named. A daemon timer thread: the main thread may be inside a long kernel."""

    EXIT_CODE = 3

    def __init__(self, seconds: float, on_expire: Callable[[str], None], exit_fn: Callable[[int], None] = os._exit):
        self.step = "start-up"
        self._on_expire, self._exit = on_expire, exit_fn
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True

    def running(self, step: str) -> None:
        self.step = step

    def _fire(self) -> None:
        try:
            self._on_expire(self.step)
        finally:
            self._exit(self.EXIT_CODE)

    def __enter__(self) -> "Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


def write_json(path: Path, res: dict[str, Any]) -> None:
    """Refresh ``figures`` / ``unmeasured`` and write ``res`` atomically (called after every section)."""
    from ukmp.io import atomic_write_json

    res["figures"] = figures(res)
    res["unmeasured"] = unmeasured(res)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, res)
