"""Shared trunks across DNNDeployments, decided in pure code.

DNNModels fine-tuned from one base (`spec.base`, verified by the preparation into
`status.trunk`) compute the same trunk: the base's graph up to one cut tensor. The
DNNDeployments of a namespace with `spec.sharing: backbone` whose models share a trunk
and that have devices in one zone with a usable edge server share ONE trunk stage on
that zone's edge: a Deployment + Service running `edgeai run-trunk` (the trunk cut
from the base's fp32 artefact, a route per application to its head). Each member's
plan for the zone becomes trunk -> its own head stage (the layers after the cut).

Every member computes the same group from the same inputs (the backbone peers of the
namespace, the models' trunk records, the nodes), so each applies the same trunk
workload under its own field manager with its own ownerReference; the garbage
collector deletes it with its last member. A deployment joins only when its spec lets
the raw input go to the edge and changes nothing after the device (no privacy noise,
homomorphic head, per-input offloading or device fallback): the trunk stage computes
the model itself, as is.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from edgeai_operator.builders import WORKER_PORT, TrunkStage, dns_label
from edgeai_operator.deployspec import DeploymentSpec
from edgeai_operator.plandoc import PlanDocument, PlanStage, PlanTrunk
from edgeai_operator.planning import NodeState, zone_devices


@dataclass(frozen=True)
class TrunkRecord:
    """A DNNModel's verified trunk (its `status.trunk`, written by the preparation)."""

    base: str  # the base DNNModel
    shared_up_to: str  # this model's trunk tensor
    base_tensor: str  # the base's tensor at the same cut
    digest: str
    uri: str  # the base's fp32 artefact
    artifact_digest: str

    @classmethod
    def from_status(cls, trunk: Mapping[str, Any] | None) -> TrunkRecord | None:
        """The record in a DNNModel's `status.trunk`; None when absent or incomplete."""
        if not trunk:
            return None
        artifact = trunk.get("baseArtifact") or {}
        values = (
            trunk.get("model"),
            trunk.get("sharedUpTo"),
            trunk.get("baseTensor"),
            trunk.get("digest"),
            artifact.get("uri"),
            artifact.get("digest"),
        )
        if not all(isinstance(v, str) and v for v in values):
            return None
        return cls(*(str(v) for v in values))


@dataclass(frozen=True)
class Peer:
    """A DNNDeployment of the namespace that may share a trunk: `sharing: backbone`,
    not being deleted, and a spec the trunk stage can serve as is."""

    name: str
    uid: str
    model: str  # its DNNModel: the application's served model name
    device_selector: tuple[tuple[str, str], ...]


def peer_of(spec: DeploymentSpec, uid: str, deleting: bool) -> Peer | None:
    """`spec`'s deployment as a trunk peer, or None when it cannot be one."""
    if deleting or spec.sharing != "backbone" or spec.model_ref is None:
        return None
    if trunk_blocker(spec) is not None:
        return None
    return Peer(spec.name, uid, spec.model_ref, tuple(sorted(spec.device_selector.items())))


def trunk_blocker(spec: DeploymentSpec) -> str | None:
    """Why this spec cannot use a shared trunk stage (the field), or None."""
    if "edge" not in spec.tiers:
        return "spec.placement.tiers: the trunk stage runs on the edge"
    if spec.raw_input_stays_on_device:
        return "spec.privacy.rawInputStaysOnDevice: the trunk stage takes the raw input"
    if spec.feature_noise_std or spec.noise_accuracy_floor is not None or spec.noise_training:
        return "spec.privacy: the trunk stage computes the model as is"
    if spec.homomorphic_head:
        return "spec.privacy.homomorphicHead: the trunk stage computes the model as is"
    if spec.offload is not None:
        return "spec.offload: the trunk stage computes the model as is"
    if spec.fallback != "none":
        return "spec.placement.fallback: the device entry forwards to the trunk only"
    return None


@dataclass(frozen=True)
class TrunkUser:
    deployment: str
    uid: str
    model: str


@dataclass(frozen=True)
class TrunkGroup:
    """One zone's trunk stage and the deployments it serves."""

    name: str  # the trunk Deployment and Service
    zone: str
    base: str
    tensor: str
    digest: str
    uri: str
    artifact_digest: str
    users: tuple[TrunkUser, ...]  # sorted by deployment name

    def routes(self, namespace: str) -> dict[str, str]:
        """Application model name -> its head Service's URL. Deployments of one model
        share its route: the first by name serves it."""
        out: dict[str, str] = {}
        for user in self.users:
            head = dns_label(f"{user.deployment}-edge-{self.zone}")
            out.setdefault(user.model, f"http://{head}.{namespace}.svc:{WORKER_PORT}")
        return out

    def stage(self, namespace: str) -> TrunkStage:
        """The trunk workload as the builders make it."""
        routes = tuple(sorted(self.routes(namespace).items()))
        return TrunkStage(
            self.name, self.zone, self.base, self.tensor, self.uri, self.artifact_digest, routes
        )

    def plan_trunk(self) -> PlanTrunk:
        return PlanTrunk(self.name, self.base, self.tensor, self.uri, self.artifact_digest)


