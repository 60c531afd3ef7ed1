"""The experiment matrix: which notebook runs for which model and layer, per profile.

The matrix is a YAML file (``experiments.yml`` at the repository root) with two sections:

``stages``
    One entry per notebook: ``notebook`` (jupytext source), ``page`` (the notebook that gathers the
    stage's runs into a book chapter), ``scope`` (``model``: once per model; ``model_layer``: once
    per model and layer), ``after`` (stages whose runs must finish first; a per-model stage after a
    per-layer one waits for every layer of its model), ``timeout`` (seconds per cell) and
    ``parameters`` (defaults passed to every run of the stage).
``profiles``
    One entry per profile: ``description``, ``prepare`` (``demo`` builds the demo models and SAEs
    first, cached), ``data`` (a :func:`rmsae.data.load_pairs` spec), ``split`` (``all`` or
    ``demo-eval``, the held-out half of the demo split), ``limit`` (pairs, or null), ``device``
    (``auto``, ``cpu``, ``cuda`` or ``cuda:N``) and ``device_map`` (``auto``, ``spec`` for the
    registered recommendation, or null), ``slurm`` (job resources for ``rmsae run --executor slurm``:
    ``partition``, ``gpus_per_node``, ``cpus_per_task``, ``mem_gb``, ``timeout_min``,
    ``additional_parameters``, and ``stages`` with the same keys per stage), ``models`` and
    ``parameters`` (per-stage overrides). Each model entry gives ``layers``, ``sae`` (``demo``,
    ``released``, or a folder template with ``{model}`` and ``{layer}``) and optionally ``source``
    (a local checkpoint, hub id or registered tag when the key is not a registered tag), ``data``
    and ``split`` (overriding the profile's for this entry). An entry whose ``source`` is a
    registered tag uses that model's SAEs, so one model can run on several data sets.

:func:`load_matrix` validates everything it can without loading a model, and names the entry at
fault in each error.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .params import ParameterError, checked

SCOPES = ("model", "model_layer")
SPLITS = ("all", "demo-eval")
PREPARE_STEPS = ("demo",)
# Set by the runner for every run; a matrix may not set them.
RESERVED_PARAMETERS = (
    "profile", "model_name", "model_tag", "layer", "sae", "data", "split", "limit", "device", "device_map", "results_path",
)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

_STAGE_KEYS = {"notebook", "page", "scope", "after", "timeout", "parameters", "description"}
_PROFILE_KEYS = {"description", "prepare", "data", "split", "limit", "device", "device_map", "slurm", "models", "parameters"}
_MODEL_KEYS = {"layers", "sae", "source", "data", "split"}


class MatrixError(ValueError):
    """The experiment matrix is malformed; the message names the entry."""


@dataclass(frozen=True)
class Stage:
    name: str
    notebook: Path
    page: Path | None
    scope: str
    after: tuple[str, ...]
    timeout: int
    parameters: dict[str, Any]
    description: str = ""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: str
    layers: tuple[int, ...]
    sae: str
    data: str | None = None
    split: str | None = None

    @property
    def sae_model(self) -> str:
        """Model name of the SAE folders and hub subfolders: the source when it is a registered tag, else the entry name.

        So an entry that runs a registered model on other data (``source: demo-minilm-hh``,
        ``data: truthfulqa``) uses that model's SAEs.
        """
        from .registry import get_spec

        return self.source if self.source != self.name and get_spec(self.source) is not None else self.name


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    prepare: str | None
    data: str
    split: str
    limit: int | None
    models: dict[str, ModelEntry]
    parameters: dict[str, dict[str, Any]]
    device: str = "auto"
    device_map: str | None = None
    slurm: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Matrix:
    path: Path
    stages: dict[str, Stage]
    profiles: dict[str, Profile] = field(default_factory=dict)

    def profile(self, name: str) -> Profile:
        if name not in self.profiles:
            raise MatrixError(f"{self.path}: no profile {name!r}; the matrix has {', '.join(self.profiles)}.")
        return self.profiles[name]

    def ordered_stages(self) -> list[Stage]:
        """Stages in dependency order (a stage after those it names in ``after``)."""
        ordered: list[Stage] = []
        done: set[str] = set()
        while len(ordered) < len(self.stages):
            ready = [s for s in self.stages.values() if s.name not in done and set(s.after) <= done]
            if not ready:
                cycle = sorted(set(self.stages) - done)
                raise MatrixError(f"{self.path}: the 'after' entries of stages {cycle} form a cycle.")
            for stage in ready:
                ordered.append(stage)
                done.add(stage.name)
        return ordered


def _expect_mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MatrixError(f"{where} must be a mapping, got {type(value).__name__}.")
    return value


def _check_keys(entry: Mapping[str, Any], allowed: set[str], where: str, required: tuple[str, ...] = ()) -> None:
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise MatrixError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}.")
    missing = [key for key in required if key not in entry]
    if missing:
        raise MatrixError(f"{where}: missing key(s) {missing}.")


def _check_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise MatrixError(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-' (it names a folder).")
    return name


def _coerce(where: str, value: Any, kind: str, **options: Any) -> Any:
    try:
        return checked(where, value, kind, **options)
    except ParameterError as error:
        raise MatrixError(str(error).replace("Parameter ", "", 1)) from None


def notebook_parameters(source: Path) -> dict[str, Any]:
    """Names and default values of the ``parameters`` cell of a jupytext percent-format source."""
    import jupytext

    notebook = jupytext.read(source)
    cells = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    if len(cells) != 1:
        raise MatrixError(f"{source}: expected exactly one cell tagged 'parameters', found {len(cells)}.")
    names: dict[str, Any] = {}
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name):
                    try:
                        names[target.id] = ast.literal_eval(node.value) if node.value is not None else None
                    except ValueError:
                        names[target.id] = None
    return names


_KIND_OF_DEFAULT = {bool: "bool", int: "int", float: "float", str: "str"}


def _parse_parameters(value: Any, where: str, allowed: dict[str, Any] | None) -> dict[str, Any]:
    """Check stage parameters against the notebook's parameters cell; values take the type of its defaults."""
    if value is None:
        return {}
    mapping = _expect_mapping(value, where)
    parameters = {}
    for name, item in mapping.items():
        if name in RESERVED_PARAMETERS:
            raise MatrixError(f"{where}.{name}: set by the runner for every run; remove it from the matrix.")
        if allowed is not None and name not in allowed:
            raise MatrixError(
                f"{where}.{name}: the notebook has no such parameter; its parameters are {sorted(allowed)}."
            )
        default = allowed.get(name) if allowed is not None else None
        kind = _KIND_OF_DEFAULT.get(type(default))
        # A default of None leaves the type open (an optional path or limit).
        parameters[name] = _coerce(f"{where}.{name}", item, kind, optional=True) if kind else item
    return parameters


