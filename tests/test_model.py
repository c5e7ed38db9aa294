"""The model, its masks and its objective: geometry, parameter count, determinism, and a loss that trains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ecgad.masks import eval_masks, train_masks
from ecgad.model import MCF, MCFConfig, MCFOutput, count_parameters, trend
from ecgad.objective import global_error_map, local_error_map, pass_errors, restoration_loss


@pytest.fixture(scope="module")
def small() -> MCF:
    torch.manual_seed(0)
    return MCF(MCFConfig.small()).eval()


def test_paper_config_has_the_published_parameter_count():
    model = MCF(MCFConfig.paper())
    assert count_parameters(model) == 7_085_779
    config = model.config
    assert (config.global_tokens, config.beat_tokens, config.tokens) == (136, 1, 137)


def test_small_config_is_small_and_keeps_the_geometry():
    config = MCFConfig.small()
    assert count_parameters(MCF(config)) < 7_085_779 // 10
    assert (config.global_tokens, config.beat_tokens) == (136, 1)


def test_config_round_trips_through_json_and_refuses_unknown_keys():
    config = MCFConfig(hidden=32, channels=(8, 16, 32, 64, 128), trend_from_masked=True)
    assert MCFConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="unknown model config keys"):
        MCFConfig.from_dict({**config.to_dict(), "width": 3})
    with pytest.raises(ValueError, match="not divisible"):
        MCFConfig(hidden=51)
    with pytest.raises(ValueError, match="global_len"):
        MCFConfig(global_len=4810)


def test_forward_shapes_at_500_hz_10_s(small):
    x_global, x_beat = torch.randn(3, 12, 4800), torch.randn(3, 12, 480)
    with torch.no_grad():
        out = small(x_global, x_beat, trend(x_global))
    assert isinstance(out, MCFOutput)
    assert [tuple(t.shape) for t in out] == [(3, 12, 4800), (3, 1, 4800), (3, 12, 480), (3, 1, 480), (3, 12, 4800)]
    assert all(t.abs().max() <= 1 for t in out)  # Tanh-bounded restorations and log-variances


def test_stages_compose_to_forward(small):
    x_global, x_beat = torch.randn(2, 12, 4800), torch.randn(2, 12, 480)
    t = trend(x_global)
    with torch.no_grad():
        f_g_out, f_l_out = small.cross_attend(small.encode_global(x_global), small.encode_local(x_beat))
        staged = (*small.decode_global(f_g_out), *small.decode_local(f_l_out),
                  small.decode_trend(f_g_out, small.encode_trend(t)))
        for a, b in zip(staged, small(x_global, x_beat, t)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_trend_is_a_joint_min_max_slope_map():
    x = torch.randn(2, 12, 4800).cumsum(-1)
    t = trend(x)
    assert t.shape == x.shape
    for sample in t:
        assert sample.min() == -1 and sample.max() == 1
    # the zero-padded ends (5 each side) carry the value 0 takes after the min-max
    assert torch.all(t[..., :5] == t[..., :1]) and torch.all(t[..., -5:] == t[..., :1])
    assert torch.isfinite(trend(torch.ones(1, 12, 4800))).all()  # flat input: no division by zero


def test_trend_for_follows_the_config():
    x, masked = torch.randn(1, 12, 4800), torch.zeros(1, 12, 4800)
    torch.testing.assert_close(MCF(MCFConfig.small()).trend_for(x, masked), trend(x))
    masked_config = MCFConfig(**{**MCFConfig.small().to_dict(), "trend_from_masked": True})
    torch.testing.assert_close(MCF(masked_config).trend_for(x, masked), trend(masked))


# -- masks --

@pytest.mark.parametrize("make_generator", [lambda s: np.random.default_rng(s),
                                            lambda s: torch.Generator().manual_seed(s)])
def test_train_masks_geometry_and_seeded_determinism(make_generator):
    keep_global, keep_beat = train_masks(make_generator(7))
    assert keep_global.shape == (4800,) and keep_beat.shape == (480,)   # one mask, broadcast over the batch
    patches = keep_global.view(100, 48)
    assert torch.all((patches == 0).all(1) | (patches == 1).all(1))    # whole 48-sample patches
    assert int((patches == 0).all(1).sum()) == 30
    hidden = torch.nonzero(keep_beat == 0).flatten()
    assert len(hidden) == 144 and torch.all(hidden.diff() == 1) and 1 <= int(hidden[0]) <= 334
    again = train_masks(make_generator(7))
    assert torch.equal(again[0], keep_global) and torch.equal(again[1], keep_beat)
    draws = {tuple(train_masks(make_generator(s))[0].nonzero().flatten()[:200].tolist()) for s in range(5)}
    assert len(draws) > 1

    batch = torch.randn(4, 12, 4800) * keep_global
    assert torch.equal(batch == 0, (keep_global == 0).expand(4, 12, 4800))


def test_eval_masks_are_the_three_published_passes():
    keep_global, keep_beat = eval_masks()
    assert keep_global.shape == (3, 4800) and keep_beat.shape == (3, 480)
    for j in range(3):
        expected = np.ones(4800)
        for k in range(30):
            expected[48 * j + 160 * k: 48 * (j + 1) + 160 * k] = 0
        np.testing.assert_array_equal(keep_global[j].numpy(), expected)
        start = (20, 70, 120)[j]
        assert torch.equal(torch.nonzero(keep_beat[j] == 0).flatten(), torch.arange(start, start + 100))
    covered = (keep_global == 0).any(0).view(30, 160)
    assert torch.all(covered.sum(1) == 144)


# -- objective --

def _output(gen_global, s_g, gen_local, s_l, gen_trend) -> MCFOutput:
    return MCFOutput(gen_global, s_g, gen_local, s_l, gen_trend)


def test_objective_formulas_on_known_values():
    x_g, x_l = torch.zeros(2, 12, 4800), torch.zeros(2, 12, 480)
    s_g, s_l = torch.full((2, 1, 4800), 0.5), torch.full((2, 1, 480), -0.25)
    out = _output(x_g + 0.1, s_g, x_l + 0.2, s_l, x_g + 0.3)
    loss, parts = restoration_loss(out, x_g, x_l)
    expected = {"global": np.exp(-0.5) * 0.01 + 0.5, "local": np.exp(0.25) * 0.04 - 0.25, "trend": 0.09}
    for name, value in expected.items():
        assert parts[name].item() == pytest.approx(value, rel=1e-5)
    assert loss.item() == pytest.approx(sum(expected.values()), rel=1e-5)
    e = np.exp(-0.5) * 0.01 + np.exp(0.25) * 0.04 + 0.09
    np.testing.assert_allclose(pass_errors(out, x_g, x_l).numpy(), [e, e], rtol=1e-5)
    gmap = global_error_map(out.gen_global, out.global_logvar, out.gen_trend, x_g)
    lmap = local_error_map(out.gen_local, out.local_logvar, x_l)
    assert gmap.shape == (2, 12, 4800) and lmap.shape == (2, 12, 480)
    assert (gmap.mean() + lmap.mean()).item() == pytest.approx(e, rel=1e-5)


def test_loss_is_finite_and_a_gradient_step_lowers_it():
    torch.manual_seed(0)
    config = MCFConfig(**{**MCFConfig.small().to_dict(), "dropout": 0.0})
    model = MCF(config).train()
    x_g = torch.rand(4, 12, 4800) * 2 - 1
    x_l = torch.rand(4, 12, 480) * 2 - 1
    keep_global, keep_beat = train_masks(torch.Generator().manual_seed(0))
    g_masked = x_g * keep_global

    def loss() -> torch.Tensor:
        return restoration_loss(model(g_masked, x_l * keep_beat, model.trend_for(x_g, g_masked)), x_g, x_l)[0]

    before = loss()
    assert torch.isfinite(before)
    before.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-3 * p.grad
        after = loss()
    assert after < before
