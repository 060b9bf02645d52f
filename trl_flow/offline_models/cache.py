"""Where offline builds live, and how they are written so that readers never see half of one.

A build is a folder that ``diffusers`` loads with ``from_pretrained``. It counts as complete when it holds the marker
file :data:`MARKER_FILE` (JSON: the recipe version, the seed and the build's metrics), which is written last. Builds
are written into a temporary sibling folder and renamed into place (:func:`save_build`); :func:`ensure_build` builds
a missing or incomplete one under a lock file, so concurrent callers (pytest-xdist workers, DDP ranks) build once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "CACHE_ENV",
    "MARKER_FILE",
    "SeededBuild",
    "absolute_path",
    "cache_root",
    "ensure_build",
    "is_complete",
    "save_build",
]

CACHE_ENV: str = "TRL_FLOW_CACHE"
"""Environment variable naming the cache root (default ``~/.cache/trl_flow``)."""

MARKER_FILE: str = ".complete"
"""Name of the file written last into a finished build folder."""


def cache_root() -> pathlib.Path:
    """``$TRL_FLOW_CACHE``, or ``~/.cache/trl_flow`` when it is unset or empty; each recipe has a folder below it."""
    root = os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "trl_flow")
    return pathlib.Path(root).expanduser()


def absolute_path(path: str | os.PathLike) -> pathlib.Path:
    """``path`` with ``~`` expanded, made absolute (not resolved: a symlinked cache keeps its name)."""
    return pathlib.Path(path).expanduser().absolute()


def is_complete(path: pathlib.Path) -> bool:
    """Whether ``path`` holds a finished build (its marker file)."""
    return (path / MARKER_FILE).is_file()


@contextlib.contextmanager
def _file_lock(target: pathlib.Path) -> Iterator[None]:
    """Hold an exclusive advisory lock next to ``target`` (no-op where ``fcntl`` is unavailable)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _looks_like_build(path: pathlib.Path) -> bool:
    return is_complete(path) or (path / "model_index.json").is_file() or not any(path.iterdir())


