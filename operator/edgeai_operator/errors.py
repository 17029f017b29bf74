"""Errors a user can act on: each names the field, what was wrong and what is accepted."""

from __future__ import annotations


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
