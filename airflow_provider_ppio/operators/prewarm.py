"""Operators for PPIO image prewarm tasks; results go to XCom as plain JSON."""

from __future__ import annotations

import ast
import datetime
import hashlib
import json
import random
import re
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from airflow.providers.common.compat.sdk import (
    AirflowFailException,
    BaseOperator,
    conf,
)

from airflow_provider_ppio.assets import attach_prewarm_asset_events
from airflow_provider_ppio.exceptions import (
    PPIOBadResponseError,
    PPIOError,
    PPIOInvalidInputError,
    PPIONotFoundError,
    PPIOPrewarmFailedError,
    PPIOQuotaExceededError,
    PPIOServerError,
    PPIOTransportError,
)
from airflow_provider_ppio.get_provider_info import DEFAULT_CONN_ID
from airflow_provider_ppio.hooks import TASK_ID_MAX_LENGTH, PPIOHookMixin, check_seconds
from airflow_provider_ppio.status import Outcome

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Context

    from airflow_provider_ppio.models import PrewarmTask


class PPIOGetPrewarmTaskOperator(PPIOHookMixin, BaseOperator):
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

    def execute(self, context: Context) -> dict[str, Any]:
        """
        Read the task and return its details.

        :param context: The task context.
        """
        task = self.hook.get_prewarm_task(self.prewarm_task_id)
        self.log.info("Prewarm task %s: %s in %s is %s", task.task_id, task.image, task.region_id, task.status.status)
        return task.to_xcom()


#: XCom keys pushed by the create operator before it waits.
XCOM_PREWARM_TASK_ID = "prewarm_task_id"
XCOM_PREWARM_TASK = "prewarm_task"
#: What ``prewarm_task_id`` holds while this try has started no prewarm (reused one, or failed before creating):
#: a falsy string the delete operator skips. Not None: Airflow 3 resolves an XCom holding None as not found.
NO_PREWARM_TASK_ID = ""
#: The marker that ties a prewarm task to one run of one task instance starts with this.
MARKER_PREFIX = "af-"
#: ``MARKER_PREFIX`` and this many hex digits, appended to the note after a space.
_MARKER_DIGITS = 16
MARKER_LENGTH = len(MARKER_PREFIX) + _MARKER_DIGITS
#: The longest note PPIO's console accepts (INFERRED from the console's form, not documented by the API);
#: the user's note, a space and the marker must fit in it.
NOTE_MAX_LENGTH = 100
#: While waiting for a quota slot, the same state is logged again as a WARNING at most this often (seconds).
QUOTA_SUMMARY_INTERVAL = 600.0
#: Said when waiting for a quota slot failed or may not help: PPIO's console counts created tasks.
QUOTA_FINISHED_HINT = (
    "PPIO may count finished (succeeded or failed) prewarm tasks toward the limit until they are deleted: "
    "delete the ones you no longer need, e.g. with PPIODeletePrewarmTasksOperator(prewarm_task_ids=[...]) "
    "or in the PPIO console."
)
_QUOTA_BUSY = "busy"
_QUOTA_IDLE = "idle"
_QUOTA_UNKNOWN = "unknown"
#: Waits for a free quota slot grow from ``poke_interval`` (at least ``MIN_QUOTA_WAIT`` seconds, so a tiny
#: interval cannot hammer the API) to ``QUOTA_BACKOFF_CAP_FACTOR`` times that, with this much jitter.
MIN_QUOTA_WAIT = 1.0
QUOTA_BACKOFF_CAP_FACTOR = 4
_QUOTA_JITTER = (0.8, 1.2)
#: ``[registry[:port]/]path[:tag][@sha256:digest]``, as container tools write image references.
_IMAGE_REFERENCE = re.compile(
    r"^(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
)


