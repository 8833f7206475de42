"""Analysis of fine-tuning updates: spectra, attention structure, representation drift,
token-level shift and restoration curves.

Functions work on plain tensors and models and can be used on their own;
:func:`analyze_runs` ties them together over run directories and writes
``analysis.json``, PNG plots and a markdown section (``rankwise analyze``).
"""
from .attention import attention_entropy, eager_attention, js_distance
from .probe import compare_attention, compare_on_probe, compare_representations, token_kl_by_bucket
from .render import markdown_section
from .representations import linear_cka
from .restoration import DEFAULT_FRACTIONS, bucket_accuracy, restoration_curve
from .runs import analyze_runs, update_measures
from .spectral import (
    effective_rank,
    energy_top_k,
    frobenius_norm,
    intruder_dimensions,
    singular_values,
    spectrum_summary,
    stable_rank,
    subspace_similarity,
    top_singular_similarity,
)
from .tokens import first_token_kl

__all__ = [
    "singular_values", "effective_rank", "stable_rank", "energy_top_k", "frobenius_norm", "spectrum_summary",
    "intruder_dimensions", "top_singular_similarity", "subspace_similarity",
    "attention_entropy", "js_distance", "eager_attention", "compare_attention",
    "linear_cka", "compare_representations",
    "first_token_kl", "token_kl_by_bucket", "compare_on_probe",
    "DEFAULT_FRACTIONS", "bucket_accuracy", "restoration_curve",
    "analyze_runs", "update_measures", "markdown_section",
]
