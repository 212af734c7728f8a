"""Elastic resume planning (no processes): the accumulation that keeps the effective batch on a new world size, the
schedule's step at the same fractional epoch, and a changed per-process batch refused."""
import pytest

from fastlivt.config import TrainConfig


@pytest.mark.parametrize("old_world,old_accum,world,accum,kept", [
    (2, 2, 1, 4, True), (1, 4, 2, 2, True), (8, 1, 4, 2, True), (2, 2, 2, 2, True), (2, 1, 3, 1, False)])
def test_elastic_resume_keeps_the_effective_batch_when_the_world_allows(old_world, old_accum, world, accum, kept):
    from fastlivt.engine.elastic import plan_resume, rescaled_step

    cfg = TrainConfig()
    cfg.data.batch_size, cfg.optim.accum_iter = 8, old_accum
    meta = {"sampler": {"world": old_world, "accum": old_accum, "batch_size": 8}}
    plan = plan_resume(meta, cfg, world)  # logs plan.describe() when the world size changed
    assert plan.accum == accum and plan.kept == kept
    assert cfg.optim.accum_iter == old_accum  # planning only reads the config
    if world != old_world:
        assert ("keeps the effective batch" if kept else "the effective batch changes 16 -> 24") in plan.describe()
    # the schedule continues at the same fractional epoch: 96 samples of epoch 3 done, 32 samples per step
    assert rescaled_step(3, 96, 10, 32) == 33
    cfg.data.batch_size = 16
    with pytest.raises(ValueError, match="data.batch_size=8.*16"):
        plan_resume(meta, cfg, world)
