"""sn-serve against the real tritonclient: protocol, batching, bad input, faults, bounded load."""
from __future__ import annotations

import http.client
import json
import resource
import socket
import threading
import time

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from sn_deploy.export import export_sn_onnx, save_model_atomic
from sn_deploy.models import build_model
from sn_deploy.passes.decompose import decompose_model
from sn_deploy.runtime.onnxruntime import create_session
from sn_deploy.serve.server import InferenceServer, ServeOptions
from tests.conftest import randomize_sn


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    model = randomize_sn(build_model("demo_sn_net", num_classes=10))
    sn = export_sn_onnx(model, (2, 1, 8, 8), dynamic_batch=True)
    (root / "digits" / "1").mkdir(parents=True)
    save_model_atomic(decompose_model(sn), root / "digits" / "1" / "model.onnx")
    spatial = export_sn_onnx(model, (2, 1, 8, 8), dynamic_batch=True, dynamic_spatial=True)
    (root / "digits_sn" / "3").mkdir(parents=True)
    save_model_atomic(spatial, root / "digits_sn" / "3" / "model.onnx")
    (root / "static" / "1").mkdir(parents=True)  # fixed batch of 2: served without batching
    save_model_atomic(decompose_model(export_sn_onnx(model, (2, 1, 8, 8))),
                      root / "static" / "1" / "model.onnx")
    return root


@pytest.fixture(scope="module")
def server(repo):
    srv = InferenceServer(repo, ServeOptions(port=0, max_batch_size=16, max_queue_delay_ms=20,
                                             max_body_bytes=1 << 20))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()


@pytest.fixture
def client(server):
    return httpclient.InferenceServerClient(f"127.0.0.1:{server.port}", concurrency=4)


def _direct(repo, name, x):
    version = "1" if name == "digits" else "3"
    sess = create_session(repo / name / version / "model.onnx")
    return sess.run(None, {"input": x})[0]


def _infer(client, x, model="digits", binary=True):
    inp = httpclient.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("output", binary_data=binary)
    return client.infer(model, [inp], outputs=[out], request_id="r1").as_numpy("output")


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits_sn")
    meta = client.get_model_metadata("digits")
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}
    assert meta["versions"] == ["1"] and meta["outputs"][0]["name"] == "output"
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]


