"""Threat model and client: what the victim does (ThreatModel), one honest round (Client), defenses.

The Observation the client sends is the attacker's only input. Imports: suite.model, suite.data, shared modules."""
