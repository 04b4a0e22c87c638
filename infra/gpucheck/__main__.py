"""``python -m infra.gpucheck``: the GPU check (``./dev gpu-check``)."""

import sys

from infra.gpucheck.runner import main

sys.exit(main())
