"""``fuse(model)``: batch norm -> activation, and batch norm -> add -> activation, as one layer.

The model is traced with ``torch.fx`` (:mod:`._fx`), so a chain is found wherever it is
written: modules in an ``nn.Sequential``, attributes called in ``forward`` (torchvision's
``BasicBlock`` and ``Bottleneck``), functional calls (``F.relu``, ``torch.relu``,
``x.relu()``, ``F.leaky_relu``, ``+``, ``+=``, ``torch.add``, ``x.add``). Each chain becomes
one call of a ``BatchNormAct1d/2d/3d`` (contract §8), and the result is a ``torch.fx``
``GraphModule`` running the rewritten graph.

What a chain is. A batch norm whose output has one use, an activation (ReLU, or LeakyReLU with
a constant slope >= 0), or an add whose result has one use, an activation. A batch norm is
fused when it is ``torch.nn``'s or this library's ``BatchNorm1d/2d/3d`` or this library's
``SyncBatchNorm`` (exact classes: a subclass may override ``forward``) and every call of it in
``forward`` heads a chain with the same activation; a ``SyncBatchNorm`` stays one, with the
activation. Everything else is left as it was, with the reason in the report.

The add's other operand becomes the fused layer's residual, which must have the batch norm's
input shape and dtype. Tracing gives no shapes: with ``example_inputs`` they are propagated
(on fake tensors: nothing is computed and no running statistic moves) and an add of another
shape is left; without them, the fused call checks the operand on every call (one shape
comparison) and computes an operand of another shape as the original did, unfused.
"""

from __future__ import annotations

import logging
import operator
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .. import _shapes as S
from . import _fx
from .convert import shared_copy
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormAct1d,
    BatchNormAct2d,
    BatchNormAct3d,
)

__all__ = ["FuseReport", "fuse"]

_log = logging.getLogger("batchnorm.torch")

# Exact classes only: a subclass may override forward, and the fused layer would not call it.
_FUSED = {nn.BatchNorm1d: BatchNormAct1d, nn.BatchNorm2d: BatchNormAct2d,
          nn.BatchNorm3d: BatchNormAct3d, BatchNorm1d: BatchNormAct1d,
          BatchNorm2d: BatchNormAct2d, BatchNorm3d: BatchNormAct3d}
_ALREADY_FUSED = (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d)

_RELU_FUNCTIONS = (F.relu, F.relu_, torch.relu, torch.relu_)
_LEAKY_FUNCTIONS = (F.leaky_relu, F.leaky_relu_, torch._C._nn.leaky_relu)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
# Producers whose backward does not read their output, so the memory-saving mode may write
# the batch norm's output over it (autograd would refuse the backward otherwise).
_OVERWRITABLE_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                         nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)
_OVERWRITABLE_FUNCTIONS = (operator.add, torch.add, torch.cat)


def _text(epilogue: S.Epilogue) -> str:
    if epilogue.activation == "relu":
        return "relu"
    return f"leaky_relu({epilogue.negative_slope:g})"


@dataclass
class _Chain:
    """One call of a batch norm and what follows it: ``act(bn(x) [+ residual])``."""

    bn: fx.Node
    act: fx.Node
    epilogue: S.Epilogue
    add: fx.Node | None = None
    residual: fx.Node | None = None
    checked: bool = False  # the residual's shape and dtype are known to be the input's

    def describe(self) -> str:
        act = f"{_text(self.epilogue)} ({_fx.describe(self.act)})"
        if self.add is None:
            return act
        return f"add ({_fx.describe(self.add)}, residual {_fx.describe(self.residual)}) + {act}"


def _activation(traced: _fx.Traced, node: fx.Node) -> tuple[S.Epilogue | None, str | None]:
    """``(epilogue, None)`` when ``node`` is a ReLU or a LeakyReLU the fused layer computes,
    ``(None, why not)`` when it is an activation that it cannot, ``(None, None)`` otherwise."""
    module = traced.module(node)
    # the classes themselves: a subclass may compute something else in its forward
    if type(module) is nn.ReLU:
        return S.Epilogue("relu"), None
    if type(module) is nn.LeakyReLU:
        slope = module.negative_slope
    elif node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return S.Epilogue("relu"), None
    elif node.op == "call_method" and node.target in ("relu", "relu_"):
        return S.Epilogue("relu"), None
    elif node.op == "call_function" and node.target in _LEAKY_FUNCTIONS:
        slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
    else:
        return None, None
    if isinstance(slope, fx.Node):
        return None, f"the slope of {_fx.describe(node)} is computed in forward"
    try:
        return S.check_epilogue("leaky_relu", slope), None
    except (TypeError, ValueError) as exc:  # a negative slope: y no longer tells pre's sign
        return None, f"{_fx.describe(node)} cannot be fused: {exc}"


