"""Replacing a model's own modules by ones that run few-row calls on a kernel op, after checking they reproduce them.

Where transformers offers no registration point (engine.norms' RMSNorm, engine.routers' top-k routers), a module
instance is replaced by a `ModuleReplacement`: it holds the very same ``weight`` under the same name (state dicts
unchanged) and keeps the original module, unregistered, for every call it does not take. `replace_reproduced`
makes the replacements, checking each kind of module once (its class, dtype and the settings its arithmetic
depends on) against the op on random inputs; `original_modules` switches the replacements back for benchmarks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from torch import nn

from engine.dense import MAX_ROWS

logger = logging.getLogger(__name__)

Verdict = TypeVar("Verdict")


class ModuleReplacement(nn.Module):
    """A module standing in for ``original``: its ``weight`` is the original's, ``original`` itself is kept as a
    plain attribute (not a registered submodule: the weight must appear once in state dicts, under its own name)
    for the calls of more than ``max_rows`` rows and whatever else the subclass's op does not take."""

    max_rows: int = MAX_ROWS

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        self.weight = original.weight
        object.__setattr__(self, "original", original)


def replace_reproduced(
    model: nn.Module,
    kind: Callable[[nn.Module], Hashable | None],
    verify: Callable[[nn.Module], Verdict | None],
    replacement: Callable[[nn.Module, Verdict], ModuleReplacement],
    op: str,
) -> int:
    """Replace each child module of ``model`` that ``verify`` accepts by ``replacement(child, verdict)``; return how
    many. ``kind(child)``: None for a module not to consider (replacements included), else the key under which one
    ``verify`` call decides for every module of that kind; ``verify(child)``: None when the op does not reproduce
    it (logged once per kind, naming ``op``)."""
    verdicts: dict[Hashable, Verdict | None] = {}
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            key = None if isinstance(child, ModuleReplacement) else kind(child)
            if key is None:
                continue
            if key not in verdicts:
                verdicts[key] = verify(child)
                if verdicts[key] is None:
                    logger.info("%s keeps its own forward: the %s op does not reproduce it", type(child).__name__, op)
            if verdicts[key] is not None:
                setattr(parent, name, replacement(child, verdicts[key]))
                replaced += 1
    return replaced


@contextmanager
def original_modules(*replacements: type[ModuleReplacement]) -> Iterator[None]:
    """Within the block, the `ModuleReplacement` classes given run their original modules (their class-level
    ``max_rows`` is 0): benchmarks compare the two in one process."""
    saved = [cls.max_rows for cls in replacements]
    for cls in replacements:
        cls.max_rows = 0
    try:
        yield
    finally:
        for cls, rows in zip(replacements, saved):
            cls.max_rows = rows
