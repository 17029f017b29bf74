"""spec.privacy.homomorphicHead on the real control plane: the operator plans the
trained digits_cnn with its last dense layer on the edge, priced from the measured
table, where the same deployment without the field stays on the device; the stage pods'
own commands, run as processes, serve held-out digits through the encrypted chain."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _cluster_support import Namespace, apply, condition, get, wait_for
from _serving import deployment, infer, serving_chain
from conftest import OperatorProcess
from edgeai_operator.problem import he_head_cost

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]


def _digits(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "edgeai.dev/v1alpha1",
        "kind": "DNNModel",
        "metadata": {"name": name},
        "spec": {
            "source": {"zoo": "digits_cnn"},
            "input": {"name": "input", "shape": [1, 1, 8, 8], "dtype": "FP32"},
        },
    }


def _planned(ns: Namespace, name: str) -> dict[str, Any]:
    def done() -> Any:
        obj = get(ns, "dnnd", name)
        return condition(obj, "Planned").get("status") == "True" and obj

    result: dict[str, Any] = wait_for(f"DNNDeployment {name} planned", done, 180)
    return result


def test_the_field_moves_the_head_to_the_edge_and_the_chain_serves_it(
    ns: Namespace, operator: OperatorProcess, tmp_path: Path
) -> None:
    from edgeai_worker import zoo

    plain = deployment("digits-plain", "digits")
    encrypted = deployment("digits-he", "digits")
    encrypted["spec"]["privacy"]["homomorphicHead"] = {"enabled": True}
    apply(ns, _digits("digits"), plain, encrypted)
    plain_status = _planned(ns, "digits-plain")["status"]
    he_status = _planned(ns, "digits-he")["status"]
    # the trained digits_cnn is small: the device runs it all, unless the head is encrypted
    assert plain_status["split"] == "device:0-8", plain_status["split"]
    assert he_status["split"] == "device:0-7 > edge:8", he_status["split"]
    cost = he_head_cost(64, 10)
    (transfer,) = he_status["plan"]["transfers"]
    assert (transfer["bytes"], transfer["returnBytes"]) == (cost["upBytes"], cost["downBytes"])
    assert he_status["plan"]["predictedLatencyMs"] > plain_status["plan"]["predictedLatencyMs"]

    _, _, x_test, y_test = zoo.digits_split()
    with serving_chain(ns, "digits-he", tmp_path) as url:
        scores = np.concatenate([infer(url, "digits", x[None], "input") for x in x_test[:60]])
    session = _plain_session()
    (expected,) = session.run(None, {"input": x_test[:60]})
    agreement = float((scores.argmax(axis=1) == np.asarray(expected).argmax(axis=1)).mean())
    print(f"digits-he: 60 held-out digits through the encrypted chain, agreement {agreement}")
    assert agreement >= 0.99
    assert float((scores.argmax(axis=1) == y_test[:60]).mean()) >= 0.95


def _plain_session() -> Any:
    import onnxruntime as ort

    from edgeai_worker import zoo

    path = zoo.export_onnx("digits_cnn", trained=True)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
