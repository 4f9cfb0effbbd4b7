"""The evaluation report: one self-contained `index.html` beside `metrics.json`.

    python -m melanoma_tf.report REPORT_DIR     # re-render from metrics.json + predictions.csv

Everything the page shows is embedded (PNG data URIs, inline CSS, no script, no external
asset), so the one file can be mailed, archived or opened from any browser. It is rendered only
from what `melanoma_tf.evaluate` leaves in the folder, so it can be re-rendered without the models.
Shows: the metrics beside the paper's published figures and the Otsu baseline, the ROC curve,
Tables I and II, and a gallery of best, borderline and worst cases by Jaccard and by
classification margin, each as the image with the predicted (yellow) and ground-truth (cyan)
outlines next to the classifier's input as served and its Grad-CAM heat map (`explained/`,
written by `evaluate`; a report without it shows the masked lesion recomputed from the image
and the predicted mask).
"""

from __future__ import annotations

import argparse
import base64
import csv
import html
import io
import json
import math
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

import cv2
import numpy as np
import tensorflow as tf
from PIL import Image

from melanoma_tf import atomic, masking
from melanoma_tf.data.images import BadInput, load_mask
from melanoma_tf.evaluation import classification

# The paper's published figures (segmentation precision from Table I, the rest from Table II).
PAPER = {"segmentation_precision": 0.926, "accuracy": 0.8016, "sensitivity": 0.7021,
         "specificity": 0.9011, "precision": 0.8779}
PREDICTED_RGB, TRUTH_RGB = (255, 214, 0), (0, 200, 255)
GALLERY_SIDE = 240
CASES_PER_GROUP = 3
BORDERLINE_JACCARD = 0.65  # the ISIC thresholded-Jaccard cut-off
SEGMENTATION_ROWS = {
    "jaccard": "Jaccard (mean IoU)", "threshold_jaccard": "Thresholded Jaccard (0 below 0.65)",
    "dice": "Dice", "accuracy": "Pixel accuracy", "sensitivity": "Pixel sensitivity",
    "specificity": "Pixel specificity", "detection_rate": "Detection rate (IoU ≥ 0.5)",
    "segmentation_precision": "Segmentation precision (Table I)"}
CLASSIFICATION_ROWS = {
    "roc_auc": "ROC AUC", "accuracy": "Accuracy", "sensitivity": "Sensitivity",
    "specificity": "Specificity", "precision": "Precision (PPV)", "balanced_accuracy": "Balanced accuracy",
    "sensitivity_at_80_specificity": "Sensitivity at 80% specificity",
    "sensitivity_at_90_specificity": "Sensitivity at 90% specificity"}
AS_PERCENT = {"detection_rate", "segmentation_precision", "accuracy", "sensitivity", "specificity",
              "precision", "balanced_accuracy", "sensitivity_at_80_specificity", "sensitivity_at_90_specificity"}
NUMERIC_COLUMNS = {"melanoma_probability", "score", "predicted", "lesion_score", "jaccard",
                   "threshold_jaccard", "dice", "accuracy", "sensitivity", "specificity", "found",
                   "otsu_jaccard", "otsu_dice"}

CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1d2433;
 background:#f4f6f9;margin:0}
