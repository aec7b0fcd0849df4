"""The accelerate launch configs of configs/accelerate/ are accepted by accelerate, and our code takes the
path each one needs.

FSDP and DeepSpeed are GPU engines: accelerate 1.x turns them on only for GPU-type machines (with
ACCELERATE_USE_CPU it runs DDP over gloo instead), and DeepSpeed does not run on this CPU. So here each
file goes through accelerate's own launch-time parsing (what `accelerate launch --config_file` does
before it starts processes), the engine plugin accelerate builds from it is real, and our decisions
(sharded or not, the DeepSpeed batch and clipping fields) are checked against that plugin. The
FSDP2 gathering that sampling relies on is run for real on CPU in tests/e2e/test_fsdp_cpu.py.
"""

from __future__ import annotations

import os
import types

import pytest
from accelerate.utils import DistributedType

from rlhf.training import configure_deepspeed, is_deepspeed, shards_weights

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "configs", "accelerate")
EXPECTED = {  # file: (distributed type, ZeRO stage, offload device)
    "ddp.yaml": (DistributedType.MULTI_GPU, None, None),
    "fsdp.yaml": (DistributedType.FSDP, None, None),
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, 2, "none"),
    "deepspeed_zero3.yaml": (DistributedType.DEEPSPEED, 3, "none"),
    "deepspeed_zero3_offload.yaml": (DistributedType.DEEPSPEED, 3, "cpu"),
}


def launch_environment(path: str) -> tuple[object, dict[str, str]]:
    """The arguments and environment `accelerate launch --config_file path -m rlhf sft` gives its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", path, "-m", "rlhf", "sft"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before its DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return args, env


def stand_in_accelerator(distributed_type, plugin, processes: int = 2):
    """What our engine helpers read of an Accelerator, around the real plugin accelerate built."""
    state = types.SimpleNamespace(deepspeed_plugin=plugin if distributed_type == DistributedType.DEEPSPEED else None,
                                  fsdp_plugin=plugin if distributed_type == DistributedType.FSDP else None)
    return types.SimpleNamespace(distributed_type=distributed_type, state=state, num_processes=processes)


def test_every_launch_config_is_tested():
    assert sorted(f for f in os.listdir(CONFIGS) if f.endswith(".yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_launch_config_is_accepted_and_takes_our_engine_path(name, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    distributed_type, zero_stage, offload = EXPECTED[name]
    args, env = launch_environment(os.path.join(CONFIGS, name))
    assert args.num_processes == 2 and args.mixed_precision == "bf16"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if distributed_type == DistributedType.MULTI_GPU:
        assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
        return
    if distributed_type == DistributedType.FSDP:
        assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["GPT2Block"]
        assert plugin.state_dict_type.name == "FULL_STATE_DICT"  # final/ as one state dict
        accelerator = stand_in_accelerator(distributed_type, plugin)
        assert shards_weights(accelerator) and not is_deepspeed(accelerator)
        return
    plugin = DeepSpeedPlugin()
    ds_config = plugin.deepspeed_config
    assert plugin.zero_stage == zero_stage == ds_config["zero_optimization"]["stage"]
    assert ds_config["zero_optimization"]["offload_optimizer"]["device"] == offload
    assert ds_config["zero_optimization"]["offload_param"]["device"] == offload
    if zero_stage == 3:  # the full state dict can be gathered for final/
        assert ds_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    accelerator = stand_in_accelerator(distributed_type, plugin, processes=4)
    assert is_deepspeed(accelerator)
    assert shards_weights(accelerator) == (zero_stage == 3)  # ZeRO-2 keeps whole weights: nothing to gather
    # We pass no dataloader, so the micro-batch, accumulation and clipping fields are ours to fill.
    assert ds_config["train_micro_batch_size_per_gpu"] == "auto"
    configure_deepspeed(accelerator, micro_batch_size=4, max_grad_norm=0.5)
    assert ds_config["train_micro_batch_size_per_gpu"] == 4
    assert ds_config["gradient_accumulation_steps"] == 1  # our loops accumulate and mark the step boundary
    assert ds_config["train_batch_size"] == 16
    assert ds_config["gradient_clipping"] == 0.5


def test_configure_deepspeed_leaves_other_engines_alone():
    accelerator = stand_in_accelerator(DistributedType.MULTI_GPU, None)
    configure_deepspeed(accelerator, micro_batch_size=4, max_grad_norm=1.0)  # no plugin to touch: no error
    assert not shards_weights(accelerator) and not is_deepspeed(accelerator)
