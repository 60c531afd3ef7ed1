"""Executing the experiment matrix with papermill.

Each run is one notebook for one model (or one model and layer) of a profile. The runner converts
the stage's jupytext source to a notebook, executes it with papermill, and writes into
``runs/<profile>/<model>[/layer<L>]/``:

* ``<stage>.ipynb``: the executed notebook (kept when a run fails, to read the traceback);
* ``<stage>.json``: the results the notebook saved with :func:`rmsae.experiments.save_results`;
* ``<stage>.run.json``: the run record (status, fingerprint of its inputs, timings).

A stage's ``page`` notebook runs once per profile after the stage's runs, into
``runs/<profile>/<stage>.ipynb``; it gathers the stage's results for the book.

A run is skipped when its record shows it succeeded with the same fingerprint. The fingerprint
covers the notebook source, the parameters, the rmsae sources, the data file, the split manifest,
the model and SAE files, and the records of the runs it depends on. A failed run does not stop the others; runs that depend on it are
reported as blocked.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from .matrix import Matrix, ModelEntry, Profile, Stage
from .storage import atomic_write_json, fingerprint_file, sha256_json, sha256_text

logger = logging.getLogger(__name__)

RUNS_DIRNAME = "runs"
RECORD_SUFFIX = ".run.json"
KERNEL_NAME = "python3"


@dataclass
class Run:
    """One notebook execution of the matrix."""

    profile: str
    stage: Stage
    model: ModelEntry | None
    layer: int | None
    folder: Path
    parameters: dict[str, Any]
    is_page: bool = False
    depends_on: list["Run"] = field(default_factory=list)
    # Records of the runs this one reads, in the whole profile whatever the selection, so that
    # the fingerprint does not depend on which runs were selected.
    upstream_records: list[Path] = field(default_factory=list)
    status: str = "pending"  # pending, skipped, ok, failed, blocked
    seconds: float = 0.0
    error: str = ""
    fingerprint: str = ""

    @property
    def name(self) -> str:
        """Display name: ``profile/model[/layerL]/stage``, or ``profile/stage (page)``."""
        if self.is_page:
            return f"{self.profile}/{self.stage.name} (page)"
        parts = [self.profile, self.model.name]  # type: ignore[union-attr]
        if self.layer is not None:
            parts.append(f"layer{self.layer}")
        return "/".join(parts + [self.stage.name])

    @property
    def notebook_path(self) -> Path:
        return self.folder / f"{self.stage.name}.ipynb"

    @property
    def results_path(self) -> Path:
        return self.folder / f"{self.stage.name}.json"

    @property
    def record_path(self) -> Path:
        return self.folder / f"{self.stage.name}{RECORD_SUFFIX}"

    @property
    def source(self) -> Path:
        return self.stage.page if self.is_page else self.stage.notebook  # type: ignore[return-value]

    @property
    def title(self) -> str:
        if self.is_page:
            return ""
        title = f"{self.model.name}"  # type: ignore[union-attr]
        return f"{title}, layer {self.layer}" if self.layer is not None else title


# ---------------------------------------------------------------------------------------------
# Planning


def sae_argument(model: ModelEntry, layer: int) -> str:
    """Return the ``sae`` parameter a per-layer run receives (see :func:`rmsae.experiments.load_run_sae`)."""
    if model.sae == "demo":
        from .demo import demo_sae_dir

        return str(demo_sae_dir(model.sae_model, layer))
    if model.sae == "released":
        return "released" if model.sae_model == model.name else f"released:{model.sae_model}"
    return model.sae.format(model=model.sae_model, layer=layer)


def plan_runs(
    matrix: Matrix,
    profile_name: str,
    *,
    models: Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    stages: Sequence[str] | None = None,
    limit: int | None = None,
    runs_dir: Path | None = None,
) -> list[Run]:
    """List the runs of a profile in dependency order, restricted to the given models, layers and stages.

    ``limit`` replaces the profile's pair limit (a quick pass over a large profile).
    """
    from .matrix import MatrixError

    profile = matrix.profile(profile_name)
    if limit is not None:
        profile = replace(profile, limit=limit)
    for name in models or []:
        if name not in profile.models:
            raise MatrixError(f"Profile {profile_name!r} has no model {name!r}; it has {', '.join(profile.models)}.")
    for name in stages or []:
        if name not in matrix.stages:
            raise MatrixError(f"No stage {name!r}; the matrix has {', '.join(matrix.stages)}.")
    all_layers = {layer for model in profile.models.values() for layer in model.layers}
    for layer in layers or []:
        if layer not in all_layers:
            raise MatrixError(f"No model of profile {profile_name!r} lists layer {layer}; they list {sorted(all_layers)}.")

    root = (runs_dir or matrix.path.parent / RUNS_DIRNAME) / profile.name

    def folder_of(model: ModelEntry, layer: int | None) -> Path:
        return root / model.name / (f"layer{layer}" if layer is not None else "")

    def layers_of(stage: Stage, model: ModelEntry) -> list[int | None]:
        return [None] if stage.scope == "model" else list(model.layers)

    selected_models = [profile.models[name] for name in (models or profile.models)]
    runs: list[Run] = []
    by_key: dict[tuple[str, str, int | None], Run] = {}
    for stage in matrix.ordered_stages():
        if stages and stage.name not in stages:
            continue
        stage_runs: list[Run] = []
        for model in selected_models:
            for layer in layers_of(stage, model):
                if layer is not None and layers and layer not in layers:
                    continue
                folder = folder_of(model, layer)
                run = Run(profile.name, stage, model, layer, folder, _run_parameters(profile, stage, model, layer, folder))
                for dependency in stage.after:
                    upstream = matrix.stages[dependency]
                    if upstream.scope == "model":
                        upstream_layers: list[int | None] = [None]
                    elif layer is not None:
                        upstream_layers = [layer]
                    else:
                        # A per-model stage after a per-layer one waits for every layer of its model.
                        upstream_layers = list(model.layers)
                    for upstream_layer in upstream_layers:
                        key = (dependency, model.name, upstream_layer)
                        run.upstream_records.append(folder_of(model, upstream_layer) / f"{dependency}{RECORD_SUFFIX}")
                        if key in by_key:
                            run.depends_on.append(by_key[key])
                by_key[(stage.name, model.name, layer)] = run
                stage_runs.append(run)
        runs.extend(stage_runs)
        if stage.page is not None and stage_runs:
            # The page gathers every run of the stage in the profile, not only the selected ones.
            expected = [
                str((folder_of(model, layer) / f"{stage.name}.ipynb").relative_to(root))
                for model in profile.models.values() for layer in layers_of(stage, model)
            ]
            parameters = {"profile": profile.name, "stage": stage.name, "runs_dir": str(root),
                          "expected_runs": expected, "results_path": str(root / f"{stage.name}.json")}
            page = Run(profile.name, stage, None, None, root, parameters, is_page=True, depends_on=list(stage_runs))
            page.upstream_records = [root / name.replace(".ipynb", RECORD_SUFFIX) for name in expected]
            runs.append(page)
    return runs


def _run_parameters(profile: Profile, stage: Stage, model: ModelEntry, layer: int | None, folder: Path) -> dict[str, Any]:
    parameters: dict[str, Any] = {**stage.parameters, **profile.parameters.get(stage.name, {})}
    parameters.update(
        profile=profile.name,
        model_name=model.name,
        model_tag=model.source,
        data=model.data or profile.data,
        split=model.split or profile.split,
        limit=profile.limit,
        device=profile.device,
        device_map=profile.device_map,
        results_path=str(folder / f"{stage.name}.json"),
    )
    if layer is not None:
        parameters.update(layer=layer, sae=sae_argument(model, layer))
    return parameters


# ---------------------------------------------------------------------------------------------
# Fingerprints


def library_fingerprint() -> str:
    """Hash of the rmsae sources, so a change in the library re-runs the notebooks that use it."""
    package = Path(__file__).parent
    return sha256_json({path.name: sha256_text(path.read_text()) for path in sorted(package.glob("*.py"))})


def _folder_fingerprint(folder: Path) -> dict[str, str]:
    names = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix in {".json", ".safetensors", ".bin", ".txt", ".model"}]
    return {p.name: fingerprint_file(p) for p in names}


def data_fingerprint(spec: str) -> str:
    """Fingerprint of the data a spec loads: the local file's content, or the hub id when read from the hub."""
    from .data import hh_local_path
    from .paths import resolve_data_dir

    name, _, rest = spec.partition(":")
    data_dir = resolve_data_dir()
    if name == "hh-rlhf":
        parts = (rest.split(":") + ["", ""])[:2]
        path = hh_local_path(data_dir, parts[0] or "harmless-base", parts[1] or "test") if data_dir else None
    elif name == "truthfulqa":
        path = data_dir / "truthfulqa" / "TruthfulQA.csv" if data_dir else None
    else:
        path = Path(spec)
    if path is not None and path.is_file():
        return fingerprint_file(path)
    return f"unresolved:{spec}"


