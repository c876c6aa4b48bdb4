"""Optimization-based gradient inversion: the attacker sees an Observation, never the target.

One engine for every task: the task loss (classification cross-entropy or the YOLOv8 detection
loss) is the only difference. Restarts are chosen by final matching loss; scoring against the
target happens outside, after reconstruction.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from suite.client import Observation, local_schedule, trainable
from suite.config import AttackSpec
from suite.errors import DivergenceError, GistressError
from suite.objectives import BNStatHooks, UpdateMatcher, bn_prior, total_variation
from suite.results import Reconstruction
from suite.tasks import ClassificationLoss, DetectionLoss, freeze_running_stats, set_mode

StepCallback = Callable[[int, dict[str, float], torch.Tensor], dict[str, float] | None]


def math_attention():
    """Double backward through fused SDPA is not implemented on CPU: use the math kernel."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except Exception:  # pragma: no cover - very old torch
        return contextlib.nullcontext()


def random_init(shape, normalization, distribution: str, generator: torch.Generator) -> torch.Tensor:
    """A random start in pixel space: ``randn`` draws N(0, 1) in the network's normalized space
    (DLG's start), ``uniform`` draws U(0, 1) pixels."""
    if distribution == "uniform":
        return torch.rand(shape, generator=generator)
    mean = torch.tensor(normalization[0]).view(1, -1, 1, 1)
    std = torch.tensor(normalization[1]).view(1, -1, 1, 1)
    return torch.randn(shape, generator=generator) * std + mean


