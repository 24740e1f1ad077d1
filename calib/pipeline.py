"""Run one pipeline stage: validate params.yaml, then execute its notebook with papermill.

Usage (this is what every ``dvc.yaml`` stage calls)::

    python -m calib.pipeline NOTEBOOK OUTPUT [-p NAME VALUE ...] [-P NAME KEY ...]

* ``params.yaml`` is validated first (:func:`calib.config.load_params`), so bad configuration
  stops the stage before a kernel starts, naming the key and the allowed values.
* The ``-p`` and ``-P`` names together must be exactly the names in the notebook's single
  ``parameters`` cell. ``-p`` values are parsed as YAML scalars (``true``, ``0.05``, ``null``
  ...), which is how DVC renders params.yaml values into the command line. ``-P NAME KEY`` passes
  the value at the dotted ``KEY`` of params.yaml (e.g. ``defend.options``) as it is, so a
  mapping reaches the notebook as one mapping; the stage lists ``KEY`` under ``params:`` so DVC
  still reruns it when the value changes.
* The executed notebook is written beside OUTPUT and renamed into place only if every cell ran;
  a failed run is kept under ``reports/failed/`` for debugging and the stage exits non-zero.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from calib.allocator import choose_allocator, kernel_environment

#: The Jupyter kernel that ``make setup`` registers for the project's environment.
KERNEL_NAME = "calib"


def parameter_names(notebook: str | Path) -> list[str]:
    """Names assigned in the notebook's single cell tagged ``parameters`` (in order)."""
    nb = json.loads(Path(notebook).read_text(encoding="utf-8"))
    cells = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"
             and "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(
            f"{notebook}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    source = cells[0]["source"]
    source = "".join(source) if isinstance(source, list) else source
    names: list[str] = []
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else (
            [node.target] if isinstance(node, ast.AnnAssign) else [])
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def parse_value(text: str) -> Any:
    """A command-line value as YAML would read it (DVC renders booleans as true/false).

    An empty value (a quoted empty string in dvc.yaml, e.g. ``"${data.mirror}"``) stays the
    empty string; YAML alone would read it as null.
    """
    if text == "":
        return ""
    value = yaml.safe_load(text)
    return text if isinstance(value, dict | list) else value


def params_value(params_file: str | Path, key: str) -> Any:
    """The value at the dotted ``key`` of a params file (``"defend.options"``).

    Raises:
        KeyError: a part of ``key`` is missing (naming the part and the keys found there).
    """
    with Path(params_file).open(encoding="utf-8") as fh:
        value: Any = yaml.safe_load(fh)
    path: list[str] = []
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            found = sorted(value) if isinstance(value, dict) else []
            where = ".".join(path) or "the top level"
            raise KeyError(f"{params_file} has no key {key!r}: {part!r} is not in {where} "
                           f"(keys there: {found})")
        path.append(part)
        value = value[part]
    return value


def _kernel_available(name: str) -> bool:
    from jupyter_client.kernelspec import KernelSpecManager

    return name in KernelSpecManager().find_kernel_specs()


#: Where a stage records that the current params file passed validation (DVC's scratch folder).
VALIDATED_STAMP = Path(".dvc/tmp/calib-validated-params")


def _validation_key(params_file: str | Path) -> str:
    """Hash of what validation depends on: the params file, calib's sources, timm's version."""
    from importlib.metadata import PackageNotFoundError, version

    h = hashlib.sha256(Path(params_file).read_bytes())
    package = Path(__file__).resolve().parent
    for source in sorted(package.rglob("*.py")):
        h.update(source.relative_to(package).as_posix().encode())
        h.update(source.read_bytes())
    try:
        h.update(version("timm").encode())
    except PackageNotFoundError:
        pass
    return h.hexdigest()


