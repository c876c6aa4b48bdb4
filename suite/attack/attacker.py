"""Optimization-based gradient inversion: the attacker sees an Observation, never the target.

One engine for every task: the task loss (classification cross-entropy or the YOLOv8 detection
loss) is the only difference. Restarts are chosen by final matching loss; scoring against the
target happens outside, after reconstruction.

Here: the server's model copy, the objective (candidate update, matching loss, priors), labels,
the candidate space and the restarts. The descent loop is ``suite/attack/descent.py``; batch
normalization under vmap (batched restarts) is ``suite/attack/batched_bn.py``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from suite.attack.allocator import tune_allocator
from suite.attack.batched_bn import own_forward_bn_layers, vmappable_batch_norm
from suite.attack.checkpoint import Checkpoint
from suite.attack.convgrad import use_grouped_conv_derivative
from suite.attack.descent import all_diverged, descend
from suite.attack.inits import random_init
from suite.attack.objectives import UpdateMatcher, bn_input_stats, bn_prior, total_variation
from suite.config import AttackSpec
from suite.errors import DivergenceError, GistressError
from suite.model.batchnorm import BNCapture, freeze_bn_stats, named_bn_layers
from suite.model.tasks import ClassificationLoss, DetectionLoss, set_mode
from suite.results import Reconstruction
from suite.threat.client import Observation, local_schedule, trainable

StepCallback = Callable[[int, dict[str, float], torch.Tensor], dict[str, float] | None]


def math_attention():
    """Double backward through fused SDPA is not implemented on CPU: use the math kernel."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except Exception:  # pragma: no cover - very old torch
        return contextlib.nullcontext()


