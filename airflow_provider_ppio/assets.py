"""
Assets (datasets on Airflow 2) for prewarmed images: ``ppio://prewarm/<region_id>/<image>``, and the event details.

The region is one percent-encoded path segment; the image keeps its ``/``, ``:`` and ``@``. Only the standard
library is imported at module level (Airflow and the exceptions load inside the functions): Airflow imports
:func:`normalize_prewarm_asset_uri` whenever it builds a ``ppio`` asset, and DAG files import this module.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, quote, unquote, urlsplit

if TYPE_CHECKING:
    from airflow.providers.common.compat.sdk import Asset

    from airflow_provider_ppio.models import PrewarmTask

PREWARM_ASSET_SCHEME = "ppio"
PREWARM_ASSET_KIND = "prewarm"
#: Longest asset name Airflow 3 accepts (the URI doubles as the name).
_MAX_URI_LENGTH = 1500
#: The details an asset event carries (``extra``). Scalars only: Airflow 2.11 hashes the extra of alias events.
ASSET_EXTRA_FIELDS = ("task_id", "image", "region_id", "image_size", "completed_at")

_log = logging.getLogger(__name__)


def prewarm_asset_uri(region_id: str, image: str) -> str:
    """
    The asset URI that stands for ``image`` being prewarmed in ``region_id``.

    :param region_id: The region id, e.g. ``region-a``.
    :param image: The full image reference, e.g. ``registry.example.com/team/image:tag``.
    """
    from airflow_provider_ppio.exceptions import PPIOInvalidInputError

    if not isinstance(region_id, str) or not region_id.strip():
        raise PPIOInvalidInputError(f"a prewarm asset needs a region id, got {region_id!r}")
    if not isinstance(image, str) or not image.strip("/ "):
        raise PPIOInvalidInputError(f"a prewarm asset needs an image reference, got {image!r}")
    uri = f"{PREWARM_ASSET_SCHEME}://{PREWARM_ASSET_KIND}/{quote(region_id, safe='')}/{quote(image, safe='/:@')}"
    if len(uri) > _MAX_URI_LENGTH:
        raise PPIOInvalidInputError(f"the prewarm asset URI would be {len(uri)} characters; at most {_MAX_URI_LENGTH}")
    return uri


def parse_prewarm_asset_uri(uri: str) -> tuple[str, str] | None:
    """
    ``(region_id, image)`` of a prewarm asset URI, or None when ``uri`` is not one.

    :param uri: Any asset URI.
    """
    parts = urlsplit(uri)
    if parts.scheme.lower() != PREWARM_ASSET_SCHEME or parts.netloc.lower() != PREWARM_ASSET_KIND:
        return None
    region, _, image = parts.path.lstrip("/").partition("/")
    image = image.rstrip("/")
    return (unquote(region), unquote(image)) if region and image else None


def normalize_prewarm_asset_uri(parts: SplitResult) -> SplitResult:
    """
    Airflow's URI handler for the ``ppio`` scheme (registered in provider info): validate, normalize.

    :param parts: The URI, already split and partly normalized by Airflow.
    """
    parsed = parse_prewarm_asset_uri(parts.geturl())
    if parsed is None:
        raise ValueError(
            f"{parts.geturl()!r} is not a PPIO prewarm asset URI: expected "
            f"{PREWARM_ASSET_SCHEME}://{PREWARM_ASSET_KIND}/<region_id>/<image>"
        )
    return urlsplit(prewarm_asset_uri(*parsed))


def prewarm_asset(region_id: str, image: str) -> Asset:
    """
    The asset (a ``Dataset`` on Airflow 2) for ``image`` prewarmed in ``region_id``.

    :param region_id: The region id.
    :param image: The full image reference.
    """
    from airflow.providers.common.compat.sdk import Asset

    return Asset(uri=prewarm_asset_uri(region_id, image))


def prewarm_asset_extra(details: Mapping[str, Any] | PrewarmTask) -> dict[str, Any]:
    """
    The ``extra`` of a prewarm asset event: ``ASSET_EXTRA_FIELDS``, and ``completed_at_iso`` (UTC) when reported.

    :param details: The prewarm task, or its XCom dict (``PrewarmTask.to_xcom()``).
    """
    data = details if isinstance(details, Mapping) else details.to_xcom()
    extra = {name: data[name] for name in ASSET_EXTRA_FIELDS if data.get(name) is not None}
    completed = data.get("completed_at")
    if isinstance(completed, int) and not isinstance(completed, bool) and completed > 0:
        try:
            extra["completed_at_iso"] = datetime.datetime.fromtimestamp(completed, tz=datetime.UTC).isoformat()
        except (OverflowError, OSError, ValueError):  # not a time in seconds: the prewarm still succeeded
            _log.warning("completed_at=%.40s is not a Unix time in seconds; no completed_at_iso", completed)
    return extra


def attach_prewarm_asset_events(
    context: Mapping[str, Any],
    outlets: Iterable[Any] | None,
    details: Mapping[str, Any] | PrewarmTask,
    *,
    log: logging.Logger | Any = None,
) -> list[str]:
    """
    Put a succeeded prewarm's details on the asset events of a task's outlets; call on success only.

    An asset outlet gets them as its event's ``extra``, except the prewarm asset of another region or image. An
    ``AssetAlias`` (``DatasetAlias``) outlet gets an event for this prewarm's own asset, so each mapped task
    instance emits exactly its region.

    :param context: The task context (its ``outlet_events``).
    :param outlets: The task's outlets (``self.outlets``).
    :param details: The succeeded prewarm task, or its XCom dict.
    :param log: Where to say what was attached; defaults to this module's logger.
    :return: The URIs (or alias names) that received the details.
    """
    from airflow.providers.common.compat.sdk import Asset, AssetAlias

    logger = log or _log
    outlet_events = context.get("outlet_events")
    if not outlets or outlet_events is None:
        return []
    extra = prewarm_asset_extra(details)
    region, image = str(extra.get("region_id") or ""), str(extra.get("image") or "")
    own_uri = prewarm_asset_uri(region, image) if region and image else None
    attached: list[str] = []
    for outlet in outlets:
        if isinstance(outlet, AssetAlias):
            if own_uri is None:
                logger.warning("Prewarm details name no region or image; no event for asset alias %s", outlet.name)
            elif not _alias_registered(outlet.name):
                logger.warning(
                    "Dataset alias %s is not in the metadata database (e.g. under `airflow dags test` on "
                    "Airflow 2, which does not sync DAGs; run `airflow dags reserialize` first): no event for %s",
                    outlet.name,
                    own_uri,
                )
            else:
                outlet_events[outlet].add(Asset(uri=own_uri), extra=dict(extra))
                attached.append(f"{outlet.name} -> {own_uri}")
            continue
        uri = getattr(outlet, "uri", None)
        if not isinstance(outlet, Asset) and uri is None:
            continue  # not an asset (e.g. an Airflow 2 lineage entity)
        other = parse_prewarm_asset_uri(uri) if isinstance(uri, str) else None
        if other is not None and prewarm_asset_uri(*other) != own_uri:
            logger.warning(
                "Outlet %s is the prewarm asset of another region or image (this task prewarmed %s); "
                "its event carries no details. Use an AssetAlias for mapped tasks.",
                uri,
                own_uri,
            )
            continue
        outlet_events[outlet].extra.update(extra)
        attached.append(str(uri or getattr(outlet, "name", outlet)))
    if attached:
        logger.info("Attached prewarm task %s to asset events: %s", extra.get("task_id"), ", ".join(attached))
    return attached


def _alias_registered(name: str) -> bool:
    """Whether the dataset alias exists: on Airflow 2 an event for an unknown one fails the task after it succeeded."""
    from airflow import __version__ as airflow_version

    if int(airflow_version.split(".", 1)[0]) >= 3:
        return True  # Airflow 3 creates unknown aliases itself
    try:
        from airflow.models.dataset import DatasetAliasModel
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            found = session.scalar(select(DatasetAliasModel.id).where(DatasetAliasModel.name == name).limit(1))
    except Exception:  # no database access (e.g. a DB-isolated worker): let Airflow decide
        return True
    return found is not None
