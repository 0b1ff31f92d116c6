"""The gpu backend's launch plan and its traffic account, against hand counts.

Plans are built on ``device="meta"`` tensors (shapes and strides, no memory, no GPU). The
account counts the bytes each launch asks of global memory (see ``LaunchPlan``): each
streamed tensor once per launch that reads or writes it, 4 bytes a channel for each
per-channel vector a program touches, 4 bytes a partial.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from batchnorm._shapes import resolve_layout  # noqa: E402
from batchnorm.backends import gpu  # noqa: E402


def meta(shape, dtype=torch.float32, channels_last=False):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, device="meta", dtype=dtype, memory_format=fmt)


def kernels(plan):
    return [launch.kernel for launch in plan.launches]


def test_small_nchw_forward_is_one_persistent_launch():
    x = meta((2, 3, 4, 4))
    p = gpu.launch_plan("forward", x, resolve_layout(x.shape), num_sms=132)
    X, vec = 2 * 3 * 16 * 4, 3 * 4          # 384 bytes of x; one per-channel vector
    assert p.algorithm == "persistent" and p.dims == (2, 3, 16) and p.grid == (3,)
    assert kernels(p) == ["fwd_persistent_kernel"]
    # reads x, gamma, beta, running mean and var; writes y, mean, invstd, running x2
    assert (p.bytes_read, p.bytes_written) == (X + 4 * vec, X + 4 * vec) == (432, 432)
    assert p.streams == ("x", "y") and p.min_bytes == 2 * X
    assert p.traffic_ratio == pytest.approx(864 / 768)
    assert p.programs_per_sm == pytest.approx(3 / 132)


def test_large_nchw_forward_reads_x_twice():
    x = meta((16, 16, 64, 64))
    p = gpu.launch_plan("forward", x, resolve_layout(x.shape), num_sms=132)
    # tiles of one channel's 2048 contiguous values: 16 channel blocks x 32 tiles; 528
    # programs wanted (4 per SM) -> 33 per channel block, capped at the 32 tiles
    assert p.algorithm == "split" and p.blocks == (1, 1, 2048)
    assert (p.n_c, p.tiles, p.splits, p.tiles_per_split) == (16, 32, 32, 1)
    X, vec, S = 16 * 16 * 4096 * 4, 16 * 4, 32
    partials = 3 * S * vec                  # count, mean, sqrt(M2) per split and channel
    assert kernels(p) == ["fwd_partial_kernel", "fwd_finalize_kernel", "fwd_apply_kernel"]
    by_kernel = {launch.kernel: launch for launch in p.launches}
    assert (by_kernel["fwd_partial_kernel"].bytes_read,
            by_kernel["fwd_partial_kernel"].bytes_written) == (X, partials)
    # finalize reads the partials and the running statistics; writes mean, invstd and the
    # running statistics
    assert (by_kernel["fwd_finalize_kernel"].bytes_read,
            by_kernel["fwd_finalize_kernel"].bytes_written) == (partials + 2 * vec, 4 * vec)
    # every apply program reads mean, invstd, gamma and beta
    assert (by_kernel["fwd_apply_kernel"].bytes_read,
            by_kernel["fwd_apply_kernel"].bytes_written) == (X + 4 * S * vec, X)
    assert p.bytes_moved == 3 * X + 2 * partials + 2 * vec + 4 * vec + 4 * S * vec
    assert p.traffic_ratio == pytest.approx(1.5, abs=0.01)
    assert p.grid == (16, 32) and p.programs_per_sm == pytest.approx(512 / 132)


def test_channels_last_backward_split():
    x = meta((8, 64, 32, 32), torch.float16, channels_last=True)
    p = gpu.launch_plan("backward", x, resolve_layout(x.shape), num_sms=132)
    # merged to (N*H*W, C, 1) = (8192, 64, 1); tiles of 32 rows x 64 channels, 256 of them
    assert p.dims == (8192, 64, 1) and p.strides == ((64, 1, 0),) * 3
    assert p.algorithm == "split" and p.blocks == (32, 64, 1)
    assert (p.n_c, p.tiles, p.splits) == (1, 256, 256)
    X, vec, S = 8192 * 64 * 2, 64 * 4, 256
    assert kernels(p) == ["bwd_partial_kernel", "bwd_finalize_kernel", "bwd_apply_kernel"]
    reads = [launch.bytes_read for launch in p.launches]
    writes = [launch.bytes_written for launch in p.launches]
    # partial: x, dy, and mean / invstd / gamma per program -> sum(dy), sum(dy * xhat)
    # finalize: both partials -> dgamma, dbeta
    # apply: x, dy, and five per-channel vectors per program -> dx
    assert reads == [2 * X + 3 * S * vec, 2 * S * vec, 2 * X + 5 * S * vec]
    assert writes == [2 * S * vec, 2 * vec, X]
    assert p.min_bytes == 3 * X


def test_inference_is_one_launch_at_the_minimum_and_backward_inference_two():
    x = meta((16, 16, 64, 64))
    layout = resolve_layout(x.shape)
    inf = gpu.launch_plan("inference", x, layout, num_sms=132)
    assert kernels(inf) == ["fwd_apply_kernel"]
    X = x.numel() * 4
    assert inf.bytes_moved - inf.min_bytes == 4 * inf.splits * 16 * 4  # the vectors only
    binf = gpu.launch_plan("backward_inference", x, layout, num_sms=132)
    assert kernels(binf) == ["bwd_partial_kernel", "bwd_finalize_kernel"]
    assert binf.launches[0].bytes_written - 2 * binf.splits * 16 * 4 == X  # dx written there


def test_copies_are_counted():
    """kept axes that are not adjacent: x is copied in and y copied back by torch."""
    x = meta((4, 3, 5, 2))
    layout = resolve_layout(x.shape, axis=(0, 2))
    p = gpu.launch_plan("forward", x, layout, num_sms=132)
    X = x.numel() * 4
    assert kernels(p)[:2] == ["copy", "copy"]
    assert all(launch.bytes_read == launch.bytes_written == X for launch in p.launches[:2])


def test_check_finite_adds_its_flags():
    x = meta((16, 16, 64, 64))
    layout = resolve_layout(x.shape)
    off = gpu.launch_plan("forward", x, layout, num_sms=132)
    on = gpu.launch_plan("forward", x, layout, num_sms=132, check_finite=True)
    assert on.bytes_written - off.bytes_written == 16 + on.splits * 16


def test_persistent_needs_waves_on_large_layers():
    """A layer over PERSISTENT_SMALL_BYTES goes persistent only with enough programs."""
    few, many = meta((32, 128, 28, 28)), meta((32, 512, 28, 28))
    assert gpu.launch_plan("forward", few, resolve_layout(few.shape), num_sms=132) \
        .algorithm == "split"
    p = gpu.launch_plan("forward", many, resolve_layout(many.shape), num_sms=132)
    assert p.algorithm == "persistent" and p.programs_per_sm >= gpu.PERSISTENT_MIN_WAVES
    assert p.num_warps == 32 and p.blocks == (32, 1, 1024)


def test_index_width():
    small = meta((2, 3, 4, 4))
    assert gpu.launch_plan("forward", small, resolve_layout(small.shape)).i64 == 0
    big = meta((2, 128, 4096, 4096))   # 2**31 elements in one sample
    assert gpu.launch_plan("forward", big, resolve_layout(big.shape)).i64 == 1
    wide = meta((16, 2**20, 16, 16))   # a persistent tile spanning 15 * 2**28 elements
    assert gpu.launch_plan("forward", wide, resolve_layout(wide.shape)).i64 == 2


def test_unknown_pass_is_refused():
    x = meta((2, 3))
    with pytest.raises(ValueError, match="unknown pass"):
        gpu.launch_plan("sideways", x, resolve_layout(x.shape))


def test_bench_gpu_plan_command(tmp_path, capsys):
    """``batchnorm bench --gpu-plan``: every ResNet-50 layer, both dtypes and layouts, the
    three passes; the output says it is a model, not a timing."""
    from batchnorm import cli
    from batchnorm.cli import gpu_plan

    path = tmp_path / "plans.csv"
    assert cli.main(["bench", "--gpu-plan", "--batch", "32", "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.count("not a timing") >= 5  # the heading, every table title, the totals
    assert "network totals" in out and "targets (forward and backward, every form)" in out
    assert "ResNet-50 fused" in out and "bn+add+relu" in out
    rows = path.read_text().splitlines()
    assert len(rows) == 1 + 12 * len(gpu_plan.DTYPES) * len(gpu_plan.LAYOUTS) * 3 * len(
        gpu_plan.FORMS)


def test_target_check():
    from batchnorm.cli import gpu_plan

    def row(**kw):
        base = dict(batch=32, dtype="float16", layout="nchw", channels=64, hw=56, count=1,
                    x_bytes=2 << 20, form="bn", pass_="forward", algorithm="split",
                    bytes_moved=150,
                    min_bytes=100, ratio=1.5, launches=3, programs_per_sm=4.0)
        return {**base, **kw}

    assert len(gpu_plan.check_targets([row(bytes_moved=115)])) == 0
    misses = gpu_plan.check_targets([row(), row(channels=128, bytes_moved=100, launches=4,
                                             programs_per_sm=1.5)])
    # network total 250 / 200 = 1.25x; the second layer: 4 launches and 1.5 programs per SM
    assert len(misses) == 3
    assert "1.250x" in misses[0] and "4 launches" in misses[1] and "1.50 programs" in misses[2]
    # small layers and inference are not held to the waves and launch targets
    assert gpu_plan.check_targets([row(x_bytes=1 << 19, programs_per_sm=0.5, bytes_moved=100),
                                   row(pass_="inference", launches=9, bytes_moved=100)]) == []


# ----------------------------------------------------------------------------- fused forms


def test_fused_forms_stream_and_count_their_tensors():
    """The residual is read, y read backward with an activation, dz written, x not read in
    the memory-saving mode; the minimum is one read or write of each streamed tensor."""
    from batchnorm._shapes import Epilogue

    x = meta((16, 16, 64, 64))                      # split on 132 SMs
    layout = resolve_layout(x.shape)
    X, S = x.numel() * 4, None
    relu = Epilogue("relu", 0.0)
    fwd = gpu.launch_plan("forward", x, layout, residual=torch.empty_like(x), epilogue=relu,
                          num_sms=132)
    plain = gpu.launch_plan("forward", x, layout, num_sms=132)
    assert fwd.streams == ("x", "z", "y") and fwd.min_bytes == 3 * X
    assert fwd.algorithm == "split" and fwd.bytes_moved - plain.bytes_moved == X  # z, once
    apply_ = {launch.kernel: launch for launch in fwd.launches}["fwd_apply_kernel"]
    S = fwd.splits
    assert apply_.bytes_read == 2 * X + 4 * S * 16 * 4

    dy, y = torch.empty_like(x), torch.empty_like(x)
    bwd = gpu.launch_plan("backward", x, layout, dy=dy, y=y, epilogue=relu, want_dz=True,
                          num_sms=132)
    assert bwd.streams == ("x", "dy", "y", "dx", "dz") and bwd.min_bytes == 5 * X
    reads = [launch.bytes_read - launch.bytes_read % X for launch in bwd.launches]
    writes = [launch.bytes_written - launch.bytes_written % X for launch in bwd.launches]
    assert reads == [3 * X, 0, 3 * X] and writes == [0, 0, 2 * X]  # partial, merge, apply
    # without an activation y is not read, whatever is passed
    assert gpu.launch_plan("backward", x, layout, dy=dy, y=y).streams == ("x", "dy", "dx")
    # inference backward writes dx and dz in the pass that takes the sums
    binf = gpu.launch_plan("backward_inference", x, layout, dy=dy, y=y, epilogue=relu,
                           want_dz=True, num_sms=132)
    assert binf.launches[0].bytes_written - binf.launches[0].bytes_written % X == 2 * X


def test_memory_saving_mode_plans():
    """Forward in place streams what out-of-place does (y written over x); backward reads
    y and dy instead of x and dy: the plain form's bytes."""
    from batchnorm._shapes import Epilogue

    leaky = Epilogue("leaky_relu", 0.1)
    for shape in ((2, 3, 4, 4), (16, 16, 64, 64)):
        x = meta(shape)
        layout = resolve_layout(x.shape)
        inplace = gpu.launch_plan("forward", x, layout, epilogue=leaky, out=x, num_sms=132)
        assert inplace == gpu.launch_plan("forward", x, layout, num_sms=132)
        from_y = gpu.launch_plan("backward", None, layout, y=torch.empty_like(x),
                                 epilogue=leaky, num_sms=132)
        plain = gpu.launch_plan("backward", x, layout, num_sms=132)
        assert from_y.streams == ("dy", "y", "dx")
        assert (from_y.algorithm, from_y.bytes_moved, from_y.min_bytes) == \
            (plain.algorithm, plain.bytes_moved, plain.min_bytes)


