"""Bad input gets a named error and an exit code, never a raw traceback or lost work.

Every row of the README's bad-input table is a case here; the test builds the table from what
the commands printed and checks the README holds it (``EDGECOMPRESS_UPDATE_README=1`` rewrites
the README's block instead).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- bad-inputs:start -->", "<!-- bad-inputs:end -->"


def _message(err: str, tmp: Path) -> str:
    lines = [ln.strip() for ln in err.splitlines() if ln.strip().startswith(("error:", "internal error"))]
    text = (lines[0] if lines else err.strip().splitlines()[-1]).removeprefix("error: ")
    text = text.replace(str(tmp), "W").replace("|", "\\|")
    text = re.sub(r"/tmp/\S+?/(W/)?", "W/", text)
    return text if len(text) <= 150 else text[:147] + "..."


@pytest.fixture(scope="module")
def cases(cnn_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    from edgecompress.compress.cli.app import main

    tmp = tmp_path_factory.mktemp("bad")
    rows: list[dict] = []

    def run(what: str, shown: str, *args: object) -> tuple[int, str]:
        import contextlib
        import io

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main([str(a) for a in args])
        rows.append({"input": what, "command": shown, "exit": code, "message": _message(err.getvalue(), tmp)})
        return code, err.getvalue()

    art = tmp / "art"
    assert main(["export", str(cnn_checkpoint), "-o", str(art)]) == 0

    raw = cnn_checkpoint.read_bytes()
    (tmp / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    run("truncated checkpoint", "compress export truncated.pt -o out/", "export", tmp / "truncated.pt", "-o", tmp / "o1")

    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), tmp / "pickled.pt")  # a whole module: code on load
    run("checkpoint that unpickles code", "compress export pickled.pt -o out/", "export", tmp / "pickled.pt", "-o",
        tmp / "o2")  # fmt: skip

    state = torch.load(cnn_checkpoint, map_location="cpu", weights_only=True)
    first = next(k for k, v in state["state_dict"].items() if v.is_floating_point())
    state["state_dict"][first] = torch.full_like(state["state_dict"][first], float("nan"))
    torch.save(state, tmp / "nan_weights.pt")
    run("model with NaN weights", "compress export nan_weights.pt -o out/", "export", tmp / "nan_weights.pt", "-o",
        tmp / "o3")  # fmt: skip

    x = np.random.default_rng(0).standard_normal((20, 1, 28, 28)).astype(np.float32)
    y = np.arange(20) % 10
    for name, bad in (("NaN", np.nan), ("Inf", np.inf)):
        xb = x.copy()
        xb[3, 0, 5, 5] = bad
        np.savez(tmp / f"{name}.npz", x=xb, y=y)
        run(f"{name} in the data", f"compress check art/ --eval-data {name}.npz", "check", art, "--eval-data",
            tmp / f"{name}.npz")  # fmt: skip
    np.savez(tmp / "shape.npz", x=np.zeros((20, 1, 32, 32), np.float32), y=y)
    np.savez(tmp / "ok.npz", x=x, y=y)
    run("data of the wrong shape (32x32 for 28x28)", "compress quantize model.pt --calib-data shape.npz "
        "--eval-data ok.npz -o q/", "quantize", cnn_checkpoint, "--calib-data", tmp / "shape.npz", "--eval-data",
        tmp / "ok.npz", "-o", tmp / "q1")  # fmt: skip
    np.savez(tmp / "labels.npz", x=x, y=y + 5)
    run("labels out of range (5..14 for 10 classes)", "compress check art/ --eval-data labels.npz", "check", art,
        "--eval-data", tmp / "labels.npz")  # fmt: skip
    np.savez(tmp / "empty.npz", x=np.zeros((0, 1, 28, 28), np.float32))
    run("an empty calibration set", "compress quantize model.pt --calib-data empty.npz --eval-data ok.npz -o q/",
        "quantize", cnn_checkpoint, "--calib-data", tmp / "empty.npz", "--eval-data", tmp / "ok.npz", "-o",
        tmp / "q2")  # fmt: skip

    det = oh.make_model(oh.make_graph([oh.make_node("Det", ["m"], ["d"])], "g",
                                      [oh.make_tensor_value_info("m", onnx.TensorProto.FLOAT, [1, 3, 3])],
                                      [oh.make_tensor_value_info("d", onnx.TensorProto.FLOAT, [1])]),
                        opset_imports=[oh.make_opsetid("", 17)])  # fmt: skip
    onnx.save(det, tmp / "det.onnx")
    run("ONNX operator TVM cannot compile (Det)", "compress export det.onnx --format tvm -o t/", "export",
        tmp / "det.onnx", "--format", "tvm", "-o", tmp / "t1")  # fmt: skip
    run("unknown target", "compress export model.pt --target pi9 -o out/", "export", cnn_checkpoint, "--target", "pi9",
        "-o", tmp / "o4")  # fmt: skip
    (tmp / "recipe.yaml").write_text("version: 1\nmodel: {example: cnn}\ndata: mnist\nstages:\n  - qat: {bitz: 4}\n")
    run("invalid recipe (a misspelt stage key)", "compress run recipe.yaml -o run/", "run", tmp / "recipe.yaml", "-o",
        tmp / "run")  # fmt: skip

    # A training killed mid-run, then rerun with --resume: it continues from its checkpoint.
    out = tmp / "qat"
    cmd = [sys.executable, "-m", "edgecompress.compress.cli.app", "qat", str(cnn_checkpoint), "--data", "mnist", "--bits", "8",
           "--method", "qat", "--max-steps", "80", "--checkpoint-every", "5", "--eval-every", "1000",
           "--max-drop", "100", "-o", str(out)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state_file = out / "train" / "train_state.pt"
    deadline = time.time() + 300
    while not state_file.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert state_file.exists(), "QAT never wrote a training checkpoint"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    res = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    log = [json.loads(ln) for ln in (out / "train" / "train_log.jsonl").read_text().splitlines()]
    resumed = [r["step"] for r in log if r.get("event") == "resumed"]
    steps = [r["step"] for r in log if "event" not in r]
    rows.append({"input": "training killed (SIGKILL) mid-run", "command": "compress qat ... then the same with --resume",
                 "exit": res.returncode,
                 "message": "resumed from its last checkpoint and finished all 80 steps; nothing lost"
                 if len(resumed) == 1 and resumed[0] > 0 and steps and steps[-1] == 80 else f"did not resume: {resumed}"})  # fmt: skip
    return rows


EXPECTED = {
    "truncated checkpoint": (2, "truncated"),
    "checkpoint that unpickles code": (2, "--trust-pickle"),
    "model with NaN weights": (2, "NaN"),
    "NaN in the data": (2, "NaN"),
    "Inf in the data": (2, "inf"),
    "data of the wrong shape (32x32 for 28x28)": (2, "expected 28"),
    "labels out of range (5..14 for 10 classes)": (2, "10 classes"),
    "an empty calibration set": (2, "empty"),
    "ONNX operator TVM cannot compile (Det)": (3, "Det"),
    "unknown target": (2, "pi9"),
    "invalid recipe (a misspelt stage key)": (2, "bitz"),
    "training killed (SIGKILL) mid-run": (0, "resumed from its last checkpoint"),
}


def test_each_bad_input_is_named_with_its_exit_code(cases: list[dict]) -> None:
    got = {r["input"]: r for r in cases}
    assert set(got) == set(EXPECTED)
    for what, (code, needle) in EXPECTED.items():
        r = got[what]
        assert r["exit"] == code, f"{what}: exit {r['exit']} ({r['message']})"
        assert needle.lower() in r["message"].lower(), f"{what}: {r['message']}"
        assert "internal error" not in r["message"] and "Traceback" not in r["message"]


def test_readme_bad_input_table_is_what_the_commands_print(cases: list[dict]) -> None:
    lines = ["| input | command | exit | message |", "|---|---|---|---|"]
    lines += [f"| {r['input']} | `{r['command']}` | {r['exit']} | {r['message']} |" for r in cases]
    table = "\n".join(lines)
    text = README.read_text()
    assert START in text and END in text, "the README lacks the bad-input block"
    block = text[text.index(START) + len(START) : text.index(END)].strip()
    if os.environ.get("EDGECOMPRESS_UPDATE_README") == "1":
        README.write_text(text.replace(block, table) if block else text.replace(START + END, f"{START}\n{table}\n{END}"))
        return
    assert block == table, "README's bad-input table is stale: rerun with EDGECOMPRESS_UPDATE_README=1"
