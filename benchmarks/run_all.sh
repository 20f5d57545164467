#!/bin/sh
# Runs every section of `python -m mlx_diffusiongemma.benchmark` and of the project's harness
# (`python -m benchmarks.harness`: peers, profile, graph, serve, vision), one after the other (each
# stays under ~4 minutes and ~18 GB on a 2-core CPU machine), logging to
# benchmarks/logs/<section>.txt and appending the figures to benchmarks/logs/results.jsonl.
#
#   sh benchmarks/run_all.sh            # all sections
#   sh benchmarks/run_all.sh peers gpu  # some
#
# Needs: the project installed with its test extras (transformers, torch), mlx-lm, mlx-vlm 0.7.10
# for the peer comparison, and on Linux OpenBLAS (apt-get install libopenblas0-pthread).
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
WORKDIR=${DG_BENCH_WORKDIR:-/tmp/dg-bench}
mkdir -p benchmarks/logs
SECTIONS=${*:-weights build fullwidth peers profile graph gpu serve lora vision}
for s in $SECTIONS; do
  extra=""
  [ "$s" = peers ] && extra="--reference-malloc"  # the reference also with our malloc thresholds
  case $s in
    peers|profile|graph|serve|vision) entry=benchmarks.harness ;;
    *) entry=mlx_diffusiongemma.benchmark ;;
  esac
  "$PY" -m $entry "$s" --workdir "$WORKDIR" --json benchmarks/logs/results.jsonl $extra \
    2>&1 | tee "benchmarks/logs/$s.txt"
done
