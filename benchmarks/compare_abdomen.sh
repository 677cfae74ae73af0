#!/usr/bin/env bash
# The method comparison on the abdominal phantom (`mkd phantom --anatomy abdomen`: liver, kidneys, spleen;
# plain CT vs T2 MRI, label ids differing between the two nnU-Net datasets) with ONE labelled CT volume.
#   bash benchmarks/compare_abdomen.sh [OUT] [SEEDS] [STEPS_PER_EPOCH] [EPOCHS] [TARGET_LABELED]
# The same protocol, methods, network sizes (compare_phantom.yaml) and environment variables (METHOD_GROUPS,
# TUNE, MKD) as benchmarks/compare_phantom.sh, which it runs with ANATOMY=abdomen.
# Results: OUT/compare/comparison.md (OUT defaults to bench-compare-abdomen).
set -euo pipefail
ANATOMY=abdomen exec bash "$(cd "$(dirname "$0")" && pwd)/compare_phantom.sh" "$@"
