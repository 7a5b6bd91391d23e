"""pad: grow the MLP intermediate size with zero channels so AWQ groups split evenly under TP.

vLLM splits down_proj along its input under tensor parallelism; with AWQ groups of
`group_size`, each shard's width must be a multiple of the group size, so the
intermediate size is padded up to a multiple of group_size x tensor_parallel_size
(Qwen2-72B, group 128, TP 4: 29568 -> 29696, 7424 = 58 x 128 per shard).

Zero rows go into gate_proj and up_proj (and their biases), zero columns into down_proj
(its bias is unchanged): silu(0) * 0 = 0, so the MLP's output is unchanged. The zero
channels are spread over all quantization groups (the real channels keep their order) so
that no group of down_proj is all zeros (AutoAWQ before 0.2.6 gave NaN scales for those).
Only Qwen2 and Llama-family models (Llama, Mistral) are padded: pad knows their MLP.

The recipe, a byte operation (numpy, no torch; memory bounded by windows of 8 MB, under
100 MB in all whatever the model's size):
1. check everything before writing anything: the folders (OUT_DIR is not MODEL_DIR, not
   inside it, does not contain it; non-empty only with --overwrite), config.json, every
   shard's header, the index, every layer's three projections and their shapes;
2. write each shard anew, in the tensor order and header form of safetensors' own writer
   (so the bytes are those torch + safetensors gave): other tensors copied byte for byte
   (copy_file_range), gate/up rows copied in runs of real channels between zero rows,
   down_proj streamed through row windows of a memory map, its real columns placed
   between zero columns;
3. verify what was written, read back from the files by a second thread as soon as each
   tensor is written (still in the page cache; the check costs less than the copy):
   every original channel bit-identical to its source, every pad channel zero, every
   other tensor identical, each header as planned; then each layer's MLP output on
   random inputs, over a random sample of its channels plus all pad channels, computed
   from the source and the padded files (float32);
4. copy the other files (tokenizer, ...), the index with its new total_size, config.json
   with the padded intermediate_size; with check_logits, load both models (transformers,
   small models only) and compare their logits on a few prompts.
The output folder appears only when all of it succeeded (atomic_dir).

Also a direct command:
    shoptune pad MODEL_DIR OUT_DIR --group-size N --tensor-parallel-size N [--overwrite] [--check-logits]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from shoptune import UserError, params
from shoptune.artifacts import atomic_dir, write_json
from shoptune.checkpoint import (
    FLOAT_DTYPES,
    Shard,
    Tensor,
    copy_bytes,
    lay_out,
    read_rows,
    read_shard,
    reserve,
    row_windows,
    rows_view,
    to_float32,
    write_all,
    write_zeros,
)
from shoptune.model_shape import padded_size
from shoptune.profile import PadParams
from shoptune.workspace import entrypoint, report_errors, stage_dir

log = logging.getLogger("pad")

MLP_TENSOR = re.compile(r"^(?P<layer>.*\.mlp)\.(?P<proj>gate_proj|up_proj|down_proj)\.(?P<kind>weight|bias)$")
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
MODEL_TYPES = {"qwen2", "llama", "mistral"}
ARCHITECTURES = {"Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
INDEX = "model.safetensors.index.json"
WINDOW_BYTES = 8 << 20  # the most of a tensor mapped or buffered at once (64 MB was slower: caches)
SAMPLE_INPUTS, SAMPLE_CHANNELS, SAMPLE_OUTPUTS = 4, 256, 64
MLP_TOLERANCE = 1e-5
CHECK_PROMPTS = [
    "The product 'Stainless Steel Water Bottle' appears on an e-commerce website. What is it made of?",
    "Produkt: Edelstahl Thermoskanne 1 Liter. Welche Farbe hat sie?",
    "商品「竹製 お箸 5膳セット」の素材はどれですか？",
]


def zero_layout(size: int, padded: int, group_size: int) -> list[int]:
    """For each padded channel, the original channel it copies, or -1 for a zero channel.

    The padded width is cut into groups of `group_size`; the zero channels are dealt out
    evenly, at the end of each group, so every group keeps at least one real channel.
    """
    groups = padded // group_size
    zeros = padded - size
    layout, channel = [], 0
    for group in range(groups):
        group_zeros = zeros // groups + (1 if group < zeros % groups else 0)
        real = group_size - group_zeros
        if real < 1:
            raise UserError(f"intermediate size {size} is too small to pad to {padded} without an all-zero group")
        layout += list(range(channel, channel + real)) + [-1] * group_zeros
        channel += real
    assert channel == size and len(layout) == padded
    return layout


@dataclasses.dataclass(frozen=True)
class Padding:
    """zero_layout as runs, (start, stop, first source channel) over the padded channels (source -1:
    zeros), and as positions: where each original channel goes, where the zero channels are."""

    size: int
    padded: int
    runs: list[tuple[int, int, int]]
    positions: np.ndarray  # original channel -> padded channel
    zero_positions: np.ndarray

    @classmethod
    def of(cls, layout: list[int]) -> Padding:
        runs: list[tuple[int, int, int]] = []
        for position, source in enumerate(layout):
            start, _, first = runs[-1] if runs else (0, 0, 0)
            if runs and (source == first + position - start if first >= 0 else source < 0):
                runs[-1] = (start, position + 1, first)
            else:
                runs.append((position, position + 1, source))
        array = np.array(layout)
        return cls(int((array >= 0).sum()), len(layout), runs, np.flatnonzero(array >= 0), np.flatnonzero(array < 0))

    def shape_of(self, tensor: Tensor, axis: int | None) -> tuple[int, ...]:
        """The tensor's shape once padded along `axis` (None: unchanged)."""
        if axis is None:
            return tensor.shape
        return tuple(self.padded if i == axis else n for i, n in enumerate(tensor.shape))


