"""What the matrix notebooks share: their inputs, their results files, and their figures.

A notebook receives plain parameters from the runner (see :mod:`rmsae.runner`). The functions here
turn them into pairs, models and SAEs, and write the results file that the runner and the book read.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .data import PreferencePair, load_pairs
from .runner import RECORD_SUFFIX
from .storage import atomic_write_json

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Libraries import tqdm.auto, which warns in a kernel without ipywidgets; the notebooks show no bars.
warnings.filterwarnings("ignore", message="IProgress not found")


# Parameters the runner passes to every run notebook, and to every stage page, with their checks
# (see rmsae.params.check_all).
RUN_PARAMETERS: dict[str, tuple[str, dict[str, Any]]] = {
    "profile": ("str", {}),
    "model_name": ("str", {}),
    "model_tag": ("str", {}),
    "data": ("str", {}),
    "split": ("str", {"choices": ["all", "demo-eval"]}),
    "limit": ("int", {"optional": True, "minimum": 1}),
    "batch_size": ("int", {"minimum": 1}),
    "device": ("str", {}),
    "device_map": ("str", {"optional": True}),
    "results_path": ("path", {}),
}
LAYER_PARAMETERS: dict[str, tuple[str, dict[str, Any]]] = {"layer": ("int", {"minimum": 0}), "sae": ("str", {})}
PAGE_PARAMETERS: dict[str, tuple[str, dict[str, Any]]] = {
    "profile": ("str", {}),
    "stage": ("str", {}),
    "runs_dir": ("path", {}),
    "expected_runs": ("str_list", {}),
    "results_path": ("path", {}),
}


def load_run_pairs(data: str, split: str = "all", limit: int | None = None) -> list[PreferencePair]:
    """Load the pairs of a run: ``data`` as in :func:`rmsae.data.load_pairs`, restricted to ``split``.

    ``split="demo-eval"`` keeps the held-out half of the demo split (``<cache>/demo/split.json``),
    the pairs the demo reward models were not trained on. ``limit`` applies after the split.
    """
    pairs = list(load_pairs(data))
    if split == "demo-eval":
        from .registry import demo_dir

        manifest = demo_dir() / "split.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"The demo split manifest {manifest} is missing; run `rmsae demo build` first.")
        held_out = set(json.loads(manifest.read_text())["eval"])
        pairs = [pair for pair in pairs if pair.case_id in held_out]
        if not pairs:
            raise ValueError(f"None of the pairs of {data!r} is in the held-out half of {manifest}.")
    elif split != "all":
        raise ValueError(f"Unknown split {split!r}; expected 'all' or 'demo-eval'.")
    if limit is not None:
        pairs = pairs[:limit]
    logger.info("Loaded %d pairs from %s (split %s).", len(pairs), data, split)
    return pairs


def load_run_sae(sae: str, model_name: str, layer: int, d_model: int, device: str | torch.device = "cpu"):
    """Load the SAE a per-layer run names: ``released`` (``$SAE_CHECKPOINT`` or the hub) or a folder.

    ``released:NAME`` loads the released SAE of model ``NAME`` instead of ``model_name``'s, for a
    matrix entry that runs a registered model on other data.
    """
    from .sae import load_sae

    if sae == "released" or sae.startswith("released:"):
        owner = sae.partition(":")[2] or model_name
        return load_sae(None, subfolder=f"{owner}_layer{layer}", layer=layer, d_model=d_model, device=device)
    return load_sae(sae, layer=layer, d_model=d_model, device=device)


def load_run_records(records_dir: str | Path, methods: Sequence[str] = ("backdoor", "inject", "gradient")):
    """Load the perturbation records that the ``perturbations`` stage wrote for one model.

    Reads ``perturbations_<method>.jsonl`` under ``records_dir`` for each method whose file exists;
    at least one must.
    """
    from .data import load_perturbation_records

    folder = Path(records_dir)
    paths = [folder / f"perturbations_{method}.jsonl" for method in methods]
    found = [path for path in paths if path.is_file()]
    if not found:
        raise FileNotFoundError(
            f"No perturbation records ({', '.join(path.name for path in paths)}) in {folder}; run the perturbations stage "
            "for this model first (`rmsae run --stages perturbations`)."
        )
    records = [record for path in found for record in load_perturbation_records(path)]
    logger.info("Loaded %d perturbation records from %s.", len(records), ", ".join(str(path) for path in found))
    return records


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def save_results(path: str | Path, results: Mapping[str, Any]) -> Path:
    """Write a run's results (numbers, strings, lists) as JSON, atomically; NaN becomes null."""
    return atomic_write_json(path, _jsonable(results))


def collect_results(runs_dir: str | Path, stage: str, expected: Sequence[str] | None = None):
    """Collect one row per run of ``stage`` under a profile's runs folder: model, layer, status and results.

    ``expected`` lists the runs' notebooks relative to ``runs_dir``, and the runner passes every run
    of the stage in the matrix. Without it, every run record found under ``runs_dir`` counts. Runs
    that did not finish appear with their status (``failed``, ``blocked`` or ``missing``) and no
    results, so a page can list them.
    """
    import pandas as pd

    root = Path(runs_dir)
    if expected is None:
        notebooks = [path.with_name(f"{stage}.ipynb").relative_to(root) for path in sorted(root.glob(f"*/**/{stage}{RECORD_SUFFIX}"))]
    else:
        notebooks = [Path(name) for name in expected]
    rows = []
    for notebook in notebooks:
        folder = root / notebook.parent
        record_path = folder / f"{stage}{RECORD_SUFFIX}"
        record = json.loads(record_path.read_text()) if record_path.is_file() else {}
        parameters = record.get("parameters", {})
        layer = parameters.get("layer")
        if layer is None and folder.name.startswith("layer") and folder.name[5:].isdigit():
            layer = int(folder.name[5:])
        row: dict[str, Any] = {
            "model": parameters.get("model_name", notebook.parts[0]),
            "layer": layer,
            "status": record.get("status", "missing"),
            "notebook": str(notebook),
        }
        results_path = folder / f"{stage}.json"
        if row["status"] == "ok" and results_path.is_file():
            row.update(json.loads(results_path.read_text()))
        rows.append(row)
    if not rows:
        raise FileNotFoundError(f"No runs of stage {stage!r} under {root}; run `rmsae run` first.")
    return pd.DataFrame(rows)


def finished_runs(runs_dir: str | Path, stage: str, expected: Sequence[str] | None = None):
    """Return ``(runs, finished)`` from :func:`collect_results`, printing the runs that did not finish."""
    runs = collect_results(runs_dir, stage, expected)
    missing = runs[runs["status"] != "ok"]
    if len(missing):
        columns = [column for column in ("model", "layer", "status", "notebook") if column in missing]
        print(f"{len(missing)} run(s) did not finish; see their notebooks:")
        print(missing[columns].to_string(index=False))
    finished = runs[runs["status"] == "ok"]
    if finished.empty:
        print(f"No run of stage {stage!r} finished, so this page has no results to show.")
    return runs, finished


def show(key: str, figure) -> None:
    """Display ``figure`` as an image in the notebook, glue it under ``key`` for the book, and close it."""
    import matplotlib.pyplot as plt
    from myst_nb import glue

    glue(key, figure, display=True)
    plt.close(figure)


def table(frame, columns: Sequence[str] | None = None, *, digits: int = 3):
    """Return ``frame`` (only those of ``columns`` it has) styled for display: no index, ``digits`` decimals."""
    if columns is not None:
        frame = frame[[column for column in columns if column in frame]]
    return frame.style.hide(axis="index").format(precision=digits)
