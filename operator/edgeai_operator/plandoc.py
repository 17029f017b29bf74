"""The plan document: where each part of a model runs, as one typed value.

A `PlanDocument` is what crosses process boundaries: `edgeai plan` prints and saves
it, the operator keeps one per zone and writes it to the plan ConfigMap, stage pods
(`edgeai run-stage`) and `edgeai run-local` read it back. `to_dict()` gives the YAML
form (camelCase keys, `kind: Plan`, `version`); `from_dict()` reads that form back and
refuses a document it cannot honour with a `SpecError` naming the field, e.g.
`plan.stages[1].inputs`. Hand-written plans (run-local) may leave out everything but
`model` and `stages`; a document without `version` is read as version 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from edgeai_operator import TIERS
from edgeai_operator.errors import SpecError

PLAN_VERSION = 1
PLAN_KIND = "Plan"
_SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

_T = TypeVar("_T")


@dataclass(frozen=True)
class TensorSpec:
    """A model input: its name, shape and OIP v2 datatype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ModelIdentity:
    """What a stage needs to load exactly the model that was planned: a zoo model, a
    file beside the plan (run-local), or a prepared artefact (`uri`, fetched by the
    stage pod's init container and checked against `digest`)."""

    name: str  # the served model name (the zoo name, or the file's stem)
    zoo: str | None
    path: str | None  # an ONNX file, relative to the plan file (run-local)
    trained: bool
    variant: str | None
    input: TensorSpec
    digest: str | None = None  # sha256:<hex> of the artefact
    # how the variant's file is built (edgeai_worker.variants: int8-dynamic, pruned-50,
    # ...); the variant's name is the user's (spec.variants[].name)
    build: str | None = None
    uri: str | None = None  # the prepared artefact (oci://, pvc://, ...); needs digest

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.name != (self.zoo or _stem(self.path)):
            out["name"] = self.name
        if self.zoo is not None:
            out["zoo"] = self.zoo
        if self.path is not None:
            out["path"] = self.path
        if self.uri is not None:
            out["uri"] = self.uri
        if self.trained:
            out["trained"] = True
        out["variant"] = self.variant
        if self.build is not None:
            out["build"] = self.build
        out["input"] = self.input.to_dict()
        if self.digest is not None:
            out["digest"] = self.digest
        return out


@dataclass(frozen=True)
class PlanStage:
    index: int
    tier: str
    layers: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    variant: str | None
    compute_ms: float

    @property
    def signature(self) -> str:
        """What the stage computes: `in1,in2->out`."""
        return f"{','.join(self.inputs)}->{','.join(self.outputs)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "tier": self.tier,
            "layers": self.layers,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "variant": self.variant,
            "computeMs": self.compute_ms,
        }


@dataclass(frozen=True)
class PlanTransfer:
    from_tier: str
    to_tier: str
    bytes: int
    return_bytes: int
    ms: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "from": self.from_tier,
            "to": self.to_tier,
            "bytes": self.bytes,
            "returnBytes": self.return_bytes,
            "ms": self.ms,
        }


@dataclass(frozen=True)
class PlanLink:
    from_tier: str
    to_tier: str
    mbps: float
    rtt_ms: float

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.from_tier, "to": self.to_tier, "mbps": self.mbps, "rttMs": self.rtt_ms}


@dataclass(frozen=True)
class PlanAlternative:
    """A split the device may switch to when its measured uplink is in
    [min_mbps, max_mbps) (None: unbounded)."""

    min_mbps: float
    max_mbps: float | None
    cut_index: int | None
    stages: tuple[tuple[str, str], ...]  # (tier, layers)
    predicted_latency_ms: float
    at_mbps: float
    meets_slo: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "minMbps": self.min_mbps,
            "maxMbps": self.max_mbps,
            "cutIndex": self.cut_index,
            "stages": [{"tier": t, "layers": layers} for t, layers in self.stages],
            "predictedLatencyMs": self.predicted_latency_ms,
            "atMbps": self.at_mbps,
            "meetsSlo": self.meets_slo,
        }


