"""Private inference, measured on held-out digits (needs torch).

    python bench/privacy/run.py [--stds 0,0.1,0.3,0.5,1,2] [--draws 5] [--only he]

One run, for each cut the device may send (`--cuts`: after the first convolution's ReLU,
16x8x8 features, and after the max-pool, 32x4x4) and each noise std:

- accuracy of the served model on the test split (the held-out quarter of
  `zoo.digits_split()`): the device's prefix (the plain model, input -> cut) with
  Gaussian noise on its output, then the suffix cut from the plain model (no noise
  training) and from the noise-trained model `spec.privacy.noiseTraining` serves
  (`edgeai_worker.noise_training`), both ONNX files run with onnxruntime, the mean over
  `--draws` noise draws;
- an inversion attack: a decoder (MLP) trained on the train split to reconstruct the
  input from the noisy features (the attacker sees what the device uploads and owns
  similar data), judged on the test split by reconstruction MSE and by how often the
  trained digits_cnn classifies the reconstruction as the true digit (chance 0.1).

Then the training side: a loss-threshold membership-inference attack (Yeom et al.) on
digits_cnn trained with the training package's DP-SGD (`edgeai_worker.training.learner`,
per-example clipping at 1.0) on 450 member digits, with noise multipliers 0 and 1.0;
non-members are the test split. The threshold is the members' mean loss on one half of
the members (Yeom et al.), the advantage (true-positive rate - false-positive rate) is
measured on the other half of the members and of the non-members.

Then the homomorphic head (`edgeai_worker.he`, spec.privacy.homomorphicHead):
digits_cnn's last dense layer on each held-out digit's features, in plaintext
(onnxruntime) and on CKKS ciphertexts, side by side: the median time of the device's
encryption, the edge's evaluation and the device's decryption, the bytes each way, the
accuracy and how often the two argmaxes agree. `--only he` runs this part alone and
keeps the other sections of the JSON.

Everything is written to docs/results/privacy.json and rendered into docs/privacy.md;
the homomorphic head's costs also go to operator/edgeai_operator/he_cost.json, which
the planner prices that stage with.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))

import render_numbers  # noqa: E402

CUTS = {
    "conv1": "/features/features.1/Relu_output_0",
    "pooled": "/features/features.4/MaxPool_output_0",
}
HEAD_CUT = "/classifier/classifier.2/Relu_output_0"  # the input of the last dense layer
HE_COST_FILE = ROOT / "operator" / "edgeai_operator" / "he_cost.json"
CHANCE = 0.1
ACCURACY_GOAL = 0.98  # x the clean model's accuracy
RECOGNITION_GOAL = 2 * CHANCE
Losses = Sequence[float] | np.ndarray


# --- helpers (tested on literals in tests/test_privacy.py) ------------------------------


def recognition_rate(logits: np.ndarray, labels: np.ndarray) -> float:
    """The share of reconstructions a classifier (its `logits`) assigns their true label."""
    return float((np.asarray(logits).argmax(axis=1) == np.asarray(labels)).mean())


def advantage(member_losses: Losses, other_losses: Losses, t: float) -> float:
    """Membership advantage of the threshold `t`: TPR - FPR."""
    members, others = np.asarray(member_losses), np.asarray(other_losses)
    return float((members <= t).mean() - (others <= t).mean())


def goal_row(rows: Sequence[dict[str, Any]], clean_accuracy: float) -> dict[str, Any] | None:
    """The lowest noise std whose noise-trained accuracy is >= ACCURACY_GOAL x clean and
    whose reconstructions are recognised no more often than RECOGNITION_GOAL; None when
    no std meets both."""
    for row in sorted(rows, key=lambda r: r["std"]):
        if (
            row["accuracyNoiseTrained"] >= ACCURACY_GOAL * clean_accuracy
            and row["recognised"] <= RECOGNITION_GOAL
        ):
            return row
    return None


# --- measurements -----------------------------------------------------------------------


def _session(model: Any) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def _parts(path: Path, cut: str) -> tuple[Any, Any]:
    import onnx

    from edgeai_worker.graph import Partitioner

    partitioner = Partitioner(onnx.load(str(path)))
    return (
        _session(partitioner.extract(("input",), (cut,))),
        _session(partitioner.extract((cut,), ("output",))),
    )


def _decoder_attack(
    features_train: np.ndarray,
    x_train: np.ndarray,
    features_test: np.ndarray,
    x_test: np.ndarray,
    std: float,
    seed: int,
) -> np.ndarray:
    """Reconstructions of the test inputs from their noisy features, by an MLP decoder
    trained on noisy train features (fresh noise per batch)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(seed)
    width = int(np.prod(features_train.shape[1:]))
    decoder = nn.Sequential(
        nn.Flatten(), nn.Linear(width, 256), nn.ReLU(), nn.Linear(256, 64), nn.Sigmoid()
    )
    f, x = torch.from_numpy(features_train), torch.from_numpy(x_train).reshape(len(x_train), -1)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=2e-3)
    for _ in range(60):
        order = torch.randperm(len(f), generator=generator)
        for start in range(0, len(f), 64):
            idx = order[start : start + 64]
            noisy = f[idx] + torch.randn(f[idx].shape, generator=generator) * std
            loss = F.mse_loss(decoder(noisy), x[idx])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
    rng = np.random.default_rng(seed)
    noisy_test = features_test + rng.normal(0.0, std, features_test.shape).astype(np.float32)
    with torch.no_grad():
        out = decoder(torch.from_numpy(noisy_test)).numpy()
    reconstructed: np.ndarray = out.reshape(x_test.shape).astype(np.float32)
    return reconstructed