def _parse_stage(name: str, entry: Any, root: Path) -> tuple[Stage, dict[str, Any]]:
    where = f"stages.{name}"
    entry = _expect_mapping(entry, where)
    _check_keys(entry, _STAGE_KEYS, where, required=("notebook", "scope"))
    notebook = root / _coerce(f"{where}.notebook", entry["notebook"], "str")
    if not notebook.is_file():
        raise MatrixError(f"{where}.notebook: {notebook} does not exist.")
    page = None
    if entry.get("page") is not None:
        page = root / _coerce(f"{where}.page", entry["page"], "str")
        if not page.is_file():
            raise MatrixError(f"{where}.page: {page} does not exist.")
    scope = _coerce(f"{where}.scope", entry["scope"], "str", choices=SCOPES)
    after = entry.get("after") or []
    if isinstance(after, str):
        after = [after]
    if not isinstance(after, list) or not all(isinstance(item, str) for item in after):
        raise MatrixError(f"{where}.after must be a list of stage names, got {after!r}.")
    timeout = _coerce(f"{where}.timeout", entry.get("timeout", 1800), "int", minimum=1)
    notebook_defaults = notebook_parameters(notebook)
    parameters = _parse_parameters(entry.get("parameters"), f"{where}.parameters", notebook_defaults)
    description = _coerce(f"{where}.description", entry.get("description", name), "str")
    stage = Stage(name, notebook, page, scope, tuple(after), timeout, parameters, description)
    return stage, notebook_defaults


def _rooted(value: str, root: Path) -> str:
    """Resolve a relative path of the matrix against the matrix file's folder, if it exists there."""
    path = Path(value).expanduser()
    return value if path.is_absolute() or not (root / path).exists() else str(root / path)


def _parse_model(name: str, entry: Any, where: str, root: Path) -> ModelEntry:
    from .registry import get_spec

    _check_name(name, where)
    entry = _expect_mapping(entry, where)
    _check_keys(entry, _MODEL_KEYS, where, required=("layers",))
    layers = _coerce(f"{where}.layers", entry["layers"], "int_list", minimum=0)
    if not layers:
        raise MatrixError(f"{where}.layers: give at least one layer.")
    if len(set(layers)) != len(layers):
        raise MatrixError(f"{where}.layers: {layers} repeats a layer.")
    source = _rooted(_coerce(f"{where}.source", entry["source"], "str"), root) if "source" in entry else name
    if source.startswith(("/", "./", "../", "~")) and not Path(source).expanduser().exists():
        raise MatrixError(f"{where}.source: the folder {source} does not exist.")
    if "source" not in entry and get_spec(name) is None:
        raise MatrixError(
            f"{where}: {name!r} is not a registered model tag; add 'source:' with a local checkpoint "
            "folder or hub id, or use a registered tag."
        )
    sae = _coerce(f"{where}.sae", entry.get("sae", "released"), "str")
    if sae not in ("demo", "released") and ("{layer}" not in sae):
        raise MatrixError(
            f"{where}.sae: {sae!r} must be 'demo', 'released', or a folder template containing '{{layer}}' "
            "(and usually '{model}'), such as /data/saes/{model}_layer{layer}."
        )
    if sae not in ("demo", "released") and not Path(sae).expanduser().is_absolute():
        sae = str(root / sae)
    data = _data_spec(f"{where}.data", entry["data"], root) if "data" in entry else None
    split = _coerce(f"{where}.split", entry["split"], "str", choices=SPLITS) if "split" in entry else None
    return ModelEntry(name, source, tuple(layers), sae, data, split)


