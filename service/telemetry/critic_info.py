"""turngate_critic_info: which critic is active, on which execution provider.

A gauge set to 1 for the active {name, version, provider} rather than an Info metric, because
Info is not supported in prometheus-client's multiprocess mode. After a hot swap the previous
label set is set to 0 (a multiprocess value cannot be removed), so dashboards and alerts select
`turngate_critic_info == 1`.
"""

from __future__ import annotations

from functools import cache

from service.critic.base import Critic
from service.telemetry import metrics

Labels = tuple[str, str, str]


def labels(critic: Critic) -> Labels:
    return (str(critic.name), str(critic.version), str(critic.provider))


def publish(critic: Critic, previous: Labels | None = None) -> Labels:
    """Mark `critic` active (and `previous`, if it differs, inactive); returns what to pass next time."""
    current = labels(critic)
    if previous is not None and previous != current:
        metrics.CRITIC_INFO.labels(*previous).set(0)
    metrics.CRITIC_INFO.labels(*current).set(1)
    metrics.CRITIC_CUDA_AVAILABLE.set(1 if cuda_available() else 0)
    return current


@cache
def cuda_available() -> bool:
    """Whether this process's onnxruntime build has the CUDA provider (the GPU image does)."""
    try:
        import onnxruntime
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        return False
    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
