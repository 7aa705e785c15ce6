"""One autograd path for every backend.

A backend hands a *run*: an object with

    run.grad_slots                                   the score_mod's captured tensors it
                                                     returns gradients for (their slots)
    run.forward(q, k, v, score_bufs, mask_bufs)      -> (out, lse), or (out, lse, max_scores)
                                                     when the run was asked for the row maxima
    run.backward(q, k, v, out, lse, dout, dlse, score_bufs, mask_bufs)
                                                     -> (dq, dk, dv, [grad per grad slot])

`attend` runs it under autograd (eager calls; max_scores is not differentiable, as in
torch); the custom op of compiled calls
(`flexattn.ops`) calls the same run methods. `scatter_buffer_grads` - the one place that
spreads the per-slot gradients over all captured tensors - serves both.
"""
from __future__ import annotations

import torch


def scatter_buffer_grads(score_bufs, grad_slots, buf_grads, fill=lambda t: None) -> list:
    """One gradient per captured tensor: buf_grads[n] at slot grad_slots[n], `fill(tensor)`
    elsewhere."""
    grads = [fill(t) for t in score_bufs]
    for s, g in zip(grad_slots, buf_grads):
        grads[s] = g
    return grads


class _Attend(torch.autograd.Function):
    """mask_bufs are the call's captured mask tensors (no gradients flow into them)."""

    @staticmethod
    def forward(ctx, run, mask_bufs, q, k, v, *score_bufs):
        # an unused output's gradient stays None (every backend takes dlse None), not a tensor of
        # zeros: on the CPU path that fill cost a busy machine's S=1K causal fwd+bwd 2.9x its
        # quiet time where SDPA took 2.4x (2.4x with it gone; 2 cores, two CPU-burning processes)
        ctx.set_materialize_grads(False)
        results = run.forward(q, k, v, score_bufs, mask_bufs)
        out, lse = results[:2]
        ctx.run, ctx.mask_bufs = run, mask_bufs
        ctx.save_for_backward(q, k, v, out, lse, *score_bufs)
        ctx.mark_non_differentiable(*results[2:])  # max_scores
        return results

    @staticmethod
    def backward(ctx, dout, dlse, *_max_scores):
        q, k, v, out, lse, *score_bufs = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        run = ctx.run
        dq, dk, dv, buf_grads = run.backward(q, k, v, out, lse, dout, dlse, score_bufs, ctx.mask_bufs)
        return (None, None, dq, dk, dv, *scatter_buffer_grads(score_bufs, run.grad_slots, buf_grads))


def attend(run, q, k, v, score_bufs, mask_bufs, needs_grad: bool):
    """(out, lse) of `run` (and max_scores if the run computes it); differentiable when
    `needs_grad`."""
    if needs_grad:
        return _Attend.apply(run, mask_bufs, q, k, v, *score_bufs)
    return run.forward(q, k, v, score_bufs, mask_bufs)


def needs_grad(q, k, v, score_bufs) -> bool:
    """Whether a call must record for autograd."""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad
                                        or any(t.requires_grad for t in score_bufs))
