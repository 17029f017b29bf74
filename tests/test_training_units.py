"""Training: the spec parser, compressors, wire format, data split, privacy accountant
and the aggregator's round state (no processes)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeai_worker.training import compressors
from edgeai_worker.training.compressors import CompressionError, Compressor, decode, encode
from edgeai_worker.training.data import shard_indices
from edgeai_worker.training.privacy import epsilon
from edgeai_worker.training.rounds import RoundState, Update, UpdateRejected
from edgeai_worker.training.spec import (
    CompressionSpec,
    DataSpec,
    PrivacySpec,
    TrainingSpecError,
    parse_spec,
)
from edgeai_worker.training.wire import WireError, pack, unpack

REPO = Path(__file__).resolve().parents[1]


def _spec(**sections: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {"algorithm": {"mode": "syncSGD"}}
    raw.update(sections)
    return raw


# --- spec -----------------------------------------------------------------------------


def test_design_example_parses_and_round_trips() -> None:
    raw = {
        "model": {"zoo": "digits_cnn"},
        "data": {"builtin": "digits", "split": {"kind": "dirichlet", "alpha": 0.5}},
        "workers": {"nodeSelector": {"edgeai.dev/tier": "device"}, "count": 8},
        "aggregator": {"tier": "edge"},
        "algorithm": {"mode": "fedavg", "localSteps": 10, "learningRate": 0.05, "batchSize": 32},
        "compression": {"kind": "topk", "ratio": 0.01, "errorFeedback": True},
        "privacy": {"clipNorm": 1.0, "noiseMultiplier": 0.5},
        "stop": {"targetAccuracy": 0.95, "maxRounds": 200},
    }
    spec = parse_spec(raw)
    assert spec.workers == 8
    assert spec.data == DataSpec(split="dirichlet", alpha=0.5)
    assert spec.algorithm.local_steps == 10
    assert spec.compression == CompressionSpec(kind="topk", ratio=0.01, error_feedback=True)
    assert spec.privacy == PrivacySpec(clip_norm=1.0, noise_multiplier=0.5)
    assert parse_spec(spec.to_dict()) == spec


@pytest.mark.parametrize(
    ("raw", "field", "accepted"),
    [
        ({}, "algorithm", "mode"),
        (_spec(algorithm={"mode": "sgd"}), "algorithm.mode", "fedavg"),
        (_spec(algorithm={"mode": "fedavg", "localSteps": 0}), "algorithm.localSteps", "1.."),
        (_spec(algorithm={"mode": "syncSGD", "learningRate": -1}), "algorithm.learningRate", "> 0"),
        (_spec(algorithm={"mode": "syncSGD", "batchSize": "32"}), "algorithm.batchSize", "integer"),
        (_spec(compression={"kind": "zip"}), "compression.kind", "topk"),
        (_spec(compression={"kind": "topk", "ratio": 2}), "compression.ratio", "<= 1"),
        (_spec(compression={"errorFeedback": "yes"}), "compression.errorFeedback", "true"),
        (_spec(privacy={"noiseMultiplier": 1.0}), "privacy.clipNorm", "> 0"),
        (_spec(privacy={"clipNorm": 1, "noiseMultiplier": -1}), "privacy.noiseMultiplier", ">= 0"),
        (_spec(data={"split": {"kind": "dirichlet", "alpha": 0}}), "data.split.alpha", "> 0"),
        (_spec(data={"split": {"kind": "shards"}}), "data.split.kind", "dirichlet"),
        (_spec(data={"split": {"kind": "dirichlet"}}), "data.split.alpha", "> 0"),
        (_spec(data={"split": {"kind": "iid", "alpha": 1}}), "data.split.alpha", "dirichlet"),
        (_spec(aggregator={"tier": "device"}), "aggregator.tier", "edge, cloud"),
        ({"algorithm": {"mode": "gossip"}, "aggregator": {"tier": "edge"}}, "aggregator", "gossip"),
        (_spec(workers={"count": 0}), "workers.count", "1..1000"),
        (_spec(stop={"targetAccuracy": 1.5}), "stop.targetAccuracy", "<= 1"),
        (_spec(stop={"maxRound": 5}), "stop.maxRound", "maxRounds"),
        (_spec(model={"zoo": "resnet18"}), "model.zoo", "digits_cnn"),
        (_spec(colour="blue"), "colour", "algorithm"),
        (
            {"algorithm": {"mode": "gossip"}, "compression": {"kind": "sign"}},
            "compression.kind",
            "none",
        ),
    ],
)
def test_bad_spec_names_the_field(raw: dict[str, Any], field: str, accepted: str) -> None:
    with pytest.raises(TrainingSpecError) as caught:
        parse_spec(raw)
    assert caught.value.field == field
    assert str(caught.value).startswith(f"spec.{field}:")
    assert accepted in caught.value.accepted


def test_parser_knows_every_crd_field() -> None:
    """Every field the CRD's spec schema declares is one the parser takes."""
    import yaml

    crd = yaml.safe_load((REPO / "crds" / "edgeai.dev_dnntrainingjobs.yaml").read_text())
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]
    sample: dict[str, Any] = {
        "model": {"zoo": "digits_cnn"},
        "data": {"builtin": "digits", "split": {"kind": "dirichlet", "alpha": 1.0}},
        "workers": {"nodeSelector": {}, "count": 2},
        "aggregator": {"tier": "edge"},
        "algorithm": {
            "mode": "easgd",
            "localSteps": 2,
            "learningRate": 0.1,
            "batchSize": 8,
            "movingRate": 0.3,
            "participation": 0.5,
            "gossipPeers": "random",
        },
        "compression": {"kind": "int8", "ratio": 0.5, "errorFeedback": False},
        "privacy": {"clipNorm": 1.0, "noiseMultiplier": 1.0, "delta": 1e-6},
        "stop": {"targetAccuracy": 0.9, "maxRounds": 3},
        "faults": {"roundTimeoutSeconds": 2.5},
        "checkpoint": {"everyRounds": 4},
        "seed": 7,
    }
    assert set(sample) == set(props)
    for name, section in sample.items():
        if "properties" in props[name]:
            assert set(section) == set(props[name]["properties"]), name
    assert set(sample["data"]["split"]) == set(props["data"]["properties"]["split"]["properties"])
    parsed = parse_spec(sample)
    assert (parsed.algorithm.moving_rate, parsed.round_timeout_s, parsed.seed) == (0.3, 2.5, 7)


