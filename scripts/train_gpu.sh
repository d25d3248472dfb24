#!/usr/bin/env bash
# Train several `sieve train` runs side by side on one GPU, each sized to the same time budget.
#
#   scripts/train_gpu.sh SECONDS "NAME FLAGS..." ["NAME FLAGS..." ...]
#   e.g. scripts/train_gpu.sh 300 "stn --variant stn" "ablation --variant no_stn"
#
# Views are generated once on every CPU core before the runs start, so all runs share one cache (pass
# the same --views/--seed to each through SIEVE_TRAIN_COMMON). Each run writes
# var/trainer/runs/NAME/{state.pt,summary.json,loss.jsonl,stdout.log}; bring state.pt back and export it
# with `sieve train --import-state var/trainer/runs/NAME/state.pt [--ship]`.
set -euo pipefail
budget=${1:?usage: train_gpu.sh SECONDS "NAME FLAGS" ...}
shift
py=${PYTHON:-python3}
read -r -a common <<<"${SIEVE_TRAIN_COMMON:-}"
"$py" -m services.trainer.cli train --views-only --threads "$(nproc)" "${common[@]}"
per_run_threads=$(($(nproc) / $# > 0 ? $(nproc) / $# : 1))
pids=()
for spec in "$@"; do
    name=${spec%% *}
    read -r -a flags <<<"${spec#* }"
    dir=var/trainer/runs/$name
    mkdir -p "$dir"
    echo "run $name: ${common[*]} ${flags[*]}"
    "$py" -m services.trainer.cli train "${common[@]}" "${flags[@]}" --threads "$per_run_threads" --device "${SIEVE_TRAIN_DEVICE:-cuda}" \
        --time-budget "$budget" --no-export --fresh --out-dir "$dir" --log "$dir/loss.jsonl" >"$dir/stdout.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
    wait "$pid" || status=1
done
for spec in "$@"; do
    name=${spec%% *}
    echo "== $name"
    tail -n 4 "var/trainer/runs/$name/stdout.log"
done
exit $status
