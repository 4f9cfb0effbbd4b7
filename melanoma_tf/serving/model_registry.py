"""Which model versions are loaded, and which one serves a ModelSpec.

Mirrors TF Serving's file-system source + aspired-versions manager: versions are the
integer-named folders under each model's base path (a folder counts once it holds
saved_model.pb); the model's version policy (latest N / all / specific) picks the
aspired ones; new versions are loaded and warmed up before superseded ones are
unloaded, so there is always a version to serve.  Unloading only removes a version
from lookup: requests already holding it finish on it.  Labels may only point at
AVAILABLE versions (TF Serving's rule), unless
`allow_version_labels_for_unavailable_models` is set, which as in TF Serving only
allows a label that is new or unchanged.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tensorflow as tf
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2, status_pb2
from tensorflow_serving.config import model_server_config_pb2

from melanoma_tf.serving import versions
from melanoma_tf.serving.batching import SharedBatchScheduler
from melanoma_tf.serving.config import PathMap, map_base_path
from melanoma_tf.serving.errors import (
    ServingError,
    code_number,
    failed_precondition,
    from_exception,
    invalid_argument,
    not_found,
)
from melanoma_tf.serving.metrics import ServingMetrics
from melanoma_tf.serving.servable import Servable

log = logging.getLogger(__name__)

State = get_model_status_pb2.ModelVersionStatus.State
SIGNATURE_DEF_FIELD = "signature_def"


@dataclass
class _Version:
    version: int
    path: str
    state: int
    servable: Servable | None = None
    error: ServingError | None = None
    fingerprint: tuple | None = None
    warmup_requests: int = 0


class _Model:
    def __init__(self, config: model_server_config_pb2.ModelConfig, base_path: str) -> None:
        self.config = config
        self.base_path = base_path
        self.versions: dict[int, _Version] = {}
        self.labels: dict[str, int] = {}

    def available(self) -> list[int]:
        return sorted(v for v, entry in self.versions.items() if entry.state == State.AVAILABLE)


def _fingerprint(path: str) -> tuple:
    """Changes whenever a file of the version folder is added, grown or rewritten."""
    items = []
    for top, _, names in tf.io.gfile.walk(path):  # a folder or a bucket
        for name in names:
            try:
                stat = tf.io.gfile.stat(os.path.join(top, name))
            except tf.errors.OpError:
                continue
            items.append((os.path.join(top, name), stat.length, stat.mtime_nsec))
    return tuple(sorted(items))


def _aspired(config: model_server_config_pb2.ModelConfig, on_disk: set[int]) -> set[int]:
    policy = config.model_version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return set(on_disk)
    if choice == "specific":
        return on_disk & set(policy.specific.versions)
    count = policy.latest.num_versions if choice == "latest" else 1
    return set(sorted(on_disk, reverse=True)[:max(count, 1)])


def _validate(config: model_server_config_pb2.ModelServerConfig) -> None:
    if config.WhichOneof("config") not in (None, "model_config_list"):
        raise invalid_argument(
            "ServerModelConfig type not supported by HandleReloadConfigRequest. Only "
            "ModelConfigList is currently supported")
    names = set()
    for model in config.model_config_list.config:
        if not model.name:
            raise invalid_argument("Every model in the config needs a name")
        if model.name in names:
            raise invalid_argument(
                f"Illegal to list model {model.name} multiple times in config list")
        names.add(model.name)
        platform = model.model_platform or (
            "tensorflow" if model.model_type == model_server_config_pb2.TENSORFLOW else "")
        if platform != "tensorflow":
            raise invalid_argument(
                f"Model {model.name} requests unsupported platform {platform or '(none)'}; "
                "set model_platform: \"tensorflow\"")
        if not model.base_path:
            raise invalid_argument(f"Model {model.name} has no base_path")


class ModelRegistry:
    """The set of configured models and their loaded versions."""

    def __init__(self, scheduler: SharedBatchScheduler | None = None,
                 path_map: PathMap | None = None, enable_warmup: bool = True,
                 allow_version_labels_for_unavailable_models: bool = False,
                 metrics: ServingMetrics | None = None) -> None:
        self._scheduler = scheduler
        self._metrics = metrics
        self._path_map = dict(path_map or {})
        self._enable_warmup = enable_warmup
        self._allow_unavailable_labels = allow_version_labels_for_unavailable_models
        self._models: dict[str, _Model] = {}
        self._lock = threading.RLock()
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def reload_config(self, config: model_server_config_pb2.ModelServerConfig) -> None:
        """Apply a new ModelServerConfig: add/remove models, load versions, set labels."""
        _validate(config)
        with self._reload_lock:
            wanted = {m.name: m for m in config.model_config_list.config}
            for name in list(self._models):
                model = self._models[name]
                base_path = (map_base_path(wanted[name].base_path, self._path_map)
                             if name in wanted else None)
                if base_path != model.base_path:
                    self._unload_all(model)
                    with self._lock:
                        del self._models[name]
            for name, model_config in wanted.items():
                with self._lock:
                    if name in self._models:
                        self._models[name].config = model_config
                    else:
                        base_path = map_base_path(model_config.base_path, self._path_map)
                        if not tf.io.gfile.isdir(base_path):
                            log.warning("model %s: base path %s does not exist (yet)", name,
                                        base_path)
                        self._models[name] = _Model(model_config, base_path)
            self._sync_all()
            self._apply_labels()

    def poll(self) -> None:
        """Pick up new version folders and drop removed ones (the file-system poll)."""
        with self._reload_lock:
            self._sync_all()

    def start_polling(self, interval_seconds: float) -> None:
        """Poll the base paths every `interval_seconds` in a background thread."""
        if interval_seconds > 0:
            self._spawn(self.poll, interval_seconds, "version-poller")

    def watch_config_file(self, path: str, interval_seconds: float) -> None:
        """Re-read models.config when it changes (`--model_config_file_poll_wait_seconds`)."""
        if interval_seconds <= 0:
            return
        from melanoma_tf.serving.config import load_model_server_config

        last = [Path(path).read_text()]

        def check() -> None:
            text = Path(path).read_text()
            if text != last[0]:
                last[0] = text
                log.info("model config %s changed, reloading", path)
                self.reload_config(load_model_server_config(path))

        self._spawn(check, interval_seconds, "config-poller")

    def stop(self) -> None:
        """Stop the pollers and unload everything."""
        self._stop.set()
        for thread in self._threads:
            thread.join()
        with self._reload_lock:
            for model in list(self._models.values()):
                self._unload_all(model)

    def serves(self, name: str) -> bool:
        """Whether `name` is a configured model (loaded or not)."""
        with self._lock:
            return name in self._models

    def resolve(self, model_spec: model_pb2.ModelSpec) -> Servable:
        """The servable for a ModelSpec, with TF Serving's errors."""
        name = model_spec.name
        if not name:
            raise invalid_argument("ModelSpec has no name specified.")
        with self._lock:
            model = self._models.get(name)
            version = self._requested_version(model, model_spec)
            if version is None:
                available = model.available() if model else []
                if not available:
                    raise not_found(f"Servable not found for request: Latest({name})")
                version = available[-1]
            entry = model.versions.get(version) if model else None
            if entry is None or entry.state != State.AVAILABLE or entry.servable is None:
                raise not_found(f"Servable not found for request: Specific({name}, {version})")
            return entry.servable

    def model_status(self, request: get_model_status_pb2.GetModelStatusRequest
                     ) -> get_model_status_pb2.GetModelStatusResponse:
        """GetModelStatus as TF Serving answers it (all versions, newest first)."""
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        spec = request.model_spec
        response = get_model_status_pb2.GetModelStatusResponse()
        with self._lock:
            model = self._models.get(spec.name)
            version = self._requested_version(model, spec)
            entries = dict(model.versions) if model else {}
            if version is not None:
                if version not in entries:
                    raise not_found(f"Could not find version {version} of model {spec.name}")
                entries = {version: entries[version]}
            elif not entries:
                raise not_found(f"Could not find any versions of model {spec.name}")
            for number in sorted(entries, reverse=True):
                entry = entries[number]
                status = status_pb2.StatusProto()
                if entry.error is not None:
                    status.error_code = code_number(entry.error.code)
                    status.error_message = entry.error.message
                response.model_version_status.add(version=number, state=entry.state,
                                                  status=status)
        return response

    def model_metadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest
                       ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        """GetModelMetadata: the SignatureDefMap packed under "signature_def"."""
        if not request.HasField("model_spec"):
            raise invalid_argument("Missing ModelSpec")
        if not request.metadata_field:
            raise invalid_argument(
                "GetModelMetadataRequest must specify at least one metadata_field")
        for field_name in request.metadata_field:
            if field_name != SIGNATURE_DEF_FIELD:
                raise invalid_argument(f"Metadata field {field_name} is not supported")
        servable = self.resolve(request.model_spec)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature_def in servable.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(signature_def)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = servable.name
        response.model_spec.version.value = servable.version
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
        return response

    def describe(self) -> list[dict[str, Any]]:
        """Human-readable summary of models, versions, states and labels."""
        with self._lock:
            return [{
                "name": name,
                "base_path": model.base_path,
                "versions": {v: State.Name(e.state) for v, e in sorted(model.versions.items())},
                "errors": {v: e.error.message for v, e in model.versions.items() if e.error},
                "labels": dict(model.labels),
            } for name, model in sorted(self._models.items())]

    def stats(self) -> dict[str, Any]:
        """Batching and warm-up counters per loaded version."""
        with self._lock:
            loaded = [(name, entry) for name, model in self._models.items()
                      for entry in model.versions.values() if entry.servable is not None]
        return {f"{name}/{entry.version}": {
            "warmup_requests": entry.warmup_requests,
            "batching": entry.servable.batching_stats() if entry.servable else {},
        } for name, entry in loaded}

    def _requested_version(self, model: _Model | None, spec: model_pb2.ModelSpec) -> int | None:
        choice = spec.WhichOneof("version_choice")
        if choice == "version_label":
            if model is None or spec.version_label not in model.labels:
                raise invalid_argument(
                    f"Unrecognized servable version label: {spec.version_label}")
            return model.labels[spec.version_label]
        if choice == "version":
            return spec.version.value
        return None

    def _spawn(self, fn: Any, interval: float, name: str) -> None:
        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    fn()
                except Exception:
                    log.exception("%s failed; will retry", name)

        thread = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _sync_all(self) -> None:
        with self._lock:
            models = list(self._models.values())
        for model in models:
            self._sync(model)

    def _sync(self, model: _Model) -> None:
        on_disk = versions.versions_on_disk(model.base_path)
        aspired = _aspired(model.config, set(on_disk))
        for version in sorted(aspired, reverse=True):
            entry = model.versions.get(version)
            if entry is not None and entry.state == State.AVAILABLE:
                continue
            fingerprint = _fingerprint(on_disk[version])
            if entry is not None and entry.error is not None and entry.fingerprint == fingerprint:
                continue
            self._load(model, version, on_disk[version], fingerprint)
        for version, entry in list(model.versions.items()):
            if entry.state == State.AVAILABLE and version not in aspired:
                self._unload(model, entry)

    def _load(self, model: _Model, version: int, path: str, fingerprint: tuple) -> None:
        name = model.config.name
        entry = _Version(version=version, path=path, state=State.LOADING, fingerprint=fingerprint)
        with self._lock:
            model.versions[version] = entry
        log.info("loading %s version %d from %s", name, version, path)
        servable = None
        try:
            servable = Servable(name, version, path, self._scheduler)
            if self._enable_warmup:
                entry.warmup_requests = servable.warmup()
        except Exception as exc:
            error = from_exception(exc)
            entry.error = ServingError(error.code, f"Failed to load {name} version {version} "
                                                   f"from {path}: {error.message}")
            entry.state = State.END
            if servable is not None:
                servable.close()
            log.error("%s", entry.error.message)
            if self._metrics is not None:
                self._metrics.load(path, ok=False)
            return
        if self._metrics is not None:
            self._metrics.load(path, ok=True)
        with self._lock:
            entry.servable = servable
            entry.state = State.AVAILABLE
        log.info("%s version %d is AVAILABLE (%d warm-up requests replayed)", name, version,
                 entry.warmup_requests)

    def _unload(self, model: _Model, entry: _Version) -> None:
        with self._lock:
            entry.state = State.UNLOADING
            servable, entry.servable = entry.servable, None
        if servable is not None:
            servable.close()
        with self._lock:
            entry.state = State.END
        log.info("unloaded %s version %d", model.config.name, entry.version)

    def _unload_all(self, model: _Model) -> None:
        for entry in list(model.versions.values()):
            if entry.state == State.AVAILABLE:
                self._unload(model, entry)

    def _apply_labels(self) -> None:
        with self._lock:
            new_labels: dict[str, dict[str, int]] = {}
            for name, model in self._models.items():
                labels = {}
                for label, version in model.config.version_labels.items():
                    entry = model.versions.get(version)
                    available = entry is not None and entry.state == State.AVAILABLE
                    allowed = (self._allow_unavailable_labels
                               and model.labels.get(label, version) == version)
                    if not available and not allowed:
                        raise failed_precondition(
                            f"Request to assign label to version {version} of model {name}, "
                            "which is not currently available for inference")
                    labels[label] = version
                new_labels[name] = labels
            for name, labels in new_labels.items():
                self._models[name].labels = labels
