"""Validation and the canonical view, in one place for every backend.

Every call resolves its ``mode`` / ``channel_axis`` / ``axis`` arguments into a
:class:`Layout`: which axes are reduced, which are kept (the "channels"), and the shape
the parameters must have. Kernels never see "NCHW" or "per_activation": they get the
3-d view ``(A, C, B)`` of :func:`as_3d`, reduced over ``A`` and ``B``, with
``C = prod(kept shape)``. Spatial NCHW is ``(N, C, H*W)``, channels-last is
``(N*H*W, C, 1)``, per-activation is ``(N, C*H*W, 1)``.

The error types and messages here are part of the contract (docs/contract.md §5).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

MODES = ("per_activation", "spatial", "spatial_persistent")
ACTIVATIONS = ("relu", "leaky_relu")

DEFAULT_MODE = "spatial"
DEFAULT_CHANNEL_AXIS = 1


@dataclass(frozen=True)
class Layout:
    """How one call sees its input.

    Attributes:
        shape: the input's shape.
        mode: the resolved mode (``"axis"`` when an explicit ``axis`` tuple was given).
        reduce_axes: axes the statistics are taken over, ascending.
        kept_axes: the other axes, ascending; parameters have their sizes in this order.
        param_shape: shape of gamma / beta / mean / var / saved statistics.
        count: M, the number of values per channel (product of the reduced sizes).
        channels: C, the number of channels (product of ``param_shape``).
    """

    shape: tuple[int, ...]
    mode: str
    reduce_axes: tuple[int, ...]
    kept_axes: tuple[int, ...]

    @functools.cached_property
    def param_shape(self) -> tuple[int, ...]:
        return tuple(self.shape[a] for a in self.kept_axes)

    @functools.cached_property
    def count(self) -> int:
        return count_of(self.shape, self.reduce_axes)

    @functools.cached_property
    def channels(self) -> int:
        return math.prod(self.param_shape)

    @functools.cached_property
    def broadcast_shape(self) -> tuple[int, ...]:
        """The input's shape with reduced axes set to 1: parameters reshape to this."""
        return broadcast_of(self.shape, self.reduce_axes)

    @functools.cached_property
    def kept_adjacent(self) -> bool:
        """True when the kept axes are consecutive, so :func:`as_3d` can be a view."""
        k = self.kept_axes
        return not k or k[-1] - k[0] + 1 == len(k)

    @functools.cached_property
    def perm(self) -> tuple[int, ...]:
        """Axis order that brings the kept axes together: reduced axes before the first kept
        axis, the kept axes, then the other reduced axes. ``(A, C, B)`` is this order,
        merged."""
        k = self.kept_axes
        if not k:
            return tuple(range(len(self.shape)))
        before = [a for a in self.reduce_axes if a < k[0]]
        after = [a for a in self.reduce_axes if a > k[0]]
        return (*before, *k, *after)

    @functools.cached_property
    def dims3(self) -> tuple[int, int, int]:
        """``(A, C, B)``: reduced size before the kept block, channels, reduced size after."""
        if not self.kept_axes:
            return (self.count, 1, 1)
        first = self.kept_axes[0]
        before = math.prod(self.shape[a] for a in self.reduce_axes if a < first)
        after = math.prod(self.shape[a] for a in self.reduce_axes if a > first)
        return (before, self.channels, after)


@dataclass(frozen=True)
class Epilogue:
    """The activation that follows the affine transform (contract §8).

    ``y = act(gamma * xhat + beta + residual)``; the residual is an array passed beside the
    epilogue, which holds only what a kernel can specialise on.

    Attributes:
        activation: ``"relu"`` or ``"leaky_relu"``.
        negative_slope: leaky_relu's slope for negative inputs, >= 0 (0 for relu).
    """

    activation: str
    negative_slope: float = 0.0

    @property
    def invertible(self) -> bool:
        """Whether the input can be recovered from the output (the memory-saving mode)."""
        return self.activation == "leaky_relu" and self.negative_slope > 0

    @property
    def slope(self) -> float:
        """The factor of negative inputs: relu is leaky_relu with slope 0."""
        return 0.0 if self.activation == "relu" else self.negative_slope


