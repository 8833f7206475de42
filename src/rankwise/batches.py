"""The training data of a run: the tokenized training set as ``Batches`` (micro-batches in a seed-determined
order, epoch after epoch), the eval sets (``load_data``), and the run's optimizer steps (``count_steps``).

Rows are read and tokenized by ``rankwise.data``; this module plans them into the micro-batches each rank
takes at each optimizer step.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import asdict

from . import config as C
from .data import collate, eval_batches, load_rows, plan_epoch, qa_items, split_rows, tokenize_rows
from .errors import ConfigError
from .runtime import Dist

log = logging.getLogger("rankwise")


class Batches:
    """The training micro-batches in a seed-determined order, epoch after epoch, planned on demand."""

    def __init__(self, examples, batch_size: int, packing: bool, max_length: int, seed: int):
        self.examples, self.lengths = examples, [len(e) for e in examples]
        self.batch_size, self.packing, self.max_length, self.seed = batch_size, packing, max_length, seed
        self.plans = []  # micro-batches (lists of example indices) of each epoch
        self.n_targets = [sum(e.is_target[1:]) for e in examples]  # collate's targets: the tokens after the first

    def epoch_plan(self, e: int):
        while len(self.plans) <= e:
            self.plans.append(plan_epoch(self.lengths, self.batch_size, packing=self.packing,
                                         max_length=self.max_length, seed=self.seed, epoch=len(self.plans)))
        return self.plans[e]

    def micro_batch(self, g: int):
        """Global micro-batch number ``g`` -> (epoch, batch dict)."""
        e = 0
        while g >= len(self.epoch_plan(e)):
            g -= len(self.epoch_plan(e))
            e += 1
        return e, collate(self.examples, self.epoch_plan(e)[g])

    def static_shape(self, count: int, multiple: int = 8) -> tuple:
        """``(tokens, targets)``: the most tokens and the most target tokens of the first ``count`` micro-batches
        (the whole run's, so a resumed run pads to the same shape), tokens rounded up to ``multiple``."""
        tokens = targets = 1
        g = 0
        if not self.epoch_plan(0):
            return multiple, targets
        for e in itertools.count():
            for b in self.epoch_plan(e):
                if g == count:
                    return -(-tokens // multiple) * multiple, targets
                tokens = max(tokens, sum(self.lengths[i] for i in b))
                targets = max(targets, sum(self.n_targets[i] for i in b))
                g += 1

    def step(self, step: int, grad_accum: int, dist: Dist):
        """This rank's ``grad_accum`` (epoch, batch) pairs of optimizer step ``step``."""
        return [self.micro_batch((step * grad_accum + k) * dist.world + dist.rank) for k in range(grad_accum)]


def load_data(cfg: C.RunConfig, tokenizer, master: bool):
    """``(Batches, evals)``: the tokenized training set, and ``{prefix: (loss batches or None, qa items or None)}``.

    With ``data.eval_fraction`` the eval set ``eval`` is a share of the training rows, drawn with
    ``train.seed`` (``data.split_rows``), whose examples leave the training set.
    """
    d, e = cfg.data, cfg.eval
    fields = asdict(d.fields)
    tok_kw = dict(format=d.format, fields=fields, max_length=d.max_length, add_eos=d.add_eos,
                  chat_template=d.chat_template, stride=d.stride, progress=master and cfg.log.progress)
    rows = load_rows(d.train, "data.train")
    if not rows:
        raise ConfigError(f"data.train: {d.train} holds no rows")
    examples, dropped = tokenize_rows(rows, tokenizer, name="data.train", warn=master, **tok_kw)
    if dropped:
        log.warning("data.train: %d examples lost every target token to data.max_length and were dropped", dropped)
    evals = {}
    if d.eval_fraction:
        _, held = split_rows(len(rows), d.eval_fraction, cfg.train.seed)
        held = held[: e.max_examples]
        keep = set(held)
        held_out = [x for x in examples if x.row in keep]
        examples = [x for x in examples if x.row not in keep]
        if not examples or not held_out:
            raise ConfigError(f"data.eval_fraction={d.eval_fraction} leaves no {'training' if held_out else 'eval'} "
                              f"example of the {len(rows)} rows of data.train")
        qa = qa_items([rows[i] for i in held], tokenizer, format=d.format, fields=fields,
                      chat_template=d.chat_template, name="data.train") if e.generate else None
        evals["eval"] = (eval_batches(held_out, e.batch_size, d.max_length), qa)
    for prefix, source in (("eval", d.eval), ("eval_ood", d.eval_ood)):
        if not source:
            continue
        rows = load_rows(source, f"data.{prefix}")[: e.max_examples]
        if not rows:
            raise ConfigError(f"data.{prefix}: {source} holds no rows")
        qa = qa_items(rows, tokenizer, format=d.format, fields=fields, chat_template=d.chat_template,
                      name=f"data.{prefix}") if e.generate else None
        batches = None  # QA-only eval sets (prompt + answers, no completion) get no eval loss
        response = {"prompt_completion": fields["completion"], "alpaca": fields["output"]}.get(d.format)
        if response is None or any(response in r for r in rows) or qa is None:
            ex, _ = tokenize_rows(rows, tokenizer, name=f"data.{prefix}", warn=master, **tok_kw)
            batches = eval_batches(ex, e.batch_size, d.max_length)
        evals[prefix] = (batches, qa)
    return Batches(examples, cfg.train.batch_size, d.packing, d.max_length, cfg.train.seed), evals


def check_token_ids(batches: Batches, evals: dict, model) -> None:
    """Every token id of the training and eval data indexes the model's embeddings and output head: checked
    once here, on the host, so that the loss never reads its targets back from the device to check them."""
    rows = [n for n in (model.get_input_embeddings().num_embeddings,
                        getattr(model.get_output_embeddings(), "out_features", None)) if n is not None]
    vocab = min(rows)
    top = max((max(e.input_ids) for e in batches.examples if e.input_ids), default=-1)
    for loss_batches, _ in evals.values():
        for b in loss_batches or []:
            top = max(top, int(b["input_ids"].max()))
    if top >= vocab:
        raise ConfigError(f"the data holds token id {top}, outside the model's vocabulary of {vocab}: the tokenizer "
                          f"does not match the model (set tokenizer: to the model's own)")


def count_steps(t: C.TrainCfg, batches: Batches, world: int) -> int:
    """Optimizer steps of the run: ``train.max_steps``, or ``train.epochs`` passes over the data."""
    if t.epochs is None:
        return t.max_steps
    return max(1, math.ceil(t.epochs * len(batches.epoch_plan(0)) / (t.grad_accum * world)))

