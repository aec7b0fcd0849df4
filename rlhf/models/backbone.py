"""One module builds every model from a ``model:`` config block.

The policy is any Hugging Face causal LM (hub name or local directory, loaded with
``AutoModelForCausalLM``) or a fresh GPT-2 built from an architecture block. Reward and
value models are the same backbone with a scalar head (``rlhf.models.heads``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pickle
import shutil
from collections.abc import Callable, Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, PreTrainedModel

from rlhf.config import ArchitectureConfig, ModelConfig, half_precision_only
from rlhf.errors import UserError
from rlhf.functional import linear_cross_entropy_sum
from rlhf.models.lora import is_adapter_checkpoint, load_adapter_checkpoint

logger = logging.getLogger(__name__)

# Added when a tokenizer has no pad token. It must differ from EOS: with pad == eos the usual
# attention_mask = (ids != pad) hides every EOS, so the reward is read at the wrong token and
# the policy learns never to stop (docs/ppo.md#2 and docs/ppo.md#42).
PAD_TOKEN = "<|pad|>"


def load_tokenizer(model_config: ModelConfig, block: str = "model", path_key: str | None = None):
    """The tokenizer of ``model_config`` (``tokenizer`` or ``name_or_path``), with a dedicated pad token.

    Args:
        block: the config block the ``model_config`` came from, for error messages ("policy").
        path_key: the dotted key that gave ``name_or_path`` when it is not ``<block>.name_or_path``
            (e.g. "reward.model_path").
    """
    source = model_config.tokenizer or model_config.name_or_path
    key = f"{block}.tokenizer" if model_config.tokenizer else (path_key or f"{block}.name_or_path")
    check_local_directory(source, key)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, trust_remote_code=model_config.trust_remote_code, revision=model_config.revision)
    except (OSError, ValueError) as error:
        raise UserError(f"{key}: cannot load a tokenizer from '{source}' "
                        f"(not a local tokenizer directory, and not reachable on the hub): {first_line(error)}") from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"{key}: the tokenizer at '{source}' has no eos_token; responses must end with one")
    ensure_pad_token(tokenizer)
    return tokenizer


def looks_local(path: str) -> bool:
    """A path rather than a hub name ("org/model"): explicit, present on disk, or under a local directory
    (``runs/sft/final`` when ``runs/`` exists)."""
    first = path.split("/", 1)[0]
    return path.startswith((".", "/", "~")) or os.path.exists(path) or ("/" in path and os.path.isdir(first))


def check_local_directory(path: str, key: str) -> None:
    """A local-looking path that is not a directory is a mistake to report, not a hub name to try."""
    if looks_local(path) and not os.path.isdir(path):
        raise UserError(f"{key}: directory '{path}' not found")


def ensure_pad_token(tokenizer) -> bool:
    """Give ``tokenizer`` a pad token distinct from EOS. Returns True when one was added.

    Callers then resize the model's embeddings (``load_causal_lm`` does) so the new id exists.
    """
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    logger.info("tokenizer had no dedicated pad token; added %s (id %d)", PAD_TOKEN, tokenizer.pad_token_id)
    return True


def load_causal_lm(model_config: ModelConfig, tokenizer=None, seed: int = 0,
                   block: str = "model") -> tuple[PreTrainedModel, object]:
    """The policy: a causal LM in fp32 plus its tokenizer, embeddings sized to the tokenizer.

    Args:
        model_config: the ``model:`` block.
        tokenizer: reuse this tokenizer (default: load the one the config names).
        seed: seeds the initialisation of a fresh model and of new embedding rows.
    """
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_config, block)
    ensure_pad_token(tokenizer)  # before building: a fresh model's vocabulary includes the pad
    torch.manual_seed(seed)
    if model_config.from_config is not None:
        model = build_fresh_gpt2(model_config.from_config, tokenizer)
    else:
        model = from_pretrained_or_error(AutoModelForCausalLM, model_config, f"{block}.name_or_path")
    adopt_model(model, tokenizer, model_config, block)
    return model, tokenizer


def adopt_model(model: PreTrainedModel, tokenizer, model_config: ModelConfig, block: str = "model") -> None:
    """Bring any model (ours, or one a user passes in) to the conventions every stage relies on.

    The tokenizer gets a dedicated pad (never pad = eos), the embeddings grow to the tokenizer and
    the special ids are recorded, and dropout is turned off if ``model_config.disable_dropout``
    (train- and eval-mode forwards must agree, docs/ppo.md#35), the vocabulary projection pads its output
    for cuBLAS (``VocabAlignedLinear``), GPT-2's python GELU becomes
    the fused kernel if ``model_config.fused_gelu``, and the attention runs through
    ``model_config.attn_implementation`` when one is named (``block``: its config block, for errors).
    """
    ensure_pad_token(tokenizer)
    fit_to_tokenizer(model, tokenizer)
    align_vocab_projection(model)
    if model_config.disable_dropout:
        disable_dropout(model)
    if model_config.fused_gelu:
        use_fused_gelu(model)
    if model_config.attn_implementation:
        set_attention_implementation(model, model_config.attn_implementation, f"{block}.attn_implementation")


def set_attention_implementation(model: PreTrainedModel, name: str, key: str) -> None:
    """Run ``model``'s attention through transformers' implementation ``name`` ("sdpa", "eager",
    "flash_attention_2", a kernels-hub repository...), or raise ``UserError`` naming ``key``.

    transformers checks the request itself (a kernel the model does not support, a package that is not
    installed) and raises; its first line becomes ours. A model whose code predates transformers'
    attention interface (some remote code) cannot switch after loading and would silently keep its own.
    """
    if getattr(model.config, "_attn_implementation", None) == name:
        return
    import transformers

    if not hasattr(model, "set_attn_implementation"):
        raise UserError(f"{key}: choosing the attention needs a transformers release with "
                        f"PreTrainedModel.set_attn_implementation (installed: {transformers.__version__})")
    can_switch = getattr(model, "_can_set_attn_implementation", None)
    if can_switch is not None and not can_switch():
        raise UserError(f"{key}: {type(model).__name__} cannot switch its attention to '{name}' (its code does not use "
                        "transformers' attention interface); remove the key to keep its own")
    try:
        model.set_attn_implementation(name)
    except (ImportError, ValueError) as error:
        hint = {"flash_attention_2": "; pip install 'rlhf[flash-attn]' --no-build-isolation on a machine with a CUDA GPU"
                }.get(name, "; it needs its flash-attention package, built for a CUDA GPU"
                      if name.startswith("flash_attention") else "")
        raise UserError(f"{key}: {first_line(error).rstrip('.')}{hint}") from None


def hub_kernel_arguments(wanted: bool, key: str = "model.hub_kernels") -> dict:
    """``from_pretrained``'s ``use_kernels`` argument for ``model.hub_kernels``.

    Recent transformers turn hub kernels on by default where the kernels package is installed, and fetch
    them from the hub when a model on a GPU switches between train and eval: an offline GPU machine then
    fails at the first evaluation, and layers change under the user. Off unless asked for; older releases,
    which have no hub kernels, get no argument.
    """
    supported = hasattr(PreTrainedModel, "set_use_kernels")
    if wanted and not supported:
        import transformers

        raise UserError(f"{key}: needs a transformers release with hub kernels (installed: {transformers.__version__})")
    if wanted and importlib.util.find_spec("kernels") is None:
        raise UserError(f"{key}: needs the kernels package; pip install kernels")
    return {"use_kernels": wanted} if supported else {}


def from_pretrained_or_error(model_class, model_config: ModelConfig, key: str = "model.name_or_path",
                             **kwargs) -> PreTrainedModel:
    """``model_class.from_pretrained`` in fp32, turning a bad path into one clear line naming ``key``.

    A directory holding only a LoRA adapter (an earlier stage's ``final/`` with ``lora.save_merged:
    false``) loads as its base with the adapter merged in.
    """
    path = model_config.name_or_path
    check_local_directory(path, key)
    if looks_local(path) and is_adapter_checkpoint(path):
        from dataclasses import replace

        return load_adapter_checkpoint(
            lambda base: from_pretrained_or_error(model_class, replace(model_config, name_or_path=base, revision=None),
                                                  f"{key} (its adapter's base)", **kwargs), path, key)
    kwargs.update(hub_kernel_arguments(model_config.hub_kernels, f"{key.split('.')[0]}.hub_kernels"))
    try:
        # fp32 master weights: mixed precision is accelerate's job, and RLHF logprobs must be fp32
        # (docs/ppo.md#38).
        return model_class.from_pretrained(
            path, dtype=torch.float32, trust_remote_code=model_config.trust_remote_code,
            revision=model_config.revision, **kwargs)
    except pickle.UnpicklingError:
        # torch's weights-only loader refused a pickled checkpoint (pytorch_model.bin): unpickling it in
        # full could run any code it carries, so it is never loaded that way here.
        files = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))) if os.path.isdir(path) else []
        raise UserError(f"{key}: '{path}' holds its weights as a pickle ({', '.join(files) or 'pytorch_model.bin'}) "
                        "that torch's safe loader refuses, as loading it in full could run code; where you trust "
                        "its origin, convert it to safetensors (torch.load(file, weights_only=False), then "
                        "save_pretrained with safe_serialization=True), or use a checkpoint with model.safetensors"
                        ) from None
    except (OSError, ValueError, KeyError) as error:
        where = "local directory" if looks_local(path) else "hub model"
        raise UserError(f"{key}: cannot load '{path}' as a {where} with "
                        f"{model_class.__name__}: {first_line(error)}") from None


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each transformer block's activations during the backward pass instead of storing them.

    torch's non-reentrant checkpointing (the kind that needs no input with ``requires_grad``, so
    frozen embeddings under LoRA are fine): the same gradients, for a forward's worth of extra
    compute. ``model``: a Hugging Face model, or a module holding one (``ScalarHeadModel``).
    """
    target = model if isinstance(model, PreTrainedModel) else next(
        (m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    if target is None or not target.supports_gradient_checkpointing:
        name = type(target or model).__name__
        raise UserError(f"training.gradient_checkpointing: {name} does not support gradient checkpointing")
    if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5.2x; the older name warns there
        target.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of ``model``: the members of each outermost ``ModuleList`` of two or more
    modules of one class (GPT-2's ``transformer.h``, GPT-NeoX's ``gpt_neox.layers``, ...)."""
    blocks, lists = [], []
    for name, module in model.named_modules():
        if any(name.startswith(outer + ".") for outer in lists):
            continue  # a list inside a block already found is compiled with it
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            lists.append(name)
            blocks.extend(module)
    return blocks


# What transformers calls a block's feed-forward: mlp (GPT-2, GPT-NeoX, Llama, Mistral, Qwen, Falcon, ...),
# block_sparse_moe (Mixtral before transformers 5), feed_forward or ffn (some others).
FEED_FORWARD_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "ffn")


def last_feed_forward(model: torch.nn.Module) -> torch.nn.Module | None:
    """The feed-forward module of ``model``'s last transformer block (GPT-2's ``transformer.h[-1].mlp``), or None
    when the model has no repeated blocks or its last one none under a name of ``FEED_FORWARD_NAMES``."""
    blocks = transformer_blocks(model)
    if not blocks:
        return None
    found = (getattr(blocks[-1], name, None) for name in FEED_FORWARD_NAMES)
    return next((module for module in found if isinstance(module, torch.nn.Module)), None)


@contextlib.contextmanager
def feed_forward_at(feed_forward: torch.nn.Module | None, keep: torch.Tensor | None) -> Iterator[None]:
    """Within: ``feed_forward`` runs on the positions ``keep`` ((batch, seq_len) bool) marks only, and outputs
    zeros at the others. With either of them None (no trimming, or nothing said about what is read) nothing changes.

    Meant for the last block's feed-forward: its output at a position reaches nothing but the model's
    output there, so a model read at a few positions (a reward at each EOS) gets those outputs unchanged
    and skips the rest of the block's largest matmuls; its outputs elsewhere are then wrong. The module must
    treat each position alone, as a transformer's feed-forward does (a mixture of experts routes per token too).
    """
    if feed_forward is None or keep is None:
        yield
        return

    def take_rows(_module, args, kwargs):
        if args:
            return (args[0][keep].unsqueeze(0), *args[1:]), kwargs
        return args, kwargs | {"hidden_states": kwargs["hidden_states"][keep].unsqueeze(0)}

    def spread(_module, _args, _kwargs, output):
        rows = output[0] if isinstance(output, tuple) else output
        full = rows.new_zeros(*keep.shape, rows.shape[-1]).index_put((keep,), rows.reshape(-1, rows.shape[-1]))
        return (full, *output[1:]) if isinstance(output, tuple) else full

    handles = [feed_forward.register_forward_pre_hook(take_rows, with_kwargs=True),
               feed_forward.register_forward_hook(spread, with_kwargs=True)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def trimming_fits(name: str, feed_forward: torch.nn.Module | None,
                  run: Callable[[torch.nn.Module | None], torch.Tensor]) -> bool:
    """The check before a model's last block is trimmed (``feed_forward_at``): whether ``run(feed_forward)``, a
    probe's outputs with the block trimmed, equals ``run(None)``, the same untrimmed, up to float rounding. When
    not (no feed-forward found, an error, other outputs) it logs why and the model runs untrimmed."""
    if feed_forward is None:
        logger.info("%s: no feed-forward module found in the last block; it runs untrimmed", name)
        return False
    try:
        full, trimmed = run(None), run(feed_forward)
    except Exception as error:  # noqa: BLE001 - a block that will not run on a subset of positions
        logger.info("%s: the last block does not run on a subset of positions (%s); it runs untrimmed", name,
                    first_line(error))
        return False
    if full.shape != trimmed.shape or packing_changed_outputs(full, trimmed):
        logger.info("%s: trimming the last block changes its outputs; it runs untrimmed", name)
        return False
    return True


def compile_blocks(model: torch.nn.Module, mode: str = "default") -> int:
    """Compile each transformer block of ``model`` in place with ``torch.compile`` (``training.compile``).

    Regional compilation, as PyTorch recommends for transformers: the blocks share one compiled graph
    (per grad mode and shape family), so compiling costs about one block's worth rather than the whole
    model's, and the code between blocks (masks, caches, position ids, our heads) stays eager and free
    to vary. ``Module.compile`` keeps the module tree and parameter names as they are, so checkpoints,
    LoRA adapters and DDP see the same model. Returns the number of blocks compiled; a model without
    repeated blocks is compiled whole (returns 0).
    """
    device = next(model.parameters()).device
    if device.type == "cpu" and not torch.cuda.is_available() and not cpp_compiler_found():
        raise UserError("training.compile: torch.compile builds C++ kernels on CPU and finds no C++ compiler "
                        "(CXX, c++, g++ or clang++ on PATH); install one (e.g. apt install g++) or set "
                        "training.compile=false")
    options = {} if mode == "default" else {"mode": mode}
    blocks = transformer_blocks(model)
    for block in blocks:
        block.compile(**options)
    if not blocks:
        model.compile(**options)
    return len(blocks)


def cpp_compiler_found() -> bool:
    """Whether inductor's CPU backend has a C++ compiler to call (the CXX variable, else one on PATH)."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["c++", "g++", "clang++"]
    return any(shutil.which(candidate) for candidate in candidates)


def eager_blocks():
    """A context in which blocks compiled by ``compile_blocks`` run eagerly: for forwards on a KV cache.

    A block that reads a cache is specialised on its layer index (the cache is indexed by it), so
    each layer would compile graphs of its own until torch's recompile limit sends the rest back to
    eager anyway. The training forwards, which carry no cache, stay compiled; the sampler's decode
    step is compiled whole instead (``rlhf.generation.sample_with_logprobs``'s ``compile_mode``).
    """
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()


def half_precision_attention(model: torch.nn.Module) -> str | None:
    """The attention implementation of ``model`` (or of the model a DDP, peft or scalar-head wrapper holds)
    when it is a flash-attention kernel, which computes in fp16/bf16 only; else None."""
    inner = getattr(model, "module", model)
    name = getattr(getattr(inner, "config", None), "_attn_implementation", None)
    return name if isinstance(name, str) and half_precision_only(name) else None


@contextlib.contextmanager
def full_precision_attention(model: torch.nn.Module) -> Iterator[None]:
    """A context for forwards in fp32 outside autocast (sampling, text generation, scoring, the packing
    probe): a model set to a flash-attention kernel (``model.attn_implementation``) attends through SDPA
    meanwhile, as the kernel takes half precision only; any other model runs as it is.

    transformers reads the implementation from the config at every call, so the switch costs nothing
    and the weights stay where they are.
    """
    name = half_precision_attention(model)
    if name is None:
        yield
        return
    inner = getattr(model, "module", model)
    supports_sdpa = getattr(inner, "_supports_sdpa", None)  # a class attribute of transformers' models
    if supports_sdpa is None:  # a scalar-head wrapper: ask the model it holds
        supports_sdpa = getattr(getattr(inner, "model", None), "_supports_sdpa", True)
    config = inner.config
    config._attn_implementation = "sdpa" if supports_sdpa else "eager"
    try:
        yield
    finally:
        config._attn_implementation = name


def build_fresh_gpt2(architecture: ArchitectureConfig, tokenizer) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 whose vocabulary is the tokenizer's."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=architecture.n_positions,
        n_embd=architecture.n_embd,
        n_layer=architecture.n_layer,
        n_head=architecture.n_head,
        resid_pdrop=architecture.dropout,
        embd_pdrop=architecture.dropout,
        attn_pdrop=architecture.dropout,
        activation_function=architecture.activation,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def fit_to_tokenizer(model: PreTrainedModel, tokenizer) -> None:
    """Grow the embeddings to the tokenizer (an added pad token) and record the special ids."""
    if model.get_input_embeddings().num_embeddings < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


# cuBLAS picks its fast (Hopper/Ampere) bf16 kernels only for row lengths that are multiples of 8 elements;
# gpt2's 50,257-token logits fell back to sm75 kernels, ~80 TFLOP/s on an H200, 30 % of SFT's kernel time.
VOCAB_ALIGNMENT = 64


def pads_projection(weight: torch.Tensor) -> bool:
    """Whether the vocabulary projection pads its output for alignment: on CUDA only (CPU BLAS needs no
    such alignment, and the padded weight would be a copy per call there)."""
    return weight.is_cuda


def projection_alignment(weight: torch.Tensor) -> int:
    """The multiple the vocabulary projection's output rows are padded to when it runs on ``weight`` (1: none)."""
    return VOCAB_ALIGNMENT if pads_projection(weight) else 1


def _output_embeddings(model: torch.nn.Module) -> torch.nn.Module | None:
    inner = getattr(model, "module", model)  # DDP / accelerate wrappers keep the model in .module
    get_head = getattr(inner, "get_output_embeddings", None)
    return get_head() if get_head is not None else None


class VocabAlignedLinear(torch.nn.Linear):
    """The output projection (hidden -> vocabulary logits) computed with its output rows padded to a multiple
    of ``VOCAB_ALIGNMENT`` with zero weights, then cut back: the same logits and gradients (each logit is the
    same dot product), through cuBLAS's aligned kernels. Parameters, names and checkpoints are those of the
    ``nn.Linear`` it replaces (``align_vocab_projection``)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        vocab = self.out_features
        padding = -vocab % projection_alignment(self.weight)
        if not padding:
            return torch.nn.functional.linear(hidden, self.weight, self.bias)
        weight = torch.nn.functional.pad(self.weight, (0, 0, 0, padding))
        bias = None if self.bias is None else torch.nn.functional.pad(self.bias, (0, padding))
        return torch.nn.functional.linear(hidden, weight, bias)[..., :vocab]


def align_vocab_projection(model: torch.nn.Module) -> bool:
    """Make a plain ``nn.Linear`` output projection a ``VocabAlignedLinear`` (in place: the same module, its
    class changed); True if it was changed. Another head (a quantized or wrapped one) keeps its own forward."""
    head = _output_embeddings(model)
    if type(head) is not torch.nn.Linear or head.out_features % VOCAB_ALIGNMENT == 0:
        return False
    head.__class__ = VocabAlignedLinear
    return True


def use_fused_gelu(model: torch.nn.Module) -> int:
    """Replace every ``gelu_new`` module (six elementwise kernels in python) by torch's fused tanh GELU.

    The same formula, so outputs agree to float rounding (~1e-7); a GPT-2 step is ~15 % faster on
    CPU at the demo's size. Only the modules change: the checkpoint's config keeps its activation
    name, so what we save loads anywhere as before. Returns how many modules were replaced.
    """
    from transformers.activations import GELUTanh, NewGELUActivation

    replaced = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(parent, name, GELUTanh())
                replaced += 1
    return replaced


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0, so train() and eval() give the same outputs."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    if config is not None:  # also in the saved config, so a reload keeps it off
        for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout",
                     "dropout", "attention_probs_dropout_prob", "hidden_dropout_prob", "summary_first_dropout"):
            if isinstance(getattr(config, name, None), float):
                setattr(config, name, 0.0)


def context_size(model: PreTrainedModel) -> int | None:
    """The model's maximum sequence length, if its config states one."""
    config = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_max_length(requested: int, model: PreTrainedModel) -> int:
    """``requested`` capped at the model's context size (with a log line when it is cut)."""
    limit = context_size(model)
    if limit is not None and requested > limit:
        logger.info("max_length %d exceeds the model's context size; using %d", requested, limit)
        return limit
    return requested


def packing_changed_outputs(alone: torch.Tensor, packed: torch.Tensor) -> bool:
    """Whether a packing probe's outputs differ from the unpacked ones by more than rounding: packed and alone
    round differently (bf16 weights included), attention across examples changes them by far more."""
    return bool((alone - packed).abs().max() > 1e-2 * alone.abs().max() + 1e-4)


@torch.no_grad()
def check_packing_support(model: torch.nn.Module) -> None:
    """Raise ``UserError`` unless ``model`` keeps packed examples apart (``training.packing``).

    Two short random sequences run packed in one row (position ids restarting, no attention mask) must
    give the logits they give run one by one. transformers' own architectures read the example
    boundaries from the position ids (``masking_utils``, transformers >= 4.5x); a model that ignores them
    would let each example attend to the one before it and train on a silently different objective.
    The probe runs in fp32, so a model set to flash attention runs it through SDPA: the kernel's
    variable-length path takes its boundaries from the same position ids, which transformers hands it.
    """
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    first, second = (torch.randint(vocab, (1, length), generator=generator).to(device) for length in (5, 3))
    was_training = model.training
    model.eval()
    try:
        with full_precision_attention(model):
            alone = torch.cat([model(input_ids=ids, use_cache=False).logits for ids in (first, second)], dim=1).float()
            positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]], device=device)
            packed = model(input_ids=torch.cat([first, second], dim=1), position_ids=positions,
                           use_cache=False).logits.float()
    finally:
        model.train(was_training)
    if packing_changed_outputs(alone, packed):
        import transformers

        raise UserError(f"training.packing: {type(model).__name__} (transformers {transformers.__version__}) attends "
                        "across packed examples: it does not read example boundaries from position ids; set "
                        "training.packing=false")


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ----------------------------------------------------------------------------- logits where a loss reads them

