"""Package discovery; everything else is in ``pyproject.toml``.

``lightning_kr`` and its subpackages are found by setuptools (a new subpackage ships without a
change here). The callbacks live in the top-level ``callbacks/`` folder (the design card's layout)
and install as ``lightning_kr.callbacks``: that one mapping cannot be written as a find rule.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["lightning_kr", "lightning_kr.*"]), "lightning_kr.callbacks"],
    package_dir={"lightning_kr.callbacks": "callbacks"},
)
