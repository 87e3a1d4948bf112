"""How the objective reaches into a model: submodules by path, their outputs, attention probabilities.

- :func:`find_module` looks a dotted path up, with an error naming the nearest paths;
- :func:`record_modules` records submodule outputs during a forward pass (``TapRequest.modules``);
- :func:`use_eager_attention` and :func:`disable_attention_dropout` make a model return attention
  probabilities whose rows sum to 1 (``TapRequest.attentions``);
- :func:`prepare_model` does all of it for one model before the first step.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from distillkit.errors import ConfigError, close_matches


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"module output of type {type(value).__name__} holds no tensor to record")


def find_module(model: nn.Module, path: str, who: str = "a loss term") -> nn.Module:
    """Returns the submodule at a dotted ``path``.

    Raises:
        ConfigError: Naming ``who`` asked for it and the nearest existing module paths.

    """
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        near = close_matches(path, names)
        prefix = path.rsplit(".", 1)[0]
        siblings = [n for n in names if n.startswith(prefix + ".") and n.count(".") == path.count(".")][:8]
        hint = near or (f"; modules under '{prefix}': {', '.join(siblings)}" if siblings else "")
        raise ConfigError(
            f"{who} taps module '{path}', which {type(model).__name__} does not have{hint}. "
            "Print model.named_modules() to see the paths"
        ) from None


@contextmanager
def record_modules(model: nn.Module, paths: tuple[str, ...]) -> Iterator[dict[str, torch.Tensor]]:
    """Records the outputs of submodules during the forward passes run inside the block.

    Args:
        model: The model.
        paths: Dotted submodule paths.

    Yields:
        Path -> output tensor, filled as the model runs (the last call's output when a module runs twice).

    """
    recorded: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for path in paths:

            def hook(_module: nn.Module, _inputs: Any, output: Any, path: str = path) -> None:
                recorded[path] = _first_tensor(output)

            handles.append(find_module(model, path).register_forward_hook(hook))
        yield recorded
    finally:
        for handle in handles:
            handle.remove()


def use_eager_attention(model: nn.Module, who: str = "a loss term") -> bool:
    """Switches a Hugging Face model to eager attention so it can return attention probabilities.

    Returns:
        Whether the implementation was changed (False when it already was eager).

    Raises:
        ConfigError: If the model cannot return attention probabilities.

    """
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None)
    if current in (None, "eager"):
        return False
    try:
        model.set_attn_implementation("eager")
    except (AttributeError, ValueError) as exc:
        raise ConfigError(
            f"{who} reads attention probabilities, but {type(model).__name__} cannot return them "
            f"(attention implementation '{current}': {exc}); drop the attention term or use another model"
        ) from None
    return True


def disable_attention_dropout(model: nn.Module) -> int:
    """Turns off dropout on attention probabilities, so the probabilities a term reads sum to 1.

    Eager attention returns the probabilities after dropout; in training mode their rows would hold zeros
    and sum to ``1 / (1 - p)``. Covers ``nn.Dropout`` modules inside attention blocks (BERT-style) and
    float ``attention_dropout`` attributes (Llama-style). Other dropout is left as it is.

    Returns:
        How many dropout settings were changed.

    """
    changed = 0
    for module in model.modules():
        if "attention" not in type(module).__name__.lower():
            continue
        dropout = getattr(module, "dropout", None)
        if isinstance(dropout, nn.Dropout) and dropout.p > 0:
            dropout.p = 0.0
            changed += 1
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate > 0:
            module.attention_dropout = 0.0
            changed += 1
    return changed


def prepare_model(model: nn.Module, role: str, readers: Mapping[str, Any], announce: bool = True) -> None:
    """Checks a model can give what the terms read of it, before the first step.

    Module paths are looked up (an error names the term and nearby module names); a model some term reads
    attention probabilities of is switched to eager attention without attention-probability dropout (so rows
    sum to 1), said once when ``announce``.

    Args:
        model: The student or a teacher.
        role: ``student``, ``teacher`` or ``teacher 'name'``, for messages.
        readers: Term label -> its :class:`~distillkit.objective.taps.TapRequest` of this model.
        announce: Print the switch to eager attention.

    Raises:
        ConfigError: For a module path the model does not have, or a model that cannot return attentions.

    """
    for label, request in readers.items():
        for path in request.modules:
            find_module(model, path, who=f"objective term '{label}' ({role})")
    attention_readers = [label for label, request in readers.items() if request.attentions]
    if not attention_readers:
        return
    eager = use_eager_attention(model, f"objective term '{attention_readers[0]}'")
    dropout = disable_attention_dropout(model)
    if (eager or dropout) and announce:
        changes = ["runs eager attention"] if eager else []
        changes += ["has no attention-probability dropout"] if dropout else []
        print(
            f"distillkit: the {role} {' and '.join(changes)}, since "
            f"{', '.join(attention_readers)} read(s) its attention probabilities"
        )
