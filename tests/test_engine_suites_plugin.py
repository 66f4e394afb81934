"""The engine-suite plugin (tests/engine_suites): a pytest run of someone else's tests with it loaded
swaps flexkern into every torchtitan GroupedExperts built, counts flexkern's calls per test, records
refusals (the module keeps the engine's forward) and spawned workers' events, and gives the same
outputs as without it."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchtitan", reason="torchtitan not installed (pip install 'flexkern[torchtitan]')")

SUITES = Path(__file__).parent / "engine_suites"

ENGINE_TESTS = '''
import torch
from torchtitan.models.common.moe import GroupedExperts

CFG = GroupedExperts.Config(dim=16, hidden_dim=32, num_experts=4)
COUNTS = torch.tensor([3, 0, 5, 2])


def _run(m, name):
    torch.manual_seed(1)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(10, 16)
    out = m(x, COUNTS)
    state = {k: v.detach() for k, v in m.state_dict().items()}
    torch.save({"x": x, "out": out.detach(), "state": state},
               __import__("os").environ["OUT_DIR"] + "/" + name + ".pt")


def test_stock_experts():
    _run(CFG.build(), "GroupedExperts")


class OwnForward(GroupedExperts):
    def forward(self, x, counts):
        return super().forward(x, counts)


def test_overriding_forward_is_refused():
    _run(OwnForward(CFG), "OwnForward")


def _worker(_):
    _run(CFG.build(), "worker")


def test_spawned_worker():
    import multiprocessing as mp
    p = mp.get_context("spawn").Process(target=_worker, args=(0,))
    p.start()
    p.join()
    assert p.exitcode == 0
'''


def _pytest(tmp_path, name, plugin: bool):
    out = tmp_path / name
    out.mkdir()
    env = {**os.environ, "OUT_DIR": str(out), "FLEXKERN_SWAP_ENGINES": "torchtitan",
           "FLEXKERN_SWAP_RESULTS": str(tmp_path / f"{name}.json")}
    if plugin:
        env["PYTHONPATH"] = os.pathsep.join([str(SUITES), env.get("PYTHONPATH", "")])
    else:
        env.pop("FLEXKERN_SWAP_ENGINES")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
           str(tmp_path / "test_engine_like.py")] + (["-p", "flexkern_swap_plugin"] if plugin else [])
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r.stdout


def test_plugin_swaps_counts_and_keeps_outputs(tmp_path):
    import torch

    (tmp_path / "test_engine_like.py").write_text(ENGINE_TESTS)
    plain, _ = _pytest(tmp_path, "plain", plugin=False)
    swapped, log = _pytest(tmp_path, "swapped", plugin=True)
    assert "flexkern swap (torchtitan)" in log
    res = {k.split("::")[-1]: v for k, v in json.loads((tmp_path / "swapped.json").read_text()).items()}

    stock = res["test_stock_experts"]
    assert (stock["swapped"], stock["op_calls"], stock["fk_forwards"], stock["engine_forwards"]) == (1, 1, 1, 0)
    refused = res["test_overriding_forward_is_refused"]
    assert (refused["swapped"], refused["op_calls"], refused["engine_forwards"]) == (0, 0, 1)
    assert any("OwnForward" in r and "forward" in r for r in refused["refused"])
    child = res["test_spawned_worker"]["child"]
    assert child.get("swapped") == 1 and child.get("op_calls") == 1, res["test_spawned_worker"]
    assert all(r["outcome"] == "passed" for r in res.values())

    from flexkern.integrations.torchtitan import use_flexkern
    from torchtitan.models.common.moe import GroupedExperts

    a, b = torch.load(plain / "OwnForward.pt"), torch.load(swapped / "OwnForward.pt")
    assert torch.equal(a["out"], b["out"])  # refused: the engine's own forward both times
    a, b = torch.load(plain / "GroupedExperts.pt"), torch.load(swapped / "GroupedExperts.pt")
    assert torch.equal(a["x"], b["x"]) and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
    truth = use_flexkern(GroupedExperts(GroupedExperts.Config(dim=16, hidden_dim=32, num_experts=4)).double())
    truth.load_state_dict({k: v.double() for k, v in a["state"].items()})
    with torch.no_grad():
        want = truth(a["x"].double(), torch.tensor([3, 0, 5, 2]))
    # torchtitan computes in bf16, flexkern in the weights' float32: no less accurate
    own, err = (a["out"].double() - want).abs().max(), (b["out"].double() - want).abs().max()
    assert err <= own + 1e-6, (err, own)
