"""Scoring across several servers: gRPC round_robin over embedded servers on loopback, a
replica dying mid-run, and servers that do not answer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from melanoma_tf import score
from melanoma_tf.client import MelanomaClient, channel_target, service_config
from melanoma_tf.serving.server import start_server

import serving_fakes as fakes

# Every request waits ~0.1 s for its batch, so both replicas have requests in flight
# when one of them stops.
SLOW_BATCHING = {"max_batch_size": 8, "batch_timeout_micros": 100_000, "num_batch_threads": 2}


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fakes.copy_exports(tmp_path_factory.mktemp("replicas") / "exports")


def _replica(exports: Path):
    return start_server({name: exports / name for name in (fakes.SEGMENTER, fakes.CLASSIFIER)},
                        poll_seconds=0, enable_warmup=False, batching_parameters=SLOW_BATCHING)


def _requests(handle) -> int:
    return sum(queue["tasks"] + queue["unbatched_tasks"]
               for version in handle.stats().values() for queue in version["batching"].values())


def test_targets() -> None:
    assert channel_target("serving:8500") == "serving:8500"  # a DNS name: gRPC resolves it
    assert channel_target("dns:///serving.default.svc:8500") == "dns:///serving.default.svc:8500"
    assert channel_target(["127.0.0.1:1", "localhost:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert channel_target("127.0.0.1:1, 127.0.0.2:1") == "ipv4:127.0.0.1:1,127.0.0.2:1"
    for bad in ([], "", " , "):
        with pytest.raises(ValueError, match="no server address"):
            channel_target(bad)
    with pytest.raises(ValueError, match="expected host:port"):
        channel_target(["127.0.0.1:1", "127.0.0.1"])
    config = service_config(retries=9, backoff=0.1, max_backoff=2)
    assert '"round_robin"' in config and '"maxAttempts": 5' in config
    assert '"retryableStatusCodes": ["UNAVAILABLE", "CANCELLED"]' in config


def test_requests_spread_over_replicas_and_survive_one_dying(exports: Path, tmp_path: Path) -> None:
    first, second = _replica(exports), _replica(exports)
    # Requests over gRPC's default per-call retry buffer (256 KiB), like full-size dermoscopy JPEGs:
    # gRPC retries such a call only if the client sized the buffer for it.
    images = fakes.write_images(tmp_path / "in", 40, size=360)
    assert min(p.stat().st_size for p in images) > 256 * 1024
    results, served_before = [], None
    try:
        with MelanomaClient([first.target, second.target], connect_timeout=10, timeout=30) as client:
            for result in client.predict_many(images, concurrency=6):
                results.append(result)
                if len(results) == 12:
                    served_before = _requests(first), _requests(second)
                    second.stop(grace=0)  # in-flight requests on it are cut off
        served_after = _requests(first)
    finally:
        first.stop()
        second.stop()
    assert min(served_before) > 0, f"round_robin must use both replicas: {served_before}"
    assert served_after > served_before[0]
    assert sorted(r.image_id for r in results) == sorted(p.stem for p in images), "every image exactly once"
    assert [r.error for r in results if not r.ok] == []


def test_a_server_that_does_not_answer_is_named_within_the_connect_timeout(exports: Path) -> None:
    dead = f"127.0.0.1:{fakes.free_port()}"
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=dead):
        MelanomaClient(dead, connect_timeout=1)
    assert time.monotonic() - started < 5
    with _replica(exports) as alive, MelanomaClient([alive.target, dead], connect_timeout=1) as client:
        assert client.predict(fakes.encode_png(fakes.lesion_image(24, 24))).ok  # the live one serves


def test_score_cli_server_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    fakes.write_images(tmp_path / "in", 2, size=16)
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "scores.csv"), "--no-progress"]
    assert score.main(["--server", " ", *args]) == score.EXIT_USAGE == 2
    assert "no server address" in capsys.readouterr().err
    dead = f"127.0.0.1:{fakes.free_port()}"
    # Told apart from a run that finished with failed images (1), with or without --allow-image-errors.
    assert score.main(["--server", dead, "--connect-timeout", "1", "--allow-image-errors", *args]) == 3
    assert dead in capsys.readouterr().err
    assert not (tmp_path / "scores.csv").exists()


def test_score_cli_spreads_over_listed_servers(exports: Path, tmp_path: Path) -> None:
    images = fakes.write_images(tmp_path / "in", 12, size=16)
    first, second = _replica(exports), _replica(exports)
    try:
        code = score.main(["--server", first.target, "--server", second.target, "--input", str(tmp_path / "in"),
                           "--output", str(tmp_path / "scores.csv"), "--no-progress", "--concurrency", "4"])
        served = _requests(first), _requests(second)
    finally:
        first.stop()
        second.stop()
    assert code == 0 and min(served) > 0, served
    rows = (tmp_path / "scores.csv").read_text().splitlines()[1:]
    assert sorted(row.split(",")[0] for row in rows) == sorted(p.stem for p in images)


class _Zone:
    """A DNS server on loopback (dnslib) whose one name's A records the test changes, as
    Kubernetes changes a headless Service's records when replicas come and go."""

    def __init__(self, *addresses: str) -> None:
        from dnslib import QTYPE, RR, A
        from dnslib.server import BaseResolver, DNSLogger, DNSServer

        zone = self
        self.addresses = list(addresses)

        class Resolver(BaseResolver):
            def resolve(self, request, handler):
                reply = request.reply()
                if QTYPE[request.q.qtype] == "A":
                    for address in zone.addresses:
                        reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(address), ttl=1))
                return reply

        self.server = DNSServer(Resolver(), port=0, address="127.0.0.1", logger=DNSLogger("-request,-reply"))
        self.server.start_thread()
        self.authority = f"127.0.0.1:{self.server.server.server_address[1]}"

    def stop(self) -> None:
        self.server.stop()


