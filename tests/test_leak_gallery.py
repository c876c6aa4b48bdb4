"""The leak rule against a labelled gallery (tests/data/leak_gallery): what a person would call a
leak, from exact copies to washed-out, blurred and shifted ones, and what they would not (colour-
only estimates, smooth prior-only images, noise, another photograph), plus real reconstructions.

The gallery's confusion table is in docs/audit.md; this test recomputes it and fails when the two
differ, so a changed rule or threshold cannot leave the documented calibration behind.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from suite.scoring.leak_rule import DEFAULT_RULE, content_gain
from suite.scoring.metrics import PSNR_CAP

GALLERY = Path(__file__).parent / "data" / "leak_gallery"
DOC = Path(__file__).parents[1] / "docs" / "audit.md"
OLD_RULE_PSNR = 18.0  # the rule this one replaced: PSNR >= 18 dB (LPIPS missing offline)


def _png(rel: str) -> torch.Tensor:
    arr = np.array(Image.open(GALLERY / rel).convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255


def _psnr(x: torch.Tensor, t: torch.Tensor) -> float:
    mse = float(((x - t) ** 2).mean())
    return PSNR_CAP if mse < 1e-10 else 10 * np.log10(1 / mse)


def scored_cases() -> list[dict]:
    """Every gallery case with its content gain, PSNR and both rules' decisions (offline: no LPIPS)."""
    rows = json.loads((GALLERY / "gallery.json").read_text())
    for c in rows:
        t, x = _png(c["target"]), _png(c["image"])
        c["gain"] = content_gain(x, t)
        c["control_gain"] = content_gain(_png(c["control"]), t) if c["control"] else None
        c["psnr"] = _psnr(x, t)
        c["new"] = DEFAULT_RULE.decide(c["gain"], control_gain=c["control_gain"])
        c["old"] = c["psnr"] >= OLD_RULE_PSNR
    return rows


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return scored_cases()


def confusion_table(cases: list[dict]) -> str:
    """The Markdown table docs/audit.md carries: per kind of case, the label, the content gain and
    PSNR ranges, and how many each rule got right."""
    kinds: dict[str, list[dict]] = {}
    for c in cases:
        kinds.setdefault(c["kind"] if c["kind"] != "real" else c["case"], []).append(c)
    lines = ["| case | label | n | content gain dB | PSNR dB | content-gain rule right | PSNR >= 18 rule right |",
             "|---|---|---|---|---|---|---|"]
    for kind, rows in kinds.items():
        label = rows[0]["label"]
        g = [r["gain"] for r in rows]
        p = [r["psnr"] for r in rows]

        new, old = ("–" if label == "ambiguous" else
                    f"{sum(r[key] == (label == 'leak') for r in rows)}/{len(rows)}" for key in ("new", "old"))
        lines.append(f"| {kind} | {label} | {len(rows)} | {min(g):.1f}–{max(g):.1f} | {min(p):.1f}–{max(p):.1f} | "
                     f"{new} | {old} |")
    for key, name in (("new", "content-gain rule"), ("old", "PSNR >= 18 rule")):
        n = Counter((c["label"], c[key]) for c in cases if c["label"] != "ambiguous")
        lines.append(f"| **{name}, all labelled cases** | | {sum(n.values())} | | | "
                     f"leaks caught {n['leak', True]}/{n['leak', True] + n['leak', False]}, "
                     f"false leaks {n['no leak', True]}/{n['no leak', True] + n['no leak', False]} | |")
    return "\n".join(lines)


def test_the_rule_agrees_with_every_labelled_case(cases):
    wrong = [(c["case"], round(c["gain"], 2)) for c in cases if c["label"] != "ambiguous" and c["new"] != (c["label"] == "leak")]
    assert not wrong, f"the leak rule disagrees with the gallery's labels: {wrong}"
    labels = Counter(c["label"] for c in cases)
    assert labels["leak"] >= 80 and labels["no leak"] >= 40  # the gallery is not trivially small


def test_the_named_real_cases(cases):
    by_case = {c["case"]: c for c in cases}
    washed = by_case["convnext_t cifar, gia_bn 300 it: washed-out astronaut: reconstruction"]
    assert washed["new"] and not washed["old"] and washed["psnr"] < 18  # PSNR missed what a person sees
    prior_only = by_case["convnet, ig 100 it: chelsea at 19.3 dB, control 16.8 dB: reconstruction"]
    assert not prior_only["new"] and prior_only["old"]  # PSNR called a colour match a leak
    assert not by_case["convnet, ig 100 it: chelsea at 19.3 dB, control 16.8 dB: prior-only control"]["new"]


def test_the_old_psnr_rule_got_the_gallery_wrong_both_ways(cases):
    labelled = [c for c in cases if c["label"] != "ambiguous"]
    assert any(c["old"] and c["label"] == "no leak" for c in labelled)   # mean colour on smooth photos
    assert any(not c["old"] and c["label"] == "leak" for c in labelled)  # contrast-lost copies


def test_the_offline_rule_is_at_least_as_strict_as_the_online_one(cases):
    """LPIPS only ever adds leaks: whatever LPIPS would say, a case the offline rule (no LPIPS)
    calls a leak stays a leak online."""
    grid = [0.0, 0.05, 0.1, 0.2, 0.5, 1.0]
    for c in cases:
        offline = DEFAULT_RULE.decide(c["gain"], control_gain=c["control_gain"])
        for lp in grid:
            for control_lp in [None, *grid]:
                online = DEFAULT_RULE.decide(c["gain"], control_gain=c["control_gain"], lpips=lp,
                                             control_lpips=control_lp)
                assert online or not offline, (c["case"], lp, control_lp)


def test_docs_carry_the_gallerys_confusion_table(cases):
    table = confusion_table(cases)
    assert table in DOC.read_text(), f"docs/audit.md must carry the gallery's confusion table:\n{table}"
