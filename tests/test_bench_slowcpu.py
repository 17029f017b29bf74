"""bench/dataplane/slowcpu.py: the data-plane benchmark's slower device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SLOWCPU = ROOT / "bench" / "dataplane" / "slowcpu.py"

PROGRAM = """
import json, sys, time
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [512, 512])
y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [512, 512])
graph = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "g", [x], [y])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
options = ort.SessionOptions()
options.intra_op_num_threads = 1
session = ort.InferenceSession(model.SerializeToString(), options)
feed = {"x": np.ones((512, 512), np.float32)}
runs = []
for _ in range(5):
    started, cpu = time.perf_counter(), time.thread_time()
    (out,) = session.run(None, feed)
    runs.append([time.perf_counter() - started, time.thread_time() - cpu])
print(json.dumps({"argv": sys.argv, "runs": runs, "sum": float(out[0, 0])}))
"""


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SLOWCPU), *argv], capture_output=True, text=True, timeout=120
    )


def test_every_run_takes_factor_times_its_cpu_time(tmp_path: Path) -> None:
    script = tmp_path / "program.py"
    script.write_text(PROGRAM)
    done = _run("3", str(script), "--flag", "value")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["argv"] == [str(script), "--flag", "value"]
    assert result["sum"] == 512.0  # the model still computes
    for wall, cpu in result["runs"]:
        assert cpu > 0
        # the run sleeps until 3x its CPU time inside onnxruntime has passed; the CPU
        # time measured out here adds the wrapper's own few microseconds
        assert wall >= 2.9 * cpu


def test_a_module_runs_with_its_arguments(tmp_path: Path) -> None:
    (tmp_path / "slowprog.py").write_text(PROGRAM)
    done = subprocess.run(
        [sys.executable, str(SLOWCPU), "2", "-m", "slowprog", "x"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert Path(result["argv"][0]).name == "slowprog.py"
    assert result["argv"][1:] == ["x"]
    assert all(wall >= 1.9 * cpu for wall, cpu in result["runs"])


def test_bad_factor_is_named() -> None:
    for factor in ("0.5", "fast"):
        done = _run(factor, "-m", "json.tool")
        assert done.returncode == 1
        assert "slowcpu: FACTOR must be a number >= 1, got" in done.stderr
        assert factor in done.stderr
