"""Each image's Python environment: requirements -> lock -> wheelhouse -> installed.

In docker/<image>/:
    requirements.txt          top-level pins, edited by hand
    requirements-<acc>.txt    what the accelerator (cpu, cuda) adds: on cpu, torch's CPU build
    requirements-nodeps.txt   packages whose declared dependencies cannot be honoured on this
                              stack (unsloth asks for xformers): locked without them
    exclude-<acc>.txt         packages left out of the lock although something declares them
    lock-<acc>.txt            generated (`make lock`): every package, transitive ones included,
                              pinned with hashes; its header records a digest of its inputs

The wheels of a lock are downloaded once, hash-checked, into the wheelhouse (.wheelhouse/);
an sdist is built into a wheel there. A local environment (.venvs/<image>) and a Docker image
both install exactly those files, offline, each checked against its hash: the same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import filecmp
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from shoptune import UserError
from shoptune.artifacts import atomic_file


def code_root() -> Path:
    """The checkout whose stages/ and docker/ are used: the current folder when it is one
    (a DVC run in any clone), else the checkout this package was installed from."""
    here = Path.cwd()
    if (here / "stages" / "__init__.py").is_file() and (here / "docker").is_dir():
        return here
    return Path(__file__).resolve().parents[1]


REPOSITORY = code_root()
DOCKER_DIR = REPOSITORY / "docker"
ACCELERATORS = ("cpu", "cuda")
# The target of every lock: the Python of the base image (Debian bookworm) and of the host.
PYTHON_VERSION = "3.11"
PLATFORM = "x86_64-manylinux_2_28"
PYPI = "https://pypi.org/simple"
# Where torch's CPU build comes from: the PyTorch CPU wheel index, or a folder of wheels.
TORCH_CPU_INDEX = os.environ.get("SHOPTUNE_TORCH_CPU_INDEX", "https://download.pytorch.org/whl/cpu")
WHEELHOUSE = Path(os.environ.get("SHOPTUNE_WHEELHOUSE", REPOSITORY / ".wheelhouse"))
INSTALL_SCRIPT = DOCKER_DIR / "install-wheels.sh"
# Changing how locks are made makes every lock stale.
LOCK_SETTINGS = f"uv pip compile --generate-hashes --python-version {PYTHON_VERSION} --python-platform {PLATFORM}"


def images() -> list[str]:
    return sorted(p.parent.name for p in DOCKER_DIR.glob("*/requirements.txt"))


def image_dir(image: str) -> Path:
    folder = DOCKER_DIR / image
    if not (folder / "requirements.txt").is_file():
        raise UserError(f"{folder}/requirements.txt: no such file (images: {', '.join(images())})")
    return folder


def check_accelerator(accelerator: str) -> None:
    if accelerator not in ACCELERATORS:
        raise UserError(f"unknown accelerator '{accelerator}' (one of: {', '.join(ACCELERATORS)})")


# ---------------------------------------------------------------- locks


def lock_path(image: str, accelerator: str) -> Path:
    check_accelerator(accelerator)
    return image_dir(image) / f"lock-{accelerator}.txt"


def lock_inputs(image: str, accelerator: str) -> list[Path]:
    folder = image_dir(image)
    names = [
        "requirements.txt",
        f"requirements-{accelerator}.txt",
        "requirements-nodeps.txt",
        f"exclude-{accelerator}.txt",
    ]
    return [folder / name for name in names if (folder / name).is_file()]


def inputs_digest(image: str, accelerator: str) -> str:
    sha = hashlib.sha256(LOCK_SETTINGS.encode())
    for path in lock_inputs(image, accelerator):
        sha.update(b"\0" + path.name.encode() + b"\0" + path.read_bytes())
    return sha.hexdigest()[:16]


def recorded_digest(lock: Path) -> str | None:
    if not lock.is_file():
        return None
    match = re.search(r"^# inputs-digest: (\w+)$", lock.read_text(encoding="utf-8"), re.MULTILINE)
    return match.group(1) if match else None


def stale_locks() -> list[str]:
    """Every lock that is missing or no longer matches its inputs, as 'image/accelerator'."""
    return [
        f"{image}/{accelerator}"
        for image in images()
        for accelerator in ACCELERATORS
        if recorded_digest(lock_path(image, accelerator)) != inputs_digest(image, accelerator)
    ]


def requirement_names(path: Path) -> list[str]:
    """The package names of a plain list (one per line, comments allowed)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines())
    return [re.split(r"[=<>!~\[ ;]", line, maxsplit=1)[0] for line in lines if line]


def uv_torch_source() -> list[str]:
    """uv's options for torch's CPU build: an index URL, or a local folder of wheels."""
    if "://" in TORCH_CPU_INDEX:
        return ["--extra-index-url", TORCH_CPU_INDEX, "--index-strategy", "unsafe-best-match"]
    return ["--find-links", TORCH_CPU_INDEX]


