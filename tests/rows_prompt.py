"""Shared method table rows for prompt-family methods (prompt_tuning, prefix_tuning, dept, ept, cpt):
(id, method name, options, predicate on the parameter names that must change after training)."""
# A 12-token ICL context for CPT: two demonstrations (codes 4j+1..4j+4), the label tokens (4, 8) never move.
CPT_CONTEXT = {"token_ids": [11, 12, 13, 14, 15, 16, 21, 22, 23, 24, 25, 26],
               "type_mask": [1, 2, 2, 3, 4, 4, 5, 6, 6, 7, 8, 8]}
SMALL_DEPT = {"num_virtual_tokens": 4, "r": 4, "max_positions": 32}

ROWS: list = [
    ("prompt_tuning", "prompt_tuning", {"num_virtual_tokens": 4}, lambda n: n.startswith("prompt.")),
    ("prompt_tuning-random", "prompt_tuning", {"num_virtual_tokens": 3, "init": "random"},
     lambda n: n.startswith("prompt.")),
    ("prefix_tuning", "prefix_tuning", {"num_virtual_tokens": 4}, lambda n: n.startswith("prefix.")),
    ("prefix_tuning-mlp", "prefix_tuning", {"num_virtual_tokens": 3, "projection_hidden": 16},
     lambda n: n.startswith("prefix.")),
    ("dept", "dept", SMALL_DEPT, lambda n: n.startswith("prompt.")),
    ("ept", "ept", {**SMALL_DEPT, "num_spaces": 3, "space_rank": 2, "fusion_rank": 4, "gate_hidden": 8},
     lambda n: n.startswith("prompt.")),
    ("cpt-decay", "cpt", {**CPT_CONTEXT, "loss_weighting": "decay", "decay": 0.95, "epsilon_input": 0.2},
     lambda n: n == "cpt.delta"),
]
