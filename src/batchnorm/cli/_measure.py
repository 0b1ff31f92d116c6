"""How every ``batchnorm bench`` figure is measured, summarized and judged.

Measuring: a *step* is a callable that runs what is measured once and returns the seconds of its
own timed region (so untimed work, such as a convolution run just before, can sit in the same
call). :func:`batched` averages a step over enough calls to last :data:`MIN_MEASURE_S`;
:func:`interleave` runs every provider's measurement in rounds, alternating the order
(a, b, b, a, a, b, ...) so that drift on a shared machine hits all of them alike, until each
series' spread and each compared pair's ratio spread is at most the target, or the time budget
or the round limit is reached.

Inside a network, :class:`ModuleTimer` sums the time spent in some modules' forward and
backward from hooks.

Judging (:func:`judge`): a figure that cannot be true is an *invalid* measurement and is
reported with its reason instead of as a result:

- a time that is not finite and positive;
- a timed interval shorter than :data:`RESOLUTION_FACTOR` times the timer's resolution;
- ``f`` above :data:`F_MAX`: faster than a copy of the bytes the pass must move, measured in
  the same run (``f`` is a fraction of that limit; a little above 1 is cache effects);
- a spread (interquartile range over median) above :data:`SPREAD_INVALID`, or per-round
  ratios whose 10th and 90th percentiles differ by more than :data:`RATIO_SPAN_MAX` times
  (with a few rounds, about the smallest and the largest; with many, one stall of the
  machine does not void the rest).

A valid figure whose spread stays above the target once the budget is spent is *noisy*: shown,
marked as such. The summaries and the judging are pure functions, so the tests feed them
impossible timings directly.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache

F_MAX = 1.2             # f above this is faster than moving the bytes: not a measurement
RESOLUTION_FACTOR = 100  # a timed interval must span this many timer ticks
SPREAD_INVALID = 0.5    # IQR / median above this: the series measured the machine, not the code
RATIO_SPAN_MAX = 10.0   # 90th / 10th percentile of per-round ratios above this: no ratio
SPREAD_TARGET = 0.05    # rounds continue (within the budget) until spreads are at most this
MIN_MEASURE_S = 2e-3    # one measurement averages calls until it lasts this long

Step = Callable[[], float]


@dataclass(frozen=True)
class Summary:
    """Order statistics of one series of per-call seconds (or of ratios)."""

    n: int
    min: float
    median: float
    max: float
    spread: float  # (third quartile - first quartile) / median; nan under 3 values
    low: float     # 10th and 90th percentiles: the range the bulk spans, one outlier aside
    high: float


def summarize(values: Sequence[float]) -> Summary:
    """The :class:`Summary` of ``values`` (at least one)."""
    xs = sorted(values)
    med = statistics.median(xs)
    spread, low, high = math.nan, xs[0], xs[-1]
    if len(xs) >= 2 and all(map(math.isfinite, xs)):
        deciles = statistics.quantiles(xs, n=10, method="inclusive")
        low, high = deciles[0], deciles[-1]
    if len(xs) >= 3 and med > 0 and all(map(math.isfinite, xs)):
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        spread = (q3 - q1) / med
    return Summary(len(xs), xs[0], med, xs[-1], spread, low, high)


@dataclass(frozen=True)
class Verdict:
    """``status`` is ``"ok"``, ``"noisy"`` (valid, spread above the target) or ``"invalid"``."""

    status: str
    reasons: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return self.status != "invalid"

    def __str__(self) -> str:
        if self.status == "ok":
            return "ok"
        label = "INVALID" if self.status == "invalid" else "noisy"
        return f"{label}: {'; '.join(self.reasons)}"

    def brief(self) -> str:
        """For a table whose other columns show the spreads: the status, and for an invalid
        figure its first reason (the CSV rows keep them all)."""
        if self.status != "invalid":
            return self.status
        more = f" (+{len(self.reasons) - 1} more)" if len(self.reasons) > 1 else ""
        return f"INVALID: {self.reasons[0]}{more}"


OK = Verdict("ok")
_RANK = {"ok": 0, "noisy": 1, "invalid": 2}


def worst(statuses: Iterable[str]) -> str:
    """The worst of some statuses (``"ok"`` when there are none)."""
    return max(statuses, key=_RANK.__getitem__, default="ok")


def combine(verdicts: Iterable[Verdict]) -> Verdict:
    """The worst status of ``verdicts``, with the reasons that carry it."""
    verdicts = list(verdicts)
    worst_ = worst(v.status for v in verdicts)
    reasons = []
    for v in verdicts:
        if v.status == worst_:
            reasons += [r for r in v.reasons if r not in reasons]
    return Verdict(worst_, tuple(reasons))


def total_verdict(parts: Sequence[Verdict], what: str = "layers") -> Verdict:
    """The verdict of a sum (a network total) of parts: invalid if one part is."""
    for status in ("invalid", "noisy"):
        k = sum(v.status == status for v in parts)
        if k:
            return Verdict(status, (f"{k} of {len(parts)} {what} {status}",))
    return OK


def as_fields(v: Verdict) -> dict[str, str]:
    """The CSV fields of a verdict (:func:`from_fields` reads them back)."""
    return {"status": v.status, "reason": "; ".join(v.reasons)}


def from_fields(row: dict) -> Verdict:
    """The verdict stored in a row by :func:`as_fields`."""
    return Verdict(row["status"], tuple(r for r in row["reason"].split("; ") if r))


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-4 else f"{seconds * 1e9:.3g} ns"


def judge_times(s: Summary, *, interval: float, resolution: float,
                target: float = SPREAD_TARGET) -> Verdict:
    """Validity of a series of per-call times.

    ``interval`` is the shortest single timed interval behind one value (a value averaged over
    ``k`` calls timed together has ``interval = k * value``; one timed per call has
    ``interval = value``).
    """
    if not (math.isfinite(s.min) and math.isfinite(s.max)) or s.min <= 0:
        return Verdict("invalid", (f"a time is not finite and positive ({s.min:.3g} s)",))
    if interval < RESOLUTION_FACTOR * resolution:
        return Verdict("invalid", (f"timed interval {_ms(interval)} < {RESOLUTION_FACTOR} "
                                   f"timer ticks of {_ms(resolution)}",))
    return _judge_spread(s, "time", target)


def _judge_spread(s: Summary, what: str, target: float) -> Verdict:
    if math.isnan(s.spread):
        return Verdict("noisy", (f"{s.n} {what} value(s): no spread",))
    if s.spread > SPREAD_INVALID:
        return Verdict("invalid", (f"{what} spread {s.spread:.0%} > {SPREAD_INVALID:.0%}",))
    if s.spread > target:
        return Verdict("noisy", (f"{what} spread {s.spread:.0%} > {target:.0%} target "
                                 f"({s.n} rounds)",))
    return OK


def judge_f(f: float) -> Verdict:
    """Validity of ``f``, a time expressed as a fraction of the copy limit."""
    if not math.isfinite(f) or f <= 0:
        return Verdict("invalid", (f"f = {f:.3g} is not finite and positive",))
    if f > F_MAX:
        return Verdict("invalid", (f"f = {f:.2f} > {F_MAX}: faster than a copy of its bytes",))
    return OK


def judge_ratios(s: Summary, target: float = SPREAD_TARGET, what: str = "ratio") -> Verdict:
    """Validity of a series of per-round ratios of two providers' times."""
    if not (math.isfinite(s.min) and math.isfinite(s.max)) or s.min <= 0:
        return Verdict("invalid", (f"a {what} is not finite and positive ({s.min:.3g})",))
    if s.high / s.low > RATIO_SPAN_MAX:
        return Verdict("invalid", (f"per-round {what}s span {s.low:.2g}x to {s.high:.2g}x "
                                   "(10th to 90th percentile)",))
    return _judge_spread(s, what, target)