def compile_lock(image: str, accelerator: str, uv: str = "uv") -> Path:
    """Resolve docker/<image>'s requirements for `accelerator` into lock-<accelerator>.txt."""
    folder = image_dir(image)
    lock = lock_path(image, accelerator)
    common = [uv, "pip", "compile", "--quiet", "--no-header", *LOCK_SETTINGS.split()[3:], "--index-url", PYPI]
    main_inputs = [
        p for p in lock_inputs(image, accelerator) if p.name.startswith("requirements") and "nodeps" not in p.name
    ]
    hint = ""
    if any("+cpu" in p.read_text(encoding="utf-8") for p in main_inputs):  # torch's CPU build
        common += uv_torch_source()
        hint = f" (torch's CPU build from {TORCH_CPU_INDEX}: SHOPTUNE_TORCH_CPU_INDEX names another index or a folder)"
    exclude = folder / f"exclude-{accelerator}.txt"
    excluded = requirement_names(exclude) if exclude.is_file() else []
    nodeps = folder / "requirements-nodeps.txt"
    try:
        body = _run_uv([*common, *map(str, main_inputs), *(a for n in excluded for a in ("--no-emit-package", n))])
        if nodeps.is_file():
            body += _run_uv([*common, "--no-deps", str(nodeps)])
    except UserError as err:
        raise UserError(f"locking {image}/{accelerator} failed: {err}{hint}") from None
    except FileNotFoundError:
        raise UserError(f"'{uv}' not found: make lock installs it in .venv (uv, from PyPI)") from None
    header = (
        f"# docker/{image}/{lock.name}: every package of the '{image}' environment ({accelerator}),\n"
        f"# pinned with hashes, for Python {PYTHON_VERSION} on {PLATFORM}.\n"
        f"# Generated by `make lock` from {', '.join(p.name for p in lock_inputs(image, accelerator))}:"
        " edit those, not this.\n"
        f"# inputs-digest: {inputs_digest(image, accelerator)}\n"
    )
    body = body.replace(str(folder) + "/", "")  # annotations name the inputs by file name
    with atomic_file(lock) as out:
        out.write(header + body)
    return lock


def _run_uv(command: list[str]) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise UserError(" ".join(" ".join(lines[-3:]).split()) if lines else f"uv exited {result.returncode}")
    return result.stdout


@dataclasses.dataclass(frozen=True)
class Pin:
    name: str
    version: str
    hashes: tuple[str, ...]

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"


def read_lock(image: str, accelerator: str) -> list[Pin]:
    """The pins of a lock; a missing or stale lock is a UserError saying to run `make lock`."""
    lock = lock_path(image, accelerator)
    recorded = recorded_digest(lock)
    if recorded is None:
        raise UserError(f"{lock}: no such lock (run `make lock`)")
    if recorded != inputs_digest(image, accelerator):
        raise UserError(f"{lock}: out of date with its requirements (run `make lock`)")
    text = re.sub(r"\\\n\s*", " ", lock.read_text(encoding="utf-8"))
    pins = []
    for line in text.splitlines():  # a pin and its hashes are one line now; comments never match
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)\s+(.*)$", line)
        if match:
            hashes = tuple(re.findall(r"--hash=sha256:([0-9a-f]{64})", match.group(3)))
            pins.append(Pin(match.group(1).lower(), match.group(2), hashes))
    return pins


def lock_digest(image: str, accelerator: str) -> str:
    return file_digest(lock_path(image, accelerator))


# ---------------------------------------------------------------- wheelhouse


def install_list(image: str, accelerator: str) -> Path:
    """The wheelhouse's list of the files to install for a lock, each with its sha256."""
    return WHEELHOUSE / f"{image}-{accelerator}.txt"


def wheelhouse(image: str, accelerator: str, pip: list[str] | None = None) -> tuple[Path, list[Path]]:
    """Download (once) the wheels of a lock into the wheelhouse; the install list and its files."""
    pins = read_lock(image, accelerator)
    listing = install_list(image, accelerator)
    stamp = f"# lock {lock_digest(image, accelerator)}\n"
    if listing.is_file() and listing.read_text().startswith(stamp):
        files = [WHEELHOUSE / line.split()[0] for line in listing.read_text().splitlines()[1:]]
        if all(f.is_file() for f in files):
            return listing, files
    pip = pip or [sys.executable, "-m", "pip"]
    WHEELHOUSE.mkdir(parents=True, exist_ok=True)
    known = _hash_index()
    missing = [pin for pin in pins if not any(h in known for h in pin.hashes)]
    say(f"{image}/{accelerator}: {len(pins)} packages locked, {len(missing)} to download into {WHEELHOUSE}")
    from_torch_index = [pin for pin in missing if "+" in pin.version]
    for group, options in (
        (from_torch_index, pip_torch_source()),
        ([p for p in missing if p not in from_torch_index], []),
    ):
        if group:
            _download(pip, group, options)
    known = _hash_index()
    files = []
    for number, pin in enumerate(pins, 1):
        found = next((known[h] for h in pin.hashes if h in known), None)
        if found is None:
            raise UserError(f"{pin.spec}: not in the wheelhouse after downloading (see pip's output above)")
        if not found.name.endswith(".whl"):
            say(f"[{number}/{len(pins)}] building a wheel of {pin.spec} from its source")
            found = _build_wheel(pip, found)
        files.append(found)
    lines = [f"{f.relative_to(WHEELHOUSE)} --hash=sha256:{_sha256(f)}" for f in files]
    with atomic_file(listing) as out:
        out.write(stamp + "\n".join(lines) + "\n")
    return listing, files


