"""A reschedule-mode gate, for the restart-safety test: each poke may run in a different worker process."""

from __future__ import annotations

import datetime

from airflow.providers.common.compat.sdk import DAG

from airflow_provider_ppio.sensors.prewarm import PrewarmTaskSensor

with DAG(
    dag_id="reliability_reschedule_gate",
    schedule=None,
    start_date=datetime.datetime(2026, 1, 1),
    catchup=False,
) as dag:
    PrewarmTaskSensor(
        task_id="wait_for_prewarm",
        prewarm_task_id="pwt-restart-sensor",
        mode="reschedule",
        poke_interval=1,
        timeout=600,
    )
