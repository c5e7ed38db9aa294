"""The Multi-scale Cross-restoration Framework (MCF; Jiang et al., MICCAI 2023), as one readable module.

The network restores a masked ECG at two scales at once (docs/method.md §2):

- a **global** branch sees the masked 9.6 s, 12-lead signal, ``(B, 12, 4800)``;
- a **local** branch sees one masked heartbeat ``[r-140, r+340)``, ``(B, 12, 480)``;
- a **trend** branch sees the slope map of the signal made by the Trend Generation Module (`trend`).

Each branch has a 1-D convolutional encoder (five stride-2 convolutions, then a k15 convolution to ``hidden``
channels): 136 temporal tokens for the global and trend branches, one token for the beat. The global and beat
tokens meet in a **multi-scale cross-attention** block, after which position-wise MLPs along the token axis
(``φ_g``, ``φ_l``) write what each scale learned from the other back into its own latent. Three mirrored decoders
restore the global ECG, the beat and (from the global and trend latents together) the global ECG again; the global
and local decoders also emit one log-variance channel ``s`` that weights their errors (`ecgad.objective`).

Conventions: channels-first, ``(batch, leads, samples)``, unlike the published code, which is time-major. Module
and parameter names follow the published ones (``global_encoder.main.0.weight`` ...), so the authors' checkpoint
loads with ``strict=True`` (`load_published_state_dict`). Stages are separate methods (`MCF.encode_global`,
`MCF.cross_attend`, `MCF.decode_trend`, ...) so a scorer can compute beat-independent stages once.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ecgad.config import strict_from_dict


@dataclass(frozen=True)
class MCFConfig:
    """Model hyper-parameters; `paper` is the published model (7,085,779 trainable parameters)."""

    n_leads: int = 12
    hidden: int = 50                                   # latent channels per token (``--hidden``)
    channels: tuple[int, ...] = (32, 64, 128, 256, 512)  # encoder widths; the decoders mirror them
    latent_kernel: int = 15                            # last encoder / first decoder convolution
    global_len: int = 4800                             # samples 100..4900 of a 10 s, 500 Hz window
    beat_len: int = 480                                # [r-140, r+340)
    n_heads: int = 2
    dropout: float = 0.1                               # attention probabilities and the attention residual
    local_mlp_ratio: int = 2                           # φ_l: tokens -> 2 x tokens -> beat tokens (137->274->1)
    global_mlp_ratio: int = 4                          # φ_g: tokens -> 4 x tokens -> global tokens (137->548->136)
    trend_from_masked: bool = False                    # D7: the published trend sees the unmasked signal

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.hidden % self.n_heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by n_heads={self.n_heads}")
        for name in ("global_len", "beat_len"):
            length = getattr(self, name)
            if length % self.downsampling or length // self.downsampling < self.latent_kernel:
                raise ValueError(f"{name}={length} must be a multiple of {self.downsampling} and leave at least "
                                 f"{self.latent_kernel} samples after the stride-2 convolutions")

    @property
    def downsampling(self) -> int:
        """Each of the ``len(channels)`` stride-2 convolutions halves the length."""
        return 2 ** len(self.channels)

    @property
    def global_tokens(self) -> int:
        """136 at the paper geometry: 4800 / 32 = 150 samples, minus the k15 convolution's 14."""
        return self.global_len // self.downsampling - self.latent_kernel + 1

    @property
    def beat_tokens(self) -> int:
        """1 at the paper geometry: 480 / 32 = 15 samples, one k15 window."""
        return self.beat_len // self.downsampling - self.latent_kernel + 1

    @property
    def tokens(self) -> int:
        return self.global_tokens + self.beat_tokens

    @classmethod
    def paper(cls) -> "MCFConfig":
        return cls()

    @classmethod
    def small(cls) -> "MCFConfig":
        """Same geometry, ~1/16 of the width: for tests and CPU smoke runs, not for results."""
        return cls(hidden=16, channels=(8, 16, 32, 64, 128))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["channels"] = list(self.channels)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MCFConfig":
        return strict_from_dict(cls, data, "model")


class MCFOutput(NamedTuple):
    """Restorations and log-variances, channels-first; ``*_logvar`` is one channel shared by all leads."""

    gen_global: torch.Tensor    # (B, 12, 4800)
    global_logvar: torch.Tensor  # (B, 1, 4800), Tanh-bounded to [-1, 1]
    gen_local: torch.Tensor     # (B, 12, 480)
    local_logvar: torch.Tensor  # (B, 1, 480)
    gen_trend: torch.Tensor     # (B, 12, 4800): the global ECG restored from the global and trend latents


# -- Trend Generation Module -------------------------------------------------------------------------------------

TREND_SMOOTHING = 10  # taps of the moving average


