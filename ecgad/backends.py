"""How `ecgad.scoring.Scorer` runs its stages: eagerly (the reference) or compiled by ``torch.compile`` (inductor).

The scorer calls a few stage functions on the model (``encode_global``, ``encode_local``, ``encode_trend``,
``cross_attend``) and on its folded decoders (``trend_share``, ``restore_global``, ``restore_local``,
`ecgad.folded.FoldedMCF`). `CompiledStages` stands in for either object and routes each call through the class's
function compiled once per scorer, with the current object as its first argument: the weights are inputs of the
compiled graph, not constants, so one compilation serves every call, every batch of records and a model whose
weights change between calls (a scorer kept across training epochs). Same functions, same numbers up to float32
rounding (tests/test_scoring.py holds ``compile`` to ``eager``); which one is faster depends on the machine
(bench/score.py ``--backend``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch

BACKENDS = ("eager", "compile")


class CompiledStages:
    """``target`` with each method call replaced by its class's function compiled by ``torch.compile``, from
    ``cache`` (filled on first use, shared by every stand-in that uses the same cache); other attributes pass
    through."""

    def __init__(self, target: Any, cache: dict[tuple[type, str], Callable[..., Any]]) -> None:
        self._target, self._cache = target, cache

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, name)
        if not callable(attribute):
            return attribute
        key = (type(self._target), name)
        if key not in self._cache:
            self._cache[key] = torch.compile(getattr(type(self._target), name))
        return functools.partial(self._cache[key], self._target)


def check_backend(backend: str) -> str:
    """``backend`` if it is one of `BACKENDS`; a ValueError naming them otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def stages(backend: str, model: Any, folded: Any, cache: dict[tuple[type, str], Callable[..., Any]]
           ) -> tuple[Any, Any]:
    """The model and the folded decoders as ``backend`` runs them."""
    if check_backend(backend) == "eager":
        return model, folded
    return CompiledStages(model, cache), CompiledStages(folded, cache)
