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
from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("distillkit")
hookimpl = pluggy.HookimplMarker("distillkit")


@hookspec
def distillkit_register_losses(register: Callable[[type], None]) -> None:
    """Registers loss classes.

    Args:
        register: Call it once per loss class (a subclass of :class:`distillkit.losses.LossTerm` with a
            ``name``).

    """


@hookspec
def distillkit_register_bench_cases(register: Callable[[Any], None]) -> None:
    """Registers benchmark cases for ``distillkit bench``.

    Args:
        register: Call it once per :class:`distillkit.bench.BenchCase`.

    """