def validate_params_once(params_file: str | Path = "params.yaml") -> None:
    """Validate ``params_file`` unless an earlier stage already validated the same content.

    Full validation imports torch, torchvision and timm (about 3.5 s on a 2-core CPU); the
    stages of one ``dvc repro`` all read the same file, so the first validates it and leaves a
    stamp keyed by the file, calib's sources and timm's version, and the others skip the
    imports. Without a ``.dvc`` folder (a stage run by hand elsewhere) it always validates.
    """
    from calib.config import ConfigError

    if not Path(params_file).exists():
        raise ConfigError(f"no parameters file at {params_file}")
    key = _validation_key(params_file)
    stamp = VALIDATED_STAMP
    if stamp.exists() and stamp.read_text(encoding="utf-8") == key:
        return
    from calib.config import load_params

    load_params(params_file)
    if stamp.parent.parent.is_dir():  # calib.io would import torch: write it here
        stamp.parent.mkdir(exist_ok=True)
        tmp = stamp.with_name(f".{stamp.name}.{os.getpid()}")
        tmp.write_text(key, encoding="utf-8")
        os.replace(tmp, stamp)


def run_stage(notebook: str, output: str, parameters: dict[str, Any], *,
              params_keys: dict[str, str] | None = None, params_file: str = "params.yaml",
              kernel: str = KERNEL_NAME) -> None:
    """Validate configuration and parameters, then execute ``notebook`` into ``output``.

    Args:
        notebook, output: the source notebook and where its executed copy goes.
        parameters: name -> value, passed as they are.
        params_keys: name -> dotted key of ``params_file`` whose value is passed as ``name``
            (read after the file is validated).
        params_file: the pipeline's parameters.
        kernel: the Jupyter kernel to run on.
    """
    import papermill as pm

    validate_params_once(params_file)
    parameters = dict(parameters)
    for name, key in (params_keys or {}).items():
        if name in parameters:
            raise ValueError(f"parameter {name!r} is given twice (-p and -P)")
        parameters[name] = params_value(params_file, key)
    expected = parameter_names(notebook)
    if sorted(expected) != sorted(parameters):
        missing = sorted(set(expected) - set(parameters))
        extra = sorted(set(parameters) - set(expected))
        raise ValueError(f"{notebook}: stage parameters do not match the parameters cell "
                         f"(missing: {missing}, unknown: {extra})")
    if not _kernel_available(kernel):
        raise RuntimeError(f"Jupyter kernel {kernel!r} is not registered; run `make setup` (it "
                           f"registers the project's environment as {kernel!r})")
    # The kernel inherits this process's environment: tcmalloc is preloaded into it where
    # installed (faster CPU stages, the same numbers; calib.allocator).
    # Set for this call only, so a caller that runs stages in-process keeps its environment.
    allocator = choose_allocator()
    saved = dict(os.environ)
    os.environ.update(kernel_environment(allocator))
    print(allocator.describe(), flush=True)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.partial{out.suffix}")
    try:
        # Every cell has finished (and written its files atomically) when the kernel is shut
        # down, so it is stopped at once instead of waiting for a graceful exit (~1 s a stage).
        pm.execute_notebook(notebook, str(tmp), parameters=parameters, kernel_name=kernel,
                            log_output=True, progress_bar=False, cwd=os.getcwd(),
                            shutdown_kernel="immediate")
    except BaseException:
        if tmp.exists():
            failed = Path("reports/failed") / out.name
            failed.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, failed)
            print(f"stage failed; the partly executed notebook is in {failed}", file=sys.stderr)
        raise
    finally:
        os.environ.clear()
        os.environ.update(saved)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calib.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebook")
    parser.add_argument("output")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                        metavar=("NAME", "VALUE"))
    parser.add_argument("-P", "--params-key", nargs=2, action="append", default=[],
                        metavar=("NAME", "KEY"),
                        help="pass the params.yaml value at the dotted KEY as NAME")
    parser.add_argument("--params-file", default="params.yaml")
    parser.add_argument("-k", "--kernel", default=KERNEL_NAME)
    args = parser.parse_args(argv)
    parameters = {name: parse_value(value) for name, value in args.parameter}
    try:
        run_stage(args.notebook, args.output, parameters, params_keys=dict(args.params_key),
                  params_file=args.params_file, kernel=args.kernel)
    except Exception as err:  # a clean one-line reason on stderr, full detail above it
        from papermill.exceptions import PapermillExecutionError

        if isinstance(err, PapermillExecutionError):
            print(f"error in {args.notebook}: {err.ename}: {err.evalue}", file=sys.stderr)
        else:
            print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
