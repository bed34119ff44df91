from setuptools import setup

setup(
    name="also_fused",
    version="0.1.0",
    description="Fused distributionally robust optimizers (ALSO, RGD) and Adam/AdamW with Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["also_fused", "also_fused.kernels"],
    package_dir={"also_fused": "also_fused", "also_fused.kernels": "kernels"},
    install_requires=["torch>=2.4"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "numpy", "hypothesis"],
        "demo": ["scikit-learn", "matplotlib"],
        "bench": ["matplotlib", "tqdm", "pytest-benchmark"],
    },
)
