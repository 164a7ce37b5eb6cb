"""The timed regions: forward, backward, or both, for one provider on one set of inputs.

* ``fwd``: the forward under ``torch.no_grad()`` (inference; nothing saved for a backward).
* ``bwd``: the forward runs once outside the timed region; each call is one
  ``torch.autograd.grad`` through the retained graph (no ``.grad`` accumulation).
* ``fwd+bwd``: forward then ``torch.autograd.grad`` of every input that requires it.
"""
from __future__ import annotations

import contextlib

import torch


def make_step(fn, x: dict, pass_: str, context=contextlib.nullcontext):
    """``fn()`` -> output tensor; ``context()`` wraps every call (e.g. an SDPA backend choice)."""
    if pass_ == "fwd":
        def fwd():
            with context(), torch.no_grad():
                fn()
        return fwd

    params = [t for t in x.values() if t.requires_grad]

    if pass_ == "fwd+bwd":
        grad_out = []  # one random output gradient, drawn at the first call

        def fwd_bwd():
            with context():
                o = fn()
                if not grad_out:
                    grad_out.append(torch.randn_like(o))
                torch.autograd.grad(o, params, grad_out[0], allow_unused=True)
        return fwd_bwd

    with context():
        o = fn()
    do = torch.randn_like(o)

    def bwd():
        with context():
            torch.autograd.grad(o, params, do, retain_graph=True, allow_unused=True)
    return bwd
