"""The embedded server under a bounded abuse mix (issue 36), beside real image requests.

    python benchmarks/server_abuse.py [--exports DIR] [--images DIR] [--seconds 60] [--checkout REF]

Starts `python -m melanoma_tf.serve` (gRPC and REST, Prometheus, default limits) on loopback
with the given exports (default: the stand-in exports of tests/serving_fakes.py, the models the
issue's cases were tried on), then (1) measures real requests alone: 4 threads, each image sent
to the segmenter over REST and the chain over gRPC (`MelanomaClient`); (2) repeats them for
`--seconds` while 2 more threads cycle through the abuse cases below. Every real answer must
equal the idle phase's answer for that image. Written: the server's peak RSS (VmHWM) and its RSS
over time, the largest reply of each abuse case, every case's HTTP/gRPC status, the real
requests' p50/p95 latency idle and under abuse, whether the server survived, to
benchmarks/results/server-abuse.json. `--checkout REF` runs the server of another commit (a
git worktree), e.g. the one before the fixes; a case the old server dies of ends the run there.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from melanoma_tf import atomic, contract

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _http(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
          timeout: float = 120) -> tuple[int, int]:
    """(status, reply bytes); status 0 when the connection failed or timed out."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, len(response.read())
    except (OSError, http.client.HTTPException):
        return 0, 0
    finally:
        connection.close()


def _b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode()}