def inference_rows(stds: Sequence[float], draws: int) -> dict[str, Any]:
    from edgeai_worker import noise_training, zoo

    x_train, _, x_test, y_test = zoo.digits_split()
    plain = zoo.export_onnx("digits_cnn", trained=True)
    classifier = _session(__import__("onnx").load(str(plain)))
    (clean_logits,) = classifier.run(None, {"input": x_test})
    clean = recognition_rate(clean_logits, y_test)
    out: dict[str, Any] = {"cleanAccuracy": clean, "cuts": {}}
    for name, cut in CUTS.items():
        prefix, plain_suffix = _parts(plain, cut)
        (f_train,) = prefix.run(None, {"input": x_train})
        (f_test,) = prefix.run(None, {"input": x_test})
        rows = []
        for std in stds:
            started = time.monotonic()
            suffix = plain_suffix
            if std > 0:
                _, suffix = _parts(noise_training.noise_trained_digits(cut, std), cut)
            accuracy: dict[str, list[float]] = {"plain": [], "trained": []}
            for draw in range(draws):
                rng = np.random.default_rng(1000 + draw)
                noisy = (f_test + rng.normal(0.0, std, f_test.shape)).astype(np.float32)
                for key, session in (("plain", plain_suffix), ("trained", suffix)):
                    (logits,) = session.run(None, {cut: noisy})
                    accuracy[key].append(recognition_rate(logits, y_test))
            recon = _decoder_attack(f_train, x_train, f_test, x_test, std, seed=7)
            (recon_logits,) = classifier.run(None, {"input": recon})
            row = {
                "std": std,
                "accuracyPlain": float(np.mean(accuracy["plain"])),
                "accuracyNoiseTrained": float(np.mean(accuracy["trained"])),
                "reconstructionMse": float(np.mean((recon - x_test) ** 2)),
                "recognised": recognition_rate(recon_logits, y_test),
            }
            rows.append(row)
            print(
                f"[{name}] std {std:g}: accuracy plain {row['accuracyPlain']:.4f} "
                f"noise-trained {row['accuracyNoiseTrained']:.4f}; inversion MSE "
                f"{row['reconstructionMse']:.4f}, recognised {row['recognised']:.3f} "
                f"({time.monotonic() - started:.1f}s)",
                flush=True,
            )
        goal = goal_row(rows, clean)
        out["cuts"][name] = {
            "tensor": cut,
            "featureSize": int(np.prod(f_test.shape[1:])),
            "meanImageMse": float(np.mean((x_test - x_train.mean(axis=0)) ** 2)),
            "rows": rows,
            "goal": None
            if goal is None
            else {
                "std": goal["std"],
                "accuracyRatio": goal["accuracyNoiseTrained"] / clean,
                "recognised": goal["recognised"],
            },
        }
    return out


