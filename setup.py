"""megatron-mohge: Mixture of Heterogeneous Grouped Experts for Megatron-Core."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
about: dict = {}
exec((ROOT / "megatron_mohge" / "version.py").read_text(), about)

setup(
    name="megatron-mohge",
    version=about["__version__"],
    description="Mixture of Heterogeneous Grouped Experts (MoHGE) layers for Megatron-Core",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_mohge", "megatron_mohge.*"]),
    include_package_data=True,
    install_requires=[
        # torch is not pinned: GPU clusters bring their own CUDA build. The helper scripts
        # install the CPU wheel first on CPU machines so nothing here pulls a CUDA build.
        "torch>=2.6",
        # Tested on 0.16.x only; version-specific code lives in megatron_mohge/compat/versions.py.
        "megatron-core>=0.16.1,<0.17",
        "pyyaml>=6.0",
        "numpy",
        # megatron.core.dist_checkpointing needs psutil to save.
        "psutil",
    ],
    extras_require={
        # Optional GPU backends, imported lazily. TE's torch bindings build from source.
        "te": ["transformer-engine[pytorch]>=2.9"],
        "test": ["pytest>=8"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
