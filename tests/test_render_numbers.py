"""bench/render_numbers.py: the docs' tables of numbers rendered from docs/results/*.json."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from _bench_modules import load_script

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "render_numbers.py"


rn = load_script(SCRIPT, "render_numbers")


def _speed_table(report: Mapping[str, Any]) -> str:
    return "\n".join(f"| {r['name']} | {r['ms']:.1f} |" for r in report["rows"])


RENDERERS = {"speed": rn.Renderer("speed.json", _speed_table)}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    directory = tmp_path / "results"
    directory.mkdir()
    rows = [{"name": "chain", "ms": 1.25}, {"name": "dag", "ms": 64.04}]
    (directory / "speed.json").write_text(json.dumps({"rows": rows}))
    return directory


def _doc(tmp_path: Path, text: str, name: str = "guide.md") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


DOC = "# Speed\n\nBefore.\n\n<!-- numbers:speed -->\nold table\n<!-- /numbers -->\n\nAfter.\n"


def test_a_marked_region_is_rendered_from_its_json_and_the_rest_is_kept(
    tmp_path: Path, results: Path
) -> None:
    doc = _doc(tmp_path, DOC)
    rendered = rn.render_docs([doc], RENDERERS, results)[doc]
    assert rendered.text == (
        "# Speed\n\nBefore.\n\n<!-- numbers:speed -->\n"
        "| chain | 1.2 |\n| dag | 64.0 |\n"
        "<!-- /numbers -->\n\nAfter.\n"
    )
    assert rendered.regions == ("speed",)
    assert rendered.changed == ("speed",)


def test_rendering_is_idempotent(tmp_path: Path, results: Path) -> None:
    doc = _doc(tmp_path, DOC)
    once = rn.render_docs([doc], RENDERERS, results)[doc].text
    doc.write_text(once)
    again = rn.render_docs([doc], RENDERERS, results)[doc]
    assert again.text == once
    assert again.changed == ()


def test_a_region_in_a_list_item_keeps_its_indentation(tmp_path: Path, results: Path) -> None:
    doc = _doc(tmp_path, "- item:\n  <!-- numbers:speed -->\n  <!-- /numbers -->\n- next\n")
    text = rn.render_docs([doc], RENDERERS, results)[doc].text
    assert text == (
        "- item:\n  <!-- numbers:speed -->\n  | chain | 1.2 |\n  | dag | 64.0 |\n"
        "  <!-- /numbers -->\n- next\n"
    )
    doc.write_text(text)
    assert rn.render_docs([doc], RENDERERS, results)[doc].changed == ()


def test_a_hand_edited_number_is_reported_as_changed(tmp_path: Path, results: Path) -> None:
    doc = _doc(tmp_path, DOC)
    doc.write_text(rn.render_docs([doc], RENDERERS, results)[doc].text.replace("64.0", "6.4"))
    assert rn.render_docs([doc], RENDERERS, results)[doc].changed == ("speed",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "a\n<!-- numbers:speed -->\nx\n",
            "guide.md:2: <!-- numbers:speed --> is never closed (<!-- /numbers --> missing)",
        ),
        (
            "a\n\n<!-- /numbers -->\n",
            "guide.md:3: <!-- /numbers --> without an opening <!-- numbers:NAME -->",
        ),
        (
            "<!-- numbers:speed -->\n<!-- numbers:speed -->\n<!-- /numbers -->\n",
            "guide.md:2: <!-- numbers:speed --> opens while <!-- numbers:speed --> (line 1) "
            "is not closed by <!-- /numbers -->",
        ),
        (
            "<!-- numbers:sped -->\n<!-- /numbers -->\n",
            "guide.md:1: unknown region <!-- numbers:sped --> (accepted: speed)",
        ),
    ],
)
def test_unbalanced_or_unknown_markers_name_the_file_line_and_marker(
    tmp_path: Path, results: Path, text: str, message: str
) -> None:
    doc = _doc(tmp_path, text)
    with pytest.raises(rn.NumbersError) as err:
        rn.render_docs([doc], RENDERERS, results)
    assert str(err.value) == message


def test_a_region_missing_from_every_doc_is_an_error(tmp_path: Path, results: Path) -> None:
    doc = _doc(tmp_path, "no markers here\n")
    with pytest.raises(rn.NumbersError) as err:
        rn.render_docs([doc], RENDERERS, results)
    assert str(err.value) == (
        "region numbers:speed (speed.json) is in none of guide.md: "
        "add <!-- numbers:speed --> <!-- /numbers -->"
    )


def test_a_missing_result_file_is_named(tmp_path: Path, results: Path) -> None:
    (results / "speed.json").unlink()
    doc = _doc(tmp_path, DOC)
    with pytest.raises(rn.NumbersError, match=r"region numbers:speed: cannot read .*speed\.json"):
        rn.render_docs([doc], RENDERERS, results)


def _copy_repo_docs(tmp_path: Path) -> Path:
    """README.md, docs/*.md and docs/results/ under tmp_path, as the script sees the repo."""
    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "render_numbers.py").write_text(SCRIPT.read_text())
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        (tmp_path / path.relative_to(ROOT)).write_text(path.read_text())
    for path in (ROOT / "docs" / "results").glob("*.json"):
        (tmp_path / path.relative_to(ROOT)).write_text(path.read_text())
    return tmp_path


def _run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / "bench" / "render_numbers.py"), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_committed_docs_match_their_results() -> None:
    run = _run(ROOT, "--check")
    assert run.returncode == 0, run.stderr


def test_check_fails_on_a_hand_edited_number_and_rendering_repairs_it(tmp_path: Path) -> None:
    root = _copy_repo_docs(tmp_path)
    readme = root / "README.md"
    original = readme.read_text()
    # the first digit inside the region, changed by hand
    digit = re.compile(r"\d").search(original, original.index("<!-- numbers:operator-summary -->"))
    assert digit is not None
    i = digit.start()
    edited = original[:i] + str((int(original[i]) + 1) % 10) + original[i + 1 :]
    readme.write_text(edited)

    check = _run(root, "--check")
    assert check.returncode == 1
    assert "README.md: numbers:operator-summary differs from docs/results/operator.json" in (
        check.stderr
    )
    assert readme.read_text() == edited  # --check writes nothing

    render = _run(root)
    assert render.returncode == 0, render.stderr
    assert readme.read_text() == original
    assert _run(root, "--check").returncode == 0


def test_every_committed_result_renders_a_region_of_the_docs() -> None:
    rendered = rn.render_docs(rn.default_docs())
    regions = [region for r in rendered.values() for region in r.regions]
    assert sorted(regions) == sorted(rn.RENDERERS)
    sources = {r.source for r in rn.RENDERERS.values()}
    assert sources == {p.name for p in rn.RESULTS_DIR.glob("*.json")}


def _result(measured_ms: float, predicted_ms: float, **extra: Any) -> dict[str, Any]:
    return {"measured_ms": measured_ms, "predicted_ms": predicted_ms,
            "ratio": measured_ms / predicted_ms, **extra}  # fmt: skip


DATAPLANE_REPORT: dict[str, Any] = {
    "models": [
        {
            "model": "alexnet_like",
            "scenarios": [
                {
                    "uplink_mbps": 1.0,
                    "plan": "device[0-18]",
                    "partitioned_vs_best_single": 1.0,
                    "results": {
                        "partitioned (planner)": _result(44.0, 42.0, same_as="device-only"),
                        "device-only": _result(44.0, 42.0),
                        "cloud-only": _result(5000.0, 4900.0),
                    },
                },
                {
                    "uplink_mbps": 100.0,
                    "plan": "device[0-2] + edge[3-18]",
                    "partitioned_vs_best_single": 0.75,
                    "results": {
                        "partitioned (planner)": _result(30.0, 30.0),
                        "device-only": _result(40.0, 50.0),
                        "cloud-only": _result(110.0, 115.0),
                    },
                },
            ],
        }
    ],
    "hops": [
        {"path": "edge->cloud, shaped", "bytes": 602304, "ratio": 1.0, "model_ratio": 1.01},
        {"path": "same namespace", "bytes": 43454, "ratio": 1.35, "model_ratio": 1.6},
    ],
    "encoding": {"size_ratio": 0.204, "encode_ratio": 0.0003, "decode_ratio": 0.0001},
}


def test_a_dataplane_report_is_summarised_as_the_tables_show_it() -> None:
    summary = rn.dataplane_run_summary(DATAPLANE_REPORT, "Z", "2026-12-01 10:00 UTC")
    assert summary["goal1"] == {
        "inRange": 4,
        "of": 5,
        "ratioMin": 0.8,
        "ratioMax": pytest.approx(44 / 42),
        "misses": [{"run": "Z", "config": "alexnet_like device-only @100 Mb", "ratio": 0.8}],
    }
    assert summary["goal2"] == {"alexnet_like @100 Mb": 0.75}
    assert summary["splitSpeedupOverDeviceOnly"] == {"alexnet_like @100 Mb": pytest.approx(4 / 3)}
    assert summary["goal3"] == {
        "binary path (a stage without a model)": {
            "602 KB, shaped link": [1.0, 1.0],
            "43 KB, one namespace": [1.35, 1.35],
        },
        "with an Identity model (+ onnxruntime)": {
            "602 KB, shaped link": [1.01, 1.01],
            "43 KB, one namespace": [1.6, 1.6],
        },
    }

    committed = json.loads((rn.RESULTS_DIR / "dataplane.json").read_text())
    committed["runs"].append(summary)
    table = rn.dataplane_runs(committed)
    assert (
        "| Z | 2026-12-01 10:00 UTC | 4 of 5 (0.80-1.05); out of range: alexnet_like "
        "device-only @100 Mb 0.80 | alexnet_like @100 Mb 0.75 | alexnet_like @100 Mb 1.33x |"
    ) in table
    assert "| binary path (a stage without a model), run Z | 1.00 | - | - | 1.35 |" in table
    assert "- run Z: size 0.204, encoding time 0.0003, decoding time 0.0001" in table
    assert "Runs V-Z:" in rn.dataplane_summary(committed)


def test_an_e2e_report_that_left_out_steps_is_not_rendered() -> None:
    committed = json.loads((rn.RESULTS_DIR / "e2e-kind.json").read_text())
    assert "inference" in committed["steps"]
    with pytest.raises(rn.NumbersError, match="left out training, scale"):
        rn.e2e_kind_results({**committed, "skipped": ["training", "scale"]})
