"""
Every sensor mode against an API in trouble, for tests/e2e/test_sensor_outage_e2e.py.

Each task reads its own prewarm task (``pw-<case>-<mode>``), so the emulator's request log and faults
are per task. The cases:

* ``down``: every read answers 503; ``unreachable_timeout`` (3 s) ends the wait long before ``timeout``.
* ``slow`` / ``slow_soft``: every read answers 503; the sensor's ``timeout`` (3 s) comes first.
* ``blip``: one 503, then the prewarm has succeeded.
* ``late``: running at the first read, then 503 for good; the ``timeout`` (4 s, counted from the first poke)
  passes before ``unreachable_timeout`` (2 s from the outage's start): a timeout, in every mode.
"""

from __future__ import annotations

import datetime

from airflow.providers.common.compat.sdk import DAG

from airflow_provider_ppio.sensors.prewarm import PrewarmTaskSensor

MODES = {"poke": {"mode": "poke"}, "reschedule": {"mode": "reschedule"}, "deferrable": {"deferrable": True}}
CASES = {
    "down": {"timeout": 60, "unreachable_timeout": 3, "poke_interval": 1},
    "slow": {"timeout": 3, "unreachable_timeout": 60, "poke_interval": 1},
    "slow_soft": {"timeout": 3, "unreachable_timeout": 60, "poke_interval": 1, "soft_fail": True},
    "blip": {"timeout": 60, "unreachable_timeout": 60, "poke_interval": 1},
    "late": {"timeout": 4, "unreachable_timeout": 2, "poke_interval": 3},
}

with DAG(dag_id="ppio_sensor_outage_modes", schedule=None, start_date=datetime.datetime(2026, 1, 1)):
    for case, settings in CASES.items():
        for mode, mode_settings in MODES.items():
            PrewarmTaskSensor(  # type: ignore[arg-type]
                task_id=f"{case}_{mode}",
                prewarm_task_id=f"pw-{case}-{mode}",
                **settings,
                **mode_settings,
            )