def _install(tmp: pathlib.Path, target: pathlib.Path, keep_complete: bool) -> None:
    """Atomically move the finished build ``tmp`` to ``target``.

    An existing ``target`` is replaced, unless ``keep_complete`` and it is a complete build (then ``tmp`` is
    discarded: another process won the race). A non-empty directory that does not look like a previous build
    is never replaced.
    """
    for _ in range(10):
        try:
            os.replace(tmp, target)  # atomic; succeeds when target is absent (or an empty directory)
            return
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if keep_complete and is_complete(target):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if not _looks_like_build(target):
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(f"refusing to replace {target}: it is not an offline trl-flow build")
        trash = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        with contextlib.suppress(FileNotFoundError):
            os.replace(target, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    raise RuntimeError(f"could not install the build at {target}")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread, then restore the caller's count.

    A build trains (the VAEs, the edit model's transformer), and a CPU kernel's float sums depend on how many threads
    split them: a tiny SD3 VAE trained on two threads differed from the one-thread build by 0.06 in a weight, and the
    learning tests' figures moved with it. On one thread a seed gives the same build under pytest-xdist, a CLI run or
    any rank of a launched job. For the tiny builds (:class:`SeededBuild`) only: the mini-GenEval build takes its
    thread count from its caller and records it in its marker.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _saving_on_this_rank(pipe: Any) -> Iterator[None]:
    """Make the pipeline's transformers models write their weights whichever process saves them.

    Since transformers 5.25, ``PreTrainedModel.save_pretrained`` writes nothing but its config on a process whose
    ``torch.distributed`` rank is not 0. A build is local to the process that holds the lock, which under
    ``accelerate launch`` may be any rank: without this, rank 1's build of a tiny model had an empty text encoder.
    """
    patched = [
        module
        for module in getattr(pipe, "components", {}).values()
        if callable(getattr(module, "should_save_on_this_rank", None))
    ]
    for module in patched:
        module.should_save_on_this_rank = lambda is_main_process: is_main_process
    try:
        yield
    finally:
        for module in patched:
            del module.should_save_on_this_rank


def save_build(
    target: pathlib.Path,
    build: Callable[[], tuple[Any, dict]],
    marker: dict,
    keep_complete: bool,
    metrics_key: str = "vae",
) -> pathlib.Path:
    """Save the pipeline ``build()`` returns as a complete build at ``target``; its metrics go into the marker
    under ``metrics_key``.

    Shared by the builders of every family. The caller's global torch RNG state is left untouched. The folder is
    written next to ``target`` and renamed into place with the marker file ``marker`` written last, so readers never
    see a partial build (replacement rules: `_install`).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0o700 mode would end up on the installed directory; os.mkdir honours umask.
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with torch.random.fork_rng(devices=[]):
            pipe, metrics = build()
        with _saving_on_this_rank(pipe):
            pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / MARKER_FILE).write_text(json.dumps({**marker, metrics_key: metrics}, indent=2) + "\n")
        _install(tmp, target, keep_complete=keep_complete)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def ensure_build(target: pathlib.Path, build_into: Callable[[pathlib.Path], pathlib.Path]) -> pathlib.Path:
    """``target`` if it holds a complete build, else ``build_into(target)`` under a lock file next to it (the
    check is repeated under the lock, so concurrent callers build once)."""
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target):
        if is_complete(target):
            return target
        return build_into(target)


@dataclass(frozen=True)
class SeededBuild:
    """A build recipe that a seed determines, cached as ``{cache_root()}/{folder}-{version}`` (the tiny builders).

    Attributes:
        folder: the cache folder's name before the version, e.g. ``"tiny-flux"``.
        version: the recipe's version; bump it whenever the recipe changes, so that stale caches are not reused.
        make: seed -> ``(pipeline, metrics)``; the metrics are stored in the marker file under ``metrics_key``.
        metrics_key: the marker's key of the metrics (``"vae"``: the metrics of most builds are their VAE's).
    """

    folder: str
    version: str
    make: Callable[[int], tuple[Any, dict]]
    metrics_key: str = "vae"

    def default_dir(self) -> pathlib.Path:
        """Where :meth:`ensure` builds when given no path."""
        return cache_root() / f"{self.folder}-{self.version}"

    def build_into(self, target: pathlib.Path, seed: int, keep_complete: bool) -> pathlib.Path:
        """:func:`save_build` of ``make(seed)`` at the absolute path ``target``, on one torch thread (`_one_thread`);
        the marker holds version and seed."""
        marker = {"version": self.version, "seed": seed}
        with _one_thread():
            return save_build(target, lambda: self.make(seed), marker, keep_complete, self.metrics_key)

    def build(self, output_dir: str | os.PathLike, seed: int) -> pathlib.Path:
        """Build into ``output_dir`` and return it as an absolute path.

        Deterministic for a ``seed`` on a given machine, whatever torch's thread count (builds run on one thread).
        The build is written into a temporary sibling folder and renamed into place once complete (marker file
        last), so readers never see a partial build; an existing previous build (or empty folder) there is
        replaced, any other non-empty folder raises :class:`FileExistsError`. The caller's global torch RNG state
        is left untouched.
        """
        return self.build_into(absolute_path(output_dir), seed, keep_complete=False)

    def ensure(self, path: str | os.PathLike | None = None) -> pathlib.Path:
        """The folder of a complete build at ``path`` (default :meth:`default_dir`), built with seed 0 if needed.

        A folder counts as complete when it holds the marker file; one without it is rebuilt. Concurrent callers are
        serialised by a lock file next to the folder where ``fcntl`` is available; without it they may build in
        parallel but never corrupt the result (the loser of the final rename uses the winner's build).
        """
        target = absolute_path(path if path is not None else self.default_dir())
        return ensure_build(target, lambda folder: self.build_into(folder, seed=0, keep_complete=True))
