"""Default settings of the pipeline's commands, in one torch-free module.

The ``flexkern`` command builds its parser (and ``--help``) from these without importing torch;
the pipeline functions' own keyword defaults must agree with them (``tests/test_cli.py`` checks
``train_anchor``, ``train_expert`` and ``DemoConfig``).
"""
from __future__ import annotations

from dataclasses import dataclass

PRESET_NAMES = ("micro", "tiny", "small")  # the keys of model.PRESETS
EMBED_METHODS = ("minilm", "anchor")       # all-MiniLM-L6-v2, or the anchor's own hidden states
# how a proxy set is picked from the public documents an owner's classifier ranks (proxy.py):
# "ranked" takes the top-scoring ones (the paper's), "thresholded" only those it puts on the owner's side
PROXY_SELECTIONS = ("ranked", "thresholded")


@dataclass(frozen=True)
class TrainDefaults:
    steps: int
    lr: float
    batch_size: int
    checkpoint_every: int


ANCHOR = TrainDefaults(steps=300, lr=3e-3, batch_size=8, checkpoint_every=50)  # train.train_anchor
EXPERT = TrainDefaults(steps=150, lr=1e-3, batch_size=8, checkpoint_every=25)   # train.train_expert
ANCHOR_PRESET = "tiny"


@dataclass(frozen=True)
class DemoDefaults:
    """The demo's settings (``demo.DemoConfig``) that the command line exposes."""
    preset: str = "tiny"
    max_bytes: int = 300_000        # per domain (train + held-out)
    anchor_steps: int = 300
    expert_steps: int = 50
    eval_tokens: int = 4096         # held-out tokens per domain
    rt_steps: int = 20              # router tuning steps
    rt_proxy_docs: int = 4          # public documents per owner in its proxy set
    rt_public_docs: int = 16        # plus this many public documents
    rt_lr: float = 2e-3
    batch_size: int = 8
    device: str = "cpu"
    embed_method: str = "minilm"
    public_share: float = 0.08      # of every owner domain's training documents, made public
    # a proxy set holds at most this share of its owner's bytes; 5%: the lowest held-out and mixed-domain
    # loss of `flexkern demo --seeds 3 --variant proxy-sweep` (results/demo-tiny-cpu-3seeds/). The
    # paper's << 1% assumes owners with billions of tokens; here 1% is about 5 documents per owner.
    rt_proxy_fraction: float = 0.05
    rt_proxy_selection: str = "ranked"  # one of PROXY_SELECTIONS
    short_tokens: int = 48          # short-context evaluation: first tokens of each held-out document
    mixed_per_pair: int = 4         # mixed-domain windows per pair of domains
    bootstrap: int = 1000           # bootstrap replicates of every interval
    seeds: int = 1                  # owner-training seeds for the headline comparisons


DEMO = DemoDefaults()
DEMO_VARIANTS = ("extension", "extension-balanced", "no-bias", "random-init", "bias-dropped", "no-coordination",
                 "anchor-init", "rt-ceiling", "routing", "proxy-sweep")  # = demo.VARIANTS
