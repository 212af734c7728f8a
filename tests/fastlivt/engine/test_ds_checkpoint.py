"""fastlivt.engine.ds_checkpoint without DeepSpeed: what its save does around DeepSpeed's own writer."""
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

