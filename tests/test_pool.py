"""``AdapterPool``: many adapters served from one base, at most K attached, under concurrent mixed batches.

Expected outputs come from independent runs: each adapter alone in its own peftdecl model (itself checked against
HF PEFT's model that saved the adapter), the dense NumPy formula x Wᵀ + b + s·x Aᵀ Bᵀ, or each adapter's own
``generate``. The pool's bounds are watched from outside: the model's ``add_adapter`` / ``delete_adapter`` are
wrapped to record every attach and detach, and the resolver records every folder read.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import peftdecl
from peftdecl import AdapterPool
from peftdecl.errors import PeftdeclError
from tests.conftest import selected_backends

TOL = 1e-6  # float32 (eps 1.2e-7), relative to max(1, the largest |output| of that adapter on X): a row of a mixed
# batch vs the same row through a model holding only its adapter, and peftdecl's single-adapter model vs HF PEFT's
K = 8
N_ADAPTERS = 50


def torch_modules() -> tuple[Any, Any]:
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    if "torch" not in selected_backends():
        pytest.skip("the torch backend is not selected")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return torch, peft


def scaled_err(got: np.ndarray, want: np.ndarray, scale: np.ndarray | None = None) -> float:
    """max |got - want| over max(1, max |scale|) (``scale`` defaults to ``want``)."""
    scale = want if scale is None else scale
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(scale).max())))


def adapter_name(i: int) -> str:
    return f"a{i:02d}"


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """50 PEFT LoRA adapters of the torch MLP (ranks 1-8, several alphas, rsLoRA, three target sets, random
    non-zero A and B) saved under one folder, with each adapter's output on X alone (peftdecl, checked vs PEFT)."""
    torch, peft = torch_modules()
    from tests.torch_mlp import torch_mlp

    root = tmp_path_factory.mktemp("pool")
    x = torch.linspace(-1.0, 1.0, 16 * 12).reshape(16, 12)
    targets = (["lin0"], ["lin1"], ["lin0", "lin1"])
    expected = {}
    with torch.no_grad():
        expected["__base__"] = torch_mlp().eval()(x).numpy()
        for i in range(N_ADAPTERS):
            name = adapter_name(i)
            base = torch_mlp()
            torch.manual_seed(1000 + i)
            config = peft.LoraConfig(
                r=1 + i % 8,
                lora_alpha=(2, 5, 16)[i % 3],
                use_rslora=i % 7 == 0,
                target_modules=targets[i % 3],
                init_lora_weights=False,
            )
            theirs = peft.get_peft_model(base, config).eval()
            theirs.save_pretrained(root / name)
            ours = peftdecl.load_adapter(torch_mlp(), root / name)(x).numpy()
            assert scaled_err(ours, theirs(x).numpy()) <= TOL, name
            assert np.abs(ours - expected["__base__"]).max() > 1e-3, name  # the adapter changes the output
            expected[name] = ours
    return {"root": root, "x": x, "expected": expected}


class Watched:
    """A torch MLP model in a pool, with every folder read, attach and detach recorded."""

    def __init__(self, library: dict[str, Any], max_loaded: int = K, delay: float = 0.0) -> None:
        from tests.torch_mlp import torch_mlp

        self.reads: Counter[str] = Counter()
        self.attaches: Counter[str] = Counter()
        self.detaches: list[str] = []
        self.most_attached = 0
        self.delay = delay
        self.gate: threading.Event | None = None
        self.lock = threading.Lock()
        self.root: Path = library["root"]
        model = peftdecl.AdaptedModel.create(peftdecl.get_backend("torch"), torch_mlp())
        add, delete = model.add_adapter, model.delete_adapter

        def add_adapter(name: str, *args: Any, **kwargs: Any) -> Any:
            with self.lock:
                assert len(model.adapters) < max_loaded, f"attaching {name!r} over {sorted(model.adapters)}"
                self.attaches[name] += 1
            plan = add(name, *args, **kwargs)
            with self.lock:
                self.most_attached = max(self.most_attached, len(model.adapters))
            return plan

        def delete_adapter(name: str) -> None:
            with self.lock:
                self.detaches.append(name)
            delete(name)

        model.add_adapter = add_adapter  # type: ignore[method-assign,assignment]
        model.delete_adapter = delete_adapter  # type: ignore[method-assign]
        self.model = model
        self.pool = AdapterPool(model, max_loaded, self.resolve)

    def resolve(self, name: str) -> Path:
        with self.lock:
            self.reads[name] += 1
        if self.gate is not None:
            assert self.gate.wait(10.0), "the test never opened the gate"
        time.sleep(self.delay)  # a slow disk: lets concurrent first requests overlap
        return self.root / name


