"""Shipped pretrained bases: installed only when every hash and the world's tokenizer match, pretrained
otherwise (with the reason), and the default demo's bases are in the package for the current settings."""
import json
import logging
import shutil

import pytest
from safetensors.torch import load_file
from test_world import MICRO

from rankwise.demo.run import DEMO, mastery_settings
from rankwise.atomic import file_sha256
from rankwise.world import mastery as M
from rankwise.world import shipped
from rankwise.world.generate import load_world
from rankwise.world.pretrain import preset, pretrain, seeded, settings_key

MASTERY = {"num_samples": 2, "temperature": 0.7, "max_new_tokens": 2, "seed": 0}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A micro base pretrained once, shipped into a private ``bases/`` folder."""
    d = tmp_path_factory.mktemp("shipped")
    r = pretrain("cpu", out_dir=d / "made", overrides=MICRO, progress=False)
    key = settings_key(preset("cpu", MICRO))
    root = d / "bases"
    facts = M.measure(r["base_dir"], load_world(r["world_dir"])["facts"], **MASTERY)
    entry = shipped.ship(r["base_dir"], key, "cpu", 0, r["settings"], {"facts": facts, "settings": MASTERY},
                         root=root)
    return {"root": root, "key": key, "entry": entry, "made": r, "facts": facts}


def test_ship_writes_the_files_and_their_hashes(micro):
    m = json.loads((micro["root"] / shipped.MANIFEST).read_text())
    assert m["format"] == shipped.FORMAT and list(m["bases"]) == [micro["key"]]
    entry = m["bases"][micro["key"]]
    assert entry["dir"] == "cpu-seed0" and sorted(entry["files"]) == sorted([*shipped.FILES, shipped.MASTERY])
    assert entry["mastery"] == MASTERY
    folder = micro["root"] / entry["dir"]
    for name, want in entry["files"].items():
        assert file_sha256(folder / name) == want["sha256"]
    assert shipped.check_files(folder, entry) is None


def test_pretrain_installs_the_shipped_base_instead_of_training(micro, tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "SHIPPED_DIR", micro["root"])
    r = pretrain("cpu", out_dir=tmp_path / "w", overrides=MICRO, progress=False)
    assert r["source"] == "shipped" and not r["cached"] and r["why_pretrained"] is None
    assert not (tmp_path / "w" / "pretrain").exists(), "a shipped base is not trained again"
    made, got = load_file(micro["made"]["base_dir"] / "model.safetensors"), load_file(r["base_dir"] / "model.safetensors")
    assert all((made[k] == got[k]).all() for k in made) and set(made) == set(got)
    # the cached copy is checked at every load: a changed byte brings the shipped copy back
    again = pretrain("cpu", out_dir=tmp_path / "w", overrides=MICRO, progress=False)
    assert again["cached"] and again["source"] == "shipped"
    p = r["base_dir"] / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    fixed = pretrain("cpu", out_dir=tmp_path / "w", overrides=MICRO, progress=False)
    assert fixed["source"] == "shipped" and not fixed["cached"]
    assert shipped.check_files(r["base_dir"], micro["entry"]) is None
    # the shipped mastery comes with it, for the settings it was measured with only
    got = shipped.shipped_mastery(r["base_dir"], micro["key"], MASTERY)
    assert [(x["id"], x["R"], x["bucket"]) for x in got] == [(f["id"], f["R"], f["bucket"]) for f in micro["facts"]]
    assert shipped.shipped_mastery(r["base_dir"], micro["key"], {**MASTERY, "num_samples": 3}) is None


@pytest.mark.parametrize("damage", ["byte", "missing", "tokenizer"])
def test_a_shipped_base_failing_a_check_is_not_used(micro, tmp_path, damage, caplog):
    root = tmp_path / "bases"
    shutil.copytree(micro["root"], root)
    folder = root / micro["entry"]["dir"]
    if damage == "byte":
        p = folder / "model.safetensors"
        data = bytearray(p.read_bytes())
        data[100] ^= 1
        p.write_bytes(bytes(data))
    elif damage == "missing":
        (folder / "config.json").unlink()
    world_tok = micro["made"]["world_dir"] / "tokenizer"
    if damage == "tokenizer":
        other = tmp_path / "tok"
        shutil.copytree(world_tok, other)
        (other / "tokenizer.json").write_text((other / "tokenizer.json").read_text().replace("<unk>", "<unk2>"))
        world_tok = other
    dest = tmp_path / "base"
    why = shipped.install(micro["key"], world_tok, dest, root=root)
    want = {"byte": "does not match its sha256", "missing": "is missing", "tokenizer": "world built on this machine"}
    assert why is not None and want[damage] in why and "\n" not in why
    assert not dest.exists() and not dest.with_name("base.tmp").exists()
    assert shipped.install("0" * 12, world_tok, dest, root=root).startswith("no shipped base")


def test_a_damaged_shipped_base_is_pretrained_with_a_warning(micro, tmp_path, monkeypatch, caplog):
    root = tmp_path / "bases"
    shutil.copytree(micro["root"], root)
    (root / micro["entry"]["dir"] / "tokenizer_config.json").write_text("{}")
    monkeypatch.setattr(shipped, "SHIPPED_DIR", root)
    with caplog.at_level(logging.WARNING, logger="rankwise"):
        r = pretrain("cpu", out_dir=tmp_path / "w", overrides=MICRO, progress=False)
    assert r["source"] == "pretrained" and "sha256" in r["why_pretrained"]
    assert any("shipped base" in m and "pretraining it here" in m for m in caplog.messages)


def test_the_default_demo_bases_are_shipped_for_the_current_settings():
    """Every seed of the default demo has its base in the package, matching today's preset: a change to the
    world, the model or the pretraining recipe that is not followed by shipping new bases fails here."""
    bases = shipped.read_manifest()
    for seed in DEMO["seeds"]:
        key = settings_key(preset("cpu", seeded(None, seed)))
        assert key in bases, f"no shipped base for seed {seed} (settings key {key}): run rankwise world ship"
        entry = bases[key]
        assert entry["seed"] == seed and entry["scale"] == "cpu" and entry["mastery"] == mastery_settings(DEMO)
        assert shipped.check_files(shipped.SHIPPED_DIR / entry["dir"], entry) is None


def test_every_test_bucket_of_every_shipped_base_holds_60_facts():
    """The issue's floor on the default world: each base's test facts hold >= 60 facts in each mastery bucket,
    in and out of domain (the buckets come from the mastery shipped with the base)."""
    bases = shipped.read_manifest()
    world = None
    for seed in DEMO["seeds"]:
        key = settings_key(preset("cpu", seeded(None, seed)))
        entry = bases[key]
        rows = shipped.shipped_mastery(shipped.SHIPPED_DIR / entry["dir"], key, mastery_settings(DEMO))
        if world is None:
            from rankwise.world.generate import WorldConfig, generate_world

            world = generate_world(WorldConfig.from_dict(preset("cpu")["world"]))
        bucket = {r["id"]: r["bucket"] for r in rows}
        facts = [{**f, "bucket": bucket[f["id"]]} for f in world["facts"]]
        for dom, test in M.test_sets(facts).items():
            counts = M.bucket_counts(test)
            assert min(counts.values()) >= 60, (seed, dom, counts)


def test_the_demo_takes_the_mastery_shipped_with_a_base(micro, tmp_path, monkeypatch):
    from rankwise.demo import run

    monkeypatch.setattr(shipped, "SHIPPED_DIR", micro["root"])
    r = pretrain("cpu", out_dir=tmp_path / "w", overrides=MICRO, progress=False)
    assert r["source"] == "shipped"
    monkeypatch.setattr(M, "measure", lambda *a, **k: pytest.fail("the shipped mastery was measured again"))
    s = {"mastery_samples": 2, "mastery_temperature": 0.7, "max_new_tokens": 2, "seed": 0}
    facts = run._mastery(r, s, tmp_path, 0)
    assert [(f["id"], f["R"], f["bucket"]) for f in facts] == [(f["id"], f["R"], f["bucket"]) for f in micro["facts"]]
    assert (tmp_path / "mastery-seed0.jsonl").exists()
    # measured another way: measured here
    monkeypatch.setattr(M, "measure", lambda *a, **k: [{"id": "measured"}])
    assert run._mastery(r, {**s, "mastery_samples": 3}, tmp_path / "other", 0) == [{"id": "measured"}]
