"""``recipes/compare.py``: configurations trained side by side, the table, JSON and PNG it writes."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

compare = SimpleNamespace(
    **runpy.run_path(str(Path(__file__).resolve().parents[1] / "recipes" / "compare.py"))
)


def test_configuration_names():
    assert compare.parse_config("static").convert is None
    assert compare.parse_config("odconv_4x").convert == {"mode": "odconv", "kernel_num": 4}
    annealed = compare.parse_config("kr_1x+anneal")
    assert annealed.anneal and annealed.convert == {"mode": "kr", "kernel_num": 1}
    for bad in ("kr", "kr_x", "foo_1x", "static+anneal"):
        with pytest.raises(ValueError, match=r"static|mode"):
            compare.parse_config(bad)


def test_digits_run_writes_table_json_and_curves(tmp_path):
    out = tmp_path / "run"
    lines: list[str] = []
    report = compare.main(
        ["--configs", "static", "kr_1x", "odconv_4x+anneal", "--seeds", "2", "--epochs", "2",
         "--train-images", "60", "--batch-size", "20", "--image-size", "16", "--out", str(out)],
        log=lines.append,
    )  # fmt: skip
    assert len(lines) == 6  # one line per configuration and seed
    results = {r["config"]: r for r in report["results"]}
    assert set(results) == {"static", "kr_1x", "odconv_4x+anneal"}
    for result in results.values():
        assert len(result["top1_per_seed"]) == 2 and 0 <= result["top1"][0] <= 100
        assert len(result["curve_loss"]) == report["steps"] == 6
        assert len(result["curve_top1"]) == 2 and result["step_ms"] > 0
    # Kernel descriptors: the attentions of the last KR layer, for KR and the ablation alike.
    assert "knn_purity" not in results["static"]
    for name in ("kr_1x", "odconv_4x+anneal"):
        assert 0 <= results[name]["knn_purity"][0] <= 1
        assert -1 <= results[name]["silhouette"][0] <= 1
    saved = json.loads((out / "compare.json").read_text())
    assert saved["results"][0]["config"] == "static" and saved["seeds"] == 2
    assert (out / "learning_curves.png").stat().st_size > 1000


def test_imagenet_layout_folder(tmp_path):
    for split, count in (("train", 4), ("val", 2)):
        for label, colour in enumerate(((200, 20, 20), (20, 20, 200))):
            folder = tmp_path / "data" / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (20, 24), tuple(c + 5 * i for c in colour)).save(
                    folder / f"{i}.png"
                )
    report = compare.main(
        ["--data-root", str(tmp_path / "data"), "--train-per-class", "3", "--configs", "static",
         "kr_1x", "--seeds", "1", "--epochs", "1", "--batch-size", "3", "--image-size", "16",
         "--out", str(tmp_path / "run")],
        log=lambda line: None,
    )  # fmt: skip
    assert "2 classes, 6 training, 4 val images" in report["data"]
    assert report["steps"] == 2


def test_batch_larger_than_the_data_is_refused(tmp_path):
    with pytest.raises(ValueError, match="exceeds"):
        compare.main(["--train-images", "30", "--batch-size", "50", "--out", str(tmp_path)])


def test_tsne_of_per_image_kernels(tmp_path):
    """``--tsne`` draws one panel per configuration with kernel descriptors (seed 0)."""
    import numpy as np

    rng = np.random.default_rng(0)
    labels = np.arange(30) % 3
    runs = {
        "static": [compare.Run(epochs=[{"top1": 50.0}])],
        "kr_1x": [
            compare.Run(
                epochs=[{"top1": 60.0, "spread": 0.2, "knn_purity": 0.9}],
                descriptors=rng.normal(size=(30, 8)) + labels[:, None],
            )
        ],
        "odconv_1x": [  # a layer that gives every image the same kernel has nothing to draw
            compare.Run(epochs=[{"top1": 55.0, "spread": 0.0}], descriptors=np.ones((30, 8)))
        ],
    }
    summaries = [{"config": name} for name in runs]
    path = tmp_path / "kernels_tsne.png"
    assert compare.plot_kernels(runs, summaries, labels, path)
    assert path.stat().st_size > 1000
    assert not compare.plot_kernels({"static": runs["static"]}, summaries[:1], labels, path)
    with pytest.raises(SystemExit):
        compare.parse_args(["--tsne", "--no-descriptors"])
