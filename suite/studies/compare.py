"""Seed-paired comparison of an ablation study's changes against its unmodified setting.

A spec's ``compare: {axis: variant_options, baseline: {}}`` names the axis whose values are the
changes and the value the unmodified setting has on it. Every changed setting is paired with the
baseline setting that has the same image, seed and value on every other axis (so a ResNet-34 cut
is paired with the uncut ResNet-34). Per metric, the pair differences (change minus baseline) are
averaged and given a two-sided 95 % Student-t interval; a direction is claimed only where the
interval excludes zero. Directions are named by what they mean for privacy: "leaks more" is a
higher PSNR, SSIM or content gain, or a lower LPIPS.

The leak decision is 0/1 per run, where a t-interval of identical differences has zero width and
would claim a direction from four agreeing pairs. It gets an exact two-sided sign test over the
pairs whose decision differs instead (scipy's ``binomtest``): with n discordant pairs all in one
direction, p = 2 * 0.5**n, so at least six are needed for p < 0.05.

Only FINISHED runs pair; a metric a run lacks (LPIPS offline) drops that pair from that metric.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from suite.studies.expand import short_value

# metric -> +1 where a higher value means more leakage, -1 where lower does
METRICS: dict[str, int] = {"psnr": 1, "ssim": 1, "lpips": -1, "content_gain": 1}
LEVEL = 0.95
MORE, LESS, SAME = "leaks more", "leaks less", "not distinguishable"


@dataclass(frozen=True)
class Difference:
    """The paired difference of one metric: mean and 95 % interval over ``n`` pairs."""

    metric: str
    n: int
    mean: float
    low: float
    high: float
    direction: str


@dataclass
class Change:
    """One changed setting against the baseline: per-metric differences and the leak decisions."""

    label: str  # the change's value on the compared axis, e.g. "activation=none"
    group: str  # the other axes it was paired within, e.g. "variant=resnet34" ("" if none)
    n_pairs: int
    differences: dict[str, Difference] = field(default_factory=dict)
    leaks_baseline: int = 0
    leaks_change: int = 0
    leak_p: float = 1.0
    leak_direction: str = SAME
    unpaired: int = 0  # finished runs of this change without a finished baseline partner

    @property
    def name(self) -> str:
        """The change as tables show it: group and value."""
        return f"{self.group} {self.label}".strip()


def file_stem(baseline: Any) -> str:
    """The file stem of the table paired against ``baseline`` when it is a further baseline
    (``compare.also_against``): ``comparison_vs_<value>``, the value made safe for a file name."""
    return "comparison_vs_" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", short_value(baseline)).strip("_") or "base")


def t_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """Mean and two-sided Student-t interval of ``values`` (``nan`` bounds for fewer than 2)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def direction(sign: int, low: float, high: float) -> str:
    """``leaks more`` / ``leaks less`` where the interval excludes zero, else not distinguishable."""
    if math.isnan(low) or math.isnan(high):
        return SAME
    if low > 0:
        return MORE if sign > 0 else LESS
    if high < 0:
        return LESS if sign > 0 else MORE
    return SAME


def sign_test(base: Sequence[bool], change: Sequence[bool]) -> tuple[float, str]:
    """Exact two-sided sign test on paired 0/1 leak decisions: (p, direction)."""
    from scipy.stats import binomtest

    up = sum(1 for b, c in zip(base, change) if c and not b)
    down = sum(1 for b, c in zip(base, change) if b and not c)
    if up + down == 0:
        return 1.0, SAME
    p = float(binomtest(up, up + down, 0.5).pvalue)
    if p >= 1 - LEVEL:
        return p, SAME
    return p, MORE if up > down else LESS


def _finished(row: dict) -> bool:
    return row.get("status") == "FINISHED" and bool(row.get("metrics"))


def other_axes(row: dict, exclude) -> tuple[tuple[str, str], ...]:
    """A summary row's axis values other than ``exclude``, sorted: what its group shares."""
    return tuple(sorted((k, v) for k, v in (row.get("axes") or {}).items() if k not in exclude))


def axes_label(others: tuple[tuple[str, str], ...]) -> str:
    """``other_axes`` in words, by the keys' last part: ``variant=resnet34 cut_skips=0``."""
    return " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in others)


