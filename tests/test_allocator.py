"""The kernels' memory allocator (calib.allocator): choice, fallback, and the same numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from calib.allocator import (
    ALLOCATOR_ENV,
    TCMALLOC_LIBRARIES,
    Allocator,
    choose_allocator,
    find_tcmalloc,
    kernel_environment,
)

ROOT = Path(__file__).resolve().parents[1]


def _fake_lib(folder: Path, name: str = TCMALLOC_LIBRARIES[0]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lib = folder / name
    lib.write_bytes(b"\x7fELF")
    return lib


def _tcmalloc_or_skip() -> Path:
    """The installed tcmalloc; otherwise skip saying why, or fail where ``CI`` is set."""
    found = find_tcmalloc()
    if found is None:
        reason = "tcmalloc is not installed (make setup installs libtcmalloc-minimal4 as root)"
        if os.environ.get("CI"):
            pytest.fail(f"tcmalloc required on CI: {reason}")
        pytest.skip(reason)
    return found


def test_tcmalloc_is_chosen_where_found(tmp_path):
    lib = _fake_lib(tmp_path / "lib")
    choice = choose_allocator({}, dirs=[tmp_path / "empty", tmp_path / "lib"], platform="linux")
    assert choice == Allocator("tcmalloc", lib, choice.reason)
    assert "tcmalloc" in choice.describe() and str(lib) in choice.describe()


def test_the_minimal_build_is_preferred(tmp_path):
    _fake_lib(tmp_path, TCMALLOC_LIBRARIES[1])
    minimal = _fake_lib(tmp_path, TCMALLOC_LIBRARIES[0])
    assert find_tcmalloc([tmp_path]) == minimal


def test_falls_back_to_the_system_allocator_and_says_how_to_install(tmp_path):
    choice = choose_allocator({ALLOCATOR_ENV: "tcmalloc"}, dirs=[tmp_path], platform="linux")
    assert choice.name == "system" and choice.library is None
    assert "libtcmalloc-minimal4" in choice.reason and "gperftools" in choice.reason


def test_system_turns_it_off_and_other_platforms_never_preload(tmp_path):
    _fake_lib(tmp_path)
    off = choose_allocator({ALLOCATOR_ENV: "system"}, dirs=[tmp_path], platform="linux")
    assert off.library is None and ALLOCATOR_ENV in off.reason
    mac = choose_allocator({}, dirs=[tmp_path], platform="darwin")
    assert mac.library is None and "darwin" in mac.reason


def test_a_library_path_is_preloaded_as_given(tmp_path):
    lib = _fake_lib(tmp_path, "libjemalloc.so.2")
    choice = choose_allocator({ALLOCATOR_ENV: str(lib)}, platform="linux")
    assert choice.name == "custom" and choice.library == lib


def test_unknown_value_names_the_variable_and_the_choices(tmp_path):
    with pytest.raises(ValueError, match=rf"{ALLOCATOR_ENV}='jemalloc'.*'tcmalloc', 'system'"):
        choose_allocator({ALLOCATOR_ENV: "jemalloc"}, platform="linux")
    with pytest.raises(ValueError, match="shared library"):
        choose_allocator({ALLOCATOR_ENV: str(tmp_path / "missing.so")}, platform="linux")


def test_kernel_environment_puts_the_library_first_once(tmp_path):
    lib = _fake_lib(tmp_path)
    choice = Allocator("tcmalloc", lib, "test")
    env = kernel_environment(choice, {"LD_PRELOAD": f"/other.so:{lib}", "KEEP": "1"})
    assert env["LD_PRELOAD"].split() == [str(lib), "/other.so"]
    assert env["KEEP"] == "1" and int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    assert kernel_environment(Allocator("system", None, "x"), {"A": "b"}) == {"A": "b"}


_SAME_NUMBERS = """
import hashlib, torch
from calib.attacks import run_attack
from calib.models import create_model
torch.manual_seed(0)
model = create_model("resnet10t", num_classes=10, in_chans=1, img_size=28, mean=[0.3],
                     std=[0.3]).eval()
x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1))
y = torch.arange(64) % 10
adv = run_attack(model, x, kind="mma", method="square", eps=0.1, iterations=30, labels=y,
                 seed=0).x_adv
model.train()
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
for _ in range(3):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
blob = adv.numpy().tobytes() + b"".join(p.detach().numpy().tobytes() for p in model.parameters())
print(hashlib.sha256(blob).hexdigest())
"""


def test_tcmalloc_gives_the_same_numbers_bit_for_bit():
    lib = _tcmalloc_or_skip()
    digests = {}
    for choice in (Allocator("system", None, "x"), Allocator("tcmalloc", lib, "x")):
        env = kernel_environment(choice, os.environ)
        env["PYTHONPATH"] = str(ROOT)
        out = subprocess.run([sys.executable, "-c", _SAME_NUMBERS], env=env, cwd=ROOT,
                             capture_output=True, text=True, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        digests[choice.name] = out.stdout.strip().splitlines()[-1]
    assert digests["system"] == digests["tcmalloc"]


def test_a_stage_kernel_runs_with_the_chosen_allocator(tmp_path, monkeypatch):
    """run_stage preloads tcmalloc into the notebook's kernel (and not when it is turned off)."""
    from calib.pipeline import KERNEL_NAME, _kernel_available, run_stage

    lib = _tcmalloc_or_skip()
    if not _kernel_available(KERNEL_NAME):
        pytest.skip(f"Jupyter kernel {KERNEL_NAME!r} not registered (make setup)")
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "calib",
                                 "language": "python"}
    params = nbformat.v4.new_code_cell('out = "x.json"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(
        "import json, os\n"
        "maps = open('/proc/self/maps').read()\n"
        "json.dump({'preload': os.environ.get('LD_PRELOAD', ''),\n"
        "           'loaded': 'tcmalloc' in maps}, open(out, 'w'))")]
    source = tmp_path / "probe.ipynb"
    nbformat.write(nb, source)
    (tmp_path / "params.yaml").write_text("profile: test\n", encoding="utf-8")
    monkeypatch.setattr("calib.pipeline.validate_params_once", lambda _file: None)
    for setting, expect in (("tcmalloc", True), ("system", False)):
        monkeypatch.setenv(ALLOCATOR_ENV, setting)
        monkeypatch.setenv("LD_PRELOAD", "")
        target = tmp_path / f"{setting}.json"
        run_stage(str(source), str(tmp_path / f"{setting}.ipynb"), {"out": str(target)},
                  params_file=str(tmp_path / "params.yaml"))
        seen = json.loads(target.read_text())
        assert seen["loaded"] is expect
        assert (str(lib) in seen["preload"]) is expect
