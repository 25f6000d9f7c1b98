"""NNCF's post-training quantization of an ONNX model, as a benchmark peer (run in a venv with nncf).

    PEERS/bin/python bench/peers/nncf_quantize.py fp32.onnx calib.npz out.onnx [--fast-bias-correction false]

``calib.npz`` holds one array per model input (named as the inputs); each row is one calibration
sample. NNCF's defaults otherwise (``nncf.quantize``: MinMax ranges, bias correction, its QDQ
layout). Kept out of edgecompress's environment: nncf pins its own dependencies.
"""

from __future__ import annotations

import argparse

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("out")
    ap.add_argument("--fast-bias-correction", choices=("true", "false"), default="true")
    args = ap.parse_args()
    import nncf
    import onnx

    model = onnx.load(args.model)
    with np.load(args.calib) as z:
        arrays = {k: z[k] for k in z.files}
    n = len(next(iter(arrays.values())))
    items = [{k: v[i : i + 1] for k, v in arrays.items()} for i in range(n)]
    q = nncf.quantize(model, nncf.Dataset(items), subset_size=n,
                      fast_bias_correction=args.fast_bias_correction == "true")
    onnx.save(q, args.out)


if __name__ == "__main__":
    main()
