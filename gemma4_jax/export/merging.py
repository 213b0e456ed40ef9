"""Streaming LoRA merge into a Hugging Face safetensors checkpoint.

The model is never loaded. Every output file's header is computed first;
each weight an adapter changes is read in row chunks at its header offset,
merged as `W + scale * B @ A` in float32 and cast back to its dtype
(`row_merge`, on a small thread pool, each chunk written at its planned
offset); meanwhile every other tensor is copied file-to-file by the OS
kernel (`copy_file_range`). Peak memory is a small constant plus the
adapter, whatever the size of the model.

Output goes to a hidden sibling directory, is fsynced, verified and renamed
into place at the end; on any error or interrupt the partial directory is
removed, so a directory at the output path is always complete.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import resource
import shutil
import threading
import time

import numpy as np

from gemma4_jax import validation
from gemma4_jax.export import adapter as adapter_lib
from gemma4_jax.export import base as base_lib
from gemma4_jax.export import output_dir
from gemma4_jax.export import row_merge
from gemma4_jax.export import safetensors_io
from gemma4_jax.export import verify

DEFAULT_SHARD_SIZE = "5GB"
REPORT_NAME = "merge_report.json"
OUTPUT_METADATA = {"format": "pt"}
# Free space kept on top of the output size (page cache, filesystem slack).
DISK_MARGIN_BYTES = 64 << 20
# Threads merging row blocks (`verify.row_chunks`, ~2M elements: 4 MiB of
# bfloat16 in, 4 MiB out, 8 MiB of float32 delta each), whatever the model.
NUM_WORKERS = 2


class MergeError(RuntimeError):
  """The merge could not complete; no output directory was created."""


@dataclasses.dataclass(frozen=True)
class MergeSummary:
  """What a merge did."""
  output_dir: str
  num_tensors: int
  num_merged: int
  num_bytes: int
  seconds: float
  peak_rss_bytes: int
  report_path: str | None

  @property
  def gb_per_s(self) -> float:
    return self.num_bytes / max(self.seconds, 1e-9) / 1e9

  def __str__(self) -> str:
    return (f"{self.num_tensors} tensors ({self.num_merged} merged), "
            f"{self.num_bytes / 1e9:.3f} GB in {self.seconds:.2f} s "
            f"({self.gb_per_s:.2f} GB/s), peak RSS "
            f"{self.peak_rss_bytes / 2**20:.0f} MiB -> {self.output_dir}")


@dataclasses.dataclass(frozen=True)
class _Entry:
  name: str  # output name
  source: safetensors_io.TensorInfo
  delta: object | None  # mapping.LoraDelta


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def merge(base_dir: str | os.PathLike, adapter, out_dir: str | os.PathLike,
          *, force: bool = False, shard_size: int | str = DEFAULT_SHARD_SIZE,
          untie: bool = False, rank: int | None = None,
          alpha: float | None = None, verify_output: bool = True,
          progress: bool = True) -> MergeSummary:
  """Merges a LoRA adapter into a Hugging Face Gemma 4 checkpoint.

  Args:
    base_dir: Hugging Face safetensors directory (one file or an index).
    adapter: a Tunix checkpoint or PEFT directory, or an `adapter.Adapter`.
    out_dir: output directory; must not exist unless `force`.
    force: replace an existing `out_dir` (only once the new one is complete).
    shard_size: maximum bytes per output file, e.g. "5GB" or an int.
    untie: write an adapter on the tied embedding to a new `lm_head.weight`.
    rank, alpha: LoRA hyper-parameters, checked against the adapter.
    verify_output: re-read output headers and probe sampled merged weights.
    progress: show a progress bar on stderr.

  Returns:
    A `MergeSummary`.

  Raises:
    ValueError: bad arguments or inputs (message names what and why).
    FileExistsError: `out_dir` exists and `force` is false.
    MergeError: writing or verification failed (nothing left at `out_dir`).
  """
  start = time.perf_counter()
  # Every cheap check before the first file is opened.
  for name, value in (("force", force), ("untie", untie),
                      ("verify_output", verify_output),
                      ("progress", progress)):
    validation.check_bool(name, value)
  adapter_lib.check_rank_alpha(rank, alpha)
  shard_bytes = safetensors_io.parse_size(shard_size)
  base_dir, out_dir = os.fspath(base_dir), os.path.abspath(os.fspath(out_dir))
  _check_output_path(base_dir, out_dir, force)
  base = base_lib.open_base(base_dir)
  adapter = _loaded_adapter(adapter, rank, alpha)
  placed = base_lib.place_deltas(base, adapter.deltas, untie=untie)
  plan = _Plan.of(base, placed, shard_bytes)
  _check_free_space(out_dir, plan.total)
  try:
    with output_dir.staged(out_dir) as tmp_dir:
      _write_checkpoint(tmp_dir, plan, base, adapter, placed, untie=untie,
                        verify_output=verify_output, progress=progress)
  except OSError as e:
    raise MergeError(
        f"writing the merged checkpoint failed: {e}; removed the partial "
        f"output, nothing was written to {out_dir}") from e
  except verify.VerificationError as e:
    raise MergeError(f"verification failed: {e}; removed the partial "
                     f"output") from e
  return MergeSummary(out_dir, len(plan.entries), len(placed), plan.total,
                      time.perf_counter() - start, peak_rss_bytes(),
                      os.path.join(out_dir, REPORT_NAME))


def _loaded_adapter(adapter, rank, alpha) -> adapter_lib.Adapter:
  """`adapter` read from its path, or a given `Adapter` checked for rank."""
  if not isinstance(adapter, adapter_lib.Adapter):
    return adapter_lib.load_adapter(adapter, rank=rank, alpha=alpha)
  if rank is not None and rank != adapter.rank:
    raise adapter_lib.AdapterError(
        f"rank: given {rank}, the adapter has rank {adapter.rank}")
  return adapter


@dataclasses.dataclass(frozen=True)
class _Plan:
  """The output files: every tensor (`entries`), which go in which file
  (`shards`, indices into `entries`), the files' names and headers."""
  entries: list[_Entry]
  shards: list[list[int]]
  files: list[str]
  headers: list[bytes]

  @classmethod
  def of(cls, base, placed, shard_bytes: int) -> _Plan:
    entries = _plan_entries(base, placed)
    shards = safetensors_io.plan_shards([e.source.nbytes for e in entries],
                                        shard_bytes)
    headers = [safetensors_io.encode_header(
        [(entries[i].name, entries[i].source.dtype, entries[i].source.shape)
         for i in shard], OUTPUT_METADATA) for shard in shards]
    return cls(entries, shards, safetensors_io.shard_file_names(len(shards)),
               headers)

  @property
  def tensor_bytes(self) -> int:
    return sum(e.source.nbytes for e in self.entries)

  @property
  def total(self) -> int:
    """Bytes of all output files: tensors and headers."""
    return self.tensor_bytes + sum(map(len, self.headers))

  def weight_map(self) -> dict[str, str]:
    return {self.entries[i].name: self.files[k]
            for k, shard in enumerate(self.shards) for i in shard}