def _accepted_logits_to_keep(model) -> tuple[bool, bool, bool]:
    """(int form, boolean-mask form) of ``logits_to_keep`` that ``model``'s forward accepts, and whether it
    takes ``use_cache``.

    Hugging Face causal LMs take ``logits_to_keep`` (transformers >= 4.50); the boolean (B, T)
    form arrived later, with ``modeling_utils.slice_logits_to_keep``. Models from remote code
    may take the argument but only as an int, so the mask form is used for transformers' own
    classes only.
    """
    import inspect

    from transformers import modeling_utils

    inner = getattr(model, "module", model)  # DDP / accelerate wrappers keep the model in .module
    parameters = inspect.signature(inner.forward).parameters
    takes_int = "logits_to_keep" in parameters
    own_class = type(inner).__module__.startswith("transformers.")
    takes_cache = "use_cache" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    return takes_int, takes_int and own_class and hasattr(modeling_utils, "slice_logits_to_keep"), takes_cache


def _forward_inputs(model, input_ids, attention_mask, position_ids) -> tuple[bool, bool, dict]:
    takes_int, takes_mask, takes_cache = _accepted_logits_to_keep(model)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
    if takes_cache:  # no key/value cache: nothing reads it, and under gradient checkpointing transformers warns
        inputs["use_cache"] = False
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    return takes_int, takes_mask, inputs


