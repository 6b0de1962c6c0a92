"""The pinned environment that `make install` and CI install (.ci/constraints.txt, the Makefile's torch) agrees with the
ranges setup.cfg declares to users."""

import configparser
import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from helpers import REPO


def declared_requirements() -> list[Requirement]:
    """setup.cfg's install_requires and every extra's requirements."""
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    sections = [setup["options"]["install_requires"], *setup["options.extras_require"].values()]
    return [Requirement(line.strip()) for text in sections for line in text.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_the_pinned_versions_are_exact_and_inside_the_declared_ranges():
    """Every package setup.cfg asks for is pinned exactly, at a version its range admits: the versions CI verifies are
    versions a user's `pip install` may get. torch comes from the Makefile's TORCH_SPEC (the CPU wheel), the rest
    from .ci/constraints.txt."""
    pinned = {}
    for line in (REPO / ".ci" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            assert re.fullmatch(r"[A-Za-z0-9._-]+==[0-9][A-Za-z0-9.+!-]*", line), f"not an exact pin: {line!r}"
            name, version = line.split("==")
            assert canonicalize_name(name) not in pinned, f"pinned twice: {name}"
            pinned[canonicalize_name(name)] = Version(version)
    assert not {"torch", "momentfm", "enecg-hf"} & set(pinned), "pinned in the Makefile, not in the constraints"
    (torch_spec,) = re.findall(r"^TORCH_SPEC \?= torch==(\S+)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    pinned["torch"] = Version(torch_spec)
    for requirement in declared_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} is not pinned in .ci/constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (str(requirement), str(pinned[name]))