def _trunk_key(model: str, records: Mapping[str, TrunkRecord]) -> TrunkRecord | None:
    """The trunk `model` shares: its own verified record (when its trunk tensor has the
    base's name, which the head receives), or, for a base model, the first record (by
    model name) naming it as the base."""
    own = records.get(model)
    if own is not None:
        return own if own.shared_up_to == own.base_tensor else None
    for name in sorted(records):
        record = records[name]
        if record.base == model and record.shared_up_to == record.base_tensor:
            return record
    return None


def _same_trunk(a: TrunkRecord, b: TrunkRecord) -> bool:
    return (a.base, a.base_tensor, a.digest, a.artifact_digest) == (
        b.base,
        b.base_tensor,
        b.digest,
        b.artifact_digest,
    )


def trunk_groups(
    me: Peer | None,
    peers: Sequence[Peer],
    records: Mapping[str, TrunkRecord],
    nodes: Sequence[NodeState],
) -> dict[str, TrunkGroup]:
    """The trunk group of each zone `me` joins (zone -> group); empty when its model
    shares no trunk. A zone counts when `me` has devices there and the zone has a
    usable edge server; its members are the peers (with `me`) sharing the same trunk
    with devices in the zone."""
    if me is None:
        return {}
    key = _trunk_key(me.model, records)
    if key is None:
        return {}
    edge_zones = {z for n in nodes if n.spec.tier == "edge" and n.usable and (z := n.spec.zone)}
    members = {p.name: p for p in peers if p.name != me.name}
    members[me.name] = me
    sharing = [
        p
        for p in members.values()
        if (k := _trunk_key(p.model, records)) is not None and _same_trunk(k, key)
    ]
    zones_of = {p.name: set(zone_devices(dict(p.device_selector), nodes)) for p in sharing}
    groups: dict[str, TrunkGroup] = {}
    for zone in sorted(zones_of[me.name] & edge_zones):
        users = tuple(
            TrunkUser(p.name, p.uid, p.model)
            for p in sorted(sharing, key=lambda p: p.name)
            if zone in zones_of[p.name]
        )
        signature = [key.base, key.base_tensor, key.digest, key.artifact_digest, zone]
        digest = hashlib.sha256(json.dumps(signature).encode()).hexdigest()[:8]
        groups[zone] = TrunkGroup(
            name=dns_label(f"{key.base}-trunk-{zone}-{digest}"),
            zone=zone,
            base=key.base,
            tensor=key.base_tensor,
            digest=key.digest,
            uri=key.uri,
            artifact_digest=key.artifact_digest,
            users=users,
        )
    return groups


def with_trunk(
    plan: PlanDocument, group: TrunkGroup, profile: Mapping[str, Any]
) -> PlanDocument | None:
    """The zone's edge-only plan as trunk -> head: stage 0 the trunk (up to the group's
    tensor, run by the trunk workload), stage 1 this application's head on the edge,
    each with its share of the edge stage's compute by FLOPs; one more stage's serving
    overhead on the predicted latency. None when the plan is not one edge stage or the
    profile has no cut at the tensor."""
    if len(plan.stages) != 1 or plan.stages[0].tier != "edge":
        return None
    cuts = [list(c.get("tensors") or []) for c in profile.get("cuts") or []]
    if [group.tensor] not in cuts:
        return None
    at = cuts.index([group.tensor])
    flops = [float(s.get("flops") or 0.0) for s in profile.get("segments") or []]
    if not 0 < at < len(flops):
        return None
    share = sum(flops[:at]) / (sum(flops) or 1.0)
    edge = plan.stages[0]
    trunk = PlanStage(
        0,
        "edge",
        f"0-{at - 1}",
        edge.inputs,
        (group.tensor,),
        edge.variant,
        round(edge.compute_ms * share, 4),
    )
    head = PlanStage(
        1,
        "edge",
        f"{at}-{len(flops) - 1}",
        (group.tensor,),
        edge.outputs,
        edge.variant,
        round(edge.compute_ms * (1 - share), 4),
    )
    hop_ms = plan.serving_ms.get("edge", 0.0)
    predicted = plan.predicted_latency_ms
    return replace(
        plan,
        stages=(trunk, head),
        predicted_latency_ms=None if predicted is None else round(predicted + hop_ms, 4),
        alternatives=(),
        trunk=group.plan_trunk(),
    )
