"""Export a run: its final/ output as is, or (merge) a plain HF model directory with the trained
change folded in, which `AutoModelForCausalLM.from_pretrained` loads."""
from __future__ import annotations

import shutil
from pathlib import Path

from tunelab.errors import TunelabError


def export(run_dir, out, merge: bool = False) -> Path:
    from tunelab.run.files import follow_umask
    from tunelab.training.final import load_trained

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise TunelabError(f"{out}: exists and is not empty; choose another --out")
    if not merge:
        if not (Path(run_dir) / "final").is_dir():
            raise TunelabError(f"{run_dir}: no final/ output yet; train the run to the end first")
        shutil.copytree(Path(run_dir) / "final", out, dirs_exist_ok=True)
        follow_umask(out)
        return out
    _, model, tok, method = load_trained(run_dir)
    if not method.supports_merge:
        raise TunelabError(f"{run_dir}: method '{method.name}' cannot be folded into a plain model; "
                           "export without --merge to get its own output")
    merged = method.merge(model)
    merged.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    follow_umask(out)
    return out
