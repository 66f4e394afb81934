"""``flexkern`` command line: the FlexOlmo pipeline, end to end or one step at a time.

    flexkern demo                                   everything on the example corpora -> runs/demo/report.md
    flexkern anchor --out runs/anchor               train the public model
    flexkern train-expert --anchor runs/anchor --source code --out runs/experts
    flexkern merge --anchor runs/anchor --packages runs/experts/*.flexpert --out runs/merged
    flexkern evaluate --model runs/merged [--opt-out code]
    flexkern opt-out --model runs/merged --name code --out runs/merged-no-code
    flexkern opt-in --model runs/merged-no-code --package runs/experts/code.flexpert --out runs/merged2
    flexkern tune-router --model runs/merged --owner code=code --out runs/merged-rt

Owner training also runs distributed: ``torchrun --standalone --nproc_per_node=2 -m flexkern.cli
train-expert ...`` (gloo on the CPU, nccl on GPUs).
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

SOURCE_HELP = ("a domain name (code, legal, literature, scripture, math, encyclopedia) "
               "or a folder of text files")


def _add_common_train(p: argparse.ArgumentParser, steps: int, lr: float) -> None:
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step, over all ranks (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (default: the model's)")
    p.add_argument("--max-bytes", type=int, default=None, help="use at most this many bytes per data source")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    from .flexolmo.demo import DemoConfig

    d = DemoConfig()
    parser = argparse.ArgumentParser(
        prog="flexkern",
        description="FlexOlmo with flexkern: train a public model, let data owners train experts "
                    "independently, merge them into one MoE, opt experts out or in, and evaluate.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `flexkern COMMAND --help` for the options of one command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="end to end on the example corpora; writes OUT/report.md and PNG charts",
                       description="Install the example corpora if missing, train the public model, four "
                                   "owners' experts (code, legal, scripture, math), merge, tune the router, "
                                   "evaluate against the public model, each owner, model soup and BTM, and "
                                   "write the report. Steps whose outputs exist are skipped.")
    p.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    p.add_argument("--preset", default=d.preset, help=f"model preset (default {d.preset})")
    p.add_argument("--anchor-steps", type=int, default=d.anchor_steps)
    p.add_argument("--expert-steps", type=int, default=d.expert_steps)
    p.add_argument("--max-bytes", type=int, default=d.max_bytes, help="bytes per domain")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens, help="held-out tokens per domain")
    p.add_argument("--rt-steps", type=int, default=d.rt_steps, help="router tuning steps")
    p.add_argument("--embed-method", default=d.embed_method, choices=("minilm", "anchor"))
    p.add_argument("--device", default=d.device)
    p.add_argument("--no-install", action="store_true", help="do not pip-install missing corpora")
    p.add_argument("--force", action="store_true", help="delete OUT first and start over")

    p = sub.add_parser("anchor", help="train the public (anchor) model",
                       description="Train the tokenizer and the dense public model on public data.")
    p.add_argument("--out", required=True, help="anchor directory to write")
    p.add_argument("--preset", default="tiny", help="model preset: micro, tiny (CPU), small (GPU)")
    p.add_argument("--data", nargs="+", default=None, help=f"{SOURCE_HELP}; default encyclopedia literature")
    p.add_argument("--embed-method", default="minilm", choices=("minilm", "anchor"),
                   help="embedder for router rows (minilm: all-MiniLM-L6-v2; anchor: own hidden states)")
    _add_common_train(p, steps=300, lr=3e-3)

    p = sub.add_parser("train-expert", help="one data owner: train its expert -> NAME.flexpert package",
                       description="Train one owner's expert from the anchor on its own data only.")
    p.add_argument("--anchor", required=True, help="anchor directory")
    p.add_argument("--source", required=True, help=SOURCE_HELP)
    p.add_argument("--out", required=True, help="package path (NAME.flexpert) or a folder to put it in")
    p.add_argument("--name", default=None, help="expert name (default: the source's name)")
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between resumable checkpoints")
    _add_common_train(p, steps=150, lr=1e-3)

    p = sub.add_parser("merge", help="anchor + expert packages -> one FlexOlmo MoE model",
                       description="Stack the public FFN and every package's FFN and router row; no training.")
    p.add_argument("--anchor", required=True)
    p.add_argument("--packages", nargs="+", required=True, help="NAME.flexpert folders")
    p.add_argument("--out", required=True)
    p.add_argument("--top-k", type=int, default=None, help="active experts per token (default 2)")

    p = sub.add_parser("evaluate", help="held-out loss and perplexity per domain",
                       description="Per-domain held-out loss of a model directory (anchor or merged), "
                                   "with the same deterministic split the training used.")
    p.add_argument("--model", required=True, help="model directory")
    p.add_argument("--data", nargs="+", default=None, help=f"{SOURCE_HELP} (default: all six domains)")
    p.add_argument("--opt-out", action="append", default=[], metavar="NAME",
                   help="mask this expert at inference and show the loss before/after (repeatable)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--max-bytes", type=int, default=d.max_bytes, help="must match the training's")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("opt-out", help="write a copy of a merged model without one expert")
    p.add_argument("--model", required=True)
    p.add_argument("--name", required=True, help="expert to remove")
    p.add_argument("--out", required=True)

    p = sub.add_parser("opt-in", help="write a copy of a merged model with one more expert")
    p.add_argument("--model", required=True)
    p.add_argument("--package", required=True, help="NAME.flexpert folder")
    p.add_argument("--out", required=True)

    p = sub.add_parser("tune-router", help="train only the router rows on small proxy sets",
                       description="Router tuning: every expert active, only router rows and biases train, "
                                   "on the public documents closest to each owner's domain embedding plus "
                                   "a public sample.")
    p.add_argument("--model", required=True, help="merged model directory")
    p.add_argument("--out", required=True, help="tuned model directory to write")
    p.add_argument("--owner", action="append", default=[], metavar="NAME=SOURCE",
                   help="an owner's data, used on its side to pick its proxy documents (repeatable)")
    p.add_argument("--public", nargs="+", default=None, help="public sources (default encyclopedia literature)")
    p.add_argument("--proxy-docs", type=int, default=d.rt_proxy_docs, help="public documents per owner")
    p.add_argument("--public-docs", type=int, default=d.rt_public_docs)
    p.add_argument("--steps", type=int, default=d.rt_steps)
    p.add_argument("--lr", type=float, default=d.rt_lr)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-bytes", type=int, default=d.max_bytes)
    p.add_argument("--device", default="cpu")
    return parser


def _train_kwargs(a) -> dict:
    return dict(steps=a.steps, lr=a.lr, batch_size=a.batch_size, seq_len=a.seq_len, max_bytes=a.max_bytes,
                device=a.device, seed=a.seed, resume=not a.no_resume, log=not a.quiet)


def _print_losses(rows: dict[str, dict[str, float]], domains: list[str]) -> None:
    from .flexolmo.evaluate import average_loss

    width = max(len(r) for r in rows) + 2
    print(f"{'':{width}s}" + "".join(f"{d[:12]:>13s}" for d in domains) + f"{'avg':>9s}")
    for label, losses in rows.items():
        print(f"{label:{width}s}" + "".join(f"{losses[d]:13.3f}" for d in domains)
              + f"{average_loss(losses, domains):9.3f}")


def _evaluate(a) -> int:
    import math

    from .flexolmo.data import DOMAINS
    from .flexolmo.evaluate import domain_losses, heldout_streams
    from .flexolmo.merge import load_model, mask_experts
    from .flexolmo.tokenizer import load_tokenizer

    model, names = load_model(a.model, a.device)
    if a.top_k is not None:
        model.set_top_k(a.top_k)
    tok = load_tokenizer(f"{a.model}/tokenizer.json")
    sources = a.data or list(DOMAINS)
    streams = heldout_streams(tok, sources, a.max_bytes)
    seq_len = a.seq_len or model.config.seq_len
    rows = {"model": domain_losses(model, streams, seq_len, a.eval_tokens)}
    for name in a.opt_out:
        mask_experts(model, [name], names)
        rows[f"without {name}"] = domain_losses(model, streams, seq_len, a.eval_tokens)
        model.set_expert_mask([True] * len(names))
    print(f"held-out loss (nats/token) of {a.model}, experts {names}")
    _print_losses(rows, list(streams))
    print("perplexity: " + ", ".join(f"{d} {math.exp(v):.1f}" for d, v in rows["model"].items()))
    return 0


def _tune_router(a) -> int:
    from pathlib import Path

    from .flexolmo.checkpoint import TOKENIZER_FILE, read_json, read_public_embedding, write_model_dir
    from .flexolmo.data import PUBLIC_DOMAINS, load_documents, split_documents
    from .flexolmo.merge import load_model
    from .flexolmo.router_tuning import proxy_streams, tune_router
    from .flexolmo.tokenizer import load_tokenizer

    model, names = load_model(a.model, a.device)
    tok = load_tokenizer(Path(a.model) / TOKENIZER_FILE)
    public_row, method = read_public_embedding(a.model)
    if method == "anchor":
        raise SystemExit("tune-router: this model's router rows come from anchor hidden states; "
                         "proxy selection needs the MiniLM embedder (embed_method='minilm')")
    public = [d for s in (a.public or PUBLIC_DOMAINS) for d in split_documents(load_documents(s, a.max_bytes))[0]]
    owners = {}
    for spec in a.owner:
        name, sep, source = spec.partition("=")
        if not sep or name not in names:
            raise SystemExit(f"--owner expects NAME=SOURCE with NAME one of {names[1:]}, got {spec!r}")
        owners[name] = split_documents(load_documents(source, a.max_bytes))[0]
    streams = proxy_streams(tok, public, owners, proxy_docs=a.proxy_docs, public_docs=a.public_docs)
    losses = tune_router(model, streams, steps=a.steps, batch_size=a.batch_size, lr=a.lr)
    print(f"router tuning: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    info = read_json(Path(a.model) / "experts.json")
    write_model_dir(a.out, model.cpu(), Path(a.model) / TOKENIZER_FILE, public_row, method, info)
    print(f"wrote {a.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.command == "demo":
        from .flexolmo.demo import run_demo
        run_demo(a.out, a.preset, install=not a.no_install, force=a.force, anchor_steps=a.anchor_steps,
                 expert_steps=a.expert_steps, max_bytes=a.max_bytes, eval_tokens=a.eval_tokens,
                 rt_steps=a.rt_steps, embed_method=a.embed_method, device=a.device)
    elif a.command == "anchor":
        from .flexolmo.data import PUBLIC_DOMAINS
        from .flexolmo.train import train_anchor
        train_anchor(a.out, preset=a.preset, data=a.data or list(PUBLIC_DOMAINS), embed_method=a.embed_method,
                     **_train_kwargs(a))
    elif a.command == "train-expert":
        from .flexolmo.train import train_expert
        train_expert(a.anchor, a.source, a.out, name=a.name, checkpoint_every=a.checkpoint_every,
                     **_train_kwargs(a))
    elif a.command == "merge":
        from .flexolmo.merge import merge
        print(f"wrote {merge(a.anchor, a.packages, a.out, top_k=a.top_k)}")
    elif a.command == "evaluate":
        return _evaluate(a)
    elif a.command == "opt-out":
        from .flexolmo.merge import opt_out
        print(f"wrote {opt_out(a.model, a.name, a.out)}")
    elif a.command == "opt-in":
        from .flexolmo.merge import opt_in
        print(f"wrote {opt_in(a.model, a.package, a.out)}")
    elif a.command == "tune-router":
        return _tune_router(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
