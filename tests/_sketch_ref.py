"""The naive reference of the per-position gradient sketches (tests/test_sketch.py, tests/test_gpu.py): the
projection of materialised pieces. Imports nothing beyond torch and the tracer (it runs where the GPU tests run)."""
from __future__ import annotations

import math

import torch

from backend.trace.sketch import projection


def naive_sketch(sites, P, seed: int, k: int, kind: str = "gaussian") -> torch.Tensor:
    """sum over sites of a_j^T P_m b_j / sqrt(k), from the materialised pieces: (n, k) float64."""
    out = 0
    for site, Pm in zip(sites, P):
        a, b = projection(seed, site, k, kind=kind)
        out = out + torch.einsum("jo,noi,ji->nj", a.double(), Pm, b.double())
    return out / math.sqrt(k)


def max_rel(a, b) -> float:
    """max |a - b| over max |b| (float64)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max())
