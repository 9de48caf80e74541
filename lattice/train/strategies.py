"""Lightning strategies lattice ships: FSDP2 over every rank (data parallel, no tensor parallelism), composing with
sharded embedding tables (``model.sharding``)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lattice.train.sharding import ShardedTablesCheckpoints

__all__ = ["FSDP2Strategy"]


class FSDP2Strategy(ShardedTablesCheckpoints, ModelParallelStrategy):
    """FSDP2 (``fully_shard``) over all ranks: Lightning's ``ModelParallelStrategy`` with the data-parallel
    size set to the world size and no tensor parallelism, which is how lattice models train sharded.

    :meth:`lattice.train.LatticeModule.configure_model` shards the dense layers over the data-parallel
    mesh; fused embedding tables stay replicated and are kept identical by the row exchange. Runs on
    CPU (gloo) and GPU (NCCL), unlike Lightning's FSDP1 ``fsdp`` strategy, which refuses a CPU.

    With ``model.sharding`` (``--config configs/sharded.yaml --config configs/fsdp.yaml``) the embedding tables
    are sharded across the same ranks instead and FSDP2 leaves them alone (``ignored_params``). Checkpoints then
    keep them out of the file, as :class:`~lattice.train.sharding.ShardedDDPStrategy` does: every rank writes its
    own shards into the DCP folder ``<file>.tables-<step>`` beside it, and a load reshards them to the current
    plan and world size.

    Args:
        save_distributed_checkpoint: ``False`` (default) assembles the full state on rank 0 and writes one
            file through the trainer's ``CheckpointIO`` (atomic with :class:`~lattice.train.AtomicCheckpointIO`);
            ``True`` writes one shard per rank into a checkpoint folder (scales to states that do not fit
            one host, but a crash while saving can leave that folder partially written; not with sharded
            tables, whose own folder already holds one piece per rank).
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

    # ---- sharded embedding tables ----------------------------------------------------------------
    def setup(self, trainer) -> None:
        super().setup(trainer)
        if self._save_distributed_checkpoint and self._sharded_prefixes():
            raise ValueError("FSDP2Strategy: save_distributed_checkpoint: true does not hold sharded embedding tables; "
                             "set it to false (the tables still go to their own folder, one piece per rank)")

    def optimizer_state(self, optimizer) -> Dict[str, Any]:
        if not self._sharded_prefixes():
            return super().optimizer_state(optimizer)
        # Keyed by parameter name, not by Lightning's parameter index: the ranks hold different numbers of shard
        # parameters, so rank 0's indices would name other parameters (or none) on the other ranks.
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(self.model, optimizer, options=options)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> Dict[str, Any]:
        """Lightning's load, except that the sharded collections' tables come from the checkpoint's DCP folder
        (resharded to this run's plan) rather than from the file, which does not hold them."""
        if not self._sharded_prefixes():
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        return self._load_with_sharded_tables(Path(self.broadcast(checkpoint_path)), weights_only)

    def _load_with_sharded_tables(self, path: Path, weights_only: Optional[bool]) -> Dict[str, Any]:
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        from lattice.train.sharded_checkpoint import load_sharded_tables, tables_folder

        if not path.is_file():
            raise ValueError(f"checkpoint {str(path)!r}: with sharded tables FSDP2Strategy loads a single-file "
                             "checkpoint (save_distributed_checkpoint: false) and its tables folder")
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        folder = tables_folder(checkpoint, str(path))
        if folder is None:
            raise ValueError(f"checkpoint {str(path)!r} has no sharded tables (it was written without "
                             "model.sharding); resume it without configs/sharded.yaml")
        state_dict = checkpoint.pop("state_dict")
        prefixes = self._sharded_prefixes()
        expected = [k for k in self.lightning_module.state_dict() if not k.startswith(prefixes)]
        strict = self.lightning_module.strict_loading
        missing = [k for k in expected if k not in state_dict]
        unexpected = sorted(set(state_dict) - set(expected))
        if strict and (missing or unexpected):
            raise RuntimeError(f"loading {path}: missing keys {missing[:10]}, unexpected keys {unexpected[:10]}")
        _load_raw_module_state(state_dict, self.model, strict=False)  # the sharded tables are not in the file
        options = StateDictOptions(broadcast_from_rank0=True, full_state_dict=True, strict=strict)
        optimizers: List[Any] = list(self.optimizers)
        for optimizer, state in zip(optimizers, checkpoint.get("optimizer_states", [])):  # keyed by name
            set_optimizer_state_dict(self.model, optimizer, optim_state_dict=state, options=options)
        load_sharded_tables(self.lightning_module, folder)
        return checkpoint
