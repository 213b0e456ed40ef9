"""Output directories that appear whole or not at all.

Everything is written into a hidden sibling `.NAME.partial-PID`, fsynced, and
renamed onto the output path at the end; an existing output (with `force`)
is moved aside only then, so at every moment the output path holds either
the old complete directory or the new complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil


def check_new(out_dir: str, *, force: bool) -> None:
  """Raises unless `out_dir` may be written (absent, or `force`)."""
  if os.path.exists(out_dir) and not force:
    raise FileExistsError(
        f"out: {out_dir!r} already exists; pass --force to replace it")
  parent = os.path.dirname(out_dir)
  if not os.path.isdir(parent):
    raise ValueError(f"out: parent directory {parent!r} does not exist")


@contextlib.contextmanager
def staged(out_dir: str):
  """Yields a temporary sibling of `out_dir` that becomes `out_dir` if the
  block succeeds and is removed if it raises (or is interrupted)."""
  tmp_dir = os.path.join(os.path.dirname(out_dir),
                         f".{os.path.basename(out_dir)}.partial-{os.getpid()}")
  os.makedirs(tmp_dir)
  try:
    yield tmp_dir
    fsync_dir(tmp_dir)
    _move_into_place(tmp_dir, out_dir)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    raise


def write_json(path: str, obj) -> None:
  """Writes `obj` as indented JSON and fsyncs the file."""
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)
    f.flush()
    os.fsync(f.fileno())


def fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _move_into_place(tmp_dir: str, out_dir: str) -> None:
  old = None
  if os.path.exists(out_dir):
    old = os.path.join(os.path.dirname(out_dir),
                       f".{os.path.basename(out_dir)}.old-{os.getpid()}")
    os.rename(out_dir, old)
  os.rename(tmp_dir, out_dir)
  fsync_dir(os.path.dirname(out_dir))
  if old is None:
    return
  # `--force` may replace a file or a symlink too; rmtree refuses those (and
  # ignore_errors would leave the hidden `.old-PID` behind).
  if os.path.isdir(old) and not os.path.islink(old):
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.remove(old)