class PPIOCreatePrewarmTaskOperator(PPIOHookMixin, BaseOperator):
    """
    Start prewarming an image in a region, optionally wait until it is done; one prewarm per task instance run.

    At the start of every try the XCom ``prewarm_task_id`` is set to ``""`` (nothing started); once this
    task instance's prewarm exists its id replaces it, and its details go to ``prewarm_task``, before any
    wait. So a teardown ``PPIODeletePrewarmTasksOperator(prewarm_task_ids=create.output["prewarm_task_id"])``
    deletes this task instance's prewarm, and nothing when the try reused one or failed before creating.
    The return value is the prewarm task as JSON: final when ``wait_for_completion`` (then outlets get
    asset events carrying the details, see :func:`~airflow_provider_ppio.assets.attach_prewarm_asset_events`),
    as created otherwise.

    Retries never start a second prewarm; a clear starts a new one. The note of each prewarm task carries a
    marker (``af-<16 hex>``) derived from the task instance and its clear generation (dag, task, run, map
    index and ``max_tries``, which Airflow raises on a clear and keeps across retries). Before creating, and
    again when a create's answer is lost (timeout, reset connection, 5xx, 408, 409, an unreadable answer),
    the operator looks for a pending, running or succeeded task with that marker, image and region and
    continues with it. The marker is the only idempotency record, so it works the same on every Airflow line.

    The account runs a limited number of prewarms (5 by default). When the API refuses a create for that
    reason, the operator waits for a free slot and creates then (``wait_for_quota``, on by default): waits
    start at ``poke_interval`` and double, with jitter, up to ``QUOTA_BACKOFF_CAP_FACTOR`` times it, in the
    worker or, with ``deferrable=True``, deferred to the triggerer between attempts. PPIO may count finished
    prewarm tasks toward the limit until they are deleted; when nothing of the account is pending or
    running, the wait says so, and so does the error at the timeout.

    With ``reuse_prewarmed=True`` no prewarm is started when the same image is already prewarmed in
    the region (a succeeded task for exactly this image reference): a digest-pinned reference
    (``...@sha256:...``) always matches, a tag only when that task completed within ``max_age``
    (a tag can move). The operator then returns that task's details with ``"reused": true`` and
    leaves ``prewarm_task_id`` empty, so a teardown does not delete a prewarm this task did not start.

    Waiting uses the same decision as :class:`~airflow_provider_ppio.sensors.prewarm.PrewarmTaskSensor`:
    ``succeeded`` ends it, ``failed`` raises ``PPIOPrewarmFailedError`` with the API's error, anything
    else keeps waiting; transient API errors are retried for up to ``unreachable_timeout``. In
    deferrable mode the wait runs in the triggerer
    (:class:`~airflow_provider_ppio.triggers.prewarm.PrewarmTaskTrigger`). When ``timeout`` passes the
    task fails without retry and the prewarm is left running (delete it with
    :class:`PPIODeletePrewarmTasksOperator`, e.g. as a teardown). When the task is killed or marked
    failed in a worker, the pending or running prewarm of ``prewarm_task_id`` is deleted unless
    ``delete_on_kill=False``. While deferred it is left to the teardown: Airflow 3.3's triggerer also calls a
    trigger's ``on_kill`` when it hands the trigger to another triggerer, which must not delete a live prewarm.

    :param image: Full image reference to prewarm (templated).
    :param region_id: Target region id (templated).
    :param product_ids: GPU products to cover; none means all products of the region (templated).
    :param registry_auth_id: Saved registry credential id, for private images (templated).
    :param note: Free-text note (templated); the idempotency marker is appended to it, and both together
        must fit in ``NOTE_MAX_LENGTH`` (100) characters, so the note has at most 80.
    :param ppio_conn_id: The PPIO connection id (templated).
    :param wait_for_completion: Wait until the prewarm succeeds (default) or return once it is created.
    :param poke_interval: Seconds between two reads of the prewarm task while waiting (the sensor's name).
    :param timeout: Longest this try waits, for a quota slot and for the prewarm together, in seconds or as a
        ``timedelta``; None waits forever.
    :param deferrable: Wait in the triggerer; defaults to ``[operators] default_deferrable``.
    :param reuse_existing: Look for this task instance's prewarm (by marker) before creating one.
    :param unreachable_timeout: Seconds the API may give no usable answer during the wait before the task
        fails; defaults to the connection's extra of that name, else 600.
    :param wait_for_quota: Wait for a free slot when the account's prewarm quota is used up; False fails at once
        with ``PPIOQuotaExceededError``.
    :param reuse_prewarmed: Return a succeeded prewarm of the same image in the region instead of starting one.
    :param max_age: With ``reuse_prewarmed``: how recent a prewarm of a tagged (not digest-pinned) image must be.
    :param delete_on_kill: Delete this try's pending or running prewarm when the task is killed or marked failed.
    :param poll_interval: Deprecated name of ``poke_interval``.
    """

    template_fields: Sequence[str] = (
        "image",
        "region_id",
        "product_ids",
        "registry_auth_id",
        "note",
        "ppio_conn_id",
    )
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        image: str,
        region_id: str,
        product_ids: Sequence[str] | None = None,
        registry_auth_id: str | None = None,
        note: str | None = None,
        ppio_conn_id: str = DEFAULT_CONN_ID,
        wait_for_completion: bool = True,
        poke_interval: float = 30.0,
        timeout: float | datetime.timedelta | None = datetime.timedelta(hours=6),
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        reuse_existing: bool = True,
        unreachable_timeout: float | None = None,
        wait_for_quota: bool = True,
        reuse_prewarmed: bool = False,
        max_age: float | datetime.timedelta | None = None,
        delete_on_kill: bool = True,
        poll_interval: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.image = image
        self.region_id = region_id
        self.product_ids = product_ids
        self.registry_auth_id = registry_auth_id
        self.note = note
        self.ppio_conn_id = ppio_conn_id
        self.wait_for_completion = wait_for_completion
        if poll_interval is not None:
            warnings.warn(
                "poll_interval is deprecated; use poke_interval (the sensor's name for the same thing)",
                DeprecationWarning,
                stacklevel=2,
            )
            poke_interval = poll_interval
        self.poke_interval = check_seconds("poke_interval", poke_interval)
        self.timeout = check_seconds("timeout", timeout, allow_none=True)
        self.deferrable = deferrable
        self.reuse_existing = reuse_existing
        self.unreachable_timeout = check_seconds("unreachable_timeout", unreachable_timeout, allow_none=True)
        self.wait_for_quota = wait_for_quota
        self.reuse_prewarmed = reuse_prewarmed
        self.delete_on_kill = delete_on_kill
        self.max_age = check_seconds("max_age", max_age, allow_none=True)
        if self.max_age is not None and not reuse_prewarmed:
            raise PPIOInvalidInputError(
                f"{type(self).__name__} {self.task_id!r}: max_age only applies with reuse_prewarmed=True"
            )
        if reuse_prewarmed and "{{" not in str(image):
            image_reference(image)  # refuse a bad reference now; a templated one is checked when rendered
        if not (isinstance(note, str) and "{{" in note):
            self._check_note()  # a templated note is checked when rendered
        if self.outlets and not wait_for_completion:
            raise ValueError(
                f"{type(self).__name__} {self.task_id!r}: outlets need wait_for_completion=True "
                "(an asset event means the image is prewarmed, and without waiting the task ends before that)"
            )
        self._reset()
        self._owned: str | None = None

    def _reset(
        self,
        deadline: float | None = None,
        quota_attempt: int = 0,
        quota_since: float | None = None,
        quota_state: str | None = None,
        quota_logged_at: float | None = None,
    ) -> None:
        self._task: PrewarmTask | None = None
        self._result: dict[str, Any] | None = None
        self._pushed_details = False
        self._reused = False
        self._deadline = deadline
        self._quota_attempt = quota_attempt
        self._quota_since = quota_since
        self._quota_state = quota_state
        self._quota_logged_at = quota_logged_at

    def _check_note(self) -> None:
        """Refuse a note that, with the marker, is longer than the console accepts; before any request."""
        if self.note is None:
            return
        if not isinstance(self.note, str):
            raise PPIOInvalidInputError(f"note must be a string, got {type(self.note).__name__}")
        room = NOTE_MAX_LENGTH - MARKER_LENGTH - 1
        if len(self.note) > room:
            raise PPIOInvalidInputError(
                f"{type(self).__name__} {self.task_id!r}: note is {len(self.note)} characters long; at most "
                f"{room} fit, because the operator appends a space and its {MARKER_LENGTH}-character idempotency "
                f"marker and PPIO accepts notes of at most {NOTE_MAX_LENGTH} characters"
            )

    def execute(self, context: Context) -> Any:
        """
        Create (or find this task instance's) prewarm task, push its id, wait if asked, return its details.

        :param context: The task context.
        """
        self._reset(deadline=None if self.timeout is None else time.time() + self.timeout)
        self._owned = None
        self._check_note()
        if self.reuse_prewarmed:
            image_reference(self.image)
        # Airflow clears a try's XComs when the try starts (not when it resumes from a deferral): this value
        # stands until this try has a prewarm of its own, so a teardown never reads an earlier try's id.
        context["ti"].xcom_push(key=XCOM_PREWARM_TASK_ID, value=NO_PREWARM_TASK_ID)
        return self._run(context)

    def resume_after_quota_wait(
        self,
        context: Context,
        event: Any = None,
        deadline: float | None = None,
        quota_attempt: int = 0,
        quota_since: float | None = None,
        quota_state: str | None = None,
        quota_logged_at: float | None = None,
    ) -> Any:
        """
        Try again after a deferred wait for a free quota slot (the wait's deadline and backoff carry on).

        :param context: The task context.
        :param event: The timer trigger's event (unused).
        :param deadline: The try's deadline (Unix time), or None.
        :param quota_attempt: How many creates were refused for the quota so far.
        :param quota_since: When the first refusal came (Unix time).
        :param quota_state: What the last WARNING said about the account's prewarms.
        :param quota_logged_at: When that WARNING was logged (Unix time).
        """
        self._reset(
            deadline=deadline,
            quota_attempt=quota_attempt,
            quota_since=quota_since,
            quota_state=quota_state,
            quota_logged_at=quota_logged_at,
        )
        return self._run(context)

    def _run(self, context: Context) -> Any:
        task_id = self._submit(idempotency_marker(context))
        if not self._reused:
            context["ti"].xcom_push(key=XCOM_PREWARM_TASK_ID, value=task_id)
            self._owned = task_id
        return self._follow(task_id, context)

    def _submit(self, marker: str) -> str:
        """
        This task instance's prewarm (by marker), else with ``reuse_prewarmed`` a warm one, else a new one;
        waiting for a free quota slot if needed.
        """
        while True:
            # Looked for before every attempt: a lost create may have landed, or another run prewarmed the image.
            if self.reuse_existing:
                found = self._find_reusable(marker)
                if found is not None:
                    return found
            warm = self._find_prewarmed() if self.reuse_prewarmed else None
            if warm is not None:
                return warm
            try:
                return self._create(marker)
            except PPIOQuotaExceededError as err:
                if not self.wait_for_quota:
                    raise
                self._wait_for_quota(err)

    def _create(self, marker: str) -> str:
        """Send one create; when its answer is lost, look for the task it may have created before failing."""
        note = f"{self.note} {marker}" if self.note else marker
        try:
            task_id = self.hook.create_prewarm_task(
                image=self.image,
                region_id=self.region_id,
                product_ids=self.product_ids,
                registry_auth_id=self.registry_auth_id,
                note=note,
            )
        except PPIOQuotaExceededError:
            raise
        except PPIOError as err:
            # The create may have reached the API (the hook does not resend it), or a 409 may say it exists.
            if not (self.reuse_existing and _may_have_created(err)):
                raise
            self.log.warning("Create answer lost (%s); looking for the task it may have created", err)
            try:
                found = self._find_reusable(marker)
            except PPIOError:
                found = None
            if found is None:
                raise err from None
            return found
        self.log.info("Created prewarm task %s: %s in region %s", task_id, self.image, self.region_id)
        return task_id

    def _follow(self, task_id: str, context: Context) -> dict[str, Any]:
        """Push the details, then wait (unless ``wait_for_completion`` is off); return the result."""
        task: PrewarmTask | None = self._task if self._task is not None and self._task.task_id == task_id else None
        if task is not None:
            self._push_details(task, context)
        else:
            # Before deferring, one read with the hook's normal attempts: waiting out an outage is the triggerer's
            # job, not a worker slot's. A wait in the worker is patient (up to unreachable_timeout).
            task = self._read_for_wait(task_id, context, patient=not (self.deferrable and self.wait_for_completion))
        if not self.wait_for_completion:
            if task is None:
                self._timed_out(task_id)
            return self._complete(task, context)
        deadline = self._deadline
        while True:
            if task is not None and self._finished(task):
                return self._complete(task, context)
            if self.deferrable:
                self._defer(task_id, deadline)
            if deadline is not None and time.time() >= deadline:
                self._timed_out(task_id)
            wait = self.poke_interval if deadline is None else min(self.poke_interval, deadline - time.time())
            time.sleep(max(0.0, wait))
            task = self._read_for_wait(task_id, context, patient=True)

    def _read_for_wait(self, task_id: str, context: Context, *, patient: bool) -> PrewarmTask | None:
        """The task, or None when a transient error leaves the wait to go on (deferred, or up to the deadline)."""
        deadline = self._deadline
        try:
            return self._read_and_push(task_id, context, patient=patient, deadline=deadline)
        except PPIOError as err:
            if not err.transient:
                raise
            if not patient:
                self.log.warning("Could not read prewarm task %s (%s); the triggerer waits it out", task_id, err)
                return None
            # Transient errors were retried for up to unreachable_timeout; one left means the deadline came.
            if deadline is None or time.time() < deadline:
                raise
            self.log.warning("The timeout passed while the API gave no usable answer: %s", err)
            return None

    # -- killed ----------------------------------------------------------------------------------------

    def on_kill(self) -> None:
        """Delete the pending or running prewarm this try pushed as ``prewarm_task_id`` (``delete_on_kill``)."""
        task_id = self._owned
        if task_id is None:
            return
        if not self.delete_on_kill:
            self.log.info("Killed: prewarm task %s is left as it is (delete_on_kill=False)", task_id)
            return
        try:
            task = self.hook.get_prewarm_task(task_id)
        except PPIOError as err:
            self.log.warning("Killed: could not read prewarm task %s (%s); deleting it anyway", task_id, err)
        else:
            if task.outcome is not Outcome.WAITING:
                self.log.info("Killed: prewarm task %s is %s already; not deleted", task_id, task.status.status)
                return
        try:
            self.hook.delete_prewarm_tasks([task_id])
        except PPIOError as err:
            self.log.warning("Killed: could not delete prewarm task %s: %s", task_id, err)
            return
        self.log.warning("Killed: deleted prewarm task %s, which this try started (delete_on_kill=True)", task_id)

    # -- deferrable ----------------------------------------------------------------------------------

    def _defer(self, task_id: str, deadline: float | None) -> None:
        # airflow.triggers.base is only needed to defer, not to parse a DAG.
        from airflow_provider_ppio.triggers.prewarm import (
            DEFERRAL_TIMEOUT_GRACE,
            MIN_DEFERRED_POKE_INTERVAL,
            PrewarmTaskTrigger,
        )

        trigger = PrewarmTaskTrigger(
            prewarm_task_id=task_id,
            ppio_conn_id=self.ppio_conn_id,
            poke_interval=max(self.poke_interval, MIN_DEFERRED_POKE_INTERVAL),
            deadline=deadline,
            unreachable_timeout=self.unreachable_timeout,
            # Never True here: Airflow 3.3.2's triggerer cancels a trigger "by user action", and so calls its
            # on_kill, also when the trigger moves to another triggerer (update_triggers), not only on a kill.
            delete_on_kill=False,
        )
        # As in the sensor: the trigger ends the wait at the deadline; Airflow's timeout is the backstop.
        backstop = None if deadline is None else max(0.0, deadline - time.time()) + DEFERRAL_TIMEOUT_GRACE
        self.defer(
            trigger=trigger,
            method_name="execute_complete",
            kwargs={"prewarm_task_id": task_id},
            timeout=None if backstop is None else datetime.timedelta(seconds=backstop),
        )

    def execute_complete(
        self, context: Context, event: dict[str, Any] | None = None, prewarm_task_id: str = ""
    ) -> dict[str, Any]:
        """
        Resume after the trigger fired: the same outcome and XCom as waiting in a worker.

        :param context: The task context.
        :param event: The trigger's event payload.
        :param prewarm_task_id: The prewarm task the trigger waited for (``defer`` kwargs; ``dags test`` on
            Airflow 3 drops them, so the id this try pushed to XCom before deferring is the fallback).
        """
        self._reset()
        ti = context["ti"]
        expected = prewarm_task_id or ti.xcom_pull(
            task_ids=ti.task_id, key=XCOM_PREWARM_TASK_ID, map_indexes=getattr(ti, "map_index", None)
        )
        self._owned = str(expected or "") or None
        task = prewarm_task_from_event(event, expected_task_id=str(expected or ""))
        self._task = task
        self._pushed_details = True  # before deferring; the return value is the final state
        return self._complete(task, context)

    # -- helpers -------------------------------------------------------------------------------------

    def _wait_for_quota(self, err: PPIOQuotaExceededError) -> None:
        """Wait (here, or deferred) before the next create; fail when the wait would pass the deadline."""
        now = time.time()
        if self._quota_since is None:
            self._quota_since = now
        first = max(self.poke_interval, MIN_QUOTA_WAIT)
        wait = min(first * 2**self._quota_attempt, first * QUOTA_BACKOFF_CAP_FACTOR) * random.uniform(*_QUOTA_JITTER)
        self._quota_attempt += 1
        waited = now - self._quota_since
        if self._deadline is not None:
            wait = min(wait, self._deadline - now)  # a last try right at the deadline
        if wait <= 0:
            raise AirflowFailException(
                f"No free prewarm slot for {self.image!r} in region {self.region_id!r} within the timeout "
                f"({waited:.0f}s waited, {self._quota_attempt} creates refused): {err}. {QUOTA_FINISHED_HINT}"
            )
        self._log_quota_wait(err, waited, wait, now)
        if self.deferrable:
            self._defer_quota_wait(wait)
        time.sleep(wait)

    def _log_quota_wait(self, err: PPIOQuotaExceededError, waited: float, wait: float, now: float) -> None:
        """One WARNING when what the wait knows changes, and a summary every ``QUOTA_SUMMARY_INTERVAL``."""
        state = self._account_activity()
        reason = err.api_message or err
        if state == _QUOTA_IDLE:
            message = (
                "The account's prewarm quota is used up (%s) and none of its prewarm tasks is pending or running, "
                "so waiting may not help: " + QUOTA_FINISHED_HINT + " Waited %.0fs so far; next create in %.0fs"
            )
        else:
            message = (
                "The account's prewarm quota is used up (%s); waited %.0fs so far for a free slot, next create in %.0fs"
            )
        repeat = self._quota_logged_at is not None and now - self._quota_logged_at < QUOTA_SUMMARY_INTERVAL
        if state == self._quota_state and repeat:
            self.log.info(message, reason, waited, wait)
            return
        self.log.warning(message, reason, waited, wait)
        self._quota_state = state
        self._quota_logged_at = now

    def _account_activity(self) -> str:
        """Whether any prewarm task of the account (any region) is pending or running; unknown if unreadable."""
        try:
            for status in ("pending", "running"):
                if next(iter(self.hook.list_prewarm_tasks(status=status, page_size=1)), None) is not None:
                    return _QUOTA_BUSY
        except PPIOError as err:
            self.log.info("Could not list the account's pending and running prewarm tasks: %s", err)
            return _QUOTA_UNKNOWN
        return _QUOTA_IDLE

    def _defer_quota_wait(self, wait: float) -> None:
        # Airflow's timer trigger, from where each Airflow line keeps it; only needed to defer.
        try:
            from airflow.providers.standard.triggers.temporal import DateTimeTrigger
        except ImportError:  # Airflow 2.11
            from airflow.triggers.temporal import DateTimeTrigger  # type: ignore[no-redef,unused-ignore]

        moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=wait)
        self.defer(
            trigger=DateTimeTrigger(moment),
            method_name="resume_after_quota_wait",
            kwargs={
                "deadline": self._deadline,
                "quota_attempt": self._quota_attempt,
                "quota_since": self._quota_since,
                "quota_state": self._quota_state,
                "quota_logged_at": self._quota_logged_at,
            },
        )

    def _find_prewarmed(self) -> str | None:
        """A succeeded prewarm of exactly this image in this region that may be reused (``reuse_prewarmed``)."""
        reference = image_reference(self.image)
        if reference["digest"] is None and self.max_age is None:
            self.log.warning(
                "reuse_prewarmed: %s is a tag, not a digest, and no max_age is set: a tag can move, so no earlier "
                "prewarm is reused",
                self.image,
            )
            return None
        oldest = None if reference["digest"] is not None else time.time() - (self.max_age or 0)
        candidates = [
            task
            for task in self.hook.list_prewarm_tasks(
                status="succeeded", region_id=self.region_id, name=reference["name"]
            )
            if task.image == self.image
            and task.region_id == self.region_id
            and task.outcome is Outcome.SUCCEEDED
            and (oldest is None or task.completed_at >= oldest)
        ]
        if not candidates:
            return None
        task = max(candidates, key=lambda candidate: candidate.completed_at)
        self.log.info(
            "Reusing prewarm task %s: %s is already prewarmed in region %s (completed at %s); nothing is created",
            task.task_id,
            self.image,
            self.region_id,
            datetime.datetime.fromtimestamp(task.completed_at, datetime.UTC).isoformat(),
        )
        self._task = task
        self._reused = True
        return task.task_id

    def _find_reusable(self, marker: str) -> str | None:
        """This task instance's newest pending, running or succeeded prewarm task, by marker."""
        candidates = [
            task
            for task in self.hook.list_prewarm_tasks(region_id=self.region_id, name=marker)
            if marker in task.note.split()
            and task.image == self.image
            and task.region_id == self.region_id
            and task.outcome is not Outcome.FAILED
        ]
        if not candidates:
            return None
        if len(candidates) > 1:
            self.log.warning("%d prewarm tasks carry marker %s; reusing the newest", len(candidates), marker)
        task = max(candidates, key=lambda candidate: candidate.created_at)
        self.log.info(
            "Reusing prewarm task %s (%s) started by an earlier try of this task", task.task_id, task.status.status
        )
        self._task = task
        return task.task_id

    def _read_and_push(
        self, task_id: str, context: Context, *, patient: bool, deadline: float | None = None
    ) -> PrewarmTask:
        # patient: retry transient errors up to unreachable_timeout; only where the wait runs in the worker.
        task = self.hook.get_prewarm_task(task_id, patient=patient, deadline=deadline)
        self._task = task
        self._push_details(task, context)
        return task

    def _push_details(self, task: PrewarmTask, context: Context) -> None:
        if not self._pushed_details:
            context["ti"].xcom_push(key=XCOM_PREWARM_TASK, value=task.to_xcom())
            self._pushed_details = True

    def _finished(self, task: PrewarmTask) -> bool:
        """The sensor's decision: True on success, AirflowFailException on failure, else keep waiting."""
        outcome = task.outcome
        if outcome is Outcome.FAILED:
            raise PPIOPrewarmFailedError(task.failure_summary(), prewarm_task_id=task.task_id)
        if outcome is Outcome.SUCCEEDED:
            return True
        from airflow_provider_ppio.models import log_waiting  # pydantic: only when a task runs

        log_waiting(self.log, task)
        return False

    def _timed_out(self, task_id: str) -> NoReturn:
        status = self._task.status.status if self._task is not None else "unknown"
        raise AirflowFailException(
            f"PPIO prewarm task {task_id!r} did not finish within {self.timeout:g}s (last status: {status}); "
            "it was left as it is: delete it with PPIODeletePrewarmTasksOperator or keep waiting with "
            "PrewarmTaskSensor"
        )

    def _complete(self, task: PrewarmTask, context: Context) -> dict[str, Any]:
        details = task.to_xcom()
        if self._reused:
            details["reused"] = True
        if task.outcome is Outcome.SUCCEEDED:
            self.log.info(
                "Prewarm task %s succeeded: %s in region %s (%s bytes)",
                task.task_id,
                task.image,
                task.region_id,
                task.image_size,
            )
            if self.wait_for_completion and self.outlets:
                attach_prewarm_asset_events(context, self.outlets, details, log=self.log)
        self._result = details
        return details