@dataclass(frozen=True)
class PlanExit:
    """An early exit the model itself declares (DNNModel spec.exits): the output with
    its class scores, the tensor its head reads and the threshold calibrated on the
    model's labelled data for the plan's target."""

    output: str
    after: str
    threshold: float

    def to_dict(self) -> dict[str, Any]:
        return {"output": self.output, "after": self.after, "threshold": self.threshold}


def _plan_exit(data: Mapping[str, Any], r: _Reader, _: int) -> PlanExit:
    return PlanExit(r.text(data, "output"), r.text(data, "after"), r.number(data, "threshold"))


@dataclass(frozen=True)
class PlanArtefact:
    """A stored file a stage's pods fetch and check: a user's model's small model."""

    uri: str
    digest: str

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "digest": self.digest}


def _plan_artefact(data: Mapping[str, Any], r: _Reader, _: int) -> PlanArtefact:
    return PlanArtefact(r.text(data, "uri"), r.text(data, "digest"))


@dataclass(frozen=True)
class PlanReuseData:
    """The labelled rows the reusing stage of a user's model calibrates its distance
    on: stored by the model's preparation beside its artefacts (DNNModel spec.data),
    fetched by that stage's pods and checked against `digest`; `final_output` is the
    model output whose answers it reuses."""

    uri: str
    digest: str
    final_output: str

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "digest": self.digest, "finalOutput": self.final_output}


@dataclass(frozen=True)
class PlanOffload:
    """Per-input offloading as the stages run it (spec.offload): the device stage's
    cascade rule and the accuracy its threshold is calibrated for, the early exits'
    rule and target (the stages are cut from the model with its exit heads), the
    result-reuse cache of the first stage after the device, and the shares of inputs
    the plan was costed with (`exitShares`: per exit and `final`, measured on
    validation data; the cascade's small model counts as exit `cascade`). With exits
    the model declares, `declared_exits` are they, thresholds included, and
    `final_output` is the model's own answer (the stages cut the model as it is,
    nothing grafted)."""

    cascade_rule: str | None = None
    target_accuracy: float | None = None
    reuse_entries: int = 0
    reuse_max_accuracy_loss: float = 0.005
    exits_rule: str | None = None
    exits_target_accuracy: float | None = None
    exit_shares: Mapping[str, float] = field(default_factory=dict)
    declared_exits: tuple[PlanExit, ...] = ()
    final_output: str | None = None
    reuse_data: PlanReuseData | None = None  # reuse on a user's model
    # a cascade on a user's model: its small models (DNNModel spec.smallModels, stored
    # by its preparation) and the threshold calibrated for the target accuracy
    cascade_models: tuple[PlanArtefact, ...] = ()
    cascade_threshold: float | None = None
    # "digits_cnn": the model is a prepared copy of the zoo's digits_cnn, whose stages
    # read the zoo's prebuilt heads, small models and tables (its profile's calibration)
    calibration: str | None = None

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.cascade_rule is not None:
            doc["cascade"] = {"rule": self.cascade_rule, "targetAccuracy": self.target_accuracy}
            if self.cascade_models:
                doc["cascade"]["models"] = [m.to_dict() for m in self.cascade_models]
                doc["cascade"]["threshold"] = self.cascade_threshold
                doc["cascade"]["finalOutput"] = self.final_output
        if self.exits_rule is not None:
            doc["exits"] = {"rule": self.exits_rule, "targetAccuracy": self.exits_target_accuracy}
            if self.declared_exits:
                doc["exits"]["declared"] = [e.to_dict() for e in self.declared_exits]
                doc["exits"]["finalOutput"] = self.final_output
        if self.reuse_entries:
            doc["reuse"] = {
                "maxEntries": self.reuse_entries,
                "maxAccuracyLoss": self.reuse_max_accuracy_loss,
            }
            if self.reuse_data is not None:
                doc["reuse"]["data"] = self.reuse_data.to_dict()
        if self.exit_shares:
            doc["exitShares"] = dict(self.exit_shares)
        if self.calibration is not None:
            doc["calibration"] = self.calibration
        return doc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], field: str) -> PlanOffload:
        r = _Reader(field)
        cascade = r.mapping(data, "cascade")
        exits = r.mapping(data, "exits")
        reuse = r.mapping(data, "reuse")
        cr, er, rr = (
            _Reader(f"{field}.cascade"),
            _Reader(f"{field}.exits"),
            _Reader(f"{field}.reuse"),
        )
        return cls(
            cascade_rule=cr.optional_text(cascade, "rule") if cascade else None,
            target_accuracy=cr.number(cascade, "targetAccuracy") if cascade else None,
            reuse_entries=rr.integer(reuse, "maxEntries") if reuse else 0,
            reuse_max_accuracy_loss=rr.number(reuse, "maxAccuracyLoss", default=0.005),
            exits_rule=er.optional_text(exits, "rule") if exits else None,
            exits_target_accuracy=er.number(exits, "targetAccuracy") if exits else None,
            exit_shares=r.numbers(data, "exitShares"),
            declared_exits=er.items(exits, "declared", _plan_exit),
            final_output=er.optional_text(exits, "finalOutput")
            or cr.optional_text(cascade, "finalOutput"),
            cascade_models=cr.items(cascade, "models", _plan_artefact),
            cascade_threshold=cr.optional_number(cascade, "threshold"),
            calibration=r.optional_text(data, "calibration"),
            reuse_data=_reuse_data(reuse, f"{field}.reuse") if reuse and "data" in reuse else None,
        )


