"""Operators for PPIO image prewarm tasks; results go to XCom as plain JSON."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import BaseOperator

from airflow_provider_ppio.get_provider_info import DEFAULT_CONN_ID

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

    from airflow_provider_ppio.hooks.ppio import PPIOHook


class PPIOGetPrewarmTaskOperator(BaseOperator):
    """
    Fetch a prewarm task and return its details as a JSON dict (the XCom ``return_value``).

    Downstream tasks read it with ``ti.xcom_pull(task_ids=...)["image"]`` and so on.

    :param prewarm_task_id: Id of the prewarm task (templated).
    :param ppio_conn_id: The PPIO connection id (templated).
    """

    template_fields: Sequence[str] = ("prewarm_task_id", "ppio_conn_id")
    ui_color = "#e8f0fe"

    def __init__(self, *, prewarm_task_id: str, ppio_conn_id: str = DEFAULT_CONN_ID, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prewarm_task_id = prewarm_task_id
        self.ppio_conn_id = ppio_conn_id

    @cached_property
    def hook(self) -> PPIOHook:
        """The hook, built on first use so DAG parsing does no work."""
        from airflow_provider_ppio.hooks.ppio import PPIOHook

        return PPIOHook(ppio_conn_id=self.ppio_conn_id)

    def execute(self, context: Context) -> dict[str, Any]:
        """
        Read the task and return its details.

        :param context: The task context.
        """
        task = self.hook.get_prewarm_task(self.prewarm_task_id)
        self.log.info("Prewarm task %s: %s in %s is %s", task.task_id, task.image, task.region_id, task.status.status)
        return task.to_xcom()
