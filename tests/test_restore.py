"""``rankwise restore`` on two tiny LlamaForCausalLM checkpoints saved with
save_pretrained in several shards: the streamed result equals an in-memory
reference of the parameter-level restoration, through the CLI too."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import rankwise  # noqa: F401
from rankwise import cli
from rankwise import masking as M
from rankwise.errors import ConfigError
from rankwise.restore import check_pattern, find_checkpoint, parse_size, restore_checkpoint

import transformers  # noqa: E402  (a hard dependency of rankwise)


def _tiny_config(**kw):
    cfg = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=61, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(kw)
    return transformers.LlamaConfig(**cfg)


def _save_pair(root, dtype=torch.float32, shard="12KB", unchanged=0.25, seed=0):
    """Base and tuned checkpoints; tuned leaves `unchanged` of the elements as they were (ties at 0)."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(_tiny_config()).to(dtype)
    base_dir, tuned_dir = os.path.join(root, "base"), os.path.join(root, "tuned")
    model.save_pretrained(base_dir, max_shard_size=shard)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            delta = torch.randn(p.shape, generator=g) * 0.02
            delta[torch.rand(p.shape, generator=g) < unchanged] = 0
            p.copy_((p.float() + delta).to(dtype))
    model.save_pretrained(tuned_dir, max_shard_size=shard)
    with open(os.path.join(tuned_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 64}, f)
    return base_dir, tuned_dir


def _load_dir(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def reference(base, tuned, fraction, select="top", seed=0):
    """The reference method in memory: one flat tensor of relative changes over
    'layers' minus 'norm' (sorted names), a stable sort, the first floor(n * k) reset."""
    names = sorted(n for n in tuned if "layers" in n and "norm" not in n)
    if select == "random":
        flat = torch.cat([M.random_score(tuned[n].numel(), seed, M.name_stream(n)) for n in names])
    else:
        flat = torch.cat([
            ((tuned[n].float() - base[n].float()).abs() / (base[n].float().abs() + 1e-8)).reshape(-1).double()
            for n in names
        ])
    k = M.select_count(flat.numel(), fraction)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[torch.sort(flat, descending=select != "bottom", stable=True).indices[:k]] = True
    out, off = dict(tuned), 0
    for n in names:
        c = chosen[off:off + tuned[n].numel()].view(tuned[n].shape)
        out[n] = torch.where(c, base[n], tuned[n])
        off += tuned[n].numel()
    return out, k


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return _save_pair(str(root))


def _assert_same(a, b):
    assert set(a) == set(b), set(a) ^ set(b)
    for n in a:
        assert a[n].dtype == b[n].dtype, n
        if not torch.equal(a[n], b[n]):
            diff = int((a[n] != b[n]).sum())
            raise AssertionError(f"{n}: {diff} elements differ")


def test_cli_restore_matches_reference_and_loads(pair, tmp_path, capsys):
    base_dir, tuned_dir = pair
    assert len([f for f in os.listdir(tuned_dir) if f.endswith(".safetensors")]) >= 3  # really sharded
    out_dir = str(tmp_path / "restored")
    rc = cli.main(["restore", "--base", base_dir, "--tuned", tuned_dir, "--out", out_dir, "--fraction", "0.2",
                   "--max-shard-size", "20KB"])
    assert rc == 0
    assert "restored" in capsys.readouterr().out
    base, tuned = _load_dir(base_dir), _load_dir(tuned_dir)
    ref, k = reference(base, tuned, 0.2)
    _assert_same(_load_dir(out_dir), ref)
    in_memory, stats_mem = M.restore(base, tuned, 0.2)
    _assert_same(in_memory, ref)
    # A loadable checkpoint: config, index, tokenizer files, stats.
    files = set(os.listdir(out_dir))
    assert {"config.json", "model.safetensors.index.json", "tokenizer_config.json", "restore_stats.json"} <= files
    model = transformers.LlamaForCausalLM.from_pretrained(out_dir)
    sd = model.state_dict()
    for n, t in ref.items():
        assert torch.equal(sd[n], t), n
    stats = json.load(open(os.path.join(out_dir, "restore_stats.json")))
    assert stats["k"] == k == stats["restored"] and stats["shards"] >= 2
    assert abs(stats["score_share"] - stats_mem["score_share"]) < 1e-9
    assert 0.2 < stats["score_share"] < 1.0
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".restored")]  # no temp dirs left


@pytest.mark.parametrize("select,scope,fraction", [
    ("bottom", "global", 0.3),  # bottom: the tied unchanged elements (score 0) come first
    ("random", "global", 0.1),
    ("top", "per_tensor", 0.4),
    ("top", "global", 0.0),
    ("top", "global", 1.0),
])
def test_streaming_equals_in_memory(pair, tmp_path, select, scope, fraction):
    base_dir, tuned_dir = pair
    out_dir = str(tmp_path / "out")
    stats = restore_checkpoint(base_dir, tuned_dir, out_dir, fraction, select=select, scope=scope, seed=3,
                               max_shard_size="16KB", progress=False)
    base, tuned = _load_dir(base_dir), _load_dir(tuned_dir)
    expected, mem_stats = M.restore(base, tuned, fraction, select=select, scope=scope, seed=3)
    _assert_same(_load_dir(out_dir), expected)
    assert stats["restored"] == mem_stats["restored"]
    if scope == "global":
        ref, k = reference(base, tuned, fraction, select=select, seed=3)
        _assert_same(expected, ref)
        assert stats["restored"] == k
    if fraction == 0.0:
        _assert_same(expected, tuned)
    if fraction == 1.0:
        for n in tuned:
            want = base[n] if ("layers" in n and "norm" not in n) else tuned[n]
            assert torch.equal(expected[n], want), n


