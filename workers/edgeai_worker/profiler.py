"""Per-segment profiles: measured onnxruntime latency on this machine, bytes at each
cut, FLOPs per segment, and the machine's effective GFLOPS to scale them by.

A profile is plain data (`dict` ready for YAML/JSON) of this shape:

    kind: Profile
    model: resnet18
    variant: fp32
    host: {gflops: 61.3, method: "...", threads: 2}
    input: {name: input, shape: [1, 3, 224, 224], dtype: FP32}
    repeats: 20
    idleMs: 100                # idleness before each timed run
    totalMs: 88.0              # sum of the segments' measuredMs (= wholeModelMs)
    wholeModelMs: 88.0         # the unsplit model, median of `repeats` runs
    chainMs: 95.1              # the segments as separate sessions, chained, median
    servingMs: 3.1             # fixed per-request serving overhead (absent if not measured)
    servingMsPerMB: 2.4        # and per 10^6 bytes the stage receives
    forwardingMs: 1.2          # what forwarding to the next stage adds, fixed
    forwardingMsPerMB: 0.8     # and per 10^6 bytes it passes on
    totalFlops: 3633038848
    cuts: [{index, tensors, sizeBytes, position}]
    segments: [{index, positions: "a-b", flops, measuredMs}]

Segments are timed as they run in a stage: one after the other, each fed the previous
one's output, `repeats` times over the whole chain (a segment timed alone, again and
again, finds its weights in the cache and, under a CPU quota, rarely meets the
throttling a longer run meets, so per-segment medians add up to as little as 60 % of
the model). Each segment's `measuredMs` is its share of the chained time (means over
the passes) times the whole model's median, so the segments of any split add up to
what they take inside the model, and all of them to the whole model.

Every timed run (of the whole model, and every chained pass) comes after `idleMs` of
sleep, as a request comes to a stage that is not saturated: a run straight after the
last one finds the weights and activations still in the caches and is faster than a
served request (alexnet_like on one thread here: 9.2-10.2 ms against 11.4-12.3 ms).
The whole model's runs and the chained passes take turns, so that both are timed over
the same minutes (a host that slows down for a few seconds would otherwise put the
slowdown in one of them: resnet18's whole model once came out 5 % over its own
segments chained, which carry the cost of 21 session boundaries). The planner predicts
the latency of a request to an idle chain; a saturated stage is the autoscaler's
business, and there a profile of idle-stage runs errs on the slow side.

`servingMs` is the cost of serving one request, measured through a real worker
(`python -m edgeai_worker`) with a tiny model that takes an input of the model's rank:
the round trip (interquartile mean) of binary OIP requests on loopback (HTTP receive,
decode, the hand-off to onnxruntime, encode, answer), what every stage pays per
request on top of compute and transfer time. `forwardingMs` is what a stage pays on
top of that when it forwards (encoding the tensors, sending them, relaying the
answer): the round trip through a forward-only worker in front of the first one,
minus twice the direct one. Both are measured twice, with the model's input (at
least 1 MiB: `MIN_FIT_BYTES`) and with a one-element tensor of the same rank,
interleaved, and fitted as a fixed part
(`servingMs`, `forwardingMs`) plus a part per 10^6 bytes of tensor the stage receives
or passes on (`servingMsPerMB`, `forwardingMsPerMB`): a stage that receives a small
activation pays less than one that receives the raw input. Given the model, a worker
serving the model itself then answers as many requests, each reporting its
onnxruntime time (`Edgeai-Compute-Ms`), and `servingMs` is set so that a request of
the model's input costs what those requests spent beyond their compute
(`calibrate_serving`): on a CPU-limited node a request that computes meets the
quota's throttling differently from one to the tiny model. The planner scales all
four to a tier like compute.

Host GFLOPS is the median throughput of an fp32 onnxruntime MatMul (1024 x 1024), the
same kind of number a node's `edgeai.dev/gflops` annotation declares, so that a
tier's time is `measuredMs x host.gflops / tier.gflops`. The analytic alternative,
`flops / tier.gflops`, assumes a model runs at the declared peak.
"""

