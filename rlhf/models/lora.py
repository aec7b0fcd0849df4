"""Low-rank adapters (LoRA, Hu et al. 2021) through peft, for every stage.

peft injects the adapters into the Hugging Face model in place: the model object the trainers
hold keeps its class and forward, its original weights are frozen, and only the adapters (and,
for a reward or value model, a trainable copy of the scalar head) require gradients. So the
trainers, accelerate and the checkpoints treat it as any other model; what LoRA changes is:

- ``adapters_disabled(model)``: the frozen base, exactly. PPO's reference policy is its policy
  with the adapters off, and its reward model the critic with the adapters off (peft keeps the
  original head beside the trainable copy), so PPO holds two sets of base weights, not four.
- ``final/``: the adapter in peft's format (``final/adapter/``) and, unless
  ``lora.save_merged: false``, the adapters folded into a full checkpoint that plain transformers
  loads. ``merged_state_dict`` folds them from a (gathered) state dict, so it works however the
  training weights were sharded.
- Loading: a directory that holds only an adapter (``save_merged: false``) is loaded as its base
  with the adapter merged in (``load_adapter_checkpoint``), so every stage reads the previous
  stage's output without the user merging by hand.

peft is an optional dependency (``pip install 'rlhf[peft]'``), imported only when a config asks for LoRA.
"""

from __future__ import annotations

import contextlib
import json
import os
import weakref
from typing import Iterator

import torch

from rlhf.config import LoraConfig
from rlhf.errors import UserError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_DIR = "adapter"  # final/adapter/: the adapter alone, beside the merged checkpoint
# An adapter-only reward model has no config.json to carry its normalisation (rlhf_reward_mean/std).
REWARD_NORMALIZATION_FILE = "reward_normalization.json"
ADAPTER_NAME = "default"  # peft's name for a model's one adapter

# The peft wrapper of every model given adapters here, looked up to save the adapter in peft's format.
# Weak keys: a model that is dropped takes its wrapper with it.
_PEFT_MODELS: "weakref.WeakKeyDictionary[torch.nn.Module, object]" = weakref.WeakKeyDictionary()


def import_peft(key: str):
    """peft, or one line naming the config key that asked for it and how to install it."""
    try:
        import peft
    except ImportError:
        raise UserError(f"{key}: LoRA needs peft, which is not installed; pip install 'rlhf[peft]'") from None
    return peft


def apply_lora(model: torch.nn.Module, lora: LoraConfig, key: str, scalar_head: str | None = None) -> torch.nn.Module:
    """Give ``model`` (a Hugging Face model) LoRA adapters in place and freeze everything else; returns ``model``.

    Args:
        lora: the ``lora:`` block.
        key: the config key of the block, for error messages ("policy.lora").
        scalar_head: the name of a scalar head that trains in full (a reward or value model's ``score``);
            peft trains a copy of it and keeps the original, which ``adapters_disabled`` brings back.
    """
    peft = import_peft(key)
    from transformers.pytorch_utils import Conv1D

    config = peft.LoraConfig(
        r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        # peft's 'all-linear': every linear layer (GPT-2's Conv1D included) but the output layer.
        target_modules=lora.target_modules or "all-linear",
        # GPT-2's Conv1D stores (in, out) weights; peft would find out per layer, with a warning each.
        fan_in_fan_out=any(isinstance(module, Conv1D) for module in model.modules()),
        modules_to_save=[scalar_head] if scalar_head else None,
        task_type="SEQ_CLS" if scalar_head else "CAUSAL_LM")
    try:
        peft_model = peft.get_peft_model(model, config)
    except ValueError as error:  # target modules that match nothing, or a layer type peft cannot adapt
        raise UserError(f"{key}.target_modules: {str(error).strip().splitlines()[0]}") from None
    _PEFT_MODELS[model] = peft_model
    return model