def _may_have_created(err: PPIOError) -> bool:
    """Whether a create that raised ``err`` may still have created the task (so look it up before failing)."""
    if isinstance(err, PPIOTransportError):
        return err.request_sent
    if isinstance(err, PPIOServerError | PPIOBadResponseError):
        return True
    # 408: the server gave up while reading or acting on it; 409: the API says it conflicts with what exists.
    return err.http_status in (408, 409)


def image_reference(image: str) -> dict[str, str | None]:
    """
    Split an image reference into its short name, tag and digest; refuse one that cannot be parsed.

    :param image: E.g. ``registry.example.com/team/server:1.4`` or ``...server@sha256:<64 hex>``.
    """
    match = _IMAGE_REFERENCE.match(image) if isinstance(image, str) else None
    if match is None:
        raise PPIOInvalidInputError(
            f"reuse_prewarmed needs an image reference such as registry.example.com/team/image:tag or "
            f"...image@sha256:<digest>, got {image!r}"
        )
    path = image.split("@", 1)[0]
    if match["tag"]:
        path = path[: -len(match["tag"]) - 1]
    return {"name": path.rsplit("/", 1)[-1], "tag": match["tag"], "digest": match["digest"]}


def idempotency_marker(context: Context) -> str:
    """
    The token that ties a prewarm task to one run of a task instance: the same for every retry, new on a clear.

    ``max_tries`` tells a clear from a retry on every Airflow line: it stays as it is across retries (and
    deferrals), and a clear sets it to ``try_number + retries`` (``clear_task_instances``), which only grows.

    :param context: The task context (its ``ti``: dag id, task id, run id, map index, ``max_tries``).
    """
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    generation = getattr(ti, "max_tries", None)
    identity = f"{ti.dag_id}/{ti.task_id}/{ti.run_id}/{-1 if map_index is None else map_index}/{generation}"
    return MARKER_PREFIX + hashlib.sha256(identity.encode()).hexdigest()[:_MARKER_DIGITS]


