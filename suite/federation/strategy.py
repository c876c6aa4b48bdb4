"""``AuditingStrategy``: a Flower strategy that aggregates as another one does and attacks what
the server received.

It wraps any ``flwr.serverapp.strategy.Strategy`` (FedAvg by default). ``configure_train`` lets
the wrapped strategy build the round's messages and remembers, per destination node, the arrays
and config it sends; ``aggregate_train`` builds each sampled client's Observation from its reply
(sent − returned, the round's config, the reported example count), queues the attack on the
audit's worker thread and hands the replies to the wrapped strategy at once. ``start`` runs the
wrapped workflow unchanged, then waits for the queued attacks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from suite.federation.audit import FederationAudit
from suite.federation.observation import NUM_EXAMPLES, observation_from_round

# a reply's optional ArrayRecord of grants: "labels" (classification), "boxes.<i>" and
# "classes.<i>" (detection, one pair per image). Absent: nothing granted.
GRANTS_KEY = "gistress-grants"


def grants_from(record: ArrayRecord | None, batch_size: int) -> dict:
    """The label grants a client put in its reply (``labels``, or ``boxes``/``classes``)."""
    if record is None:
        return {}
    state = record.to_torch_state_dict()
    if "labels" in state:
        return {"labels": state["labels"].long()}
    if "boxes.0" in state:
        return {"boxes": [state[f"boxes.{i}"].float() for i in range(batch_size)],
                "classes": [state[f"classes.{i}"].long() for i in range(batch_size)]}
    return {}


class AuditingStrategy(Strategy):
    """Delegates everything to ``strategy``; attacks sampled clients' updates via ``audit``."""

    def __init__(self, audit: FederationAudit, strategy: Strategy | None = None, *,
                 arrays_key: str | None = None, config_key: str | None = None):
        self.inner = strategy if strategy is not None else FedAvg()
        self.audit = audit
        self.arrays_key = arrays_key or getattr(self.inner, "arrayrecord_key", "arrays")
        self.config_key = config_key or getattr(self.inner, "configrecord_key", "config")
        self.sent: dict[int, dict[int, tuple[dict[str, torch.Tensor], dict]]] = {}
        self._variant = None

    def __getattr__(self, name):
        # the wrapped strategy's own settings (fraction_train, ...) read through the wrapper
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def summary(self) -> None:
        """The wrapped strategy's summary, then what is audited."""
        from flwr.common import log

        self.inner.summary()
        a = self.audit
        rounds = "every round" if a.rounds is None else f"rounds {sorted(a.rounds)}"
        log(20, "\t└── gistress audit: %s, %d client(s) per round, attack %s (%d iterations), variant %s",
            rounds, a.clients_per_round, a.attack.preset or a.attack.method, a.attack.iterations, a.variant)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The wrapped strategy's messages; what each node is sent is remembered for the audit."""
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        sent = {}
        for msg in messages:
            content = msg.content
            sent_arrays = content[self.arrays_key] if self.arrays_key in content.array_records else arrays
            sent_config = content[self.config_key] if self.config_key in content.config_records else config
            sent[msg.metadata.dst_node_id] = (sent_arrays.to_torch_state_dict(), dict(sent_config))
        self.sent[server_round] = sent
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Queue the attacks on the sampled clients' updates, then aggregate as the wrapped
        strategy does (the attacks run on the audit's worker, not here), the replies stripped of
        the grants record so the wrapped strategy sees what a plain client sends."""
        replies = list(replies)
        sent = self.sent.pop(server_round, {})
        ok = {r.metadata.src_node_id: r for r in replies if r.has_content() and r.metadata.src_node_id in sent}
        for node_id in self.audit.sampled(server_round, list(ok)):
            self.audit.submit(server_round, node_id, self.observation(server_round, node_id, ok[node_id],
                                                                      *sent[node_id]))
        for reply in replies:  # the grants are for the audit: strategies expect one ArrayRecord per reply
            if reply.has_content() and GRANTS_KEY in reply.content:
                del reply.content[GRANTS_KEY]
        return self.inner.aggregate_train(server_round, replies)

    def observation(self, server_round: int, node_id: int, reply: Message, sent: dict, config: dict):
        """The Observation of one reply: what the server sent, what came back, the config."""
        content = reply.content
        returned = content[self.arrays_key].to_torch_state_dict()
        metrics = content.metric_records.get("metrics")
        num_examples = int(metrics[NUM_EXAMPLES]) if metrics is not None and NUM_EXAMPLES in metrics else 1
        grants = grants_from(content.array_records.get(GRANTS_KEY), num_examples)
        return observation_from_round(self.variant(), sent, returned, config, num_examples, **grants)

    def variant(self):
        """The architecture the server sends (built once; the audit loads the sent weights)."""
        if self._variant is None:
            import variants

            self._variant = variants.build(self.audit.variant, **self.audit.variant_options)
        return self._variant

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """As the wrapped strategy."""
        return self.inner.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """As the wrapped strategy."""
        return self.inner.aggregate_evaluate(server_round, replies)

    def start(self, *args, **kwargs):
        """The wrapped strategy's workflow (``Strategy.start``), then wait for the attacks; the
        audit's results are in ``self.audit.results``."""
        try:
            return super().start(*args, **kwargs)
        finally:
            self.audit.close()