def has_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or a model inside it) carries adapters."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # no peft, no adapters
        return False
    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def peft_wrapper_of(model: torch.nn.Module):
    """The peft wrapper ``apply_lora`` made for ``model`` (None for a model without adapters)."""
    return _PEFT_MODELS.get(model)


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Run ``model`` as its frozen base: every adapter off, every trained head copy back to its original.

    The outputs are those of the model before any adapter existed (tested bitwise), so this is the
    reference policy of PPO and, for a critic on the reward model's weights, the reward model.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    switches = [m for m in model.modules() if isinstance(m, (BaseTunerLayer, ModulesToSaveWrapper))]
    for module in switches:
        module.enable_adapters(False)
    try:
        yield model
    finally:
        for module in switches:
            module.enable_adapters(True)


def merged_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor],
                      adapters_added: bool = False) -> dict[str, torch.Tensor]:
    """``state_dict`` of ``model`` (with adapters) as the plain model's: each adapted weight becomes
    W + (alpha/r)·B·A, each trained head copy replaces its original.

    Args:
        model: the model with adapters (module names and each layer's scaling and layout are read from it).
        state_dict: its full weights, possibly gathered from shards (keys as ``model.state_dict()``).
        adapters_added: the base weights already hold the adapters (peft's in-place ``merge_adapter``):
            only rename, copying nothing.
    Returns:
        The state dict ``save_pretrained`` of the plain architecture expects (equal to peft's
        ``merge_and_unload`` up to float rounding; tested).
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    merged = dict(state_dict)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, LoraLayer):
            lora_a = merged.pop(f"{prefix}lora_A.{ADAPTER_NAME}.weight")
            lora_b = merged.pop(f"{prefix}lora_B.{ADAPTER_NAME}.weight")
            base = merged.pop(f"{prefix}base_layer.weight")
            if adapters_added:
                merged[f"{prefix}weight"] = base
            else:
                delta = (lora_b.float() @ lora_a.float()) * module.scaling[ADAPTER_NAME]
                if module.fan_in_fan_out:  # GPT-2's Conv1D stores its weight as (in, out)
                    delta = delta.T
                merged[f"{prefix}weight"] = (base.float() + delta).to(base.dtype)
            if f"{prefix}base_layer.bias" in merged:
                merged[f"{prefix}bias"] = merged.pop(f"{prefix}base_layer.bias")
        elif isinstance(module, ModulesToSaveWrapper):
            trained = f"{prefix}modules_to_save.{ADAPTER_NAME}."
            for key in [k for k in merged if k.startswith(prefix)]:
                if key.startswith(trained):
                    merged[prefix + key[len(trained):]] = merged.pop(key)
                elif key.startswith(f"{prefix}original_module."):
                    del merged[key]
    return merged


@contextlib.contextmanager
def adapters_merged_in_place(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, every adapter is added into its base weight in place (peft's ``merge_adapter``;
    the forward then skips the adapters), so a merged checkpoint is written without a second copy of the
    weights; afterwards they are taken out again (``unmerge_adapter``: the same model up to float rounding)."""
    peft_model = peft_wrapper_of(model)
    peft_model.merge_adapter()
    try:
        yield
    finally:
        peft_model.unmerge_adapter()


def save_adapter(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], directory: str) -> None:
    """Write the adapter of ``model`` (and a trained head copy) in peft's format: adapter_config.json and
    adapter_model.safetensors, loadable by ``peft.PeftModel.from_pretrained(base, directory)``.

    ``state_dict``: the model's full weights (gathered), keys as ``model.state_dict()``. The base is
    recorded as the checkpoint the model was loaded from (an absolute path for a local directory).
    """
    peft_model = peft_wrapper_of(model)
    if peft_model is None:
        raise ValueError("save_adapter: the model has no adapters made by apply_lora")
    base = getattr(model, "name_or_path", "") or ""
    peft_model.peft_config[ADAPTER_NAME].base_model_name_or_path = (
        os.path.abspath(base) if base and os.path.isdir(base) else base or None)
    # peft names its weights from the wrapper down: base_model (the LoraModel) . model (ours) . <ours>
    peft_model.save_pretrained(directory, state_dict={f"base_model.model.{k}": v for k, v in state_dict.items()})


