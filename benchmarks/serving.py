"""Cost of serving: the gRPC chain vs the same two SavedModels called in-process, and
the chain spread over several embedded server replicas.

    python benchmarks/serving.py [--exports DIR | --segmenter DIR --classifier DIR] [--images DIR]

Measures images/s and p50/p99 per-image latency of segment -> classify at
concurrency 1, 4 and 16, (a) in-process (threads calling the signature functions,
one image per call, plus one run with whole batches of `max_batch_size` images) and
(b) through MelanomaClient over gRPC to embedded servers started in this process with
serving/batching_parameters.txt (`--replicas 1 2`: one server, then two behind gRPC's
round_robin, with the share of requests each served), or an external --server.
Prints the gRPC/in-process throughput ratios and writes
benchmarks/results/serving-real-exports.json.  The models are the exports of
`benchmarks/pipeline.py` (or any two given); the images are the given folder's or
synthetic look-alikes (`melanoma_tf.data.synthetic`).  The goal: at batch throughput
the gRPC chain costs at most 10% more than in-process.
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
from melanoma_tf.data import synthetic

ROOT = Path(__file__).resolve().parents[1]
PIPELINE_EXPORTS = ROOT / "benchmarks" / ".runs" / "pipeline-isic-sample-cpu" / "exports"


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
    if directory is None:
        with tempfile.TemporaryDirectory(prefix="melanoma_bench_") as scratch:
            return _load_images(synthetic.generate_dataset(Path(scratch) / "synthetic", num_images=count) / "images",
                                count)
    files = sorted(p for p in directory.rglob("*")
                   if p.suffix.lower() in {".jpg", ".jpeg", ".png"} and not p.stem.endswith("_segmentation"))[:count]
    if not files:
        raise SystemExit(f"{directory}: no jpg/png images")
    return [p.read_bytes() for p in files]


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


def bench_grpc(targets: list[str], images: list[bytes], levels: list[int], mode: str = "grpc") -> list[dict]:
    """MelanomaClient.predict_many over gRPC (round_robin over `targets`) at each concurrency."""
    from melanoma_tf.client import MelanomaClient

    results = []
    with MelanomaClient(targets, timeout=300, connect_timeout=30) as client:
        client.predict(images[0])
        for level in levels:
            started = time.perf_counter()
            outcomes = list(client.predict_many(images, concurrency=level))
            wall = time.perf_counter() - started
            failed = [r.error for r in outcomes if r.error]
            if failed:
                raise SystemExit(f"gRPC run failed: {failed[:3]}")
            results.append(_summary(mode, level, [r.latency_ms["total"] for r in outcomes],
                                    wall, len(images)))
    return results


def _requests_served(handle) -> int:
    return sum(queue["tasks"] + queue["unbatched_tasks"]
               for version in handle.stats().values() for queue in version["batching"].values())


def bench_replicas(config, batching: Path, replicas: int, images: list[bytes], levels: list[int]) -> dict:
    """The gRPC chain against `replicas` embedded servers in this process (round_robin)."""
    from melanoma_tf.serving.server import start_server

    handles = [start_server(config, batching_parameters=batching, poll_seconds=0) for _ in range(replicas)]
    try:
        results = bench_grpc([h.target for h in handles], images, levels, mode=f"grpc_{replicas}_servers")
        served = [_requests_served(h) for h in handles]
    finally:
        for handle in handles:
            handle.stop()
    return {"replicas": replicas, "results": results,
            "share_of_requests": [round(n / max(1, sum(served)), 3) for n in served]}


def _relative(path: Path) -> str:
    return os.path.relpath(path.resolve(), ROOT)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exports", type=Path, default=PIPELINE_EXPORTS,
                        help="folder holding lesion_segmenter/ and melanoma_classifier/ "
                             "(default: benchmarks/pipeline.py's)")
    parser.add_argument("--segmenter", type=Path, help="segmenter SavedModel (or its base path)")
    parser.add_argument("--classifier", type=Path, help="classifier SavedModel (or its base path)")
    parser.add_argument("--images", type=Path, help="folder of jpg/png images (default: synthetic look-alikes)")
    parser.add_argument("--num-images", type=int, default=24)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2],
                        help="embedded servers behind round_robin, one measurement per count")
    parser.add_argument("--batching-parameters", type=Path,
                        default=ROOT / "serving" / "batching_parameters.txt")
    parser.add_argument("--server", help="benchmark this gRPC target instead of embedded servers")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "serving-real-exports.json")
    args = parser.parse_args(argv)

    from tensorflow_serving.config import model_server_config_pb2

    from melanoma_tf.serving.config import batching_options_from

    batch_size = batching_options_from(args.batching_parameters).max_batch_size
    args.segmenter = args.segmenter or args.exports / contract.SEGMENTER
    args.classifier = args.classifier or args.exports / contract.CLASSIFIER
    for path in (args.segmenter, args.classifier):
        if not path.exists():
            raise SystemExit(f"{path} does not exist: run benchmarks/pipeline.py (or `python -m "
                             "melanoma_tf.pipeline`) first, or pass --exports / --segmenter and --classifier")
    segmenter_dir, classifier_dir = _version_dir(args.segmenter), _version_dir(args.classifier)
    images = _load_images(args.images, args.num_images)

    results = bench_in_process(segmenter_dir, classifier_dir, images, args.concurrency, batch_size)
    replicas = []
    if args.server:
        results += bench_grpc([args.server], images, args.concurrency)
    else:
        config = model_server_config_pb2.ModelServerConfig()
        for name, version_dir in ((contract.SEGMENTER, segmenter_dir),
                                  (contract.CLASSIFIER, classifier_dir)):
            entry = config.model_config_list.config.add(
                name=name, base_path=str(version_dir.parent), model_platform="tensorflow")
            entry.model_version_policy.specific.versions.append(int(version_dir.name))
        for count in args.replicas:
            replicas.append(bench_replicas(config, args.batching_parameters, count, images, args.concurrency))
            results += replicas[-1]["results"]
    grpc_mode = "grpc" if args.server else f"grpc_{args.replicas[0]}_servers"

    by_key = {(r["mode"], r["concurrency"]): r for r in results}
    best_in_process = max(r["images_per_s"] for r in results if r["mode"].startswith("in_process"))
    best_grpc = max(r["images_per_s"] for r in results if r["mode"] == grpc_mode)
    ratios = {f"concurrency_{c}": round(by_key[(grpc_mode, c)]["images_per_s"]
                                        / by_key[("in_process", c)]["images_per_s"], 3)
              for c in args.concurrency}
    ratios["best_grpc_vs_best_in_process"] = round(best_grpc / best_in_process, 3)
    report = {
        "segmenter": _relative(segmenter_dir), "classifier": _relative(classifier_dir),
        "images": len(images), "image_source": _relative(args.images) if args.images else "synthetic",
        "server": args.server or "embedded (same process)",
        "batching_parameters": _relative(args.batching_parameters),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
        "results": results,
        "replicas": [{k: r[k] for k in ("replicas", "share_of_requests")} for r in replicas],
        "throughput_ratio_grpc_over_in_process": ratios,
        "serving_overhead_at_batch_throughput_pct": round((best_in_process / best_grpc - 1) * 100, 1),
    }
    print(f"{'mode':<20}{'conc':>6}{'img/s':>10}{'p50 ms':>10}{'p99 ms':>10}")
    for r in results:
        print(f"{r['mode']:<20}{r['concurrency']:>6}{r['images_per_s']:>10.1f}"
              f"{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}")
    for r in replicas:
        print(f"{r['replicas']} servers: share of requests {r['share_of_requests']}")
    for key, value in ratios.items():
        print(f"gRPC / in-process throughput, {key}: {value:.3f}")
    print(f"serving overhead at batch throughput: {report['serving_overhead_at_batch_throughput_pct']}%")
    atomic.write_json(args.output, report, indent=2)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
