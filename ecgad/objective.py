"""The restoration objective (docs/method.md §3.3) and the per-pass anomaly errors (§4.1).

The global and local decoders predict, besides the signal, one log-variance ``s`` per time step (shared by the 12
leads, Tanh-bounded to [-1, 1]). Their errors are weighted by ``exp(-s)``: the model may call a region uncertain
and pay ``mean(s)`` for it in training. The trend decoder's error is a plain MSE against the *global* ECG.

Every error covers all points, hidden and visible, against the unmasked targets. At test time the ``+ mean(s)``
terms are dropped, which gives the per-pass anomaly error

    e = mean(exp(-s_g)(x̂_g - x_g)²) + mean(exp(-s_l)(x̂_l - x_l)²) + mean((x̂_t - x_g)²)

and the point maps whose averages over passes and beats make the localization map (`ecgad.scoring`).
"""

from __future__ import annotations

import torch

from ecgad.model import MCFOutput


def weighted_squared_error(restored: torch.Tensor, logvar: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``exp(-s) (x̂ - x)²`` per point; ``logvar (B, 1, L)`` broadcasts over the leads of ``(B, leads, L)``."""
    return torch.exp(-logvar) * (restored - target) ** 2


def global_error_map(gen_global: torch.Tensor, global_logvar: torch.Tensor, gen_trend: torch.Tensor,
                     x_global: torch.Tensor) -> torch.Tensor:
    """Global plus trend error per point, ``(B, leads, 4800)``: the global part of the localization map."""
    return weighted_squared_error(gen_global, global_logvar, x_global) + (gen_trend - x_global) ** 2


def local_error_map(gen_local: torch.Tensor, local_logvar: torch.Tensor, x_beat: torch.Tensor) -> torch.Tensor:
    """Beat error per point, ``(B, leads, 480)``: summed into the beat's window of the localization map."""
    return weighted_squared_error(gen_local, local_logvar, x_beat)


def _per_sample_mean(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)


def pass_errors(out: MCFOutput, x_global: torch.Tensor, x_beat: torch.Tensor) -> torch.Tensor:
    """The anomaly error ``e`` of one pass, per sample ``(B,)``: the three means, as the reference sums them."""
    return (_per_sample_mean(weighted_squared_error(out.gen_global, out.global_logvar, x_global))
            + _per_sample_mean(weighted_squared_error(out.gen_local, out.local_logvar, x_beat))
            + _per_sample_mean((out.gen_trend - x_global) ** 2))


def restoration_loss(out: MCFOutput, x_global: torch.Tensor, x_beat: torch.Tensor
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The training loss ``L_g + L_l + L_t`` (weights 1:1:1) over the batch, and its detached parts.

    ``L_g = mean(exp(-s_g)(x̂_g - x_g)²) + mean(s_g)``, ``L_l`` likewise for the beat, ``L_t = mean((x̂_t - x_g)²)``;
    ``x_global`` and ``x_beat`` are the *unmasked* inputs.
    """
    loss_global = (weighted_squared_error(out.gen_global, out.global_logvar, x_global).mean()
                   + out.global_logvar.mean())
    loss_local = weighted_squared_error(out.gen_local, out.local_logvar, x_beat).mean() + out.local_logvar.mean()
    loss_trend = ((out.gen_trend - x_global) ** 2).mean()
    parts = {"global": loss_global.detach(), "local": loss_local.detach(), "trend": loss_trend.detach()}
    return loss_global + loss_local + loss_trend, parts
