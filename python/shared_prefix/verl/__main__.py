"""``python -m shared_prefix.verl check …``: see :mod:`shared_prefix.verl.check`."""

import sys

from .check import main

if __name__ == "__main__":
    if sys.argv[1:2] != ["check"]:
        sys.exit("usage: python -m shared_prefix.verl check <config.yaml | key=value overrides of verl's ppo_trainer>")
    sys.exit(main(sys.argv[2:]))
