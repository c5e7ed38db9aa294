#!/usr/bin/env bash
# Every GPU measurement in one command, on one GPU, in under 8 minutes; one JSON line per benchmark on stdout
# (each benchmark's own progress goes to bench/gpu-logs/, or $ECGAD_GPU_LOGS).
#
#   bash bench/gpu.sh            # from the repository root or anywhere; PYTHON=... picks the interpreter
#
# 1. scoring (bench/score.py --device cuda): fp32, bf16 and fp16 autocast (each also reports its largest score and map
#    difference against fp32), fp32 at three batch sizes (the batch size is chosen by measurement), and fp32 through
#    torch.compile (--backend compile); each line has the GPU's own roof (a large matrix product) and GFLOP/s;
#    then preparation (bench/prepare.py) on one CPU core, to compare with what the GPU scores;
# 2. training (bench/train.py --use-gpu, paper config, one worker) with the GPU's utilization sampled by nvidia-smi
#    while it runs (gpu_util_mean_pct; the per-epoch data waits are in the log);
# 3. archive end to end (python -m jobs.score_archive --use-gpu) on a synthetic archive: ECG/s over the whole job;
# 4. the service (bench/serve.py, the replica takes the GPU) at 1, 8 and 32 clients.
#
# Each benchmark runs under its own time limit (together 480 s: the whole script stays under 8 minutes); one that
# fails or runs out prints {"benchmark": ..., "error": ...} and the others still run. Without CUDA the script stops at once with a message on stderr and exit code 2.
set -uo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then PY=.venv/bin/python; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOGS=${ECGAD_GPU_LOGS:-bench/gpu-logs}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "bench/gpu.sh: no CUDA device: torch.cuda.is_available() is False for $PY (a CPU-only torch, or no GPU" \
         "visible). Run it on a GPU machine with a CUDA build of torch." >&2
    exit 2
fi
mkdir -p "$LOGS"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ecgad-gpu-bench.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# run NAME SECONDS COMMAND...: the command's last stdout line (a JSON object) or an error line; log in $LOGS/NAME.log
run() {
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    if timeout --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1; then
        tail -n 1 "$LOGS/$name.log"
    else
        local rc=$?
        printf '{"benchmark": "%s", "error": "exit code %s after %s s (limit %s s), see %s"}\n' \
            "$name" "$rc" "$((SECONDS - started))" "$limit" "$LOGS/$name.log"
    fi
}

# -- 1. scoring ----------------------------------------------------------------------------------------------------
for precision in fp32 bf16 fp16; do
    run "score-$precision" 40 "$PY" bench/score.py --device cuda --precision "$precision" --oracle-records 4
done
for batch in 128 2048; do   # the default (512) ran above
    run "score-fp32-batch$batch" 30 "$PY" bench/score.py --device cuda --max-batch "$batch" --oracle-records 2
done
run score-fp32-compile 60 "$PY" bench/score.py --device cuda --backend compile --oracle-records 2

# Preparation on this node's CPUs, one process: records/s per core (times the cores: what can feed the GPU).
run prepare 20 "$PY" bench/prepare.py --repeats 2

# -- 2. training, with the GPU's utilization -----------------------------------------------------------------------
nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 >"$WORK/util.txt" 2>/dev/null &
SAMPLER=$!
TRAIN=$(run train 80 "$PY" bench/train.py --use-gpu --config paper --records 1200 --epochs 3 --batch-size 128 \
        --skip-two-workers)
kill "$SAMPLER" 2>/dev/null
UTIL=$(awk '$1 > 0 {s += $1; n++} END {printf "%.1f", n ? s / n : 0}' "$WORK/util.txt")
echo "$TRAIN" | "$PY" -c 'import json, sys; row = json.loads(sys.stdin.read()); row.setdefault("benchmark", "train")
row["gpu_util_mean_pct"] = float(sys.argv[1]); print(json.dumps(row))' "$UTIL"

# -- 3. archive end to end -----------------------------------------------------------------------------------------
ARCHIVE_RECORDS=3000
run archive-setup 30 "$PY" - "$WORK" "$ARCHIVE_RECORDS" <<'EOF'
import json, sys
from pathlib import Path
import torch
from ecgad.checkpoint import save_checkpoint
from ecgad.config import PrepConfig
from ecgad.model import MCF, MCFConfig
from ecgad.synth_dataset import write_dataset

work, n = Path(sys.argv[1]), int(sys.argv[2])
write_dataset(work / "archive", n=n, seed=0)
torch.manual_seed(0)
model = MCF(MCFConfig.paper())
save_checkpoint(work / "ckpt", model, model.config, PrepConfig(), 0.5)
print(json.dumps({"benchmark": "archive-setup", "records": n}))
EOF
START=$(date +%s.%N)
ARCHIVE=$(run archive 60 "$PY" -m jobs.score_archive --input "$WORK/archive" --checkpoint "$WORK/ckpt" \
          --out "$WORK/scored" --use-gpu --mode full --batch-size 256 --num-scorers 1 --scorer-cpus 1)
END=$(date +%s.%N)
echo "$ARCHIVE" | "$PY" -c 'import json, sys
row, records, seconds = json.loads(sys.stdin.read()), int(sys.argv[1]), float(sys.argv[3]) - float(sys.argv[2])
out = {"benchmark": "archive", "records": records, "seconds": round(seconds, 2), "ecg_per_s": round(records / seconds, 1),
       "mode": "full", "job": row}
print(json.dumps(out))' "$ARCHIVE_RECORDS" "$START" "$END"

# -- 4. the service ------------------------------------------------------------------------------------------------
run serve 50 "$PY" bench/serve.py --size paper --mode full --clients 1 8 32 --seconds 5 --repeats 1
