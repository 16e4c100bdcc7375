"""Long-context set-up of a loaded model: RoPE scaling in its config, the training-time attention
pattern on its attention modules, and the check that training examples fit its positions.

    model.rope_scaling  -> scale_rope(config, ...) before the weights load (tunelab.models.load)
    model.attention     -> install_attention(model, ...) after they loaded
    data lengths        -> check_positions(model, ...) before training (tunelab.training.loop)
"""
from __future__ import annotations

from tunelab.errors import ConfigError, TunelabError
from tunelab.models.config import AttentionConfig, ModelConfig, RopeScaling


def scale_rope(config, scaling: RopeScaling) -> None:
    """Set `config.rope_parameters` to `scaling` (keeping the model's rope_theta)."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict) or "rope_theta" not in params:
        raise ConfigError(f"model.rope_scaling: this model's config has no single rope_parameters with a rope_theta "
                          f"({type(config).__name__}); it cannot be scaled here")
    if params.get("rope_type", "default") != "default":
        raise ConfigError(f"model.rope_scaling: the model is already scaled (rope_type {params['rope_type']}); "
                          "remove model.rope_scaling to keep its own")
    config.rope_parameters = scaling.parameters(params["rope_theta"], config.max_position_embeddings)
    config.validate_rope()


def positions(config) -> tuple[int, str]:
    """How many positions the model covers, and a phrase saying why."""
    trained = config.max_position_embeddings
    params = getattr(config, "rope_parameters", None) or {}
    if params.get("rope_type", "default") == "default" or "factor" not in params:
        return trained, f"its max_position_embeddings, {trained}"
    base = params.get("original_max_position_embeddings") or trained
    return int(base * params["factor"]), f"{base} x rope_scaling factor {params['factor']:g} ({params['rope_type']})"


def check_positions(model, examples: dict[str, list], model_name: str) -> None:
    """A clear error before training when an example is longer than the model's positions.
    `examples`: what -> its encoded examples (e.g. {"data.train": [...]}); the error names the
    longest one's source (file:line)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(cfg, "max_position_embeddings", None) is None:
        return
    limit, why = positions(cfg)
    for what, exs in examples.items():
        longest = max(exs, key=len, default=None)
        if longest is not None and len(longest) > limit:
            where = f" (the longest: {longest.source})" if longest.source else ""
            raise TunelabError(
                f"{what}: examples up to {len(longest)} tokens{where} are longer than the {limit} positions of "
                f"model {model_name} ({why}); set model.rope_scaling (e.g. {{type: linear, factor: "
                f"{-(-len(longest) // cfg.max_position_embeddings)}}}, LongLoRA's position interpolation) or "
                "lower data.max_length")


def install_attention(model, att: AttentionConfig) -> str:
    """Put `att`'s training-time pattern on `model` (full: nothing); returns a one-line summary."""
    if att.pattern == "full":
        return "full attention"
    if att.pattern == "lemo":
        from tunelab.models import lemo
        n = lemo.install(model, att)
        return f"LeMo token elimination in {n} layers (keep {att.keep_ratio:g}, blocks of {att.block_size}, {att.scorer})"
    if att.group_size is None:
        raise ConfigError("model.attention.group_size: unset (it is filled in from data.max_length when a run config "
                          "is read; set it when loading a model on its own)")
    from tunelab.models.attention import PATTERN, attention_modules
    from tunelab.models.shifted import GroupedShiftAttention

    pattern = GroupedShiftAttention(att.group_size, wrap=att.wrap, num_sinks=att.num_sink_tokens if att.pattern == "sf" else 0)
    mods = attention_modules(model)
    for module in mods:
        module.__dict__[PATTERN] = pattern
    count = len(mods)
    if not count:
        raise ConfigError(f"model.attention: found no attention layer to give pattern {att.pattern}")
    name = {"s2": "S2-Attn", "sf": "SF-Attn"}[att.pattern]
    return f"{name} in {count} layers (groups of {att.group_size}" + (", wrap" if att.wrap else "") + \
        (f", {att.num_sink_tokens} sinks)" if att.pattern == "sf" else ")")
