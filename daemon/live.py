"""The live parts of a run: the one type that health, metrics, notifications and progress read.

It sits below ``runner`` (which builds it) and ``service``/``notify`` (which only read it), so the
service plumbing never imports the lifecycle that starts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from daemon.copier import Copier
    from daemon.downloader import Downloader
    from daemon.ledger import Ledger
    from daemon.scheduler import Scheduler


@dataclass
class Pipeline:
    """The live parts of a run, for progress reporting, health, metrics and notifications."""

    ledger: Ledger
    scheduler: Scheduler
    downloader: Downloader
    copier: Copier | None = None