def kept_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, keep: torch.Tensor | int,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """A causal LM's logits only at the positions a loss reads, so the vocabulary projection
    (the largest matmul of a small model) skips the rest.

    Args:
        keep: a (B, T) bool mask -> logits (mask.sum(), V), the kept positions in row-major
            order; or an int k -> logits (B, k, V) of the last k positions.
    Calls ``model(...)`` itself, so a DDP-wrapped model still synchronises its gradients; falls
    back to full logits, then selection, for models without ``logits_to_keep``.
    """
    takes_int, takes_mask, inputs = _forward_inputs(model, input_ids, attention_mask, position_ids)
    if isinstance(keep, int):
        if takes_int:
            return model(**inputs, logits_to_keep=keep).logits
        return model(**inputs).logits[:, -keep:]
    if takes_mask:
        return model(**inputs, logits_to_keep=keep).logits
    return model(**inputs).logits[keep]


@torch.no_grad()
def trimmable_feed_forward(model: torch.nn.Module) -> torch.nn.Module | None:
    """The feed-forward of causal LM ``model``'s last block, for ``feed_forward_at`` around ``kept_logits`` with the
    same mask (``training.trim_last_block``): kept logits are the only outputs read, and the block's output at
    any other position reaches nothing. None unless a probe's kept logits come out the same trimmed as not."""
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    ids = torch.randint(vocab, (2, 6), generator=torch.Generator().manual_seed(0)).to(device)
    keep = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 0, 1, 0, 0]], dtype=torch.bool, device=device)

    def kept(feed_forward: torch.nn.Module | None) -> torch.Tensor:
        with feed_forward_at(feed_forward, keep):
            return kept_logits(model, ids, None, keep).float()

    feed_forward = last_feed_forward(model)
    was_training = model.training
    model.eval()
    try:
        with full_precision_attention(model):
            fits = trimming_fits(type(model).__name__, feed_forward, kept)
    finally:
        model.train(was_training)
    return feed_forward if fits else None


