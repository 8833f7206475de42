"""Config: typed RunConfig, defaults, errors that name the key, --set overrides, YAML round trip, CLI errors."""
import os

import pytest
import yaml
from helpers import forbid

from rankwise import cli
from rankwise import config as C
from rankwise.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN = {"model": "m", "data": {"train": "t.jsonl"}}


def test_defaults_fill_every_key():
    cfg = C.resolve(MIN)
    flat = C.flatten(cfg)
    assert set(flat) == set(C.SCHEMA)
    assert cfg["lora"] == {"r": 16, "alpha": 32.0, "dropout": 0.0, "rslora": False, "targets": C.DEFAULT_TARGETS,
                           "init": "default"}
    assert cfg["train"]["lr"] == 2e-4 and cfg["method"] == "lora" and cfg["data"]["fields"]["prompt"] == "prompt"


@pytest.mark.parametrize("bad, message", [
    ({**MIN, "lora": {"rank": 8}}, r"unknown config key 'lora.rank' \(did you mean 'lora.r'\?\)"),
    ({**MIN, "optimiser": "adamw"}, r"unknown config key 'optimiser'"),
    ({**MIN, "lr": 0.1}, r"unknown config key 'lr' \(did you mean 'train.lr'\?\)"),
    ({**MIN, "lora": {"target_modules": ["q_proj"]}}, r"'lora.target_modules' \(did you mean 'lora.targets'"),
    ({**MIN, "train": {"lr": 1e-4, "bogus": 1, "epoch": 2}}, r"unknown config keys 'train.bogus', 'train.epoch'"),
    ({**MIN, "data": {"train": "t", "fields": {"answer": "a"}}}, r"'data.fields.answer' \(did you mean 'data.fields.answers'"),
    ({"data": {"train": "t"}}, r"missing required config key 'model'"),
    ({"model": "m"}, r"missing required config key 'data.train'"),
    ({**MIN, "lora": 8}, r"config key 'lora' must be a mapping"),
    ({**MIN, "lora": {"r": "eight"}}, r"config key 'lora.r' must be int, got str 'eight'"),
    ({**MIN, "lora": {"r": 0}}, r"config key 'lora.r' must be > 0"),
    ({**MIN, "lora": {"rslora": "yes"}}, r"config key 'lora.rslora' must be bool"),
    ({**MIN, "method": "qlora"}, r"config key 'method' must be one of lora, full, masked; got 'qlora'"),
    ({**MIN, "train": {"betas": [0.9]}}, r"'train.betas' must be two numbers"),
    ({**MIN, "mask": {"fraction": 1.5}}, r"'mask.fraction' must be in \(0, 1\]"),
    ({**MIN, "method": "masked", "mask": {"score": "update"}}, r"'mask.from' is required"),
    ({**MIN, "method": "full", "quantization": "nf4"}, r"'quantization' = 'nf4' needs method 'lora'"),
    ({**MIN, "model": None}, r"config key 'model' must not be null"),
    ({**MIN, "lora": {"init": "pisa"}}, r"'lora.init' must be one of default, gaussian, pissa, pissa_niter_N"),
    ({**MIN, "lora": {"init": "pissa_niter_0"}}, r"'lora.init' must be one of"),
    ({**MIN, "lora": {"init": "pissa_niter_x"}}, r"'lora.init' must be one of"),
    ({**MIN, "train": {"backend": "cuda"}}, r"'train.backend' must be one of auto, triton, torch; got 'cuda'"),
    ({**MIN, "train": {"max_grad_norm": 0}}, r"'train.max_grad_norm' must be > 0"),
    ({**MIN, "lora": {"dropout": 1.0}}, r"'lora.dropout' must be in \[0, 1\)"),
    ({**MIN, "train": {"lr": float("inf")}}, r"'train.lr' must be a finite number, got inf"),
    ({**MIN, "train": {"lr": float("nan")}}, r"'train.lr' must be a finite number, got nan"),
    ({**MIN, "train": {"warmup": float("inf")}}, r"'train.warmup' must be a finite number"),
    ({**MIN, "train": {"epochs": "inf"}}, r"'train.epochs' must be a finite number"),
    ({**MIN, "lora": {"alpha": float("inf")}}, r"'lora.alpha' must be a finite number"),
    ({**MIN, "train": {"betas": [0.9, float("nan")]}}, r"'train.betas' must be two numbers in \[0, 1\)"),
    ({**MIN, "output_dir": ""}, r"config key 'output_dir' must not be empty"),
    ({**MIN, "model": " "}, r"config key 'model' must not be empty"),
    ({**MIN, 1: 2}, r"config key 1 must be a string"),
    ({**MIN, "train": {None: 2}}, r"config key train.None must be a string"),
])
def test_bad_configs_name_the_key(bad, message):
    with pytest.raises(ConfigError, match=message):
        C.validate(bad)


