"""The decoders of an eval-mode `MCF` as channels-last matrix products, BatchNorm folded into the weights.

Why: batched, these products run faster on CPU than PyTorch's ``ConvTranspose1d`` + ``BatchNorm1d``, and the first
layer becomes one affine map whose rows belong to input channels, so a latent made of parts can be multiplied part
by part. That is what lets `ecgad.scoring.Scorer` compute the trend latent's share of the trend decoder once per
window instead of once per beat (docs/method.md §4.2). Same function; only float32 rounding differs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ecgad.model import MCF, Decoder


def _bn_affine(bn: nn.BatchNorm1d | None, like: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``x * scale + shift`` (identity when there is none)."""
    if bn is None:
        return like.new_ones(channels), like.new_zeros(channels)
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias.detach() - bn.running_mean * scale


def _im2col(latent: torch.Tensor, kernel: int) -> torch.Tensor:
    """``(B, C, T)`` -> ``(B * (T + kernel - 1), C * kernel)``: the zero-padded windows a stride-1 transposed
    convolution sums over, rows ordered (time), columns (channel, window position)."""
    cols = F.pad(latent, (kernel - 1, kernel - 1)).unfold(2, kernel, 1).transpose(1, 2)
    return cols.reshape(-1, latent.shape[1] * kernel)


class FoldedDecoder:
    """An eval-mode `Decoder` as channels-last matrix products with its BatchNorms folded into the weights.

    The first layer (transposed convolution + BN, nothing nonlinear in between) is one affine map
    ``_im2col(z) @ first_weight + first_bias`` whose rows belong to input channels (`first_rows`).

    - First layer, k15 stride 1 transposed convolution: ``out[t] = sum_s W[:, :, s]^T z[t - s]``, a correlation of
      the zero-padded latent with the flipped kernel.
    - Stride-2 k4 pad-1 transposed convolutions: ``out[2m-1] = x[m-1] W2 + x[m] W0`` and
      ``out[2m] = x[m-1] W3 + x[m] W1``. With ``x`` padded by one zero row at each end, the row pairs
      ``(2m-1, 2m)``, ``m = 0..L``, are two matrix products over ``x[m-1]`` and ``x[m]``; viewed as ``(B, 2L+2, C)``
      the result is exactly the next layer's zero-padded input once its two end rows (``out[-1]``, ``out[2L]``) are
      zeroed, so no activation is copied or padded again.
    """

    def __init__(self, decoder: Decoder) -> None:
        layers = list(decoder.main)
        convs = [(i, m.weight.detach()) for i, m in enumerate(layers) if isinstance(m, nn.ConvTranspose1d)]
        bns = [layers[i + 1] if isinstance(layers[i + 1], nn.BatchNorm1d) else None for i, _ in convs]
        (_, first), *ups = convs
        scale, shift = _bn_affine(bns[0], first, first.shape[1])
        self.kernel = first.shape[2]
        #: rows (input channel, window position), matching `_im2col`; the kernel flipped for a correlation
        self.first_weight = (first * scale[:, None]).flip(2).transpose(1, 2).reshape(-1, first.shape[1])
        self.first_bias = shift
        self.ups = []
        for (_, weight), bn in zip(ups, bns[1:]):
            scale, shift = _bn_affine(bn, weight, weight.shape[1])
            scale = scale.repeat(2)
            from_previous = torch.cat([weight[:, :, 2], weight[:, :, 3]], dim=1) * scale   # x[m-1] -> (2m-1, 2m)
            from_current = torch.cat([weight[:, :, 0], weight[:, :, 1]], dim=1) * scale    # x[m]   -> (2m-1, 2m)
            self.ups.append((from_previous, from_current, shift.repeat(2)))

    def first_rows(self, channels: slice) -> torch.Tensor:
        """The rows of `first_weight` that multiply the latent channels ``channels``."""
        return self.first_weight[channels.start * self.kernel:channels.stop * self.kernel]

    def rest(self, first_linear: torch.Tensor) -> torch.Tensor:
        """The first layer's linear part ``(B, T, C)`` -> the restoration ``(B, samples, out_channels)``."""
        x = F.pad(torch.relu_(first_linear + self.first_bias), (0, 0, 1, 1))
        for i, (from_previous, from_current, bias) in enumerate(self.ups):
            batch, rows, _ = x.shape
            out = torch.baddbmm(bias, x[:, :-1], from_previous.expand(batch, -1, -1))
            out.baddbmm_(x[:, 1:], from_current.expand(batch, -1, -1))
            x = out.view(batch, 2 * (rows - 1), -1)
            if i < len(self.ups) - 1:
                x.relu_()
                x[:, 0] = 0
                x[:, -1] = 0
        return torch.tanh(x[:, 1:-1])


class FoldedMCF:
    """The three decoders of an eval-mode `MCF`, folded (`FoldedDecoder`) from its current weights.

    The global and trend decoders both start from ``f_g_out``: their first layers share one im2col and one matrix
    product. The trend decoder's first layer also sees ``f_t``, whose share (`trend_share`) is computed once per
    window and added, instead of once per beat.
    """

    def __init__(self, model: MCF) -> None:
        hidden = model.config.hidden
        self.global_decoder = FoldedDecoder(model.global_decoder)
        self.local_decoder = FoldedDecoder(model.local_decoder)
        self.trend_decoder = FoldedDecoder(model.trend_decoder)
        self.width = self.global_decoder.first_weight.shape[1]
        self.global_and_trend_weight = torch.cat([self.global_decoder.first_weight,
                                                  self.trend_decoder.first_rows(slice(0, hidden))], dim=1)
        self.trend_latent_weight = self.trend_decoder.first_rows(slice(hidden, 2 * hidden))

    def trend_share(self, f_t: torch.Tensor) -> torch.Tensor:
        """``f_t``'s part of the trend decoder's first layer, ``(B, T + 14, width)``."""
        kernel = self.trend_decoder.kernel
        return (_im2col(f_t, kernel) @ self.trend_latent_weight).view(len(f_t), f_t.shape[2] + kernel - 1, -1)

    def restore_global(self, f_g_out: torch.Tensor, trend_share: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(global restoration (B, 4800, 13), trend restoration (B, 4800, 12))``, channels-last."""
        kernel = self.global_decoder.kernel
        both = (_im2col(f_g_out, kernel) @ self.global_and_trend_weight).view(len(f_g_out), -1, 2 * self.width)
        return (self.global_decoder.rest(both[..., :self.width]),
                self.trend_decoder.rest(both[..., self.width:] + trend_share))

    def restore_local(self, f_l_out: torch.Tensor) -> torch.Tensor:
        """The beat restoration ``(B, 480, 13)``, channels-last."""
        kernel = self.local_decoder.kernel
        first = (_im2col(f_l_out, kernel) @ self.local_decoder.first_weight).view(len(f_l_out), -1, self.width)
        return self.local_decoder.rest(first)
