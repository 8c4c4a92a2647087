"""Worker agent: runs on a GPU node, supervises vLLM and reports to the control plane.

Stdlib + httpx only, and it never imports ``control_plane`` or ``adapters``: it is copied
alone onto nodes. Bump ``AGENT_VERSION`` whenever a file of this package changes; the
control plane compares the version and ``integrity.code_checksum()`` it receives.
"""

AGENT_VERSION = "0.1.0"
AGENT_BUILD_DATE = "2026-11-23"