from __future__ import annotations

import http.client
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from edgeai_worker import graph as onnx_graph
from edgeai_worker.protocol import (
    HEADER_LENGTH,
    InferRequest,
    Tensor,
    datatype_of,
    decode_response,
    encode_request,
)

Progress = Callable[[str], None]

# Idleness before each timed run (see the module docstring). The zoo's alexnet_like on
# one thread: medians of 9.2-10.2 ms back to back, 11.4-12.3 ms after 20-500 ms idle.
IDLE_MS = 100.0
MAX_IDLE_MS = 10_000


def stderr_progress(message: str) -> None:
    print(f"[edgeai profile] {message}", file=sys.stderr, flush=True)


def _session(
    model: onnx.ModelProto, threads: int | None, *, spinning: bool = True
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not spinning:
        # Chained sessions: a session's idle threads would spin on while the next
        # session runs and slow it down, which no stage (one session) sees.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _time_ms(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], warmup: int, repeats: int
) -> tuple[float, list[np.ndarray]]:
    outputs: list[np.ndarray] = []
    for _ in range(warmup):
        outputs = session.run(None, feeds)
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        outputs = session.run(None, feeds)
        samples.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(samples), outputs


def host_gflops(size: int = 1024, repeats: int = 10, threads: int | None = None) -> float:
    """Effective fp32 GFLOPS of this machine through onnxruntime (a square MatMul)."""
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [size, size])
    c = helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((size, size)).astype(np.float32)
    b = onnx.numpy_helper.from_array(weight, "b")
    g = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "matmul", [a], [c], [b])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    ms, _ = _time_ms(_session(model, threads), {"a": weight}, 3, repeats)
    return 2.0 * size**3 / (ms / 1000.0) / 1e9