def _reuse_data(reuse: Mapping[str, Any], field: str) -> PlanReuseData:
    r = _Reader(f"{field}.data")
    data = _Reader(field).mapping(reuse, "data")
    return PlanReuseData(r.text(data, "uri"), r.text(data, "digest"), r.text(data, "finalOutput"))


@dataclass(frozen=True)
class PlanTrunk:
    """The plan's first stage is a shared trunk (DNNModel `spec.base`): it runs in the
    zone's trunk workload, cut from the base model's artefact up to `tensor`, for every
    application that shares it, and forwards to this plan's next stage (its head)."""

    workload: str  # the trunk Deployment and Service
    base: str  # the base DNNModel
    tensor: str  # where the trunk ends: the head's input
    uri: str  # the base's fp32 artefact the trunk is cut from
    digest: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "base": self.base,
            "tensor": self.tensor,
            "artifact": {"uri": self.uri, "digest": self.digest},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], field: str) -> PlanTrunk:
        r = _Reader(field)
        artifact = r.mapping(data, "artifact", required=True)
        ar = _Reader(f"{field}.artifact")
        return cls(
            workload=r.text(data, "workload"),
            base=r.text(data, "base"),
            tensor=r.text(data, "tensor"),
            uri=ar.text(artifact, "uri"),
            digest=ar.text(artifact, "digest"),
        )


