import os
import warnings

from setuptools import setup


def cpu_extension():
    """The single-pass CPU update (also_fused._cpu_adam), built against the installed torch.

    Optional: skipped when ALSO_FUSED_NO_CPU_EXTENSION=1; without torch at build time or without a C++ compiler the package installs without
    it, and the CPU optimizers fall back to the reference path (with one warning at run time)."""
    if os.environ.get("ALSO_FUSED_NO_CPU_EXTENSION", "0") not in ("", "0"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return {}

    class OptionalBuild(BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # no compiler, or a compile error: install the Python package alone
                warnings.warn(f"also_fused: the CPU extension was not built ({type(exc).__name__}: {exc}); "
                              "the CPU optimizers will use the reference path")

    ext = CppExtension(
        "also_fused._cpu_adam",
        ["also_fused/csrc/cpu_adam.cpp", "also_fused/csrc/cpu_pi.cpp"],
        # no FMA contraction: every instruction-set variant computes the same bits; no trapping maths (results
        # unchanged): the pi step's float64 log and exp, with their selects, then vectorise
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"],
        extra_link_args=["-fopenmp"],
    )
    return dict(ext_modules=[ext], cmdclass={"build_ext": OptionalBuild})


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
    **cpu_extension(),
)
