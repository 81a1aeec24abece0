import json
import runpy
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def load(name: str) -> dict:
    return runpy.run_path(str(RECIPES / name), run_name="recipe")


def test_benchmark_prints_and_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    main = load("benchmark.py")["main"]
    report = main(
        [
            "--image-size", "32", "--batch", "2", "--train-batch", "2", "--memory-batch", "2",
            "--repeats", "1", "--warmup", "0", "--device", "cpu", "--memory-runs", "1",
            "--configs", "kr_1x", "reference_4x", "--json", str(out),
        ]
    )  # fmt: skip
    results = report["runs"][0]["results"]
    assert set(results) == {"static", "kr_1x", "reference_4x"}
    for row in results.values():
        for key in ("infer_s", "train_s", "infer_b1_s", "memory_bytes", "gmacs", "params_m"):
            assert key in row
        assert row["infer_s"] > 0 and row["gmacs"] > 0
    assert results["reference_4x"]["gmacs"] > results["kr_1x"]["gmacs"] > results["static"]["gmacs"]
    assert report["runs"][0]["image_size"] == 32 and report["runs"][0]["batches"]["train"] == 2
    assert results["reference_4x"]["params_m"] > results["kr_1x"]["params_m"]
    assert json.loads(out.read_text())["arch"] == "resnet18"
    printed = capsys.readouterr().out
    assert "reference_4x" in printed and "MAC ratio" in printed


def test_layer_benchmark_runs_every_strategy(capsys):
    rows = load("layer_benchmark.py")["main"](["--batch", "2", "--scale", "8", "--repeats", "1"])
    assert len(rows) == 9
    for strategy in ("grouped", "folded", "unfold", "reference"):
        assert all(row[f"4x_{strategy}"] > 0 for row in rows)
    assert any("1x_taps" in row for row in rows)
    assert "per-sample strategies" in capsys.readouterr().out


def test_profile_step_ranks_operators(capsys):
    rows = load("profile_step.py")["main"](
        ["--config", "kr_4x", "--batch", "2", "--image-size", "32", "--steps", "1", "--rows", "5"]
    )
    assert len(rows) == 5
    assert rows[0][1] >= rows[-1][1] > 0
    assert "Self CPU" in capsys.readouterr().out
