"""Swap flexkern into every OLMo-core DroplessMoEMLP / MoEMLP and torchtitan GroupedExperts
built while it is active, and count what ran.

apply(engines) patches, once per process:
  * the constructors: after the *outermost* __init__ of an instance of GroupedExperts /
    DroplessMoEMLP / MoEMLP (or any subclass, present or future) has returned,
    ``use_flexkern(self)`` is called. An UnsupportedModuleError (flexkern's documented refusal)
    is recorded, not raised; any other exception propagates into the test.
  * ``flexkern.integrations.engines.experts_swiglu_grouped`` (the name the integrations call):
    a counting spy ("op_calls").
  * a global module forward-pre hook counting forward calls of expert modules, split into those
    running flexkern's forward ("fk_forwards") and those running the engine's own
    ("engine_forwards", e.g. refused subclasses).
Counters live in STATS and, if FLEXKERN_SWAP_LOG is set, are appended as JSON lines (with the
PYTEST_CURRENT_TEST of the process) to that file: spawned worker processes (torch's
MultiProcessTestCase) import this module through swap_site/sitecustomize.py and report there.
"""
from __future__ import annotations

import functools
import json
import os
import threading

STATS = {"swapped": 0, "refused": [], "op_calls": 0, "fk_forwards": 0, "engine_forwards": 0}
_APPLIED: set[str] = set()
_LOCK = threading.Lock()
_DEPTH: dict[int, int] = {}
_EXPERT_BASES: list[type] = []


def _log(event: str, **kw):
    path = os.environ.get("FLEXKERN_SWAP_LOG")
    if not path:
        return
    rec = {"event": event, "pid": os.getpid(), "test": os.environ.get("PYTEST_CURRENT_TEST", ""), **kw}
    with _LOCK, open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def reset():
    STATS.update(swapped=0, refused=[], op_calls=0, fk_forwards=0, engine_forwards=0)


def _wrap_init(cls, swap):
    init = cls.__dict__.get("__init__")
    if init is None or getattr(init, "_flexkern_swap", False):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        key = id(self)
        _DEPTH[key] = _DEPTH.get(key, 0) + 1
        try:
            init(self, *args, **kwargs)
        finally:
            _DEPTH[key] -= 1
            outermost = _DEPTH[key] == 0
            if outermost:
                del _DEPTH[key]
        if outermost:
            swap(self)

    __init__._flexkern_swap = True
    cls.__init__ = __init__


def _hook_subclasses(base, swap):
    """Wrap base's and every subclass's own __init__, including subclasses created later."""
    todo = [base]
    while todo:
        c = todo.pop()
        _wrap_init(c, swap)
        todo.extend(c.__subclasses__())
    own = base.__dict__.get("__init_subclass__")

    def __init_subclass__(cls, **kw):
        if own is not None:
            own.__func__(cls, **kw)
        else:
            super(base, cls).__init_subclass__(**kw)
        _wrap_init(cls, swap)

    base.__init_subclass__ = classmethod(__init_subclass__)


def _make_swap(use_flexkern, UnsupportedModuleError):
    def swap(module):
        try:
            use_flexkern(module)
        except UnsupportedModuleError as exc:
            STATS["refused"].append(str(exc))
            _log("refused", cls=type(module).__name__, reason=str(exc))
            return
        STATS["swapped"] += 1
        _log("swapped", cls=type(module).__name__)
    return swap


def _forward_pre_hook(module, args):
    if _EXPERT_BASES and isinstance(module, tuple(_EXPERT_BASES)):
        from flexkern.integrations.engines import installed
        k = "fk_forwards" if installed(module) else "engine_forwards"
        STATS[k] += 1
        _log(k, cls=type(module).__name__)


def apply(engines=("olmo_core", "torchtitan")):
    import torch
    import flexkern.integrations.engines as eng

    if "spy" not in _APPLIED:
        _APPLIED.add("spy")
        orig = eng.experts_swiglu_grouped

        @functools.wraps(orig)
        def spy(*args, **kwargs):
            STATS["op_calls"] += 1
            _log("op_call", dtype=str(args[0].dtype), rows=int(args[0].shape[0]))
            return orig(*args, **kwargs)

        eng.experts_swiglu_grouped = spy
        torch.nn.modules.module.register_module_forward_pre_hook(_forward_pre_hook)

    if "olmo_core" in engines and "olmo_core" not in _APPLIED:
        _APPLIED.add("olmo_core")
        from olmo_core.nn.moe.mlp import DroplessMoEMLP, MoEMLP
        from flexkern.integrations.olmo_core import UnsupportedModuleError, use_flexkern
        swap = _make_swap(use_flexkern, UnsupportedModuleError)
        for base in (DroplessMoEMLP, MoEMLP):
            _hook_subclasses(base, swap)
            _EXPERT_BASES.append(base)

    if "torchtitan" in engines and "torchtitan" not in _APPLIED:
        _APPLIED.add("torchtitan")
        from torchtitan.models.common.moe import GroupedExperts
        from flexkern.integrations.torchtitan import UnsupportedModuleError, use_flexkern
        swap = _make_swap(use_flexkern, UnsupportedModuleError)
        _hook_subclasses(GroupedExperts, swap)
        _EXPERT_BASES.append(GroupedExperts)