def _add_operands(node: fx.Node) -> tuple[list, bool] | None:
    """``(operands, writes_first)`` of an add of two values, None for anything else."""
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        writes_first = node.target is operator.iadd
    elif node.op == "call_method" and node.target in ("add", "add_"):
        writes_first = node.target == "add_"
    else:
        return None
    extra = {k: v for k, v in node.kwargs.items() if k not in ("input", "other")}
    if extra.get("alpha", 1) != 1 or set(extra) - {"alpha"} or len(node.args) != 2:
        return None  # a scaled add, or an out= argument: not a plain residual add
    return list(node.args), writes_first


class _Finder:
    """The chains of a traced model, and the reason for every batch norm left as it was."""

    def __init__(self, traced: _fx.Traced, shapes: bool):
        self.traced = traced
        self.shapes = shapes  # node.meta["tensor_meta"] holds shapes (example_inputs given)

    def chain(self, bn: fx.Node) -> _Chain | str:
        """The chain that call ``bn`` heads, or why it heads none."""
        users = list(bn.users)
        if not users:
            return "its output is not used"
        if len(users) > 1:
            return (f"its output is used by {len(users)} operations ("
                    + ", ".join(_fx.describe(u) for u in users) + ")")
        user = users[0]
        epilogue, why = _activation(self.traced, user)
        if epilogue is not None:
            return _Chain(bn, user, epilogue)
        if why is not None:
            return why
        add = _add_operands(user)
        if add is None:
            return (f"its output goes to {_fx.describe(user)}, not to a ReLU, a LeakyReLU or "
                    "an add")
        return self._residual_chain(bn, user, *add)

    def _residual_chain(self, bn: fx.Node, add: fx.Node, operands: list,
                        writes_first: bool) -> _Chain | str:
        if operands[0] is bn and operands[1] is bn:
            return "its output is added to itself"
        other = operands[1] if operands[0] is bn else operands[0]
        if writes_first and operands[0] is not bn:
            return f"{_fx.describe(add)} adds it in place into {_fx.describe(other)}"
        if not isinstance(other, fx.Node):
            return f"its output is added to the constant {other!r}, not to a tensor of its shape"
        if other.op == "get_attr":
            return (f"its output is added to the attribute `{other.target}`, not to a tensor of "
                    "its shape")
        nxt = _fx.sole_user(add)
        if nxt is None:
            return (f"its output goes to {_fx.describe(add)}, whose result is used by "
                    f"{len(add.users)} operations")
        epilogue, why = _activation(self.traced, nxt)
        if epilogue is None:
            return why or (f"its output goes to {_fx.describe(add)}, and that to "
                           f"{_fx.describe(nxt)}, not to a ReLU or a LeakyReLU")
        checked = False
        if self.shapes:
            mine, theirs = _meta(_fx.first_input(bn)), _meta(other)
            if theirs is None or mine is None or (theirs.shape, theirs.dtype) != (
                    mine.shape, mine.dtype):
                got = "no tensor" if theirs is None else f"{tuple(theirs.shape)} {theirs.dtype}"
                want = "?" if mine is None else f"{tuple(mine.shape)} {mine.dtype}"
                return (f"its output goes to {_fx.describe(add)} with {got}, not with a tensor "
                        f"of its input's shape and dtype ({want})")
            checked = True
        return _Chain(bn, nxt, epilogue, add, other, checked)

    def overwrite_reason(self, chain: _Chain) -> str | None:
        """Why the memory-saving mode may not write this call's output over its input."""
        if not chain.epilogue.invertible:
            return f"{_text(chain.epilogue)} is not invertible"
        if chain.add is not None:
            return "it adds a residual"
        x = _fx.first_input(chain.bn)
        if x is None:
            return "its input is not a tensor computed in forward"
        if len(x.users) > 1:
            return ("its input is also read by "
                    + ", ".join(_fx.describe(u) for u in x.users if u is not chain.bn))
        module = self.traced.module(x)
        if type(module) in _OVERWRITABLE_MODULES or (  # exact: a subclass may keep its output
                x.op == "call_function" and x.target in _OVERWRITABLE_FUNCTIONS):
            return None
        return (f"its input comes from {_fx.describe(x)}, which may keep it (for its backward, "
                "or as a view of another tensor)")


