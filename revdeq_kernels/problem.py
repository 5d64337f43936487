"""Everything a solve needs to know about f and its inputs, validated once.

Shared by the reversible solver, the unrolled reference and the classic DEQ baselines,
so that all of them call f the same way: the state cast to the dtype f computes in,
the same replayed random stream (``rng``), and the same checks on what f returns.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import fixed_point
from .f_module import BufferSnapshot, HeldBuffers, SolvedBindings, check_callable, module_of
from .first_order import refuse_forward_mode, refuse_function_transforms
from .kernel_choice import graph_kernels_only
from .ops import STATE_DTYPES, resolve_backend
from .packing import PackedF
from .rng import EvaluationRNG
from .stats import SolverStats

# Under torch.compile a solve is one graph break, run eagerly. Traced, it would compile
# f's forward evaluations while the backward recomputes f eagerly, in other kernels:
# reversal="exact" needs the same bits in both passes, and refuses the mismatch. The
# solve also reads host values on purpose: the RNG seed it replays, the stop test, the
# exact reversal's overflow flags and SolverStats' numbers.
EAGER_UNDER_COMPILE = ("revdeq_kernels runs each solve eagerly: its backward recomputes f eagerly, and "
                       "reversal='exact' needs f to compute the same bits in the forward pass and in that "
                       "recomputation; compile the layers around it (an f compiled on its own is checked the same way)")


def eager_under_compile(fn):
    """``fn`` as one graph break under torch.compile (torch.compiler.disable), with the reason."""
    try:
        return torch.compiler.disable(fn, reason=EAGER_UNDER_COMPILE)
    except TypeError:  # torch before 2.8 takes no reason
        return torch.compiler.disable(fn)


# Where to look when f computes other bits on two calls (a failed reversal's diagnosis).
NONDETERMINISM = ("look for a nondeterministic kernel (atomics: index_add_, scatter_add_, some cuDNN/cuBLAS "
                  "algorithms; torch.use_deterministic_algorithms(True) names them), or state f keeps between calls "
                  "outside its buffers (an attribute; buffers are held for the solve)")

_closures_checked: weakref.WeakSet = weakref.WeakSet()


def _accepts_z_and_x(f) -> bool:
    """Whether f's signature takes (z, x); asked only after f raised a TypeError, to tell a
    one-argument f (torchdeq's and locuslab/deq's convention) from an error inside f."""
    if isinstance(f, functools.partial) and isinstance(f.func, nn.Module):
        f = functools.partial(f.func.forward, *f.args, **f.keywords)
    elif isinstance(f, nn.Module):
        f = f.forward
    try:
        inspect.signature(f).bind(None, None)
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): nothing to say
        return True
    return True


def _as_is(t: Tensor) -> Tensor:
    return t


class UndeclaredInputs:
    """Refuses an f whose output depends on tensors that require grad other than z, x and the
    declared parameters: a tensor it closes over (``functools.partial(block, context=c)``) or
    keeps in a list (a plain tensor attribute of its module is an input: ``gradient_inputs``).
    The backward differentiates f with respect to z, x and the parameters only, so such a
    tensor would get no gradient, silently (a cross-attention block's partial lost 93% of the
    gradient). Checked on the forward pass's first evaluation, which then records a graph, once
    per f object (every call for a fresh one)."""

    def __init__(self, f, params: list):
        self.f = f
        self.declared = {id(p) for p in params}
        self.declared_nodes = {p.grad_fn for p in params if p.grad_fn is not None}

    @staticmethod
    def wanted(f) -> bool:
        """Whether ``f`` still needs the check, for a solve under grad mode."""
        try:
            return torch.is_grad_enabled() and f not in _closures_checked
        except TypeError:  # not weak-referenceable: check every time
            return torch.is_grad_enabled()

    def check(self, out: Tensor) -> None:
        undeclared = [leaf for leaf in graph_leaves(out, self.declared_nodes) if id(leaf) not in self.declared]
        if undeclared:
            shapes = ", ".join(str(tuple(t.shape)) for t in undeclared[:4]) + (", ..." if len(undeclared) > 4 else "")
            raise ValueError(
                f"f's output depends on {len(undeclared)} tensor(s) that require grad besides z, x and its "
                f"parameters (shapes {shapes}): something f closes over or keeps in a list or dict, or what it "
                "was computed from. The solve's backward would leave them without gradient. Pass them as "
                "keywords of the module's forward, deq(x, context=c), which calls f(z, x, context=c); or "
                "to rk.solve(..., parameters=[...]); or make them parameters of an nn.Module f")
        try:
            _closures_checked.add(self.f)
        except TypeError:
            pass


def graph_leaves(out: Tensor, stops: set) -> list[Tensor]:
    """The tensors that require grad (autograd's leaves) which ``out``'s graph reaches without
    passing through a node of ``stops`` (the grad_fn of an input with a graph: a derived weight,
    a context computed upstream, whose own graph is the caller's business)."""
    leaves, seen, stack = [], set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)  # AccumulateGrad
        if leaf is not None:
            leaves.append(leaf)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def _graph_inputs(*tensors: Tensor) -> list[Tensor]:
    """The leaves that require grad (the backward's detached z and x) as views of themselves: a
    module hook that registers gradient hooks on its inputs (the module trackers of
    FlopCounterMode and FSDP) fails on a leaf under the backward's torch.autograd.grad ("A leaf
    node was passed to _will_engine_execute_node")."""
    if not torch.is_grad_enabled():
        return list(tensors)
    return [t.view_as(t) if t.is_leaf and t.requires_grad else t for t in tensors]


def _versions(*tensors: Tensor) -> tuple:
    """Version counters (None for inference-mode tensors, which have none)."""
    return tuple(None if t.is_inference() else t._version for t in tensors)


def _check_inputs_untouched(versions: tuple, z: Tensor, x: Tensor) -> None:
    """f writing into z or x (``nn.ReLU(inplace=True)`` as its first layer) would overwrite the
    solver's state or the input injection of every later evaluation: before, the unrolled
    iteration returned another z than the same f computing out of place, silently."""
    for name, version, t in (("z", versions[0], z), ("x", versions[1], x)):
        if version is not None and t._version != version:
            raise ValueError(
                f"f modified its input {name} in place (an in-place op on its argument, such as "
                f"nn.ReLU(inplace=True) applied to {name}), which would overwrite the solver's "
                f"{'state' if name == 'z' else 'input injection'}; compute out of place on {name} "
                f"or clone it first")


@dataclass(frozen=True)
class Problem:
    """One solve: f, its input injection's dtype/device, and the validated settings
    resolved for them (the state dtype and the backend)."""

    f: object
    beta: float
    max_steps: int
    tol: float
    state_dtype: torch.dtype
    f_dtype: torch.dtype  # what f is fed: the dtype of x
    output_dtype: torch.dtype  # what the solve returns: state_dtype, or float16 for float32 states chosen for a float16 x
    device: torch.device
    backend: str
    on_nonfinite: str
    rng: EvaluationRNG
    autocast: tuple[bool, torch.dtype]
    params: list  # the tensors the backward differentiates
    buffers: HeldBuffers
    undeclared: UndeclaredInputs | None  # None: checked before, or no graph is wanted
    differentiated: bool  # a backward follows: it may evaluate f again, under autograd
    bindings: SolvedBindings | None  # f's module's tensors as solved; None: no module, or no backward
    stats: SolverStats = field(default_factory=SolverStats)
    ratio: fixed_point.Ratio | None = None  # 1 - beta as n/d: reversal="exact" only
    frac_bits: int = 0

    @property
    def exact(self) -> bool:
        return self.ratio is not None

    def as_output(self, states: list[Tensor]) -> list[Tensor]:
        """The returned states in ``output_dtype``: a float16 x gets a float16 z back, as from
        any layer of a ``.half()`` model, though the iteration kept float32 states."""
        return [state if state.dtype == self.output_dtype else state.to(self.output_dtype) for state in states]

    def call_f(self, state: Tensor, x: Tensor, index: int) -> Tensor:
        """f(state, x) as evaluation number ``index`` (which fixes its random stream)."""
        z_in = state if state.dtype == self.f_dtype else state.to(self.f_dtype)
        self.buffers.before_evaluation()
        with self.rng.evaluation(index), graph_kernels_only(self.differentiated):
            try:
                versions = _versions(z_in, x)
                if index == 0 and self.undeclared is not None and not torch.is_grad_enabled():
                    # the forward pass's first evaluation (the unrolled adjoint's runs under grad mode
                    # and needs no check): a graph on detached z and x reaches only what else needs grad.
                    # It is freed at once, so the caller's saved-tensor hooks (offloading) never see it.
                    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_as_is, _as_is):
                        out = self.f(z_in.detach(), x.detach())
                    if isinstance(out, Tensor):
                        self.undeclared.check(out)
                        out = out.detach()
                else:
                    out = self.f(*_graph_inputs(z_in, x))
                _check_inputs_untouched(versions, z_in, x)
            except Exception as error:
                if index == 0 and isinstance(error, TypeError) and not _accepts_z_and_x(self.f):
                    raise TypeError(
                        f"f is called as f(z, x), but its signature does not take two arguments ({error}); a "
                        "one-argument f(z) that closes over x, as in torchdeq, becomes lambda z, x: f(z)"
                    ) from error
                if index == 0 and state.shape != x.shape and not isinstance(self.f, PackedF):  # a z0 unlike x
                    first = (str(error).strip().splitlines() or [""])[0]
                    raise ValueError(
                        f"z0 has shape {tuple(state.shape)} but x has shape {tuple(x.shape)}, and f failed on it "
                        f"({type(error).__name__}: {first}); z0 must have the shape f(z, x) returns"
                    ) from error
                raise
        self._check_output(out, state)
        return out

    def recomputation_suspect(self, state: Tensor, x: Tensor) -> str:
        """Why f's recomputation may differ from its forward evaluation, measured at ``state``:
        f(state, x) evaluated twice without a graph and once with one, with the same random stream
        and buffers. A sentence naming the cause, or "" when the three agree."""
        with BufferSnapshot(self.f), self.autocast_context():
            with torch.no_grad():
                first, second = self.call_f(state, x, 1), self.call_f(state, x, 1)
            with torch.enable_grad():
                recorded = self.call_f(state.detach().requires_grad_(), x.detach(), 1).detach()
        if not torch.equal(first, second):
            return ("f computes other bits on two calls with the same input, random stream and buffers (measured "
                    f"at the solve's last state): {NONDETERMINISM}")
        if not torch.equal(second, recorded):
            return ("f computes other bits when autograd records it than when it does not (measured at the solve's "
                    "last state): the forward pass evaluates f without a graph, the backward's recomputation with "
                    "one. A module in f picks its kernel by torch.is_grad_enabled() or by whether its inputs "
                    "require grad (the fused inference paths of nn.MultiheadAttention and "
                    "nn.TransformerEncoderLayer are switched off for these solves already); make it take one "
                    "path in both: for scaled_dot_product_attention, pin its backend with "
                    "torch.nn.attention.sdpa_kernel; an nn.LSTM on CPU runs oneDNN kernels that differ, so run the "
                    "forward and the backward under torch.backends.mkldnn.flags(enabled=False)")
        return ""

    def _check_output(self, out, state: Tensor) -> None:
        if not isinstance(out, Tensor):
            raise TypeError(f"f must return a Tensor, got {type(out).__name__}")
        if out.shape != state.shape:
            raise ValueError(
                f"f returned shape {tuple(out.shape)} but the state z has shape "
                f"{tuple(state.shape)}; f(z, x) must return a tensor of z's shape"
            )
        if not out.is_floating_point():
            raise TypeError(f"f must return a floating-point tensor, got dtype {out.dtype}")
        if out.device != state.device:
            raise ValueError(f"f returned a tensor on {out.device} but the state is on {state.device}")

    def parameter_versions(self) -> list[int]:
        """The version counters of the tensors the backward differentiates, for
        ``as_solved`` (autograd's own check on saved tensors, for tensors the
        backward re-reads instead of saving)."""
        return [p._version for p in self.params]

    @contextlib.contextmanager
    def as_solved(self, versions: list[int]):
        """For a backward: f's module bound to the tensors it was solved with, each trainable
        parameter as a leaf alias (``SolvedBindings``), after refusing parameters modified in
        place since the forward pass (an optimizer step, an EMA update before
        ``loss.backward()``): the recomputations would differentiate another f than the one
        solved. Plain autograd refuses the same. Yields what the VJPs differentiate in place of
        ``params``, in their order."""
        self._check_parameters_unchanged(versions)
        if self.bindings is None:
            yield list(self.params)
            return
        with self.bindings.rebound() as aliases:
            yield [aliases.get(id(p), p) for p in self.params]

    def check_parameters_read_through(self, out: Tensor, inputs: list[Tensor]) -> None:
        """Refuse a backward whose recomputed ``out`` reaches one of f's parameters other than
        through ``inputs`` (the aliases ``as_solved`` yields, the derived weights, the context):
        f read a tensor derived from the parameter that the solve does not take as an input, so
        the VJPs, which differentiate the aliases, would leave its gradient out."""
        aliased = {id(p): p for p, alias in zip(self.params, inputs) if alias is not p}
        if not aliased or out.grad_fn is None:
            return
        stops = {t.grad_fn for t in inputs if t.grad_fn is not None}
        reached = [leaf for leaf in graph_leaves(out, stops) if id(leaf) in aliased]
        if reached:
            module = module_of(self.f)
            names = {id(p): name for name, p in module.named_parameters()} if module is not None else {}
            what = ", ".join(names.get(id(p), str(tuple(p.shape))) for p in reached[:4])
            raise RuntimeError(
                f"f read a tensor derived from its parameters ({what}) that the DEQ does not take as an input, so "
                "its backward would leave that share of their gradient out: a weight cached by "
                "torch.nn.utils.parametrize.cached() while the backward runs, or kept in a list or dict. Leave "
                "cached() before calling backward() (its documented pattern wraps the forward pass only), keep "
                "the derived weight as a plain attribute of f's module, or pass it as a keyword, deq(x, w=w)")

    def _check_parameters_unchanged(self, versions: list[int]) -> None:
        changed = [i for i, (p, version) in enumerate(zip(self.params, versions)) if p._version != version]
        if not changed:
            return
        module = module_of(self.f)
        names = {id(p): name for name, p in module.named_parameters()} if module is not None else {}
        what = ", ".join(f"{names.get(id(self.params[i]), 'a tensor')} {tuple(self.params[i].shape)}"
                         for i in changed[:4]) + (", ..." if len(changed) > 4 else "")
        raise RuntimeError(
            f"one of the variables needed for gradient computation has been modified by an inplace operation: "
            f"{len(changed)} of f's parameters or context tensors ({what}) changed between the solve's forward "
            "pass and its backward, which recomputes f with them; call backward() before optimizer.step() or "
            "any in-place update of them")

    def autocast_context(self):
        enabled, dtype = self.autocast
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled)

    @property
    def computes_in_float16(self) -> bool:
        """f runs in float16 (its input's dtype or autocast's): the precision whose losses
        torch.amp.GradScaler scales, expecting some backward passes to overflow."""
        enabled, dtype = self.autocast
        return self.f_dtype == torch.float16 or (enabled and dtype == torch.float16)

    def report_nonfinite_gradient(self, cause: str = "") -> None:
        """An adjoint became non-finite while every state stayed finite, as autograd through
        the same iteration would give it; the gradients keep the NaN or Inf. In float16 that
        is loss scaling's overflow, which torch.amp.GradScaler finds in the gradients and skips:
        a warning, shown once, whatever on_nonfinite. Otherwise on_nonfinite decides. ``cause``:
        where it arose; none, the gradient arrived so from the loss."""
        if self.computes_in_float16:
            warnings.warn(
                "a DEQ's gradient overflowed float16 (NaN or Inf in the backward's adjoint, every state finite) and "
                "its gradients keep it, as autograd's do: torch.amp.GradScaler skips such a step and lowers its "
                "scale. Without a GradScaler, scale the loss down or compute f in bfloat16 (shown once)",
                RuntimeWarning, stacklevel=3)
            return
        message = ("the gradient through the DEQ became non-finite (NaN or Inf) while every state stayed finite: "
                   + (cause or "dL/dz reached the DEQ's output non-finite, from the layers after it or the loss"))
        if self.on_nonfinite == "raise":
            raise FloatingPointError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _autocast_state(device: torch.device) -> tuple[bool, torch.dtype]:
    try:
        return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)
    except (RuntimeError, TypeError):  # device types without autocast support
        return False, torch.float32


