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

from airflow.providers.common.compat.sdk import AirflowFailException, BaseOperator, conf

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
        task = self.hook.get_prewarm_task(self.prewarm_task_id)
        self.log.info("Prewarm task %s: %s in %s is %s", task.task_id, task.image, task.region_id, task.status.status)
        return task.to_xcom()


#: XCom keys the create operator pushes before it waits.
XCOM_PREWARM_TASK_ID = "prewarm_task_id"
XCOM_PREWARM_TASK = "prewarm_task"
#: ``prewarm_task_id`` while this try has started no prewarm: falsy, and not None (Airflow 3 reads None as no XCom).
NO_PREWARM_TASK_ID = ""
#: The idempotency marker appended to a prewarm's note: this prefix and 16 hex digits.
MARKER_PREFIX = "af-"
_MARKER_DIGITS = 16
MARKER_LENGTH = len(MARKER_PREFIX) + _MARKER_DIGITS
#: The longest note PPIO's console accepts (inferred from its form; the API documents none).
NOTE_MAX_LENGTH = 100
#: While waiting for a quota slot, an unchanged state is logged again as a WARNING at most this often (seconds).
QUOTA_SUMMARY_INTERVAL = 600.0
#: Quota waits grow from ``poke_interval`` (at least ``MIN_QUOTA_WAIT`` s) to this many times it, with +-20 % jitter.
MIN_QUOTA_WAIT = 1.0
QUOTA_BACKOFF_CAP_FACTOR = 4
QUOTA_FINISHED_HINT = (
    "PPIO may count finished (succeeded or failed) prewarm tasks toward the limit until they are deleted: "
    "delete the ones you no longer need, e.g. with PPIODeletePrewarmTasksOperator(prewarm_task_ids=[...]) "
    "or in the PPIO console."
)
_LEFT_AS_IT_IS = (
    "it was left as it is: delete it with PPIODeletePrewarmTasksOperator or keep waiting with PrewarmTaskSensor"
)
#: ``[registry[:port]/]path[:tag][@sha256:digest]``, as container tools write image references.
_IMAGE_REFERENCE = re.compile(
    r"^(?P<path>(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*)"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
)