def _write_checkpoint(tmp_dir: str, plan: _Plan, base, adapter, placed, *,
                      untie: bool, verify_output: bool,
                      progress: bool) -> None:
  """The merged checkpoint in `tmp_dir`: the safetensors files and their
  index, the side files, the report (with the verification, if asked)."""
  with row_merge.single_threaded_blas():
    stats = _write_shards(tmp_dir, plan, progress)
  safetensors_io.write_index(tmp_dir, plan.weight_map(), plan.tensor_bytes)
  _copy_side_files(base, tmp_dir, untie_written="lm_head.weight" in placed
                   and "lm_head.weight" not in base.tensors)
  report = {
      "base": os.path.abspath(base.directory), "adapter": adapter.source,
      "layout": adapter.layout, "rank": adapter.rank, "alpha": adapter.alpha,
      "scale": adapter.scale, "untie": untie,
      "num_input_tensors": len(base.tensors), "num_output_tensors":
      len(plan.entries), "num_adapter_tensors": adapter.num_source_tensors,
      "merged": {name: {"source": placed[name].source, **s.as_dict()}
                 for name, s in stats.items()},
  }
  if verify_output:
    with row_merge.single_threaded_blas():
      report["verification"] = _verify(tmp_dir, plan.entries, placed)
  output_dir.write_json(os.path.join(tmp_dir, REPORT_NAME), report)


