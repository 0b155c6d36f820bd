"""``python -m shared_prefix.demo``: the main job (see :mod:`shared_prefix.bench.demo`)."""

from shared_prefix.bench.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
