"""A call of the Triton kernels: the entry point `flex_attention_triton`, the launch paths
(forward or decode, backward) and the two kinds of run that flexattn.call's autograd path
drives - a planned call, or a cached one whose launches are replayed (kernels.replay).
"""
from __future__ import annotations

from dataclasses import replace

from ..call import attend, needs_grad
from . import autotune, replay, tiered
from .backward import flex_backward
from .config import device_key
from .decode import decode_forward, use_decode
from .forward import flex_forward
from .hopper_backward import use_hopper_backward
from .hopper_forward import hopper_forward, use_hopper
from .launcher import recording
from .plan import Plan, make_plan
from .source import step_kernels


def launch_fwd(plan: Plan, q, k, v):
    """The forward launches of `plan` (config: autotuned under kernel_options AUTOTUNE)."""
    cfg = autotune.tuned_fwd_config(plan, q, k, v) if plan.opts.get("AUTOTUNE") else None
    return flex_forward(plan, q, k, v, cfg=cfg)


def launch_bwd(plan: Plan, q, k, v, out, lse, dout, dlse, score_bufs):
    """The backward launches of `plan` (config: autotuned under kernel_options AUTOTUNE)."""
    cfg = autotune.tuned_bwd_config(plan, q, k, v, out, lse, dout, dlse, score_bufs) \
        if plan.opts.get("AUTOTUNE") else None
    return flex_backward(plan, q, k, v, out, lse, dout, dlse, score_bufs, cfg=cfg)


def forward_launch(kind: str):
    """The launch function of a forward kind ("decode", "fwd", "fwd_hopper")."""
    return {"decode": decode_forward, "fwd": launch_fwd, "fwd_hopper": hopper_forward}[kind]


def fwd_path(plan: Plan, q, k, v) -> str:
    """The kind of forward this call takes (see forward_launch): the split-KV decode kernel for
    short queries, else the Hopper forward where kernels.hopper_forward.use_hopper says so,
    else the Triton forward."""
    if use_decode(plan, q, v):
        return "decode"
    if use_hopper(device_key(q.device), q, k, v, plan.blocks.block, plan.dropout_p, plan.opts.get("BACKEND", "auto"),
                  (plan.score_graph, plan.mask_graph)):
        return "fwd_hopper"
    return "fwd"


def bwd_path(plan: Plan, q, k, v, dout=None) -> str:
    """The kind of backward this call takes: "bwd_hopper" where kernels.hopper_backward says so,
    else "bwd" (the Triton kernels). dout None: before the backward (the forward's tiering and
    replay plan for it), taken to be contiguous; a bwd_HOPPER=True the call cannot take is the
    backward's own error, raised when it runs."""
    return "bwd_hopper" if use_hopper_backward(plan, q, k, v, dout, strict=False) else "bwd"


def run_forward(plan: Plan, q, k, v):
    """The forward of `plan`, then (tiered) the other form's kernels compiled in the background."""
    kind = fwd_path(plan, q, k, v)
    fn = forward_launch(kind)
    results = fn(plan, q, k, v)   # (out, lse), and max_scores when plan.output_max
    tiered.after_launch(plan, lambda other: fwd_path(other, q, k, v),
                        lambda other, other_kind: _captured(forward_launch(other_kind), other, q, k, v))
    return results


def run_backward(plan: Plan, q, k, v, out, lse, dout, dlse, score_bufs):
    grads = launch_bwd(plan, q, k, v, out, lse, dout, dlse, score_bufs)
    tiered.after_launch(plan, lambda other: bwd_path(other, q, k, v, dout),
                        lambda other, _: _captured(launch_bwd, other, q, k, v, out, lse, dout, dlse, score_bufs))
    return grads


def _captured(fn, *args) -> list:
    """The launches `fn(*args)` makes, recorded instead of run."""
    with recording() as launches:
        fn(*args)
    return launches


