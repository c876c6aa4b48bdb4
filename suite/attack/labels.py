"""Label inference from the last linear layer's gradient, for clients that do not share labels.

Setting: logits z_i = W h_i + b, softmax cross-entropy with hard labels. With p_i the softmax
output and y_i the one-hot label of sample i, and mean reduction over a batch of B,

    dL/db_c = mean_i (p_ic - y_ic) = pbar_c - n_c / B
    dL/dW_c = mean_i (p_ic - y_ic) h_i

where n_c is the number of samples of class c. Summing over classes gives the exact identity
sum_c dL/db_c = 0 (and sum_c of the weight-grad rows = 0), which the counting methods use.

Order within the batch cannot be recovered from a summed gradient, so batch results are the
label MULTISET, returned sorted, and ``label_accuracy`` scores multiset overlap.
"""

from __future__ import annotations

import torch
from torch import nn

from suite.errors import GistressError
from suite.model.bnstats import forward_untouched

METHODS = ("auto", "idlg", "distinct", "count")


def _signal(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None, batch_size: int,
            reduction: str, q: torch.Tensor) -> torch.Tensor:
    """A per-class signal on the scale of dL/db, i.e. pbar_c - n_c/B."""
    if bias_grad is not None:
        g = bias_grad.detach().double().reshape(-1).cpu()
        # a summed loss scales every gradient by B
        return g / batch_size if reduction == "sum" else g
    # Row sums s_c = mean_i (p_ic - y_ic) S_i with S_i = sum_j h_ij >= 0 (ReLU features). If S_i is
    # about the same for every sample, s_c ~ Sbar * (pbar_c - n_c/B). Absent classes have
    # s_c = Sbar * pbar_c > 0, so Sbar ~ sum of positive rows / sum of their expected pbar.
    s = weight_grad.detach().double().reshape(weight_grad.shape[0], -1).sum(1).cpu()
    pos = s > 0
    if not bool(pos.any()):
        raise GistressError(
            "the last layer's weight gradient has no positive row sum: labels cannot be counted",
            "pass the bias gradient, or share labels (ThreatModel.shares_labels=True)",
        )
    return s * (q[pos].sum() / s[pos].sum())


def _largest_remainder(est: torch.Tensor, total: int) -> torch.Tensor:
    """Non-negative integer counts summing to ``total`` closest to ``est`` (Hamilton's method)."""
    est = est.clamp(min=0)
    if float(est.sum()) <= 0:
        raise GistressError("label counting found no class with a positive count",
                            "check that the gradient comes from a cross-entropy loss")
    est = est * (total / est.sum())
    counts = est.floor().long()
    rest = total - int(counts.sum())
    if rest > 0:
        frac = est - counts.double()
        counts[torch.argsort(frac, descending=True, stable=True)[:rest]] += 1
    return counts


