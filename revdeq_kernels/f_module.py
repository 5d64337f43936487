"""What f is made of: the module behind it (parameters, buffers), the context keywords bound
to it, the buffers held still across the evaluations of one solve, and the tensors its module
was bound to when solved.

f may be an nn.Module, a functools.partial of one (the usual way to hand a block its
context), a PackedF (a state of several tensors) around either, or a plain function; the
solve differentiates the module's trainable parameters plus the tensors declared with it.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.utils._pytree
from torch import Tensor, nn

from .packing import PackedF


def module_of(f) -> nn.Module | None:
    """The module behind f: f itself, or the module a functools.partial wraps (the usual way
    to hand a block its context) or a PackedF (tuple states), whose parameters and buffers are f's."""
    while isinstance(f, (functools.partial, PackedF)):
        f = f.func if isinstance(f, functools.partial) else f.f
    return f if isinstance(f, nn.Module) else None


def check_callable(f) -> None:
    if not callable(f):
        raise TypeError(f"f must be callable (an nn.Module or a function), got {type(f).__name__}")


def attach_f(layer: nn.Module, f) -> None:
    """``layer.f = f``; when f is a functools.partial of a module, that module is also
    registered, as ``layer.f_module``, so that ``layer.parameters()`` (the optimizer),
    ``.to()`` and ``state_dict()`` include it as they would for the module itself."""
    check_callable(f)
    layer.f = f
    module = module_of(f)
    if module is not None and module is not f:
        layer.f_module = module


def gradient_inputs(f, declared=()) -> list[Tensor]:
    """What a solve's backward differentiates besides x and z0: the trainable parameters of
    f's module, then the ``declared`` tensors that require grad (a context f closes over), once each."""
    if isinstance(declared, Tensor):
        raise TypeError(f"parameters must be a list of tensors, got one Tensor of shape {tuple(declared.shape)}: "
                        "pass parameters=[t]")
    declared = list(declared)
    for i, t in enumerate(declared):
        if not isinstance(t, Tensor):
            raise TypeError(f"parameters[{i}] is a {type(t).__name__}, not a Tensor")
    module = module_of(f)
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    known = {id(p) for p in params}
    for t in declared:
        if t.requires_grad and id(t) not in known:
            params.append(t)
            known.add(id(t))
    return params


def bind_context(f, context: dict) -> tuple[object, list[Tensor]]:
    """``f`` with ``context`` bound as keywords, ``f(z, x, **context)``, and the tensors in the
    context (nested in lists, tuples and dicts too) that get gradients: what the modules'
    ``forward(x, z0, **context)`` hands to the solve."""
    if not context:
        return f, []
    leaves = torch.utils._pytree.tree_leaves(context)
    return functools.partial(f, **context), [t for t in leaves if isinstance(t, Tensor) and t.requires_grad]


def module_buffers(f) -> list[Tensor]:
    module = module_of(f)
    return list(module.buffers()) if module is not None else []


class HeldBuffers:
    """f's buffers, held at their values from a solve's first evaluation for every evaluation of
    that solve, forward and backward.

    A module that updates a buffer when called (spectral_norm's power iteration, BatchNorm's
    running statistics, a counter) is otherwise a different function at every evaluation, and
    the backward's recomputations, which come after all of the forward's updates, cannot match
    the forward: reversal="exact" refused, the float reversal drifted silently. Held, every
    evaluation starts from the same buffers, and the forward pass leaves them as its last
    evaluation updated them: one power iteration, one running-statistics update per solve, as
    for a layer called once.

    Every buffer is put back before every evaluation but the first: whether f wrote one cannot
    be told without reading it on the device (BatchNorm's kernel writes its running statistics
    without bumping their version counters). The write goes through ``.data``, as that kernel's
    does, so a graph that saved the buffer (adjoint="unrolled") sees no version change."""

    def __init__(self, f):
        self.buffers = module_buffers(f)
        self.start: list[Tensor] | None = None

    def before_evaluation(self) -> None:
        if not self.buffers:
            return
        if self.start is None:
            self.start = [buf.detach().clone() for buf in self.buffers]
            return
        for buf, value in zip(self.buffers, self.start):
            buf.data.copy_(value)


