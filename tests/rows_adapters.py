"""Shared method table rows for adapters and layer recipes: (id, method name, options, predicate on
the parameter names that must change after training)."""
ROWS: list = []
