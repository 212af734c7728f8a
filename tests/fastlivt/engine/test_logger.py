"""fastlivt.engine.logger: the training log's writers."""
from __future__ import annotations

import pytest


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
