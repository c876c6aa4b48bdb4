"""The ServerApp: FedAvg, wrapped in gistress's AuditingStrategy (the three lines marked below)."""

from __future__ import annotations

import os

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from gistress_flower.task import build_model
from suite.config import AttackSpec
from suite.federation import AuditingStrategy, FederationAudit  # (1) import
from suite.federation.harness import ground_truth

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Two clients a round, FedAvg, no federated evaluation; the audit attacks sampled updates."""
    rc = context.run_config
    variant = build_model(rc)
    strategy = FedAvg(fraction_evaluate=0.0)
    audit = FederationAudit(  # (2) the audit: which rounds and clients, which attack, where to log
        variant.name, AttackSpec(preset=str(rc["attack-preset"]), iterations=int(rc["attack-iterations"])),
        rounds=[int(r) for r in str(rc["audit-rounds"]).split(",") if r], clients_per_round=int(rc["audit-clients"]),
        experiment=str(rc["experiment"]), out_dir=os.environ.get("GISTRESS_FLOWER_OUT"),
        ground_truth=ground_truth)  # the example's evaluation harness: used to score, after the attack
    strategy = AuditingStrategy(audit, strategy)  # (3) wrap: aggregation is still FedAvg's
    train_config = ConfigRecord({k: rc[k] for k in ("lr", "local-steps", "batch-size", "image-size")})
    strategy.start(grid=grid, initial_arrays=ArrayRecord(variant.model.state_dict()),
                   num_rounds=int(rc["num-server-rounds"]), train_config=train_config)
