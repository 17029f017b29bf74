"""Errors a user can act on: each names the field, what was wrong and what is accepted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


class SpecError(ValueError):
    """Invalid user input (a manifest, a topology, a CLI argument)."""

    def __init__(self, field: str, problem: str, accepted: str | None = None) -> None:
        self.field = field
        self.problem = problem
        self.accepted = accepted
        message = f"{field}: {problem}"
        if accepted:
            message += f" (accepted: {accepted})"
        super().__init__(message)


def read_yaml_documents(path: str | Path, option: str) -> list[Any]:
    """The non-empty YAML (or JSON) documents of a file a user named with `option`;
    an unreadable or malformed file is a SpecError naming the option."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise SpecError(option, f"cannot read {path}: {exc.strerror}") from exc
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError(option, f"{path} is not valid YAML or JSON: {exc}") from exc