def _candidates(g: torch.Tensor, q: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate class set S and the estimated counts B * (alpha * q_c - g_c) of every class.

    S must contain every present class. A class with g_c < 0 is surely present (pbar_c > 0).
    For absent classes g_c = pbar_c exactly, so for S containing all present classes
    sum_{c in S} pbar_c = 1 - sum_{c not in S} g_c (from sum_c g_c = 0). The estimate q of the
    per-class mean probability is rescaled by alpha to meet that sum, which also makes the
    counts on S sum to B. Classes outside S whose count would round to >= 1 join S and alpha is
    recomputed; S only grows, so this ends within C rounds.
    """
    in_s = g < 0
    if not bool(in_s.any()):
        raise GistressError(
            "the last-layer gradient has no negative class entry, so no label can be inferred",
            "check that the gradient is of a cross-entropy loss and not all zero",
        )
    for _ in range(g.numel()):
        alpha = (1.0 - g[~in_s].sum()) / q[in_s].sum()
        est = batch_size * (alpha * q - g)
        grow = ~in_s & (est >= 0.5)
        if not bool(grow.any()):
            break
        in_s |= grow
    return in_s, est


def infer_labels(
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor | None,
    batch_size: int,
    *,
    method: str = "auto",
    mean_probs: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Infer the batch's labels from the last linear layer's gradient; (B,) int64, sorted.

    ``weight_grad`` is (C, D) (trailing dims are flattened), ``bias_grad`` is (C,) or None.
    ``mean_probs`` is the attacker's estimate of the batch-mean softmax output per class, e.g.
    ``estimate_mean_probs(model, dummy)``; None assumes all classes equally likely. It matters
    for batches: a fresh model's batch-mean probabilities already differ several-fold between
    classes (measured 0.03 to 0.22 on a fresh CIFAR ResNet18), enough to miscount at B = 8.
    ``reduction`` is the client's loss reduction ("mean", PyTorch's default, or "sum").

    Methods:

    - ``idlg`` (batch 1; Zhao et al. 2020, iDLG): the true class is the only one with a
      negative gradient: argmin of the bias gradient (exact for any model), or without a bias
      argmin of the weight-grad row sums (exact when penultimate features are >= 0, e.g. ReLU).
    - ``distinct`` (after Yin et al. 2021, GradInversion): the B classes with the most negative
      g_c - alpha * mean_probs_c, i.e. the largest estimated counts; right only when labels do
      not repeat (needs B <= C).
    - ``count``: bias-corrected counting, n_c = B (pbar_c - dL/db_c), with pbar_c estimated as
      alpha * mean_probs_c, where alpha is fixed exactly by sum_c dL/db_c = 0 over the candidate
      classes (see ``_candidates``); then rounded to integers summing to B by largest remainder.
      The approximation is only in the per-class shape of pbar over present classes. Without a
      bias it runs on the weight-grad row sums rescaled to bias units (LLG-style, Wainakh et al.
      2022, with the per-sample impact estimated from the absent classes rather than from dummy
      data); that also assumes similar feature l1 norms across samples and some absent class.
    - ``auto``: ``idlg`` for B = 1, else ``count``.

    Assumes softmax cross-entropy with hard labels (no label smoothing). Order within a batch
    is unknowable from a summed gradient: the result is the label multiset, sorted ascending;
    score it with ``label_accuracy``.
    """
    if method not in METHODS:
        raise GistressError(f"unknown label-inference method '{method}'", f"use one of {', '.join(METHODS)}")
    if reduction not in ("mean", "sum"):
        raise GistressError(f"unknown loss reduction '{reduction}'", "use 'mean' or 'sum'")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GistressError(f"batch_size must be a positive integer, got {batch_size!r}", "pass len(batch)")
    if not isinstance(weight_grad, torch.Tensor) or weight_grad.dim() < 2:
        raise GistressError(
            "weight_grad must be the (C, D) gradient of the last linear layer's weight",
            "pass model.fc.weight.grad (or the matching entry of the update list)",
        )
    num_classes = weight_grad.shape[0]
    if bias_grad is not None and (not isinstance(bias_grad, torch.Tensor) or bias_grad.numel() != num_classes):
        raise GistressError(
            f"bias_grad must have one entry per class ({num_classes})",
            "pass the last linear layer's bias gradient, or None if it has no bias",
        )
    if mean_probs is None:
        q = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    else:
        q = torch.as_tensor(mean_probs).detach().double().reshape(-1).cpu()
        if q.numel() != num_classes or not bool((q > 0).all()) or not bool(torch.isfinite(q).all()):
            raise GistressError(
                f"mean_probs must hold {num_classes} positive finite class probabilities",
                "use estimate_mean_probs(model, dummy_inputs)",
            )
        q = q / q.sum()
    if method == "auto":
        method = "idlg" if batch_size == 1 else "count"
    if method == "idlg" and batch_size != 1:
        raise GistressError(f"iDLG infers the label of a single sample, got batch_size={batch_size}",
                            "use method='count' (or 'distinct' if labels are known not to repeat)")
    if method == "distinct" and batch_size > num_classes:
        raise GistressError(f"'distinct' needs batch_size <= number of classes ({num_classes})",
                            "use method='count'")
    g = _signal(weight_grad, bias_grad, batch_size, reduction, q)
    if method == "idlg":
        labels = torch.argmin(g).reshape(1)
    else:
        in_s, est = _candidates(g, q, batch_size)
        if method == "distinct":
            labels = torch.argsort(est, descending=True, stable=True)[:batch_size]
        else:
            counts = _largest_remainder(torch.where(in_s, est, torch.zeros_like(est)), batch_size)
            labels = torch.repeat_interleave(torch.arange(num_classes), counts)
    return labels.sort().values.to(device=weight_grad.device, dtype=torch.int64)


def estimate_mean_probs(model: nn.Module, inputs: torch.Tensor, *, train: bool = True) -> torch.Tensor:
    """The attacker's estimate of the client's batch-mean softmax: (C,) float64 on the CPU.

    Runs ``model`` on attacker-made ``inputs`` (e.g. ``torch.rand(B, 3, H, W)`` at the client's
    batch size and image size, SoK level 0 knowledge) in the client's BN mode and averages the
    softmax over the batch. The model is left untouched (BN buffers and modes restored). For a
    fresh model in BN train mode, uniform-noise dummies matched a uniform-noise client batch to
    about 0.005 per class; how well they match real images is unmeasured, and for a trained
    model the estimate is only as good as the inputs' resemblance to the client's data.
    """
    if not isinstance(inputs, torch.Tensor):
        raise GistressError("inputs must be a tensor", "pass e.g. torch.rand(B, 3, H, W)")
    logits = forward_untouched(model, inputs, train=train)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise GistressError("the model must return (B, C) logits to estimate class probabilities",
                            "pass a classifier")
    return logits.double().softmax(1).mean(0).cpu()


def label_accuracy(inferred: torch.Tensor, true: torch.Tensor) -> float:
    """Multiset overlap of two label vectors, divided by the batch size (order is ignored)."""
    if not isinstance(inferred, torch.Tensor) or not isinstance(true, torch.Tensor):
        raise GistressError("label_accuracy takes two tensors", "pass the inferred and the true labels")
    a, b = inferred.reshape(-1).long().cpu(), true.reshape(-1).long().cpu()
    if a.numel() != b.numel() or a.numel() == 0:
        raise GistressError(
            f"label vectors must be non-empty and of equal length, got {a.numel()} and {b.numel()}",
            "infer labels with batch_size=len(true)",
        )
    if int(a.min()) < 0 or int(b.min()) < 0:
        raise GistressError("labels must be non-negative class ids", "pass class indices, not one-hot or -1")
    size = int(max(a.max(), b.max())) + 1
    overlap = torch.minimum(torch.bincount(a, minlength=size), torch.bincount(b, minlength=size))
    return float(overlap.sum()) / a.numel()