def _meta(node) -> object | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return meta if hasattr(meta, "shape") else None


def fused_residual(bn: nn.Module, x: Tensor, z, activation: str,
                   negative_slope: float) -> Tensor:
    """``act(bn(x) + z)`` in the fused layer ``bn`` when ``z`` can be its residual (a tensor of
    x's shape, dtype and device); otherwise computed unfused, as the original model did: the
    layer's batch norm alone (its ``_batch_norm``, synchronized for a ``SyncBatchNorm`` in
    training), then the add and the activation.

    The graph calls this where the shapes were unknown when the model was fused.
    """
    if (isinstance(z, Tensor) and z.shape == x.shape and z.dtype == x.dtype
            and z.device == x.device):
        return bn(x, z)
    pre = bn._batch_norm(x, *bn._prepare(x)) + z
    return F.relu(pre) if activation == "relu" else F.leaky_relu(pre, negative_slope)


@dataclass(frozen=True)
class FuseReport:
    """What :func:`fuse` did.

    Attributes:
        fused: (batch norm, what it was fused with) qualified names and descriptions.
        left: (batch norm, the reason it was left as it was) for every other batch norm.
        not_in_place: with ``inplace=True``, (batch norm, why its fused layer does not write
            over its input) for fused LeakyReLU chains that could not.
        traced: whether the model's graph was traced; when not, the model is returned whole.
        trace_error: why tracing failed (or why the traced graph could not be used).
    """

    fused: tuple[tuple[str, str], ...] = ()
    left: tuple[tuple[str, str], ...] = ()
    not_in_place: tuple[tuple[str, str], ...] = ()
    traced: bool = True
    trace_error: str | None = None

    def __str__(self) -> str:
        lines = [f"fuse: {len(self.fused)} fused, {len(self.left)} left"]
        if not self.traced:
            lines.append(f"  the model could not be traced ({self.trace_error}); it is "
                         "returned whole")
        lines += [f"  fused {bn} with {what}" for bn, what in self.fused]
        lines += [f"  not in place {bn}: {why}" for bn, why in self.not_in_place]
        lines += [f"  left {bn}: {why}" for bn, why in self.left]
        return "\n".join(lines)


@dataclass
class _Plan:
    """The fate of one batch-norm module: its calls' chains, or why it stays."""

    name: str
    module: nn.Module
    chains: list[_Chain] = field(default_factory=list)
    reason: str | None = None
    overwrite: str | None = "not asked for"  # why not in place; None: in place


def _is_sync(module: nn.Module) -> bool:
    """Whether ``module`` is exactly this library's SyncBatchNorm (imported on first use, as
    it needs torch.distributed: a model holding one has imported it)."""
    sync = sys.modules.get(f"{__package__}.sync")
    return sync is not None and type(module) is sync.SyncBatchNorm


def fused_layer(bn: nn.Module, epilogue: S.Epilogue, inplace: bool) -> nn.Module:
    """The layer standing for ``bn`` followed by ``epilogue``, sharing ``bn``'s parameters and
    buffers: a ``BatchNormAct*d``, or for a ``SyncBatchNorm`` one with the activation (it has
    no memory-saving mode)."""
    fused = dict(activation=epilogue.activation, negative_slope=epilogue.negative_slope)
    if _is_sync(bn):
        return shared_copy(bn, type(bn), process_group=bn.process_group, **fused)
    return shared_copy(bn, _FUSED[type(bn)], inplace=inplace, **fused)


