"""What a client key issued through the admin API may do: the contract between key lookup
(service.control.keys) and enforcement (routes, limits, budgets)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

BudgetPeriod = Literal["day", "month"]


@dataclass(frozen=True)
class KeyPolicy:
    id: str  # the api_keys row id; also the key_id its turns and feedback are recorded under
    name: str
    routes: tuple[str, ...] | None = None  # allowed aliases; None = every route
    rpm: int | None = None  # requests per minute, across replicas
    tpm: int | None = None  # tokens per minute (every candidate and round), across replicas
    budget_tokens: int | None = None  # tokens per budget_period
    budget_period: BudgetPeriod | None = None
    expires_at: datetime | None = None
