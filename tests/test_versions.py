"""The supported range: too old a Python / torch / torchvision / numpy is refused at start in one line naming
the minimum, and the declared floors agree everywhere (requirements.txt, requirements-floors.txt, commons)."""

import os
import re
import sys

import numpy as np
import pytest
import torch
import torchvision

import commons

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_installed_versions_are_supported():
    assert commons.unsupported_versions() is None


@pytest.mark.parametrize(
    "module,attribute,old,expected",
    [
        (torch, "__version__", "1.13.1+cu117", "torch >= 2.0 (this is 1.13.1+cu117)"),
        (torchvision, "__version__", "0.14.1", "torchvision >= 0.15 (this is 0.14.1)"),
        (np, "__version__", "1.23.5", "numpy >= 1.24 (this is 1.23.5)"),
        (sys, "version_info", (3, 9, 18, "final", 0), "Python >= 3.10 (this is 3.9.18)"),
    ],
)
def test_too_old_a_version_is_refused_at_start_in_one_line(monkeypatch, capsys, module, attribute, old, expected):
    monkeypatch.setattr(module, attribute, old)
    ran = []
    with pytest.raises(SystemExit) as info:
        commons.run_main(ran.append, None)
    assert info.value.code == 2 and ran == []  # refused before the script's main runs
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: SelaVPR needs ") and expected in err, err


def test_a_pre_release_of_the_minimum_or_newer_is_accepted(monkeypatch):
    for version in ("2.0.0", "2.0.0a0+git1234", "2.14.1+cpu", "10.0"):
        monkeypatch.setattr(torch, "__version__", version)
        assert commons.unsupported_versions() is None, version


def _floors(path):
    """{package: full version tuple} of the lower bounds (>=) or pins (==) of a requirements file."""
    found = {}
    for line in open(os.path.join(ROOT, path)):
        m = re.match(r"^([A-Za-z][\w-]*)\s*(?:>=|==)\s*(\d+(?:\.\d+)*)", line.split("#")[0].strip())
        if m:
            found[m.group(1).lower()] = tuple(int(v) for v in m.group(2).split("."))
    return found


def test_declared_floors_are_the_tested_ones():
    """requirements.txt's lower bounds are exactly, to the patch release, the versions CI's floors environment
    installs (torch>=2.0.1, not >=2.0: 2.0.0 was never tested), and the start-up check refuses below their
    minor release."""
    declared, tested = _floors("requirements.txt"), _floors("requirements-floors.txt")
    assert set(declared) <= set(tested) and declared, (declared, tested)
    assert {k: tested[k] for k in declared} == declared
    assert declared["torch"] == (2, 0, 1)
    for name in ("torch", "torchvision", "numpy"):
        assert commons.MIN_VERSIONS[name] == declared[name][:2]
