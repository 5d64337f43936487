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
    f's module, the weights it derived from them and keeps as plain attributes (torchdeq's
    reset_norm), then the ``declared`` tensors that require grad (a context f closes over), once each."""
    if isinstance(declared, Tensor):
        raise TypeError(f"parameters must be a list of tensors, got one Tensor of shape {tuple(declared.shape)}: "
                        "pass parameters=[t]")
    declared = list(declared)
    for i, t in enumerate(declared):
        if not isinstance(t, Tensor):
            raise TypeError(f"parameters[{i}] is a {type(t).__name__}, not a Tensor")
    module = module_of(f)
    params = [p for p in module.parameters() if p.requires_grad] if module is not None else []
    if module is not None and torch.is_grad_enabled():  # without a graph there is nothing derived (24 us saved)
        # the weights derived before the solve: the backward differentiates up to them, and autograd
        # takes their gradients on, through their graph, once (SolvedBindings)
        params += _derived_weights(module)
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
_SETATTR = nn.Module.__setattr__


class SolvedBindings:
    """The tensors f's module was bound to when a solve's forward pass ran (its parameters and
    buffers), bound again for the backward, each trainable parameter as a leaf alias.

    ``torch.func.functional_call`` binds other tensors to a module for one call and puts the
    originals back when it returns, before the loss's backward. The backward's recomputations
    of f would then run with the originals: they would differentiate tensors f no longer reads
    (None gradients for the tensors passed) and rebuild states with other weights. ``rebound()``
    binds the forward's tensors again, as autograd's saved tensors would.

    The aliases (``detach()`` of each parameter, the same storage) are what the backward's
    vector-Jacobian products differentiate. On the parameters themselves, autograd would run
    their tensor hooks (``p.register_hook``: gradient masks and scales, wandb.watch) at every
    one of the 2N VJPs and again on the sum the backward returns. A weight derived from the
    parameters before the solve (torchdeq's reset_norm) is an input of the solve itself
    (``gradient_inputs``); as no alias lies behind it, the VJPs stop there instead of freeing its
    graph at the first reverse step."""

    def __init__(self, module: nn.Module):
        self.modules = list(module.modules())
        # per submodule, its slots as solved: (the slots dict, a copy of it)
        self.slots = [(slots, dict(slots)) for m in self.modules for slots in (m._parameters, m._buffers) if slots]

    @contextlib.contextmanager
    def rebound(self):
        """Yields {id(parameter): the alias bound in its place}."""
        previous, bound = [], {}
        try:
            for slots, solved in self.slots:
                for name, tensor in solved.items():
                    if slots.get(name, _ABSENT) is not tensor:
                        previous.append((slots, name, slots.get(name, _ABSENT)))
                        slots[name] = tensor
            owned = [(module, name, param) for module in self.modules
                     for name, param in module._parameters.items() if param is not None and param.requires_grad]
            # a module that keeps its own list of its weights (nn.LSTM's _flat_weights) updates it in
            # __setattr__, which takes Parameters only; elsewhere a plain tensor goes into the slot, as
            # functional_call binds it (7x cheaper to make than a Parameter)
            by_setattr = {id(param) for module, _, param in owned if type(module).__setattr__ is not _SETATTR}
            for module, name, param in owned:
                if id(param) not in bound:
                    bound[id(param)] = (nn.Parameter(param.detach(), requires_grad=True) if id(param) in by_setattr
                                        else param.detach().requires_grad_())
                previous.append((module, name, param))
                if type(module).__setattr__ is _SETATTR:
                    module._parameters[name] = bound[id(param)]
                else:
                    setattr(module, name, bound[id(param)])
            yield bound
        finally:
            for owner, name, value in reversed(previous):
                if isinstance(owner, nn.Module):
                    # setattr refuses the plain tensors functional_call binds
                    if isinstance(value, nn.Parameter) and type(owner).__setattr__ is not _SETATTR:
                        setattr(owner, name, value)
                    else:
                        owner._parameters[name] = value
                elif value is _ABSENT:
                    del owner[name]
                else:
                    owner[name] = value


def _derived_weights(module: nn.Module) -> list[Tensor]:
    """The tensors with a graph that ``module`` and its submodules keep as plain attributes
    (not parameters or buffers): weights derived before the solve."""
    return [value for sub in module.modules() for value in vars(sub).values()
            if isinstance(value, Tensor) and value.grad_fn is not None and not isinstance(value, nn.Parameter)]