def test_bf16_checkpoint_single_file(tmp_path):
    base_dir, tuned_dir = _save_pair(str(tmp_path), dtype=torch.bfloat16, shard="10GB", seed=4)
    assert os.path.isfile(os.path.join(tuned_dir, "model.safetensors"))
    out_dir = str(tmp_path / "out")
    rc = cli.main(["restore", "--base", base_dir, "--tuned", tuned_dir, "--out", out_dir, "--fraction", "0.05",
                   "--exclude", "norm|mlp"])
    assert rc == 0
    assert set(os.listdir(out_dir)) >= {"model.safetensors", "config.json", "restore_stats.json"}
    base, tuned = _load_dir(base_dir), _load_dir(tuned_dir)
    expected, _ = M.restore(base, tuned, 0.05, exclude="norm|mlp")
    _assert_same(_load_dir(out_dir), expected)
    assert not any("mlp" in n for n in json.load(open(os.path.join(out_dir, "restore_stats.json")))["tensors"])


def test_cli_bad_input(pair, tmp_path, capsys):
    base_dir, tuned_dir = pair
    out = str(tmp_path / "o")

    def run(*extra, base=base_dir, tuned=tuned_dir):
        rc = cli.main(["restore", "--base", base, "--tuned", tuned, "--out", out, *extra])
        return rc, capsys.readouterr().err

    rc, err = run("--fraction", "1.5")
    assert rc == 2 and "fraction must be in [0, 1]" in err
    rc, err = run("--fraction", "0.1", base=str(tmp_path / "missing"))
    assert rc == 2 and "not found" in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = run("--fraction", "0.1", tuned=str(empty))
    assert rc == 2 and "model.safetensors" in err

    # Mismatched names and shapes, listed in the error.
    bad = tmp_path / "bad"
    bad.mkdir()
    tuned = _load_dir(tuned_dir)
    del tuned["model.layers.0.mlp.up_proj.weight"]
    tuned["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(3, 3)
    tuned["model.layers.0.int_buffer"] = torch.zeros(4, dtype=torch.int64)
    save_file(tuned, str(bad / "model.safetensors"))
    rc, err = run("--fraction", "0.1", tuned=str(bad))
    assert rc == 2
    assert "model.layers.0.mlp.up_proj.weight" in err and "model.layers.1.self_attn.k_proj.weight" in err
    assert "model.layers.0.int_buffer" in err

    # Non-float tensors in scope.
    b2, t2 = tmp_path / "b2", tmp_path / "t2"
    b2.mkdir()
    t2.mkdir()
    save_file({"model.layers.0.w": torch.zeros(4, dtype=torch.int32)}, str(b2 / "model.safetensors"))
    save_file({"model.layers.0.w": torch.ones(4, dtype=torch.int32)}, str(t2 / "model.safetensors"))
    rc, err = run("--fraction", "0.1", base=str(b2), tuned=str(t2))
    assert rc == 2 and "model.layers.0.w" in err and "floating-point" in err

    # An existing output is not overwritten without --force; with it, replaced atomically.
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, "keep.txt"), "w").close()
    rc, err = run("--fraction", "0.1")
    assert rc == 2 and "--force" in err
    rc, _ = run("--fraction", "0.1", "--force")
    assert rc == 0 and "keep.txt" not in os.listdir(out)
    rc, _ = run("--fraction", "0.2")  # now rankwise's own restore output: replaced without --force
    assert rc == 0 and json.load(open(os.path.join(out, ".rankwise-run.json")))["kind"] == "restore"
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == [], "temporary or old directories left"
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("mine")
    rc = cli.main(["restore", "--base", base_dir, "--tuned", tuned_dir, "--out", str(a_file), "--fraction", "0.1",
                   "--force"])
    assert rc == 2 and "is a file" in capsys.readouterr().err and a_file.read_text() == "mine"
    rc = cli.main(["restore", "--base", base_dir, "--tuned", tuned_dir, "--out", tuned_dir, "--fraction", "0.1", "--force"])
    assert rc == 2 and f"--out {tuned_dir} is the tuned" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max-shard-size"):
        parse_size("lots")
    assert parse_size("2GB") == 2 * 10**9 and parse_size("64KiB") == 65536
    with pytest.raises(ConfigError, match="--max-shard-size is too large"):
        parse_size("9" * 400 + "GB")


