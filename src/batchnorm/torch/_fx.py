"""Layer patterns in a model's dataflow graph, found by tracing it with ``torch.fx``.

Model surgery must follow the data, not the order in which modules are declared: a block
that calls ``self.bn1(self.conv1(x))`` in its ``forward`` holds the same conv -> batch norm
pair as ``nn.Sequential(conv, bn)``, and a module called twice is two uses of one set of
weights. :func:`trace` turns a model into a graph of calls; the helpers below answer the
questions a rewrite asks of it (which module a node calls, who uses a node's output, which
chains of nodes match a pattern, what else reads a module's parameters). ``fold_batchnorm``
uses them for conv/linear -> batch norm, ``fuse`` for batch norm -> ReLU and batch norm -> add
-> ReLU; :func:`trace_for_rewrite`, :func:`propagate_shapes` and :func:`graph_module` turn a
rewritten graph back into a model that holds the original's state.

Tracing is symbolic: a ``forward`` whose control flow depends on tensor values cannot be
traced, and :func:`trace` then says why instead of raising.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import fx, nn


class Tracer(fx.Tracer):
    """``torch.fx``'s tracer, keeping every batch norm (torch's, ours, user subclasses) and
    every layer of ``batchnorm.torch`` as one opaque call: surgery replaces whole modules,
    and their own ``forward`` need not be traceable. (Models defined elsewhere in this
    package, such as the CLI's networks, are traced through like any user's.)"""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (isinstance(m, nn.modules.batchnorm._BatchNorm)
                or type(m).__module__.startswith(__package__ + ".")
                or super().is_leaf_module(m, qualname))


@dataclass
class Traced:
    """A model's call graph.

    Attributes:
        root: the traced model.
        graph: the ``torch.fx`` graph, or None when tracing failed.
        error: why tracing failed (``"TraceError: ..."``), or None.
        calls: for each called module's qualified name, its call nodes in graph order.
    """

    root: nn.Module
    graph: fx.Graph | None
    error: str | None = None
    calls: dict[str, list[fx.Node]] = field(default_factory=dict)

    def module(self, node: fx.Node) -> nn.Module | None:
        """The module a ``call_module`` node calls, else None."""
        return self.root.get_submodule(node.target) if node.op == "call_module" else None

    def is_call(self, node: fx.Node, types: type | tuple[type, ...]) -> bool:
        """Whether ``node`` calls a module of one of ``types``."""
        return isinstance(self.module(node), types)

    def attribute_reads(self) -> set[str]:
        """Qualified names of the parameters and buffers that ``forward`` reads directly
        (``get_attr`` nodes, e.g. ``self.conv.weight`` passed to a function)."""
        return {n.target for n in self.graph.nodes if n.op == "get_attr"}

    def chains(self, *steps: Callable[[fx.Node], bool]) -> list[tuple[fx.Node, ...]]:
        """Every chain ``(n0, n1, ...)`` with ``steps[i](ni)`` true, where each ``ni`` is
        an input of ``n(i+1)`` and ``n(i+1)`` is the only user of ``ni``'s output (so the
        chain can be replaced as one unit without changing any other use)."""
        found = []
        for node in self.graph.nodes:
            chain = [node]
            ok = steps[0](node)
            while ok and len(chain) < len(steps):
                nxt = sole_user(chain[-1])
                ok = nxt is not None and steps[len(chain)](nxt)
                chain.append(nxt)
            if ok:
                found.append(tuple(chain))
        return found


def trace(model: nn.Module) -> Traced:
    """The call graph of ``model`` (see :class:`Traced`); ``error`` says why when it has none."""
    try:
        graph = Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - any failure of symbolic tracing is reported
        return Traced(model, None, f"{type(exc).__name__}: {exc}".strip())
    traced = Traced(model, graph)
    for node in graph.nodes:
        if node.op == "call_module":
            traced.calls.setdefault(node.target, []).append(node)
    return traced


def sole_user(node: fx.Node) -> fx.Node | None:
    """The one node that uses ``node``'s output, or None when it has no user or several."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def first_input(node: fx.Node) -> fx.Node | None:
    """The node a module call takes as its input (first argument, or ``input=``)."""
    arg = node.args[0] if node.args else node.kwargs.get("input")
    return arg if isinstance(arg, fx.Node) else None


