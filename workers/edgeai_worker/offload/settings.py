"""What a stage does per input: the typed settings that travel from the plan to the
worker (`WorkerConfig.offload`), with `to_dict`/`from_dict` in the plan's camelCase."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeai_worker.offload.gate import RULES

VERSION = 1


class OffloadSettingsError(ValueError):
    """A bad offload setting: names the field, what was wrong and what is accepted."""


@dataclass(frozen=True)
class ExitSetting:
    """An early exit among this stage's partition outputs: the output holding the exit
    head's logits, and the confidence at or above which the stage answers with it."""

    output: str
    threshold: float


@dataclass(frozen=True)
class OffloadSettings:
    rule: str = "maxProb"
    # early exits among the partition's outputs, in order; the first confident answers
    exits: tuple[ExitSetting, ...] = ()
    # the model's output an exit's (or the cascade's) logits stand in for
    final_output: str = "output"
    # cascade: small model(s) run on the stage's input first (two for `disagreement`)
    cascade_models: tuple[Path, ...] = ()
    cascade_threshold: float = 1.01
    # result reuse: entries kept (0: off) and the largest RMS distance of a match
    reuse_entries: int = 0
    reuse_max_distance: float = 0.0

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise OffloadSettingsError(
                f"offload.rule: unknown rule {self.rule!r} (accepted: {', '.join(RULES)})"
            )
        if self.rule == "disagreement" and len(self.cascade_models) != 2:
            raise OffloadSettingsError(
                "offload.cascadeModels: the disagreement rule needs two small models, got "
                f"{len(self.cascade_models)} (accepted: two paths)"
            )
        if len(self.cascade_models) > 2:
            raise OffloadSettingsError(
                "offload.cascadeModels: at most two small models (accepted: one or two paths)"
            )
        for i, setting in enumerate(self.exits):
            if not 0.0 <= setting.threshold <= 1.01:
                raise OffloadSettingsError(
                    f"offload.exits[{i}].threshold: {setting.threshold} is out of range "
                    "(accepted: 0 to 1, or 1.01 for never)"
                )
        if self.reuse_entries < 0 or self.reuse_max_distance < 0:
            raise OffloadSettingsError(
                "offload.reuseEntries/reuseMaxDistance: must not be negative "
                f"(got {self.reuse_entries}, {self.reuse_max_distance})"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "rule": self.rule,
            "exits": [{"output": e.output, "threshold": e.threshold} for e in self.exits],
            "finalOutput": self.final_output,
            "cascadeModels": [str(p) for p in self.cascade_models],
            "cascadeThreshold": self.cascade_threshold,
            "reuseEntries": self.reuse_entries,
            "reuseMaxDistance": self.reuse_max_distance,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Path = Path(".")) -> OffloadSettings:
        """Read the plan's form; relative model paths are taken from `base`."""
        version = data.get("version", VERSION)
        if version != VERSION:
            raise OffloadSettingsError(
                f"offload.version: {version!r} is not supported (accepted: {VERSION})"
            )
        known = {
            "version",
            "rule",
            "exits",
            "finalOutput",
            "cascadeModels",
            "cascadeThreshold",
            "reuseEntries",
            "reuseMaxDistance",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise OffloadSettingsError(
                f"offload: unknown field(s) {unknown} (accepted: {', '.join(sorted(known))})"
            )
        try:
            exits = tuple(
                ExitSetting(str(e["output"]), float(e["threshold"])) for e in data.get("exits", [])
            )
            return cls(
                rule=str(data.get("rule", "maxProb")),
                exits=exits,
                final_output=str(data.get("finalOutput", "output")),
                cascade_models=tuple(base / str(p) for p in data.get("cascadeModels", [])),
                cascade_threshold=float(data.get("cascadeThreshold", 1.01)),
                reuse_entries=int(data.get("reuseEntries", 0)),
                reuse_max_distance=float(data.get("reuseMaxDistance", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, OffloadSettingsError):
                raise
            raise OffloadSettingsError(f"offload: cannot read {dict(data)!r:.120}: {exc}") from None
