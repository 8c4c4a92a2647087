"""Worker agent: runs on a GPU node, supervises vLLM and reports to the control plane.

Stdlib + httpx only, and it never imports ``control_plane`` or ``adapters``: it is copied
alone onto nodes (as the wheel ``integrity.build_artifact`` makes). After changing any file
of this package, run ``control-plane agent version-bump``: CI refuses changed code under an
unchanged version, and the control plane flags agents whose version or checksum differ from
the release it serves.
"""

AGENT_VERSION = "0.2.0"
AGENT_BUILD_DATE = "2026-11-23"
