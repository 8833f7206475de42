"""Assertion helpers shared by the kernel tests: relative error against a float64
reference, and a check that says where and by how much a tensor is off."""
import torch


def rel_err(out, ref) -> float:
    """max|out - ref| / max|ref| (ref float64)."""
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check(name, out, ref, tol):
    """Assert ``rel_err(out, ref) <= tol``, naming the worst element when it is not."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    if not err <= tol:
        diff = (out.double() - ref).abs()
        idx = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0])
        raise AssertionError(f"{name}: relative error {err:.3g} > {tol:.3g}; worst at {idx}: "
                             f"got {out[idx].item():.6g}, expected {ref[idx].item():.6g}")
