"""The attack engine: the Attacker, gradient-matching objectives and priors, label inference, start images.

Sees only an Observation. Imports: suite.threat (Observation), suite.model, shared modules."""
