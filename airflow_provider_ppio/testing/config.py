"""Constants, settings and clock of the PPIO prewarm emulator.

Nothing here imports FastAPI: the settings can be built (and validated) before a server exists.
"""

from __future__ import annotations

import dataclasses
import math
import re
import threading
import time
from collections.abc import Callable

__all__ = [
    "ACTIVE_STATES",
    "API_PREFIX",
    "CONTROL_PREFIX",
    "DOCUMENTED_STATES",
    "GB",
    "GIB",
    "ID_MAX",
    "MIB",
    "QUOTA_MESSAGE",
    "QUOTA_REASON",
    "QUOTA_STATUSES",
    "RUNTIME_FIELDS",
    "TERMINAL_STATES",
    "EmulatorConfig",
    "FakeClock",
]

#: Base path of the emulated API family.
API_PREFIX = "/gpus/v2/prewarm-tasks"
#: Prefix of the control endpoints (no API key, never faulted, never logged).
CONTROL_PREFIX = "/_emulator"
#: The four documented states, in lifecycle order.
DOCUMENTED_STATES = ("pending", "running", "succeeded", "failed")
#: States after which a task never changes again.
TERMINAL_STATES = frozenset({"succeeded", "failed"})
#: States that count against the create quota (and, with ``quota_counts_finished``, every task until deleted).
ACTIVE_STATES = frozenset({"pending", "running"})
#: How PPIO's console backend names a refusal over the prewarm limit (ppio-api/README.md section 2.5).
QUOTA_REASON = "IMAGE_PREWARM_NUM_LIMIT"
QUOTA_MESSAGE = "Image prewarm number exceeds limit"
#: The statuses a quota refusal may be configured to use (PPIO does not document which one it sends).
QUOTA_STATUSES = frozenset({400, 403, 429})
#: Longest accepted task id (path parameter and seeded ids).
ID_MAX = 255
GIB = 1024**3
GB = 10**9
MIB = 1024 * 1024


class FakeClock:
    """A manually advanced clock for deterministic lifecycle tests.

    Pass it as ``EmulatorConfig(clock=FakeClock())`` and call :meth:`advance`.

    :param start: initial Unix time in seconds.
    """

    def __init__(self, start: float = 1_767_225_600.0) -> None:
        self._now = float(start)
        self._lock = threading.Lock()

    def __call__(self) -> float:
        """Return the current fake time.

        :return: Unix time in seconds.
        """
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> float:
        """Move the clock forward.

        :param seconds: how far to move (must be >= 0).
        :return: the new time.
        """
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        with self._lock:
            self._now += seconds
            return self._now

    def set(self, now: float) -> None:
        """Set the clock to an absolute time.

        :param now: Unix time in seconds.
        """
        with self._lock:
            self._now = float(now)


@dataclasses.dataclass
class EmulatorConfig:
    """Behaviour of one emulator instance.

    :param api_key: the only accepted API key (``Authorization: Bearer <api_key>``).
    :param pending_seconds: how long a created task stays ``pending``.
    :param running_seconds: base time a created task stays ``running``.
    :param seconds_per_gb: extra running time per GB (10^9 bytes) of ``image_size``.
    :param fail_pattern: regex searched in ``image``; a match makes the task end ``failed``.
        An empty string disables failures.
    :param quota: maximum concurrent pending/running tasks; ``None`` means unlimited.
    :param quota_status: HTTP status of a create refused over the quota (400, 403 or 429). PPIO documents
        none; its error bodies repeat the status as ``code`` and its platform guide keeps 429 for request
        rates and 403 for permissions, so a refused create is most likely a 400 (the default).
    :param quota_counts_finished: count finished (succeeded or failed) tasks toward ``quota`` too, until
        they are deleted, as PPIO's console does ("{total}/{limit} Image prewarming tasks created").
    :param default_page_size: list page size when ``limit`` is absent or 0.
    :param max_page_size: larger ``limit`` values are clamped to this.
    :param max_note_length: longest accepted ``note`` (not documented by the vendor).
    :param control_token: if set, ``/_emulator/*`` (except ``health``) needs header
        ``X-Emulator-Token: <control_token>``.
    :param request_log_size: how many API requests the log keeps (oldest dropped first).
    :param clock: returns the current Unix time; inject a :class:`FakeClock` in tests.
    """

    api_key: str = "emulator-key"
    pending_seconds: float = 1.0
    running_seconds: float = 3.0
    seconds_per_gb: float = 0.0
    fail_pattern: str = "fail"
    quota: int | None = 5
    quota_status: int = 400
    quota_counts_finished: bool = False
    default_page_size: int = 20
    max_page_size: int = 100
    max_note_length: int = 4096
    control_token: str | None = None
    request_log_size: int = 1000
    clock: Callable[[], float] = time.time

    def __post_init__(self) -> None:
        """Reject settings the emulator cannot honour."""
        for name in ("pending_seconds", "running_seconds", "seconds_per_gb"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.quota is not None and self.quota < 0:
            raise ValueError(f"quota must be >= 0 or None (unlimited), got {self.quota!r}")
        if self.quota_status not in QUOTA_STATUSES:
            raise ValueError(f"quota_status must be one of {sorted(QUOTA_STATUSES)}, got {self.quota_status!r}")
        if self.default_page_size < 1 or self.max_page_size < self.default_page_size:
            raise ValueError("need 1 <= default_page_size <= max_page_size")
        if self.max_note_length < 0 or self.request_log_size < 1:
            raise ValueError("max_note_length must be >= 0 and request_log_size >= 1")
        try:
            re.compile(self.fail_pattern)
        except re.error as exc:
            raise ValueError(f"fail_pattern is not a valid regular expression: {exc}") from exc


#: Fields of :class:`EmulatorConfig` that ``PUT /_emulator/config`` may change at run time.
RUNTIME_FIELDS = (
    "pending_seconds",
    "running_seconds",
    "seconds_per_gb",
    "fail_pattern",
    "quota",
    "quota_status",
    "quota_counts_finished",
)
