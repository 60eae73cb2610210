"""Packaging for ampcompat: Apex's amp API on PyTorch's native mixed precision."""
import re
from pathlib import Path

from setuptools import find_packages, setup

_HERE = Path(__file__).parent
_VERSION = re.search(r'__version__ = "([^"]+)"', (_HERE / "ampcompat" / "_version.py").read_text()).group(1)

setup(
    name="ampcompat",
    version=_VERSION,
    description="Run legacy NVIDIA Apex amp / fp16_utils / parallel code unchanged on PyTorch's native AMP.",
    long_description=(_HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="BSD-3-Clause",
    packages=find_packages(include=["ampcompat", "ampcompat.*"]),
    package_data={"ampcompat": ["py.typed"]},  # PEP 561: type checkers read ampcompat's annotations
    python_requires=">=3.10",  # the migrate tool reads match statements (ast.Match); the alias uses 3.10 metadata APIs
    install_requires=["torch>=2.4", "packaging"],
    extras_require={
        "test": ["pytest"],
        "bench": ["matplotlib"],
        # tests/test_integrations_cpu.py and test_alias.py's RequirementCache test; pinned to releases
        # whose Apex integrations still exist (transformers' Trainer backend, Lightning's Apex plugin).
        # Lightning 1.x imports pkg_resources, which setuptools 81 dropped.
        "integrations": ["transformers==4.45.2", "accelerate==1.0.1", "pytorch_lightning==1.9.5",
                         "lightning-utilities==0.15.3", "setuptools<81"],
    },
    entry_points={"console_scripts": ["ampcompat=ampcompat.__main__:main"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
