"""The memory allocator of the pipeline's notebook kernels: tcmalloc where it is installed.

PyTorch on the CPU allocates and frees activation-sized buffers in every forward and backward
pass. glibc's ``malloc`` hands large blocks back to the operating system and faults fresh,
zeroed pages in on the next request; tcmalloc keeps freed memory for reuse. The attacks query
the model thousands of times, so they gain most: on a 2-core Intel Xeon a Square attack on the
default ViT ran 1.20x faster with tcmalloc, on the ResNet-18 1.10x, training 1.06-1.09x
(``benchmarks/bench_allocator.py`` prints the numbers); whole attack stages, which also run
Square L2 and PGD, 1.14x (ResNet-18) and 1.02x (ViT).

The allocator decides where tensors live, never the arithmetic: the same seed gives the same
numbers bit for bit under either (``tests/test_allocator.py`` checks an attack and a training
step). :func:`calib.pipeline.run_stage` therefore starts every stage's kernel with tcmalloc
preloaded when the library is found, and with the system allocator otherwise (saying so).

``CALIB_ALLOCATOR`` chooses: ``tcmalloc`` (the default: use it where found), ``system`` (never
preload), or the path of a shared library to preload instead (e.g. jemalloc's).

    >>> choice = choose_allocator()
    >>> env = kernel_environment(choice)   # os.environ plus LD_PRELOAD where one is chosen
"""

from __future__ import annotations

import os
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ALLOCATORS",
    "ALLOCATOR_ENV",
    "TCMALLOC_LIBRARIES",
    "Allocator",
    "choose_allocator",
    "find_tcmalloc",
    "kernel_environment",
    "library_dirs",
]

#: The environment variable that chooses the kernels' allocator.
ALLOCATOR_ENV = "CALIB_ALLOCATOR"
#: Named choices of ``CALIB_ALLOCATOR`` (anything else must be the path of a shared library).
ALLOCATORS: tuple[str, ...] = ("tcmalloc", "system")
#: tcmalloc's shared libraries, most preferred first (Debian: libtcmalloc-minimal4; conda:
#: gperftools). The minimal build has no heap profiler, which nothing here needs.
TCMALLOC_LIBRARIES: tuple[str, ...] = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
#: tcmalloc reports every allocation over 1 GiB on stderr by default; a stage's notebook would
#: show those lines as warnings, so the threshold is raised past any single tensor here.
_QUIET_LARGE_ALLOCATIONS = {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}
_INSTALL_HINT = ("install it for faster CPU stages: Debian/Ubuntu `apt-get install "
                 "libtcmalloc-minimal4` (make setup does this as root), conda `gperftools`")


@dataclass(frozen=True)
class Allocator:
    """The allocator chosen for the kernels.

    Attributes:
        name: "tcmalloc", "system" or "custom" (a library path given in ``CALIB_ALLOCATOR``).
        library: the shared library to preload; None for the system allocator.
        reason: why this one, in words (printed by each stage).
    """

    name: str
    library: Path | None
    reason: str

    def describe(self) -> str:
        """One line for a stage's log."""
        where = f" ({self.library})" if self.library else ""
        return f"memory allocator: {self.name}{where}: {self.reason}"


def library_dirs() -> list[Path]:
    """Folders searched for tcmalloc: the environment's own lib (conda), then the system's."""
    dirs = [Path(sys.prefix) / "lib"]
    if os.environ.get("CONDA_PREFIX"):
        dirs.append(Path(os.environ["CONDA_PREFIX"]) / "lib")
    multiarch = sysconfig.get_config_var("MULTIARCH")
    if multiarch:
        dirs += [Path("/usr/lib") / multiarch, Path("/lib") / multiarch]
    dirs += [Path("/usr/lib64"), Path("/usr/lib"), Path("/usr/local/lib")]
    return list(dict.fromkeys(dirs))


def find_tcmalloc(dirs: Iterable[Path] | None = None) -> Path | None:
    """The first tcmalloc library in ``dirs`` (default :func:`library_dirs`), or None."""
    for folder in library_dirs() if dirs is None else dirs:
        for name in TCMALLOC_LIBRARIES:
            candidate = Path(folder) / name
            if candidate.is_file():
                return candidate
    return None


def choose_allocator(env: Mapping[str, str] | None = None, *,
                     dirs: Iterable[Path] | None = None, platform: str | None = None
                     ) -> Allocator:
    """The allocator ``CALIB_ALLOCATOR`` in ``env`` (default ``os.environ``) asks for.

    Args:
        env: the environment to read ``CALIB_ALLOCATOR`` from.
        dirs: folders to search for tcmalloc (default :func:`library_dirs`).
        platform: ``sys.platform`` (preloading is a Linux mechanism; elsewhere: the system's).

    Raises:
        ValueError: the value is neither a named choice nor the path of an existing file.
    """
    env = os.environ if env is None else env
    platform = sys.platform if platform is None else platform
    value = env.get(ALLOCATOR_ENV, "").strip() or "tcmalloc"
    if value == "system":
        return Allocator("system", None, f"{ALLOCATOR_ENV}=system")
    if value not in ALLOCATORS and not Path(value).is_file():
        raise ValueError(f"{ALLOCATOR_ENV}={value!r} is neither one of {list(ALLOCATORS)} nor "
                         f"the path of a shared library")
    if not platform.startswith("linux"):
        return Allocator("system", None, f"preloading an allocator needs Linux, not {platform}")
    if value != "tcmalloc":
        return Allocator("custom", Path(value), f"{ALLOCATOR_ENV}={value}")
    found = find_tcmalloc(dirs)
    if found is None:
        return Allocator("system", None, f"tcmalloc not found; {_INSTALL_HINT}")
    return Allocator("tcmalloc", found,
                     f"found (the same numbers as the system's, faster CPU stages; "
                     f"{ALLOCATOR_ENV}=system turns it off)")


def kernel_environment(allocator: Allocator, base: Mapping[str, str] | None = None
                       ) -> dict[str, str]:
    """``base`` (default ``os.environ``) with ``allocator``'s library first in LD_PRELOAD."""
    env = dict(os.environ if base is None else base)
    if allocator.library is None:
        return env
    preload = [p for p in env.get("LD_PRELOAD", "").replace(":", " ").split() if p]
    library = str(allocator.library)
    env["LD_PRELOAD"] = " ".join([library] + [p for p in preload if p != library])
    for key, value in _QUIET_LARGE_ALLOCATIONS.items():
        env.setdefault(key, value)
    return env