def test_run_config_is_typed_and_frozen():
    import dataclasses

    cfg = C.parse(MIN, ["lora.r=8", "lora.init=pissa_niter_4", "train.backend=torch", "mask.from=runs/full"])
    assert isinstance(cfg, C.RunConfig) and isinstance(cfg.lora, C.LoraCfg) and isinstance(cfg.train, C.TrainCfg)
    assert cfg.lora.r == 8 and cfg.lora.init == "pissa_niter_4" and cfg.train.backend == "torch"
    assert cfg.mask.from_ == "runs/full" and cfg.get("mask.from") == "runs/full" and C.get(cfg, "lora.r") == 8
    assert cfg.data.fields.prompt == "prompt" and cfg.train.betas == [0.9, 0.999]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lora.r = 4
    # the dict view is what resolve() returns and what resolved_config.yaml holds; parsing it again gives the same object
    assert cfg.to_dict() == C.resolve(MIN, ["lora.r=8", "lora.init=pissa_niter_4", "train.backend=torch",
                                            "mask.from=runs/full"])
    assert C.parse(cfg.to_dict()) == cfg and C.parse(cfg) is cfg
    assert C.parse(cfg, ["lora.r=2"]).lora.r == 2
    # every key is declared once, with help text; choices come from the field metadata
    assert all(spec.help for spec in C.SCHEMA.values())
    assert C.SCHEMA["train.backend"].choices == ("auto", "triton", "torch") and C.SCHEMA["train.backend"].default == "auto"
    assert C.SCHEMA["lora.r"][0] == 16  # the old positional view (default, types, choices, help) still reads
    for init in ("default", "gaussian", "pissa", "pissa_niter_16"):
        assert C.parse(MIN, [f"lora.init={init}"]).lora.init == init


def test_overrides_dotted_and_typed():
    cfg = C.resolve(MIN, ["lora.r=8", "train.lr=1e-4", "lora.targets=[q_proj, v_proj]", "train.epochs=null",
                          "data.eval=e.jsonl", "train.max_grad_norm=null", "lora.alpha=16"])
    assert cfg["lora"]["r"] == 8 and cfg["train"]["lr"] == 1e-4 and isinstance(cfg["lora"]["alpha"], float)
    assert cfg["lora"]["targets"] == ["q_proj", "v_proj"] and cfg["data"]["eval"] == "e.jsonl"
    assert cfg["train"]["max_grad_norm"] is None
    assert C.resolve(MIN, {"lora.targets": "q_proj,o_proj"})["lora"]["targets"] == ["q_proj", "o_proj"]
    with pytest.raises(ValueError, match=r"unknown config key 'lora.rank' in overrides \(did you mean 'lora.r'"):
        C.resolve(MIN, ["lora.rank=8"])
    with pytest.raises(ValueError, match="--set expects key=value, got 'lora.r'"):
        C.resolve(MIN, ["lora.r"])
    with pytest.raises(ValueError, match="'train.batch_size' must be int, got float 2.5"):
        C.resolve(MIN, ["train.batch_size=2.5"])
    # broken YAML in an override is an error, never taken as the string it happens to be
    for item in ["lora.targets=[q_proj", "lora.targets={a: ", "model=a: b: c"]:
        with pytest.raises(ConfigError, match=r"--set \S+: the value .* is not valid YAML .*quote it"):
            C.resolve(MIN, [item])
    assert C.resolve(MIN, ['model="a: b: c"'])["model"] == "a: b: c"


def test_a_broken_yaml_file_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: {train: t}\n? [a, b]\n: c\n")
    with pytest.raises(ConfigError, match=r"is not valid YAML: found unhashable key at line 3, column 3$") as e:
        C.parse(str(path))
    assert "\n" not in str(e.value)


