"""Triton launches per LoRA layer forward + backward, pinned (under the interpreter, in a child process).

Each launch costs the host Python and a driver call; on a GPU a small step is bound by them. The counts are
what the kernels need today: the single-arm op 5 (the forward GEMM, S = x A^T, dS with dB, dA, dX), the
one-arm multi op 6 (its dB by a second launch of the dA kernel instead of atomics), dense and NF4, with and
without dropout (the mask is regenerated in the kernels, never a launch of its own). A change that adds a
launch fails here and must say why.
"""
import pytest

from benchmarks.bench_lora_k1 import launch_counts_child

LOW_RANK = {"_lora_down_kernel": 1, "_lora_bwd_dsdb_kernel": 1, "_lora_bwd_da_kernel": 1}  # S; dS and dB; dA
SINGLE = {"dense": {**LOW_RANK, "_lora_fwd_kernel": 1, "_lora_bwd_dx_kernel": 1},
          "nf4": {**LOW_RANK, "_nf4_lora_fwd_kernel": 1, "_nf4_lora_bwd_dx_kernel": 1}}
ONE_ARM = {"_multi_fwd_kernel": 1, "_multi_down_kernel": 1, "_multi_ds_kernel": 1, "_multi_da_kernel": 2,
           "_multi_dx_kernel": 1}  # dense and NF4: the base product is the kernels' own branch


@pytest.fixture(scope="module")
def counts():
    return launch_counts_child()


def test_launches_per_lora_layer_are_pinned(counts):
    rows = counts["rows"]
    assert {(r["base"], r["dropout_p"] > 0) for r in rows} == {("dense", False), ("dense", True), ("nf4", False),
                                                               ("nf4", True)}
    for r in rows:
        assert r["single_kernels"] == SINGLE[r["base"]] and r["single_launches"] == 5, r
        assert r["k1_kernels"] == ONE_ARM and r["k1_launches"] == 6, r
        assert r["k1_vs_single_max_rel_err"] < 1e-5, r
