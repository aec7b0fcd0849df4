"""CPU decoding through oneDNN, with each linear layer's weight packed once for many small matmuls.

On a CPU, torch runs an fp32 linear layer through MKL's sgemm, which lays the weight out afresh on every
call. A rollout's decode step multiplies a few rows (one token per episode) by every weight of the model,
once per token, so that re-layout is most of its cost: on the PPO benchmark (6-layer GPT-2, 16 rows, 2
threads) the 24 block matmuls of one step take 6.4 ms through MKL and 2.8 ms through oneDNN with the
weights packed beforehand. The packing is oneDNN's own (``torch.ops.mkldnn._reorder_linear_weight``, the
call torch's inductor makes for frozen CPU models) and so is the matmul (``torch.ops.mkldnn._linear_pointwise``);
nothing here computes anything itself.

A packed weight is a copy taken at entry, so the context is for no-grad stretches over fixed weights (a
rollout's sampling). Each call checks that it may use the copy and otherwise runs the layer as usual: with
gradients on, under autocast, while torch.compile traces, or once the weight has changed since it was packed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import torch

from rlhf.models.backbone import VocabAlignedLinear

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def onednn_linear_available() -> bool:
    """Whether this torch has oneDNN and the two operators used here, and they compute F.linear (torch's x86 CPU
    wheels do)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.compiler, "is_compiling"):  # the latter: torch >= 2.3
        return False
    try:
        torch.is_autocast_enabled("cpu")  # the per-device form: torch >= 2.4
    except TypeError:
        return False
    # A probe rather than a trust in names: the operators are torch internals, and a build or platform where
    # they fail or disagree with F.linear gets the layers' own forwards.
    generator = torch.Generator().manual_seed(0)
    inputs, weight, bias = (torch.randn(shape, generator=generator) for shape in ((3, 16), (8, 16), (8,)))
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        output = torch.ops.mkldnn._linear_pointwise(inputs, packed, bias, "none", [], "")
    except (AttributeError, RuntimeError, TypeError):
        return False
    return bool(torch.allclose(output, torch.nn.functional.linear(inputs, weight, bias), atol=1e-4, rtol=1e-4))


def linear_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The (out, in) weight of a plain ``nn.Linear`` or transformers ``Conv1D`` (GPT-2's, stored (in, out));
    None for anything else. Only these exact types: a subclass (a quantized linear, a LoRA wrapper) has a
    forward of its own, and a LoRA wrapper's base layer is found as a module of its own."""
    if type(module) in (torch.nn.Linear, VocabAlignedLinear):  # the latter is a plain linear layer on a CPU
        return module.weight
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    if type(module) is Conv1D:
        return module.weight.t()
    return None


class PackedLinear:
    """The forward of one linear layer while its weight is packed: oneDNN on the packed copy, else the layer's own."""

    def __init__(self, module: torch.nn.Module, weight: torch.Tensor):
        self.module = module
        self.source = module.weight
        self.version = module.weight._version  # in-place updates (an optimizer step) bump it
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)
        self.bias = None if module.bias is None else module.bias.detach().contiguous()
        self.bias_version = None if module.bias is None else module.bias._version

    def usable(self, inputs: torch.Tensor) -> bool:
        module = self.module
        return (not torch.is_grad_enabled()
                and inputs.dtype == torch.float32 and inputs.device.type == "cpu" and inputs.dim() >= 2
                and not torch.is_autocast_enabled("cpu")
                and not torch.compiler.is_compiling()
                and module.weight is self.source and module.weight._version == self.version
                and (module.bias is None or module.bias._version == self.bias_version))

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.usable(inputs):
            return type(self.module).forward(self.module, inputs)
        return torch.ops.mkldnn._linear_pointwise(inputs.contiguous(), self.packed, self.bias, "none", [], "")


def packable(module: torch.nn.Module) -> torch.Tensor | None:
    """The (out, in) weight to pack for ``module``, or None when it keeps its own forward: not a plain
    linear layer, not an fp32 CPU weight, or a forward already replaced by someone else (accelerate's
    offload hooks do that)."""
    if "forward" in vars(module):
        return None
    weight = linear_weight(module)
    if weight is None or type(weight.detach()) is not torch.Tensor:  # e.g. a DTensor shard under FSDP2
        return None
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.is_meta or weight.dim() != 2:
        return None
    bias = module.bias
    if bias is not None and (bias.device.type != "cpu" or bias.dtype != torch.float32):
        return None
    return weight


@contextlib.contextmanager
def packed_cpu_linears(model: torch.nn.Module, enabled: bool = True) -> Iterator[int]:
    """A context in which ``model``'s fp32 CPU linear layers run through oneDNN on weights packed at entry.

    Yields the number of layers packed: 0 (and nothing changes) when ``enabled`` is false, oneDNN is
    missing, or no layer qualifies (a model on a GPU, in half precision, ...). Outputs equal the usual
    ones up to float rounding; the packed copies hold a second copy of those weights until exit.
    """
    if not enabled or not onednn_linear_available():
        yield 0
        return
    patched = []
    try:
        for module in model.modules():
            weight = packable(module)
            if weight is None:
                continue
            try:
                module.forward = PackedLinear(module, weight)
            except RuntimeError as error:  # a layout oneDNN refuses: this layer keeps its own forward
                logger.debug("not packing %s: %s", type(module).__name__, error)
                continue
            patched.append(module)
        yield len(patched)
    finally:
        for module in patched:
            del module.forward