def describe(node: fx.Node | None) -> str:
    """A node as a reader would name it: ``module `conv1```, ``function relu``, ..."""
    if node is None:
        return "a constant"
    if node.op == "call_module":
        return f"module `{node.target}`"
    if node.op == "placeholder":
        return f"the model's input `{node.target}`"
    if node.op == "output":
        return "the model's output"
    if node.op in ("call_function", "call_method"):
        name = getattr(node.target, "__name__", str(node.target))
        return f"{'function' if node.op == 'call_function' else 'method'} `{name}`"
    return f"{node.op} `{node.target}`"


def paths(root: nn.Module, module: nn.Module) -> list[str]:
    """Every qualified name under which ``module`` is registered in ``root`` (a module can be
    registered more than once)."""
    return [n for n, m in root.named_modules(remove_duplicate=False) if m is module]


def shared_parameters(root: nn.Module, module: nn.Module) -> list[str]:
    """Qualified names, outside ``module``, of parameters that are also ``module``'s own."""
    own = {id(p) for p in module.parameters(recurse=False)}
    inside = set(paths(root, module))
    return [n for n, p in root.named_parameters(remove_duplicate=False)
            if id(p) in own and n.rpartition(".")[0] not in inside]


def replace(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule at ``path`` is."""
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def copy_sharing_tensors(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose parameters and buffers are ``model``'s own tensors: the
    module tree (training flags, attributes) can be changed without touching ``model``, and
    training either trains both."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def trace_for_rewrite(root: nn.Module) -> tuple[Traced | None, str | None]:
    """``(traced, None)`` when ``root``'s graph can stand for its forward, else ``(None, why)``.

    Tracing follows one path through Python control flow: a ``forward`` that branches on
    ``self.training`` (auxiliary heads, drop-path) would be frozen in the current mode, and a
    rewritten model would then compute something else after ``.train()`` or ``.eval()``. The
    graph is therefore traced in both modes as well, and used only if all agree.
    """
    traced = trace(root)
    if traced.graph is None:
        return None, traced.error
    flags = [(m, m.training) for m in root.modules()]
    try:
        codes = set()
        for mode in (True, False):
            root.train(mode)
            other = trace(root)
            if other.graph is None:
                return None, f"in {'training' if mode else 'eval'} mode, {other.error}"
            codes.add(other.graph.python_code("self").src)
    finally:
        for m, training in flags:
            m.training = training
    if len(codes) > 1 or traced.graph.python_code("self").src not in codes:
        return None, ("its forward takes different paths in training and in eval mode (it "
                      "reads `training`); one traced graph cannot stand for both")
    return traced, None


def propagate_shapes(root: nn.Module, graph: fx.Graph, example_inputs: Sequence) -> None:
    """Record each node's output shape and dtype (``node.meta["tensor_meta"]``) for one call
    on ``example_inputs``, run on fake tensors: nothing is computed and no parameter or
    buffer (running statistics, batch counters) changes.

    Raises:
        ValueError: when the model cannot run on these inputs.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.shape_prop import ShapeProp

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    module = fx.GraphModule(root, graph)
    try:
        ShapeProp(module, fake_mode=FakeTensorMode(allow_non_fake_inputs=True)).propagate(
            *example_inputs)
    except Exception as exc:  # noqa: BLE001 - whatever the model raised, said with its cause
        raise ValueError(f"the model does not run on example_inputs: {type(exc).__name__}: "
                         f"{exc}") from exc


def graph_module(root: nn.Module, graph: fx.Graph, class_name: str) -> fx.GraphModule:
    """A ``GraphModule`` running ``graph`` that holds all of ``root``'s state.

    ``fx.GraphModule`` itself keeps only the submodules and attributes the graph uses, each
    under a fresh container; here the containers are ``root``'s own children (so modules that
    ``forward`` never calls, and ``state_dict`` keys and their order, stay as they were), with
    ``root``'s own parameters, buffers, training flag and public attributes.
    """
    gm = fx.GraphModule(root, graph, class_name)
    state = gm.__dict__
    state["_modules"] = dict(root._modules)
    state["_parameters"] = dict(root._parameters)
    state["_buffers"] = dict(root._buffers)
    state["_non_persistent_buffers_set"] = set(root._non_persistent_buffers_set)
    state["training"] = root.training
    for name, value in vars(root).items():
        if not name.startswith("_") and name not in state:
            state[name] = value
    return gm
