"""All configuration in one place: environment variables (TURNGATE_*) and an optional YAML file.

The YAML file named by TURNGATE_CONFIG may hold any setting below plus a `routes:` list. Without
routes, one route is built from the TURNGATE_UPSTREAM_* variables and the policy variables
(TURNGATE_INTERVENE_THRESHOLD, ...: one per GatePolicy field; `policy:` in the YAML file).
Environment variables win over the YAML file for the top-level settings.

Strict: an unknown YAML key (at any depth) is refused, an unknown TURNGATE_* variable is warned
about, and a secret from outside that is an example value (or, for turngate's own keys, short)
is refused unless TURNGATE_DEV is set. See service/config_checks.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from service import config_checks

log = logging.getLogger("turngate.settings")

Mode = Literal["passthrough", "rank", "shadow"]
Sampling = Literal["fixed", "adaptive"]
OnExhausted = Literal["best", "block", "error"]
Record = Literal["all", "sample", "off"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["plain", "json"]

DEFAULT_BLOCK_MESSAGE = (
    "I'm not able to proceed with that safely right now. Let me hand this over to a human agent."
)


class SettingsError(Exception):
    """Configuration that cannot be served as given; the message names the setting and the fix."""


class GatePolicy(BaseModel):
    """What the gate does with the critic's scores on one route."""

    model_config = ConfigDict(extra="forbid")

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
        accept, intervene = self.accept_threshold, self.intervene_threshold
        if accept is not None and intervene is not None and accept < intervene:
            raise ValueError(f"accept_threshold ({self.accept_threshold}) must not be below "
                             f"intervene_threshold ({self.intervene_threshold})")
        return self


class LLMCriticSettings(BaseModel):
    """A language model that judges a turn's candidates (any OpenAI-compatible endpoint): called by
    the cascade when the encoder critic is unsure (service/gate/cascade.py)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["llm"] = "llm"
    base_url: str
    model: str
    api_key: SecretStr | None = None
    rubric: str = ""  # what the judge is told to check, beside the built-in instructions; "" = those alone
    rubric_version: str = Field("1", min_length=1, max_length=64)  # recorded with every judgement
    timeout_s: float = Field(10.0, gt=0, le=600)


class CascadeSettings(BaseModel):
    """When the encoder critic's ranking is left to the LLM critic, and how much of it a route may buy."""

    model_config = ConfigDict(extra="forbid")

    margin: float = Field(0.1, ge=0, le=1)  # unsure: the top two scores are closer than this
    min_agreement: float = Field(0.5, ge=0, le=1)  # unsure: fewer candidates than this share make the top pick's calls
    on_write: bool = True  # unsure: the top pick makes a write call (service.gate.actions.is_write)
    max_share: float = Field(0.2, ge=0, le=1)  # at most this share of the route's turns go to the judge
    max_tokens_per_hour: int | None = Field(None, ge=1)  # and at most this many judge tokens an hour, per process


class RouteSettings(BaseModel):
    """One model alias a client can ask for, and the upstream actor behind it."""

    model_config = ConfigDict(extra="forbid")

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
    # Ask the upstream for every candidate's token logprobs and keep them on the turn record (the
    # client gets them only when it asked for logprobs itself).
    record_logprobs: bool = False
    # What a reply's `usage` counts: "billed", every call of the turn (what the upstream bills, with
    # the chosen candidate's own under usage.chosen), or "chosen", the chosen candidate's call alone.
    usage_reported: Literal["billed", "chosen"] = "billed"
    # Which turns go to the store: every one, a deterministic share (record_sample, by turn id, so
    # every replica keeps the same turns), or none. Replies, metrics and spend are the same either way.
    record: Record = "all"
    record_sample: float = Field(0.1, gt=0, le=1)  # the share kept when record is "sample"
    policy: GatePolicy = Field(default_factory=GatePolicy)
    # An LLM critic consulted when the encoder is unsure, within the cascade's budget; None = encoder alone.
    llm_critic: LLMCriticSettings | None = None
    cascade: CascadeSettings = Field(default_factory=CascadeSettings)

    @property
    def model(self) -> str:
        return self.upstream_model or self.alias

    @property
    def n(self) -> int:
        return 1 if self.mode == "passthrough" else self.candidates


