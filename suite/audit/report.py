"""The audit's files: report.md and report.html from one list of blocks, verdict.csv and
verdict.json, and the figures (best and median reconstruction per level)."""

from __future__ import annotations

import base64
import csv
import html
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from suite.audit.verdict import COLUMNS, LevelOutcome, display_rows, status_text, verdict_rows
from suite.results import jsonable

if TYPE_CHECKING:
    from suite.audit.run import AuditOutcome


def write_report(result: AuditOutcome) -> dict[str, Path]:
    """report.md, report.html, verdict.csv, verdict.json, audit.png and per-level images."""
    out_dir = result.out_dir
    files: dict[str, Path] = {}
    rows = verdict_rows(result.outcomes)
    img_dir = out_dir / "images"
    for o in result.outcomes:
        if o.status == "FINISHED" and o.samples:
            o.figure = level_figure([o], img_dir / f"level{o.number}_{o.level.key}.png")
            files[f"images/{o.figure.name}"] = o.figure
    fig = level_figure([o for o in result.outcomes if o.status == "FINISHED" and o.samples],
                       out_dir / "audit.png", title=f"gistress audit: {result.plan.base.variant}")
    if fig is not None:
        files["audit.png"] = fig

    csv_path = out_dir / "verdict.csv"
    with csv_path.open("w", newline="") as fh:
        keys = [k for k, _ in COLUMNS] + ["upper_bound", "control_psnr", "positive_control_variant",
                                          "positive_control_size", "positive_control_search", "status", "n_images",
                                          "run_id"]
        writer = csv.DictWriter(fh, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            rec = dict(r)
            rec["leaked"] = "" if r["leaked"] is None else ("yes" if r["leaked"] else "no")
            writer.writerow({k: "" if rec.get(k) is None else rec[k] for k in keys})
    files["verdict.csv"] = csv_path

    verdict = {**_meta(result), "verdict": result.verdict, "columns": [k for k, _ in COLUMNS],
               "headers": dict(COLUMNS), "rows": rows}
    json_path = out_dir / "verdict.json"
    json_path.write_text(json.dumps(jsonable(verdict), indent=2))
    files["verdict.json"] = json_path

    blocks = report_blocks(result, rows)
    md_path = out_dir / "report.md"
    md_path.write_text(render_markdown(blocks, out_dir))
    files["report.md"] = md_path
    html_path = out_dir / "report.html"
    html_path.write_text(render_html(blocks, out_dir, title=f"gistress audit: {result.plan.base.variant}"))
    files["report.html"] = html_path
    return files


def _rule_in_words(result: AuditOutcome) -> str:
    """The leak rule as the levels applied it (their ``leak_rule``), or as the config sets it."""
    used = next((o.leak_rule for o in result.outcomes if o.leak_rule), None)
    if used:
        return used
    from suite.execution.runner import leak_rule

    return leak_rule(result.plan.base).describe(lpips_available=True, control=True)


def _meta(result: AuditOutcome) -> dict:
    plan, base = result.plan, result.plan.base
    return {
        "variant": base.variant, "variant_options": base.variant_options, "weights": base.weights,
        "data": base.data, "images": plan.images, "size": plan.size, "seed": base.seed, "device": base.device,
        "task": plan.task, "has_batchnorm": plan.has_bn, "budget": plan.budget.name,
        "budget_description": plan.budget.describe(), "iterations_override": plan.iterations_override,
        "leak_rule": {"rule": _rule_in_words(result), **base.leak.model_dump(),
                      "lpips_missing": next((o.lpips_missing for o in result.outcomes if o.lpips_missing), None)},
        "client_batches": "each image attacked as its own client batch of 1",
        "battery": plan.battery_lines(), "notes": plan.notes,
        "tracking_uri": result.tracking_uri, "experiment": result.experiment,
        "parent_run_id": result.parent_run_id, "interrupted": result.interrupted,
    }


def report_blocks(result: AuditOutcome, rows: list[dict]) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"h3"|"p", text), ("ul", items), ("table", headers, rows),
    ("img", path, alt)."""
    plan, base = result.plan, result.plan.base
    cells = display_rows(rows)
    missing = next((o.lpips_missing for o in result.outcomes if o.lpips_missing), None)
    blocks: list[tuple] = [
        ("h1", f"Leakage audit: {base.variant}"),
        ("p", f"Weights {base.weights}; data {base.data}; images {', '.join(plan.images)} at {plan.size} px; "
              f"level {plan.budget.name}; seed {base.seed}; {time.strftime('%Y-%m-%d %H:%M')}."),
        ("h2", "Verdict"),
        ("p", result.verdict),
    ]
    if result.interrupted:
        blocks.append(("p", "This audit was interrupted: levels marked 'not run' have no result."))
    blocks += [
        ("table", [h for _, h in COLUMNS], [[c[k] for k, _ in COLUMNS] for c in cells]),
        ("p", "SoK level: the highest adversary-assumption level (Du et al., 0-5) the setting relies on "
              "(1 = image priors, 2 = data distribution, 3 = client training details, 4 = BN statistics "
              "of the client's batch); \"upper bound\" marks clients simplified beyond a realistic "
              "training step. BRR: fraction of images leaked (the restart the attacker picks by matching "
              "loss). WSRR: fraction of attack attempts (image x restart) in which the image leaked. "
              "PSNR/SSIM/LPIPS: medians over images. Gain: median PSNR of the attack minus that of the "
              "prior-only control (same start and budget, gradient term off): what the update itself "
              "gives away."),
        ("h2", "How it was run"),
        ("ul", [
            f"Leak rule (suite.scoring.leak_rule, calibrated on a labelled gallery: docs/audit.md): "
            f"{_rule_in_words(result)}"
            + (f"; LPIPS is missing here ({missing}), so content gain alone decided (the stricter rule)"
               if missing else "") + ".",
            "Client batches: each image is attacked as its own client batch of 1, the setting most "
            "favourable to the attacker (larger batches are harder to invert).",
            f"Budget: {plan.budget.describe()}.",
            *(f"Note: {n}." for n in plan.notes),
            f"Model: {base.variant}"
            + (f" ({', '.join(f'{k}={v}' for k, v in base.variant_options.items())})" if base.variant_options else "")
            + f", task {plan.task}, {'with' if plan.has_bn else 'without'} BatchNorm; device {base.device}.",
            f"MLflow: {result.tracking_uri}, experiment '{result.experiment}', parent run {result.parent_run_id} "
            "(one child run per level).",
        ]),
        ("h3", "Battery (fixed; numbers are the same in every audit)"),
        ("ul", plan.battery_lines()),
        ("h2", "Reconstructions"),
        ("p", "Per level: the best and the median reconstruction (by PSNR) next to its target and the "
              "prior-only control from the same start."),
    ]
    for o in result.outcomes:
        title = f"{o.number}. {o.level.key}: {o.level.title}"
        if o.status != "FINISHED":
            blocks += [("h3", title), ("p", status_text(o))]
            continue
        blocks.append(("h3", title))
        picked = "; ".join(f"{label}: {s.image}, PSNR {s.psnr:.1f} dB, SSIM {s.ssim:.3f}"
                           + (f", LPIPS {s.lpips:.3f}" if s.lpips is not None else "")
                           + f", leaked {'yes' if s.leaked else 'no'}" for label, s in o.best_and_median())
        text = f"{o.level.grants}. {picked}."
        if o.iterations is not None:
            searched = o.control_attempts and plan.budget.cap_for(o.level.preset) and not plan.iterations_override
            text += f" Budget: {o.iterations:,} iterations" + (" (set by its positive control)." if searched else ".")
        if o.positive is not None:
            p = o.positive
            scale = (f" Positive control at {p.config_size} px, audited model at {plan.size} px."
                     if p.config_size not in (None, plan.size) else "")
            if p.status == "FINISHED":
                text += (f" Positive control: this budget recovers the reference model {p.config_variant} "
                         f"at {p.median('psnr'):.1f} dB (leaked: {'yes' if p.leaked else 'no'}; {o.attempts_text()}); "
                         f"your model: {o.median('psnr'):.1f} dB.{scale} Verdict: {o.verdict}.")
            else:
                text += f" Positive control {o.attempts_text()}.{scale} Verdict: {o.verdict}."
        if o.tags.get("calibrated_on"):
            text += f" BN statistics calibrated on {o.tags['calibrated_on']}."
        if o.tags.get("inferred_labels"):
            text += f" Inferred labels: {o.tags['inferred_labels']}."
        blocks.append(("p", text))
        if o.figure is not None:
            blocks.append(("img", o.figure, f"level {o.number} best and median reconstruction"))
    return blocks


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[tuple], base_dir: Path) -> str:
    """Markdown with images linked relative to the report (they sit beside it)."""
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "table":
            headers, body = block[1], block[2]
            lines.append("| " + " | ".join(_md_cell(h) for h in headers) + " |")
            lines.append("|" + "|".join("---" for _ in headers) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
            lines.append("")
        elif kind == "img":
            rel = Path(block[1]).resolve().relative_to(base_dir.resolve()).as_posix()
            lines += [f"![{block[2]}]({rel})", ""]
    return "\n".join(lines)


def render_html(blocks: list[tuple], base_dir: Path, *, title: str) -> str:
    """A self-contained HTML page: images embedded as base64 PNGs."""
    esc = html.escape
    body: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{esc(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{esc(block[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{esc(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(Path(block[1]).read_bytes()).decode("ascii")
            body.append(f'<img alt="{esc(block[2])}" src="data:image/png;base64,{data}">')
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
             "line-height:1.45}table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;"
             "padding:.3em .6em;text-align:left}th{background:#f3f3f3}img{max-width:100%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def level_figure(outcomes: list[LevelOutcome], path: Path, *, title: str = "") -> Path | None:
    """Rows = levels; per picked sample (best, median): target | reconstruction | control."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from suite.reports.images import draw_boxes, to_pil

    rows = [(o, o.best_and_median()) for o in outcomes if o.samples]
    if not rows:
        return None
    per = 3
    ncols = per * max(len(p) for _, p in rows)
    cell = 1.7
    label_w = 1.8
    height = (0.8 if title else 0.5) + (cell + 0.5) * len(rows)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(label_w + cell * ncols, height), squeeze=False)
    for i, (o, picks) in enumerate(rows):
        for j in range(ncols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            k, panel = divmod(j, per)
            if k >= len(picks):
                ax.axis("off")
                continue
            label, s = picks[k]
            if panel == 0:
                pil = to_pil(s.target)
                if s.boxes is not None:
                    pil = draw_boxes(pil, [s.boxes])
                ax.imshow(pil, interpolation="nearest")
                ax.set_title(f"{label}: {s.image}\ntarget", fontsize=7)
            elif panel == 1:
                ax.imshow(to_pil(s.reconstruction), interpolation="nearest")
                ax.set_title(f"attack {s.psnr:.1f} dB" + (" LEAKED" if s.leaked else ""), fontsize=7)
            elif s.control is not None:
                ax.imshow(to_pil(s.control), interpolation="nearest")
                ax.set_title(f"control {s.control_psnr:.1f} dB" if s.control_psnr is not None else "control",
                             fontsize=7)
            else:
                ax.axis("off")
            if j == 0:
                ax.set_ylabel(f"{o.number}. {o.level.key}", fontsize=8, rotation=0, ha="right", va="center",
                              labelpad=6)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.15 / fig.get_figheight())
    fig.subplots_adjust(left=label_w / (label_w + cell * ncols), right=0.99, top=1 - (0.75 if title else 0.45) / height,
                        bottom=0.1 / height, wspace=0.05, hspace=0.45)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
