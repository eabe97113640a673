"""Which critic the service starts with, and swapping it for another bundle while serving."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from pathlib import Path

from service.critic import threads
from service.critic.base import ConstantCritic, Critic, CriticSlot
from service.critic.bundle import is_bundle
from service.critic.onnx_critic import OnnxCritic
from service.settings import Settings
from service.telemetry import critic_info

log = logging.getLogger(__name__)


def shipped_bundle() -> Path | None:
    """``critic_models/default/``, found without importing critic_models (training code lives there)."""
    spec = importlib.util.find_spec("critic_models")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "default"
    return path if is_bundle(path) else None


def open_bundle(path: str | Path, settings: Settings) -> OnnxCritic:
    """Blocking: validate, open and warm the bundle in ``path`` with the configured providers, on
    this process's share of the cores."""
    share = threads.plan(threads.cores(), threads.serve_workers(), settings.critic_threads,
                         settings.critic_tokenizer_threads)
    return OnnxCritic.load(path, settings.critic_providers, threads=share, max_batch=settings.critic_max_batch,
                           max_tokens=settings.critic_max_batch_tokens,
                           max_wait_s=settings.critic_batch_wait_ms / 1000)


def load_critic(settings: Settings) -> Critic:
    """The configured bundle, else the shipped default, else the constant critic (saying so).

    A configured bundle that fails validation stops start-up: serving without the critic the
    operator asked for would look healthy while gating nothing.
    """
    if settings.critic:
        return open_bundle(settings.critic, settings)
    shipped = shipped_bundle()
    if shipped is not None:
        return open_bundle(shipped, settings)
    log.warning("no critic bundle configured (TURNGATE_CRITIC) and none shipped in critic_models/default: "
                "using the constant critic, so candidates are chosen on structural checks alone")
    return ConstantCritic()


def close_critic(critic: Critic) -> None:
    close = getattr(critic, "close", None)
    if callable(close):
        close()


class CriticActivator:
    """Hot swap: the new bundle is loaded and warmed beside the serving one (off the event loop),
    then put in the slot. Turns already holding the old critic finish on it; it is closed once
    ``grace_s`` has passed, which defaults to the longest route deadline, the longest a turn lives.

    Closes only critics it opened itself: one handed to ``create_app`` belongs to the caller.
    """

    def __init__(self, slot: CriticSlot, settings: Settings, *, owns_current: bool,
                 labels: critic_info.Labels | None = None) -> None:
        self.slot, self.settings = slot, settings
        # The bundle folder the current critic came from (None: handed in by the caller).
        self.path: str | None = None
        if owns_current:
            shipped = shipped_bundle()
            self.path = settings.critic or (str(shipped) if shipped is not None else None)
        self.labels = labels
        self._owned: set[int] = {id(slot.current)} if owns_current else set()
        self._retiring: dict[asyncio.Task, Critic] = {}
        self._lock = asyncio.Lock()

    @property
    def grace_s(self) -> float:
        """How long a swapped-out critic stays open: the longest deadline of the routes served now."""
        if self.settings.critic_swap_grace_s is not None:
            return self.settings.critic_swap_grace_s
        return max((r.deadline_s for r in self.settings.route_table.routes), default=0.0) + 5

    async def activate(self, path: str | Path) -> Critic:
        async with self._lock:  # one load at a time: two would each hold a session in memory
            new = await asyncio.to_thread(open_bundle, path, self.settings)
            old = self.slot.swap(new)
            self.path = str(path)
            self._owned.add(id(new))
            self.labels = critic_info.publish(new, self.labels)
            log.info("critic swapped: %s/%s -> %s/%s on %s; the old one closes in %.0f s", old.name,
                     old.version, new.name, new.version, new.provider, self.grace_s)
            if id(old) in self._owned:
                self._owned.discard(id(old))
                task = asyncio.get_running_loop().create_task(self._retire(old))
                self._retiring[task] = old
                task.add_done_callback(self._retiring.pop)
            return new

    async def _retire(self, critic: Critic) -> None:
        await asyncio.sleep(self.grace_s)
        await asyncio.to_thread(close_critic, critic)

    async def aclose(self) -> None:
        """At shutdown: close the retiring critics now, and the current one if it is ours."""
        doomed = list(self._retiring.values())
        for task in list(self._retiring):
            task.cancel()
        if id(self.slot.current) in self._owned:
            doomed.append(self.slot.current)
        for critic in doomed:
            await asyncio.to_thread(close_critic, critic)
