"""f computes the same bits in the forward pass (no graph) and the backward's recomputation
(graph): PyTorch's attention modules in eval mode, whose fused inference path runs only
without a graph, are kept on one path for solves a backward follows, and kept fast for
inference; an f that still branches on autograd's mode is named when a reversal fails."""

from __future__ import annotations

import copy
import math
import threading
import warnings

import pytest
import torch
from torch import nn

import revdeq_kernels as rk
from revdeq_kernels.kernel_choice import graph_kernels_only
from tests.helpers import RecurrentBlock, TanhBlock, devices, relative_error

WIDTH = 32


class EncoderBlock(nn.Module):
    """nn.TransformerEncoderLayer as f, the way a user drops one into a DEQ."""

    def __init__(self, norm_first: bool):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(WIDTH, 4, 2 * WIDTH, dropout=0.0, batch_first=True,
                                                norm_first=norm_first)

    def forward(self, z, x):
        return self.layer(z + x)


class AttentionBlock(nn.Module):
    """A pre-LN residual nn.MultiheadAttention block: expansive, as a transformer's."""

    def __init__(self):
        super().__init__()
        self.norm, self.attention = nn.LayerNorm(WIDTH), nn.MultiheadAttention(WIDTH, 4, batch_first=True)

    def forward(self, z, x):
        h = self.norm(z)
        return z + self.attention(h, h, h, need_weights=False)[0] + x


BLOCKS = {"encoder_postln": lambda: EncoderBlock(False), "encoder_preln": lambda: EncoderBlock(True),
          "multihead_attention": AttentionBlock}


def block_and_input(name, device):
    torch.manual_seed(0)
    return BLOCKS[name]().to(device).eval(), torch.randn(3, 10, WIDTH, device=device)


def grads(f, x, **settings):
    x = x.clone().requires_grad_(True)
    z = rk.solve(f, x, beta=0.5, max_steps=8, tol=0, **settings).z
    return torch.cat([g.flatten() for g in torch.autograd.grad(z.square().sum(), [x, *f.parameters()])])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("name", list(BLOCKS))
def test_torch_attention_in_eval_mode_reverses_bit_for_bit(name, device):
    f, x = block_and_input(name, device)
    with torch.no_grad():
        inference = f(x, x)
    recorded = f(x, x)
    if torch.equal(inference, recorded.detach()):
        pytest.skip(f"{name} on {device}: this torch computes the same bits with and without a graph")
    truth = grads(copy.deepcopy(f).double(), x.double(), adjoint="unrolled")
    backprop = relative_error(grads(f, x, adjoint="unrolled"), truth)
    exact = relative_error(grads(f, x, reversal="exact"), truth)
    assert exact <= 10 * max(backprop, 1e-7), (
        f"{name} in eval mode on {device}: the exact reversal's gradient error {exact:.3g} against float64 "
        f"autograd is over 10x float32 backprop's {backprop:.3g}")
    deq = rk.ReversibleDEQ(f, beta=0.5, max_steps=8, tol=0, reversal="float")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # drift on this expansive block: measured, not the point here
        deq(x.clone().requires_grad_()).sum().backward()
    f.train()
    trained_mode = rk.solve(f, x.clone().requires_grad_(), beta=0.5, max_steps=8, tol=0, reversal="float")
    trained_mode.z.sum().backward()
    assert deq.last_stats.reconstruction_error == trained_mode.stats.reconstruction_error, (
        f"{name} on {device}: the float reversal drifted {deq.last_stats.reconstruction_error:.3g} in eval mode but "
        f"{trained_mode.stats.reconstruction_error:.3g} in train mode (dropout 0: the same function)")


class FastPathProbe(nn.Module):
    """A contractive f that records the fast-path switch at every evaluation."""

    def __init__(self):
        super().__init__()
        self.inner, self.seen = TanhBlock(WIDTH), []

    def forward(self, z, x):
        self.seen.append(torch.backends.mha.get_fastpath_enabled())
        return self.inner(z, x)


@pytest.mark.parametrize("reversal", ["exact", "float"])
def test_fast_path_off_only_while_a_differentiated_solve_runs(reversal):
    f, x = FastPathProbe(), torch.randn(4, WIDTH)
    deq = rk.ReversibleDEQ(f, beta=0.5, max_steps=4, tol=0, reversal=reversal)
    with torch.no_grad():
        deq(x)
    assert f.seen and all(f.seen), f"inference must keep the fast path: the switch read {f.seen}"
    f.seen.clear()
    deq(x).sum().backward()
    assert len(f.seen) >= 16 and not any(f.seen), f"forward and backward must both run without it: {f.seen}"
    assert torch.backends.mha.get_fastpath_enabled(), "the switch must be restored after the solve"