def _finite(value: float | None) -> float | None:
    """JSON has no infinity: an unbounded epsilon (no noise) is written as null."""
    return value if value is not None and np.isfinite(value) else None


def membership_rows(noise_multipliers: Sequence[float], steps: int) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    from edgeai_worker import zoo
    from edgeai_worker.training.learner import Learner, accuracy
    from edgeai_worker.training.spec import AlgorithmSpec, PrivacySpec, TrainingSpec

    x_train, y_train, x_test, y_test = zoo.digits_split()
    members, labels = x_train[: len(x_test)], y_train[: len(x_test)]
    rows = []
    for multiplier in noise_multipliers:
        started = time.monotonic()
        spec = TrainingSpec(
            algorithm=AlgorithmSpec(mode="sync", learning_rate=0.5, batch_size=32),
            privacy=PrivacySpec(clip_norm=1.0, noise_multiplier=multiplier),
        )
        learner = Learner(spec, members, labels, 0)
        learner.train_steps(steps)
        model = learner.model.eval()
        with torch.no_grad():  # float64: a confident model's float32 losses round to 0
            loss_in = F.cross_entropy(
                model(torch.from_numpy(members)).double(),
                torch.from_numpy(labels),
                reduction="none",
            ).numpy()
            loss_out = F.cross_entropy(
                model(torch.from_numpy(x_test)).double(), torch.from_numpy(y_test), reduction="none"
            ).numpy()
        # Yeom et al.: a member is what the model fits at least as well as its mean
        # training loss (measured on one half, the attack judged on the other)
        t = float(np.mean(loss_in[0::2]))
        row = {
            "noiseMultiplier": multiplier,
            "clipNorm": 1.0,
            "steps": steps,
            "epsilon": _finite(learner.epsilon()),
            "trainAccuracy": accuracy(model, members, labels),
            "testAccuracy": accuracy(model, x_test, y_test),
            "advantage": advantage(loss_in[1::2], loss_out[1::2], t),
        }
        rows.append(row)
        print(
            f"[membership] noise multiplier {multiplier:g}: advantage {row['advantage']:.3f}, "
            f"train {row['trainAccuracy']:.3f} / test {row['testAccuracy']:.3f}, epsilon "
            f"{row['epsilon']} ({time.monotonic() - started:.1f}s)",
            flush=True,
        )
    return rows


