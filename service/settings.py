"""All configuration in one place: environment variables (TURNGATE_*) and an optional YAML file.

The YAML file named by TURNGATE_CONFIG may hold any setting below plus a `routes:` list. Without
routes, one route is built from the TURNGATE_UPSTREAM_* variables. Environment variables win over
the YAML file for the top-level settings.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

Mode = Literal["passthrough", "rank", "shadow"]
Sampling = Literal["fixed", "adaptive"]
OnExhausted = Literal["best", "block", "error"]

DEFAULT_BLOCK_MESSAGE = (
    "I'm not able to proceed with that safely right now. Let me hand this over to a human agent."
)


class GatePolicy(BaseModel):
    """What the gate does with the critic's scores on one route."""

    accept_threshold: float | None = Field(None, ge=0, le=1)
    intervene_threshold: float | None = Field(None, ge=0, le=1)
    max_interventions: int = Field(0, ge=0, le=10)
    on_exhausted: OnExhausted = "best"
    block_message: str = DEFAULT_BLOCK_MESSAGE
    feedback_role: Literal["system", "user", "developer"] = "system"
    guidance: str = ""
    sampling: Sampling = "fixed"
    initial_candidates: int = Field(1, ge=1, le=64)

    @model_validator(mode="after")
    def _thresholds_agree(self) -> GatePolicy:
        # Below intervene, above accept: adaptive sampling would stop at a candidate the gate then rejects.
        if None not in (self.accept_threshold, self.intervene_threshold) and \
                self.accept_threshold < self.intervene_threshold:
            raise ValueError(f"accept_threshold ({self.accept_threshold}) must not be below "
                             f"intervene_threshold ({self.intervene_threshold})")
        return self


class RouteSettings(BaseModel):
    """One model alias a client can ask for, and the upstream actor behind it."""

    alias: str
    upstream_base_url: str = "https://api.openai.com/v1"
    upstream_api_key: SecretStr | None = None  # None: forward the client's own bearer token
    upstream_model: str | None = None  # None: same as alias
    candidates: int = Field(4, ge=1, le=64)
    mode: Mode = "rank"
    upstream_supports_n: bool = False
    attempt_timeout_s: float = Field(60.0, gt=0)
    deadline_s: float = Field(120.0, gt=0)
    # Once the first candidate is in, wait at most max(candidate_wait_s, candidate_wait_ratio x its
    # latency) for the others, then go on with what came back (docs/proxy.md, "Candidate wait").
    candidate_wait_s: float = Field(2.0, ge=0)
    candidate_wait_ratio: float = Field(1.0, ge=0)
    policy: GatePolicy = Field(default_factory=GatePolicy)

    @property
    def model(self) -> str:
        return self.upstream_model or self.alias

    @property
    def n(self) -> int:
        return 1 if self.mode == "passthrough" else self.candidates


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the YAML file named by TURNGATE_CONFIG (lowest priority after init kwargs and env)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused, __call__ does it all
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("TURNGATE_CONFIG")
        if not path:
            return {}
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping at the top level")
        return data


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TURNGATE_", extra="ignore")

    database_url: str = "sqlite:///./turngate.db"
    redis_url: str | None = None
    spool_dir: str = "./spool"

    upstream_base_url: str = "https://api.openai.com/v1"
    upstream_api_key: SecretStr | None = None
    upstream_model: str = "gpt-4o-mini"
    upstream_supports_n: bool = False
    candidates: int = Field(4, ge=1, le=64)
    mode: Mode = "rank"
    attempt_timeout_s: float = 60.0
    deadline_s: float = 120.0

    critic: str | None = None  # bundle folder; None = the shipped default
    critic_providers: str | None = None  # e.g. "CPUExecutionProvider"; None = CUDA then CPU
    critic_max_batch: int = Field(64, ge=1, le=1024)  # sequences per merged inference run
    critic_max_batch_tokens: int | None = Field(None, ge=1)  # padded tokens per run; None = 2048 on CPU, no cap on GPU
    critic_batch_wait_ms: float = Field(2.0, ge=0, le=50)  # longest a turn waits for others to batch with
    critic_swap_grace_s: float | None = None  # old critic closes after this; None = longest route deadline + 5

    admin_key: SecretStr | None = None
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)  # empty: any client key is accepted
    rate_limit_per_minute: int | None = None  # per client key; shared through Redis when set
    redis_max_connections: int = Field(64, ge=1)  # per process; a burst beyond it waits for one
    max_request_bytes: int = 4 * 1024 * 1024
    keepalive_interval_s: float = 5.0
    upstream_pool_shards: int = Field(16, ge=1, le=256)  # see service.upstream.client.make_http_clients
    shadow_max_backlog: int = Field(8, ge=0)  # shadow turns ranked in the background at once, per process

    routes: list[RouteSettings] = Field(default_factory=list)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings, env_settings, _YamlSource(settings_cls))

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @model_validator(mode="after")
    def _default_route(self) -> "Settings":
        if not self.routes:
            self.routes = [RouteSettings(
                alias=self.upstream_model,
                upstream_base_url=self.upstream_base_url,
                upstream_api_key=self.upstream_api_key,
                upstream_model=self.upstream_model,
                candidates=self.candidates,
                mode=self.mode,
                upstream_supports_n=self.upstream_supports_n,
                attempt_timeout_s=self.attempt_timeout_s,
                deadline_s=self.deadline_s,
            )]
        aliases = [r.alias for r in self.routes]
        if len(set(aliases)) != len(aliases):
            raise ValueError(f"route aliases must be unique, got {aliases}")
        return self

    @cached_property
    def routes_by_alias(self) -> dict[str, RouteSettings]:
        return {r.alias: r for r in self.routes}

    def route_for(self, model: str) -> RouteSettings | None:
        """The route for a requested model name; a route aliased '*' catches every other name."""
        return self.routes_by_alias.get(model) or self.routes_by_alias.get("*")
