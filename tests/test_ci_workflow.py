"""The example GitHub Actions workflow's commands, run locally (install, cache and apt steps excluded).

Three runs: on main (no baseline yet; it becomes the baseline), then two pull requests: one whose
change only moves the noise (nothing flagged), one that costs accuracy (flagged, exit 4, and the job
summary still written).
"""

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


def _workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def _steps(job: str = "compress") -> list[dict]:
    return _workflow()["jobs"][job]["steps"]


def _runs(step: dict, *, main: bool, failed: bool) -> bool:
    """Whether Actions would run the step: ``always()`` runs after a failure, a ``refs/heads/main``
    condition only on main, any other step only while nothing failed."""
    cond = str(step.get("if", ""))
    if "always()" in cond:
        return True
    if failed:
        return False
    return main if "refs/heads/main" in cond else True


def _run_workflow(workdir: Path, *, main: bool) -> list[int]:
    """Run the compress job's `run:` steps the way Actions does (bash -e, stop at the first failure);
    returns the exit codes of the steps that ran."""
    summary = workdir / "step-summary.md"
    env = {**os.environ, **_workflow()["env"], "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "GITHUB_STEP_SUMMARY": str(summary), "REPORT_URL": "https://example.invalid/artifact/1"}  # fmt: skip
    codes, failed = [], False
    for step in _steps():
        if "run" not in step or step.get("name", "").startswith("Install") or step["run"].startswith("sudo"):
            continue
        if not _runs(step, main=main, failed=failed):
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
    install = next(s for s in steps if s.get("name", "").startswith("Install edgecompress"))
    assert "constraints.txt" in install["run"]
    restore = next(s for s in steps if s.get("uses", "").startswith("actions/cache/restore"))
    save = next(s for s in steps if s.get("uses", "").startswith("actions/cache/save"))
    assert restore["with"]["path"] == save["with"]["path"] == "baseline-run"
    assert save["with"]["key"].startswith(restore["with"]["restore-keys"]) and "refs/heads/main" in save["if"]
    arm = _steps("arm64")
    assert _workflow()["jobs"]["arm64"]["needs"] == "compress"
    assert any(s.get("uses", "").startswith("actions/download-artifact") for s in arm)
    assert any("make device-emu" in s.get("run", "") for s in arm)
    check = next(s["run"] for s in arm if "compress check" in s.get("run", ""))
    assert "ci-run/artifacts/arm64-linux-tvm" in check and "--rpc" in check and "--max-accuracy-drop" in check


def _recipe(work: Path) -> Path:
    return work / "examples" / "ci" / "recipe.yaml"


def _edit_recipe(work: Path, edit) -> None:
    recipe = yaml.safe_load(_recipe(work).read_text())
    edit(recipe)
    _recipe(work).write_text(yaml.safe_dump(recipe))


def test_workflow_flags_a_regression_and_not_noise(tmp_path):
    work = tmp_path / "repo"
    _recipe(work).parent.mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "ci" / "recipe.yaml", _recipe(work))

    # main: no baseline yet; the run passes its absolute gates and is kept as the baseline.
    assert _run_workflow(work, main=True) == [0, 0, 0]
    first = json.loads((work / "ci-summary.json").read_text())
    assert first["passed"] and "comparison" not in first and (work / "baseline-run" / "summary.json").is_file()
    arm = next(r for r in first["results"] if r["target"] == "arm64-linux")
    assert arm["pending_gates"] and not arm["failed_gates"]  # checked by the arm64 job, not failed as unmeasured

    # A pull request that changes nothing the model depends on: only noise moves, nothing is flagged.
    _edit_recipe(work, lambda r: r.__setitem__("name", "ci-renamed"))
    codes = _run_workflow(work, main=False)
    noise = json.loads((work / "ci-summary.json").read_text())
    assert codes == [0, 0], json.dumps(noise.get("comparison", noise), indent=1)[:4000]  # what was flagged
    comp = noise["comparison"]
    assert noise["passed"] and comp["passed"] and not comp["failures"]
    rows = {(r["target"], r["measure"]): r for r in comp["rows"]}
    assert rows[("x86-64", "artifact")]["verdict"].startswith("identical")
    assert rows[("x86-64", "artifact")]["change"] == "timed side by side"
    assert rows[("x86-64", "top1")]["verdict"] == "unchanged"
    # the same bytes timed side by side: any gap is the two sessions', never a regression
    assert rows[("x86-64", "p50 ms")]["verdict"] == "within noise" or rows[("x86-64", "p50 ms")]["verdict"].endswith(
        "one artifact in two sessions (not the change's)")  # fmt: skip
    page = (work / "step-summary.md").read_text()
    assert "Against the baseline" in page and "| x86-64 | onnx | p50 ms |" in page
    assert "[Full report with plots](https://example.invalid/artifact/1)" in page

    # A pull request that costs accuracy (a one-shot 2:4 stage before PTQ; the absolute accuracy gate
    # relaxed so that only the regression gate can catch it): exit 4, and the job summary still written.
    # The sparse model's search may pick another configuration that is really slower, which the latency
    # regression gate rightly flags (it did in one CI run); it is relaxed so this checks accuracy alone.
    def worse(r: dict) -> None:
        r["stages"].insert(0, {"sparsify": {"pattern": "2:4", "method": "oneshot"}})
        r["gates"]["x86-64"]["max_accuracy_drop"] = 50.0
        r["gates"]["x86-64"]["max_latency_regression"] = "1000%"

    _edit_recipe(work, worse)
    (work / "step-summary.md").unlink()
    assert _run_workflow(work, main=False) == [4, 0], "a regression must fail the job; the summary step still runs"
    bad = json.loads((work / "ci-summary.json").read_text())
    assert not bad["passed"] and [f["gate"] for f in bad["failures"]] == ["max_accuracy_regression"]
    page = (work / "step-summary.md").read_text()
    assert page.startswith("### ❌") and "REGRESSED" in page and "max_accuracy_regression" in page