class Attacker:
    """Reconstructs the client's images from an Observation under an AttackSpec."""

    def __init__(self, variant, obs: Observation, spec: AttackSpec, device: str | torch.device = "cpu",
                 seed: int = 0):
        self.variant = variant
        self.obs = obs
        self.spec = spec
        self.device = torch.device(device)
        self.seed = seed
        self.model_for_momentum = variant.model  # BN momentum as sent (our copy is frozen to 0)
        self.model = self._server_model()
        self.names, self.params = trainable(self.model)
        if self.names != obs.param_names:
            raise GistressError("the observed update does not match the model's parameters",
                                "attack the same architecture the client trained")
        self.target_update = [u.to(self.device) for u in obs.update]
        self.matcher = UpdateMatcher(self.target_update, self.names, spec.objective, spec.layer_weights)
        self.bn_reference = self._bn_reference()
        self.hooks = BNStatHooks(self.model) if (spec.bn_prior or 0) > 0 else None
        self.inferred_labels: torch.Tensor | None = None
        self.labels = self._labels()

    # ----- set-up -------------------------------------------------------------------------
    def _server_model(self) -> nn.Module:
        model = copy.deepcopy(self.variant.model)
        model.load_state_dict(self.obs.model_state)
        model.to(self.device)
        set_mode(model, self.obs.task, self.obs.threat.bn_mode)
        freeze_running_stats(model)  # the attacker's forwards must not drift the statistics
        return model

    def _bn_layers(self) -> list[nn.Module]:
        return [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

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
            from suite.bnstats import bn_momentum, count_per_channel, recover_batch_stats

            before = [(n, obs.model_state[n + ".running_mean"], obs.model_state[n + ".running_var"])
                      for n, m in self.model.named_modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm)]
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
        from suite.labels import estimate_mean_probs, infer_labels

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
        estimate ``suite.labels`` already applies to weight rows. Weight rows (no bias) are
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

    # ----- objective ----------------------------------------------------------------------
    def _candidate_update(self, x: torch.Tensor, loss_fn, create_graph: bool) -> list[torch.Tensor]:
        obs = self.obs
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

    def _objective(self, x: torch.Tensor, loss_fn, control: bool):
        spec = self.spec
        parts: dict[str, torch.Tensor] = {}
        if self.hooks is not None:
            self.hooks.clear()
        if control:
            if self.hooks is not None:
                self.model(x)  # statistics for the BN prior only
            match = torch.zeros((), device=x.device)
        else:
            match = self.matcher(self._candidate_update(x, loss_fn, create_graph=True))
        total = match
        parts["matching_loss"] = match
        if spec.tv:
            tv = total_variation(x)
            parts["tv"] = tv
            total = total + spec.tv * tv
        if self.hooks is not None and self.bn_reference is not None:
            bnp = bn_prior(self.hooks.stats, self.bn_reference)
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

    # ----- optimization -------------------------------------------------------------------
    def initial_images(self) -> list[torch.Tensor]:
        """Seeded random starts, one per restart (``init=random``)."""
        gen = torch.Generator().manual_seed(self.seed)
        shape = (self.obs.batch_size, 3, *self.obs.image_size)
        return [random_init(shape, self.variant.normalization, self.spec.init_distribution, gen)
                for _ in range(self.spec.restarts)]

    def reconstruct(self, inits: list[torch.Tensor] | None = None, *, control: bool = False,
                    callback: StepCallback | None = None) -> Reconstruction:
        """Run every restart from ``inits`` (default: seeded random) and keep the one with the
        lowest final matching loss. ``control=True`` switches the gradient term off."""
        inits = inits if inits is not None else self.initial_images()
        images, losses, histories, label_sets = [], [], [], []
        with math_attention():
            for r, x0 in enumerate(inits):
                x, hist, loss_fn = self._optimize(x0.to(self.device), control, callback, restart=r)
                images.append(x.detach().cpu())
                final = float(self.matcher(self._candidate_update(x.detach(), loss_fn, create_graph=False)))
                losses.append(final)
                histories.append(hist)
                label_sets.append(getattr(loss_fn, "labels", None))
        finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
        chosen = min(finite, key=lambda i: losses[i]) if finite else 0
        out = images[chosen].clamp(0, 1)
        labels = label_sets[chosen]
        return Reconstruction(
            images=out, matching_loss=losses[chosen], restart_images=[im.clamp(0, 1) for im in images],
            restart_losses=losses, chosen=chosen, init=inits[chosen].detach().cpu().clamp(0, 1),
            labels=None if labels is None else labels.detach().cpu(), history=histories[chosen],
        )

    def _loss_fn_for_restart(self, restart: int):
        if self.labels is not None:
            return self.labels, []
        gen = torch.Generator().manual_seed(self.seed + 1000 + restart)
        soft = torch.randn(self.obs.batch_size, self.variant.num_classes, generator=gen).to(self.device)
        soft.requires_grad_(True)
        return ClassificationLoss(soft_logits=soft), [soft]

    def _optimize(self, x0: torch.Tensor, control: bool, callback, restart: int):
        spec = self.spec
        x = x0.detach().clone()
        if spec.clamp:
            x = x.clamp(0, 1)
        x.requires_grad_(True)
        loss_fn, extra = self._loss_fn_for_restart(restart)
        variables = [x] + extra
        history: list[dict] = []
        iters = spec.iterations
        if spec.optimizer == "lbfgs":
            opt = torch.optim.LBFGS(variables, lr=spec.lr)
            sched = None
        else:
            opt = torch.optim.Adam(variables, lr=spec.lr)
            milestones = [int(iters * f) for f in (3 / 8, 5 / 8, 7 / 8)] if spec.decay else []
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        last_parts = {}

        def closure():
            opt.zero_grad(set_to_none=True)
            total, parts = self._objective(x, loss_fn, control)
            if total.requires_grad:
                total.backward()
            if spec.signed and x.grad is not None:
                x.grad.sign_()
            last_parts.update(parts)
            return total

        for step in range(iters):
            if spec.optimizer == "lbfgs":
                opt.step(closure)
            else:
                closure()
                opt.step()
                sched.step()
            if spec.clamp:
                with torch.no_grad():
                    x.clamp_(0, 1)
            _check_finite(step, last_parts, x)  # every step: the reported step is where it happened
            if step % spec.log_every == 0 or step == iters - 1:
                record = {k: float(v.detach()) for k, v in last_parts.items()}
                record["step"] = step
                if callback is not None:
                    extra_metrics = callback(step, record, x.detach())
                    if extra_metrics:
                        record.update(extra_metrics)
                history.append(record)
        return x, history, loss_fn


def _check_finite(step: int, parts: dict[str, torch.Tensor], x: torch.Tensor) -> None:
    """Raise DivergenceError naming what went NaN/inf (loss terms, image) at ``step``.

    One device sync per step: the common case checks a single stacked tensor.
    """
    values = [v.detach().float().reshape(()) for v in parts.values()]
    losses_ok = not values or bool(torch.isfinite(torch.stack(values)).all())
    if losses_ok and bool(torch.isfinite(x).all()):
        return
    bad = [f"{k}={float(v):g}" for k, v in zip(parts, values) if not math.isfinite(float(v))]
    pixels = int((~torch.isfinite(x.detach())).sum())
    if pixels:
        bad.append(f"{pixels} image value(s) NaN/inf")
    raise DivergenceError(f"the attack diverged at step {step}: {', '.join(bad)}", step=step)