def trend(x: torch.Tensor) -> torch.Tensor:
    """The Trend Generation Module: the slope of the smoothed signal, ``(B, leads, L) -> (B, leads, L)``.

    Per lead, a 10-tap moving average (valid part, L-9 samples), then the forward difference ``y[t+1] - y[t]``
    (L-10), zero-padded by 5 on each side back to L, then one min-max to [-1, 1] per sample over all leads and
    time points jointly, so the leads keep their relative slopes. A constant trend (flat input) maps to -1
    instead of dividing by zero.
    """
    batch, leads, length = x.shape
    taps = torch.full((1, 1, TREND_SMOOTHING), 1 / TREND_SMOOTHING, dtype=x.dtype, device=x.device)
    # A convolution with 1/10 taps rather than avg_pool1d: the same sums in the published order, so bit-equal.
    smooth = F.conv1d(x.reshape(batch * leads, 1, length), taps).reshape(batch, leads, -1)
    slope = smooth[..., 1:] - smooth[..., :-1]
    pad = (length - slope.shape[-1]) // 2
    slope = F.pad(slope, (pad, length - slope.shape[-1] - pad))
    lo = slope.amin(dim=(1, 2), keepdim=True)
    hi = slope.amax(dim=(1, 2), keepdim=True)
    return 2 * (slope - lo) / (hi - lo).clamp_min(torch.finfo(slope.dtype).tiny) - 1


# -- building blocks -----------------------------------------------------------------------------------------------

