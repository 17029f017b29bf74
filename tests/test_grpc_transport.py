"""spec.placement.transport: the parser's choice, and what the builders make of it (stage
pods serving gRPC, Services exposing it, stages forwarding over it; the device stage
keeps HTTP)."""

from __future__ import annotations

from typing import Any

import pytest

from edgeai_operator.builders import DeploymentOptions, Owner, build_children
from edgeai_operator.deployspec import parse_deployment
from edgeai_operator.errors import SpecError
from edgeai_operator.netpol import network_policies
from edgeai_operator.plandoc import PlanDocument

OWNER = Owner(name="cam", namespace="vision", uid="u-1")
MODEL = {"zoo": "digits_cnn", "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"}}


def _plan() -> PlanDocument:
    return PlanDocument.from_dict(
        {
            "model": MODEL,
            "stages": [
                {"tier": "device", "layers": "0-3", "inputs": ["input"], "outputs": ["t1"]},
                {"tier": "edge", "layers": "4-7", "inputs": ["t1"], "outputs": ["t2"]},
                {"tier": "cloud", "layers": "8-9", "inputs": ["t2"], "outputs": ["output"]},
            ],
            "predictedLatencyMs": 40.0,
        }
    )


def _deployment(**placement: Any) -> dict[str, Any]:
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNDeployment",
        "metadata": {"name": "cam"},
        "spec": {
            "model": {"zoo": "digits_cnn"},
            "placement": placement,
            "security": {"stageTLS": "disabled"},
        },
    }


def test_the_transport_is_http_unless_the_spec_says_grpc() -> None:
    assert parse_deployment(_deployment()).transport == "http"
    assert parse_deployment(_deployment(transport="grpc")).transport == "grpc"
    with pytest.raises(SpecError) as info:
        parse_deployment(_deployment(transport="quic"))
    assert "spec.placement.transport" in str(info.value)
    assert "http, grpc" in str(info.value)
    doc = _deployment(transport="grpc")
    doc["spec"]["sharing"] = "backbone"
    with pytest.raises(SpecError) as info:
        parse_deployment(doc)
    assert "spec.placement.transport" in str(info.value)
    # gRPC goes over mutual TLS as HTTP does (stageTLS: required is the default)
    doc = _deployment(transport="grpc")
    del doc["spec"]["security"]
    secure = parse_deployment(doc)
    assert (secure.transport, secure.security.stage_tls) == ("grpc", True)


def _containers(children: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        c["metadata"]["name"]: c["spec"]["template"]["spec"]["containers"][0]
        for c in children
        if c["kind"] in ("Deployment", "DaemonSet")
    }


def _service_ports(children: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    return {c["metadata"]["name"]: c["spec"]["ports"] for c in children if c["kind"] == "Service"}


def _grpc_stages(
    *, stage_tls: bool
) -> tuple[list[dict[str, Any]], tuple[dict[str, Any], dict[str, Any], dict[str, Any]]]:
    """The children of a grpc deployment and its (edge, cloud, device) containers."""
    options = DeploymentOptions(transport="grpc", stage_tls=stage_tls)
    children = build_children(OWNER, {"zone-a": _plan()}, {}, options)
    containers = _containers(children)
    stages = ("cam-edge-zone-a", "cam-cloud", "cam-device-zone-a")
    edge, cloud, device = (containers[name] for name in stages)
    return children, (edge, cloud, device)


def test_grpc_transport_serves_and_forwards_over_grpc_but_the_device_keeps_http() -> None:
    children, (edge, cloud, device) = _grpc_stages(stage_tls=False)
    assert "--next=grpc://cam-cloud.vision.svc:8081" in edge["args"]
    assert not [a for a in cloud["args"] if a.startswith("--next")]
    assert "--next=http://cam-edge-zone-a.vision.svc:8080" in device["args"]
    for container in (edge, cloud, device):
        assert "--grpc-port=8081" in container["args"]
        assert container["ports"] == [
            {"name": "http", "containerPort": 8080},
            {"name": "grpc", "containerPort": 8081},
        ]
    for name, ports in _service_ports(children).items():
        assert ports == [
            {"name": "http", "port": 8080, "targetPort": "http"},
            {"name": "grpc", "port": 8081, "targetPort": "grpc"},
        ], name


def test_grpc_with_stage_tls_forwards_over_grpcs_and_the_device_over_https() -> None:
    children, (edge, cloud, device) = _grpc_stages(stage_tls=True)
    assert "--next=grpcs://cam-cloud.vision.svc:8081" in edge["args"]
    assert "--next=https://cam-edge-zone-a.vision.svc:8443" in device["args"]
    for container in (edge, cloud):
        # the gRPC port takes mutual TLS only on a stage with a TLS port
        assert "--grpc-port=8081" in container["args"]
        assert "--tls-port=8443" in container["args"]
        assert "--tls-dir=/etc/edgeai-tls" in container["args"]
    assert "--tls-peer=edgeai://vision/cam/edge" in cloud["args"]
    assert not [a for a in device["args"] if a.startswith("--tls-port")]
    # the cloud's NetworkPolicy lets the edge in on the gRPC port, and the edge out to it
    policies = {p["metadata"]["name"]: p["spec"] for p in network_policies(OWNER, children)}
    edge_pods = {"matchLabels": _selector(children, "cam-edge-zone-a")}
    assert {
        "from": [{"podSelector": edge_pods}],
        "ports": [{"protocol": "TCP", "port": 8081}],
    } in policies["cam-cloud"]["ingress"]
    assert {
        "to": [{"podSelector": {"matchLabels": _selector(children, "cam-cloud", "Service")}}],
        "ports": [{"protocol": "TCP", "port": 8081}],
    } in policies["cam-edge-zone-a"]["egress"]


def _selector(children: list[dict[str, Any]], name: str, kind: str = "Deployment") -> Any:
    child = next(c for c in children if c["metadata"]["name"] == name and c["kind"] == kind)
    return (
        child["spec"]["selector"] if kind == "Service" else child["spec"]["selector"]["matchLabels"]
    )


def test_http_transport_has_no_grpc_port() -> None:
    children = build_children(OWNER, {"zone-a": _plan()}, {}, DeploymentOptions())
    for container in _containers(children).values():
        assert not [a for a in container["args"] if "grpc" in a]
        assert container["ports"] == [{"name": "http", "containerPort": 8080}]
    for ports in _service_ports(children).values():
        assert ports == [{"name": "http", "port": 8080, "targetPort": "http"}]
