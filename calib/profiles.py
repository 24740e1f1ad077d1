"""The three pipeline scales: smoke, default and paper.

``profiles/default.yaml`` holds every parameter; ``profiles/smoke.yaml`` and
``profiles/paper.yaml`` hold only what differs and are deep-merged over it. Switching a
profile rewrites ``params.yaml`` (which DVC reads) and validates it first::

    python -m calib.profiles smoke        # or: make profile PROFILE=smoke

The first line of params.yaml and of profiles/default.yaml points the YAML language server at
the JSON Schema of :mod:`calib.config`, so editors complete and check them. The overlays
(smoke, paper) hold only some keys, so they carry no such line: the schema requires every key.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from calib.config import PROFILES, SCHEMA_FILE, ConfigError, check_params
from calib.io import write_text

PROFILES_DIR = Path("profiles")

#: First line of params.yaml: the schema beside it.
PARAMS_HEADER = f"# yaml-language-server: $schema={SCHEMA_FILE}\n"
#: First line of profiles/default.yaml: the same schema, one folder up.
PROFILE_HEADER = f"# yaml-language-server: $schema=../{SCHEMA_FILE}\n"


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated recursively by ``overlay`` (mappings merge, other values replace).

    A key whose overlay value is ``null`` is removed (e.g. to drop a model in a profile).
    """
    out = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh) or {}


def render_profile(name: str, profiles_dir: Path = PROFILES_DIR) -> dict[str, Any]:
    """The full, validated parameters of profile ``name``."""
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; choose one of {list(PROFILES)}")
    params = _read(profiles_dir / "default.yaml")
    if name != "default":
        params = deep_merge(params, _read(profiles_dir / f"{name}.yaml"))
    params["profile"] = name
    check_params(params)
    return params


def dump_params(params: Mapping[str, Any]) -> str:
    """The text of a params.yaml holding ``params`` (the schema line, a note, then YAML)."""
    header = (f"{PARAMS_HEADER}"
              f"# Generated from profiles/ by `python -m calib.profiles {params['profile']}`.\n"
              "# Edit it freely (or use `dvc exp run -S key=value`); switch profile to reset.\n")
    return header + yaml.safe_dump(dict(params), sort_keys=False, default_flow_style=False)


def profile_text(name: str, profiles_dir: Path = PROFILES_DIR) -> str:
    """The text of params.yaml for profile ``name`` (validated first).

    The default profile is profiles/default.yaml verbatim, comments included, but for its
    first line, whose path to the schema is relative to profiles/.
    """
    params = render_profile(name, profiles_dir)
    if name != "default":
        return dump_params(params)
    text = (profiles_dir / "default.yaml").read_text(encoding="utf-8")
    if not text.startswith(PROFILE_HEADER):
        raise ConfigError(f"{profiles_dir / 'default.yaml'} must start with {PROFILE_HEADER!r}")
    return PARAMS_HEADER + text[len(PROFILE_HEADER):]


def use_profile(name: str, params_path: Path = Path("params.yaml"),
                profiles_dir: Path = PROFILES_DIR) -> None:
    """Write profile ``name`` to ``params_path`` (atomically)."""
    write_text(params_path, profile_text(name, profiles_dir))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: python -m calib.profiles {{{'|'.join(PROFILES)}}}", file=sys.stderr)
        return 2
    try:
        use_profile(args[0])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"params.yaml now holds the {args[0]!r} profile; run `dvc repro` (or `make reproduce`)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
