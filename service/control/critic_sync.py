"""The critic activated through the admin API, on every replica.

`POST /v1/admin/critic/activate` loads the bundle on the replica that was called, then writes a
`critic.activate` audit row {path, name, version}. Every replica's reloader (this one's too, and a
replica that starts later) activates the newest such row's path when it is not what it runs. The
path must exist on every replica (a shared volume, or the same image); a replica that cannot load
it logs an error, keeps its critic and shows the mismatch (GET /v1/admin/critic, /readyz).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from service.critic.registry import CriticActivator
from service.store.models import AuditEntry

log = logging.getLogger(__name__)

ACTION = "critic.activate"


@dataclass
class Activation:
    """The newest activation record, and whether this replica runs it."""

    path: str
    name: str | None
    version: str | None
    at: str
    applied: bool
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def described(path: str | None, critic: Any) -> dict[str, Any]:
    """What an activation record holds about a critic."""
    return {"path": path, "name": critic.name, "version": critic.version}


class CriticSync:
    def __init__(self, activator: CriticActivator) -> None:
        self.activator = activator
        self.record_id: int | None = None  # the activation record last acted on: each is tried once
        self.activation: Activation | None = None
        self._started = False
        self._loading: asyncio.Task | None = None  # kept: the loop holds tasks weakly
        self._lock = asyncio.Lock()  # one load at a time, in the order of the records

    def runs(self, path: str, name: str | None, version: str | None) -> bool:
        current = self.activator.slot.current
        return self.activator.path == path and (name, version) == (current.name, current.version)

    async def reload(self, conn: AsyncConnection) -> None:
        first, self._started = not self._started, True
        row = (await conn.execute(select(AuditEntry.id, AuditEntry.at, AuditEntry.after)
                                  .where(AuditEntry.action == ACTION)
                                  .order_by(AuditEntry.id.desc()).limit(1))).first()
        if row is None or row.id == self.record_id:
            return
        self.record_id = row.id
        after = row.after or {}
        path, name, version = str(after.get("path") or ""), after.get("name"), after.get("version")
        activation = Activation(path, name, version, row.at.isoformat(), applied=True)
        if not path or self.runs(path, name, version):
            self.activation = activation
            return
        activation.applied = False  # until it is loaded
        self.activation = activation
        if first:  # at start: serve the activated critic from the first turn
            await self._load(activation)
            return
        # Later: loading takes seconds, and the control plane's reload (keys, routes) must not wait for it.
        self._loading = asyncio.create_task(self._load(activation), name="critic-sync")

    async def _load(self, activation: Activation) -> None:
        path, name, version = activation.path, activation.name, activation.version
        async with self._lock:
            try:
                critic = await self.activator.activate(path)
            except Exception as e:  # a bad bundle here must not stop the replica: it keeps its critic
                activation.error = f"{type(e).__name__}: {e}"
                log.error("critic activated on another replica (%s %s/%s) cannot be loaded here, keeping %s/%s: %s",
                          path, name, version, self.activator.slot.current.name,
                          self.activator.slot.current.version, activation.error)
                return
            if (critic.name, critic.version) != (name, version):
                activation.error = (f"the bundle at {path} here is {critic.name}/{critic.version}, "
                                    f"not {name}/{version}")
                log.error("critic activation: %s", activation.error)
                return
            activation.applied = True
