"""Exports a trained stage as a TF Serving SavedModel into a versioned folder.

    python -m melanoma_tf.export --stage seg --model-dir runs/seg --export-dir exports/lesion_segmenter/1 \
        --classifier-model-dir runs/cls
    python -m melanoma_tf.export --stage cls --model-dir runs/cls --export-dir exports/melanoma_classifier/1
    python -m melanoma_tf.export --stage cls --model-dir runs/cls --export-dir exports/melanoma_classifier \
        --next-version [--fold-ensemble | --ensemble-with runs/cls_xception]

The experiment config is read back from the model dir (`params.yaml`), so the exported graph is
the trained one. The segmenter's export computes the classifier's input in its graph: give it the
classifier run (`--classifier-model-dir`) so that it cuts the view that classifier trained on
(the masked lesion, or the lesion in its context). Warm-up requests for TF Serving go to
`assets.extra/tf_serving_warmup_requests`.
"""

from __future__ import annotations

import argparse
import sys

from melanoma_tf import storage


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=("seg", "cls"), required=True)
    p.add_argument("--model-dir", type=storage.path, required=True, help="the training run's folder")
    p.add_argument("--export-dir", type=storage.path, required=True,
                   help=".../<model name>/<version>, or .../<model name> with --next-version; "
                        "may be a bucket (gs://b/models/<model name>) that TF Serving reads")
    p.add_argument("--next-version", action="store_true",
                   help="export into the version after every one in --export-dir (e.g. from a cluster Job)")
    p.add_argument("--checkpoint", default=None, help="default: the latest in --model-dir")
    p.add_argument("--fold-ensemble", action="store_true",
                   help="--stage cls: serve the mean of the run's cross-validation folds' models")
    p.add_argument("--ensemble-with", type=storage.path, action="append", default=[], metavar="RUN",
                   help="--stage cls: serve the mean of this run's final model and RUN's (repeatable), "
                        "at the threshold chosen on the mean of their out-of-fold predictions")
    p.add_argument("--classifier-model-dir", type=storage.path, default=None,
                   help="--stage seg: the classifier run whose input view (data.view, data.margin) the "
                        "segmenter's masked_image computes; default: the segmenter config's classifier_view")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.next_version:
        from melanoma_tf.serving import versions

        args.export_dir = storage.path(versions.next_version(str(args.export_dir)))
    if not args.export_dir.name.isdigit():
        print(f"error: {args.export_dir}: TF Serving needs a numeric version folder, "
              "e.g. exports/lesion_segmenter/1", file=sys.stderr)
        return 2
    if args.stage == "seg":
        from melanoma_tf.serving import export_segmenter

        if args.fold_ensemble or args.ensemble_with:
            print("error: --fold-ensemble and --ensemble-with go with --stage cls", file=sys.stderr)
            return 2
        export_segmenter.export(args.model_dir, args.export_dir, args.checkpoint, args.classifier_model_dir)
    elif args.classifier_model_dir is not None:
        print("error: --classifier-model-dir goes with --stage seg", file=sys.stderr)
        return 2
    else:
        from melanoma_tf.serving import export_classifier

        export_classifier.export(args.model_dir, args.export_dir, args.checkpoint, args.fold_ensemble,
                                 args.ensemble_with)
    print(f"exported {args.stage} model to {args.export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
