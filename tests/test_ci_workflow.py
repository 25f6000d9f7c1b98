"""The example GitHub Actions workflow's commands, run locally (install step excluded)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / "examples" / "ci" / "edgecompress.yml"


def _steps() -> list[dict]:
    wf = yaml.safe_load(WORKFLOW.read_text())
    return wf["jobs"]["compress"]["steps"]


def _run_workflow(workdir: Path) -> list[int]:
    """Run every `run:` step after the install step the way Actions does (bash, stop at the first failure,
    `if: always()` steps run anyway). Returns the exit codes."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    codes, failed = [], False
    for step in _steps():
        if "run" not in step or step.get("name", "").startswith("Install"):
            continue
        if failed and step.get("if") != "always()":
            continue
        res = subprocess.run(["bash", "-e", "-c", step["run"]], cwd=workdir, env=env, capture_output=True, text=True,
                             timeout=900)  # fmt: skip
        codes.append(res.returncode)
        failed = failed or res.returncode != 0
    return codes


def test_workflow_shape():
    steps = _steps()
    uses = [s.get("uses", "") for s in steps]
    assert any(u.startswith("actions/checkout") for u in uses) and any(u.startswith("actions/upload-artifact") for u in uses)
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload.get("if") == "always()" and "ci-run/" in upload["with"]["path"]
    install = next(s for s in steps if s.get("name", "").startswith("Install"))
    assert "constraints.txt" in install["run"]


def test_workflow_commands_pass_then_fail_on_a_gate(tmp_path):
    work = tmp_path / "repo"
    (work / "examples" / "ci").mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "ci" / "recipe.yaml", work / "examples" / "ci" / "recipe.yaml")
    assert _run_workflow(work) == [0, 0]
    summary = json.loads((work / "ci-summary.json").read_text())
    assert summary["passed"] and (work / "ci-run" / "report.html").exists()
    assert summary["results"][0]["metrics"]["size_bytes"] < 0.5e6

    recipe = yaml.safe_load((work / "examples" / "ci" / "recipe.yaml").read_text())
    recipe["gates"]["x86-64"]["max_size_mb"] = 0.01
    (work / "examples" / "ci" / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    codes = _run_workflow(work)
    assert codes == [4, 0], "a failed gate must fail the job (exit 4) and the report step must still run"
    assert json.loads((work / "ci-summary.json").read_text())["failures"][0]["gate"] == "max_size_mb"
