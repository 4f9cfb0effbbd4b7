"""Cost of serving: the gRPC chain vs the same two SavedModels called in-process.

    python benchmarks/serving.py [--segmenter DIR --classifier DIR --images DIR]

Measures images/s and p50/p99 per-image latency of segment -> classify at
concurrency 1, 4 and 16, (a) in-process (threads calling the signature functions,
one image per call, plus one run with whole batches of `max_batch_size` images) and
(b) through MelanomaClient over gRPC to the embedded server (started in this process
with serving/batching_parameters.txt, or an external server with --server). Prints
the gRPC/in-process throughput ratios and writes benchmarks/results/serving.json.
Without model dirs it uses the stand-in models of tests/serving_fakes.py and
synthetic images, so it runs anywhere.  The goal: at batch throughput the gRPC chain
costs at most 10% more than in-process.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import numpy as np

from melanoma_tf import atomic, contract

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _version_dir(path: Path) -> Path:
    """Accept a SavedModel folder or a base path holding integer version folders."""
    from melanoma_tf.serving import versions

    if (path / "saved_model.pb").exists():
        return path
    try:
        return Path(versions.newest_version(str(path)))
    except FileNotFoundError as e:
        raise SystemExit(f"{e} (and no saved_model.pb in it)") from None


def _load_images(directory: Path | None, count: int) -> list[bytes]:
    if directory is not None:
        files = sorted(p for p in directory.rglob("*")
                       if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:count]
        if not files:
            raise SystemExit(f"{directory}: no jpg/png images")
        return [p.read_bytes() for p in files]
    import serving_fakes

    return [serving_fakes.encode_jpeg(serving_fakes.lesion_image(192, 256, seed=i))
            for i in range(count)]


def _summary(mode: str, concurrency: int, latencies: list[float], wall: float,
             images: int) -> dict:
    ordered = np.sort(np.asarray(latencies))
    return {"mode": mode, "concurrency": concurrency, "images": images,
            "seconds": round(wall, 4), "images_per_s": round(images / wall, 3),
            "p50_ms": round(float(np.percentile(ordered, 50)), 3),
            "p99_ms": round(float(np.percentile(ordered, 99)), 3)}


def bench_in_process(segmenter_dir: Path, classifier_dir: Path, images: list[bytes],
                     levels: list[int], batch_size: int) -> list[dict]:
    """Threads calling the signature functions directly, plus whole-batch calls."""
    import tensorflow as tf

    segment = tf.saved_model.load(str(segmenter_dir)).signatures["serving_default"]
    classify = tf.saved_model.load(str(classifier_dir)).signatures["serving_default"]

    def chain(batch: list[bytes]) -> float:
        started = time.perf_counter()
        out = segment(image_bytes=tf.constant(batch))
        found = tf.where(out["status"] == 0)[:, 0]
        if tf.size(found) > 0:
            classify(masked_image=tf.gather(out["masked_image"], found))
        return (time.perf_counter() - started) * 1000.0

    chain(images[:1])
    results = []
    for level in levels:
        started = time.perf_counter()
        with futures.ThreadPoolExecutor(level) as pool:
            latencies = list(pool.map(lambda data: chain([data]), images))
        results.append(_summary("in_process", level, latencies, time.perf_counter() - started,
                                len(images)))
    started, latencies = time.perf_counter(), []
    for begin in range(0, len(images), batch_size):
        batch = images[begin:begin + batch_size]
        latencies.extend([chain(batch)] * len(batch))
    results.append(_summary("in_process_batched", batch_size, latencies,
                            time.perf_counter() - started, len(images)))
    return results


def bench_grpc(target: str, images: list[bytes], levels: list[int]) -> list[dict]:
    """MelanomaClient.predict_many over gRPC at each concurrency."""
    from melanoma_tf.client import MelanomaClient

    results = []
    with MelanomaClient(target, timeout=300) as client:
        client.predict(images[0])
        for level in levels:
            started = time.perf_counter()
            outcomes = list(client.predict_many(images, concurrency=level))
            wall = time.perf_counter() - started
            failed = [r.error for r in outcomes if r.error]
            if failed:
                raise SystemExit(f"gRPC run failed: {failed[:3]}")
            results.append(_summary("grpc", level, [r.latency_ms["total"] for r in outcomes],
                                    wall, len(images)))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--segmenter", type=Path, help="segmenter SavedModel (or its base path)")
    parser.add_argument("--classifier", type=Path, help="classifier SavedModel (or its base path)")
    parser.add_argument("--images", type=Path, help="folder of jpg/png images")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batching-parameters", type=Path,
                        default=ROOT / "serving" / "batching_parameters.txt")
    parser.add_argument("--server", help="benchmark this gRPC target instead of an embedded server")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "serving.json")
    args = parser.parse_args(argv)

    from melanoma_tf.serving.config import batching_options_from

    batch_size = batching_options_from(args.batching_parameters).max_batch_size
    scratch = None
    if args.segmenter is None or args.classifier is None:
        import serving_fakes

        scratch = tempfile.TemporaryDirectory(prefix="melanoma_bench_")
        base = serving_fakes.copy_exports(Path(scratch.name) / "exports")
        args.segmenter = base / serving_fakes.SEGMENTER
        args.classifier = base / serving_fakes.CLASSIFIER
        source = "stand-in models (tests/serving_fakes.py)"
    else:
        source = "given exports"
    segmenter_dir, classifier_dir = _version_dir(args.segmenter), _version_dir(args.classifier)
    images = _load_images(args.images, args.num_images)

    results = bench_in_process(segmenter_dir, classifier_dir, images, args.concurrency, batch_size)
    handle = None
    target = args.server
    if target is None:
        from tensorflow_serving.config import model_server_config_pb2

        from melanoma_tf.serving.server import start_server

        config = model_server_config_pb2.ModelServerConfig()
        for name, version_dir in ((contract.SEGMENTER, segmenter_dir),
                                  (contract.CLASSIFIER, classifier_dir)):
            entry = config.model_config_list.config.add(
                name=name, base_path=str(version_dir.parent), model_platform="tensorflow")
            entry.model_version_policy.specific.versions.append(int(version_dir.name))
        handle = start_server(config, batching_parameters=args.batching_parameters,
                              poll_seconds=0)
        target = handle.target
    try:
        results += bench_grpc(target, images, args.concurrency)
    finally:
        if handle is not None:
            handle.stop()

    by_key = {(r["mode"], r["concurrency"]): r for r in results}
    best_in_process = max(r["images_per_s"] for r in results if r["mode"].startswith("in_process"))
    best_grpc = max(r["images_per_s"] for r in results if r["mode"] == "grpc")
    ratios = {f"concurrency_{c}": round(by_key[("grpc", c)]["images_per_s"]
                                        / by_key[("in_process", c)]["images_per_s"], 3)
              for c in args.concurrency}
    ratios["best_grpc_vs_best_in_process"] = round(best_grpc / best_in_process, 3)
    report = {
        "source": source, "segmenter": str(segmenter_dir), "classifier": str(classifier_dir),
        "images": len(images), "server": args.server or "embedded (same process)",
        "batching_parameters": str(args.batching_parameters),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "results": results,
        "throughput_ratio_grpc_over_in_process": ratios,
        "serving_overhead_at_batch_throughput_pct": round((best_in_process / best_grpc - 1) * 100, 1),
    }
    print(f"{'mode':<20}{'conc':>6}{'img/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for r in results:
        print(f"{r['mode']:<20}{r['concurrency']:>6}{r['images_per_s']:>10.1f}"
              f"{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}")
    for key, value in ratios.items():
        print(f"gRPC / in-process throughput, {key}: {value:.3f}")
    print(f"serving overhead at batch throughput: {report['serving_overhead_at_batch_throughput_pct']}%")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(args.output, report, indent=2)
    print(f"wrote {args.output}")
    if scratch is not None:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
