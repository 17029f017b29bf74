"""Invalid manifests are rejected by the real API server (schema + CEL rules), each
with a message naming the field; valid samples are accepted."""

from __future__ import annotations

import copy
import subprocess
from typing import Any

import pytest
import yaml

from _modelspec_samples import (
    BAD_ADDITIONAL_INPUTS,
    BAD_ARTIFACTS,
    BAD_DATA_FILES,
    BAD_SOURCES,
    GOOD_ADDITIONAL_INPUTS,
    GOOD_ARTIFACTS,
    GOOD_DATA_FILES,
    GOOD_SOURCES,
    UNPINNED_SOURCES,
)
from _training_samples import BAD as BAD_TRAINING
from _training_samples import GOOD as GOOD_TRAINING
from edgeai_operator.localcluster import REPO_ROOT, LocalCluster

pytestmark = [pytest.mark.cluster]

MODEL: dict[str, Any] = {
    "apiVersion": "edgeai.dev/v1alpha1",
    "kind": "DNNModel",
    "metadata": {"name": "invalid-model", "namespace": "default"},
    "spec": {
        "source": {"zoo": "digits_cnn"},
        "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
        "variants": [{"name": "int8", "quantize": {"mode": "dynamic"}}],
    },
}
DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "edgeai.dev/v1alpha1",
    "kind": "DNNDeployment",
    "metadata": {"name": "invalid-deployment", "namespace": "default"},
    "spec": {
        "modelRef": {"name": "digits"},
        "slo": {"latencyP95Ms": 50, "minAccuracy": 0.9},
        "placement": {"tiers": ["device", "edge", "cloud"]},
        "autoscaling": {"minReplicas": 1, "maxReplicas": 4},
    },
}
JOB: dict[str, Any] = {
    "apiVersion": "edgeai.dev/v1alpha1",
    "kind": "DNNTrainingJob",
    "metadata": {"name": "invalid-job", "namespace": "default"},
    "spec": {
        "model": {"zoo": "digits_cnn"},
        "algorithm": {"mode": "fedavg", "localSteps": 10},
        "compression": {"kind": "topk", "ratio": 0.01},
    },
}