def _check_output_path(base_dir: str, out_dir: str, force: bool) -> None:
  real_base, real_out = os.path.realpath(base_dir), os.path.realpath(out_dir)
  if real_out == real_base or real_base.startswith(real_out + os.sep):
    raise ValueError(f"out: {out_dir!r} would overwrite the base checkpoint "
                     f"{base_dir!r}")
  output_dir.check_new(out_dir, force=force)


def _check_free_space(out_dir: str, needed: int) -> None:
  free = shutil.disk_usage(os.path.dirname(out_dir)).free
  if free < needed + DISK_MARGIN_BYTES:
    raise MergeError(
        f"not enough free disk space for {out_dir}: need "
        f"{(needed + DISK_MARGIN_BYTES) / 1e9:.2f} GB, "
        f"{free / 1e9:.2f} GB free")


def _plan_entries(base, placed) -> list[_Entry]:
  """Output tensors in on-disk order of the inputs (sequential reads)."""
  infos = sorted(base.tensors.values(), key=lambda t: (t.path, t.offset))
  entries = [_Entry(t.name, t, placed.get(t.name)) for t in infos]
  if "lm_head.weight" in placed and "lm_head.weight" not in base.tensors:
    embed = base.tensors[base.weight_name("embed_tokens")]
    entries.append(_Entry("lm_head.weight", embed, placed["lm_head.weight"]))
  return entries


