"""Which client bundle a node loads: the one the run's messages name, by digest, from the node's own cache
(every file hashed again when a process first loads it); a node that does not hold it fetches it from the split
server (unless its node config says `fetch-bundle=0`).
A node never prepares a backbone, so it never needs an LLM weight."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from fednano.backbones.bundle import BundleError
from fednano.backbones.digest import NODE_BUNDLES, locate, short, unpack, verify
from fednano.config import RunConfig, default_cache_dir
from fednano.split.client import SplitChannelError, SplitClient

log = logging.getLogger(__name__)


def node_caches(cfg: RunConfig) -> list[Path]:
    """Where a node keeps bundles: model.cache_dir (the node's `cache-dir`, or the run's), then $FEDNANO_CACHE."""
    return list(dict.fromkeys([cfg.model.resolved_cache_dir, Path(default_cache_dir()).expanduser()]))


def client_bundle(cfg: RunConfig, digest: str, split: SplitClient | None = None) -> Path:
    """The folder of client bundle `digest` on this node; fetched through `split` (then verified and cached) when
    the node does not hold it. A BundleError says what the node holds instead and how to get the run's."""
    if not digest:
        raise BundleError("the message names no NanoEdge bundle digest (a server older than this node?)")
    caches = node_caches(cfg)
    try:
        folder = locate(caches, digest)
    except BundleError as missing:
        if split is None:
            raise
        problem = missing
    else:  # held: every file hashed again against its manifest, so a file changed on the node's disk is caught here
        verify(folder, digest, what=f"the node's NanoEdge bundle {short(digest)} ({folder})")
        return folder
    cache = caches[0]
    (cache / NODE_BUNDLES).mkdir(parents=True, exist_ok=True)
    tmp = cache / NODE_BUNDLES / f".fetch-{uuid.uuid4().hex[:8]}.tar"
    try:
        log.info("fetching NanoEdge bundle %s from the split server into %s", short(digest), cache)
        size = split.fetch_bundle(digest, tmp)
        _, folder = unpack(tmp, cache, expected=digest)
        log.info("received NanoEdge bundle %s (%.1f MiB)", short(digest), size / 2**20)
        return folder
    except (SplitChannelError, BundleError) as e:
        raise BundleError(f"{problem}; fetching it from the split server failed: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
