"""megatron-rlhf: InstructGPT's SFT -> reward model -> PPO-ptx pipeline on Megatron-Core."""

from setuptools import find_packages, setup

setup(
    name="megatron-rlhf",
    version="0.1.0",
    description="InstructGPT (SFT, reward model, PPO-ptx) on NVIDIA Megatron-Core, from a laptop CPU to 175B on Slurm",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_rlhf", "megatron_rlhf.*"]),
    install_requires=[
        # torch is not pinned here: on CPU install `torch==2.13.0` first (see README);
        # on GPU use the NGC container's or a CUDA build.
        "torch>=2.4",
        "megatron-core>=0.13,<0.18",
        # megatron-core uses these without declaring them (checkpoint save, inference)
        "psutil",
        "tqdm",
        "numpy",
        "pyyaml>=6",
        "sentencepiece>=0.2",
        "tokenizers>=0.15",  # Hugging Face tokenizer.json (Llama-3, Qwen2.5, GPT-2, Mistral-Nemo)
        "jinja2>=3",  # chat templates
        "tensorboard>=2.14",
        "matplotlib>=3.7",  # `megatron-rlhf report`, the last step of examples/tiny/run.sh
    ],
    extras_require={
        # Transformer Engine is GPU-only: `pip install --no-build-isolation transformer_engine[pytorch]`
        "gpu": ["transformer-engine[pytorch]>=2.0"],
        "hf": ["transformers>=4.44", "safetensors>=0.4"],
        "report": ["matplotlib>=3.7"],
        "test": ["pytest>=7", "pytest-xdist>=3", "transformers>=4.44", "safetensors>=0.4", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["megatron-rlhf=megatron_rlhf.cli:main"]},
)
