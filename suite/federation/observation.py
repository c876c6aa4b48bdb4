"""The server's view of one client's round, built from what a Flower server holds: no flwr here.

The server knows the parameters it sent, the parameters the client returned, the config it sent
with them (local steps or epochs, learning rate, batch size) and the example count the client
reported (FedAvg weights by it). That is all the Observation carries; labels are in it only when
the client granted them. Nothing here sees the client's images.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from suite.errors import GistressError
from suite.threat.client import Observation, trainable
from suite.threat.threat_model import ThreatModel

# the round-config keys the server sends and reads back here (the example app uses these names)
LOCAL_STEPS = "local-steps"
LOCAL_EPOCHS = "local-epochs"
LOCAL_LR = "lr"
BATCH_SIZE = "batch-size"
IMAGE_SIZE = "image-size"
NUM_EXAMPLES = "num-examples"


def weight_delta(sent: Mapping[str, torch.Tensor], returned: Mapping[str, torch.Tensor],
                 names: list[str]) -> list[torch.Tensor]:
    """FedAvg's update as the suite defines it, θ_sent − θ_returned, per trainable parameter in
    ``names`` order. A parameter the client did not return, or returned in another shape, is an
    error (the server must attack the architecture it sent)."""
    out = []
    for n in names:
        if n not in sent or n not in returned:
            where = "sent" if n not in sent else "returned"
            raise GistressError(f"parameter '{n}' is not in the arrays {where}",
                                "wrap the strategy of a federation that sends the variant's state dict")
        a, b = sent[n], returned[n]
        if a.shape != b.shape:
            raise GistressError(f"parameter '{n}' came back as {tuple(b.shape)}, sent as {tuple(a.shape)}",
                                "the client must return the model it was sent, trained")
        out.append(a.detach().cpu() - b.detach().cpu())
    return out


def server_threat(config: Mapping, *, labels_granted: bool = False, bn_mode: str = "train") -> ThreatModel:
    """The threat model the server can state: FedAvg with the local training it configured itself
    (``local-steps``, ``local-epochs``, ``lr``, ``batch-size`` of the round's config), labels only
    when granted. A config without a learning rate leaves the training unknown to the attacker."""
    lr = config.get(LOCAL_LR)
    fields: dict = dict(update="fedavg", bn_mode=bn_mode, shares_labels=labels_granted,
                        attacker_knows_training=lr is not None)
    if lr is not None:
        fields["local_lr"] = float(lr)
    if config.get(LOCAL_STEPS) is not None:
        fields["local_steps"] = int(config[LOCAL_STEPS])
    if config.get(LOCAL_EPOCHS) is not None:
        fields["local_epochs"] = int(config[LOCAL_EPOCHS])
    if config.get(BATCH_SIZE) is not None:
        fields["local_batch_size"] = int(config[BATCH_SIZE])
    return ThreatModel(**fields)


def observation_from_round(variant, sent: Mapping[str, torch.Tensor], returned: Mapping[str, torch.Tensor],
                           config: Mapping, num_examples: int, *, labels: torch.Tensor | None = None,
                           boxes: list[torch.Tensor] | None = None, classes: list[torch.Tensor] | None = None,
                           bn_mode: str = "train") -> Observation:
    """The Observation of one client's round as the server received it.

    ``variant``: the architecture the server sent (its trainable-parameter order is the update's);
    ``sent``: the state the server sent (parameters and any buffers); ``returned``: what the client
    sent back; ``config``: the round's config; ``num_examples``: the count the client reported;
    ``labels`` (classification) or ``boxes`` and ``classes`` (detection): only when the client
    granted them."""
    granted = labels is not None or (boxes is not None and classes is not None)
    threat = server_threat(config, labels_granted=granted, bn_mode=bn_mode)
    names = trainable(variant.model)[0]
    update = weight_delta(sent, returned, names)
    size = int(config.get(IMAGE_SIZE) or variant.input_size)
    state = {k: v.detach().cpu().clone() for k, v in sent.items()}
    missing = [k for k in variant.model.state_dict() if k not in state]
    if missing:
        raise GistressError(f"the arrays sent lack {missing[0]} (and {len(missing) - 1} more)",
                            "send the model's whole state dict (ArrayRecord(model.state_dict()))")
    obs = Observation(task=variant.task, update=update, param_names=names, model_state=state,
                      batch_size=int(num_examples), image_size=(size, size), threat=threat)
    obs.grants["update"] = "fedavg (the weight delta the Flower server received)"
    if labels is not None:
        obs.labels = labels.clone()
        obs.grants["labels"] = "classes"
    elif granted:
        obs.boxes = [b.clone() for b in boxes]
        obs.classes = [c.clone() for c in classes]
        obs.grants["labels"] = "boxes+classes"
    if threat.attacker_knows_training:
        obs.training = dict(local_steps=threat.local_steps, local_lr=threat.local_lr,
                            local_batch_size=threat.local_batch_size, local_epochs=threat.local_epochs)
        obs.grants["training"] = "known: the round's config the server sent"
    return obs
