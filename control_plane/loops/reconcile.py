"""Reconciliation with the providers (being written)."""

from __future__ import annotations


async def reconcile(sessions, providers, settings) -> object:
    return None
