"""The watch cache reconcile passes read (no cluster: watch events as dicts), and the
scrape back-off for pods that do not answer."""

from __future__ import annotations

from typing import Any

from edgeai_operator.cache import WatchCache
from edgeai_operator.reconcile import scrape_pods


class CountingListings:
    """The API-server listings, recording what the cache asked for."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def owned_children(self, namespace: str, deployment: str) -> list[tuple[str, str, str]]:
        self.asked.append(f"owned {deployment}")
        return []

    def shared_children_of(self, namespace: str, uid: str) -> list[tuple[str, str, str]]:
        self.asked.append(f"shared {uid}")
        return []

    def remember(self, obj: Any) -> None:
        return None


def _ds(name: str, generation: int, observed: int, available: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": name,
            "namespace": "ns",
            "generation": generation,
            "labels": {"edgeai.dev/deployment": "cam"},
            "managedFields": [{"manager": "x"}],
        },
        "spec": {"template": {"spec": {"containers": [{"name": "big"}]}}},
        "status": {"observedGeneration": observed, "numberAvailable": available},
    }


def _pod(name: str, labels: dict[str, str], ip: str = "127.244.0.9") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "labels": labels},
        "spec": {"nodeName": "n"},
        "status": {"phase": "Running", "podIP": ip},
    }


def test_workloads_come_from_the_watch_as_slim_copies() -> None:
    live = CountingListings()
    cache = WatchCache(listings=live)
    cache.put_workload(_ds("cam-device-a", 3, 3, 2))
    (got,) = cache.workloads_of("ns", "cam")
    assert got["status"]["numberAvailable"] == 2
    assert "template" not in got["spec"]  # slim copies
    assert "managedFields" not in got["metadata"]
    cache.drop_workload("ns", "DaemonSet", "cam-device-a")
    assert cache.workloads_of("ns", "cam") == []
    assert cache.sizes() == (0, 0)
    assert live.asked == []
    # the two rare listings (after a restart; shares in use) are asked of the API
    cache.owned_children("ns", "cam")
    cache.shared_children_of("ns", "uid-cam")
    assert live.asked == ["owned cam", "shared uid-cam"]


def test_a_late_watch_event_does_not_replace_a_newer_generation() -> None:
    cache = WatchCache(listings=CountingListings())
    cache.remember(_ds("cam-device-a", 4, 3, 2))  # what an apply returned
    cache.put_workload(_ds("cam-device-a", 3, 3, 2))  # the watch catching up
    (got,) = cache.workloads_of("ns", "cam")
    assert got["metadata"]["generation"] == 4
    cache.put_workload(_ds("cam-device-a", 4, 4, 1))  # same generation: newer status
    (got,) = cache.workloads_of("ns", "cam")
    assert got["status"]["observedGeneration"] == 4


def test_pods_are_found_by_label_and_follow_relabels_and_deletes() -> None:
    cache = WatchCache(listings=CountingListings())
    cache.put_pod(_pod("p1", {"edgeai.dev/deployment": "cam"}))
    cache.put_pod(_pod("p2", {"edgeai.dev/deployment": "cam"}))
    cache.put_pod(_pod("p3", {"edgeai.dev/deployment": "other"}))
    names = [p["metadata"]["name"] for p in cache.pods("ns", "edgeai.dev/deployment", "cam")]
    assert names == ["p1", "p2"]
    assert cache.pods("other-ns", "edgeai.dev/deployment", "cam") == []
    cache.put_pod(_pod("p2", {"edgeai.dev/deployment": "other"}))  # relabelled
    cache.drop_pod("ns", "p1")
    assert cache.pods("ns", "edgeai.dev/deployment", "cam") == []
    names = [p["metadata"]["name"] for p in cache.pods("ns", "edgeai.dev/deployment", "other")]
    assert names == ["p2", "p3"]
    assert cache.sizes() == (0, 2)


def _running(name: str, ip: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "status": {"phase": "Running", "podIP": ip}}


def test_a_pod_that_does_not_answer_is_backed_off_then_retried() -> None:
    answers: dict[str, str | None] = {"127.244.0.9": None}
    calls: list[float] = []

    def scrape(ip: str) -> str | None:
        calls.append(clock)
        return answers[ip]

    backoff: dict[tuple[str, str], tuple[int, float]] = {}
    pods = [_running("p", "127.244.0.9")]
    for t in range(0, 80):
        clock = float(t)
        scrapes, backoff = scrape_pods(pods, backoff, scrape, clock)
        assert scrapes == {}
    # tried at 0, then after 2, 4, 8, 16, 30, 30 s: not 80 times
    assert calls == [0.0, 2.0, 6.0, 14.0, 30.0, 60.0]
    answers["127.244.0.9"] = "edgeai_requests_total 3\n"
    clock = 90.0
    scrapes, backoff = scrape_pods(pods, backoff, scrape, clock)
    assert set(scrapes) == {"p"}
    assert backoff == {}  # answered: no back-off left


def test_a_gone_pod_leaves_no_back_off() -> None:
    backoff = {("gone", "127.244.0.8"): (3, 100.0)}
    _, left = scrape_pods([_running("p", "127.244.0.9")], backoff, lambda ip: "", 5.0)
    assert left == {}


def test_workloads_are_found_by_the_deployments_they_serve() -> None:
    cache = WatchCache(listings=CountingListings())
    own = {
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {
            "name": "cam-device-a",
            "namespace": "ns",
            "generation": 1,
            "labels": {"edgeai.dev/deployment": "cam"},
        },
    }
    shared = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "m-shared-edge-a-1",
            "namespace": "ns",
            "generation": 1,
            "labels": {"edgeai.dev/shared": "true"},
            "owner_references": [
                {"kind": "DNNDeployment", "name": "cam", "uid": "1"},
                {"kind": "DNNDeployment", "name": "door", "uid": "2"},
            ],
        },
    }
    cache.put_workload(own)
    cache.put_workload(shared)
    assert [w["metadata"]["name"] for w in cache.workloads_of("ns", "cam")] == [
        "cam-device-a",
        "m-shared-edge-a-1",
    ]
    assert [w["metadata"]["name"] for w in cache.workloads_of("ns", "door")] == [
        "m-shared-edge-a-1"
    ]
    # a user leaves the shared stage: it no longer serves that user
    shared["metadata"]["owner_references"] = shared["metadata"]["owner_references"][1:]
    shared["metadata"]["generation"] = 2
    cache.put_workload(shared)
    assert [w["metadata"]["name"] for w in cache.workloads_of("ns", "cam")] == ["cam-device-a"]
    cache.drop_workload("ns", "Deployment", "m-shared-edge-a-1")
    assert cache.workloads_of("ns", "door") == []
    assert cache.workloads_of("other", "cam") == []
