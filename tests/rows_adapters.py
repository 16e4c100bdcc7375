"""Shared method table rows for adapters and layer recipes: (id, method name, options, predicate on
the parameter names that must change after training).

The tiny model ties lm_head to embed_tokens, so the one matrix is `model.embed_tokens.weight`;
the layer recipes treat it as the head (it trains whenever the head does)."""


def _layer(n: str) -> int | None:
    return int(n.split(".")[2]) if n.startswith("model.layers.") else None


ROWS: list = [
    ("adapter-houlsby", "adapter", {"bottleneck": 8}, lambda n: ".adapter_" in n),
    ("adapter-pfeiffer-gelu", "adapter", {"bottleneck": 4, "placement": "pfeiffer", "activation": "gelu"},
     lambda n: ".adapter_ffn." in n),
    ("parallel-adapter", "parallel_adapter", {"bottleneck": 8}, lambda n: ".adapter_ffn." in n),
    ("parallel-adapter-attn-ffn", "parallel_adapter", {"bottleneck": 4, "placement": "houlsby", "scaling": 2.0},
     lambda n: ".adapter_" in n),
    ("mam", "mam", {"bottleneck": 8, "num_virtual_tokens": 4}, lambda n: ".adapter_ffn." in n or n == "prefix.weight"),
    ("mam-prefix-mlp", "mam", {"bottleneck": 4, "num_virtual_tokens": 3, "projection_hidden": 16},
     lambda n: ".adapter_ffn." in n or n.startswith("prefix.")),
    ("layers-freeze-below", "layers", {"freeze_below": 1}, lambda n: _layer(n) != 0),
    ("layers-llrd", "layers", {"lr_decay": 0.5}, lambda n: True),
    ("layers-reinit-top", "layers", {"reinit_top": 1, "freeze_below": 1, "lr_decay": 0.8},
     lambda n: _layer(n) != 0),
    ("layers-lightweight", "layers", {"only": "embeddings_head"}, lambda n: n == "model.embed_tokens.weight"),
]
