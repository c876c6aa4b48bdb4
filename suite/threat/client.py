"""The victim client: one honest training round, and the Observation that leaves the device.

The Observation is the only thing the attacker receives. It never contains the images.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from suite.data.batch import Batch
from suite.errors import GistressError
from suite.model.tasks import ClassificationLoss, DetectionLoss, set_mode
from suite.threat.threat_model import ThreatModel


@dataclass
class Observation:
    """What the server sees after the client's round.

    ``update``: per-parameter tensors, FedSGD gradient or FedAvg delta (θ_before − θ_after), after
    the client's defense. ``model_state``: the state the server sent (parameters and buffers).
    Every other field is a grant of the threat model and is None when not granted.
    """

    task: str
    update: list[torch.Tensor]
    param_names: list[str]
    model_state: dict[str, torch.Tensor]
    batch_size: int
    image_size: tuple[int, int]
    threat: ThreatModel
    labels: torch.Tensor | None = None
    boxes: list[torch.Tensor] | None = None
    classes: list[torch.Tensor] | None = None
    running_after: dict[str, torch.Tensor] | None = None   # BN buffers after the round (bn_stats=running)
    bn_stats: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # exact batch stats (bn_stats=exact)
    training: dict | None = None                             # local-training hyper-parameters, if known
    grants: dict[str, str] = field(default_factory=dict)     # every granted field, for logging


def local_schedule(batch_size: int, threat: ThreatModel) -> list[torch.Tensor]:
    """Index sets of the client's local SGD steps.

    Each epoch runs ``local_steps`` steps; step i uses mini-batch i mod n of the data cut into
    chunks of ``local_batch_size`` (default: the whole batch). FedSGD is one step on everything.
    """
    if threat.update == "gradient":
        return [torch.arange(batch_size)]
    bs = threat.local_batch_size or batch_size
    chunks = list(torch.arange(batch_size).split(bs))
    return [chunks[i % len(chunks)] for _ in range(threat.local_epochs) for i in range(threat.local_steps)]


def freeze(model: nn.Module, patterns: list[str]) -> list[str]:
    """Keep the parameters matching any fnmatch ``pattern`` frozen (``requires_grad=False``): the
    client does not train them and they are not in its update. Returns the frozen names; a
    pattern that matches no parameter is an error naming a few real names."""
    from fnmatch import fnmatchcase

    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatchcase(n, pattern) for n in names):
            raise GistressError(f"threat.frozen pattern '{pattern}' matches no parameter of the model",
                                f"parameter names look like {', '.join(names[:3])}, ... (fnmatch patterns, "
                                "e.g. '*pos_embed')")
    frozen = []
    for n, p in model.named_parameters():
        if any(fnmatchcase(n, pat) for pat in patterns):
            p.requires_grad_(False)
            frozen.append(n)
    return frozen


def trainable(model: nn.Module) -> tuple[list[str], list[nn.Parameter]]:
    """Names and tensors of the parameters that receive gradients."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def task_loss_for(model: nn.Module, task: str, batch: Batch):
    """The client's task loss on its own batch."""
    if task == "detection":
        return DetectionLoss(model, batch.yolo_targets())
    if batch.labels is None:
        raise GistressError("classification batch has no labels", "load the data with labels")
    return ClassificationLoss(labels=batch.labels)


class Client:
    """Simulates the victim: trains on its batch as the threat model says and shares the update."""

    def __init__(self, model: nn.Module, task: str, threat: ThreatModel, num_classes: int | None = None,
                 seed: int = 0):
        self.model = model
        self.task = task
        self.threat = threat
        self.num_classes = num_classes
        self.seed = seed

    def share(self, batch: Batch) -> Observation:
        """Run the client's round on ``batch`` and return the Observation (the server's view)."""
        threat = self.threat
        self.validate(batch)
        server_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        model = copy.deepcopy(self.model)  # the device's copy; the server's stays as sent
        set_mode(model, self.task, threat.bn_mode)
        names, params = trainable(model)
        exact_stats = None
        if threat.bn_stats == "exact":
            from suite.model.bnstats import batch_stats

            exact_stats = [(m, v) for _, m, v in batch_stats(model, batch.images)]
            set_mode(model, self.task, threat.bn_mode)
        loss_fn = task_loss_for(model, self.task, batch)

        if threat.update == "gradient":
            loss = loss_fn(model(batch.images))
            update = [g.detach() for g in torch.autograd.grad(loss, params)]
        else:
            before = [p.detach().clone() for p in params]
            for idx in local_schedule(len(batch), threat):
                loss = loss_fn(model(batch.images[idx]), idx)
                grads = torch.autograd.grad(loss, params)
                with torch.no_grad():
                    for p, g in zip(params, grads):
                        p.sub_(threat.local_lr * g)
            update = [(b - p.detach()) for b, p in zip(before, params)]

        if threat.defense != "none":
            from suite.threat.defenses import apply_defense

            gen = torch.Generator(device="cpu").manual_seed(self.seed + 7919)
            update = [u.to(update[0].device) for u in apply_defense([u.cpu() for u in update],
                                                                     threat.defense, generator=gen)]

        obs = Observation(
            task=self.task, update=update, param_names=names, model_state=server_state,
            batch_size=len(batch), image_size=batch.size, threat=threat,
        )
        obs.grants["update"] = threat.update
        if threat.shares_labels:
            if self.task == "detection":
                obs.boxes = [b.clone() for b in batch.boxes]
                obs.classes = [c.clone() for c in batch.classes]
                obs.grants["labels"] = "boxes+classes"
            else:
                obs.labels = batch.labels.clone()
                obs.grants["labels"] = "classes"
        if threat.bn_stats == "running":
            if threat.bn_momentum is not None:
                from suite.model.bnstats import bn_momentum

                if abs(bn_momentum(model) - threat.bn_momentum) > 1e-12:
                    raise GistressError(
                        f"threat.bn_momentum={threat.bn_momentum} but the model's BN layers use "
                        f"{bn_momentum(model)}", "leave bn_momentum unset to use the model's own")
            obs.running_after = {k: v.detach().clone() for k, v in model.state_dict().items()
                                 if k.endswith(("running_mean", "running_var"))}
            obs.grants["bn_stats"] = "running"
        elif threat.bn_stats == "exact":
            obs.bn_stats = exact_stats
            obs.grants["bn_stats"] = "exact"
        if threat.update == "fedavg" and threat.attacker_knows_training:
            obs.training = dict(local_steps=threat.local_steps, local_lr=threat.local_lr,
                                local_batch_size=threat.local_batch_size, local_epochs=threat.local_epochs)
            obs.grants["training"] = "known"
        return obs

    def validate(self, batch: Batch) -> None:
        """Check ``batch`` against the client's task and threat model before any work is done:
        labels in range, detection boxes and classes valid, boxes shared for detection. Raises a
        GistressError naming the problem (``share`` calls it first)."""
        if self.task == "classification" and self.num_classes is not None and batch.labels is not None:
            bad = batch.labels[(batch.labels < 0) | (batch.labels >= self.num_classes)]
            if len(bad):
                raise GistressError(
                    f"label {int(bad[0])} out of range for a model with {self.num_classes} classes",
                    "pass labels in 0..num_classes-1 or build the variant with more classes",
                )
        if self.task == "detection" and self.num_classes is not None:
            from suite.model.detection import validate_targets

            validate_targets(batch, self.num_classes)
        if self.task == "detection" and not self.threat.shares_labels:
            raise GistressError("the detection attack needs the boxes and classes shared",
                                "set threat.shares_labels=true (the assumption is recorded)")
