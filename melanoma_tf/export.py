"""Exports a trained stage as a TF Serving SavedModel into a versioned folder.

    python -m melanoma_tf.export --stage seg --model-dir runs/seg --export-dir exports/lesion_segmenter/1
    python -m melanoma_tf.export --stage cls --model-dir runs/cls --export-dir exports/melanoma_classifier/1
    python -m melanoma_tf.export --stage cls --model-dir runs/cls --export-dir exports/melanoma_classifier \
        --next-version

The experiment config is read back from the model dir (`params.yaml`), so the exported graph is
the trained one. Warm-up requests for TF Serving go to `assets.extra/tf_serving_warmup_requests`.
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
        from melanoma_tf.serving import export_segmenter as exporter
    else:
        from melanoma_tf.serving import export_classifier as exporter
    exporter.export(model_dir=args.model_dir, export_dir=args.export_dir, checkpoint=args.checkpoint)
    print(f"exported {args.stage} model to {args.export_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