class PPIOCreatePrewarmTaskOperator(PPIOHookMixin, BaseOperator):
    """
    Start prewarming an image in a region and, by default, wait until it is done; one prewarm per task instance run.

    Pushes ``prewarm_task_id`` (``""`` until this try has a prewarm of its own) and ``prewarm_task`` before any
    wait, and returns the prewarm task as JSON. Retries find their prewarm by the marker in its note; a clear
    starts a new one. The rules in full: docs/lifecycle.md.

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

    template_fields: Sequence[str] = ("image", "region_id", "product_ids", "registry_auth_id", "note", "ppio_conn_id")
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
        self._check_input(skip_templated=True)
        if self.outlets and not wait_for_completion:
            raise ValueError(
                f"{type(self).__name__} {self.task_id!r}: outlets need wait_for_completion=True "
                "(an asset event means the image is prewarmed, and without waiting the task ends before that)"
            )
        self._reset()

    def _reset(
        self,
        deadline: float | None = None,
        quota_attempt: int = 0,
        quota_since: float | None = None,
        quota_state: str | None = None,
        quota_logged_at: float | None = None,
    ) -> None:
        """Start a try, or resume one after a quota wait with its deadline and backoff."""
        self._task: PrewarmTask | None = None  # as last read
        self._owned: str | None = None  # what this try pushed as prewarm_task_id: on_kill deletes it
        self._reused = False
        self._deadline = deadline
        self._quota_attempt = quota_attempt
        self._quota_since = quota_since
        self._quota_state = quota_state
        self._quota_logged_at = quota_logged_at

    def _check_input(self, *, skip_templated: bool = False) -> None:
        """Refuse, before any request, a note too long for the marker, or with ``reuse_prewarmed`` a bad image."""
        note = self.note
        if note is not None and not (skip_templated and isinstance(note, str) and "{{" in note):
            if not isinstance(note, str):
                raise PPIOInvalidInputError(f"note must be a string, got {type(note).__name__}")
            room = NOTE_MAX_LENGTH - MARKER_LENGTH - 1
            if len(note) > room:
                raise PPIOInvalidInputError(
                    f"{type(self).__name__} {self.task_id!r}: note is {len(note)} characters long; at most {room} "
                    f"fit, because the operator appends a space and its {MARKER_LENGTH}-character idempotency "
                    f"marker and PPIO accepts notes of at most {NOTE_MAX_LENGTH} characters"
                )
        if self.reuse_prewarmed and not (skip_templated and "{{" in str(self.image)):
            _image_name_and_digest(self.image)

    def execute(self, context: Context) -> Any:
        self._reset(deadline=None if self.timeout is None else time.time() + self.timeout)
        self._check_input()
        # Airflow clears a try's XComs when it starts, not when it resumes from a deferral: this stands until the
        # try has a prewarm of its own, so a teardown never reads an earlier try's id.
        context["ti"].xcom_push(key=XCOM_PREWARM_TASK_ID, value=NO_PREWARM_TASK_ID)
        return self._run(context)

    def resume_after_quota_wait(self, context: Context, event: Any = None, **state: Any) -> Any:
        """Create again after a deferred quota wait; ``state`` (the ``defer`` kwargs) carries deadline and backoff."""
        self._reset(**state)
        return self._run(context)

    def _run(self, context: Context) -> Any:
        task_id = self._submit(idempotency_marker(context))
        if not self._reused:
            context["ti"].xcom_push(key=XCOM_PREWARM_TASK_ID, value=task_id)
            self._owned = task_id
        return self._follow(task_id, context)

    def _submit(self, marker: str) -> str:
        """This task instance's prewarm, else with ``reuse_prewarmed`` a warm one, else a new one (quota permitting)."""
        while True:
            # Looked for before every attempt: a lost create may have landed, or another run prewarmed the image.
            found = self._find_own(marker) if self.reuse_existing else None
            if found is None and self.reuse_prewarmed:
                found = self._find_prewarmed()
            if found is not None:
                return found
            try:
                return self._create(marker)
            except PPIOQuotaExceededError as err:
                if not self.wait_for_quota:
                    raise
                self._wait_for_quota(err)

    def _create(self, marker: str) -> str:
        """Send one create; when its answer is lost, look for the task it may have created before failing."""
        try:
            task_id = self.hook.create_prewarm_task(
                image=self.image,
                region_id=self.region_id,
                product_ids=self.product_ids,
                registry_auth_id=self.registry_auth_id,
                note=f"{self.note} {marker}" if self.note else marker,
            )
        except PPIOError as err:
            if not (self.reuse_existing and _may_have_created(err)):
                raise
            self.log.warning("Create answer lost (%s); looking for the task it may have created", err)
            try:
                found = self._find_own(marker)
            except PPIOError:
                found = None
            if found is None:
                raise err from None
            return found
        self.log.info("Created prewarm task %s: %s in region %s", task_id, self.image, self.region_id)
        return task_id

    def _follow(self, task_id: str, context: Context) -> dict[str, Any]:
        """Push the details, then wait (unless ``wait_for_completion`` is off); return the result."""
        task = self._task
        if task is None:
            # Before deferring, one read with the hook's normal attempts: the triggerer waits out an outage.
            task = self._read(task_id, patient=not (self.deferrable and self.wait_for_completion))
        if task is not None:
            context["ti"].xcom_push(key=XCOM_PREWARM_TASK, value=task.to_xcom())
        if not self.wait_for_completion:
            return self._complete(task, context) if task is not None else self._timed_out(task_id)
        while task is None or not self._finished(task):
            if self.deferrable:
                self._defer(task_id)
            deadline = self._deadline
            if deadline is not None and time.time() >= deadline:
                self._timed_out(task_id)
            time.sleep(
                max(0.0, self.poke_interval if deadline is None else min(self.poke_interval, deadline - time.time()))
            )
            task = self._read(task_id, patient=True)
        return self._complete(task, context)

    def _read(self, task_id: str, *, patient: bool) -> PrewarmTask | None:
        """The task, or None when a transient error leaves the wait to go on (deferred, or up to the deadline)."""
        # patient: the hook retries transient errors up to unreachable_timeout (only for a wait in the worker).
        try:
            self._task = self.hook.get_prewarm_task(task_id, patient=patient, deadline=self._deadline)
        except PPIOError as err:
            if not err.transient:
                raise
            if not patient:
                self.log.warning("Could not read prewarm task %s (%s); the triggerer waits it out", task_id, err)
                return None
            # Transient errors were retried for up to unreachable_timeout; one left means the deadline came.
            if self._deadline is None or time.time() < self._deadline:
                raise
            self.log.warning("The timeout passed while the API gave no usable answer: %s", err)
            return None
        return self._task

    def _finished(self, task: PrewarmTask) -> bool:
        """The sensor's decision: True on success, ``PPIOPrewarmFailedError`` on failure, else keep waiting."""
        if task.outcome is Outcome.FAILED:
            raise PPIOPrewarmFailedError(task.failure_summary(), prewarm_task_id=task.task_id)
        if task.outcome is Outcome.SUCCEEDED:
            return True
        task.log_progress(self.log)
        return False

    def _timed_out(self, task_id: str) -> NoReturn:
        status = self._task.status.status if self._task is not None else "unknown"
        raise AirflowFailException(
            f"PPIO prewarm task {task_id!r} did not finish within {self.timeout:g}s (last status: {status}); "
            + _LEFT_AS_IT_IS
        )

    def _complete(self, task: PrewarmTask, context: Context) -> dict[str, Any]:
        details = task.to_xcom()
        if self._reused:
            details["reused"] = True
        if task.outcome is Outcome.SUCCEEDED:
            task.log_progress(self.log)
            if self.wait_for_completion and self.outlets:
                attach_prewarm_asset_events(context, self.outlets, details, log=self.log)
        return details

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

    def _defer(self, task_id: str) -> None:
        # airflow.triggers.base is only needed to defer, not to parse a DAG.
        from airflow_provider_ppio.triggers import prewarm as triggers

        deadline = self._deadline
        trigger = triggers.PrewarmTaskTrigger(
            prewarm_task_id=task_id,
            ppio_conn_id=self.ppio_conn_id,
            poke_interval=max(self.poke_interval, triggers.MIN_DEFERRED_POKE_INTERVAL),
            deadline=deadline,
            unreachable_timeout=self.unreachable_timeout,
        )
        # As in the sensor: the trigger ends the wait at the deadline; Airflow's timeout is the backstop.
        backstop = None if deadline is None else max(0.0, deadline - time.time()) + triggers.DEFERRAL_TIMEOUT_GRACE
        self.defer(
            trigger=trigger,
            method_name="execute_complete",
            kwargs={"prewarm_task_id": task_id},
            timeout=None if backstop is None else datetime.timedelta(seconds=backstop),
        )

    def execute_complete(
        self, context: Context, event: dict[str, Any] | None = None, prewarm_task_id: str = ""
    ) -> dict[str, Any]:
        """Resume after the trigger fired: the same outcome and XCom as waiting in a worker."""
        # Airflow 3's dags test drops the defer kwargs (prewarm_task_id): then the id pushed before deferring counts.
        # airflow.triggers.base is only needed once a trigger answered, not to parse a DAG.
        from airflow_provider_ppio.triggers.prewarm import task_from_event

        self._reset()
        ti = context["ti"]
        pushed = ti.xcom_pull(task_ids=ti.task_id, key=XCOM_PREWARM_TASK_ID, map_indexes=getattr(ti, "map_index", None))
        expected = str(prewarm_task_id or pushed or "")
        self._owned = expected or None

        def timed_out(message: str) -> AirflowFailException:
            return AirflowFailException(
                f"{message or f'PPIO prewarm task {expected!r} did not finish in time'}; {_LEFT_AS_IT_IS}"
            )

        task = task_from_event(event, expected_task_id=expected, reader="operator", timeout_error=timed_out)
        self._finished(task)  # the event's task succeeded, or failed: then this raises
        return self._complete(task, context)

    def _wait_for_quota(self, err: PPIOQuotaExceededError) -> None:
        """Wait (here, or deferred) before the next create; fail when the wait would pass the deadline."""
        now = time.time()
        if self._quota_since is None:
            self._quota_since = now
        first = max(self.poke_interval, MIN_QUOTA_WAIT)
        wait = min(first * 2**self._quota_attempt, first * QUOTA_BACKOFF_CAP_FACTOR) * random.uniform(0.8, 1.2)
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
            # Airflow's timer trigger, where each Airflow line keeps it; only needed to defer.
            try:
                from airflow.providers.standard.triggers.temporal import DateTimeTrigger
            except ImportError:  # Airflow 2.11
                from airflow.triggers.temporal import DateTimeTrigger  # type: ignore[no-redef,unused-ignore]

            self.defer(
                trigger=DateTimeTrigger(datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=wait)),
                method_name="resume_after_quota_wait",
                kwargs={
                    "deadline": self._deadline,
                    "quota_attempt": self._quota_attempt,
                    "quota_since": self._quota_since,
                    "quota_state": self._quota_state,
                    "quota_logged_at": self._quota_logged_at,
                },
            )
        time.sleep(wait)

    def _log_quota_wait(self, err: PPIOQuotaExceededError, waited: float, wait: float, now: float) -> None:
        """A WARNING when what the wait knows changes and every ``QUOTA_SUMMARY_INTERVAL``, INFO in between."""
        state = self._account_activity()
        if state == "idle":
            message = (
                "The account's prewarm quota is used up (%s) and none of its prewarm tasks is pending or running, "
                "so waiting may not help: " + QUOTA_FINISHED_HINT + " Waited %.0fs so far; next create in %.0fs"
            )
        else:
            message = (
                "The account's prewarm quota is used up (%s); waited %.0fs so far for a free slot, next create in %.0fs"
            )
        recent = self._quota_logged_at is not None and now - self._quota_logged_at < QUOTA_SUMMARY_INTERVAL
        if state == self._quota_state and recent:
            self.log.info(message, err.api_message or err, waited, wait)
            return
        self.log.warning(message, err.api_message or err, waited, wait)
        self._quota_state, self._quota_logged_at = state, now

    def _account_activity(self) -> str:
        """``busy`` if any prewarm of the account (any region) is pending or running, else ``idle``; or ``unknown``."""
        try:
            for status in ("pending", "running"):
                if next(iter(self.hook.list_prewarm_tasks(status=status, page_size=1)), None) is not None:
                    return "busy"
        except PPIOError as err:
            self.log.info("Could not list the account's pending and running prewarm tasks: %s", err)
            return "unknown"
        return "idle"

    def _find_own(self, marker: str) -> str | None:
        """This task instance's newest pending, running or succeeded prewarm task, by marker."""
        candidates = [
            task
            for task in self.hook.list_prewarm_tasks(region_id=self.region_id, name=marker)
            if marker in task.note.split()
            and (task.image, task.region_id) == (self.image, self.region_id)
            and task.outcome is not Outcome.FAILED
        ]
        if not candidates:
            return None
        if len(candidates) > 1:
            self.log.warning("%d prewarm tasks carry marker %s; reusing the newest", len(candidates), marker)
        self._task = task = max(candidates, key=lambda candidate: candidate.created_at)
        self.log.info(
            "Reusing prewarm task %s (%s) started by an earlier try of this task", task.task_id, task.status.status
        )
        return task.task_id

    def _find_prewarmed(self) -> str | None:
        """A succeeded prewarm of exactly this image in this region that may be reused (``reuse_prewarmed``)."""
        name, digest = _image_name_and_digest(self.image)
        if digest is None and self.max_age is None:
            self.log.warning(
                "reuse_prewarmed: %s is a tag, not a digest, and no max_age is set: a tag can move, so no earlier "
                "prewarm is reused",
                self.image,
            )
            return None
        oldest = None if digest is not None else time.time() - (self.max_age or 0)
        candidates = [
            task
            for task in self.hook.list_prewarm_tasks(status="succeeded", region_id=self.region_id, name=name)
            if (task.image, task.region_id) == (self.image, self.region_id)
            and task.outcome is Outcome.SUCCEEDED
            and (oldest is None or task.completed_at >= oldest)
        ]
        if not candidates:
            return None
        self._task = task = max(candidates, key=lambda candidate: candidate.completed_at)
        self.log.info(
            "Reusing prewarm task %s: %s is already prewarmed in region %s (completed at %s); nothing is created",
            task.task_id,
            self.image,
            self.region_id,
            datetime.datetime.fromtimestamp(task.completed_at, datetime.UTC).isoformat(),
        )
        self._reused = True
        return task.task_id