def prewarm_task_from_event(event: Any, *, expected_task_id: str) -> PrewarmTask:
    """
    The succeeded prewarm task of a :class:`PrewarmTaskTrigger` event; raise for any other outcome.

    The sensor's rules (:func:`~airflow_provider_ppio.triggers.prewarm.task_from_event`), except that a
    ``timeout`` raises ``AirflowFailException`` (no retry: the prewarm is left as it is).

    :param event: The event payload.
    :param expected_task_id: The prewarm task the trigger was started for.
    """
    # airflow.triggers.base is only needed once a trigger answered, not to parse a DAG.
    from airflow_provider_ppio.triggers.prewarm import task_from_event

    def timed_out(message: str) -> AirflowFailException:
        return AirflowFailException(
            f"{message or f'PPIO prewarm task {expected_task_id!r} did not finish in time'}; it was left as it is: "
            "delete it with PPIODeletePrewarmTasksOperator or keep waiting with PrewarmTaskSensor"
        )

    task = task_from_event(event, expected_task_id=expected_task_id, reader="operator", timeout_error=timed_out)
    if task.outcome is Outcome.FAILED:
        raise PPIOPrewarmFailedError(task.failure_summary(), prewarm_task_id=task.task_id)
    return task


class PPIODeletePrewarmTasksOperator(PPIOHookMixin, BaseOperator):
    """
    Delete prewarm tasks, e.g. as the teardown of a DAG that created them.

    ``prewarm_task_ids`` takes one id, a list of ids, the details dicts pushed by the other
    operators and the sensor (their ``task_id`` is used), or a mix, such as
    ``create.output["prewarm_task_id"]`` of a mapped :class:`PPIOCreatePrewarmTaskOperator`. Empty
    entries are skipped and duplicates sent once.

    A template such as ``"{{ ti.xcom_pull(task_ids='prewarm') }}"`` renders to a string unless the DAG
    sets ``render_template_as_native_obj=True``; a string that is a rendered list, tuple or details dict
    (JSON or Python literal) is read as what it shows. Anything else that is not an id (a number, a
    literal that does not parse, ``"None"``, an id with whitespace or a comma, a dict without
    ``task_id``) fails the task before any request: see :func:`collect_prewarm_task_ids` for the rules.

    By default an id the API does not know is not an error (the task was cleaned up already); when
    none of the ids was known a warning says that nothing was deleted. With ``fail_on_missing=True``
    every id is read first and the task fails, deleting nothing, if any is unknown.

    Returns (XCom ``return_value``) ``{"deleted": [...], "not_found": [...]}``: the ids the API accepted
    the delete for, and those it answered 404 for. An API that ignores unknown ids in a batch delete
    (as the emulator does) lists them under ``deleted``.

    :param prewarm_task_ids: The prewarm task ids (templated).
    :param ppio_conn_id: The PPIO connection id (templated).
    :param fail_on_missing: Fail when an id does not exist.
    """

    template_fields: Sequence[str] = ("prewarm_task_ids", "ppio_conn_id")
    ui_color = "#fde8e8"

    def __init__(
        self,
        *,
        prewarm_task_ids: Any,
        ppio_conn_id: str = DEFAULT_CONN_ID,
        fail_on_missing: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.prewarm_task_ids = prewarm_task_ids
        self.ppio_conn_id = ppio_conn_id
        self.fail_on_missing = fail_on_missing

    def execute(self, context: Context) -> dict[str, list[str]]:
        """
        Delete the tasks; return ``{"deleted": [...], "not_found": [...]}``.

        :param context: The task context.
        """
        ids = collect_prewarm_task_ids(self.prewarm_task_ids)  # refuses bad input before any request
        if not ids:
            self.log.info("No prewarm task to delete")
            return {"deleted": [], "not_found": []}
        if self.fail_on_missing:
            missing = [task_id for task_id in ids if not self._exists(task_id)]
            if missing:
                raise PPIONotFoundError(f"Prewarm tasks not found, nothing deleted: {', '.join(missing)}")
        deleted: list[str] = ids
        not_found: list[str] = []
        try:
            self.hook.delete_prewarm_tasks(ids)
        except PPIONotFoundError:
            if self.fail_on_missing:
                raise
            # The API refused the batch over an unknown id: one at a time, skipping the unknown ones.
            self.log.info("The API does not know some of the ids; deleting them one by one")
            deleted = []
            for task_id in ids:
                try:
                    self.hook.delete_prewarm_tasks([task_id])
                except PPIONotFoundError:
                    not_found.append(task_id)
                else:
                    deleted.append(task_id)
        if not deleted:
            self.log.warning(
                "Nothing deleted: the API knows none of the %d prewarm task id(s): %s",
                len(not_found),
                ", ".join(not_found),
            )
        else:
            self.log.info("Deleted %d prewarm task(s): %s", len(deleted), ", ".join(deleted))
            if not_found:
                self.log.info("Not found (already deleted?) %d: %s", len(not_found), ", ".join(not_found))
        return {"deleted": deleted, "not_found": not_found}

    def _exists(self, task_id: str) -> bool:
        try:
            self.hook.get_prewarm_task(task_id)
        except PPIONotFoundError:
            return False
        return True


def collect_prewarm_task_ids(value: Any) -> list[str]:
    """
    Flatten ids, details dicts (``task_id``) and (nested) lists of them into unique ids, in order.

    Without ``render_template_as_native_obj`` a templated list arrives as its string form, so a string is
    read this way (surrounding whitespace ignored):

    * empty: skipped, like ``None`` and ``""`` anywhere;
    * starting with ``[``, ``(`` or ``{``: a rendered list, tuple or dict, read with ``json.loads`` and
      else ``ast.literal_eval`` (never ``eval``), then flattened by the same rules; one that reads as
      neither is refused;
    * anything else is one id: 1-255 characters, not ``.`` or ``..`` (the hook's rules), and, because
      these mean a value went wrong on the way, without whitespace, control characters, commas or quotes,
      and not ``None`` / ``null`` (what a template renders for an XCom that was not found).

    A dict must carry a string ``task_id``; numbers, booleans, bytes and other objects are refused. Every
    refusal is a :class:`~airflow_provider_ppio.exceptions.PPIOInvalidInputError` raised before any request.

    :param value: What ``prewarm_task_ids`` rendered to.
    """

    how = (
        "pass the ids themselves: an XComArg such as create.output['prewarm_task_id'], a list, or a template "
        "on a DAG with render_template_as_native_obj=True (otherwise '{{ ti.xcom_pull(...) }}' renders to a string)"
    )
    ids: dict[str, None] = {}  # ordered and unique

    def refuse(problem: str, item: Any) -> PPIOInvalidInputError:
        shown = repr(item)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return PPIOInvalidInputError(f"prewarm_task_ids: {shown} {problem}; {how}")

    def parse(text: str) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            pass
        try:
            return ast.literal_eval(text)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            raise refuse("looks like a list or dict but is neither valid JSON nor a Python literal", text) from None

    def visit_string(item: str, *, literals: bool = True) -> None:
        text = item.strip()
        if not text:
            return
        if literals and text[0] in "[({":
            parsed = parse(text)
            if not isinstance(parsed, list | tuple | set | frozenset | dict):
                raise refuse(f"reads as a value of type {type(parsed).__name__}, not a list of ids", item)
            visit(parsed)
            return
        if text[0] in "[({":
            raise refuse("is a list or dict literal where one id belongs", item)
        if text in ("None", "null"):
            raise refuse("is what a template renders when the XCom it pulls does not exist", item)
        if len(text) > TASK_ID_MAX_LENGTH:
            raise refuse(f"is {len(text)} characters long; an id has at most {TASK_ID_MAX_LENGTH}", item)
        if text in (".", ".."):
            raise refuse("is not a valid id", item)
        if any(char.isspace() or not char.isprintable() or char in ",'\"" for char in text):
            raise refuse("is not one id: it holds whitespace, a comma or a quote", item)
        ids[text] = None

    def visit(item: Any) -> None:
        if item is None:
            return
        if isinstance(item, str):
            visit_string(item)
        elif isinstance(item, Mapping):
            task_id = item.get("task_id")
            if not isinstance(task_id, str) or not task_id.strip():
                raise refuse("is a dict without a task_id; expected prewarm task details", item)
            visit_string(task_id, literals=False)
        elif isinstance(item, bytes | bytearray) or not isinstance(item, Iterable):
            raise refuse(f"is a value of type {type(item).__name__}, not an id", item)
        else:
            for element in item:
                visit(element)

    visit(value)
    return list(ids)