def example_feed(
    model: onnx.ModelProto,
    seed: int = 0,
    shapes: Mapping[str, Sequence[int]] | None = None,
    values: Mapping[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Inputs of the model's concrete input shapes (`graph.concrete_input_shapes` of
    `shapes`: a free batch dimension at 1, any other free dimension must be given),
    random but for the `values` given (see `graph.sample_feed`)."""
    concrete = onnx_graph.concrete_input_shapes(model, shapes)
    return onnx_graph.sample_feed(model, concrete, seed, values)


def _chained_pass(
    sessions: Sequence[ort.InferenceSession], feeds: dict[str, np.ndarray]
) -> list[float]:
    """One run of the segments in order, each fed the previous ones' outputs; ms each."""
    values = dict(feeds)
    times: list[float] = []
    for session in sessions:
        inputs = {x.name: values[x.name] for x in session.get_inputs()}
        started = time.perf_counter()
        outputs = session.run(None, inputs)
        times.append((time.perf_counter() - started) * 1000.0)
        values.update(zip([o.name for o in session.get_outputs()], outputs, strict=True))
    return times


def profile_model(
    model: onnx.ModelProto | str | Path,
    *,
    name: str = "model",
    variant: str = "fp32",
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    gflops: float | None = None,
    idle_ms: float = IDLE_MS,
    progress: Progress | None = stderr_progress,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    input_values: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Measures the whole model and every segment between cuts (see the module
    docstring), after `warmup` runs of each, each timed run after `idle_ms` of
    idleness, at the concrete input shapes (`input_shapes` where the model leaves a
    dimension free; see `graph.concrete_input_shapes`), on inputs random but for the
    `input_values` given (see `graph.sample_feed`)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not 0 <= idle_ms <= MAX_IDLE_MS:
        raise ValueError(f"idle_ms must be in 0-{MAX_IDLE_MS}, got {idle_ms}")
    idle_s = idle_ms / 1000.0
    say = progress or (lambda _: None)
    shapes = onnx_graph.concrete_input_shapes(model, input_shapes)
    feeds = onnx_graph.sample_feed(model, shapes, values=input_values)
    started = time.monotonic()
    dag = onnx_graph.analyze(model, shapes, feeds)
    cuts = onnx_graph.graph_cut_points(dag)
    say(
        f"{name}: {len(dag.nodes)} compute nodes, {len(cuts)} cuts "
        f"(graph analysis {time.monotonic() - started:.2f}s)"
    )
    if gflops is None:
        say("measuring this machine's GFLOPS (onnxruntime MatMul 1024x1024)")
        gflops = host_gflops(threads=threads)
    whole = _session(model, threads)
    sessions = onnx_graph.segment_models(
        model, dag, cuts, lambda part: _session(part, threads, spinning=False)
    )
    say(f"{name}: the whole model and {len(sessions)} segments chained, in turn")
    started = time.monotonic()
    whole_runs: list[float] = []
    passes: list[list[float]] = []
    for done in range(warmup + repeats):
        if done >= warmup:
            time.sleep(idle_s)
        began = time.perf_counter()
        whole.run(None, feeds)
        whole_runs.append((time.perf_counter() - began) * 1000.0)
        if done >= warmup:
            time.sleep(idle_s)
        passes.append(_chained_pass(sessions, feeds))
        if (done + 1) % 5 == 0 or done + 1 == warmup + repeats:
            say(
                f"{name}: pass {done + 1}/{warmup + repeats} over the model and "
                f"{len(sessions)} segments ({time.monotonic() - started:.1f}s elapsed)"
            )
    whole_runs, passes = whole_runs[warmup:], passes[warmup:]
    whole_ms = statistics.median(whole_runs)
    chain_ms = statistics.median(sum(p) for p in passes)
    say(f"{name}: whole model {whole_ms:.2f} ms, segments chained {chain_ms:.2f} ms")
    means = [statistics.fmean(p[i] for p in passes) for i in range(len(sessions))]
    total_mean = sum(means) or 1.0
    segments: list[dict[str, Any]] = [
        {
            "index": i,
            "positions": f"{a.position}-{b.position - 1}",
            "flops": sum(n.flops for n in dag.nodes[a.position : b.position]),
            "measuredMs": round(whole_ms * mean / total_mean, 4),
        }
        for i, ((a, b), mean) in enumerate(zip(itertools.pairwise(cuts), means, strict=True))
    ]
    inputs = profile_inputs(model, shapes)
    return {
        "kind": "Profile",
        "model": name,
        "variant": variant,
        "host": {
            "gflops": round(gflops, 3),
            "threads": threads or os.cpu_count(),
            "method": "median fp32 onnxruntime MatMul 1024x1024",
        },
        "input": inputs[0],
        **({"inputs": inputs} if len(inputs) > 1 else {}),
        **({"held": [h.to_dict() for h in dag.held]} if dag.held else {}),
        "repeats": repeats,
        "idleMs": idle_ms,
        "totalMs": round(sum(s["measuredMs"] for s in segments), 4),
        "wholeModelMs": round(whole_ms, 4),
        "chainMs": round(chain_ms, 4),
        "totalFlops": sum(n.flops for n in dag.nodes),
        "cuts": [
            {
                "index": c.index,
                "tensors": list(c.tensors),
                "sizeBytes": c.size_bytes,
                "position": c.position,
            }
            for c in cuts
        ],
        "segments": segments,
    }


def profile_inputs(
    model: onnx.ModelProto, shapes: Mapping[str, Sequence[int]]
) -> list[dict[str, Any]]:
    """The profile's `inputs`: each model input's name, profiled shape and OIP dtype."""
    initializers = {t.name for t in model.graph.initializer}
    return [
        {
            "name": vi.name,
            "shape": [int(d) for d in shapes[vi.name]],
            "dtype": datatype_of(
                np.zeros(0, onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
            ),
        }
        for vi in model.graph.input
        if vi.name not in initializers
    ]


def scaled_ms(profile: dict[str, Any], tier_gflops: float) -> list[float]:
    """A tier's per-segment time from the measured profile: host time x host/tier speed."""
    ratio = float(profile["host"]["gflops"]) / tier_gflops
    return [float(s["measuredMs"]) * ratio for s in profile["segments"]]


def analytic_ms(flops: Sequence[int], tier_gflops: float) -> list[float]:
    """A tier's per-segment time from FLOPs alone, at the tier's declared GFLOPS."""
    return [f / (tier_gflops * 1e6) for f in flops]


# ---------------------------------------------------------------------------- serving

SERVING_MODEL_NAME = "serving-probe"


def serving_model(input_shape: Sequence[int], path: Path) -> Path:
    """A tiny model that takes an FP32 input of `input_shape`'s rank (any size) and
    answers one number per sample: it costs a worker next to nothing but the serving
    itself."""
    dims: list[int | str] = ["N", *(f"d{i}" for i in range(1, len(input_shape)))]
    g = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("ReduceMean", ["flat"], ["output"], axes=[1], keepdims=1),
        ],
        "serving_probe",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 1])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