def paired_changes(rows: Sequence[dict], axis: str, baseline: Any) -> list[Change]:
    """The changes of ``axis`` against its ``baseline`` value, paired by image, seed and the
    other axes, in the order the rows first show them. Rows are a study's summary rows."""
    base_value = short_value(baseline)
    keyed: dict[tuple, dict] = {}
    order: list[tuple[str, tuple]] = []
    for row in rows:
        axes = row.get("axes") or {}
        if axis not in axes:
            continue
        others = other_axes(row, (axis,))
        keyed[(axes[axis], others, str(row.get("seed")), str(row.get("image")))] = row
        if axes[axis] != base_value and (axes[axis], others) not in order:
            order.append((axes[axis], others))
    changes = []
    for value, group in order:
        pairs, unpaired = [], 0
        for (val, others, seed, image), row in keyed.items():
            if (val, others) != (value, group) or not _finished(row):
                continue
            partner = keyed.get((base_value, others, seed, image))
            if partner is None or not _finished(partner):
                unpaired += 1
                continue
            pairs.append((partner["metrics"], row["metrics"]))
        change = Change(label=value, group=axes_label(group), n_pairs=len(pairs), unpaired=unpaired)
        for metric, sign in METRICS.items():
            diffs = [float(c[metric]) - float(b[metric]) for b, c in pairs if metric in b and metric in c]
            if not diffs:
                continue
            mean, low, high = t_interval(diffs)
            change.differences[metric] = Difference(metric, len(diffs), mean, low, high, direction(sign, low, high))
        decided = [(bool(b["leaked"]), bool(c["leaked"])) for b, c in pairs if "leaked" in b and "leaked" in c]
        change.leaks_baseline = sum(b for b, _ in decided)
        change.leaks_change = sum(c for _, c in decided)
        change.leak_p, change.leak_direction = sign_test([b for b, _ in decided], [c for _, c in decided])
        changes.append(change)
    return changes


def _cell(d: Difference | None, digits: int) -> str:
    if d is None:
        return "missing"
    if math.isnan(d.low):
        return f"{d.mean:+.{digits}f} (n={d.n}, no interval)"
    word = {MORE: " more", LESS: " less"}.get(d.direction, "")
    return f"{d.mean:+.{digits}f} [{d.low:+.{digits}f}, {d.high:+.{digits}f}]{word}"


def records(changes: Sequence[Change]) -> list[dict[str, str]]:
    """Flat string records for the printed table and the CSV, one per change."""
    out = []
    for c in changes:
        rec = {"change": c.name, "pairs": str(c.n_pairs)}
        for metric, digits in (("psnr", 2), ("ssim", 3), ("lpips", 3), ("content_gain", 2)):
            rec[f"d_{metric}"] = _cell(c.differences.get(metric), digits)
        rec["leaked (base -> change)"] = f"{c.leaks_baseline}/{c.n_pairs} -> {c.leaks_change}/{c.n_pairs}"
        rec["leak sign test"] = f"p={c.leak_p:.2g} {c.leak_direction}" if c.n_pairs else "no pairs"
        out.append(rec)
    return out


def format_comparison(changes: Sequence[Change], axis: str, baseline: Any) -> str:
    """The printed comparison: a header naming the baseline and the rule, then one row per change."""
    recs = records(changes)
    head = (f"paired against {axis}={short_value(baseline)} (same image, seed and other axes): "
            f"change - baseline, mean [{LEVEL:.0%} t-interval]; a direction only where it excludes 0")
    if not recs:
        return head + "\n(no finished pairs)"
    cols = list(recs[0])
    widths = {c: max(len(c), *(len(r[c]) for r in recs)) for c in cols}
    lines = [head, "  ".join(f"{c:<{widths[c]}}" for c in cols)]
    lines += ["  ".join(f"{r[c]:<{widths[c]}}" for c in cols) for r in recs]
    return "\n".join(lines)


def write_comparison_csv(changes: Sequence[Change], path: str | Path) -> Path:
    """The comparison as CSV with numeric columns (mean, low, high, direction per metric)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["change", "group", "value", "pairs", "unpaired"]
    for metric in METRICS:
        fields += [f"{metric}_n", f"{metric}_mean", f"{metric}_low", f"{metric}_high", f"{metric}_direction"]
    fields += ["leaks_baseline", "leaks_change", "leak_p", "leak_direction"]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        for c in changes:
            rec: dict[str, Any] = {"change": c.name, "group": c.group, "value": c.label, "pairs": c.n_pairs,
                                   "unpaired": c.unpaired, "leaks_baseline": c.leaks_baseline,
                                   "leaks_change": c.leaks_change, "leak_p": c.leak_p,
                                   "leak_direction": c.leak_direction}
            for metric, d in c.differences.items():
                rec.update({f"{metric}_n": d.n, f"{metric}_mean": d.mean, f"{metric}_low": d.low,
                            f"{metric}_high": d.high, f"{metric}_direction": d.direction})
            writer.writerow(rec)
    return path
