"""The learned critic: a validated bundle, one onnxruntime session, a micro-batcher in front.

``OnnxCritic.load`` is blocking (it builds the session and warms it): call it at start-up or off
the event loop; a bundle whose head reads no encoder lets the session go once it is checked.
``score`` tokenizes in a small thread pool and queues the turn's rows on the batcher, whose runs
execute in the inference pool; the event loop only awaits.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import json
import logging
import math
import platform
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import tokenizers

from service.critic import features, render
from service.critic.base import Assessment
from service.critic.batcher import Feed, MicroBatcher
from service.critic.bundle import INPUT_NAMES, OUTPUT_NAME, Bundle, BundleError, check_model_io, read_bundle
from service.critic.threads import CriticThreads, cores, plan

log = logging.getLogger(__name__)

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
# Padded tokens per run on a CPU. Per sequence, runs of 512-2,048 tokens cost least; runs of 4,096
# and more cost up to 35% more (docs/critic-serving.md, "The token cap"). CUDA gets no token cap: on
# an H200 an fp16 run took 1.1-1.5 ms from 1 x 128 to 16 x 512 tokens (docs/critic-serving.md, "GPU").
CPU_RUN_TOKENS = 2048
_SMOKE_MESSAGES = [{"role": "system", "content": "You are a helpful agent."},
                   {"role": "user", "content": "Please check the status of order 1234."}]
_SMOKE_CANDIDATES: list[dict[str, Any]] = [{"role": "assistant", "content": "Order 1234 shipped yesterday."},
                     {"role": "assistant", "tool_calls": [{"type": "function", "function": {
                         "name": "get_order", "arguments": "{\"order_id\": \"1234\"}"}}]}]


def _logit(p: float) -> float:
    p = min(max(p, 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


# Best first. onnxruntime's int8 kernels differ by instruction set, and so do int8 scores (in the
# third decimal) and timings: figures name the one they were measured on.
INT8_ISAS = ("avx512_vnni", "avx_vnni", "avx512f", "avx2")


def cpu_description() -> str:
    """"AMD EPYC, avx512_vnni, 2 cores": the CPU model, its best int8 instruction set, the cores."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:  # pragma: no cover - not Linux
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    isa = next((f for f in INT8_ISAS if f in flags), None)
    model = names[0] if names else platform.processor() or platform.machine()
    return ", ".join(x for x in (model, isa, f"{cores()} cores") if x)


def requested(setting: str | None, precision: str | None = None) -> list[str]:
    """``settings.critic_providers`` ("CUDAExecutionProvider,CPUExecutionProvider", "cpu", ...)
    as provider names; unset: CUDA then CPU, but the CPU alone for an int8 bundle: onnxruntime's int8
    kernels are CPU kernels, and under CUDA such a bundle ran no faster than on the CPU beside the
    GPU, 40x slower than an fp16 one (docs/critic-serving.md, "GPU"); on the CPU its scores are the
    ones its evaluation measured."""
    aliases = {"cuda": CUDA, "cpu": CPU}
    if not setting:
        return [CPU] if precision == "int8" else [CUDA, CPU]
    return [aliases.get(p.strip().lower(), p.strip()) for p in setting.split(",") if p.strip()]


def providers_for(setting: str | None, precision: str | None = None) -> list[str]:
    """The requested providers this onnxruntime build has, CPU always last as the fallback."""
    wanted = requested(setting, precision)
    available = set(ort.get_available_providers())
    unknown = [p for p in wanted if p not in available]
    if unknown:
        log.info("critic: %s not in this onnxruntime build (it has %s)", unknown, sorted(available))
    chosen = [p for p in wanted if p in available and p != CPU]
    return chosen + [CPU]


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning threads burn the cores between runs that the event loop and tokenizer need.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


ALL_KINDS = frozenset(features.FEATURES_BY_KIND)


