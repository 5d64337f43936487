"""method=broyden, the classic DEQ-Transformer recipe: Broyden forward and for the implicit
adjoint, at the reversible iteration's block evaluations; it trains, its gradient is the
implicit one, and generation keeps the equilibrium cache (the only one that applies)."""

from __future__ import annotations

import pytest
import torch

from revdeq_kernels.lm import ConfigError, TransformerLM, cache_parity, generate, load_config, train
from tests.helpers import relative_error
from tests.test_lm_helpers import single_thread, small_config  # noqa: F401  (autouse fixture)
from tests.test_lm_model import model_config


def test_broyden_method_solves_with_twice_the_steps_and_the_implicit_adjoint():
    torch.manual_seed(0)
    model = TransformerLM(model_config(method="broyden", max_steps=3, tol=0.0))
    s = model.deq.settings
    assert (s.solver, s.adjoint, s.backward_solver, s.max_steps, s.backward_max_steps) == (
        "broyden", "implicit", "broyden", 6, 6), s
    idx = torch.randint(0, 50, (2, 12))
    _, loss = model(idx, idx)
    loss.backward()
    stats = model.deq.last_stats
    assert stats.nfe_forward == 7 and stats.nfe_backward == 1, (stats.nfe_forward, stats.nfe_backward)
    assert model.deq.last_adjoint_stats.steps == 6
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_broyden_gradient_approaches_the_unrolled_one_where_both_converge():
    """On the contractive anchored block in float64 the implicit gradient at the equilibrium
    is the limit of autograd through many fixed-point steps (same max_steps in both
    configs: it also sets the initialisation's residual depth)."""
    def grads(method, steps):
        torch.manual_seed(0)
        model = TransformerLM(model_config(block="anchored", method=method, max_steps=15, tol=1e-11)).double()
        idx = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
        with model.solver_settings(max_steps=steps, tol=0.0 if method == "unrolled" else 1e-11):
            model(idx, idx)[1].backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    truth = grads("unrolled", 60)
    error = relative_error(grads("broyden", 30), truth)
    assert error <= 1e-8, f"broyden (implicit, tol 1e-11) vs unrolled through 60 steps: {error:.3g}"


def test_broyden_model_trains(tmp_path):
    cfg = small_config(tmp_path, method="broyden", max_steps=3, tol=1e-3, max_iters=30, eval_interval=30,
                       checkpoint_interval=30)
    result = train(cfg, log=lambda *a: None)
    first, last = result.losses[min(result.losses)], result.val[30]["loss"]
    assert last < first - 0.5, f"method=broyden did not learn: loss {first:.3f} -> val {last:.3f}"


def test_broyden_generation_keeps_the_equilibrium_cache():
    torch.manual_seed(0)
    model = TransformerLM(model_config(block="anchored", method="broyden", seq_len=24, max_steps=15,
                                       tol=1e-11)).double()
    ids = torch.randint(0, 50, (2, 24))
    _, caches = model.prefill(ids[:, :5])
    assert caches[0].kind == "equilibrium" and caches[0].levels == 1
    gap = cache_parity(model, ids, prompt_len=5)
    assert gap <= 1e-8, f"broyden equilibrium cache vs full recomputation: {gap:.3g}"
    assert generate(model, ids[:, :5], 4, seed=0).cache_kind == "equilibrium"
    with pytest.raises(ValueError, match="'per-evaluation' does not apply to method=broyden"):
        model.prefill(ids[:, :5], cache="per-evaluation")


@pytest.mark.parametrize("overrides,message", [
    (["beta=1.5"], r"beta=1.5: is a damping and must be in \(0, 1\]"),
    (["reversal=exact"], "applies to method=reversible only"),
    (["grad_check_interval=5"], "needs method=reversible"),
])
def test_broyden_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", ["method=broyden", *overrides])


def test_a_broyden_model_can_infer_with_anderson():
    torch.manual_seed(0)
    broyden = TransformerLM(model_config(block="anchored", method="broyden", seq_len=24, max_steps=15,
                                         tol=1e-11)).double().eval()
    torch.manual_seed(0)
    anderson = TransformerLM(model_config(block="anchored", method="broyden", seq_len=24, max_steps=15, tol=1e-11,
                                          inference_solver="anderson")).double().eval()
    anderson.load_state_dict(broyden.state_dict())
    ids = torch.randint(0, 50, (2, 24))
    with torch.no_grad():
        gap = float((anderson(ids) - broyden(ids)).abs().max())
    assert anderson.last_stats.max_residual <= 1e-11, anderson.last_stats.max_residual
    assert gap <= 1e-9, f"anderson vs broyden fixed point of one model: max |logit difference| {gap:.3g} > 1e-9"
    with pytest.raises(ValueError, match="'per-evaluation' does not apply to inference_solver=anderson"):
        anderson.prefill(ids[:, :5], cache="per-evaluation")
    # a missed tol is not redone by the reversible iteration: a Broyden model has none
    with anderson.solver_settings(max_steps=2), torch.no_grad():
        anderson(ids)
    assert anderson.last_stats.max_residual > 1e-11 and anderson.iteration_fallbacks == 0, anderson.last_stats