def abuse_cases(rest: int, grpc_target: str) -> dict:
    """name -> a function returning (status, reply bytes). The issue's cases, bounded."""
    import grpc
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc

    import serving_fakes as fakes

    seg = f"/v1/models/{contract.SEGMENTER}:predict"
    cls = f"/v1/models/{contract.CLASSIFIER}:predict"
    flat = fakes.encode_png(np.zeros((5000, 5000, 3), np.uint8))
    one = json.dumps(np.full((227, 227, 3), 7, np.uint8).tolist())  # 0.45 MB of JSON numbers
    large = ('{"inputs": {"masked_image": [' + ", ".join([one] * 57) + "]}}").encode()  # 25 MiB

    def post(path: str, body: bytes, headers: dict | None = None):
        return lambda: _http(rest, "POST", path, body, headers)

    def empty_reload():
        with grpc.insecure_channel(grpc_target) as channel:
            model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
                model_management_pb2.ReloadConfigRequest(), timeout=30)
        return _http(rest, "GET", f"/v1/models/{contract.CLASSIFIER}")  # still served?

    def idle_connections():
        sockets = [socket.create_connection(("127.0.0.1", rest)) for _ in range(110)]
        try:
            return _http(rest, "GET", f"/v1/models/{contract.CLASSIFIER}", timeout=8)
        finally:
            for s in sockets:
                s.close()

    return {
        "10,000 one-byte instances": post(seg, json.dumps({"instances": ["x"] * 10_000}).encode()),
        "5000x5000 all-zero PNG": post(seg, json.dumps({"instances": [_b64(flat)]}).encode()),
        "empty ReloadConfig, then status": empty_reload,
        "110 idle connections, then status": idle_connections,
        "unknown 100 KB model name": post(f"/v1/models/{'m' * 100_000}:predict", b'{"instances": [1]}'),
        f"{len(large) >> 20} MiB classifier body": post(cls, large),
        "JSON nested 5,000 deep": post(seg, b"[" * 5000 + b"]" * 5000),
        "signature_name 1": post(seg, b'{"signature_name": 1, "instances": ["x"]}'),
        "version past int64": post(f"/v1/models/{contract.CLASSIFIER}/versions/99999999999999999999:predict",
                                   b'{"instances": [1]}'),
        "900 nested lists": post(seg, b'{"instances": [' + b"[" * 900 + b'"x"' + b"]" * 900 + b"]}"),
        "%25-encoded model name": lambda: _http(rest, "GET", "/v1/models/%256cesion_segmenter"),
        ":PREDICT": post(f"/v1/models/{contract.SEGMENTER}:PREDICT", b'{"instances": ["x"]}'),
        "Content-Length over the limit": post(seg, b"x", {"Content-Length": str(300 << 20)}),
        "1.7 into uint8": post(cls, json.dumps({"inputs": {"masked_image": [[[[1.7] * 3] * 227] * 227]}}).encode()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exports", type=Path, default=None, help="base dir of lesion_segmenter/ and melanoma_classifier/")
    p.add_argument("--images", type=Path, default=None, help="real images (default: 8 synthetic look-alikes)")
    p.add_argument("--seconds", type=float, default=60.0, help="how long the abuse mix runs")
    p.add_argument("--checkout", default=None, help="serve with this git ref's code (a worktree)")
    p.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "server-abuse.json")
    args = p.parse_args(argv)

    from melanoma_tf.client import MelanomaClient

    import serving_fakes as fakes

    exports = args.exports or fakes.stand_in_exports()
    images = ([f.read_bytes() for f in sorted(args.images.glob("*.jpg"))[:8]] if args.images
              else [fakes.encode_jpeg(fakes.lesion_image(300, 400, seed=i)) for i in range(8)])
    code_root = ROOT
    if args.checkout:
        code_root = Path(tempfile.mkdtemp(prefix="abuse_checkout_")) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(code_root), args.checkout], cwd=ROOT, check=True)
    config = Path(tempfile.mkdtemp(prefix="abuse_")) / "models.config"
    config.write_text("model_config_list {\n" + "".join(
        f'  config {{ name: "{name}" base_path: "{exports / name}" model_platform: "tensorflow" }}\n'
        for name in (contract.SEGMENTER, contract.CLASSIFIER)) + "}\n")
    grpc_port, rest_port = fakes.free_port(), fakes.free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "melanoma_tf.serve", "--model-config", str(config), "--port", str(grpc_port),
         "--rest-api-port", str(rest_port), "--monitoring-config-file", str(ROOT / "serving/monitoring.config"),
         "--poll-seconds", "0", "--log-level", "ERROR"],
        cwd=code_root, env=dict(os.environ, PYTHONPATH=str(code_root)), stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)
    while "REST" not in (line := server.stdout.readline()):
        if not line:
            raise SystemExit("the server did not start")
    threading.Thread(target=server.stdout.read, daemon=True).start()
    rss: list[tuple[float, int]] = []
    start = time.monotonic()

    def sample() -> None:
        while server.poll() is None:
            rss.append((round(time.monotonic() - start, 1), _rss_kb(server.pid, "VmRSS") >> 10))
            time.sleep(0.5)

    threading.Thread(target=sample, daemon=True).start()
    client = MelanomaClient(f"127.0.0.1:{grpc_port}", timeout=120)
    seg = f"/v1/models/{contract.SEGMENTER}:predict"

    def real(i: int) -> tuple[float, tuple]:
        began = time.perf_counter()
        data = images[i % len(images)]
        status, _ = _http(rest_port, "POST", seg, json.dumps({"instances": [_b64(data)]}).encode())
        result = client.predict(data)
        return time.perf_counter() - began, (status, round(result.melanoma_probability, 6), result.status)

    def run_real(seconds: float | None, count: int, out: list) -> None:
        i = 0
        while (seconds is None and i < count) or (seconds is not None and time.monotonic() < stop_at):
            try:
                out.append((i % len(images), *real(i)))
            except Exception as exc:  # a refused or failed real request is what this measures
                out.append((i % len(images), 0.0, ("failed", str(exc)[:200])))
            i += 1

    idle: list = []
    threads = [threading.Thread(target=run_real, args=(None, len(images), idle)) for _ in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    expected = {i: answer for i, _, answer in idle}
    cases = abuse_cases(rest_port, f"127.0.0.1:{grpc_port}")
    outcomes: dict[str, list] = {name: [] for name in cases}
    busy: list = []
    stop_at = time.monotonic() + args.seconds

    def run_abuse(offset: int) -> None:
        names = list(cases)
        k = offset
        while time.monotonic() < stop_at and server.poll() is None:
            name = names[k % len(names)]
            status, size = cases[name]()
            outcomes[name].append((status, size))
            k += 1

    threads = ([threading.Thread(target=run_real, args=(args.seconds, 0, busy)) for _ in range(4)]
               + [threading.Thread(target=run_abuse, args=(o,)) for o in (0, 7)])
    [t.start() for t in threads]
    [t.join() for t in threads]
    alive = server.poll() is None
    peak = _rss_kb(server.pid, "VmHWM") >> 10 if alive else max((m for _, m in rss), default=0)
    wrong = [(i, answer) for i, _, answer in busy if answer != expected[i]]
    client.close()
    server.terminate()
    server.wait(60)
    if args.checkout:
        subprocess.run(["git", "worktree", "remove", "--force", str(code_root)], cwd=ROOT, check=False)

    def latency(rows: list) -> dict:
        seconds = np.array([s for _, s, answer in rows if answer[0] != "failed"]) * 1000
        return {"requests": len(rows), "p50_ms": round(float(np.percentile(seconds, 50)), 1),
                "p95_ms": round(float(np.percentile(seconds, 95)), 1)} if len(seconds) else {"requests": len(rows)}

    result = {
        "code": args.checkout or "working tree",
        "exports": str(args.exports) if args.exports else "stand-in exports of tests/serving_fakes.py",
        "images": str(args.images) if args.images else "8 synthetic 400x300 JPEGs",
        "abuse_seconds": args.seconds, "server_survived": alive, "server_exit_code": server.returncode,
        "server_peak_rss_mb": peak, "server_rss_mb_over_time": rss[::4],
        "real_requests": {"idle": latency(idle), "under_abuse": latency(busy), "wrong_or_failed": len(wrong),
                          "examples_wrong": wrong[:5]},
        "abuse_cases": {name: {"runs": len(o), "statuses": sorted({s for s, _ in o}),
                               "largest_reply_bytes": max((b for _, b in o), default=0)}
                        for name, o in outcomes.items()},
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    results = json.loads(args.output.read_text()) if args.output.exists() else {}
    results[result["code"]] = result
    atomic.write_json(args.output, results)
    print(json.dumps({k: v for k, v in result.items() if k != "server_rss_mb_over_time"}, indent=1))
    return 0 if alive and not wrong else 1


if __name__ == "__main__":
    sys.exit(main())