@pytest.mark.parametrize("binary", [True, False])
def test_infer_matches_direct_session(client, repo, binary):
    x = np.random.default_rng(0).normal(size=(3, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_infer(client, x, binary=binary), _direct(repo, "digits", x), rtol=1e-6,
                               atol=1e-6)
    # the custom-op model, version addressed explicitly
    inp = httpclient.InferInput("input", [2, 1, 12, 10], "FP32")
    x2 = np.random.default_rng(1).normal(size=(2, 1, 12, 10)).astype(np.float32)
    inp.set_data_from_numpy(x2, binary_data=binary)
    y = client.infer("digits_sn", [inp], model_version="3").as_numpy("output")
    np.testing.assert_allclose(y, _direct(repo, "digits_sn", x2), rtol=1e-6, atol=1e-6)


def test_static_batch_model_is_served_unbatched(client, server):
    assert not server.models["static"].batching and server.models["digits"].batching
    assert client.get_model_config("static")["max_batch_size"] == 0
    x = np.random.default_rng(7).normal(size=(2, 1, 8, 8)).astype(np.float32)
    assert _infer(client, x, model="static").shape == (2, 10)
    inp = httpclient.InferInput("input", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(x[:1])
    with pytest.raises(InferenceServerException, match="model expects"):
        client.infer("static", [inp])


def test_concurrent_requests_are_batched_and_split_back(client, server, repo):
    xs = [np.random.default_rng(i).normal(size=(1, 1, 8, 8)).astype(np.float32) for i in range(24)]
    results = [None] * len(xs)

    def one(i):
        c = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
        results[i] = _infer(c, xs[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(xs))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for x, y in zip(xs, results):
        np.testing.assert_allclose(y, _direct(repo, "digits", x), rtol=1e-5, atol=1e-6)
    metrics = _get(server, "/metrics")[1].decode()
    count = _metric(metrics, 'sn_batch_size_count{model="digits"}')
    total = _metric(metrics, 'sn_batch_size_sum{model="digits"}')
    assert total / count > 1.0, "no request was ever merged into a batch"


def _metric(text, key):
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(key))


def _raw(server, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def _get(server, path):
    return _raw(server, "GET", path)


def _body(**inp):
    spec = {"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.5] * 64}
    spec.update(inp)
    return json.dumps({"inputs": [spec]}).encode()


BAD = [
    (_body(name="image"), 400, "unknown input 'image'"),
    (_body(shape=[1, 3, 8, 8], data=[0.0] * 192), 400, "model expects [-1, 1, 8, 8]"),
    (_body(datatype="FP64"), 400, "model expects FP32"),
    (_body(data=[0.0] * 63), 400, "63 values for shape"),
    (_body(data=[float("nan")] + [0.0] * 63).replace(b"NaN", b"NaN"), 400, "NaN or Inf"),
    (b"{not json", 400, "malformed JSON"),
    (json.dumps({"inputs": []}).encode(), 400, "non-empty list"),
    (_body(shape=[17, 1, 8, 8], data=[0.0] * 17 * 64), 400, "exceeds max batch size 16"),
]


@pytest.mark.parametrize("body,status,message", BAD)
def test_bad_requests_get_precise_4xx(server, body, status, message):
    code, data = _raw(server, "POST", "/v2/models/digits/infer", body,
                      {"Content-Type": "application/json"})
    assert code == status and message in json.loads(data)["error"], data
    assert _get(server, "/v2/health/live")[0] == 200


def test_unknown_model_version_and_size_limit(server):
    code, data = _raw(server, "POST", "/v2/models/nope/infer", _body())
    assert code == 404 and "unknown model 'nope'" in json.loads(data)["error"]
    code, data = _raw(server, "GET", "/v2/models/digits/versions/7")
    assert code == 404 and "no version '7'" in json.loads(data)["error"]
    # the answer comes from the headers alone: the server does not read a 2 MiB body first
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Length: 2097152\r\n\r\n")
    reply = b""
    while b"}" not in reply:
        chunk = sock.recv(4096)
        if not chunk:
            break
        reply += chunk
    sock.close()
    assert reply.startswith(b"HTTP/1.1 413") and b"exceeds the limit" in reply


def test_tritonclient_sees_errors(client):
    inp = httpclient.InferInput("input", [1, 1, 7, 8], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 1, 7, 8), np.float32))
    with pytest.raises(InferenceServerException, match="model expects"):
        client.infer("digits", [inp])
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("nope")


def test_inference_failure_and_disconnect_leave_server_healthy(server, client, repo):
    # a 1x1 plane: the SN custom op refuses it (unbiased variance undefined) -> 500, not a crash
    inp = httpclient.InferInput("input", [1, 1, 1, 1], "FP32")
    inp.set_data_from_numpy(np.ones((1, 1, 1, 1), np.float32))
    with pytest.raises(InferenceServerException, match="inference failed"):
        client.infer("digits_sn", [inp])
    # a client that announces a body and disconnects half way
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{\"in")
    sock.close()
    time.sleep(0.2)
    x = np.random.default_rng(3).normal(size=(2, 1, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_infer(client, x), _direct(repo, "digits", x), rtol=1e-5, atol=1e-6)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_bounded_load_no_failures_no_growth(server, repo):
    """8 clients for 2 s per round, 3 rounds: zero failures, flat resident memory."""
    x = np.random.default_rng(4).normal(size=(2, 1, 8, 8)).astype(np.float32)
    expected = _direct(repo, "digits", x)
    rss = []
    for _ in range(3):
        failures, done = [], [0]
        stop = time.monotonic() + 2.0

        def loop():
            c = httpclient.InferenceServerClient(f"127.0.0.1:{server.port}")
            while time.monotonic() < stop:
                try:
                    y = _infer(c, x)
                    if not np.allclose(y, expected, rtol=1e-5, atol=1e-6):
                        failures.append("wrong result")
                    done[0] += 1
                except Exception as exc:  # any failure counts
                    failures.append(repr(exc))

        threads = [threading.Thread(target=loop) for _ in range(8)]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert not failures, failures[:3]
        assert done[0] > 20
        rss.append(_rss_mb())
    assert rss[2] - rss[1] < 30, rss  # first round warms allocators; later rounds stay flat


def test_graceful_shutdown_finishes_in_flight(repo):
    srv = InferenceServer(repo, ServeOptions(port=0, max_queue_delay_ms=200))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    c = httpclient.InferenceServerClient(f"127.0.0.1:{srv.port}")
    x = np.zeros((1, 1, 8, 8), np.float32)
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("y", _infer(c, x)))
    t.start()
    time.sleep(0.05)  # the request now waits in the 200 ms batching window
    srv.shutdown()
    t.join()
    assert result["y"].shape == (1, 10)


def test_export_triton_repo_is_served_unchanged(tmp_path, capsys, monkeypatch):
    from sn_deploy.cli import export as cli_export
    from tests.test_cli import run_cli

    model = randomize_sn(build_model("demo_sn_net", num_classes=10))
    torch.save(model.state_dict(), tmp_path / "m.pth")
    code, out, err = run_cli(cli_export.main, [tmp_path / "m.pth", "--arch", "demo_sn_net",
                                               "--input-shape", "1x1x8x8", "--dynamic-batch",
                                               "--output-dir", tmp_path / "out", "--triton-repo",
                                               tmp_path / "repo", "--model-name", "digits",
                                               "--target", "tensorrt"], capsys, monkeypatch)
    assert code == 0, err
    config = (tmp_path / "repo" / "digits" / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config and "max_batch_size: 32" in config
    assert "dims: [1, 8, 8]" in config and "dynamic_batching" in config
    assert 'platform: "tensorrt_plan"' in (tmp_path / "repo" / "digits_trt" / "config.pbtxt").read_text()
    srv = InferenceServer(tmp_path / "repo", ServeOptions(port=0))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        c = httpclient.InferenceServerClient(f"127.0.0.1:{srv.port}")
        x = np.random.default_rng(5).normal(size=(2, 1, 8, 8)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(_infer(c, x), ref, rtol=1e-4, atol=1e-5)
    finally:
        srv.shutdown()