def _with(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    if value is _DELETE:
        del node[leaf]
    elif isinstance(node, list):
        node[int(leaf)] = value
    else:
        node[leaf] = value
    return doc


_DELETE = object()

CASES = [
    ("model: no source", _with(MODEL, "spec.source", _DELETE), "spec.source: Required value"),
    (
        "model: base names itself",
        _with(MODEL, "spec.base", {"modelRef": {"name": "invalid-model"}, "sharedUpTo": "t"}),
        "spec.base.modelRef.name names this DNNModel itself",
    ),
    (
        "model: base name no DNNModel name",
        _with(MODEL, "spec.base", {"modelRef": {"name": "Digits"}, "sharedUpTo": "t"}),
        "spec.base.modelRef.name must be a DNNModel name",
    ),
    (
        "model: base without its cut",
        _with(MODEL, "spec.base", {"modelRef": {"name": "digits"}}),
        "spec.base.sharedUpTo: Required value",
    ),
    (
        "model: exit without the tensor it reads",
        _with(MODEL, "spec.exits", [{"output": "exit_0"}]),
        "spec.exits[0].after: Required value",
    ),
    (
        "model: exit reads its own output",
        _with(MODEL, "spec.exits", [{"output": "exit_0", "after": "exit_0"}]),
        "spec.exits[]: output and after name the same tensor",
    ),
    (
        "model: exit names the input",
        _with(MODEL, "spec.exits", [{"output": "exit_0", "after": "input"}]),
        "spec.exits[]: output and after name tensors the model computes",
    ),
    (
        "model: exit trained without data",
        _with(MODEL, "spec.exits", [{"output": "exit_0", "after": "hidden", "train": True}]),
        "spec.data is required when spec.exits[].train is true",
    ),
    (
        "model: small models without data",
        _with(MODEL, "spec.smallModels", [{"uri": "configmap://mlp-files/small.onnx"}]),
        "spec.data is required with spec.smallModels",
    ),
    (
        "model: three small models",
        _with(MODEL, "spec.smallModels", [{"uri": "configmap://m/s.onnx"}] * 3),
        "spec.smallModels: Too many",
    ),
    (
        "model: exit output twice",
        _with(
            MODEL,
            "spec.exits",
            [{"output": "exit_0", "after": "a"}, {"output": "exit_0", "after": "b"}],
        ),
        "spec.exits[1]: Duplicate value",
    ),
    (
        "model: neither zoo nor uri",
        _with(MODEL, "spec.source", {}),
        "spec.source sets exactly one of zoo or uri",
    ),
    (
        "model: onnx source (not built)",
        _with(MODEL, "spec.source.onnx", {"path": "/m.onnx"}),
        'unknown field "spec.source.onnx"',
    ),
    ("model: unknown zoo", _with(MODEL, "spec.source.zoo", "yolo"), "spec.source.zoo"),
    *[
        (f"model: source {case}", _with(MODEL, "spec.source", source), field)
        for case, source, field in BAD_SOURCES
    ],
    *[
        (
            f"model: source {uri} without sha256",
            _with(MODEL, "spec.source", {"uri": uri}),
            "spec.source.sha256 is required",
        )
        for uri in UNPINNED_SOURCES
    ],
    *[
        (
            f"model: artifacts {uri}",
            _with(MODEL, "spec.artifacts", {"uri": uri}),
            "spec.artifacts.uri must be oci://REGISTRY[:PORT]/REPOSITORY",
        )
        for uri in BAD_ARTIFACTS
    ],
    *[
        (f"model: {name} {case}", _with(MODEL, f"spec.{name}", value), f"spec.{name}.{leaf}")
        for name in ("calibration", "data")
        for case, value, leaf in BAD_DATA_FILES
    ],
    *[
        (
            f"model: {name} {uri} without sha256",
            _with(MODEL, f"spec.{name}", {"uri": uri}),
            f"spec.{name}.sha256 is required",
        )
        for name in ("calibration", "data")
        for uri in UNPINNED_SOURCES
    ],
    ("model: no input", _with(MODEL, "spec.input", _DELETE), "spec.input: Required value"),
    *[
        (f"model: additionalInputs {case}", _with(MODEL, "spec.additionalInputs", value), field)
        for case, value, field in BAD_ADDITIONAL_INPUTS
    ],
    ("model: empty shape", _with(MODEL, "spec.input.shape", []), "spec.input.shape"),
    (
        "model: zero dimension",
        _with(MODEL, "spec.input.shape", [1, 0, 8, 8]),
        "spec.input.shape[1]",
    ),
    ("model: dtype", _with(MODEL, "spec.input.dtype", "FLOAT"), "spec.input.dtype"),
    ("model: variant name", _with(MODEL, "spec.variants.0.name", "INT8!"), "spec.variants[0].name"),
    (
        "model: two compressions",
        _with(MODEL, "spec.variants.0.prune", {"sparsity": 0.5}),
        "a variant sets at most one of quantize, prune or distill",
    ),
    (
        "model: quantize mode",
        _with(MODEL, "spec.variants.0.quantize.mode", "fast"),
        "spec.variants[0].quantize.mode",
    ),
    (
        "model: sparsity",
        _with(MODEL, "spec.variants.0", {"name": "p", "prune": {"sparsity": 1.5}}),
        "spec.variants[0].prune.sparsity",
    ),
    (
        "model: sparsity 0",
        _with(MODEL, "spec.variants.0", {"name": "p", "prune": {"sparsity": 0}}),
        "spec.variants[0].prune.sparsity",
    ),
    (
        "model: sparsity 1",
        _with(MODEL, "spec.variants.0", {"name": "p", "prune": {"sparsity": 1}}),
        "spec.variants[0].prune.sparsity",
    ),
    (
        "model: calibration (not a parameter)",
        _with(MODEL, "spec.variants.0.quantize.calibration", "digits"),
        'unknown field "spec.variants[0].quantize.calibration"',
    ),
    (
        "model: distill width (not a parameter)",
        _with(MODEL, "spec.variants.0", {"name": "s", "distill": {"widthMultiplier": 0.5}}),
        'unknown field "spec.variants[0].distill.widthMultiplier"',
    ),
    ("model: repeats", _with(MODEL, "spec.profile", {"repeats": 0}), "spec.profile.repeats"),
    (
        "model: unknown field",
        _with(MODEL, "spec.input.layout", "NCHW"),
        'unknown field "spec.input.layout"',
    ),
    ("deployment: no slo", _with(DEPLOYMENT, "spec.slo", _DELETE), "spec.slo: Required value"),
    (
        "deployment: zero latency",
        _with(DEPLOYMENT, "spec.slo.latencyP95Ms", 0),
        "spec.slo.latencyP95Ms",
    ),
    (
        "deployment: accuracy",
        _with(DEPLOYMENT, "spec.slo.minAccuracy", 1.5),
        "spec.slo.minAccuracy",
    ),
    ("deployment: objective", _with(DEPLOYMENT, "spec.objective", "speed"), "spec.objective"),
    (
        "deployment: tier",
        _with(DEPLOYMENT, "spec.placement.tiers", ["device", "fog"]),
        "spec.placement.tiers[1]",
    ),
    (
        "deployment: replicas",
        _with(DEPLOYMENT, "spec.autoscaling.minReplicas", 5),
        "spec.autoscaling.minReplicas must not exceed maxReplicas",
    ),
    (
        "deployment: privacy without device",
        _with(
            _with(DEPLOYMENT, "spec.privacy", {"rawInputStaysOnDevice": True}),
            "spec.placement.tiers",
            ["edge", "cloud"],
        ),
        "spec.privacy.rawInputStaysOnDevice needs 'device' in spec.placement.tiers",
    ),
    (
        "deployment: fallback",
        _with(DEPLOYMENT, "spec.placement.fallback", "edge"),
        "spec.placement.fallback",
    ),
    (
        "deployment: fallback wait",
        _with(DEPLOYMENT, "spec.placement.fallbackAfterMs", 5),
        "spec.placement.fallbackAfterMs",
    ),
    ("deployment: priority", _with(DEPLOYMENT, "spec.priority", -1), "spec.priority"),
    (
        "deployment: offload cascade without device",
        _with(
            _with(DEPLOYMENT, "spec.offload", {"cascade": {"targetAccuracy": 0.97}}),
            "spec.placement.tiers",
            ["edge", "cloud"],
        ),
        "spec.offload.cascade needs 'device' in spec.placement.tiers",
    ),
    (
        "deployment: offload reuse on the device only",
        _with(
            _with(DEPLOYMENT, "spec.offload", {"reuse": {"maxEntries": 64}}),
            "spec.placement.tiers",
            ["device"],
        ),
        "spec.offload.reuse needs an edge or cloud tier",
    ),
    (
        "deployment: offload cascade rule",
        _with(DEPLOYMENT, "spec.offload", {"cascade": {"rule": "vote", "targetAccuracy": 0.9}}),
        "spec.offload.cascade.rule",
    ),
    (
        "deployment: offload cascade target",
        _with(DEPLOYMENT, "spec.offload", {"cascade": {"rule": "entropy"}}),
        "spec.offload.cascade.targetAccuracy",
    ),
    ("deployment: offload empty", _with(DEPLOYMENT, "spec.offload", {}), "spec.offload"),
    (
        "deployment: offload exits rule",
        _with(
            DEPLOYMENT, "spec.offload", {"exits": {"rule": "disagreement", "targetAccuracy": 0.9}}
        ),
        "spec.offload.exits.rule",
    ),
    (
        "deployment: offload exits target",
        _with(DEPLOYMENT, "spec.offload", {"exits": {"rule": "entropy"}}),
        "spec.offload.exits.targetAccuracy",
    ),
    (
        "deployment: offload exits with the adaptive split",
        _with(
            _with(DEPLOYMENT, "spec.offload", {"exits": {"targetAccuracy": 0.97}}),
            "spec.placement.adaptiveSplit",
            True,
        ),
        "spec.offload.exits needs spec.placement.adaptiveSplit: false",
    ),
    (
        "deployment: offload exits and cascade rules differ",
        _with(
            DEPLOYMENT,
            "spec.offload",
            {
                "exits": {"rule": "entropy", "targetAccuracy": 0.97},
                "cascade": {"targetAccuracy": 0.97},
            },
        ),
        "spec.offload.exits.rule must equal spec.offload.cascade.rule",
    ),
    (
        "deployment: offload reuse entries",
        _with(DEPLOYMENT, "spec.offload", {"reuse": {"maxEntries": 0}}),
        "spec.offload.reuse.maxEntries",
    ),
    (
        "deployment: partitioning",
        _with(DEPLOYMENT, "spec.placement.partitioning", "binary"),
        "spec.placement.partitioning",
    ),
    (
        "deployment: skip threshold of 1",
        _with(DEPLOYMENT, "spec.preprocessing", {"skipUnchangedThreshold": 1}),
        "spec.preprocessing.skipUnchangedThreshold",
    ),
    (
        "deployment: noise",
        _with(DEPLOYMENT, "spec.privacy", {"featureNoiseStd": -0.1}),
        "spec.privacy.featureNoiseStd",
    ),
    (
        "deployment: noise training without noise",
        _with(DEPLOYMENT, "spec.privacy", {"noiseTraining": True, "featureNoiseStd": 0}),
        "spec.privacy.noiseTraining needs spec.privacy.featureNoiseStd above 0",
    ),
    (
        "deployment: a noise floor with a noise std",
        _with(
            DEPLOYMENT,
            "spec.privacy",
            {"noiseTraining": True, "featureNoiseStd": 0.5, "noiseAccuracyFloor": 0.9},
        ),
        "spec.privacy.noiseAccuracyFloor needs noiseTraining: true and no featureNoiseStd",
    ),
    (
        "deployment: homomorphic head with an adaptive split",
        _with(
            _with(DEPLOYMENT, "spec.privacy", {"homomorphicHead": {"enabled": True}}),
            "spec.placement.adaptiveSplit",
            True,
        ),
        "spec.privacy.homomorphicHead needs 'device' and a tier above it",
    ),
    (
        "deployment: homomorphic head without a tier above the device",
        _with(
            _with(DEPLOYMENT, "spec.privacy", {"homomorphicHead": {"enabled": True}}),
            "spec.placement.tiers",
            ["device"],
        ),
        "spec.privacy.homomorphicHead needs 'device' and a tier above it",
    ),
    (
        "deployment: homomorphic head with noise training",
        _with(
            DEPLOYMENT,
            "spec.privacy",
            {"homomorphicHead": {"enabled": True}, "noiseTraining": True, "featureNoiseStd": 1},
        ),
        "spec.privacy.homomorphicHead and spec.privacy.noiseTraining",
    ),
    (
        "deployment: homomorphic head with a misspelt field",
        _with(DEPLOYMENT, "spec.privacy", {"homomorphicHead": {"enable": True}}),
        'unknown field "spec.privacy.homomorphicHead.enable"',
    ),
    (
        "deployment: no modelRef",
        _with(DEPLOYMENT, "spec.modelRef", _DELETE),
        "spec.modelRef: Required value",
    ),
    (
        "deployment: unknown field",
        _with(DEPLOYMENT, "spec.slo.latencyMs", 10),
        'unknown field "spec.slo.latencyMs"',
    ),
    (
        "deployment: shared backbone with stage TLS required",
        _with(
            _with(DEPLOYMENT, "spec.sharing", "backbone"), "spec.security", {"stageTLS": "required"}
        ),
        "spec.security.stageTLS: required is not available with spec.sharing: backbone",
    ),
    (
        "deployment: stage TLS value",
        _with(DEPLOYMENT, "spec.security", {"stageTLS": "optional"}),
        "spec.security.stageTLS",
    ),
    (
        "deployment: entry auth without its Secret",
        _with(DEPLOYMENT, "spec.security", {"entryAuth": {}}),
        'spec.security.entryAuth: Invalid value: "object": needs bearerTokenSecret, '
        "clientCASecret or both",
    ),
    (
        "deployment: client CA without stage TLS",
        _with(
            DEPLOYMENT,
            "spec.security",
            {"stageTLS": "disabled", "entryAuth": {"clientCASecret": {"name": "camera-ca"}}},
        ),
        "spec.security.entryAuth.clientCASecret needs stageTLS: required",
    ),
    (
        "deployment: client CA without its name",
        _with(DEPLOYMENT, "spec.security", {"entryAuth": {"clientCASecret": {"key": "ca.crt"}}}),
        "spec.security.entryAuth.clientCASecret.name: Required value",
    ),
    (
        "deployment: name too long",
        _with(DEPLOYMENT, "metadata.name", "d" * 41),
        "metadata.name must be at most 40 characters",
    ),
    (
        "model: name too long",
        _with(MODEL, "metadata.name", "m" * 41),
        "metadata.name must be at most 40 characters",
    ),
    ("job: mode", _with(JOB, "spec.algorithm.mode", "sgd"), "spec.algorithm.mode"),
    ("job: ratio", _with(JOB, "spec.compression.ratio", 2), "spec.compression.ratio"),
    *(
        (f"job: {case}", _with(JOB, "spec", spec), f"spec.{field}")
        for case, spec, field in BAD_TRAINING
    ),
    (
        "job: name too long",
        _with(JOB, "metadata.name", "j" * 41),
        "metadata.name must be at most 40 characters",
    ),
]


@pytest.fixture(scope="module")
def crds(cluster: LocalCluster) -> LocalCluster:
    for crd in sorted((REPO_ROOT / "crds").glob("*.yaml")):
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crd))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=30s", "crd", "--all")
    return cluster


