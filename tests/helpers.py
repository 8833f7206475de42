"""Helpers shared by the kernel tests: relative error against a float64 reference, a
check that says where and by how much a tensor is off, and an aot_eager backend that
keeps the graphs it compiles (to see which ops a compiled function calls)."""
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


def recording_backend():
    """``aot_eager`` that also keeps the forward and backward graphs it is handed."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {"forward": [], "backward": []}

    def keep(kind):
        def compiler(gm, example_inputs):
            graphs[kind].append(gm)
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward")), graphs


def op_names(gm):
    """The call targets of a compiled graph, as strings (``rankwise.swiglu.default``, ...)."""
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
