"""Wrap alerts.yml in a PrometheusRule (Prometheus Operator) for deploy/k8s/prometheusrule.yaml.

    python deploy/prometheus/to_prometheusrule.py          # rewrite the manifest
    python deploy/prometheus/to_prometheusrule.py --check  # exit 1 if it is out of date

alerts.yml stays the one source: compose mounts it, the tests evaluate it, this wraps it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).parent
TARGET = HERE.parent / "k8s/prometheusrule.yaml"
HEADER = "# Generated from deploy/prometheus/alerts.yml by deploy/prometheus/to_prometheusrule.py; do not edit.\n"


def render() -> str:
    rules = yaml.safe_load((HERE / "alerts.yml").read_text())
    manifest = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
                "metadata": {"name": "turngate", "labels": {"app.kubernetes.io/name": "turngate"}},
                "spec": {"groups": rules["groups"]}}
    return HEADER + yaml.dump(manifest, Dumper=_BlockDumper, sort_keys=False, width=110)


class _BlockDumper(yaml.SafeDumper):
    """Multi-line expressions as `|` blocks, as in alerts.yml."""


_BlockDumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run python deploy/prometheus/to_prometheusrule.py", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
