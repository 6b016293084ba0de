"""collect(compile_model=True): a compiled model fills the same store, to float tolerance.

Shared masks reach the compiled graph through in-place weight edits, so one
compilation serves every mask. Compiling takes tens of seconds on a CPU: slow test.
"""

from __future__ import annotations

import pytest
import torch

import coarpy as coar
from coarpy.collect import collect


@pytest.mark.slow
def test_a_compiled_model_gives_the_eager_store(tmp_path, mlp):
    comps = coar.Components.from_spec(mlp, {"0": "linear", "2.2": "inputs"})
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen))
    kwargs = {"n_masks": 8, "alpha": 0.3, "seed": 0, "block_size": 4, "progress": False}
    eager = collect(mlp, comps, data, path=tmp_path / "eager", **kwargs)
    compiled = collect(mlp, comps, data, path=tmp_path / "compiled", compile_model=True, **kwargs)
    torch.testing.assert_close(compiled.outputs(), eager.outputs(), rtol=1e-5, atol=1e-5)
    assert eager.outputs().std(0).max() > 0.01  # the masks matter