class _Fuser:
    """Finds the chains of ``root`` (a copy of the user's model) and rewrites them; ``build``
    makes the layer that stands for a batch norm and its activation (see :func:`rewrite`)."""

    def __init__(self, root: nn.Module, traced: _fx.Traced, inplace: bool, shapes: bool,
                 build: Callable[[nn.Module, S.Epilogue, bool], nn.Module]):
        self.root = root
        self.traced = traced
        self.finder = _Finder(traced, shapes)
        self.inplace = inplace
        self.build = build

    def plans(self) -> list[_Plan]:
        """Every batch norm of the model, with its chains or the reason it has none."""
        plans, called = [], set()
        for name, nodes in self.traced.calls.items():
            module = self.root.get_submodule(name)
            if not isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            called.add(id(module))
            plans.append(self._plan(name, module, nodes))
        self._settle_shared_adds(plans)
        for name, module in self.root.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and id(module) not in called:
                plans.append(_Plan(name or "<root>", module, reason="forward never calls it"))
        return plans

    def _plan(self, name: str, module: nn.Module, nodes: list[fx.Node]) -> _Plan:
        plan = _Plan(name, module)
        plan.reason = self._module_reason(module)
        if plan.reason is not None:
            return plan
        for i, node in enumerate(nodes):
            found = self.finder.chain(node)
            if isinstance(found, str):
                which = f"at its call {i + 1} of {len(nodes)}, " if len(nodes) > 1 else ""
                plan.reason = which + found
                return plan
            plan.chains.append(found)
        epilogues = {c.epilogue for c in plan.chains}
        if len(epilogues) > 1:
            plan.reason = (f"its {len(nodes)} calls are followed by different activations ("
                           + ", ".join(sorted(_text(e) for e in epilogues)) + ")")
        return plan

    def _module_reason(self, module: nn.Module) -> str | None:
        if isinstance(module, _ALREADY_FUSED) or (
                _is_sync(module) and module.activation is not None):
            return "it is already a fused layer"
        if type(module) not in _FUSED and not _is_sync(module):
            cls = type(module)
            return (f"its class {cls.__module__}.{cls.__qualname__} is not one that fuse "
                    "replaces (torch.nn's or this library's BatchNorm1d/2d/3d, this library's "
                    "SyncBatchNorm): another class may compute something else in forward")
        if (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks):
            return "it has hooks, which would see the fused layer's output instead of its own"
        return None

    def _settle_shared_adds(self, plans: list[_Plan]) -> None:
        """Two batch norms whose outputs meet in one add cannot both take it: the one that is
        the add's first operand does, and the other's output becomes its residual."""
        takers: dict[fx.Node, list[tuple[_Plan, _Chain]]] = {}
        for plan in plans:
            if plan.reason is None:
                for chain in plan.chains:
                    if chain.add is not None:
                        takers.setdefault(chain.add, []).append((plan, chain))
        for add, claims in takers.items():
            if len(claims) < 2:
                continue
            claims.sort(key=lambda pc: add.args.index(pc[1].bn) if pc[1].bn in add.args else 2)
            winner = claims[0][0]
            for plan, _ in claims[1:]:
                if plan is winner:
                    winner.reason = f"two of its calls meet in {_fx.describe(add)}"
                    continue
                plan.reason = (f"its output meets that of `{winner.name}` in "
                               f"{_fx.describe(add)}, which `{winner.name}`'s fused layer takes "
                               "(this output becomes its residual)")

    def rewrite(self, plans: list[_Plan]) -> None:
        """Put each fused layer in its batch norm's place and rewrite each chain's nodes."""
        graph = self.traced.graph
        for plan in plans:
            if plan.reason is not None:
                continue
            if self.inplace:
                reasons = [self.finder.overwrite_reason(c) for c in plan.chains]
                if _is_sync(plan.module):
                    reasons.insert(0, "SyncBatchNorm has no memory-saving mode")
                plan.overwrite = next((r for r in reasons if r is not None), None)
            fused = self.build(plan.module, plan.chains[0].epilogue, plan.overwrite is None)
            for path in _fx.paths(self.root, plan.module):
                _fx.replace(self.root, path, fused)
            for chain in plan.chains:
                self._rewrite_chain(graph, chain)
        graph.lint()

    @staticmethod
    def _rewrite_chain(graph: fx.Graph, chain: _Chain) -> None:
        bn = chain.bn
        if chain.add is None:  # the batch-norm call now activates too
            chain.act.replace_all_uses_with(bn)
            graph.erase_node(chain.act)
            return
        x = _fx.first_input(bn)
        # Read off the add as it is now: an earlier rewrite may have replaced the node that
        # computes the residual (a fused layer's output instead of its activation's).
        a, b = chain.add.args
        residual = b if a is bn else a
        # After the residual is computed (it may come later in the graph than the batch norm).
        with graph.inserting_before(chain.act):
            if chain.checked:
                call = graph.call_module(bn.target, (x, residual))
            else:
                module = graph.get_attr(bn.target)
                call = graph.call_function(fused_residual, (
                    module, x, residual, chain.epilogue.activation,
                    chain.epilogue.negative_slope))
        chain.act.replace_all_uses_with(call)
        for node in (chain.act, chain.add, bn):
            graph.erase_node(node)


