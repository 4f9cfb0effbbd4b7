"""The embedded server's Prometheus metrics, under TF Serving's own metric names.

Served on the REST port at the path of the monitoring config (`--monitoring-config-file`, the
file the TF Serving container reads), in the Prometheus text format written by `prometheus_client`.
TF Serving's names, with `/` as `:` as TF Serving exports them; `prometheus_client` adds `_total`
to counters, as current Prometheus conventions ask:

    :tensorflow:serving:request_count{model_name, status}                counter
    :tensorflow:serving:request_latency{model_name, API, entrypoint}     histogram, microseconds
    :tensorflow:serving:batching:processed_batch_size{model_name, op_name}  histogram
    :tensorflow:cc:saved_model:load_attempt_count{model_path, status}    counter
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterator

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from melanoma_tf.serving.errors import from_exception

CONTENT_TYPE = CONTENT_TYPE_LATEST
# TF Serving's request-latency buckets: 10 us growing by 1.8x (33 buckets, up to about 2 hours).
LATENCY_BUCKETS_USEC = tuple(10 * 1.8 ** i for i in range(33))
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


# The model_name label of requests for a model the server does not serve, and of requests that
# fail before a model is named (unparsable paths or bodies): a client's made-up names must not
# become series of their own, each held for the life of the process.
UNKNOWN_MODEL = ""


class ServingMetrics:
    """One server's metrics, in a registry of its own (several servers in one process each
    count their own requests). `served(name)` tells which model names get a label of their own
    (the server sets it to its registry's); the others count under UNKNOWN_MODEL."""

    def __init__(self, served: Callable[[str], bool] = lambda name: True) -> None:
        self.served = served
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(":tensorflow:serving:request_count", "Requests by model and status.",
                                ["model_name", "status"], registry=self.registry)
        self.latency = Histogram(":tensorflow:serving:request_latency",
                                 "Request latency in microseconds, by model, API and entrypoint.",
                                 ["model_name", "API", "entrypoint"], buckets=LATENCY_BUCKETS_USEC,
                                 registry=self.registry)
        self.batch_size = Histogram(":tensorflow:serving:batching:processed_batch_size",
                                    "Examples in each batch run, by model and signature.",
                                    ["model_name", "op_name"], buckets=BATCH_SIZE_BUCKETS, registry=self.registry)
        self.loads = Counter(":tensorflow:cc:saved_model:load_attempt_count", "SavedModel load attempts.",
                             ["model_path", "status"], registry=self.registry)

    @contextlib.contextmanager
    def request(self, model_name: str, api: str, entrypoint: str) -> Iterator[None]:
        """Counts and times one request; its status is the gRPC code name it failed with, or OK."""
        start = time.perf_counter()
        status = grpc.StatusCode.OK.name
        model_name = model_name if model_name and self.served(model_name) else UNKNOWN_MODEL
        try:
            yield
        except BaseException as exc:
            status = from_exception(exc).code.name
            raise
        finally:
            self.count(model_name, status)
            self.latency.labels(model_name, api, entrypoint).observe((time.perf_counter() - start) * 1e6)

    def count(self, model_name: str, status: str) -> None:
        """One request of a served model (or UNKNOWN_MODEL) that ended with gRPC status `status`."""
        self.requests.labels(model_name, status).inc()

    def batch(self, queue_name: str, size: int) -> None:
        """A batch of `size` examples ran on queue `<model>/<version>/<signature>`."""
        model, _, signature = queue_name.split("/", 2)
        self.batch_size.labels(model, signature).observe(size)

    def load(self, model_path: str, ok: bool) -> None:
        self.loads.labels(model_path, "success" if ok else "error").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
