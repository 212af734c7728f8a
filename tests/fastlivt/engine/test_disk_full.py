"""Full disks where the engine writes through a library of its own: DeepSpeed's checkpoint directory
(fastlivt.engine.ds_checkpoint) and TensorBoard's event writer (fastlivt.engine.logger)."""
from __future__ import annotations

import pytest
import torch


def test_a_full_disk_during_a_deepspeed_checkpoint_removes_the_partial_one_and_keeps_the_previous(tmp_path):
    """DeepSpeed writes its shards into ``<tag>.tmp``; a full disk there is one DiskFullError naming it, the partial
    directory is removed and the previous ``<tag>`` stays as it was (a stand-in engine: no DeepSpeed needed)."""
    import errno
    from types import SimpleNamespace

    from fastlivt.data_prep.atomic import DiskFullError
    from fastlivt.engine import ds_checkpoint

    previous = tmp_path / "last"
    previous.mkdir()
    (previous / "mp_rank_00_model_states.pt").write_bytes(b"the previous checkpoint")

    class FullDiskEngine:
        micro_steps = 4
        module = torch.nn.Linear(2, 2)

        def save_checkpoint(self, root, tag, client_state, save_latest):
            (tmp_path / tag).mkdir()
            (tmp_path / tag / "mp_rank_00_model_states.pt").write_bytes(b"half a shard")
            raise OSError(errno.ENOSPC, "No space left on device")

    rt = SimpleNamespace(engine=FullDiskEngine(), accum_steps=2, device=torch.device("cpu"), world=1, rank=0,
                         is_main=True, barrier=lambda: None)
    with pytest.raises(DiskFullError, match="disk full writing .*last.tmp"):
        ds_checkpoint.save(rt, str(tmp_path), "last", {"extra": {}})
    assert not (tmp_path / "last.tmp").exists()
    assert (previous / "mp_rank_00_model_states.pt").read_bytes() == b"the previous checkpoint"


def test_a_full_disk_under_tensorboard_is_one_disk_full_error(tmp_path):
    """TensorBoard writes from its own thread and re-raises the error at the next call: that call says the disk is
    full and names the TensorBoard folder."""
    import errno

    from fastlivt.data_prep.atomic import DiskFullError
    from fastlivt.engine.logger import TrainLogger

    logger = TrainLogger(tmp_path, enabled=True, total_steps=10, start_step=0, desc="BFT", progress=False,
                         tensorboard=True)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    logger.tb.add_scalar = full
    with pytest.raises(DiskFullError, match=f"disk full writing {tmp_path / 'tb'}"):
        logger.eval(1, 0, {"top1": 50.0})
    logger.tb.flush = full
    with pytest.raises(DiskFullError):
        logger.close()
