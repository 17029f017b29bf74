from __future__ import annotations

from typing import Any

import pytest

from edgeai_operator.errors import SpecError
from edgeai_operator.localcluster import DEFAULT_TOPOLOGY
from edgeai_operator.topology import load_topology, parse_topology


def _doc(**group: Any) -> dict[str, Any]:
    base = {"name": "dev", "tier": "device", "gflops": 5}
    base.update(group)
    return {"kind": "Topology", "nodeGroups": [base]}


def test_default_topology_has_two_zones_of_devices_and_edges_plus_cloud() -> None:
    topo = load_topology(DEFAULT_TOPOLOGY)
    assert topo.zones() == ["zone-a", "zone-b"]
    for zone in topo.zones():
        tiers = {n.tier for n in topo.nodes if n.zone == zone}
        assert tiers == {"device", "edge"}
    assert len(topo.by_tier("cloud")) >= 1


def test_node_manifest_carries_labels_annotations_and_capacity() -> None:
    topo = parse_topology(
        _doc(
            zones=["z1"],
            countPerZone=2,
            uplinkMbps=12.5,
            uplinkRttMs=8,
            powerWatts=3,
            capacity={"cpu": "2"},
            labels={"app": "cam"},
        )
    )
    assert [n.name for n in topo.nodes] == ["dev-z1-0", "dev-z1-1"]
    node = topo.nodes[0].manifest()
    assert node["metadata"]["labels"]["edgeai.dev/tier"] == "device"
    assert node["metadata"]["labels"]["topology.kubernetes.io/zone"] == "z1"
    assert node["metadata"]["labels"]["app"] == "cam"
    assert node["metadata"]["annotations"] == {
        "edgeai.dev/gflops": "5",
        "edgeai.dev/uplink-mbps": "12.5",
        "edgeai.dev/uplink-rtt-ms": "8",
        "edgeai.dev/power-watts": "3",
        "kwok.x-k8s.io/node": "fake",
    }
    assert node["status"]["capacity"] == {"cpu": "2", "pods": "110"}


@pytest.mark.parametrize(
    ("group", "field", "accepted"),
    [
        ({"tier": "fog"}, "nodeGroups[dev].tier", "device, edge, cloud"),
        ({"gflops": -1}, "nodeGroups[dev].gflops", "a number > 0"),
        ({"gflops": None}, "nodeGroups[dev].gflops", "a positive number"),
        ({"count": 0}, "nodeGroups[dev].count", "an integer >= 1"),
        ({"zones": ["Zone_A"]}, "nodeGroups[dev].zones", "DNS labels"),
        ({"name": "Bad Name"}, "nodeGroups[0].name", "DNS label"),
        ({"uplinkMbps": "fast"}, "nodeGroups[dev].uplinkMbps", "a number > 0"),
        ({"colour": "red"}, "nodeGroups[dev]", "countPerZone"),
    ],
)
def test_bad_topology_names_the_field(group: dict[str, Any], field: str, accepted: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_topology(_doc(**group))
    assert err.value.field == field
    assert accepted in str(err.value)


def test_live_node_measured_annotation_wins_and_untiered_nodes_are_skipped() -> None:
    from edgeai_operator.topology import node_from_object

    spec = parse_topology(_doc(zones=["z1"], uplinkMbps=10)).nodes[0]
    obj = spec.manifest()
    obj["metadata"]["annotations"]["edgeai.dev/uplink-mbps-measured"] = "3.5"
    live = node_from_object(obj)
    assert live is not None
    assert (live.tier, live.zone, live.gflops, live.uplink_mbps) == ("device", "z1", 5.0, 3.5)
    del obj["metadata"]["labels"]["edgeai.dev/tier"]
    assert node_from_object(obj) is None


def test_live_node_without_uplink_is_named_in_the_planning_error() -> None:
    from edgeai_operator.problem import network
    from edgeai_operator.topology import NodeSpec, Topology

    def node(name: str, tier: str, mbps: float | None) -> NodeSpec:
        return NodeSpec(name, tier, "z", {}, 10.0, mbps, None, None)

    topo = Topology((node("phone", "device", None), node("gateway", "edge", 100.0)))
    with pytest.raises(SpecError) as err:
        network(topo, "z")
    assert err.value.field == "node phone annotation edgeai.dev/uplink-mbps"
