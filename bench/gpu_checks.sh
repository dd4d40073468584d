#!/usr/bin/env bash
# Every GPU check of the project in one run, for a session that is lent a GPU machine:
# the CUDA tests, then the CUDA variants of the benchmarks, each under its own time limit so that
# one slow or failing part does not cost the others. Logs go to $OUT (default: gpu_out/).
#
#     bash bench/gpu_checks.sh                         # every part, from the repository root
#     bash bench/gpu_checks.sh test_cuda bench_fairseq   # only these parts
#
# Parts: test_cuda bench_core bench_timm bench_tensor bench_compress bench_fairseq bench_fairseq_bf16.
# Their time limits add up to 570 s, under the device tool's 600 s per command. The fairseq parts
# run only where `import fairseq` works (fairseq-fixed builds from source). The script prints a
# summary line per part and exits 0; read the logs for the numbers.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

PARTS=" ${*:-test_cuda bench_core bench_timm bench_tensor bench_compress bench_fairseq bench_fairseq_bf16} "

run() {  # name, time limit (s), command...
    local name=$1 limit=$2
    shift 2
    [[ $PARTS == *" $name "* ]] || return 0
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s (log $OUT/$name.log)"
    tail -n 3 "$OUT/$name.log" | sed "s/^/    /"
}

$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/device.log"
run test_cuda 90 $PY -m pytest -q -rs tests/test_cuda.py
run bench_core 90 $PY bench/bench_core.py --device cuda
run bench_timm 60 $PY bench/bench_timm.py --device cuda
run bench_tensor 45 $PY bench/bench_tensor.py --device cuda --batch 128 --rounds 5 --repeat 5
run bench_compress 90 $PY bench/bench_compress.py --device cuda --batch-sizes 1 32 --fold-bn
if $PY -c "import fairseq" > /dev/null 2>&1; then
    run bench_fairseq 120 $PY bench/bench_fairseq.py --device cuda --max-tokens 4000 --steps 50 --gen-batches 10
    run bench_fairseq_bf16 75 $PY bench/bench_fairseq.py --device cuda --max-tokens 4000 --steps 50 \
        --gen-batches 10 --bf16-autocast
elif [[ $PARTS == *" bench_fairseq"* ]]; then
    echo "bench_fairseq: skipped (fairseq does not import here)"
fi
exit 0
