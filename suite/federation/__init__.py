"""Audit a real Flower federation: attack the updates the server received (``pip install
'gistress[flower]'``). ``AuditingStrategy`` needs flwr; the rest does not."""

from suite.federation.audit import FederationAudit


def __getattr__(name):
    if name == "AuditingStrategy":  # imports flwr only when asked for
        from suite.federation.strategy import AuditingStrategy

        return AuditingStrategy
    raise AttributeError(name)


__all__ = ["AuditingStrategy", "FederationAudit"]
