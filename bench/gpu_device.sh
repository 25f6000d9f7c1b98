#!/bin/bash
# On the GPU machine, from the folder `python bench/gpu_check.py prepare` wrote (copied there as run.sh):
# install the carried wheels and TVM runtime, then the GPU checks. Results go to $OUT (default ./results).
cd "$(dirname "$0")"
OUT=${OUT:-$PWD/results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site whl/*.whl || exit 1
tar -xzf tvm-runtime.tar.gz -C /tmp/site || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
NVLIB=$(python3 - <<'PY'
import glob, os
try:
    import nvidia
    base = list(nvidia.__path__)
except ImportError:
    base = []
dirs = {os.path.dirname(p) for b in base for p in glob.glob(b + "/**/lib*.so*", recursive=True)}
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=$NVLIB:${LD_LIBRARY_PATH:-}
nvidia-smi -L; which nvcc; nvcc --version | tail -1
python3 -c "import tvm, runtimes.cuda_jit as j; j.ensure_cuda_runtime(); print('tvm', tvm.__version__, 'runtime-only', tvm.base._RUNTIME_ONLY, 'cuda exists', tvm.cuda(0).exist, tvm.cuda(0).compute_version)"
cd src
timeout 330 python3 bench/gpu_check.py run --dir .. --out "$OUT" ${GPU_MODELS:+--models $GPU_MODELS}; echo "gpu_check rc=$?"
[ -n "${SKIP_NM:-}" ] || timeout 100 python3 bench/gpu_nm_check.py --out "$OUT"; echo "gpu_nm_check rc=$?"
# The product path on the GPU machine: compress check / profile with the runtime-only TVM.
export EDGECOMPRESS_CACHE=/tmp/ec-cache
timeout 150 python3 -m edgecompress.compress.cli.app check ../cnn-cuda-sm90 -d ../digits.npz --reference ../cnn.pt; echo "check rc=$?"
timeout 120 python3 -m edgecompress.compress.cli.app profile ../vit-cuda-sm90; echo "profile rc=$?"
