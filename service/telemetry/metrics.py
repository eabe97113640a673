"""Prometheus metrics, all named turngate_*, in base units, with bounded label sets.

Labels take values from closed sets only (route aliases come from settings, reasons and decisions
from the gate's own vocabulary), so cardinality stays bounded whatever clients send.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

_CHILDREN: dict[tuple[MetricWrapperBase, tuple[str, ...]], Any] = {}


def labelled(metric: MetricWrapperBase, *values: str) -> Any:
    """`metric.labels(*values)`, cached: prometheus_client validates the values and takes a lock on
    every call, several times a turn. Label sets are bounded (above), so is the cache; turngate
    never removes a child, so a cached one is always the registry's."""
    key = (metric, values)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*values)
    return child


_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

REQUESTS = Counter("turngate_requests_total",
                   "HTTP requests answered, refusals before the gate included: by route alias ('none' before "
                   "a route is known), endpoint (the path template, 'other' for unknown paths) and status",
                   ["route", "endpoint", "status"])
TURNS = Counter("turngate_turns_total", "Turns served, by route, mode and decision",
                ["route", "mode", "decision"])
REQUEST_DURATION = Histogram("turngate_request_duration_seconds", "Whole turn latency seen by the client",
                             ["route", "mode"], buckets=_LATENCY_BUCKETS)
OVERHEAD = Histogram("turngate_overhead_seconds", "Turn latency minus upstream and critic time",
                     ["route", "mode"], buckets=_OVERHEAD_BUCKETS)
UPSTREAM_DURATION = Histogram("turngate_upstream_duration_seconds", "One upstream sampling call",
                              ["route"], buckets=_LATENCY_BUCKETS)
UPSTREAM_ERRORS = Counter("turngate_upstream_errors_total",
                          "Failed upstream attempts by kind; 'abandoned' = cancelled by the candidate wait",
                          ["route", "kind"])
UPSTREAM_RETRIES = Counter("turngate_upstream_retries_total",
                           "Upstream calls sent again after failing before any reply byte, by reason "
                           "(connect, stale_connection)", ["route", "reason"])
TURNS_UNRECORDED = Counter("turngate_turns_unrecorded_total",
                           "Turns served but not sent to the store (the route's record setting: off, or sample)",
                           ["route"])
TURNS_PARTIAL = Counter("turngate_turns_partial_total",
                        "Turns answered although some of their candidate calls failed or were given up",
                        ["route"])
CANDIDATES = Histogram("turngate_candidates_per_turn", "Candidates sampled per turn", ["route"],
                       buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64))
CANDIDATES_SAVED = Counter("turngate_candidates_saved_total",
                           "Candidates not sampled thanks to adaptive sampling", ["route"])
TOKENS = Counter("turngate_tokens_total", "Upstream tokens over all candidates", ["route", "kind"])
VETOES = Counter("turngate_structural_vetoes_total", "Candidates vetoed by the structural critic",
                 ["route", "reason"])
SCHEMA_UNCHECKED = Counter("turngate_schema_unchecked_total",
                           "Tool calls whose arguments could not be checked against the client's schema "
                           "(not enforced: timeout, too large, too deep, a schema the checker cannot use)",
                           ["route", "reason"])
CRITIC_FAILURES = Counter("turngate_critic_failures_total",
                          "Turns whose candidates the critic failed to score: selected on the structural checks "
                          "alone (the gate fails open)", ["route"])
SCORES = Histogram("turngate_critic_score", "Critic scores of candidates", ["route"],
                   buckets=tuple(i / 20 for i in range(1, 21)))
INTERVENTIONS = Counter("turngate_interventions_total", "Intervention rounds (feedback to the actor)",
                        ["route"])
CRITIC_DURATION = Histogram("turngate_critic_inference_seconds", "One critic inference run (a batch)",
                            buckets=_OVERHEAD_BUCKETS + (2.5, 5))
CRITIC_BATCH = Histogram("turngate_critic_batch_size", "Sequences per critic inference run",
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128))
# A gauge = 1 per active {name, version, provider}, not an Info: Info does not work in multiprocess
# mode. Set it through service.telemetry.critic_info.publish.
CRITIC_INFO = Gauge("turngate_critic_info", "The active critic: name, version and execution provider (1 = active)",
                    ["name", "version", "provider"], multiprocess_mode="livemax")
CRITIC_CUDA_AVAILABLE = Gauge("turngate_critic_cuda_available",
                              "1 when onnxruntime here has the CUDA provider (a GPU build)",
                              multiprocess_mode="livemax")
LOG_QUEUE_DEPTH = Gauge("turngate_log_queue_depth", "Turn records waiting for the database writer",
                        multiprocess_mode="livesum")
SPOOL_BYTES = Gauge("turngate_spool_bytes", "Bytes in the local spool waiting for the database",
                    multiprocess_mode="livesum")
DB_WRITE_ERRORS = Counter("turngate_db_write_errors_total", "Failed database writes")
STORE_QUARANTINED = Counter("turngate_store_quarantined_total",
                            "Turn records (or spool lines) the database refused, set aside in the quarantine file")
SPOOL_SYNC_LAG = Histogram("turngate_spool_sync_lag_seconds",
                           "Age of the oldest journaled turn not yet fsynced, at each journal fsync: "
                           "what a machine crash could lose",
                           buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.75, 1, 1.5, 2, 5, 10))
REDIS_ERRORS = Counter("turngate_redis_errors_total", "Failed Redis calls", ["op"])
SHADOW_SHED = Counter("turngate_shadow_shed_total",
                      "Shadow turns not ranked because the background backlog was full (recorded unscored)",
                      ["route"])
SHADOW_BACKLOG = Gauge("turngate_shadow_backlog", "Shadow turns being sampled or scored in the background",
                       multiprocess_mode="livesum")
LLM_CRITIC_REQUESTS = Counter("turngate_llm_critic_requests_total",
                              "Requests to a route's LLM critic, by outcome (ok, timeout, error, invalid)",
                              ["route", "outcome"])
LLM_CRITIC_LATENCY = Histogram("turngate_llm_critic_latency_seconds", "One request to the LLM critic, failed ones too",
                               ["route"], buckets=_LATENCY_BUCKETS)
LLM_CRITIC_TOKENS = Counter("turngate_llm_critic_tokens_total",
                            "Tokens the LLM critic billed (prompt, completion): turngate's cost, not the client's",
                            ["route", "kind"])
CASCADE = Counter("turngate_cascade_total",
                  "Rankings on routes with an LLM critic, by what the cascade did: encoder_sure (the encoder "
                  "decided alone), judged (the LLM critic was asked), over_budget (unsure, but the budget was spent)",
                  ["route", "decision"])