def _write_shards(tmp_dir: str, plan: _Plan, progress: bool
                  ) -> dict[str, verify.TensorStats]:
  """Writes every output file: merged tensors in row pieces on a thread
  pool, unchanged tensors by OS-kernel copies on this thread meanwhile, each
  to its planned offset. Files are fsynced at the end, so the disk writes
  back one file while the next is produced."""
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  entries = plan.entries
  bar = tqdm(total=plan.total, unit="B", unit_scale=True, unit_divisor=1024,
             desc="merge", disable=not progress, dynamic_ncols=True)
  tracker = _Progress(bar)
  source_fds: dict[str, int] = {}
  out_fds: list[int] = []
  pool = concurrent.futures.ThreadPoolExecutor(
      max_workers=max(1, min(NUM_WORKERS, os.cpu_count() or 1)),
      thread_name_prefix="gemma4-merge")
  try:
    for entry in entries:
      if entry.source.path not in source_fds:
        source_fds[entry.source.path] = os.open(entry.source.path,
                                                os.O_RDONLY)
    pieces: dict[str, list[concurrent.futures.Future]] = {}
    copies = []
    for file, header, shard in zip(plan.files, plan.headers, plan.shards):
      fd = os.open(os.path.join(tmp_dir, file),
                   os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      out_fds.append(fd)
      safetensors_io.write_all(fd, header)
      tracker.update(len(header))
      offset = len(header)
      for i in shard:
        entry = entries[i]
        src = source_fds[entry.source.path]
        if entry.delta is None:
          copies.append((src, entry.source.offset, fd, offset,
                         entry.source.nbytes))
        else:
          pieces[entry.name] = [
              tracker.watch(pool.submit(_merge_piece, entry, src, fd, offset,
                                        rows, tracker))
              for rows in verify.row_chunks(*entry.source.shape)]
        offset += entry.source.nbytes
    for src, src_offset, fd, dst_offset, count in copies:
      tracker.check()
      os.lseek(fd, dst_offset, os.SEEK_SET)
      safetensors_io.copy_range(src, src_offset, fd, count,
                                on_progress=tracker.update)
    stats: dict[str, verify.TensorStats] = {}
    for name, futures in pieces.items():
      stats[name] = verify.TensorStats()
      for future in futures:
        stats[name].add(future.result())
    for fd in out_fds:
      os.fsync(fd)
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    for fd in [*out_fds, *source_fds.values()]:
      os.close(fd)
  return stats


def _merge_piece(entry: _Entry, src_fd: int, dst_fd: int, dst_offset: int,
                 rows: slice, tracker: _Progress) -> verify.TensorStats:
  """Merges rows `rows` of `entry` (a pool task): one `lora_b @ lora_a`
  GEMM, then positioned reads and writes of cache-sized blocks."""
  info, delta = entry.source, entry.delta
  row_bytes = info.nbytes // info.shape[0]

  def read_rows(start, block):
    safetensors_io.read_rows_into(src_fd, info, rows.start + start, block)

  def write_rows(start, block):
    safetensors_io.pwrite_all(dst_fd, block.reshape(-1).view(np.uint8),
                              dst_offset + (rows.start + start) * row_bytes)
    tracker.update(block.nbytes)

  try:
    return row_merge.merge_streamed(delta.lora_b[rows], delta.lora_a,
                                    delta.scale, info.numpy_dtype,
                                    read_rows, write_rows)
  except row_merge.NonFiniteError as e:
    raise MergeError(f"merged {entry.name} (rows {rows.start}:{rows.stop}) "
                     f"{e}") from None


class _Progress:
  """Progress bar updates from any thread, and the first failure of a pool
  task, raised on the main thread between copies."""

  def __init__(self, bar):
    self._bar = bar
    self._lock = threading.Lock()
    self._failed: list[concurrent.futures.Future] = []

  def update(self, n: int) -> None:
    with self._lock:
      self._bar.update(n)
    self.check()

  def watch(self, future: concurrent.futures.Future
            ) -> concurrent.futures.Future:
    def done(f):
      if not f.cancelled() and f.exception() is not None:
        self._failed.append(f)
    future.add_done_callback(done)
    return future

  def check(self) -> None:
    if self._failed and threading.current_thread() is threading.main_thread():
      self._failed[0].result()


def _copy_side_files(base, tmp_dir: str, *, untie_written: bool) -> None:
  """config, tokenizer and other small files; the config edited for untie."""
  for name in sorted(os.listdir(base.directory)):
    src = os.path.join(base.directory, name)
    if (not os.path.isfile(src) or name.endswith(".safetensors") or
        name in (safetensors_io.INDEX_NAME, REPORT_NAME)):
      continue
    dst = os.path.join(tmp_dir, name)
    if name == base_lib.CONFIG_NAME and untie_written:
      config = json.loads(json.dumps(base.config))
      config["tie_word_embeddings"] = False
      if isinstance(config.get("text_config"), dict):
        config["text_config"]["tie_word_embeddings"] = False
      output_dir.write_json(dst, config)
    else:
      shutil.copyfile(src, dst)
      with open(dst, "rb+") as f:
        os.fsync(f.fileno())


def _verify(tmp_dir: str, entries, placed) -> dict:
  expected = {e.name: (e.source.dtype, e.source.shape) for e in entries}
  count = verify.check_structure(tmp_dir, expected)
  out = safetensors_io.load_checkpoint_index(tmp_dir)
  sources = {e.name: e.source for e in entries}
  merged_names = [e.name for e in entries if e.delta is not None]
  probes = [verify.probe(out[name], sources[name], placed[name])
            for name in verify.sample_for_probe(merged_names)]
  return {"num_tensors": count, "shapes_match": True, "finite": True,
          "probes": probes}


__all__ = ["DEFAULT_SHARD_SIZE", "MergeError", "MergeSummary", "merge",
           "peak_rss_bytes"]
