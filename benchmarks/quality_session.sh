#!/usr/bin/env bash
# Issue 5's study on a device machine, in calls of at most 10 minutes, one recipe per session of
# 15 device minutes (a recipe is 5 minutes of training, then 15,000 samples, the bound and the
# scores). Here, first:
#   bash benchmarks/fetch_wheels.sh && bash benchmarks/pack_device_files.sh
# and then the calls it prints, back to back (the machine keeps git-ignored folders between calls
# only while it is warm, 30 s after a reply), e.g.
#   run(carry=[".whl", ".carry-a"], command="bash benchmarks/quality_session.sh setup", timeout_s=600)
#   run(carry=[".carry-b"], command="bash benchmarks/quality_session.sh weights floor next", timeout_s=600)
#   run(command="CALL_MINUTES=2.5 bash benchmarks/quality_session.sh next report")   # if `next` stopped early
# and here, on the last reply's files: python benchmarks/quality_fmnist.py collect <files_at>/quality.tgz,
# which adds the session's records to benchmarks/quality_fmnist/ (committed: the study grows a
# recipe per GPU session) and writes its report.
# Parts: setup (wheels into .site, data into .data), carried (nothing: the call only brings a part
# of the weights), weights (join the Inception weights' parts, unpack them and check their sha256),
# floor (the real-data floor, unless benchmarks/quality_fmnist/records.jsonl has it), run:RECIPE,
# next (the first recipe of the study's order that neither the committed records nor this
# machine's have: `quality_fmnist.py next`; a recipe not yet begun is not begun with under
# FRESH_RECIPE_MINUTES, default 7, of the call left), report. Each study command gets what is left of the
# call as --stop_after_minutes (CALL_MINUTES, default 9, in all) and the options in
# $QUALITY_OPTIONS (e.g. "--budget 5 --milestones 1,2,3"), and our recipes (not stock) the
# train_ddpm.py options in $OUR_TRAIN_OPTIONS (e.g. "--no-compile_unet" if gpu_session.sh found
# torch.compile failing on the GPU; a recipe's record keeps them); one that stops early (exit 3)
# ends the call, and the same part in the next call continues it. Training needs no weights, so a
# recipe can start before the weights are joined and be scored once they are. Returns
# $OUT/quality.tgz: the records, evaluation reports, sample grids, loss curves and the log.
set -uo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
limit=${CALL_MINUTES:-9}
out="${OUT:-gpu-results}"
mkdir -p "$out"
export PYTHONPATH="$PWD/.site:$PWD" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
weights=weights/inception-fid-nofc.pth
work=runs/quality-fmnist
log="$work/session.log"
committed=benchmarks/quality_fmnist/records.jsonl  # earlier sessions' records, in the working tree
python=${PYTHON:-python3}  # the tests run the script with their own interpreter
mkdir -p "$work"

# minutes left of the call (CALL_MINUTES from the script's start), less $1, at least $2
minutes_left() {
  "$python" -c "import time; print(round(max($2, $limit - (time.time() - $start) / 60 - $1), 2))"
}

study() {
  local left
  left=$(minutes_left 0.5 0.5)
  local scoring=()
  [[ -f $weights ]] && scoring=(--inception_weights "$weights")
  # shellcheck disable=SC2086
  "$python" benchmarks/quality_fmnist.py "$@" "${scoring[@]}" ${QUALITY_OPTIONS:-} --stop_after_minutes "$left" 2>&1 \
    | grep --line-buffered -v -e Warning -e "it/s]" -e "img/s]" -e "examples/s]" -e "batch/s]" | tee -a "$log"
  return "${PIPESTATUS[0]}"
}

