#!/usr/bin/env bash
# The README's install into a fresh venv that is not activated, holding only torch==$1:
#   scripts/check_install.sh 2.13.0 [WORKDIR]
# Installs with the README's commands, checks that torch is still $1, then runs the core tests with the installed
# package (not the source tree). For an unsupported torch the install must fail at once with the supported list.
set -euo pipefail
TORCH=$1
WORK=${2:-/tmp/sp-install-$TORCH}
SRC=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$WORK" && python3 -m venv "$WORK/v"
"$WORK/v/bin/pip" install -q "torch==$TORCH"
# The README's command, from a directory outside the checkout and with the venv not activated.
cd "$WORK"
if ! v/bin/pip install -q maturin || ! v/bin/pip install --no-build-isolation "$SRC[hf]" > install.log 2>&1; then
  tail -5 install.log
  exit 1
fi
after=$(v/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')
[ "$after" = "$TORCH" ] || { echo "torch changed: $TORCH -> $after"; exit 1; }
v/bin/pip install -q pytest "hypothesis>=6.100,<7"
cd "$SRC"
SHARED_PREFIX_EXPECT_TORCH=$TORCH "$WORK/v/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_attention.py tests/test_plan.py tests/test_hf.py tests/test_logprobs.py 2>&1 | tail -1
"$WORK/v/bin/pip" list 2>/dev/null | grep -iE "^(torch|shared.prefix|transformers) "