@dataclass(frozen=True)
class PlanDocument:
    deployment: str
    model: ModelIdentity
    stages: tuple[PlanStage, ...]
    transfers: tuple[PlanTransfer, ...] = ()
    links: tuple[PlanLink, ...] = ()
    serving_ms: Mapping[str, float] = field(default_factory=dict)
    predicted_latency_ms: float | None = None
    feasible: bool = True
    reason: str = ""
    objective: str = "latency"
    zone: str | None = None
    # the device stage's change detection (spec.preprocessing.skipUnchangedThreshold)
    skip_unchanged_threshold: float = 0.0
    priority: int = 0  # default request priority at a saturated stage (spec.priority)
    raw_input_stays_on_device: bool = False
    feature_noise_std: float = 0.0
    noise_training: bool = False  # spec.privacy.noiseTraining
    noise_accuracy_floor: float | None = None  # spec.privacy.noiseAccuracyFloor
    # the stage after the device evaluates the last dense layer on the device's CKKS
    # ciphertexts (spec.privacy.homomorphicHead)
    homomorphic_head: bool = False
    # device: the device stage answers with the whole model when the next stage fails
    # or is later than fallback_after_ms (spec.placement.fallback)
    fallback: str = "none"
    fallback_after_ms: float = 1000.0
    objective_value: float | None = None
    device_energy_mj: float | None = None
    cloud_cost: float | None = None
    slo: Mapping[str, float] = field(default_factory=dict)
    alternatives: tuple[PlanAlternative, ...] = ()
    compute_method: str | None = None  # measured | analytic
    host_gflops: float | None = None
    measured_on: Mapping[str, str | None] | None = None  # tier -> node profiled on
    solver_method: str | None = None
    solver_exact: bool = True
    # tier -> {gflops, totalMs, servingMs, ...}: what the plan was computed from
    tiers: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    granularity: str | None = None  # segments | nodes (edgeai plan)
    # why some layers were kept in one stage (a recurrent state pair: graph.Held)
    held: tuple[str, ...] = ()
    offload: PlanOffload | None = None  # spec.offload
    trunk: PlanTrunk | None = None  # stage 0 is a shared trunk (spec.sharing: backbone)
    version: int = PLAN_VERSION

    def stage(self, tier: str) -> PlanStage | None:
        return next((s for s in self.stages if s.tier == tier), None)

    def stage_index(self, tier: str) -> int | None:
        return next((i for i, s in enumerate(self.stages) if s.tier == tier), None)

    @property
    def split(self) -> str:
        """`device:0-7 > edge:8-17`, the SPLIT column."""
        return " > ".join(f"{s.tier}:{s.layers}" for s in self.stages)

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "kind": PLAN_KIND,
            "version": self.version,
            "deployment": self.deployment,
        }
        if self.zone is not None:
            doc["zone"] = self.zone
        compute: dict[str, Any] = {"method": self.compute_method, "hostGflops": self.host_gflops}
        if self.measured_on is not None:
            compute["measuredOn"] = dict(self.measured_on)
        doc.update(
            {
                "model": self.model.to_dict(),
                "objective": self.objective,
                "feasible": self.feasible,
                "reason": self.reason,
                "predictedLatencyMs": self.predicted_latency_ms,
                "objectiveValue": self.objective_value,
                "deviceEnergyMj": self.device_energy_mj,
                "cloudCost": self.cloud_cost,
                "slo": dict(self.slo),
                "stages": [s.to_dict() for s in self.stages],
                "transfers": [t.to_dict() for t in self.transfers],
                "servingMs": dict(self.serving_ms),
                "alternatives": [a.to_dict() for a in self.alternatives],
                "privacy": {
                    "rawInputStaysOnDevice": self.raw_input_stays_on_device,
                    "featureNoiseStd": self.feature_noise_std,
                    **({"noiseTraining": True} if self.noise_training else {}),
                    **({"homomorphicHead": True} if self.homomorphic_head else {}),
                    **(
                        {"noiseAccuracyFloor": self.noise_accuracy_floor}
                        if self.noise_accuracy_floor is not None
                        else {}
                    ),
                },
                "preprocessing": {"skipUnchangedThreshold": self.skip_unchanged_threshold},
                "priority": self.priority,
                "compute": compute,
                "solver": {"method": self.solver_method, "exact": self.solver_exact},
                "tiers": {t: dict(v) for t, v in self.tiers.items()},
                "links": [link.to_dict() for link in self.links],
            }
        )
        if self.fallback != "none":
            doc["fallback"] = {"tier": self.fallback, "afterMs": self.fallback_after_ms}
        if self.granularity is not None:
            doc["granularity"] = self.granularity
        if self.held:
            doc["held"] = list(self.held)
        if self.offload is not None:
            doc["offload"] = self.offload.to_dict()
        if self.trunk is not None:
            doc["trunk"] = self.trunk.to_dict()
        return doc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, field: str = "plan") -> PlanDocument:
        """The document `data` (the `to_dict()` form); `field` prefixes the names in
        errors (the file or option the document came from)."""
        r = _Reader(field)
        if not isinstance(data, Mapping):
            raise SpecError(field, "must be a mapping", "a Plan document (kind: Plan)")
        if data.get("kind", PLAN_KIND) != PLAN_KIND:
            raise SpecError(f"{field}.kind", f"{data.get('kind')!r}", PLAN_KIND)
        version = r.integer(data, "version", default=PLAN_VERSION)
        if not 1 <= version <= PLAN_VERSION:
            raise SpecError(
                f"{field}.version",
                f"{version} is not a plan version this release reads",
                ", ".join(str(v) for v in range(1, PLAN_VERSION + 1)),
            )
        feasible = r.boolean(data, "feasible", default=True)
        stages = r.items(data, "stages", _stage, required=True)
        if not stages and feasible:  # only an infeasible plan places nothing
            raise SpecError(f"{field}.stages", "the plan has no stages", "a list of stages")
        for i in range(1, len(stages)):
            if stages[i].inputs != stages[i - 1].outputs:
                raise SpecError(
                    f"{field}.stages[{i}].inputs",
                    f"{list(stages[i].inputs)} are not stage {i - 1}'s outputs "
                    f"{list(stages[i - 1].outputs)}",
                )
        privacy = r.mapping(data, "privacy")
        fallback = r.mapping(data, "fallback")
        fr = _Reader(f"{field}.fallback")
        if fr.text(fallback, "tier", default="none") not in ("none", "device"):
            raise SpecError(f"{field}.fallback.tier", f"{fallback['tier']!r}", "none, device")
        preprocessing = r.mapping(data, "preprocessing")
        compute = r.mapping(data, "compute")
        solver = r.mapping(data, "solver")
        sub = _Reader(f"{field}.privacy")
        raw_stays = sub.boolean(privacy, "rawInputStaysOnDevice", default=False)
        noise = sub.number(privacy, "featureNoiseStd", default=0.0)
        noise_training = sub.boolean(privacy, "noiseTraining", default=False)
        noise_floor = sub.optional_number(privacy, "noiseAccuracyFloor")
        homomorphic_head = sub.boolean(privacy, "homomorphicHead", default=False)
        skip = _Reader(f"{field}.preprocessing").number(
            preprocessing, "skipUnchangedThreshold", default=0.0
        )
        cr = _Reader(f"{field}.compute")
        measured_on = cr.mapping(compute, "measuredOn") if "measuredOn" in compute else None
        tiers, tr = r.mapping(data, "tiers"), _Reader(f"{field}.tiers")
        return cls(
            deployment=r.text(data, "deployment", default=""),
            model=_model(r.mapping(data, "model", required=True), f"{field}.model"),
            stages=stages,
            transfers=r.items(data, "transfers", _transfer),
            links=r.items(data, "links", _link),
            serving_ms=r.numbers(data, "servingMs"),
            predicted_latency_ms=r.optional_number(data, "predictedLatencyMs"),
            feasible=feasible,
            reason=r.text(data, "reason", default=""),
            objective=r.text(data, "objective", default="latency"),
            zone=r.optional_text(data, "zone"),
            skip_unchanged_threshold=skip,
            priority=r.integer(data, "priority", default=0),
            raw_input_stays_on_device=raw_stays,
            feature_noise_std=noise,
            noise_training=noise_training,
            homomorphic_head=homomorphic_head,
            noise_accuracy_floor=noise_floor,
            fallback=fr.text(fallback, "tier", default="none"),
            fallback_after_ms=fr.number(fallback, "afterMs", default=1000.0),
            objective_value=r.optional_number(data, "objectiveValue"),
            device_energy_mj=r.optional_number(data, "deviceEnergyMj"),
            cloud_cost=r.optional_number(data, "cloudCost"),
            slo=r.numbers(data, "slo"),
            alternatives=r.items(data, "alternatives", _alternative),
            compute_method=cr.optional_text(compute, "method"),
            host_gflops=cr.optional_number(compute, "hostGflops"),
            measured_on=(
                None
                if measured_on is None
                else {str(k): None if v is None else str(v) for k, v in measured_on.items()}
            ),
            solver_method=_Reader(f"{field}.solver").optional_text(solver, "method"),
            solver_exact=_Reader(f"{field}.solver").boolean(solver, "exact", default=True),
            tiers={str(t): tr.numbers(tiers, t) for t in tiers},
            granularity=r.optional_text(data, "granularity"),
            held=r.texts(data, "held"),
            offload=(
                PlanOffload.from_dict(r.mapping(data, "offload"), f"{field}.offload")
                if "offload" in data
                else None
            ),
            trunk=(
                PlanTrunk.from_dict(r.mapping(data, "trunk"), f"{field}.trunk")
                if "trunk" in data
                else None
            ),
            version=version,
        )


