"""Study outputs: the summary table (CSV) and the study figure laid out like the paper's.

Figure: one row per setting (seed included), and per image three columns: the target, the
prior-only control, and the reconstruction. Images come from the run's folder on disk when it is
there, otherwise from the run's MLflow artifacts (``images/``), so a summary of a resumed or
remotely run study is still complete.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

SCORE_COLUMNS = ("psnr", "ssim", "lpips", "content_gain", "brr", "control_psnr", "gain_psnr")
PANELS = (("target", "target"), ("control", "control"), ("reconstruction", "reconstruction"))


def _fmt(value, digits: int, signed: bool = False) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(v):
        return str(v)
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def summary_records(rows: Sequence[dict], *, short_ids: bool = False) -> list[dict[str, str]]:
    """Flat string records, one per child: varying axes, seed, image, scores, status, run id.

    LPIPS reads "missing" for a finished run without it (backbone unavailable), never 0.
    """
    axes: list[str] = []
    for r in rows:
        for k in r.get("axes", {}):
            if k not in axes:
                axes.append(k)
    records = []
    for r in rows:
        m = r.get("metrics") or {}
        rec: dict[str, str] = {}
        if "variant" not in axes:
            rec["variant"] = str(r.get("variant", ""))
        for k in axes:
            rec[k] = str(r.get("axes", {}).get(k, ""))
        rec["seed"] = str(r.get("seed", ""))
        rec["image"] = str(r.get("image", ""))
        finished = r.get("status") == "FINISHED"
        rec["psnr"] = _fmt(m.get("psnr"), 2)
        rec["ssim"] = _fmt(m.get("ssim"), 3)
        rec["lpips"] = _fmt(m["lpips"], 3) if "lpips" in m else ("missing" if finished else "")
        rec["brr"] = _fmt(m.get("brr"), 2)
        rec["content_gain"] = _fmt(m.get("content_gain"), 2)
        rec["leaked"] = ("yes" if m["leaked"] else "no") if finished and "leaked" in m else ""
        rec["control_psnr"] = _fmt(m.get("control_psnr"), 2)
        rec["gain_psnr"] = _fmt(m.get("gain_psnr"), 2, signed=True)
        rec["status"] = str(r.get("status", "")) + (" (earlier run)" if r.get("reused") else "")
        run_id = r.get("run_id") or ""
        rec["run_id"] = run_id[:8] if short_ids else run_id
        error = str(r.get("error") or "")
        rec["error"] = error[:60] + ("..." if len(error) > 60 else "") if short_ids else error
        records.append(rec)
    return records


def write_summary_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Write the summary table as CSV and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records = summary_records(rows)
    with path.open("w", newline="") as fh:
        if records:
            writer = csv.DictWriter(fh, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    return path


def _has_control(rows: Sequence[dict]) -> bool:
    return any("control" in (r.get("artifacts") or {}) or "control_psnr" in (r.get("metrics") or {}) for r in rows)


def comparison_name(rows: Sequence[dict]) -> str:
    """The study figure's name on the parent run: what its columns hold, in order."""
    panels = [p for p, _ in PANELS if _has_control(rows) or p != "control"]
    return "study_comparison_" + "_".join(panels) + ".png"


def _panel_path(row: dict, panel: str, client, cache_dir: Path | None,
                folders: Sequence[str]) -> Path | None:
    """A panel's PNG: the local artifact if present, else downloaded from the MLflow run's first
    artifact folder in ``folders`` that has it."""
    local = (row.get("artifacts") or {}).get(panel)
    if local and Path(local).is_file():
        return Path(local)
    run_id = row.get("run_id")
    if client is None or not run_id or row.get("status") != "FINISHED" or cache_dir is None:
        return None
    for folder in folders:
        target = Path(cache_dir) / run_id / folder / f"{panel}.png"
        if target.is_file():
            return target
    try:
        for folder in folders:
            names = {Path(a.path).name for a in client.list_artifacts(run_id, folder)}
            if f"{panel}.png" in names:
                (Path(cache_dir) / run_id).mkdir(parents=True, exist_ok=True)
                return Path(client.download_artifacts(run_id, f"{folder}/{panel}.png", str(Path(cache_dir) / run_id)))
        return None
    except Exception:  # a figure with a blank cell beats no figure
        return None


