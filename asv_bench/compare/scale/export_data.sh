#!/bin/bash
# Writes the scale data sets into $1 (default /tmp/sparsemix-scale).
set -euo pipefail
dir=${1:-/tmp/sparsemix-scale}; mkdir -p "$dir"
python -c "from sparsemix.datasets import generate_crossed_slopes as g; g().to_csv('$dir/slopes1m.csv', index=False, float_format='%.17g')"
Rscript -e "library(lme4); d <- InstEval; for (v in c('s','d','dept','service')) d[[v]] <- as.character(d[[v]]); write.csv(d, '$dir/insteval.csv', row.names = FALSE)"