# --- compression ----------------------------------------------------------------------


N = 38_000


def _vector(seed: int = 0, n: int = N) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=n).astype(np.float32)


@pytest.mark.parametrize(
    ("kind", "ratio", "most_bytes"),
    [
        ("none", 0.01, 4 * N),
        ("topk", 0.01, 4 + 380 * 6),  # uint16 indices under 65536 values
        ("int8", 0.01, N + 4 * 38),
        ("qsgd", 0.01, N // 2 + 4 * 75),
        ("sign", 0.01, N // 8 + 4 * 38),
    ],
)
def test_payload_sizes(kind: str, ratio: float, most_bytes: int) -> None:
    payload = encode(kind, _vector(), ratio, np.random.default_rng(0))
    assert len(payload) <= most_bytes
    assert decode(kind, payload, N).shape == (N,)


def test_topk_keeps_the_largest_exactly() -> None:
    v = _vector()
    out = decode("topk", encode("topk", v, 0.01, np.random.default_rng(0)), N)
    kept = np.flatnonzero(out)
    assert len(kept) == 380
    assert np.array_equal(out[kept], v[kept])
    assert np.abs(v[kept]).min() >= np.sort(np.abs(v))[-380]


def test_threshold_keeps_what_is_over_the_fraction_of_the_max() -> None:
    v = _vector()
    out = decode("threshold", encode("threshold", v, 0.5, np.random.default_rng(0)), N)
    expected = np.abs(v) >= 0.5 * np.abs(v).max()
    assert np.array_equal(out != 0, expected)


def test_large_vectors_use_wide_indices() -> None:
    v = _vector(n=70_000)
    payload = encode("topk", v, 0.001, np.random.default_rng(0))
    assert len(payload) == 4 + 70 * (4 + 4)
    assert np.count_nonzero(decode("topk", payload, 70_000)) == 70


@pytest.mark.parametrize(("kind", "tolerance"), [("int8", 0.01), ("qsgd", 0.3), ("sign", 1.0)])
def test_quantizers_are_close(kind: str, tolerance: float) -> None:
    v = _vector()
    out = decode(kind, encode(kind, v, 0.01, np.random.default_rng(1)), N)
    relative = np.linalg.norm(out - v) / np.linalg.norm(v)
    assert relative < tolerance
    if kind == "sign":
        assert np.array_equal(out >= 0, v >= 0)


def test_qsgd_is_unbiased() -> None:
    v = _vector(n=4096)
    rng = np.random.default_rng(3)
    mean = np.mean([decode("qsgd", encode("qsgd", v, 0, rng), 4096) for _ in range(300)], axis=0)
    assert np.abs(mean - v).max() < 0.15 * np.abs(v).max()


@pytest.mark.parametrize("kind", ["topk", "sign", "int8", "qsgd", "threshold"])
def test_error_feedback_loses_nothing(kind: str) -> None:
    """With error feedback, what was sent plus the residual is everything fed in."""
    c = Compressor(CompressionSpec(kind=kind, ratio=0.01, error_feedback=True), 5000, 0)
    total_in = np.zeros(5000, dtype=np.float32)
    total_sent = np.zeros(5000, dtype=np.float32)
    for seed in range(20):
        update = _vector(seed, 5000)
        _, sent = c.compress(update)
        total_in += update
        total_sent += sent
    np.testing.assert_allclose(total_sent + c.residual, total_in, atol=1e-3)
    without = Compressor(CompressionSpec(kind=kind, ratio=0.01, error_feedback=False), 5000, 0)
    without.compress(_vector(0, 5000))
    assert not without.residual.any()


@pytest.mark.parametrize("kind", ["none", "topk", "int8", "qsgd", "sign"])
def test_truncated_payload_is_refused(kind: str) -> None:
    payload = encode(kind, _vector(n=3000), 0.01, np.random.default_rng(0))
    with pytest.raises(CompressionError, match=kind):
        decode(kind, payload[:-3], 3000)


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(CompressionError, match="unknown"):
        decode("zip", b"", 10)
    assert compressors.BLOCK == 1024


# --- wire -----------------------------------------------------------------------------


def test_wire_round_trip_and_errors() -> None:
    body = pack({"round": 3, "kind": "sign"}, b"\x00\x01\x02")
    assert unpack(body) == ({"round": 3, "kind": "sign"}, b"\x00\x01\x02")
    with pytest.raises(WireError, match="shorter"):
        unpack(b"EA")
    with pytest.raises(WireError, match="starts with"):
        unpack(b"JSON" + body[4:])
    with pytest.raises(WireError, match="runs past"):
        unpack(body[:12])
    with pytest.raises(WireError, match="not a JSON object"):
        unpack(pack([1, 2]))  # type: ignore[arg-type]


# --- data -----------------------------------------------------------------------------


def _labels() -> np.ndarray:
    return np.repeat(np.arange(10), 130).astype(np.int64)


@pytest.mark.parametrize("split", [DataSpec("iid"), DataSpec("dirichlet", 0.1)])
def test_shards_partition_the_training_set(split: DataSpec) -> None:
    labels = _labels()
    shards = shard_indices(labels, 8, split, seed=0)
    joined = np.sort(np.concatenate(shards))
    assert np.array_equal(joined, np.arange(len(labels)))
    assert min(len(s) for s in shards) >= 8


def test_dirichlet_split_is_skewed_and_iid_is_not() -> None:
    labels = _labels()

    def skew(split: DataSpec) -> float:
        """Mean over workers of the share of their commonest class."""
        shards = shard_indices(labels, 8, split, seed=0)
        return float(np.mean([np.bincount(labels[s], minlength=10).max() / len(s) for s in shards]))

    assert skew(DataSpec("iid")) < 0.2
    assert skew(DataSpec("dirichlet", 0.1)) > 0.4  # IID: about 0.13


# --- privacy --------------------------------------------------------------------------


def test_epsilon_grows_with_steps_and_shrinks_with_noise() -> None:
    low = PrivacySpec(clip_norm=1.0, noise_multiplier=1.0)
    high = PrivacySpec(clip_norm=1.0, noise_multiplier=0.5)
    assert epsilon(low, 0.1, 0) == 0.0
    assert 0 < epsilon(low, 0.1, 10) < epsilon(low, 0.1, 100)
    assert epsilon(low, 0.1, 100) < epsilon(high, 0.1, 100)
    assert epsilon(PrivacySpec(1.0, 0.0), 0.1, 1) == float("inf")


def test_private_gradient_clips_each_example() -> None:
    import torch

    from edgeai_worker.training.learner import build_model
    from edgeai_worker.training.privacy import private_gradients

    spec = parse_spec(_spec())
    model = build_model(spec)
    x = torch.rand(16, 1, 8, 8) * 5
    y = torch.randint(0, 10, (16,))
    quiet = PrivacySpec(clip_norm=0.01, noise_multiplier=0.0)
    grads = private_gradients(model, x, y, quiet, torch.Generator().manual_seed(0))
    norm = float(torch.sqrt(sum(g.pow(2).sum() for g in grads)))
    assert norm <= 0.01 + 1e-6  # the mean of 16 vectors of norm <= 0.01
    noisy = PrivacySpec(clip_norm=0.01, noise_multiplier=1.0)
    grads = private_gradients(model, x, y, noisy, torch.Generator().manual_seed(0))
    assert float(torch.sqrt(sum(g.pow(2).sum() for g in grads))) > 0.05


# --- the aggregator's rounds ----------------------------------------------------------


def _update(state: RoundState, worker: int, seed: int, **fields: Any) -> Update:
    delta = (_vector(seed, len(state.params)) * 1e-3).astype(np.float32)
    values = {
        "worker": worker,
        "round": state.round,
        "kind": "none",
        "payload": delta.tobytes(),
        "loss": 1.0,
        "samples": 32,
        "wire_bytes": 4 * len(delta) + 50,
        "seq": state.round,
        "incarnation": "a",
    }
    values.update(fields)
    return Update(**values)


def test_round_closes_with_the_mean_and_drops_stragglers() -> None:
    spec = parse_spec(_spec(workers={"count": 3}))
    state = RoundState.initial(spec)
    state.alive = {0, 1, 2}
    before = state.params.copy()
    a, b = _update(state, 0, 1), _update(state, 1, 2)
    state.accept(a)
    state.accept(b)
    assert not state.round_complete()
    record = state.close((2,))
    mean = (np.frombuffer(a.payload, "<f4") + np.frombuffer(b.payload, "<f4")) / 2
    np.testing.assert_allclose(state.params, before + mean, atol=1e-6)
    assert record["participants"] == [0, 1]
    assert record["stragglers"] == [2]
    assert state.alive == {0, 1}
    assert state.round == 1


def test_stale_duplicate_and_unselected_updates_are_rejected() -> None:
    spec = parse_spec(
        _spec(algorithm={"mode": "fedavg", "participation": 0.5}, workers={"count": 4})
    )
    state = RoundState.initial(spec)
    chosen = sorted(state.selected(0))
    assert len(chosen) == 2
    state.accept(_update(state, chosen[0], 1))
    with pytest.raises(UpdateRejected, match="already sent"):
        state.accept(_update(state, chosen[0], 1))
    other = next(w for w in range(4) if w not in chosen)
    with pytest.raises(UpdateRejected, match="not selected"):
        state.accept(_update(state, other, 1))
    with pytest.raises(UpdateRejected, match="open round is 0"):
        state.accept(_update(state, chosen[1], 1, round=5))
    with pytest.raises(UpdateRejected, match=r"not in 0\.\.3") as caught:
        state.accept(_update(state, 9, 1))
    assert caught.value.status == 400
    # a restarted worker counts its updates anew
    state.close(())
    again = min(state.selected(1))
    state.accept(_update(state, again, 2, seq=0, incarnation="b"))
    assert again in state.pending


def test_async_updates_are_weighted_by_staleness() -> None:
    spec = parse_spec(_spec(algorithm={"mode": "asyncSGD"}, workers={"count": 4}))
    state = RoundState.initial(spec)
    fresh = _update(state, 0, 1, round=0)
    state.accept(fresh)
    before = state.params.copy()
    stale = _update(state, 1, 2, round=0, seq=0)  # computed on version 0, now version 1
    state.accept(stale)
    np.testing.assert_allclose(
        state.params, before + np.frombuffer(stale.payload, "<f4") / 2, atol=1e-6
    )
    assert state.version == 2


def test_checkpoint_round_trips() -> None:
    spec = parse_spec(_spec(workers={"count": 2}))
    state = RoundState.initial(spec)
    state.alive = {0, 1}
    state.accept(_update(state, 0, 1))
    state.accept(_update(state, 1, 2))
    state.close(())
    header, payload = state.to_checkpoint()
    back = RoundState.from_checkpoint(spec, json.loads(json.dumps(header)), payload)
    assert np.array_equal(back.params, state.params)
    assert (back.round, back.history, back.bytes_up) == (state.round, state.history, state.bytes_up)
    assert back.last_seq == state.last_seq


# --- the aggregator's HTTP errors -----------------------------------------------------


async def test_aggregator_refuses_bad_updates_by_status(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    from edgeai_worker.training.aggregator import Server, create_app

    spec = parse_spec(_spec(workers={"count": 1}))
    server = Server.restore(spec, tmp_path)
    client = await aiohttp_client(create_app(server))
    answer = await client.post("/update", data=b"nonsense")
    assert answer.status == 400
    assert "starts with" in (await answer.json())["error"]
    header = {
        "worker": 0,
        "round": 0,
        "seq": 0,
        "incarnation": "a",
        "kind": "none",
        "loss": 1.0,
        "samples": 1,
    }
    answer = await client.post("/update", data=pack(header, b"\0" * 8))
    assert answer.status == 400
    assert "none payload of 8 bytes" in (await answer.json())["error"]
    answer = await client.post("/update", data=pack({"worker": 0}, b""))
    assert answer.status == 400
    assert "'round'" in (await answer.json())["error"]
    good = np.zeros(len(server.state.params), dtype="<f4").tobytes()
    answer = await client.post("/update", data=pack({**header, "round": 3}, good))
    assert answer.status == 409
    assert "open round is 0" in (await answer.json())["error"]
    answer = await client.get("/model?worker=7&after=-1")
    assert answer.status == 400
    status = await (await client.get("/status")).json()
    assert status["phase"] == "Pending"
    assert status["bytesReceived"] == sum(
        len(b)
        for b in (
            b"nonsense",
            pack(header, b"\0" * 8),
            pack({"worker": 0}, b""),
            pack({**header, "round": 3}, good),
        )
    )
    assert status["bytesUp"] == 0


async def test_a_finished_gossip_worker_refuses_exchanges_while_it_exports(
    aiohttp_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer's exchange that reaches a finished worker during its export is answered 410
    at once (the export runs off the event loop), not held until a closing server drops it."""
    import threading

    from edgeai_worker.training import gossip

    spec = parse_spec(_spec(algorithm={"mode": "gossip"}, workers={"count": 2}))
    worker = gossip.GossipWorker(spec, 0, ["http://127.0.0.1:1", "http://127.0.0.1:2"], tmp_path)
    exporting, release = threading.Event(), threading.Event()

    def slow_export() -> None:
        exporting.set()
        assert release.wait(30), "the test never released the export"

    monkeypatch.setattr(worker, "export", slow_export)
    client = await aiohttp_client(gossip.create_app(worker))
    worker.done = True
    finishing = asyncio.ensure_future(gossip.finish(worker))
    assert await asyncio.to_thread(exporting.wait, 30)
    body = pack({"worker": 1, "round": 3}, worker._weights())
    answer = await client.post("/exchange", data=body)
    assert answer.status == 410
    assert "worker 0 is done" in (await answer.json())["error"]
    assert not finishing.done()  # answered while the export was still running
    release.set()
    await finishing


async def test_the_aggregator_serves_its_exported_model(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """404 naming the phase before training ends; the exported ONNX file's bytes after."""
    from edgeai_worker.training.aggregator import Server, create_app

    server = Server.restore(parse_spec(_spec(workers={"count": 1})), tmp_path)
    client = await aiohttp_client(create_app(server))
    answer = await client.get("/model.onnx")
    assert answer.status == 404
    assert "phase Pending" in (await answer.json())["error"]
    server.export()
    assert server.model_path is not None
    answer = await client.get("/model.onnx")
    assert answer.status == 200
    assert await answer.read() == server.model_path.read_bytes()
