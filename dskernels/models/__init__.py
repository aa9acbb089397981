"""DeepSeek-V3 model pieces assembled from dskernels ops (API.md section 5; docs/models.md)."""

from dskernels.models.config import DeepseekV3Config
from dskernels.models.layer import DeepseekV3DecoderLayer
from dskernels.models.linear import Linear, RMSNorm
from dskernels.models.moe import route

__all__ = ["DeepseekV3Config", "DeepseekV3DecoderLayer", "Linear", "RMSNorm", "route"]
