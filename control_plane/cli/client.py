"""`control-plane instances ...`: the REST API from the shell."""

from __future__ import annotations

import typer

instances_app = typer.Typer(no_args_is_help=True, help="Create, inspect, watch and terminate instances.")
