"""A pipeline: one YAML whose `stages:` run in order in sub-directories of one run directory.

    model: {name: smollm2-135m}          # the base model, and defaults for every training stage:
    train: {steps: 40, lr: 1.0e-3}       # any run-config section (data, method, objective, train, eval, ...)
    output: ../runs/s3ft
    stages:
      - name: relabel                    # RUN/stages/relabel/data.jsonl
        dataset: s3ft                    # a data stage (tunelab.curate): dataset -> dataset
        with: {input: "builtin:arith?n=300", judge: final_answer}
      - name: sft                        # a training stage: RUN/stages/sft/ is a run directory
        data: {train: "@relabel"}        # `@stage`: that stage's output (rows, or weights)
        method: lora

A training stage is any stage without `dataset:`; its sections are merged over the top-level ones
(a `method` or `objective` with another `name` replaces the top-level one). It starts `from:` the
weights of the previous training stage (the default; the base model when there is none), `base`,
or a named training stage. A data stage's model (for those that use one) is chosen the same way.
`@name` anywhere in a stage's values is that earlier stage's output: a data stage's data.jsonl, a
training stage's weights (its trained model folded into a plain HF model directory, `weights/`).
Everything is resolved and validated here, before any stage runs; errors name the file, the line
and the stage.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab import config as C
from tunelab.errors import ConfigError
from tunelab.registry import DATA_STAGES

STAGE_KEYS = {"name", "from", "dataset", "with"}
RUN_SECTIONS = {"model", "data", "method", "objective", "train", "eval", "diagnostics"}
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Stage:
    index: int
    name: str
    kind: str
    """`train` or `data`."""
    spec: dict
    """train: the stage's full run config (a dict, paths absolute); data: {name, **options}."""
    start: str | None
    """The training stage whose weights it starts from (or a data stage's model uses); None: the base."""
    uses: list[str] = field(default_factory=list)
    """Earlier stages whose output it reads (`@name` references and `start`)."""
    directory: Path = Path()
    needs_weights: bool = False
    """A later stage reads this training stage's weights (so they are written as weights/)."""

    @property
    def output(self) -> Path:
        """What `@name` resolves to: the rows of a data stage, the weights of a training stage."""
        return self.directory / ("data.jsonl" if self.kind == "data" else "weights")


@dataclass
class Pipeline:
    run_dir: Path
    raw: dict
    """The whole YAML (paths absolute): what RUN/pipeline.yaml holds."""
    stages: list[Stage]

    @property
    def base_model(self) -> dict:
        return self.raw.get("model") or {}

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def is_pipeline(target) -> bool:
    """A dict or YAML file with `stages:`, or a run directory holding pipeline.yaml."""
    if isinstance(target, dict):
        return "stages" in target
    if not isinstance(target, (str, Path)):
        return False
    path = Path(target)
    if path.is_dir():
        return (path / "pipeline.yaml").is_file()
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            return False
        return isinstance(raw, dict) and "stages" in raw
    return False


def load(target, overrides: list[str] = ()) -> Pipeline:
    """A pipeline from a YAML path, a dict, or a run directory (its pipeline.yaml); `overrides` are
    `a.b=c` (top level) or `stages.NAME.a.b=c`."""
    path, root = None, None
    if isinstance(target, dict):
        raw = copy.deepcopy(target)
    else:
        path = Path(target) / "pipeline.yaml" if Path(target).is_dir() else Path(target)
        text = path.read_text()
        try:
            root, raw = yaml.compose(text), yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from None
        _anchor(raw, path.resolve().parent)
    try:
        for item in overrides:
            _override(raw, item)
        return _build(raw)
    except ConfigError as e:
        raise ConfigError(_where(path, root, str(e))) from None


def _anchor(raw: dict, base: Path) -> None:
    """Relative paths in the YAML resolve against its folder: the run-config ones (PATH_FIELDS) at the
    top and in each stage, and in stages any other value that looks like a data file or a path."""
    C.anchor_paths(raw, base)
    for stage in raw.get("stages") or []:
        if isinstance(stage, dict):
            refs = {k: _pop_refs(v) for k, v in stage.items() if isinstance(v, dict)}
            C.anchor_paths(stage, base)
            for key, popped in refs.items():
                stage[key].update(popped)
            for key, value in stage.items():
                if key not in ("name", "from", "dataset"):
                    stage[key] = _anchor_values(value, base)


def _pop_refs(section: dict) -> dict:
    """Take the `@stage` values out of a section (they are not paths to anchor); returns them."""
    refs = {k: v for k, v in section.items() if isinstance(v, str) and v.startswith("@")}
    for k in refs:
        del section[k]
    return refs