def study_figure(rows: Sequence[dict], path: str | Path, *, title: str = "", client=None,
                 cache_dir: str | Path | None = None, cell_inches: float = 1.5,
                 folders: Sequence[str] = ("images",)) -> Path | None:
    """Draw the study grid (rows: settings; per image: target | control | reconstruction).
    ``folders``: the runs' artifact folders that may hold the panels' PNGs, in the order to try."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    if not rows:
        return None
    # Rows are settings; each row's images fill "slots" in first-seen order, so settings on
    # different images (a ResNet on astronaut, YOLO on bus) share columns instead of leaving gaps.
    row_keys: list[str] = []
    row_images: dict[str, list[str]] = {}
    by_cell: dict[tuple[str, str], dict] = {}
    for r in rows:
        label = r.get("row_label") or r.get("name", "")
        img = str(r.get("image", ""))
        if label not in row_keys:
            row_keys.append(label)
            row_images[label] = []
        if img not in row_images[label]:
            row_images[label].append(img)
        by_cell[(label, img)] = r
    slots = max(len(v) for v in row_images.values())
    slot_names = [{imgs[j] for imgs in row_images.values() if j < len(imgs)} for j in range(slots)]
    panels = [p for p in PANELS if _has_control(rows) or p[0] != "control"]
    ncols, nrows = slots * len(panels), len(row_keys)
    label_w = 2.6
    fig = plt.figure(figsize=(label_w + cell_inches * ncols, 0.6 + (cell_inches + 0.35) * nrows))
    grid = fig.add_gridspec(nrows, ncols, left=label_w / (label_w + cell_inches * ncols), right=0.99,
                            top=1 - 0.6 / fig.get_figheight(), bottom=0.02, wspace=0.05, hspace=0.35)
    for i, key in enumerate(row_keys):
        for j in range(slots):
            img = row_images[key][j] if j < len(row_images[key]) else None
            shared = len(slot_names[j]) == 1  # one image in this slot for every row: name it on top
            r = by_cell.get((key, img)) if img is not None else None
            for k, (panel, caption) in enumerate(panels):
                ax = fig.add_subplot(grid[i, j * len(panels) + k])
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0:
                    top = f"{next(iter(slot_names[j]))}\n{caption}" if k == 0 and shared else caption
                    ax.set_title(top, fontsize=8)
                if j == 0 and k == 0:
                    ax.set_ylabel(_wrap(key), fontsize=7, rotation=0, ha="right", va="center", labelpad=6)
                if k == 0 and img is not None and not shared:
                    ax.set_xlabel(img, fontsize=7, labelpad=2)
                if r is None:
                    ax.set_facecolor("0.95")
                    continue
                p = _panel_path(r, panel, client, cache_dir, folders)
                if p is not None:
                    ax.imshow(mpimg.imread(str(p)), interpolation="nearest")  # show pixels as they are
                    ax.set_aspect("equal")
                else:
                    ax.set_facecolor("0.92")
                    status = r.get("status", "")
                    text = "no control" if panel == "control" and status == "FINISHED" else status.lower()
                    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=7, transform=ax.transAxes)
                m = r.get("metrics") or {}
                score = m.get("psnr") if panel == "reconstruction" else m.get("control_psnr") if panel == "control" else None
                if score is not None:
                    ax.set_xlabel(f"{float(score):.1f} dB", fontsize=7, labelpad=2)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.15 / fig.get_figheight())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _wrap(text: str, width: int = 28) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    if cur:
        lines.append(cur)
    return "\n".join(lines)


def paired_differences_figure(entries: Sequence[tuple[str, dict[str, tuple[float, float, float]]]],
                              path: str | Path, *, title: str = "", baseline: str = "baseline") -> Path | None:
    """Forest plot of an ablation's paired differences: one panel per metric, one line per change,
    the mean with its interval as a bar and a dashed line at zero (no difference).

    ``entries``: (change name, {metric: (mean, low, high)}); a missing bound draws the mean alone.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("psnr", "ssim", "lpips", "content_gain") if any(m in d for _, d in entries)]
    if not entries or not metrics:
        return None
    units = {"psnr": "Δ PSNR (dB)", "ssim": "Δ SSIM", "lpips": "Δ LPIPS (lower leaks more)",
             "content_gain": "Δ content gain (dB)"}
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1.5, 0.45 * len(entries) + 1.4),
                             sharey=True, squeeze=False)
    ys = list(range(len(entries)))[::-1]
    for ax, metric in zip(axes[0], metrics):
        for y, (_, diffs) in zip(ys, entries):
            if metric not in diffs:
                continue
            mean, low, high = diffs[metric]
            excludes = math.isfinite(low) and math.isfinite(high) and (low > 0 or high < 0)
            colour = "tab:red" if excludes else "tab:gray"
            if math.isfinite(low) and math.isfinite(high):
                ax.plot([low, high], [y, y], color=colour, linewidth=2)
            ax.plot([mean], [y], "o", color=colour)
        ax.axvline(0.0, color="black", linestyle="--", linewidth=0.8)
        ax.set_xlabel(units[metric])
    axes[0][0].set_yticks(ys)
    axes[0][0].set_yticklabels([name for name, _ in entries])
    fig.suptitle(title or f"paired against {baseline}: 95 % intervals (red: excludes 0)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