def _what(plan: _Plan) -> str:
    calls = len(plan.chains)
    text = plan.chains[0].describe() + ("" if calls == 1 else f", at each of its {calls} calls")
    return text + (", in place" if plan.overwrite is None else "")


@overload
def fuse(model: nn.Module, example_inputs: Sequence | None = ..., *, inplace: bool = ...,
         report: Literal[False] = ...) -> nn.Module: ...
@overload
def fuse(model: nn.Module, example_inputs: Sequence | None = ..., *, inplace: bool = ...,
         report: Literal[True]) -> tuple[nn.Module, FuseReport]: ...


def fuse(model: nn.Module, example_inputs: Sequence | None = None, *, inplace: bool = False,
         report: bool = False):
    """``model`` with each batch norm -> ReLU / LeakyReLU and batch norm -> add -> ReLU /
    LeakyReLU chain replaced by one fused ``BatchNormAct1d/2d/3d`` call (contract §8).

    The model is traced with ``torch.fx`` (see the module docstring for what is found and what
    is left). Batch norms may be ``torch.nn``'s or this library's: a fused one becomes this
    library's ``BatchNormAct*d`` either way, and one that is not fused keeps its class, so
    ``fuse(convert_model(model))`` runs every batch norm on this library and ``fuse(model)``
    only the fused ones.

    The result computes what ``model`` computes, in training and in eval mode, forward and
    backward (up to the rounding of the fused kernels), and holds the same state: every
    parameter and buffer is shared with ``model`` (as :func:`convert_model` shares them, so an
    optimizer built on either trains both), each fused layer sits where its batch norm was, and
    ``state_dict`` keys are unchanged, so each model loads the other's checkpoints. ``model``
    itself is not modified.

    Args:
        model: any module; its submodules keep their training flags.
        example_inputs: optional positional inputs of one forward call; their shapes decide
            which adds can take their other operand as the fused layer's residual (that
            operand must have the batch norm's input shape and dtype). They are only
            propagated on fake tensors. Without them the check is made on every call.
        inplace: the memory-saving mode for LeakyReLU chains (slope > 0) without an add:
            the fused layer writes its output over its input and backward recovers the
            normalized input from the output (contract §8; ``|weight|`` is clamped to
            ``GAMMA_MIN`` in forward). Used where no other operation reads that input and
            the layer producing it (a convolution, a linear layer, an add or a cat) does not
            need it for its own backward; the report says where it was not.
        report: also return a :class:`FuseReport`.

    Returns:
        a ``torch.fx.GraphModule`` (named after ``model``'s class, with its submodules and
        public attributes), or ``model`` itself when nothing was fused or it could not be
        traced; with ``report=True``, ``(result, FuseReport)``. The report is also logged
        (logger ``batchnorm.torch``, INFO; a model that cannot be traced, WARNING).
    """
    return rewrite(model, example_inputs, inplace=inplace, report=report, build=fused_layer)


def rewrite(model: nn.Module, example_inputs: Sequence | None = None, *, inplace: bool,
            report: bool, build: Callable[[nn.Module, S.Epilogue, bool], nn.Module]):
    """:func:`fuse` with another layer in each chain's place: ``build(bn, epilogue,
    inplace)`` returns a module whose ``forward(input, residual=None)`` computes
    ``act(bn(input) + residual)``. (The training benchmark builds torch.nn's unfused
    composition with it, so that the same stretch of the graph is timed in both models.)
    """
    root = _fx.copy_sharing_tensors(model)
    traced, why = _fx.trace_for_rewrite(root)
    if traced is None:
        result = FuseReport(traced=False, trace_error=why)
        _log.warning("%s", result)
        return (model, result) if report else model
    shapes = example_inputs is not None
    if shapes:
        _fx.propagate_shapes(root, traced.graph, example_inputs)
    fuser = _Fuser(root, traced, inplace, shapes, build)
    plans = fuser.plans()
    fuser.rewrite(plans)
    done = [p for p in plans if p.reason is None]
    result = FuseReport(
        fused=tuple((p.name, _what(p)) for p in done),
        left=tuple((p.name, p.reason) for p in plans if p.reason is not None),
        # only where the mode could apply: relu is never inverted, so never worth a line
        not_in_place=tuple((p.name, p.overwrite) for p in done if inplace and p.overwrite
                           and p.chains[0].epilogue.invertible),
    )
    _log.info("%s", result)
    out = _fx.graph_module(root, traced.graph, type(model).__name__) if done else model
    return (out, result) if report else out
