"""``flexkern`` command line: the FlexOlmo pipeline, end to end or one step at a time.

    flexkern demo                                   everything on the example corpora -> runs/demo/report.md
    flexkern anchor --out runs/anchor               train the public model
    flexkern train-expert --anchor runs/anchor --source code --out runs/experts
    flexkern merge --anchor runs/anchor --packages runs/experts/*.flexpert --out runs/merged
    flexkern evaluate --model runs/merged [--opt-out code]
    flexkern opt-out --model runs/merged --name code --out runs/merged-no-code
    flexkern opt-in --model runs/merged-no-code --package runs/experts/code.flexpert --out runs/merged2
    flexkern tune-router --model runs/merged --owner code=code --out runs/merged-rt
    flexkern export-hf --model runs/merged --out runs/merged-hf    transformers checkpoint (FlexOlmo)
    flexkern import-hf path/to/flexolmo-hf --out runs/imported    and back
    flexkern import-hf path/to/olmo2-hf --public encyclopedia --out runs/anchor    OLMo-2 as the anchor
    flexkern package --model runs/imported --expert math --out runs/experts/math.flexpert   one expert out
    flexkern attribute --model runs/merged --text "def f(x):" --out runs/att     per-token provenance
    flexkern generate --model runs/merged --prompt "The law" [--opt-out legal]

This module is the only entry point: the ``flexkern`` script, ``python -m flexkern``,
``python -m flexkern.cli`` and owner training under torchrun (``torchrun --standalone
--nproc_per_node=2 -m flexkern.cli train-expert ...``; gloo on the CPU, nccl on GPUs).

Each command parses, checks its arguments before any work (paths exist, names and sources are
known, numbers are positive, ``--out`` neither replaces something flexkern did not create nor
overlaps an input), then calls the pipeline modules. Building the parser imports no torch, so
``--help`` is instant. Exit status: 0 done, 1 the command failed, 2 the arguments were refused,
130 interrupted (Ctrl-C). Errors a user can act on print one line ``flexkern: error: ...``;
``--debug`` adds the traceback.

A new command: ``_command(sub, NAME, help=..., description=..., check=..., run=..., interrupted=...)``
then its arguments (every option with a help text); ``check(args)`` raises ValueError (or
FileNotFoundError) for bad arguments before any work, ``run(args)`` does the work and returns the
exit status.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path
from typing import Sequence

from .flexolmo.defaults import (ANCHOR, ANCHOR_PRESET, DEMO, DEMO_VARIANTS, EMBED_METHODS, EXPERT, PRESET_NAMES,
                                PROXY_SELECTIONS)

# Argument types, parser helpers and the checks made before any work (cli's own helpers).
from .cli_args import (  # noqa: F401  (DOMAIN_NAMES is part of the CLI's surface)
    DOMAIN_NAMES, PROG, PIPELINE_MODULES, EXTRA_HINT, SOURCE_HELP, POS_INT, POS_FLOAT, _Parser, _device,
    _command, _add_out, _add_train, _folder, _model_dir, _package_dir, _source, _folders,
    _check_device, _check_out, _names, _model_names, _check_expert_name,
)


# ---- commands ---------------------------------------------------------------------------------------------
def _train_kwargs(a) -> dict:
    return dict(steps=a.steps, lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len, max_bytes=a.max_bytes,
                checkpoint_every=a.checkpoint_every, device=a.device, seed=a.seed, resume=not a.no_resume,
                log=not a.quiet, overwrite=a.overwrite)


def _resume(a) -> str:
    return (f"the last training checkpoint (every --checkpoint-every steps) is kept next to {a.out}; "
            "rerun the same command to resume (--no-resume starts over)")


def _atomic(a) -> str:
    return f"{a.out} was not changed (outputs are written atomically); rerun the same command"


def _demo_check(a) -> None:
    # run_demo itself refuses, before any work, an OUT that is not a demo run folder
    _check_device(a.device)


def _demo_run(a) -> int:
    from .flexolmo.demo import run_demo
    run_demo(a.out, a.preset, install=not a.no_install, force=a.overwrite, anchor_steps=a.anchor_steps,
             expert_steps=a.expert_steps, max_bytes=a.max_bytes, eval_tokens=a.eval_tokens,
             rt_steps=a.rt_steps, embed_method=a.embed_method, device=a.device, public_share=a.public_share,
             rt_proxy_fraction=a.rt_proxy_fraction, rt_proxy_selection=a.rt_proxy_selection,
             short_tokens=a.short_tokens, mixed_per_pair=a.mixed_per_pair,
             bootstrap=a.bootstrap, seeds=a.seeds, variants=tuple(a.variant), topk_sweep=a.topk_sweep,
             attribution=not a.no_attribution)
    return 0


def _anchor_check(a) -> None:
    for s in a.data or ():
        _source("--data", s)
    _check_device(a.device)
    _check_out(a.out, "anchor", a.overwrite, _folders(a.data))


def _anchor_run(a) -> int:
    from .flexolmo.data import PUBLIC_DOMAINS
    from .flexolmo.train import train_anchor
    train_anchor(a.out, preset=a.preset, data=a.data or list(PUBLIC_DOMAINS), embed_method=a.embed_method,
                 **_train_kwargs(a))
    return 0


def _expert_check(a) -> None:
    from .flexolmo.package import check_name, package_path
    _model_dir("--anchor", a.anchor)
    if len(_names(a.anchor)) != 1:
        raise ValueError(f"--anchor {a.anchor} is a merged model; owners train from the dense anchor")
    _source("--source", a.source)
    name = check_name(a.name if a.name is not None else Path(a.source).name)
    _check_device(a.device)
    out = package_path(a.out, name)
    _check_out(out, "package", a.overwrite, [a.anchor, *_folders([a.source])])


def _expert_run(a) -> int:
    from .flexolmo.train import train_expert
    train_expert(a.anchor, a.source, a.out, name=a.name, embed_method=a.embed_method, **_train_kwargs(a))
    return 0


def _merge_check(a) -> None:
    _model_dir("--anchor", a.anchor)
    for p in a.packages:
        _package_dir("--packages", p)
    if a.top_k is not None and a.top_k > len(a.packages) + 1:
        raise ValueError(f"--top-k {a.top_k}: the merged model has only {len(a.packages) + 1} experts")
    _check_out(a.out, "merged", a.overwrite, [a.anchor, *a.packages])


def _merge_run(a) -> int:
    from .flexolmo.merge import merge
    print(f"wrote {merge(a.anchor, a.packages, a.out, top_k=a.top_k, overwrite=a.overwrite)}")
    return 0


def _evaluate_check(a) -> None:
    names = _model_names(a)
    if a.top_k is not None and a.top_k > len(names):
        raise ValueError(f"--top-k {a.top_k}: {a.model} has only {len(names)} experts")
    for s in a.data or ():
        _source("--data", s)
    _check_device(a.device)
    if a.expert_parallel:
        from .distributed.flexolmo import check_world
        check_world(a.expert_parallel, len(names), a.model)


def _print_losses(rows: dict[str, dict[str, float]], domains: list[str]) -> None:
    from .flexolmo.evaluate import average_loss

    width = max(len(r) for r in rows) + 2
    print(f"{'':{width}s}" + "".join(f"{d[:12]:>13s}" for d in domains) + f"{'avg':>9s}")
    for label, losses in rows.items():
        print(f"{label:{width}s}" + "".join(f"{losses[d]:13.3f}" for d in domains)
              + f"{average_loss(losses, domains):9.3f}")


def _evaluate_run(a) -> int:
    import math

    from .flexolmo.commands import evaluate_model_dir
    if a.expert_parallel:  # the same evaluation with the experts spread over the torchrun ranks
        from functools import partial

        from .distributed import flexolmo as ep
        evaluate_model_dir = partial(ep.evaluate_model_dir, expert_parallel_size=a.expert_parallel)
    res = evaluate_model_dir(a.model, data=a.data, opt_out=a.opt_out, top_k=a.top_k, max_bytes=a.max_bytes,
                             eval_tokens=a.eval_tokens, seq_len=a.seq_len, device=a.device)
    if res.get("rank", 0):
        return 0  # rank 0 prints
    print(f"held-out loss (nats/token) of {a.model}, experts {res['names']}")
    _print_losses(res["rows"], res["domains"])
    print("perplexity: " + ", ".join(f"{d} {math.exp(v):.1f}" for d, v in res["rows"]["model"].items()))
    for label, summ in res.get("summary", {}).items():
        print(f"95% intervals, {label}: " + "; ".join(f"{s} {c['avg'][0]:.3f} [{c['avg'][1]:.3f}, {c['avg'][2]:.3f}]"
                                       for s, c in summ.items()) + " (95% bootstrap intervals over documents)")
    return 0


def _attribute_check(a) -> None:
    names = _model_names(a)
    if len(names) == 1:
        raise ValueError(f"--model {a.model} is a dense model: every token comes from the public FFN")
    if a.file is not None and not Path(a.file).is_file():
        raise FileNotFoundError(f"--file {a.file}: no such file")
    for suffix in (".html", ".png"):
        target = Path(a.out + suffix)
        if target.exists() and not target.is_file():
            raise ValueError(f"--out {a.out}: {target} exists and is not a file")
    _check_device(a.device)


def _attribute_run(a) -> int:
    from .flexolmo.attribution import attribute_dir
    text = a.text if a.text is not None else Path(a.file).read_text(encoding="utf-8", errors="replace")
    res = attribute_dir(a.model, text, a.out, opt_out=a.opt_out, top_k=a.top_k, device=a.device,
                        max_tokens=a.max_tokens)
    print(f"{len(res['tokens'])} tokens; mean share: "
          + ", ".join(f"{n} {v:.2f}" for n, v in res["mean_share"].items()))
    print(f"wrote {res['html']} and {res['png']}")
    return 0


def _generate_check(a) -> None:
    names = _model_names(a)
    if a.top_p > 1:
        raise ValueError(f"--top-p {a.top_p}: must be at most 1")
    _check_device(a.device)


def _generate_run(a) -> int:
    from .flexolmo.generate import generate_dir
    text = generate_dir(a.model, a.prompt, opt_out=a.opt_out, top_k=a.top_k, device=a.device,
                        max_new_tokens=a.max_new_tokens, method=a.method, top_p=a.top_p,
                        temperature=a.temperature, seed=a.seed)
    print(a.prompt + text)
    return 0


def _opt_out_check(a) -> None:
    names = _model_names(a)
    _check_expert_name("--name", a.name, names, a.model)
    if a.name == names[0]:
        raise ValueError(f"--name {a.name}: the public expert cannot be opted out")
    _check_out(a.out, "merged", a.overwrite, [a.model])


def _opt_out_run(a) -> int:
    from .flexolmo.merge import opt_out
    print(f"wrote {opt_out(a.model, a.name, a.out, overwrite=a.overwrite)}")
    return 0


def _opt_in_check(a) -> None:
    _model_dir("--model", a.model)
    _package_dir("--package", a.package)
    _check_out(a.out, "merged", a.overwrite, [a.model, a.package])


def _opt_in_run(a) -> int:
    from .flexolmo.merge import opt_in
    print(f"wrote {opt_in(a.model, a.package, a.out, overwrite=a.overwrite)}")
    return 0


def _owners(specs: list[str]) -> dict[str, str]:
    owners = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        if not sep or not name or not source:
            raise ValueError(f"--owner expects NAME=SOURCE, got {spec!r}")
        owners[name] = source
    return owners


def _tune_router_check(a) -> None:
    names = _model_names(a)
    if len(names) == 1:
        raise ValueError(f"--model {a.model} is a dense model; router tuning needs a merged model")
    owners = _owners(a.owner)
    for name, source in owners.items():
        if name not in names[1:]:
            raise ValueError(f"--owner {name}={source}: no owner expert {name!r} in {a.model}; "
                             f"owner experts: {', '.join(names[1:])}")
        _source(f"--owner {name}=", source)
    for s in a.public or ():
        _source("--public", s)
    _check_device(a.device)
    _check_out(a.out, "merged", a.overwrite, [a.model, *_folders([*owners.values(), *(a.public or ())])])
    if a.expert_parallel:
        from .distributed.flexolmo import check_world
        check_world(a.expert_parallel, len(names), a.model)


def _tune_router_run(a) -> int:
    from .flexolmo.commands import tune_router_dir
    if a.expert_parallel:  # the same tuning with the experts spread over the torchrun ranks; rank 0 writes
        from functools import partial

        from .distributed import flexolmo as ep
        tune_router_dir = partial(ep.tune_router_dir, expert_parallel_size=a.expert_parallel)
    out, losses = tune_router_dir(a.model, a.out, owners=_owners(a.owner), public=a.public,
                                  proxy_fraction=a.proxy_fraction, proxy_selection=a.proxy_selection,
                                  public_docs=a.public_docs, steps=a.steps, lr=a.lr,
                                  batch_size=a.batch_size, max_bytes=a.max_bytes, device=a.device,
                                  overwrite=a.overwrite)
    if a.expert_parallel and int(os.environ.get("RANK", "0")):
        return 0  # rank 0 prints
    print(f"router tuning: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    print(f"wrote {out}")
    return 0


HF_HINT = "pip install 'flexkern[hf]'"


def _has_transformers() -> bool:
    import importlib.util
    return importlib.util.find_spec("transformers") is not None


def _export_hf_check(a) -> None:
    names = _model_names(a)
    for name in a.opt_out:
        if name == names[0]:
            raise ValueError(f"--opt-out {name}: the public expert cannot be opted out")
    for s in a.bias_cost or ():
        _source("--bias-cost", s)
    _check_out(a.out, "hf", a.overwrite, [a.model])


def _export_hf_run(a) -> int:
    if not _has_transformers():
        return _fail(a, f"export-hf needs transformers>=5, the 'hf' extra: {HF_HINT}", 1)
    from .flexolmo import hf
    if a.bias_cost:
        cost = hf.router_bias_cost_dir(a.model, a.bias_cost, a.max_bytes, a.eval_tokens)
        print(f"held-out loss (nats/token) of {a.model} with its router biases and without them")
        print(hf.format_bias_cost(cost))
    out = hf.export_hf(a.model, a.out, opt_out=a.opt_out, drop_router_bias=a.drop_router_bias,
                       overwrite=a.overwrite, dtype=a.dtype)
    print(f"wrote {out} (transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}))")
    return 0


def _import_hf_check(a) -> None:
    from .flexolmo.hf_import import check_import_options, read_import_config
    d = _folder("DIR", a.dir, "config.json", "a transformers checkpoint folder")
    kind, cfg = read_import_config(d)  # "merged" (FlexOlmo) or "anchor" (OLMo-2); sizes within bounds
    check_import_options(kind, cfg, names=a.names, public=a.public, public_row_from=a.public_row_from,
                         embed_method=a.embed_method)
    for s in a.public or ():
        _source("--public", s)
    if a.public_row_from is not None:
        _model_dir("--public-row-from", a.public_row_from)
    _check_device(a.device)
    _check_out(a.out, kind, a.overwrite, [a.dir, *_folders(a.public), *filter(None, [a.public_row_from])])


def _import_hf_run(a) -> int:
    from .flexolmo.hf import import_hf
    out = import_hf(a.dir, a.out, names=a.names, overwrite=a.overwrite, public=a.public,
                    public_row_from=a.public_row_from, embed_method=a.embed_method, embed_docs=a.embed_docs,
                    max_bytes=a.max_bytes, device=a.device)
    print(f"wrote {out}")
    return 0


def _package_check(a) -> None:
    from .flexolmo.package import check_name, package_path
    names = _model_names(a)
    if len(names) == 1:
        raise ValueError(f"--model {a.model} is a dense model (an anchor); it holds no owner expert to package")
    if a.expert == names[0]:
        raise ValueError(f"--expert {a.expert}: the public expert is the anchor's FFN, not a package "
                         "(merge takes it from --anchor)")
    if a.expert not in names:
        raise ValueError(f"--expert {a.expert!r}: no such expert in {a.model}; experts: {', '.join(names)}")
    name = check_name(a.name if a.name is not None else a.expert)
    _check_out(package_path(a.out, name), "package", a.overwrite, [a.model])


def _package_run(a) -> int:
    from .flexolmo.merge import extract_package
    print(f"wrote {extract_package(a.model, a.expert, a.out, name=a.name, overwrite=a.overwrite)}")
    return 0


# ---- the parser -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``flexkern`` parser (imports nothing heavy: the commands import the pipeline when they run)."""
    parser = _Parser(
        prog=PROG,
        description="FlexOlmo with flexkern: train a public model, let data owners train experts "
                    "independently, merge them into one MoE, opt experts out or in, and evaluate.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `flexkern COMMAND --help` for the options of one command. Exit status: 0 done, "
               "1 failed, 2 arguments refused, 130 interrupted.",
    )
    from . import __version__
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    p = _command(sub, "demo", help="end to end on the example corpora; writes OUT/report.md and PNG charts",
                 description="Install the example corpora if missing, train the public model, four owners' "
                             "experts (code, legal, scripture, math), merge, tune the router, evaluate against "
                             "the public model, each owner, model soup and BTM, and write the report. Steps "
                             "whose outputs exist are skipped, so a rerun finishes an interrupted run.",
                 check=_demo_check, run=_demo_run,
                 interrupted=lambda a: f"the finished steps in {a.out} are kept; rerun the same command to continue")
    p.add_argument("--out", default="runs/demo", help="run folder")
    p.add_argument("--overwrite", "--force", dest="overwrite", action="store_true",
                   help="start over: delete what an earlier demo run wrote in OUT (a flexkern demo run "
                        "folder); never anything else")
    p.add_argument("--preset", default=DEMO.preset, choices=PRESET_NAMES, help="model preset")
    p.add_argument("--anchor-steps", type=POS_INT, default=DEMO.anchor_steps,
                   help="optimizer steps of the public model")
    p.add_argument("--expert-steps", type=POS_INT, default=DEMO.expert_steps,
                   help="optimizer steps of each owner's expert")
    p.add_argument("--max-bytes", type=POS_INT, default=DEMO.max_bytes, help="bytes of text per domain")
    p.add_argument("--eval-tokens", type=POS_INT, default=DEMO.eval_tokens, help="held-out tokens per domain")
    p.add_argument("--rt-steps", type=POS_INT, default=DEMO.rt_steps, help="router tuning steps")
    p.add_argument("--embed-method", default=DEMO.embed_method, choices=EMBED_METHODS,
                   help="router rows from all-MiniLM-L6-v2 embeddings (minilm) or the anchor's own "
                        "hidden states (anchor)")
    p.add_argument("--device", type=_device, default=DEMO.device, help="cpu, cuda or cuda:N")
    p.add_argument("--no-install", action="store_true", help="do not pip-install missing corpora")
    p.add_argument("--public-share", type=float, default=DEMO.public_share,
                   help="share of every owner domain's training documents that goes into the public mix")
    p.add_argument("--rt-proxy-fraction", type=POS_FLOAT, default=DEMO.rt_proxy_fraction,
                   help="a proxy set holds at most this share of its owner's bytes")
    p.add_argument("--rt-proxy-selection", default=DEMO.rt_proxy_selection, choices=PROXY_SELECTIONS,
                   help="ranked: the public documents the owner's classifier scores highest (the paper's); "
                        "thresholded: only those it classifies as the owner's")
    p.add_argument("--short-tokens", type=POS_INT, default=DEMO.short_tokens,
                   help="short-context evaluation: predicted tokens at the start of each held-out document")
    p.add_argument("--mixed-per-pair", type=POS_INT, default=DEMO.mixed_per_pair,
                   help="mixed-domain evaluation: windows per pair of domains")
    p.add_argument("--bootstrap", type=POS_INT, default=DEMO.bootstrap, help="bootstrap replicates per interval")
    p.add_argument("--seeds", type=POS_INT, default=DEMO.seeds,
                   help="owner-training seeds for the headline comparisons (each extra seed trains 4 more experts)")
    p.add_argument("--variant", action="append", default=[], choices=DEMO_VARIANTS,
                   help="also train and report a variant (repeatable; default: none): extension = public-router "
                        "loss during owner training (extension-balanced: two-sided); no-bias, random-init, bias-dropped, no-coordination, "
                        "anchor-init = ablations; rt-ceiling, routing = diagnostics; proxy-sweep = router tuning "
                        "over proxy budgets on every seed (see flexkern.flexolmo.variants)")
    p.add_argument("--topk-sweep", action="store_true", help="also evaluate the merged model at every top-k")
    p.add_argument("--no-attribution", action="store_true", help="no per-token provenance figures in the report")

    p = _command(sub, "anchor", help="train the public (anchor) model",
                 description="Train the tokenizer and the dense public model on public data.",
                 check=_anchor_check, run=_anchor_run, interrupted=_resume)
    _add_out(p, "anchor", "anchor directory to write")
    p.add_argument("--preset", default=ANCHOR_PRESET, choices=PRESET_NAMES,
                   help="model preset: micro (tests), tiny (CPU), small (GPU)")
    p.add_argument("--data", nargs="+", default=None,
                   help=f"public data, each {SOURCE_HELP} (default: encyclopedia literature)")
    p.add_argument("--embed-method", default="minilm", choices=EMBED_METHODS,
                   help="embedder of the public router row (minilm: all-MiniLM-L6-v2; anchor: own hidden states)")
    _add_train(p, ANCHOR)

    p = _command(sub, "train-expert", help="one data owner: train its expert -> NAME.flexpert package",
                 description="Train one owner's expert from the anchor on its own data only.",
                 check=_expert_check, run=_expert_run, interrupted=_resume)
    p.add_argument("--anchor", required=True, help="anchor directory")
    p.add_argument("--source", required=True, help=SOURCE_HELP)
    p.add_argument("--out", required=True, help="package path (NAME.flexpert) or a folder to put NAME.flexpert in")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the package if it is a flexkern package folder; never anything else")
    p.add_argument("--name", default=None, help="expert name (default: the source's name)")
    p.add_argument("--embed-method", default=None, choices=EMBED_METHODS,
                   help="embedder of the owner's router row (default: the one the anchor's public row "
                        "was made with; they must agree)")
    _add_train(p, EXPERT)

    p = _command(sub, "merge", help="anchor + expert packages -> one FlexOlmo MoE model",
                 description="Stack the public FFN and every package's FFN and router row; no training.",
                 check=_merge_check, run=_merge_run, interrupted=_atomic)
    p.add_argument("--anchor", required=True, help="anchor directory")
    p.add_argument("--packages", nargs="+", required=True, help="NAME.flexpert folders")
    _add_out(p, "merged model", "merged model directory to write")
    p.add_argument("--top-k", type=POS_INT, default=None, help="active experts per token (default: 2)")

    p = _command(sub, "evaluate", help="held-out loss and perplexity per domain",
                 description="Per-domain held-out loss of a model directory (anchor or merged), with the "
                             "same deterministic split the training used.",
                 check=_evaluate_check, run=_evaluate_run, interrupted=lambda a: "nothing was written")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", nargs="+", default=None, help=f"each {SOURCE_HELP} (default: all six domains)")
    p.add_argument("--opt-out", action="append", default=[], metavar="NAME",
                   help="mask this expert at inference and show the loss without it (repeatable; default: none)")
    p.add_argument("--top-k", type=POS_INT, default=None, help="active experts per token (default: the model's)")
    p.add_argument("--max-bytes", type=POS_INT, default=None,
                   help="bytes per domain; must match the training's for the same held-out split "
                        "(default: the model's recorded settings, else %d)" % DEMO.max_bytes)
    p.add_argument("--eval-tokens", type=POS_INT, default=None,
                   help="held-out tokens per domain (default: the model's recorded settings, else %d)" % DEMO.eval_tokens)
    p.add_argument("--seq-len", type=POS_INT, default=None, help="tokens per window (default: the model's)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--expert-parallel", type=POS_INT, default=None, metavar="N",
                   help="spread each MoE layer's experts over N ranks (run under torchrun --nproc_per_node=N; "
                        "every rank runs the same windows, rank 0 prints; default: one process)")

    p = _command(sub, "opt-out", help="write a copy of a merged model without one expert",
                 description="Write a new model directory without expert NAME (its weights are gone); "
                             "the same outputs as masking it at inference.",
                 check=_opt_out_check, run=_opt_out_run, interrupted=_atomic)
    p.add_argument("--model", required=True, help="merged model directory")
    p.add_argument("--name", required=True, help="expert to remove")
    _add_out(p, "merged model", "model directory to write")

    p = _command(sub, "opt-in", help="write a copy of a merged model with one more expert",
                 description="Write a new model directory with the package's expert appended; no training.",
                 check=_opt_in_check, run=_opt_in_run, interrupted=_atomic)
    p.add_argument("--model", required=True, help="merged (or anchor) model directory")
    p.add_argument("--package", required=True, help="NAME.flexpert folder")
    _add_out(p, "merged model", "model directory to write")

    p = _command(sub, "tune-router", help="train only the router rows on small proxy sets",
                 description="Router tuning: every expert active, only router rows (the public one too) and "
                             "biases train, on each owner's proxy set (the public documents an owner-vs-public "
                             "classifier on sentence embeddings scores highest, fitted on the owner's side) "
                             "plus a public sample, drawn uniformly.",
                 check=_tune_router_check, run=_tune_router_run, interrupted=_atomic)
    p.add_argument("--model", required=True, help="merged model directory")
    _add_out(p, "merged model", "tuned model directory to write")
    p.add_argument("--owner", action="append", default=[], metavar="NAME=SOURCE",
                   help="an owner's data, used on its side to pick its proxy documents (repeatable; default: none)")
    p.add_argument("--public", nargs="+", default=None,
                   help=f"public data, each {SOURCE_HELP} (default: the demo's public mix: encyclopedia, "
                        "literature and a share of every owner domain)")
    p.add_argument("--proxy-fraction", type=POS_FLOAT, default=DEMO.rt_proxy_fraction,
                   help="a proxy set holds at most this share of its owner's bytes (the paper: << 1%%)")
    p.add_argument("--proxy-selection", default=DEMO.rt_proxy_selection, choices=PROXY_SELECTIONS,
                   help="ranked: the public documents the owner's classifier scores highest (the paper's); "
                        "thresholded: only those it classifies as the owner's")
    p.add_argument("--public-docs", type=POS_INT, default=DEMO.rt_public_docs,
                   help="public documents added to every proxy set")
    p.add_argument("--steps", type=POS_INT, default=DEMO.rt_steps, help="optimizer steps")
    p.add_argument("--lr", type=POS_FLOAT, default=DEMO.rt_lr, help="learning rate")
    p.add_argument("--batch-size", type=POS_INT, default=DEMO.batch_size, help="windows per step")
    p.add_argument("--max-bytes", type=POS_INT, default=None,
                   help="bytes per data source (default: the model's recorded settings, else %d)" % DEMO.max_bytes)
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--expert-parallel", type=POS_INT, default=None, metavar="N",
                   help="spread each MoE layer's experts over N ranks (run under torchrun --nproc_per_node=N; "
                        "every rank runs the same batches, rank 0 writes; default: one process)")

    p = _command(sub, "attribute", help="per-token provenance: each owner's share of every token's FFN output",
                 description="For every token of the text, the share of each expert in the token's FFN output "
                             "over all layers (routing weight x expert output norm, normalised to sum to one); "
                             "writes OUT.html (tokens shaded by their largest share) and OUT.png (heatmap).",
                 check=_attribute_check, run=_attribute_run, interrupted=lambda a: "nothing was written")
    p.add_argument("--model", required=True, help="merged model directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the text to attribute (this or --file is required; no default)")
    src.add_argument("--file", help="a UTF-8 text file to attribute (this or --text is required; no default)")
    p.add_argument("--out", required=True, help="output prefix: writes OUT.html and OUT.png")
    p.add_argument("--opt-out", action="append", default=[], metavar="NAME",
                   help="mask this expert first (repeatable; default: none); its share is then 0")
    p.add_argument("--top-k", type=POS_INT, default=None, help="active experts per token (default: the model's)")
    p.add_argument("--max-tokens", type=POS_INT, default=None, help="tokens to attribute (default: the model's seq_len)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")

    p = _command(sub, "generate", help="generate text from a model (greedy or top-p), optionally with experts opted out",
                 description="Continue a prompt with the model, greedy or nucleus (top-p) sampling; "
                             "--opt-out masks experts first, as an owner's opt-out would.",
                 check=_generate_check, run=_generate_run, interrupted=lambda a: "nothing was written")
    p.add_argument("--model", required=True, help="model directory (anchor or merged)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=POS_INT, default=50, help="tokens to generate")
    p.add_argument("--method", default="greedy", choices=("greedy", "top-p"), help="decoding: greedy or nucleus sampling")
    p.add_argument("--top-p", type=POS_FLOAT, default=0.9, help="nucleus mass for --method top-p")
    p.add_argument("--temperature", type=POS_FLOAT, default=1.0, help="softmax temperature for --method top-p")
    p.add_argument("--seed", type=int, default=0, help="sampling seed for --method top-p")
    p.add_argument("--opt-out", action="append", default=[], metavar="NAME",
                   help="mask this expert (repeatable; default: none)")
    p.add_argument("--top-k", type=POS_INT, default=None, help="active experts per token (default: the model's)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")

    p = _command(sub, "export-hf", help="write a model as a transformers checkpoint (FlexOlmo / OLMo-2)",
                 description="Write a merged model as a transformers FlexOlmoForCausalLM checkpoint (an anchor "
                             "as Olmo2ForCausalLM): config, safetensors weights, the tokenizer. "
                             "AutoModelForCausalLM.from_pretrained(OUT) then gives this model's logits. "
                             "transformers' FlexOlmo router has no bias: a model whose owner biases are below "
                             "zero is refused unless --drop-router-bias (--bias-cost shows what that costs). "
                             f"Needs the 'hf' extra: {HF_HINT}.",
                 check=_export_hf_check, run=_export_hf_run, interrupted=_atomic)
    p.add_argument("--model", required=True, help="merged or anchor model directory")
    _add_out(p, "transformers checkpoint", "checkpoint folder to write")
    p.add_argument("--drop-router-bias", action="store_true",
                   help="export even though the owners' router biases are below zero (they are left out)")
    p.add_argument("--opt-out", action="append", default=[], metavar="NAME",
                   help="leave this expert out (the same outputs as masking it; repeatable; default: none)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="of the written weights (default: float32, or the dtype an imported model came in)")
    p.add_argument("--bias-cost", nargs="+", default=None, metavar="SOURCE",
                   help=f"first print the held-out loss with and without the router biases on these, "
                        f"each {SOURCE_HELP} (default: none)")
    p.add_argument("--max-bytes", type=POS_INT, default=DEMO.max_bytes,
                   help="bytes per domain for --bias-cost; must match the training's for the same held-out split")
    p.add_argument("--eval-tokens", type=POS_INT, default=DEMO.eval_tokens,
                   help="held-out tokens per domain for --bias-cost")

    p = _command(sub, "import-hf", help="read a transformers FlexOlmo or OLMo-2 checkpoint into a model directory",
                 description="Read a transformers checkpoint folder (safetensors) into a flexkern model directory. "
                             "FlexOlmoForCausalLM -> a merged model, public expert = expert 0, router biases 0, so "
                             "evaluate, opt-out, opt-in and package work on it. Olmo2ForCausalLM (dense) -> an "
                             "anchor, so owners can train-expert from a real OLMo-2; its public router row is the "
                             "mean embedding of --public documents, or the row of --public-row-from MODEL (e.g. an "
                             "imported owner model, so its packages merge onto this anchor). Grouped-query "
                             "attention is read as is. Refuses what flexkern's model cannot express exactly (other "
                             "architectures, RoPE scaling, attention biases, sizes beyond its bounds) and bad "
                             "checkpoints (missing, misshapen or unexpected tensors, NaN or infinite weights, a "
                             "shard index naming files outside the folder or missing ones), naming file and field.",
                 check=_import_hf_check, run=_import_hf_run, interrupted=_atomic)
    p.add_argument("dir", metavar="DIR", help="transformers checkpoint folder (config.json, safetensors, tokenizer.json)")
    _add_out(p, "merged model (FlexOlmo) or anchor (OLMo-2)", "model directory to write")
    p.add_argument("--names", nargs="+", default=None, metavar="NAME",
                   help="FlexOlmo: expert names, 'public' first (default: the names an export recorded, else "
                        "public expert_1 expert_2 ...)")
    p.add_argument("--public", nargs="+", default=None, metavar="SOURCE",
                   help=f"OLMo-2: public data for the public router row, each {SOURCE_HELP} (its training "
                        "split; default: none, then --public-row-from is needed)")
    p.add_argument("--public-row-from", default=None, metavar="MODEL",
                   help="OLMo-2: take the public router row from this flexkern model directory instead "
                        "(default: none)")
    p.add_argument("--embed-method", default="anchor", choices=EMBED_METHODS,
                   help="OLMo-2 with --public: embed documents with the model's own mean-pooled hidden states, "
                        "or MiniLM (only when d_model is 384); owners' rows then use the same")
    p.add_argument("--embed-docs", type=POS_INT, default=256, help="OLMo-2 with --public: documents embedded")
    p.add_argument("--max-bytes", type=POS_INT, default=None,
                   help="OLMo-2 with --public: bytes per public source (default: all)")
    p.add_argument("--device", type=_device, default="cpu", help="where the public documents are embedded")

    p = _command(sub, "package", help="write one owner expert of a merged model as an expert package",
                 description="Take expert NAME (its FFN in every layer, router row and bias) out of a merged model "
                             "directory, e.g. a released 2-expert owner model read with import-hf, as a NAME.flexpert "
                             "package. It records the model's anchor fingerprint (shared weights), public router "
                             "row, tokenizer and public expert, so merge --anchor refuses it onto an anchor they do "
                             "not match. A router-tuned model (public rows differ per layer) is refused.",
                 check=_package_check, run=_package_run, interrupted=_atomic)
    p.add_argument("--model", required=True, help="merged model directory")
    p.add_argument("--expert", required=True, metavar="NAME", help="the owner expert to take out")
    _add_out(p, "package", "the NAME.flexpert folder, or a folder to put it in")
    p.add_argument("--name", default=None, help="the package's expert name (default: the --expert NAME)")
    return parser


# ---- running a command ---------------------------------------------------------------------------------------
def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors a user can act on (one line, no traceback); anything else is a bug."""
    from .flexolmo.data import CorpusMissingError
    # the package's errors (CheckpointError, PackageError, MergeError, OutputError) are ValueErrors
    return (ValueError, FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError,
            IsADirectoryError, CorpusMissingError)


def _missing_modules() -> list[str]:
    import importlib.util
    missing = []
    for name in PIPELINE_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def _say(message: str) -> None:
    print(f"{PROG}: {' '.join(str(message).strip().splitlines())}", file=sys.stderr, flush=True)


def _fail(a, exc: BaseException | str, status: int) -> int:
    if getattr(a, "debug", False) and isinstance(exc, BaseException):
        traceback.print_exception(exc)
    _say(f"error: {exc}")
    return status


def _extra_error(missing: Sequence[str]) -> str:
    return (f"the FlexOlmo pipeline needs the 'flexolmo' extra (missing: {', '.join(missing)}); "
            f"install it with: {EXTRA_HINT}")


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        missing = _missing_modules()
        if missing:
            return _fail(a, _extra_error(missing), 1)
        try:
            a.check(a)
        except _user_errors() as exc:
            return _fail(a, exc, 2)
        return a.run(a) or 0
    except KeyboardInterrupt as exc:
        if a.debug:
            traceback.print_exception(exc)
        if sys.stderr.isatty():
            print(file=sys.stderr)  # end a progress bar's line
        # training raises a KeyboardInterrupt whose text says which checkpoint it kept (train.py)
        _say(str(exc) or f"interrupted; {a.interrupted(a)}")
        return 130
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] in PIPELINE_MODULES:
            return _fail(a, _extra_error([exc.name.split(".")[0]]), 1)
        raise
    except Exception as exc:
        if isinstance(exc, _user_errors()):
            return _fail(a, exc, 1)
        raise


if __name__ == "__main__":
    sys.exit(main())