def model_fingerprint(source: str) -> Any:
    from .registry import get_spec

    spec = get_spec(source)
    location = source
    if spec is not None:
        try:
            location = spec.resolve_source()
        except FileNotFoundError:
            return f"missing:{source}"
    path = Path(location)
    return _folder_fingerprint(path) if path.is_dir() else f"hub:{location}"


def _sae_fingerprint(sae: str, model: ModelEntry, layer: int) -> Any:
    if sae.split(":")[0] == "released":
        checkpoint = os.environ.get("SAE_CHECKPOINT")
        if not checkpoint:
            return f"hub:{model.sae_model}_layer{layer}"
        folder = Path(checkpoint)
        sub = folder / f"{model.sae_model}_layer{layer}"
        folder = sub if sub.is_dir() else folder
    else:
        folder = Path(sae)
    return _folder_fingerprint(folder) if folder.is_dir() else f"missing:{folder}"


def run_fingerprint(run: Run, library: str) -> str:
    inputs: dict[str, Any] = {
        "source": sha256_text(run.source.read_text()),
        "parameters": run.parameters,
        "library": library,
        "upstream": {str(path): _upstream_state(path) for path in run.upstream_records},
    }
    if not run.is_page:
        from .demo import demo_dir

        inputs["data"] = data_fingerprint(run.parameters["data"])
        if run.parameters["split"] == "demo-eval":
            split_file = demo_dir() / "split.json"
            inputs["split"] = fingerprint_file(split_file) if split_file.is_file() else "missing"
        inputs["model"] = model_fingerprint(run.parameters["model_tag"])
        if run.layer is not None:
            inputs["sae"] = _sae_fingerprint(run.parameters["sae"], run.model, run.layer)  # type: ignore[arg-type]
    return sha256_json(inputs)