main{max-width:1120px;margin:0 auto;padding:28px 24px 48px}
h1{font-size:26px;margin:0 0 4px}h2{font-size:20px;margin:36px 0 12px;padding-bottom:6px;
 border-bottom:2px solid #dde3ec}h3{font-size:16px;margin:20px 0 8px;color:#3a4559}
.meta{color:#5b6678;font-size:13px;margin:0 0 20px}.meta code{font-size:12px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(138px,1fr));gap:12px}
.card{background:#fff;border:1px solid #dde3ec;border-radius:8px;padding:12px 14px}
.card .k{font-size:12px;color:#5b6678;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:26px;font-weight:600;margin:2px 0}.card .p{font-size:12px;color:#5b6678}
.grid2{display:grid;grid-template-columns:1fr 1fr;gap:20px;align-items:start}
table{border-collapse:collapse;background:#fff;border:1px solid #dde3ec;width:100%;font-size:14px}
th,td{padding:7px 10px;border-bottom:1px solid #e8ecf2;text-align:left}
th{background:#eef2f7;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.n small{color:#6b7588}tr:last-child td{border-bottom:0}
.confusion td.n{font-size:18px}.confusion th[scope=row]{background:#f7f9fb}
img.plot{width:100%;max-width:460px;background:#fff;border:1px solid #dde3ec;border-radius:8px}
.note{background:#fff8e1;border:1px solid #f0d98a;border-radius:8px;padding:10px 14px}
.legend span{display:inline-block;width:22px;height:4px;vertical-align:middle;margin:0 6px 0 14px}
.gallery{display:grid;grid-template-columns:repeat(3,1fr);gap:14px;margin-bottom:8px}
figure.case{margin:0;background:#fff;border:1px solid #dde3ec;border-radius:8px;padding:8px}
.pair{display:flex;gap:6px;align-items:center;justify-content:center;background:#111;border-radius:4px;
 padding:4px}.pair img{height:138px;width:auto;max-width:49%;object-fit:contain;image-rendering:auto}
figcaption{font-size:12.5px;margin-top:6px;color:#3a4559}figcaption b{color:#1d2433}
.tag{display:inline-block;padding:0 6px;border-radius:9px;font-size:11.5px;background:#eef2f7}
.tag.mel{background:#fde2e2;color:#8a1c1c}.tag.nev{background:#e2f3e8;color:#1c6b3a}
.wrong{color:#b42318;font-weight:600}ul.problems{font-size:13px;color:#5b6678}
footer{margin-top:36px;font-size:12.5px;color:#5b6678}
"""


def decode_rgb(path: str | Path) -> np.ndarray:
    """RGB uint8 pixels decoded as the segmenter's graph decodes them, so masks line up exactly."""
    return tf.io.decode_image(Path(path).read_bytes(), channels=3, expand_animations=False).numpy()


def read_predictions(path: str | Path) -> list[dict]:
    """predictions.csv rows with numbers as floats (None where empty) and `melanoma` 0/1."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in NUMERIC_COLUMNS & row.keys():
            row[key] = float(row[key]) if row[key] != "" else None
        row["melanoma"] = int(row["label"] == "melanoma")
    return rows


def png_data_uri(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def outlined(image: np.ndarray, predicted: np.ndarray | None, truth: np.ndarray | None,
             side: int = GALLERY_SIDE) -> np.ndarray:
    """The image scaled to `side` (longer edge) with the mask outlines drawn on it."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    shown = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    for mask, colour in ((truth, TRUTH_RGB), (predicted, PREDICTED_RGB)):
        if mask is None:
            continue
        # Linear resize then threshold: smoother outlines than nearest neighbour when enlarging.
        small = cv2.resize((mask > 0).astype(np.float32), size, interpolation=cv2.INTER_LINEAR) >= 0.5
        contours, _ = cv2.findContours(small.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(shown, contours, -1, colour, 2, lineType=cv2.LINE_AA)
    return shown


def explained(classifier_input: np.ndarray, heat_map: np.ndarray) -> np.ndarray:
    """uint8 [S, 2S, 3]: the classifier's input beside it with its Grad-CAM heat map laid over
    (jet: red where the melanoma probability drew most)."""
    heat = cv2.applyColorMap(np.round(np.clip(heat_map, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    overlay = cv2.addWeighted(classifier_input, 0.55, cv2.cvtColor(heat, cv2.COLOR_BGR2RGB), 0.45, 0)
    return np.concatenate([classifier_input, overlay], axis=1)


def _fmt(key: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{100 * value:.1f}%" if key in AS_PERCENT else f"{value:.3f}"


def _published(value: float) -> str:
    """The paper's figure with exactly its published digits (92.6%, 80.16%)."""
    return f"{100 * value:g}%"


def _with_ci(key: str, entry: Mapping | None) -> str:
    if not entry:
        return "–"
    low, high = entry["ci95"]
    return f"{_fmt(key, entry['value'])} <small>[{_fmt(key, low)}, {_fmt(key, high)}]</small>"


def _metric_table(columns: Sequence[str], rows: Mapping[str, str],
                  cells: Sequence[Callable[[str], str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(f"<tr><td>{html.escape(label)}</td>" + "".join(f'<td class="n">{cell(key)}</td>' for cell in cells)
                   + "</tr>" for key, label in rows.items())
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _paper(keys: set[str]) -> Callable[[str], str]:
    """Cells of the paper column: its figure for `keys`, a dash elsewhere (pixel accuracy is not
    the paper's classification accuracy)."""
    return lambda key: _published(PAPER[key]) if key in keys else "–"


def _cards(metrics: Mapping) -> str:
    seg, cls = metrics.get("segmentation") or {}, metrics.get("classification") or {}
    shown = [("Seg. precision", "segmentation_precision", seg), ("Mean Jaccard", "jaccard", seg),
             ("ROC AUC", "roc_auc", cls), ("Accuracy", "accuracy", cls), ("Sensitivity", "sensitivity", cls),
             ("Specificity", "specificity", cls), ("Precision", "precision", cls)]
    out = []
    for title, key, group in shown:
        entry = group.get(key)
        value = _fmt(key, entry["value"]) if entry else "–"
        paper = f"paper {_published(PAPER[key])}" if key in PAPER else "&nbsp;"
        out.append(f'<div class="card"><div class="k">{title}</div><div class="v">{value}</div>'
                   f'<div class="p">{paper}</div></div>')
    return f'<div class="cards">{"".join(out)}</div>'


def _table1(metrics: Mapping) -> str:
    seg, otsu = metrics["segmentation"], metrics["segmentation_otsu"]
    rows = [("Lesion found (IoU ≥ 0.5): TP", "found"), ("Nothing detected: FN", "missed"),
            ("Background called lesion (IoU &lt; 0.5): FP", "background_called_lesion")]
    body = "".join(f'<tr><th scope="row">{label}</th><td class="n">{seg["table1"][k]}</td>'
                   f'<td class="n">{otsu["table1"][k]}</td></tr>' for label, k in rows)
    body += (f'<tr><th scope="row">Segmentation precision TP / (TP + FP)</th>'
             f'<td class="n">{_fmt("segmentation_precision", seg["segmentation_precision"]["value"])}</td>'
             f'<td class="n">{_fmt("segmentation_precision", otsu["segmentation_precision"]["value"])}</td></tr>')
    return ('<table class="confusion"><thead><tr><th>Images</th><th>Mask R-CNN</th><th>Otsu</th></tr></thead>'
            f"<tbody>{body}</tbody></table>")


def _table2(table: Mapping[str, Mapping[str, int]]) -> str:
    def row(actual: str, label: str) -> str:
        counts = table[actual]
        total = sum(counts.values()) or 1
        cells = "".join(f'<td class="n">{counts[k]} <small>({100 * counts[k] / total:.0f}%)</small></td>'
                        for k in ("predicted_melanoma", "predicted_nevus"))
        return f'<tr><th scope="row">{label}</th>{cells}</tr>'

    return ('<table class="confusion"><thead><tr><th>Actual ↓ · predicted →</th><th>Melanoma</th>'
            f'<th>Nevus</th></tr></thead><tbody>{row("actual_melanoma", "Melanoma")}'
            f'{row("actual_nevus", "Nevus")}</tbody></table>')


def pick_cases(rows: Sequence[dict], key: Callable[[dict], float], borderline: float,
               k: int = CASES_PER_GROUP) -> dict[str, list[dict]]:
    """Best (highest key), borderline (key nearest `borderline`) and worst (lowest key) rows,
    each image shown once."""
    ranked = sorted(rows, key=key, reverse=True)
    best = ranked[:k]
    taken = {r["image_id"] for r in best}
    worst = [r for r in reversed(ranked) if r["image_id"] not in taken][:k]
    taken |= {r["image_id"] for r in worst}
    near = sorted((r for r in rows if r["image_id"] not in taken), key=lambda r: abs(key(r) - borderline))[:k]
    return {"Best": best, "Borderline": near, "Worst": worst}


def _case(row: dict, report_dir: Path, threshold: float) -> str:
    """One gallery card: outlines over the image, and the classifier's input recomputed from the
    image and the predicted mask (the segmenter's export does the same in graph)."""
    image = decode_rgb(row["image_path"])
    predicted = np.asarray(Image.open(report_dir / row["mask_path"]))
    truth = None
    if row.get("truth_mask_path"):
        try:
            truth = load_mask(row["truth_mask_path"], *image.shape[:2])
        except BadInput:  # already listed under Problems; show the image without it
            truth = None
    if row.get("explained_path"):  # the classifier's input as served, and where it looked
        seen = decode_rgb(report_dir / row["explained_path"])
    else:  # an older report: the paper's view, recomputed
        seen = masking.mask_lesion(tf.constant(image), tf.constant(predicted)).numpy()
    melanoma = row["melanoma"] == 1
    tag = '<span class="tag mel">melanoma</span>' if melanoma else '<span class="tag nev">nevus</span>'
    facts = [f"<b>{html.escape(row['image_id'])}</b>", tag]
    if row.get("score") is not None:
        called = row["score"] >= threshold
        cls = ' class="wrong"' if called != melanoma else ""
        facts.append(f"<span{cls}>p(mel) {row['score']:.2f}</span>")
    if row.get("jaccard") is not None:
        facts.append(f"J {row['jaccard']:.2f}")
    if row.get("status") == "no_lesion":
        facts.append("no lesion found")
    alt = html.escape(row["image_id"])
    return (f'<figure class="case"><div class="pair"><img src="{png_data_uri(outlined(image, predicted, truth))}" '
            f'alt="{alt} with mask outlines"><img src="{png_data_uri(seen)}" alt="{alt} as the classifier saw it">'
            f'</div><figcaption>{" · ".join(facts)}</figcaption></figure>')


def _gallery(title: str, explanation: str, groups: Mapping[str, list[dict]], report_dir: Path,
             threshold: float) -> str:
    parts = [f"<h3>{html.escape(title)}</h3><p class=\"meta\">{explanation}</p>"]
    for name, cases in groups.items():
        if cases:
            parts.append(f"<h3>{name}</h3><div class=\"gallery\">"
                         + "".join(_case(r, report_dir, threshold) for r in cases) + "</div>")
    return "".join(parts)


def _embedded(path: Path, alt: str) -> str:
    encoded = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img class="plot" src="data:image/png;base64,{encoded}" alt="{alt}">'


def _plots(rows: Sequence[dict], report_dir: Path) -> str:
    """ROC and reliability PNGs written beside the report (also kept as files) and embedded."""
    y = np.array([r["melanoma"] for r in rows])
    score = np.array([r["score"] for r in rows])
    roc = classification.plot_roc({"whole chain": (y, score)}, report_dir / "roc.png",
                                  "ROC: melanoma vs nevus, predicted masks")
    reliability = classification.plot_reliability(y, score, report_dir / "reliability.png",
                                                  "Calibration of the served probability")
    return _embedded(roc, "ROC curve") + _embedded(reliability, "reliability diagram")


def _at_half(cls: Mapping | None) -> str:
    """The balanced operating point beside a screening threshold: p >= 0.5."""
    if not cls or "error" in cls:
        return ""
    ci = classification.format_ci
    return (f'<p class="meta">At p ≥ 0.5: sensitivity {ci(cls["sensitivity"])}, specificity '
            f'{ci(cls["specificity"])}, balanced accuracy {ci(cls["balanced_accuracy"])}.</p>')


def _calibration(calibration: Mapping | None) -> str:
    if not calibration:
        return ""
    return (f'<p class="meta">Calibration: Brier score {calibration["brier_score"]:.3f} (0 is perfect; always '
            "answering the melanoma rate scores that rate times one minus it); the reliability diagram shows "
            "how often images given a probability turned out melanoma.</p>")


def render(metrics: Mapping, rows: Sequence[dict], report_dir: Path) -> str:
    """The report's HTML."""
    threshold = metrics["threshold"]
    counts = metrics["counts"]
    seg, cls = metrics.get("segmentation"), metrics.get("classification")
    versions = ", ".join(f"{k} v{v}" for k, v in sorted(metrics.get("model_versions", {}).items())) or "–"
    boot = metrics["bootstrap"]
    parts = [
        "<h1>Melanoma detection: whole-chain evaluation</h1>",
        f'<p class="meta">{counts["images"]} images ({counts["melanoma"]} melanoma, {counts["nevus"]} nevus; '
        f'{counts["with_mask"]} with a lesion mask) from <code>{html.escape(metrics["data_dir"])}</code><br>'
        f'Models: {html.escape(versions)} · {html.escape(metrics.get("source") or "")}<br>'
        f'Threshold {threshold:g} · 95% CIs from {boot["samples"]} bootstrap resamples · {metrics["created"]}</p>',
        _cards(metrics),
    ]
    notes = []
    if counts["errors"]:
        notes.append(f'{counts["errors"]} image(s) could not be scored (see Problems)')
    if counts["no_lesion"]:
        notes.append(f'the segmenter found no lesion in {counts["no_lesion"]} image(s): scored 0, i.e. called nevus')
    if counts.get("refused"):
        notes.append(f'the classifier\'s input guard refused {counts["refused"]} image(s) as not dermoscopic '
                     "lesions like those it learned, or unusable: not scored")
    if metrics.get("weights_licence"):
        notes.append(f'the classifier {html.escape(metrics["weights_licence"])}')
    if notes:
        text = "; ".join(notes)
        parts.append(f'<p class="note">{text[0].upper()}{text[1:]}.</p>')
    parts.append("<h2>Segmentation</h2>")
    if seg:
        otsu = metrics["segmentation_otsu"]
        parts += [
            f'<p class="meta">{seg["num_images"]} images with a ground-truth mask; ISIC challenge metrics, '
            "macro-averaged over images, 95% CI in brackets.</p>",
            _metric_table(["Metric", "Mask R-CNN (this chain)", "Otsu baseline", "Paper"], SEGMENTATION_ROWS,
                          [lambda k: _with_ci(k, seg.get(k)), lambda k: _with_ci(k, otsu.get(k)),
                           _paper({"segmentation_precision"})]),
            "<h3>Table I: lesion detection</h3>", _table1(metrics)]
    else:
        parts.append('<p class="note">No image with a ground-truth mask: no segmentation metrics.</p>')
    parts.append("<h2>Classification (from predicted masks)</h2>")
    if cls and "error" not in cls:
        parts += [
            f'<p class="meta">{cls["num_images"]} images ({cls["num_melanoma"]} melanoma); '
            f"called melanoma at p ≥ {threshold:g}.</p>",
            '<div class="grid2"><div>',
            _metric_table(["Metric", "This chain", "Paper"], CLASSIFICATION_ROWS,
                          [lambda k: _with_ci(k, cls.get(k)), _paper(PAPER.keys() - {"segmentation_precision"})]),
            _at_half(metrics.get("classification_at_0.5")), _calibration(metrics.get("calibration")),
            "<h3>Table II: confusion matrix</h3>", _table2(cls["table2"]),
            "</div><div>", _plots([r for r in rows if r.get("score") is not None], report_dir), "</div></div>"]
    else:
        reason = (cls or {}).get("error", "no image was classified")
        parts.append(f'<p class="note">No classification metrics: {html.escape(reason)}.</p>')
    parts.append('<h2>Cases</h2><p class="legend">Left: the image with the'
                 f'<span style="background:rgb{PREDICTED_RGB}"></span>predicted and'
                 f'<span style="background:rgb{TRUTH_RGB}"></span>ground-truth lesion outline. '
                 "Right: the classifier's input as the segmenter cut it and, beside it, where the classifier "
                 "looked (Grad-CAM heat map of the melanoma probability; red: drew most). A score drawn by "
                 "a ruler, ink, a sticker or the dark rim of the lens lights up there, not on the lesion.</p>")
    segmented = [r for r in rows if r.get("jaccard") is not None]
    if segmented:
        parts.append(_gallery("By Jaccard", f"Best and worst overlap with the ground truth; borderline: nearest "
                              f"the {BORDERLINE_JACCARD} cut-off of the thresholded Jaccard.",
                              pick_cases(segmented, lambda r: r["jaccard"], BORDERLINE_JACCARD), report_dir, threshold))
    scored = [r for r in rows if r.get("score") is not None]
    if scored:
        def margin(r: dict) -> float:
            return (r["score"] - threshold) * (1 if r["melanoma"] else -1)

        parts.append(_gallery("By classification margin", "Best: most confidently right; worst: most "
                              "confidently wrong (in red); borderline: probability nearest the threshold.",
                              pick_cases(scored, margin, 0.0), report_dir, threshold))
    if metrics.get("problems"):
        items = "".join(f"<li><code>{html.escape(p['image_id'] or p['path'])}</code>: {html.escape(p['reason'])}</li>"
                        for p in metrics["problems"])
        parts.append(f"<h2>Problems</h2><ul class=\"problems\">{items}</ul>")
    parts.append("<footer>Segmentation numbers are the ISIC challenge scorer's (isic-challenge-scoring) "
                 "per-image metrics, macro-averaged. Classification counts every melanoma/nevus image the chain "
                 "answered; an image where no lesion was found is scored 0. The paper's figures come from its own "
                 "test split, not from these images. All numbers: <code>metrics.json</code>; per image: "
                 "<code>predictions.csv</code>.</footer>")
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">"
            f"<title>Melanoma detection evaluation</title><style>{CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


def write_report(report_dir: str | Path) -> Path:
    """Renders `index.html` from the folder's metrics.json and predictions.csv (atomically)."""
    report_dir = Path(report_dir)
    metrics = json.loads((report_dir / "metrics.json").read_text())
    rows = read_predictions(report_dir / "predictions.csv")
    return atomic.write_text(report_dir / "index.html", render(metrics, rows, report_dir))


def headline(metrics: Mapping) -> list[str]:
    """The headline figures with their 95% intervals, a line per stage (none if nothing scored)."""
    ci = classification.format_ci
    lines = []
    if seg := metrics.get("segmentation"):
        lines.append(f"segmentation ({seg['num_images']} images): Jaccard {ci(seg['jaccard'])}, "
                     f"thresholded Jaccard {ci(seg['threshold_jaccard'])}")
    cls = metrics.get("classification") or {}
    if "roc_auc" in cls:
        lines.append(f"classification ({cls['num_images']} images): ROC AUC {ci(cls['roc_auc'])}, "
                     f"sensitivity {ci(cls['sensitivity'])}, specificity {ci(cls['specificity'])}"
                     + (f" at p ≥ {metrics['threshold']:g}" if "threshold" in metrics else ""))
    half = metrics.get("classification_at_0.5") or {}
    if "roc_auc" in half:
        lines.append(f"  at p ≥ 0.5: sensitivity {ci(half['sensitivity'])}, specificity {ci(half['specificity'])}, "
                     f"balanced accuracy {ci(half['balanced_accuracy'])}")
    if calibration := metrics.get("calibration"):
        lines.append(f"  calibration: Brier score {calibration['brier_score']:.3f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m melanoma_tf.report", description=__doc__.split("\n\n")[0])
    p.add_argument("report_dir", type=Path, help="folder written by melanoma_tf.evaluate")
    print(write_report(p.parse_args(argv).report_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