CATCH_ALL = "*"  # the alias of the route that serves every model name no other route has


class RouteTable:
    """The routes served now, by alias. Never changed in place: a change builds a new table and
    swaps the one reference (Settings.serve_routes), so a lookup sees the old routes or the new,
    never half of each; a turn keeps the RouteSettings object it started with."""

    __slots__ = ("by_alias", "routes")

    def __init__(self, routes: list[RouteSettings]) -> None:
        self.routes: tuple[RouteSettings, ...] = tuple(routes)
        self.by_alias: dict[str, RouteSettings] = {r.alias: r for r in routes}


def env_name(field: str) -> str:
    """The environment variable of a top-level setting or of a default-route policy field."""
    return f"TURNGATE_{field.upper()}"


# Read by turngate but not settings: the config file's path, and the CLI's traceback switch.
OTHER_VARIABLES = {"TURNGATE_CONFIG", "TURNGATE_DEBUG", "TURNGATE_WORKERS"}  # WORKERS: set by serve


def known_variables() -> set[str]:
    """Every TURNGATE_* variable turngate reads."""
    return {env_name(f) for f in [*Settings.model_fields, *GatePolicy.model_fields]} | OTHER_VARIABLES


def read_config_file(path: str) -> dict[str, Any]:
    """The YAML file named by TURNGATE_CONFIG; every problem with it is one SettingsError line."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise SettingsError(f"TURNGATE_CONFIG={path}: no such file; fix the path or unset TURNGATE_CONFIG") from None
    except OSError as e:
        raise SettingsError(f"TURNGATE_CONFIG={path}: cannot read it ({e.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SettingsError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of settings at the top level, got a {type(data).__name__}")
    problems = config_checks.unknown_keys(data, Settings)
    if problems:
        raise SettingsError(f"{path}: " + "; ".join(problems))
    return data


def _policy_from_env() -> dict[str, str]:
    """TURNGATE_<FIELD> for each GatePolicy field: the default route's policy (case-insensitive,
    as pydantic-settings reads the others)."""
    environ = {k.upper(): v for k, v in os.environ.items()}
    return {f: environ[env_name(f)] for f in GatePolicy.model_fields if env_name(f) in environ}


def _merged(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    out = dict(low)
    for key, value in high.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _flag(value: Any) -> bool:
    try:
        return TypeAdapter(bool).validate_python(value)
    except ValidationError:
        return False


def _refuse_weak_secrets(from_env: dict[str, Any], from_file: dict[str, Any], path: str | None) -> None:
    """Secrets left at an example value (or, for turngate's own keys, guessable) stop the start,
    unless TURNGATE_DEV says this is a development machine."""
    found = config_checks.secrets_in(
        from_env, lambda key, note: (env_name(key) if key.isidentifier() else f"{key} in TURNGATE_ROUTES") + note)
    if from_file:
        found += config_checks.secrets_in(from_file, lambda key, note: f"{key}{note} in {path}")
    weak = [f"{where} {why}" for where, value, ours in found if (why := config_checks.weak_secret(value, ours=ours))]
    if not weak:
        return
    if _flag(from_env.get("dev", from_file.get("dev"))):
        log.warning("TURNGATE_DEV is set, so weak secrets are accepted: %s", "; ".join(weak))
        return
    raise SettingsError("; ".join(weak) + f": replace {'it' if len(weak) == 1 else 'them'} with real secrets "
                        f"(turngate's own keys: at least {config_checks.MIN_SECRET_CHARS} random characters, "
                        "e.g. `openssl rand -hex 24`), or set TURNGATE_DEV=1 on a development machine")


def _refuse_ignored_defaults(values: dict[str, Any], path: str | None) -> None:
    """With routes declared, the default route's settings (TURNGATE_CANDIDATES, the policy
    variables, ...) would be ignored; an operator who set them expects otherwise."""
    if not values.get("routes"):
        return
    names = []
    for field in RouteSettings.model_fields:
        if field in values and field in Settings.model_fields:
            nested = values[field] if field == "policy" and isinstance(values[field], dict) else {}
            names += [f"{env_name(k)} (policy.{k})" for k in nested] or [f"{env_name(field)} ({field})"]
    if names:
        raise SettingsError(f"{path or 'TURNGATE_ROUTES'} declares routes, so {', '.join(names)} would be ignored: "
                            "they only shape the default route, built when there are no routes; set them on "
                            "each route instead, or unset them")


class _OutsideSource(PydanticBaseSettingsSource):
    """The environment over the YAML file, checked here while each value still says where it came
    from: unknown keys and placeholder secrets refused, unknown variables warned about."""

    def __init__(self, settings_cls: type[BaseSettings], env: PydanticBaseSettingsSource) -> None:
        super().__init__(settings_cls)
        self.env = env

    def get_field_value(self, field, field_name):  # pragma: no cover - unused, __call__ does it all
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("TURNGATE_CONFIG") or None
        from_file = read_config_file(path) if path else {}
        from_env = dict(self.env())
        if policy := _policy_from_env():
            from_env["policy"] = _merged(from_env.get("policy") or {}, policy)
        for problem in config_checks.unknown_variables(os.environ, known_variables()):
            log.warning(problem)
        _refuse_weak_secrets(from_env, from_file, path)
        values = _merged(from_file, from_env)
        _refuse_ignored_defaults(values, path)
        return values


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TURNGATE_", extra="forbid")

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
    record: Record = "all"  # the default route's; see RouteSettings
    record_sample: float = Field(0.1, gt=0, le=1)
    policy: GatePolicy = Field(default_factory=GatePolicy)  # env: TURNGATE_<FIELD>, e.g. TURNGATE_INTERVENE_THRESHOLD

    critic: str | None = None  # bundle folder; None = the shipped default
    critic_providers: str | None = None  # e.g. "CPUExecutionProvider"; None = CUDA then CPU (int8 bundles: CPU)
    critic_max_batch: int = Field(64, ge=1, le=1024)  # sequences per merged inference run
    critic_max_batch_tokens: int | None = Field(None, ge=1)  # padded tokens per run; None = 2048 on CPU, no cap on GPU
    critic_batch_wait_ms: float = Field(2.0, ge=0, le=50)  # longest a turn waits for others to batch with
    # onnxruntime intra-op threads per run and the tokenizer pool; None = this process's share of
    # the cores (cores // `turngate serve --workers`): service/critic/threads.py
    critic_threads: int | None = Field(None, ge=1, le=256)
    critic_tokenizer_threads: int | None = Field(None, ge=1, le=64)
    critic_swap_grace_s: float | None = None  # old critic closes after this; None = longest route deadline + 5

    admin_key: SecretStr | None = None
    dev: bool = False  # a development machine: weak and placeholder secrets accepted, with a warning
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)  # empty: any client key is accepted
    rate_limit_per_minute: int | None = None  # per client key; shared through Redis when set
    redis_max_connections: int = Field(64, ge=1)  # per process; a burst beyond it waits for one
    key_hash_secret: SecretStr | None = None  # keys issued through the admin API are stored as HMACs under it
    control_poll_s: float = Field(1.0, gt=0, le=60)  # how often a replica checks for control-plane changes
    max_request_bytes: int = 4 * 1024 * 1024
    # An upstream reply over this is a 502 (a stream is cut with that error): every candidate is held in memory whole.
    upstream_max_reply_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    keepalive_interval_s: float = 5.0
    # No longer used: one pool per upstream origin (service.upstream.transport) has no per-connection
    # scan to shard. Still accepted, so that configurations that set it keep starting.
    upstream_pool_shards: int = Field(16, ge=1, le=256)
    shadow_max_backlog: int = Field(8, ge=0)  # shadow turns ranked in the background at once, per process
    log_level: LogLevel = "info"  # `turngate serve`'s logs, uvicorn's included
    log_format: LogFormat = "plain"  # plain lines, or one JSON object per line

    routes: list[RouteSettings] = Field(default_factory=list)  # at start: the seed; then what is served
    _table: RouteTable | None = PrivateAttr(None)
    _seed: tuple[RouteSettings, ...] | None = PrivateAttr(None)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings, _OutsideSource(settings_cls, env_settings))

    @field_validator("database_url")
    @classmethod
    def _supported_database(cls, v: str) -> str:
        from service.store.urls import is_sqlite

        is_sqlite(v)  # raises, naming the schemes turngate takes
        return v

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, v: Any) -> Any:
        if isinstance(v, str):
            return [k.strip() for k in v.split(",") if k.strip()]
        return v

    @model_validator(mode="after")
    def _default_route(self) -> Settings:
        if not self.routes:
            # The settings a route has too (upstream_*, candidates, mode, timeouts, policy) make it.
            shared = [f for f in RouteSettings.model_fields if f in type(self).model_fields]
            self.routes = [RouteSettings(alias=self.upstream_model, **{f: getattr(self, f) for f in shared})]
        aliases = [r.alias for r in self.routes]
        if len(set(aliases)) != len(aliases):
            raise ValueError(f"route aliases must be unique, got {aliases}")
        return self

    @property
    def route_table(self) -> RouteTable:
        # Read from pydantic's private store directly: `self._table` reaches it only through
        # BaseModel.__getattr__, after a failed lookup (several a request on the chat path).
        private = self.__pydantic_private__
        table = private["_table"] if private is not None else None
        if table is None:
            table = self._table = RouteTable(self.routes)
        return table

    @property
    def seed_routes(self) -> tuple[RouteSettings, ...]:
        """The routes of the YAML file / environment, before any change made through the admin API."""
        if self._seed is None:
            self._seed = tuple(self.routes)
        return self._seed

    def serve_routes(self, routes: list[RouteSettings]) -> None:
        """Serve `routes` from now on (the control plane's route reloader calls it)."""
        self.seed_routes  # noqa: B018 - captured before the first change
        table = RouteTable(routes)
        self._table = table  # the one reference lookups read: the swap is atomic
        self.routes = list(table.routes)  # for readers that list them (readyz, the config summary)

    @property
    def routes_by_alias(self) -> dict[str, RouteSettings]:
        return self.route_table.by_alias

    def route_for(self, model: str) -> RouteSettings | None:
        """The route for a requested model name; a route aliased '*' catches every other name.

        The catch-all sends the upstream the name the client asked for, unless it names an
        upstream_model itself; its alias (the metric label) stays '*' whatever the name.
        """
        by_alias = self.route_table.by_alias  # one table for the whole lookup
        route = by_alias.get(model)
        if route is not None:
            return route
        catch_all = by_alias.get(CATCH_ALL)
        if catch_all is None or catch_all.upstream_model:
            return catch_all
        return catch_all.model_copy(update={"upstream_model": model})

    @property
    def listed_models(self) -> list[str]:
        """The model names /v1/models lists: every alias but the catch-all's."""
        return [r.alias for r in self.route_table.routes if r.alias != CATCH_ALL]


_SECRET_FIELDS = {"admin_key", "api_keys", "key_hash_secret", "upstream_api_key", "api_key", "database_url",
                  "redis_url"}


def describe_invalid(error: ValidationError) -> str:
    """A ValidationError of Settings as one line: each bad value by its variable (or key path),
    the input shown unless it may be a secret."""
    parts = []
    for err in error.errors(include_url=False):
        loc, msg = err["loc"], err["msg"].removeprefix("Value error, ")
        if not loc:
            parts.append(msg)
            continue
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        if loc[0] == "policy" and len(loc) == 2:
            path = f"{env_name(str(loc[1]))} ({path})"
        elif len(loc) == 1:
            path = f"{env_name(str(loc[0]))} ({path})"
        elif loc[0] == "routes" and os.environ.get("TURNGATE_CONFIG"):
            path = f"{path} in {os.environ['TURNGATE_CONFIG']}"
        value = err.get("input")
        shown = not (_SECRET_FIELDS & {p for p in loc if isinstance(p, str)}) and not isinstance(value, dict | list)
        parts.append(f"{path}: {msg}" + (f", got {str(value)[:60]!r}" if shown else ""))
    return "invalid settings: " + "; ".join(parts)