# ----------------------------------------------------------------------------- the loss without the logits

def output_projection(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's vocabulary projection if it is a plain linear layer (``nn.Linear``, or the
    ``VocabAlignedLinear`` it may have become), which a fused linear cross-entropy can stand in for; None for
    any other head (quantized, LoRA-wrapped, custom), whose forward only the head itself knows."""
    head = _output_embeddings(model)
    return head if type(head) in (torch.nn.Linear, VocabAlignedLinear) else None


def _fused_chunk_rows(weight: torch.Tensor) -> int:
    """Rows per chunk for ``linear_cross_entropy_sum`` over the output layer ``weight``: about 16 MiB of float32
    logits on a CPU, 1 GiB on a GPU, and at least 512 rows, so each chunk's matmuls stay large (on the benchmark's
    8,193-token vocabulary and 2 CPU threads, chunks of 256 rows ran the forward matmul at ~90 GFLOP/s against
    ~140 for all 1,472 rows at once; 512 rows was the fastest of 256, 512, 768 and 1,472)."""
    budget = (1 << 30) if weight.is_cuda else (16 << 20)
    return max(512, budget // (4 * weight.shape[0]))


def _kept_hidden_states(head: torch.nn.Linear, model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                        keep: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
    """The hidden states the vocabulary projection ``head`` would read at the positions ``keep`` (a (B, T) bool
    mask) marks, as (keep.sum(), D) in row-major order, without the projection: ``kept_logits`` less its last matmul.

    The model runs as ``kept_logits`` runs it (``model(...)`` itself, so DDP still synchronises); a hook takes
    the projection's input and hands the projection an empty slice of it instead, so whatever the model does
    before its head (final norm, slicing) is kept, and the projection's own matmul costs nothing. Valid for
    models whose logits are ``head`` applied to that input, which ``check_fused_cross_entropy_support`` verifies.
    """
    taken: list[torch.Tensor] = []

    def take_input(_module, args):
        taken.append(args[0])
        return (args[0][..., :0, :],)

    _, takes_mask, inputs = _forward_inputs(model, input_ids, attention_mask, position_ids)
    handle = head.register_forward_pre_hook(take_input)
    try:
        model(**inputs, logits_to_keep=keep) if takes_mask else model(**inputs)
    finally:
        handle.remove()
    hidden = taken[-1]
    return hidden if hidden.dim() == 2 else hidden[keep]  # without the mask form of logits_to_keep: every row


def fused_cross_entropy_sum(model, input_ids: torch.Tensor, keep: torch.Tensor, targets: torch.Tensor,
                            position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Σ cross-entropy of the logits ``kept_logits(model, input_ids, None, keep, position_ids)`` would give against
    ``targets`` (one per kept position), without those logits: the hidden states the output layer reads, and the
    layer itself, through ``linear_cross_entropy_sum``, in chunks sized for the device and with the vocabulary
    padded as the projection pads it (``training.fused_cross_entropy``; the model must pass
    ``check_fused_cross_entropy_support``)."""
    head = output_projection(model)
    if head is None:
        raise ValueError("the model's output embeddings are not a plain linear layer")
    hidden = _kept_hidden_states(head, model, input_ids, None, keep, position_ids)
    return linear_cross_entropy_sum(hidden, head.weight, targets, head.bias, chunk_rows=_fused_chunk_rows(head.weight),
                                    align=projection_alignment(head.weight))


