"""The install lists agree, and the package metadata matches them."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([A-Za-z0-9_.\-+]+)", line)
        assert match, f"not an exact pin: {line!r}"
        pins[match.group(1).lower()] = match.group(2)
    return pins


def test_requirements_and_environment_carry_the_same_pins() -> None:
    requirements = _pins((ROOT / "requirements.txt").read_text().splitlines())
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_sections = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    assert len(pip_sections) == 1
    assert _pins(pip_sections[0]) == requirements
    assert "python=3.11" in env["dependencies"]


def test_brief_pins() -> None:
    pins = _pins((ROOT / "requirements.txt").read_text().splitlines())
    assert pins["torch"] == "2.14.1"
    assert pins["torchvision"] == "0.29.1"
    assert pins["timm"].startswith("1.0.")
    assert int(pins["dvc"].split(".")[0]) == 3
    major, minor = (int(v) for v in pins["papermill"].split(".")[:2])
    assert (major, minor) >= (2, 6)
    for name in ("jupyter", "ipykernel", "matplotlib", "seaborn", "pandas", "scipy",
                 "safetensors", "tqdm", "pytest", "hypothesis", "ruff"):
        assert name in pins, name
