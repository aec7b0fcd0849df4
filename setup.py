from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as handle:
    long_description = handle.read()

setup(
    name="rlhf",
    version="0.1.0",
    description="Three-stage RLHF (SFT, reward model, PPO) for GPT-style causal LMs, on PyTorch and Hugging Face",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rlhf", "rlhf.*"]),
    python_requires=">=3.10",
    # Loose lower bounds: users bring their own torch build (CPU, CUDA, ROCm).
    install_requires=[
        "torch>=2.1",
        "transformers>=4.46",
        "datasets>=2.19",
        "accelerate>=1.0",
        "tqdm>=4.60",
        "pyyaml>=6.0",
    ],
    extras_require={
        "dev": ["pytest>=7.0", "tokenizers>=0.19", "peft>=0.13"],  # the tests cover LoRA too
        "peft": ["peft>=0.13"],            # LoRA: a `lora:` block in a model config
        "deepspeed": ["deepspeed>=0.15"],  # the configs/accelerate/deepspeed_*.yaml launch configs (GPU)
        # model.attn_implementation: flash_attention_2 (CUDA; builds against the installed torch, so
        # pip install 'rlhf[flash-attn]' --no-build-isolation)
        "flash-attn": ["flash-attn>=2.6"],
        "tracking": ["tensorboard>=2.10", "wandb>=0.16"],
        "report": ["matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["rlhf=rlhf.cli:main_entry"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
