import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tok():
    from tiny import tiny_tokenizer
    return tiny_tokenizer()


@pytest.fixture
def model():
    from tiny import tiny_model
    return tiny_model()


@pytest.fixture
def tiny_dir(tmp_path):
    from tiny import save_tiny_model_dir
    return save_tiny_model_dir(tmp_path / "tiny-model")


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """The fault tests' lab (tests/test_faults*.py): a fork server, the tiny model and data on disk,
    the run config, and one uninterrupted reference run that every faulted run must reproduce."""
    from types import SimpleNamespace

    from faultlab import CFG, outcome, write_jsonl
    from forkserver import ForkServer
    from tiny import chat_rows, save_tiny_model_dir

    root = tmp_path_factory.mktemp("faults")
    model = save_tiny_model_dir(root / "tiny")
    data = write_jsonl(root / "train.jsonl", chat_rows())
    cfg = root / "run.yaml"
    cfg.write_text(CFG.replace("MODEL", str(model)).replace("DATA", str(data)))
    fs = ForkServer(root)
    ref = root / "reference"
    done = fs.run(["train", str(cfg), f"output={ref}"])
    assert done.rc == 0, done.stderr()
    yield SimpleNamespace(root=root, model=model, data=data, cfg=cfg, fs=fs, ref=ref, outcome=outcome(ref))
    fs.close()
