"""Wake-up signals for the per-deployment daemons (spec, model or node changes)."""

from __future__ import annotations

import asyncio

_events: dict[tuple[str, str], asyncio.Event] = {}
# namespace/name of a deployment -> the DNNModel it references
_model_of: dict[tuple[str, str], tuple[str, str]] = {}


def event_for(namespace: str, name: str) -> asyncio.Event:
    return _events.setdefault((namespace, name), asyncio.Event())


def forget(namespace: str, name: str) -> None:
    _events.pop((namespace, name), None)
    _model_of.pop((namespace, name), None)


def track_model(namespace: str, name: str, model: str) -> None:
    _model_of[(namespace, name)] = (namespace, model)


def wake(namespace: str, name: str) -> None:
    event = _events.get((namespace, name))
    if event is not None:
        event.set()


def wake_all() -> None:
    for event in _events.values():
        event.set()


def wake_model_users(namespace: str, model: str) -> None:
    for key, ref in _model_of.items():
        if ref == (namespace, model):
            wake(*key)