def post_timed(
    conn: http.client.HTTPConnection, path: str, body: bytes, headers: Mapping[str, str]
) -> tuple[float, http.client.HTTPResponse, bytes]:
    """POST and read the answer: (ms, response, body); raises unless it is a 200."""
    started = time.perf_counter()
    conn.request("POST", path, body=body, headers=dict(headers))
    response = conn.getresponse()
    answer = response.read()
    elapsed = (time.perf_counter() - started) * 1000.0
    if response.status != 200:
        raise RuntimeError(f"POST {path}: HTTP {response.status}: {answer[:300]!r}")
    return elapsed, response, answer


def _binary_request(
    feeds: Mapping[str, np.ndarray], request_id: str
) -> tuple[bytes, dict[str, str]]:
    """A binary OIP request of `feeds` asking for binary outputs: (body, headers)."""
    request = InferRequest(
        [Tensor.from_numpy(name, array) for name, array in feeds.items()],
        request_id,
        None,
        {"binary_data_output": True},
    )
    return encode_request(request, binary=True)


def infer_binary(
    url: str, model_name: str, feeds: Mapping[str, np.ndarray], timeout_s: float = 300.0
) -> list[Tensor]:
    """The output tensors a worker at `url` answers to one binary OIP request of
    `feeds` (raises unless it answers 200)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=timeout_s)
    body, headers = _binary_request(feeds, f"infer-{os.getpid()}")
    try:
        _, response, answer = post_timed(conn, f"/v2/models/{model_name}/infer", body, headers)
    finally:
        conn.close()
    length = response.getheader(HEADER_LENGTH)
    return decode_response(answer, int(length) if length else None).outputs


def time_binary_requests(
    targets: Sequence[tuple[str, Sequence[int]]], *, requests: int, warmup: int
) -> list[list[float]]:
    """Round trips (ms) of binary OIP requests, one at a time, to each (URL, FP32 input
    shape) target in turn with a random input of that shape (one keep-alive connection
    each, so all see the same conditions); per target, warm-up excluded."""
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(list(shape)).astype("<f4") for _, shape in targets]
    connections = []
    for url, _ in targets:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=60)
        connections.append((conn, parts.path))
    samples: list[list[float]] = [[] for _ in targets]
    try:
        for i in range(warmup + requests):
            for j, ((conn, path), x) in enumerate(zip(connections, inputs, strict=True)):
                request = InferRequest(
                    [Tensor.from_numpy("input", x)],
                    f"serving-{os.getpid()}-{i}-{j}",  # unique: workers answer an id once
                    None,
                    {"binary_data_output": True},
                )
                body, headers = encode_request(request, binary=True)
                elapsed, _, _ = post_timed(conn, path, body, headers)
                if i >= warmup:
                    samples[j].append(elapsed)
    finally:
        for conn, _ in connections:
            conn.close()
    return samples


def time_model_requests(
    url: str, feeds: Mapping[str, np.ndarray], *, requests: int, warmup: int
) -> list[tuple[float, float]]:
    """(round trip ms, the worker's onnxruntime ms) of binary OIP requests of `feeds`
    to a worker serving a model, one at a time on one keep-alive connection, warm-up
    excluded; the compute time is the worker's `Edgeai-Compute-Ms` answer header."""
    from edgeai_worker.chain import COMPUTE_TIME_HEADER

    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80, timeout=120)
    samples: list[tuple[float, float]] = []
    try:
        for i in range(warmup + requests):
            body, headers = _binary_request(feeds, f"model-serving-{os.getpid()}-{i}")
            elapsed, response, _ = post_timed(conn, parts.path, body, headers)
            compute = response.getheader(COMPUTE_TIME_HEADER)
            if compute is None:
                raise RuntimeError(f"{url} sent no {COMPUTE_TIME_HEADER} header")
            if i >= warmup:
                samples.append((elapsed, float(compute)))
    finally:
        conn.close()
    return samples


