# ENGINEERS: read /work/main/AGENT_RULES.md (venv, commit rules, time limit) before editing.
"""`turngate critic ...`: train, export, evaluate and score with critic bundles.

Training and export need the `train` extra (torch); they import it inside the command, so the
rest of the CLI and the service never load torch.
"""

from __future__ import annotations

import typer

app = typer.Typer(help="Train, export, evaluate and run the learned critic.", no_args_is_help=True)
