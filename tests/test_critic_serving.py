"""Serving the learned critic: bundle validation, real onnxruntime sessions, the score API, hot
swap through the admin API, and the `turngate critic score` command (micro-batching:
test_critic_batching.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from typer.testing import CliRunner

from service.app import create_app
from service.cli import app as cli_app
from service.critic import render
from service.critic.base import ConstantCritic
from service.critic.bundle import BundleError
from service.critic.onnx_critic import OnnxCritic
from service.critic.registry import load_critic, shipped_bundle
from service.demo.fake_actor import Reply, assistant, serve_in_thread
from service.settings import RouteSettings, Settings
from service.store.base import MemorySink
from tests.test_critic_serving_bundles import CANDIDATES, MESSAGES, TOOLS, build_bundle, direct_scores

pytest.importorskip("torch")  # the fixture bundles are exported from a tiny torch model

ADMIN = {"authorization": "Bearer admin-secret"}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bundles")
    return {"v1": build_bundle(root / "v1", version="1", seed=1),
            "v2": build_bundle(root / "v2", version="2", seed=2, logits_2d=True)}


@pytest.fixture(scope="module")
def critic(bundles):
    c = OnnxCritic.load(bundles["v1"], "CPUExecutionProvider", max_wait_s=0.02)
    yield c
    c.close()



# --- bundles and sessions ------------------------------------------------------------------------

def test_scores_are_the_models_probabilities(critic, bundles):
    scores = asyncio.run(critic.score(MESSAGES, CANDIDATES, TOOLS))
    assert len(scores) == 3 and all(0 < s < 1 for s in scores)
    assert len(set(scores)) == 3  # the candidates differ, so do their scores
    np.testing.assert_allclose(scores, direct_scores(bundles["v1"], MESSAGES, CANDIDATES, TOOLS), rtol=1e-5)
    assert critic.name == "tiny-critic" and critic.version == "1"
    assert critic.provider == "CPUExecutionProvider"


def test_a_logits_column_bundle_scores_the_same_way(bundles):
    c = OnnxCritic.load(bundles["v2"])
    try:
        scores = asyncio.run(c.score(MESSAGES, CANDIDATES))
    finally:
        c.close()
    np.testing.assert_allclose(scores, direct_scores(bundles["v2"], MESSAGES, CANDIDATES), rtol=1e-5)


def test_a_closed_critic_refuses_turns(bundles):
    c = OnnxCritic.load(bundles["v1"])
    c.close()
    with pytest.raises(RuntimeError, match="closed"):
        asyncio.run(c.score(MESSAGES, CANDIDATES))


def test_asking_for_cuda_without_a_gpu_warns_and_reports_cpu(bundles, caplog):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    with caplog.at_level(logging.WARNING):
        c = OnnxCritic.load(bundles["v1"], "CUDAExecutionProvider,CPUExecutionProvider")
    c.close()
    assert c.provider == "CPUExecutionProvider"
    assert any("CUDA was asked for" in r.getMessage() for r in caplog.records)


def _with_precision(src: Path, dst: Path, precision: str) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "critic.json").read_text())
    (dst / "critic.json").write_text(json.dumps({**manifest, "precision": precision}))
    return dst


def test_an_int8_bundle_is_served_on_the_cpu_unless_cuda_is_named(bundles, tmp_path, monkeypatch):
    """onnxruntime's int8 kernels are CPU kernels: under CUDA the shipped int8 critic ran no faster
    than on the CPU and 40x slower than an fp16 bundle (docs/critic-serving.md, "GPU"). By default it
    stays on the CPU; an fp16 or fp32 bundle takes CUDA, and so does an int8 one where the setting
    names CUDA."""
    asked: list[list[str]] = []
    real = ort.InferenceSession

    def session(path, options=None, providers=None, **kw):
        asked.append(list(providers))
        return real(path, options, providers=[p for p in providers if p == "CPUExecutionProvider"], **kw)

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", session)
    int8 = _with_precision(bundles["v1"], tmp_path / "int8", "int8")
    fp16 = _with_precision(bundles["v1"], tmp_path / "fp16", "fp16")
    for path, setting in ((int8, None), (fp16, None), (int8, "cuda")):
        OnnxCritic.load(path, setting).close()
    assert asked == [["CPUExecutionProvider"], ["CUDAExecutionProvider", "CPUExecutionProvider"],
                     ["CUDAExecutionProvider", "CPUExecutionProvider"]]


def _break(src: Path, dst: Path, fn) -> Path:
    shutil.copytree(src, dst)
    fn(dst)
    return dst


def _manifest(**changes):
    def edit(path: Path) -> None:
        m = json.loads((path / "critic.json").read_text())
        for k, v in changes.items():
            if v is None:
                m.pop(k, None)
            else:
                m[k] = v
        (path / "critic.json").write_text(json.dumps(m))
    return edit


@pytest.mark.parametrize("breakage, message", [
    (lambda p: (p / "tokenizer.json").unlink(), "missing tokenizer.json"),
    (lambda p: (p / "critic.json").write_text("{not json"), "critic.json is not valid JSON"),
    (_manifest(version=None), "lacks version"),
    (_manifest(format=render.FORMAT_VERSION + 1), f"renders format {render.FORMAT_VERSION}"),
    (_manifest(max_length=100000), "max_length must be"),
    (lambda p: (p / "model.onnx").write_bytes(b"garbage"), "model.onnx does not load"),
    (lambda p: (p / "tokenizer.json").write_text("{}"), "tokenizer.json does not load"),
])
def test_a_broken_bundle_is_refused_with_a_clear_message(bundles, tmp_path, breakage, message):
    broken = _break(bundles["v1"], tmp_path / "broken", breakage)
    with pytest.raises(BundleError, match=message) as err:
        OnnxCritic.load(broken)
    assert str(broken) in str(err.value)


def test_a_model_off_the_contract_is_refused(tmp_path):
    import torch

    class Wrong(torch.nn.Module):
        def forward(self, ids, mask):
            return (ids * mask).float().sum(1)

    build_bundle(tmp_path / "b")
    torch.onnx.export(Wrong(), (torch.ones(2, 4, dtype=torch.int64),) * 2, str(tmp_path / "b" / "model.onnx"),
                      input_names=["ids", "mask"], output_names=["logits"],
                      dynamic_axes={"ids": {0: "b", 1: "s"}, "mask": {0: "b", 1: "s"}}, opset_version=17,
                      dynamo=False)
    with pytest.raises(BundleError, match="takes inputs"):
        OnnxCritic.load(tmp_path / "b")


def test_load_critic_prefers_the_configured_bundle_then_the_shipped_one(bundles, caplog):
    configured = load_critic(Settings(critic=str(bundles["v2"])))
    configured.close()
    assert (configured.name, configured.version) == ("tiny-critic", "2")
    with caplog.at_level(logging.INFO):
        default = load_critic(Settings())
    shipped = shipped_bundle()
    if shipped is None:
        assert isinstance(default, ConstantCritic)
        assert any("constant critic" in r.getMessage() for r in caplog.records)
    else:
        default.close()
        assert default.version == json.loads((shipped / "critic.json").read_text())["version"]
        assert default.provider == "CPUExecutionProvider"


def test_a_configured_bundle_that_does_not_load_stops_start_up(tmp_path):
    with pytest.raises(BundleError, match="not a folder"):
        load_critic(Settings(critic=str(tmp_path / "nowhere")))


# --- the HTTP surface ----------------------------------------------------------------------------

def test_score_api_returns_the_scores_and_the_critic(gateway, critic, bundles):
    with gateway(critic=critic) as (url, _):
        r = httpx.post(url + "/critic/score", json={"messages": MESSAGES, "candidates": CANDIDATES,
                                                   "tools": TOOLS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["critic"] == {"name": "tiny-critic", "version": "1", "provider": "CPUExecutionProvider"}
    np.testing.assert_allclose(body["scores"], direct_scores(bundles["v1"], MESSAGES, CANDIDATES, TOOLS),
                               rtol=1e-5)


@pytest.mark.parametrize("payload, param", [
    ({"messages": MESSAGES}, "candidates"),
    ({"messages": [], "candidates": CANDIDATES}, "messages"),
    ({"messages": MESSAGES, "candidates": [{"role": "user", "content": "hi"}]}, "candidates"),
    ({"messages": MESSAGES, "candidates": [CANDIDATES[0]] * 65}, "candidates"),
    ({"messages": [{"content": "no role"}], "candidates": CANDIDATES}, "messages[0].role"),
])
def test_score_api_rejects_bad_requests_in_openai_shape(gateway, critic, payload, param):
    with gateway(critic=critic) as (url, _):
        r = httpx.post(url + "/critic/score", json=payload)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_score_api_needs_a_client_key_when_keys_are_configured(gateway, critic):
    body = {"messages": MESSAGES, "candidates": CANDIDATES}
    with gateway(critic=critic, settings={"api_keys": ["sk-good"]}) as (url, _):
        anonymous = httpx.post(url + "/critic/score", json=body)
        keyed = httpx.post(url + "/critic/score", json=body, headers={"authorization": "Bearer sk-good"})
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    assert keyed.status_code == 200


def test_the_gate_ranks_with_the_onnx_critic(gateway, scripted, critic, bundles):
    replies = [c["content"] for c in CANDIDATES]
    scripted.fn = lambda body, i: Reply([assistant(replies[i % 3])])
    expected = direct_scores(bundles["v1"], MESSAGES, [assistant(t) for t in replies])
    with gateway(critic=critic, candidates=3) as (url, sink):
        r = httpx.post(url + "/chat/completions", json={"model": "gpt-test", "messages": MESSAGES})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == replies[int(np.argmax(expected))]
    record = sink.records[0]
    assert record.critic_name == "tiny-critic"
    got = {c.message["content"]: c.score for c in record.candidates}
    for text, s in zip(replies, expected, strict=True):
        assert got[text] == pytest.approx(s, rel=1e-5)


@pytest.fixture
def served(actor, bundles):
    """turngate that loaded bundle v1 itself (so it owns it), with a short swap grace."""
    _, actor_url = actor
    settings = Settings(critic=str(bundles["v1"]), admin_key="admin-secret", critic_swap_grace_s=0.3,
                        critic_batch_wait_ms=1,
                        routes=[RouteSettings(alias="gpt-test", upstream_base_url=actor_url)])
    app = create_app(settings, sink=MemorySink())
    with serve_in_thread(app) as url:
        yield url, app


def test_admin_critic_api_needs_the_admin_key(served, gateway, critic):
    url, _ = served
    assert httpx.get(url + "/v1/admin/critic").status_code == 401
    assert httpx.get(url + "/v1/admin/critic", headers={"authorization": "Bearer nope"}).status_code == 401
    r = httpx.get(url + "/v1/admin/critic", headers=ADMIN)
    assert r.status_code == 200
    info = r.json()["critic"]
    assert (info["name"], info["version"], info["provider"]) == ("tiny-critic", "1", "CPUExecutionProvider")
    assert info["bundle"]["threshold_hints"] == {"accept_threshold": 0.5}
    with gateway(critic=critic) as (plain_url, _):  # no admin key configured: the admin API is off
        off = httpx.post(plain_url + "/admin/critic/activate", json={"path": "/x"}, headers=ADMIN)
    assert off.status_code == 403


def test_activating_a_broken_bundle_keeps_the_current_one(served, tmp_path, bundles):
    url, _ = served
    broken = _break(bundles["v2"], tmp_path / "old-format", _manifest(format=render.FORMAT_VERSION + 1))
    r = httpx.post(url + "/v1/admin/critic/activate", json={"path": str(broken)}, headers=ADMIN)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_bundle" and "format" in r.json()["error"]["message"]
    assert httpx.get(url + "/readyz").json()["critic"]["version"] == "1"


def test_hot_swap_under_load_drops_nothing(served, bundles):
    url, app = served
    old = app.state.services.critics.current
    body = {"messages": MESSAGES, "candidates": CANDIDATES}
    results: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=10) as c:
            while not stop.is_set():
                sent = time.perf_counter()  # a request sent after the swap must meet the new critic
                r = c.post("/v1/critic/score", json=body)
                version = r.json()["critic"]["version"] if r.status_code == 200 else None
                results.append((sent, r.status_code, version))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    r = httpx.post(url + "/v1/admin/critic/activate", json={"path": str(bundles["v2"])}, headers=ADMIN,
                   timeout=30)
    swapped_at = time.perf_counter()
    time.sleep(0.6)  # past the 0.3 s grace: the old session is closed meanwhile
    stop.set()
    for t in threads:
        t.join()
    assert r.status_code == 200, r.text
    assert r.json()["critic"]["version"] == "2" and r.json()["previous"]["version"] == "1"
    assert all(status == 200 for _, status, _ in results), [s for _, s, _ in results if s != 200]
    assert {v for _, _, v in results} == {"1", "2"}
    assert all(v == "2" for at, _, v in results if at > swapped_at + 0.05)
    assert old.session is None  # the old critic was closed after the grace period
    assert httpx.get(url + "/readyz").json()["critic"]["version"] == "2"
    assert httpx.get(url + "/v1/admin/critic", headers=ADMIN).json()["critic"]["version"] == "2"
    text = httpx.get(url + "/metrics").text
    assert 'turngate_critic_info{name="tiny-critic",provider="CPUExecutionProvider",version="2"} 1.0' in text
    assert 'turngate_critic_info{name="tiny-critic",provider="CPUExecutionProvider",version="1"} 0.0' in text


# --- the command line ----------------------------------------------------------------------------

def test_cli_scores_a_jsonl_file(bundles, tmp_path):
    requests = [{"messages": MESSAGES, "candidates": CANDIDATES, "tools": TOOLS},
                {"messages": MESSAGES[1:], "candidates": CANDIDATES[:1]}]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in requests) + "\n")
    result = CliRunner().invoke(cli_app, ["critic", "score", str(path), "--bundle", str(bundles["v1"])])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 2
    for req, line in zip(requests, lines, strict=True):
        np.testing.assert_allclose(line["scores"], direct_scores(bundles["v1"], req["messages"], req["candidates"],
                                                                 req.get("tools")), rtol=1e-4)


def test_cli_rejects_a_request_without_candidates(bundles, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"messages": MESSAGES}))
    result = CliRunner().invoke(cli_app, ["critic", "score", str(path), "--bundle", str(bundles["v1"])])
    assert result.exit_code != 0
    assert "candidates" in result.output