def _upstream_state(record_path: Path) -> Any:
    """Return what a dependent run's fingerprint takes from an upstream record: status, fingerprint, results file."""
    record = _read_record(record_path)
    if not record:
        return "missing"
    results = record_path.with_name(record_path.name.replace(RECORD_SUFFIX, ".json"))
    return [record.get("status"), record.get("fingerprint"), fingerprint_file(results) if results.is_file() else None]


def _read_record(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def is_current(run: Run) -> bool:
    record = _read_record(run.record_path)
    return (
        record.get("status") == "ok"
        and record.get("fingerprint") == run.fingerprint
        and run.notebook_path.is_file()
        and run.results_path.is_file()
    )


# ---------------------------------------------------------------------------------------------
# Execution


def _titled_notebook(run: Run):
    import jupytext

    notebook = jupytext.read(run.source)
    notebook.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "Python 3", "language": "python"}
    notebook.metadata.pop("jupytext", None)
    # The source's heading names the stage. The executed copy names the model and layer too, so the
    # runs have distinct titles in the book's table of contents.
    if run.title and notebook.cells and notebook.cells[0].cell_type == "markdown":
        lines = notebook.cells[0].source.split("\n")
        if lines[0].startswith("# "):
            lines[0] = f"{lines[0]}: {run.title}"
            notebook.cells[0].source = "\n".join(lines)
    return notebook


def execute_run(run: Run) -> None:
    """Execute one run with papermill; set ``run.status`` to ``ok`` or ``failed``."""
    import nbformat
    import papermill

    run.folder.mkdir(parents=True, exist_ok=True)
    for stale in (run.results_path, run.record_path):
        stale.unlink(missing_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=run.folder, prefix=".running-") as scratch:
        source = Path(scratch) / "source.ipynb"
        output = Path(scratch) / "executed.ipynb"
        nbformat.write(_titled_notebook(run), source)
        try:
            papermill.execute_notebook(
                str(source),
                str(output),
                parameters=run.parameters,
                kernel_name=KERNEL_NAME,
                progress_bar=False,
                cwd=str(run.folder),
                execution_timeout=run.stage.timeout,
            )
            if not run.results_path.is_file():
                raise RuntimeError(f"the notebook finished without writing its results file {run.results_path}")
            run.status = "ok"
        except Exception as error:  # papermill's execution error, a dead kernel, a timeout
            run.status = "failed"
            last_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
            run.error = f"{type(error).__name__}: {last_line}".rstrip(".")
        if output.is_file():
            os.replace(output, run.notebook_path)
    run.seconds = time.perf_counter() - started
    _write_record(run)


