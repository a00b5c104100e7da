"""
What operators and sensors need from the hook layer when a DAG file is parsed, and nothing more.

:class:`PPIOHookMixin` builds the hook on first use and :func:`check_seconds` checks durations given to
a task; the hook itself, its transports and pydantic models load only when a task runs, because the
DAG-parse benchmark (docs/benchmarks.md) shows that importing them at parse time costs more than the target.
"""

from __future__ import annotations

import datetime
import math
from functools import cached_property
from typing import TYPE_CHECKING, Literal, overload

from airflow_provider_ppio.exceptions import PPIOInvalidInputError
from airflow_provider_ppio.get_provider_info import TASK_ID_MAX_LENGTH as TASK_ID_MAX_LENGTH

if TYPE_CHECKING:
    from airflow_provider_ppio.hooks.ppio import PPIOHook


class PPIOHookMixin:
    """Gives an operator, sensor or trigger a lazily built :class:`~airflow_provider_ppio.hooks.ppio.PPIOHook`."""

    ppio_conn_id: str

    @cached_property
    def hook(self) -> PPIOHook:
        """The hook for ``ppio_conn_id`` (and the task's ``unreachable_timeout``), built on first use."""
        from airflow_provider_ppio.hooks.ppio import PPIOHook  # the hook stack: only when a task runs

        return PPIOHook(ppio_conn_id=self.ppio_conn_id, unreachable_timeout=getattr(self, "unreachable_timeout", None))


@overload
def check_seconds(name: str, value: object, *, allow_none: Literal[False] = False) -> float: ...
@overload
def check_seconds(name: str, value: object, *, allow_none: bool) -> float | None: ...
def check_seconds(name: str, value: object, *, allow_none: bool = False) -> float | None:
    """
    A duration given to an operator, sensor or trigger, as positive finite seconds; refuses anything else.

    :param name: The parameter's name, for the message.
    :param value: Seconds (int or float) or a ``timedelta``.
    :param allow_none: Whether None (no limit) is acceptable.
    """
    if value is None and allow_none:
        return None
    seconds = value.total_seconds() if isinstance(value, datetime.timedelta) else value
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds < math.inf:
        raise PPIOInvalidInputError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(seconds)