# The Inception weights come in the parts that pack_device_files.sh wrote to .carry-a, .carry-b, …
# (one per call); join them in order and check the whole file's sha256.
join_weights() {
  local count i found missing=() files=()
  count=$(cat .carry-a/inception.parts 2>/dev/null || echo 0)
  ((count > 0)) || { echo "no .carry-a/inception.parts: carry .carry-a (benchmarks/pack_device_files.sh)" | tee -a "$log"; return 1; }
  for ((i = 1; i <= count; i++)); do
    found=$(compgen -G ".carry-?/inception.part$i" | head -1 || true)
    if [[ -n $found ]]; then files+=("$found"); else missing+=("$i"); fi
  done
  if ((${#missing[@]})); then
    echo "weights part(s) ${missing[*]} of $count missing: carry each .carry-X folder in a call while the machine is warm" \
      "(was it given back between calls?)" | tee -a "$log"
    return 1
  fi
  mkdir -p "$(dirname "$weights")"
  cat "${files[@]}" > "$weights.packed"
  if ! "$python" benchmarks/carry_weights.py unpack "$weights.packed" "$weights.tmp" >> "$log" 2>&1 \
    || [[ "$(sha256sum "$weights.tmp" | cut -d' ' -f1)" != "$(cat .carry-a/inception.sha256)" ]]; then
    rm -f "$weights.tmp" "$weights.packed"
    echo "the joined weights do not unpack to .carry-a/inception.sha256's file: pack them again" | tee -a "$log"
    return 1
  fi
  rm -f "$weights.packed"
  mv "$weights.tmp" "$weights"
  echo "joined $count parts into $weights" | tee -a "$log"
}

for part in "$@"; do
  echo "== $part ($(date -u +%FT%TZ))" | tee -a "$log"
  case "$part" in
    setup)
      "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl || exit 1
      mkdir -p .data && cp -r .carry-a/fashion-mnist .data/
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$log"
      rc=0 ;;
    carried) rc=0 ;;
    weights) join_weights; rc=$? ;;
    floor)
      if grep -qs '"recipe": "real data"' "$committed"; then
        echo "the floor is in $committed already" | tee -a "$log"; rc=0
      else
        study floor; rc=$?
      fi ;;
    run:* | next)
      recipe=${part#run:}
      if [[ $part == next ]]; then
        # shellcheck disable=SC2086
        recipe=$("$python" benchmarks/quality_fmnist.py next --records "$committed" "$work/results.jsonl" ${QUALITY_OPTIONS:-})
        if [[ -z $recipe ]]; then echo "every recipe of the study is recorded" | tee -a "$log"; continue; fi
        echo "next recipe: $recipe" | tee -a "$log"
        left=$(minutes_left 0 0) && left=${left%.*}  # whole minutes
        if ! compgen -G "$work/runs/$recipe-*" > /dev/null && ((left < ${FRESH_RECIPE_MINUTES:-7})); then
          # a recipe's 5 training minutes and more would not end in this call, nor in this session
          echo "$recipe not started: ${left} min left of the call, under FRESH_RECIPE_MINUTES=${FRESH_RECIPE_MINUTES:-7}" | tee -a "$log"
          continue
        fi
      fi
      options=()
      # shellcheck disable=SC2206
      [[ $recipe != stock ]] && options=(${OUR_TRAIN_OPTIONS:-})
      [[ -f $weights ]] || options+=(--train_only)
      study run "$recipe" "${options[@]}"
      rc=$? ;;
    report)
      records=("$work/results.jsonl")
      [[ -f $committed ]] && records=("$committed" "${records[@]}")
      "$python" benchmarks/quality_fmnist.py report --results "${records[@]}" --markdown "$work/study.md" \
        --plot "$work/fid_vs_minutes.png" --grids "$work/sample_grids.png" 2>&1 | tee -a "$log"
      rc=${PIPESTATUS[0]} ;;
    *) echo "unknown part $part (setup, carried, weights, floor, run:RECIPE, next, report)" | tee -a "$log"; rc=2 ;;
  esac
  if ((rc == 3)); then
    echo "stopped for this call: repeat '$part' in the next call to continue" | tee -a "$log"
    break
  elif ((rc != 0)); then
    echo "'$part' failed with status $rc" | tee -a "$log"
    break
  fi
done
cd "$work" && tar czf "$out/quality.tgz" --ignore-failed-read results.jsonl session.log study.md fid_vs_minutes.png sample_grids.png \
  floor-*.json floor-*-grid.png runs/*/eval-*.json runs/*/eval-*-grid.png runs/*/bpd.json runs/*/study_state.json \
  runs/*/model-*/loss_curve.png runs/*/model-*/samples.png 2>/dev/null
exit 0
