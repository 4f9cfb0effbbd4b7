"""Run the embedded TF Serving-compatible server: `python -m melanoma_tf.serve`.

The same models.config as the Docker deployment works locally by mapping the
container base paths: `--model-base-path-map /models=exports`. gRPC answers on --port
(8500), TF Serving's REST API on --rest-api-port (none by default, as TF Serving's binary; the
Docker image and serving/ pass 8501), Prometheus metrics there with
`--monitoring-config-file serving/monitoring.config`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from melanoma_tf.serving.config import parse_path_map


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m melanoma_tf.serve", description=__doc__)
    parser.add_argument("--model-config", required=True,
                        help="text ModelServerConfig (e.g. serving/models.config)")
    parser.add_argument("--port", type=int, default=8500, help="gRPC port (0 = pick a free one)")
    parser.add_argument("--rest-api-port", type=int, default=0,
                        help="TF Serving's REST API port; 0 (default, as TF Serving's binary) = no REST "
                             "API, so several servers on one host need only their --port")
    parser.add_argument("--monitoring-config-file", default=None,
                        help="monitoring.config (TF Serving's MonitoringConfig); with prometheus_config "
                             "enabled, metrics are served at its path on the REST port")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default loopback only)")
    parser.add_argument("--batching-parameters", default=None,
                        help="batching_parameters.txt; omit to disable server-side batching")
    parser.add_argument("--model-base-path-map", action="append", default=[], metavar="SRC=DST",
                        help="rewrite base paths starting with SRC to DST (repeatable), "
                             "e.g. /models=exports")
    parser.add_argument("--poll-seconds", type=float, default=5.0,
                        help="how often to look for new/removed version folders (0 = never)")
    parser.add_argument("--model-config-poll-seconds", type=float, default=0.0,
                        help="re-read --model-config when it changes (0 = never)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="do not replay assets.extra/tf_serving_warmup_requests")
    parser.add_argument("--allow-version-labels-for-unavailable-models", action="store_true",
                        help="accept new labels for versions that are not loaded (as TF Serving)")
    parser.add_argument("--max-message-mb", type=int, default=256,
                        help="max size in MiB of a gRPC message or a REST body, and of a reply on either port")
    parser.add_argument("--grpc-channel-arguments", default="", metavar="grpc.NAME=VALUE,...",
                        help="gRPC server arguments, as TF Serving's --grpc_channel_arguments, e.g. "
                             "grpc.max_connection_age_ms=60000,grpc.max_connection_age_grace_ms=30000 "
                             "so that clients re-resolve and find new replicas")
    parser.add_argument("--grace-seconds", type=float, default=30.0,
                        help="on SIGTERM/SIGINT, how long in-flight requests may finish")
    parser.add_argument("--log-level", default="INFO")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Start the server, print where it serves, and run until SIGTERM/SIGINT."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from melanoma_tf.serving.server import channel_arguments, start_server

    try:
        path_map = parse_path_map(args.model_base_path_map)
        channel_arguments(args.grpc_channel_arguments)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    handle = start_server(
        args.model_config, port=args.port, host=args.host,
        batching_parameters=args.batching_parameters, path_map=path_map,
        poll_seconds=args.poll_seconds, model_config_poll_seconds=args.model_config_poll_seconds,
        enable_warmup=not args.no_warmup,
        allow_version_labels_for_unavailable_models=args.allow_version_labels_for_unavailable_models,
        max_message_bytes=args.max_message_mb * 1024 * 1024,
        rest_port=args.rest_api_port or None, monitoring_config=args.monitoring_config_file,
        grpc_channel_arguments=args.grpc_channel_arguments)
    print(f"Serving TF Serving gRPC API on {handle.target}", flush=True)
    if handle.rest_port is not None:
        print(f"Serving TF Serving REST API on http://{handle.host}:{handle.rest_port}", flush=True)
    for model in handle.registry.describe():
        versions = ", ".join(f"{v} {state}" for v, state in model["versions"].items()) or "none yet"
        labels = ", ".join(f"{k}={v}" for k, v in sorted(model["labels"].items()))
        print(f"  {model['name']}: {model['base_path']} versions [{versions}]"
              + (f" labels [{labels}]" if labels else ""), flush=True)
        for version, message in model["errors"].items():
            print(f"    version {version} failed: {message}", flush=True)
    while not stop_requested.wait(0.5):
        pass
    print("Shutting down: finishing in-flight requests", flush=True)
    handle.stop(grace=args.grace_seconds)
    print("Stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
