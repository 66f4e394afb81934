"""The pipeline steps behind ``flexkern evaluate`` and ``flexkern tune-router``: a model directory
in, results (or a new directory) out. The command line only parses and checks its arguments and
calls these; the work itself is in evaluate.py, router_tuning.py, merge.py and checkpoint.py.

    expert_names        the expert names of a model directory, read from its files (no weights loaded)
    evaluate_model_dir  per-domain held-out loss, optionally with experts opted out by mask
    tune_router_dir     router tuning on public proxy sets -> a new model directory
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import (CONFIG_FILE, EXPERTS_FILE, TOKENIZER_FILE, CheckpointError, read_json,
                         read_public_embedding, write_model_dir)
from .data import DOMAINS, PUBLIC_DOMAINS, load_documents, split_documents
from .defaults import DEMO
from .merge import PUBLIC, load_model, mask_experts


def expert_names(model_dir) -> list[str]:
    """["public", owner names...] of a merged model, ["public"] of a dense anchor (cheap: JSON only)."""
    model_dir = Path(model_dir)
    if not (model_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"{model_dir} is not a model directory (no {CONFIG_FILE})")
    if not (model_dir / EXPERTS_FILE).exists():
        return [PUBLIC]
    info = read_json(model_dir / EXPERTS_FILE)
    names = info.get("experts") if isinstance(info, dict) else None
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{model_dir / EXPERTS_FILE}: 'experts' must be a non-empty list of names")
    return names


def evaluate_model_dir(model_dir, *, data=None, opt_out=(), top_k: int | None = None,
                       max_bytes: int | None = None, eval_tokens: int | None = None,
                       seq_len: int | None = None, device: str = "cpu") -> dict:
    """Held-out loss per domain of a model directory (anchor or merged).

    Returns {"names": expert names, "domains": [...], "rows": {label: {domain: loss}}} with the
    rows "model" and "without NAME" for each name in ``opt_out`` (masked at inference, top-k
    lowered to the active experts when fewer remain, as in the checkpoint ``opt_out`` writes).
    Defaults: all six domains, the demo's max_bytes and eval_tokens, the model's seq_len.
    """
    from .evaluate import domain_losses, heldout_streams
    from .tokenizer import load_tokenizer

    model, names = load_model(model_dir, device)
    if top_k is not None:
        model.set_top_k(top_k)
    tok = load_tokenizer(Path(model_dir) / TOKENIZER_FILE)
    streams = heldout_streams(tok, list(data or DOMAINS), DEMO.max_bytes if max_bytes is None else max_bytes)
    seq_len = seq_len or model.config.seq_len
    eval_tokens = DEMO.eval_tokens if eval_tokens is None else eval_tokens
    rows = {"model": domain_losses(model, streams, seq_len, eval_tokens)}
    k = model.config.top_k
    for name in opt_out:
        model.set_top_k(min(k, len(names) - 1))  # what opt_out's checkpoint without the expert keeps
        mask_experts(model, [name], names)
        rows[f"without {name}"] = domain_losses(model, streams, seq_len, eval_tokens)
        model.set_expert_mask([True] * len(names))
        model.set_top_k(k)
    return {"names": names, "domains": list(streams), "rows": rows}


def tune_router_dir(model_dir, out_dir, *, owners: dict[str, str], public=None,
                    proxy_docs: int = DEMO.rt_proxy_docs, public_docs: int = DEMO.rt_public_docs,
                    steps: int = DEMO.rt_steps, lr: float = DEMO.rt_lr, batch_size: int = DEMO.batch_size,
                    max_bytes: int | None = DEMO.max_bytes, device: str = "cpu",
                    overwrite: bool = False) -> tuple[Path, list[float]]:
    """Tune the router rows of a merged model on public proxy sets and write it to ``out_dir``.

    ``owners``: {expert name: its data source}, used on the owner's side to pick the public
    documents closest to its domain embedding. Returns (out_dir, loss per step).
    """
    from .router_tuning import proxy_streams, tune_router
    from .tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    public_row, method = read_public_embedding(model_dir)
    if method == "anchor":
        raise ValueError(f"{model_dir}: its router rows come from the anchor's hidden states; proxy "
                         "selection here needs the MiniLM embedder (a model built with --embed-method minilm)")
    model, names = load_model(model_dir, device)
    unknown = sorted(set(owners) - set(names[1:]))
    if unknown:
        raise ValueError(f"no owner expert named {unknown} in {model_dir}; owner experts: {names[1:]}")
    tok = load_tokenizer(model_dir / TOKENIZER_FILE)
    public_docs_all = [d for s in (public or PUBLIC_DOMAINS) for d in split_documents(load_documents(s, max_bytes))[0]]
    owner_docs = {n: split_documents(load_documents(src, max_bytes))[0] for n, src in owners.items()}
    streams = proxy_streams(tok, public_docs_all, owner_docs, proxy_docs=proxy_docs, public_docs=public_docs)
    losses = tune_router(model, streams, steps=steps, batch_size=batch_size, lr=lr)
    info = read_json(model_dir / EXPERTS_FILE)
    out = write_model_dir(out_dir, model.cpu(), model_dir / TOKENIZER_FILE, public_row, method, info,
                          overwrite=overwrite, inputs=(model_dir,))
    return out, losses
