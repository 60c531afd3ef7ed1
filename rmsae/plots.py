"""Figures of the notebooks and book pages. Each function returns a matplotlib figure."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _figure(width: float = 6.0, height: float = 3.6, ncols: int = 1):
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height), constrained_layout=True)


def reward_gap_histogram(frame, *, title: str = ""):
    """Histogram of r(chosen) - r(rejected); mass right of zero is the pair accuracy."""
    import seaborn as sns

    figure, axis = _figure()
    sns.histplot(frame["reward_gap"], bins=40, ax=axis, color="tab:blue")
    axis.axvline(0.0, color="black", linewidth=1)
    axis.set_xlabel("reward gap r(chosen) - r(rejected)")
    axis.set_ylabel("pairs")
    axis.set_title(title)
    return figure


def reward_vs_length(frame, *, title: str = ""):
    """Reward of each response against its length in words, chosen and rejected side by side."""
    import pandas as pd
    import seaborn as sns

    long = pd.concat(
        [
            pd.DataFrame({"words": frame["chosen_words"].clip(lower=1), "reward": frame["reward_chosen"], "response": "chosen"}),
            pd.DataFrame({"words": frame["rejected_words"].clip(lower=1), "reward": frame["reward_rejected"], "response": "rejected"}),
        ],
        ignore_index=True,
    )
    figure, axis = _figure()
    sns.scatterplot(data=long, x="words", y="reward", hue="response", s=10, alpha=0.5, ax=axis, linewidth=0)
    axis.set_xscale("log")
    axis.set_xlabel("response length (words, log scale)")
    axis.set_title(title)
    return figure


def latent_density_histogram(density: np.ndarray, *, title: str = ""):
    """Histogram of log10 latent firing frequency; dead latents are counted in the title."""
    import seaborn as sns

    dead = int((density == 0).sum())
    figure, axis = _figure()
    alive = density[density > 0]
    if len(alive):
        sns.histplot(np.log10(alive), bins=40, ax=axis, color="tab:green")
    axis.set_xlabel("log10 fraction of tokens on which the latent fires")
    axis.set_ylabel("latents")
    axis.set_title(f"{title} ({dead} dead of {len(density)})" if title else f"{dead} dead latents of {len(density)}")
    return figure


def accuracy_intervals(frame, *, value: str = "accuracy", low: str = "accuracy_low", high: str = "accuracy_high"):
    """Pair accuracy per model with its bootstrap interval, and the 0.5 chance line."""
    figure, axis = _figure(height=0.6 + 0.5 * len(frame))
    positions = np.arange(len(frame))
    axis.errorbar(
        frame[value], positions,
        xerr=[frame[value] - frame[low], frame[high] - frame[value]],
        fmt="o", color="tab:blue", capsize=4,
    )
    axis.axvline(0.5, color="grey", linestyle="--", linewidth=1)
    axis.set_yticks(positions, frame["model"])
    axis.set_xlabel("pair accuracy (95% bootstrap interval)")
    return figure


def metrics_by_layer(frame, metrics: dict[str, str]):
    """Plot each metric (column -> axis label) against layer in its own panel, one line per model."""
    import seaborn as sns

    figure, axes = _figure(width=3.2 * len(metrics), height=3.2, ncols=len(metrics))
    axes = np.atleast_1d(axes)
    for axis, (column, label) in zip(axes, metrics.items()):
        sns.lineplot(data=frame, x="layer", y=column, hue="model", marker="o", ax=axis, legend=axis is axes[-1])
        axis.set_ylabel(label)
        axis.set_xticks(sorted(frame["layer"].unique()))
    return figure


def _gap_panels(frame, *, x: str, y: str, hue: str, palette: dict, diagonal: bool = False):
    """One scatter panel per method of reward gap before (``x``) against after (``y``), with the axes at zero."""
    import seaborn as sns

    methods = list(dict.fromkeys(frame["method"]))
    figure, axes = _figure(width=3.4 * len(methods), height=3.4, ncols=len(methods))
    axes = np.atleast_1d(axes)
    for axis, method in zip(axes, methods):
        subset = frame[frame["method"] == method]
        sns.scatterplot(data=subset, x=x, y=y, hue=hue, hue_order=list(palette), palette=palette, s=12, alpha=0.6, linewidth=0,
                        ax=axis, legend=axis is axes[-1])
        if diagonal and len(subset):
            limits = [min(subset[x].min(), subset[y].min()), max(subset[x].max(), subset[y].max())]
            axis.plot(limits, limits, color="grey", linewidth=0.8, linestyle=":")
        axis.axhline(0, color="black", linewidth=0.8)
        axis.axvline(0, color="black", linewidth=0.8)
        axis.set_title(method, fontsize="medium")
        axis.set_xlabel("reward gap before")
        axis.set_ylabel("reward gap after")
    return figure


def gap_before_after(frame):
    """Reward gap before against after perturbation, one panel per method; flipped pairs in red."""
    return _gap_panels(frame, x="initial_diff", y="final_diff", hue="success", palette={True: "tab:red", False: "tab:blue"}, diagonal=True)


def gradient_trajectories(records):
    """Reward gap against paraphrase step, one line per pair; the gap falls below zero when the preference flips."""
    figure, axis = _figure()
    for record in records:
        diffs = [entry["diff"] for entry in record.get("history", []) if "diff" in entry]
        success = record["initial_rewards"]["diff"] > 0 and record["final_rewards"]["diff"] <= 0
        axis.plot(range(len(diffs)), diffs, color="tab:red" if success else "tab:blue", alpha=0.5, linewidth=1)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xlabel("step (0 = original pair)")
    axis.set_ylabel("reward gap r(chosen) - r(rejected)")
    return figure


def meaning_histogram(scores, threshold: float):
    """Meaning scores of paraphrase candidates, accepted and rejected, with the acceptance threshold."""
    import seaborn as sns

    figure, axis = _figure()
    if len(scores):
        sns.histplot(data=scores, x="meaning", hue="accepted", bins=30, ax=axis, multiple="stack")
    axis.axvline(threshold, color="black", linestyle="--", linewidth=1)
    axis.set_xlabel("meaning score (cosine of MiniLM sentence embeddings)")
    return figure


def success_rates(frame, *, value: str = "success_rate_on_correct"):
    """Flip rate per method and model, with the bootstrap interval of each bar."""
    import seaborn as sns

    methods = list(dict.fromkeys(frame["method"]))
    models = list(dict.fromkeys(frame["model"]))
    figure, axis = _figure(width=6.5)
    sns.barplot(data=frame, x="method", y=value, hue="model", order=methods, hue_order=models, ax=axis, errorbar=None)
    indexed = frame.set_index(["model", "method"])
    for container, model in zip(axis.containers, models):
        for bar, method in zip(container, methods):
            if (model, method) not in indexed.index:
                continue
            row = indexed.loc[(model, method)]
            centre = bar.get_x() + bar.get_width() / 2
            axis.errorbar(centre, row[value], yerr=[[row[value] - row[f"{value}_low"]], [row[f"{value}_high"] - row[value]]],
                          color="black", capsize=3, linewidth=1)
    axis.set_ylabel("flip rate on initially correct pairs")
    axis.set_ylim(0, 1)
    return figure


def roc_curves(samples: dict[str, "pandas.DataFrame"]):
    """ROC curve per feature type from its test samples (columns ``label`` and ``probability``), with the AUC in the legend."""
    from sklearn.metrics import roc_auc_score, roc_curve

    figure, axis = _figure(width=4.4, height=4.0)
    for name, frame in samples.items():
        false_positive, true_positive, _ = roc_curve(frame["label"], frame["probability"])
        axis.plot(false_positive, true_positive, label=f"{name} (AUC {roc_auc_score(frame['label'], frame['probability']):.3f})")
    axis.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    axis.set_xlabel("false positive rate (benign pairs flagged)")
    axis.set_ylabel("true positive rate (perturbed pairs flagged)")
    axis.legend(loc="lower right")
    return figure


def transfer_heatmaps(matrices: dict[str, dict[str, dict[str, float]]]):
    """Draw one heatmap per feature type: ROC AUC of a detector trained on the row's type, tested on the column's."""
    import pandas as pd
    import seaborn as sns

    figure, axes = _figure(width=4.4 * len(matrices), height=3.8, ncols=len(matrices))
    axes = np.atleast_1d(axes)
    for axis, (name, matrix) in zip(axes, matrices.items()):
        frame = pd.DataFrame(matrix).T.astype(float)
        sns.heatmap(frame, annot=True, fmt=".2f", vmin=0.0, vmax=1.0, cmap="viridis", cbar=axis is axes[-1], ax=axis)
        axis.set_title(f"{name} features")
        axis.set_xlabel("tested on")
        axis.set_ylabel("trained on")
    return figure


def training_curves(histories: dict[str, list[dict[str, float]]], best_epochs: dict[str, int]):
    """Training and validation loss per epoch for each detector, with the kept (best) epoch marked."""
    figure, axes = _figure(width=3.6 * len(histories), height=3.2, ncols=len(histories))
    axes = np.atleast_1d(axes)
    for axis, (name, history) in zip(axes, histories.items()):
        epochs = [entry["epoch"] for entry in history]
        axis.plot(epochs, [entry["train_loss"] for entry in history], label="training")
        axis.plot(epochs, [entry["validation_loss"] for entry in history], label="validation")
        axis.axvline(best_epochs[name], color="black", linestyle=":", linewidth=1, label="kept epoch")
        axis.set_title(f"{name} features")
        axis.set_xlabel("epoch")
        axis.set_ylabel("binary cross-entropy")
        axis.legend(fontsize="small")
    return figure


def auc_by_layer(frame, feature_types: Sequence[str] = ("sae", "raw")):
    """Detection ROC AUC against layer, one panel per model, one line per feature type with its interval."""
    models = list(dict.fromkeys(frame["model"]))
    figure, axes = _figure(width=3.8 * len(models), height=3.4, ncols=len(models))
    axes = np.atleast_1d(axes)
    for axis, model in zip(axes, models):
        subset = frame[frame["model"] == model].sort_values("layer")
        for name in feature_types:
            column = f"{name}_roc_auc"
            if column not in subset:
                continue
            axis.errorbar(subset["layer"], subset[column],
                          yerr=[subset[column] - subset[f"{column}_low"], subset[f"{column}_high"] - subset[column]],
                          marker="o", capsize=3, label=f"{name} features")
        axis.axhline(0.5, color="grey", linestyle="--", linewidth=1)
        axis.set_title(model)
        axis.set_xlabel("layer")
        axis.set_ylabel("detection ROC AUC (95% interval)")
        axis.set_xticks(sorted(subset["layer"].unique()))
        axis.set_ylim(0.3, 1.02)
        axis.legend(fontsize="small")
    return figure


def mitigation_gaps(frame):
    """Reward gap before against after each method, one panel per method, benign and perturbed pairs in colour."""
    return _gap_panels(frame, x="before", y="after", hue="variant", palette={"benign": "tab:blue", "perturbed": "tab:red"})


def recovery_bucket_bars(frame):
    """Share of perturbed pairs in each diff-recovery bucket, one stacked bar per method."""
    table = frame.pivot(index="method", columns="bucket", values="share")
    table = table[list(dict.fromkeys(frame["bucket"]))].loc[list(dict.fromkeys(frame["method"]))]
    figure, axis = _figure(width=6.5, height=0.8 + 0.45 * len(table))
    table.plot.barh(stacked=True, ax=axis, colormap="RdYlGn", width=0.7)
    axis.invert_yaxis()
    axis.set_xlabel("share of perturbed test pairs")
    axis.set_ylabel("")
    axis.set_xlim(0, 1)
    axis.legend(title="gap after / original gap", fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    return figure


ABLATION_AXES = {"eta": "|η| (SAE FS, log scale)", "top_k": "K latents (SAE FS)", "rc_epochs": "epochs (SAE RC)", "beta": "β (Raw FS)"}


def ablation_curves(frame):
    """Benign and perturbed pair accuracy after each method against its swept setting, one panel per setting.

    ``frame`` has columns ``parameter``, ``value``, ``variant`` and ``accuracy``, and optionally
    ``run`` (one line per run, for the book's chapter).
    """
    import seaborn as sns

    parameters = [name for name in ABLATION_AXES if name in set(frame["parameter"])]
    figure, axes = _figure(width=3.3 * len(parameters), height=3.3, ncols=len(parameters))
    axes = np.atleast_1d(axes)
    for axis, parameter in zip(axes, parameters):
        subset = frame[frame["parameter"] == parameter].copy()
        if parameter == "eta":
            subset["value"] = subset["value"].abs()
            axis.set_xscale("log")
        sns.lineplot(data=subset, x="value", y="accuracy", hue="variant", hue_order=["benign", "perturbed"],
                     style="run" if "run" in subset else None, marker="o", ax=axis, legend=axis is axes[-1], errorbar=None)
        axis.set_xlabel(ABLATION_AXES[parameter])
        axis.set_ylabel("pair accuracy after")
        axis.set_ylim(-0.02, 1.02)
    if len(axes) and axes[-1].get_legend() is not None:
        sns.move_legend(axes[-1], "upper left", bbox_to_anchor=(1.02, 1), fontsize="small")
    return figure


def mitigation_by_layer(frame):
    """Perturbed (solid) and benign (dashed) pair accuracy after each method against layer, one panel per model."""
    models = list(dict.fromkeys(frame["model"]))
    methods = list(dict.fromkeys(frame["method"]))
    colours = dict(zip(methods, [f"C{index}" for index in range(len(methods))]))
    figure, axes = _figure(width=4.0 * len(models), height=3.6, ncols=len(models))
    axes = np.atleast_1d(axes)
    for axis, model in zip(axes, models):
        subset = frame[frame["model"] == model].sort_values("layer")
        for method in methods:
            rows = subset[subset["method"] == method]
            axis.plot(rows["layer"], rows["perturbed_accuracy_after"], marker="o", color=colours[method], label=method)
            axis.plot(rows["layer"], rows["benign_accuracy_after"], marker="x", linestyle="--", color=colours[method])
        axis.set_title(model)
        axis.set_xlabel("layer")
        axis.set_ylabel("pair accuracy after (solid: perturbed, dashed: benign)", fontsize="small")
        axis.set_xticks(sorted(subset["layer"].unique()))
        axis.set_ylim(-0.02, 1.02)
    axes[-1].legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    return figure


def utility_bars(frame):
    """Official benchmark score per subset, one bar per method; ``frame`` is :func:`rmsae.rewardbench.score_table`'s output."""
    import seaborn as sns

    subsets = list(dict.fromkeys(frame["subset"]))
    figure, axis = _figure(width=max(6.0, 1.6 * len(subsets) + 2.5), height=3.6)
    sns.barplot(data=frame, x="subset", y="official", hue="method", order=subsets, ax=axis)
    axis.set_xlabel("")
    axis.set_ylabel("official score")
    axis.set_ylim(0, 1)
    sns.move_legend(axis, "upper left", bbox_to_anchor=(1.02, 1), fontsize="small", title=None)
    return figure


def utility_change_by_layer(frame):
    """Change of the overall official score against the plain model, per method against layer, one panel per model."""
    models = list(dict.fromkeys(frame["model"]))
    figure, axes = _figure(width=4.0 * len(models), height=3.4, ncols=len(models))
    axes = np.atleast_1d(axes)
    for axis, model in zip(axes, models):
        subset = frame[frame["model"] == model].sort_values("layer")
        for method, rows in subset.groupby("method", sort=False):
            axis.plot(rows["layer"], rows["change"], marker="o", label=method)
        axis.axhline(0.0, color="grey", linewidth=0.8)
        axis.set_title(model)
        axis.set_xlabel("layer")
        axis.set_ylabel("overall score − base")
        axis.set_xticks(sorted(subset["layer"].unique()))
    axes[-1].legend(fontsize="small", bbox_to_anchor=(1.02, 1), loc="upper left")
    return figure


def activation_rate_panels(statistics, *, benign: str = "benign", perturbed: str = "perturbed"):
    """Activation rate of every latent on benign and perturbed texts, sorted by the benign rate; chosen and rejected panels.

    ``statistics`` is :func:`rmsae.features.latent_statistics` output with groups
    ``{benign,perturbed}_{chosen,rejected}``. Perturbed rates are thin vertical lines, the benign
    curve is drawn on top, so latents that fire on perturbed texts only stand out to its right.
    """
    figure, axes = _figure(width=11.0, height=3.4, ncols=2)
    for axis, side in zip(axes, ("chosen", "rejected")):
        order = np.argsort(-statistics[f"{benign}_{side}_rate"].to_numpy(), kind="stable")
        ranks = np.arange(len(order))
        axis.vlines(ranks, 0, statistics[f"{perturbed}_{side}_rate"].to_numpy()[order], color="#E377C2", linewidth=0.4,
                    alpha=0.7, label="perturbed")
        axis.plot(ranks, statistics[f"{benign}_{side}_rate"].to_numpy()[order], color="#1F77B4", linewidth=2, label="benign")
        axis.set_title(f"{side} responses")
        axis.set_xlabel(f"latent, sorted by benign {side} activation rate")
        axis.set_ylabel("activation rate")
        axis.set_ylim(0, 1.02)
    axes[-1].legend(fontsize="small", loc="upper right")
    return figure