def _may_have_created(err: PPIOError) -> bool:
    """Whether a create that raised ``err`` may have created the task: the hook never resends it, so look it up."""
    if isinstance(err, PPIOTransportError):
        return err.request_sent
    if isinstance(err, PPIOServerError | PPIOBadResponseError):
        return True
    # 408: the server gave up while reading or acting on it; 409: the API says it conflicts with what exists.
    return err.http_status in (408, 409)


def _image_name_and_digest(image: str) -> tuple[str, str | None]:
    """The short name and the digest (if pinned) of an image reference; refuse one that cannot be parsed."""
    match = _IMAGE_REFERENCE.match(image) if isinstance(image, str) else None
    if match is None:
        raise PPIOInvalidInputError(
            f"reuse_prewarmed needs an image reference such as registry.example.com/team/image:tag or "
            f"...image@sha256:<digest>, got {image!r}"
        )
    return match["path"].rsplit("/", 1)[-1], match["digest"]


def idempotency_marker(context: Context) -> str:
    """
    The token that ties a prewarm task to one run of a task instance: the same for every retry, new on a clear.

    ``max_tries`` tells a clear from a retry on every Airflow line: retries and deferrals keep it, and a clear
    sets it to ``try_number + retries``, which only grows.

    :param context: The task context (its ``ti``: dag id, task id, run id, map index, ``max_tries``).
    """
    ti = context["ti"]
    map_index = getattr(ti, "map_index", -1)
    generation = getattr(ti, "max_tries", None)
    identity = f"{ti.dag_id}/{ti.task_id}/{ti.run_id}/{-1 if map_index is None else map_index}/{generation}"
    return MARKER_PREFIX + hashlib.sha256(identity.encode()).hexdigest()[:_MARKER_DIGITS]