def make_problem(f, x: Tensor, z0: Tensor | None, settings, params: list) -> tuple[Problem, Tensor]:
    """The Problem of one call and its initial state, from validated ``settings`` (a
    SolveSettings or DEQSettings; their ``beta`` is already checked for its solver)."""
    if getattr(torch.compiler, "is_exporting", lambda: False)():
        raise RuntimeError("torch.export cannot trace a DEQ solve: it reads its states' values as it runs (the stop "
                           "test, the non-finite checks, the fixed-point range); export the layers before and after "
                           "the DEQ as separate programs and run the solve eagerly between them")
    check_callable(f)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0:
        raise ValueError("x must have a batch dimension (dim 0); got a 0-d tensor")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor (f computes in x's dtype), got {x.dtype}")
    if x.device.type == "meta":
        raise ValueError("x is on the meta device, which holds no values: a solve reads its states' values (the "
                         "stop test, the fixed-point states); run it on cpu or cuda tensors")
    state_dtype = settings.state_dtype or (z0.dtype if isinstance(z0, Tensor) and z0.dtype in STATE_DTYPES
                                           else x.dtype)
    output_dtype = state_dtype
    if state_dtype == torch.float16 and settings.state_dtype is None:
        # float16 x (a float16 model, or float16 autocast before the DEQ): float32 states, as autocast keeps
        # sums in float32; float16's range (65504) is too short for states the steps accumulate into. z
        # goes back in float16, so that the float16 layers after the DEQ accept it.
        state_dtype = torch.float32
    if state_dtype not in STATE_DTYPES:
        raise TypeError(
            f"states are kept in {state_dtype} (x's dtype) but must be one of {STATE_DTYPES}; "
            "pass state_dtype=torch.float32 or float64"
        )
    if z0 is None:
        start = torch.zeros(x.shape, dtype=state_dtype, device=x.device)
    else:
        if not isinstance(z0, Tensor):
            raise TypeError(f"z0 must be a torch.Tensor or None, got {type(z0).__name__}")
        if z0.device != x.device:
            raise ValueError(f"z0 is on {z0.device} but x is on {x.device}")
        if z0.dim() == 0 or z0.shape[0] != x.shape[0]:
            raise ValueError(
                f"z0 has shape {tuple(z0.shape)} but x has shape {tuple(x.shape)}: "
                "they must share the batch dimension (dim 0)"
            )
        if not z0.is_floating_point():
            raise TypeError(f"z0 must be a floating-point tensor, got {z0.dtype}")
        start = z0.detach().to(state_dtype).contiguous()
    refuse_function_transforms(settings.adjoint)
    refuse_forward_mode(settings.adjoint, [x, z0, *params])
    differentiated = torch.is_grad_enabled() and (
        x.requires_grad or (z0 is not None and z0.requires_grad) or any(p.requires_grad for p in params))
    backend = resolve_backend(settings.backend, x.device)
    module = module_of(f)
    random_stream = EvaluationRNG(x.device, settings.rng)
    problem = Problem(
        f=f, beta=settings.beta, max_steps=settings.max_steps, tol=settings.tol, state_dtype=state_dtype,
        f_dtype=x.dtype, output_dtype=output_dtype, device=x.device, backend=backend, on_nonfinite=settings.on_nonfinite,
        rng=random_stream, autocast=_autocast_state(x.device),
        params=params, buffers=HeldBuffers(f), differentiated=differentiated,
        bindings=SolvedBindings(module) if differentiated and module is not None else None,
        stats=SolverStats(backend=backend, random_stream=random_stream),
        undeclared=UndeclaredInputs(f, params) if UndeclaredInputs.wanted(f) else None,
        ratio=fixed_point.beta_ratio(settings.beta) if settings.resolved_reversal == "exact" else None,
        frac_bits=(settings.frac_bits or fixed_point.default_frac_bits(x.dtype)) if settings.resolved_reversal == "exact" else 0,
    )
    return problem, start
