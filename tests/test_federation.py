"""The Flower audit: the server's Observation is the client's update, bit for bit, on Flower's own
deployment runtime (SuperLink + SuperNodes on 127.0.0.1, `flwr run`), and nothing is left running."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

import variants
from suite import data
from suite.federation.harness import ENV, load_record
from suite.federation.observation import observation_from_round, server_threat
from suite.threat.client import Client
from suite.threat.threat_model import ThreatModel

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "examples" / "flower"


def test_the_servers_observation_is_the_simulated_clients_update():
    """The same round seen by the suite's simulated client and rebuilt from sent/returned arrays."""
    variant = variants.build("lenet", seed=0)
    batch = data.load("samples", task="classification", size=32, images=["astronaut"], num_classes=10)
    threat = ThreatModel(update="fedavg", local_lr=0.1, local_steps=1, shares_labels=False)
    obs = Client(variant.model, "classification", threat).share(batch)
    sent = {k: v.clone() for k, v in variant.model.state_dict().items()}
    returned = dict(sent)
    for name, u in zip(obs.param_names, obs.update):
        returned[name] = sent[name] - u  # the client's trained weights, as it would return them
    config = {"lr": 0.1, "local-steps": 1, "batch-size": 1, "image-size": 32, "server-round": 1}
    server = observation_from_round(variant, sent, returned, config, num_examples=1)
    assert server.param_names == obs.param_names
    assert server.batch_size == 1 and server.image_size == (32, 32) and server.labels is None
    assert server.training == dict(local_steps=1, local_lr=0.1, local_batch_size=1, local_epochs=1)
    for a, b in zip(server.update, obs.update):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_server_knows_only_the_config_it_sent():
    threat = server_threat({"lr": 0.05, "local-epochs": 2})
    assert threat.update == "fedavg" and threat.local_lr == 0.05 and threat.local_epochs == 2
    assert threat.attacker_knows_training and not threat.shares_labels
    assert not server_threat({}).attacker_knows_training  # no learning rate sent: training unknown


# the example federations: LeNet, and YOLOv8n at 64 px through the same path (boxes granted)
EXAMPLES = {"lenet": [], "yolov8n": ["model='yolov8n'", "image-size=64", "lr=0.01", "attack-preset='ig'"]}


@pytest.mark.timeout(360)
def test_the_attacker_receives_the_clientapps_delta_bit_for_bit(tmp_path):
    """Both example federations, one after the other on one deployment (its start-up is paid once)."""
    pytest.importorskip("flwr")
    from suite.federation.local import LocalDeployment

    assert "ray" not in sys.modules
    t0 = time.perf_counter()
    out, harness = tmp_path / "out", tmp_path / "harness"
    env = {ENV: str(harness), "GISTRESS_FLOWER_OUT": str(out),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(REPO)}
    with LocalDeployment(2, env=env) as deployment:
        procs = list(deployment.procs)
        for model in sorted(EXAMPLES):
            code = deployment.run(APP, ["num-server-rounds=1", "attack-iterations=1", *EXAMPLES[model]], timeout=180)
            assert code == 0, deployment.log_tail()
            check_round_one(out, harness, model)
            # both runs write round1-node<id>: move this run's files aside before the next one
            out.rename(tmp_path / f"out-{model}")
            harness.rename(tmp_path / f"harness-{model}")
        pids = [p.pid for p in procs] + [d for p in procs for d in deployment_descendants(p.pid)]
    # every process the deployment started (and Flower's detached children) is gone
    assert not [p for p in pids if alive(p)]
    print(f"deployment test: {time.perf_counter() - t0:.0f} s")


def check_round_one(out: Path, harness: Path, model: str) -> None:
    """The server attacked both clients of round 1 on exactly the delta each ClientApp sent."""
    attacked = sorted(out.glob("round1-node*/update.pt"))
    assert len(attacked) == 2, list(out.rglob("*"))  # the example audits both clients of round 1
    for path in attacked:
        node = int(path.parent.name.split("node")[1])
        received = torch.load(path)
        sent = load_record(1, node, harness)["delta"]
        assert list(received) == list(sent)  # the model's trainable-parameter order
        for name in sent:
            assert received[name].dtype == sent[name].dtype
            assert torch.equal(received[name], sent[name]), name  # bit for bit
        assert (path.parent / "metrics.json").exists()
        config = json.loads((path.parent / "config.json").read_text())
        assert config["variant"] == model and config["threat"]["update"] == "fedavg"
        # the detection attack needs the boxes: granted by the client, so shared in the threat model
        assert config["threat"]["shares_labels"] is (model == "yolov8n")


def deployment_descendants(pid: int) -> list[int]:
    """Descendants of ``pid`` (Flower's SuperExec, ServerApp and ClientApp processes)."""
    from suite.federation.local import descendants

    return descendants(pid)


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (zombies count as gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text.rsplit(")", 1)[1].split()[0] != "Z"
