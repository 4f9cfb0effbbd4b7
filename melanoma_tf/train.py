"""Trains one stage of the pipeline.

    python -m melanoma_tf.train --stage seg --data-dir tfrecords/NAME --model-dir runs/seg \
        [--experiment lesion_maskrcnn_r101_fpn] [--config-file F.yaml] [--params-override K=V,...] \
        [--mode train|eval|train_and_eval]
    python -m melanoma_tf.train --stage cls --data-dir tfrecords/NAME --model-dir runs/cls \
        [--folds 5] [--epochs N] [--config-file F.yaml] [--params-override K=V,...] \
        [--fold K | --fold final | --summarize]

Segmentation runs through Model Garden's `train_lib.run_experiment` (Orbit, checkpoints, resume,
TensorBoard); classification through Keras with k-fold cross-validation. Both read configs the
Model Garden way: a registered experiment, then YAML files, then `--params-override`.

A classifier run is k + 1 independent fits and a summary. On a cluster each fit is its own
process (`--fold 0` ... `--fold K-1`, `--fold final`, e.g. one pod each), all with the same flags
and --model-dir; `--summarize` then pools the folds (CV metrics, the screening threshold the
export takes) and scores the final model, refusing while a fit is missing. Without --fold or
--summarize one process runs all of it in turn.
"""

from __future__ import annotations

import argparse
import sys

from melanoma_tf import storage


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("seg", "cls"), required=True)
    p.add_argument("--data-dir", type=storage.path, required=True,
                   help="folder made by build_tfrecords (or a bucket: gs://b/records)")
    p.add_argument("--model-dir", type=storage.path, required=True, help="checkpoints, summaries, results")
    p.add_argument("--experiment", default=None, help="registered experiment (default per stage)")
    p.add_argument("--config-file", action="append", default=[], help="YAML override, repeatable")
    p.add_argument("--params-override", default="", help="e.g. task.model.input_size=[256,256,3]")
    p.add_argument("--mode", default="train_and_eval", choices=("train", "eval", "train_and_eval"),
                   help="seg only")
    p.add_argument("--folds", type=int, default=None, help="cls only: cross-validation folds (0: none)")
    p.add_argument("--epochs", type=int, default=None, help="cls only: epochs per model")
    piece = p.add_mutually_exclusive_group()
    piece.add_argument("--fold", default=None, metavar="K|final",
                       help="cls only: train cross-validation fold K (0-based) or the final model, nothing else")
    piece.add_argument("--summarize", action="store_true",
                       help="cls only: pool the finished folds and score the final model (no training)")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.stage == "seg" and (args.fold is not None or args.summarize):
        parser.error("--fold and --summarize are for --stage cls")
    if args.fold is not None and args.fold != "final" and not args.fold.isdigit():
        parser.error(f"--fold {args.fold}: expected a fold number or 'final'")
    if args.stage == "seg":
        from melanoma_tf.tasks import lesion_segmentation

        lesion_segmentation.train(
            data_dir=args.data_dir, model_dir=args.model_dir, experiment=args.experiment,
            config_files=args.config_file, params_override=args.params_override, mode=args.mode)
    else:
        from melanoma_tf.tasks import melanoma_classification

        try:
            melanoma_classification.train(
                data_dir=args.data_dir, model_dir=args.model_dir, experiment=args.experiment,
                config_files=args.config_file, params_override=args.params_override,
                folds=args.folds, epochs=args.epochs, fit_only=args.fold, summarize_only=args.summarize)
        except ValueError as e:  # MissingFits, a fold out of range, params of another run
            print(f"error: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
