"""Grafana dashboards for turngate, as code (grafana-foundation-sdk), written to dashboards/*.json.

    python deploy/grafana/generate.py          # rewrite the JSON next to this file
    python deploy/grafana/generate.py --check  # exit 1 if the committed JSON is out of date

Grafana provisions the JSON (provisioning/dashboards/turngate.yml). Edit this file, never the
JSON. Every query uses $__rate_interval and the $route variable only, so a test can evaluate it
against a real Prometheus by substituting those two.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import BigValueTextMode, StackingMode
from grafana_foundation_sdk.models.dashboard import DataSourceRef, VariableOption, VariableRefresh
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

OUT = Path(__file__).parent / "dashboards"
DATASOURCE = DataSourceRef(type_val="prometheus", uid="prometheus")  # provisioning/datasources/ uses it
R = 'route=~"$route"'
RANKED = R + ', mode="rank"'
W = "$__rate_interval"


def q(expr: str, legend: str = "", heat: bool = False) -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).datasource(DATASOURCE).legend_format(legend or "__auto")
    return query.format(PromQueryFormat.HEATMAP) if heat else query


def rate(metric: str, by: str = "", match: str = R) -> str:
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({metric}{{{match}}}[{W}]))"


def quantile(p: float, metric: str, by: str = "", match: str = R) -> str:
    return f"histogram_quantile({p}, {rate(metric + '_bucket', ', '.join(filter(None, ['le', by])), match)})"


def mean(metric: str, by: str = "", match: str = R) -> str:
    return f"{rate(metric + '_sum', by, match)} / {rate(metric + '_count', by, match)}"


def series(title: str, unit: str, *targets: prometheus.Dataquery, stacked: bool = False,
           description: str = "", width: int = 12) -> timeseries.Panel:
    panel = (timeseries.Panel().title(title).unit(unit).datasource(DATASOURCE).span(width).height(8)
             .description(description))
    if stacked:
        panel = panel.stacking(_stacking()).fill_opacity(40)
    for i, t in enumerate(targets):
        panel = panel.with_target(t.ref_id(chr(ord("A") + i)))
    return panel


def _stacking():
    from grafana_foundation_sdk.builders.common import StackingConfig
    return StackingConfig().mode(StackingMode.NORMAL)


def single(title: str, unit: str, target: prometheus.Dataquery, description: str = "",
           width: int = 6) -> stat.Panel:
    return (stat.Panel().title(title).unit(unit).datasource(DATASOURCE).span(width).height(4)
            .description(description).with_target(target.ref_id("A")))


def route_variable() -> dash.QueryVariable:
    return (dash.QueryVariable("route").label("Route").datasource(DATASOURCE)
            .query("label_values(turngate_turns_total, route)").multi(True).include_all(True)
            .all_value(".*").current(VariableOption(selected=True, text="All", value="$__all"))
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED))


def board(uid: str, title: str, description: str) -> dash.Dashboard:
    return (dash.Dashboard(title).uid(uid).description(description).tags(["turngate"])
            .refresh("30s").time("now-3h", "now").timezone("browser").with_variable(route_variable()))


def overview() -> dash.Dashboard:
    return (
        board("turngate-overview", "turngate / overview",
              "Traffic, decisions, where a turn's time goes, and what the candidates cost.")
        .with_row(dash.Row("Traffic"))
        .with_panel(series("Turns per second by route", "reqps",
                           q(rate("turngate_turns_total", "route"), "{{route}}")))
        .with_panel(series("Decisions", "reqps", q(rate("turngate_turns_total", "decision"), "{{decision}}"),
                           stacked=True, description="See service/gate/pipeline.py for what each means."))
        .with_panel(single("Turns/s", "reqps", q(rate("turngate_turns_total"))))
        .with_panel(single("Turns failed upstream", "percentunit",
                           q(f'(sum (rate(turngate_turns_total{{{R}, decision="error"}}[{W}])) or vector(0))'
                             f' / {rate("turngate_turns_total")}')))
        .with_panel(single("Turns per mode", "reqps", q(rate("turngate_turns_total", "mode"), "{{mode}}"),
                           width=12))
        .with_row(dash.Row("Latency"))
        .with_panel(series("Turn latency seen by the client", "s",
                           q(quantile(0.5, "turngate_request_duration_seconds", "route"), "p50 {{route}}"),
                           q(quantile(0.99, "turngate_request_duration_seconds", "route"), "p99 {{route}}")))
        .with_panel(series(
            "Where a turn's time goes (means)", "s",
            q(mean("turngate_request_duration_seconds"), "whole turn"),
            q(mean("turngate_upstream_duration_seconds"), "actor: one upstream call"),
            q(mean("turngate_critic_inference_seconds", match=""), "critic: one inference run"),
            q(mean("turngate_overhead_seconds"), "turngate overhead"),
            description="Overhead is the turn minus the time spent waiting on the actor and the critic. "
                        "Upstream calls of one turn overlap, so they do not add up to the turn."))
        .with_panel(series("turngate overhead", "s",
                           q(quantile(0.5, "turngate_overhead_seconds", "route"), "p50 {{route}}"),
                           q(quantile(0.99, "turngate_overhead_seconds", "route"), "p99 {{route}}")))
        .with_panel(series("Upstream call latency", "s",
                           q(quantile(0.5, "turngate_upstream_duration_seconds", "route"), "p50 {{route}}"),
                           q(quantile(0.99, "turngate_upstream_duration_seconds", "route"), "p99 {{route}}")))
        .with_row(dash.Row("Cost"))
        .with_panel(series("Candidates per turn (mean)", "short",
                           q(mean("turngate_candidates_per_turn", "route"), "{{route}}")))
        .with_panel(series("Candidates saved by adaptive sampling", "short",
                           q(rate("turngate_candidates_saved_total", "route"), "{{route}}")))
        .with_panel(series("Upstream tokens per second", "short",
                           q(rate("turngate_tokens_total", "kind"), "{{kind}}"), stacked=True))
        .with_panel(series("Upstream tokens per turn", "short",
                           q(f'{rate("turngate_tokens_total", "route")} / {rate("turngate_turns_total", "route")}',
                             "{{route}}")))
        .with_row(dash.Row("Errors"))
        .with_panel(series("Upstream errors by kind", "reqps",
                           q(rate("turngate_upstream_errors_total", "route, kind"), "{{route}} {{kind}}"),
                           stacked=True))
        .with_panel(series("HTTP answers by status", "reqps",
                           q(rate("turngate_requests_total", "status"), "{{status}}"), stacked=True,
                           description="Every endpoint, refusals before the gate included (400, 401, 413, 429); "
                                       "route 'none' for those refused before a route was known."))
        .with_panel(series("Upstream calls retried", "reqps",
                           q(rate("turngate_upstream_retries_total", "reason"), "{{reason}}"),
                           description="Sent again after failing before any reply byte: a refused connect, or a "
                                       "kept-alive connection the upstream had closed."))
        .with_panel(series("Turns answered with failed candidate calls", "reqps",
                           q(rate("turngate_turns_partial_total", "route"), "{{route}}"),
                           description="Some of the turn's candidate calls failed or were given up; the turn "
                                       "was answered from the others."))
        .with_row(dash.Row("Shadow mode"))
        .with_panel(series("Shadow turns in the background", "short",
                           q("sum (turngate_shadow_backlog)", "being sampled or scored")))
        .with_panel(series("Shadow turns shed", "reqps", q(rate("turngate_shadow_shed_total", "route"), "{{route}}"),
                           description="Not ranked because the backlog was full (TURNGATE_SHADOW_MAX_BACKLOG); "
                                       "recorded unscored."))
    )


def critic() -> dash.Dashboard:
    return (
        board("turngate-critic", "turngate / critic",
              "What the critic thinks of the candidates, what it vetoes, and how it runs.")
        .with_row(dash.Row("Active critic"))
        .with_panel(single("Critic (name, version, provider)", "none",
                           q("max by (name, version, provider) (turngate_critic_info) == 1",
                             "{{name}} {{version}} on {{provider}}"), width=12,
                           description="1 per active critic. Several series: replicas run different critics.")
                    .text_mode(BigValueTextMode.NAME))
        .with_panel(single("Replicas with a CUDA build", "short", q("sum(turngate_critic_cuda_available)")))
        .with_panel(single("Critic runs on CPU", "short",
                           q('count(max by (instance) (turngate_critic_info{provider=~"CPU.*"}) == 1) or vector(0)'),
                           description="Replicas whose active critic runs on the CPU execution provider."))
        .with_row(dash.Row("Scores and vetoes"))
        .with_panel(heatmap.Panel().title("Critic score distribution").datasource(DATASOURCE).span(12).height(8)
                    .with_target(q(f'sum by (le) (increase(turngate_critic_score_bucket{{{R}}}[{W}]))',
                                   "{{le}}", heat=True).ref_id("A")))
        .with_panel(series("Critic score quantiles", "percentunit",
                           q(quantile(0.1, "turngate_critic_score"), "p10"),
                           q(quantile(0.5, "turngate_critic_score"), "p50"),
                           q(quantile(0.9, "turngate_critic_score"), "p90")))
        .with_panel(series("Structural vetoes by reason", "reqps",
                           q(rate("turngate_structural_vetoes_total", "reason"), "{{reason}}"), stacked=True))
        .with_panel(series("Share of candidates vetoed", "percentunit",
                           q(f'({rate("turngate_structural_vetoes_total", "route")} or '
                             f'0 * {rate("turngate_candidates_per_turn_sum", "route")}) / '
                             f'{rate("turngate_candidates_per_turn_sum", "route")}', "{{route}}")))
        .with_panel(series("Tool calls not checked against their schema", "reqps",
                           q(rate("turngate_schema_unchecked_total", "reason"), "{{reason}}"),
                           description="Not enforced: the check timed out, the arguments nest too deep, or the "
                                       "client's schema is one the checker cannot use."))
        .with_panel(series("Rankings by cascade step", "reqps",
                           q(rate("turngate_cascade_total", "decision"), "{{decision}}"), stacked=True,
                           description="Routes with an LLM critic: encoder_sure (the encoder decided alone), "
                                       "judged (the LLM critic was asked), over_budget (unsure, budget spent)."))
        .with_row(dash.Row("Interventions"))
        .with_panel(series("Interventions per ranked turn", "percentunit",
                           q(f'{rate("turngate_interventions_total", "route")} / '
                             f'{rate("turngate_turns_total", "route", RANKED)}', "{{route}}"),
                           description="Rounds of feedback to the actor per turn in rank mode."))
        .with_panel(series("Outcomes of ranked turns", "reqps",
                           q(rate("turngate_turns_total", "decision", RANKED), "{{decision}}"),
                           stacked=True))
        .with_row(dash.Row("Inference"))
        .with_panel(series("Critic inference latency (one batch)", "s",
                           q(quantile(0.5, "turngate_critic_inference_seconds", match=""), "p50"),
                           q(quantile(0.99, "turngate_critic_inference_seconds", match=""), "p99")))
        .with_panel(series("Critic batch size", "short",
                           q(mean("turngate_critic_batch_size", match=""), "mean"),
                           q(quantile(0.99, "turngate_critic_batch_size", match=""), "p99")))
        .with_panel(series("Turns the critic failed to score", "reqps",
                           q(rate("turngate_critic_failures_total", "route"), "{{route}}"), width=24,
                           description="Selected on the structural checks alone: thresholds and on_exhausted "
                                       "do not apply to them (the gate fails open)."))
        .with_row(dash.Row("LLM critic"))
        .with_panel(series("LLM critic requests by outcome", "reqps",
                           q(rate("turngate_llm_critic_requests_total", "outcome"), "{{outcome}}"), stacked=True))
        .with_panel(series("LLM critic latency", "s",
                           q(quantile(0.5, "turngate_llm_critic_latency_seconds", "route"), "p50 {{route}}"),
                           q(quantile(0.99, "turngate_llm_critic_latency_seconds", "route"), "p99 {{route}}")))
        .with_panel(series("LLM critic tokens per second", "short",
                           q(rate("turngate_llm_critic_tokens_total", "kind"), "{{kind}}"), stacked=True, width=24,
                           description="turngate's own cost of judging: not in any client's usage or spend."))
    )


def store() -> dash.Dashboard:
    return (
        board("turngate-store", "turngate / store",
              "The turn log on its way to Postgres: the in-memory queue, the local spool, failures.")
        .with_row(dash.Row("Turn log"))
        .with_panel(series("Log queue depth", "short",
                           q("sum by (instance) (turngate_log_queue_depth)", "{{instance}}")))
        .with_panel(series("Spool size", "bytes", q("sum by (instance) (turngate_spool_bytes)", "{{instance}}"),
                           description="Grows while Postgres is unreachable; drains when it is back."))
        .with_panel(series("Database write errors", "reqps",
                           q("sum (rate(turngate_db_write_errors_total[$__rate_interval]))", "errors")))
        .with_panel(series("Turns handed to the log", "reqps", q(rate("turngate_turns_total"), "turns")))
        .with_panel(series("Turns not recorded", "reqps", q(rate("turngate_turns_unrecorded_total", "route"),
                                                            "{{route}}"),
                           description="Served, not sent to the store: the route's record setting (off, sample)."))
        .with_panel(series("Records quarantined", "reqps",
                           q("sum (rate(turngate_store_quarantined_total[$__rate_interval]))", "quarantined"),
                           description="Records or spool lines the database refused, set aside in the "
                                       "spool's quarantine.jsonl (docs/store.md)."))
        .with_panel(series("Journal fsync lag", "s",
                           q(quantile(0.99, "turngate_spool_sync_lag_seconds", match=""), "p99"),
                           q("max (rate(turngate_spool_sync_lag_seconds_sum[$__rate_interval]) / "
                             "rate(turngate_spool_sync_lag_seconds_count[$__rate_interval]))", "mean, worst replica"),
                           description="Age of the oldest journaled turn not yet fsynced: what a machine crash "
                                       "could lose."))
        .with_row(dash.Row("Redis"))
        .with_panel(series("Redis errors by operation", "reqps",
                           q("sum by (op) (rate(turngate_redis_errors_total[$__rate_interval]))", "{{op}}"),
                           width=24, description="Limits fail open: errors here mean limits are not enforced."))
    )


DASHBOARDS = {"overview": overview, "critic": critic, "store": store}


def render() -> dict[str, str]:
    """File name -> JSON text, exactly as committed."""
    return {f"{name}.json": json.dumps(make().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"
            for name, make in DASHBOARDS.items()}


def main(argv: list[str]) -> int:
    files = render()
    if "--check" in argv:
        stale = [n for n, text in files.items() if not (OUT / n).exists() or (OUT / n).read_text() != text]
        if stale:
            print(f"out of date: {', '.join(stale)}; run python deploy/grafana/generate.py", file=sys.stderr)
            return 1
        return 0
    OUT.mkdir(exist_ok=True)
    for name, text in files.items():
        (OUT / name).write_text(text)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
