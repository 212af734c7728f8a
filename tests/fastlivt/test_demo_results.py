"""`fastlivt demo --seeds`: per-seed results aggregated as mean ± std, claims counted seed by seed (no training here:
the per-seed pipeline is replaced by made-up metrics whose aggregate is computed by hand)."""
import json
import math
from pathlib import Path

import pytest

from fastlivt import demo
from fastlivt.demo_results import aggregate


def fake_metrics(overall, ece, medium=50.0):
    return {"overall": overall, "many": overall + 5, "medium": medium, "few": None, "ece": ece, "mce": 2 * ece,
            "per_class_accuracy": [overall] * 9 + [float("nan")]}


def test_aggregate_mean_std_and_claims_by_hand():
    per_seed = {0: {"bal_ce": fake_metrics(60.0, 10.0), "bal_bce": fake_metrics(64.0, 5.0)},
                1: {"bal_ce": fake_metrics(70.0, 12.0), "bal_bce": fake_metrics(66.0, 4.0)},
                2: {"bal_ce": fake_metrics(65.0, 14.0), "bal_bce": fake_metrics(68.0, 6.0)}}
    s = aggregate(per_seed)
    bce = s["losses"]["bal_bce"]["overall"]
    assert bce["mean"] == pytest.approx(66.0) and bce["min"] == 64.0 and bce["max"] == 68.0
    assert bce["std"] == pytest.approx(2.0)  # deviations -2, 0, 2: sqrt(8 / 2)
    assert s["losses"]["bal_ce"]["overall"]["std"] == pytest.approx(5.0)  # -5, 5, 0: sqrt(50 / 2)
    assert s["losses"]["bal_bce"]["few"] is None  # undefined on every seed stays undefined
    assert s["losses"]["bal_bce"]["per_class_accuracy"][9] is None
    claims = {c["claim"]: c for c in s["claims"]}
    overall = claims["bal_bce overall higher than bal_ce"]
    assert overall["holds"] == [True, False, True] and overall["all"] is False
    assert claims["bal_bce ece lower than bal_ce"]["all"] is True
    assert "bal_bce overall higher than ce" not in claims  # ce was not run


def test_table6_claims_with_all_four_losses_by_hand():
    # seed 0: the bias gains 10 for BCE (50 -> 60) and 5 for CE (58 -> 63); seed 1: 4 for BCE, 6 for CE
    per_seed = {0: {"ce": fake_metrics(58.0, 3.0, medium=20.0), "bce": fake_metrics(50.0, 9.0, medium=10.0),
                    "bal_ce": fake_metrics(63.0, 8.0, medium=40.0), "bal_bce": fake_metrics(60.0, 4.0, medium=30.0)},
                1: {"ce": fake_metrics(57.0, 3.0, medium=30.0), "bce": fake_metrics(55.0, 9.0, medium=10.0),
                    "bal_ce": fake_metrics(63.0, 8.0, medium=25.0), "bal_bce": fake_metrics(59.0, 4.0, medium=30.0)}}
    claims = {c["claim"]: c for c in aggregate(per_seed)["claims"]}
    assert claims["bal_ce overall higher than ce"]["holds"] == [True, True]
    assert claims["bal_ce medium higher than ce"]["holds"] == [True, False]
    gain = claims["the bias gains more overall for bce (bal_bce - bce) than for ce (bal_ce - ce)"]
    assert gain["holds"] == [True, False] and gain["all"] is False
    two = aggregate({s: {k: r[k] for k in ("bal_ce", "bal_bce")} for s, r in per_seed.items()})
    assert not any(c["claim"].startswith("the bias gains") for c in two["claims"])  # needs all four losses


def test_parse_seeds_rejects_bad_lists():
    assert demo.parse_seeds("0,1,2") == [0, 1, 2]
    for bad in ("", "0,0", "a,1"):
        with pytest.raises(ValueError, match="--seeds"):
            demo.parse_seeds(bad)


@pytest.mark.skipif(not Path(demo.FMNIST, "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_demo_seeds_runs_each_seed_and_writes_the_summary(tmp_path, monkeypatch):
    calls = []

    def fake_run_seed(seed, out, data, test_split, losses, plan, backend, bf16):
        calls.append((seed, out, tuple(plan["bft"])))
        return {loss: fake_metrics(60.0 + seed + i, 5.0 + seed) for i, loss in enumerate(losses)}, {"mgp_s": 0.0}

    class FakeManifest:
        num_samples, class_counts, class_names = 100, [50, 20, 10, 8, 5, 3, 2, 1, 1, 1], [f"c{i}" for i in range(10)]

    monkeypatch.setattr(demo, "run_seed", fake_run_seed)
    monkeypatch.setattr(demo, "convert_split", lambda *a, **k: FakeManifest())
    out = tmp_path / "run"
    rc = demo.main(["--seeds", "3,5", "--losses", "bal_ce,bal_bce", "--out", str(out), "--data", str(tmp_path / "d"),
                    "data.mixup=0.8"])
    assert rc == 0
    assert [c[0] for c in calls] == [3, 5] and calls[0][1] == out / "seed_3" and "data.mixup=0.8" in calls[0][2]
    rec = json.loads((out / "results.json").read_text())
    assert rec["seeds"] == [3, 5] and set(rec["per_seed"]) == {"3", "5"}
    # bal_bce overall: 61 + seed -> 64 and 66: mean 65, std sqrt(2)
    o = rec["summary"]["losses"]["bal_bce"]["overall"]
    assert o["mean"] == pytest.approx(65.0) and o["std"] == pytest.approx(math.sqrt(2.0))
    md = (out / "results.md").read_text()
    assert "65.0 ± 1.4" in md and "| bal_bce overall higher than bal_ce | yes | yes | **yes** |" in md
    assert (out / "seed_3" / "results.md").is_file() and (out / "results.png").stat().st_size > 0


def test_demo_rejects_a_bad_override_before_any_work(tmp_path, capsys):
    if not Path(demo.FMNIST, "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(tmp_path / "r"), "--data", str(tmp_path / "d"), "loss.nme=ce"])
    assert e.value.code == 2 and "loss.nme" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()