class Encoder(nn.Module):
    """DCGAN/BeatGAN-style 1-D encoder: stride-2 k4 convolutions (no biases), BN from the second on, LeakyReLU
    0.2, then a k15 convolution to ``hidden`` channels with no activation. 4800 -> 136 tokens, 480 -> 1."""

    def __init__(self, in_channels: int, hidden: int, channels: tuple[int, ...], latent_kernel: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(in_channels, channels[0], 4, 2, 1, bias=False),
                                   nn.LeakyReLU(0.2, inplace=True)]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv1d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm1d(c_out),
                       nn.LeakyReLU(0.2, inplace=True)]
        layers.append(nn.Conv1d(channels[-1], hidden, latent_kernel, 1, 0, bias=False))
        self.main = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class Decoder(nn.Module):
    """The encoder's mirror: a k15 transposed convolution from the latent, then stride-2 k4 transposed
    convolutions, each followed by BN and ReLU, and a last one to ``out_channels`` squashed by Tanh (the inputs
    are min-max normalized to [-1, 1])."""

    def __init__(self, out_channels: int, latent: int, channels: tuple[int, ...], latent_kernel: int) -> None:
        super().__init__()
        widths = channels[::-1]
        layers: list[nn.Module] = [nn.ConvTranspose1d(latent, widths[0], latent_kernel, 1, 0, bias=False),
                                   nn.BatchNorm1d(widths[0]), nn.ReLU(inplace=True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose1d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm1d(c_out),
                       nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose1d(widths[-1], out_channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


class MultiHeadedAttention(nn.Module):
    """Scaled dot-product self-attention over tokens ``(B, T, d)``; no positional encoding, as published."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.linear_layers = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(3))  # query, key, value
        self.output_linear = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, n_tokens, _ = x.shape
        query, key, value = (linear(x).view(batch, n_tokens, self.n_heads, self.d_head).transpose(1, 2)
                             for linear in self.linear_layers)
        weights = torch.softmax(query @ key.transpose(-2, -1) / math.sqrt(self.d_head), dim=-1)
        heads = self.dropout(weights) @ value
        return self.output_linear(heads.transpose(1, 2).reshape(batch, n_tokens, -1))


class LayerNorm(nn.Module):
    """The published layer norm: ``a_2 (x - mean) / (std + eps) + b_2`` with the *unbiased* std and eps added to
    the std, not the variance (so not ``nn.LayerNorm``)."""

    def __init__(self, features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.a_2 = nn.Parameter(torch.ones(features))
        self.b_2 = nn.Parameter(torch.zeros(features))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)
        return self.a_2 * (x - mean) / (std + self.eps) + self.b_2


def _token_mlp(tokens: int, width: int, out_tokens: int) -> nn.Sequential:
    """An MLP along the token (time) axis, applied to each latent channel independently."""
    return nn.Sequential(nn.Linear(tokens, width), nn.ReLU(inplace=True), nn.Linear(width, out_tokens))


# -- the model -------------------------------------------------------------------------------------------------------

class MCF(nn.Module):
    """Multi-scale Cross-restoration: three encoders, cross-attention over global + beat tokens, three decoders."""

    def __init__(self, config: MCFConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or MCFConfig.paper()
        c, h, k = config.channels, config.hidden, config.latent_kernel
        self.global_encoder = Encoder(config.n_leads, h, c, k)
        self.global_decoder = Decoder(config.n_leads + 1, h, c, k)  # + 1: the log-variance channel
        self.local_encoder = Encoder(config.n_leads, h, c, k)
        self.local_decoder = Decoder(config.n_leads + 1, h, c, k)
        self.trend_encoder = Encoder(config.n_leads, h, c, k)
        self.trend_decoder = Decoder(config.n_leads, 2 * h, c, k)   # input: cat(global latent, trend latent)
        t = config.tokens
        self.local_mlp = _token_mlp(t, config.local_mlp_ratio * t, config.beat_tokens)     # φ_l
        self.global_mlp = _token_mlp(t, config.global_mlp_ratio * t, config.global_tokens)  # φ_g
        self.attn = MultiHeadedAttention(h, config.n_heads, config.dropout)
        self.layer_norm = LayerNorm(h)
        self.dropout = nn.Dropout(config.dropout)

    # Encoders: ECG (B, leads, L) -> latent tokens (B, hidden, T).
    def encode_global(self, global_masked: torch.Tensor) -> torch.Tensor:
        return self.global_encoder(global_masked)

    def encode_local(self, beat_masked: torch.Tensor) -> torch.Tensor:
        return self.local_encoder(beat_masked)

    def encode_trend(self, trend_input: torch.Tensor) -> torch.Tensor:
        return self.trend_encoder(trend_input)

    def cross_attend(self, f_g: torch.Tensor, f_l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Multi-scale cross-attention: ``(f_g + φ_g(f_ca), f_l + φ_l(f_ca))``.

        The 136 global tokens and the beat token attend to each other (one self-attention over their
        concatenation, residual, layer norm) giving ``f_ca``; the token-axis MLPs then turn ``f_ca`` into an update
        of each scale's own latent.
        """
        tokens = torch.cat([f_g, f_l], dim=-1).transpose(1, 2)                      # (B, 137, hidden)
        f_ca = self.layer_norm(tokens + self.dropout(self.attn(tokens))).transpose(1, 2)  # (B, hidden, 137)
        return f_g + self.global_mlp(f_ca), f_l + self.local_mlp(f_ca)

    # Decoders: latent -> restoration (and log-variance).
    def decode_global(self, f_g_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        restored = self.global_decoder(f_g_out)
        return restored[:, :-1], restored[:, -1:]

    def decode_local(self, f_l_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        restored = self.local_decoder(f_l_out)
        return restored[:, :-1], restored[:, -1:]

    def decode_trend(self, f_g_out: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        return self.trend_decoder(torch.cat([f_g_out, f_t], dim=1))

    def forward(self, global_masked: torch.Tensor, beat_masked: torch.Tensor, trend_input: torch.Tensor
                ) -> MCFOutput:
        """``global_masked (B, 12, 4800)``, ``beat_masked (B, 12, 480)``, ``trend_input (B, 12, 4800)``."""
        f_g = self.encode_global(global_masked)
        f_l = self.encode_local(beat_masked)
        f_t = self.encode_trend(trend_input)
        f_g_out, f_l_out = self.cross_attend(f_g, f_l)
        gen_global, global_logvar = self.decode_global(f_g_out)
        gen_local, local_logvar = self.decode_local(f_l_out)
        return MCFOutput(gen_global, global_logvar, gen_local, local_logvar, self.decode_trend(f_g_out, f_t))

    def trend_for(self, global_ecg: torch.Tensor, global_masked: torch.Tensor) -> torch.Tensor:
        """What the trend branch sees: the TGM of the unmasked ECG (published), or of the masked one (docs/method.md D7)."""
        return trend(global_masked if self.config.trend_from_masked else global_ecg)


def unwrap(model: nn.Module) -> MCF:
    """The MCF inside a ``DistributedDataParallel`` (or other ``.module``) wrapper, or the model itself: training
    and scoring code is written once, for the bare model, and works under Ray Train's ``prepare_model``."""
    return getattr(model, "module", model)


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters live: inputs are moved there, so callers may hand over CPU arrays."""
    return next(model.parameters()).device


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (BN running statistics are buffers, so they do not count)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_published_state_dict(source: str | Path | dict[str, Any]) -> dict[str, torch.Tensor]:
    """The authors' checkpoint as a state dict for `MCF` at the paper config (load it with ``strict=True``).

    ``source`` is a path to, or the loaded content of, a published checkpoint ``{"model_state_dict": ...}`` (a bare
    state dict is accepted too). Floating tensors come back as float32: the conformance fixture stores them as
    float16 to stay small.
    """
    blob = torch.load(source, map_location="cpu", weights_only=True) if isinstance(source, (str, Path)) else source
    state = blob.get("model_state_dict", blob)
    return {name: value.float() if value.is_floating_point() else value for name, value in state.items()}
