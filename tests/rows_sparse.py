"""Shared method table rows for sparse and selective methods (hft, lift, spiel, lt_sft, dsee, greentrainer): (id, method name, options, predicate on
the parameter names that must change after training).

The table trains 2 steps and calls on_step after each, so the options below make every method
re-select within them (SpIEL selects after step 1, LIFT refreshes after each step, LT-SFT switches
to its sparse phase after step 1, HFT re-draws its half after step 1)."""
import functools


def qv(n):
    return "q_proj" in n or "v_proj" in n


def delta(n):
    return n.endswith(".sparse_values")


@functools.lru_cache(maxsize=None)
def _tiny_names() -> tuple:
    from tiny import tiny_model
    return tuple(n for n, _ in tiny_model().named_parameters())


def hft_trained(seed: int, stages: tuple) -> set:
    """What HFT trains over these stages of the tiny model (everything outside the frozen half)."""
    from tunelab.methods.hft import frozen_half

    names = list(_tiny_names())
    return set().union(*(set(names) - frozen_half(names, seed, s) for s in stages))


ROWS: list = [
    ("spiel", "spiel", {"density": 0.05, "reselection_steps": 2, "selection_accumulation_steps": 1,
                        "num_decay_steps": 10}, delta),
    ("spiel-qv", "spiel", {"num_tunable_weights": 300, "target_modules": ["q_proj", "v_proj"],
                           "reselection_steps": 1, "selection_accumulation_steps": 1},
     lambda n: delta(n) and qv(n)),
    ("lift", "lift", {"lora_rank": 2, "filter_rank": 4, "update_interval": 1}, delta),
    # one global top-K over all targets: after one Adam step v_proj and o_proj hold the largest changes
    ("lt_sft", "lt_sft", {"full_ft_steps": 1, "density": 0.05, "target_modules": ["v_proj", "o_proj"]},
     lambda n: delta(n) and ("v_proj" in n or "o_proj" in n)),
    ("dsee", "dsee", {"r": 2, "alpha": 4, "num_sparse": 16, "grebsmo_rank": 3}, lambda n: (".lora_" in n or delta(n)) and qv(n)),
    ("dsee-random", "dsee", {"r": 2, "num_sparse": 8, "sparse_method": "random", "target_modules": ["o_proj"]},
     lambda n: (".lora_" in n or delta(n)) and "o_proj" in n),
    ("hft", "hft", {"seed": 0}, lambda n: n in hft_trained(0, (0,))),
    ("hft-reselect", "hft", {"seed": 3, "reselect_every": 1}, lambda n: n in hft_trained(3, (0, 1))),
    ("greentrainer", "greentrainer", {"rho": 1.0, "interval": 10}, lambda n: True),
]