def test_persistent_budget_counts_every_tensor_held():
    """A persistent program holds every tensor it reads: a slice that fits with one (or
    two) does not with two (or three), and the call splits."""
    from batchnorm._shapes import Epilogue

    relu = Epilogue("relu", 0.0)
    x = meta((32, 16, 32, 32))                       # 32768 values per channel
    layout = resolve_layout(x.shape)
    assert gpu.launch_plan("forward", x, layout).algorithm == "persistent"
    assert gpu.launch_plan("forward", x, layout,
                           residual=torch.empty_like(x)).algorithm == "split"
    x = meta((16, 16, 32, 32))                       # 16384 values per channel
    layout = resolve_layout(x.shape)
    p = gpu.launch_plan("backward", x, layout)
    assert p.algorithm == "persistent" and p.num_warps == 32
    assert gpu.launch_plan("backward", x, layout, y=torch.empty_like(x),
                           epilogue=relu).algorithm == "split"
    small = meta((8, 16, 32, 32))                    # 8192 values: three fit, 32 warps
    p = gpu.launch_plan("backward", small, resolve_layout(small.shape),
                        y=torch.empty_like(small), epilogue=relu)
    assert p.algorithm == "persistent" and p.num_warps == 32


def test_phase_plans():
    """The phases are the split kernels one by one: moments reads x once; apply reads x
    (and z) and writes y; grad_sums reads and writes no whole tensor but its inputs;
    grad_apply writes dx (and dz); inference's grad_apply reads neither x nor sums."""
    from batchnorm._shapes import Epilogue

    x = meta((2, 3, 4, 4))  # small enough for the persistent composites; phases split
    layout = resolve_layout(x.shape)
    X = x.numel() * 4
    plans = {p: gpu.launch_plan(p, x, layout, num_sms=132) for p in gpu.PHASES}
    assert {p: kernels(plan) for p, plan in plans.items()} == {
        "moments": ["fwd_partial_kernel", "fwd_finalize_kernel"],
        "apply": ["fwd_apply_kernel"],
        "grad_sums": ["bwd_partial_kernel", "bwd_finalize_kernel"],
        "grad_apply": ["bwd_apply_kernel"],
        "grad_apply_inference": ["bwd_apply_kernel"],
    }
    assert all(p.algorithm == "split" for p in plans.values())
    assert plans["moments"].streams == ("x",) and plans["moments"].min_bytes == X
    assert plans["grad_sums"].streams == ("x", "dy")
    assert plans["grad_apply_inference"].streams == ("dy", "dx")
    relu = gpu.launch_plan("grad_apply_inference", None, layout, y=torch.empty_like(x),
                           epilogue=Epilogue("relu", 0.0), want_dz=True)
    assert relu.streams == ("dy", "y", "dx", "dz")


