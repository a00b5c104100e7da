"""``PrewarmTaskSensor``: gate a deployment on a PPIO image prewarm task."""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from airflow.providers.common.compat.sdk import AirflowFailException, BaseSensorOperator, PokeReturnValue, conf

from airflow_provider_ppio.get_provider_info import DEFAULT_CONN_ID
from airflow_provider_ppio.hooks.mixin import PPIOHookMixin

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

    from airflow_provider_ppio.models import PrewarmTask

#: Deferred polls are at least this far apart, whatever ``poke_interval`` says (no hot loop in the triggerer).
MIN_DEFERRED_POKE_INTERVAL = 1.0
#: Seconds after the sensor's timeout at which Airflow itself ends a deferral the trigger did not end.
DEFERRAL_TIMEOUT_GRACE = 60.0


class PrewarmTaskSensor(PPIOHookMixin, BaseSensorOperator):
    """
    Wait until a PPIO image prewarm task has succeeded; fail loudly if it failed.

    On success the task's details (image, region, size, completion time...) are pushed to XCom as
    plain JSON (``return_value``). A failed prewarm raises ``AirflowFailException`` carrying the
    API's error, message and reasons, so the task is not retried pointlessly and ``soft_fail``
    turns it into a skip. Transient API trouble (rate limits, 5xx, network) that outlasts the
    hook's retries is logged and the sensor keeps waiting, within its ``timeout``; permanent errors
    (bad key, unknown task, unusable answers) fail the task at once.

    With ``deferrable=True`` the sensor pokes once and, if the prewarm is not finished, hands the
    wait to the triggerer (:class:`~airflow_provider_ppio.triggers.prewarm.PrewarmTaskTrigger`),
    freeing its worker slot. The trigger polls every ``poke_interval`` and stops at the sensor's
    ``timeout`` with :class:`AirflowSensorTimeout` (a skip with ``soft_fail``); the outcome, the
    XCom and the errors are the same as in poke mode.

    :param prewarm_task_id: Id of the prewarm task to wait for (templated).
    :param ppio_conn_id: The PPIO connection id (templated).
    :param deferrable: Wait in the triggerer instead of a worker slot; defaults to
        ``[operators] default_deferrable``.
    """

    template_fields: Sequence[str] = ("prewarm_task_id", "ppio_conn_id")
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        prewarm_task_id: str,
        ppio_conn_id: str = DEFAULT_CONN_ID,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.prewarm_task_id = prewarm_task_id
        self.ppio_conn_id = ppio_conn_id
        self.deferrable = deferrable

    def execute(self, context: Context) -> Any:
        """
        Wait for the prewarm in this worker slot or, if ``deferrable``, poke once and then defer.

        :param context: The task context.
        """
        if not self.deferrable:
            return super().execute(context)
        deadline = time.time() + self.timeout
        answer = self._first_poke(context)
        if answer:
            return answer.xcom_value if isinstance(answer, PokeReturnValue) else None
        from airflow_provider_ppio.triggers.prewarm import PrewarmTaskTrigger

        trigger = PrewarmTaskTrigger(
            prewarm_task_id=self.prewarm_task_id,
            ppio_conn_id=self.ppio_conn_id,
            poke_interval=max(self.poke_interval, MIN_DEFERRED_POKE_INTERVAL),
            deadline=deadline,
        )
        # The trigger ends the wait itself at the deadline; Airflow's deferral timeout, a little later,
        # is only the backstop for a triggerer that is down.
        backstop = max(0.0, deadline - time.time()) + DEFERRAL_TIMEOUT_GRACE
        self.defer(trigger=trigger, method_name="execute_complete", timeout=datetime.timedelta(seconds=backstop))

    def _first_poke(self, context: Context) -> PokeReturnValue | bool:
        """The poke before deferring, with ``soft_fail`` applied as ``BaseSensorOperator.execute`` does."""
        from airflow.providers.common.compat.sdk import AirflowSkipException

        try:
            return self.poke(context)
        except AirflowFailException as err:
            if self.soft_fail or getattr(self, "never_fail", False):
                raise AirflowSkipException(f"Skipping due to soft_fail: {err}") from err
            raise

    def execute_complete(self, context: Context, event: dict[str, Any] | None = None) -> Any:
        """
        Finish a deferred wait from the trigger's event; anything unexpected fails the task.

        Success returns the same XCom as poke mode; a failed prewarm raises the same
        ``AirflowFailException``; a timeout raises ``AirflowSensorTimeout``; a permanent API error
        raises the same error class as in poke mode.

        :param context: The task context.
        :param event: The payload of the trigger's event.
        """
        from airflow.providers.common.compat.sdk import AirflowSensorTimeout

        from airflow_provider_ppio.triggers.prewarm import task_from_event

        def timed_out(message: str) -> AirflowSensorTimeout:
            return AirflowSensorTimeout(f"Sensor has timed out after {self.timeout:g}s: {message}")

        task = task_from_event(event, expected_task_id=self.prewarm_task_id, reader="sensor", timeout_error=timed_out)
        # The poke mode's decision, so both modes end alike: the task has succeeded (a PokeReturnValue with
        # the details) or failed (judge raises AirflowFailException with the API's reasons).
        return cast("PokeReturnValue", self.judge(task, context)).xcom_value

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
        return self.judge(task, context)

    def judge(self, task: PrewarmTask, context: Context | None = None) -> PokeReturnValue | bool:
        """
        Turn a prewarm task into the sensor's answer; the same rule for every mode.

        On success the details also go onto the asset events of the sensor's ``outlets``.

        :param task: The task as read from the API.
        :param context: The task context (for asset events); None skips them.
        """
        from airflow_provider_ppio.models import Outcome, log_waiting

        outcome = task.outcome
        if outcome is Outcome.SUCCEEDED:
            self.log.info(
                "Prewarm task %s succeeded: %s in region %s (%s bytes)",
                task.task_id,
                task.image,
                task.region_id,
                task.image_size,
            )
            details = task.to_xcom()
            if context is not None and self.outlets:
                from airflow_provider_ppio.assets import attach_prewarm_asset_events

                attach_prewarm_asset_events(context, self.outlets, details, log=self.log)
            return PokeReturnValue(is_done=True, xcom_value=details)
        if outcome is Outcome.FAILED:
            raise AirflowFailException(task.failure_summary())
        log_waiting(self.log, task, _age(task))
        return False


def _age(task: PrewarmTask) -> str:
    if task.created_at <= 0:
        return ""
    seconds = max(0, int(time.time()) - task.created_at)
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f" ({hours}h{minutes:02d}m{seconds:02d}s since it was created)"
