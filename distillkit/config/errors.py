"""Config validation errors as one paragraph that names each bad field and the fix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from distillkit.errors import close_matches, one_line, quote_input


def format_validation_error(exc: ValidationError, root: type[BaseModel]) -> str:
    """One paragraph naming each bad field of ``exc`` (an unknown one with the accepted ones, close matches).

    Args:
        exc: pydantic's error.
        root: The model that was validated (to list the fields accepted where an unknown one was given).

    """
    lines = []
    for err in exc.errors():
        path = ".".join(str(part) for part in err["loc"])
        location = quote_input(path or "<root>")
        if err["type"] == "extra_forbidden":
            field = str(err["loc"][-1])
            parent = _model_at(root, err["loc"][:-1])
            known = list(parent.model_fields) if parent else []
            hint = close_matches(field, known)
            lines.append(
                f"unknown field {location}{hint}; accepted here: {', '.join(known)}"
                if known
                else f"unknown field {location}{hint}"
            )
        elif err["type"] == "missing":
            lines.append(f"missing field {location}")
        elif err["type"] == "value_error" and isinstance(err.get("input"), (dict, list)):
            # a check of a whole section (or of several): its own message names the fields and the values
            message = one_line(str(err["ctx"]["error"]) if "error" in err.get("ctx", {}) else err["msg"])
            lines.append(message if not path or message.startswith(path) else f"{location}: {message}")
        else:
            lines.append(f"field {location}: {one_line(err['msg'])} (got {quote_input(err.get('input'))})")
    return "invalid config: " + "; ".join(lines) + ". Fix the YAML file or the --set override that sets it."


def _model_at(root: type[BaseModel], loc: Sequence[Any]) -> type[BaseModel] | None:
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        annotation = field.annotation
        model = next(
            (
                a
                for a in getattr(annotation, "__args__", (annotation,))
                if isinstance(a, type) and issubclass(a, BaseModel)
            ),
            annotation,
        )
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None