def check_epilogue(activation: Any, negative_slope: Any = 0.01) -> Epilogue | None:
    """Validate ``activation`` / ``negative_slope``; None for no activation."""
    if activation is None:
        return None
    if activation not in ACTIVATIONS:
        _fail(ValueError, f"unknown activation {activation!r}; valid choices are None, "
                          + ", ".join(map(repr, ACTIVATIONS)))
    if activation == "relu":
        return Epilogue("relu", 0.0)
    number = (int, float, np.integer, np.floating)
    if isinstance(negative_slope, bool) or not isinstance(negative_slope, number):
        _fail(TypeError, f"negative_slope must be a number, got {negative_slope!r}")
    slope = float(negative_slope)
    if not (math.isfinite(slope) and slope >= 0):
        _fail(ValueError, "negative_slope must be a finite number >= 0 (the output must tell "
                          f"the sign of its input), got {negative_slope!r}")
    return Epilogue("leaky_relu", slope)
def count_of(shape, reduce_axes) -> int:
    """M, the number of values per channel: the product of the reduced sizes."""
    m = 1
    for a in reduce_axes:  # a loop, which a compiler traces, rather than math.prod
        m *= shape[a]
    return m


def broadcast_of(shape, reduce_axes) -> tuple[int, ...]:
    """``shape`` with the reduced axes set to 1: the shape per-channel tensors broadcast as.

    :class:`Layout` answers both once per layout; these serve code that must not cache
    (sizes that are symbolic while a compiler traces)."""
    return tuple(1 if a in reduce_axes else n for a, n in enumerate(shape))


def _fail(exc: type[Exception], message: str) -> None:
    raise exc(message)


def resolve_layout(
    shape: tuple[int, ...],
    mode: str | None = None,
    channel_axis: int | None = None,
    axis: Any = None,
) -> Layout:
    """Turn the user's ``mode`` / ``channel_axis`` / ``axis`` into a :class:`Layout`.

    ``mode`` defaults to ``"spatial"`` and ``channel_axis`` to 1 (None means "not given").
    ``axis`` (Chainer's convention, the axes to reduce over) replaces both; giving it together
    with either is an error.
    Layouts are cached: a training loop sees the same few shapes on every call.
    """
    if isinstance(axis, list):
        axis = tuple(axis)
    if isinstance(axis, tuple) and not all(type(a) is int for a in axis):
        # The cache finds keys by ==, and (0.0, 2) == (0, 2): typed=True tells 1.0 from 1
        # but does not look inside tuples. Anything but plain ints is resolved uncached.
        return _resolve(tuple(shape), mode, channel_axis, axis)
    try:
        return _resolve_cached(tuple(shape), mode, channel_axis, axis)
    except TypeError as exc:  # unhashable argument: resolve without the cache
        if "unhashable" not in str(exc):
            raise
        return _resolve(tuple(shape), mode, channel_axis, axis)


def _resolve(shape, mode, channel_axis, axis) -> Layout:
    shape = tuple(int(n) for n in shape)
    ndim = len(shape)
    if axis is not None:
        if mode is not None or channel_axis is not None:
            _fail(ValueError, "give either `axis` or `mode`/`channel_axis`, not both")
        try:
            axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
        except TypeError:  # not iterable: one (bad) entry
            axes = (axis,)
        if not axes:
            _fail(ValueError, "`axis` must name at least one axis to reduce over")
        norm = []
        for a in axes:
            if not _is_index(a) or not -ndim <= a < ndim:
                _fail(
                    ValueError,
                    f"`axis` entry {a!r} is out of range for an input of rank {ndim}; "
                    f"valid choices are integers in [{-ndim}, {ndim - 1}]",
                )
            norm.append(int(a) % ndim)
        if len(set(norm)) != len(norm):
            _fail(ValueError, f"`axis` {tuple(axes)} names an axis twice")
        reduce_axes = tuple(sorted(norm))
        kept = tuple(a for a in range(ndim) if a not in reduce_axes)
        return Layout(shape, "axis", reduce_axes, kept)

    if ndim < 2 and (mode is None or mode in MODES):  # here, where the message has the shape
        _fail(ValueError, f"expected an input of rank 2 or more (N, C, ...), got shape {shape}")
    return Layout(shape, *mode_axes(ndim, mode, channel_axis))


