"""The experiment matrix, notebook parameters, the papermill runner and the book build.

Runner tests execute real notebooks with papermill (a kernel start costs about 2 s), on small
notebooks written here, so each test stays within seconds.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from rmsae.cli import main
from rmsae.matrix import MatrixError, load_matrix
from rmsae.params import ParameterError, check_all, checked
from rmsae.runner import execute_runs, failures, plan_runs

REPO = Path(__file__).resolve().parents[1]

# -- parameters ---------------------------------------------------------------------------------


def papermill_cli_value(text: str):
    """What `papermill -p NAME TEXT` hands the notebook."""
    from papermill.cli import _resolve_type

    return _resolve_type(text)


def test_parameters_from_the_papermill_command_line():
    assert checked("eta", papermill_cli_value("1e-3"), "float") == pytest.approx(1e-3)
    assert checked("layer", papermill_cli_value("04"), "int") == 4
    assert checked("layer", "04", "int") == 4
    with pytest.raises(ParameterError, match=r"model_tag must be text, got nan \(float\).*-r model_tag"):
        checked("model_tag", papermill_cli_value("nan"), "str")
    with pytest.raises(ParameterError, match="eta must be a finite number"):
        checked("eta", papermill_cli_value("nan"), "float")


def test_parameters_from_yaml():
    values = yaml.safe_load("eta: 1e-3\nlayer: '04'\nlimit: null\nflag: 'yes'\nlayers: 1, 2")
    assert values["eta"] == "1e-3"  # YAML 1.1 reads an exponent without a dot as text
    assert checked("eta", values["eta"], "float") == pytest.approx(1e-3)
    assert checked("layer", values["layer"], "int") == 4
    assert checked("limit", values["limit"], "int", optional=True) is None
    assert checked("flag", values["flag"], "bool") is True
    assert checked("layers", values["layers"], "int_list") == [1, 2]


@pytest.mark.parametrize(
    "value, kind, options, message",
    [
        (4.5, "int", {}, r"layer must be an integer, got 4.5 \(float\)"),
        (True, "int", {}, "must be an integer, got True"),
        (-1, "int", {"minimum": 0}, "must be at least 0, got -1"),
        ("abc", "float", {}, "must be a number such as 1e-3, got 'abc'"),
        (None, "str", {}, "is required, got None"),
        ("   ", "str", {}, "must not be empty"),
        ("maybe", "bool", {}, "must be true or false"),
        ("beta", "str", {"choices": ["all", "demo-eval"]}, "must be one of all, demo-eval, got 'beta'"),
        (float("inf"), "float", {}, "finite"),
    ],
)
def test_parameter_rejections(value, kind, options, message):
    with pytest.raises(ParameterError, match=message):
        checked("layer", value, kind, **options)


def test_check_all_names_missing_parameters():
    assert check_all({"layer": "3"}, {"layer": ("int", {})}) == {"layer": 3}
    with pytest.raises(ParameterError, match=r"\['layer'\] are not defined"):
        check_all({}, {"layer": ("int", {})})
    assert math.isinf(checked("x", "inf", "float", allow_nonfinite=True))


# -- a small project: notebooks, matrix, book ------------------------------------------------------

PROBE = '''\
# %% [markdown]
# # Probe
#
# The glued value is {glue:text}`probe_value`.

# %% tags=["parameters"]
profile = "t"
model_name = "m"
model_tag = "m"
data = "pairs.jsonl"
split = "all"
limit = None
results_path = "probe.json"
value = 1
fail_for = ""

# %%
from rmsae.params import checked
value = checked("value", value, "int")

# %%
import matplotlib.pyplot as plt
from myst_nb import glue
from rmsae.experiments import save_results, show

if model_name == fail_for:
    raise RuntimeError("deliberate failure for " + model_name)
glue("probe_value", value, display=False)
figure, axis = plt.subplots(figsize=(2, 2))
axis.plot([0, 1], [value, value])
show("probe_figure", figure)
n_lines = len(open(data).read().splitlines())
results_file = save_results(results_path, {"value": value, "lines": n_lines, "model": model_name})
'''

LAYERED = '''\
# %% [markdown]
# # Layered

# %% tags=["parameters"]
profile = "t"
model_name = "m"
model_tag = "m"
layer = 0
sae = ""
data = "pairs.jsonl"
split = "all"
limit = None
results_path = "layered.json"

# %%
from rmsae.experiments import save_results
results_file = save_results(results_path, {"layer": layer, "sae": sae})
'''

PAGE = '''\
# %% [markdown]
# # Probe results

# %% tags=["parameters"]
profile = "t"
stage = "probe"
runs_dir = "runs/t"
expected_runs = []
results_path = "probe.json"

# %%
from rmsae.experiments import collect_results, save_results
runs = collect_results(runs_dir, stage, expected_runs)
print(runs[["model", "status"]].to_string(index=False))
results_file = save_results(results_path, {"statuses": dict(zip(runs["model"], runs["status"]))})
'''

TOC = '''\
format: jb-book
root: intro
chapters:
  - file: runs/demo/probe
    sections:
      - glob: runs/demo/*/probe
'''


def write_project(root: Path, *, models=("alpha", "beta"), page: bool = True, fail_for: str = "") -> Path:
    """Write notebooks, data, stand-in model and SAE folders, a matrix and a book config under ``root``."""
    (root / "notebooks").mkdir(parents=True, exist_ok=True)
    (root / "notebooks" / "probe.py").write_text(PROBE)
    (root / "notebooks" / "layered.py").write_text(LAYERED)
    (root / "notebooks" / "probe_page.py").write_text(PAGE)
    (root / "pairs.jsonl").write_text('{"chosen": "a", "rejected": "b"}\n' * 3)

    for model in models:
        (root / "models" / model).mkdir(parents=True, exist_ok=True)
        (root / "models" / model / "config.json").write_text(json.dumps({"name": model}))
        (root / "saes" / f"{model}_layer0").mkdir(parents=True, exist_ok=True)
        (root / "saes" / f"{model}_layer0" / "cfg.json").write_text("{}")

    matrix = {
        "stages": {
            "probe": {"notebook": "notebooks/probe.py", "scope": "model", "timeout": 120,
                      "parameters": {"value": 1, "fail_for": fail_for}},
            "layered": {"notebook": "notebooks/layered.py", "scope": "model_layer", "after": ["probe"], "timeout": 120},
        },
        "profiles": {
            "t": {"data": "pairs.jsonl", "models": {
                model: {"source": f"models/{model}", "layers": [0], "sae": "saes/{model}_layer{layer}"} for model in models
            }},
        },
    }
    if page:
        matrix["stages"]["probe"]["page"] = "notebooks/probe_page.py"
    (root / "experiments.yml").write_text(yaml.safe_dump(matrix, sort_keys=False))

    (root / "_config.yml").write_text(
        'title: test book\nonly_build_toc_files: true\nexclude_patterns: [".*", "_build", "notebooks"]\n'
        'execute:\n  execute_notebooks: "off"\nsphinx:\n  config:\n    html_show_copyright: false\n'
    )
    (root / "_toc.yml").write_text(TOC)
    (root / "intro.md").write_text("# Test book\n\nA page.\n")
    return root / "experiments.yml"


def edit_matrix(path: Path, edit) -> None:
    document = yaml.safe_load(path.read_text())
    edit(document)
    path.write_text(yaml.safe_dump(document, sort_keys=False))


# -- matrix validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["stages"]["probe"].update(colour="red"), r"stages.probe: unknown key\(s\) \['colour'\]"),
        (lambda d: d["stages"]["probe"].update(scope="everything"), "stages.probe.scope must be one of model, model_layer"),
        (lambda d: d["stages"]["probe"].update(notebook="notebooks/none.py"), "stages.probe.notebook: .*none.py does not exist"),
        (lambda d: d["stages"]["probe"]["parameters"].update(eta=1), "stages.probe.parameters.eta: the notebook has no such parameter"),
        (lambda d: d["stages"]["probe"]["parameters"].update(layer=1), "stages.probe.parameters.layer: set by the runner"),
        (lambda d: d["stages"]["probe"].update(timeout="soon"), "stages.probe.timeout must be an integer, got 'soon'"),
        (lambda d: d["stages"]["layered"].update(after=["nothing"]), "stages.layered.after: no stage named 'nothing'"),
        (lambda d: d["stages"]["probe"].update(after=["layered"]), "form a cycle"),
        (lambda d: d["profiles"]["t"]["models"]["alpha"].update(layers="one"), r"profiles.t.models.alpha.layers\[0\] must be an integer"),
        (lambda d: d["profiles"]["t"]["models"]["alpha"].update(layers=[1, 1]), r"layers: \[1, 1\] repeats a layer"),
        (lambda d: d["profiles"]["t"]["models"]["alpha"].pop("source"), "'alpha' is not a registered model tag; add 'source:'"),
        (lambda d: d["profiles"]["t"]["models"]["alpha"].update(sae="/saes/fixed"), r"must be 'demo', 'released', or a folder template containing '\{layer\}'"),
        (lambda d: d["profiles"]["t"].update(limit=0), "profiles.t.limit must be at least 1"),
        (lambda d: d["profiles"]["t"].update(models={}), "profiles.t.models: list at least one model"),
        (lambda d: d["profiles"]["t"].update(parameters={"nostage": {}}), "profiles.t.parameters.nostage: no such stage"),
        (lambda d: d["profiles"]["t"]["models"].update({"bad name": {"layers": [0]}}), "name 'bad name' must be letters"),
        (lambda d: d.pop("profiles"), r"missing key\(s\) \['profiles'\]"),
        (lambda d: d["stages"]["probe"]["parameters"].update(value="32x"), "stages.probe.parameters.value must be an integer, got '32x'"),
        (lambda d: d["profiles"]["t"].update(data="hh-rlfh"), "profiles.t.data: 'hh-rlfh' is neither"),
        (lambda d: d["profiles"]["t"]["models"]["alpha"].update(source="/no/such/folder"), "the folder /no/such/folder does not exist"),
    ],
)
def test_matrix_validation(tmp_path, edit, message):
    path = write_project(tmp_path)
    load_matrix(path)  # the unedited project is valid
    edit_matrix(path, edit)
    with pytest.raises(MatrixError, match=message):
        load_matrix(path)


def test_matrix_rejects_a_dependency_cycle(tmp_path):
    path = write_project(tmp_path)

    def cycle(d):
        d["stages"]["probe"]["after"] = ["other"]
        d["stages"]["other"] = {"notebook": "notebooks/probe.py", "scope": "model", "after": ["probe"]}

    edit_matrix(path, cycle)
    with pytest.raises(MatrixError, match="form a cycle"):
        load_matrix(path)


def test_matrix_file_errors(tmp_path):
    with pytest.raises(MatrixError, match="does not exist; pass --matrix"):
        load_matrix(tmp_path / "missing.yml")
    (tmp_path / "bad.yml").write_text("stages: [unclosed")
    with pytest.raises(MatrixError, match="is not valid YAML"):
        load_matrix(tmp_path / "bad.yml")


def test_cli_reports_a_matrix_error(tmp_path, caplog):
    path = write_project(tmp_path)
    edit_matrix(path, lambda d: d["stages"]["probe"].update(scope="often"))
    assert main(["run", "--matrix", str(path), "--profile", "t"]) == 2
    assert "stages.probe.scope must be one of" in caplog.text


# -- the runner ----------------------------------------------------------------------------------


def statuses(runs):
    return {run.name: run.status for run in runs}


def test_runner_skips_unchanged_runs_and_reruns_on_changes(tmp_path):
    path = write_project(tmp_path, models=("alpha",), page=False)

    def run_probe():
        runs = plan_runs(load_matrix(path), "t", stages=["probe"])
        return list(statuses(execute_runs(runs)).values())

    assert run_probe() == ["ok"]
    results = tmp_path / "runs" / "t" / "alpha" / "probe.json"
    assert json.loads(results.read_text()) == {"value": 1, "lines": 3, "model": "alpha"}
    assert run_probe() == ["skipped"]

    (tmp_path / "pairs.jsonl").write_text('{"chosen": "a", "rejected": "b"}\n' * 5)  # data change
    assert run_probe() == ["ok"]
    assert json.loads(results.read_text())["lines"] == 5
    assert run_probe() == ["skipped"]

    edit_matrix(path, lambda d: d["stages"]["probe"]["parameters"].update(value=7))  # parameter change
    assert run_probe() == ["ok"]
    assert json.loads(results.read_text())["value"] == 7

    source = tmp_path / "notebooks" / "probe.py"
    source.write_text(source.read_text() + "\n# %%\nprint('one more cell')\n")  # notebook change
    assert run_probe() == ["ok"]

    (tmp_path / "models" / "alpha" / "config.json").write_text('{"name": "alpha", "retrained": true}')  # model change
    assert run_probe() == ["ok"]
    assert run_probe() == ["skipped"]


def test_executed_notebook_has_parameters_and_title(tmp_path):
    import nbformat

    path = write_project(tmp_path, models=("alpha",), page=False)
    runs = execute_runs(plan_runs(load_matrix(path), "t", layers=[0]))
    assert [run.status for run in runs] == ["ok", "ok"]
    notebook = nbformat.read(tmp_path / "runs" / "t" / "alpha" / "layer0" / "layered.ipynb", as_version=4)
    assert notebook.cells[0].source.startswith("# Layered: alpha, layer 0")
    injected = [cell for cell in notebook.cells if "injected-parameters" in cell.metadata.get("tags", [])]
    assert "layer = 0" in injected[0].source
    layered = json.loads((tmp_path / "runs" / "t" / "alpha" / "layer0" / "layered.json").read_text())
    assert layered == {"layer": 0, "sae": str(tmp_path / "saes" / "alpha_layer0")}


def test_failing_run_fails_book_only(tmp_path, capsys):
    path = write_project(tmp_path, fail_for="beta")
    status = main(["book", "--matrix", str(path), "--profile", "t"])
    assert status == 1
    out = capsys.readouterr().out
    assert "1 failed, 1 blocked" in out
    assert re.search(r"FAILED t/beta/probe: PapermillExecutionError.*deliberate failure.*Notebook: .*beta/probe.ipynb", out)
    assert "BLOCKED t/beta/layer0/layered: blocked by the failure of t/beta/probe" in out

    runs_root = tmp_path / "runs" / "t"
    assert (runs_root / "alpha" / "layer0" / "layered.json").is_file()
    assert (runs_root / "beta" / "probe.ipynb").is_file()  # kept, with the traceback
    assert not (runs_root / "beta" / "probe.json").exists()
    page_results = json.loads((runs_root / "probe.json").read_text())
    assert page_results == {"statuses": {"alpha": "ok", "beta": "failed"}}

    # The book was still built, and alpha's page shows its glued figure as an image.
    html = (tmp_path / "_build" / "t" / "_build" / "html" / "runs" / "t" / "alpha" / "probe.html").read_text()
    assert len(re.findall(r"<img[^>]+_images/[^>]+\.png", html)) == 1
    assert "The glued value is 1" in re.sub(r"<[^>]+>", "", html)
    assert "&lt;Figure size" not in html

    # Fixed: only the failed and blocked runs execute again.
    edit_matrix(path, lambda d: d["stages"]["probe"]["parameters"].update(fail_for=""))
    runs = execute_runs(plan_runs(load_matrix(path), "t", models=["beta"]))
    assert statuses(runs) == {"t/beta/probe": "ok", "t/probe (page)": "ok", "t/beta/layer0/layered": "ok"}
    assert not failures(runs)


def test_book_build_fails_on_a_missing_glue_key(tmp_path):
    from rmsae.runner import build_book

    path = write_project(tmp_path, models=("alpha",))
    source = tmp_path / "notebooks" / "probe.py"
    source.write_text(source.read_text().replace('glue("probe_value"', 'glue("other_value"'))
    runs = execute_runs(plan_runs(load_matrix(path), "t", stages=["probe"]))
    assert not failures(runs)
    assert build_book(load_matrix(path), "t") != 0


def test_book_lists_only_runs_of_the_matrix(tmp_path, capsys):
    import yaml as yaml_module

    from rmsae.runner import BookError, book_toc

    path = write_project(tmp_path, models=("alpha", "beta"))
    with pytest.raises(BookError, match="No executed notebook of profile 't'.*run `rmsae run --profile t` first"):
        book_toc(load_matrix(path), "t")
    assert main(["book", "--matrix", str(path), "--profile", "t", "--no-run"]) == 2

    assert not failures(execute_runs(plan_runs(load_matrix(path), "t", stages=["probe"])))
    toc = yaml_module.safe_load(book_toc(load_matrix(path), "t").read_text())
    assert toc["chapters"][0]["file"] == "runs/t/probe"
    assert [entry["file"] for entry in toc["chapters"][0]["sections"]] == ["runs/t/alpha/probe", "runs/t/beta/probe"]

    # beta leaves the matrix: its old notebook stays on disk but leaves the book and the page.
    edit_matrix(path, lambda d: d["profiles"]["t"]["models"].pop("beta"))
    runs = execute_runs(plan_runs(load_matrix(path), "t", stages=["probe"]))
    assert statuses(runs) == {"t/alpha/probe": "skipped", "t/probe (page)": "ok"}
    toc = yaml_module.safe_load(book_toc(load_matrix(path), "t").read_text())
    assert [entry["file"] for entry in toc["chapters"][0]["sections"]] == ["runs/t/alpha/probe"]
    assert json.loads((tmp_path / "runs" / "t" / "probe.json").read_text()) == {"statuses": {"alpha": "ok"}}
    assert main(["book", "--matrix", str(path), "--profile", "t", "--no-run"]) == 0
    assert "_build/t/_build/html" in capsys.readouterr().out


def test_selection_does_not_change_fingerprints(tmp_path):
    path = write_project(tmp_path, models=("alpha",))
    assert not failures(execute_runs(plan_runs(load_matrix(path), "t")))
    only_layered = execute_runs(plan_runs(load_matrix(path), "t", stages=["layered"]))
    assert [run.status for run in only_layered] == ["skipped"]
    assert [run.status for run in execute_runs(plan_runs(load_matrix(path), "t"))] == ["skipped"] * 3


def test_runner_rejects_unknown_selection(tmp_path):
    matrix = load_matrix(write_project(tmp_path))
    with pytest.raises(MatrixError, match="no model 'gamma'; it has alpha, beta"):
        plan_runs(matrix, "t", models=["gamma"])
    with pytest.raises(MatrixError, match="No stage 'plot'"):
        plan_runs(matrix, "t", stages=["plot"])
    with pytest.raises(MatrixError, match="lists layer 9"):
        plan_runs(matrix, "t", layers=[9])
    with pytest.raises(MatrixError, match="no profile 'paper'"):
        plan_runs(matrix, "paper")
    with pytest.raises(ValueError, match="jobs must be a positive integer"):
        execute_runs([], jobs=0)


def test_model_stage_waits_for_every_layer(tmp_path):
    path = write_project(tmp_path)
    document = yaml.safe_load(path.read_text())
    document["stages"]["summary"] = {"notebook": "notebooks/probe.py", "scope": "model", "after": ["layered"], "timeout": 120}
    document["profiles"]["t"]["models"]["alpha"]["layers"] = [0, 1]
    (tmp_path / "saes" / "alpha_layer1").mkdir()
    (tmp_path / "saes" / "alpha_layer1" / "cfg.json").write_text("{}")
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    runs = plan_runs(load_matrix(path), "t")
    summary = next(run for run in runs if run.name == "t/alpha/summary")
    assert sorted(run.name for run in summary.depends_on) == ["t/alpha/layer0/layered", "t/alpha/layer1/layered"]
    assert len(summary.upstream_records) == 2
    assert runs.index(summary) > max(runs.index(run) for run in summary.depends_on)


def test_entry_runs_registered_model_on_other_data(tmp_path):
    path = write_project(tmp_path)
    document = yaml.safe_load(path.read_text())
    document["profiles"]["t"]["models"] = {
        "beaver-2-7b": {"layers": [0], "sae": "released"},
        "beaver-tqa": {"source": "beaver-2-7b", "data": "truthfulqa", "split": "all", "layers": [0], "sae": "released"},
        "beaver-local": {"source": "beaver-2-7b", "layers": [0], "sae": "saes/{model}_layer{layer}"},
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    runs = {run.name: run.parameters for run in plan_runs(load_matrix(path), "t") if not run.is_page}
    assert runs["t/beaver-2-7b/layer0/layered"]["sae"] == "released"
    assert runs["t/beaver-2-7b/layer0/layered"]["data"].endswith("pairs.jsonl")
    tqa = runs["t/beaver-tqa/layer0/layered"]
    assert (tqa["model_tag"], tqa["data"], tqa["split"], tqa["sae"]) == ("beaver-2-7b", "truthfulqa", "all", "released:beaver-2-7b")
    assert runs["t/beaver-local/layer0/layered"]["sae"].endswith("saes/beaver-2-7b_layer0")

    document["profiles"]["t"]["models"]["beaver-tqa"]["split"] = "half"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    with pytest.raises(MatrixError, match="beaver-tqa.split must be one of all, demo-eval"):
        load_matrix(path)


def test_parallel_jobs_respect_dependencies(tmp_path):
    path = write_project(tmp_path)
    runs = execute_runs(plan_runs(load_matrix(path), "t"), jobs=2)
    assert all(run.status == "ok" for run in runs)
    finished = {run.name: json.loads(run.record_path.read_text())["finished"] for run in runs}
    assert finished["t/alpha/layer0/layered"] >= finished["t/alpha/probe"]
    assert finished["t/probe (page)"] >= max(finished["t/alpha/probe"], finished["t/beta/probe"])


# -- the repository's own matrix ------------------------------------------------------------------


def test_repository_matrix_profiles():
    from rmsae.demo import demo_sae_dir

    matrix = load_matrix(REPO / "experiments.yml")
    demo = plan_runs(matrix, "demo")
    paper = plan_runs(matrix, "paper")
    # reward_model, sae, perturbations, detection, mitigation, utility, features and deviations, each with its page.
    # Each demo model runs on HH-RLHF at four layers and on TruthfulQA at two.
    assert len(demo) == 4 + 1 + 12 + 1 + 4 + 1 + 12 + 1 + 12 + 1 + 12 + 1 + 12 + 1 + 4 + 1
    truthfulqa = [run.parameters for run in demo if not run.is_page and run.model.name == "demo-minilm-hh-truthfulqa"]
    assert {(p["model_tag"], p["data"], p["split"]) for p in truthfulqa} == {("demo-minilm-hh", "truthfulqa", "all")}
    assert {p["sae"] for p in truthfulqa if "sae" in p} == {str(demo_sae_dir("demo-minilm-hh", layer)) for layer in (2, 4)}
    assert len(paper) == 4 + 1 + 16 + 1 + 4 + 1 + 16 + 1 + 16 + 1 + 16 + 1 + 16 + 1 + 4 + 1
    utility = [run for run in demo if run.stage.name == "utility" and not run.is_page]
    assert {run.parameters["benchmark"] for run in utility} == {"demo"}
    assert {run.parameters["benchmark"] for run in paper if run.stage.name == "utility" and not run.is_page} == {"rewardbench2"}
    sae_runs = [run for run in paper if run.stage.name == "sae" and not run.is_page]
    assert {(run.model.name, run.layer) for run in sae_runs} == {
        (tag, layer) for tag in ("beaver-2-7b", "llama-7b-poisoned", "llama-3-8b", "qwen-3-4b") for layer in (4, 12, 20, 28)
    }
    first = sae_runs[0].parameters
    assert first["sae"] == "released"
    assert (first["device"], first["device_map"]) == ("auto", "spec")
    assert first["split"] == "all"
    assert first["data"] == "hh-rlhf"
    assert isinstance(first["layer"], int) and first["batch_size"] == 8
    for run in demo:
        if run.stage.name == "sae" and not run.is_page:
            assert run.parameters["sae"].endswith(f"demo/saes/{run.model.sae_model}_layer{run.layer}")
    # Every stage has a page in the table of contents.
    toc = (REPO / "_toc.yml").read_text()
    for stage in matrix.stages:
        assert f"runs/demo/{stage}" in toc


def test_notebook_parameter_cells_match_the_runner():
    """Every parameter the runner passes is assigned in the notebook's parameters cell."""
    from rmsae.matrix import notebook_parameters

    matrix = load_matrix(REPO / "experiments.yml")
    for run in plan_runs(matrix, "paper"):
        assert set(run.parameters) <= set(notebook_parameters(run.source)), run.name


