"""Pipeline parallelism for DeepSeek-V3 (API.md section 4; anchor: deepseek-ai/DualPipe).

    from dskernels.pipeline import DualPipe, DualPipeV, WeightGradStore, schedule

`schedule`: the schedules as data (generators, validator, simulator, renderer);
`DualPipe` / `DualPipeV`: the runtimes executing them over torch.distributed; `Linear`: an
nn.Linear whose weight gradient the runtimes defer into their WeightGradStore (zero bubble).
"""

from dskernels.pipeline import schedule  # noqa: F401
from dskernels.pipeline.runtime import DualPipe, DualPipeV, run_backward, set_p2p_tensor_dtype, set_p2p_tensor_shapes
from dskernels.pipeline.weight_grad import Linear, WeightGradStore

__all__ = ["DualPipe", "DualPipeV", "Linear", "WeightGradStore", "run_backward", "schedule",
           "set_p2p_tensor_dtype", "set_p2p_tensor_shapes"]