def mode_axes(ndim: int, mode: str | None = None, channel_axis: Any = None
              ) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """``(mode, reduce_axes, kept_axes)`` of a ``mode`` / ``channel_axis`` call on an input of
    rank ``ndim``: what a :class:`Layout` holds besides the sizes, which it does not need.

    The torch layer uses it on shapes whose sizes may be symbolic (under ``torch.compile``),
    where :func:`resolve_layout` would turn them into numbers.
    """
    try:
        return _mode_axes_cached(ndim, mode, channel_axis)
    except TypeError as exc:  # unhashable argument: resolve without the cache
        if "unhashable" not in str(exc):
            raise
        return _mode_axes(ndim, mode, channel_axis)


def _mode_axes(ndim, mode, channel_axis):
    mode = DEFAULT_MODE if mode is None else mode
    channel_axis = DEFAULT_CHANNEL_AXIS if channel_axis is None else channel_axis
    if mode not in MODES:
        _fail(ValueError, f"unknown mode {mode!r}; valid choices are {', '.join(map(repr, MODES))}")
    if ndim < 2:
        _fail(
            ValueError,
            f"expected an input of rank 2 or more (N, C, ...), got rank {ndim}",
        )
    valid = [*range(1, ndim), *range(-ndim + 1, 0)]
    if not _is_index(channel_axis) or channel_axis not in valid:
        _fail(
            ValueError,
            f"channel_axis {channel_axis!r} is out of range for an input of rank {ndim}; "
            f"valid choices are {valid} (axis 0 is the batch axis)",
        )
    if mode == "per_activation":
        reduce_axes = (0,)
    else:
        c = int(channel_axis) % ndim
        reduce_axes = tuple(a for a in range(ndim) if a != c)
    kept = tuple(a for a in range(ndim) if a not in reduce_axes)
    return mode, reduce_axes, kept


_mode_axes_cached = functools.lru_cache(maxsize=256, typed=True)(_mode_axes)


def _is_index(a: Any) -> bool:
    """An integer that may name an axis: bools are refused, as NumPy refuses them."""
    return isinstance(a, (int, np.integer)) and not isinstance(a, bool)


# typed: 1.0 and True must not hit the entry for channel_axis=1
_resolve_cached = functools.lru_cache(maxsize=1024, typed=True)(_resolve)


def check_float_dtype(name: str, dtype: Any) -> None:
    """Refuse every dtype but float16, float32 and float64 (in either byte order) with a
    TypeError (contract §5): integers, bools, complex numbers and longdouble."""
    dt = np.dtype(dtype)
    if dt.kind != "f" or dt.itemsize not in (2, 4, 8):
        _fail(
            TypeError,
            f"`{name}` must have a floating-point dtype (float16, float32, float64), got {dt}",
        )