@torch.no_grad()
def check_fused_cross_entropy_support(model: torch.nn.Module) -> None:
    """Raise ``UserError`` unless ``model``'s logits are its output projection applied to the hidden states
    ``fused_cross_entropy_sum`` takes (``training.fused_cross_entropy``): a head that scales or caps its logits
    afterwards (logit soft-capping, a logit scale) would train on another loss than the model computes."""
    head = output_projection(model)
    if head is None:
        other = _output_embeddings(model)
        found = type(other).__name__ if other is not None else "none"
        raise UserError(f"training.fused_cross_entropy: the model's output layer is {found}, not a plain linear "
                        "layer (a LoRA-wrapped, quantized or custom head); set training.fused_cross_entropy=false")
    vocab = model.get_input_embeddings().num_embeddings
    device = head.weight.device
    ids = torch.randint(vocab, (1, 6), generator=torch.Generator().manual_seed(0)).to(device)
    keep = torch.ones_like(ids, dtype=torch.bool)
    was_training = model.training
    model.eval()
    try:
        with full_precision_attention(model):
            logits = kept_logits(model, ids, None, keep).float()
            hidden = _kept_hidden_states(head, model, ids, None, keep, None)
            projected = torch.nn.functional.linear(hidden, head.weight, head.bias).float()
    finally:
        model.train(was_training)
    if projected.shape != logits.shape or packing_changed_outputs(logits, projected):
        raise UserError(f"training.fused_cross_entropy: {type(model).__name__}'s logits are not its output layer "
                        "applied to its last hidden states (its head scales or caps them); set "
                        "training.fused_cross_entropy=false")
