#!/usr/bin/env bash
# One-shot GPU check, run on a lent H200 machine from the repository root (its image has torch,
# JAX with CUDA, pytest and hypothesis; PEER-pytorch, einx and frozendict travel as wheels in .whl/).
# Writes one archive, $OUT/gpu.tgz: environment, the torch backend's tests on CUDA, the JAX
# conformance core on the GPU, and the benchmark at the paper preset on the GPU.
set -u
OUT=${OUT:-/tmp/gpu_out}
work=/tmp/gpu_results
mkdir -p "$OUT" "$work"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target /tmp/site .
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import sys, torch, jax; print(sys.version); print('torch', torch.__version__, torch.cuda.get_device_name(0)); print('jax', jax.__version__, jax.devices())"
} > "$work/env.txt" 2>&1
timeout 60 python3 -m pytest -p no:cacheprovider -q -rs tests/test_torch_backend.py > "$work/torch_tests.txt" 2>&1
echo "exit $?" >> "$work/torch_tests.txt"
timeout 80 python3 -m pytest -p no:cacheprovider -q -x --hypothesis-profile dev --peer-backend jax \
  --pyargs peer_conformance.test_forward peer_conformance.test_gradients peer_conformance.test_routing \
  > "$work/jax_gpu_conformance.txt" 2>&1
echo "exit $?" >> "$work/jax_gpu_conformance.txt"
timeout 130 python3 -m peer_bench --device gpu --preset paper --backends torch,peer_pytorch --paths eager \
  --sweep experts --out "$work/paper_torch" > "$work/bench_paper_torch.txt" 2>&1
echo "exit $?" >> "$work/bench_paper_torch.txt"
timeout 100 python3 -m peer_bench --device gpu --preset paper --backends jax --paths compiled \
  --sweep experts --out "$work/paper_jax" > "$work/bench_paper_jax.txt" 2>&1
echo "exit $?" >> "$work/bench_paper_jax.txt"
tar czf "$OUT/gpu.tgz" -C "$work" .