@dataclasses.dataclass
class Mlp:
    """One layer's projections: {"gate_proj.weight": (shard, tensor), ...}."""

    layer: str
    parts: dict[str, tuple[Shard, Tensor]] = dataclasses.field(default_factory=dict)

    @property
    def shard_names(self) -> set[str]:
        return {shard.path.name for shard, _ in self.parts.values()}


def padded_axis(part: str) -> int | None:
    """Which axis of an MLP tensor holds the intermediate channels (None: down_proj's bias)."""
    return {"down_proj.weight": 1, "down_proj.bias": None}.get(part, 0)


# ---------------------------------------------------------------- the recipe


def pad_model(
    src: Path,
    dst: Path,
    group_size: int,
    tensor_parallel_size: int,
    check_logits: bool,
    logits_atol: float,
    overwrite: bool = False,
) -> dict:
    """Pad the model in `src` into `dst` (see the module's docstring); the report."""
    check_folders(src, dst, overwrite)
    config = read_config(src / "config.json")
    size = config["intermediate_size"]
    if check_logits and not any((src / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{src}: no tokenizer ({', '.join(TOKENIZER_FILES)}), which the logits check needs")
    shards = read_shards(src)
    index = read_index(src / INDEX, shards)
    mlps = find_mlps(src, shards, size)
    others = [item for item in sorted(src.iterdir()) if item.suffix != ".safetensors" and item.name != "config.json"]
    check_sources_outside(dst, [s.path for s in shards] + others)
    padded = padded_size(size, group_size, tensor_parallel_size)
    padding = Padding.of(zero_layout(size, padded, group_size))
    axes = {t.name: padded_axis(part) for m in mlps for part, (_, t) in m.parts.items()} if padded != size else {}
    log.info(
        "intermediate_size %d -> %d (group %d x tensor parallel %d; %d zero channels); %d shards, %d layers",
        *(size, padded, group_size, tensor_parallel_size, padded - size, len(shards), len(mlps)),
    )

    with failures_as_one_line(dst), atomic_dir(dst) as out:
        # A second thread checks each tensor once written, while the next is (still in the page cache),
        # then each layer's MLP once its last projection is written: one worker, checks in order.
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as verifier:
            try:
                checks: dict[str, concurrent.futures.Future[Shard]] = {}
                differences = []
                for shard in shards:
                    checks[shard.path.name] = write_shard(shard, out / shard.path.name, padding, axes, verifier)
                    for seed, mlp in enumerate(mlps):
                        if shard.path.name in mlp.shard_names and mlp.shard_names <= checks.keys():  # its last
                            differences.append(verifier.submit(mlp_difference, mlp, checks, padding, bool(axes), seed))
                written_shards = {name: check.result() for name, check in checks.items()}
                worst_mlp = max(difference.result() for difference in differences)
            except BaseException:  # Ctrl-C, a failed check: the checks still queued are moot
                verifier.shutdown(cancel_futures=True)
                raise
        bytes_written = bytes_verified = sum(shard.tensor_bytes for shard in written_shards.values())
        if not worst_mlp <= MLP_TOLERANCE:  # NaN too
            raise UserError(f"padding changed an MLP's output (relative difference {worst_mlp:.2e})")
        for item in others:
            if item.is_file() and item.name != INDEX:
                shutil.copy2(item, out / item.name)
            elif not item.is_file():
                log.info("%s: not a file, not copied", item)
        if index is not None:
            index.setdefault("metadata", {})["total_size"] = bytes_written
            (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (out / "config.json").write_text(
            json.dumps({**config, "intermediate_size": padded}, indent=2, sort_keys=True) + "\n"
        )
        logits = compare_logits(src, out) if check_logits else None
        if logits is not None and logits > logits_atol:
            raise UserError(f"padded model's logits differ by {logits:.2e} (> logits_atol {logits_atol:g})")
    return {
        "intermediate_size": size,
        "padded_intermediate_size": padded,
        "zero_channels": padded - size,
        "group_size": group_size,
        "tensor_parallel_size": tensor_parallel_size,
        "shard_width": padded // tensor_parallel_size,
        "groups_per_shard": padded // tensor_parallel_size // group_size,
        "padded_tensors": len(axes),
        "layers_checked": len(mlps),
        "mlp_max_relative_difference": worst_mlp,
        "logits_max_abs_difference": logits,
        "logits_checked_prompts": len(CHECK_PROMPTS) if check_logits else 0,
        "bytes_written": bytes_written,
        "bytes_verified": bytes_verified,
    }


@contextlib.contextmanager
def failures_as_one_line(dst: Path) -> Iterator[None]:
    """A full disk or a folder not writable, while writing: one line (atomic_dir has cleaned up)."""
    try:
        yield
    except OSError as err:
        raise UserError(f"{dst}: {err.strerror or err} while writing the padded model; nothing was written") from None


# ---------------------------------------------------------------- checks, before anything is written


def check_folders(src: Path, dst: Path, overwrite: bool) -> None:
    """The model folder exists; OUT_DIR is neither it, nor inside it, nor above it (symlinks
    resolved), and holds nothing unless `overwrite`."""
    if not (src / "config.json").is_file():
        raise UserError(f"{src}: no config.json (not a Hugging Face model folder)")
    model, out = src.resolve(), dst.resolve()
    if out == model:
        raise UserError(f"{dst}: is the model folder {src} itself; choose another OUT_DIR")
    if model in out.parents:
        raise UserError(f"{dst}: is inside the model folder {src}; choose an OUT_DIR outside it")
    if out in model.parents:
        raise UserError(f"{dst}: contains the model folder {src}; replacing it would delete the model")
    existing = next(folder for folder in (dst, *dst.parents) if folder.exists() or folder.is_symlink())
    if not existing.is_dir():
        raise UserError(f"{dst}: {'exists' if existing == dst else f'{existing} exists'} and is not a folder")
    if existing == dst and not overwrite and any(dst.iterdir()):
        raise UserError(f"{dst}: exists and is not empty; pass --overwrite to replace it")


def check_sources_outside(dst: Path, sources: list[Path]) -> None:
    """No file of the model lies (through a symlink) inside OUT_DIR, which is replaced."""
    out = dst.resolve()
    for source in sources:
        if out in source.resolve().parents:
            raise UserError(f"{source}: links into {dst}, which pad replaces; choose another OUT_DIR")


def read_config(path: Path) -> dict:
    """config.json, of a Qwen2 or Llama-family model, with a positive intermediate_size."""
    config = read_json(path)
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    model_type, architectures = config.get("model_type"), config.get("architectures") or []
    if model_type is not None and str(model_type) not in MODEL_TYPES:  # str: a list is no type either
        raise UserError(
            f"{path}: model_type {model_type!r} is not a Qwen2 or Llama-family model; "
            "pad knows their gate/up/down MLP only"
        )
    if model_type is None and not (isinstance(architectures, list) and set(map(str, architectures)) & ARCHITECTURES):
        raise UserError(
            f"{path}: neither model_type nor architectures ({architectures!r}) name a Qwen2 or Llama-family model; "
            "pad knows their gate/up/down MLP only"
        )
    if "intermediate_size" not in config:
        raise UserError(f"{path}: no intermediate_size")
    size = config["intermediate_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise UserError(f"{path}: intermediate_size must be a positive integer, got {size!r}")
    return config


def read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        reason = f"{err.msg} at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise UserError(f"{path}: not valid JSON ({reason})") from None


def read_shards(src: Path) -> list[Shard]:
    shards = [read_shard(path) for path in sorted(src.glob("*.safetensors"))]
    if not shards:
        raise UserError(f"{src}: no *.safetensors files")
    seen: dict[str, Path] = {}
    for shard in shards:
        for name in shard.tensors:
            if name in seen:
                raise UserError(f"{shard.path}: tensor {name} is also in {seen[name]}")
            seen[name] = shard.path
    return shards


def read_index(path: Path, shards: list[Shard]) -> dict | None:
    """model.safetensors.index.json, if there is one: its weight_map must place every tensor in its shard."""
    if not path.is_file():
        return None
    index = read_json(path)
    if not (isinstance(index, dict) and isinstance(index.get("weight_map"), dict)):
        raise UserError(f"{path}: expected a JSON object with a weight_map")
    if not isinstance(index.get("metadata", {}), dict):
        raise UserError(f"{path}: metadata must be a JSON object")
    weight_map = dict(index["weight_map"])
    for shard in shards:
        for name in shard.tensors:
            listed = weight_map.pop(name, None)
            if listed != shard.path.name:
                where = f"puts it in {listed}" if listed else "has no entry for it"
                raise UserError(f"{path}: tensor {name} is in {shard.path.name}, but the weight_map {where}")
    if weight_map:
        name, listed = next(iter(weight_map.items()))
        raise UserError(f"{path}: the weight_map puts {name} in {listed}, which holds no such tensor")
    return index


def find_mlps(src: Path, shards: list[Shard], size: int) -> list[Mlp]:
    """Every layer's gate/up/down projections (and biases), with shapes agreeing with intermediate_size."""
    mlps: dict[str, Mlp] = {}
    for shard in shards:
        for tensor in shard.tensors.values():
            match = MLP_TENSOR.match(tensor.name)
            if match:
                mlp = mlps.setdefault(match["layer"], Mlp(match["layer"]))
                mlp.parts[f"{match['proj']}.{match['kind']}"] = (shard, tensor)
    if not mlps:
        raise UserError(
            f"{src}: no tensor is named like *.mlp.gate_proj.weight, *.mlp.up_proj.weight or *.mlp.down_proj.weight"
        )
    ordered = [mlps[layer] for layer in sorted(mlps, key=natural_order)]
    for mlp in ordered:
        some_shard = next(iter(mlp.parts.values()))[0]
        missing = [p for p in PROJECTIONS if f"{p}.weight" not in mlp.parts]
        if missing:
            raise UserError(f"{some_shard.path}: layer {mlp.layer} has no {mlp.layer}.{missing[0]}.weight in any shard")
        hidden = mlp.parts["down_proj.weight"][1].shape[0] if mlp.parts["down_proj.weight"][1].shape else 0
        expected = {
            "gate_proj.weight": (size, hidden),
            "up_proj.weight": (size, hidden),
            "down_proj.weight": (hidden, size),
            "gate_proj.bias": (size,),
            "up_proj.bias": (size,),
            "down_proj.bias": (hidden,),
        }
        for part in (p for p in expected if p in mlp.parts):
            shard, tensor = mlp.parts[part]
            if tensor.shape != expected[part]:
                raise UserError(
                    f"{shard.path}: {tensor.name} has shape {list(tensor.shape)}, expected {list(expected[part])} "
                    f"(intermediate_size {size} in config.json)"
                )
            if tensor.dtype not in FLOAT_DTYPES:
                raise UserError(f"{shard.path}: {tensor.name} is {tensor.dtype}; pad pads {', '.join(FLOAT_DTYPES)}")
    return ordered


def natural_order(name: str) -> list:
    """model.layers.2 before model.layers.10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


# ---------------------------------------------------------------- writing


def write_shard(
    shard: Shard, target: Path, padding: Padding, axes: dict[str, int | None], verifier: concurrent.futures.Executor
) -> concurrent.futures.Future[Shard]:
    """Write `shard` padded to `target`, handing each tensor to `verifier` once written; the shard's check."""
    started = time.perf_counter()
    entries = [(t.name, t.dtype, padding.shape_of(t, axes.get(t.name))) for t in shard.tensors.values()]
    header, placed = lay_out(entries, shard.metadata or {"format": "pt"})
    checks = []
    with open(shard.path, "rb") as source, open(target, "xb", buffering=0) as out:
        reserve(out.fileno(), len(header) + sum(t.nbytes for t in placed))
        write_all(out.fileno(), header)
        for new in placed:
            old, axis = shard.tensors[new.name], axes.get(new.name)
            if axis is None:
                copy_bytes(source.fileno(), out.fileno(), old.start, old.nbytes)
            elif axis == 0:
                pad_rows(source.fileno(), out.fileno(), old, padding)
            else:
                pad_columns(shard.path, out.fileno(), old, padding)
            assert out.tell() == new.start + new.nbytes, new.name
            checks.append(verifier.submit(verify_tensor, shard.path, old, target, new, padding, axis))
    size = sum(t.nbytes for t in placed)
    seconds = time.perf_counter() - started
    log.info("%s: wrote %.1f MB in %.1f s (%.0f MB/s)", target.name, size / 1e6, seconds, size / 1e6 / seconds)
    return verifier.submit(verify_header, target, placed, checks, started)


def pad_rows(source: int, out: int, tensor: Tensor, padding: Padding) -> None:
    """gate/up_proj (weight or bias): real rows copied in runs, zero rows written between them."""
    for start, stop, first in padding.runs:
        if first < 0:
            write_zeros(out, (stop - start) * tensor.row_bytes)
        else:
            copy_bytes(source, out, tensor.start + first * tensor.row_bytes, (stop - start) * tensor.row_bytes)


def pad_columns(path: Path, out: int, tensor: Tensor, padding: Padding) -> None:
    """down_proj's weight, a window of rows at a time: real columns placed between zero columns."""
    buffer = None
    for first, count in row_windows(tensor, WINDOW_BYTES):
        buffer = place_columns(rows_view(path, tensor, first, count), padding, buffer)
        write_all(out, buffer[:count])


def place_columns(rows: np.ndarray, padding: Padding, buffer: np.ndarray | None) -> np.ndarray:
    """Rows of down_proj padded: their columns placed by the runs in `buffer` (made on first use,
    zero where the pad columns are, which later windows never write)."""
    if buffer is None:
        buffer = np.zeros((len(rows), padding.padded), rows.dtype)
    for start, stop, source in padding.runs:
        if source >= 0:
            buffer[: len(rows), start:stop] = rows[:, source : source + stop - start]
    return buffer


# ---------------------------------------------------------------- verifying the written files


def verify_tensor(path: Path, old: Tensor, target: Path, new: Tensor, padding: Padding, axis: int | None) -> None:
    """The tensor as written in `target`: each original channel bit-identical, each pad channel zero."""
    if not {None: same_tensor, 0: same_rows, 1: same_columns}[axis](path, old, target, new, padding):
        raise UserError(f"{path}: {new.name} as written is not the padded original (a bug; nothing replaced)")


def verify_header(target: Path, placed: list[Tensor], checks: list[concurrent.futures.Future], started: float) -> Shard:
    """Once its tensors are checked: the header read back places each where it was checked. The written shard."""
    for check in checks:
        check.result()
    written = read_shard(target)
    if list(written.tensors.values()) != placed:
        raise UserError(f"{target}: its header is not the one written (a bug; nothing replaced)")
    seconds = time.perf_counter() - started
    log.info("%s: verified %.1f MB, %.1f s after its writing began", target.name, written.tensor_bytes / 1e6, seconds)
    return written


def same_tensor(path: Path, old: Tensor, target: Path, new: Tensor, padding: Padding) -> bool:
    return all(
        np.array_equal(rows_view(path, old, first, count), rows_view(target, new, first, count))
        for first, count in row_windows(old, WINDOW_BYTES)
    )


def same_rows(path: Path, old: Tensor, target: Path, new: Tensor, padding: Padding) -> bool:
    """gate/up_proj: the real rows, run by run; every pad row (found by its position) zero."""
    for first, count in row_windows(new, WINDOW_BYTES):
        rows = rows_view(target, new, first, count)
        for start, stop, source in clip(padding.runs, first, first + count):
            if source >= 0 and not np.array_equal(
                rows[start - first : stop - first], rows_view(path, old, source, stop - start)
            ):
                return False
    return not read_rows(target, new, padding.zero_positions).any()


def same_columns(path: Path, old: Tensor, target: Path, new: Tensor, padding: Padding) -> bool:
    """down_proj: each window of rows as placed from the original; every pad column (by position) zero."""
    expected = None
    for first, count in row_windows(old, WINDOW_BYTES):
        expected = place_columns(rows_view(path, old, first, count), padding, expected)
        rows = rows_view(target, new, first, count)
        if not np.array_equal(expected[:count], rows) or rows[:, padding.zero_positions].any():
            return False
    return True


def clip(runs: list[tuple[int, int, int]], low: int, high: int) -> list[tuple[int, int, int]]:
    """The runs' parts within padded channels [low, high)."""
    clipped = []
    for start, stop, source in runs:
        if stop > low and start < high:
            begin, end = max(start, low), min(stop, high)
            clipped.append((begin, end, source if source < 0 else source + begin - start))
    return clipped


def mlp_difference(
    mlp: Mlp, written: dict[str, concurrent.futures.Future[Shard]], padding: Padding, padded: bool, seed: int
) -> float:
    """max |MLP(x) - padded MLP(x)| / max |MLP(x)| on random inputs x, both read from the files (the
    written shards: their checks, done before this one): summed over a random sample of the layer's
    channels (and, padded, all the pad channels), on a random sample of the output's coordinates,
    in float32."""
    rng = np.random.default_rng(seed)
    hidden = mlp.parts["down_proj.weight"][1].shape[0]
    channels = np.sort(rng.choice(padding.size, min(padding.size, SAMPLE_CHANNELS), replace=False))
    outputs = np.sort(rng.choice(hidden, min(hidden, SAMPLE_OUTPUTS), replace=False))
    x = rng.standard_normal((SAMPLE_INPUTS, hidden)).astype(np.float32)

    def values(side: str, part: str, rows: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
        shard, tensor = mlp.parts[part]
        if side == "padded":
            shard = written[shard.path.name].result()
            tensor = shard.tensors[tensor.name]
        taken = read_rows(shard.path, tensor, rows)
        taken = taken[:, 0] if len(tensor.shape) == 1 else taken if columns is None else taken[:, columns]
        return to_float32(taken, tensor.dtype)

    def output(side: str, kept: np.ndarray) -> np.ndarray:
        gate, up = (x @ values(side, f"{p}.weight", kept).T for p in ("gate_proj", "up_proj"))
        if "gate_proj.bias" in mlp.parts:
            gate = gate + values(side, "gate_proj.bias", kept)
        if "up_proj.bias" in mlp.parts:
            up = up + values(side, "up_proj.bias", kept)
        silu = gate * 0.5 * (1 + np.tanh(gate / 2))  # gate * sigmoid(gate), without overflow
        y = (silu * up) @ values(side, "down_proj.weight", outputs, kept).T
        return y + values(side, "down_proj.bias", outputs) if "down_proj.bias" in mlp.parts else y

    positions = np.union1d(padding.positions[channels], padding.zero_positions) if padded else channels
    a, b = output("original", channels), output("padded", positions)
    if not np.isfinite(a).all():
        raise UserError(f"{mlp.layer}: its MLP gives NaN or infinite outputs on random inputs; pad cannot check it")
    return float(np.abs(a - b).max() / max(float(np.abs(a).max()), 1e-12))


# ---------------------------------------------------------------- the logits check, the stage, the command


def compare_logits(original: Path, padded: Path) -> float:
    """Max |logits difference| of the two models (float32, CPU or GPU) on CHECK_PROMPTS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(original)
    worst = 0.0
    logits = {}
    for name, path in (("original", original), ("padded", padded)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
        with torch.no_grad():
            logits[name] = [model(**tokenizer(p, return_tensors="pt").to(device)).logits.cpu() for p in CHECK_PROMPTS]
        del model
    for a, b in zip(logits["original"], logits["padded"], strict=True):
        worst = max(worst, float((a - b).abs().max()))
    log.info("logits of original and padded model: max |difference| %.3g over %d prompts", worst, len(CHECK_PROMPTS))
    return worst


def pad(profile: str) -> None:
    p = params.load(profile, "pad", PadParams)
    group_size = params.profile_section(profile, "quantize").get("q_group_size")
    tensor_parallel_size = params.profile_section(profile, "infer").get("tensor_parallel_size")
    for key, value in (("quantize.q_group_size", group_size), ("infer.tensor_parallel_size", tensor_parallel_size)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"params.yaml: profiles.{profile}.{key}: expected a positive integer, got {value!r}")
    folder = stage_dir(profile, "pad")
    report = pad_model(
        stage_dir(profile, "finetune") / "model",
        folder / "model",
        group_size,
        tensor_parallel_size,
        p.check_logits,
        p.logits_atol,
        overwrite=True,  # DVC owns runs/<profile>/pad/model
    )
    write_json(folder / "metrics.json", recorded(report, p.logits_atol))
    write_json(folder / "differences.json", {key: report[key] for key in MEASURED})


# What the checks measured: float rounding noise that differs in the last bits with the CPU's
# BLAS kernels, so not part of metrics.json, whose hash dvc.lock records; differences.json (no
# DVC output) and the log keep them.
MEASURED = ("mlp_max_relative_difference", "logits_max_abs_difference")


def recorded(report: dict, logits_atol: float) -> dict:
    """metrics.json: the report with each check's bound in place of its measured difference (the
    stage fails when a difference passes its bound)."""
    numbers = {key: value for key, value in report.items() if key not in MEASURED}
    numbers["mlp_relative_difference_below"] = MLP_TOLERANCE
    numbers["logits_abs_difference_below"] = logits_atol if report["logits_max_abs_difference"] is not None else None
    return numbers


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if "--profile" in argv:
        return entrypoint(pad, argv)
    parser = argparse.ArgumentParser(prog="shoptune pad", description="Pad a model's MLP for AWQ + tensor parallel.")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--tensor-parallel-size", type=int, required=True)
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists and is not empty")
    parser.add_argument("--check-logits", action="store_true", help="also load both models and compare logits")
    parser.add_argument("--logits-atol", type=float, default=1e-4)
    args = parser.parse_args(argv)

    def pad_directly():
        if args.group_size < 1 or args.tensor_parallel_size < 1:
            raise UserError("--group-size and --tensor-parallel-size must be positive")
        return pad_model(
            args.model_dir,
            args.out_dir,
            args.group_size,
            args.tensor_parallel_size,
            args.check_logits,
            args.logits_atol,
            args.overwrite,
        )

    print(json.dumps(report_errors(pad_directly), indent=2))


if __name__ == "__main__":
    main()
