"""Private inference, measured on held-out digits (needs torch).

    python bench/privacy/run.py [--stds 0,0.1,0.3,0.5,1,2] [--draws 5]

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
measured on the other half of the members and of the non-members. Everything is
written to docs/results/privacy.json and rendered into docs/privacy.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stds", default="0,0.1,0.3,0.5,1,2")
    parser.add_argument("--draws", type=int, default=5, help="noise draws per accuracy")
    parser.add_argument("--steps", type=int, default=1500, help="DP-SGD steps per model")
    render_numbers.add_result_arguments(parser, "privacy.json")
    args = parser.parse_args(argv)
    stds = [float(s) for s in args.stds.split(",")]
    started = time.monotonic()
    report: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "conditions": args.conditions,
        "draws": args.draws,
        "chance": CHANCE,
        "goals": {"accuracyRatio": ACCURACY_GOAL, "recognised": RECOGNITION_GOAL},
        **inference_rows(stds, args.draws),
        "membership": membership_rows((0.0, 1.0), args.steps),
    }
    report["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[privacy] wrote {args.out} in {report['seconds']:.0f}s (make docs-numbers renders it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
