"""``recipes/learning_check.py``: the hook's protocol per seed, with the eval-mode diagnostics."""

import json
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.fixture
def recipe(monkeypatch):
    monkeypatch.syspath_prepend(str(RECIPES))
    import learning_check

    return learning_check


def test_runs_each_model_per_seed_with_the_paired_kr_diagnostics(recipe, tmp_path):
    out = tmp_path / "check.json"
    results = recipe.main(
        ["--seeds", "0,1", "--steps", "3", "--models", "static", "kr", "--json", str(out)]
    )
    assert [r["seed"] for r in results["static"]] == [0, 1]
    assert "eval_with_train_mode_attentions" not in results["static"][0]
    kr = results["kr"][0]
    for key in (
        "eval",
        "train_mode_bn",
        "eval_with_train_mode_attentions",
        "eval_with_neutral_attentions",
    ):
        assert 0 <= kr[key] <= 100
    assert json.loads(out.read_text())["results"] == results


def test_seed_ranges(recipe):
    assert recipe.parse_seeds("0-3") == [0, 1, 2, 3]
    assert recipe.parse_seeds("5,9") == [5, 9]