def _apply(cluster: LocalCluster, doc: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            cluster.binary("kubectl"),
            "--kubeconfig",
            str(cluster.kubeconfig),
            "apply",
            "--dry-run=server",
            "-f",
            "-",
        ],
        input=yaml.safe_dump(doc),
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.parametrize(("case", "doc", "field"), CASES, ids=[c[0] for c in CASES])
def test_invalid_manifest_rejected_naming_the_field(
    crds: LocalCluster, case: str, doc: dict[str, Any], field: str
) -> None:
    result = _apply(crds, doc)
    assert result.returncode != 0, f"{case}: accepted\n{result.stdout}"
    assert field in result.stderr, result.stderr


SECURE = _with(
    DEPLOYMENT,
    "spec.security",
    {
        "stageTLS": "required",
        "entryAuth": {
            "bearerTokenSecret": {"name": "camera-clients", "key": "token"},
            "clientCASecret": {"name": "camera-ca", "key": "ca.crt"},
        },
        "networkPolicy": {"entryFrom": {"namespaces": ["apps"], "cidrs": ["10.20.0.0/16"]}},
    },
)
GRPC_PLAIN = _with(
    _with(DEPLOYMENT, "spec.placement.transport", "grpc"), "spec.security", {"stageTLS": "disabled"}
)
HOMOMORPHIC = _with(DEPLOYMENT, "spec.privacy", {"homomorphicHead": {"enabled": True}})
# gRPC between stages over mutual TLS (stageTLS: required is the default)
GRPC_SECURE = _with(DEPLOYMENT, "spec.placement.transport", "grpc")
OFFLOADING = _with(
    DEPLOYMENT,
    "spec.offload",
    {
        "cascade": {"rule": "disagreement", "targetAccuracy": 0.97},
        "reuse": {"maxEntries": 256, "maxAccuracyLoss": 0.01},
    },
)
EXITS = _with(
    DEPLOYMENT,
    "spec.offload",
    {
        "exits": {"rule": "entropy", "targetAccuracy": 0.97},
        "cascade": {"rule": "entropy", "targetAccuracy": 0.97},
    },
)


