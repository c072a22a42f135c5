"""Test only: Lightning's DeepSpeed strategy on a CPU accelerator, so the real DeepSpeed path runs here.

Lightning refuses DeepSpeed without CUDA ("only supported on CUDA GPUs") and checks that every device
has an index (DeepSpeed reads it); DeepSpeed itself runs ZeRO stages 0/2/3 on CPU with gloo. This subclass drops the CUDA
check and gives the CPU device an index, and nothing else. It is not part of the package: users on GPUs use
`trainer.strategy: deepspeed_stage_2` / `deepspeed_stage_3` (or `DeepSpeedStrategy` with init_args).
"""

from __future__ import annotations

import torch
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check

    def setup_distributed(self) -> None:
        reset_seed()  # as DeepSpeedStrategy.setup_distributed, without the device-index check
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", 0)  # DeepSpeed reads the device index (None for a plain CPU device)
