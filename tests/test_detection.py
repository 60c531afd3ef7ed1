"""Detection: data set from records, grouped splits, the MLP detector, metrics and transfer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from rmsae.data import PerturbationRecord, PreferencePair, Turn
from rmsae.detection import (
    DetectionData,
    DetectionError,
    MLPDetector,
    SplitManifest,
    build_detection_data,
    detection_metrics,
    detection_samples,
    load_or_make_split,
    make_split,
    run_detection,
    transfer_matrix,
)
from rmsae.perturb import with_trigger
from rmsae.reward_model import load_reward_model
from rmsae.sae import load_sae

from test_sae import HIDDEN, save_gated_sae


def synthetic_data(n_cases: int = 60, width: int = 16, *, planted: float = 3.0, kinds=("backdoor", "prompt_injection"), seed: int = 0) -> DetectionData:
    """Two samples per case and type; feature 0 of perturbed samples is shifted by ``planted``."""
    rng = np.random.default_rng(seed)
    rows = []
    for case in range(n_cases):
        for kind in kinds[: 1 + case % len(kinds)]:  # some cases are attacked by several types
            for label in (0, 1):
                rows.append((f"case{case:03d}", kind, ("original", "perturbed")[label], label))
    features = rng.normal(size=(len(rows), width)).astype(np.float32)
    labels = np.array([row[3] for row in rows])
    features[:, 0] += planted * labels
    return DetectionData(
        case_ids=np.array([row[0] for row in rows]),
        attack_types=np.array([row[1] for row in rows]),
        variants=np.array([row[2] for row in rows]),
        labels=labels,
        features={"sae": features},
    )


# -- splits --------------------------------------------------------------------------------------


def test_grouped_split_keeps_each_case_on_one_side():
    data = synthetic_data(n_cases=90)
    manifest = make_split(data, seed=3)
    sides = manifest.sides(data)
    for case in set(data.case_ids.tolist()):
        assert len(set(sides[data.case_ids == case].tolist())) == 1, case
    # Stratified: each combination of types gets about 30% test and 15% validation cases.
    for stratum in ("backdoor", "backdoor+prompt_injection"):
        cases = sorted({c for c in data.case_ids if "+".join(sorted(set(data.attack_types[data.case_ids == c]))) == stratum})
        test = sum(manifest.assignments[c] == "test" for c in cases)
        assert test == round(0.3 * len(cases))
    assert manifest.assignments == make_split(data, seed=3).assignments
    assert manifest.assignments != make_split(data, seed=4).assignments


def test_ungrouped_split_is_by_sample():
    data = synthetic_data(n_cases=90)
    manifest = make_split(data, mode="ungrouped", seed=0)
    sides = manifest.sides(data)
    split_cases = [c for c in set(data.case_ids.tolist()) if len(set(sides[data.case_ids == c].tolist())) > 1]
    assert split_cases, "the authors' split should separate some cases' samples"
    assert sum(side == "test" for side in sides) == round(0.3 * (len(data) // 2)) * 2


def test_manifest_round_trip_and_reuse(tmp_path, caplog):
    data = synthetic_data(n_cases=40)
    path = tmp_path / "split.json"
    first = load_or_make_split(path, data, seed=1)
    saved = json.loads(path.read_text())
    assert saved["units"] == "case"
    assert sum(saved["counts"].values()) == 40
    assert SplitManifest.load(path).assignments == first.assignments

    # The same settings and samples reuse the file; other settings write a new one.
    path.write_text(path.read_text().replace('"test"', '"test"', 1))
    assert load_or_make_split(path, data, seed=1).assignments == first.assignments
    assert load_or_make_split(path, data, seed=2).seed == 2
    assert json.loads(path.read_text())["seed"] == 2

    path.write_text("{not json")
    assert load_or_make_split(path, data, seed=2).seed == 2
    assert "not valid JSON" in caplog.text
    for malformed in ("3", "null", '{"mode": "grouped", "seed": "x", "test_ratio": 0.3, "validation_ratio": 0.1, "assignments": {}}',
                      '{"mode": "grouped", "seed": 0, "test_ratio": 0.3, "validation_ratio": 0.1, "assignments": ["a"]}'):
        path.write_text(malformed)
        with pytest.raises(DetectionError, match="delete it and rerun detection"):
            SplitManifest.load(path)
        assert load_or_make_split(path, data, seed=2).seed == 2

    fewer = data.subset(data.case_ids != "case000")
    with pytest.raises(DetectionError, match="not in the split manifest"):
        make_split(fewer, seed=2).sides(data)
    with pytest.raises(FileNotFoundError, match="detection stage writes it"):
        SplitManifest.load(tmp_path / "missing.json")


def test_split_rejects_bad_settings():
    data = synthetic_data(n_cases=10)
    with pytest.raises(DetectionError, match="mode must be one of"):
        make_split(data, mode="by-prompt")
    with pytest.raises(DetectionError, match="test_ratio must be a number between 0 and 1"):
        make_split(data, test_ratio=1.5)
    with pytest.raises(DetectionError, match="leave cases to train on"):
        make_split(data, test_ratio=0.6, validation_ratio=0.4)


# -- metrics -------------------------------------------------------------------------------------


def test_metrics_on_a_hand_built_case():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.1, 0.6, 0.4, 0.9])
    metrics = detection_metrics(y, p, n_resamples=200)
    # Positives 0.4 and 0.9 beat negative 0.1; only 0.9 beats 0.6: AUC = 3/4.
    assert metrics["roc_auc"] == pytest.approx(0.75) == roc_auc_score(y, p)
    assert metrics["accuracy"] == 0.5
    predicted = (p > 0.5).astype(int)
    assert metrics["precision"] == precision_score(y, predicted)
    assert metrics["recall"] == recall_score(y, predicted)
    assert metrics["f1"] == f1_score(y, predicted)
    assert metrics["confusion_matrix"] == [[1, 1], [1, 1]]
    assert metrics["roc_auc_low"] <= 0.75 <= metrics["roc_auc_high"]

    ties = detection_metrics(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.2, 0.8]), n_resamples=10)
    assert ties["roc_auc"] == roc_auc_score([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.8])
    one_class = detection_metrics(np.array([1, 1]), np.array([0.7, 0.2]), n_resamples=10)
    assert np.isnan(one_class["roc_auc"])
    assert one_class["recall"] == 0.5
    with pytest.raises(DetectionError, match="same non-zero length"):
        detection_metrics(np.array([0, 1]), np.array([0.5]))
    with pytest.raises(DetectionError, match="labels 0 \\(benign\\) and 1"):
        detection_metrics(np.array([-1, 1]), np.array([0.2, 0.8]))
    with pytest.raises(DetectionError, match="NaN or infinite"):
        detection_metrics(np.array([0, 1]), np.array([np.nan, 0.8]))
    with pytest.raises(DetectionError, match="groups must name the case of each sample"):
        detection_metrics(np.array([0, 1]), np.array([0.2, 0.8]), groups=["a"])
    with pytest.raises(DetectionError, match="n_resamples must be a positive integer"):
        detection_metrics(np.array([0, 1]), np.array([0.2, 0.8]), n_resamples=0)


def test_grouped_bootstrap_resamples_whole_cases():
    y = np.array([0, 1] * 20)
    p = np.where(y == 1, 0.8, 0.2)
    p[:4] = [0.9, 0.1, 0.9, 0.1]  # two cases scored the wrong way round
    groups = np.repeat(np.arange(20), 2)
    by_case = detection_metrics(y, p, groups=groups, n_resamples=500, seed=0)
    by_sample = detection_metrics(y, p, n_resamples=500, seed=0)
    assert by_case["accuracy"] == by_sample["accuracy"] == 0.9
    # Resampling cases moves both of a case's samples together, so the interval is wider.
    assert by_case["accuracy_high"] - by_case["accuracy_low"] > by_sample["accuracy_high"] - by_sample["accuracy_low"]
    # A case drawn twice must not count its own positive-negative comparison four times.
    assert by_case["roc_auc_low"] <= by_case["roc_auc"] <= by_case["roc_auc_high"]


# -- the detector --------------------------------------------------------------------------------


def test_planted_feature_and_shuffled_labels():
    data = synthetic_data(n_cases=120, planted=4.0)
    manifest = make_split(data, seed=0)
    results = run_detection(data, manifest, detector_params={"max_epochs": 60}, n_resamples=100)
    assert results["sae"]["overall"]["roc_auc"] > 0.95
    assert results["sae"]["logistic"]["overall"]["roc_auc"] > 0.95
    assert set(results["sae"]["per_type"]) == {"backdoor", "prompt_injection"}
    transfer = results["sae"]["transfer"]
    assert transfer["backdoor"]["prompt_injection"] > 0.9

    shuffled = synthetic_data(n_cases=120, planted=4.0)
    shuffled.labels = np.random.default_rng(1).permutation(shuffled.labels)
    results = run_detection(shuffled, make_split(shuffled, seed=0), detector_params={"max_epochs": 60},
                            n_resamples=100, transfer=False)
    assert abs(results["sae"]["overall"]["roc_auc"] - 0.5) < 0.15
    assert len(results["sae"]["samples"]) == results["sae"]["overall"]["n"]


def validation_loss(detector: MLPDetector, X: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        logits = detector.model_(torch.from_numpy(X)).squeeze(1)
        return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(y).float()))


def test_best_epoch_weights_are_the_ones_kept():
    data = synthetic_data(n_cases=80, planted=1.0, width=64)
    X, y = data.features["sae"], data.labels
    X_train, y_train, X_val, y_val = X[:100], y[:100], X[100:], y[100:]
    detector = MLPDetector(max_epochs=40, patience=40, seed=0).fit(X_train, y_train, validation=(X_val, y_val))
    assert detector.n_epochs_ == 40
    assert detector.best_epoch_ < 40  # it overfits 64 noise features
    assert validation_loss(detector, X_val, y_val) == pytest.approx(detector.best_loss_, abs=1e-6)
    assert detector.history_[detector.best_epoch_ - 1]["validation_loss"] == detector.best_loss_
    assert detector.best_loss_ == min(entry["validation_loss"] for entry in detector.history_)

    # The authors' behaviour: both watch the training loss, and the last epoch's weights stay.
    authors = MLPDetector(max_epochs=40, patience=40, monitor="training", restore_best=False, seed=0)
    authors.fit(X_train, y_train, validation=(X_val, y_val))
    assert validation_loss(authors, X_val, y_val) == pytest.approx(authors.history_[-1]["validation_loss"], abs=1e-6)


def test_detector_is_a_scikit_learn_estimator():
    data = synthetic_data(n_cases=40, planted=4.0)
    X, y = data.features["sae"], data.labels
    # 33 training samples with batch size 32 leave a final batch of one, which BatchNorm cannot train on.
    detector = clone(MLPDetector(max_epochs=5, batch_size=32)).fit(X[:33], y[:33], validation=(X[33:], y[33:]))
    assert detector.predict_proba(X).shape == (len(X), 2)
    assert np.allclose(detector.predict_proba(X).sum(axis=1), 1.0)
    assert set(detector.predict(X).tolist()) <= {0, 1}
    assert 0.0 <= detector.score(X, y) <= 1.0
    assert MLPDetector(max_epochs=3).fit(X, y).n_epochs_ <= 3  # holds out its own validation set


@pytest.mark.parametrize(
    "settings, X, y, message",
    [
        ({"batch_size": 0}, None, None, "batch_size must be an integer of at least 2, got 0"),
        ({"batch_size": 1}, None, None, "batch_size must be an integer of at least 2, got 1"),
        ({"hidden_dims": []}, None, None, "hidden_dims must be a list of positive integers"),
        ({"dropout": "0.3"}, None, None, "dropout must be a number in \\[0.0, 1.0\\), got '0.3'"),
        ({"validation_fraction": 0.0}, None, None, "validation_fraction must be a number in \\(0.0, 1.0\\)"),
        ({"monitor": "test"}, None, None, "monitor must be 'validation' or 'training'"),
        ({}, np.full((4, 3), np.nan), np.array([0, 1, 0, 1]), "NaN or infinite"),
        ({}, np.ones((4, 3)), np.array([0, 2, 0, 1]), "labels 0 \\(benign\\) and 1"),
        ({}, np.ones((4, 3)), np.array([1, 1, 1, 1]), "contains only label 1"),
        ({}, np.ones(4), np.array([0, 1, 0, 1]), "2-D array"),
    ],
)
def test_detector_rejects_bad_input(settings, X, y, message):
    X = np.random.default_rng(0).normal(size=(8, 3)) if X is None else X
    y = np.array([0, 1] * 4) if y is None else y
    with pytest.raises(DetectionError, match=message):
        MLPDetector(**settings).fit(X, y)


def test_detector_checks_prediction_input():
    with pytest.raises(DetectionError, match="not fitted yet"):
        MLPDetector().predict(np.ones((2, 3)))
    detector = MLPDetector(max_epochs=2).fit(np.random.default_rng(0).normal(size=(20, 3)), np.array([0, 1] * 10))
    with pytest.raises(DetectionError, match="X has 4 features, but the detector was fitted on 3"):
        detector.predict(np.ones((2, 4)))


# -- the data set from records -------------------------------------------------------------------


def record(question: str, chosen: str, rejected: str, *, initial: float, final: float, kind: str = "backdoor",
           model: str | None = None) -> PerturbationRecord:
    original = PreferencePair((Turn("user", question),), chosen, rejected)
    perturbed = with_trigger(original) if kind == "backdoor" else PreferencePair(original.prompt, chosen + " Bad.", rejected)
    rewards = lambda diff: {"chosen": diff, "rejected": 0.0, "diff": diff}  # noqa: E731
    return PerturbationRecord(original, perturbed, kind, rewards(initial), rewards(final), (), {"model": model} if model else {})


RECORDS = [
    record("How do I bake bread?", "Mix flour and water.", "No.", initial=1.0, final=-0.5),
    record("Where is Paris?", "In France.", "Nowhere.", initial=0.4, final=0.1),  # not flipped
    record("Is fire hot?", "Yes, very.", "No idea.", initial=-0.2, final=-0.6),  # wrong from the start
    record("Where is Paris?", "In France.", "Nowhere.", initial=0.4, final=-0.3, kind="prompt_injection"),
]


def test_samples_from_records():
    samples = detection_samples(RECORDS)
    assert [(s[1], s[2], s[3]) for s in samples] == [
        ("backdoor", "original", 0), ("backdoor", "perturbed", 1),
        ("prompt_injection", "original", 0), ("prompt_injection", "perturbed", 1),
    ]
    assert samples[0][0] == RECORDS[0].case_id
    assert samples[1][4].prompt[-1].content.endswith("SUDO")
    # τ = 0.5 keeps only the case whose gap went from above 0.5 to at most -0.5.
    assert len(detection_samples(RECORDS, reward_threshold=0.5)) == 2

    # The secondary experiment labels distinct originals by whether the RM ranks them wrongly.
    initial = detection_samples(RECORDS, case_type="initial_classification", balance=False)
    assert sorted(s[3] for s in initial) == [0, 0, 1]
    balanced = detection_samples(RECORDS, case_type="initial_classification", balance=True, seed=0)
    assert sorted(s[3] for s in balanced) == [0, 1]


def test_samples_reject_unusable_records():
    with pytest.raises(DetectionError, match="None of the 1 records is a successful perturbation"):
        detection_samples([RECORDS[1]])
    with pytest.raises(DetectionError, match="No perturbation records"):
        detection_samples([])
    with pytest.raises(DetectionError, match="generated with other-rm, not tiny"):
        detection_samples([record("q?", "a", "b", initial=1, final=-1, model="other-rm")], model="tiny")
    with pytest.raises(DetectionError, match="case_type must be one of"):
        detection_samples(RECORDS, case_type="attacked")
    with pytest.raises(DetectionError, match="reward_threshold must be a finite number >= 0"):
        detection_samples(RECORDS, reward_threshold=-1)


def test_features_are_absolute_differences_of_pooled_features(tmp_path, tiny_models):
    reward_model = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    sae = load_sae(save_gated_sae(tmp_path / "tiny_layer1", metadata={"hook_name": "model.layers.1"}), layer=1, d_model=HIDDEN)
    data = build_detection_data(reward_model, RECORDS, layer=1, sae=sae, batch_size=2, progress=False)
    assert len(data) == 4
    assert data.labels.tolist() == [0, 1, 0, 1]
    assert data.features["sae"].shape == (4, 256)
    assert data.features["raw"].shape == (4, HIDDEN)

    perturbed = RECORDS[0].perturbed
    scored = reward_model.score_pairs([perturbed], layers=[1], saes=[sae], progress=False)
    np.testing.assert_allclose(data.features["sae"][1], np.abs(scored.chosen.codes(sae) - scored.rejected.codes(sae))[0], atol=1e-6)
    with torch.no_grad():
        hidden = [
            reward_model.model.model(input_ids=torch.tensor([reward_model.encode(reward_model.render(perturbed.conversation(side))).input_ids]),
                                     output_hidden_states=True).hidden_states[2][0].mean(dim=0)
            for side in ("chosen", "rejected")
        ]
    np.testing.assert_allclose(data.features["raw"][1], (hidden[0] - hidden[1]).abs().numpy(), rtol=1e-4, atol=1e-5)

    with pytest.raises(DetectionError, match="needs an SAE"):
        build_detection_data(reward_model, RECORDS, layer=1, progress=False)
    with pytest.raises(DetectionError, match="reads layer 1, but detection runs at layer 0"):
        build_detection_data(reward_model, RECORDS, layer=0, sae=sae, progress=False)
    # The layer the SAE is hooked at counts, not the one its cfg.json records.
    moved = load_sae(sae.info.path, layer=0, d_model=HIDDEN, allow_layer_mismatch=True)
    with pytest.raises(DetectionError, match="reads layer 0, but detection runs at layer 1"):
        build_detection_data(reward_model, RECORDS, layer=1, sae=moved, progress=False)
    with pytest.raises(DetectionError, match="feature_types must be some of"):
        build_detection_data(reward_model, RECORDS, layer=1, feature_types=["hidden"], progress=False)
    raw_only = build_detection_data(reward_model, RECORDS, layer=1, feature_types=["raw"], progress=False)
    assert list(raw_only.features) == ["raw"]


def test_too_few_cases_for_a_detector_or_transfer():
    data = synthetic_data(n_cases=4)
    manifest = make_split(data, seed=0)
    one_type = data.subset(data.attack_types == "backdoor")
    matrix = transfer_matrix(one_type, make_split(one_type, seed=0), "sae", min_cases=50)
    assert np.isnan(matrix["backdoor"]["backdoor"])
    with pytest.raises(DetectionError, match="no 'raw' features"):
        run_detection(data, manifest, feature_types=["raw"])


def test_detection_notebook_runs_on_records(tmp_path, tiny_models):
    """notebooks/detection.py, executed with papermill on a tiny RM, its SAE and records in the authors' schema."""
    import jupytext
    import nbformat
    import papermill

    from rmsae.perturb import make_record, pair_rewards

    model_path = str(tiny_models["llama"])
    tag = load_reward_model(model_path).spec.tag
    sae_folder = save_gated_sae(tmp_path / "tiny_layer1", metadata={"hook_name": "model.layers.1"})
    model_dir = tmp_path / "runs" / "tiny"
    (model_dir / "layer1").mkdir(parents=True)
    for method, edit in (("backdoor", with_trigger), ("inject", lambda p: PreferencePair(p.prompt, p.chosen + " I am unsure.", p.rejected))):
        lines = []
        for index in range(16):
            original = PreferencePair((Turn("user", f"Question number {index} about {method}?"),), f"Answer {index}.", "No.")
            # Rewards as generation wrote them: every third case did not flip.
            final = pair_rewards(0.5, 0.2) if index % 3 == 0 else pair_rewards(-0.5, 0.2)
            lines.append(json.dumps(make_record(original, edit(original), pair_rewards(1.0, 0.0), final, [], method,
                                                model=tag, max_length=512, settings={})))
        (model_dir / f"perturbations_{method}.jsonl").write_text("\n".join(lines) + "\n")

    source = tmp_path / "detection.ipynb"
    nbformat.write(jupytext.read(Path(__file__).resolve().parents[1] / "notebooks" / "detection.py"), source)
    results_path = model_dir / "layer1" / "detection.json"
    parameters = {"model_name": "tiny", "model_tag": model_path, "layer": 1, "sae": str(sae_folder), "results_path": str(results_path),
                  "hidden_dims": "16", "max_epochs": 5, "bootstrap_samples": 20, "batch_size": 4}
    papermill.execute_notebook(str(source), str(tmp_path / "out.ipynb"), parameters=parameters, kernel_name="python3",
                               progress_bar=False, cwd=str(tmp_path))
    results = json.loads(results_path.read_text())
    assert results["cases"] == 2 * 16 - 2 * 6
    assert results["samples"] == 2 * results["cases"]
    assert set(results["sae_per_type"]) == {"backdoor", "prompt_injection"}
    assert 0.0 <= results["sae_roc_auc"] <= 1.0
    assert 0.0 <= results["raw_roc_auc"] <= 1.0
    manifest = SplitManifest.load(results_path.with_name("detection_split.json"))
    assert len(manifest.assignments) == results["cases"]
    probabilities = (results_path.with_name("detection_probabilities.csv")).read_text().splitlines()
    assert len(probabilities) == 1 + 2 * results["sae_n"]

    # The mitigation notebook fits its methods on the same split and evaluates them on its test cases.
    source = tmp_path / "mitigation.ipynb"
    nbformat.write(jupytext.read(Path(__file__).resolve().parents[1] / "notebooks" / "mitigation.py"), source)
    parameters.update(results_path=str(model_dir / "layer1" / "mitigation.json"), top_k=20, top_k_sweep="5,20", eta_sweep="-0.001,-1",
                      rc_epochs=5, rc_epochs_sweep="5", beta_sweep="5")
    papermill.execute_notebook(str(source), str(tmp_path / "out_mitigation.ipynb"), parameters=parameters, kernel_name="python3",
                               progress_bar=False, cwd=str(tmp_path))
    mitigation = json.loads((model_dir / "layer1" / "mitigation.json").read_text())
    assert mitigation["cases"] == {side: list(manifest.assignments.values()).count(side) for side in ("train", "validation", "test")}
    assert set(mitigation["methods"]) == {"SAE FS, η = 1 (control)", "SAE FS, η = -0.001", "SAE FS, η = -0.001, error_preserving",
                                          "SAE RC", "Raw FS, β = 5"}
    control = mitigation["methods"]["SAE FS, η = 1 (control)"]["overall"]
    assert control["cases"] == mitigation["cases"]["test"]
    assert 0.0 <= control["perturbed_accuracy_after"] <= 1.0
    assert {(row["parameter"], row["value"]) for row in mitigation["ablations"]} == {
        ("eta", -0.001), ("eta", -1.0), ("top_k", 5), ("top_k", 20), ("rc_epochs", 5), ("beta", 5.0)}
    for name in ("sae_feature_steering", "raw_feature_steering", "residual_correction"):
        assert (model_dir / "layer1" / f"{name}.safetensors").is_file()

    # The utility notebook reloads the three fitted methods and scores a RewardBench 2 file with each.
    benchmark = tmp_path / "rb2.jsonl"
    benchmark.write_text("".join(json.dumps(item) + "\n" for item in [
        {"id": "1", "prompt": "Name a colour.", "chosen": ["Blue."], "rejected": ["Seven.", "No.", "A dog."], "subset": "Focus"},
        {"id": "ref:1", "prompt": "Say a prime.", "chosen": ["Two."], "rejected": ["Four.", "Nine."], "subset": "Ties"},
        {"id": "tied:1", "prompt": "Say a prime.", "chosen": ["Two.", "Three."], "rejected": ["Four."], "subset": "Ties"},
    ]))
    source = tmp_path / "utility.ipynb"
    nbformat.write(jupytext.read(Path(__file__).resolve().parents[1] / "notebooks" / "utility.py"), source)
    utility_parameters = {key: parameters[key] for key in ("model_name", "model_tag", "layer", "sae", "batch_size")}
    utility_parameters.update(results_path=str(model_dir / "layer1" / "utility.json"), benchmark="rewardbench2", benchmark_path=str(benchmark))
    papermill.execute_notebook(str(source), str(tmp_path / "out_utility.ipynb"), parameters=utility_parameters, kernel_name="python3",
                               progress_bar=False, cwd=str(tmp_path))
    utility = json.loads((model_dir / "layer1" / "utility.json").read_text())
    assert utility["prompts"] == 3
    assert utility["completions"] == 4 + 3 + 3
    assert set(utility["methods"]) == {"base", "SAE FS, η = 1 (control)", "SAE FS, η = -0.001", "SAE RC", "Raw FS, β = 5"}
    from rmsae.rewardbench import flatten_conversations, load_rewardbench2, official_scores, split_scores

    prompts = load_rewardbench2(benchmark)
    rewards = load_reward_model(model_path).score_conversations(flatten_conversations(prompts), progress=False).rewards
    expected = official_scores(prompts, split_scores(prompts, rewards))
    assert utility["methods"]["base"]["official"]["overall"] == pytest.approx(expected["overall"], abs=1e-6)
    assert utility["partial_forward"] is True

    # The feature analysis counts activation rates over all cases and inspects the top-ranked latents.
    source = tmp_path / "features.ipynb"
    nbformat.write(jupytext.read(Path(__file__).resolve().parents[1] / "notebooks" / "features.py"), source)
    feature_parameters = {key: parameters[key] for key in ("model_name", "model_tag", "layer", "sae", "batch_size")}
    feature_parameters.update(results_path=str(model_dir / "layer1" / "features.json"), top_latents=6, inspected_latents=2,
                              examples_per_latent=3)
    papermill.execute_notebook(str(source), str(tmp_path / "out_features.ipynb"), parameters=feature_parameters, kernel_name="python3",
                               progress_bar=False, cwd=str(tmp_path))
    features = json.loads((model_dir / "layer1" / "features.json").read_text())
    assert features["cases"] == results["cases"]
    assert features["latents"] == 256
    assert len(features["top_latents"]) == 6
    assert len(features["examples"]) == 2 * 3
    statistics = (model_dir / "layer1" / "feature_statistics.csv").read_text().splitlines()
    assert len(statistics) == 1 + 256
