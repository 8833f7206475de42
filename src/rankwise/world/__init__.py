"""The embedded synthetic knowledge world: fictional people and their facts, a word-level
tokenizer, a small pretrained Llama base model, and knowledge mastery buckets.

- :mod:`rankwise.world.generate`: the seeded world (relations, templates, popularity,
  corpus, QA splits).
- :mod:`rankwise.world.tokenizer`: the word-level tokenizer (``AutoTokenizer`` loads it).
- :mod:`rankwise.world.pretrain`: presets, cache, and pretraining with ``rankwise.train``.
- :mod:`rankwise.world.mastery`: mastery R per fact, buckets D0..D4, fine-tuning and test sets.
"""
from .generate import IN_DOMAIN, OUT_OF_DOMAIN, RELATIONS, WorldConfig, generate_world, load_world, save_world

__all__ = ["WorldConfig", "generate_world", "save_world", "load_world", "RELATIONS", "IN_DOMAIN", "OUT_OF_DOMAIN"]
