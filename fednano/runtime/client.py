"""What a client process holds for a run, and one message's work.

A ClientRuntime is built once per process and run config (in simulation a Ray actor serves
several clients in turn; under a SuperNode, the node's warm worker): the NanoEdge
on the client's device, its batches and image features, and the split channel to the server
LLM. It holds nothing of one client in particular: a ClientJob names the partition, the
round and the client's own folder for one message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fednano.backbones.bundle import load_nanoedge
from fednano.client.features import ImageFeatures, Workload
from fednano.client.nanoedge import NanoEdge
from fednano.config import ConfigError, RunConfig
from fednano.data import load_task
from fednano.data.partition import ClientData
from fednano.data.samples import Task
from fednano.devices import resolve_device
from fednano.privacy import TextNoise, label_store, metric_epsilon, noise_seed, randomized_answers
from fednano.runtime.bundle import client_bundle
from fednano.split.client import SplitClient
from fednano.split.label_private import LabelPrivateClient


@dataclass
class ClientRuntime:
    cfg: RunConfig
    edge: NanoEdge
    work: Workload
    split: SplitClient
    device: torch.device
    task: Task
    part: Any = None  # the method's client part (methods.trainables): what it keeps in this process
    fetched_bytes: int = 0  # split-channel bytes of fetching the client bundle for this runtime, until a reply reports them

    @classmethod
    def build(cls, cfg: RunConfig, address: str, token: str = "", ca: str = "", digest: str = "", fetch: bool = True) -> ClientRuntime:
        """digest: the run's client bundle (what the message names); the node loads it from its cache, or with
        `fetch` gets it from the split server first."""
        torch.set_num_threads(max(1, int(cfg.federation.client_cpus)))
        device = resolve_device(cfg.model.client_device, "model.client_device")
        args = (address, cfg.split.wire_dtype, cfg.split.max_frame_mb, cfg.federation.round_timeout)
        channel = {"token": token or None, "root_certificates": ca.encode() if ca else None, "protocol": cfg.split.protocol}
        fetcher = SplitClient(*args, **channel) if fetch else None  # type: ignore[arg-type]
        try:
            bundle = load_nanoedge(client_bundle(cfg, digest, fetcher), cfg.adapter, device)  # the client bundle only: no LLM weights
        finally:
            if fetcher is not None:
                fetcher.close()
        fetched = fetcher.bytes_up["bundle"] + fetcher.bytes_down["bundle"] if fetcher is not None else 0
        task = load_task(cfg)
        work = Workload(bundle.tokenizer, ImageFeatures(bundle.edge.vision), bundle.edge.num_visual_tokens, task.system)
        head = bundle.edge.embed_tokens.weight.detach()  # the LLM's output head, tied to the embedding table the client holds
        split = (LabelPrivateClient(*args, head=head, gradient_noise=cfg.privacy.gradient_noise, **channel)
                 if cfg.split.label_private else SplitClient(*args, **channel))  # type: ignore[arg-type]
        if cfg.privacy.embedding_noise:
            bundle.edge.text_noise = TextNoise(metric_epsilon(cfg.privacy.embedding_noise, bundle.edge.embed_tokens.weight))
        return cls(cfg, bundle.edge, work, split, device, task, fetched_bytes=fetched)

    def traffic(self) -> dict[str, int]:
        return self.split.traffic()

    def take_fetched_bytes(self) -> int:
        """The bundle fetch's bytes, once: the first reply after the fetch counts them (keys.BYTES_KEYS' bundle_down)."""
        n, self.fetched_bytes = self.fetched_bytes, 0
        return n


@dataclass
class ClientJob:
    """One message's work for one client."""

    rt: ClientRuntime
    data: ClientData
    partition: int
    round: int
    state_dir: Path | None = None  # where the client keeps what never leaves it (FedDPA-F's personal LoRA, label DP's answers)
    # this client's sampling stream for this round (training batches, then the Fisher pass), from the seed: not privacy
    # noise, so it repeats (every privacy draw comes from noise_seed instead)
    generator: torch.Generator = field(init=False)
    seconds: dict[str, float] = field(default_factory=dict)  # where the message's time went, by phase (the ClientApp's)
    arrived: float = 0.0  # when the message reached the ClientApp (time.time())

    def __post_init__(self) -> None:
        seed = self.cfg.federation.seed * 1_000_003 + self.round * 1009 + self.partition
        self.generator = torch.Generator().manual_seed(seed)
        if isinstance(self.rt.edge.text_noise, TextNoise):  # privacy.embedding_noise: this message's own noise stream
            self.rt.edge.text_noise.reseed(self.noise_seed("embedding"))
        if isinstance(self.rt.split, LabelPrivateClient):  # privacy.gradient_noise: likewise
            self.rt.split.reseed(self.noise_seed("gradient"))
        p = self.cfg.privacy
        if p.label_epsilon:  # label DP: the client trains (and takes its Fisher) on randomized answers only, drawn once per sample
            if self.state_dir is None and not p.reproducible_noise:
                raise ConfigError("privacy.label_epsilon: the client keeps each answer's one randomized draw in its state folder "
                                  "(redrawing would spend ε again): set the node config state-dir")
            store = label_store(self.state_dir, self.partition) if self.state_dir is not None else None
            train = randomized_answers(self.data.train, self.rt.task.candidate_sets, p.label_epsilon,
                                       self.cfg.data.seed if p.reproducible_noise else None, store)
            self.data = ClientData(train, self.data.test)

    def noise_seed(self, stream: str) -> int:
        """A seed for one of this message's privacy-noise streams ("embedding", "gradient", "dp-sgd", ...): OS entropy, kept
        in this process only; under privacy.reproducible_noise (tests), one derived from the seed, round and partition."""
        return noise_seed(self.cfg.privacy.reproducible_noise, self.cfg.federation.seed, self.round, self.partition, stream)

    @property
    def cfg(self) -> RunConfig:
        return self.rt.cfg
