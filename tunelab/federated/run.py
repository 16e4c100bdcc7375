"""A federated run from the server's side: its rounds (federated/server.py), then what any tunelab
run ends with: RUN/final/ (the global model, saved by its method), RUN/eval.json (the run's eval
data) and RUN/metrics.jsonl (one `round` line per round: clients, loss, bytes per client), so that
`tunelab report`, `tunelab eval` and `tunelab diagnose` work on it as on a trained run."""
from __future__ import annotations

import json
from pathlib import Path

from tunelab import config as C


def check(cfg: C.RunConfig) -> None:
    """A ConfigError, before any process starts, for a federated run that cannot work."""
    from tunelab.data.split import train_eval_records
    from tunelab.errors import ConfigError
    from tunelab.privacy import check_supported
    from tunelab.registry import METHODS, OBJECTIVES

    fc = cfg.federated
    if fc.min_replies > fc.num_clients:
        raise ConfigError(f"federated.min_replies: {fc.min_replies} replies can never come from "
                          f"federated.num_clients={fc.num_clients} clients")
    if cfg.privacy.dp_sgd and fc.algorithm == "fedkseed":
        raise ConfigError("privacy.dp_sgd: FedKSeed's zeroth-order steps have no per-example gradient to clip; "
                          "use federated.algorithm: fedavg with DP-SGD, or turn privacy.dp_sgd off")
    method = METHODS.get(cfg.method.name)(cfg.method.options)
    check_supported(cfg.privacy, method, OBJECTIVES.get(cfg.objective.name)(cfg.objective.options), False)
    n = len(train_eval_records(cfg.data)[0])
    if n < fc.num_clients:
        raise ConfigError(f"federated.num_clients: {fc.num_clients} clients but data.train keeps {n} training "
                          "records (after the eval holdout): every client needs at least one")


def serve_rounds(cfg: C.RunConfig, transport, say=print) -> None:
    from tunelab.federated.server import load_server, run_rounds
    from tunelab.run.rundir import MetricsLog

    out = Path(cfg.output)
    log = MetricsLog(out / "metrics.jsonl")
    server = load_server(cfg, log=say)
    log.truncate_after(server.round if server.round else -1)
    if server.round == 0:
        fc = cfg.federated
        log.write({"step": 0, "kind": "setup", "algorithm": fc.algorithm, "clients": fc.num_clients,
                   "rounds": fc.rounds, "local_steps": fc.local_steps, "split": fc.split})
    run_rounds(server, transport, cfg, log.write, say)
    finish(cfg, server, say)


def finish(cfg: C.RunConfig, server, say=print) -> dict:
    """final/ from the global model, and its evaluation on the run's eval data (eval.json)."""
    from tunelab.run.files import atomic_write_text
    from tunelab.training.evaluation import evaluate, report
    from tunelab.training.final import save_final
    from tunelab.training.inputs import load_examples

    out, built = Path(cfg.output), server.model()
    built.model.eval()
    save_final(out, built.model, built.tok, built.method, built.objective, cfg)
    _, records, examples = load_examples(cfg, built.tok, quiet=True)
    results = {"after": evaluate(built.model, built.tok, records, examples, cfg)} if records else {}
    if results:
        report("after", results["after"])
    atomic_write_text(out / "eval.json", json.dumps(results, indent=1))
    return results
