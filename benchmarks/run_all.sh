#!/bin/sh
# Runs the package's full-shape sections (`python -m mlx_diffusiongemma.benchmark weights|gpu`)
# and every section of the project's harness (`python -m benchmarks.harness`: build, fullwidth,
# gpu-step, peers, profile, graph, serve, lora, vision), one after the other (each but lora stays
# under ~4 minutes and ~18 GB on a 2-core CPU machine), logging to benchmarks/logs/<section>.txt
# and appending the figures to benchmarks/logs/results.jsonl.
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
SECTIONS=${*:-weights build fullwidth peers profile graph gpu gpu-step serve lora vision}
for s in $SECTIONS; do
  case $s in
    weights|gpu) set -- -m mlx_diffusiongemma.benchmark "$s" ;;
    # the reference also with our malloc thresholds
    peers) set -- -m benchmarks.harness "$s" --workdir "$WORKDIR" --reference-malloc ;;
    *) set -- -m benchmarks.harness "$s" --workdir "$WORKDIR" ;;
  esac
  "$PY" "$@" --json benchmarks/logs/results.jsonl 2>&1 | tee "benchmarks/logs/$s.txt"
done