def test_arguments_are_checked_before_any_work(pair, tmp_path, monkeypatch):
    """A bad pattern or shard size is refused before --out is checked or a checkpoint opened."""
    import rankwise.restore as R

    base_dir, tuned_dir = pair
    monkeypatch.setattr(R, "SafetensorsCheckpoint", lambda *a: pytest.fail("a checkpoint was opened"))
    for kw, match in [({"include": "("}, r"^--include '\(' is not a valid regular expression \(missing \), "),
                      ({"exclude": "a{2,1}"}, r"^--exclude 'a\{2,1\}' is not a valid regular expression"),
                      ({"max_shard_size": "0"}, "^--max-shard-size must be positive")]:
        with pytest.raises(ConfigError, match=match):
            restore_checkpoint(base_dir, tuned_dir, str(tmp_path / "o"), 0.1, progress=False, **kw)
    assert not (tmp_path / "o").exists()
    assert check_pattern("--include", "") is None and check_pattern("--include", "layers").pattern == "layers"


def test_find_checkpoint_of_a_run_directory(pair, tmp_path):
    _, tuned_dir = pair
    assert find_checkpoint(tuned_dir) == tuned_dir
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(tuned_dir, run / "model")
    assert find_checkpoint(str(run)) == str(run / "model")
    lora = tmp_path / "lora"
    (lora / "adapter").mkdir(parents=True)
    (lora / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"is a LoRA run \(adapter/, no model/\): merge it first"):
        find_checkpoint(str(lora))
    assert find_checkpoint(str(tmp_path / "nothing")) == str(tmp_path / "nothing")  # left to the reader to name


# --------------------------------------------------------------------------- the public planner


def _masking_private_uses(path):
    """``(line, name)`` of every private name of rankwise.masking (or its modules) that ``path`` uses."""
    import ast

    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    aliases, found = set(), []

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod in ("rankwise", "") or mod.endswith(".rankwise"):  # from rankwise import masking as M
                aliases |= {a.asname or a.name for a in node.names if a.name == "masking"}
            if "masking" in mod.split("."):
                found += [(node.lineno, a.name) for a in node.names if a.name.startswith("_")]
                aliases |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.asname and "masking" in a.name.split(".")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if isinstance(node.value, ast.Name) and node.value.id in aliases:
                found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return found


def test_only_public_names_of_masking_are_used_outside_it():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    restore_py = os.path.join(root, "src", "rankwise", "restore.py")
    assert "plan_restore" in open(restore_py, encoding="utf-8").read()
    paths = [restore_py]
    for top in ("src", "tests", "benchmarks", "kernels"):
        for dirpath, _, files in os.walk(os.path.join(root, top)):
            if os.sep + "masking" in dirpath:
                continue
            paths += [os.path.join(dirpath, f) for f in files if f.endswith(".py")]
    bad = {os.path.relpath(p, root): _masking_private_uses(p) for p in paths}
    assert not {p: uses for p, uses in bad.items() if uses}


def test_private_use_scan_catches_what_it_should(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("from . import masking as M\nfrom .masking.selection import _walk\nM._Plan(1)\nM.plan_restore()\n")
    assert _masking_private_uses(str(src)) == [(2, "_walk"), (3, "M._Plan")]


def test_plan_enforces_sorted_order_and_matches_restore(pair):
    base_dir, tuned_dir = pair
    base, tuned = _load_dir(base_dir), _load_dir(tuned_dir)
    meta = {n: (tuple(t.shape), t.dtype) for n, t in tuned.items()}
    expected, stats = M.restore(base, tuned, 0.3, select="bottom", score=M.Score.ABS)
    plan = M.plan_restore(meta, meta, 0.3, select=M.Select.BOTTOM, score="abs")
    assert plan.names == sorted(plan.names) and plan.k == stats["k"]
    plan.select(lambda: ((n, base[n].reshape(-1), tuned[n].reshape(-1)) for n in plan.names))
    with pytest.raises(ValueError, match="sorted-name order"):
        plan.mask(plan.names[1], base[plan.names[1]], tuned[plan.names[1]])
    for n in plan.names:
        assert torch.equal(plan.restore_tensor(n, base[n], tuned[n]), expected[n]), n
    assert plan.stats() == stats
    # The torch backend (the CUDA path: selection and restoring) does the same on CPU tensors.
    plan = M.plan_restore(meta, meta, 0.3, select="bottom", score="abs", device="cuda")
    plan.select(lambda: ((n, base[n].reshape(-1), tuned[n].reshape(-1)) for n in plan.names))
    for n in plan.names:
        assert torch.equal(plan.restore_tensor(n, base[n], tuned[n]), expected[n]), n
    rescaled, _ = M.restore(base, tuned, 0.3, select="random", seed=4, rescale=True)
    plan = M.plan_restore(meta, meta, 0.3, select="random", seed=4, rescale=True, device="cuda")
    plan.select(lambda: ((n, base[n].reshape(-1), tuned[n].reshape(-1)) for n in plan.names))
    for n in plan.names:
        torch.testing.assert_close(plan.restore_tensor(n, base[n], tuned[n]), rescaled[n], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="scope must be one of"):
        M.plan_restore(meta, meta, 0.3, scope="everywhere")
    with pytest.raises(TypeError, match="seed"):
        M.plan_restore(meta, meta, 0.3, seed=1.5)
