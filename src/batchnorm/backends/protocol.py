"""What a backend implements: the phases of batch norm, and the whole calls composed of them.

Batch norm is two reductions, each followed by an element-wise pass:

=============  ================================================================  ==========
phase          computes                                                          reads
=============  ================================================================  ==========
moments        per channel ``(count, mean, m2)``, m2 = sum((x - mean)^2)         x
apply          ``y = act(gamma * (x - mean) * invstd + beta + residual)``        x (z)
grad_sums      per channel ``(sum(g), sum(g * xhat))``, g = dy * act'(pre)       dy, x (y)
grad_apply     ``dx = gamma invstd (g - (sum g + xhat sum(g xhat)) / M)``, dz = g  dy, x (y)
=============  ================================================================  ==========

Moments of disjoint parts of a batch merge exactly (:func:`merge_moments`), and gradient
sums add, so a distributed layer runs the phases with one collective between each pair
(``SyncBatchNorm``). A single process calls the whole calls, ``forward_training``,
``forward_inference`` and ``backward``, which a backend may implement as single-read
composites (a channel's slice stays in cache, or on chip, between the reduction and the
element-wise pass) where that is faster than the phases one after another. Both must give
the reference's results within the dtype's tolerance (contract §1, §8).

The epilogue (:class:`batchnorm._shapes.Epilogue`: relu or leaky_relu) and the residual are
arguments of ``apply`` and of the gradient phases; without them each phase is plain batch norm.
In the memory-saving mode ``x`` is None in the gradient phases and xhat is recovered from the
output: ``xhat = (act^-1(y) - beta) / gamma``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

Array = Any  # a NumPy array, or a torch tensor for the gpu backend


@runtime_checkable
class Backend(Protocol):
    """A backend module. Every argument is validated before it gets here (``_shapes``);
    arrays may have any strides; ``layout`` says which axes are reduced."""

    NAME: str

    def unavailable_reason(self, x: Array) -> str | None:
        """None when this backend can run a call on ``x``; otherwise why not."""

    def moments(self, x: Array, layout) -> tuple[int, Array, Array]:
        """``(count, mean, m2)`` per channel, in the statistics dtype or wider."""

    def apply(self, x: Array, mean: Array, invstd: Array, gamma: Array | None,
              beta: Array | None, layout, *, residual: Array | None = None, epilogue=None,
              out: Array | None = None) -> Array:
        """``y = act(gamma * (x - mean) * invstd + beta + residual)`` in x's dtype."""

    def grad_sums(self, dy: Array, x: Array | None, mean: Array, invstd: Array, layout, *,
                  y: Array | None = None, gamma: Array | None = None,
                  beta: Array | None = None, epilogue=None) -> tuple[Array, Array]:
        """``(sum(g), sum(g * xhat))`` per channel with ``g = dy * act'(pre)``."""

    def grad_apply(self, dy: Array, x: Array | None, mean: Array, invstd: Array,
                   gamma: Array | None, sums: tuple[Array, Array], layout, *, count: int,
                   training: bool = True, y: Array | None = None, beta: Array | None = None,
                   epilogue=None, out: Array | None = None, out_dz: Array | None = None,
                   want_dz: bool = False) -> tuple[Array, Array | None]:
        """``(dx, dz)``: dx from g and the sums over ``count`` values per channel; dz = g."""

    def forward_training(self, x: Array, gamma: Array | None, beta: Array | None, layout, *,
                         eps: float, momentum: float = 0.1, running_mean: Array | None = None,
                         running_var: Array | None = None, out: Array | None = None,
                         check_finite: bool = False, residual: Array | None = None,
                         epilogue=None) -> tuple[Array, Array, Array, Array | None]:
        """``(y, mean, invstd, bad)``: moments, statistics, running update and apply."""

    def forward_inference(self, x: Array, gamma: Array | None, beta: Array | None,
                          mean: Array, var: Array, layout, *, eps: float,
                          out: Array | None = None, residual: Array | None = None,
                          epilogue=None) -> Array:
        """``apply`` with ``invstd = 1 / sqrt(var + eps)`` (0 where that is 0)."""

    def backward(self, dy: Array, x: Array | None, gamma: Array | None, mean: Array,
                 invstd: Array, layout, *, training: bool = True, out: Array | None = None,
                 y: Array | None = None, beta: Array | None = None, epilogue=None,
                 residual: bool = False, out_dz: Array | None = None) -> tuple:
        """``(dx, dgamma, dbeta)``, and ``dz`` last when ``residual``: the gradient phases."""


def merge_moments(counts, means, m2s):
    """Chan et al.'s merge of per-part ``(n_r, mean_r, m2_r)`` into the whole's ``(n, mean,
    m2)``; works on NumPy arrays and torch tensors alike (float64 advised).

        n = sum n_r,  mean = sum n_r mean_r / n,  m2 = sum m2_r + sum n_r (mean_r - mean)^2

    Args:
        counts: [P, 1] values per channel of each part (parts may be empty).
        means, m2s: [P, C] each part's per-channel mean and m2.
    Returns:
        ``(n, mean [C], m2 [C])``; mean and m2 are 0 when n is 0.
    """
    n = counts.sum()
    if n == 0:
        return 0, means.sum(0) * 0, m2s.sum(0) * 0
    mean = (counts * means).sum(0) / n
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return n, mean, m2