def stats_dtype(dtype: Any) -> np.dtype:
    """float64 statistics for float64 input, float32 for every narrower float."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _check_subclass(name: str, value: Any, *, written: bool) -> None:
    """Refuse the ndarray subclasses whose meaning a plain view would lose: a masked array's
    mask, and (for arrays we write into) np.matrix, which is 2-d whatever it holds."""
    if type(value) is np.ndarray or not isinstance(value, np.ndarray):
        return
    if isinstance(value, np.ma.MaskedArray):
        _fail(TypeError, f"`{name}` is a masked array, and batch norm has no notion of a mask; "
                         f"pass {name}.filled(value) or the compressed values instead")
    if written and isinstance(value, np.matrix):
        _fail(TypeError, f"`{name}` is an np.matrix, which cannot take a result of rank other "
                         f"than 2; pass np.asarray({name}) (a view of the same memory)")


def as_array(name: str, value: Any) -> np.ndarray:
    """The value as a NumPy float array (no copy for arrays), or a TypeError."""
    _check_subclass(name, value, written=False)
    arr = np.asarray(value)
    check_float_dtype(name, arr.dtype)
    return arr


def check_param(name: str, value: Any, layout: Layout, *, optional: bool = True) -> Any:
    """Validate a per-channel argument: floating dtype and exactly ``layout.param_shape``."""
    if value is None:
        if optional:
            return None
        _fail(ValueError, f"`{name}` is required")
    arr = as_array(name, value)
    expected = layout.param_shape
    if arr.shape != expected:
        _fail(
            ValueError,
            f"`{name}` must have shape {expected} (the kept axes of an input of shape "
            f"{layout.shape} in mode {layout.mode!r}), got shape {arr.shape}",
        )
    return arr


def check_running(name: str, value: Any, layout: Layout) -> np.ndarray | None:
    """Running statistics are updated in place, so they must be writable ndarrays."""
    if value is None:
        return None
    if not isinstance(value, np.ndarray):
        _fail(
            TypeError,
            f"`{name}` is updated in place and must be a NumPy array, got {type(value).__name__}",
        )
    _check_subclass(name, value, written=True)
    arr = check_param(name, value, layout)
    if not arr.flags.writeable:
        _fail(ValueError, f"`{name}` is updated in place but is read-only")
    return arr


def check_scalars(eps: Any, momentum: Any = 0.0) -> tuple[float, float]:
    """``eps`` finite and >= 0; ``momentum`` in [0, 1]."""
    try:
        e = float(eps)
    except (TypeError, ValueError):
        _fail(ValueError, f"eps must be a finite number >= 0, got {eps!r}")
    if not math.isfinite(e) or e < 0:
        _fail(ValueError, f"eps must be a finite number >= 0, got {eps!r}")
    try:
        m = float(momentum)
    except (TypeError, ValueError):
        _fail(ValueError, f"momentum must be a number in [0, 1], got {momentum!r}")
    if not 0.0 <= m <= 1.0:  # also refuses NaN
        _fail(ValueError, f"momentum must be a number in [0, 1], got {momentum!r}")
    return e, m


def check_training_count(layout: Layout, size: Any = None) -> None:
    """At least two values per channel are needed for a variance (empty input is allowed).

    ``size`` is the input's shape as the caller's framework prints it (``torch.Size`` in
    :mod:`batchnorm.torch`, so the message is torch.nn's own); the layout's shape otherwise.
    """
    if layout.count == 1 and math.prod(layout.shape) > 0:
        raise too_few_values(layout.shape if size is None else size)


def too_few_values(size: Any, detail: str = "") -> ValueError:
    """The error for one value per channel in training: torch.nn's own message, so callers
    of every layer (NumPy API, batchnorm.torch, SyncBatchNorm) see the same one."""
    message = f"Expected more than 1 value per channel when training, got input size {size}"
    return ValueError(f"{message} ({detail})" if detail else message)


def check_same_shape(name: str, arr: np.ndarray, layout: Layout) -> None:
    if tuple(arr.shape) != layout.shape:
        _fail(ValueError, f"`{name}` must have the input's shape {layout.shape}, got {arr.shape}")


def check_out(out: Any, x: np.ndarray, *inputs: Any, inplace: bool = False
              ) -> np.ndarray | None:
    """``out`` must be a writable ndarray of x's shape and dtype that overlaps no input.

    ``inplace``: ``out`` is ``x`` itself (the memory-saving mode, already checked by
    :func:`check_epilogue_args`); it must still overlap none of the other inputs.
    """
    if out is None:
        return None
    if not isinstance(out, np.ndarray):
        _fail(TypeError, f"`out` must be a NumPy array, got {type(out).__name__}")
    _check_subclass("out", out, written=True)
    if out.shape != x.shape:
        _fail(ValueError, f"`out` must have the input's shape {x.shape}, got {out.shape}")
    if out.dtype != x.dtype:
        _fail(TypeError, f"`out` must have the input's dtype {x.dtype}, got {out.dtype}")
    if not out.flags.writeable:
        _fail(ValueError, "`out` is read-only")
    for arr in inputs if inplace else (x, *inputs):
        if isinstance(arr, np.ndarray) and np.may_share_memory(out, arr):
            _fail(ValueError, "`out` overlaps an input; pass a separate buffer")
    return out


# The memory-saving mode divides by gamma to recover xhat from y: |gamma| must stay this far
# from 0 (In-Place ABN's choice; batchnorm.torch's fused layers clamp to it, contract §8).
GAMMA_MIN = 1e-5


def check_same_dtype(name: str, arr: np.ndarray, like: np.ndarray) -> None:
    if arr.dtype != like.dtype:
        _fail(TypeError, f"`{name}` must have dtype {like.dtype}, got {arr.dtype}")


def _same_view(out: Any, x: np.ndarray) -> bool:
    """Whether ``out`` is ``x`` or a view of exactly x's elements, in x's order."""
    if out is x:
        return True
    return (isinstance(out, np.ndarray) and out.shape == x.shape and out.dtype == x.dtype
            and out.strides == x.strides
            and out.__array_interface__["data"][0] == x.__array_interface__["data"][0])


def inplace_refusal(epilogue: Epilogue | None, residual: bool, asked: str) -> str | None:
    """Why the memory-saving mode (contract §8) cannot run, or None: it needs an invertible
    activation (none, or leaky_relu with a slope > 0) and no residual, since backward
    recovers xhat from y alone. ``asked`` names how the caller asked for the mode."""
    if epilogue is not None and not epilogue.invertible:
        return (f"{asked} (y written over the input) needs an invertible activation (None, "
                f"or leaky_relu with a negative_slope > 0), got {epilogue.activation!r} with "
                f"slope {epilogue.negative_slope}: backward recovers the normalized input "
                "from y")
    if residual:
        return (f"{asked} (y written over the input) is not supported with a residual: "
                "xhat could not be recovered from y alone")
    return None


def check_epilogue_args(x: np.ndarray, gamma: np.ndarray | None, out: Any, layout: Layout,
                        activation: Any, negative_slope: Any, residual: Any
                        ) -> tuple[Epilogue | None, np.ndarray | None, bool]:
    """``(epilogue, residual, inplace)`` of a forward call (contract §8).

    ``residual`` must have x's shape and dtype. ``out is x`` asks for the memory-saving mode,
    which needs an invertible activation, no residual, and ``|gamma| >= GAMMA_MIN``.
    """
    epilogue = check_epilogue(activation, negative_slope)
    if residual is not None:
        residual = as_array("residual", residual)
        check_same_shape("residual", residual, layout)
        check_same_dtype("residual", residual, x)
    inplace = _same_view(out, x)
    if inplace:
        why = inplace_refusal(epilogue, residual is not None, "`out=x`")
        if why is not None:
            _fail(ValueError, why)
        if gamma is not None and not (np.abs(gamma) >= GAMMA_MIN).all():
            _fail(ValueError, f"`out=x` (y written over x) needs every |gamma| >= {GAMMA_MIN} "
                              "to recover xhat from y")
    return epilogue, residual, inplace


def check_backward_epilogue(dy: np.ndarray, x: np.ndarray | None, y: Any,
                            gamma: np.ndarray | None, layout: Layout, activation: Any,
                            negative_slope: Any) -> tuple[Epilogue | None, np.ndarray | None]:
    """``(epilogue, y)`` of a backward call: y is needed with an activation and without x."""
    epilogue = check_epilogue(activation, negative_slope)
    if y is None:
        if epilogue is not None:
            _fail(ValueError, "`y` (the forward's output) is required with an activation: "
                              "act'(pre) is read off its sign")
        if x is None:
            _fail(ValueError, "give `x`, or `y` in the memory-saving mode (x overwritten)")
        return epilogue, None
    y = as_array("y", y)
    check_same_shape("y", y, layout)
    check_same_dtype("y", y, dy)
    if x is None:
        if epilogue is not None and not epilogue.invertible:
            _fail(ValueError, f"x cannot be recovered from y through {epilogue.activation!r} "
                              f"with slope {epilogue.negative_slope}; pass `x`")
        if gamma is not None and not (np.abs(gamma) >= GAMMA_MIN).all():
            _fail(ValueError, f"recovering xhat from y needs every |gamma| >= {GAMMA_MIN}")
    return epilogue, y


def check_running_aliases(running_mean, running_var, x, gamma, beta, residual=None) -> None:
    """The running statistics (written in place) share no memory with an input or with each
    other: through an alias, an update would change x or gamma behind the caller's back."""
    for name, arr in (("running_mean", running_mean), ("running_var", running_var)):
        if arr is None:
            continue
        for other, b in (("x", x), ("gamma", gamma), ("beta", beta), ("residual", residual),
                         ("running_var", running_var if arr is not running_var else None)):
            # Two arrays without a base each own their memory (NumPy gives every view a
            # base), so they cannot overlap: the common case costs no memory test. Else
            # may_share_memory compares bounds, and shares_memory decides exactly, so that
            # interleaved views of one buffer (a[0::2], a[1::2]) are not refused.
            if b is None or (arr.base is None and b.base is None and arr is not b):
                continue
            if np.may_share_memory(arr, b) and np.shares_memory(arr, b):
                _fail(ValueError, f"`{name}` shares memory with `{other}`; the running "
                                  "statistics are written in place and must be separate arrays")


def channel_names(layout: Layout, bad: np.ndarray) -> str:
    """Human-readable list of the flagged channels (multi-index for per-activation)."""
    if hasattr(bad, "cpu"):  # a torch mask from the GPU backend
        bad = bad.cpu().numpy()
    idx = np.flatnonzero(np.asarray(bad).reshape(-1))
    shape = layout.param_shape
    names = [
        str(int(i)) if len(shape) == 1 else str(tuple(int(j) for j in np.unravel_index(i, shape)))
        for i in idx[:20]
    ]
    more = f" and {idx.size - 20} more" if idx.size > 20 else ""
    return ", ".join(names) + more


def raise_bad_channels(layout: Layout, bad: Any) -> None:
    """``check_finite``'s error (contract §5): a FloatingPointError naming the channels that
    ``bad`` (a [param_shape] mask) flags."""
    raise FloatingPointError(
        "non-finite batch statistics or output in channel(s) " + channel_names(layout, bad)
    )


def as_3d(arr: np.ndarray, layout: Layout) -> np.ndarray:
    """View ``arr`` (of ``layout.shape``) as ``(A, C, B)``; a view whenever NumPy can make one.

    When the kept axes are not adjacent the kept block is first moved together, which copies.
    Reshaping a non-contiguous array may also copy: callers that write into the result must
    check ``np.shares_memory`` and copy back with :func:`from_3d` when it is not a view.
    """
    if not layout.kept_adjacent:
        arr = arr.transpose(layout.perm)
    return arr.reshape(layout.dims3)


@np.errstate(over="ignore")  # a float32 -> float16 cast may overflow to inf: check_finite says so
def from_3d(buf: np.ndarray, arr: np.ndarray, layout: Layout) -> None:
    """Copy a 3-d result back into ``arr`` (the inverse of :func:`as_3d`)."""
    if not layout.kept_adjacent:
        order = layout.perm
        arr.transpose(order)[...] = buf.reshape([layout.shape[a] for a in order])
    else:
        arr[...] = buf.reshape(layout.shape)
