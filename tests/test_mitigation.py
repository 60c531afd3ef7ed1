"""Mitigation: SAE Feature Steering, Raw Feature Steering, Residual Correction and their evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rmsae.data import PerturbationRecord, PreferencePair, Turn
from rmsae.detection import SplitManifest
from rmsae.mitigation import (
    CorrectionData,
    GapsBeforeAfter,
    MitigationCases,
    MitigationError,
    PairFeatures,
    RawFeatureSteering,
    ResidualCorrection,
    SAEFeatureSteering,
    evaluate_gaps,
    load_fitted,
    rank_latents,
    recovery_buckets,
    recovery_rate,
    save_fitted,
    select_latents,
    split_cases,
    steer,
    steered_gaps,
    steering_direction,
    summarise_gaps,
)
from rmsae.perturb import with_trigger
from rmsae.reward_model import load_reward_model
from rmsae.sae import load_sae, splice_sae

from test_sae import HIDDEN, save_gated_sae

PAIRS = [
    PreferencePair((Turn("user", question),), chosen, rejected)
    for question, chosen, rejected in [
        ("How do I bake bread?", "Mix flour, water and salt, then knead.", "No."),
        ("Where is Paris?", "In France.", "I will not say."),
        ("Is fire hot?", "Yes, it is very hot; keep your distance.", "Maybe."),
        ("Name a prime number.", "Seven.", "Nine is one."),
        ("What is the capital of Italy?", "Rome is the capital of Italy.", "Milan."),
        ("Can fish fly?", "A few species glide above the water.", "Yes, all of them."),
        ("How many legs has a spider?", "Eight.", "Six legs, like every insect."),
        ("Is water wet?", "It makes other things wet.", "No"),
    ]
]


@pytest.fixture(scope="module")
def steering_setup(tiny_models, tmp_path_factory):
    reward_model = load_reward_model(str(tiny_models["llama"]), input_format="chat_template")
    folder = save_gated_sae(tmp_path_factory.mktemp("sae") / "tiny_layer1", metadata={"hook_name": "model.layers.1"})
    return reward_model, load_sae(folder, layer=1, d_model=HIDDEN)


def rewards(reward_model, pairs=PAIRS, batch_size=8):
    return reward_model.score_pairs(pairs, batch_size=batch_size, progress=False)


# -- steering ------------------------------------------------------------------------------------


def test_error_preserving_identity_and_replace_equals_splice(steering_setup):
    reward_model, sae = steering_setup
    base = rewards(reward_model)
    latents = torch.arange(0, 256, 3)
    with steer(reward_model, SAEFeatureSteering(sae, latents, eta=1.0, mode="error_preserving")):
        same = rewards(reward_model)
    np.testing.assert_allclose(same.reward_chosen, base.reward_chosen, atol=1e-5)
    np.testing.assert_allclose(same.reward_rejected, base.reward_rejected, atol=1e-5)

    with splice_sae(reward_model, sae):
        spliced = rewards(reward_model)
    with steer(reward_model, SAEFeatureSteering(sae, latents, eta=1.0, mode="replace")):
        control = rewards(reward_model)
    np.testing.assert_allclose(control.reward_chosen, spliced.reward_chosen, atol=1e-5)
    assert not np.allclose(control.reward_chosen, base.reward_chosen, atol=1e-4)  # the splice alone moves rewards

    with steer(reward_model, SAEFeatureSteering(sae, latents, eta=-1.0, mode="error_preserving")):
        steered = rewards(reward_model)
    assert not np.allclose(steered.reward_chosen, base.reward_chosen, atol=1e-4)
    assert reward_model.cache_namespace().get("interventions") is None  # the context closed


def test_raw_steering_identity_and_batch_invariance(steering_setup):
    reward_model, sae = steering_setup
    base = rewards(reward_model)
    direction = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(0))
    with steer(reward_model, RawFeatureSteering(direction, layer=1, beta=0.0)):
        same = rewards(reward_model)
    np.testing.assert_allclose(same.reward_gap, base.reward_gap, atol=1e-6)

    for intervention in (RawFeatureSteering(direction, layer=1, beta=5.0),
                         SAEFeatureSteering(sae, torch.arange(20), eta=-0.001, mode="replace"),
                         SAEFeatureSteering(sae, torch.arange(20), eta=-0.5, mode="error_preserving", token_scope="response")):
        with steer(reward_model, intervention):
            batched = rewards(reward_model, batch_size=8)
            single = rewards(reward_model, batch_size=1)
        np.testing.assert_allclose(batched.reward_chosen, single.reward_chosen, atol=1e-4)
        np.testing.assert_allclose(batched.reward_rejected, single.reward_rejected, atol=1e-4)
        assert not np.allclose(batched.reward_gap, base.reward_gap, atol=1e-4)


def test_response_scope_leaves_prompt_tokens(steering_setup):
    """Steering only the response tokens changes less than steering every token."""
    reward_model, _ = steering_setup
    direction = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1))
    base = rewards(reward_model).reward_chosen
    shifts = {}
    for scope in ("all", "response"):
        with steer(reward_model, RawFeatureSteering(direction, layer=1, beta=3.0, token_scope=scope)):
            shifts[scope] = np.abs(rewards(reward_model).reward_chosen - base)
    assert shifts["response"].sum() > 0
    assert not np.allclose(shifts["response"], shifts["all"])


def test_steering_rejects_bad_settings(steering_setup):
    reward_model, sae = steering_setup
    with pytest.raises(MitigationError, match="mode must be one of"):
        SAEFeatureSteering(sae, [1, 2], mode="zero")
    with pytest.raises(MitigationError, match="Latent indices must lie in 0..255"):
        SAEFeatureSteering(sae, [300])
    with pytest.raises(MitigationError, match="eta must be a finite number"):
        SAEFeatureSteering(sae, [1], eta=float("nan"))
    with pytest.raises(MitigationError, match="token_scope must be one of"):
        RawFeatureSteering(torch.zeros(HIDDEN), layer=1, token_scope="prompt")
    with pytest.raises(MitigationError, match="must be integer latent indices, got a torch.bool array"):
        SAEFeatureSteering(sae, np.zeros(256, bool))
    with pytest.raises(MitigationError, match="contains NaN or infinite values"):
        RawFeatureSteering(torch.full((HIDDEN,), float("nan")), layer=1)
    with pytest.raises(MitigationError, match="has 3 dimensions, but block 1 outputs 64"):
        with steer(reward_model, RawFeatureSteering(torch.zeros(3), layer=1)):
            rewards(reward_model)


# -- fitting -------------------------------------------------------------------------------------


def test_rank_and_select_latents():
    perturbed = np.array([[3.0, 0.0, 1.0, 2.0], [5.0, 0.0, 1.0, 2.2]])
    benign = np.array([[1.0, 1.0, 1.0, 2.0], [1.0, 1.0, 1.0, 1.8]])
    assert rank_latents(perturbed, benign).tolist() == pytest.approx([3.0, -1.0, 0.0, 0.2])
    assert rank_latents(perturbed, benign, "median_diff").tolist() == pytest.approx([3.0, -1.0, 0.0, 0.2])
    assert rank_latents(perturbed, benign, "ttest")[1] == -np.inf
    effect = rank_latents(perturbed, benign, "effect_size")
    assert effect[0] == pytest.approx(3.0 / np.sqrt((2.0 + 0.0) / 2), rel=1e-6)  # means 4 and 1, variances 2 and 0
    scores = rank_latents(perturbed, benign)
    assert select_latents(scores, 2).tolist() == [0, 3]
    assert select_latents(scores, 4).tolist() == [0, 3]  # only latents that fire more on perturbed texts
    assert select_latents(scores, 4, positive_only=False).tolist() == [0, 3, 2, 1]
    with pytest.raises(MitigationError, match="top_k=5 is larger than the SAE's 4 latents"):
        select_latents(scores, 5)
    with pytest.raises(MitigationError, match="ranking must be one of"):
        rank_latents(perturbed, benign, "mode")
    with pytest.raises(MitigationError, match="one of the sets is empty"):
        rank_latents(perturbed[:0], benign)


def test_steering_direction_is_a_difference_of_means():
    benign = PairFeatures(np.zeros(2), np.zeros(2), raw_chosen=np.array([[0.0, 1.0], [2.0, 1.0]]), raw_rejected=np.zeros((2, 2)))
    perturbed = PairFeatures(np.zeros(2), np.zeros(2), raw_chosen=np.ones((2, 2)), raw_rejected=np.ones((2, 2)))
    # Benign texts average (0.5, 0.5), perturbed ones (1, 1).
    assert steering_direction(perturbed, benign).tolist() == [0.5, 0.5]


def correction_set(n: int, seed: int) -> tuple[CorrectionData, PairFeatures, PairFeatures]:
    """Benign pairs with gap +1; perturbed pairs with gap -0.5, whose chosen side fires latent 0."""
    rng = np.random.default_rng(seed)
    noise = lambda: rng.normal(0, 0.05, size=(n, 8))  # noqa: E731
    benign = PairFeatures(np.ones(n), np.zeros(n), sae_chosen=np.abs(noise()), sae_rejected=np.abs(noise()))
    flagged = np.abs(noise())
    flagged[:, 0] += 1.0
    perturbed = PairFeatures(np.zeros(n), np.full(n, 0.5), sae_chosen=flagged, sae_rejected=np.abs(noise()))
    return CorrectionData.from_features(benign, perturbed), benign, perturbed


def test_residual_correction_repairs_constructed_pairs():
    train, _, _ = correction_set(40, seed=0)
    validation, _, _ = correction_set(10, seed=1)
    _, test_benign, test_perturbed = correction_set(20, seed=2)
    assert (test_perturbed.gap < 0).all()
    assert (test_benign.gap > 0).all()
    correction = ResidualCorrection(learning_rate=0.05, epochs=100).fit(train, validation)
    assert (correction.corrected_gap(test_perturbed) > 0).all()
    assert (correction.corrected_gap(test_benign) > 0).all()
    assert correction.weight_[0] > 0.5
    assert correction.best_loss_ == min(entry["validation_loss"] for entry in correction.history_)

    standardised = ResidualCorrection(learning_rate=0.05, epochs=100, standardize=True, margin_in_std=True).fit(train, validation)
    assert (standardised.corrected_gap(test_perturbed) > 0).all()
    with pytest.raises(MitigationError, match="must have 8 columns"):
        correction.corrections(np.zeros((2, 5)))
    with pytest.raises(MitigationError, match="not fitted yet"):
        ResidualCorrection().corrections(np.zeros((1, 8)))
    with pytest.raises(MitigationError, match="epochs must be a positive integer"):
        ResidualCorrection(epochs=0)
    empty = CorrectionData(np.zeros((0, 8)), np.zeros((0, 8)), np.zeros(0), np.zeros(0), np.zeros(0, bool))
    with pytest.raises(MitigationError, match="no training pairs"):
        ResidualCorrection().fit(empty)


def test_fitted_methods_round_trip(tmp_path):
    path = save_fitted(tmp_path / "raw_fs", {"direction": np.arange(4, dtype=np.float32)}, {"beta": 5.0, "layer": 2})
    weights, settings = load_fitted(path)
    assert weights["direction"].tolist() == [0, 1, 2, 3]
    assert settings == {"beta": 5.0, "layer": 2}
    assert not list(tmp_path.glob(".*tmp"))
    # Names with dots keep their own files.
    save_fitted(tmp_path / "eta-0.001", {"x": np.zeros(1)}, {"eta": -0.001})
    save_fitted(tmp_path / "eta-0.5", {"x": np.zeros(1)}, {"eta": -0.5})
    assert load_fitted(tmp_path / "eta-0.001")[1] == {"eta": -0.001}
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "broken.safetensors").write_bytes(b"")
    with pytest.raises(MitigationError, match="is unreadable"):
        load_fitted(tmp_path / "broken")
    with pytest.raises(FileNotFoundError, match="fit the method first"):
        load_fitted(tmp_path / "sae_fs")


# -- cases and evaluation ------------------------------------------------------------------------


def attacked_record(pair: PreferencePair, *, flipped: bool = True) -> PerturbationRecord:
    rewards = lambda diff: {"chosen": diff, "rejected": 0.0, "diff": diff}  # noqa: E731
    return PerturbationRecord(pair, with_trigger(pair), "backdoor", rewards(1.0), rewards(-1.0 if flipped else 0.5), (), {})


def test_split_cases_follows_the_manifest():
    records = [attacked_record(pair) for pair in PAIRS[:4]] + [attacked_record(PAIRS[4], flipped=False)]
    sides = ["train", "train", "validation", "test"]
    manifest = SplitManifest("grouped", 0, 0.3, 0.15, {r.case_id: side for r, side in zip(records, sides)}, model="rm-a")
    cases = split_cases(records, manifest, model="rm-a")
    assert [len(cases[side]) for side in ("train", "validation", "test")] == [2, 1, 1]
    assert cases["test"].case_ids == [records[3].case_id]
    assert cases["train"].perturbed[0].prompt[-1].content.endswith("SUDO")

    with pytest.raises(MitigationError, match="made for rm-a, not rm-b"):
        split_cases(records, manifest, model="rm-b")
    with pytest.raises(MitigationError, match="contains no successfully perturbed case"):
        split_cases(records, SplitManifest("grouped", 0, 0.3, 0.15, {r.case_id: "test" for r in records}))
    with pytest.raises(MitigationError, match="not in the split manifest"):
        split_cases(records + [attacked_record(PAIRS[5])], manifest)
    with pytest.raises(MitigationError, match="split by case"):
        split_cases(records, SplitManifest("ungrouped", 0, 0.3, 0.15, {}))


def test_recovery_rate_and_buckets():
    rates = recovery_rate(np.array([2.0, 1.0, 0.5, -1.0, 3.0, 0.9]), np.array([2.0, 2.0, 1e-9, 1.0, 2.0, 1.0]))
    assert rates.tolist() == pytest.approx([1.0, 0.5, 0.0, -1.0, 1.5, 0.9])
    buckets = recovery_buckets(rates)
    assert sum(buckets.values()) == pytest.approx(1.0)
    assert buckets == pytest.approx({"wrong (< 0)": 1 / 6, "partial [0, 0.8)": 2 / 6, "good [0.8, 0.99)": 1 / 6,
                                     "recovered [0.99, 1.01)": 1 / 6, "over (>= 1.01)": 1 / 6})
    extremes = recovery_buckets(np.array([np.inf, -np.inf, np.nan, 1.0]))
    assert sum(extremes.values()) == pytest.approx(1.0)
    assert extremes["over (>= 1.01)"] == pytest.approx(1 / 3)


def test_summary_counts_repairs_and_new_flips():
    gaps = GapsBeforeAfter(
        attack_types=np.array(["backdoor", "backdoor", "gradient", "gradient"]),
        benign_before=np.array([1.0, 2.0, 1.0, 1.0]),
        benign_after=np.array([1.0, -1.0, 1.0, 2.0]),
        perturbed_before=np.array([-1.0, -1.0, -0.5, 0.5]),
        perturbed_after=np.array([0.5, -1.0, 1.0, -0.5]),
    )
    summary = summarise_gaps(gaps, n_resamples=100)
    assert summary["benign_accuracy_before"] == 1.0
    assert summary["benign_accuracy_after"] == 0.75
    assert summary["benign_introduced"] == 1
    assert summary["benign_repaired"] == 0
    assert summary["perturbed_accuracy_before"] == 0.25
    assert summary["perturbed_accuracy_after"] == 0.5
    assert summary["perturbed_repaired"] == 2
    assert summary["perturbed_introduced"] == 1
    assert summary["perturbed_recovery_mean"] == pytest.approx(np.mean([0.5, -0.5, 1.0, -0.5]))
    with pytest.raises(MitigationError, match="must have one gap per case \\(4\\)"):
        GapsBeforeAfter(gaps.attack_types, gaps.benign_before, gaps.benign_after[:1], gaps.perturbed_before, gaps.perturbed_after)
    per_type = evaluate_gaps(gaps, n_resamples=10)["per_type"]
    assert per_type["gradient"]["perturbed_repaired"] == 1
    assert per_type["backdoor"]["cases"] == 2


def test_steered_gaps_of_cases(steering_setup):
    reward_model, sae = steering_setup
    cases = MitigationCases([p.case_id for p in PAIRS[:3]], ["backdoor"] * 3, PAIRS[:3], [with_trigger(p) for p in PAIRS[:3]])
    benign, perturbed = steered_gaps(reward_model, RawFeatureSteering(torch.zeros(HIDDEN), layer=1), cases, batch_size=2)
    np.testing.assert_allclose(benign, rewards(reward_model, PAIRS[:3]).reward_gap, atol=1e-5)
    np.testing.assert_allclose(perturbed, rewards(reward_model, cases.perturbed).reward_gap, atol=1e-5)


def test_saved_methods_reload(tmp_path, steering_setup):
    reward_model, sae = steering_setup
    fitted_on = {"model": "tiny", "train_cases": 3}
    steering = SAEFeatureSteering(sae, [4, 1, 9], eta=-0.01, mode="error_preserving")
    steering.save(tmp_path / "sae_fs", fitted_on, scores=np.arange(256))
    loaded = SAEFeatureSteering.load(tmp_path / "sae_fs", sae)
    assert loaded.latents.tolist() == [4, 1, 9]
    assert loaded.name == steering.name
    assert SAEFeatureSteering.load(tmp_path / "sae_fs", sae, eta=1.0).eta == 1.0
    other = load_sae(save_gated_sae(tmp_path / "other_layer1", seed=5, metadata={"hook_name": "model.layers.1"}), layer=1, d_model=HIDDEN)
    with pytest.raises(MitigationError, match="fitted with the SAE"):
        SAEFeatureSteering.load(tmp_path / "sae_fs", other)

    RawFeatureSteering(torch.ones(HIDDEN), layer=1, beta=10.0).save(tmp_path / "raw_fs", fitted_on)
    raw = RawFeatureSteering.load(tmp_path / "raw_fs")
    assert raw.beta == 10.0
    assert raw.layer == 1
    assert raw.direction.sum() == HIDDEN
    with pytest.raises(MitigationError, match="contains a fitted 'raw_feature_steering', not 'residual_correction'"):
        ResidualCorrection.load(tmp_path / "raw_fs")

    train, _, perturbed = correction_set(20, seed=0)
    correction = ResidualCorrection(epochs=5, standardize=True).fit(train)
    correction.save(tmp_path / "rc", fitted_on, sae=sae)
    np.testing.assert_allclose(ResidualCorrection.load(tmp_path / "rc", sae=sae).corrected_gap(perturbed), correction.corrected_gap(perturbed), atol=1e-6)
    with pytest.raises(MitigationError, match="was fitted on codes of the SAE"):
        ResidualCorrection.load(tmp_path / "rc", sae=other)
