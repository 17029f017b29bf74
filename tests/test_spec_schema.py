"""The DNNDeployment and DNNModel parsers held to their CRD schemas (crds/*.yaml).

Every property of each CRD's `spec` is walked recursively. For each one: every value
the schema accepts (each enum value, each bound) is accepted by the parser and
changes what it returns (a parser that ignores a field fails); an enum value outside
the schema's list and a value past a bound are refused with a SpecError naming the
field; a schema default is what the parser assumes when the field is absent; a
required field's absence is refused. Changing an enum, a default or a bound on one
side only fails here. Strings the CRD checks with CEL rules (URIs, digests) take their
accepted and refused values from _modelspec_samples, which test_crd_validation holds
the API server to.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from _modelspec_samples import (
    BAD_ARTIFACTS,
    BAD_DATA_FILES,
    BAD_SOURCES,
    DIGEST,
    GOOD_ARTIFACTS,
    GOOD_DATA_FILES,
)
from edgeai_operator.deployspec import parse_deployment
from edgeai_operator.errors import SpecError
from edgeai_operator.modelspec import ZOO_MODELS, parse_model_spec
from edgeai_worker.training.spec import parse_spec as parse_training_spec

CRDS = Path(__file__).resolve().parents[1] / "crds"
Path_ = tuple[str | int, ...]  # keys from spec down; 0 stands for an array's item


def _deployment(spec: dict[str, Any]) -> Any:
    return parse_deployment(
        {
            "apiVersion": "edgeai.dev/v1alpha1",
            "kind": "DNNDeployment",
            "metadata": {"name": "d"},
            "spec": spec,
        }
    )


PARSERS: dict[str, tuple[str, Callable[[dict[str, Any]], Any]]] = {
    "DNNDeployment": ("edgeai.dev_dnndeployments.yaml", _deployment),
    "DNNModel": ("edgeai.dev_dnnmodels.yaml", parse_model_spec),
}
# Required by the CRD, optional to the parser, and why.
REQUIRED_BY_CRD_ONLY = {
    # `edgeai plan` and `run-local` also take spec.model (a zoo model, no DNNModel)
    ("DNNDeployment", "spec.modelRef"),
    # `edgeai plan` plans without an SLO (the fastest placement)
    ("DNNDeployment", "spec.slo"),
    ("DNNDeployment", "spec.slo.latencyP95Ms"),
}
# Values that only make a field's extreme samples valid together with another field.
COMPANIONS: dict[str, dict[Path_, Any]] = {
    "spec.autoscaling.minReplicas": {("autoscaling", "maxReplicas"): 1000},
    # a shared backbone needs plain HTTP between stages
    "spec.sharing": {("security", "stageTLS"): "disabled"},
    "spec.privacy.noiseTraining": {("privacy", "featureNoiseStd"): 0.5},
    "spec.privacy.noiseAccuracyFloor": {("privacy", "noiseTraining"): True},
    # a head is trained from labelled data
    "spec.exits[0].train": {("data",): {"uri": "pvc://models/data.npz"}},
    # small models are measured on labelled data
    **{
        f"spec.smallModels[0].{leaf}": {("data",): {"uri": "pvc://models/data.npz"}}
        for leaf in ("uri", "sha256")
    },
}
# Fields that exclude another (a CEL rule): setting the first removes the second.
EXCLUDES: dict[str, Path_] = {"spec.source.uri": ("source", "zoo")}
# The smallest valid value of an object whose required fields a CEL rule states.
MINIMAL: dict[str, Any] = {
    "spec.source": {"zoo": "digits_cnn"},
    # a CEL rule: an exit's output is not the tensor it reads
    "spec.exits[0]": {"output": "exit_0", "after": "hidden"},
}
# Accepted values of strings checked by CEL rules (the walk's "a", "b" are not URIs).
SAMPLES: dict[str, list[Any]] = {
    "spec.source.uri": ["pvc://models/net.onnx", "configmap://nets/net.onnx"],
    "spec.artifacts.uri": GOOD_ARTIFACTS[:2],
    "spec.calibration.uri": [f["uri"] for f in GOOD_DATA_FILES[1:3]],
    "spec.data.uri": [f["uri"] for f in GOOD_DATA_FILES[1:3]],
    "spec.smallModels[0].uri": [f["uri"] for f in GOOD_DATA_FILES[1:3]],
    "spec.smallModels[0].sha256": [DIGEST, DIGEST[::-1]],
    **{f"spec.{name}.sha256": [DIGEST, DIGEST[::-1]] for name in ("source", "calibration", "data")},
    # another input than spec.input's (the walk's "a"): names are unique
    "spec.additionalInputs[0].name": ["state", "mask"],
    "spec.security.networkPolicy.entryFrom.cidrs": [["10.0.0.0/8"], ["192.168.0.0/16"]],
    "spec.base.modelRef.name": ["digits", "digits-trunk-2"],
    # other tensors than spec.input.name (the walk's "a") and than each other
    "spec.exits[0].output": ["exit_0", "exit_1"],
    "spec.exits[0].after": ["hidden", "features"],
}
# Values CEL rules refuse, beyond the schema's own bounds.
REFUSED: dict[str, list[Any]] = {
    "spec.artifacts.uri": BAD_ARTIFACTS,
    "spec.base.modelRef.name": ["Digits", "-digits", "digits_cnn", "d" * 41],
    **{
        f"spec.source.{leaf}": [s[leaf] for _, s, f in BAD_SOURCES if f == f"spec.source.{leaf}"]
        for leaf in ("uri", "sha256")
    },
    **{
        f"spec.{name}.{leaf}": [v[leaf] for _, v, named in BAD_DATA_FILES if named == leaf]
        for name in ("calibration", "data", "smallModels[0]")
        for leaf in ("uri", "sha256")
    },
}


def _spec_schema(kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / PARSERS[kind][0]).read_text())
    (version,) = crd["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def _leaves(schema: dict[str, Any], path: Path_ = ()) -> Iterator[tuple[Path_, dict[str, Any]]]:
    """Every property that holds a value: scalars, arrays of scalars, string maps and
    objects without properties; arrays of objects are walked through their item."""
    if schema.get("type") == "object" and "properties" in schema:
        for name, sub in schema["properties"].items():
            yield from _leaves(sub, (*path, name))
    elif schema.get("type") == "array" and schema["items"].get("type") == "object":
        yield from _leaves(schema["items"], (*path, 0))
    else:
        yield path, schema


def _required(schema: dict[str, Any], path: Path_ = ()) -> Iterator[Path_]:
    """Every required property, at any depth."""
    if schema.get("type") == "array":
        yield from _required(schema["items"], (*path, 0))
    for name, sub in (schema.get("properties") or {}).items():
        if name in schema.get("required", []):
            yield (*path, name)
        yield from _required(sub, (*path, name))


def _field(path: Path_) -> str:
    return "spec" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path)


def _bounds(schema: dict[str, Any]) -> tuple[float | None, float | None]:
    """The lowest and highest value the schema accepts (None: unbounded); an
    exclusive bound is moved inside by a step."""
    step = 1 if schema["type"] == "integer" else 0.25
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and schema.get("exclusiveMinimum"):
        low += step
    if high is not None and schema.get("exclusiveMaximum"):
        high -= step
    return low, high


def _samples(schema: dict[str, Any], field: str = "") -> list[Any]:
    """Distinct values the schema accepts."""
    if field in SAMPLES:
        return SAMPLES[field]
    if "enum" in schema:
        return list(schema["enum"])
    kind = schema.get("type")
    if kind == "boolean":
        return [False, True]
    if kind in ("integer", "number"):
        low, high = _bounds(schema)
        step = 1 if kind == "integer" else 0.5
        if low is None:
            low = step if high is None else high - step
        return [low, low + step if high is None else high]
    if kind == "string":
        return ["a", "b"]
    if kind == "array":
        return [[value] for value in _samples(schema["items"])]
    if kind == "object" and "additionalProperties" in schema:
        return [{}, {"app": "camera"}]
    # an object without properties: setting it is the value
    assert kind == "object", schema
    assert not schema.get("properties"), schema
    return [{}]


def _minimal(schema: dict[str, Any], path: Path_ = ()) -> Any:
    """The smallest valid value: an object with only its required properties."""
    if _field(path) in MINIMAL:
        return copy.deepcopy(MINIMAL[_field(path)])
    if schema.get("type") == "object" and schema.get("properties"):
        return {
            name: _minimal(schema["properties"][name], (*path, name))
            for name in schema.get("required", [])
        }
    if schema.get("type") == "array" and schema["items"].get("type") == "object":
        return []
    if schema.get("type") == "array":
        return [_samples(schema["items"])[0]] * schema.get("minItems", 1)
    return _samples(schema, _field(path))[0]


def _parent(kind: str, spec: dict[str, Any], path: Path_) -> dict[str, Any]:
    """The mapping that holds `path`'s last key, created (with its required
    properties) along the way."""
    schema = _spec_schema(kind)
    node: Any = spec
    for depth, key in enumerate(path[:-1], start=1):
        if isinstance(key, int):
            schema = schema["items"]
            if not node:
                node.append(_minimal(schema, path[:depth]))
            node = node[0]
        else:
            schema = schema["properties"][key]
            if key not in node:
                node[key] = [] if schema.get("type") == "array" else _minimal(schema, path[:depth])
            node = node[key]
    assert isinstance(node, dict)
    return node


def _doc(kind: str, path: Path_, value: Any = None, *, absent: bool = False) -> dict[str, Any]:
    """The minimal valid spec with `path` set to `value` (or left out)."""
    spec: dict[str, Any] = copy.deepcopy(_minimal(_spec_schema(kind)))
    parent = _parent(kind, spec, path)
    key = path[-1]
    assert isinstance(key, str)
    parent.pop(key, None)
    if not absent and _field(path) in EXCLUDES:
        _parent(kind, spec, EXCLUDES[_field(path)]).pop(str(EXCLUDES[_field(path)][-1]))
    if not absent:
        parent[key] = value
    for other, extra in COMPANIONS.get(_field(path), {}).items():
        _parent(kind, spec, other)[str(other[-1])] = extra
    return spec


def _parse(kind: str, spec: dict[str, Any]) -> Any:
    return PARSERS[kind][1](spec)


def _refused(kind: str, spec: dict[str, Any], field: str) -> SpecError:
    with pytest.raises(SpecError) as caught:
        _parse(kind, spec)
    named = caught.value.field
    assert named == field or named.startswith(f"{field}["), (
        f"refused, but naming {named!r} instead of {field!r}: {caught.value}"
    )
    return caught.value


def _cases() -> Iterator[Any]:
    for kind in PARSERS:
        for path, schema in _leaves(_spec_schema(kind)):
            yield pytest.param(kind, path, schema, id=f"{kind}:{_field(path)}")


CASES = list(_cases())


@pytest.mark.parametrize(("kind", "path", "schema"), CASES)
def test_every_value_the_schema_accepts_is_read(
    kind: str, path: Path_, schema: dict[str, Any]
) -> None:
    parsed = [_parse(kind, _doc(kind, path, value)) for value in _samples(schema, _field(path))]
    for i, first in enumerate(parsed):
        for second in parsed[i + 1 :]:
            assert first != second, f"{_field(path)}: two values parse the same (ignored?)"
    required = path in set(_required(_spec_schema(kind)))
    if len(parsed) == 1 and not required and "default" not in schema:
        assert parsed[0] != _parse(kind, _doc(kind, path, absent=True)), (
            f"{_field(path)}: setting it parses the same as leaving it out (ignored?)"
        )


@pytest.mark.parametrize(("kind", "path", "schema"), [c for c in CASES if "default" in c.values[2]])
def test_a_schema_default_is_the_parsers_default(
    kind: str, path: Path_, schema: dict[str, Any]
) -> None:
    absent = _parse(kind, _doc(kind, path, absent=True))
    assert absent == _parse(kind, _doc(kind, path, schema["default"])), (
        f"{_field(path)}: the parser's default is not the schema's {schema['default']!r}"
    )


def _outside(schema: dict[str, Any], field: str = "") -> Iterator[Any]:
    """Values the schema refuses: outside the enum, past a bound, breaking a pattern,
    a length or a CEL rule."""
    yield from REFUSED.get(field, [])
    kind = schema.get("type")
    if kind == "array":
        yield from ([value] for value in _outside(schema["items"]))
        if "minItems" in schema:
            yield [_samples(schema["items"])[0]] * (schema["minItems"] - 1)
        if "maxItems" in schema:
            yield [_samples(schema["items"])[0]] * (schema["maxItems"] + 1)
        return
    if "enum" in schema:
        yield 0.25 if kind == "number" else "no-such-value"
    if kind in ("integer", "number"):
        # one step past the accepted range (the bound itself, where it is exclusive)
        step = 1 if kind == "integer" else 0.25
        low, high = _bounds(schema)
        if low is not None:
            yield low - step
        if high is not None:
            yield high + step
    if kind == "string":
        if "minLength" in schema:
            yield "a" * (schema["minLength"] - 1)
        if "maxLength" in schema:
            yield "a" * (schema["maxLength"] + 1)
        if "pattern" in schema:
            yield "Not_Valid!"


@pytest.mark.parametrize(
    ("kind", "path", "schema"),
    [c for c in CASES if any(True for _ in _outside(c.values[2], _field(c.values[1])))],
)
def test_what_the_schema_refuses_the_parser_refuses_naming_the_field(
    kind: str, path: Path_, schema: dict[str, Any]
) -> None:
    for value in _outside(schema, _field(path)):
        _refused(kind, _doc(kind, path, value), _field(path))


@pytest.mark.parametrize(
    ("kind", "path"),
    [
        pytest.param(kind, path, id=f"{kind}:{_field(path)}")
        for kind in PARSERS
        for path in _required(_spec_schema(kind))
        if (kind, _field(path)) not in REQUIRED_BY_CRD_ONLY
    ],
)
def test_a_required_field_left_out_is_refused(kind: str, path: Path_) -> None:
    _refused(kind, _doc(kind, path, absent=True), _field(path))


def test_the_walk_covers_the_fields_this_test_is_about() -> None:
    """Guards the walker itself: it reaches nested, array-item and map fields."""
    fields = {(kind, _field(path)) for kind, path, _ in (c.values for c in CASES)}
    for expected in [
        ("DNNDeployment", "spec.placement.partitioning"),
        ("DNNDeployment", "spec.placement.adaptiveSplit"),
        ("DNNDeployment", "spec.devices.nodeSelector"),
        ("DNNDeployment", "spec.autoscaling.scaleDownDelaySeconds"),
        ("DNNDeployment", "spec.preprocessing.skipUnchangedThreshold"),
        ("DNNDeployment", "spec.priority"),
        ("DNNDeployment", "spec.sharing"),
        ("DNNModel", "spec.variants[0].prune.sparsity"),
        ("DNNModel", "spec.variants[0].distill"),
        ("DNNModel", "spec.input.shape"),
        ("DNNModel", "spec.profile.timeoutSeconds"),
        ("DNNModel", "spec.source.uri"),
        ("DNNModel", "spec.source.sha256"),
        ("DNNModel", "spec.artifacts.uri"),
        ("DNNModel", "spec.calibration.uri"),
        ("DNNModel", "spec.data.sha256"),
        ("DNNModel", "spec.base.sharedUpTo"),
        ("DNNModel", "spec.base.modelRef.name"),
        ("DNNModel", "spec.exits[0].after"),
        ("DNNModel", "spec.exits[0].train"),
        ("DNNModel", "spec.smallModels[0].uri"),
    ]:
        assert expected in fields
    assert ("DNNModel", "spec.source.onnx") not in fields  # not built: not offered


def test_every_string_a_cel_rule_checks_has_samples_both_ways() -> None:
    """A URI or digest field added to the CRD without samples here would be walked
    with "a" and "b", which its CEL rules refuse."""
    for path, schema in _leaves(_spec_schema("DNNModel")):
        if schema.get("type") == "string" and "x-kubernetes-validations" in schema:
            assert len(SAMPLES.get(_field(path), [])) >= 2, _field(path)
            assert REFUSED.get(_field(path)), _field(path)


def test_the_zoo_the_crd_offers_is_the_workers_zoo() -> None:
    from edgeai_worker import zoo

    assert ZOO_MODELS == zoo.ZOO_NAMES


def test_the_examples_parse() -> None:
    kinds = []
    for path in sorted((CRDS.parent / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            kinds.append(doc["kind"])
            if doc["kind"] == "DNNDeployment":
                parse_deployment(doc)
            elif doc["kind"] == "DNNTrainingJob":
                parse_training_spec(doc["spec"])
            else:
                parse_model_spec(doc["spec"])
    assert sorted(set(kinds)) == ["DNNDeployment", "DNNModel", "DNNTrainingJob"]