def test_resnet50_epilogues_match_the_model():
    """RESNET50_EPILOGUES against networks.resnet50(): each BN by its place in the model
    (the stem's and bn1, bn2 end in a ReLU, bn3 in the add and ReLU, the shortcut's in the
    add alone), counted by input shape."""
    import collections

    from batchnorm.cli.networks import RESNET50, RESNET50_EPILOGUES, resnet50

    with torch.device("meta"):
        model = resnet50()
    seen = collections.Counter()
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            last = name.rsplit(".", 1)[-1]
            form = ("add_relu" if last == "bn3" else None if "downsample" in name
                    else "relu")
            m.register_forward_pre_hook(
                lambda _m, inputs, form=form: seen.update([(inputs[0].shape[1],
                                                            inputs[0].shape[2], form)]))
    with torch.no_grad():
        model(torch.empty(1, 3, 224, 224, device="meta"))
    want = collections.Counter({(c, hw, form): n for (c, hw), forms in
                                RESNET50_EPILOGUES.items() for form, n in forms.items()})
    assert seen == want
    assert {k: sum(v.values()) for k, v in RESNET50_EPILOGUES.items()} == dict(RESNET50)


def test_fused_network_total_weighs_each_layer_in_its_form():
    from batchnorm.cli import gpu_plan

    rows = gpu_plan.plan_rows([8], dtypes=("float16",), layouts=("nchw",), num_sms=132)
    t = gpu_plan.totals(rows)
    case = (8, "float16", "nchw")

    def total(form, pass_, key):
        return t[(*case, form, pass_)][key]

    by_form = {f: [r for r in rows if r["form"] == f and r["pass_"] == "forward"]
               for f in ("bn", "bn+relu", "bn+add+relu")}
    want = sum(r["min_bytes"] * gpu_plan.RESNET50_EPILOGUES[(r["channels"], r["hw"])].get(e, 0)
               for f, e in (("bn", None), ("bn+relu", "relu"), ("bn+add+relu", "add_relu"))
               for r in by_form[f])
    assert total(gpu_plan.FUSED_NETWORK, "forward", "min_bytes") == want
    assert total("bn+add+relu", "forward", "min_bytes") == \
        total("bn", "forward", "min_bytes") * 3 // 2
