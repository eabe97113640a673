"""Which critic the service starts with."""

from __future__ import annotations

from service.critic.base import ConstantCritic, Critic
from service.settings import Settings


def load_critic(settings: Settings) -> Critic:
    """The configured bundle, else the shipped default; the constant critic until one exists."""
    return ConstantCritic()
