"""``[core] hostname_callable`` of the distributed deployment: each process reports its component's name.

All components run on one machine; naming them (``worker-1``, ``triggerer-2``...) is how the test tells from
the REST API which worker runs a task and which triggerer holds a wait.
"""

from __future__ import annotations

import os


def hostname() -> str:
    """The name of the component this process belongs to (``PPIO_COMPONENT_NAME``)."""
    return os.environ.get("PPIO_COMPONENT_NAME", "unnamed")
