"""Every pod the operator creates meets the Kubernetes "restricted" Pod Security Standard.

`restricted(spec)` returns a pod spec with the settings that standard asks for: the
pod runs as the images' non-root user (uid/gid 10001, `edgeai`), with the runtime's
default seccomp profile; each container (init containers too) may not escalate
privileges, drops every capability and has a read-only root filesystem. What a
program writes goes to an emptyDir: every container without a mount at /tmp gets the
pod's `tmp` emptyDir there (stage pods cut partitions and write their worker settings
under /tmp; the model files already have an emptyDir of their own).

Pure: builders call it on the pod specs they return, and tests check the literals.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

# the user the operator and worker images run as (hack/images/build.sh)
RUN_AS_USER = 10001
TMP_DIR = "/tmp"
TMP_VOLUME = "tmp"

POD_SECURITY_CONTEXT: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS_USER,
    "runAsGroup": RUN_AS_USER,
    "fsGroup": RUN_AS_USER,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY_CONTEXT: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
}


def restricted(spec: Mapping[str, Any]) -> dict[str, Any]:
    """`spec` (a PodSpec dict, not changed) with the restricted settings added."""
    out = copy.deepcopy(dict(spec))
    out["securityContext"] = {**out.get("securityContext", {}), **POD_SECURITY_CONTEXT}
    needs_tmp = False
    for kind in ("initContainers", "containers"):
        for container in out.get(kind, []):
            container["securityContext"] = copy.deepcopy(CONTAINER_SECURITY_CONTEXT)
            mounts = container.setdefault("volumeMounts", [])
            if not any(m["mountPath"] == TMP_DIR for m in mounts):
                mounts.append({"name": TMP_VOLUME, "mountPath": TMP_DIR})
                needs_tmp = True
    if needs_tmp:
        out.setdefault("volumes", []).append({"name": TMP_VOLUME, "emptyDir": {}})
    return out
