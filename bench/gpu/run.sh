#!/usr/bin/env bash
# One-shot GPU check and benchmark, from the repository root on a machine with one CUDA GPU:
#
#   OUT=/path/to/results bash bench/gpu/run.sh
#
# 1. environment (env.txt);
# 2. correctness on the GPU, float32 tolerance (which catches TF32): the kernel tests and the
#    conformance core for every torch and JAX implementation (aten, triton; xla, pallas), tensors
#    on the GPU (kernels_*.txt, conformance_*.txt);
# 3. the `gpu` benchmark preset (d_model=1024, N=1024^2, heads=8, topk=16, d_key=128, 32768
#    tokens; float32 and bfloat16 mixed precision; the token sweep 2048 -> 65536), every
#    implementation side by side with PEER-pytorch and the dense FFN of equal FLOPs (bench/).
# Every step has a time limit (13 minutes in all at most; about 10 expected on one H200). Results
# go to $OUT (default bench/out/gpu). PRESET=smoke DEVICE=cpu runs the same steps on a CPU (the
# kernels interpreted), to check the script itself. Wheels in .whl/ (e.g. PEER-pytorch and its
# dependencies on a machine without a package index) are installed first when present.
set -u
OUT=${OUT:-bench/out/gpu}
PRESET=${PRESET:-gpu}
DEVICE=${DEVICE:-gpu}
PROFILE=${PROFILE:-kernels}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ "$DEVICE" = cpu ]; then export TRITON_INTERPRET=1; fi
if ! python3 -c "import peer_backends" 2>/dev/null; then
  site=$(mktemp -d)
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl
  fi
  python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target "$site" .
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

step() {  # step NAME SECONDS COMMAND...: run with a limit, output and exit status into $OUT/NAME.txt
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/$name.txt"
}

{
  date -u; git rev-parse HEAD 2>/dev/null; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import sys, torch; print(sys.version); print('torch', torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))"
  python3 -c "import triton; print('triton', triton.__version__)"
  python3 -c "import jax; print('jax', jax.__version__, jax.devices())"
} > "$OUT/env.txt" 2>&1

# Conformance with torch tensors on the GPU: the suite builds them with from_numpy, which puts
# them on torch's default device.
TORCH_ON_DEVICE="import sys, torch, pytest; torch.set_default_device('cuda' if torch.cuda.is_available() else 'cpu'); sys.exit(pytest.main(sys.argv[1:]))"
CORE="--pyargs peer_conformance.test_forward peer_conformance.test_gradients peer_conformance.test_routing peer_conformance.test_mask"
step kernels_torch 60 python3 -m pytest -p no:cacheprovider -q -x tests/test_torch_kernels.py
step kernels_jax 60 python3 -m pytest -p no:cacheprovider -q -x tests/test_jax_kernels.py
for impl in triton aten; do
  # shellcheck disable=SC2086
  step conformance_torch_$impl 45 python3 -c "$TORCH_ON_DEVICE" -p no:cacheprovider -q -x \
    --hypothesis-profile "$PROFILE" --peer-backend torch --peer-implementation $impl $CORE
done
for impl in pallas xla; do
  # shellcheck disable=SC2086
  step conformance_jax_$impl 75 python3 -m pytest -p no:cacheprovider -q -x \
    --hypothesis-profile "$PROFILE" --peer-backend jax --peer-implementation $impl $CORE
done
step bench 420 python3 -m peer_bench --device "$DEVICE" --preset "$PRESET" --paths eager,compiled --no-glu \
  --backends torch:aten,torch:triton,jax:xla,jax:pallas,peer_pytorch --out "$OUT/bench"
echo "results in $OUT"
