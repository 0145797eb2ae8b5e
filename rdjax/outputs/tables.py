"""Result tables a person reads (markdown): an evaluation's metrics and decisions, the
summary over categories, a unified model's categories and its router."""

from __future__ import annotations

import numpy as np

from rdjax.scoring.metrics import METRIC_NAMES, PAPER_KEYS, TABLE_KEYS, nanmean, percent
from rdjax.scoring.thresholds import CONFUSION_KEYS, few_images


def results_markdown(result: dict) -> str:
    lines = [
        f"# {result.get('category', '')} (epoch {result.get('epoch')})",
        "",
        "| " + " | ".join(METRIC_NAMES[k] for k in TABLE_KEYS) + " |",
        "|---" * len(TABLE_KEYS) + "|",
        "| " + " | ".join(percent(result.get(k)) for k in TABLE_KEYS) + " |",
        "",
        f"| defect type | images | {METRIC_NAMES['image_auroc']} |",
        "|---|---|---|",
    ]
    lines += [f"| {t} | {v['count']} | {percent(v['image_auroc'])} |" for t, v in result.get("per_type", {}).items()]
    if "threshold_note" in result:
        lines.append(f"\nDecisions: {result['threshold_note']}.")
    cal = result.get("calibration")
    if cal is not None and "confusion" in result:
        lines += ["", confusion_markdown(result["confusion"], cal["image_threshold"])]
    for w in [few_images(cal) if cal is not None else None, *result.get("warnings", [])]:
        if w:
            lines.append(f"\n**Warning:** {w}")
    return "\n".join(lines) + "\n"


def confusion_markdown(counts: dict[str, int], threshold: float) -> str:
    """The test images' decisions at the image threshold (thresholds.confusion), as a
    table of label against decision."""
    total = sum(counts.values())
    return "\n".join([
        f"At the image threshold {threshold:.6g}, of {total} test images:",
        "",
        "| | called anomalous | called good |",
        "|---|---|---|",
        f"| defective | {counts['true_positives']} true positives | {counts['false_negatives']} false negatives |",
        f"| good | {counts['false_positives']} false positives | {counts['true_negatives']} true negatives |",
    ])  # fmt: skip


def summary_markdown(results: dict[str, dict], keys: tuple[str, ...] | None = None) -> str:
    """One table over categories with a mean row, in the paper's layout (percent)."""
    keys = keys or PAPER_KEYS
    lines = ["| category | " + " | ".join(METRIC_NAMES[k] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(percent(r.get(k)) for k in keys) + " |")
    means = [nanmean([r.get(k, np.nan) for r in results.values()]) for k in keys]
    lines.append("| **mean** | " + " | ".join(f"**{percent(m)}**" for m in means) + " |")
    on_test = [name for name, r in results.items() if r.get("calibration", {}).get("fitted_on_test_set")]
    if on_test:
        lines.append(f"\nDecision thresholds fitted on the test set ({', '.join(on_test)}): decisions on these "
                     "images are optimistic; the metrics above use no threshold.")  # fmt: skip
    return "\n".join(lines) + "\n"


def unified_markdown(result: dict) -> str:
    """A unified model's results: its categories' table, each on its own test split."""
    head = f"# one model for {len(result['categories'])} categories (epoch {result.get('epoch')})\n\n"
    table = summary_markdown({c: r for c, r in result["categories"].items() if "image_auroc" in r}, TABLE_KEYS)
    note = f"\nDecisions without a category: {result['threshold_note']}.\n" if "threshold_note" in result else ""
    return head + table + note + unified_decisions_markdown(result) + router_markdown(result)


def router_markdown(result: dict) -> str:
    """How often the category router (rdjax.scoring.router, predict's --category=auto) named each
    category's test images rightly."""
    accuracy = result.get("router_accuracy")
    if not accuracy:
        return ""
    parts = ", ".join(f"{c} {100 * a:.1f}%" for c, a in accuracy.items() if c != "all")
    recognised = f"{100 * accuracy['all']:.1f}% of the test images recognised ({parts})"
    return f"\nCategory router (`--category=auto`): {recognised}.\n"


def unified_decisions_markdown(result: dict) -> str:
    """Each category's test images decided by its own thresholds (calibration.json's
    'categories'), and all of them by the global one: the counts, and how many images
    each threshold rests on (a warning where too few, thresholds.few_images)."""
    cal = result.get("calibration")
    if cal is None:
        return ""
    rows = [(c, r["calibration"], r.get("confusion")) for c, r in result["categories"].items() if "calibration" in r]
    rows.append(("**global**", cal, result.get("confusion")))
    lines = [
        "\n| thresholds of | image threshold | fitted on images | true positives | false positives "
        "| true negatives | false negatives |",
        "|---" * 7 + "|",
    ]
    for name, c, counts in rows:
        cells = [counts[k] if counts else "n/a" for k in CONFUSION_KEYS]
        lines.append(f"| {name} | {c['image_threshold']:.6g} | {c.get('num_images', 'n/a')} | "
                     + " | ".join(str(v) for v in cells) + " |")  # fmt: skip
    warnings = [(name, few_images(c)) for name, c, _ in rows]
    lines += [f"\n**Warning** ({name.strip('*')}): {w}" for name, w in warnings if w]
    return "\n".join(lines) + "\n"