TRUNK = _with(MODEL, "spec.base", {"modelRef": {"name": "digits"}, "sharedUpTo": "features"})
DECLARED_EXITS = _with(
    _with(MODEL, "spec.exits", [{"output": "exit_0", "after": "hidden"}]),
    "spec.data",
    {"uri": "configmap://mlp-files/data.npz"},
)
TRAINED_EXITS = _with(
    _with(MODEL, "spec.exits", [{"output": "exit_0", "after": "hidden", "train": True}]),
    "spec.data",
    {"uri": "configmap://mlp-files/data.npz"},
)


@pytest.mark.parametrize(
    "doc",
    [
        MODEL,
        DEPLOYMENT,
        JOB,
        SECURE,
        GRPC_PLAIN,
        GRPC_SECURE,
        OFFLOADING,
        HOMOMORPHIC,
        EXITS,
        TRUNK,
        DECLARED_EXITS,
        TRAINED_EXITS,
    ],
    ids=[
        "model",
        "deployment",
        "job",
        "deployment-security",
        "deployment-grpc-plain",
        "deployment-grpc-mtls",
        "deployment-offload",
        "deployment-homomorphic-head",
        "deployment-exits",
        "model-base",
        "model-exits",
        "model-trained-exits",
    ],
)
def test_valid_base_manifests_accepted(crds: LocalCluster, doc: dict[str, Any]) -> None:
    result = _apply(crds, doc)
    assert result.returncode == 0, result.stderr


