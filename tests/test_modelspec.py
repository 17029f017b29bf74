"""parse_model_spec on the fields that say where a model and its data come from and
where its artefacts go, and the variant requests the preparation receives."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from _modelspec_samples import (
    BAD_ADDITIONAL_INPUTS,
    BAD_ARTIFACTS,
    BAD_DATA_FILES,
    BAD_SOURCES,
    DIGEST,
    GOOD_ADDITIONAL_INPUTS,
    GOOD_ARTIFACTS,
    GOOD_DATA_FILES,
    GOOD_SOURCES,
    UNPINNED_SOURCES,
)
from edgeai_operator.errors import SpecError
from edgeai_operator.modelspec import (
    InputSpec,
    ModelSpec,
    SourceRef,
    VariantRequest,
    VariantSpec,
    parse_model_spec,
)
from edgeai_operator.sources import ACCEPTED_FORMS

BASE: dict[str, Any] = {
    "source": {"zoo": "digits_cnn"},
    "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
}


def _spec(**fields: Any) -> dict[str, Any]:
    spec = copy.deepcopy(BASE)
    spec.update(fields)
    return spec


def _refused(spec: dict[str, Any]) -> SpecError:
    with pytest.raises(SpecError) as caught:
        parse_model_spec(spec)
    return caught.value


@pytest.mark.parametrize("source", GOOD_SOURCES, ids=lambda s: s.get("uri", s.get("zoo")))
def test_each_source_form_is_read_as_its_uri_and_digest(source: dict[str, Any]) -> None:
    parsed = parse_model_spec(_spec(source=source))
    uri = source.get("uri") or f"zoo://{source['zoo']}"
    assert parsed.source == SourceRef(uri, source.get("sha256"))


@pytest.mark.parametrize(("case", "source", "field"), BAD_SOURCES, ids=[c[0] for c in BAD_SOURCES])
def test_a_bad_source_is_refused_naming_the_field(
    case: str, source: dict[str, Any], field: str
) -> None:
    error = _refused(_spec(source=source))
    assert error.field == field, f"{case}: {error}"


def test_zoo_is_short_for_a_zoo_uri() -> None:
    short = parse_model_spec(_spec(source={"zoo": "resnet18"}))
    long = parse_model_spec(_spec(source={"uri": "zoo://resnet18"}))
    assert short == long
    assert short.zoo == "resnet18"


def test_zoo_names_the_zoo_model_only_for_zoo_sources() -> None:
    parsed = parse_model_spec(_spec(source={"uri": "pvc://models/net.onnx"}))
    assert parsed.zoo is None


def test_an_unknown_scheme_lists_every_accepted_form() -> None:
    error = _refused(_spec(source={"uri": "s3://bucket/net.onnx"}))
    assert (error.field, error.accepted) == ("spec.source.uri", ACCEPTED_FORMS)
    for form in ("zoo://", "https://", "http://", "pvc://", "configmap://", "oci://"):
        assert form in str(error)


def test_neither_zoo_nor_uri_says_both_are_offered() -> None:
    error = _refused(_spec(source={}))
    assert error.field == "spec.source"
    assert "neither zoo nor uri" in error.problem
    assert "zoo: NAME" in str(error)
    assert "pvc://CLAIM/PATH" in str(error)


@pytest.mark.parametrize("uri", UNPINNED_SOURCES)
def test_http_without_a_digest_is_refused_naming_the_digest(uri: str) -> None:
    error = _refused(_spec(source={"uri": uri}))
    assert error.field == "spec.source.sha256"
    assert "required" in error.problem
    for name in ("calibration", "data"):
        assert _refused(_spec(**{name: {"uri": uri}})).field == f"spec.{name}.sha256"


def test_a_digest_is_kept_as_written_lowercase_hex() -> None:
    parsed = parse_model_spec(_spec(source={"zoo": "resnet18", "sha256": DIGEST}))
    assert parsed.source.sha256 == DIGEST
    error = _refused(_spec(source={"zoo": "resnet18", "sha256": f"sha256:{DIGEST}"}))
    assert error.accepted == "64 lowercase hexadecimal digits"


def test_source_keys_outside_zoo_uri_and_sha256_are_refused() -> None:
    error = _refused(_spec(source={"zoo": "resnet18", "onnx": {"path": "/m.onnx"}}))
    assert error.field == "spec.source"
    assert "onnx" in str(error)


@pytest.mark.parametrize("uri", GOOD_ARTIFACTS)
def test_an_artefact_destination_is_read_without_trailing_slashes(uri: str) -> None:
    parsed = parse_model_spec(_spec(artifacts={"uri": uri}))
    assert parsed.artifacts_uri == uri.rstrip("/")


@pytest.mark.parametrize("uri", BAD_ARTIFACTS)
def test_a_bad_artefact_destination_is_refused_naming_the_field(uri: str) -> None:
    error = _refused(_spec(artifacts={"uri": uri}))
    assert error.field == "spec.artifacts.uri", str(error)
    assert "oci://REGISTRY" in str(error)
    assert "pvc://CLAIM" in str(error)


def test_artefacts_default_to_the_operators_destination() -> None:
    assert parse_model_spec(_spec()).artifacts_uri is None
    error = _refused(_spec(artifacts={}))
    assert error.field == "spec.artifacts.uri"


@pytest.mark.parametrize("name", ["calibration", "data"])
@pytest.mark.parametrize("value", GOOD_DATA_FILES, ids=lambda v: v["uri"])
def test_calibration_and_data_files_are_read(name: str, value: dict[str, Any]) -> None:
    parsed = parse_model_spec(_spec(**{name: value}))
    assert getattr(parsed, name) == SourceRef(value["uri"], value.get("sha256"))
    other = "data" if name == "calibration" else "calibration"
    assert getattr(parsed, other) is None


@pytest.mark.parametrize("name", ["calibration", "data"])
@pytest.mark.parametrize(
    ("case", "value", "leaf"), BAD_DATA_FILES, ids=[c[0] for c in BAD_DATA_FILES]
)
def test_a_bad_data_file_is_refused_naming_the_field(
    name: str, case: str, value: dict[str, Any], leaf: str
) -> None:
    error = _refused(_spec(**{name: value}))
    assert error.field == f"spec.{name}.{leaf}", f"{case}: {error}"


def test_a_zoo_data_file_lists_the_forms_a_data_file_takes() -> None:
    error = _refused(_spec(data={"uri": "zoo://digits_cnn"}))
    assert "not a data file" in error.problem
    assert error.accepted is not None
    assert "zoo://" not in error.accepted
    assert "pvc://CLAIM/PATH" in error.accepted


@pytest.mark.parametrize("sparsity", [0.01, 0.3, 0.5, 0.9, 0.99])
def test_any_sparsity_strictly_between_zero_and_one_is_read(sparsity: float) -> None:
    parsed = parse_model_spec(_spec(variants=[{"name": "p", "prune": {"sparsity": sparsity}}]))
    assert parsed.variants[1] == VariantSpec("p", "prune", sparsity=sparsity)


@pytest.mark.parametrize("sparsity", [0, 1, -0.5, 1.5, True, "0.5", None])
def test_a_sparsity_outside_zero_to_one_is_refused(sparsity: Any) -> None:
    error = _refused(_spec(variants=[{"name": "p", "prune": {"sparsity": sparsity}}]))
    assert error.field == "spec.variants[0].prune.sparsity", str(error)


def test_each_variant_asks_the_preparation_for_its_builder_under_its_own_name() -> None:
    parsed: ModelSpec = parse_model_spec(
        _spec(
            variants=[
                {"name": "fast", "quantize": {"mode": "dynamic"}},
                {"name": "calibrated", "quantize": {"mode": "static"}},
                {"name": "sparse", "prune": {"sparsity": 0.3}},
                {"name": "student", "distill": {}},
                {"name": "plain"},
            ]
        )
    )
    assert [v.request() for v in parsed.variants] == [
        VariantRequest("fp32", "fp32"),
        VariantRequest("fast", "int8-dynamic"),
        VariantRequest("calibrated", "int8-static"),
        VariantRequest("sparse", "pruned", 0.3),
        VariantRequest("student", "distilled"),
        VariantRequest("plain", "fp32"),
    ]


def test_the_preparation_uses_the_same_variant_request() -> None:
    from edgeai_operator import prepare

    assert prepare.VariantRequest is VariantRequest


@pytest.mark.parametrize("value", GOOD_ADDITIONAL_INPUTS, ids=lambda v: str(len(v)))
def test_additional_inputs_follow_spec_input_and_reach_the_preparation(
    value: list[dict[str, Any]],
) -> None:
    from edgeai_operator.preparation import prepare_args

    spec = parse_model_spec(_spec(additionalInputs=value))
    assert spec.inputs == (
        InputSpec("input", (1, 1, 8, 8), "FP32"),
        *(InputSpec(i["name"], tuple(i["shape"]), i["dtype"]) for i in value),
    )
    args = prepare_args(spec, model_name="m", artifacts_uri="pvc://a", result="ns/r")
    assert [a for a in args if a.startswith("--input=")] == [
        "--input=input=1,1,8,8:FP32",
        *(f"--input={i['name']}={','.join(map(str, i['shape']))}:{i['dtype']}" for i in value),
    ]


@pytest.mark.parametrize(
    ("case", "value", "field"), BAD_ADDITIONAL_INPUTS, ids=[c[0] for c in BAD_ADDITIONAL_INPUTS]
)
def test_a_bad_additional_input_is_refused_naming_the_field(
    case: str, value: list[dict[str, Any]], field: str
) -> None:
    error = _refused(_spec(additionalInputs=value))
    assert error.field.startswith(field), (case, str(error))
