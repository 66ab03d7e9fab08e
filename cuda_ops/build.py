"""Command line: ``python -m cuda_ops.build [--check] [--verbose]``.

Compiles the CUDA extension ahead of time into the torch extensions cache (see
cuda_ops/_build.py).  Kept separate from _build so ``-m`` does not re-import a module
that the package already imported.
"""

import sys

from cuda_ops._build import main

if __name__ == "__main__":
    sys.exit(main())