class BufferSnapshot:
    """Restore f's buffers (BatchNorm running stats, counters) after evaluations that are not
    a forward pass of the model (the backward's recomputations, a penalty's evaluation), so
    that they do not count as another training step. Through ``.data``, as HeldBuffers: a
    graph that saved a buffer (training-mode BatchNorm saves its running statistics) stays
    valid."""

    def __init__(self, f):
        self.saved = [(buf, buf.detach().clone()) for buf in module_buffers(f)]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for buf, value in self.saved:
            buf.data.copy_(value)


_ABSENT = object()


class SolvedBindings:
    """The tensors f's module was bound to when a solve's forward pass ran: its
    parameters and buffers, and the weights derived from them that it keeps as plain
    attributes.

    ``torch.func.functional_call`` binds other tensors to a module for one call and puts the
    originals back when it returns, before the loss's backward. The backward's recomputations
    of f would then run with the originals: they would differentiate tensors f no longer reads
    (None gradients for the tensors passed) and rebuild states with other weights. ``rebound()``
    binds the forward's tensors again for the backward, as autograd's saved tensors would.

    A derived weight is one computed once per forward from parameters, with a graph, and read by
    every evaluation of f: torchdeq's ``reset_norm`` (weight norm computed once per training
    step), MDEQ's weight-norm ``reset()``. The reversible backward differentiates f once per
    reverse step, and the first VJP through such a weight frees its graph, so that the second
    raised. With ``leaves=True`` each one is bound as a detached leaf instead (``derived``): the
    backward collects its gradient over every step, then sends it through the weight's graph
    once (``gradients_through_derived``)."""

    def __init__(self, module: nn.Module):
        modules = list(module.modules())
        # per submodule, its slots as solved: (the slots dict, a copy of it)
        self.slots = [(slots, dict(slots)) for m in modules for slots in (m._parameters, m._buffers) if slots]
        self.derived = [(m, attribute, value) for m in modules for attribute, value in vars(m).items()
                        if isinstance(value, Tensor) and value.grad_fn is not None
                        and not isinstance(value, nn.Parameter)]

    @contextlib.contextmanager
    def rebound(self, leaves: bool = False):
        """Yields [(derived weight, the leaf bound in its place)], empty without ``leaves``."""
        previous, attributes, stand_ins = [], [], []
        try:
            for slots, solved in self.slots:
                for name, tensor in solved.items():
                    if slots.get(name, _ABSENT) is not tensor:
                        previous.append((slots, name, slots.get(name, _ABSENT)))
                        slots[name] = tensor
            for module, attribute, weight in (self.derived if leaves else ()):
                leaf = weight.detach().requires_grad_()
                attributes.append((module, attribute, getattr(module, attribute, None)))
                setattr(module, attribute, leaf)
                stand_ins.append((weight, leaf))
            yield stand_ins
        finally:
            for module, attribute, value in reversed(attributes):
                setattr(module, attribute, value)
            for slots, name, value in reversed(previous):
                if value is _ABSENT:
                    del slots[name]
                else:
                    slots[name] = value


def gradients_through_derived(stand_ins: list[tuple[Tensor, Tensor]], gradients: list[Tensor | None],
                              params: list[Tensor]) -> list[Tensor | None]:
    """dL/dparams through the derived weights, from the gradients their stand-in leaves
    collected: one pass through each weight's graph. The graph is kept (it is the forward's, as
    the weight is), so that a second backward of a retained graph finds it."""
    used = [(weight, g) for (weight, _), g in zip(stand_ins, gradients) if g is not None]
    if not used or not params:
        return [None] * len(params)
    try:
        return list(torch.autograd.grad([w for w, _ in used], params, [g.to(w.dtype) for w, g in used],
                                        retain_graph=True, allow_unused=True))
    except RuntimeError as error:
        if "backward through the graph a second time" not in str(error):
            raise
        raise RuntimeError("a weight f's module derived from its parameters before the solve (a plain tensor "
                           "attribute with a graph, such as torchdeq's reset_norm sets) had its graph freed "
                           "before the DEQ's backward reached it; derive it again in each forward pass") from None
