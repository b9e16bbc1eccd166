#!/bin/bash
# Side by side, one after the other: lme4 and sparsemix on the scale designs. Needs R with lme4.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); dir=${1:-/tmp/sparsemix-scale}
[ -f "$dir/slopes1m.csv" ] || "$here/export_data.sh" "$dir"
slopes="y ~ 1 + x + (1 + x | a) + (1 | b)"
inst="y ~ 1 + service + (1|s) + (1|d) + (1|dept:service)"
for tool in "Rscript $here/lme4_fit.R" "python $here/sparsemix_fit.py"; do
  echo "== $tool: 1,000,000 rows, random slopes"
  /usr/bin/time -f "peak RSS %M kB" $tool "$dir/slopes1m.csv" "$slopes"
done
for tool in "Rscript $here/lme4_fit.R" "python $here/sparsemix_fit.py"; do
  echo "== $tool: InstEval"
  $tool "$dir/insteval.csv" "$inst" s,d,dept,service
done
