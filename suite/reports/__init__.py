"""Files a person reads: PNG grids of runs, the study summary table and figure.

Imports: shared modules only."""