def test_paper_profile_runs_against_stand_ins(tmp_path, monkeypatch, tiny_models, shared_data):
    """One paper-profile run, unchanged, with a tiny LlamaForScore in the hub cache under Beaver's id
    and a Gated SAE in the released layout under $SAE_CHECKPOINT."""
    import torch
    from conftest import _decoder_config, _randomise_head
    from test_sae import save_gated_sae
    from transformers import AutoTokenizer

    from rmsae.score_model import LlamaForScore

    snapshot = tmp_path / "hub" / "models--PKU-Alignment--beaver-7b-v2.0-reward" / "snapshots" / ("0" * 40)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["score_model"])
    config = _decoder_config("llama", tokenizer)
    config.num_hidden_layers = 5  # the paper profile's first layer is block 4
    config.architectures = ["LlamaForScore"]
    config.score_dim, config.bias = 1, False
    torch.manual_seed(3)
    model = LlamaForScore(config)
    _randomise_head(model, 3)
    model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    save_gated_sae(tmp_path / "released" / "beaver-2-7b_layer4", d_in=64, metadata={"hook_name": "model.layers.4"})

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SAE_CHECKPOINT", str(tmp_path / "released"))
    monkeypatch.setenv("RMSAE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("RMSAE_DATA_DIR", str(shared_data))
    matrix = load_matrix(REPO / "experiments.yml")
    runs = plan_runs(
        matrix, "paper", models=["beaver-2-7b"], layers=[4], stages=["reward_model", "sae"], limit=6, runs_dir=tmp_path / "runs"
    )
    assert [run.name for run in runs] == ["paper/beaver-2-7b/reward_model", "paper/reward_model (page)",
                                          "paper/beaver-2-7b/layer4/sae", "paper/sae (page)"]
    execute_runs(runs)
    assert [run.status for run in runs] == ["ok"] * 4, [run.error for run in runs]
    results = json.loads((tmp_path / "runs" / "paper" / "beaver-2-7b" / "layer4" / "sae.json").read_text())
    assert results["pairs"] == 6
    assert results["d_sae"] == 256
    assert 0 < results["l0"] <= 256
    assert results["eval_tokens"] > 0


def test_repository_notebook_stops_on_a_bad_parameter(tmp_path):
    """`papermill notebooks/sae.py ... -p model_tag nan -p layer 04` stops at the check, naming model_tag."""
    import jupytext
    import nbformat
    import papermill

    source = tmp_path / "sae.ipynb"
    nbformat.write(jupytext.read(REPO / "notebooks" / "sae.py"), source)
    parameters = {"model_tag": papermill_cli_value("nan"), "layer": papermill_cli_value("04")}
    with pytest.raises(papermill.PapermillExecutionError, match="Parameter model_tag must be text, got nan"):
        papermill.execute_notebook(str(source), str(tmp_path / "out.ipynb"), parameters=parameters,
                                   kernel_name="python3", progress_bar=False, cwd=str(tmp_path))


def test_unselected_upstream_must_have_run(tmp_path, caplog):
    path = write_project(tmp_path)
    runs = execute_runs(plan_runs(load_matrix(path), "t", stages=["layered"]))
    assert {run.status for run in runs} == {"blocked"}
    assert "needs" in runs[0].error
    assert "probe" in runs[0].error

    # Layer 1 exists for beta only, so this selection is valid but empty.
    document = yaml.safe_load(path.read_text())
    document["profiles"]["t"]["models"]["beta"]["layers"] = [0, 1]
    (tmp_path / "saes" / "beta_layer1").mkdir()
    (tmp_path / "saes" / "beta_layer1" / "cfg.json").write_text("{}")
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    assert main(["run", "--matrix", str(path), "--profile", "t", "--models", "alpha", "--layers", "1", "--stages", "layered"]) == 2
    assert "--models alpha --layers 1 --stages layered matches no run" in caplog.text
