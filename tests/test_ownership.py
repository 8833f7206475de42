"""rankwise.ownership: what rankwise may write, checked before any work; and the run settings hash."""
import os

import pytest

from rankwise import config as C
from rankwise.errors import ConfigError
from rankwise.ownership import MARKER, check_output, claim, owner


def snapshot(root):
    """{relative path: bytes} of every file under root (what must stay byte-identical); a dangling link is
    recorded as ``("link", its target)``."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            if os.path.islink(p) and not os.path.exists(p):
                out[os.path.relpath(p, root)] = ("link", os.readlink(p))
                continue
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = fh.read()
    return out


def test_a_new_directory_is_claimed_and_then_reusable(tmp_path):
    out = tmp_path / "a" / "b"
    check_output(out)
    claim(out, "train")
    assert owner(out)["kind"] == "train"
    (out / "metrics.jsonl").write_text("{}\n")
    check_output(out, kinds=["train"])  # ours: no --force needed
    with pytest.raises(ConfigError, match="holds a rankwise 'train' output, not a merge one"):
        check_output(out, kinds=["merge"])
    check_output(out, kinds=["merge"], force=True)


def test_a_users_directory_needs_force_and_is_left_alone(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=f"was not made by rankwise \\(no {MARKER}\\); pass --force"):
        check_output(mine, flag="--out")
    assert snapshot(tmp_path) == before
    check_output(mine, force=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    check_output(empty)  # an empty directory holds nothing to lose


@pytest.mark.parametrize("relation", ["equal", "inside", "contains"])
def test_outputs_overlapping_an_input_are_refused_even_with_force(tmp_path, relation):
    model = tmp_path / "models" / "base"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    out = {"equal": model, "inside": model / "merged", "contains": tmp_path / "models"}[relation]
    before = snapshot(tmp_path)
    word = {"equal": "is the base model", "inside": "lies inside the base model",
            "contains": "contains the base model"}[relation]
    with pytest.raises(ConfigError, match=word):
        check_output(out, force=True, inputs=[("base model", model), ("tokenizer", None), "hub/id-not-a-path"])
    assert snapshot(tmp_path) == before


def test_files_in_the_way_and_unwritable_parents(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_output(f, force=True)
    with pytest.raises(ConfigError, match="lies under the file"):
        check_output(f / "sub", force=True)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        with pytest.raises(ConfigError, match="not writable"):
            check_output(ro / "out")


def test_settings_hash_tracks_what_changes_the_result_and_data_content(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    base = {"model": "m", "data": {"train": str(data)}, "output_dir": str(tmp_path / "o")}
    s0 = C.settings(C.parse(base))
    same = C.settings(C.parse({**base, "output_dir": "elsewhere", "train": {"log_every": 1, "save_every": 0}}))
    assert C.settings_hash(s0) == C.settings_hash(same)
    lr = C.settings(C.parse({**base, "train": {"lr": 0.5}}))
    assert C.changed_settings(s0, lr) == ["train.lr"]
    data.write_text('{"prompt": "a", "completion": "c"}\n')
    assert C.changed_settings(s0, C.settings(C.parse(base))) == ["data.train#sha256"]


def test_settings_leave_out_the_sections_a_method_does_not_use(tmp_path):
    base = {"model": "m", "data": {"train": "x.jsonl"}}
    full = C.settings(C.parse({**base, "method": "full"}))
    assert not any(k.startswith(("lora.", "mask.")) for k in full)
    assert C.changed_settings(full, C.settings(C.parse({**base, "method": "full", "lora": {"r": 64}}))) == []
    lora = C.settings(C.parse(base))
    assert "lora.r" in lora and not any(k.startswith("mask.") for k in lora)
    masked = C.settings(C.parse({**base, "method": "masked"}))
    assert "mask.fraction" in masked and not any(k.startswith("lora.") for k in masked)


def test_claim_knows_what_it_created_and_undo_removes_only_that(tmp_path):
    new = tmp_path / "a" / "b" / "run"
    c = claim(new, "train", lock=True)
    assert owner(new)["kind"] == "train" and c.created == [str(tmp_path / "a"), str(tmp_path / "a" / "b"), str(new)]
    c.undo()
    assert os.listdir(tmp_path) == [], "the parents it made go too"
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    c = claim(mine, "train", lock=True)
    assert sorted(os.listdir(mine)) == [".rankwise-lock", MARKER, "notes.txt"]
    c.undo()
    assert os.listdir(mine) == ["notes.txt"], "only its marker and lock file go"
    c = claim(mine, "train", lock=True)
    c.commit()
    c.undo()  # committed: the run started writing, everything stays; only the lock is released
    assert sorted(os.listdir(mine)) == [MARKER, "notes.txt"]


def test_claim_of_a_locked_directory_is_refused_and_changes_nothing(tmp_path):
    from rankwise.runlock import RunLock

    out = tmp_path / "run"
    first = claim(out, "train", lock=True)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=rf"output_dir {out} is in use by another rankwise run \(pid {os.getpid()};"):
        claim(out, "train", lock=True)
    assert snapshot(tmp_path) == before
    first.release()
    assert os.listdir(out) == [MARKER]
    os.symlink(tmp_path / "elsewhere", out / ".rankwise-lock")  # never written through
    with pytest.raises(ConfigError, match="is a symbolic link; rankwise never writes through one"):
        RunLock(out).acquire()
    assert not (tmp_path / "elsewhere").exists()


def test_a_lone_lock_file_does_not_make_a_directory_foreign(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".rankwise-lock").write_text("12345\n")  # a run killed between its lock and its marker
    check_output(out)


def test_links_among_the_entries_into_an_input_are_refused(tmp_path):
    from rankwise.ownership import check_links

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    out = tmp_path / "run"
    out.mkdir()
    os.symlink(model, out / "adapter")
    os.symlink(tmp_path / "elsewhere", out / "summary.json")  # dangling, not into an input: the writer replaces it
    check_links(out, ["summary.json", "notes"], inputs=[("base model", model)])
    with pytest.raises(ConfigError, match=rf"its entry adapter is a symbolic link to {model}, which is the base model"):
        check_links(out, ["adapter"], inputs=[("base model", model)], flag="output_dir")
    os.symlink(model / "new.json", out / "metrics.jsonl")  # dangling, but into the model
    with pytest.raises(ConfigError, match="its entry metrics.jsonl .* lies inside the base model"):
        check_links(out, ["metrics.jsonl"], inputs=[("base model", model)])
