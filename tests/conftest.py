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
