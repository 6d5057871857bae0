from setuptools import setup

# The Triton kernels live in the top-level kernels/ directory but are installed as
# the subpackage longrope_triton.kernels: a top-level "kernels" package would shadow
# the `kernels` package that transformers probes for.
setup(
    name="longrope_triton",
    version="0.1.0",
    description="Triton kernels that fuse LongRoPE rotary embeddings into FlashAttention-style attention",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=["longrope_triton", "longrope_triton.kernels", "longrope_triton.search", "longrope_triton.eval",
              "longrope_triton.train"],
    package_dir={"longrope_triton.kernels": "kernels"},
    package_data={"longrope_triton": ["factors/*.json"]},
    install_requires=["torch>=2.4", "triton>=3.1", "numpy"],
    extras_require={
        "hf": ["transformers>=4.50", "safetensors"],
        "demo": ["transformers>=4.50", "safetensors", "gguf", "accelerate", "tqdm", "matplotlib"],
        "test": ["pytest", "pytest-benchmark", "transformers>=4.50", "safetensors", "gguf", "accelerate", "tqdm", "matplotlib"],
        "bench": ["pytest-benchmark", "matplotlib", "transformers>=4.50"],
    },
    entry_points={"console_scripts": ["longrope-triton=longrope_triton.cli:main"]},
)
