"""Synchronized batch norm over torch.distributed (gloo, processes on localhost).

Every distributed check compares a group of shards with plain batch norm on the concatenated
batch. Spawning a process costs seconds, so each spawned world runs several checks in turn.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import sys
import time

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from batchnorm.torch.sync import SyncBatchNorm, sync_batch_norm  # noqa: E402

TOL = {torch.float64: dict(rtol=1e-11, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=2e-5)}
WORLD_TIMEOUT_S = 120  # generous: the machine may be shared; a hang still ends the test


# ---------------------------------------------------------------- running a world


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        fn(rank, world, *args)
        dist.barrier()  # nobody tears down the group while another rank still talks to it
    finally:
        dist.destroy_process_group()
    # torch 2.13's gloo teardown sometimes aborts a process at interpreter exit ("terminate
    # called without an active exception") after all work is done; leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_world(fn, world, *args):
    """Run fn(rank, world, *args) on `world` spawned processes; fail on error or timeout."""
    ctx = mp.start_processes(
        _entry,
        args=(world, _free_port(), fn, args),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + WORLD_TIMEOUT_S
    while not ctx.join(timeout=1.0):  # re-raises a worker's exception with its traceback
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed world of {world} did not finish in {WORLD_TIMEOUT_S}s")


# ---------------------------------------------------------------- checks run on every rank


def _close(name, got, want, dtype):
    tol = TOL[dtype]
    if not torch.allclose(got, want, **tol):
        diff = (got - want).abs()
        raise AssertionError(
            f"{name}: max |diff| {diff.max().item():.3e}, mean {diff.mean().item():.3e} "
            f"(rtol {tol['rtol']}, atol {tol['atol']})"
        )


def _check_against_plain(
    rank, sizes, tail, *, dtype=torch.float64, channels_last=False, momentum=0.3, group=None,
    affine=True, functional=False, seed=0, activation=None, negative_slope=0.01,
    residual=False,
):
    """Shards of sizes[rank] along N vs F.batch_norm on the full batch (then + residual, then
    the activation, in torch's own operations): y, dx, dgamma, dbeta, dz, running
    statistics."""
    c = tail[0]
    gen = torch.Generator().manual_seed(seed)
    full = (sum(sizes),) + tuple(tail)
    # Offset data: a large mean over a small spread exposes any E[x^2] - E[x]^2.
    x_full = torch.randn(full, generator=gen, dtype=dtype) * 0.5 + 3.0
    dy_full = torch.randn(full, generator=gen, dtype=dtype)
    gamma = torch.rand(c, generator=gen, dtype=dtype) + 0.5
    beta = torch.randn(c, generator=gen, dtype=dtype)
    rm0 = torch.randn(c, generator=gen, dtype=dtype)
    rv0 = torch.rand(c, generator=gen, dtype=dtype) + 0.5

    z_full = torch.randn(full, generator=gen, dtype=dtype)

    lo = sum(sizes[:rank])
    x = x_full[lo : lo + sizes[rank]].clone()
    dy = dy_full[lo : lo + sizes[rank]].clone()
    z = z_full[lo : lo + sizes[rank]].clone().requires_grad_(True) if residual else None
    if channels_last:
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.contiguous(memory_format=fmt)
    x.requires_grad_(True)

    if functional:
        w = gamma.clone().requires_grad_(True) if affine else None
        b = beta.clone().requires_grad_(True) if affine else None
        rm, rv = rm0.clone(), rv0.clone()
        y = sync_batch_norm(x, rm, rv, w, b, True, momentum, 1e-5, group,
                            activation=activation, negative_slope=negative_slope, residual=z)
    else:
        m = SyncBatchNorm(c, momentum=momentum, affine=affine, process_group=group, dtype=dtype,
                          activation=activation, negative_slope=negative_slope)
        with torch.no_grad():
            m.running_mean.copy_(rm0)
            m.running_var.copy_(rv0)
            if affine:
                m.weight.copy_(gamma)
                m.bias.copy_(beta)
        y = m(x, z)
        w, b, rm, rv = m.weight, m.bias, m.running_mean, m.running_var
    y.backward(dy)

    xr = x_full.clone().requires_grad_(True)
    wr = gamma.clone().requires_grad_(True) if affine else None
    br = beta.clone().requires_grad_(True) if affine else None
    rmr, rvr = rm0.clone(), rv0.clone()
    zr = z_full.clone().requires_grad_(True)
    yr = F.batch_norm(xr, rmr, rvr, wr, br, True, momentum, 1e-5)
    if residual:
        yr = yr + zr
    if activation == "relu":
        yr = F.relu(yr)
    elif activation == "leaky_relu":
        yr = F.leaky_relu(yr, negative_slope)
    yr.backward(dy_full)

    sl = slice(lo, lo + sizes[rank])
    assert y.shape == x.shape and y.dtype == dtype
    if channels_last:
        assert y.is_contiguous(memory_format=fmt), "output lost the channels_last layout"
    _close("y", y, yr[sl], dtype)
    _close("dx", x.grad, xr.grad[sl], dtype)
    if residual:
        _close("dz", z.grad, zr.grad[sl], dtype)
    _close("running_mean", rm, rmr, dtype)
    _close("running_var", rv, rvr, dtype)
    if affine:
        # Each rank holds its share of dgamma / dbeta; their sum is the full-batch gradient.
        dg, db = w.grad.clone(), b.grad.clone()
        dist.all_reduce(dg, group=group)
        dist.all_reduce(db, group=group)
        _close("dgamma", dg, wr.grad, dtype)
        _close("dbeta", db, br.grad, dtype)
    else:
        assert w is None and b is None


def _counting_phases(backend, calls):
    """Wrap ``backend``'s phases so that each call is recorded in ``calls``."""
    for name in ("moments", "apply", "grad_sums", "grad_apply"):
        real = getattr(backend, name)

        def counted(*a, _name=name, _real=real, **k):
            calls.append(_name)
            return _real(*a, **k)
        setattr(backend, name, counted)


def _world_even(rank, world):
    sizes = (3,) * world
    _check_against_plain(rank, (4, 4), (3, 5, 6), seed=8)
    _check_against_plain(rank, (4, 4), (3, 5, 6), dtype=torch.float32, channels_last=True,
                         seed=9)
    # the fused epilogue (contract §8) falls out of the phases: apply and the gradient phases
    # take it, the collectives do not change
    _check_against_plain(rank, (4, 4), (3, 5, 6), activation="relu", residual=True, seed=10)
    _check_against_plain(rank, (4, 4), (3, 5, 6), dtype=torch.float32, channels_last=True,
                         activation="leaky_relu", negative_slope=0.2, seed=11)
    _check_against_plain(rank, (5, 2), (3, 7), residual=True, affine=False, seed=12)
    _check_against_plain(rank, (2, 5), (3, 4, 4), activation="relu", residual=True,
                         functional=True, seed=17)
    _check_against_plain(rank, sizes, (4, 5, 6))
    _check_against_plain(rank, sizes, (4, 5, 6), channels_last=True, seed=1)
    _check_against_plain(rank, sizes, (3, 2, 3, 4), channels_last=True, seed=2)  # 3d
    _check_against_plain(rank, sizes, (7,), seed=3)  # BatchNorm1d on (N, C)
    _check_against_plain(rank, sizes, (4, 9), functional=True, affine=False, seed=4)  # (N, C, L)
    _check_against_plain(rank, sizes, (4, 5, 6), dtype=torch.float32, seed=5)
    _check_against_plain(
        rank, sizes, (4, 5, 6), dtype=torch.float32, channels_last=True, momentum=1.0, seed=6
    )

    # Forward: the fixed-size header, then the moments; backward: one all-reduce; whatever
    # the shape. None in eval.
    calls = []
    real = {name: getattr(dist, name) for name in ("all_gather", "all_reduce")}

    def counted(name):
        def call(*a, **k):
            calls.append(name)
            return real[name](*a, **k)
        return call

    for name in real:
        setattr(dist, name, counted(name))
    from batchnorm.backends import cpu

    _counting_phases(cpu, calls)
    try:
        m = SyncBatchNorm(4, dtype=torch.float64)
        x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
        m(x).sum().backward()
        # the CPU backend's phases, with one collective between each pair; the header
        # (C, dtype) first, on the layer's first call only
        phases = ["moments", "all_gather", "apply", "grad_sums", "all_reduce", "grad_apply"]
        assert calls == ["all_gather", *phases], calls
        calls.clear()
        m(x).sum().backward()
        assert calls == phases, calls
        calls.clear()
        sync_batch_norm(x, None, None, None, None, True, 0.1, 1e-5)  # nothing pins C
        assert calls[:2] == ["all_gather", "moments"], calls
        calls.clear()
        m.eval()
        want = F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.1, 1e-5)
        _close("eval y", m(x), want, torch.float64)  # eval is local: each rank on its own
        assert calls == [], calls
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)

    # momentum=None: cumulative average over steps, 1 / num_batches_tracked.
    gen = torch.Generator().manual_seed(7)
    m = SyncBatchNorm(2, momentum=None, dtype=torch.float64)
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    for step in range(1, 4):
        full = torch.randn(2 * world, 2, dtype=torch.float64, generator=gen)
        m(full[2 * rank : 2 * rank + 2])
        F.batch_norm(full, rm, rv, None, None, True, 1.0 / step, 1e-5)
    assert int(m.num_batches_tracked) == 3
    _close("cumulative running_mean", m.running_mean, rm, torch.float64)
    _close("cumulative running_var", m.running_var, rv, torch.float64)


