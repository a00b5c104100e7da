"""
Event-driven deploys (Airflow 3): deploy an image as soon as a prewarm of it succeeds in a region, wherever
the prewarm was started (a CI pipeline, the PPIO console, another DAG).

* The asset ``ppio://prewarm/<region>/<image>`` has an ``AssetWatcher`` whose ``PrewarmTaskEventTrigger``
  runs in the triggerer, walks the account's prewarm tasks for that image and region every
  ``poke_interval`` seconds, and fires one asset event per prewarm task that succeeds, carrying the task's
  details. On Airflow 3.3 it keeps what it reported in the asset's ``asset_state_store``, saved once Airflow
  has stored the events (the shared stream's ack mode), so a triggerer restart or crash never loses an event,
  including for a task that finished meanwhile; only a crash in the second or so between an event being
  stored and that save repeats it.
* ``example_ppio_event_driven_deploy`` is scheduled on the asset. Airflow may hand one run several events
  (all those queued since its previous run: 50 prewarms finishing together typically make two or three runs),
  so the run maps ``deploy`` over them: one deploy per prewarm task, whatever the grouping.

The asset is declared here only: Airflow syncs an asset's watchers from every DAG file that declares it, so
another file scheduling on the same URI without the watcher would keep removing it (the other examples use
another image for that reason).

Needs Airflow 3 (event-driven scheduling); on Airflow 2 this file defines no DAG. The ``ppio_default``
connection holds the API key (password) and, optionally, the base URL (host). See docs/event-driven.md.
"""

from __future__ import annotations

import datetime
from typing import Any

from airflow import __version__ as airflow_version

from airflow_provider_ppio.assets import prewarm_asset_uri

IMAGE = "registry.example.com/acme/inference-api:2.3"
REGION = "region-a"

if int(airflow_version.split(".", 1)[0]) >= 3:
    from airflow.sdk import Asset, AssetWatcher, dag, task

    from airflow_provider_ppio.triggers.prewarm_events import PrewarmTaskEventTrigger

    PREWARMED = Asset(
        uri=prewarm_asset_uri(REGION, IMAGE),
        watchers=[
            AssetWatcher(
                name=f"ppio_prewarm_{REGION}",
                # Seconds between two walks of the prewarm list; a minute is plenty when deploys can wait that long.
                trigger=PrewarmTaskEventTrigger(image=IMAGE, region_id=REGION, poke_interval=5),
            )
        ],
    )

    @dag(
        dag_id="example_ppio_event_driven_deploy",
        description="Deploy each time a prewarm of the image succeeds in the region",
        schedule=[PREWARMED],
        start_date=datetime.datetime(2026, 1, 1),
        catchup=False,
        tags=["example", "ppio"],
    )
    def example_ppio_event_driven_deploy() -> None:
        @task
        def prewarmed(triggering_asset_events: Any = None) -> list[dict[str, Any]]:
            """The details of every prewarm task this run was triggered for (one per asset event)."""
            details = []
            for event in triggering_asset_events[PREWARMED] if triggering_asset_events else ():
                payload = (event.extra or {}).get("payload")
                if isinstance(payload, dict) and payload.get("status") == "succeeded":
                    details.append(payload)
            return details

        @task
        def deploy(details: dict[str, Any]) -> str:
            """Deploy the prewarmed image (here: say what would be deployed)."""
            message = (
                f"deploying {details['image']} to region {details['region_id']} "
                f"(prewarm {details['prewarm_task_id']}, finished at {details['completed_at']})"
            )
            print(message)
            return message

        deploy.expand(details=prewarmed())

    example_ppio_event_driven_deploy()