class Attacker:
    """Reconstructs the client's images from an Observation under an AttackSpec."""

    def __init__(self, variant, obs: Observation, spec: AttackSpec, device: str | torch.device = "cpu",
                 seed: int = 0):
        self.variant = variant
        self.obs = obs
        self.spec = spec
        self.device = torch.device(device)
        self.seed = seed
        if self.device.type == "cpu":
            tune_allocator()  # otherwise every CPU iteration page-faults its gradient buffers in
        self.model_for_momentum = variant.model  # BN momentum as sent (our copy's BN is frozen)
        self.model = self._server_model()
        self.names, self.params = trainable(self.model)
        if self.names != obs.param_names:
            raise GistressError("the observed update does not match the model's parameters",
                                "attack the same architecture the client trained")
        self.target_update = [u.to(self.device) for u in obs.update]
        self.matcher = UpdateMatcher(self.target_update, self.names, spec.objective, spec.layer_weights)
        self.bn_reference = self._bn_reference()
        # the BN prior's statistics: each BN layer's input at the latest forward
        self.hooks = BNCapture(self.model, bn_input_stats) if (spec.bn_prior or 0) > 0 else None
        self.inferred_labels: torch.Tensor | None = None
        self.labels = self._labels()
        self.batches_restarts(spec.restarts)  # restart_mode=batched where it cannot: fail now

    # ----- set-up -------------------------------------------------------------------------
    def _server_model(self) -> nn.Module:
        model = copy.deepcopy(self.variant.model)
        model.load_state_dict(self.obs.model_state)
        model.to(self.device)
        use_grouped_conv_derivative(model)  # same values; a cheaper double backward (suite/attack/convgrad.py)
        set_mode(model, self.obs.task, self.obs.threat.bn_mode)
        freeze_bn_stats(model)  # the attacker's forwards must not drift the statistics
        return model

    def _bn_layers(self) -> list[nn.Module]:
        return [m for _, m in named_bn_layers(self.model)]

    def _bn_reference(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Statistics for the BN prior (and, when shared, for emulating the train-mode client)."""
        layers = self._bn_layers()
        if not layers:
            return None
        obs, threat = self.obs, self.obs.threat
        stats = None
        if threat.bn_stats == "exact" and obs.bn_stats is not None:
            stats = [(m.to(self.device), v.to(self.device)) for m, v in obs.bn_stats]
        elif threat.bn_stats == "running" and obs.running_after is not None:
            from suite.model.bnstats import bn_momentum, count_per_channel, recover_batch_stats

            before = [(n, obs.model_state[n + ".running_mean"], obs.model_state[n + ".running_var"])
                      for n, _ in named_bn_layers(self.model)]
            after = [(n, obs.running_after[n + ".running_mean"], obs.running_after[n + ".running_var"])
                     for n, _, _ in before]
            momentum = threat.bn_momentum or bn_momentum(self.model_for_momentum)
            rows = obs.batch_size
            if threat.update == "fedavg" and obs.training is not None:
                # K local forwards moved the buffers K times: after = (1-m)^K before + the
                # m(1-m)^(K-1-k)-weighted batch statistics of step k. With the training known,
                # invert all K at once (effective momentum 1-(1-m)^K), which yields their
                # weighted mean: exact when every step sees the same statistics, approximate when
                # the weights drift or the mini-batches differ. Unknown training: one step assumed.
                steps = len(local_schedule(obs.batch_size, threat))
                momentum = 1.0 - (1.0 - momentum) ** steps
                rows = min(obs.training["local_batch_size"] or rows, rows)
            counts = count_per_channel(self.model, (rows, 3, *obs.image_size))
            rec = recover_batch_stats(before, after, momentum, counts)
            stats = [(m.to(self.device), v.to(self.device)) for _, m, v in rec]
        # Shared statistics feed the BN prior only. Normalizing the candidate with them in eval
        # mode would not reproduce the client's gradient: train-mode BN backpropagates through the
        # batch statistics (measured: matching loss 0.6-0.7 at the true image, batch 1).
        if stats is None:
            stats = [(m.running_mean.detach().clone(), m.running_var.detach().clone()) for m in layers]
        return stats

    def _labels(self):
        obs = self.obs
        if obs.task == "detection":
            from suite.data.batch import Batch

            dummy = Batch(images=torch.zeros(obs.batch_size, 3, *obs.image_size), boxes=obs.boxes,
                          classes=obs.classes)
            targets = {k: v.to(self.device) for k, v in dummy.yolo_targets().items()}
            return DetectionLoss(self.model, targets)
        if obs.labels is not None:
            return ClassificationLoss(labels=obs.labels.to(self.device))
        if self.spec.labels == "joint":
            return None  # soft labels are created per restart
        from suite.attack.labels import estimate_mean_probs, infer_labels

        w_grad, b_grad = self._last_layer_grads()
        # the batch-mean softmax from attacker-made inputs (level 0: batch and image size)
        gen = torch.Generator().manual_seed(self.seed + 99)
        dummies = torch.rand((obs.batch_size, 3, *obs.image_size), generator=gen).to(self.device)
        probs = estimate_mean_probs(self.model, dummies, train=obs.threat.bn_mode == "train")
        b_grad = self._bias_in_gradient_units(b_grad, probs)
        self.inferred_labels = infer_labels(w_grad, b_grad, obs.batch_size, mean_probs=probs).to(self.device)
        return ClassificationLoss(labels=self.inferred_labels)

    def _bias_in_gradient_units(self, b_grad: torch.Tensor | None, probs: torch.Tensor) -> torch.Tensor | None:
        """A FedAvg delta's last-layer bias on the scale of one mean-reduced gradient.

        Label counting reads dL/db_c = pbar_c - n_c/B; FedAvg shares theta_before - theta_after,
        about lr * K times that. With the training known, divide by lr * K (exact for K = 1; for
        more steps it assumes each sample is visited equally often and the softmax moves little).
        Without it, the absent classes fix the scale: there the entry is s * pbar_c > 0, the
        estimate ``suite.attack.labels`` already applies to weight rows. Weight rows (no bias) are
        rescaled inside ``infer_labels``.
        """
        obs = self.obs
        if obs.threat.update != "fedavg" or b_grad is None:
            return b_grad
        if obs.training is not None:
            return b_grad / (obs.training["local_lr"] * len(local_schedule(obs.batch_size, obs.threat)))
        pos = b_grad > 0
        if not bool(pos.any()):
            return b_grad  # infer_labels reports that no label can be counted
        return b_grad * (probs[pos].sum() / b_grad[pos].double().sum()).to(b_grad.dtype)

    def _last_layer_grads(self):
        nc = self.variant.num_classes
        idx = [i for i, (n, p) in enumerate(zip(self.names, self.params))
               if p.dim() == 2 and p.shape[0] == nc and n.endswith("weight")]
        if not idx:
            raise GistressError("cannot find the classifier's last layer for label inference",
                                "share labels (threat.shares_labels=true) or use labels=joint")
        wi = idx[-1]
        bias_name = self.names[wi][: -len("weight")] + "bias"
        b = self.target_update[self.names.index(bias_name)] if bias_name in self.names else None
        return self.target_update[wi].detach().cpu(), None if b is None else b.detach().cpu()

    # ----- objective ---------------------------------------------------------------------
    def _candidate_update(self, x: torch.Tensor, loss_fn, create_graph: bool,
                          functional: tuple[dict, dict] | None = None) -> list[torch.Tensor]:
        obs = self.obs
        if functional is not None:
            # inside torch.func.vmap (batched restarts): the same gradient, as a torch.func transform
            params, buffers = functional
            grads = torch.func.grad(lambda p: loss_fn(functional_call(self.model, (p, buffers), (x,))))(params)
            return [grads[n] for n in self.names]
        if obs.threat.update == "fedavg" and obs.training is not None:
            # worst case: the server knows the local hyper-parameters and unrolls the K steps
            start = dict(zip(self.names, self.params))
            cur = dict(start)
            buffers = dict(self.model.named_buffers())
            lr = obs.training["local_lr"]
            for idx in local_schedule(obs.batch_size, obs.threat):
                idx = idx.to(self.device)
                preds = functional_call(self.model, {**cur, **buffers}, (x[idx],))
                loss = loss_fn(preds, idx)
                grads = torch.autograd.grad(loss, list(cur.values()), create_graph=create_graph)
                cur = {n: w - lr * g for (n, w), g in zip(cur.items(), grads)}
            delta = [start[n] - cur[n] for n in self.names]
            # like autograd.grad without create_graph: no graph back to the parameters
            return delta if create_graph else [d.detach() for d in delta]
        loss = loss_fn(self.model(x))
        return list(torch.autograd.grad(loss, self.params, create_graph=create_graph))

    def objective(self, x: torch.Tensor, loss_fn, control: bool, candidate: torch.Tensor | None = None,
                  functional: tuple[dict, dict] | None = None):
        """Total objective and its parts at pixels ``x``; TV acts on ``candidate`` (the optimized
        tensor in ``spec.space``, default ``x``)."""
        spec = self.spec
        parts: dict[str, torch.Tensor] = {}
        if self.hooks is not None:
            self.hooks.clear()
        if control:
            if self.hooks is not None:
                self.model(x)  # statistics for the BN prior only
            match = x.new_zeros(())
        else:
            match = self.matcher(self._candidate_update(x, loss_fn, create_graph=True, functional=functional))
        total = match
        parts["matching_loss"] = match
        if spec.tv:
            tv = total_variation(x if candidate is None else candidate, spec.tv_kind)
            parts["tv"] = tv
            total = total + spec.tv * tv
        if self.hooks is not None and self.bn_reference is not None:
            bnp = bn_prior(self.hooks.values(), self.bn_reference)
            parts["bn_prior"] = bnp
            total = total + spec.bn_prior * bnp
        parts["total"] = total
        return total, parts

    def matching_loss(self, x: torch.Tensor, loss_fn=None) -> float:
        """Gradient-matching distance of images ``x`` (no priors), e.g. to report a control's."""
        loss_fn = loss_fn or self.labels
        if loss_fn is None:
            raise GistressError("matching loss needs labels", "share labels or infer them")
        with math_attention():
            return float(self.matcher(self._candidate_update(x.to(self.device), loss_fn, create_graph=False)))

    # ----- restarts -----------------------------------------------------------------------
    def why_not_batched(self) -> str | None:
        """Why restarts cannot share one vmapped pass in this setting (None when they can)."""
        if self.obs.task != "classification":
            return "the detection loss's target assignment is data-dependent and cannot be vmapped"
        if self.spec.optimizer != "adam":
            return "L-BFGS line-searches each restart on its own"
        if self.obs.threat.update == "fedavg" and self.obs.training is not None:
            return "the unrolled FedAvg steps use autograd.grad, which vmap cannot batch"
        odd = [type(m).__name__ for m in own_forward_bn_layers(self.model)]
        if odd:
            return f"train-mode {odd[0]} layers have their own forward, which vmap cannot batch correctly"
        return None

    def batches_restarts(self, n: int) -> bool:
        """True when ``n`` restarts run as one batched pass (``restart_mode`` and the setting)."""
        mode = self.spec.restart_mode
        if n < 2 or mode == "sequential":
            return False
        why = self.why_not_batched()
        if why is not None:
            if mode == "batched":
                raise GistressError(f"restart_mode=batched is not available here: {why}",
                                    "use restart_mode=auto or sequential")
            return False
        # auto: CUDA only; on the CPU a batched pass measured slower than sequential restarts
        # (docs/benchmarks.md)
        return mode == "batched" or self.device.type == "cuda"

    # ----- candidate space -------------------------------------------------------------
    def _norm_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        # built once: every objective evaluation converts (measured 2 % of a DLG LeNet attack)
        if getattr(self, "_norm", None) is None:
            mean, std = self.variant.normalization
            self._norm = (torch.tensor(mean, device=self.device).view(1, -1, 1, 1),
                          torch.tensor(std, device=self.device).view(1, -1, 1, 1))
        return self._norm

    def to_candidate(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] pixels -> the space the attack optimizes in (``spec.space``)."""
        if self.spec.space == "pixel":
            return x
        mean, std = self._norm_tensors()
        return (x - mean) / std

    def to_pixels(self, z: torch.Tensor) -> torch.Tensor:
        """A candidate (``spec.space``) -> [0, 1]-range pixels (not clamped)."""
        if self.spec.space == "pixel":
            return z
        mean, std = self._norm_tensors()
        return z * std + mean

    def box(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid image range [0, 1] expressed in the candidate's space."""
        if self.spec.space == "pixel":
            return torch.zeros((), device=self.device), torch.ones((), device=self.device)
        mean, std = self._norm_tensors()
        return -mean / std, (1 - mean) / std

    # ----- optimization -------------------------------------------------------------------
    def initial_images(self) -> list[torch.Tensor]:
        """Seeded random starts in pixels, one per restart (``init=random``); not clamped."""
        gen = torch.Generator().manual_seed(self.seed)
        shape = (self.obs.batch_size, 3, *self.obs.image_size)
        return [random_init(shape, self.variant.normalization, self.spec.init_distribution, gen)
                for _ in range(self.spec.restarts)]

    def reconstruct(self, inits: list[torch.Tensor] | None = None, *, control: bool = False,
                    callback: StepCallback | None = None, checkpoints: Path | None = None,
                    fingerprint: str = "") -> Reconstruction:
        """Run every restart from ``inits`` (pixels; default: seeded random) and keep the one
        with the lowest final matching loss. ``control=True`` switches the gradient term off.

        A restart whose objective or image turns NaN/inf stops there and is marked diverged
        (matching loss inf); the other restarts decide. Only when every restart diverged does
        the attack fail (DivergenceError). Restarts run one after another, or as one batched
        pass (``restart_mode``); either way the callback sees every restart's logged steps.
        ``checkpoints``: a folder for each loop's mid-run checkpoint (``attack-restart0.pt``, ...),
        resumed when present and written for ``fingerprint`` (``suite/attack/checkpoint.py``).
        """
        inits = inits if inits is not None else self.initial_images()
        kind = "control" if control else "attack"
        opened: list[Checkpoint] = []

        def checkpoint(name: str) -> Checkpoint | None:
            if checkpoints is None:
                return None
            opened.append(Checkpoint(Path(checkpoints) / f"{kind}-{name}.pt", f"{fingerprint}/{kind}-{name}"))
            return opened[-1]
        images, losses, histories, label_sets, failures = [], [], [], [], []
        spec = self.spec
        # attack.tv_choices: every restart once per prior weight; one pool, one selection rule
        weights = spec.tv_weights if spec.tv_choices else [None]
        runs, run_tv = [], []
        with math_attention():
            for i, weight in enumerate(weights):
                prefix = "" if weight is None else f"tv{i}-"
                self.spec = spec if weight is None else spec.model_copy(update={"tv": weight})
                try:
                    if self.batches_restarts(len(inits)):
                        runs += self._optimize_batched([x0.to(self.device) for x0 in inits], control, callback,
                                                       checkpoint(f"{prefix}batched"))
                    else:
                        runs += [self._optimize(x0.to(self.device), control, callback, restart=r,
                                                checkpoint=checkpoint(f"{prefix}restart{r}"))
                                 for r, x0 in enumerate(inits)]
                finally:
                    self.spec = spec
                run_tv += [weight] * len(inits)
            for run in runs:
                x = self.to_pixels(run.candidate.detach())
                images.append(x.cpu())
                final = math.inf
                if run.failure is None:
                    final = float(self.matcher(self._candidate_update(x, run.loss_fn, create_graph=False)))
                    if not math.isfinite(final):
                        run.failure = DivergenceError("the final matching loss is NaN/inf", step=self.spec.iterations)
                losses.append(final if run.failure is None else math.inf)
                failures.append(run.failure)
                histories.append(run.history)
                label_sets.append(_labels_of(run.loss_fn))
        if all(f is not None for f in failures):
            raise all_diverged(failures)
        chosen = min(range(len(losses)), key=lambda i: losses[i])
        labels = label_sets[chosen]
        diverged = "; ".join(f"restart {r}: {f.message}" for r, f in enumerate(failures) if f is not None)
        return Reconstruction(
            images=images[chosen].clamp(0, 1), matching_loss=losses[chosen],
            restart_images=[im.clamp(0, 1) for im in images], restart_losses=losses, chosen=chosen,
            init=inits[chosen % len(inits)].detach().cpu().clamp(0, 1),  # every weight's runs share the starts
            labels=None if labels is None else labels.detach().cpu(), history=histories[chosen],
            diverged=diverged or None, restarts_diverged=sum(f is not None for f in failures),
            resumed_from=min((c.resumed_from for c in opened if c.resumed_from is not None), default=None),
            restart_tv=run_tv if spec.tv_choices else None, chosen_tv=run_tv[chosen] if spec.tv_choices else None,
        )

    def _loss_fn_for_restart(self, restart: int):
        if self.labels is not None:
            return self.labels, []
        gen = torch.Generator().manual_seed(self.seed + 1000 + restart)
        soft = torch.randn(self.obs.batch_size, self.variant.num_classes, generator=gen).to(self.device)
        soft.requires_grad_(True)
        return ClassificationLoss(soft_logits=soft), [soft]

    def _start(self, x0: torch.Tensor) -> torch.Tensor:
        """The candidate at the start: the init in the attack's space, not boxed (as the
        references: the box applies after each step)."""
        return self.to_candidate(x0.detach()).clone().requires_grad_(True)

    def _optimize(self, x0: torch.Tensor, control: bool, callback, restart: int,
                  checkpoint: Checkpoint | None = None) -> _Run:
        z = self._start(x0)
        loss_fn, extra = self._loss_fn_for_restart(restart)
        history: list[dict] = []
        if checkpoint is not None:
            checkpoint.attach(history)

        def log(step: int, parts: dict[str, torch.Tensor]) -> None:
            values = {k: float(v.detach()) for k, v in parts.items()}
            history.append(_record(step, values, self.to_pixels(z.detach()), callback))

        outcome = descend(self.spec, [z] + extra, lambda: self.objective(self.to_pixels(z), loss_fn, control, z),
                          log, self.box(), batched=False, checkpoint=checkpoint)
        best = outcome.variables
        if extra:
            loss_fn = ClassificationLoss(soft_logits=best[1])
        return _Run(best[0], history, loss_fn, outcome.failures[0])

    def _optimize_batched(self, inits: list[torch.Tensor], control: bool, callback,
                          checkpoint: Checkpoint | None = None) -> list[_Run]:
        """All restarts at once: one vmapped objective over a stacked [R, B, ...] candidate.

        Adam and signed gradients act element-wise, so one optimizer over the stack is R
        independent optimizers; the summed objective's gradient w.r.t. restart r is restart r's own.
        """
        n = len(inits)
        z = self._start(torch.stack(inits))
        loss_fns = [self._loss_fn_for_restart(r)[0] for r in range(n)]
        soft = None
        if self.labels is None:  # joint labels: one soft-logit tensor per restart, stacked
            soft = torch.stack([f.soft_logits.detach() for f in loss_fns]).requires_grad_(True)
        functional = (dict(zip(self.names, self.params)), dict(self.model.named_buffers()))

        def one(zr, sr):
            loss_fn = self.labels if sr is None else ClassificationLoss(soft_logits=sr)
            return self.objective(self.to_pixels(zr), loss_fn, control, zr, functional=functional)

        batched = torch.func.vmap(one, in_dims=(0, None if soft is None else 0), randomness="different")

        def objective():
            totals, parts = batched(z, soft)
            # a diverged restart's NaN must not reach the others' gradients through the sum
            return torch.where(torch.isfinite(totals), totals, 0.0).sum(), parts

        flat: list[dict] = []  # every restart's records in one list (what a checkpoint saves and restores)
        if checkpoint is not None:
            checkpoint.attach(flat)

        def log(step: int, parts: dict[str, torch.Tensor]) -> None:
            values = {k: v.detach().cpu().tolist() for k, v in parts.items()}
            for r in range(n):
                record = _record(step, {k: v[r] for k, v in values.items()}, self.to_pixels(z[r].detach()), callback)
                flat.append({**record, "restart": r})

        with vmappable_batch_norm(self.model):
            outcome = descend(self.spec, [z] + ([soft] if soft is not None else []), objective, log, self.box(),
                              batched=True, checkpoint=checkpoint)
        histories = [[{k: v for k, v in rec.items() if k != "restart"} for rec in flat if rec["restart"] == r]
                     for r in range(n)]
        best = outcome.variables
        if soft is not None:
            loss_fns = [ClassificationLoss(soft_logits=best[1][r]) for r in range(n)]
        return [_Run(best[0][r], histories[r], loss_fns[r], outcome.failures[r]) for r in range(n)]


@dataclass
class _Run:
    """One restart's outcome: the kept candidate, its logged history, its loss and any failure."""

    candidate: torch.Tensor
    history: list[dict]
    loss_fn: object
    failure: DivergenceError | None


def _labels_of(loss_fn) -> torch.Tensor | None:
    """The labels an attack used or recovered: given or inferred ones, or the arg-max of the
    jointly optimized soft labels (DLG)."""
    labels = getattr(loss_fn, "labels", None)
    soft = getattr(loss_fn, "soft_logits", None)
    if labels is None and soft is not None:
        return soft.detach().argmax(-1)
    return labels


def _record(step: int, values: dict[str, float], x: torch.Tensor, callback) -> dict:
    record = dict(values)
    record["step"] = step
    if callback is not None:
        extra_metrics = callback(step, record, x.detach())
        if extra_metrics:
            record.update(extra_metrics)
    return record
