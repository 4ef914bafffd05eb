#!/usr/bin/env bash
# The GPU checks in one go, for a machine with a CUDA device and little time on it: the GPU
# tests, one layer's attention at 8k tokens, the training benchmark as the h100 profile trains
# (large, then small, at 8192 tokens, each with its step's kernels by family), the real trainer
# for a few steps under that profile ("trainer": needs DATASET and VOCAB), the large model's
# train step with and without checkpointing at 8k ("model"), the large model with eager blocks
# ("eager": what compiling them gains) and attention at 16k and 32k ("long"). Each
# stage runs under its own time limit, most important first, and its log and result JSON land in
# OUT_DIR as soon as it ends, so a run cut short keeps what it finished. Exit status: the number
# of stages that failed.
#
#   benchmarks/gpu.sh OUT_DIR [STAGE ...]   tests attention train trainer model eager long
#                                          (default: all)
#
# PYTHON (default python3) runs everything. DATASET and VOCAB name a prepared Arrow dataset
# version folder and its vocab.json for the training benchmark; without them it prepares the
# sample corpus, which needs the corpus stack (polars) as well as the training dependencies.
set -u
out=${1:?usage: benchmarks/gpu.sh OUT_DIR [tests|attention|train|trainer|model|eager|long ...]}
shift
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(tests attention train trainer model eager long)
py=${PYTHON:-python3}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package, uninstalled
failed=0

stage() {  # stage NAME LIMIT_S COMMAND...: run, log, collect the result files it wrote
    local name=$1 limit=$2
    shift 2
    local stamp start
    stamp=$(mktemp)
    start=$(date +%s)
    echo "=== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$out/$name.log"
    find benchmarks/results -name '*.json' -newer "$stamp" -exec cp {} "$out/" \;
    rm -f "$stamp"
    echo "=== $name: exit $rc after $(($(date +%s) - start)) s"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, torch.cuda.get_device_name())'
gpu=$("$py" -c 'import re, torch; print(re.sub("[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))')

data=()
[ -n "${DATASET:-}" ] && data=(--dataset "$DATASET" --vocab "${VOCAB:?DATASET needs VOCAB too}")
for s in "${stages[@]}"; do
    case $s in
    tests)
        stage tests 200 "$py" -m pytest tests/test_gpu.py -v -x -p no:cacheprovider \
            --junitxml "$out/tests-$gpu.xml"
        ;;
    attention)
        # the large model's dims (12 heads): the GPU profiles train it, and at 4 heads one 8k
        # row is so little work that launch and Python overheads would dominate the ratios
        stage attention 240 "$py" benchmarks/attention.py --device cuda --size large \
            --lengths 8192 --flex-lengths 8192 --model-lengths \
            --budget-s 3 --max-run-s 20 --wait-idle-s 0 --name "attention-$gpu"
        ;;
    long)
        stage long 240 "$py" benchmarks/attention.py --device cuda --size large \
            --lengths 16384 32768 --flex-lengths 16384 32768 --model-lengths \
            --budget-s 3 --max-run-s 20 --wait-idle-s 0 --name "attention-long-$gpu"
        ;;
    model)
        stage model 240 "$py" benchmarks/attention.py --device cuda --size large \
            --lengths --model-lengths 8192 --budget-s 3 --wait-idle-s 0 \
            --name "attention-model-$gpu"
        ;;
    train)
        # PROFILES["h100"] as it stands (compiled blocks, no checkpointing), with the step's kernels
        stage train 360 "$py" benchmarks/train.py --device cuda --sizes large small --profile \
            --warmup 3 --steps 10 --name "train-$gpu" "${data[@]}"
        ;;
    trainer)
        # the real train() under PROFILES["h100"] (8 micro-batches a step, so the host runs ahead
        # of the GPU), a few steps with evaluation and checkpoints
        if [ ${#data[@]} -eq 0 ]; then
            echo "=== trainer: skipped (it trains on a prepared dataset: set DATASET and VOCAB)"
        else
            stage trainer 300 "$py" benchmarks/profile_run.py --steps 8 --grad-accum 8 \
                --name "profile-run-$gpu" "${data[@]}"
        fi
        ;;
    eager)
        stage eager 150 "$py" benchmarks/train.py --device cuda --sizes large --compile 0 \
            --checkpointing 0 --profile --warmup 3 --steps 10 --name "train-$gpu-eager" "${data[@]}"
        ;;
    *)
        echo "unknown stage: $s (tests, attention, train, trainer, model, eager, long)" >&2
        failed=$((failed + 1))
        ;;
    esac
done
exit "$failed"
