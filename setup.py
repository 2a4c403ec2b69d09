"""megatron-mohge: Mixture of Heterogeneous Grouped Experts for Megatron-Core."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
about: dict = {}
exec((ROOT / "megatron_mohge" / "version.py").read_text(), about)

HF = ["transformers>=5.0,<6", "safetensors>=0.4", "tokenizers>=0.19"]

setup(
    name="megatron-mohge",
    version=about["__version__"],
    description="Mixture of Heterogeneous Grouped Experts (MoHGE) layers for Megatron-Core",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_mohge", "megatron_mohge.*"]),
    include_package_data=True,
    # Reference configs, the Megatron-LM launcher and the Slurm scripts ship inside the
    # package (read with importlib.resources), so a regular, non-editable install has them.
    package_data={"megatron_mohge.resources": ["*.py", "configs/*.yaml", "slurm/*.sbatch",
                                               "lm_eval/*.yaml"]},
    install_requires=[
        # torch is not pinned: GPU clusters bring their own CUDA build. The helper scripts
        # install the CPU wheel first on CPU machines so nothing here pulls a CUDA build.
        "torch>=2.6",
        # Two tested lines: 0.16.1 (Python 3.10/3.11) and 0.19.x (Python >= 3.12; 0.17+ ship
        # for 3.12+ only). Version facts live in megatron_mohge/compat/versions.py.
        "megatron-core>=0.16.1,<0.20",
        "pyyaml>=6.0",
        "numpy",
        # megatron.core.dist_checkpointing needs psutil to save.
        "psutil",
        "tqdm",  # progress bars of mohge-prepare-data / mohge-train
    ],
    extras_require={
        # Optional GPU backends, imported lazily. TE's torch bindings build from source.
        "te": ["transformer-engine[pytorch]>=2.9"],
        # Training and benchmark tools: HF tokenizers, TensorBoard event files, PNG plots.
        "train": ["tokenizers>=0.19", "tensorboard>=2.14", "matplotlib>=3.7"],
        # Optional input formats of mohge-prepare-data / --data: Parquet and .zst files.
        "data": ["pyarrow>=14", "zstandard>=0.22"],
        # Hugging Face export (mohge-export-hf) and the exported model: transformers 5 (its
        # config / cache API; tested 5.25), safetensors weights, tokenizer.json files.
        "hf": HF,
        # mohge-eval on exports and lm-eval-harness (lm_eval --model hf ...); tested 0.4.13.
        "eval": HF + ["lm-eval[hf]>=0.4.9,<0.5"],
        "test": ["pytest>=8"],
    },
    entry_points={
        "console_scripts": [
            "mohge-prepare-data = megatron_mohge.cli.prepare_data:main",
            "mohge-train = megatron_mohge.cli.train:main",
            "mohge-pretrain = megatron_mohge.cli.pretrain:main",
            "mohge-bench = megatron_mohge.cli.bench:main",
            "mohge-check-config = megatron_mohge.cli.check_config:main",
            "mohge-export-hf = megatron_mohge.cli.export_hf:main",
            "mohge-eval = megatron_mohge.cli.eval:main",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
