"""The pipeline steps behind ``flexkern evaluate`` and ``flexkern tune-router``: a model directory
in, results (or a new directory) out. The command line only parses and checks its arguments and
calls these; the work itself is in eval_suite.py, router_tuning.py, merge.py and checkpoint.py.

    expert_names        the expert names of a model directory, read from its files (no weights loaded)
    evaluate_model_dir  the evaluation suite (held-out, short-context, mixed-domain, 95% intervals),
                        optionally with experts opted out by mask
    tune_router_dir     router tuning on classifier-picked proxy sets -> a new model directory
"""
from __future__ import annotations

from pathlib import Path

from .checkpoint import (CONFIG_FILE, EXPERTS_FILE, TOKENIZER_FILE, CheckpointError, read_json,
                         read_public_embedding, write_model_dir)
from .defaults import DEMO
from .merge import PUBLIC, load_model


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
    """The evaluation suite (``eval_suite.evaluate_dir``) on a model directory.

    Settings not given come from the model's ``eval_settings.json`` (written by the demo), so the
    demo's models give the report's numbers; without it, ``eval_suite.EvalSettings``' defaults.
    Returns {"names", "domains", "settings", "rows": {label: {domain: held-out loss}},
    "summary": {label: {set: {group: [point, low, high]}}}, "paired": {label: {set: diff}}}.
    """
    from .eval_suite import evaluate_dir

    return evaluate_dir(model_dir, data=data, opt_out=opt_out, top_k=top_k, device=device,
                        max_bytes=max_bytes, eval_tokens=eval_tokens, seq_len=seq_len)


def tune_router_dir(model_dir, out_dir, *, owners: dict[str, str], public=None,
                    proxy_fraction: float = DEMO.rt_proxy_fraction, proxy_selection: str = DEMO.rt_proxy_selection,
                    public_docs: int = DEMO.rt_public_docs,
                    steps: int = DEMO.rt_steps, lr: float = DEMO.rt_lr, batch_size: int = DEMO.batch_size,
                    max_bytes: int | None = None, device: str = "cpu",
                    overwrite: bool = False) -> tuple[Path, list[float]]:
    """Router tuning (``router_tuning.run_router_tuning``, the demo's too) -> a new model directory.

    ``owners``: {expert name: its data source}; each owner's classifier ranks the public documents
    on its side and picks its proxy set (``proxy_selection``: "ranked", the top-scoring ones, or
    "thresholded", only those it classifies as the owner's). ``public`` None: the demo's public mix.
    ``max_bytes`` None: the model's recorded settings (``eval_settings.json``), else the demo's.
    Returns (out_dir, loss per step).
    """
    from .eval_suite import load_settings, save_settings
    from .router_tuning import RouterTuningConfig, run_router_tuning, tuning_data
    from .tokenizer import load_tokenizer

    model_dir = Path(model_dir)
    public_row, method = read_public_embedding(model_dir)
    model, names = load_model(model_dir, device)
    unknown = sorted(set(owners) - set(names[1:]))
    if unknown:
        raise ValueError(f"no owner expert named {unknown} in {model_dir}; owner experts: {names[1:]}")
    tok = load_tokenizer(model_dir / TOKENIZER_FILE)
    settings = load_settings(model_dir)
    mb = max_bytes if max_bytes is not None else (settings.max_bytes if settings else DEMO.max_bytes)
    pub, own = tuning_data(owners, public, mb, settings.public_share if settings else None)
    cfg = RouterTuningConfig(steps=steps, lr=lr, batch_size=batch_size, proxy_fraction=proxy_fraction,
                             proxy_selection=proxy_selection, public_docs=public_docs,
                             seq_len=settings.seq_len if settings else None)
    res = run_router_tuning(model, tok, pub, own, cfg)
    info = read_json(model_dir / EXPERTS_FILE)
    out = write_model_dir(out_dir, model.cpu(), model_dir / TOKENIZER_FILE, public_row, method, info,
                          overwrite=overwrite, inputs=(model_dir,))
    if settings is not None:
        save_settings(out, settings)
    return out, res["losses"]
