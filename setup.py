from setuptools import setup

# What transformers serve needs (`longrope-triton serve`); CI installs them with the test extra.
SERVE = ["fastapi", "uvicorn", "openai>=1.98", "pydantic>=2", "starlette"]

# Why kernels/ has no __init__.py, and longrope_triton/kernels is a symlink to it.
#
# transformers >= 5.25 requires the Hugging Face `kernels` distribution and imports it at start-up.
# Anything run from the repository root (python -m ..., python -c, pytest, even the build of
# `pip install -e .`) has the root first on sys.path. If kernels/ were a regular package
# (with an __init__.py), `import kernels` would find it there first and transformers would fail.
# Without __init__.py it can only ever be a PEP 420 namespace portion, and the import system
# prefers any regular package or module of that name anywhere on sys.path over namespace
# portions: an installed `kernels` always wins, from any working directory, by construction.
#
# The sources stay in the top-level kernels/ (the project layout). They are the subpackage
# longrope_triton.kernels through the symlink longrope_triton/kernels -> ../kernels: the source
# tree, an editable install (from the root or anywhere else) and a built wheel (which copies the
# files) all import them under that name alone. tests/test_packaging.py checks all of it.
setup(
    name="longrope_triton",
    version="0.1.0",
    description="Triton kernels that fuse LongRoPE rotary embeddings into FlashAttention-style attention",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["longrope_triton", "longrope_triton.hf", "longrope_triton.kernels", "longrope_triton.search",
              "longrope_triton.eval", "longrope_triton.train"],
    package_data={"longrope_triton": ["factors/*.json"]},
    # Floors are tested versions (README "Supported versions"): scripts/test_oldest.sh runs the
    # Hugging Face-facing tests with transformers 5.5 and triton 3.6; torch 2.11 / triton 3.6 are
    # the GPU machine's (scripts/gpu_check.sh). The test extra pins the triton release whose sm_90
    # code tests/test_compile_budget.py budgets: bump it deliberately, with the budgets.
    install_requires=["torch>=2.11", "triton>=3.6", "numpy"],
    extras_require={
        # psutil: transformers' continuous batching sizes its paged cache on a CPU from psutil's memory
        # figures (transformers 5.5 refuses to start without them)
        "hf": ["transformers>=5.5", "safetensors", "psutil"],
        "demo": ["transformers>=5.5", "safetensors", "gguf", "accelerate", "tqdm", "matplotlib"],
        # `longrope-triton serve` (transformers serve). The packages themselves, not transformers[serving]:
        # that extra also pins `kernels`, with which transformers 5.5 fails to import its modeling code.
        "serve": ["transformers>=5.5", "safetensors", "psutil", *SERVE],
        "test": ["pytest", "pytest-benchmark", "triton==3.9.0", "transformers>=5.5", "safetensors", "gguf",
                 "accelerate", "tqdm", "matplotlib", *SERVE],
        "bench": ["pytest-benchmark", "matplotlib", "transformers>=5.5"],
    },
    entry_points={"console_scripts": ["longrope-triton=longrope_triton.cli:main"]},
)
