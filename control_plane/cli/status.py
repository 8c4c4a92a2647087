"""`control-plane status`: the fleet at a glance, from `GET /v1/fleet`.

Same contract as `instances` (see `client.py`): `--json` prints the API's JSON and nothing else
on stdout; an error is one line on stderr with exit code 2.
"""

from __future__ import annotations

from control_plane.cli._api import Api, run_session
from control_plane.cli._render import out, print_fleet, print_json
from control_plane.cli.client import DEFAULT_DATA_DIR, DEFAULT_URL, ApiKey, DataDir, JsonOut, Url


def status(
    json_out: JsonOut = False,
    url: Url = DEFAULT_URL, api_key: ApiKey = None, data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """The fleet: instances by status and by provider, what it costs, configured providers."""
    async def run(api: Api) -> int:
        fleet = await api.call("GET", "/v1/fleet")
        if json_out:
            print_json(fleet)
        else:
            print_fleet(out(), fleet)
        return 0

    run_session(url, api_key, data_dir, run)
