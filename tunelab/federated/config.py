"""The `federated` section of the run config: what `tunelab federate x.yaml` runs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from tunelab.options import Options


@dataclass(kw_only=True)
class FederatedConfig(Options):
    ranges: ClassVar = {"num_clients": ">= 1", "rounds": ">= 1", "local_steps": ">= 1", "num_seeds": ">= 1",
                        "zo_eps": "> 0", "pro_clip": "> 0", "dirichlet_alpha": "> 0", "round_timeout": "> 0",
                        "min_replies": ">= 1", "max_retries": ">= 0", "seed": f"[0, {2**32 - 1}]",
                        "port": "[0, 65535]"}
    algorithm: Literal["fedkseed", "fedavg"] = "fedkseed"
    """fedkseed: zeroth-order steps, only (seed index, scalar) pairs travel (federated/kseed.py);
    fedavg: first-order local steps (train.lr, the optimizer of the run), the method's trained
    tensors averaged by examples (federated averaging of LoRA adapters with method: lora)."""
    num_clients: int = 2
    """SuperNodes started, one data partition each."""
    rounds: int = 10
    """Federated rounds."""
    local_steps: int = 20
    """Steps each client takes per round (tau): ZO steps or optimizer steps of train.micro_batch_size."""
    split: Literal["iid", "non-iid"] = "iid"
    """How data.train is shared out: iid (a shuffled even split) or non-iid (Dirichlet over each
    record's category; see federated/partition.py)."""
    dirichlet_alpha: float = 0.5
    """non-iid: the Dirichlet concentration (smaller: more skewed clients)."""
    num_seeds: int = 4096
    """fedkseed: K, the candidate seeds shared once."""
    zo_eps: float = 5e-4
    """fedkseed: the perturbation scale eps of the two-point estimate."""
    seed_sampling: Literal["uniform", "pro"] = "uniform"
    """fedkseed: uniform over the K seeds, or FedKSeed-Pro's probabilities from the seeds' past |g|."""
    pro_clip: float = 1000.0
    """fedkseed with pro: |g| is clipped to this before it enters a seed's history."""
    weighting: Literal["examples", "equal"] = "examples"
    """Aggregation weights: by each client's number of training examples, or equal."""
    round_timeout: float = 600.0
    """Seconds the server waits for a round's replies; a client that has not replied by then is
    left out of that round."""
    min_replies: int = 1
    """A round is aggregated when at least this many clients replied; else it is retried."""
    max_retries: int = 2
    """How often a round with too few replies is retried before the run stops (resumable)."""
    seed: int = 0
    """Seeds the candidate seeds, the partition and the clients' sampling."""
    port: int = 0
    """The SuperLink's port on 127.0.0.1 (0: a free one); each SuperNode takes a free port too."""
