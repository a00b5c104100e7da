"""A clock for retry tests: sleeps are recorded, and the retry policy's clock moves on by what was "slept"."""

from __future__ import annotations

import pytest


def install_virtual_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """
    Record ``time.sleep`` calls instead of sleeping, and let the retry policy's clock move on by what was
    "slept", so time-bounded retries (``unreachable_timeout``, deadlines) end without real waiting.

    :returns: The list of recorded sleeps.
    """
    import time
    import types

    from airflow_provider_ppio.hooks import _retry, _shared

    waited: list[float] = []
    offset = [0.0]
    real_monotonic, real_time = time.monotonic, time.time

    def fake_sleep(seconds: float) -> None:
        waited.append(seconds)
        offset[0] += seconds

    monkeypatch.setattr(time, "sleep", fake_sleep)
    clock = types.SimpleNamespace(
        monotonic=lambda: real_monotonic() + offset[0], time=lambda: real_time() + offset[0], sleep=fake_sleep
    )
    monkeypatch.setattr(_shared, "time", clock)
    monkeypatch.setattr(_retry, "time", clock)
    return waited
