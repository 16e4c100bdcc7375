"""Models: load by built-in name, local HF directory, .gguf file or hub id; fetch built-ins.

Public surface: `load_model`, `load_tokenizer`, `resolve_model_path`, `pull`, `BUILTIN_MODELS`,
`tunelab_home`, `ModelConfig`. Importing this package is cheap: torch and transformers load
inside the functions that need them.
"""
from tunelab.models.builtin import BUILTIN_MODELS, pull, tunelab_home
from tunelab.models.config import ModelConfig
from tunelab.models.load import load_model, load_tokenizer, resolve_model_path

__all__ = ["BUILTIN_MODELS", "ModelConfig", "load_model", "load_tokenizer", "pull", "resolve_model_path",
           "tunelab_home"]
