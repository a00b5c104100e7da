"""Apache Airflow provider for the PPIO / Novita AI GPU cloud."""

from __future__ import annotations

__version__ = "0.2.0"
