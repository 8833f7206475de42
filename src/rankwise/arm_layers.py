"""The layer of a together run: K LoRA arms on one frozen linear, each applied to its own block of rows.

``inject_multi_lora`` replaces the linears ``rankwise.lora.inject_lora`` would adapt by ``MultiLoRALinear``
(arm k's A drawn exactly as its solo run draws it, B zero); ``select_arms`` picks the arms the next forward
computes, ``arm_parameters`` gives arm k's Parameters under the solo run's names. Used by
``rankwise.together``, which trains the arms.
"""
from __future__ import annotations

import torch
from torch import nn

from rankwise.kernels.multi_lora import multi_lora_linear_arms

from .lora import inject_lora, lora_layers, lora_scaling


# ----------------------------------------------------------------------------- the layer

class MultiLoRALinear(nn.Module):
    """A frozen linear layer plus K LoRA arms, each applied to its own block of rows.

    With ``x`` of shape ``(n * G, ..., in)`` where the selected arms are ``G``
    (see ``select_arms``), the g-th block of ``n`` leading rows belongs to the
    g-th selected arm ``k``::

        y[block g] = x_g @ W.T + b + s_k * (drop_k(x_g) @ A_k.T) @ B_k.T

    with ``A_k`` (r_k, in), ``B_k`` (out, r_k), ``s_k = alpha_k / r_k`` (or
    ``alpha_k / sqrt(r_k)`` with rsLoRA), computed by ``multi_lora_linear_arms`` on
    the ``A_k`` / ``B_k`` of the selected arms.

    Args:
        base: the frozen ``nn.Linear`` or NF4 linear.
        A_init: one ``(r_k, in)`` tensor per arm, the arms' initial A (copied, fp32).
        alphas, dropouts: per arm.
        use_rslora: rank-stabilised scaling for every arm.
        generators: per arm, a ``torch.Generator`` the dropout seeds are drawn from
            (one per forward with dropout); None: torch's default generator.
        backend: passed to ``multi_lora_linear``.

    When exactly one arm is selected, ``lora_A``, ``lora_B``, ``scaling``, ``r``
    and ``alpha`` are that arm's, so ``rankwise.adapter``'s helpers see the
    model as the arm's solo LoRA model; otherwise ``lora_A`` / ``lora_B`` are None.

    Each arm's A and B are Parameters of their own (``arm_A[k]``, ``arm_B[k]``), so
    its gradients, AdamW state and PEFT export are its own; ``A_cat`` ``(sum(ranks), in)``
    and ``B_cat`` ``(out, sum(ranks))`` are the arms' adapters concatenated, not padded,
    with arm k at ``offsets[k]`` (the layout ``multi_lora_linear`` takes; its Triton
    path concatenates them once per call).
    """

    def __init__(self, base: nn.Module, A_init, alphas, dropouts, use_rslora: bool = False, generators=None,
                 backend: str = "auto"):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.ranks = [int(a.shape[0]) for a in A_init]
        self.alphas = [float(a) for a in alphas]
        self.dropouts = [float(p) for p in dropouts]
        self.use_rslora = bool(use_rslora)
        self.scalings = [lora_scaling(r, a, use_rslora) for r, a in zip(self.ranks, self.alphas)]
        self.generators = list(generators) if generators is not None else [None] * len(self.ranks)
        self.backend = backend
        dev = base.weight.device
        self.arm_A = nn.ParameterList([nn.Parameter(a.detach().to(dev, torch.float32).clone()) for a in A_init])
        self.arm_B = nn.ParameterList([nn.Parameter(torch.zeros(self.out_features, r, device=dev))
                                       for r in self.ranks])
        self.arms = list(range(len(self.ranks)))  # the arms the next forward computes, in row-block order

    @property
    def n_arms(self) -> int:
        return len(self.ranks)

    def _one(self, what):
        return getattr(self, what)[self.arms[0]] if len(self.arms) == 1 else None

    lora_A = property(lambda self: self._one("arm_A"))
    lora_B = property(lambda self: self._one("arm_B"))
    scaling = property(lambda self: self._one("scalings"))
    r = property(lambda self: self._one("ranks"))
    alpha = property(lambda self: self._one("alphas"))

    @property
    def offsets(self) -> list:
        """Arm k's first row of ``A_cat`` (and column of ``B_cat``): ``r_0 + ... + r_{k-1}``."""
        return [sum(self.ranks[:k]) for k in range(len(self.ranks))]

    @property
    def A_cat(self) -> torch.Tensor:
        """Every arm's A concatenated along dim 0: ``(sum(ranks), in_features)`` (a new tensor, differentiable)."""
        return torch.cat(list(self.arm_A), 0)

    @property
    def B_cat(self) -> torch.Tensor:
        """Every arm's B concatenated along dim 1: ``(out_features, sum(ranks))`` (a new tensor, differentiable)."""
        return torch.cat(list(self.arm_B), 1)

    def _seed(self, k: int, p: float) -> int:
        if p == 0.0:
            return 0
        return torch.randint(0, 2**31 - 1, (1,), generator=self.generators[k]).item()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arms = self.arms
        if not arms:
            raise RuntimeError("MultiLoRALinear: no arm is selected")
        if x.dim() < 2 or x.shape[0] % len(arms):
            raise ValueError(f"MultiLoRALinear: the input's leading dimension ({tuple(x.shape)}) must hold one "
                             f"block of rows per selected arm ({len(arms)})")
        rows = [x.numel() // x.shape[-1] // len(arms)] * len(arms)
        ps = [self.dropouts[k] if self.training else 0.0 for k in arms]
        seeds = [self._seed(k, p) for k, p in zip(arms, ps)]
        return multi_lora_linear_arms(x, self.base.weight, [self.arm_A[k] for k in arms],
                                      [self.arm_B[k] for k in arms], [self.scalings[k] for k in arms], rows,
                                      bias=self.base.bias, dropout_p=ps, seeds=seeds, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, ranks={self.ranks}, "
                f"alphas={self.alphas}, dropouts={self.dropouts}, rslora={self.use_rslora}, arms={self.arms}")


def multi_lora_layers(model: nn.Module) -> list:
    """``(name, MultiLoRALinear)`` pairs of a model, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MultiLoRALinear)]


def select_arms(model: nn.Module, arms) -> None:
    """Make every ``MultiLoRALinear`` of ``model`` compute ``arms`` (indices), one row block each, in that order."""
    for _, m in multi_lora_layers(model):
        m.arms = [int(k) for k in arms]


def arm_parameters(model: nn.Module, k: int) -> list:
    """Arm k's ``(name, Parameter)`` pairs under the solo run's names and order (``...q_proj.lora_A``, ``lora_B``)."""
    out = []
    for name, m in multi_lora_layers(model):
        out += [(f"{name}.lora_A", m.arm_A[k]), (f"{name}.lora_B", m.arm_B[k])]
    return out


def _per_arm(value, n: int, what: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{what}: expected one value per arm ({n}), got {len(values)}")
    return values


def inject_multi_lora(model: nn.Module, targets, ranks, alphas, dropouts=0.0, rslora: bool = False,
                      init: str = "default", seed=0, backend: str = "auto") -> nn.Module:
    """Replace the linear layers ``rankwise.lora.inject_lora`` would adapt by ``MultiLoRALinear`` with K arms.

    Arm k's initial A is exactly what a solo run draws: ``torch.manual_seed(seed_k)``,
    then ``inject_lora`` with the arm's rank (its layers are taken apart again and
    only their A kept); B starts at zero. Every other parameter is frozen.

    Args:
        model: a causal LM (modified in place and returned).
        targets: as ``inject_lora``'s ``target_modules``.
        ranks: one rank per arm; alphas, dropouts, seed: one value, or one per arm.
        rslora: rank-stabilised scaling; init: ``default`` or ``gaussian`` (not ``pissa``).
        backend: ``multi_lora_linear``'s.

    Leaves torch's global RNG as the last arm's solo run would have it after its init.
    """
    n = len(ranks)
    if n == 0:
        raise ValueError("ranks: expected at least one arm")
    alphas, dropouts = _per_arm(alphas, n, "alphas"), _per_arm(dropouts, n, "dropouts")
    seeds = _per_arm(seed, n, "seed")
    if str(init).startswith("pissa"):
        raise ValueError("init: pissa rewrites the base weights per rank, so arms cannot share one base; "
                         "use default or gaussian")
    if multi_lora_layers(model) or lora_layers(model):
        raise ValueError("model: it already carries LoRA layers")
    A_init, generators = {}, []
    for k in range(n):
        torch.manual_seed(int(seeds[k]))
        inject_lora(model, targets, int(ranks[k]), alphas[k], dropout=dropouts[k], use_rslora=rslora, init=init,
                    backend=backend)
        g = torch.Generator()
        g.set_state(torch.get_rng_state())  # where the solo run's dropout seeds start
        generators.append(g)
        for name, m in lora_layers(model):
            A_init.setdefault(name, []).append(m.lora_A.detach().float())
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, m.base)
    info = model.rankwise_lora
    for name in A_init:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MultiLoRALinear(getattr(parent, child), A_init[name], alphas, dropouts, rslora,
                                               generators, backend))
    # what adapter/save code reads of a LoRA model (targets); the ranks of the arms are on the layers
    model.rankwise_lora = dict(target_modules=info["target_modules"], replaced=info["replaced"],
                               ranks=[int(r) for r in ranks], alphas=alphas, dropouts=dropouts,
                               use_rslora=rslora, init=init)
    return model
