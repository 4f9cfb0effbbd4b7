"""The deployment files in serving/ parse with TF Serving's protos and make sense.

These files are only read by tensorflow_model_server in production, so without this
test a typo would surface at deploy time.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import tensorflow as tf
from tensorflow_serving.apis import model_pb2

from melanoma_tf.serving.config import (
    batching_options_from,
    load_model_server_config,
    map_base_path,
    parse_batching_parameters,
    parse_monitoring_config,
    parse_path_map,
)

import serving_fakes

SERVING = Path(__file__).resolve().parents[1] / "serving"
MODELS = {"lesion_segmenter", "melanoma_classifier"}


def _versions_loaded_by(policy) -> set[int] | None:
    """Versions a policy is guaranteed to load; None when it depends on the disk."""
    if policy.WhichOneof("policy_choice") == "specific":
        return set(policy.specific.versions)
    return None


@pytest.mark.parametrize("name", ["models.config", "models.canary.config"])
def test_model_configs(name: str) -> None:
    config = load_model_server_config(SERVING / name)
    entries = {m.name: m for m in config.model_config_list.config}
    assert set(entries) == MODELS
    for model_name, model in entries.items():
        assert model.base_path == f"/models/{model_name}"
        assert model.model_platform == "tensorflow"
        assert model.model_version_policy.WhichOneof("policy_choice") is not None
        if model.version_labels:
            loaded = _versions_loaded_by(model.model_version_policy)
            assert loaded is not None, "labels need versions the policy always loads"
            assert set(model.version_labels.values()) <= loaded, model_name
            assert "stable" in model.version_labels
    if name == "models.canary.config":
        labels = entries["melanoma_classifier"].version_labels
        assert labels["canary"] != labels["stable"]


def test_batching_parameters() -> None:
    params = parse_batching_parameters((SERVING / "batching_parameters.txt").read_text())
    for field in ("max_batch_size", "batch_timeout_micros", "num_batch_threads",
                  "max_enqueued_batches"):
        assert params.HasField(field), field
    assert params.max_batch_size.value >= 8
    assert 0 <= params.batch_timeout_micros.value <= 10_000  # the guide's CPU range
    assert 1 <= params.num_batch_threads.value <= 64
    assert params.max_enqueued_batches.value >= params.num_batch_threads.value
    assert params.pad_variable_length_inputs is False
    assert not params.allowed_batch_sizes
    options = batching_options_from(SERVING / "batching_parameters.txt")
    assert options.max_batch_size == params.max_batch_size.value


@pytest.mark.parametrize("text", ["pad_variable_length_inputs: true", "allowed_batch_sizes: [8, 16]"])
def test_batching_the_embedded_server_cannot_do_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not supported by the embedded server"):
        batching_options_from(parse_batching_parameters(text))


def test_monitoring_config() -> None:
    config = parse_monitoring_config((SERVING / "monitoring.config").read_text())
    assert config.prometheus_config.enable
    assert config.prometheus_config.path == "/monitoring/prometheus/metrics"


def test_docker_compose_flags_and_image() -> None:
    text = (SERVING / "docker-compose.yml").read_text()
    major, minor = tf.__version__.split(".")[:2]
    assert re.search(rf"image: tensorflow/serving:{major}\.{minor}\.\d+\s", text)
    for flag in ("--port=8500", "--rest_api_port=8501", "--model_config_file=/config/models.config",
                 "--enable_batching", "--batching_parameters_file=/config/batching_parameters.txt",
                 "--enable_model_warmup", "--monitoring_config_file=/config/monitoring.config",
                 "--file_system_poll_wait_seconds=", "--model_config_file_poll_wait_seconds=",
                 "--allow_version_labels_for_unavailable_models=true"):
        assert flag in text, flag
    assert "../exports:/models" in text
    for referenced in re.findall(r"/config/([\w.]+)", text):
        assert (SERVING / referenced).is_file(), referenced


def test_readme_documents_local_and_docker_runs() -> None:
    readme = (SERVING / "README.md").read_text()
    for needle in ("docker run", "--model-base-path-map /models=", "canary", "stable",
                   "python -m melanoma_tf.score", "HandleReloadConfigRequest"):
        assert needle in readme, needle


def test_base_path_mapping() -> None:
    mapping = parse_path_map(["/models=exports"])
    assert map_base_path("/models/lesion_segmenter", mapping).endswith("/exports/lesion_segmenter")
    assert map_base_path("/modelsX/a", mapping) == "/modelsX/a"
    assert map_base_path("/models", mapping).endswith("/exports")
    with pytest.raises(ValueError):
        parse_path_map(["no-equals-sign"])


def test_embedded_server_runs_the_shipped_configs(tmp_path: Path) -> None:
    """models.config + batching_parameters.txt work locally through the path map."""
    from melanoma_tf.serving.server import start_server

    exports = serving_fakes.copy_exports(tmp_path / "exports")
    with start_server(SERVING / "models.config", path_map={"/models": str(exports)},
                      batching_parameters=SERVING / "batching_parameters.txt",
                      poll_seconds=0) as handle:
        described = {m["name"]: m for m in handle.registry.describe()}
        assert set(described) == MODELS
        for model in described.values():
            assert model["versions"] == {1: "AVAILABLE"}
            assert model["labels"] == {"stable": 1}
        servable = handle.registry.resolve(
            model_pb2.ModelSpec(name="melanoma_classifier", version_label="stable"))
        assert servable.version == 1
