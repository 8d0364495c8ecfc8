"""The client bundle as one content-addressed unit, built once where the LLM is and shipped to nodes.

    <client>/manifest.json   {"format": 1, "files": [{"path", "size", "sha256"}, ...]}  (sorted by path)
    digest                   sha256 of the canonical manifest (sorted keys, no spaces)

A node never prepares: it holds client bundles it was sent, each in `<cache>/nanoedge/<digest>/`,
either unpacked from a file the operator copied (`fednano bundle pack` on the server, `fednano bundle
unpack` on the node) or fetched over the split channel (`bundle` op). Both ways the files are hashed
before the bundle is put in place, so what a node holds under a digest is what the server holds. Every
train and evaluate message names the run's digest; a node looks its bundle up by it (`locate`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import uuid
from pathlib import Path

from fednano.backbones.bundle import BundleError

MANIFEST = "manifest.json"
NODE_BUNDLES = "nanoedge"  # <cache>/nanoedge/<digest>/: the client bundles a node received
FORMAT = 1
GET_IT = "copy it from the server (`fednano bundle pack FILE.tar` there, `fednano bundle unpack FILE.tar` here)"


def short(digest: str) -> str:
    """A digest as messages name it."""
    return f"sha256:{digest[:16]}"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _files(client_dir: Path) -> list[Path]:
    return sorted(p for p in client_dir.rglob("*") if p.is_file() and p.relative_to(client_dir).as_posix() != MANIFEST)


def manifest(client_dir: Path) -> dict:
    """Every file of `client_dir` (but the manifest itself): its path, size and sha256."""
    client_dir = Path(client_dir)
    files = [{"path": p.relative_to(client_dir).as_posix(), "size": p.stat().st_size, "sha256": _sha256_file(p)}
             for p in _files(client_dir)]
    return {"format": FORMAT, "files": files}


def digest_of(man: dict) -> str:
    """The bundle's digest: sha256 of its manifest in canonical JSON."""
    return hashlib.sha256(json.dumps(man, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def seal(client_dir: Path) -> str:
    """Write `client_dir`'s manifest (from its files as they are now) and return its digest."""
    man = manifest(client_dir)
    (Path(client_dir) / MANIFEST).write_text(json.dumps(man, indent=1, sort_keys=True))
    return digest_of(man)


def _read_manifest(client_dir: Path) -> dict:
    path = Path(client_dir) / MANIFEST
    try:
        man = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable bundle manifest ({e})") from None
    if not isinstance(man, dict) or not isinstance(man.get("files"), list):
        raise BundleError(f"{path}: not a bundle manifest (no 'files' list)")
    return man


def digest(client_dir: Path) -> str:
    """The digest a bundle's manifest records (sealed now if it has none: bundles prepared before digests)."""
    if not (Path(client_dir) / MANIFEST).exists():
        return seal(client_dir)
    return digest_of(_read_manifest(client_dir))


def verify(client_dir: Path, expected: str | None = None, what: str = "") -> str:
    """Hash every file again: the folder must hold exactly what its manifest lists (and, given `expected`,
    be that digest). Returns the digest; a difference is a BundleError naming the file or both digests."""
    client_dir = Path(client_dir)
    where = what or str(client_dir)
    recorded, actual = _read_manifest(client_dir), manifest(client_dir)
    listed = {f["path"]: f for f in recorded["files"] if isinstance(f, dict)}
    found = {f["path"]: f for f in actual["files"]}
    for path in sorted(listed.keys() | found.keys()):
        if path not in found:
            raise BundleError(f"{where}: {path} is listed in the manifest but missing")
        if path not in listed:
            raise BundleError(f"{where}: {path} is not in the manifest")
        if listed[path] != found[path]:
            raise BundleError(f"{where}: {path} does not match its manifest (size or sha256 differs): the bundle is corrupt")
    got = digest_of(actual)
    if digest_of(recorded) != got:
        raise BundleError(f"{where}: the manifest is not in canonical form (digest {short(digest_of(recorded))} != {short(got)})")
    if expected is not None and got != expected:
        raise BundleError(f"{where}: holds NanoEdge bundle {short(got)}, not the expected {short(expected)}")
    return got


# ------------------------------------------------------------------ shipping
def pack(client_dir: Path, out: Path) -> str:
    """A tar of the client bundle (manifest included; no owners, no times: the same bytes every time). Returns the digest."""
    client_dir, out = Path(client_dir), Path(out)
    d = verify(client_dir)  # never ship a bundle that no longer matches its manifest
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in [client_dir / MANIFEST, *_files(client_dir)]:
            info = tarfile.TarInfo(path.relative_to(client_dir).as_posix())
            info.size, info.mode, info.mtime = path.stat().st_size, 0o644, 0
            with open(path, "rb") as f:
                tar.addfile(info, f)
    tmp.replace(out)
    return d


def _safe_members(tar: tarfile.TarFile, source: str) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    for m in members:
        parts = Path(m.name).parts
        if not m.isfile() or m.name.startswith("/") or ".." in parts or not parts:
            raise BundleError(f"{source}: {m.name!r} is not a plain file inside the bundle: not a FedNano bundle")
    if MANIFEST not in {m.name for m in members}:
        raise BundleError(f"{source}: no {MANIFEST}: not a FedNano bundle (made by `fednano bundle pack`)")
    return members


def unpack(source: Path | bytes, cache_dir: Path, expected: str | None = None) -> tuple[str, Path]:
    """Put a packed bundle (a file, or its bytes) into `<cache_dir>/nanoedge/<digest>/` after checking every
    file against its manifest (and the digest against `expected`). Returns (digest, folder)."""
    name = "the bundle received" if isinstance(source, bytes) else str(source)
    if not isinstance(source, bytes) and not Path(source).is_file():
        raise BundleError(f"{source}: no such file")
    root = Path(cache_dir) / NODE_BUNDLES
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".unpack-{uuid.uuid4().hex[:8]}"
    try:
        try:
            with tarfile.open(fileobj=io.BytesIO(source)) if isinstance(source, bytes) else tarfile.open(source) as tar:
                members = _safe_members(tar, name)
                for m in members:
                    dest = tmp / m.name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(m)
                    assert src is not None  # a regular file (checked)
                    with open(dest, "wb") as f:
                        shutil.copyfileobj(src, f)
        except tarfile.TarError as e:
            raise BundleError(f"{name}: not a readable tar file ({e})") from None
        d = verify(tmp, what=name)
        if expected is not None and d != expected:
            raise BundleError(f"{name}: holds NanoEdge bundle {short(d)}, not the run's {short(expected)}")
        final = root / d
        if not final.exists():  # else held already (verified when it came)
            try:
                os.replace(tmp, final)
            except OSError:  # another process put the same bundle there first
                if not final.exists():
                    raise
        return d, final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ on a node
def held(cache_dirs: list[Path]) -> dict[str, Path]:
    """digest -> folder of every client bundle in these caches: received ones (nanoedge/<digest>/) and, where the
    server prepared in the same cache (simulation, one machine), prepared ones (<bundle>/client/)."""
    out: dict[str, Path] = {}
    for cache in dict.fromkeys(Path(c) for c in cache_dirs):
        for man in [*sorted(cache.glob(f"{NODE_BUNDLES}/*/{MANIFEST}")), *sorted(cache.glob(f"*/client/{MANIFEST}"))]:
            try:
                out.setdefault(digest_of(_read_manifest(man.parent)), man.parent)
            except BundleError:
                continue  # a damaged copy is not a bundle this node holds
    return out


def locate(cache_dirs: list[Path], wanted: str, node: str = "the node") -> Path:
    """The folder of client bundle `wanted` in these caches, or a BundleError naming what the node holds instead."""
    found = held(cache_dirs)
    if wanted in found:
        return found[wanted]
    where = ", ".join(str(c) for c in dict.fromkeys(cache_dirs))
    if found:
        raise BundleError(f"{node} holds NanoEdge bundle {', '.join(short(d) for d in found)}, not the run's {short(wanted)} "
                          f"(in {where}): {GET_IT}")
    raise BundleError(f"{node} holds no NanoEdge bundle (the run's is {short(wanted)}; looked in {where}): {GET_IT}")
