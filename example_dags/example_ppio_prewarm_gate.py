"""
Deployment gate: deploy a GPU service only once its image is prewarmed in the target region.

Trigger it with the id of a PPIO image prewarm task, e.g.
``airflow dags trigger example_ppio_prewarm_gate --conf '{"prewarm_task_id": "..."}'``.
The ``ppio_default`` connection holds the API key (password) and, optionally, the base URL (host).
"""

from __future__ import annotations

import datetime
from typing import Any

from airflow.providers.common.compat.sdk import DAG, Param, task

from airflow_provider_ppio.operators.prewarm import PPIOGetPrewarmTaskOperator
from airflow_provider_ppio.sensors.prewarm import PrewarmTaskSensor

with DAG(
    dag_id="example_ppio_prewarm_gate",
    description="Wait for a PPIO image prewarm, then deploy with the prewarmed image",
    schedule=None,
    start_date=datetime.datetime(2026, 1, 1),
    catchup=False,
    params={"prewarm_task_id": Param("prewarm-task-id", type="string", minLength=1, maxLength=255)},
    tags=["example", "ppio"],
) as dag:
    wait_for_prewarm = PrewarmTaskSensor(
        task_id="wait_for_prewarm",
        prewarm_task_id="{{ params.prewarm_task_id }}",
        poke_interval=5,
        timeout=datetime.timedelta(hours=2).total_seconds(),
    )

    prewarm_details = PPIOGetPrewarmTaskOperator(
        task_id="get_prewarm_details",
        prewarm_task_id="{{ params.prewarm_task_id }}",
    )

    @task
    def deploy(details: dict[str, Any]) -> str:
        """Stand-in for the real deployment: it only needs the prewarmed image and its region."""
        message = f"deploying {details['image']} to region {details['region_id']} (prewarm {details['task_id']})"
        print(message)
        return message

    wait_for_prewarm >> prewarm_details
    deploy(prewarm_details.output)
