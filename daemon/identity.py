"""Which PBX this is: its serial number, recorded in the ledger and checked before any download.

Recording ids are only unique within one PBX. A config pointed at another PBX (or a replaced one)
would meet ids the ledger already calls done and skip recordings it never saw; so the serial the PBX
tells (``system/information``) is recorded once and every later run must meet the same one, unless
the operator says the PBX was replaced (``--new-pbx``).
"""

from __future__ import annotations

import asyncio
import time

import structlog

from daemon.client import PbxClient
from daemon.errors import PbxConfigError
from daemon.ledger import KV_BACKFILL, KV_HIGH_WATER, KV_PBX_FIRMWARE, KV_PBX_SN, Ledger, LedgerDb

log = structlog.get_logger("daemon.identity")

# Discovery's positions (its high-water id, the back-fill's page): they count the old PBX's ids.
DISCOVERY_POSITIONS = (KV_HIGH_WATER, KV_BACKFILL)


class WrongPbxError(PbxConfigError):
    """The PBX is not the one the ledger was filled from."""


def identity_problem(recorded: str | None, told: str | None, *, layout_needs_sn: bool, accept_new: bool
                     ) -> str | None:
    """Why this PBX must not be archived into this ledger, or None. Pure; tested as a table."""
    if told is None:
        if recorded is not None and not accept_new:
            # It told its serial before: a PBX that no longer does may be another one behind the URL.
            return (f"the ledger was filled from the PBX with serial {recorded}, but pbx.base_url no longer tells "
                    "its serial (system/information): check pbx.base_url; if the PBX was replaced or its "
                    "firmware changed, run once with --new-pbx")
        if layout_needs_sn:
            return ("archive.layout uses {pbx_sn}, but the PBX does not tell its serial (no system/information "
                    "on this firmware): take {pbx_sn} out of archive.layout")
        return None
    if recorded is not None and recorded != told and not accept_new:
        return (f"the ledger was filled from the PBX with serial {recorded}, but pbx.base_url answers as {told}: "
                "check pbx.base_url and state.path; if the PBX was replaced, run once with --new-pbx")
    return None


class PbxIdentity:
    """Learns the PBX's serial once per process (single-flight) and holds it for naming and sidecars."""

    def __init__(self, client: PbxClient, ledger: Ledger, *, layout_needs_sn: bool, accept_new: bool = False) -> None:
        self.client = client
        self.ledger = ledger
        self.layout_needs_sn = layout_needs_sn
        self.accept_new = accept_new
        self.sn: str | None = None
        self.known = False
        self._lock = asyncio.Lock()

    async def ensure(self) -> str | None:
        """The PBX's serial (None when it does not tell). Raises WrongPbxError, or the client's errors."""
        if self.known:
            return self.sn
        async with self._lock:
            if self.known:
                return self.sn
            info = await self.client.system_info()
            told = info.get("sn") if info else None
            recorded = await self.ledger.call(lambda db: db.kv_get(KV_PBX_SN))
            problem = identity_problem(recorded, told, layout_needs_sn=self.layout_needs_sn,
                                       accept_new=self.accept_new)
            if problem is not None:
                raise WrongPbxError(problem)
            if told is None:
                if recorded is not None:     # --new-pbx, and the new one tells no serial
                    def forget_old(db: LedgerDb) -> None:
                        db.retire_pbx(recorded, now=time.time(), kv_reset=DISCOVERY_POSITIONS)
                        db.kv_delete(KV_PBX_SN, KV_PBX_FIRMWARE)
                    await self.ledger.call(forget_old)
                log.warning("pbx.serial_unknown", action="archiving without the PBX's serial in the sidecars")
            elif recorded != told:
                firmware = (info or {}).get("firmware_version") or ""

                def record(db: LedgerDb) -> int:
                    retired = 0
                    if recorded is not None:
                        retired = db.retire_pbx(recorded, now=time.time(), kv_reset=DISCOVERY_POSITIONS)
                    db.kv_set(KV_PBX_SN, str(told))
                    db.kv_set(KV_PBX_FIRMWARE, firmware)
                    return retired
                retired = await self.ledger.call(record)
                log.info("pbx.identified", sn=told, firmware=firmware, replaced=recorded,
                         **({"old_ids_retired": retired} if recorded is not None else {}))
            self.sn, self.known = told, True
            return told