def test_a_training_job_with_every_field_is_accepted(crds: LocalCluster) -> None:
    result = _apply(crds, _with(JOB, "spec", GOOD_TRAINING))
    assert result.returncode == 0, result.stderr


def test_every_variant_kind_that_is_built_is_accepted(crds: LocalCluster) -> None:
    variants = [
        {"name": "int8", "quantize": {"mode": "dynamic"}},
        {"name": "int8-static", "quantize": {"mode": "static"}},
        {"name": "pruned-50", "prune": {"sparsity": 0.5}},
        {"name": "pruned-30", "prune": {"sparsity": 0.3}},
        {"name": "small", "distill": {}},
    ]
    result = _apply(crds, _with(MODEL, "spec.variants", variants))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "fields",
    [
        *({"source": source} for source in GOOD_SOURCES),
        *({"artifacts": {"uri": uri}} for uri in GOOD_ARTIFACTS),
        *({name: value} for name in ("calibration", "data") for value in GOOD_DATA_FILES),
        *({"additionalInputs": value} for value in GOOD_ADDITIONAL_INPUTS),
    ],
    ids=lambda fields: str(fields),
)
def test_every_source_artefact_and_data_form_is_accepted(
    crds: LocalCluster, fields: dict[str, Any]
) -> None:
    doc = copy.deepcopy(MODEL)
    doc["spec"].update(fields)
    result = _apply(crds, doc)
    assert result.returncode == 0, result.stderr


def test_the_source_column_shows_the_uri_or_the_zoo_name(crds: LocalCluster) -> None:
    namespace = "source-column"
    crds.kubectl("create", "namespace", namespace)
    try:
        for name, source in [
            ("by-zoo", {"zoo": "resnet18"}),
            ("by-uri", {"uri": "pvc://models/net.onnx"}),
        ]:
            doc = _with(_with(MODEL, "metadata.name", name), "metadata.namespace", namespace)
            crds.kubectl(
                "apply", "-f", "-", input_text=yaml.safe_dump(_with(doc, "spec.source", source))
            )
        header, *rows = crds.kubectl("get", "dnnmodels", "-n", namespace).splitlines()
        assert header.split()[:2] == ["NAME", "SOURCE"]
        assert sorted(row.split()[:2] for row in rows) == [
            ["by-uri", "pvc://models/net.onnx"],
            ["by-zoo", "resnet18"],
        ]
    finally:
        crds.kubectl("delete", "namespace", namespace, "--wait=false")


def test_examples_are_valid(crds: LocalCluster) -> None:
    for path in sorted((REPO_ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            result = _apply(crds, doc)
            assert result.returncode == 0, f"{path.name}: {result.stderr}"