def judge(times: Summary, *, interval: float, resolution: float, f: float | None = None,
          ratios: Summary | None = None, target: float = SPREAD_TARGET) -> Verdict:
    """Every check that applies to one provider's figure (f and ratios when given)."""
    checks = [judge_times(times, interval=interval, resolution=resolution, target=target)]
    if f is not None:
        checks.append(judge_f(f))
    if ratios is not None:
        checks.append(judge_ratios(ratios, target))
    return combine(checks)


def ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-round ratios of two series measured in the same rounds."""
    return [a / b if b > 0 else math.inf for a, b in zip(numerator, denominator, strict=True)]


def stable(series: Iterable[Sequence[float]], target: float) -> bool:
    """Whether every series has a spread at most ``target`` (and enough values to have one)."""
    return all(summarize(s).spread <= target for s in series)


# ---- measuring (the only timed code)

@cache
def timer_resolution() -> float:
    """Smallest positive step of ``time.perf_counter`` seen in consecutive readings."""
    best = math.inf
    for _ in range(2000):
        t0 = time.perf_counter()
        t1 = time.perf_counter()
        while t1 == t0:
            t1 = time.perf_counter()
        best = min(best, t1 - t0)
    return max(best, time.get_clock_info("perf_counter").resolution)


def timed(fn: Callable[[], object]) -> Step:
    """The step that times one whole call of ``fn``."""
    def step() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return step


def batched(step: Step, min_s: float = MIN_MEASURE_S) -> tuple[Step, int]:
    """(a step averaging ``step`` over enough calls to last ``min_s``, that many calls).

    Runs ``step`` twice first (compilation, first touch of memory) and sizes the batch from
    the faster of the two.
    """
    first = min(step(), step())
    calls = max(1, min(10_000, math.ceil(min_s / max(first, 1e-9))))

    def mean() -> float:
        return sum(step() for _ in range(calls)) / calls
    return mean, calls


def interleave(steps: dict[Hashable, Step], *, min_rounds: int, max_rounds: int,
               budget_s: float, target: float = SPREAD_TARGET,
               pairs: Sequence[tuple[Hashable, Hashable]] = (), pause_s: float = 0.0,
               watch: Sequence[Hashable] | None = None) -> dict[Hashable, list[float]]:
    """Per-call seconds of each step, measured in rounds of alternating order.

    Stops after ``min_rounds`` once every watched series (all by default; a copy whose best
    time is all that counts need not be) and every ``(a, b)`` pair's per-round ratio has a
    spread at most ``target``, or when ``budget_s`` has passed, or after ``max_rounds``.
    ``pause_s`` sleeps before each measurement (lets another runtime's spinning threads go
    idle).
    """
    keys = list(steps)
    out: dict[Hashable, list[float]] = {k: [] for k in keys}
    deadline = time.perf_counter() + budget_s
    for r in range(max_rounds):
        for k in keys if r % 2 == 0 else reversed(keys):
            if pause_s:
                time.sleep(pause_s)
            out[k].append(steps[k]())
        if r + 1 < min_rounds:
            continue
        if time.perf_counter() > deadline:
            break
        watched = [out[k] for k in (keys if watch is None else watch)]
        if stable([*watched, *(ratios(out[a], out[b]) for a, b in pairs)], target):
            break
    return out


class Budget:
    """A time budget shared by ``parts`` measurements run one after another: each gets what
    is left over the parts still to run, so time a quick part did not use goes to later ones.
    """

    def __init__(self, seconds: float, parts: int):
        self._deadline = time.perf_counter() + seconds
        self._left = parts

    def share(self) -> float:
        """Seconds for the next part (call once per part)."""
        remaining = max(0.0, self._deadline - time.perf_counter())
        share = remaining / max(self._left, 1)
        self._left -= 1
        return share


# ---- time inside modules of a network

class ModuleTimer:
    """Seconds spent in the forward and the backward of ``modules`` since :meth:`reset`.

    Forward: a forward pre-hook and a forward hook bracket each call. Backward: a hook on the
    module's output fires when that output's gradient arrives, just before the module's
    backward runs; a hook on its input fires once the input's gradient is complete. For a
    module whose input no other operation reads (a BN right after its convolution, as in
    every network here) that is right after the module's backward and the accumulation of its
    parameters' gradients. An input that needs no gradient leaves the backward untimed. Each
    module is called once per step.
    """

    def __init__(self, modules):
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._before))
            self._handles.append(m.register_forward_hook(self._after))
        self.modules = len(self._handles) // 2
        self.reset()

    def reset(self) -> None:
        self.forward = self.backward = 0.0
        self._started: dict[int, float] = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def _before(self, module, inputs) -> None:
        self._started[id(module)] = time.perf_counter()

    def _after(self, module, inputs, output) -> None:
        now = time.perf_counter()
        key = id(module)
        self.forward += now - self._started.pop(key)
        x = inputs[0]
        if output.requires_grad and x.requires_grad:  # a backward will run: bracket it

            def start(_grad) -> None:  # returns None: the gradient passes unchanged
                self._start_backward(key)

            def end(_grad) -> None:
                self._end_backward(key)
            output.register_hook(start)
            x.register_hook(end)

    def _start_backward(self, key: int) -> None:
        self._started[key] = time.perf_counter()

    def _end_backward(self, key: int) -> None:
        t0 = self._started.pop(key, None)
        if t0 is not None:
            self.backward += time.perf_counter() - t0


def bn_modules(model):
    """The batch-norm modules of ``model`` (torch.nn's and ours, which subclass them)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


# ---- what every report names

@cache
def device() -> str:
    """The CPU's model name and count."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cpus)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus)"


@cache
def versions() -> str:
    """Versions of this library and of what it is measured with."""
    import numba
    import numpy as np

    import batchnorm

    parts = [f"batchnorm {batchnorm.__version__}", f"numpy {np.__version__}",
             f"numba {numba.__version__}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
    except ImportError:
        pass
    return "; ".join(parts)


def write_csv(path: str, rows: list[dict]) -> None:
    """Write ``rows`` (dicts with the same keys) to ``path`` as CSV with a header."""
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
