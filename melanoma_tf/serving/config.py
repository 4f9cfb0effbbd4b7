"""Reading the same config files TF Serving reads (text-format protos).

`serving/models.config`, `serving/batching_parameters.txt` and
`serving/monitoring.config` are parsed with TF Serving's own message types, so the
embedded server and the Docker deployment cannot drift apart.  Base paths in
models.config are container paths (`/models/...`); `map_base_path` rewrites them for a
local run (`/models=exports`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

from google.protobuf import text_format
from tensorflow_serving.config import model_server_config_pb2

from melanoma_tf import storage
from melanoma_tf.serving.config_protos import BatchingParameters, MonitoringConfig

ModelsSpec = Union[str, os.PathLike, model_server_config_pb2.ModelServerConfig, Mapping[str, Any]]
PathMap = Mapping[str, str]


def parse_model_server_config(text: str) -> model_server_config_pb2.ModelServerConfig:
    """Parse a text-format `ModelServerConfig` (the `--model_config_file` format)."""
    return text_format.Parse(text, model_server_config_pb2.ModelServerConfig())


def load_model_server_config(path: str | os.PathLike) -> model_server_config_pb2.ModelServerConfig:
    """Read a `--model_config_file` from disk."""
    return parse_model_server_config(Path(path).read_text())


def model_server_config_from(models: ModelsSpec) -> model_server_config_pb2.ModelServerConfig:
    """Accept a config path, a parsed config, or a dict `name -> base_path` for tests."""
    if isinstance(models, model_server_config_pb2.ModelServerConfig):
        config = model_server_config_pb2.ModelServerConfig()
        config.CopyFrom(models)
        return config
    if isinstance(models, (str, os.PathLike)):
        return load_model_server_config(models)
    config = model_server_config_pb2.ModelServerConfig()
    for name, base_path in models.items():
        entry = config.model_config_list.config.add(
            name=name, base_path=str(base_path), model_platform="tensorflow")
        entry.model_version_policy.latest.num_versions = 1
    return config


def parse_path_map(items: list[str] | None) -> dict[str, str]:
    """Turn CLI `SRC=DST` pairs into a prefix map (DST made absolute against the cwd)."""
    mapping: dict[str, str] = {}
    for item in items or []:
        src, sep, dst = item.partition("=")
        if not sep or not src or not dst:
            raise ValueError(f"expected SRC=DST for a base path mapping, got {item!r}")
        mapping[src.rstrip("/") or "/"] = storage.absolute(dst)
    return mapping


def map_base_path(base_path: str, path_map: PathMap | None) -> str:
    """Rewrite a container base path with the longest matching prefix of `path_map`."""
    normalized = {(src.rstrip("/") or "/"): dst for src, dst in (path_map or {}).items()}
    best = None
    for src in normalized:
        if base_path == src or base_path.startswith(src.rstrip("/") + "/"):
            if best is None or len(src) > len(best):
                best = src
    if best is None:
        return base_path
    rest = base_path[len(best):].lstrip("/")
    return os.path.join(normalized[best], rest) if rest else normalized[best]


def parse_batching_parameters(text: str) -> Any:
    """Parse a `--batching_parameters_file` into TF Serving's `BatchingParameters`."""
    return text_format.Parse(text, BatchingParameters())


def parse_monitoring_config(text: str) -> Any:
    """Parse a `--monitoring_config_file` into TF Serving's `MonitoringConfig`."""
    return text_format.Parse(text, MonitoringConfig())


def monitoring_config_from(spec: Any) -> Any:
    """A `MonitoringConfig` from None (nothing enabled), a file path or a parsed message."""
    if spec is None:
        return MonitoringConfig()
    if isinstance(spec, (str, os.PathLike)):
        try:
            return parse_monitoring_config(Path(spec).read_text())
        except text_format.ParseError as exc:
            raise ValueError(f"{spec}: not a MonitoringConfig text proto ({exc})") from None
    return spec


@dataclass(frozen=True)
class BatchingOptions:
    """Effective scheduler settings (TF Serving's defaults where a field is unset)."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = os.cpu_count() or 1


def batching_options_from(spec: Any) -> BatchingOptions | None:
    """Accept None (no batching), a path, a parsed `BatchingParameters` or a dict."""
    if spec is None:
        return None
    if isinstance(spec, BatchingOptions):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        spec = parse_batching_parameters(Path(spec).read_text())
    if isinstance(spec, Mapping):
        return BatchingOptions(**spec)
    defaults = BatchingOptions()
    values = {}
    for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches",
                 "num_batch_threads"):
        values[name] = getattr(spec, name).value if spec.HasField(name) else getattr(defaults, name)
    if spec.pad_variable_length_inputs or spec.allowed_batch_sizes:
        # Silently batching differently from TF Serving would make the embedded server lie.
        raise ValueError("pad_variable_length_inputs and allowed_batch_sizes are not supported "
                         "by the embedded server")
    options = BatchingOptions(**values)
    if options.max_batch_size < 1 or options.num_batch_threads < 1:
        raise ValueError("max_batch_size and num_batch_threads must be >= 1")
    return options
