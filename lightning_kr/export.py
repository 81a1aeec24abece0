"""ONNX export of converted models, with a free batch dimension.

Dynamic convolutions usually export with the batch size of the example baked into the graph: the
per-sample kernels run as one convolution with ``groups = batch`` (onnx/onnx#3843). Under
``torch.export`` every KR layer switches to formulations that hold for any batch
(:func:`~lightning_kr.layers.dynamic_conv.portable_strategy`): im2col as an ordinary depthwise
``Conv`` node with one-hot kernels and one batched ``MatMul`` with the per-sample kernels
(:mod:`~lightning_kr.strategies.conv_columns`), or the layer's own ``Conv`` where every sample has
the same kernel, so one exported file serves batch 1 and batch 256 alike. Needs the ``export`` extra:
``pip install "lightning-kr[export]"`` (onnx, onnxscript; onnxruntime for the parity check).
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path

import torch
from torch import Tensor, nn

EXPORT_PACKAGES = ("onnx", "onnxscript")
# Bytes of weights kept inside the .onnx file (protobuf's limit is 2 GB); more go beside it.
ONNX_SINGLE_FILE_LIMIT = 1_800_000_000


def to_onnx(
    model: nn.Module,
    path: str | Path,
    example: Tensor,
    *,
    dynamic_batch: bool = True,
    verify: bool = True,
    atol: float = 1e-4,
    input_name: str = "images",
    output_name: str = "logits",
) -> Path:
    """Write ``model`` (in eval mode) to an ONNX file whose batch dimension is free.

    Built on the dynamo exporter (``torch.onnx.export(..., dynamo=True)``). The model is exported in
    eval mode (BatchNorm with running statistics) and put back in the mode it was in.

    Args:
        model: a converted model (:func:`~lightning_kr.kr_convert`) or any module whose ``forward``
            takes one image tensor and returns a tensor.
        path: the ``.onnx`` file to write (its folder is created).
        example: one input, e.g. ``torch.randn(1, 3, 224, 224)``; its batch size does not matter
            (a batch of 1 is repeated to 2, which ``torch.export`` needs to keep the batch free).
        dynamic_batch: leave the batch dimension free (default); False fixes it at the example's.
        verify: run the file with onnxruntime (when installed) at batch 1 and at the example's batch
            and raise if it differs from eager PyTorch by more than ``atol``, or if the batch is
            not free in the graph.
        atol: tolerance of that check.
        input_name, output_name: names of the graph's input and output.

    Returns:
        ``path``, as a :class:`~pathlib.Path`.

    Example::

        >>> model = kr_convert(torchvision.models.resnet18(num_classes=10), input_size=32)
        >>> to_onnx(model, "resnet18_kr.onnx", torch.randn(1, 3, 32, 32))
        PosixPath('resnet18_kr.onnx')
        >>> session = onnxruntime.InferenceSession("resnet18_kr.onnx")
        >>> session.run(None, {"images": numpy.zeros((8, 3, 32, 32), numpy.float32)})[0].shape
        (8, 10)
    """
    missing = [name for name in EXPORT_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"ONNX export needs {', '.join(missing)}: pip install 'lightning-kr[export]'"
        )
    if not isinstance(example, Tensor) or example.dim() < 1 or example.shape[0] < 1:
        raise ValueError(
            "example must be one input tensor with the batch on its first dimension, e.g. "
            f"torch.randn(1, 3, 224, 224); got {type(example).__name__}"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dynamic_batch and example.shape[0] == 1:
        # torch.export specialises sizes 0 and 1: a batch of one would fix the batch at 1.
        example = example.expand(2, *example.shape[1:]).contiguous()
    dynamic_shapes = _batch_dynamic_shapes(model) if dynamic_batch else None
    was_training = model.training
    model.eval()
    try:
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=[input_name],
            output_names=[output_name],
            # One self-contained file, unless the weights pass protobuf's 2 GB limit (then they go
            # to ``path`` + ".data" beside it).
            external_data=_parameter_bytes(model) > ONNX_SINGLE_FILE_LIMIT,
            verbose=False,
        )
        if verify:
            _verify(model, path, example, dynamic_batch, atol)
    finally:
        model.train(was_training)
    return path


def _batch_dynamic_shapes(model: nn.Module) -> tuple:
    """``dynamic_shapes`` with a free batch on the one input, for ``forward(x)`` or
    ``forward(*args)`` (:class:`~lightning_kr.KRModel` takes the original model's arguments)."""
    batch = {0: torch.export.Dim("batch", min=1)}
    parameters = list(inspect.signature(model.forward).parameters.values())
    if parameters and parameters[0].kind is inspect.Parameter.VAR_POSITIONAL:
        return ((batch,),)
    return (batch,)


def _parameter_bytes(model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def onnx_batch_is_free(path: str | Path) -> bool:
    """Whether the first input of the ONNX file at ``path`` has a symbolic batch dimension."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    return batch.HasField("dim_param") and not batch.HasField("dim_value")


def _verify(
    model: nn.Module, path: Path, example: Tensor, dynamic_batch: bool, atol: float
) -> None:
    if dynamic_batch and not onnx_batch_is_free(path):
        raise RuntimeError(
            f"the exported graph {path} fixes the batch size at {example.shape[0]}: a module of "
            "the model branches on the batch size. Export with dynamic_batch=False, or exclude "
            "that module from the conversion."
        )
    if importlib.util.find_spec("onnxruntime") is None:
        return
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batches = (example[:1], example) if dynamic_batch else (example,)
    with torch.no_grad():
        for inputs in batches:
            expected = model(inputs)
            if not isinstance(expected, Tensor):
                return  # several outputs: the caller compares what it needs
            feed = {session.get_inputs()[0].name: inputs.detach().cpu().float().numpy()}
            got = torch.from_numpy(session.run(None, feed)[0])
            error = (got - expected.detach().cpu().float()).abs().max().item()
            if error > atol:
                raise RuntimeError(
                    f"onnxruntime differs from eager PyTorch by {error:.2e} (> atol={atol}) at "
                    f"batch {inputs.shape[0]} for {path}"
                )
