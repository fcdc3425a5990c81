#!/usr/bin/env bash
# The torch backend's GPU checks in one run, for a machine with a CUDA device:
#   1. tests/test_torch_cuda.py: every kind vs the float64 NumPy reference on the device (forward, gradients, merge)
#      and the model-level checks against real HF PEFT on the same device (logits, loss, gradients, step, merge,
#      generate, mixed batch, prompt/prefix, half-precision bases, DoRA's peak memory);
#   2. benchmarks/compare_torch_peft.py on the device, float32 and bfloat16 bases, with each kind's agreement
#      with PEFT at the benchmark's shape.
# Results go to $OUT (default benchmarks/results/gpu); each step has its own time limit so a slow one cannot
# starve the next.  Usage: OUT=dir bash benchmarks/gpu_check.sh [dim] [tokens]
set -u
out=${OUT:-benchmarks/results/gpu}
dim=${1:-4096}
tokens=${2:-8192}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    $python -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'peft', peft.__version__)"
} >"$out/env.txt" 2>&1
cat "$out/env.txt"
timeout 300 $python -m pytest -q -n 8 -p no:cacheprovider -W ignore::UserWarning -W ignore::FutureWarning \
    tests/test_torch_cuda.py tests/test_torch_model.py::test_cuda_layers_follow_the_base_device 2>&1 |
    tee "$out/tests.txt" | tail -40
# the CuPy backend's LoRA/mixed-batch/DoRA kernels (NVRTC-compiled at first use) against the float64 reference
# and torch autograd, then their times (cupy-cuda13x must already be installed: the device has no network)
$python -c "import cupy" 2>/dev/null || echo "cupy is not installed: the CuPy kernel checks will skip" | tee "$out/cupy_missing.txt"
timeout 240 $python -m pytest -q -p no:cacheprovider tests/test_cuda_kernels_lora.py 2>&1 |
    tee "$out/kernels_lora.txt" | tail -20
# every kind on every layer type through the CuPy backend (kernels where they apply, the reference on CuPy
# elsewhere) against the float64 NumPy reference: tests/test_backend_kinds.py with the cupy driver
PEFTDECL_TEST_BACKENDS=numpy,cupy timeout 300 $python -m pytest -q -n 8 -p no:cacheprovider \
    tests/test_backend_kinds.py 2>&1 | tee "$out/kinds_cupy.txt" | tail -20
timeout 120 $python -W ignore benchmarks/cupy_kernels.py --dim "$dim" --tokens "$tokens" 2>&1 | tee "$out/bench_cupy_kernels.txt"
# the OFT/BOFT/IA3/VeRA/LoHa/LoKr/4-bit CuPy kernels against the NumPy reference, then the torch CUDA module again
# with the kernels switched off (the run above has them on: PEFTDECL_CUDA_KERNELS defaults to 1)
timeout 240 $python -m pytest -q -p no:cacheprovider tests/test_cuda_kernels_other.py 2>&1 |
    tee "$out/kernels_other.txt" | tail -20
PEFTDECL_CUDA_KERNELS=0 timeout 300 $python -m pytest -q -n 8 -p no:cacheprovider -W ignore::UserWarning \
    -W ignore::FutureWarning tests/test_torch_cuda.py 2>&1 | tee "$out/tests_kernels_off.txt" | tail -20
for dtype in float32 bfloat16; do
    timeout 150 $python -W ignore benchmarks/compare_torch_peft.py --device cuda --dtype "$dtype" --dim "$dim" \
        --tokens "$tokens" --rank 16 --rounds 5 --block 3 --trials 1 --in-process 2>&1 | tee "$out/bench_$dtype.txt"
done
# the same bfloat16 comparison with the torch backend's CUDA kernels off: their effect, in the same session
PEFTDECL_CUDA_KERNELS=0 timeout 150 $python -W ignore benchmarks/compare_torch_peft.py --device cuda --dtype bfloat16 \
    --dim "$dim" --tokens "$tokens" --rank 16 --rounds 5 --block 3 --trials 1 --in-process 2>&1 |
    tee "$out/bench_bfloat16_kernels_off.txt"
# mixed-adapter batches (adapter_names=) through the AdapterPool next to PEFT's mixed batch and loop, the torch
# backend's mixed-batch kernels on, then off: prefill 16 rows x 512 tokens over 8 adapters, decode 64 x 1 over 32
for kernels in 1 0; do
    for shape in "prefill 16 512 8" "decode 64 1 32"; do
        set -- $shape
        PEFTDECL_CUDA_KERNELS=$kernels timeout 200 $python -W ignore benchmarks/compare_pool.py --device cuda \
            --hidden 1024 --intermediate 2752 --rows "$2" --seq "$3" --adapters "$4" --rounds 3 --loads 2 \
            --out "$out/pool_$1_kernels$kernels" 2>&1 | tee "$out/bench_pool_$1_kernels$kernels.txt" | tail -16
    done
done
