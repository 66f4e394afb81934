"""Argument types, parser helpers and the argument checks of the ``flexkern`` command line.

Everything here runs before any work: building the parser imports no torch (``--help`` stays
instant), and the checks read only paths and small JSON files, so a bad argument is refused at once.
"""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Callable

PROG = "flexkern"
# The [flexolmo] extra: the pipeline's third-party modules (import names).
PIPELINE_MODULES = ("safetensors", "tokenizers", "tqdm", "matplotlib")
EXTRA_HINT = "pip install 'flexkern[flexolmo]'"
DOMAIN_NAMES = ("code", "legal", "literature", "scripture", "math", "encyclopedia")  # = data.DOMAINS
SOURCE_HELP = f"a domain ({', '.join(DOMAIN_NAMES)}) or a folder of text files"
OVERWRITE_HELP = "replace OUT if it is a flexkern {kind} folder; never anything else"
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


# ---- help text and argument types ----------------------------------------------------------------------
class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; "(default: X)" after every option whose default is a value
    (options defaulting to None or flags say what they do without a default)."""

    def _get_help_string(self, action):
        if (action.default is None or action.default is False or action.default == []
                or action.default is argparse.SUPPRESS or "default" in (action.help or "")):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2
        self.exit(2, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def _positive(kind: type) -> Callable[[str], int | float]:
    name = "integer" if kind is int else "number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {name}, got {text!r}") from None
        if not value > 0 or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a positive {name}, got {text!r}")
        return value
    parse.__name__ = f"positive {name}"
    return parse


POS_INT, POS_FLOAT = _positive(int), _positive(float)


def _device(text: str) -> str:
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return text


def _command(sub, name: str, *, help: str, description: str, check: Callable, run: Callable,
             interrupted: Callable[[argparse.Namespace], str]) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description, formatter_class=_Formatter)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error")
    p.set_defaults(check=check, run=run, interrupted=interrupted)
    return p


def _add_out(p, kind: str, help: str) -> None:
    p.add_argument("--out", required=True, help=help)
    p.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP.format(kind=kind))


def _add_train(p, d) -> None:
    p.add_argument("--steps", type=POS_INT, default=d.steps, help="optimizer steps")
    p.add_argument("--lr", type=POS_FLOAT, default=d.lr, help="peak learning rate")
    p.add_argument("--batch-size", type=POS_INT, default=d.batch_size, help="windows per step, over all ranks")
    p.add_argument("--seq-len", type=POS_INT, default=None, help="tokens per window (default: the model's)")
    p.add_argument("--max-bytes", type=POS_INT, default=None,
                   help="use at most this many bytes per data source (default: all)")
    p.add_argument("--checkpoint-every", type=POS_INT, default=d.checkpoint_every,
                   help="steps between resumable checkpoints")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the data order")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


# ---- argument checks (before any work) -------------------------------------------------------------------
def _folder(flag: str, path, must_hold: str, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist")
    if not path.is_dir() or not (path / must_hold).is_file():
        raise ValueError(f"{flag} {path} is not {what} (no {must_hold})")
    return path


def _model_dir(flag: str, path) -> Path:
    from .flexolmo.checkpoint import CONFIG_FILE
    return _folder(flag, path, CONFIG_FILE, "a model directory")


def _package_dir(flag: str, path) -> Path:
    return _folder(flag, path, "manifest.json", "an expert package (a NAME.flexpert folder)")


def _source(flag: str, source: str) -> str:
    from .flexolmo.data import DOMAINS
    if source not in DOMAINS and not os.path.isdir(source):
        raise ValueError(f"{flag} {source!r} is neither a domain ({', '.join(DOMAINS)}) nor an existing folder")
    return source


def _folders(sources) -> list[str]:
    from .flexolmo.data import DOMAINS
    return [s for s in sources or () if s not in DOMAINS]


def _check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is available here")


def _check_out(path, kind: str, overwrite: bool, inputs=()) -> None:
    from .flexolmo.checkpoint import check_output
    check_output(path, kind, overwrite=overwrite, inputs=[Path(p) for p in inputs])


def _names(a_model) -> list[str]:
    from .flexolmo.commands import expert_names
    return expert_names(a_model)


def _model_names(a) -> list[str]:
    """Check that --model is a model directory and that every --opt-out NAME (where the command
    has one) is one of its experts; returns the expert names (read from JSON, no weights)."""
    _model_dir("--model", a.model)
    names = _names(a.model)
    for name in getattr(a, "opt_out", ()):
        _check_expert_name("--opt-out", name, names, a.model)
    return names


def _check_expert_name(flag: str, name: str, names: list[str], model) -> None:
    if len(names) == 1:
        raise ValueError(f"{model} is a dense model; it has no experts to opt out")
    if name not in names:
        raise ValueError(f"{flag} {name!r}: no such expert in {model}; experts: {', '.join(names)}")
