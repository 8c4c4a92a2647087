"""The EC2 GPU instance types this provider offers, with their list prices.

Only types in `CATALOG` are offered (`AwsProvider.list_offers`) and priced; prices for other
regions are corrected by passing `prices` to `AwsProvider`, which rejects types outside it.
"""

from __future__ import annotations

from typing import NamedTuple


class GpuType(NamedTuple):
    gpus: int
    gpu_model: str
    usd_per_hour: float


# On-demand Linux list prices in us-east-1, as of 2025-07 (after the June 2025 P4/P5 price
# cut). Other regions cost more or less: pass `prices` to correct them.
CATALOG: dict[str, GpuType] = {
    "g5.xlarge": GpuType(1, "A10G", 1.006),
    "g5.2xlarge": GpuType(1, "A10G", 1.212),
    "g5.12xlarge": GpuType(4, "A10G", 5.672),
    "g5.48xlarge": GpuType(8, "A10G", 16.288),
    "g6.xlarge": GpuType(1, "L4", 0.8048),
    "g6.12xlarge": GpuType(4, "L4", 4.6016),
    "g6e.xlarge": GpuType(1, "L40S", 1.861),
    "g6e.12xlarge": GpuType(4, "L40S", 10.493),
    "p4d.24xlarge": GpuType(8, "A100", 21.96),
    "p5.48xlarge": GpuType(8, "H100", 55.04),
}