def he_section() -> dict[str, Any]:
    """The last dense layer of digits_cnn on every held-out digit, in plaintext and on
    ciphertexts (one sample per request, as a device sends them)."""
    import tempfile

    import onnx

    from edgeai_worker import he, zoo
    from edgeai_worker.graph import Partitioner
    from edgeai_worker.profiler import host_gflops

    plain = zoo.export_onnx("digits_cnn", trained=True)
    _, _, x_test, y_test = zoo.digits_split()
    prefix, head_session = _parts(plain, HEAD_CUT)
    (features,) = prefix.run(None, {"input": x_test})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "head.onnx"
        onnx.save(Partitioner(onnx.load(str(plain))).extract((HEAD_CUT,), ("output",)), str(path))
        head = he.DenseHead.from_onnx(path)
    started = time.perf_counter()
    keys = he.DeviceKeys()
    keygen_ms = (time.perf_counter() - started) * 1e3
    evaluator = he.HeadEvaluator(head)
    _, context = evaluator.context(keys.public_context)
    plain_ms, plain_logits, he_logits, timings = [], [], [], []
    for i, row in enumerate(features):
        started = time.perf_counter()
        (logits,) = head_session.run(None, {HEAD_CUT: row[None]})
        plain_ms.append((time.perf_counter() - started) * 1e3)
        plain_logits.append(logits[0])
        decrypted, timing = he.timed_round(keys, evaluator, row, context)
        he_logits.append(decrypted)
        timings.append(timing)
        if (i + 1) % 100 == 0:
            print(f"[he] {i + 1}/{len(features)} digits", flush=True)
    p, c = np.asarray(plain_logits), np.asarray(he_logits)

    def median(values: Sequence[float]) -> float:
        return float(np.median(values))

    section = {
        "cut": HEAD_CUT,
        "inputs": head.inputs,
        "outputs": head.outputs,
        "samples": len(features),
        "scheme": {
            "polyModulusDegree": he.POLY_MODULUS_DEGREE,
            "coeffModBitSizes": list(he.COEFF_MOD_BIT_SIZES),
            "scaleBits": he.SCALE_BITS,
        },
        "hostGflops": round(host_gflops(), 3),
        "keygenMs": round(keygen_ms, 1),
        "contextBytes": len(keys.public_context),
        "plain": {
            "headMs": median(plain_ms),
            "upBytes": 4 * head.inputs,
            "downBytes": 4 * head.outputs,
            "accuracy": recognition_rate(p, y_test),
        },
        "he": {
            "encryptMs": median([t.encrypt_ms for t in timings]),
            "evaluateMs": median([t.evaluate_ms for t in timings]),
            "decryptMs": median([t.decrypt_ms for t in timings]),
            "upBytes": int(np.median([t.up_bytes for t in timings])),
            "downBytes": int(np.median([t.down_bytes for t in timings])),
            "accuracy": recognition_rate(c, y_test),
            "agreement": float((p.argmax(axis=1) == c.argmax(axis=1)).mean()),
            "maxAbsError": float(np.abs(p - c).max()),
        },
    }
    print(
        f"[he] plaintext head {section['plain']['headMs']:.3f} ms; CKKS: encrypt "
        f"{section['he']['encryptMs']:.1f} ms, evaluate {section['he']['evaluateMs']:.1f} ms, "
        f"decrypt {section['he']['decryptMs']:.1f} ms, {section['he']['upBytes']} B up, "
        f"{section['he']['downBytes']} B down; argmax agreement {section['he']['agreement']:.4f}",
        flush=True,
    )
    return section


def he_served(requests: int) -> dict[str, Any]:
    """The same split (digits_cnn up to its last dense layer on the device, that layer on
    the edge) served by worker processes on loopback, in plaintext and with the
    homomorphic head, one held-out digit per binary request, the two chains taking
    turns; the plan is the planner's for the field."""
    import tempfile
    from dataclasses import replace

    from edgeai_operator.deployspec import parse_deployment
    from edgeai_operator.localworkers import start_local
    from edgeai_operator.partitions import build_partitions
    from edgeai_operator.planning import NodeState, plan_zones
    from edgeai_operator.problem import analytic_profile
    from edgeai_operator.topology import NodeSpec
    from edgeai_worker import zoo
    from edgeai_worker.profiler import infer_binary

    def node(name: str, tier: str, gflops: float, mbps: float | None) -> NodeState:
        labels = {"edgeai.dev/tier": tier, "topology.kubernetes.io/zone": "zone-a"}
        spec = NodeSpec(name, tier, "zone-a", {}, gflops, mbps, 1.0, None, labels)
        return NodeState(spec, ready=True, schedulable=True)

    body = {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "metadata": {"name": "digits-he"},
        "spec": {
            "modelRef": {"name": "digits"},
            "placement": {"tiers": ["device", "edge"]},
            "privacy": {"homomorphicHead": {"enabled": True}},
        },
    }
    nodes = [node("device", "device", 2.0, 100.0), node("edge", "edge", 20.0, None)]
    profiles = [analytic_profile("digits_cnn")]
    he_plan = plan_zones(parse_deployment(body), profiles, nodes).plans["zone-a"]
    plans = {"plain": replace(he_plan, homomorphic_head=False), "he": he_plan}
    model = zoo.export_onnx("digits_cnn", trained=True)
    _, _, x_test, _ = zoo.digits_split()
    times: dict[str, list[float]] = {name: [] for name in plans}
    answers: dict[str, list[int]] = {name: [] for name in plans}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        try:
            for name, plan in plans.items():
                workdir = Path(tmp) / name
                workdir.mkdir()
                specs = build_partitions(plan.stages, plan.alternatives, model, workdir)
                runs[name] = start_local(plan, specs, workdir, settings={"uplink_mbps": 1000.0})
            for i in range(requests + 1):  # the first: the context goes up
                for name, run in runs.items():
                    started = time.perf_counter()
                    (out,) = infer_binary(
                        run.entry_url, run.model_name, {"input": x_test[i : i + 1]}
                    )
                    times[name].append((time.perf_counter() - started) * 1e3)
                    answers[name].append(int(np.asarray(out.array).argmax()))
        finally:
            for run in runs.values():
                run.stop()
    served = {
        "requests": requests,
        "split": he_plan.split,
        "plainMs": float(np.median(times["plain"][1:])),
        "heMs": float(np.median(times["he"][1:])),
        "heFirstMs": times["he"][0],
        "agreement": float(np.mean(np.equal(answers["plain"], answers["he"]))),
    }
    print(
        f"[he] served ({he_plan.split}, loopback): p50 plaintext {served['plainMs']:.1f} ms, "
        f"homomorphic {served['heMs']:.1f} ms (first request, with the context: "
        f"{served['heFirstMs']:.0f} ms)",
        flush=True,
    )
    return served


