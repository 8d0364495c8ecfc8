"""The split-learning server: a gRPC bidirectional stream in front of a ServerLLM.

Each client opens one stream (`Session`) and sends one frame per step; the
server answers each with one frame. Ops:

    info      -> {hidden_size, vocab_size, dtype}            (handshake)
    features  features (K,N,d), meta keys                 -> {stored}   (parts protocols: cache images)
              meta keys only                              -> {missing}  (which of them it does not hold)
    train     embeds (B,T,d), mask (B,T), labels (B,T)    -> loss (), grad (B,T,d)
    score     embeds, mask, cand_embeds (K,L,d), cand_ids, cand_mask -> logprobs (B,K)
    generate  embeds, mask, adapter_t_A/B, meta           -> tokens (B,L), -1 padded
    bundle    meta {digest, offset}                       -> data (n,) uint8, meta {digest, offset, total}
              (a chunk of the packed client bundle: nodes fetch the NanoEdge from the server, never prepare it)

In the parts protocols (split.parts) `embeds` is replaced by its parts (assembly.py), and a training
step replies with the parts' gradients (`grad_text`, `grad_adapter_i_A`, ...).

A malformed frame gets an in-band `error` frame (status INVALID_ARGUMENT) and
the stream stays usable; frames over the size limit are refused by gRPC with
RESOURCE_EXHAUSTED. One client's garbage never stops the server.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
import torch

from fednano.backbones.digest import digest as bundle_digest
from fednano.backbones.digest import pack, short
from fednano.config import SplitConfig
from fednano.data.prompts import IGNORE_INDEX
from fednano.server.llm import ServerLLM
from fednano.split.assembly import Assembled, FeatureCache, MissingFeatures, assemble, check_mask, store_features, tensor
from fednano.split.endpoint import GREEDY, Decoding
from fednano.split.frames import Frame, FrameError, decode, encode, error_frame
from fednano.split.parts import low_rank

log = logging.getLogger(__name__)

SERVICE = "fednano.split.v1.SplitLLM"
METHOD = f"/{SERVICE}/Session"
_FLOAT = (torch.bfloat16, torch.float16, torch.float32)


def _check_embeds(frame: Frame, prefix: str, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    emb = tensor(frame, f"{prefix}embeds", _FLOAT, 3)
    if emb.shape[-1] != hidden:
        raise FrameError(f"tensor {prefix}embeds: hidden size {emb.shape[-1]} != the LLM's {hidden}")
    if emb.shape[0] == 0 or emb.shape[1] == 0:
        raise FrameError(f"tensor {prefix}embeds: empty batch")
    return emb, check_mask(frame, f"{prefix}mask", tuple(emb.shape[:2]))


class LLMWorker:
    """The one thread that runs the LLM (one hot OpenMP team or CUDA stream, no lock contention).

    Jobs are callables; training steps are queued as requests instead, and when
    several clients' steps are waiting at once they run as one micro-batch
    (`ServerLLM.train_steps`), each client still getting exactly its own result.
    A micro-batch grows while its padded size (rows x longest sequence) stays within
    `max_tokens`: that, not a count of requests, is what fills a GPU (a 7B LLM
    saturates at a few thousand tokens; a 135M one at tens of thousands).
    """

    def __init__(
        self, llm: ServerLLM, max_tokens: int = 4096, batching: bool = True, window_s: float = 0.0, active: Callable[[], int] | None = None,
        score_cache_bytes: int | None = None,
    ) -> None:
        """window_s: how long a step may wait for other active clients' steps to join it;
        score_cache_bytes: the most KV cache candidate scoring may hold (ServerLLM.score)."""
        self.llm, self.max_tokens, self.batching, self.window_s = llm, max_tokens, batching, window_s
        self.score_cache_bytes = score_cache_bytes
        self._active = active or (lambda: 1)
        self._queue: queue.Queue = queue.Queue()
        self._held: list = []  # a job taken while filling a micro-batch that did not fit: it goes next
        self.steps = {"train_requests": 0, "llm_passes": 0}
        self.busy_seconds = 0.0  # time spent running LLM work (the server's compute cost)
        self._thread = threading.Thread(target=self._run, name="split-llm", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], Any]) -> Any:
        fut: Future = Future()
        self._queue.put(("call", fn, fut))
        return fut.result()

    def train(
        self, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, reduction: str
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        fut: Future = Future()
        self._queue.put(("train", (embeds, mask, labels, reduction), fut))
        return fut.result()

    def score(
        self, embeds: torch.Tensor, mask: torch.Tensor, cand_embeds: torch.Tensor, cand_ids: torch.Tensor, cand_mask: torch.Tensor
    ) -> torch.Tensor:
        """ServerLLM.score on this thread, within the cache budget."""
        return self.call(lambda: self.llm.score(embeds, mask, cand_embeds, cand_ids, cand_mask, max_cache_bytes=self.score_cache_bytes))

    def stop(self) -> None:
        self._queue.put(None)

    def endpoint(self) -> OnWorker:
        """The LLM as an in-process endpoint whose work runs on this thread (the server's own evaluation)."""
        return OnWorker(self)

    def _take(self, timeout: float | None = None) -> Any:
        """The next job: a held one first; raises queue.Empty after `timeout` (0: do not wait)."""
        if self._held:
            return self._held.pop()
        if timeout is None:
            return self._queue.get()
        return self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()

    @staticmethod
    def padded_tokens(jobs: list) -> int:
        """Size of the merged batch: total rows x the longest sequence (what the LLM computes on)."""
        return sum(j[1][0].shape[0] for j in jobs) * max(j[1][0].shape[1] for j in jobs)

    def _run(self) -> None:
        while (job := self._take()) is not None:
            if job[0] == "call":
                self._settle([job], lambda: [job[1]()])
                continue
            batch = [job]
            deadline = time.monotonic() + self.window_s
            while self.batching:  # whatever else is waiting, or comes within the window, while it fits
                wait = deadline - time.monotonic() if len(batch) < self._active() else 0.0
                try:
                    nxt = self._take(timeout=max(wait, 0.0))
                except queue.Empty:
                    break
                if nxt is None or nxt[0] != "train" or self.padded_tokens([*batch, nxt]) > self.max_tokens:
                    self._held.append(nxt)  # runs next, in arrival order
                    break
                batch.append(nxt)
            self._settle(batch, functools.partial(self.llm.train_steps, [j[1] for j in batch]))
            self.steps["train_requests"] += len(batch)
            self.steps["llm_passes"] += 1

    def _settle(self, jobs: list, compute: Callable[[], list]) -> None:
        t0 = time.perf_counter()
        try:
            results = compute()
        except Exception as e:
            for j in jobs:
                j[2].set_exception(e)
            return
        finally:
            self.busy_seconds += time.perf_counter() - t0
        for j, r in zip(jobs, results, strict=True):
            j[2].set_result(r)


class OnWorker:
    """ServerLLM's `train_step` / `score`, run on the LLM worker's thread (one thread runs the LLM)."""

    def __init__(self, worker: LLMWorker) -> None:
        self.worker = worker

    def train_step(
        self, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", parts: object = None
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.worker.call(lambda: self.worker.llm.train_step(embeds, mask, labels, reduction))

    def score(
        self, embeds: torch.Tensor, mask: torch.Tensor, cand_embeds: torch.Tensor, cand_ids: torch.Tensor, cand_mask: torch.Tensor,
        parts: object = None,
    ) -> torch.Tensor:
        return self.worker.score(embeds, mask, cand_embeds, cand_ids, cand_mask)

    def generate(
        self, embeds: torch.Tensor, mask: torch.Tensor, text_adapter: tuple[torch.Tensor, torch.Tensor, float], stop: list[int],
        decoding: Decoding = GREEDY, parts: object = None,
    ) -> list[list[int]]:
        llm = self.worker.llm
        return self.worker.call(lambda: llm.generate(embeds, mask, text_adapter, stop, decoding))


class BundleFile:
    """The client bundle a split server hands out, packed once (beside the bundle) and read a chunk at a time."""

    def __init__(self, client_dir: Path) -> None:
        self.client_dir = Path(client_dir)
        self.digest = bundle_digest(self.client_dir)
        self.path = self.client_dir.parent / f"client-{self.digest[:16]}.tar"
        self._lock = threading.Lock()

    def chunk(self, offset: int, size: int) -> tuple[bytes, int]:
        """(bytes at `offset`, at most `size` of them; the packed file's total size)."""
        with self._lock:
            if not self.path.exists():
                pack(self.client_dir, self.path)
        total = self.path.stat().st_size
        with open(self.path, "rb") as f:
            f.seek(min(offset, total))
            return f.read(size), total


class SplitService:
    """Validates frames (on the gRPC threads) and hands the LLM work to one LLMWorker.

    A request carries its input embeddings whole (`embeds`) or in parts (split.parts: text rows or
    token ids, image keys into the FeatureCache, the client's adapters); parts are assembled here, and
    a training step's gradient is back-propagated into them before the reply (`grad_<part>`)."""

    def __init__(
        self,
        llm: ServerLLM,
        max_frame_bytes: int,
        batching: bool = True,
        max_tokens: int = 4096,
        window_s: float = 0.0,
        active: Callable[[], int] | None = None,
        score_cache_bytes: int | None = None,
        feature_cache_bytes: int = 4 * 2**30,
        bundle: Path | None = None,
    ) -> None:
        """bundle: the client bundle's folder, served to nodes (the `bundle` op)."""
        self.llm, self.max_frame_bytes = llm, max_frame_bytes
        self.bundle = BundleFile(bundle) if bundle is not None else None
        self.worker = LLMWorker(llm, max_tokens, batching, window_s, active, score_cache_bytes)
        self.features = FeatureCache(feature_cache_bytes)
        self.table = llm.model.get_input_embeddings()
        self.stats = {"frames": 0, "errors": 0, "bytes_in": 0, "bytes_out": 0}
        self._stats_lock = threading.Lock()
        self.on_frame: Callable[[str], None] | None = None  # called with the op of every served frame

    def handle(self, data: bytes, client: str = "anonymous") -> bytes:
        """One request frame from `client` (the authenticated id: its cached image features are its own)."""
        try:
            reply = self._dispatch(decode(data, self.max_frame_bytes), client)
        except MissingFeatures as e:
            reply = error_frame("NOT_FOUND", str(e), missing=e.keys)
        except FrameError as e:
            reply = error_frame("INVALID_ARGUMENT", str(e))
        except Exception as e:
            log.exception("split step failed")
            reply = error_frame("INTERNAL", f"{type(e).__name__}: {e}")
        out = encode(reply)
        with self._stats_lock:
            self.stats["frames"] += 1
            self.stats["errors"] += reply.op == "error"
            self.stats["bytes_in"] += len(data)
            self.stats["bytes_out"] += len(out)
        if self.on_frame is not None:
            self.on_frame(reply.op)
        return out

    def _dispatch(self, frame: Frame, client: str) -> Frame:
        if frame.op == "info":
            return Frame(
                "info", meta={"hidden_size": self.llm.hidden_size, "vocab_size": self.llm.vocab_size, "dtype": str(self.llm.dtype)}
            )
        if frame.op == "features":
            return Frame("features", meta=store_features(frame, client, self.features, self.llm.hidden_size, self.table.weight.device))
        ops = {"train": self._train, "score": self._score, "generate": self._generate, "hidden": self._hidden,
               "hidden_grad": self._hidden_grad, "bundle": self._bundle}
        if frame.op not in ops:
            raise FrameError(f"unknown op {frame.op!r} (known: info, features, {', '.join(ops)})")
        return ops[frame.op](frame, client)

    def _inputs(self, frame: Frame, client: str, train: bool) -> tuple[torch.Tensor, torch.Tensor, Assembled | None]:
        """(embeds (B, T, d), mask (B, T), the parts they were assembled from or None if they came whole)."""
        if "embeds" in frame.tensors:
            return (*_check_embeds(frame, "", self.llm.hidden_size), None)
        parts = assemble(frame, client, self.features, self.table, train)
        return parts.embeds.detach(), parts.mask, parts

    def _labels(self, frame: Frame, shape: tuple[int, ...]) -> torch.Tensor:
        labels = tensor(frame, "labels", (torch.int64, torch.int32), 2).long()
        if tuple(labels.shape) != shape:
            raise FrameError(f"tensor labels: shape {tuple(labels.shape)} != mask's {shape}")
        valid = (labels == IGNORE_INDEX) | ((labels >= 0) & (labels < self.llm.vocab_size))
        if not valid.all():
            raise FrameError(f"tensor labels: ids must be in [0, {self.llm.vocab_size}) or {IGNORE_INDEX}")
        if not (labels[:, 1:] != IGNORE_INDEX).any():
            raise FrameError("tensor labels: no supervised token")
        return labels

    def _train(self, frame: Frame, client: str) -> Frame:
        reduction = frame.meta.get("reduction", "mean")
        if reduction not in ("mean", "sum"):
            raise FrameError(f"meta.reduction must be 'mean' or 'sum', got {reduction!r}")
        fisher = "fisher_weights" in frame.tensors
        if fisher and reduction != "sum":
            raise FrameError("tensor fisher_weights: a Fisher pass needs meta.reduction 'sum'")
        emb, mask, parts = self._inputs(frame, client, train=reduction == "mean" or fisher)
        labels = self._labels(frame, tuple(mask.shape))
        loss, grad, n_tokens = self.worker.train(emb, mask, labels, reduction)
        # the gradient goes back the way the embeddings came: as one-byte codes if they did
        sent = next((frame.scaled[k] for k in ("embeds", "text") if k in frame.scaled), "")
        head = {"loss": loss.reshape(())}
        if parts is None or (reduction == "sum" and not fisher):  # per-sample gradients: the whole (B, T, d)
            return Frame("train", head | {"grad": grad}, {"n_tokens": n_tokens}, {"grad": sent} if sent else {})
        if not fisher:
            out = parts.grads(grad)
            if "text" in frame.tensors:  # the text rows' gradient in the dtype they came in (bf16 wire: bf16)
                out["grad_text"] = out["grad_text"].to(frame.tensors["text"].dtype)
        else:  # the Fisher sums of the adapters applied here; the text rows' per-sample gradient if they came as rows
            weights = tensor(frame, "fisher_weights", _FLOAT, 1)
            if weights.shape[0] != mask.shape[0]:
                raise FrameError(f"tensor fisher_weights: {weights.shape[0]} weights for {mask.shape[0]} rows")
            out = {"grad_text": parts.grads(grad)["grad_text"].to(frame.tensors["text"].dtype)} if "text" in parts.leaves else {}
            out |= parts.fisher(grad, weights)
        return Frame("train", head | out, {"n_tokens": n_tokens}, {"grad_text": sent} if sent else {})

    def _bundle(self, frame: Frame, client: str) -> Frame:
        """A chunk of the packed client bundle named by its digest (a node fetching the run's NanoEdge)."""
        if self.bundle is None:
            raise FrameError("this split server hands out no NanoEdge bundle")
        want, offset = frame.meta.get("digest"), frame.meta.get("offset", 0)
        if want != self.bundle.digest:
            raise FrameError(f"meta.digest: the server holds NanoEdge bundle {short(self.bundle.digest)}, not {str(want)[:40]!r}")
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise FrameError(f"meta.offset must be a non-negative integer, got {offset!r}")
        data, total = self.bundle.chunk(offset, max(1, self.max_frame_bytes - 64 * 1024))  # room for the header
        if offset > total:
            raise FrameError(f"meta.offset {offset} is past the bundle's end ({total} bytes)")
        payload = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        return Frame("bundle", {"data": payload}, {"digest": self.bundle.digest, "offset": offset, "total": total})

    def _positions(self, frame: Frame, shape: tuple[int, ...]) -> torch.Tensor:
        """The label-private split's positions (B, T): where the client wants the hidden states (those that predict a label)."""
        pos = tensor(frame, "positions", (torch.uint8, torch.bool), 2).bool()
        if tuple(pos.shape) != shape:
            raise FrameError(f"tensor positions: shape {tuple(pos.shape)} != mask's {shape}")
        if not pos.any():
            raise FrameError("tensor positions: no position asked for")
        return pos

    def _hidden(self, frame: Frame, client: str) -> Frame:
        """split.label_private, step 1: the hidden states at the positions asked for (the client holds the head)."""
        emb, mask = _check_embeds(frame, "", self.llm.hidden_size)
        pos = self._positions(frame, tuple(mask.shape))
        hidden = self.worker.call(lambda: self.llm.hidden_states(emb, mask, pos))
        sent = frame.scaled.get("embeds", "")
        return Frame("hidden", {"hidden": hidden}, {}, {"hidden": sent} if sent else {})

    def _hidden_grad(self, frame: Frame, client: str) -> Frame:
        """split.label_private, step 2: the client's d loss / d hidden states, back through the LLM to its embeddings."""
        emb, mask = _check_embeds(frame, "", self.llm.hidden_size)
        pos = self._positions(frame, tuple(mask.shape))
        g = tensor(frame, "grad_hidden", _FLOAT, 2)
        want = (int(pos.sum()), self.llm.hidden_size)
        if tuple(g.shape) != want:
            raise FrameError(f"tensor grad_hidden: shape {tuple(g.shape)} != {want} (positions x hidden)")
        if not torch.isfinite(g).all():
            raise FrameError("tensor grad_hidden: NaN or Inf")
        grad = self.worker.call(lambda: self.llm.hidden_backward(emb, mask, pos, g))
        sent = frame.scaled.get("embeds", "")
        return Frame("hidden_grad", {"grad": grad}, {}, {"grad": sent} if sent else {})

    def _score(self, frame: Frame, client: str) -> Frame:
        with torch.no_grad():
            emb, mask, parts = self._inputs(frame, client, train=False)
            c_ids = tensor(frame, "cand_ids", (torch.int64, torch.int32), 2).long()
            if ((c_ids < 0) | (c_ids >= self.llm.vocab_size)).any():
                raise FrameError(f"tensor cand_ids: ids must be in [0, {self.llm.vocab_size})")
            if parts is not None and "adapter_t" in parts.adapters:  # ids: the candidates are embedded here too
                c_emb = low_rank(self.table(c_ids.to(self.table.weight.device)).float(), parts.adapters["adapter_t"])
                c_mask = check_mask(frame, "cand_mask", tuple(c_ids.shape))
            else:
                c_emb, c_mask = _check_embeds(frame, "cand_", self.llm.hidden_size)
        if tuple(c_ids.shape) != tuple(c_mask.shape):
            raise FrameError(f"tensor cand_ids: shape {tuple(c_ids.shape)} != cand_mask's {tuple(c_mask.shape)}")
        lp = self.worker.score(emb, mask, c_emb, c_ids, c_mask)
        return Frame("score", {"logprobs": lp.float()})

    def _generate(self, frame: Frame, client: str) -> Frame:
        with torch.no_grad():
            emb, mask, _ = self._inputs(frame, client, train=False)
        d = self.llm.hidden_size
        A, B = tensor(frame, "adapter_t_A", _FLOAT, 2), tensor(frame, "adapter_t_B", _FLOAT, 2)
        if A.shape[1] != d or tuple(B.shape) != (d, A.shape[0]):
            raise FrameError(f"tensors adapter_t_A {tuple(A.shape)} / adapter_t_B {tuple(B.shape)}: expected (r, {d}) and ({d}, r)")
        scale, stop, decoding = _generate_options(frame.meta, self.llm.vocab_size)
        answers = self.worker.call(lambda: self.llm.generate(emb, mask, (A.float(), B.float(), scale), stop, decoding))
        tokens = torch.full((len(answers), max(map(len, answers), default=0)), -1, dtype=torch.int64)  # -1 after an answer's end
        for row, ids in enumerate(answers):
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return Frame("generate", {"tokens": tokens})


MAX_NEW_TOKENS = 1024  # the most tokens one generate request may ask for


def _generate_options(meta: dict, vocab: int) -> tuple[float, list[int], Decoding]:
    """A generate request's settings, checked: each problem names the field. -> (NanoAdapter-T's scale, stop tokens,
    how to decode)."""

    def number(key: str, kinds: tuple, ok: Callable[[Any], bool], what: str) -> Any:
        v = meta.get(key)
        if not isinstance(v, kinds) or isinstance(v, bool) or not math.isfinite(v) or not ok(v):
            raise FrameError(f"meta.{key} must be {what}, got {v!r}")
        return v

    stop = meta.get("stop")
    if not isinstance(stop, list) or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in stop):
        raise FrameError(f"meta.stop must be a list of token ids in [0, {vocab}), got {stop!r}")
    scale = float(number("scale", (int, float), lambda v: True, "a number"))
    return scale, stop, Decoding(
        max_new_tokens=number("max_new_tokens", (int,), lambda v: 1 <= v <= MAX_NEW_TOKENS, f"an integer in [1, {MAX_NEW_TOKENS}]"),
        temperature=float(number("temperature", (int, float), lambda v: v >= 0, "a number >= 0")),
        top_p=float(number("top_p", (int, float), lambda v: 0 < v <= 1, "a number in (0, 1]")),
        seed=number("seed", (int,), lambda v: 0 <= v < 2**63, "a non-negative integer"),
    )


class SplitServer:
    """Runs SplitService on a gRPC server; `address` is what clients dial.

    Security: with a `secret`, every stream must carry `authorization: Bearer
    <client_token(id)>` metadata — a per-client token, HMAC(secret, id) — or is
    refused (UNAUTHENTICATED) before any LLM work; with `tls` (PEM bytes of
    certificate chain and private key) the channel is encrypted. `cfg.max_streams`
    caps concurrent streams overall and `cfg.max_streams_per_client` per client id
    (RESOURCE_EXHAUSTED beyond them). Binding, frame limit and micro-batching come
    from the same SplitConfig the run uses.
    """

    def __init__(
        self,
        llm: ServerLLM,
        cfg: SplitConfig | None = None,
        *,
        secret: str | None = None,
        tls: tuple[bytes, bytes] | None = None,
        bundle: Path | None = None,
    ) -> None:
        """bundle: the client bundle's folder, handed out to nodes that do not hold it (`bundle` op)."""
        cfg = cfg or SplitConfig()
        # A stream holds a gRPC thread for as long as it is open (its handler waits on the LLM thread): a thread
        # for every stream the server admits, and a few more to refuse the ones beyond the limit.
        workers = cfg.max_streams + 8
        self.max_frame_bytes = int(cfg.max_frame_mb * 1024 * 1024)
        self.service = SplitService(
            llm,
            self.max_frame_bytes,
            cfg.micro_batching,
            cfg.max_batch_tokens,
            window_s=cfg.batch_window_ms / 1000,
            active=lambda: self._streams,
            score_cache_bytes=int(cfg.max_score_cache_mb * 2**20),
            feature_cache_bytes=int(cfg.feature_cache_mb * 2**20),
            bundle=bundle,
        )
        self.secret, self.max_streams, self.max_streams_per_client = secret, cfg.max_streams, cfg.max_streams_per_client
        self._streams = 0
        self._per_client: dict[str, int] = {}
        self._streams_lock = threading.Lock()
        grpc_limit = self.max_frame_bytes + 64 * 1024  # beyond this gRPC itself refuses (RESOURCE_EXHAUSTED)
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="split"),
            options=[("grpc.max_receive_message_length", grpc_limit), ("grpc.max_send_message_length", grpc_limit)],
        )
        handler = grpc.method_handlers_generic_handler(SERVICE, {"Session": grpc.stream_stream_rpc_method_handler(self._session)})
        self._server.add_generic_rpc_handlers((handler,))
        target = f"{cfg.host}:{cfg.port}"
        self.secure = tls is not None
        if tls is not None:
            self.port = self._server.add_secure_port(target, grpc.ssl_server_credentials([(tls[1], tls[0])]))
        else:
            self.port = self._server.add_insecure_port(target)
        if self.port == 0:
            raise RuntimeError(f"split server could not bind {target}")
        self.address = f"{cfg.host}:{self.port}"
        self.refused = {"unauthenticated": 0, "too_many_streams": 0}

    def client_token(self, client_id: str) -> str:
        """The token a client presents: its id and HMAC-SHA256(secret, id)."""
        assert self.secret is not None
        mac = hmac.new(self.secret.encode(), client_id.encode(), hashlib.sha256).hexdigest()
        return f"{client_id}.{mac}"

    def _authenticate(self, context: grpc.ServicerContext) -> str:
        if self.secret is None:
            return "anonymous"
        auth = dict(context.invocation_metadata()).get("authorization", "")
        client_id = auth.removeprefix("Bearer ").rpartition(".")[0]
        if not (auth.startswith("Bearer ") and client_id and hmac.compare_digest(auth, f"Bearer {self.client_token(client_id)}")):
            self.refused["unauthenticated"] += 1
            log.warning("split server: refused a stream from %s without a valid token", context.peer())
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong split-channel token")
        return client_id

    def _session(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        client = self._authenticate(context)
        with self._streams_lock:
            if self._streams >= self.max_streams or self._per_client.get(client, 0) >= self.max_streams_per_client:
                self.refused["too_many_streams"] += 1
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"stream limit reached ({self.max_streams} in all, {self.max_streams_per_client} per client)",
                )
            self._streams += 1
            self._per_client[client] = self._per_client.get(client, 0) + 1
        try:
            for data in requests:
                yield self.service.handle(data, client)
        finally:
            with self._streams_lock:
                self._streams -= 1
                self._per_client[client] -= 1

    def start(self) -> SplitServer:
        self._server.start()
        log.info(
            "split server listening on %s%s%s", self.address, " (TLS)" if self.secure else "", ", token required" if self.secret else ""
        )
        return self

    def stop(self, grace: float = 1.0) -> None:
        self._server.stop(grace).wait()
        self.service.worker.stop()

    def __enter__(self) -> SplitServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
