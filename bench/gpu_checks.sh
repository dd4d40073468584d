#!/usr/bin/env bash
# Every GPU check of the project in one run, for a session that is lent a GPU machine:
# the CUDA tests, then the CUDA variants of the benchmarks, each under its own time limit so that
# one slow or failing part does not cost the others. Logs go to $OUT (default: gpu_out/).
#
#     bash bench/gpu_checks.sh                         # every part, from the repository root
#     bash bench/gpu_checks.sh test_cuda bench_fairseq   # only these parts
#
# Parts, by default: test_cuda bench_core bench_core_bf16 bench_fd bench_timm
# bench_timm_bf16 bench_compress bench_fairseq bench_fairseq_bf16 bench_fairseq_amp bench_fairseq_big,
# and on request bench_tensor, bench_gpu_paths and bench_train_cli (fnl-train eager against
# --torchcompile, 300 s). The default parts' time limits add up to 500 s, under the device tool's
# 600 s per command. The fairseq parts run only where `import fairseq` works. A machine
# without the project's Python packages gets them from wheels in .whl/ (installed into /tmp/site),
# made beforehand on a machine with the package index for the device's Python, e.g. for 3.12:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#         fairseq-fixed==0.12.3.1 hydra-core==1.3.2 omegaconf==2.3.0 bitarray timm==1.0.31
#     pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3
# The script prints a summary line per part and exits 0; read the logs for the numbers.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PY:-$(command -v python || command -v python3)}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

DEFAULT="test_cuda bench_core bench_core_bf16 bench_fd bench_timm bench_timm_bf16 bench_compress bench_fairseq"
DEFAULT+=" bench_fairseq_bf16 bench_fairseq_amp bench_fairseq_big"
PARTS=" ${*:-$DEFAULT} "

if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        > "$OUT/wheels.log" 2>&1 && export PYTHONPATH="$PYTHONPATH:/tmp/site"
    echo "wheels from .whl/: exit $? (log $OUT/wheels.log)"
fi

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
$PY -c "import timm, fnl, fnl_timm; print('timm', timm.__version__)" 2>&1 | tail -n 1 | tee -a "$OUT/device.log"
run test_cuda 60 $PY -m pytest -q -rs tests/test_cuda.py
run bench_core 50 $PY bench/bench_core.py --device cuda --only linear,resnet,fd,spectral
run bench_core_bf16 25 $PY bench/bench_core.py --device cuda --only linear --dtype bfloat16
run bench_fd 25 $PY bench/bench_fd.py --device cuda
run bench_timm 40 $PY bench/bench_timm.py --device cuda
run bench_timm_bf16 40 $PY bench/bench_timm.py --device cuda --amp --amp-dtype bfloat16 --channels-last
run bench_tensor 45 $PY bench/bench_tensor.py --device cuda --batch 128 --rounds 5 --repeat 5
run bench_gpu_paths 120 $PY bench/bench_gpu_paths.py --only models linear fd profile --precisions bf16
run bench_train_cli 300 $PY bench/bench_train_cli.py --device cuda --amp
run bench_compress 40 $PY bench/bench_compress.py --device cuda --batch-sizes 1 32 --fold-bn
if $PY -c "import fairseq" > /dev/null 2>&1; then
    FS="$PY bench/bench_fairseq.py --device cuda --steps 40 --gen-batches 8"
    run bench_fairseq 70 $FS --max-tokens 4000
    run bench_fairseq_bf16 50 $FS --max-tokens 4000 --bf16-autocast
    run bench_fairseq_amp 50 $FS --max-tokens 4000 --amp
    run bench_fairseq_big 50 $FS --max-tokens 32000 --steps 20 --bf16-autocast
elif [[ $PARTS == *" bench_fairseq"* ]]; then
    echo "bench_fairseq: skipped (fairseq does not import here)"
fi
exit 0