def calibrate_serving(
    overheads: Mapping[str, float], input_bytes: int, model_samples: Sequence[tuple[float, float]]
) -> dict[str, float]:
    """`overheads` with `servingMs` set so that serving a request of `input_bytes` costs
    what a worker serving the model itself added to its onnxruntime time
    (`central_mean` of round trip - compute over `model_samples`); the per-MB slope
    stays the probe's. On a CPU-limited tier the tiny probe model meets the quota's
    throttling differently from a request that also computes, so its fixed part alone
    over- or under-states what a stage of the model pays."""
    with_model = central_mean([max(0.0, rt - compute) for rt, compute in model_samples])
    out = dict(overheads)
    out["servingMs"] = max(0.0, with_model - out.get("servingMsPerMB", 0.0) * input_bytes / 1e6)
    return out


def central_mean(values: Sequence[float]) -> float:
    """The mean of the middle half (the interquartile mean): steadier than the median
    where a CPU quota makes times bimodal (a run throttled or not), and unmoved by
    the outliers of a shared machine."""
    ordered = sorted(values)
    cut = len(ordered) // 4
    return statistics.fmean(ordered[cut : len(ordered) - cut])


def overheads_from_round_trips(
    direct_ms: Sequence[float], forwarded_ms: Sequence[float]
) -> tuple[float, float]:
    """(serving, forwarding) ms from round trips straight to a serving-probe worker and
    through a forward-only worker in front of it, on the same machine: the forward-only
    stage costs its own serving plus the forwarding, so forwarding = forwarded - 2 x
    direct (`central_mean`s; never below 0)."""
    serving = central_mean(direct_ms)
    return serving, max(0.0, central_mean(forwarded_ms) - 2.0 * serving)


# the large payload of the fit is at least this big: between a one-element tensor and
# a model's few-KB input the slope would be noise
MIN_FIT_BYTES = 1 << 20