def he_cost(section: Mapping[str, Any], date: str) -> dict[str, Any]:
    """The planner's price list for the homomorphic head (problem.he_head_cost)."""
    measured = section["he"]
    return {
        "kind": "HomomorphicHeadCost",
        "version": 1,
        "date": date,
        "source": "bench/privacy/run.py --only he (docs/results/privacy.json)",
        "hostGflops": section["hostGflops"],
        "scheme": section["scheme"],
        "contextBytes": section["contextBytes"],
        "heads": [
            {
                "inputs": section["inputs"],
                "outputs": section["outputs"],
                **{k: measured[k] for k in ("encryptMs", "evaluateMs", "decryptMs")},
                "upBytes": measured["upBytes"],
                "downBytes": measured["downBytes"],
            }
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stds", default="0,0.1,0.3,0.5,1,2")
    parser.add_argument("--draws", type=int, default=5, help="noise draws per accuracy")
    parser.add_argument("--steps", type=int, default=1500, help="DP-SGD steps per model")
    parser.add_argument(
        "--only",
        choices=("he",),
        help="only the homomorphic head, merged into the existing JSON's other sections",
    )
    parser.add_argument(
        "--served-requests", type=int, default=100, help="digits through each served chain"
    )
    render_numbers.add_result_arguments(parser, "privacy.json")
    args = parser.parse_args(argv)
    stds = [float(s) for s in args.stds.split(",")]
    started = time.monotonic()
    date = datetime.now(UTC).strftime("%Y-%m-%d")
    if args.only == "he":
        report = json.loads(args.out.read_text()) if args.out.exists() else {}
    else:
        report = {
            "date": date,
            "conditions": args.conditions,
            "draws": args.draws,
            "chance": CHANCE,
            "goals": {"accuracyRatio": ACCURACY_GOAL, "recognised": RECOGNITION_GOAL},
            **inference_rows(stds, args.draws),
            "membership": membership_rows((0.0, 1.0), args.steps),
        }
    section = {**he_section(), "served": he_served(args.served_requests)}
    report["homomorphicHead"] = {"date": date, "conditions": args.conditions, **section}
    HE_COST_FILE.write_text(json.dumps(he_cost(section, date), indent=2) + "\n")
    if args.only is None:
        report["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"[privacy] wrote {args.out} and {HE_COST_FILE.name} in "
        f"{time.monotonic() - started:.0f}s (make docs-numbers renders it)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