def _write_record(run: Run) -> None:
    atomic_write_json(
        run.record_path,
        {"status": run.status, "fingerprint": run.fingerprint, "parameters": run.parameters, "seconds": run.seconds,
         "error": run.error, "notebook": run.notebook_path.name, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    )


def _block(run: Run, reason: str) -> None:
    """Mark ``run`` blocked: its old notebook and results go, so neither the book nor a page shows them as current."""
    run.status, run.error = "blocked", reason
    run.folder.mkdir(parents=True, exist_ok=True)
    for stale in (run.notebook_path, run.results_path):
        stale.unlink(missing_ok=True)
    _write_record(run)


def prepare_profile(profile: Profile) -> None:
    """Build what a profile needs before its runs (the demo models and SAEs; cached)."""
    if profile.prepare == "demo":
        from .demo import build_demo

        logger.info("Preparing profile %s: building the demo models and SAEs (reused when unchanged).", profile.name)
        build_demo()


def execute_runs(runs: Sequence[Run], *, jobs: int = 1, force: bool = False, launch: Callable[[Run], None] | None = None) -> list[Run]:
    """Execute ``runs`` (from :func:`plan_runs`) in dependency order, ``jobs`` at a time.

    ``launch`` executes one run and sets its status (default :func:`execute_run`, in this process);
    a :class:`rmsae.executors.SubmititLauncher` sends it to SLURM instead. Pages always run here.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}.")
    library = library_fingerprint()
    pending = list(runs)
    running: dict[concurrent.futures.Future, Run] = {}
    total = len(runs)
    finished = started = 0

    def settle(run: Run) -> None:
        nonlocal finished
        finished += 1
        if run.status == "ok":
            logger.info("[%d/%d] finished %s in %.0f s.", finished, total, run.name, run.seconds)
        elif run.status == "failed":
            logger.error("[%d/%d] FAILED %s after %.0f s: %s (notebook: %s)", finished, total, run.name, run.seconds, run.error, run.notebook_path)

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            for run in list(pending):
                if any(dependency.status in ("pending", "running") for dependency in run.depends_on):
                    continue
                pending.remove(run)
                failed = [d for d in run.depends_on if d.status in ("failed", "blocked")]
                if failed and not run.is_page:
                    _block(run, f"blocked by the failure of {failed[0].name}")
                    finished += 1
                    logger.error("[%d/%d] BLOCKED %s: %s", finished, total, run.name, run.error)
                    continue
                # An upstream run outside the selection must have finished in an earlier call.
                selected = {dependency.record_path for dependency in run.depends_on}
                unfinished = [path for path in run.upstream_records if path not in selected and _read_record(path).get("status") != "ok"]
                if unfinished and not run.is_page:
                    upstream = unfinished[0]
                    _block(run, f"needs {upstream.parent / upstream.name.replace(RECORD_SUFFIX, '')}, which has not run successfully; "
                                "run that stage first or add it to --stages")
                    finished += 1
                    logger.error("[%d/%d] BLOCKED %s: %s", finished, total, run.name, run.error)
                    continue
                run.fingerprint = run_fingerprint(run, library)
                if not force and is_current(run):
                    run.status = "skipped"
                    finished += 1
                    logger.info("[%d/%d] skipped %s (inputs unchanged).", finished, total, run.name)
                    continue
                if len(running) >= jobs:
                    pending.insert(0, run)
                    break
                run.status = "running"
                started += 1
                logger.info("starting %s (%d started, %d of %d done)", run.name, started, finished, total)
                target = execute_run if run.is_page or launch is None else launch
                running[pool.submit(target, run)] = run
            if running:
                done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    run = running.pop(future)
                    try:
                        future.result()
                    except Exception as error:  # an error outside the notebook, such as a full disk
                        run.status, run.error = "failed", f"{type(error).__name__}: {error}"
                    settle(run)
    return list(runs)


def failures(runs: Sequence[Run]) -> list[Run]:
    return [run for run in runs if run.status in ("failed", "blocked")]


def summarise(runs: Sequence[Run]) -> str:
    counts = {status: sum(run.status == status for run in runs) for status in ("ok", "skipped", "failed", "blocked")}
    lines = [f"{len(runs)} runs: {counts['ok']} executed, {counts['skipped']} skipped (unchanged), "
             f"{counts['failed']} failed, {counts['blocked']} blocked."]
    for run in failures(runs):
        where = f" Notebook: {run.notebook_path}" if run.notebook_path.is_file() else ""
        lines.append(f"  {run.status.upper()} {run.name}: {run.error}.{where}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The book


class BookError(RuntimeError):
    """The book cannot be built (nothing executed yet, or a broken table of contents)."""


def book_toc(matrix: Matrix, profile: str) -> Path:
    """Write the table of contents of ``profile``'s book and return its path.

    ``_toc.yml`` is the template: its ``runs/demo/`` entries are moved to ``runs/<profile>/`` and each
    ``glob`` entry is replaced by the runs of the matrix that have an executed notebook, in matrix
    order. Notebooks left over from runs no longer in the matrix stay out of the book, and a stage
    page that was never executed is dropped together with its runs.
    """
    import fnmatch

    import yaml

    root = matrix.path.parent
    template = yaml.safe_load((root / "_toc.yml").read_text())
    demo_prefix = f"{RUNS_DIRNAME}/demo/"
    executed = [
        str(run.notebook_path.relative_to(root).with_suffix(""))
        for run in plan_runs(matrix, profile)
        if not run.is_page and run.notebook_path.is_file()
    ]

    def localise(name: str) -> str:
        return f"{RUNS_DIRNAME}/{profile}/{name[len(demo_prefix):]}" if name.startswith(demo_prefix) else name

    def exists(docname: str) -> bool:
        return any((root / f"{docname}{suffix}").is_file() for suffix in (".ipynb", ".md", ".py"))

    def expand(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        expanded: list[dict[str, Any]] = []
        for entry in entries:
            if "glob" in entry:
                pattern = localise(entry["glob"])
                expanded += [{"file": docname} for docname in executed if fnmatch.fnmatch(docname, pattern)]
            elif "file" in entry:
                docname = localise(entry["file"])
                if not exists(docname):
                    logger.warning("Leaving %s out of the book: it has not been executed.", docname)
                    continue
                item = {**entry, "file": docname}
                if "sections" in entry:
                    item["sections"] = expand(entry["sections"])
                    if not item["sections"]:
                        del item["sections"]
                expanded.append(item)
            else:
                expanded.append(entry)
        return expanded

    toc = dict(template)
    if "parts" in toc:
        parts = [{**part, "chapters": expand(part.get("chapters", []))} for part in toc["parts"]]
        toc["parts"] = [part for part in parts if part["chapters"]]
    if "chapters" in toc:
        toc["chapters"] = expand(toc["chapters"])
    if not any(docname.startswith(f"{RUNS_DIRNAME}/{profile}/") for docname in _toc_files(toc)):
        raise BookError(
            f"No executed notebook of profile {profile!r} under {root / RUNS_DIRNAME / profile}; "
            f"run `rmsae run --profile {profile}` first."
        )
    target = root / "_build" / "toc" / f"_toc.{profile}.yml"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(yaml.safe_dump(toc, sort_keys=False))
    return target


def _toc_files(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        if "file" in node:
            yield node["file"]
        for value in node.values():
            yield from _toc_files(value)
    elif isinstance(node, list):
        for item in node:
            yield from _toc_files(item)


def book_output(matrix: Matrix, profile: str) -> Path:
    """Folder of the built HTML: ``_build/html`` for the demo profile, ``_build/<profile>/_build/html`` for others."""
    root = matrix.path.parent
    return root / "_build" / "html" if profile == "demo" else root / "_build" / profile / "_build" / "html"


def build_book(matrix: Matrix, profile: str, *, strict: bool = True) -> int:
    """Build the Jupyter Book of ``profile`` from the executed notebooks; return the exit status.

    Notebooks are not executed again. ``strict`` turns Sphinx warnings (a missing glue key, a broken
    reference) into errors. The HTML goes to :func:`book_output`.
    """
    import subprocess

    root = matrix.path.parent
    toc = book_toc(matrix, profile)
    path_output = root if profile == "demo" else root / "_build" / profile
    command = [
        sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
        "build", str(root), "--path-output", str(path_output), "--toc", str(toc),
    ]
    if strict:
        command += ["-W", "-n", "--keep-going"]
    command.append("--all")  # rebuild every page, so each warning is reported on every build
    logger.info("Building the book for profile %s (table of contents %s).", profile, toc)
    return subprocess.run(command, cwd=root).returncode