def save_hf_model(model, directory: str, state_dict: dict[str, torch.Tensor] | None = None,
                  save_merged: bool = True) -> None:
    """``model.save_pretrained(directory)``, and for a model with adapters the layout of ``final/``.

    With adapters: the merged full checkpoint in ``directory`` and the adapter in ``directory/adapter``;
    with ``save_merged=False`` the adapter alone in ``directory`` (plus a reward model's normalisation,
    which has no config.json to live in).

    Args:
        model: a Hugging Face model (unwrapped from DDP/FSDP).
        state_dict: its full weights gathered from every process's shards; None: the model's own weights
            (one process, DDP, ZeRO-1/2), which a merged checkpoint then merges in place.
    """
    own_weights = state_dict is None
    state_dict = state_dict if state_dict is not None else model.state_dict()
    if not has_lora(model):
        model.save_pretrained(directory, state_dict=state_dict)
        return
    if save_merged:
        save_adapter(model, state_dict, os.path.join(directory, ADAPTER_DIR))
        if own_weights:  # merge in place: a 1B model's merged copy would be gigabytes more at the very end
            with adapters_merged_in_place(model):
                model.save_pretrained(directory, state_dict=merged_state_dict(model, model.state_dict(),
                                                                              adapters_added=True))
        else:  # gathered from shards: already a copy, merged into new tensors
            model.save_pretrained(directory, state_dict=merged_state_dict(model, state_dict))
        return
    save_adapter(model, state_dict, directory)
    normalization = reward_normalization(model.config)
    if normalization:
        with open(os.path.join(directory, REWARD_NORMALIZATION_FILE), "w", encoding="utf-8") as handle:
            json.dump(normalization, handle)


def is_adapter_checkpoint(path: str) -> bool:
    """A directory that holds an adapter alone (``lora.save_merged: false``), not a full checkpoint."""
    return (os.path.isfile(os.path.join(path, ADAPTER_CONFIG))
            and not os.path.isfile(os.path.join(path, "config.json")))


def adapter_base(path: str, key: str) -> str:
    """The base checkpoint an adapter directory was trained on (peft's ``base_model_name_or_path``)."""
    try:
        with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as handle:
            base = json.load(handle).get("base_model_name_or_path")
    except (OSError, ValueError) as error:
        raise UserError(f"{key}: '{path}/{ADAPTER_CONFIG}' cannot be read: {error}") from None
    if not base:
        raise UserError(f"{key}: '{path}/{ADAPTER_CONFIG}' names no base_model_name_or_path to apply the adapter to")
    return base


def load_adapter_checkpoint(load_base, path: str, key: str) -> torch.nn.Module:
    """The base of the adapter at ``path`` with the adapter merged in: a plain model, as if saved merged.

    Args:
        load_base: ``f(base_name_or_path) -> model`` loading the base as the class the caller wants.
        path: the adapter directory.
    """
    peft = import_peft(key)
    base_path = adapter_base(path, key)
    base = load_base(base_path)
    try:
        model = peft.PeftModel.from_pretrained(base, path).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise UserError(f"{key}: the adapter in '{path}' does not fit its base '{base_path}': "
                        f"{str(error).strip().splitlines()[0]}") from None
    normalization = os.path.join(path, REWARD_NORMALIZATION_FILE)
    if os.path.isfile(normalization):  # an adapter-only reward model: its head was trained, its scale stored here
        with open(normalization, encoding="utf-8") as handle:
            stats = json.load(handle)
        model.config.update(stats)
        model.config.architectures = [type(model).__name__]
    return model


def reward_normalization(config) -> dict[str, float]:
    """A reward model's stored normalisation, for an adapter-only ``final/`` (no config.json to hold it)."""
    return {name: getattr(config, name) for name in ("rlhf_reward_mean", "rlhf_reward_std")
            if getattr(config, name, None) is not None}