def pip_torch_source() -> list[str]:
    """pip's options for torch's CPU build (one quick retry: the index may be out of reach,
    and pip's own configuration may still supply the wheel)."""
    if "://" in TORCH_CPU_INDEX:
        return ["--extra-index-url", TORCH_CPU_INDEX, "--retries", "1"]
    return ["--find-links", TORCH_CPU_INDEX]


def _download(pip: list[str], pins: list[Pin], options: list[str]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as requirements:
        for pin in pins:
            requirements.write(f"{pin.spec} {' '.join('--hash=sha256:' + h for h in pin.hashes)}\n")
        requirements.flush()
        command = [*pip, "download", "--no-deps", "--require-hashes", "--prefer-binary", "--progress-bar", "off"]
        _run_pip([*command, *options, "-d", str(WHEELHOUSE), "-r", requirements.name], "downloading")


def _build_wheel(pip: list[str], source: Path) -> Path:
    built = WHEELHOUSE / "built" / source.name
    done = [p for p in built.glob("*.whl")] if built.is_dir() else []
    if not done:
        tmp = Path(tempfile.mkdtemp(dir=WHEELHOUSE, prefix=".build."))
        try:
            _run_pip([*pip, "wheel", "--no-deps", "--quiet", "-w", str(tmp), str(source)], f"building {source.name}")
            built.parent.mkdir(exist_ok=True)
            shutil.rmtree(built, ignore_errors=True)
            os.replace(tmp, built)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        done = list(built.glob("*.whl"))
    return done[0]


def _run_pip(command: list[str], what: str) -> None:
    """Run pip, its output shown as it comes; a failure as one line naming the package."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        sys.stderr.write("  " + line)
        lines.append(line.rstrip())
    if process.wait() != 0:
        raise UserError(f"{what} failed: {pip_failure(lines) or 'pip exited ' + str(process.returncode)}")


def pip_failure(lines: list[str]) -> str | None:
    """pip's first error in one line, with the package it names (on that line or just below)."""
    start = next((i for i, line in enumerate(lines) if line.startswith("ERROR:")), None)
    if start is None:
        return None
    error = lines[start].removeprefix("ERROR:").strip().split(". ")[0]
    named = re.search(r"(\S+==\S+?)[\s,:)]|$", " ".join(lines[start : start + 3]) + " ").group(1)
    return f"{named}: {error}" if named and named not in error else error


def _sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def file_digest(path: Path) -> str:
    """A short digest of a file's bytes: what stamps and tags are made of."""
    return _sha256(path)[:16]


def _hash_index() -> dict[str, Path]:
    """sha256 -> file for every downloaded file of the wheelhouse (hashes cached by size and mtime)."""
    cache_file = WHEELHOUSE / ".sha256.json"
    cache = {}
    with contextlib.suppress(FileNotFoundError, ValueError):
        cache = json.loads(cache_file.read_text())
    index, fresh = {}, {}
    for path in sorted(WHEELHOUSE.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix == ".txt":
            continue
        stat = path.stat()
        key = f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}"
        fresh[key] = cache.get(key) or _sha256(path)
        index[fresh[key]] = path
    with atomic_file(cache_file) as out:
        json.dump(fresh, out)
    return index


def say(message: str) -> None:
    print(f"shoptune: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- installing


def share_identical_files(venv: Path, others: list[Path], smallest: int = 256 << 10) -> int:
    """Hardlink each file of `venv` (of `smallest` bytes or more) to the same file of another
    environment: the same path, size, mode and bytes (torch, numpy and their libraries are in
    four environments: about 3.5 GB). pip never rewrites an installed file in place, and
    removing an environment removes only its links. Returns the bytes saved."""
    saved = 0
    for path in venv.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        stat = path.stat()
        if stat.st_size < smallest or stat.st_nlink > 1:
            continue
        relative = path.relative_to(venv)
        for other in others:
            twin = other / relative
            try:
                twin_stat = twin.stat()
            except OSError:
                continue
            if (twin_stat.st_size, twin_stat.st_mode) != (stat.st_size, stat.st_mode) or twin.is_symlink():
                continue
            if twin_stat.st_dev != stat.st_dev or not filecmp.cmp(path, twin, shallow=False):
                continue
            link = path.with_name(f".{path.name}.link")
            os.link(twin, link)
            os.replace(link, path)
            saved += stat.st_size
            break
    return saved


def install(python: Path, listing: Path) -> None:
    """Install the files of an install list into the environment of `python`, offline."""
    _run_pip(["sh", str(INSTALL_SCRIPT), str(python), str(listing.parent), listing.name], f"installing {listing.name}")