def test_yaml_round_trip_and_example(tmp_path):
    cfg = C.resolve(MIN, ["method=full", "train.seed=3"])
    C.dump_yaml(cfg, tmp_path / "c.yaml")
    assert C.resolve(str(tmp_path / "c.yaml")) == cfg
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp")] == []
    example = C.resolve(os.path.join(ROOT, "examples", "lora.yaml"))
    with open(os.path.join(ROOT, "examples", "lora.yaml")) as f:
        raw = yaml.safe_load(f)
    # the example lists every key (so it documents them all) with the defaults, except the run-specific ones
    assert set(C.flatten(raw)) | {"data.fields.prompt"} >= set(C.SCHEMA) - {"data.fields"}
    specific = {"model", "data.train", "data.eval", "output_dir"}
    defaults = C.flatten(C.defaults())
    for key, value in C.flatten(example).items():
        if key not in specific:
            assert value == defaults[key], key
    with pytest.raises(ConfigError, match="config file not found"):
        C.resolve(str(tmp_path / "nope.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        C.resolve(str(tmp_path / "list.yaml"))


def test_cli_reports_config_and_row_errors_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**MIN, "lora": {"alhpa": 4}}))
    assert cli.main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "rankwise train: error: unknown config key 'lora.alhpa' (did you mean 'lora.alpha'?)"

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(MIN))
    assert cli.main(["train", str(good), "--set", "lora.r=4", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["lora"]["r"] == 4 and printed["train"]["schedule"] == "cosine"


def test_cli_names_the_malformed_row(tmp_path, capsys):
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from test_data import build_tiny_llama

    model = build_tiny_llama(tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": model, "data": {"train": str(data)}, "output_dir": str(tmp_path / "o"),
                                   "log": {"progress": False}}))
    assert cli.main(["train", str(cfg)]) == 2
    assert "data.train row 3: missing field 'completion'" in capsys.readouterr().err


def test_lora_init_typo_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    forbid(monkeypatch, "load_model", "the model must not load for a config error")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**MIN, "lora": {"init": "pisa"}, "output_dir": str(tmp_path / "o")}))
    assert cli.main(["train", str(cfg)]) == 2
    assert capsys.readouterr().err.startswith("rankwise train: error: config key 'lora.init' must be one of")


def test_triton_backend_on_cpu_needs_the_interpreter(tmp_path, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("the interpreter is only needed without CUDA")
    forbid(monkeypatch, "load_model", "loaded the model")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**MIN, "train": {"backend": "triton", "device": "cpu"},
                                   "output_dir": str(tmp_path / "o")}))
    assert cli.main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("rankwise train: error: train.backend triton on device cpu needs the Triton interpreter: "
                           "set TRITON_INTERPRET=1 in the environment before starting Python")
    assert not (tmp_path / "o").exists(), "nothing is written for a config error"