def _parse_profile(
    name: str, entry: Any, stages: dict[str, Stage], defaults: dict[str, dict[str, Any]], root: Path
) -> Profile:
    where = f"profiles.{name}"
    entry = _expect_mapping(entry, where)
    _check_keys(entry, _PROFILE_KEYS, where, required=("data", "models"))
    prepare = entry.get("prepare")
    if prepare is not None:
        prepare = _coerce(f"{where}.prepare", prepare, "str", choices=PREPARE_STEPS)
    data = _data_spec(f"{where}.data", entry["data"], root)
    split = _coerce(f"{where}.split", entry.get("split", "all"), "str", choices=SPLITS)
    limit = _coerce(f"{where}.limit", entry.get("limit"), "int", optional=True, minimum=1)
    models_entry = _expect_mapping(entry["models"], f"{where}.models")
    if not models_entry:
        raise MatrixError(f"{where}.models: list at least one model.")
    models = {model: _parse_model(model, value, f"{where}.models.{model}", root) for model, value in models_entry.items()}
    overrides: dict[str, dict[str, Any]] = {}
    for stage_name, values in _expect_mapping(entry.get("parameters") or {}, f"{where}.parameters").items():
        if stage_name not in stages:
            raise MatrixError(f"{where}.parameters.{stage_name}: no such stage; stages are {sorted(stages)}.")
        overrides[stage_name] = _parse_parameters(values, f"{where}.parameters.{stage_name}", defaults[stage_name])
    description = _coerce(f"{where}.description", entry.get("description", name), "str")
    device = _coerce(f"{where}.device", entry.get("device", "auto"), "str")
    device_map = _coerce(f"{where}.device_map", entry.get("device_map"), "str", optional=True)
    slurm = _parse_slurm(entry.get("slurm") or {}, f"{where}.slurm", stages)
    return Profile(name, description, prepare, data, split, limit, models, overrides, device, device_map, slurm)


def _parse_slurm(entry: Any, where: str, stages: dict[str, Stage]) -> dict[str, Any]:
    from .executors import JobSettings

    entry = dict(_expect_mapping(entry, where))
    per_stage = dict(_expect_mapping(entry.pop("stages", None) or {}, f"{where}.stages"))
    try:
        JobSettings.from_mapping(entry, where)
        for stage_name, values in per_stage.items():
            if stage_name not in stages:
                raise MatrixError(f"{where}.stages.{stage_name}: no such stage; stages are {sorted(stages)}.")
            JobSettings.from_mapping(_expect_mapping(values, f"{where}.stages.{stage_name}"), f"{where}.stages.{stage_name}")
    except (TypeError, ValueError) as error:
        if isinstance(error, MatrixError):
            raise
        raise MatrixError(f"{where}: {error}") from error
    return {**entry, "stages": per_stage}


def _data_spec(where: str, value: Any, root: Path) -> str:
    data = _rooted(_coerce(where, value, "str"), root)
    if data.partition(":")[0] not in ("hh-rlhf", "truthfulqa") and not Path(data).is_file():
        raise MatrixError(f"{where}: {data!r} is neither 'hh-rlhf[:SUBSET[:SPLIT]]', 'truthfulqa', nor an existing file.")
    return data


def load_matrix(path: str | Path) -> Matrix:
    """Read and validate an experiment matrix; paths inside are relative to the file's folder."""
    import yaml

    path = Path(path).resolve()
    if not path.is_file():
        raise MatrixError(f"Experiment matrix {path} does not exist; pass --matrix with the path of experiments.yml.")
    try:
        document = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise MatrixError(f"{path} is not valid YAML: {error}") from None
    document = _expect_mapping(document, str(path))
    _check_keys(document, {"stages", "profiles"}, str(path), required=("stages", "profiles"))
    root = path.parent

    stages: dict[str, Stage] = {}
    defaults: dict[str, dict[str, Any]] = {}
    for name, entry in _expect_mapping(document["stages"], "stages").items():
        _check_name(name, f"stages.{name}")
        stages[name], defaults[name] = _parse_stage(name, entry, root)
    for stage in stages.values():
        for dependency in stage.after:
            if dependency not in stages:
                raise MatrixError(f"stages.{stage.name}.after: no stage named {dependency!r}.")

    profiles = {
        name: _parse_profile(_check_name(name, f"profiles.{name}"), entry, stages, defaults, root)
        for name, entry in _expect_mapping(document["profiles"], "profiles").items()
    }
    matrix = Matrix(path, stages, profiles)
    matrix.ordered_stages()  # raises on a dependency cycle
    return matrix
