"""Shared method table rows for prompt-family methods (prompt_tuning, prefix_tuning, dept, ept, cpt): (id, method name, options, predicate on
the parameter names that must change after training)."""
ROWS: list = []
