"""One DeepSpeed process (ZeRO-2, CPU, gloo, world 1) whose MGP loss turns NaN at step 5: the run must stop with
NonFiniteError naming step 5 and the checkpoint of step 4, and leave only that finite checkpoint. Prints a JSON line."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from run_safety_doubles import PoisonedMGP, loader_factory, tiny_mgp  # noqa: E402


def main(out: Path) -> None:
    from fastlivt.engine.loop import train
    from fastlivt.engine.nonfinite import NonFiniteError

    cfg = tiny_mgp(out / "run")
    cfg.deepspeed = {"zero_optimization": {"stage": 2}}
    cfg.run.amp = "fp32"
    try:
        train(cfg, PoisonedMGP(range(5, 100)), make_loader=loader_factory(out))
        result = {"error": None}
    except NonFiniteError as e:
        result = {"error": str(e)}
    from fastlivt.engine.checkpoint import safe_load

    states = [safe_load(f) for f in (out / "run" / "checkpoints" / "last").glob("*model_states.pt")]
    module = states[0]["module"] if states else {}
    result["finite"] = all(bool(torch.isfinite(v).all()) for v in module.values() if v.is_floating_point())
    result["meta_step"] = safe_load(out / "run" / "checkpoints" / "last" / "meta_rank00000.pt")["step"]
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
