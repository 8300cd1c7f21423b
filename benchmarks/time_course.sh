#!/usr/bin/env bash
# How long the course takes from an empty run cache: a fresh clone of this repository's HEAD in
# OUTDIR (default /tmp/csdkit-timing), then every notebook executed in order with nbconvert, as a
# learner would run them one after the other. Prints each notebook's wall time and how many cores
# the whole machine kept busy meanwhile (from /proc/stat, so Linux only), then the total.
# Time on a quiet machine: anything else running shares the cores.
#
#     bash benchmarks/time_course.sh                 # all nine
#     bash benchmarks/time_course.sh /tmp/t notebooks/09_learning_rate.ipynb
set -euo pipefail
out=${1:-/tmp/csdkit-timing}; shift || true
rm -rf "$out"; git clone -q "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)" "$out"; cd "$out"
export PYTHONPATH="$out"
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
start=$(date +%s.%N)
for nb in ${@:-notebooks/0*.ipynb}; do
  b0=$(busy); t0=$(date +%s.%N)
  (cd notebooks && jupyter nbconvert --to notebook --execute --inplace "$(basename "$nb")" \
     --ExecutePreprocessor.timeout=1200 >/dev/null 2>&1) || echo "FAILED $nb"
  t1=$(date +%s.%N); b1=$(busy)
  python -c "import os; w = $t1 - $t0; print(f'$(basename "$nb" | cut -c1-2): {w:6.1f} s wall, ' \
             f'{($b1 - $b0) / os.sysconf(\"SC_CLK_TCK\") / w:.2f} cores busy', flush=True)"
done
python -c "import time; print(f'all: {time.time() - $start:.1f} s')"
grep -l "✘" notebooks/*.ipynb || echo "no claim failed (no ✘ in any output)"
