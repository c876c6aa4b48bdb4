"""The ClientApp: plain local SGD on the client's own images; it knows nothing of gistress's attack.

It returns the trained model and its example count as any FedAvg client does. When the
evaluation harness is on (``GISTRESS_FLOWER_HARNESS``), it also keeps its batch and the delta it
sent on local disk for scoring; that never goes through Flower.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from gistress_flower.task import build_model, load_partition
from suite.federation.harness import record_round
from suite.model.tasks import set_mode
from suite.threat.client import task_loss_for, trainable

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global model, take the configured SGD steps on this client's batch, reply."""
    config = msg.content["config"]
    variant = build_model(context.run_config)
    model = variant.model
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    batch = load_partition(variant, int(context.node_config["partition-id"]), int(config["batch-size"]),
                           int(config["image-size"]))
    set_mode(model, variant.task, "train")
    names, params = trainable(model)
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.SGD(params, lr=float(config["lr"]))
    loss_fn = task_loss_for(model, variant.task, batch)
    for _ in range(int(config["local-steps"])):
        optimizer.zero_grad()
        loss = loss_fn(model(batch.images))
        loss.backward()
        optimizer.step()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    delta = {n: b - state[n] for n, b in zip(names, before)}
    record_round(int(config["server-round"]), context.node_id, batch, delta)
    content = RecordDict({"arrays": ArrayRecord(state),
                          "metrics": MetricRecord({"num-examples": len(batch), "train-loss": float(loss)})})
    if variant.task == "detection":  # the detection attack needs the boxes: a grant, stated here
        grants = {f"boxes.{i}": b for i, b in enumerate(batch.boxes)}
        grants.update({f"classes.{i}": c for i, c in enumerate(batch.classes)})
        content["gistress-grants"] = ArrayRecord(grants)
    return Message(content=content, reply_to=msg)
