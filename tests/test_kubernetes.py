"""The Kubernetes manifests parse and agree with each other and with the rest of serving/
(kubectl is not needed: a YAML load plus the fields the project relies on)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import tensorflow as tf
import yaml

from melanoma_tf import contract
from melanoma_tf.client import channel_target
from melanoma_tf.serving.server import channel_arguments

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "serving" / "kubernetes"


def _load(name: str) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    for doc in docs:
        assert {"apiVersion", "kind", "metadata", "spec"} <= set(doc), (name, doc.get("kind"))
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def _selects(service: dict, pod_labels: dict) -> bool:
    return all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items())


def test_serving_replicas_behind_a_headless_service() -> None:
    docs = _load("serving.yaml")
    deployment, service = docs["Deployment/melanoma-serving"], docs["Service/melanoma-serving"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["clusterIP"] == "None" and _selects(service, pod["metadata"]["labels"])
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": 8500, "http": 8501}

    container = pod["spec"]["containers"][0]
    major, minor = tf.__version__.split(".")[:2]
    assert re.fullmatch(rf"tensorflow/serving:{major}\.{minor}\.\d+", container["image"])
    compose = yaml.safe_load((ROOT / "serving" / "docker-compose.yml").read_text())["services"]["tf-serving"]
    assert container["image"] == compose["image"]
    assert container["command"] == compose["entrypoint"] and container["args"] == compose["command"]
    flags = dict(arg.lstrip("-").split("=", 1) for arg in container["args"] if "=" in arg)
    cpus = container["resources"]["limits"]["cpu"]  # thread pools sized to the pod, not the node
    assert flags["tensorflow_intra_op_parallelism"] == flags["tensorflow_inter_op_parallelism"] == cpus
    assert str(compose["cpus"]) == cpus
    channel = dict(channel_arguments(flags["grpc_channel_arguments"]))  # parsed as the embedded server does
    assert 0 < channel["grpc.max_connection_age_ms"] <= 300_000 and channel["grpc.max_connection_age_grace_ms"] > 0
    probed = {container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe")}
    assert probed == {f"/v1/models/{m}/metadata" for m in (contract.SEGMENTER, contract.CLASSIFIER)}

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts == {"models": "/models", "config": "/config"}
    base_paths = re.findall(r'base_path: "([^"]+)"', (ROOT / "serving" / "models.config").read_text())
    assert base_paths and all(path.startswith("/models/") for path in base_paths)
    for referenced in re.findall(r"/config/([\w.]+)", " ".join(container["args"])):
        assert (ROOT / "serving" / referenced).is_file(), referenced
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["readOnly"] is True


def test_scoring_job_targets_every_replica() -> None:
    service = _load("serving.yaml")["Service/melanoma-serving"]
    job = _load("score-job.yaml")["Job/melanoma-score"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "melanoma_tf.score"]
    args = dict(a.lstrip("-").split("=", 1) for a in container["args"] if "=" in a)
    assert args["server"] == f"dns:///{service['metadata']['name']}:8500"
    assert channel_target(args["server"]) == args["server"]  # handed to gRPC's DNS resolver as it is
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(args["input"].startswith(m) for m in mounts) and any(args["output"].startswith(m) for m in mounts)


def test_training_job_gives_each_worker_its_tf_config() -> None:
    docs = _load("train-job.yaml")
    job, service = docs["Job/melanoma-train"], docs["Service/melanoma-train"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"]
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert _selects(service, {"job-name": job["metadata"]["name"]})  # the label Kubernetes puts on Job pods
    script = pod["containers"][0]["args"][0]
    exported = re.search(r"export TF_CONFIG=(.+)", script).group(1)
    port = service["spec"]["ports"][0]["port"]
    for index in range(spec["completions"]):
        config = json.loads(shlex.split(exported.replace("$JOB_COMPLETION_INDEX", str(index)))[0])
        workers = config["cluster"]["worker"]
        assert len(workers) == spec["completions"]
        assert workers == [f"{job['metadata']['name']}-{i}.{pod['subdomain']}:{port}" for i in range(len(workers))]
        assert config["task"] == {"type": "worker", "index": index}
    assert "runtime.distribution_strategy=multi_worker_mirrored" in script
    assert "python -m melanoma_tf.train --stage seg" in script


def _commands(script: str, env: dict[str, str], tmp_path: Path) -> list[list[str]]:
    """The python command lines a container's shell script runs, by running it with `python`
    standing in as a stub that prints its arguments."""
    import os
    import subprocess

    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text('#!/bin/sh\nprintf "%s\\0" "$@"; printf "\\n"\n')
    stub.chmod(0o755)
    out = subprocess.run(["/bin/sh", "-c", script], env={**os.environ, **env, "PATH": f"{stub.parent}:/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return [line.rstrip("\0").split("\0") for line in out.splitlines() if line]


def test_classifier_fits_run_as_an_indexed_job_then_one_summary_exports(tmp_path) -> None:
    from melanoma_tf import export, train

    job = _load("classifier-job.yaml")["Job/melanoma-classifier"]
    summary = _load("classifier-summary-job.yaml")["Job/melanoma-classifier-summary"]
    spec, container = job["spec"], job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    folds = int(env["FOLDS"])
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == folds + 1
    fits = []
    for index in range(spec["completions"]):
        (command,) = _commands(container["args"][0], {**env, "JOB_COMPLETION_INDEX": str(index)}, tmp_path)
        assert command[:2] == ["-m", "melanoma_tf.train"]
        fits.append(train.build_parser().parse_args(command[2:]))
    assert [a.fold for a in fits] == [str(k) for k in range(folds)] + ["final"]
    assert all(a.stage == "cls" and a.folds == folds and not a.summarize for a in fits)
    assert len({(str(a.data_dir), str(a.model_dir), a.experiment) for a in fits}) == 1

    s_container = summary["spec"]["template"]["spec"]["containers"][0]
    s_env = {e["name"]: e["value"] for e in s_container["env"]}
    assert s_env == env
    summarize, exporting = _commands(s_container["args"][0], s_env, tmp_path)
    pooled = train.build_parser().parse_args(summarize[2:])
    assert pooled.summarize and pooled.fold is None
    assert (str(pooled.data_dir), str(pooled.model_dir), pooled.experiment, pooled.folds) == \
        (str(fits[0].data_dir), str(fits[0].model_dir), fits[0].experiment, folds)
    exported = export.build_parser().parse_args(exporting[2:])
    assert exported.stage == "cls" and exported.model_dir == pooled.model_dir and exported.next_version
    served = _load("serving.yaml")["Deployment/melanoma-serving"]["spec"]["template"]["spec"]
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in served["volumes"] if "persistentVolumeClaim" in v}
    mounts = {m["mountPath"]: m["name"] for m in s_container["volumeMounts"]}
    s_claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                for v in summary["spec"]["template"]["spec"]["volumes"]}
    assert s_claims[mounts["/models"]] == claims["models"]  # exported where the replicas read
    assert str(exported.export_dir).startswith("/models/") and exported.export_dir.name == contract.CLASSIFIER


def _manifests() -> dict[str, list[dict]]:
    return {path.name: [d for d in yaml.safe_load_all(path.read_text()) if d]
            for path in sorted(K8S.glob("*.yaml")) if path.name != "kustomization.yaml"}


def test_every_manifest_validates_against_the_kubernetes_api_schemas() -> None:
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    for name, docs in _manifests().items():
        for doc in docs:
            try:  # strict: a misspelt or misplaced field fails too
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{name} {doc['kind']}/{doc['metadata']['name']}: {exc.message}") from None


def _pods(doc: dict) -> dict | None:
    spec = doc["spec"]
    return spec if doc["kind"] == "Pod" else spec.get("template", {}).get("spec")


def test_one_versioned_project_image_named_in_the_kustomization_and_applied_step_by_step() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    manifests = _manifests()
    assert sorted(kustomization["resources"]) == sorted(manifests)
    (image,) = kustomization["images"]
    setup_version = re.search(r"^version = (\S+)", (ROOT / "setup.cfg").read_text(), re.M).group(1)
    assert image["newTag"] == setup_version
    components = set()
    for name, docs in manifests.items():
        for doc in docs:
            components.add(doc["metadata"]["labels"]["app.kubernetes.io/component"])
            pod = _pods(doc)
            for container in (pod or {}).get("containers", []):
                repository, tag = container["image"].rsplit(":", 1)
                assert tag != "latest", f"{name}: a :latest image is pulled on every start"
                if not repository.startswith("tensorflow/serving"):
                    assert repository == image["name"] and tag == setup_version, (name, container["image"])
                    assert container["imagePullPolicy"] == "IfNotPresent"  # an image loaded into a local cluster
    documented = set(re.findall(r"(?:component|\$K)=([\w-]+)", (ROOT / "docs" / "cluster.md").read_text()))
    assert components == documented, "docs/cluster.md applies every step, and only those"


def test_shared_claims_exist_with_the_access_mode_their_pods_need() -> None:
    claims = {d["metadata"]["name"]: d["spec"]["accessModes"] for d in _manifests()["storage.yaml"]
              if d["kind"] == "PersistentVolumeClaim"}
    writers, readers = {}, {}
    for name, docs in _manifests().items():
        for doc in docs:
            pod = _pods(doc)
            if not pod or doc["metadata"]["name"] == "melanoma-volumes":
                continue
            volumes = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                       for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
            pods = doc["spec"].get("parallelism", doc["spec"].get("replicas", 1))
            for container in pod["containers"]:
                for mount in container.get("volumeMounts", []):
                    if mount["name"] in volumes:
                        claim = volumes[mount["name"]]
                        assert claim in claims, f"{name}: claim {claim} is not in storage.yaml"
                        side = readers if mount.get("readOnly") else writers
                        side[claim] = side.get(claim, 0) + pods
    for claim, modes in claims.items():
        shared = writers.get(claim, 0) + readers.get(claim, 0) > 1
        if shared and writers.get(claim):
            assert "ReadWriteMany" in modes, (claim, modes)
        elif shared:
            assert {"ReadWriteMany", "ReadOnlyMany"} & set(modes), (claim, modes)


def test_scoring_waits_for_the_replicas_and_completes_with_per_image_errors() -> None:
    from melanoma_tf import score

    container = _load("serving.yaml")["Deployment/melanoma-serving"]["spec"]["template"]["spec"]["containers"][0]
    startup = container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"]
    job = _load("score-job.yaml")["Job/melanoma-score"]
    args = score.build_parser().parse_args(job["spec"]["template"]["spec"]["containers"][0]["args"])
    assert args.connect_timeout >= startup >= 600  # the Job outwaits the slowest replica start
    assert args.allow_image_errors and job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    training = _load("train-job.yaml")["Service/melanoma-train"]
    assert training["spec"]["publishNotReadyAddresses"] is True  # workers resolve each other while starting