def check_rows(library: dict[str, Any], out: Any, rows: list[int], names: list[str]) -> float:
    """The largest difference between each output row and the same row through its adapter alone, scaled by
    max(1, that adapter's largest |output| on X): float32 rounding is relative to the values summed."""
    got, expected = out.detach().numpy(), library["expected"]
    return max(
        scaled_err(got[j], expected[n][r], expected[n])
        for j, (r, n) in enumerate(zip(rows, names, strict=True))
    )


def test_threads_get_each_rows_own_adapter_and_the_pool_stays_bounded(library: dict[str, Any]) -> None:
    torch, _ = torch_modules()
    watched = Watched(library)
    pool, pinned = watched.pool, ["a00", "a01"]
    for name in pinned:
        pool.pin(name)
    errors: list[str] = []
    distinct = [0]

    def client(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(20):
            names = [
                rng.choice([*pinned, "__base__", *(adapter_name(i) for i in range(N_ADAPTERS))])
                for _ in range(5)
            ]
            names += names[:1]  # a repeated adapter in every batch
            rows = [rng.randrange(16) for _ in names]
            try:
                with torch.no_grad():
                    out = pool(library["x"][rows], adapter_names=names)
                err = check_rows(library, out, rows, names)
                if err > TOL:
                    errors.append(f"{names}: {err}")
            except Exception as exc:  # reported below with its batch
                errors.append(f"{names}: {exc!r}")
            with watched.lock:
                distinct[0] += len(set(names) - {"__base__"})

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert watched.most_attached <= K
    assert not set(pinned) & set(watched.detaches)  # pinned adapters were never evicted
    assert watched.reads == watched.attaches  # one read per residency: each read attached once
    assert watched.attaches["a00"] == watched.attaches["a01"] == 1
    detached = Counter(watched.detaches)
    for name, count in watched.attaches.items():  # every residency but the current one ended in a detach
        assert detached[name] == count - (name in pool.loaded), name
    stats = pool.stats
    assert stats.loads == sum(watched.reads.values()) and stats.evictions == len(watched.detaches) > 0
    assert stats.hits + stats.misses == distinct[0] + len(pinned)  # the pins count as (missed) requests
    assert set(pool.loaded) == set(watched.model.adapters) and len(pool.loaded) <= K
    assert watched.model.trainable_parameters() == {} and not watched.model.base_model.training  # type: ignore[attr-defined]


def test_concurrent_first_requests_read_the_adapter_once(library: dict[str, Any]) -> None:
    torch, _ = torch_modules()
    watched = Watched(library, delay=0.2)
    start, outs = threading.Barrier(6), []

    def client(row: int) -> None:
        start.wait()
        with torch.no_grad():
            outs.append(
                check_rows(library, watched.pool(library["x"][[row]], adapter_names=["a07"]), [row], ["a07"])
            )

    threads = [threading.Thread(target=client, args=(row,)) for row in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outs) == 6 and max(outs) <= TOL
    assert watched.reads == Counter({"a07": 1}) and watched.pool.stats.loads == 1
    assert watched.pool.stats.misses == 6 and watched.pool.stats.hits == 0


def test_a_slow_read_does_not_block_forwards_of_loaded_adapters(library: dict[str, Any]) -> None:
    torch, _ = torch_modules()
    release = threading.Event()
    watched = Watched(library)
    pool = watched.pool
    with torch.no_grad():
        pool(library["x"][:1], adapter_names=["a03"])
    watched.gate = release  # the next read hangs until released
    loader = threading.Thread(target=lambda: pool(library["x"][:1], adapter_names=["a04"]))
    loader.start()
    time.sleep(0.05)
    started = time.perf_counter()
    with torch.no_grad():
        out = pool(library["x"][[2]], adapter_names=["a03"])  # runs while a04 is being read
    assert time.perf_counter() - started < 5.0 and not release.is_set()
    assert check_rows(library, out, [2], ["a03"]) <= TOL
    release.set()
    loader.join()
    assert pool.loaded == ["a04", "a03"]  # a03 was used after a04 was asked for


def test_a_failed_load_raises_in_every_waiter_and_the_pool_stays_usable(library: dict[str, Any]) -> None:
    torch, _ = torch_modules()
    broken = library["root"].parent / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text((library["root"] / "a05" / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    watched = Watched(library, max_loaded=2, delay=0.1)
    watched.root = library["root"].parent / "links"
    watched.root.mkdir(exist_ok=True)
    for name in ("a05", "a06"):
        (watched.root / name).symlink_to(library["root"] / name)
    (watched.root / "bad").symlink_to(broken)
    start, failures = threading.Barrier(4), []

    def client() -> None:
        start.wait()
        try:
            watched.pool(library["x"][:2], adapter_names=["bad", "a05"])
        except PeftdeclError as exc:
            failures.append(str(exc))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(failures) == 4 and all("'bad'" in f for f in failures), failures
    assert watched.reads["bad"] == 1 and watched.pool.stats.failed_loads == 1
    assert watched.pool.loaded == ["a05"] and set(watched.model.adapters) == {"a05"}
    with torch.no_grad():
        out = watched.pool(library["x"][:2], adapter_names=["a06", "a05"])
    assert check_rows(library, out, [0, 1], ["a06", "a05"]) <= TOL
    with pytest.raises(PeftdeclError, match="'bad'"):
        watched.pool(library["x"][:1], adapter_names=["bad"])
    assert watched.reads["bad"] == 2  # a failed load is not cached: the next request reads again


def test_pins_hold_their_slots_and_full_pins_are_refused(library: dict[str, Any]) -> None:
    torch, _ = torch_modules()
    watched = Watched(library, max_loaded=2)
    pool = watched.pool
    pool.pin("a10")
    pool.pin("a11")
    assert pool.pinned == {"a10", "a11"} and pool.loaded == ["a10", "a11"]
    with pytest.raises(PeftdeclError, match="2 slots are pinned"):
        pool.pin("a12")
    with pytest.raises(PeftdeclError, match="pinned"):
        pool(library["x"][:1], adapter_names=["a12"])
    with torch.no_grad():
        out = pool(library["x"][:2], adapter_names=["a11", "a10"])  # pinned adapters serve as usual
    assert check_rows(library, out, [0, 1], ["a11", "a10"]) <= TOL
    pool.unpin("a11")
    with torch.no_grad():
        out = pool(library["x"][:2], adapter_names=["a12", "a10"])
    assert check_rows(library, out, [0, 1], ["a12", "a10"]) <= TOL
    assert pool.loaded == ["a12", "a10"] and watched.detaches == ["a11"]
    with pytest.raises(PeftdeclError, match="not pinned"):
        pool.unpin("a11")


def test_bad_names_folders_and_batches_are_refused_clearly(library: dict[str, Any], tmp_path: Path) -> None:
    torch, peft = torch_modules()
    from tests.torch_mlp import torch_mlp

    pool = AdapterPool(torch_mlp(), K, library["root"])
    x = library["x"][:1]
    with pytest.raises(PeftdeclError, match="one path component"):
        pool(x, adapter_names=["../a00"])
    with pytest.raises(PeftdeclError, match=r"'zz'.*not an adapter folder"):
        pool(x, adapter_names=["zz"])
    with pytest.raises(PeftdeclError, match=r"9 distinct adapters; .* max_loaded=8"):
        pool(library["x"][:9], adapter_names=[adapter_name(i) for i in range(9)])
    with pytest.raises(PeftdeclError, match="list of adapter names"):
        pool(x, adapter_names="a00")
    with pytest.raises(PeftdeclError, match="max_loaded must be a positive integer"):
        AdapterPool(torch_mlp(), 0, library["root"])
    with pytest.raises(PeftdeclError, match="resolver returned None"):
        AdapterPool(torch_mlp(), K, lambda name: None)(x, adapter_names=["a00"])  # type: ignore[arg-type,return-value]
    dora = peft.get_peft_model(torch_mlp(), peft.LoraConfig(r=2, target_modules=["lin0"], use_dora=True))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(PeftdeclError, match=r"'dora'.*cannot be served from a pool: its dora layers"):
        AdapterPool(torch_mlp(), K, tmp_path)(x, adapter_names=["dora"])
    assert pool.loaded == [] and pool.model.adapters == {}
    with torch.no_grad():  # still usable after every refusal
        out = pool(library["x"][:2], adapter_names=["a20", "__base__"])
    assert check_rows(library, out, [0, 1], ["a20", "__base__"]) <= TOL


def test_adapters_attached_before_the_pool_serve_outside_its_slots(library: dict[str, Any]) -> None:
    torch, _ = torch_modules()
    from tests.torch_mlp import torch_mlp

    model = peftdecl.load_adapter(torch_mlp(), library["root"] / "a30", name="own")
    pool = AdapterPool(model, 1, library["root"])
    x = library["x"][:2]
    with torch.no_grad():
        for other in ("a31", "a32"):  # K = 1: a32 evicts a31, never the model's own adapter
            out = pool(x, adapter_names=["own", other])
            assert check_rows(library, out, [0, 1], ["a30", other]) <= TOL  # "own" holds a30's weights
    assert pool.loaded == ["a32"] and set(model.adapters) == {"own", "a32"}


def test_generate_gives_each_row_its_own_adapters_greedy_output(tmp_path: Path) -> None:
    torch, peft = torch_modules()
    transformers = pytest.importorskip("transformers")
    from peftdecl.train.tiny_model import build_tiny_llama

    folder = build_tiny_llama(tmp_path / "llama", hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64)

    def llama() -> Any:
        return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()

    for i in range(3):
        torch.manual_seed(i)
        config = peft.LoraConfig(
            r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
        )
        peft.get_peft_model(llama(), config).save_pretrained(tmp_path / "adapters" / f"g{i}")
    ids = torch.tensor([[3, 5, 7, 9]] * 4)
    names = ["g0", "g1", "__base__", "g2"]
    kwargs: dict[str, Any] = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    pool = AdapterPool(llama(), 3, tmp_path / "adapters")
    with torch.no_grad():
        got = pool.generate(ids, adapter_names=names, **kwargs)
        alone = {"__base__": llama().generate(ids[:1], **kwargs)}
        for name in ("g0", "g1", "g2"):
            alone[name] = peftdecl.load_adapter(llama(), tmp_path / "adapters" / name).generate(
                ids[:1], **kwargs
            )
    for row, name in enumerate(names):
        assert got[row].tolist() == alone[name][0].tolist(), name
    assert len({tuple(v[0].tolist()) for v in alone.values()}) >= 3  # the adapters change what is generated
    assert pool.loaded == ["g0", "g1", "g2"] and pool.stats.loads == 3


def numpy_folders(root: Path) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """A 5×8 linear layer, and three LoRA adapters of it (random A and B) saved under ``root``."""
    rng = np.random.default_rng(0)
    state = {"m.weight": rng.normal(size=(5, 8)), "m.bias": rng.normal(size=5)}
    scalings = {}
    for i, (r, alpha) in enumerate([(2, 4), (3, 3), (1, 8)]):
        spec = {
            "peft_type": "LORA",
            "r": r,
            "lora_alpha": alpha,
            "target_modules": ["m"],
            "init_lora_weights": False,
        }
        peftdecl.attach(dict(state), spec, seed=i).save(root / f"n{i}")
        scalings[f"n{i}"] = alpha / r
    return state, scalings


def test_numpy_pool_rows_equal_the_dense_formula(tmp_path: Path) -> None:
    if "numpy" not in selected_backends():
        pytest.skip("the numpy backend is not selected")
    from safetensors.numpy import load_file

    state, scalings = numpy_folders(tmp_path)
    pool = AdapterPool(dict(state), 2, tmp_path)
    x = np.random.default_rng(1).normal(size=(4, 8))
    names = ["n0", "__base__", "n1", "n0"]
    out = pool("m", x, adapter_names=names)
    out2 = pool("m", x[:2], adapter_names=["n2", "n1"])
    for row, name in [*enumerate(names), *((j + 10, n) for j, n in enumerate(["n2", "n1"]))]:
        xi, yi = (x[row], out[row]) if row < 10 else (x[row - 10], out2[row - 10])
        want = state["m.weight"] @ xi + state["m.bias"]
        if name != "__base__":
            t = load_file(str(tmp_path / name / "adapter_model.safetensors"))
            a, b = (t[f"base_model.model.m.lora_{s}.weight"].astype(np.float64) for s in "AB")
            want = want + scalings[name] * b @ (a @ xi)
        assert np.abs(yi - want).max() <= 1e-5, name  # float32 files, float64 reference sums
    assert pool.loaded == ["n2", "n1"] and pool.stats.evictions == 1


def test_mlx_pool_rows_equal_single_adapter_models(tmp_path: Path) -> None:
    if "mlx" not in selected_backends():
        pytest.skip("the mlx backend is not selected")
    from tests.mlx_models import Tiny, mx

    spec: dict[str, Any] = {
        "peft_type": "LORA",
        "target_modules": ["q_proj", "down_proj"],
        "init_lora_weights": False,
    }
    for i, r in enumerate((1, 2, 3)):
        peftdecl.attach(Tiny(), {**spec, "r": r, "lora_alpha": 2 * r + 1}, seed=i).save(tmp_path / f"m{i}")
    ids = mx.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    pool = AdapterPool(Tiny(), 2, tmp_path)
    names = ["m0", "__base__", "m1"]
    mixed = [np.array(pool(ids, adapter_names=names)), np.array(pool(ids[:2], adapter_names=["m2", "m1"]))]
    alone = {f"m{i}": np.array(peftdecl.load_adapter(Tiny(), tmp_path / f"m{i}")(ids)) for i in range(3)}
    alone["__base__"] = np.array(Tiny()(ids))
    for row, name in enumerate(names):
        assert np.abs(mixed[0][row] - alone[name][row]).max() <= 1e-5, name  # float32 logits
    for row, name in enumerate(["m2", "m1"]):
        assert np.abs(mixed[1][row] - alone[name][row]).max() <= 1e-5, name
    assert pool.loaded == ["m2", "m1"]


def test_the_pool_benchmark_runs_and_agrees_with_peft() -> None:
    torch_modules()
    pytest.importorskip("transformers")
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "compare_pool.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]  # it exits non-zero when the pool and PEFT disagree
    assert "| pool |" in done.stdout and "| PEFT load_adapter |" in done.stdout