def _stem(path: str | None) -> str:
    if path is None:
        return "model"
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    return name.removesuffix(".onnx")


class _Reader:
    """Typed reads of one mapping's keys; errors name `<prefix>.<key>`."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _get(self, data: Mapping[str, Any], key: str, required: bool) -> Any:
        if data.get(key) is None and required:
            raise SpecError(f"{self.prefix}.{key}", "is missing")
        return data.get(key)

    def _bad(self, key: str, value: Any, accepted: str) -> SpecError:
        return SpecError(f"{self.prefix}.{key}", f"{value!r} is not valid", accepted)

    def text(self, data: Mapping[str, Any], key: str, default: str | None = None) -> str:
        value = self._get(data, key, default is None)
        if value is None:
            assert default is not None
            return default
        if not isinstance(value, str):
            raise self._bad(key, value, "a string")
        return value

    def texts(self, data: Mapping[str, Any], key: str) -> tuple[str, ...]:
        value = self._get(data, key, False)
        if value is None:
            return ()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, value, "a list of strings")
        return tuple(value)

    def optional_text(self, data: Mapping[str, Any], key: str) -> str | None:
        return None if data.get(key) is None else self.text(data, key)

    def optional_number(self, data: Mapping[str, Any], key: str) -> float | None:
        value = data.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self._bad(key, value, "a number")
        return float(value)

    def number(self, data: Mapping[str, Any], key: str, default: float | None = None) -> float:
        value = self.optional_number(data, key)
        if value is None:
            if default is None:
                raise SpecError(f"{self.prefix}.{key}", "is missing", "a number")
            return default
        return value

    def integer(self, data: Mapping[str, Any], key: str, default: int | None = None) -> int:
        value = self._get(data, key, default is None)
        if value is None:
            assert default is not None
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._bad(key, value, "an integer")
        return value

    def boolean(self, data: Mapping[str, Any], key: str, default: bool) -> bool:
        value = data.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, value, "true or false")
        return value

    def mapping(
        self, data: Mapping[str, Any], key: str, *, required: bool = False
    ) -> Mapping[str, Any]:
        value = self._get(data, key, required)
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise self._bad(key, value, "a mapping")
        return value

    def numbers(self, data: Mapping[str, Any], key: str) -> dict[str, float]:
        sub = _Reader(f"{self.prefix}.{key}")
        return {str(k): sub.number(m, k) for m in [self.mapping(data, key)] for k in m}

    def names(self, data: Mapping[str, Any], key: str) -> tuple[str, ...]:
        value = self._get(data, key, True)
        if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
            raise SpecError(f"{self.prefix}.{key}", "must be a list of tensor names")
        return tuple(value)

    def items(
        self,
        data: Mapping[str, Any],
        key: str,
        read: Callable[[Mapping[str, Any], _Reader, int], _T],
        *,
        required: bool = False,
    ) -> tuple[_T, ...]:
        value = self._get(data, key, required)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self._bad(key, value, "a list")
        out: list[_T] = []
        for i, item in enumerate(value):
            where = f"{self.prefix}.{key}[{i}]"
            if not isinstance(item, Mapping):
                raise SpecError(where, "must be a mapping")
            out.append(read(item, _Reader(where), i))
        return tuple(out)


def _tier(r: _Reader, data: Mapping[str, Any], key: str) -> str:
    value = data.get(key)
    if value not in TIERS:
        raise SpecError(f"{r.prefix}.{key}", f"{value!r}", ", ".join(TIERS))
    return str(value)


def _stage(data: Mapping[str, Any], r: _Reader, i: int) -> PlanStage:
    return PlanStage(
        index=r.integer(data, "index", default=i),
        tier=_tier(r, data, "tier"),
        layers=r.text(data, "layers", default="?"),
        inputs=r.names(data, "inputs"),
        outputs=r.names(data, "outputs"),
        variant=r.optional_text(data, "variant"),
        compute_ms=r.number(data, "computeMs", default=0.0),
    )


def _transfer(data: Mapping[str, Any], r: _Reader, _: int) -> PlanTransfer:
    return PlanTransfer(
        from_tier=_tier(r, data, "from"),
        to_tier=_tier(r, data, "to"),
        bytes=r.integer(data, "bytes"),
        return_bytes=r.integer(data, "returnBytes", default=0),
        ms=r.number(data, "ms"),
    )


def _link(data: Mapping[str, Any], r: _Reader, _: int) -> PlanLink:
    return PlanLink(
        from_tier=_tier(r, data, "from"),
        to_tier=_tier(r, data, "to"),
        mbps=r.number(data, "mbps"),
        rtt_ms=r.number(data, "rttMs", default=0.0),
    )


def _alternative(data: Mapping[str, Any], r: _Reader, _: int) -> PlanAlternative:
    def stage(item: Mapping[str, Any], sr: _Reader, __: int) -> tuple[str, str]:
        return _tier(sr, item, "tier"), sr.text(item, "layers", default="?")

    cut = data.get("cutIndex")
    return PlanAlternative(
        min_mbps=r.number(data, "minMbps", default=0.0),
        max_mbps=r.optional_number(data, "maxMbps"),
        cut_index=None if cut is None else r.integer(data, "cutIndex"),
        stages=r.items(data, "stages", stage),
        predicted_latency_ms=r.number(data, "predictedLatencyMs", default=0.0),
        at_mbps=r.number(data, "atMbps", default=0.0),
        meets_slo=r.boolean(data, "meetsSlo", default=True),
    )


def _model(data: Mapping[str, Any], where: str) -> ModelIdentity:
    r = _Reader(where)
    zoo, path = r.optional_text(data, "zoo"), r.optional_text(data, "path")
    uri, digest = r.optional_text(data, "uri"), r.optional_text(data, "digest")
    if zoo is None and path is None and uri is None:
        raise SpecError(
            where,
            "names no model",
            "{zoo: NAME}, {path: FILE.onnx} or {uri: ARTEFACT, digest: sha256:HEX}",
        )
    if uri is not None and (digest is None or not _SHA256_DIGEST.fullmatch(digest)):
        raise SpecError(
            f"{where}.digest",
            f"{digest!r} does not pin the artefact {uri}",
            "sha256: followed by 64 lowercase hexadecimal digits",
        )
    spec = r.mapping(data, "input", required=True)
    ir = _Reader(f"{where}.input")
    shape = spec.get("shape")
    if not isinstance(shape, Sequence) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise SpecError(f"{where}.input.shape", f"{shape!r}", "a list of integers")
    tensor = TensorSpec(
        ir.text(spec, "name", default="input"), tuple(shape), ir.text(spec, "dtype", "FP32")
    )
    return ModelIdentity(
        name=r.text(data, "name", default=zoo or _stem(path)),
        zoo=zoo,
        path=path,
        trained=r.boolean(data, "trained", default=False),
        variant=r.optional_text(data, "variant"),
        input=tensor,
        digest=digest,
        build=r.optional_text(data, "build"),
        uri=uri,
    )