def _world_of_three(rank, world):
    assert world == 3
    _check_against_plain(rank, (5, 1, 3), (4, 3, 5))
    _check_against_plain(rank, (5, 1, 3), (4, 3, 5), channels_last=True, seed=1)
    _check_against_plain(rank, (4, 0, 2), (4, 3, 5), seed=2)  # rank 1 holds an empty shard
    _check_against_plain(rank, (5, 1, 3), (4, 3, 5), dtype=torch.float32, seed=13)
    _check_against_plain(rank, (4, 0, 2), (4, 3, 5), dtype=torch.float32, channels_last=True,
                         seed=14)
    _check_against_plain(rank, (5, 1, 3), (4, 3, 5), activation="relu", residual=True, seed=15)
    _check_against_plain(rank, (4, 0, 2), (4, 3, 5), activation="leaky_relu", residual=True,
                         seed=16)
    _check_against_plain(rank, (0, 2, 0), (3, 4), dtype=torch.float32, seed=3)
    _check_against_plain(rank, (1, 1, 0), (5,), seed=4)  # 2 values per channel in all

    # One value per channel over the whole group: every rank raises, nobody hangs.
    m = SyncBatchNorm(3, dtype=torch.float64)
    before = m.running_mean.clone()
    x = torch.randn((1, 0, 0)[rank], 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        m(x)
    assert torch.equal(m.running_mean, before)

    # Every shard empty: empty output, zero gradients, running statistics unchanged.
    m = SyncBatchNorm(3, dtype=torch.float64)
    x = torch.empty(0, 3, 4, dtype=torch.float64, requires_grad=True)
    y = m(x)
    y.backward(torch.empty_like(y))
    assert y.shape == (0, 3, 4)
    assert torch.equal(m.running_mean, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(m.running_var, torch.ones(3, dtype=torch.float64))
    assert torch.equal(m.weight.grad, torch.zeros(3, dtype=torch.float64))

    # check_finite: an Inf on one rank only; every rank raises naming the channel, and the
    # running statistics stay as they were.
    m = SyncBatchNorm(3, dtype=torch.float64, check_finite=True)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    if rank == 2:
        x[1, 2, 3] = float("inf")
    with pytest.raises(FloatingPointError, match="channel"):
        m(x)
    assert torch.equal(m.running_mean, torch.zeros(3, dtype=torch.float64))
    assert torch.equal(m.running_var, torch.ones(3, dtype=torch.float64))
    m(torch.randn(2, 3, 4, dtype=torch.float64))  # finite: no error, statistics updated
    assert not torch.equal(m.running_mean, torch.zeros(3, dtype=torch.float64))

    # A subgroup: ranks 0 and 2 synchronize with each other only; rank 1 sits it out.
    group = dist.new_group([0, 2])
    if rank != 1:
        sub_rank = {0: 0, 2: 1}[rank]
        _check_against_plain(sub_rank, (2, 3), (4, 3), group=group, seed=5)
    dist.barrier()  # rank 1 must still be alive for the others' collectives to be judged


def _world_disagreeing(rank, world):
    """Processes that disagree on C or on the dtype: every one raises, naming the mismatch
    and each rank's value, and the group is still usable afterwards (nobody is left in a
    collective of another size)."""
    assert world == 2
    c = 3 + rank
    m = SyncBatchNorm(c)
    with pytest.raises(ValueError, match=r"disagree on the input's number of channels "
                                         r"\(rank 0: 3, rank 1: 4\)"):
        m(torch.randn(4, c, 5))
    assert int(m.num_batches_tracked) == 1 and torch.equal(m.running_mean, torch.zeros(c))
    dtype = (torch.float32, torch.float64)[rank]
    m = SyncBatchNorm(3, dtype=dtype)
    with pytest.raises(ValueError, match=r"disagree on the input's dtype \(rank 0: "
                                         r"torch.float32, rank 1: torch.float64\)"):
        m(torch.randn(4, 3, 5, dtype=dtype))
    with pytest.raises(ValueError, match="disagree on the input's dtype"):
        sync_batch_norm(torch.randn(4, 3, dtype=dtype), None, None, None, None, True, 0.1,
                        1e-5)
    # a layer whose C the group agreed on: the dtype, compared after the moments
    m = SyncBatchNorm(3, dtype=torch.float64)
    m(torch.randn(4, 3, 5, dtype=torch.float64))
    if rank == 1:
        m.float()
    with pytest.raises(ValueError, match=r"disagree on the input's dtype \(rank 0: "
                                         r"torch.float64, rank 1: torch.float32\)"):
        m(torch.randn(4, 3, 5, dtype=m.weight.dtype))
    assert int(m.num_batches_tracked) == 2
    _check_against_plain(rank, (3, 2), (4, 5))  # the group still works


def _route_to_gpu_backend():
    """batchnorm.torch sending this process's calls to the gpu backend, as it does CUDA
    tensors (under the Triton interpreter the tensors are CPU ones; tests/test_gpu_interpreter
    routes them alike)."""
    from batchnorm.backends import gpu
    from batchnorm.torch import _ops

    assert os.environ.get("TRITON_INTERPRET") == "1", "the interpreter must run the kernels"
    _ops._PLANS.clear()
    _ops._needs_host = lambda x: False
    _ops.select = lambda name, x: gpu
    return gpu


def _world_gpu_phases(rank, world):
    """The GPU backend's phases between the collectives (NCCL's place taken by gloo)."""
    assert world == 3
    gpu = _route_to_gpu_backend()
    calls = []
    _counting_phases(gpu, calls)
    for sizes in ((5, 1, 3), (4, 0, 2)):
        calls.clear()
        _check_against_plain(rank, sizes, (3, 4, 5), dtype=torch.float32, seed=20)
        assert calls == ["moments", "apply", "grad_sums", "grad_apply"], calls
    _check_against_plain(rank, (5, 1, 3), (3, 4, 5), dtype=torch.float32, channels_last=True,
                         activation="relu", residual=True, seed=21)
    _check_against_plain(rank, (4, 0, 2), (3, 6), dtype=torch.float32,
                         activation="leaky_relu", negative_slope=0.1, seed=22)


# ---------------------------------------------------------------- DDP training


def _small_net(sync: bool):
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.Conv2d(6, 8, 3, stride=2),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    ).double()
    if sync:
        for i, layer in enumerate(net):
            if isinstance(layer, torch.nn.BatchNorm2d):
                net[i] = SyncBatchNorm.from_batchnorm(layer)
    return net


def _world_ddp(rank, world, steps):
    import batchnorm.torch as bnt

    _ddp_steps(rank, world, steps, _small_net(sync=True))
    # fused: each BN -> ReLU a SyncBatchNorm with the activation
    fused, report = bnt.fuse(_small_net(sync=True), report=True)
    assert len(report.fused) == 2 and report.left == ()
    _ddp_steps(rank, world, steps, fused)


def _ddp_steps(rank, world, steps, net):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ref = _small_net(sync=False)
    model = DDP(net)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    per_rank = 4
    for _ in range(steps):
        x = torch.randn(per_rank * world, 3, 8, 8, dtype=torch.float64, generator=gen)
        t = torch.randint(0, 4, (per_rank * world,), generator=gen)
        sl = slice(rank * per_rank, (rank + 1) * per_rank)

        opt.zero_grad()
        F.cross_entropy(model(x[sl]), t[sl]).backward()  # DDP averages over the ranks
        opt.step()

        opt_ref.zero_grad()
        F.cross_entropy(ref(x), t).backward()  # the mean over the full batch
        opt_ref.step()

    got = model.module.state_dict()
    for name, want in ref.state_dict().items():
        if want.is_floating_point():
            _close(f"after {steps} steps: {name}", got[name], want, torch.float64)
        else:
            assert torch.equal(got[name], want), name


# ---------------------------------------------------------------- tests


def test_world_of_two_matches_full_batch():
    _run_world(_world_even, 2)


def test_world_of_three_uneven_empty_too_few_and_subgroup():
    _run_world(_world_of_three, 3)


def test_world_of_three_on_the_gpu_backend_phases():
    _run_world(_world_gpu_phases, 3)


def test_ranks_disagreeing_on_channels_or_dtype_all_raise_in_bounded_time():
    # before: gloo aborted a process (SIGABRT) on the packed all_gather of unequal sizes
    start = time.monotonic()
    _run_world(_world_disagreeing, 2)
    assert time.monotonic() - start < WORLD_TIMEOUT_S


def test_ddp_training_matches_single_process():
    _run_world(_world_ddp, 2, 3)


def test_world_of_one_is_plain_batch_norm():
    # torch.distributed not initialized here: the local path, F.batch_norm.
    assert not dist.is_initialized()
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    m = SyncBatchNorm(3, dtype=torch.float64)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    _close("y", m(x), F.batch_norm(x, rm, rv, None, None, True, 0.1, 1e-5), torch.float64)
    _close("running_var", m.running_var, rv, torch.float64)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        m(torch.randn(1, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        sync_batch_norm(torch.randn(1, 3), None, None, None, None, True, 0.1, 1e-5)


@pytest.mark.parametrize("cls", [torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d])
@pytest.mark.parametrize("track", [True, False])
def test_from_batchnorm_keeps_state(cls, track):
    bn = cls(5, eps=1e-3, momentum=0.25, track_running_stats=track, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.uniform_()
        bn.bias.uniform_()
        if track:
            bn.running_mean.uniform_()
            bn.running_var.uniform_(1, 2)
            bn.num_batches_tracked.fill_(7)
    bn.bias.requires_grad_(False)
    bn.eval()
    want = copy.deepcopy(bn.state_dict())

    s = SyncBatchNorm.from_batchnorm(bn, process_group=None)
    assert type(s) is SyncBatchNorm
    assert (s.num_features, s.eps, s.momentum) == (5, 1e-3, 0.25)
    assert s.track_running_stats is track and not s.training
    assert s.weight.dtype == torch.float64 and s.weight.requires_grad
    assert not s.bias.requires_grad
    assert s.state_dict().keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(s.state_dict()[k], v), k
        assert s.state_dict()[k].device == v.device
    tail = {torch.nn.BatchNorm1d: (), torch.nn.BatchNorm2d: (4, 4), torch.nn.BatchNorm3d: (3, 3, 3)}
    x = torch.randn(3, 5, *tail[cls], dtype=torch.float64)
    _close("eval y", s(x), bn(x), torch.float64)


def test_check_finite_is_a_keyword_kept_by_conversion_and_honoured_alone():
    import batchnorm.torch as bnt

    bn = bnt.BatchNorm2d(3, check_finite=True)
    sync = SyncBatchNorm.from_batchnorm(bn)
    assert sync.check_finite and SyncBatchNorm(3, check_finite=True).check_finite
    assert bnt.convert_model(torch.nn.Sequential(bn), sync=True)[0].check_finite
    x = torch.randn(2, 3, 4, 4)
    x[0, 1, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="channel"):
        sync(x)  # no process group: the local path, which checks too
    with pytest.raises(FloatingPointError, match="channel"):
        sync_batch_norm(x, None, None, None, None, True, 0.1, 1e-5, check_finite=True)


def test_from_batchnorm_keeps_a_fused_layers_activation():
    import batchnorm.torch as bnt

    act = bnt.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2, inplace=True,
                             dtype=torch.float64)
    s = SyncBatchNorm.from_batchnorm(act)
    assert (s.activation, s.negative_slope) == ("leaky_relu", 0.2)
    assert "activation='leaky_relu', negative_slope=0.2" in repr(s)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    z = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    want = F.leaky_relu(F.batch_norm(x, None, None, training=True) + z, 0.2)
    _close("y", s(x, z), want, torch.float64)  # no process group: the local batch
    assert SyncBatchNorm.from_batchnorm(torch.nn.BatchNorm2d(4)).activation is None
    with pytest.raises(ValueError, match="negative_slope"):
        SyncBatchNorm(4, activation="leaky_relu", negative_slope=-1.0)


def test_from_batchnorm_without_affine_and_refusals():
    s = SyncBatchNorm.from_batchnorm(torch.nn.BatchNorm2d(4, affine=False))
    assert s.weight is None and s.bias is None and s.training
    assert isinstance(s, torch.nn.modules.batchnorm._BatchNorm)
    torch_sync = torch.nn.SyncBatchNorm(4, momentum=None)
    s = SyncBatchNorm.from_batchnorm(torch_sync, process_group="pg-sentinel")
    assert s.momentum is None and s.process_group == "pg-sentinel"
    assert s.weight is torch_sync.weight  # shared, as convert_sync_batchnorm does
    with pytest.raises(TypeError):
        SyncBatchNorm.from_batchnorm(torch.nn.LayerNorm(4))
    with pytest.raises(ValueError):
        SyncBatchNorm.from_batchnorm(torch.nn.LazyBatchNorm2d())
    with pytest.raises(ValueError):
        SyncBatchNorm(3)(torch.randn(3))



def test_convert_model_sync_builds_sync_layers_sharing_state():
    import batchnorm.torch as bnt

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4),
                                torch.nn.Sequential(torch.nn.Flatten(), torch.nn.BatchNorm1d(36)))
    weight = model[1].weight
    converted = bnt.convert_model(model, sync=True)
    assert isinstance(converted[1], bnt.SyncBatchNorm)
    assert isinstance(converted[2][1], bnt.SyncBatchNorm)
    assert converted[1].weight is weight, "parameters are shared, so optimizers keep working"
    assert bnt.sync_batch_norm is sync_batch_norm
    x = torch.randn(5, 3, 3, 3)
    # without an initialized process group it is plain batch norm on the local batch
    converted.train()
    y = converted(x)
    assert y.shape == (5, 36) and torch.isfinite(y).all()


@pytest.mark.parametrize("kwargs, error, message", [
    ({"eps": -1.0}, ValueError, "eps must be positive during training"),
    ({"eps": 0.0}, ValueError, "eps must be positive during training"),
    ({"momentum": None}, TypeError, "`momentum` must be a real number"),
    ({"weight": torch.ones(4)}, ValueError, r"`weight` must have shape \(3,\)"),
    ({"running_mean": torch.zeros(3)}, ValueError, "both be None or neither"),
    ({"bias": torch.zeros(3, dtype=torch.float64)}, TypeError, "float32 input"),
    ({"activation": "gelu"}, ValueError, "unknown activation 'gelu'"),
    ({"activation": "leaky_relu", "negative_slope": -0.1}, ValueError, "negative_slope"),
    ({"residual": torch.zeros(4, 3, 1)}, ValueError, r"`residual` must have the input's shape"),
])
def test_sync_batch_norm_refuses_bad_arguments_before_any_collective(kwargs, error, message):
    """The rules of batchnorm.torch.batch_norm, checked before the first collective (the
    process group is not initialized here: any collective would fail differently)."""
    args = {"running_mean": None, "running_var": None, "weight": None, "bias": None,
            "training": True, "momentum": 0.1, "eps": 1e-5}
    args.update(kwargs)
    with pytest.raises(error, match=message):
        sync_batch_norm(torch.randn(4, 3, 5), **args)


def test_sync_batch_norm_takes_any_real_momentum_as_torch_does():
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    for momentum in (-0.5, 1.5):
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
        rmt, rvt = rm.clone(), rv.clone()
        sync_batch_norm(x, rm, rv, None, None, True, momentum, 1e-5)
        F.batch_norm(x, rmt, rvt, None, None, True, momentum, 1e-5)
        _close("running_mean", rm, rmt, torch.float64)
        _close("running_var", rv, rvt, torch.float64)