def test_a_replica_started_after_the_client_gets_requests_once_connections_age_out(exports: Path) -> None:
    """gRPC re-resolves a name only when a connection ends (grpc/grpc#12295); the servers' maximum
    connection age (proposal A9, TF Serving's --grpc_channel_arguments) makes it end."""
    port, zone = fakes.free_port(), _Zone("127.0.0.1")
    aging = "grpc.max_connection_age_ms=500,grpc.max_connection_age_grace_ms=5000"
    models = {name: exports / name for name in (fakes.SEGMENTER, fakes.CLASSIFIER)}
    counted = {"max_batch_size": 4, "batch_timeout_micros": 1000, "num_batch_threads": 1}  # _requests counts batches
    first = start_server(models, port=port, poll_seconds=0, enable_warmup=False, grpc_channel_arguments=aging,
                         batching_parameters=counted)
    late = None
    image = fakes.encode_png(fakes.lesion_image(24, 24))
    try:
        with MelanomaClient(f"dns://{zone.authority}/replicas.test:{port}", connect_timeout=10, timeout=30,
                            channel_options=[("grpc.dns_min_time_between_resolutions_ms", 200)]) as client:
            assert all(client.predict(image).ok for _ in range(3)) and _requests(first) > 0
            # A second replica on another address, same name and port: a scaled-up Deployment.
            late = start_server(models, port=port, host="127.0.0.2", poll_seconds=0, enable_warmup=False,
                                grpc_channel_arguments=aging, batching_parameters=counted)
            zone.addresses.append("127.0.0.2")
            deadline = time.monotonic() + 30
            while _requests(late) == 0 and time.monotonic() < deadline:
                assert client.predict(image).ok
                time.sleep(0.05)
        assert _requests(late) > 0, "the client never used the replica started after it"
    finally:
        zone.stop()
        first.stop()
        if late is not None:
            late.stop()
