"""``python -m coarpy.runs SPEC_JSON``: one worker process of ``coarpy.runs.local``."""

import sys

from .worker import child_main

if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
