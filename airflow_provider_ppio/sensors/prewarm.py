"""``PrewarmTaskSensor``: gate a deployment on a PPIO image prewarm task."""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import cached_property
from typing import TYPE_CHECKING, Any

from airflow.providers.common.compat.sdk import AirflowFailException, BaseSensorOperator, PokeReturnValue

from airflow_provider_ppio.get_provider_info import DEFAULT_CONN_ID

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

    from airflow_provider_ppio.hooks.ppio import PPIOHook
    from airflow_provider_ppio.models import PrewarmTask


class PrewarmTaskSensor(BaseSensorOperator):
    """
    Wait until a PPIO image prewarm task has succeeded; fail loudly if it failed.

    On success the task's details (image, region, size, completion time...) are pushed to XCom as
    plain JSON (``return_value``). A failed prewarm raises ``AirflowFailException`` carrying the
    API's error, message and reasons, so the task is not retried pointlessly and ``soft_fail``
    turns it into a skip. Transient API trouble (rate limits, 5xx, network) that outlasts the
    hook's retries is logged and the sensor keeps waiting, within its ``timeout``; permanent errors
    (bad key, unknown task, unusable answers) fail the task at once.

    :param prewarm_task_id: Id of the prewarm task to wait for (templated).
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

    def poke(self, context: Context) -> PokeReturnValue | bool:
        """
        Read the prewarm task once and say whether the gate is open.

        :param context: The task context.
        """
        from airflow_provider_ppio.exceptions import PPIOError

        try:
            task = self.hook.get_prewarm_task(self.prewarm_task_id)
        except PPIOError as err:
            if not err.transient:
                raise
            self.log.warning("Could not read prewarm task %s, will try again: %s", self.prewarm_task_id, err)
            return False
        return self.judge(task)

    def judge(self, task: PrewarmTask) -> PokeReturnValue | bool:
        """
        Turn a prewarm task into the sensor's answer; the same rule for every mode.

        :param task: The task as read from the API.
        """
        from airflow_provider_ppio.models import Outcome

        outcome = task.outcome
        if outcome is Outcome.SUCCEEDED:
            self.log.info(
                "Prewarm task %s succeeded: %s in region %s (%s bytes)",
                task.task_id,
                task.image,
                task.region_id,
                task.image_size,
            )
            return PokeReturnValue(is_done=True, xcom_value=task.to_xcom())
        if outcome is Outcome.FAILED:
            raise AirflowFailException(task.failure_summary())
        if task.state is None:
            self.log.warning(
                "Prewarm task %s has a status this provider does not know (%r); still waiting",
                task.task_id,
                task.status.status,
            )
        self.log.info(
            "Prewarm task %s is %s%s",
            task.task_id,
            task.status.status or "without a status",
            _age(task),
        )
        return False


def _age(task: PrewarmTask) -> str:
    if task.created_at <= 0:
        return ""
    seconds = max(0, int(time.time()) - task.created_at)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f" ({hours}h{minutes:02d}m{seconds:02d}s since it was created)"
