"""Example Flower app audited by gistress: a ClientApp that trains, a ServerApp that aggregates
with FedAvg wrapped in gistress's AuditingStrategy."""
