#!/usr/bin/env bash
# The prepared GPU check (issue 5), for the lent GPU machine: run from the repository root as
#   bash benchmarks/gpu.sh [SECONDS_FOR_TRAINING]
# It uses that machine's own python3 and torch (nothing can be installed there) with our source
# on PYTHONPATH, and writes everything under $OUT (or ./gpu-out):
#   1. the Omniglot (and MiniImagenet-shaped) benchmark on CUDA: fastmaml's eager, automatic and
#      automatic-with-compile (the compiled graph as a search candidate) paths, the loop, and higher / TorchOpt / parallel-metalearn where that machine has
#      them -> gpu-bench.json / .txt, then
#      the same with TF32 tensor cores (engine and loop, no compile) -> gpu-bench-tf32.json / .txt
#   2. reduced precision (bf16 autocast, TF32) against fp64 meta-gradients -> gpu-precision.json / .txt,
#      and the norms' batched meta-gradients against looped ones in fp64 -> gpu-exactness.json / .txt
#   3. if Omniglot is reachable ($FASTMAML_OMNIGLOT or ../shared/data/omniglot) and the CLI's
#      packages import there: the full omniglot-5w1s preset for SECONDS_FOR_TRAINING (default 240),
#      checkpointed, then evaluated on the 600 meta-test tasks.
set -uo pipefail
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"
python3 benchmarks/run.py --device cuda --workloads omniglot-5w1s-q5,omniglot-5w1s-q75,omniglot-20w1s,miniimagenet-5w1s \
    --impls fastmaml,fastmaml-auto,fastmaml-auto-compiled,loop,higher,torchopt,torchopt-vmap,parallel-metalearn --repeats 10 \
    --json "$out/gpu-bench.json" 2>&1 | tee "$out/gpu-bench.txt"
python3 benchmarks/run.py --device cuda --precision tf32 --workloads omniglot-5w1s-q5,omniglot-5w1s-q75,omniglot-20w1s,miniimagenet-5w1s \
    --impls fastmaml,loop --repeats 10 --json "$out/gpu-bench-tf32.json" 2>&1 | tee "$out/gpu-bench-tf32.txt"
python3 benchmarks/precision.py --device cuda --workloads omniglot-5w1s-q5,omniglot-5w1s-q75,omniglot-20w1s \
    --json "$out/gpu-precision.json" 2>&1 | tee "$out/gpu-precision.txt"
python3 benchmarks/exactness.py --device cuda --json "$out/gpu-exactness.json" 2>&1 \
    | tee "$out/gpu-exactness.txt"
data="${FASTMAML_OMNIGLOT:-$PWD/../shared/data/omniglot}"
if [ -d "$data/images_background" ] && python3 -c "import tqdm, yaml, matplotlib, PIL" 2>/dev/null; then
    run="$out/omniglot-5w1s"
    FASTMAML_CACHE="$out/cache" timeout "${1:-240}" python3 -m fastmaml train omniglot-5w1s --out "$run" \
        --data-root "$data" device=cuda checkpoint_every=1000 --no-progress 2>&1 | tail -5 | tee "$out/train.txt"
    FASTMAML_CACHE="$out/cache" python3 -m fastmaml eval "$run" device=cuda --no-progress 2>&1 | tee "$out/eval.txt"
    rm -rf "$out/cache"
else
    echo "skipped training: no Omniglot at $data or the CLI's packages are missing" | tee "$out/train.txt"
fi
