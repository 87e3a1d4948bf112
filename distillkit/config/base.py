"""The base of every config section."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A config section: unknown fields are refused (a typo is an error, never a silent default)."""

    model_config = ConfigDict(extra="forbid")