def _anchor_values(value, base: Path):
    if isinstance(value, dict):
        return {k: _anchor_values(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_anchor_values(v, base) for v in value]
    if isinstance(value, str) and not value.startswith(("builtin:", "@", "/")) and \
            (value.endswith(DATA_SUFFIXES) or value.startswith(("./", "../", "~"))):
        return C._join(value, base)
    return value


def _override(raw: dict, item: str) -> None:
    keys, value = C.parse_override(item)
    if keys[0] != "stages":
        C.set_path(raw, keys, value)
        return
    stage = next((s for s in raw.get("stages") or [] if isinstance(s, dict) and s.get("name") == keys[1]), None) \
        if len(keys) > 2 else None
    if stage is None:
        raise ConfigError(f"override '{item}': expected stages.NAME.key=value naming one of the stages")
    C.set_path(stage, keys[2:], value)


def _where(path: Path | None, root, message: str) -> str:
    """Prefix `message` (`stages[2].train.steps: ...` or `train.steps: ...`) with file:line."""
    if path is None:
        return message
    key = message.split(":", 1)[0]
    m = re.match(r"^stages\[(\d+)\]\.?(.*)$", key)
    node = root
    if m and isinstance(root, yaml.MappingNode):
        seq = next((v for k, v in root.value if k.value == "stages"), None)
        node = seq.value[int(m.group(1))] if isinstance(seq, yaml.SequenceNode) and int(m.group(1)) < len(seq.value) else None
        key = m.group(2)
    line = C._line_of(node, key.split(".")) if node is not None and key else \
        (node.start_mark.line + 1 if node is not None else None)
    return f"{path}:{line}: {message}" if line else f"{path}: {message}"


def _build(raw: dict) -> Pipeline:
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise ConfigError("stages: expected a non-empty list of stages")
    top = {k: v for k, v in raw.items() if k != "stages"}
    base_cfg = C.load(None, base=top)  # the top level must be a valid run config on its own
    run_dir = Path(base_cfg.output)
    stages: list[Stage] = []
    for i, item in enumerate(stages_raw):
        stages.append(_stage(i, item, top, stages, run_dir))
    for s in stages:
        for used in s.uses:
            up = next(x for x in stages if x.name == used)
            up.needs_weights |= up.kind == "train"
    return Pipeline(run_dir, raw, stages)


def _stage(i: int, item, top: dict, before: list[Stage], run_dir: Path) -> Stage:
    where = f"stages[{i}]"
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a mapping with name: and the stage's settings")
    name = item.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"{where}.name: required: letters, digits, _ . - (it names the stage's directory)")
    if any(s.name == name for s in before):
        raise ConfigError(f"{where}.name: '{name}' is used by an earlier stage; stage names must be unique")
    unknown = sorted(set(map(str, item)) - STAGE_KEYS - RUN_SECTIONS)
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown key; a stage takes {', '.join(sorted(STAGE_KEYS | RUN_SECTIONS))}")
    start = _start(where, item.get("from", "previous"), before)
    directory = run_dir / "stages" / name
    if "dataset" in item and not _uses_model(where, item["dataset"]):
        start = None  # its output does not depend on any weights
    uses = [start] if start else []
    values = {k: v for k, v in item.items() if k not in ("name", "from")}
    values = _refs(values, before, uses, f"{where}")
    if "dataset" in item:
        spec = _data_stage(where, values)
        return Stage(i, name, "data", spec, start, sorted(set(uses)), directory)
    spec = _train_stage(where, values, top, start, before, directory)
    return Stage(i, name, "train", spec, start, sorted(set(uses)), directory)


def _start(where: str, value, before: list[Stage]) -> str | None:
    trained = [s for s in before if s.kind == "train"]
    if value == "previous":
        return trained[-1].name if trained else None
    if value == "base":
        return None
    match = next((s for s in before if s.name == value), None)
    if match is None or match.kind != "train":
        names = ", ".join(s.name for s in trained) or "none yet"
        raise ConfigError(f"{where}.from: '{value}' is not an earlier training stage; choose previous, base or "
                          f"one of: {names}")
    return value


def _uses_model(where: str, name) -> bool:
    try:
        return DATA_STAGES.get(str(name)).uses_model
    except ConfigError as e:
        raise ConfigError(f"{where}.dataset: {e}") from None


def _refs(value, before: list[Stage], uses: list[str], where: str):
    """Replace each `@name` with that earlier stage's output path; record the stage in `uses`."""
    if isinstance(value, dict):
        return {k: _refs(v, before, uses, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_refs(v, before, uses, f"{where}[{j}]") for j, v in enumerate(value)]
    if isinstance(value, str) and value.startswith("@"):
        match = next((s for s in before if s.name == value[1:]), None)
        if match is None:
            raise ConfigError(f"{where}: '{value}' names no earlier stage ({', '.join(s.name for s in before) or 'none'})")
        uses.append(match.name)
        return str(match.output)
    return value


def _data_stage(where: str, values: dict) -> dict:
    extra = sorted(set(values) - {"dataset", "with"})
    if extra:
        raise ConfigError(f"{where}.{extra[0]}: a data stage (dataset:) takes only name, from, dataset and with")
    options = values.get("with") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{where}.with: expected a mapping of the data stage's options")
    try:
        return C.to_dict(C.resolve_component(DATA_STAGES, {"name": values["dataset"], **options}, "with"))
    except ConfigError as e:
        raise ConfigError(f"{where}.{str(e).replace('with.name:', 'dataset:', 1)}") from None


def _train_stage(where: str, values: dict, top: dict, start: str | None, before: list[Stage], directory: Path) -> dict:
    if isinstance(values.get("model"), dict) and "name" in values["model"]:
        raise ConfigError(f"{where}.model.name: a stage's model comes from `from:` (previous, base or a stage); "
                          "set the base model at the top level")
    merged = _merge(copy.deepcopy(top), values)
    if start is not None:
        merged.setdefault("model", {})
        merged["model"] = {**merged["model"], "name": str(next(s for s in before if s.name == start).output)}
    merged["output"] = str(directory)
    try:
        return C.to_dict(C.load(None, base=merged))
    except ConfigError as e:
        raise ConfigError(f"{where}.{e}") from None


def _merge(top: dict, stage: dict) -> dict:
    """Stage sections over the top-level ones; a component with another name replaces the top's."""
    for key, value in stage.items():
        old = top.get(key)
        if key in ("method", "objective"):
            new_name = value if isinstance(value, str) else (value or {}).get("name")
            old_name = old if isinstance(old, str) else (old or {}).get("name")
            if new_name is not None and new_name != old_name:
                top[key] = value
                continue
            old = {"name": old} if isinstance(old, str) else old
        top[key] = _merge(dict(old), value) if isinstance(old, dict) and isinstance(value, dict) else value
    return top