class PPIODeletePrewarmTasksOperator(PPIOHookMixin, BaseOperator):
    """
    Delete prewarm tasks, e.g. as the teardown of a DAG that created them.

    Returns ``{"deleted": [...], "not_found": [...]}``. An unknown id is not an error unless ``fail_on_missing``;
    a value that is not an id fails the task before any request (see :func:`collect_prewarm_task_ids`).

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


_HOW_TO_PASS_IDS = (
    "pass the ids themselves: an XComArg such as create.output['prewarm_task_id'], a list, or a template "
    "on a DAG with render_template_as_native_obj=True (otherwise '{{ ti.xcom_pull(...) }}' renders to a string)"
)


def collect_prewarm_task_ids(value: Any) -> list[str]:
    """
    Flatten ids, details dicts (their ``task_id``) and nested lists of them into unique ids, in order.

    Empty entries (``None``, ``""``) are skipped. A string starting with ``[``, ``(`` or ``{`` is a rendered list,
    tuple or dict (JSON, else a Python literal; never ``eval``); any other string is one id. Anything else raises
    ``PPIOInvalidInputError``: the rules are tabled in docs/lifecycle.md.

    :param value: What ``prewarm_task_ids`` rendered to.
    """
    ids: dict[str, None] = {}  # ordered and unique

    def refuse(problem: str, item: Any) -> PPIOInvalidInputError:
        shown = repr(item)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        return PPIOInvalidInputError(f"prewarm_task_ids: {shown} {problem}; {_HOW_TO_PASS_IDS}")

    def literal(text: str) -> Any:
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
        if text[0] in "[({":
            if not literals:
                raise refuse("is a list or dict literal where one id belongs", item)
            parsed = literal(text)
            if not isinstance(parsed, list | tuple | set | frozenset | dict):
                raise refuse(f"reads as a value of type {type(parsed).__name__}, not a list of ids", item)
            visit(parsed)
        elif text in ("None", "null"):
            raise refuse("is what a template renders when the XCom it pulls does not exist", item)
        elif len(text) > TASK_ID_MAX_LENGTH:
            raise refuse(f"is {len(text)} characters long; an id has at most {TASK_ID_MAX_LENGTH}", item)
        elif text in (".", ".."):
            raise refuse("is not a valid id", item)
        elif any(char.isspace() or not char.isprintable() or char in ",'\"" for char in text):
            raise refuse("is not one id: it holds whitespace, a comma or a quote", item)
        else:
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
