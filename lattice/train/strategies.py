"""Lightning strategies lattice ships: FSDP2 over every rank (data parallel, no tensor parallelism)."""
from __future__ import annotations

from typing import Optional

from lightning.pytorch.strategies import ModelParallelStrategy

__all__ = ["FSDP2Strategy"]


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (``fully_shard``) over all ranks: Lightning's ``ModelParallelStrategy`` with the data-parallel
    size set to the world size and no tensor parallelism, which is how lattice models train sharded.

    :meth:`lattice.train.LatticeModule.configure_model` shards the dense layers over the data-parallel
    mesh; fused embedding tables stay replicated and are kept identical by the row exchange. Runs on
    CPU (gloo) and GPU (NCCL), unlike Lightning's FSDP1 ``fsdp`` strategy, which refuses a CPU.

    Args:
        save_distributed_checkpoint: ``False`` (default) assembles the full state on rank 0 and writes one
            file through the trainer's ``CheckpointIO`` (atomic with :class:`~lattice.train.AtomicCheckpointIO`);
            ``True`` writes one shard per rank into a checkpoint folder (scales to states that do not fit
            one host, but a crash while saving can leave that folder partially written).
        process_group_backend: ``"gloo"``, ``"nccl"``..., default from the accelerator.
    """

    def __init__(self, save_distributed_checkpoint: bool = False, process_group_backend: Optional[str] = None) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
        )

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
