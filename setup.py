"""Packaging for doublesparse.

`kernels/`, `calibration/` and `eval/` sit at the top of the repository (the project card's layout)
but install as subpackages of `doublesparse`, so nothing generic lands in site-packages.
"""

from setuptools import find_packages, setup

# Top folders and the package each installs as.
TOP_PACKAGES = {
    "doublesparse": "doublesparse",
    "doublesparse.kernels": "kernels",
    "doublesparse.calibration": "calibration",
    "doublesparse.eval": "eval",
}
# Every subpackage too (doublesparse.eval.tasks, ...): a non-editable install holds only the packages listed.
PACKAGE_DIRS = dict(TOP_PACKAGES)
for package, folder in TOP_PACKAGES.items():
    for sub in find_packages(where=folder):
        PACKAGE_DIRS.setdefault(f"{package}.{sub}", f"{folder}/{sub.replace('.', '/')}")

setup(
    name="doublesparse",
    version="0.1.0",
    description="Double Sparsity (post-training sparse attention) for stock Hugging Face models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    include_package_data=True,
    package_data={
        "doublesparse": ["assets/**/*"],
        "doublesparse.kernels": ["*.c", "*.h"],
        "doublesparse.eval.tasks": ["lm_eval_tasks/*"],
    },
    # Ranges cover the GPU test machine (torch 2.11, triton 3.6, transformers 5.17) up to the
    # versions pinned here. With torch present in range nothing is replaced; on a fresh CPU machine
    # of this workplace the newest torch below 2.14 is the local 2.13.0+cpu wheel, and triton
    # resolves to 3.7.1, the version that torch build expects.
    install_requires=[
        "torch>=2.11,<2.14",
        "triton>=3.6,<3.8; platform_system == 'Linux'",
        "transformers>=5.17,<5.24",
        # device_map dispatch, tensor-parallel loading and GGUF loading in transformers go through it.
        "accelerate>=1.1",
        "datasets>=3.0",
        "einops>=0.7",
        "lm-eval>=0.4.5",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "tqdm>=4.66",
        "matplotlib>=3.7",
    ],
    # GGUF checkpoints (doublesparse.load_model("x.gguf")): transformers dequantizes them with gguf and
    # loads them through accelerate (a core dependency already, named here too). The tests write and load
    # a tiny GGUF file; the checks of .ci/run lint, format-check and check the import contracts.
    extras_require={
        "gguf": ["gguf>=0.10", "accelerate>=1.1"],
        "test": ["pytest>=8", "hypothesis>=6.100", "gguf>=0.10", "ruff==0.17.6", "import-linter>=2.0"],
    },
    entry_points={"console_scripts": ["doublesparse=doublesparse.cli:main"]},
)