def unread_kinds(bundle: Bundle) -> frozenset[str]:
    """The kinds of turn whose head gives the encoder weight 0 (none without a head: then the
    encoder is the score)."""
    head = bundle.head
    return frozenset() if head is None else frozenset(
        kind for kind in features.FEATURES_BY_KIND
        if (lin := head.linear(kind)).weights[lin.features.index("encoder")] == 0.0)


def _open_session(bundle: Bundle, providers: list[str], intra_op: int) -> ort.InferenceSession:
    try:
        session = ort.InferenceSession(str(bundle.model_path), session_options(intra_op), providers=providers)
    except Exception as e:  # onnxruntime raises its own untyped errors
        raise BundleError(f"critic bundle {bundle.path}: model.onnx does not load: {e}") from e
    check_model_io(bundle, session.get_inputs(), session.get_outputs())
    return session


def _return_freed_memory() -> None:
    """glibc keeps freed memory in its heap; a freed model's arena is worth giving back (about a
    third of what the session held). Elsewhere (musl, macOS) there is nothing to call."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


class OnnxCritic:
    """Scores with one onnxruntime session; safe to share by all the turns of a process."""

    def __init__(self, bundle: Bundle, session: ort.InferenceSession, tokenizer: tokenizers.Tokenizer, *,
                 max_batch: int = 64, max_tokens: int | None = None, max_wait_s: float = 0.002,
                 max_length: int | None = None, tokenizer_threads: int = 2, runs: int = 1,
                 reopen: Callable[[], ort.InferenceSession] | None = None) -> None:
        self.session: ort.InferenceSession | None = session
        self.bundle, self.tokenizer = bundle, tokenizer
        self._reopen, self._opening = reopen, threading.Lock()
        self.name, self.version = bundle.name, bundle.version
        self.provider = session.get_providers()[0]  # the one actually in use
        self.max_length = max_length or bundle.max_length
        self._use_binding = self.provider == CUDA
        # CPU: `runs` runs at once, each on the session's intra-op threads (service/critic/threads.py).
        # On a GPU a second worker prepares the next batch while the device runs this one.
        workers = max(1, runs) if self.provider == CPU else 2
        self.runs, self.tokenizer_threads = workers, tokenizer_threads
        self.intra_op = session.get_session_options().intra_op_num_threads
        self._infer = ThreadPoolExecutor(workers, thread_name_prefix="critic-infer")
        self._tokenize = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="critic-tok")
        pad = tokenizer.token_to_id("[PAD]") or 0
        max_tokens = max_tokens or (CPU_RUN_TOKENS if self.provider == CPU else None)
        self.batcher = MicroBatcher(self.run, self._infer, workers, pad_ids={"input_ids": pad},
                                    max_batch=max_batch, max_tokens=max_tokens, max_wait_s=max_wait_s)
        self._closed = threading.Event()
        # Kinds of turn whose head gives the encoder no weight: the encoder is not run on them, as its
        # reading could not move a score (a bundle without a head: the encoder is the score).
        self.encoder_unread = unread_kinds(bundle)

    @classmethod
    def load(cls, path: str | Path, providers: str | list[str] | None = None, *,
             threads: CriticThreads | None = None, **kwargs: Any) -> OnnxCritic:
        """Reads, validates, opens and warms the bundle in ``path``. Blocking. ``threads``: default
        all of this process's cores (``threads.plan``)."""
        threads = threads or plan(cores())
        bundle = read_bundle(path)
        wanted = providers if isinstance(providers, list) else providers_for(providers, bundle.precision)
        if not providers and CUDA not in wanted and CUDA in ort.get_available_providers():  # requested()'s int8 rule
            log.info("critic %s: an int8 bundle, served on the CPU (an fp16 bundle is the one for a GPU; "
                     "TURNGATE_CRITIC_PROVIDERS=cuda runs this one under CUDA)", bundle.path)
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(bundle.tokenizer_path))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise BundleError(f"critic bundle {bundle.path}: tokenizer.json does not load: {e}") from e
        opener = functools.partial(_open_session, bundle, wanted, threads.intra_op)
        critic = cls(bundle, opener(), tokenizer, **{"tokenizer_threads": threads.tokenizer, "runs": threads.runs,
                                                     "reopen": opener, **kwargs})
        # Asked for: named in the setting, or by default on a build that has CUDA (the GPU image).
        asked = CUDA in (providers if isinstance(providers, list) else requested(providers, bundle.precision)) and (
            bool(providers) or CUDA in ort.get_available_providers())
        if asked and critic.provider != CUDA:
            log.warning("critic %s/%s: CUDA was asked for but the session runs on %s (no GPU, or the "
                        "onnxruntime-gpu build / CUDA libraries are missing)", critic.name, critic.version,
                        critic.provider)
        try:
            critic.warm()
        except BaseException:
            critic.close()
            raise
        log.info("critic %s/%s loaded from %s on %s (%s, max_length %d, %d intra-op thread(s) x %d run(s), "
                 "%d tokenizer thread(s))", critic.name, critic.version, bundle.path, critic.provider,
                 bundle.precision, critic.max_length, threads.intra_op, critic.runs, threads.tokenizer)
        if critic.encoder_unread == ALL_KINDS:
            critic.let_session_go()
        return critic

    def warm(self) -> None:
        """A smoke run on a real rendering, then a run at a larger shape: checks the scores are
        usable and lets onnxruntime size its buffers before the first real turn."""
        feed = render.encode_batch(self.tokenizer, _SMOKE_MESSAGES, _SMOKE_CANDIDATES, None, self.max_length)
        try:
            scores = self.run(feed)
        except Exception as e:
            raise BundleError(f"critic bundle {self.bundle.path}: smoke inference failed: {e}") from e
        if scores.shape != (len(_SMOKE_CANDIDATES),) or not np.all(np.isfinite(scores)):
            raise BundleError(f"critic bundle {self.bundle.path}: smoke inference gave {scores!r}, expected "
                              f"{len(_SMOKE_CANDIDATES)} finite scores")
        width = min(self.max_length, 256)
        self.run({"input_ids": np.full((8, width), 1000, dtype=np.int64),
                  "attention_mask": np.ones((8, width), dtype=np.int64),
                  "token_type_ids": np.zeros((8, width), dtype=np.int64)})

    def run(self, feed: Feed) -> np.ndarray:
        """One blocking inference run: sigmoid scores, a float32 per row."""
        session = self.session if self.session is not None else self.open_session()
        if self._use_binding:
            binding = session.io_binding()
            for name in INPUT_NAMES:
                binding.bind_cpu_input(name, np.ascontiguousarray(feed[name]))
            binding.bind_output(OUTPUT_NAME)
            session.run_with_iobinding(binding)
            logits = binding.copy_outputs_to_cpu()[0]
        else:
            logits = session.run([OUTPUT_NAME], {n: feed[n] for n in INPUT_NAMES})[0]
        logits = np.asarray(logits, dtype=np.float32).reshape(-1)
        return 1.0 / (1.0 + np.exp(-logits))

    def encode(self, messages: list[dict[str, Any]], candidates: list[dict[str, Any]],
               tools: list[dict[str, Any]] | None) -> Feed:
        return render.encode_batch(self.tokenizer, messages, candidates, tools, self.max_length)

    def prepare(self, messages: list[dict[str, Any]], candidates: list[dict[str, Any]], unique: list[int],
                tools: list[dict[str, Any]] | None, verdicts: list[bool] | None
                ) -> tuple[Feed | None, features.TurnFeatures]:
        """Tokenizer pool: the turn features of all the candidates (agreement counts the duplicates),
        and the encoder's feed for the distinct ones (None where the head does not read the encoder)."""
        turn = features.compute(messages, candidates, tools, verdicts=verdicts)
        if turn.kind in self.encoder_unread:
            return None, turn
        return self.encode(messages, [candidates[i] for i in unique], tools), turn

    async def assess(self, messages: list[dict[str, Any]], candidates: list[dict[str, Any]],
                     tools: list[dict[str, Any]] | None = None, verdicts: list[bool] | None = None
                     ) -> list[Assessment]:
        """Scores with their features and contributions. ``verdicts``: the structural checks where
        the caller ran them already (the gate does), so that they are not run twice."""
        if not candidates:
            return []
        if self._closed.is_set():
            raise RuntimeError(f"critic {self.name}/{self.version} is closed")
        # Samples of one turn are often identical (low temperature, one obvious tool call):
        # the encoder reads each distinct candidate once.
        keys = [json.dumps(c, sort_keys=True, default=str) for c in candidates]
        first = {k: i for i, k in reversed(list(enumerate(keys)))}
        unique = sorted(first.values())
        loop = asyncio.get_running_loop()
        arrived = self.batcher.expect()  # a batch forming now waits for this turn's rows
        try:
            feed, turn = await loop.run_in_executor(self._tokenize, self.prepare, messages, candidates,
                                                    unique, tools, verdicts)
        finally:
            arrived()
        if feed is None:  # not run: reported without it (its contribution, its weight 0, is 0 anyway)
            return self._without_encoder(turn)
        probs = await self.batcher.submit(feed)
        by_key = {keys[i]: float(p) for i, p in zip(unique, probs, strict=True)}
        encoder = [by_key[k] for k in keys]
        at = turn.names.index("encoder")
        for row, p in zip(turn.rows, encoder):
            row[at] = _logit(p)
        named = [dict(zip(turn.names, row)) for row in turn.rows]
        if self.bundle.head is None:  # a format-1 bundle: the encoder decides alone
            return [Assessment(p, f) for p, f in zip(encoder, named)]
        scores, contribs = self.bundle.head.apply(turn)
        return [Assessment(s, f, dict(zip(turn.names, c))) for s, f, c in zip(scores, named, contribs)]

    def _without_encoder(self, turn: features.TurnFeatures) -> list[Assessment]:
        assert self.bundle.head is not None  # encoder_unread is empty without a head
        scores, contribs = self.bundle.head.apply(turn)  # the row's encoder is compute's 0.0
        keep = [i for i, name in enumerate(turn.names) if name != "encoder"]
        return [Assessment(s, {turn.names[i]: row[i] for i in keep}, {turn.names[i]: c[i] for i in keep})
                for s, row, c in zip(scores, turn.rows, contribs)]

    async def score(self, messages: list[dict[str, Any]], candidates: list[dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> list[float]:
        return [a.score for a in await self.assess(messages, candidates, tools)]

    def let_session_go(self) -> None:
        """Frees the session of a bundle whose head reads no encoder on any kind of turn: checked and
        warmed at load like any, then nothing in serving runs it, and it held about 95 MB a process
        (bench/serve_memory.py). `run` opens it again if something does (a bench, a test)."""
        with self._opening:
            self.session = None
        _return_freed_memory()
        log.info("critic %s/%s: its head reads no encoder, so the model's session is let go (it opens "
                 "again if a run needs it)", self.name, self.version)

    def open_session(self) -> ort.InferenceSession:
        """The session, opened again if it was let go; from any thread."""
        with self._opening:
            if self._closed.is_set():
                raise RuntimeError(f"critic {self.name}/{self.version} is closed")
            if self.session is None:
                if self._reopen is None:
                    raise RuntimeError(f"critic {self.name}/{self.version} has no session to open")
                self.session = self._reopen()
            return self.session

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "provider": self.provider,
                "max_length": self.max_length, "bundle": self.bundle.describe(),
                "threads": {"intra_op": self.intra_op, "runs": self.runs, "tokenizer": self.tokenizer_threads}}

    def close(self) -> None:
        """Stops taking turns, waits for runs in flight, then lets the session go. Blocking."""
        if self._closed.is_set():
            return
        self._closed.set()
        self.batcher.close()
        started = time.perf_counter()
        self._tokenize.shutdown(wait=True)
        self._infer.shutdown(wait=True)
        with self._opening:
            self.session = None  # the last reference: onnxruntime frees the model and its arena
        log.info("critic %s/%s closed (%.0f ms waiting for runs in flight)", self.name, self.version,
                 1000 * (time.perf_counter() - started))
