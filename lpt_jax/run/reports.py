"""Accuracy overall / many / medium / few (both group rules), per class, and the reports:
a markdown table and JSON, a per-class CSV, and a plot of per-class accuracy vs training count."""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Mapping, Optional, Sequence

import numpy as np

from lpt_jax.data.groups import shot_groups
from lpt_jax.storage import files

GROUPS = ("many", "medium", "few")
RULES = ("release", "oltr")
RULE_TITLES = {"release": "release rule (few <= 20)", "oltr": "OLTR rule (few < 20)"}


def accuracy_report(predictions: np.ndarray, labels: np.ndarray, train_counts: np.ndarray,
                    class_names: Optional[Sequence[str]] = None) -> dict:
    """Top-1 accuracy overall, per shot group under both rules, and per class.

    Group accuracy = correct / images of the group's classes (the test sets are balanced, so
    this equals the mean of per-class accuracies there).
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    num_classes = len(train_counts)
    correct = predictions == labels
    per_class_total = np.bincount(labels, minlength=num_classes)
    per_class_correct = np.bincount(labels, weights=correct, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class_acc = per_class_correct / per_class_total
    report = {"num_examples": int(len(labels)), "overall": float(np.mean(correct)) * 100}
    for rule in RULES:
        groups = shot_groups(np.asarray(train_counts), rule=rule)
        report[rule] = {}
        for g in GROUPS:
            ids = np.asarray(groups[g])
            n = per_class_total[ids].sum() if len(ids) else 0
            report[rule][g] = float(per_class_correct[ids].sum() / n * 100) if n else None
            report[rule][f"{g}_classes"] = int(len(ids))
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    report["per_class"] = [
        {"class": c, "name": names[c], "train_count": int(train_counts[c]),
         "test_count": int(per_class_total[c]),
         "accuracy": None if per_class_total[c] == 0 else float(per_class_acc[c] * 100)}
        for c in range(num_classes)]
    return report


def ensembled_report(report: Mapping, ensemble: str, views: int, expand: int) -> dict:
    """The parts of an `accuracy_report` of test-time ensembled predictions (eval.ensemble)
    that a report keeps under 'ensembled' beside its single-view numbers: overall, both
    rules' groups, per-class accuracies (in class order), and how the views were made."""
    return {"ensemble": ensemble, "views": int(views), "expand": int(expand),
            "overall": report["overall"], **{rule: report[rule] for rule in RULES},
            "per_class_accuracy": [row["accuracy"] for row in report["per_class"]]}


def ensembled_title(ensembled: Mapping) -> str:
    return f"ensembled ({ensembled['ensemble']}, {ensembled['views']} views)"


def markdown_table(report: Mapping, title: str = "") -> str:
    def fmt(v):
        return "–" if v is None else f"{v:.2f}"
    lines = [f"### {title}" if title else "", "",
             "| group rule | overall | many | medium | few | classes (many/medium/few) |",
             "|---|---|---|---|---|---|"]
    ensembled = report.get("ensembled")
    for numbers, suffix in ((report, ""), (ensembled, ensembled and ensembled_title(ensembled))):
        if numbers is None:
            continue
        for rule in RULES:
            r = numbers[rule]
            name = RULE_TITLES[rule] + (f", {suffix}" if suffix else "")
            lines.append(f"| {name} | {fmt(numbers['overall'])} | {fmt(r['many'])} | "
                         f"{fmt(r['medium'])} | {fmt(r['few'])} | "
                         f"{r['many_classes']}/{r['medium_classes']}/{r['few_classes']} |")
    lines.append("")
    skipped = report.get("skipped_images", 0)
    lines.append(f"top-1 accuracy in %, {report['num_examples']} images"
                 + (f" ({skipped} unreadable images skipped)." if skipped else "."))
    if ensembled is not None:
        lines.append(f"Ensembled: argmax of the mean logits of {ensembled['views']} views per "
                     f"image ({ensembled['ensemble']} of the image resized to data.image_size "
                     f"+ {ensembled['expand']} on its shorter side); the other rows: one "
                     "centre view.")
    return "\n".join(lines).lstrip("\n") + "\n"


def per_class_csv(report: Mapping) -> str:
    def fmt(acc):
        return "" if acc is None else f"{acc:.4f}"
    buf = io.StringIO()
    w = csv.writer(buf)
    ensembled = report.get("ensembled")
    extra = [f"accuracy_{ensembled['ensemble']}"] if ensembled else []
    w.writerow(["class", "name", "train_count", "test_count", "accuracy"] + extra)
    for i, row in enumerate(report["per_class"]):
        more = [fmt(ensembled["per_class_accuracy"][i])] if ensembled else []
        w.writerow([row["class"], row["name"], row["train_count"], row["test_count"],
                    fmt(row["accuracy"])] + more)
    return buf.getvalue()


def plot_per_class(report: Mapping, path: str, title: str = "") -> None:
    """Per-class accuracy against training count (log x), coloured by shot group."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report["per_class"] if r["accuracy"] is not None]
    counts = np.array([r["train_count"] for r in rows], dtype=float)
    acc = np.array([r["accuracy"] for r in rows])
    groups = shot_groups(np.array([r["train_count"] for r in report["per_class"]]), rule="release")
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    colors = {"many": "tab:blue", "medium": "tab:orange", "few": "tab:red"}
    release = report["release"]
    for g in GROUPS:
        sel = np.isin([r["class"] for r in rows], groups[g])
        mean = release[g]
        label = f"{g} ({int(sel.sum())} classes" + (f", {mean:.1f}%)" if mean is not None else ")")
        ax.scatter(counts[sel], acc[sel], s=12, alpha=0.7, color=colors[g], label=label)
    for x in (20, 100):
        ax.axvline(x, color="gray", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlim(counts.min() / 1.5, counts.max() * 1.5)  # keep the end points inside
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("top-1 accuracy of the class (%)")
    ax.set_ylim(-2, 102)
    ax.set_title(title or f"per-class accuracy, overall {report['overall']:.2f}%")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    files.write_bytes(path, buf.getvalue())


def write_reports(directory: str, report: Mapping, *, title: str = "", plot: bool = True) -> dict:
    """Writes table.md, results.json, per_class.csv and per_class.png; returns their paths."""
    paths = {k: os.path.join(directory, name) for k, name in (
        ("table", "table.md"), ("json", "results.json"), ("csv", "per_class.csv"),
        ("plot", "per_class.png"))}
    files.write_bytes(paths["table"], markdown_table(report, title).encode())
    files.write_bytes(paths["json"], json.dumps(report, indent=1).encode())
    files.write_bytes(paths["csv"], per_class_csv(report).encode())
    if plot:
        plot_per_class(report, paths["plot"], title)
    else:
        del paths["plot"]
    return paths

