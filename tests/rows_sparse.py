"""Shared method table rows for sparse and selective methods (hft, lift, spiel, lt_sft, dsee, greentrainer): (id, method name, options, predicate on
the parameter names that must change after training)."""
ROWS: list = []
