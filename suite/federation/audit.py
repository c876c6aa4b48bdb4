"""The audit beside a federation: attack sampled clients' updates in a worker, log MLflow runs.

One MLflow parent run per federation (kind ``federation``); one child run per attacked update
(round r, node n), with the same params, scores, tags and description as ``gistress attack``
(``suite.execution.runner.attack_observation``, ``SettingRun.log_result``). Where the evaluation
harness holds the client's data (``ground_truth`` returns its Batch), the reconstruction is
scored against it after the attack; otherwise the run logs only what needs no ground truth: the
reconstruction, the matching loss and, for a closed form, its residual.

The cost does not stall aggregation: ``submit`` queues the attack on one worker thread and
returns at once, so the strategy aggregates the round and the next round trains while earlier
updates are attacked; ``close`` waits for the queue (the ServerApp's ``start`` calls it after
the last round). Which updates: ``rounds`` (None: all) and ``clients_per_round`` per round.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from suite.config import AttackSpec, LeakThresholds, RunConfig
from suite.threat.client import Observation

GroundTruth = Callable[[int, int], object]  # (server round, node id) -> Batch or None


@dataclass
class Attacked:
    """One attacked update: where it came from, its MLflow run and its metrics (``psnr`` only
    when the harness held the ground truth)."""

    server_round: int
    node_id: int
    run_id: str | None
    metrics: dict = field(default_factory=dict)
    error: str | None = None


class FederationAudit:
    """Attacks the updates a federation's server received, one worker thread beside it."""

    def __init__(self, variant: str, attack: AttackSpec, *, variant_options: dict | None = None,
                 experiment: str = "gistress-flower", tracking_uri: str | None = None,
                 out_dir: str | Path | None = None, rounds: Iterable[int] | None = None,
                 clients_per_round: int = 1, ground_truth: GroundTruth | None = None,
                 leak: LeakThresholds | None = None, device: str = "cpu", mlflow: bool = True, threads: int | None = None):
        if attack.oracle_init:
            from suite.errors import GistressError

            raise GistressError("a federation audit cannot start from the client's images (init "
                                f"{attack.init})", "use init random or closed_form")
        self.variant = variant
        self.variant_options = dict(variant_options or {})
        self.attack = attack
        self.experiment = experiment
        self.tracking_uri = tracking_uri
        self.out_dir = Path(out_dir or f"gistress-out/flower-{time.strftime('%Y%m%d-%H%M%S')}")
        self.rounds = None if rounds is None else set(rounds)
        self.clients_per_round = clients_per_round
        self.ground_truth = ground_truth
        self.leak = leak or LeakThresholds()
        self.device = device
        self.mlflow = mlflow
        self.threads = threads
        self.results: list[Attacked] = []
        self.parent_run_id: str | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gistress-audit")
        self._futures: list[Future] = []
        self._lock = threading.Lock()
        self._client = None

    # ----- what to attack ------------------------------------------------------------------
    def sampled(self, server_round: int, node_ids: list[int]) -> list[int]:
        """The clients of ``server_round`` to attack: the first ``clients_per_round`` node ids in
        sorted order on sampled rounds, none on the others."""
        if self.rounds is not None and server_round not in self.rounds:
            return []
        return sorted(node_ids)[: self.clients_per_round]

    def submit(self, server_round: int, node_id: int, obs: Observation) -> Future:
        """Queue the attack on ``obs`` and return at once (the worker runs it)."""
        fut = self._pool.submit(self._attack_one, server_round, node_id, obs)
        self._futures.append(fut)
        return fut

    def close(self, timeout: float | None = None) -> list[Attacked]:
        """Wait for every queued attack, end the parent run, return the results in order."""
        for fut in list(self._futures):
            fut.result(timeout=timeout)
        self._pool.shutdown(wait=True)
        if self.parent_run_id is not None:
            failed = any(r.error for r in self.results)
            self._client.set_terminated(self.parent_run_id, "FAILED" if failed else "FINISHED")
        return sorted(self.results, key=lambda r: (r.server_round, r.node_id))

    # ----- one attack ---------------------------------------------------------------------
    def config_for(self, server_round: int, node_id: int, obs: Observation) -> RunConfig:
        """The run config that names this attack (what ``gistress attack`` logs as params)."""
        return RunConfig(variant=self.variant, variant_options=self.variant_options, data="flower",
                         images=[f"round{server_round}-node{node_id}"], size=obs.image_size[0],
                         device=self.device, threat=obs.threat, attack=self.attack, leak=self.leak)

    def _attack_one(self, server_round: int, node_id: int, obs: Observation) -> Attacked:
        if self.threads:
            torch.set_num_threads(self.threads)
        cfg = self.config_for(server_round, node_id, obs)
        truth = self.ground_truth(server_round, node_id) if self.ground_truth is not None else None
        out = self.out_dir / f"round{server_round}-node{node_id}"
        done = Attacked(server_round, node_id, None)
        try:
            out.mkdir(parents=True, exist_ok=True)
            # the update exactly as the attacker receives it (tests compare it with the client's delta)
            torch.save(dict(zip(obs.param_names, obs.update)), out / "update.pt")
            if self.mlflow:
                from suite.execution.tracking import setting_run

                with setting_run(cfg, experiment=self.experiment, tracking_uri=self.tracking_uri,
                                 run_name=f"round {server_round} node {node_id}",
                                 parent_run_id=self._parent(),
                                 extra_tags={"flower.round": server_round, "flower.node_id": node_id}) as tr:
                    done.run_id = tr.run_id
                    done.metrics = self._run(cfg, obs, truth, out, tr)
            else:
                done.metrics = self._run(cfg, obs, truth, out, None)
        except Exception as exc:  # one failed attack must not take the federation down
            from suite.execution.mlflow_names import one_line_error

            done.error = one_line_error(exc, 300)
            print(f"gistress: attack on round {server_round} node {node_id} failed: {done.error}",
                  file=sys.stderr)
        with self._lock:
            self.results.append(done)
        return done

    def _run(self, cfg: RunConfig, obs: Observation, truth, out: Path, tr) -> dict:
        from suite.execution.runner import resolve_device
        from suite.federation.blind import attack_blind

        variant = self._variant()
        device = resolve_device(self.device)
        if truth is None:
            return attack_blind(cfg, variant, obs, device=device, out_dir=out, tracking=tr)
        from suite.execution.runner import Prepared, attack_observation, check_closed_form

        prepared = Prepared(device=device, variant=variant, batch=truth, calibrated_on=None, inits=None,
                            started=time.perf_counter(), closed_form=check_closed_form(cfg, variant, truth))
        hooks = {} if tr is None else {"on_step": tr.log_step, "on_images": tr.log_images}
        result = attack_observation(cfg, obs, prepared, out_dir=out, progress=False, **hooks)
        if tr is not None:
            tr.log_result(result)
        print(f"gistress: {cfg.images[0]}: PSNR {result.metrics['psnr']:.2f} dB, "
              f"matching loss {result.metrics['matching_loss']:.3g}, "
              f"{'leaked' if result.metrics['leaked'] else 'no leak'} "
              f"(rule: {result.tags['leak_rule']})", file=sys.stderr, flush=True)
        return dict(result.metrics)

    def _variant(self):
        import variants

        return variants.build(self.variant, **self.variant_options)

    def _parent(self) -> str:
        with self._lock:
            if self.parent_run_id is None:
                from suite.execution.lifecycle import create_parent_run
                from suite.execution.tracking import client_for, experiment_id, resolve_tracking_uri

                self._client = client_for(resolve_tracking_uri(self.tracking_uri))
                exp = experiment_id(self._client, self.experiment)
                self.parent_run_id = create_parent_run(
                    self._client, exp, kind="federation", command="flwr run",
                    run_name=f"flower federation {time.strftime('%Y-%m-%d %H:%M:%S')}",
                    params={"variant": self.variant, "preset": self.attack.preset or "none",
                            "iterations": self.attack.iterations,
                            "rounds": "all" if self.rounds is None else ",".join(map(str, sorted(self.rounds))),
                            "clients_per_round": self.clients_per_round},
                    description="Gradient-inversion audit of a Flower federation: each child run attacks "
                                "the weight delta the server received from one client in one round.")
            return self.parent_run_id