class PlannedRun:
    """A call that is not cached: its plan (with the call's captured tensors) runs the
    normal launch path."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.grad_slots = plan.grad_slots

    def forward(self, q, k, v, score_bufs, mask_bufs):
        return run_forward(self.plan, q, k, v)

    def backward(self, q, k, v, out, lse, dout, dlse, score_bufs, mask_bufs):
        return run_backward(self.plan, q, k, v, out, lse, dout, dlse, score_bufs)


class CachedRun:
    """A call signature seen before (kernels.replay): its plan with the mods' captured
    tensors unbound, and per launch path (forward or decode; backward per dout / dlse
    layout) its replay, recorded the first time the path runs (None: not replayable)."""

    def __init__(self, plan: Plan, kinds, score_graph, mask_graph):
        # the modules are picked by the graphs' structure, which reads the captured tensors'
        # dtypes and ranks: generate them while the plan has those tensors
        for kind in kinds:
            for module, _ in step_kernels(kind):
                plan.module(module)
        strip = lambda g: None if g is None else g._with_buffers([])  # noqa: E731
        self.plan = replace(plan, score_graph=strip(plan.score_graph), mask_graph=strip(plan.mask_graph),
                            score_bufs=[], mask_bufs=[])
        self.fwd_kind = kinds[0]
        self.fwd_fn = forward_launch(self.fwd_kind)
        self.grad_slots = plan.grad_slots
        self.replays: dict = {}
        self.keep = [g._memo for g in (score_graph, mask_graph) if g is not None]  # see replay._graph_key

    def plan_for(self, score_bufs, mask_bufs) -> Plan:
        """The cached plan bound to this call's captured tensors."""
        p = self.plan
        bind = lambda g, bufs: None if g is None else g._with_buffers(list(bufs))  # noqa: E731
        return replace(p, score_graph=bind(p.score_graph, score_bufs), mask_graph=bind(p.mask_graph, mask_bufs),
                       score_bufs=list(score_bufs), mask_bufs=list(mask_bufs))

    def _run(self, key, inputs, fn, args_of, results_of):
        """fn(*args_of()) through its replay for `key` when there is one; the first time, run
        normally and record the replay. Returns (the replay's result tensors, or fn's value;
        whether it was replayed)."""
        rep = self.replays.get(key)
        if rep is not None:
            result = rep(inputs)
            if result is not None:
                return result, True
        args = args_of()
        value = fn(*args)
        if key not in self.replays:
            self.replays[key] = replay.Replay.record(fn, args, inputs, results_of)
        return value, False

    def forward(self, q, k, v, score_bufs, mask_bufs):
        results, _ = self._run(self.fwd_kind, (q, k, v, *score_bufs, *mask_bufs), self.fwd_fn,
                               lambda: (self.plan_for(score_bufs, mask_bufs), q, k, v), lambda r: r)
        return tuple(results)   # (out, lse), and max_scores when the plan computes it

    def backward(self, q, k, v, out, lse, dout, dlse, score_bufs, mask_bufs):
        key = ("bwd", dout.stride(), None if dlse is None else dlse.stride())
        inputs = (q, k, v, out, lse, dout, *([] if dlse is None else [dlse]), *score_bufs, *mask_bufs)
        # gradients into captured tensors start as zeros: such a backward is not replayable
        # (the recording sees the zeros); its replay would return dq, dk, dv only
        value, replayed = self._run(
            key, inputs, launch_bwd,
            lambda: (self.plan_for(score_bufs, mask_bufs), q, k, v, out, lse, dout, dlse, score_bufs),
            lambda r: [*r[:3], *r[3]])
        return (*value, []) if replayed else value


def flex_attention_triton(q, k, v, *, score_graph=None, mask_graph=None, block_mask=None, scale=None,
                          kernel_options=None, dropout_p=0.0, dropout_seed=None, output_max=False):
    """(out [B,Hq,L,Ev] in q.dtype, lse [B,Hq,L] float32 natural log) - see CONTRACTS.md -
    and with output_max also max_scores [B,Hq,L] float32 (each row's max score; not
    differentiable). Differentiable w.r.t. q, k, v and the score_mod's captured float tensors
    that require grad."""
    if mask_graph is None and block_mask is not None:
        mask_graph = getattr(block_mask, "mask_graph", None)
    score_bufs = score_graph.buffers if score_graph is not None else []
    mask_bufs = mask_graph.buffers if mask_graph is not None else []
    grad = needs_grad(q, k, v, score_bufs)
    # a call like one before replays its launches (kernels.replay); dropout draws a new seed
    key = calls = run = None
    if not dropout_p and replay.ENABLED:
        key = replay.call_key(q, k, v, score_graph, mask_graph, block_mask, scale, kernel_options, grad, output_max)
        calls = replay.calls_of(block_mask)
        run = replay.lookup(calls, key)
    if run is None:
        plan = make_plan(q, k, v, score_graph=score_graph, mask_graph=mask_graph, block_mask=block_mask,
                         scale=scale, kernel_options=kernel_options, dropout_p=dropout_p,
                         dropout_seed=dropout_seed, output_max=output_max)
        kinds = (fwd_path(plan, q, k, v),) + ((bwd_path(plan, q, k, v),) if grad else ())
        routed = tiered.route(plan, kinds, block_mask, q, k, v)
        if calls is not None and routed is plan:  # tiering settled: the same plan every call
            run = CachedRun(plan, kinds, score_graph, mask_graph)
            replay.store(calls, key, run)
        else:
            run = PlannedRun(routed)
    return attend(run, q, k, v, score_bufs, mask_bufs, grad)
