"""Typed configuration: dataclasses per block, loaded from YAML, overridden from the command line.

Every stage config (``SFTConfig``, later ``RewardConfig`` and ``PPOConfig``) is a dataclass
made of block dataclasses (``ModelConfig``, ``DataConfig``, ``TrainingConfig``,
``LoggingConfig``). ``load_config(cls, path, overrides)`` reads YAML into them, applies
dotted overrides such as ``training.lr=3e-5`` parsed to the field's type, and validates.

Mistakes are reported as ``UserError`` with the dotted key, the value and the fix:
an unknown key names the closest known key, a wrong type names the expected type, an
out-of-range value names the range, a missing file names the path. ``validate()`` collects
every problem before raising, so a user fixes a config in one go.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from rlhf.errors import UserError


def param(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
          min: float | None = None, max: float | None = None, min_exclusive: bool = False,
          path_must_exist: bool = False) -> Any:
    """A dataclass field with its documentation and the checks ``validate`` applies to it.

    Args:
        help: one line saying what the field means (shown in errors and docs).
        min, max: inclusive bounds for numbers (``min_exclusive`` makes the lower one strict).
        path_must_exist: a local path that must exist (hub names are told apart by the loader).
    """
    metadata = {"help": help, "min": min, "max": max, "min_exclusive": min_exclusive,
                "path_must_exist": path_must_exist}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ----------------------------------------------------------------------------- blocks

@dataclass
class ArchitectureConfig:
    """A fresh GPT-2 built from scratch (the tiny CPU default); vocabulary size comes from the tokenizer."""

    n_layer: int = param(4, help="transformer blocks", min=1)
    n_head: int = param(4, help="attention heads per block", min=1)
    n_embd: int = param(128, help="hidden width; must be divisible by n_head", min=1)
    n_positions: int = param(128, help="context size in tokens", min=1)
    dropout: float = param(0.0, help="dropout for residual, embedding and attention", min=0.0, max=1.0)
    activation: Literal["gelu_pytorch_tanh", "gelu_new", "gelu", "relu"] = param("gelu_pytorch_tanh", help=(
        "MLP activation (a transformers ACT2FN name); the default is GPT-2's tanh GELU as one fused kernel, "
        "the same function as 'gelu_new' and ~15 % faster per training step on CPU at the demo's size"))


@dataclass
class LoraConfig:
    """Low-rank adapters (Hu et al. 2021) through peft: the backbone stays frozen and only the adapters
    (and a scalar head) train. Needs ``pip install 'rlhf[peft]'``."""

    rank: int = param(16, help="rank r of each adapter's two matrices", min=1)
    alpha: float = param(32.0, help="scaling numerator: the adapter's update is multiplied by alpha / rank", min=0.0,
                         min_exclusive=True)
    dropout: float = param(0.0, help=(
        "dropout on the adapters' input; PPO needs 0 (train- and eval-mode forwards must agree, docs/ppo.md#35)"),
        min=0.0, max=1.0)
    target_modules: list[str] | None = param(None, help=(
        "module names (or name suffixes) that get adapters; null: every linear layer of the transformer blocks "
        "(peft's 'all-linear': attention and MLP projections, never the output head), for any architecture"))
    save_merged: bool = param(True, help=(
        "final/ holds the adapters merged into a full checkpoint that plain transformers loads, plus the adapter "
        "alone in final/adapter/; false: final/ is the adapter alone (peft format), which the next stage merges "
        "into its base when it loads it"))


@dataclass
class ModelConfig:
    """The shared GPT backbone: a Hugging Face causal LM, or a fresh GPT-2 from ``from_config``."""

    name_or_path: str | None = param(None, help="hub name or local directory of any causal-LM checkpoint")
    from_config: ArchitectureConfig | None = param(None, help="build a fresh GPT-2 with this architecture instead")
    tokenizer: str | None = param(None, help="tokenizer hub name or directory (default: name_or_path)")
    trust_remote_code: bool = param(False, help="run model code shipped with a hub checkpoint (off: it is arbitrary code)")
    revision: str | None = param(None, help="hub revision (branch, tag or commit) to load")
    attn_implementation: str | None = param(None, help=(
        "attention kernel, by transformers' name: null keeps the model's default (sdpa for transformers' own "
        "architectures); eager; sdpa; flash_attention_2 or flash_attention_3 (CUDA, half precision through "
        "training.mixed_precision, pip install 'rlhf[flash-attn]' --no-build-isolation; forwards made in fp32, "
        "such as PPO's sampling, run through sdpa meanwhile; with SFT's training.packing, packed rows run through "
        "flash-attention's variable-length kernel; the reward model's packing needs sdpa or eager); or a "
        "kernels-hub repository (needs the kernels package). In PPO the policy's choice also applies to the "
        "reference, the reward model and the critic"))
    hub_kernels: bool = param(False, help=(
        "let transformers replace layers with kernels fetched from the Hugging Face kernels hub (its use_kernels, "
        "on by default in recent transformers when the kernels package is installed; they are fetched when a "
        "model on a GPU is switched between train and eval, so an offline machine fails). Off: the model's own "
        "layers, the same on every machine"))
    disable_dropout: bool = param(True, help="set every dropout probability to 0 (RLHF practice, docs/ppo.md#35)")
    fused_gelu: bool = param(True, help=(
        "run GPT-2's python tanh GELU ('gelu_new') as torch's fused kernel: the same function up to float "
        "rounding, faster and lighter (measured on CPU); the saved config is not changed"))
    lora: LoraConfig | None = param(None, help=(
        "train low-rank adapters instead of every weight (null: full fine-tuning); the reward model also trains "
        "its scalar head"))


@dataclass
class DataConfig:
    """Where the data comes from and how rows become tokens."""

    path: str = param("", help="hub dataset name, or a local .json/.jsonl/.csv/.parquet file or directory")
    split: str = param("train", help="split to read from path")
    eval_path: str | None = param(None, help="separate evaluation data (same format); default: split off eval_fraction")
    eval_split: str = param("train", help="split to read from eval_path")
    eval_fraction: float = param(0.05, help="share of the training rows held out for evaluation when eval_path is unset", min=0.0, max=0.5)
    columns: dict[str, str] = param(default_factory=dict, help="map from our column names to the dataset's, e.g. {prompt: question}")
    format: Literal["auto", "prompt_response", "messages", "text"] = param(
        "auto", help="row format; auto picks it from the columns present")
    max_length: int = param(512, help="maximum tokens per example (capped at the model's context size)", min=2)
    train_on_prompt: bool = param(False, help="also put loss on prompt/user tokens (default: response tokens only)")
    max_samples: int | None = param(None, help="use only the first N training rows (quick experiments)", min=1)


@dataclass
class TrainingConfig:
    """Optimisation and checkpointing, shared by every stage."""

    seed: int = param(0, help="seed for weights, data order and sampling")
    num_epochs: float = param(1.0, help="passes over the training data (fractions allowed)", min=0.0, min_exclusive=True)
    max_steps: int | None = param(None, help="stop after this many optimizer steps (overrides num_epochs)", min=1)
    batch_size: int = param(8, help="examples per device per micro-batch", min=1)
    gradient_accumulation_steps: int = param(1, help="micro-batches per optimizer step", min=1)
    group_by_length: bool = param(False, help=(
        "SFT and RM: batch examples of similar length (each epoch's shuffled order is cut into windows of 50 "
        "batches, each sorted by length) so less compute goes to padding; changes which examples share a batch"))
    packing: bool = param(False, help=(
        "SFT and RM: put each micro-batch's examples into as few rows of at most data.max_length tokens as they fit "
        "(SFT: position ids restart at each example; no token attends across examples) instead of padding every row "
        "to the longest: the same loss and gradients up to float rounding, less compute on padding. Needs a "
        "model whose attention reads packed position ids (transformers' own architectures; checked when "
        "training starts). RM: an example is its prompt (once with prefix_sharing) and its responses, each response "
        "seeing only the prompt and itself through a 4D attention mask the model must apply (also checked). PPO pads "
        "its batches"))
    fused_cross_entropy: bool = param(False, help=(
        "SFT: compute the loss from the last hidden states and the output layer in chunks, each chunk's logits "
        "turned into their gradient at once (a fused linear cross-entropy, as Liger-Kernel's, in torch operations): "
        "the full logits are never kept, less memory and one pass over them, the same loss and gradients up to float "
        "rounding. Needs a plain linear output layer whose output is the logits (checked when training starts); "
        "not with FSDP or DeepSpeed ZeRO-3, whose output layer is sharded outside the forward"))
    trim_last_block: bool = param(True, help=(
        "run the last transformer block's feed-forward only at the positions whose output is read: SFT the positions "
        "that predict a trained token, the reward model each response's EOS (and none of a shared prompt, of which "
        "only the key/value cache is read); in PPO the policy and the reference the positions that predict a response "
        "token, the critic the states before them, the reward model each episode's EOS. The same outputs up to float "
        "rounding, about 8·d² of the block's 12·d² weights per skipped position left out. Checked on the model "
        "when training starts (a model it does not fit runs untrimmed); off under compile, gradient_checkpointing "
        "and sharded weights (FSDP, ZeRO-3)"))
    eval_batch_size: int | None = param(None, help="examples per device when evaluating (default: batch_size)", min=1)
    lr: float = param(5e-5, help="peak learning rate", min=0.0)
    weight_decay: float = param(0.0, help="AdamW decoupled weight decay", min=0.0)
    adam_beta1: float = param(0.9, help="AdamW beta1", min=0.0, max=1.0)
    adam_beta2: float = param(0.999, help="AdamW beta2", min=0.0, max=1.0)
    adam_eps: float = param(1e-8, help="AdamW epsilon", min=0.0, min_exclusive=True)
    gradient_checkpointing: bool = param(False, help=(
        "recompute each transformer block's activations in the backward pass instead of keeping them (torch's "
        "non-reentrant checkpointing): much less activation memory for about a third more compute; the same "
        "gradients. PPO: the trained models only"))
    compile: bool = param(False, help=(
        "compile each transformer block of the trained models (and PPO's frozen ones) with torch.compile "
        "(inductor; regional compilation): fused elementwise kernels, the same loss up to float rounding. "
        "Compilation costs seconds to minutes on the first steps and on each new shape family, so it pays on "
        "long runs and on GPUs; measured on a 2-core CPU it did not (docs/benchmark.md). CPU needs a C++ compiler"))
    compile_mode: Literal["default", "max-autotune-no-cudagraphs"] = param("default", help=(
        "torch.compile mode with training.compile (max-autotune-no-cudagraphs: inductor also times kernel variants, "
        "longer to compile). The CUDA-graph modes (reduce-overhead, max-autotune) are not offered: the blocks share "
        "one compiled graph, and on a GPU each block's replay overwrote the output the block before had returned "
        "(torch raised at the first forward, seen on an H200)"))
    fused_optimizer: bool = param(True, help=(
        "use torch's fused AdamW kernel where the device has one (CPU, CUDA): the same update up to float rounding, "
        "several times faster on CPU; false: torch's default AdamW"))
    keep_freed_memory: bool = param(True, help=(
        "while the trainer runs, glibc's malloc keeps freed memory for reuse (mallopt: no mmap per block, no trimming "
        "of the heap) instead of giving it back to the system each step, where every page would be faulted in "
        "again: on a CPU, 3.3 million page faults and 8 s of kernel time less per SFT benchmark run (+8 %), peak "
        "memory +6 %. Set back and trimmed when train() returns. No effect on other C libraries or when the "
        "environment tunes malloc (MALLOC_* variables, GLIBC_TUNABLES, a preloaded jemalloc/tcmalloc)"))
    lr_scheduler: Literal["cosine", "linear", "constant"] = param("cosine", help="decay after warmup")
    warmup_ratio: float = param(0.0, help="share of the steps spent warming the lr up linearly from 0", min=0.0, max=1.0)
    min_lr_ratio: float = param(0.0, help="final lr as a share of lr, for cosine and linear decay", min=0.0, max=1.0)
    max_grad_norm: float | None = param(1.0, help="clip the global gradient norm to this (null: no clipping)", min=0.0, min_exclusive=True)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = param(
        "auto", help="auto = bf16 on a GPU that supports it, fp32 otherwise")
    log_every: int = param(10, help="optimizer steps between metric lines", min=1)
    eval_every: int | None = param(None, help="optimizer steps between evaluations (null: at the end only)", min=1)
    save_every: int | None = param(None, help="optimizer steps between resumable checkpoints (null: none)", min=1)
    keep_checkpoints: int = param(2, help="newest checkpoints kept on disk", min=1)


@dataclass
class LoggingConfig:
    """Trackers and samples."""

    report_to: list[str] = param(default_factory=list, help="trackers through accelerate: tensorboard, wandb")
    project: str = param("rlhf", help="tracker project name")
    run_name: str | None = param(None, help="tracker run name (default: the output directory's name)")
    num_samples: int = param(4, help="eval prompts to sample from at the end, written to samples.jsonl", min=0)
    max_new_tokens: int = param(64, help="tokens generated per sample", min=1)


@dataclass
class SFTConfig:
    """Stage 1: supervised fine-tuning on demonstrations."""

    output_dir: str = param("runs/sft", help="run directory (config.yaml, metrics.jsonl, checkpoints/, final/)")
    overwrite: bool = param(False, help="replace a finished or started run in output_dir instead of refusing")
    model: ModelConfig = param(default_factory=ModelConfig, help="the policy backbone")
    data: DataConfig = param(default_factory=DataConfig, help="demonstrations")
    training: TrainingConfig = param(default_factory=TrainingConfig, help="optimisation")
    logging: LoggingConfig = param(default_factory=LoggingConfig, help="trackers and samples")

    def validate(self, model_given: bool = False, data_given: bool = False) -> None:
        """Check every field; ``model_given``/``data_given``: the trainer got them as objects, so the
        ``model:`` block and ``data.path`` may stay empty."""
        problems = collect_field_problems(self)
        if not model_given:
            problems += model_problems(self.model, "model")
        problems += attention_problems(self.model, self.training, "model")
        if not self.data.path and not data_given:
            problems.append("data.path: required; give a hub dataset name or a local data file")
        if problems:
            raise UserError("; ".join(problems))


# ----------------------------------------------------------------------------- reward model (stage 2)

# Our column names in preference data (data.columns maps them to the dataset's); see rlhf/preference.py.
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected", "responses", "ranking", "margin")


@dataclass
class PreferenceDataConfig:
    """Human comparisons: ``{prompt, chosen, rejected}``, HH conversations, or K-way rankings."""

    path: str = param("", help="hub dataset name, or a local .json/.jsonl/.csv/.parquet file or directory")
    split: str = param("train", help="split to read from path")
    eval_path: str | None = param(None, help="separate evaluation comparisons (same format); default: split off eval_fraction")
    eval_split: str = param("train", help="split to read from eval_path")
    eval_fraction: float = param(0.05, help="share of the training prompts held out for evaluation when eval_path is unset",
                                 min=0.0, max=0.5)
    columns: dict[str, str] = param(default_factory=dict, help=(
        "map from our column names (prompt, chosen, rejected, responses, ranking, margin) to the dataset's"))
    format: Literal["auto", "pairwise", "conversation", "ranking"] = param("auto", help=(
        "pairwise {prompt, chosen, rejected}; conversation {chosen, rejected} sharing the prompt as prefix; "
        "ranking {prompt, responses, ranking} best first; auto picks it from the columns present"))
    max_length: int = param(512, help=(
        "maximum tokens of prompt + response + EOS; longer responses are never truncated (the score must be read "
        "at the EOS) but dropped with their pairs and counted (capped at the model's context size)"), min=2)
    max_samples: int | None = param(None, help="use only the first N training rows (quick experiments)", min=1)
    assistant_marker: str = param("\n\nAssistant:", help=(
        "conversation format: the prompt ends after the last such marker inside the shared prefix "
        "(otherwise at the last whitespace before the texts differ)"))
    group_by_prompt: bool = param(True, help=(
        "merge rows with the same prompt into one example: each response is scored once and the prompt's "
        "pairs are averaged, so a prompt counts once (InstructGPT)"))


@dataclass
class NormalizationConfig:
    """Centring (and scaling) the trained reward so the reference responses score mean 0 (docs/ppo.md#6)."""

    set: str = param("eval", help=(
        "eval: the eval prompts with their chosen responses; train: same on the training data; "
        "a .json/.jsonl/.csv/.parquet file of {prompt, response} rows (e.g. the SFT demonstrations); none: no normalisation"))
    scale: bool = param(False, help="also divide by the standard deviation on that set (std 1), not only centre")
    max_samples: int | None = param(None, help="use at most this many responses of the set", min=1)


@dataclass
class RewardConfig:
    """Stage 2: a reward model trained on human comparisons with the pairwise ranking loss."""

    output_dir: str = param("runs/rm", help="run directory (config.yaml, metrics.jsonl, checkpoints/, final/)")
    overwrite: bool = param(False, help="replace a finished or started run in output_dir instead of refusing")
    model: ModelConfig = param(default_factory=lambda: ModelConfig(name_or_path="runs/sft/final"),
                               help="backbone to start from (default: the SFT stage's final/); the scalar head is new "
                               "unless head_init is keep")
    head_init: Literal["normal", "keep"] = param("normal", help=(
        "normal: a new scalar head, N(0, 1/sqrt(d+1)) (docs/ppo.md#3); keep: the trained head of model.name_or_path, "
        "which must then be a reward model (a one-label sequence-classification checkpoint): continue training it"))
    data: PreferenceDataConfig = param(default_factory=PreferenceDataConfig, help="comparisons")
    training: TrainingConfig = param(default_factory=TrainingConfig, help=(
        "optimisation; batch_size counts prompts (each with all its responses and pairs), and "
        "InstructGPT trains a single epoch: more overfits"))
    logging: LoggingConfig = param(default_factory=LoggingConfig, help=(
        "trackers; num_samples eval prompts are written with their responses' rewards to samples.jsonl"))
    normalization: NormalizationConfig = param(default_factory=NormalizationConfig, help="reward centring after training")
    center_rewards_coef: float = param(0.0, help=(
        "weight of an auxiliary loss, the squared mean reward of each prompt's responses (Eisenstein et al. 2023; "
        "TRL's center_rewards_coefficient up to a factor 4): the ranking loss leaves each prompt's reward level free, "
        "and PPO would see that level as reward noise; 0 turns it off"), min=0.0)
    prefix_sharing: bool = param(True, help=(
        "run each prompt through the model once and its responses on the prompt's key/value cache, instead of "
        "every response as a full prompt + response sequence: less compute, the same rewards up to float rounding"))

    def validate(self, model_given: bool = False, data_given: bool = False) -> None:
        """Check every field; ``model_given``/``data_given``: the trainer got them as objects, so the
        ``model:`` block and ``data.path`` may stay empty."""
        problems = collect_field_problems(self)
        if not model_given:
            problems += model_problems(self.model, "model")
            if self.head_init == "keep" and self.model.from_config is not None:
                problems.append("head_init: keep needs a trained reward model in model.name_or_path, not from_config")
        problems += attention_problems(self.model, self.training, "model", packs_with_mask=True)
        if not self.data.path and not data_given:
            problems.append("data.path: required; give a hub dataset name or a local preference data file")
        for ours in self.data.columns:
            if ours not in PREFERENCE_COLUMNS:
                close = difflib.get_close_matches(ours, PREFERENCE_COLUMNS, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"expected one of {', '.join(PREFERENCE_COLUMNS)}"
                problems.append(f"data.columns.{ours}: not a preference column; {hint}")
        norm_set = self.normalization.set
        if norm_set not in ("eval", "train", "none") and not os.path.exists(norm_set):
            problems.append(f"normalization.set: '{norm_set}' is not eval, train or none, and no such file exists")
        if norm_set == "eval" and not data_given and not self.data.eval_path and self.data.eval_fraction == 0:
            problems.append("normalization.set: 'eval' needs evaluation data; set data.eval_path or "
                            "data.eval_fraction > 0, or use normalization.set=train")
        if self.normalization.scale and norm_set == "none":
            problems.append("normalization.scale: true needs a normalization.set other than none")
        if self.training.fused_cross_entropy:
            problems.append("training.fused_cross_entropy: SFT only; the reward model has no vocabulary loss "
                            "(set it to false)")
        if self.prefix_sharing and self.training.gradient_checkpointing and not self.training.packing:
            # Packed, a prompt and its responses run as one segment under a mask: no cache to keep.
            problems.append("prefix_sharing: the responses attend to their prompt's key/value cache, which "
                            "gradient checkpointing does not keep; set prefix_sharing=false or "
                            "training.packing=true to use training.gradient_checkpointing")
        if problems:
            raise UserError("; ".join(problems))


# ----------------------------------------------------------------------------- cross-field checks

def model_problems(model: ModelConfig, prefix: str) -> list[str]:
    """The checks every stage makes on its ``model:`` block."""
    problems = []
    if (model.name_or_path is None) == (model.from_config is None):
        problems.append(f"{prefix}: give exactly one of name_or_path (a checkpoint) or from_config (a fresh GPT-2)")
    if model.from_config is not None:
        if model.tokenizer is None:
            problems.append(f"{prefix}.tokenizer: required with from_config (a fresh model has no tokenizer)")
        arch = model.from_config
        if arch.n_embd % arch.n_head:
            problems.append(f"{prefix}.from_config.n_embd: {arch.n_embd} is not divisible by n_head={arch.n_head}")
    if model.attn_implementation is not None and not model.attn_implementation.strip():
        problems.append(f"{prefix}.attn_implementation: empty; give a name such as sdpa, eager or flash_attention_2, "
                        "or null for the model's default")
    return problems


def half_precision_only(attn_implementation: str | None) -> bool:
    """Whether transformers' attention implementation of that name is a flash-attention kernel (flash_attention_2/3,
    a kernels-hub flash repository): those compute in fp16/bf16 only and apply no 4D mask."""
    return "flash" in (attn_implementation or "")


def attention_problems(model: ModelConfig, training: TrainingConfig, prefix: str,
                       packs_with_mask: bool = False) -> list[str]:
    """``{prefix}.attn_implementation`` against the rest: flash-attention kernels compute in fp16/bf16 only
    and apply no 4D mask (``packs_with_mask``: the reward model's packed rows need one)."""
    name = model.attn_implementation
    if not half_precision_only(name):
        return []
    problems = []
    if training.mixed_precision == "no":
        problems.append(f"{prefix}.attn_implementation: {name} computes in fp16/bf16 only; set "
                        "training.mixed_precision to bf16 (or fp16, or auto on a GPU that has bf16)")
    if packs_with_mask and training.packing:
        problems.append(f"{prefix}.attn_implementation: {name} applies no 4D attention mask, which the reward "
                        "model's packed rows need; use sdpa or eager, or set training.packing=false")
    return problems


def collect_field_problems(config: Any, prefix: str = "") -> list[str]:
    """Range and path checks declared with ``param(min=..., max=..., path_must_exist=...)``."""
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            problems += collect_field_problems(value, key + ".")
            continue
        if value is None or isinstance(value, bool):
            continue
        low, high = f.metadata.get("min"), f.metadata.get("max")
        if isinstance(value, (int, float)):
            if low is not None and (value < low or (f.metadata.get("min_exclusive") and value == low)):
                relation = ">" if f.metadata.get("min_exclusive") else ">="
                problems.append(f"{key}: {value} is out of range; expected {relation} {low}")
            elif high is not None and value > high:
                problems.append(f"{key}: {value} is out of range; expected <= {high}")
        if f.metadata.get("path_must_exist") and isinstance(value, str) and not os.path.exists(value):
            problems.append(f"{key}: file '{value}' not found")
    return problems


# ----------------------------------------------------------------------------- loading

def load_config(config_class: type, path: str | None = None, overrides: list[str] | None = None) -> Any:
    """Read a YAML file into ``config_class``, apply ``key.sub=value`` overrides, validate.

    Args:
        config_class: a stage config dataclass, e.g. ``SFTConfig``.
        path: YAML file; None starts from the defaults.
        overrides: dotted assignments, each value parsed as YAML then checked against the field's type.
    """
    config = resolve_config(config_class, path, overrides)
    config.validate()
    return config


def read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise UserError(f"config file '{path}' not found")
    with open(path, encoding="utf-8") as handle:
        try:
            raw = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise UserError(f"{path}: not valid YAML{where}: {getattr(error, 'problem', error)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of config blocks at the top level, found {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set ``a.b.c=value`` inside the nested dict ``raw`` (value parsed as YAML: 3e-5, true, [a, b])."""
    if "=" not in override:
        raise UserError(f"override '{override}': expected key.sub=value")
    dotted_key, _, text = override.partition("=")
    keys = dotted_key.strip().split(".")
    if not all(keys):
        raise UserError(f"override '{override}': empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def from_dict(config_class: type, raw: Any, source: str, prefix: str = "") -> Any:
    """Build ``config_class`` from nested dicts, checking every key and type."""
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise UserError(f"{source}: {where}: expected a mapping, found {describe(raw)}")
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known keys: {', '.join(fields)}"
            raise UserError(f"{source}: unknown key '{prefix}{key}'{hint}")
    values = {name: coerce(hints[name], raw[name], source, f"{prefix}{name}") for name in fields if name in raw}
    return config_class(**values)


def coerce(expected: Any, value: Any, source: str, key: str) -> Any:
    """Check ``value`` against the type annotation ``expected`` and convert where lossless."""
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return coerce(option, value, source, key)
            except UserError as error:
                errors.append(error)
        if len(options) == 1:
            raise errors[0]
        raise UserError(f"{source}: {key}: expected {type_name(expected)}, got {describe(value)}")
    if dataclasses.is_dataclass(expected):
        if value is None:
            raise UserError(f"{source}: {key}: expected a mapping, got null")
        return from_dict(expected, value, source, key + ".")
    if origin is Literal:
        if isinstance(value, bool) and not any(isinstance(a, bool) for a in args):
            # YAML 1.1 reads a bare no/off/yes/on as a boolean: `mixed_precision: no` means the choice 'no'.
            spellings = ("no", "off", "false") if value is False else ("yes", "on", "true")
            value = next((a for a in args if a in spellings), value)
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UserError(f"{source}: {key}: '{value}' is not one of {', '.join(map(str, args))}{hint}")
        return value
    if origin is list:
        if isinstance(value, (str, tuple)):
            value = [value] if isinstance(value, str) else list(value)
        if not isinstance(value, list):
            raise UserError(f"{source}: {key}: expected a list, got {describe(value)}")
        return [coerce(args[0], item, source, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise UserError(f"{source}: {key}: expected a mapping, got {describe(value)}")
        return {coerce(args[0], k, source, key): coerce(args[1], v, source, f"{key}.{k}") for k, v in value.items()}
    if expected is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{source}: {key}: expected true or false, got {describe(value)}")
    if expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise UserError(f"{source}: {key}: expected an integer, got {describe(value)}")
    if expected is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML reads 3e-5 (no dot) as a string
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{source}: {key}: expected a number, got {describe(value)}")
    if expected is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{source}: {key}: expected a string, got {describe(value)}")
    if expected is Any:
        return value
    raise TypeError(f"unsupported config type {expected!r} for {key}")  # our bug, not the user's


def describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}" if value is not None else "null"


def type_name(expected: Any) -> str:
    args = [a for a in typing.get_args(expected) if a is not type(None)]
    return " or ".join(getattr(a, "__name__", str(a)) for a in args)


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain nested dicts (for config.yaml and trackers)."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str) -> None:
    """Write the fully resolved config, commented; ``rlhf <stage> --config path`` re-launches the same run."""
    tmp_path = f"{path}.tmp"
    with open(tmp_path, "w", encoding="utf-8") as handle:
        handle.write(to_commented_yaml(config, header=f"The resolved {type(config).__name__} of this run."))
    os.replace(tmp_path, path)


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'training': {'lr': 1}} -> {'training.lr': 1}`` for tracker hparams, which take only scalars:
    blocks and mappings are flattened, None and lists become strings."""
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float, str, bool)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


# ----------------------------------------------------------------------------- PPO (stage 3)

@dataclass
class RewardSourceConfig:
    """Where episode scores come from: a trained reward model, or a Python function."""

    model_path: str | None = param(None, help="reward model final/ (its stored normalisation is applied)")
    function: str | None = param(None, help="'module:function' called as f(prompts, responses) -> list of floats")


@dataclass
class CriticConfig:
    """The value model: the backbone plus a scalar head read at every token."""

    init: Literal["reward", "policy"] = param(
        "reward", help="reward: start from the reward model (default); policy: the SFT policy with a zero head")
    name_or_path: str | None = param(None, help="initialise from this checkpoint instead (a reward-model final/)")
    lora: LoraConfig | None = param(None, help=(
        "train adapters (and a copy of the scalar head) instead of every weight; started from the reward model, "
        "the critic then shares the reward model's weights: the reward is the same model with the adapters off"))


@dataclass
class PromptDataConfig:
    """Prompts for rollouts: ``{prompt}`` rows, ``{messages}`` chats, or HH-style conversations."""

    path: str = param("", help="hub dataset name, or a local .json/.jsonl/.csv/.parquet file or directory")
    split: str = param("train", help="split to read from path")
    columns: dict[str, str] = param(default_factory=dict, help="map from our column names to the dataset's")
    format: Literal["auto", "prompt", "messages", "conversation"] = param("auto", help=(
        "prompt: {prompt} texts; messages: {messages} chats (chat template + generation prompt); conversation: "
        "{chosen[, rejected]} whole conversations (preference data such as Anthropic HH), the prompt being the "
        "conversation up to and including its last assistant_marker, as the reward model splits it; auto picks "
        "from the columns present"))
    assistant_marker: str = param("\n\nAssistant:", help=(
        "conversation format: the turn marker the prompt ends with (the policy writes the assistant's answer)"))
    max_prompt_length: int = param(64, help="prompts longer than this many tokens are skipped (counted)", min=1)
    max_samples: int | None = param(None, help="use only the first N prompts", min=1)


@dataclass
class SamplingConfig:
    """How the policy samples responses during rollouts (docs/ppo.md#9 to #14)."""

    max_new_tokens: int = param(32, help="response length limit in tokens", min=1)
    temperature: float = param(0.7, help="sampling temperature; logprobs everywhere use the same one", min=0.0, min_exclusive=True)
    top_k: int = param(0, help="0 = off; anything else changes the behaviour distribution (docs/ppo.md#9)", min=0)
    top_p: float = param(1.0, help="1.0 = off", min=0.0, max=1.0, min_exclusive=True)
    missing_eos_penalty: float | None = param(
        1.0, help="subtracted from the score of a response that never emits EOS (null: none)")
    cpu_packed_weights: bool = param(True, help=(
        "on a CPU, decode through oneDNN with the policy's fp32 linear weights packed once per rollout (the "
        "benchmark's sampling 20 % faster; a second copy of those weights while sampling). No effect on a GPU, "
        "in mixed precision or with training.compile; the same tokens up to float rounding"))


@dataclass
class PPOHyperparameters:
    """The algorithm's knobs (defaults: docs/ppo.md#defaults, after N+/TRL)."""

    rollout_batch_size: int = param(64, help="episodes sampled per PPO step", min=1)
    forward_batch_size: int = param(16, help=(
        "episodes per scoring forward (policy, reference, critic, reward) and, unless generation_batch_size says "
        "otherwise, per generation: the memory knob, no effect on the result"), min=1)
    generation_batch_size: int | None = param(None, help=(
        "episodes decoded together (null: forward_batch_size). Decoding is bound by reading the weights once per "
        "token, so the whole rollout at once (= rollout_batch_size) is fastest where its key/value cache fits"),
        min=1)
    num_ppo_epochs: int = param(4, help="passes over each rollout batch", min=1)
    num_minibatches: int = param(1, help="minibatches (optimizer steps) per epoch", min=1)
    gamma: float = param(1.0, help="discount", min=0.0, max=1.0)
    lam: float = param(0.95, help="GAE lambda", min=0.0, max=1.0)
    clip_eps: float = param(0.2, help="policy ratio clip ε", min=0.0, min_exclusive=True)
    value_clip_eps: float = param(0.2, help="value clip ε_v, in reward units", min=0.0, min_exclusive=True)
    vf_coef: float = param(0.1, help="value loss coefficient c_v", min=0.0)
    entropy_coef: float = param(0.0, help="entropy bonus coefficient (0 in the references; logged anyway)", min=0.0)
    kl_coef: float = param(0.05, help="β: per-token KL penalty in the reward (initial value when adaptive)", min=0.0)
    kl_estimator: Literal["k1", "k2", "k3"] = param("k1", help="per-token KL estimator in the reward (docs/ppo.md#18)")
    adaptive_kl: bool = param(False, help="adapt β with the proportional controller of Ziegler et al.")
    target_kl: float = param(6.0, help="target summed KL per sequence for the adaptive controller", min=0.0, min_exclusive=True)
    kl_horizon: int = param(10000, help="controller horizon in episodes", min=1)
    whiten_advantages: bool = param(True, help="normalise advantages over the rollout batch")
    logprobs_from_generation: bool | None = param(None, help=(
        "take rollout logprobs from sampling instead of a second policy forward (needs top_k=0, top_p=1); "
        "default (null): from sampling when top_k=0, top_p=1 and training runs in fp32, where the two agree to "
        "float rounding (docs/ppo.md#37), else a forward under the training precision"))
    ptx_coef: float = param(0.0, help="γ_ptx: weight of the pretraining/SFT NLL term (PPO-ptx, InstructGPT)", min=0.0)
    ptx_data: str | None = param(None, help="SFT-format data file for the ptx term")
    ptx_batch_size: int = param(8, help="ptx examples per minibatch", min=1)
    separate_optimizers: bool = param(True, help="separate AdamW for critic (critic_lr) instead of one for both")
    critic_lr: float | None = param(None, help="critic learning rate (default: training.lr)", min=0.0)


@dataclass
class PPOConfig:
    """Stage 3: PPO against a reward model (or function) with a KL penalty to the frozen SFT reference."""

    output_dir: str = param("runs/ppo", help="run directory (config.yaml, metrics.jsonl, samples.jsonl, checkpoints/, final/)")
    overwrite: bool = param(False, help="replace a finished or started run in output_dir instead of refusing")
    policy: ModelConfig = param(default_factory=ModelConfig, help="the SFT policy (also the frozen reference)")
    reward: RewardSourceConfig = param(default_factory=RewardSourceConfig, help="the score of an episode")
    critic: CriticConfig = param(default_factory=CriticConfig, help="the value model")
    data: PromptDataConfig = param(default_factory=PromptDataConfig, help="prompts")
    sampling: SamplingConfig = param(default_factory=SamplingConfig, help="rollout sampling")
    ppo: PPOHyperparameters = param(default_factory=PPOHyperparameters, help="algorithm")
    training: TrainingConfig = param(default_factory=TrainingConfig, help=(
        "optimisation: lr, schedule, clipping, seed, checkpoints; batch_size = episodes per micro-batch of the "
        "update (gradient accumulation inside a minibatch); max_steps or num_epochs (over the prompts) bound the run"))
    logging: LoggingConfig = param(default_factory=LoggingConfig, help="trackers and samples.jsonl")

    def validate(self) -> None:
        problems = collect_field_problems(self)
        problems += model_problems(self.policy, "policy")
        problems += attention_problems(self.policy, self.training, "policy")
        if not self.data.path:
            problems.append("data.path: required; give a prompt dataset")
        if (self.reward.model_path is None) == (self.reward.function is None):
            problems.append("reward: give exactly one of model_path (a reward model) or function ('module:function')")
        if self.reward.function is not None and ":" not in self.reward.function:
            problems.append(f"reward.function: '{self.reward.function}' is not of the form module:function")
        if self.critic.init == "reward" and self.critic.name_or_path is None and self.reward.model_path is None:
            problems.append("critic.init: 'reward' needs reward.model_path (or critic.name_or_path); "
                            "with a reward function use critic.init=policy")
        ppo = self.ppo
        if ppo.rollout_batch_size % ppo.num_minibatches:
            problems.append(f"ppo.num_minibatches: rollout_batch_size={ppo.rollout_batch_size} is not divisible by "
                            f"num_minibatches={ppo.num_minibatches}")
        else:
            minibatch = ppo.rollout_batch_size // ppo.num_minibatches
            if minibatch % self.training.batch_size:
                problems.append(f"training.batch_size: the minibatch of {minibatch} episodes is not divisible by "
                                f"batch_size={self.training.batch_size}")
        if ppo.logprobs_from_generation and (self.sampling.top_k or self.sampling.top_p < 1.0):
            problems.append("ppo.logprobs_from_generation: only valid with top_k=0 and top_p=1 (docs/ppo.md#37)")
        if ppo.ptx_coef > 0 and not ppo.ptx_data:
            problems.append("ppo.ptx_data: required when ppo.ptx_coef > 0")
        if self.training.packing:
            problems.append("training.packing: SFT only; PPO pads its rollouts (set it to false)")
        if self.training.fused_cross_entropy:
            problems.append("training.fused_cross_entropy: SFT only (set it to false)")
        if self.training.gradient_accumulation_steps != 1:
            problems.append("training.gradient_accumulation_steps: PPO derives accumulation from "
                            "ppo.num_minibatches and training.batch_size; leave it at 1")
        for key, lora in (("policy.lora", self.policy.lora), ("critic.lora", self.critic.lora)):
            if lora is not None and lora.dropout > 0:
                problems.append(f"{key}.dropout: {lora.dropout} makes train- and eval-mode forwards differ, so the "
                                "first PPO ratio is not 1 (docs/ppo.md#35); use 0")
        if problems:
            raise UserError("; ".join(problems))


# ----------------------------------------------------------------------------- pipeline

@dataclass
class FeedbackConfig:
    """Where the reward model's comparisons come from: a simulated labeler, or a file written by people."""

    source: Literal["simulated", "file"] = param("simulated", help="simulated: sample from the policy and label; file: use `file`")
    file: str | None = param(None, help="preference data written by people (any RM data format), for source=file")
    labeler: str = param("rlhf.demo.labeler:label_pairs", help=(
        "'module:function' labelling K responses per prompt: f(prompts, responses_per_prompt, rng, noise_temperature, k)"))
    prompts: str = param("data/demo/prompts_train.jsonl", help="prompts to sample responses for")
    eval_prompts: str = param("data/demo/prompts_eval.jsonl", help="held-out prompts: RM agreement and the final evaluation")
    num_prompts: int = param(600, help="prompts labelled per round", min=1)
    responses_per_prompt: int = param(2, help="K responses sampled per prompt (K > 2 gives rankings)", min=2)
    noise_temperature: float = param(0.15, help="Bradley-Terry label noise (0 = noiseless)", min=0.0)
    eval_responses_per_prompt: int = param(4, help=(
        "responses sampled per held-out prompt; every pair of them is compared without noise, so K gives up to "
        "K(K-1)/2 held-out pairs per prompt (RM agreement with the gold labeler)"), min=2)
    temperature: float | None = param(None, help=(
        "sampling temperature for the responses to label (null: ppo.sampling.temperature, so the reward model "
        "learns to rank the responses PPO will sample)"), min=0.0, min_exclusive=True)
    max_new_tokens: int = param(48, help="response length limit when sampling", min=1)
    batch_size: int = param(64, help="prompts per sampling batch", min=1)


@dataclass
class EvaluationConfig:
    """Held-out comparison of the SFT and PPO policies by the gold scorer."""

    gold: str | None = param("rlhf.demo.gold:gold_reward", help="'module:function' gold scorer (null: skip gold metrics)")
    num_prompts: int = param(160, help="held-out prompts evaluated", min=1)
    samples_per_prompt: int = param(1, help=(
        "responses sampled per prompt and policy; more give a more precise mean (its standard error is taken "
        "over the prompts' means, as samples of one prompt are not independent)"), min=1)
    temperature: float = param(0.7, help="sampling temperature of the evaluated policies", min=0.0, min_exclusive=True)
    max_new_tokens: int = param(48, help="response length limit", min=1)


@dataclass
class IterationConfig:
    """How rounds after the first (``rounds`` > 1) train their reward model."""

    reward_model: Literal["retrain", "continue"] = param("retrain", help=(
        "retrain: a new reward model from the SFT model on all comparisons so far (rm.training as in round 0); "
        "continue: the previous round's reward model, head included, trained further on all comparisons so far"))
    rm_epochs: float | None = param(None, help=(
        "RM epochs over all comparisons so far in rounds after the first (null: rm.training.num_epochs)"),
        min=0.0, min_exclusive=True)


@dataclass
class PipelineConfig:
    """SFT -> reward model -> PPO, chained; each stage reads the previous one's final/."""

    output_dir: str = param("runs/pipeline", help="holds sft/, round-N/{feedback,rm,ppo}/, evaluation.json, report.md")
    rounds: int = param(1, help="iterations of (collect comparisons, train RM, run PPO) after SFT", min=1)
    seed: int | None = param(None, help="if set, the seed of every stage (and of sampling and labelling)")
    sft: SFTConfig = param(default_factory=SFTConfig, help="stage 1 (its output_dir is replaced by <output_dir>/sft)")
    rm: RewardConfig = param(default_factory=RewardConfig, help="stage 2 (model and data paths are filled in by the pipeline)")
    ppo: PPOConfig = param(default_factory=PPOConfig, help="stage 3 (policy, reward and critic paths are filled in)")
    feedback: FeedbackConfig = param(default_factory=FeedbackConfig, help="comparisons for the reward model")
    evaluation: EvaluationConfig = param(default_factory=EvaluationConfig, help="held-out evaluation")
    iteration: IterationConfig = param(default_factory=IterationConfig, help="rounds after the first (rounds > 1)")

    def validate(self) -> None:
        problems = collect_field_problems(self)
        problems += model_problems(self.sft.model, "sft.model")
        if not self.sft.data.path:
            problems.append("sft.data.path: required")
        if self.feedback.source == "file" and not self.feedback.file:
            problems.append("feedback.file: required with feedback.source=file")
        if self.feedback.source == "file" and self.rounds > 1:
            problems.append("rounds: a fixed preference file cannot be re-collected; use rounds=1 or source=simulated")
        for key, spec in (("feedback.labeler", self.feedback.labeler), ("evaluation.gold", self.evaluation.gold)):
            if spec is not None and ":" not in spec:
                problems.append(f"{key}: '{spec}' is not of the form module:function")
        if problems:
            raise UserError("; ".join(problems))


# ----------------------------------------------------------------------------- documentation: --help, --print-config

@dataclass(frozen=True)
class KeyDoc:
    """One config key as the command line documents it."""

    key: str              # dotted, e.g. "training.lr"
    type: str             # "float", "str or null", "one of cosine | linear | constant", "block"
    value: Any            # the value in the documented config (a default, or a resolved value)
    help: str
    is_block: bool        # a nested block (its keys follow it)
    summary: str | None   # for a block documented elsewhere: where (the pipeline's stage blocks)


def block_class(expected: Any) -> type | None:
    """The dataclass of a block field (``ArchitectureConfig | None`` -> ``ArchitectureConfig``), else None."""
    options = [a for a in typing.get_args(expected) if a is not type(None)] or [expected]
    return next((a for a in options if dataclasses.is_dataclass(a)), None)


def type_text(expected: Any) -> str:
    """How ``--help`` names a field's type: 'int', 'str or null', 'one of a | b', 'list of str'..."""
    origin, args = typing.get_origin(expected), typing.get_args(expected)
    if origin in (typing.Union, types.UnionType):
        options = [type_text(a) for a in args if a is not type(None)]
        return " or ".join(options) + (" or null" if type(None) in args else "")
    if origin is Literal:
        return "one of " + " | ".join(map(str, args))
    if origin is list:
        return f"list of {type_text(args[0])}"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}"
    if dataclasses.is_dataclass(expected):
        return "block"
    return getattr(expected, "__name__", str(expected))


def key_docs(config: Any, prefix: str = "", summarized: dict[str, str] | None = None) -> list[KeyDoc]:
    """Every key of ``config`` (a config dataclass instance) in declaration order, blocks before their keys.

    An optional block that is null (``model.from_config``) is documented with its class's defaults,
    so every key can be found. ``summarized`` maps a top-level block name to a line that stands for
    its keys (the pipeline's ``sft``/``rm``/``ppo`` blocks are documented by each stage's --help).
    """
    docs = []
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        key, value, expected = f"{prefix}{f.name}", getattr(config, f.name), hints[f.name]
        nested = block_class(expected)
        summary = (summarized or {}).get(key)
        docs.append(KeyDoc(key, type_text(expected), value, f.metadata.get("help", ""), nested is not None, summary))
        if nested is not None and summary is None:
            docs += key_docs(value if value is not None else nested(), key + ".")
    return docs


def yaml_value(value: Any) -> str:
    """``value`` as one line of YAML that reads back to the same value (flow style for lists and mappings)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30, allow_unicode=True)
    text = text.removesuffix("\n").removesuffix("\n...")
    if "\n" in text:  # a string with line breaks: a JSON string is a one-line YAML double-quoted scalar
        import json

        return json.dumps(value, ensure_ascii=False)
    return text


def key_help(config_class: type, summarized: dict[str, str] | None = None) -> str:
    """The config keys of ``config_class`` for ``rlhf <stage> --help``: grouped by block, each with its
    type, default and help."""
    import shutil
    import textwrap

    width = min(shutil.get_terminal_size((100, 24)).columns, 110)
    lines = ["config keys (YAML blocks; override any one as key.sub=value; --print-config writes them all "
             "as commented YAML):"]
    for doc in key_docs(config_class(), summarized=summarized):
        indent = "  " * doc.key.count(".")
        if doc.is_block:
            value = "" if doc.value is not None else ", default: null"
            lines += ["", f"{indent}{doc.key}: {doc.help} ({doc.type}{value})"]
            if doc.summary:
                lines.append(f"{indent}    {doc.summary}")
            continue
        lines.append(f"{indent}{doc.key}  ({doc.type}, default: {yaml_value(doc.value)})")
        lines += textwrap.wrap(doc.help, width=width, initial_indent=indent + "    ", subsequent_indent=indent + "    ")
    return "\n".join(lines)


def to_commented_yaml(config: Any, header: str = "") -> str:
    """The whole config as YAML, every key preceded by its help and type as a comment.

    ``yaml.safe_load`` of the text, read through the config class, gives ``config`` back
    (tested). A null optional block (``model.from_config``) is followed by its keys at their
    defaults, commented out, so a user sees what it takes.
    """
    import textwrap

    lines = [f"# {line}" if line else "#" for line in header.splitlines()]

    def comment(text: str, indent: str) -> list[str]:
        return textwrap.wrap(text, width=100, initial_indent=indent + "# ", subsequent_indent=indent + "# ")

    def emit(block: Any, depth: int) -> None:
        indent = "  " * depth
        hints = typing.get_type_hints(type(block))
        for f in dataclasses.fields(block):
            value, expected = getattr(block, f.name), hints[f.name]
            nested = block_class(expected)
            if depth == 0 and lines:
                lines.append("")
            lines.extend(comment(f"{f.metadata.get('help', '')} [{type_text(expected)}]", indent))
            if nested is not None and value is not None:
                lines.append(f"{indent}{f.name}:")
                emit(value, depth + 1)
            elif nested is not None:  # a null optional block: show what it would take
                lines.append(f"{indent}{f.name}: null")
                lines.append(f"{indent}# {f.name}:")
                lines.extend(f"{indent}#   {doc.key}: {yaml_value(doc.value)}"
                             for doc in key_docs(nested()) if not doc.is_block)
            else:
                lines.append(f"{indent}{f.name}: {yaml_value(value)}")

    emit(config, 0)
    return "\n".join(lines) + "\n"


def resolve_config(config_class: type, path: str | None = None, overrides: list[str] | None = None) -> Any:
    """``config_class`` from the YAML at ``path`` (None: the defaults) with ``overrides`` applied and every
    key and type checked, but without ``validate()``'s cross-field checks (``load_config`` adds them)."""
    raw: dict[str, Any] = read_yaml(path) if path is not None else {}
    for override in overrides or []:
        apply_override(raw, override)
    return from_dict(config_class, raw, source=path or "config")