def test_the_switch_is_restored_after_an_error_and_keeps_a_user_setting():
    def failing(z, x):
        raise ValueError("f failed")

    x = torch.randn(2, WIDTH, requires_grad=True)
    with pytest.raises(ValueError, match="f failed"):
        rk.solve(failing, x, max_steps=2)
    assert torch.backends.mha.get_fastpath_enabled(), "an error in f must not leave the fast path off"
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        rk.solve(TanhBlock(WIDTH), x, max_steps=2).z.sum().backward()
        assert not torch.backends.mha.get_fastpath_enabled(), "a user's own setting must be left as it was"
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


def test_overlapping_solves_in_two_threads_restore_the_switch_when_the_last_ends():
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    read_after_first: list[bool] = []

    def second():
        with graph_kernels_only():
            second_in.set()
            first_out.wait(5)
            read_after_first.append(torch.backends.mha.get_fastpath_enabled())

    thread = threading.Thread(target=second)
    with graph_kernels_only():
        first_in.set()
        thread.start()
        assert second_in.wait(5)
    first_out.set()
    thread.join(5)
    assert read_after_first == [False], "the first solve's end must not turn the path on under the second"
    assert torch.backends.mha.get_fastpath_enabled()


class GradModeBranch(nn.Module):
    """f that computes other bits when autograd records it: the case the diagnosis names."""

    def __init__(self, branches: bool):
        super().__init__()
        self.inner, self.branches, self.calls = TanhBlock(WIDTH), branches, 0

    def forward(self, z, x):
        self.calls += 1
        if self.branches:
            scale = 1.001 if torch.is_grad_enabled() else 1.0
        else:  # differs between calls, not between modes
            scale = 1.0 + 1e-3 * (self.calls % 3)
        return self.inner(z, x) * scale


@pytest.mark.parametrize("branches", [True, False], ids=["grad_mode_branch", "call_counter"])
def test_a_reversal_that_fails_names_the_cause_it_measured(branches):
    x = torch.randn(4, WIDTH, requires_grad=True)
    by_mode, by_call = "f computes other bits when autograd records it", "f computes other bits on two calls"
    expected, other = (by_mode, by_call) if branches else (by_call, by_mode)
    deq = rk.ReversibleDEQ(GradModeBranch(branches), beta=0.5, max_steps=12, tol=0, reversal="exact")
    with pytest.raises(RuntimeError, match="did not compute the same bits") as raised:
        deq(x).sum().backward()
    message = str(raised.value)
    assert expected in message and other not in message, f"exact reversal's error: {message}"
    deq = rk.ReversibleDEQ(GradModeBranch(branches), beta=0.5, max_steps=12, tol=0, reversal="float")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        deq(x).sum().backward()
    drift = [str(w.message) for w in caught if "relative error" in str(w.message)]
    assert len(drift) == 1 and expected in drift[0] and other not in drift[0], f"float reversal's warnings: {drift}"


class RecomputedLarger(nn.Module):
    """f whose recomputation under autograd is ``factor`` times its forward value: the
    backward's inverse leaves the fixed-point range (1e3) or turns non-finite (inf), which the
    forward pass never did."""

    def __init__(self, factor: float):
        super().__init__()
        self.inner, self.factor = TanhBlock(WIDTH), factor

    def forward(self, z, x):
        # z requires grad in the backward's recomputation only (the forward's first, checked
        # evaluation records a graph on a detached z)
        return self.inner(z, x) * (self.factor if z.requires_grad else 1.0)


@pytest.mark.parametrize("factor, state", [(1e3, "outside the exact range"), (math.inf, "non-finite")])
def test_a_state_gone_wrong_only_in_the_backward_is_named_a_recomputation_mismatch(factor, state):
    # non-finite: its adjoints are too, and the state, the cause, is what gets named
    x = torch.randn(4, WIDTH, requires_grad=True)
    deq = rk.ReversibleDEQ(RecomputedLarger(factor), beta=0.5, max_steps=40, tol=0, reversal="exact")
    z = deq(x)
    with pytest.raises(RuntimeError, match=rf"rebuilt a state {state} undoing step \d+ of 40, where "
                                           r"the forward pass had none: f did not compute the same bits.*"
                                           r"when autograd records it"):
        z.sum().backward()


def test_an_lstm_on_cpu_is_named_and_its_remedy_works():
    torch.manual_seed(0)
    f, x = RecurrentBlock("LSTM", WIDTH), torch.randn(2, 5, WIDTH)
    with torch.no_grad():
        inference = f(x, x)
    if torch.equal(inference, f(x, x).detach()):
        pytest.skip("this torch's CPU LSTM computes the same bits with and without a graph")
    deq = rk.ReversibleDEQ(f, beta=0.5, max_steps=12, tol=0, reversal="exact")
    with pytest.raises(RuntimeError, match="when autograd records it.*torch.backends.mkldnn.flags"):
        deq(x.clone().requires_grad_()).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # oneDNN's TF32 note when the flags are set
        with torch.backends.mkldnn.flags(enabled=False):
            deq(x.clone().requires_grad_()).sum().backward()
    assert deq.last_stats.reconstruction_error == 0.0