def test_cli_config_error_one_line_and_debug_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**MIN, "train": {"lr": -1}}))
    assert cli.main(["train", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == "rankwise train: error: config key 'train.lr' must be > 0, got -1.0"
    with pytest.raises(ConfigError, match="'train.lr' must be > 0"):
        cli.main(["--debug", "train", str(bad)])


def test_a_learning_rate_adamw_cannot_step_with_is_one_line(tmp_path, capsys):
    """Above 1e30, AdamW's float32 step size lr / (1 - beta1^n) overflows and torch raises mid-run."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**MIN, "train": {"lr": 1e38}}))
    assert cli.main(["train", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == ("rankwise train: error: config key 'train.lr' must be at most 1e+30 "
                                               "(AdamW's float32 step size overflows above it), got 1e+38")


@pytest.mark.parametrize("exc", [KeyError("rows"), ValueError("shape mismatch"), FileNotFoundError("x")])
def test_cli_bugs_keep_their_traceback(tmp_path, monkeypatch, exc):
    """A KeyError / ValueError from inside rankwise is a bug, not bad input: it propagates with its traceback."""
    import rankwise.train

    def broken(*a, **k):
        raise exc

    monkeypatch.setattr(rankwise.train, "train", broken)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(MIN))
    with pytest.raises(type(exc)):
        cli.main(["train", str(good)])


# ----------------------------------------------------------------------------- hostile YAML, bounded messages

def test_a_normal_config_with_aliases_and_merge_keys_is_read(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: &m models/base\ntokenizer: *m\ndata: {train: t.jsonl}\n"
                    "lora: &lora {r: 8, alpha: 16, targets: &t [q_proj, v_proj]}\n"
                    "train: {betas: &b [0.9, 0.95]}\n")
    cfg = C.parse(str(path))
    assert cfg.tokenizer == cfg.model == "models/base" and cfg.lora.targets == ["q_proj", "v_proj"]
    assert C.safe_load_text("base: &b {r: 4}\nlora: {<<: *b, alpha: 8}\n") == {"base": {"r": 4},
                                                                                 "lora": {"r": 4, "alpha": 8}}


def test_alias_expansion_is_counted_not_built(monkeypatch):
    import time

    lines = ["a0: &a0 [" + ", ".join(["lol"] * 9) + "]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"^config file x.yaml: its aliases \(\*name\) expand to more than 100000 "
                                          r"values \(at line 6, column 10\); write the values out instead$"):
        C.safe_load_text("\n".join(lines) + "\nmodel: *a9\n", "config file x.yaml")
    assert time.time() - t0 < 5
    monkeypatch.setattr(C, "MAX_EXPANDED", 1000)  # the limit's edges, on small texts
    row = "[" + ", ".join(["x"] * 99) + "]"  # 100 values with the list itself
    under = f"a: &a {row}\nb: [" + ", ".join(["*a"] * 8) + "]\n"  # 1 + 1 + 100 + 1 + 1 + 800 = 904 values
    assert len(C.safe_load_text(under)["b"]) == 8
    with pytest.raises(ConfigError, match="expand to more than 1000 values"):
        C.safe_load_text(f"a: &a {row}\nb: [" + ", ".join(["*a"] * 10) + "]\n")
    # a large file without aliases is not refused for its size
    assert len(C.safe_load_text("[" + ", ".join(["1"] * 1500) + "]")) == 1500


def test_nesting_and_self_reference_are_refused_from_the_events():
    deepest = C.MAX_DEPTH - 1  # lists inside the top mapping
    assert C.safe_load_text("a: " + "[" * deepest + "]" * deepest) == {"a": _nested(deepest - 1)}
    with pytest.raises(ConfigError, match=f"nests deeper than {C.MAX_DEPTH} levels"):
        C.safe_load_text("a: " + "[" * (deepest + 1) + "]" * (deepest + 1))
    with pytest.raises(ConfigError, match=f"--set model nests deeper than {C.MAX_DEPTH} levels"):
        C.parse(MIN, ["model=" + "[" * 5000 + "]" * 5000])
    with pytest.raises(ConfigError, match="nests deeper than"):
        C.parse(MIN, ["model=" + "[" * 5000])  # unclosed: refused before the parser reaches the end
    with pytest.raises(ConfigError, match=r"the alias \*a at line 1, column 11 lies inside the node it names"):
        C.safe_load_text("a: &a {b: *a}")


def _nested(depth):
    out = []
    for _ in range(depth):
        out = [out]
    return out


def test_recursion_anywhere_in_reading_yaml_is_one_line(monkeypatch):
    import yaml

    def deep(*a, **k):
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(yaml, "load", deep)
    with pytest.raises(ConfigError, match="^--set model is nested too deeply to read$"):
        C.parse(MIN, ["model=[1]"])


@pytest.mark.parametrize("text, message", [
    (b"model: m\n# caf\xe9\n", r"is not UTF-8 text: byte 0xe9 at line 2, column 6; save it as UTF-8$"),
    ("\ufeffmodel: m\ndata: {train: t}\n".encode("utf-8"), None),  # a UTF-8 byte order mark is fine
    (("model: 1" + "0" * 5000 + "\n").encode(), r"cannot read the value '10000.*Exceeds the limit .* at line 1, column 8$"),
    (b"model: !!float x\n", r"cannot read the value 'x': could not convert string to float: 'x' at line 1, column 8$"),
])
def test_unreadable_bytes_and_values_in_the_file_are_one_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    if message is None:
        assert C.load_yaml(str(path)) == {"model": "m", "data": {"train": "t"}}
        return
    with pytest.raises(ConfigError, match=message) as e:
        C.load_yaml(str(path))
    assert "\n" not in str(e.value) and len(str(e.value)) < 500


def test_values_in_messages_are_cut_short():
    from rankwise.errors import one_line, short

    laughs = ["lol"] * 9
    for _ in range(6):
        laughs = [laughs] * 9  # 9**7 strings, shared: repr() would be 33 MB (a second); short() looks at a few
    assert len(short(laughs)) <= 80 and short(laughs).startswith("[[[[")
    assert short(10**5000) == "<an int of 16610 bits>" and short("x" * 10**6).count("x") < 80
    assert one_line(ValueError("a\n  b")) == "a b" and one_line(KeyError()) == "KeyError" and len(one_line("y" * 999)) == 300
    for bad, message in [({"lora": {"targets": laughs}}, r"^config key 'lora.targets' must be a non-empty list"),
                         ({"model": laughs}, r"^config key 'model' must be str, got list \[\[\[\["),
                         ({"method": laughs}, r"^config key 'method' must be str, got list \[\[\[\["),
                         ({"lora": laughs}, r"^config key 'lora' must be a mapping"),
                         ({"lora": {"r": 0, ("x" * 999,): 1}}, r"^config key lora\.\('x+\.\.\.x+\.\.\. must be a string$")]:
        with pytest.raises(ConfigError, match=message) as e:
            C.validate({**MIN, **bad})
        assert len(str(e.value)) < 200, str(e.value)[:300]
    with pytest.raises(ConfigError, match=r"unknown config keys 'k0', 'k1', 'k2', 'k3', 'k4' and 95 more$"):
        C.validate({**MIN, **{f"k{i}": 1 for i in range(100)}})


@pytest.mark.parametrize("seed, ok", [(0, True), (2**32, True), (2**64 - 1, True), (-1, False), (2**64, False),
                                      pytest.param(10**5000, False, id="5001-digits")])
def test_train_seed_is_a_64_bit_unsigned_int(seed, ok):
    if ok:
        assert C.parse(MIN, {"train.seed": seed}).train.seed == seed
    else:
        with pytest.raises(ConfigError, match=r"^config key 'train.seed' must be in \[0, 18446744073709551615\], got "):
            C.parse(MIN, {"train.seed": seed})


def test_ints_past_64_bits_and_floats_past_inf_are_refused_at_parse():
    with pytest.raises(ConfigError, match=r"'train.max_steps' must fit in 64 bits, got 1000"):
        C.parse(MIN, {"train.max_steps": 10**30})
    with pytest.raises(ConfigError, match=r"'train.lr' must be float, got int 1000"):
        C.parse(MIN, {"train.lr": 10**400})  # float() of it overflows


def test_tensorboard_is_checked_at_parse(monkeypatch):
    import importlib.machinery
    import importlib.util
    import sys

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: importlib.machinery.ModuleSpec(name, None)
                        if name == "tensorboard" else real(name, *a))
    assert C.parse(MIN, {"log.tensorboard": True}).log.tensorboard is True
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match=r"^config key 'log.tensorboard' is true but the tensorboard package is not "
                                          r"installed: pip install tensorboard, or set log.tensorboard: false$"):
        C.parse(MIN, {"log.tensorboard": True})
    assert C.parse(MIN).log.tensorboard is False


def test_keys_a_run_does_not_use_stay_out_of_its_settings():
    """A prompt_completion run's settings hold no key of the other formats (nor eval_fraction 0, nor early
    stopping when off), so runs keep their settings hash as such keys are added; the format that reads a key
    gets it, and early stopping makes eval.every a setting."""
    base = C.settings(C.parse(MIN))
    assert not [k for k in base if k.startswith(("data.fields.instruction", "data.fields.conversations",
                                                  "data.fields.text", "data.stride", "data.chat_template",
                                                  "data.eval_fraction", "train.early_stop", "eval.every"))]
    text = C.settings(C.parse({**MIN, "data": {**MIN["data"], "format": "text", "stride": 4}}))
    assert text["data.stride"] == 4 and "data.fields.text" in text and "data.fields.instruction" not in text
    stop = C.settings(C.parse({**MIN, "data": {**MIN["data"], "eval_fraction": 0.2},
                               "train": {"early_stop": {"patience": 2}}}))
    assert stop["data.eval_fraction"] == 0.2 and stop["train.early_stop.patience"] == 2 and "eval.every" in stop
