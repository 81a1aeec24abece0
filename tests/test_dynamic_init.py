"""Dynamism options: random heads (``dynamic_init``) ramped in from an exact start, and records.

``kr_convert(model, dynamic_init=s, dynamic_warmup=N)`` starts the heads random (every image gets its
own kernel) and scales the logits by ``min(1, t / N)``, ``t`` counting training passes: the
converted model is exactly the static one at step 0 and fully dynamic after ``N`` passes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models import resnet18

from lightning_kr import KRModel, attention_statistics, kr_convert
from lightning_kr.diagnostics import kernel_generators
from tests.test_checkpointing import loss_and_grads, wrap


def ramped(steps: int = 4, dynamic_init: float = 0.7) -> tuple[torch.nn.Module, KRModel]:
    """A static resnet18 with trained-looking BatchNorm statistics, and its ramped conversion."""
    torch.manual_seed(0)
    static = resnet18(num_classes=4)
    static.train()
    with torch.no_grad():
        static(torch.randn(16, 3, 32, 32))  # running statistics away from their initial values
    static.eval()
    converted = kr_convert(
        copy.deepcopy(static), input_size=32, dynamic_init=dynamic_init, dynamic_warmup=steps
    )
    return static, converted


def test_exact_at_step_zero_and_dynamic_after_the_ramp():
    static, model = ramped(steps=4)
    images = torch.randn(32, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images), static(images), rtol=1e-4, atol=1e-5)
    assert attention_statistics(model, images).median_spread() == pytest.approx(0.0, abs=1e-6)
    # Eval passes do not count; training passes do, whatever the grad mode.
    assert all(g.ramp_step.item() == 0 for g in kernel_generators(model).values())
    spreads = []
    for _ in range(5):
        spreads.append(attention_statistics(model, images).median_spread())
        model.train()
        with torch.no_grad():
            model(images)
    assert all(g.ramp_step.item() == 5 for g in kernel_generators(model).values())
    # Eval spread after t passes grows with min(1, t/4): 0, then rising, then full from 4 on.
    assert spreads[0] == pytest.approx(0.0, abs=1e-6)
    assert 0 < spreads[1] < spreads[2] < spreads[3] < spreads[4]
    assert spreads[4] > 0.1


def test_the_step_count_is_saved_and_loaded():
    _, model = ramped(steps=10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32))
    state = model.state_dict()
    assert all(state[f"{name}.ramp_step"].item() == 3 for name in _generator_paths(model))
    _, fresh = ramped(steps=10)
    fresh.load_state_dict(state)
    assert all(g.ramp_step.item() == 3 for g in kernel_generators(fresh).values())
    # A model converted without the ramp has no such buffer: loading tells what differs.
    with pytest.raises(RuntimeError, match="dynamic_warmup: checkpoint=10, this model=0"):
        kr_convert(resnet18(num_classes=4), input_size=32, dynamic_init=0.7).load_state_dict(state)


def _generator_paths(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if hasattr(module, "ramp_steps")]


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpoint_recomputation_uses_the_scale_of_its_first_pass(use_reentrant):
    """Mid-ramp, a checkpointed block recomputed in backward must not see the next step's scale."""
    _, model = ramped(steps=10)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32))
    wrapped = wrap(copy.deepcopy(model), "backbone.layer2", use_reentrant)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,))
    loss, grads = loss_and_grads(model, x, y)
    loss_cp, grads_cp = loss_and_grads(wrapped, x, y)
    torch.testing.assert_close(loss_cp, loss)
    renamed = {n.replace(".block.", "."): g for n, g in grads_cp.items()}
    assert renamed.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(renamed[name], grad, msg=lambda m, n=name: f"{n}: {m}")
    counts = {g.ramp_step.item() for g in kernel_generators(wrapped).values()}
    assert counts == {4}  # one training pass each, the recomputation not counted


def test_bad_values_are_refused():
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="dynamic_warmup must be a whole number"):
            kr_convert(resnet18(num_classes=4), input_size=32, dynamic_warmup=bad)


def test_save_and_load_pretrained_keeps_the_options_and_the_step(tmp_path):
    torch.manual_seed(0)
    model = kr_convert(
        resnet18(num_classes=4), input_size=32, dynamic_init={"spatial": 1.5}, dynamic_warmup=8
    )
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 32, 32))
    model.eval().save_pretrained(tmp_path / "ramped")
    loaded = KRModel.from_pretrained(tmp_path / "ramped", base_model=resnet18(num_classes=4))
    assert loaded.config.dynamic_init == {"spatial": 1.5} and loaded.config.dynamic_warmup == 8
    assert {g.ramp_step.item() for g in kernel_generators(loaded).values()} == {3}
    images = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images))


def test_records_written_before_gate_range_read_as_the_sigmoid_they_used():
    torch.manual_seed(0)
    model = kr_convert(resnet18(num_classes=4), input_size=32, gate_range=1.0, dynamism_warmup=0)
    state = model.state_dict()
    extra_key = next(k for k in state if k.endswith("_extra_state"))
    del state[extra_key]["config"]["gate_range"]  # as written by an earlier version
    del state[extra_key]["config"]["dynamism_warmup"]
    sigmoid = kr_convert(resnet18(num_classes=4), input_size=32, gate_range=1.0, dynamism_warmup=0)
    sigmoid.load_state_dict(state)
    bounded = kr_convert(resnet18(num_classes=4), input_size=32, dynamism_warmup=0)  # the default
    with pytest.raises(RuntimeError, match=r"gate_range: checkpoint=1\.0, this model=0\.75"):
        bounded.load_state_dict(state)
