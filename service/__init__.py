"""turngate: an OpenAI-compatible proxy that gates every agent turn with a trained critic."""

from importlib.metadata import PackageNotFoundError, version


def installed_version() -> str:
    """The installed distribution's version (pyproject.toml's), or a marker when running from a
    checkout that was never installed."""
    try:
        return version("turngate")
    except PackageNotFoundError:
        return "0+unknown"
