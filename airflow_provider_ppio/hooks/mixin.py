"""The ``hook`` property every PPIO operator, sensor and trigger shares."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow_provider_ppio.hooks.ppio import PPIOHook


class PPIOHookMixin:
    """Gives a task a lazily built :class:`PPIOHook` for its ``ppio_conn_id``."""

    ppio_conn_id: str

    @cached_property
    def hook(self) -> PPIOHook:
        """The hook, built on first use so DAG parsing does no work."""
        from airflow_provider_ppio.hooks.ppio import PPIOHook

        return PPIOHook(ppio_conn_id=self.ppio_conn_id)
