"""The transformer LM: shapes, finite gradients, reversible = unrolled gradients, causality."""

from __future__ import annotations

import pytest
import torch

from revdeq_kernels.lm import LMConfig, TransformerLM
from tests.helpers import relative_error
from tests.test_lm_helpers import single_thread  # noqa: F401  (autouse fixture)


def model_config(**overrides) -> LMConfig:
    values = dict(vocab_size=50, seq_len=12, d_model=16, n_heads=2, n_layers=3, max_steps=3, tol=0.0,
                  beta=0.8, dataset="files", data_files=["unused"], backend="torch")
    values.update(overrides)
    return LMConfig(**values)


@pytest.mark.parametrize("method", ["reversible", "unrolled", "explicit"])
def test_forward_backward_shapes_and_finite(method):
    torch.manual_seed(0)
    model = TransformerLM(model_config(method=method, dropout=0.1))
    idx = torch.randint(0, 50, (3, 12))
    logits, loss = model(idx, torch.randint(0, 50, (3, 12)))
    assert logits.shape == (3, 12, 50), f"{method}: logits shape {tuple(logits.shape)}"
    assert torch.isfinite(logits).all() and torch.isfinite(loss), f"{method}: non-finite output, loss {loss}"
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{method}: no gradient reached {name}"
        assert torch.isfinite(p.grad).all(), f"{method}: non-finite gradient in {name}"
    if method == "explicit":
        assert len(model.blocks) == 3 and model.last_stats is None
    else:
        assert model.last_stats.steps == 3 and model.last_stats.nfe_backward == (6 if method == "reversible" else 0)
    assert model.head.weight is model.tok_emb.weight, "tie_embeddings: the head must share the embedding"


def lm_gradients(method: str, dropout: float, rng: str = "per_solve") -> tuple[torch.Tensor, float]:
    torch.manual_seed(0)
    model = TransformerLM(model_config(method=method, dropout=dropout, beta=0.7, max_steps=4, rng=rng)).double()
    assert model.deq.settings.rng == rng, f"config rng={rng!r} did not reach the DEQ: {model.deq.settings.rng!r}"
    idx, targets = torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12))
    torch.manual_seed(1)  # embedding dropout and the solve's dropout seed comes from here
    _, loss = model(idx, targets)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()]), loss.item()


@pytest.mark.parametrize("dropout,rng", [(0.0, "per_solve"), (0.1, "per_solve"), (0.1, "per_evaluation")],
                         ids=["no-dropout", "dropout-per-solve", "dropout-per-evaluation"])
def test_reversible_gradients_equal_unrolled_float64(dropout, rng):
    got, loss_rev = lm_gradients("reversible", dropout, rng)
    want, loss_unr = lm_gradients("unrolled", dropout, rng)
    assert loss_rev == loss_unr, f"losses differ: {loss_rev} vs {loss_unr}"
    err = relative_error(got, want)
    assert err <= 1e-9, f"dropout={dropout}, rng={rng}: reversible vs unrolled LM gradient error {err:.3g} > 1e-9"


@pytest.mark.parametrize("method", ["reversible", "explicit"])
def test_causal_earlier_logits_ignore_later_tokens(method):
    """What the equilibrium cache relies on: with a fixed number of steps, position t's
    iterates never see positions after t."""
    torch.manual_seed(0)
    model = TransformerLM(model_config(method=method)).eval()
    a = torch.randint(0, 50, (1, 12))
    b = a.clone()
    b[0, 7:] = (b[0, 7:] + 1) % 50
    with torch.no_grad():
        diff = (model(a)[0, :7] - model(b)[0, :7]).abs().max().item()
    assert diff <= 1e-6, f"{method}: logits before position 7 changed by {diff:.3g} when later tokens changed"


def test_float64_states_and_position_limit():
    model = TransformerLM(model_config(state_dtype="float64"))
    logits = model(torch.randint(0, 50, (2, 5)))
    assert logits.dtype == torch.float32 and model.deq.settings.state_dtype == torch.float64
    with pytest.raises(ValueError, match="exceed seq_len=12"):
        model(torch.randint(0, 50, (1, 13)))


def test_bf16_autocast_forward_backward_is_finite():
    """The path training takes on CUDA (amp=auto), exercised on the CPU."""
    torch.manual_seed(0)
    model = TransformerLM(model_config())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(torch.randint(0, 50, (2, 12)), torch.randint(0, 50, (2, 12)))
    loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert torch.isfinite(loss) and not bad, f"bf16 autocast: loss {loss}, bad gradients in {bad}"
