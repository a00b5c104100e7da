"""
The gate the distributed deployment test runs many times at once.

Each run waits for two kinds of prewarm, all deferred to the triggerers:

* ``wait_for_prewarm``: a deferrable sensor on a prewarm another system started (the gate's classic use; its
  id comes with the run's conf);
* ``prewarm``: deferrable create operators mapped over the regions, each starting its own prewarm and
  waiting for it.

``deploy`` runs once all of them succeeded. Retries are short: a task killed with its worker is retried
within the test's budget.
"""

from __future__ import annotations

import datetime
from typing import Any

from airflow.providers.common.compat.sdk import DAG, Param, task

from airflow_provider_ppio.operators.prewarm import PPIOCreatePrewarmTaskOperator
from airflow_provider_ppio.sensors.prewarm import PrewarmTaskSensor

REGIONS = ["region-a", "region-b"]
WAIT_TIMEOUT = datetime.timedelta(minutes=30)

with DAG(
    dag_id="ppio_distributed_gate",
    schedule=None,
    start_date=datetime.datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=64,
    max_active_tasks=256,
    params={
        "prewarm_task_id": Param("prewarm-task-id", type="string", minLength=1),
        "image": Param("registry.example.com/team/llm:1.0", type="string", minLength=1),
    },
    default_args={"retries": 2, "retry_delay": datetime.timedelta(seconds=2)},
    tags=["ppio", "test"],
) as dag:
    gate = PrewarmTaskSensor(
        task_id="wait_for_prewarm",
        prewarm_task_id="{{ params.prewarm_task_id }}",
        deferrable=True,
        poke_interval=2,
        timeout=WAIT_TIMEOUT.total_seconds(),
    )
    prewarm = PPIOCreatePrewarmTaskOperator.partial(
        task_id="prewarm",
        image="{{ params.image }}",
        deferrable=True,
        poke_interval=2,
        timeout=WAIT_TIMEOUT,
    ).expand(region_id=REGIONS)

    @task
    def deploy(gate_details: dict[str, Any], prewarms: list[dict[str, Any]]) -> str:
        """Stand-in for the deployment: it needs every prewarm's details."""
        regions = sorted(p["region_id"] for p in prewarms)
        return f"deploying {gate_details['image']} to {', '.join(regions)}"

    deploy(gate.output, prewarm.output)