def fit_shapes(input_shape: Sequence[int]) -> tuple[list[int], list[int]]:
    """The (small, large) FP32 shapes of `input_shape`'s rank the overheads are
    measured with: one element, and the model's input (or `MIN_FIT_BYTES` where the
    input is smaller)."""
    small = [1] * len(input_shape)
    if tensor_bytes(input_shape) >= MIN_FIT_BYTES:
        return small, [int(d) for d in input_shape]
    return small, [*small[:-1], MIN_FIT_BYTES // 4]


def fit_overheads(
    small_bytes: int,
    small: tuple[float, float],
    large_bytes: int,
    large: tuple[float, float],
) -> dict[str, float]:
    """The profile's `servingMs`, `servingMsPerMB`, `forwardingMs`,
    `forwardingMsPerMB` from (serving, forwarding) ms measured with tensors of
    `small_bytes` and `large_bytes`: the line through the two points, or, where noise
    tilts it down (or there is one size), a flat line at the large payload's costs; the
    fixed part is never below 0."""
    out: dict[str, float] = {}
    for i, name in enumerate(("serving", "forwarding")):
        span = large_bytes - small_bytes
        slope = max(0.0, (large[i] - small[i]) / span) if span > 0 else 0.0
        out[f"{name}Ms"] = max(0.0, large[i] - slope * large_bytes)
        out[f"{name}MsPerMB"] = slope * 1e6
    return out


def tensor_bytes(shape: Sequence[int]) -> int:
    """Bytes of an FP32 tensor of `shape`."""
    return 4 * int(np.prod([int(d) for d in shape]))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the serving-probe worker exited with code {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the serving-probe worker was not ready after {timeout_s:.0f} s")


def serving_overheads(
    input_shape: Sequence[int],
    *,
    requests: int = 60,
    warmup: int = 5,
    threads: int | None = None,
    progress: Progress | None = stderr_progress,
    model: Path | None = None,
    feeds: Mapping[str, np.ndarray] | None = None,
) -> dict[str, float]:
    """The per-request serving and forwarding costs on this machine, fixed and per MB
    (the profile's keys; see the module docstring): a real worker process serving
    `serving_model` and a forward-only worker in front of it, `requests` round trips
    to each with the model's input and with a one-element tensor, in turn. With
    `model`, a worker serving that model answers `requests` more, and the fixed
    serving part is calibrated on them (`calibrate_serving`), sending `feeds`
    (default: `example_feed` of the model)."""
    say = progress or (lambda _: None)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEAI_")}
    env["EDGEAI_INTRA_OP_THREADS"] = str(threads or 1)
    processes: list[subprocess.Popen[bytes]] = []

    def start(port: int, *argv: str) -> str:
        command = [
            sys.executable, "-m", "edgeai_worker", "--host", "127.0.0.1", "--port", str(port),
            "--model-name", SERVING_MODEL_NAME, *argv,
        ]  # fmt: skip
        processes.append(
            subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
        base = f"http://127.0.0.1:{port}"
        _wait_ready(f"{base}/v2/health/ready", processes[-1], 60.0)
        return base

    model_feeds: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="edgeai-serving-") as tmp:
        probe_model = serving_model(input_shape, Path(tmp) / "serving.onnx")
        try:
            probe = start(_free_port(), "--partition", str(probe_model))
            front = start(_free_port(), "--next", probe)
            small, large = fit_shapes(input_shape)
            say(
                f"serving overhead: {requests} requests each of {large} and {small} "
                "through a worker, and through a forward-only worker in front of it"
            )
            path = f"/v2/models/{SERVING_MODEL_NAME}/infer"
            direct, forwarded, small_direct, small_forwarded = time_binary_requests(
                [
                    (probe + path, large),
                    (front + path, large),
                    (probe + path, small),
                    (front + path, small),
                ],
                requests=requests,
                warmup=warmup,
            )
            model_samples: list[tuple[float, float]] = []
            if model is not None:
                model_feeds = (
                    dict(feeds)
                    if feeds is not None
                    else example_feed(onnx.load(str(model), load_external_data=False))
                )
                served = start(_free_port(), "--partition", str(model))
                say(f"serving overhead: {requests} requests through a worker serving the model")
                model_samples = time_model_requests(
                    served + path, model_feeds, requests=requests, warmup=warmup
                )
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)
    fitted = fit_overheads(
        tensor_bytes(small),
        overheads_from_round_trips(small_direct, small_forwarded),
        tensor_bytes(large),
        overheads_from_round_trips(direct, forwarded),
    )
    if not model_samples:
        return fitted
    return calibrate_serving(fitted, sum(a.nbytes for a in model_feeds.values()), model_samples)
