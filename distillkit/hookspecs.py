"""Hook specifications: the functions a distillkit plugin may implement.

A plugin is any module exposed through the ``distillkit`` entry-point group. It implements hooks by decorating
functions with :data:`hookimpl`::

    from distillkit import hookimpl

    @hookimpl
    def distillkit_register_losses(register):
        register(MyLoss)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("distillkit")
hookimpl = pluggy.HookimplMarker("distillkit")


@dataclass(frozen=True)
class BenchCase:
    """One ``distillkit bench`` case: a registered loss with parameters (what the bench-case hook registers).

    Attributes:
        name: Case name shown in the table.
        loss: Registered loss name.
        params: The loss's parameters.
        shapes: Shape overrides for this case (field -> value), applied to the run's shapes.
    """

    name: str
    loss: str
    params: dict[str, Any] = field(default_factory=dict)
    shapes: dict[str, int] = field(default_factory=dict)


@hookspec
def distillkit_register_losses(register: Callable[[type], None]) -> None:
    """Registers loss classes.

    Args:
        register: Call it once per loss class (a subclass of :class:`distillkit.LossTerm` with a
            ``name``).

    """


@hookspec
def distillkit_register_bench_cases(register: Callable[[Any], None]) -> None:
    """Registers benchmark cases for ``distillkit bench``.

    Args:
        register: Call it once per :class:`BenchCase` (``from distillkit import BenchCase``).

    """
