"""Give a kind cluster's nodes the `edgeai.dev/*` annotations the planner reads.

    python hack/kind/annotate_nodes.py TOPOLOGY KUBECONFIG KUBECTL

kind sets labels (kind-config.yaml) but not annotations. Each worker labelled
`edgeai.dev/tier` (and `topology.kubernetes.io/zone`) gets the annotations of the
topology's node group of that tier and zone, exactly as `edgeai cluster up` gives
its kwok nodes (NodeSpec.manifest).
"""

from __future__ import annotations

import json
import subprocess
import sys

from edgeai_operator import TIER_LABEL, ZONE_LABEL
from edgeai_operator.topology import load_topology


def main() -> int:
    topology_path, kubeconfig, kubectl = sys.argv[1:4]
    topology = load_topology(topology_path)
    base = [kubectl, f"--kubeconfig={kubeconfig}"]
    nodes = json.loads(subprocess.check_output([*base, "get", "nodes", "-o", "json"]))["items"]
    annotated = 0
    for node in nodes:
        labels = node["metadata"].get("labels", {})
        tier = labels.get(TIER_LABEL)
        if tier is None:
            continue
        zone = labels.get(ZONE_LABEL)
        spec = next((n for n in topology.nodes if n.tier == tier and n.zone == zone), None)
        if spec is None:
            print(
                f"node {node['metadata']['name']}: no node group of tier {tier!r}, zone {zone!r} "
                f"in {topology_path}",
                file=sys.stderr,
            )
            return 1
        annotations = spec.manifest(kwok=False)["metadata"]["annotations"]
        pairs = [f"{k}={v}" for k, v in sorted(annotations.items())]
        subprocess.run(
            [*base, "annotate", "--overwrite", "node", node["metadata"]["name"], *pairs],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        annotated += 1
    print(f"annotated {annotated} nodes from {topology_path}", file=sys.stderr)
    return 0 if annotated else 1


if __name__ == "__main__":
    sys.exit(main())
