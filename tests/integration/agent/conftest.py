"""Fixtures of the agent's process tests (see ``agent_harness``)."""

from agent_harness import control_plane, run_agent

__all__ = ["control_plane", "run_agent"]
