"""A collection worker for the SIGKILL test in test_collect.py (not a test module).

Usage: python _kill_worker.py MODEL.pt DATA.pt STORE_DIR SETTINGS_JSON

Loads a whole model saved with torch.save and an (inputs, labels) tuple, then runs
``coarpy.collect`` on the model's conv channels with the given settings. The
environment variable COAR_TEST_DELAY (seconds) makes every forward pass sleep, so
the test can kill the process while it is still running; a hook, not the output
function, so the store records the same settings as an in-process run.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from coarpy.collect import collect
from coarpy.components import Components


def main(model_file: str, data_file: str, store: str, settings: str) -> None:
    torch.set_num_threads(1)
    model = torch.load(model_file, weights_only=False)
    examples = torch.load(data_file)
    delay = float(os.environ.get("COAR_TEST_DELAY", "0"))
    if delay:
        model.register_forward_pre_hook(lambda module, args: time.sleep(delay))
    comps = Components.discover(model, kinds=("conv",))
    collect(model, comps, examples, path=store, progress=False, **json.loads(settings))


if __name__ == "__main__":
    main(*sys.argv[1:])
