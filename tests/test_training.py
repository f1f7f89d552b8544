"""fit: learning, history, checkpoints, bit-for-bit resume, NaN detection, interrupts, bad inputs, CUDA graphs."""

import functools
import json
import warnings

import pytest
import torch
from helpers import GraphLogicOnCPU, toy_images
from torch import nn

import vaelib.training as training
from vaelib.cuda_graph import WARMUP_STEPS, GraphStepper
from vaelib.errors import VaelibError
from vaelib.models import build_vae
from vaelib.objectives import elbo
from vaelib.runs import CHECKPOINT_NAME, RunNotFoundError, load_checkpoint, load_run
from vaelib.training import TrainingDivergedError, TrainingInterrupted, fit

# CUDA tests carry both marks: `cuda` (the autouse fixture in conftest.py leaves them on the GPU; `-m "not cuda"`
# deselects them) and the skip where no GPU is present.
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"latent_dim": 2, "hidden": (16,), **kw}
    return build_vae(**kw)


@pytest.fixture(scope="module")
def data():
    return toy_images()


def without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def assert_same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_overfits_a_tiny_batch():
    torch.manual_seed(0)
    x = torch.bernoulli(torch.rand(8, 784))
    model = tiny_model(hidden=(64,))
    result = fit(model, x, epochs=150, batch_size=8, lr=3e-3, progress=False, device="cpu")
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.device == torch.device("cpu") and result.fast == "eager"
    assert len(result.seconds_per_epoch) == 150


def test_history_files_and_checkpoint(tmp_path, data):
    train, test = data
    result = fit(tiny_model(), train, test, epochs=3, batch_size=32, warmup_epochs=2, beta=2.0, out_dir=tmp_path,
                 progress=False)
    keys = {"epoch", "train_loss", "train_rec", "train_kl", "test_elbo", "test_rec", "test_kl", "beta", "lr",
            "seconds"}
    assert [set(r) for r in result.history] == [keys] * 3
    assert [r["beta"] for r in result.history] == [0.0, 1.0, 2.0]
    assert [r["lr"] for r in result.history] == [1e-3] * 3  # the default, constant
    row = result.history[-1]
    assert row["train_loss"] == pytest.approx(-(row["train_rec"] - 2.0 * row["train_kl"]))
    assert json.loads((tmp_path / "history.json").read_text()) == result.history
    assert (tmp_path / "history.csv").read_text().splitlines()[0].startswith("epoch,train_loss")
    ckpt = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["model_config"]["latent_dim"] == 2
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left behind
    run = load_run(tmp_path)
    assert_same_params(run.model, result.model)
    assert run.epoch == 3 and run.history == result.history


def test_resume_is_bit_for_bit(tmp_path, data):
    train, test = data
    kw = dict(batch_size=48, warmup_epochs=2, binarize=True, progress=False, seed=3)
    straight = fit(tiny_model(1), train, test, epochs=4, out_dir=tmp_path / "a", **kw)
    fit(tiny_model(1), train, test, epochs=2, out_dir=tmp_path / "b", **kw)
    # A fresh, differently initialised model: everything must come from the checkpoint.
    resumed = fit(tiny_model(99), train, test, epochs=4, out_dir=tmp_path / "b", resume=True, **kw)
    assert resumed.resumed_from == 2
    assert_same_params(straight.model, resumed.model)
    assert without_seconds(straight.history) == without_seconds(resumed.history)


def test_dynamic_binarisation_draws_bernoulli_pixels_every_epoch():
    """binarize=True shows the encoder 0/1 pixels with P(1) = the grey level, a new draw each epoch."""
    grey = torch.tensor([0.1, 0.9]).repeat_interleave(392)
    train = grey.expand(160, 784).clone()  # identical rows: the shuffle cannot move a pixel's grey level
    model = tiny_model()
    seen = []
    model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    fit(model, train, epochs=2, batch_size=160, lr=1e-12, binarize=True, progress=False)  # one batch per epoch
    first, second = seen
    assert set(torch.unique(first).tolist()) == {0.0, 1.0} and not torch.equal(first, second)
    for batch in (first, second):
        for level, pixels in ((0.1, batch[:, :392]), (0.9, batch[:, 392:])):
            se = (level * (1 - level) / pixels.numel()) ** 0.5
            assert abs(pixels.mean().item() - level) < 4 * se, (level, pixels.mean().item())


def test_lr_schedule_decays_geometrically_to_lr_final(data):
    train, _ = data
    result = fit(tiny_model(), train, epochs=5, batch_size=32, lr=1e-2, lr_final=1e-4, progress=False)
    lrs = [row["lr"] for row in result.history]
    expected = [1e-2 * 10 ** (-2 * i / 4) for i in range(5)]  # 1e-2, 3.2e-3, 1e-3, 3.2e-4, 1e-4
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert [training.lr_at_epoch(e, 5, 1e-2, 1e-4) for e in range(1, 6)] == lrs
    assert training.lr_at_epoch(1, 1, 1e-2, 1e-4) == 1e-2  # one epoch: the start value
    # The schedule reaches the optimizer, not only the history: a run with a tiny final step moves the
    # parameters less in its last epoch than the constant-lr run.
    const = fit(tiny_model(), train, epochs=5, batch_size=32, lr=1e-2, progress=False)
    assert [row["lr"] for row in const.history] == [1e-2] * 5
    assert result.history[-1]["train_loss"] != const.history[-1]["train_loss"]


def test_lr_schedule_applies_to_a_custom_optimizer(data):
    train, _ = data
    seen = []
    result = fit(tiny_model(), train, epochs=3, batch_size=32, lr=0.05, lr_final=0.0005, progress=False,
                 optimizer=lambda params: torch.optim.SGD(params, lr=123.0),
                 callback=lambda row, model: seen.append(row["lr"]))
    assert seen == [row["lr"] for row in result.history] == pytest.approx([0.05, 0.005, 0.0005])
    # Without a schedule the history reports the custom optimizer's own lr, not fit's lr argument.
    result = fit(tiny_model(), train, epochs=1, batch_size=32, progress=False,
                 optimizer=lambda params: torch.optim.SGD(params, lr=0.025))
    assert result.history[0]["lr"] == 0.025

def straight_and_resumed(tmp_path, data, interrupt_at_epoch, **kw):
    """The same run twice: straight through, and interrupted in epoch 3 then resumed from its checkpoint
    (into a model with other initial weights, which the checkpoint must overwrite). Both must be identical."""
    train, test = data
    straight = fit(tiny_model(1), train, test, **kw)
    disarm = interrupt_at_epoch(3)
    with pytest.raises(TrainingInterrupted):
        fit(tiny_model(1), train, test, out_dir=tmp_path, **kw)
    disarm()
    resumed = fit(tiny_model(99), train, test, out_dir=tmp_path, resume=True, **kw)
    assert resumed.resumed_from == 2
    assert_same_params(straight.model, resumed.model)
    assert without_seconds(straight.history) == without_seconds(resumed.history)
    return straight, resumed


def test_resume_follows_the_lr_schedule_bit_for_bit(tmp_path, data, interrupt_at_epoch):
    straight_and_resumed(tmp_path, data, interrupt_at_epoch, epochs=4, batch_size=48, lr=1e-2, lr_final=1e-3,
                         binarize=True, progress=False, seed=3)


def test_optimizer_state_keeps_its_kind_of_lr():
    """A checkpoint's float lr loads into the graph path's tensor lr in place (the captured graph reads that
    tensor), and a tensor lr saved there loads back as a float for the eager path."""
    params = [nn.Parameter(torch.ones(3))]
    eager = torch.optim.Adam(params, lr=1e-3)
    lr_tensor = torch.tensor(0.5)
    graphy = torch.optim.Adam(params, lr=lr_tensor, foreach=False)
    training._load_optimizer_state(graphy, eager.state_dict())
    assert graphy.param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(1e-3)
    training._set_lr(graphy, 2e-4)
    assert graphy.param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(2e-4)
    training._load_optimizer_state(eager, graphy.state_dict())
    assert type(eager.param_groups[0]["lr"]) is float and eager.param_groups[0]["lr"] == pytest.approx(2e-4)


def test_interrupt_saves_resumable_checkpoint(tmp_path, data, interrupt_at_epoch):
    train, _ = data
    kw = dict(batch_size=32, progress=False, checkpoint_every=3)
    straight = fit(tiny_model(), train, epochs=3, **kw)

    disarm = interrupt_at_epoch(2)
    with pytest.raises(TrainingInterrupted, match="resume") as info:
        fit(tiny_model(), train, epochs=3, out_dir=tmp_path, **kw)
    assert isinstance(info.value, KeyboardInterrupt)
    assert info.value.epoch == 1 and load_checkpoint(tmp_path / CHECKPOINT_NAME)["epoch"] == 1
    disarm()
    resumed = fit(tiny_model(5), train, epochs=3, out_dir=tmp_path, resume=True, **kw)
    assert_same_params(straight.model, resumed.model)
    assert without_seconds(straight.history) == without_seconds(resumed.history)


class NaNAfter(nn.Module):
    """Wraps a decoder network and returns NaN from its ``after``-th call on."""

    def __init__(self, net, after):
        super().__init__()
        self.net, self.after, self.calls = net, after, 0

    def forward(self, z):
        self.calls += 1
        out = self.net(z)
        return out * float("nan") if self.calls >= self.after else out


def test_nan_stops_with_epoch_and_step_and_keeps_last_good(tmp_path, data):
    train, _ = data  # 160 examples, batch 32: 5 steps per epoch, one decoder call per step
    model = tiny_model()
    model.decoder.net = NaNAfter(model.decoder.net, after=8)  # epoch 2, step 3
    with pytest.raises(TrainingDivergedError, match=r"epoch 2, step 3 of 5") as info:
        fit(model, train, epochs=4, batch_size=32, out_dir=tmp_path, progress=False)
    assert info.value.epoch == 2 and info.value.step == 3 and len(info.value.history) == 1
    ckpt = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert ckpt["epoch"] == 1
    for k, v in model.state_dict().items():  # restored to the end of epoch 1, which is the checkpoint
        assert torch.isfinite(v).all() and torch.equal(v, ckpt["model_state"][k]), k


def test_custom_linear_model_on_real_valued_data():
    torch.manual_seed(0)
    w = torch.randn(10, 2)
    x = torch.randn(300, 2) @ w.T * 3 + 5 + 0.1 * torch.randn(300, 10)  # far outside [0, 1]
    model = build_vae("linear", input_dim=10, latent_dim=2, sigma=3.0)
    result = fit(model, x, epochs=30, batch_size=64, lr=1e-2, progress=False)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert model.decoder.likelihood.sigma.item() != pytest.approx(3.0)  # the global sigma is learned


def test_bad_inputs_to_fit(tmp_path, data):
    train, _ = data
    model = tiny_model()
    with pytest.raises(TypeError, match=r"\(batch, 784\).*uint8"):
        fit(model, (train * 255).to(torch.uint8), epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"\(batch, 784\).*flatten"):
        fit(model, train.reshape(-1, 28, 28), epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"test_x must have shape \(batch, 784\)"):
        fit(model, train, train[:, :10], epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit(model, train * 3, epochs=1, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        fit(model, train.clone().fill_(float("nan")), epochs=1, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        fit(model, train, epochs=-1)
    with pytest.raises(ValueError, match="lr_final must be a positive number"):
        fit(model, train, epochs=1, lr_final=0.0)
    with pytest.raises(ValueError, match="lr must be a positive number"):
        fit(model, train, epochs=1, lr=float("nan"))
    with pytest.raises(ValueError, match="fast"):
        fit(model, train, epochs=1, fast="warp")
    with pytest.raises(ValueError, match="out_dir"):
        fit(model, train, epochs=1, resume=True)
    with pytest.raises(RunNotFoundError, match="does not exist"):
        fit(model, train, epochs=1, resume=True, out_dir=tmp_path / "missing")
    with pytest.raises(RunNotFoundError):
        load_run(tmp_path / "missing")
    with pytest.raises(TypeError, match="VAE-like"):
        fit(nn.Linear(3, 3), train, epochs=1)


def test_graph_request_on_cpu_falls_back_to_eager(data):
    train, _ = data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fit(tiny_model(), train[:64], epochs=1, fast="graph", device="cpu", progress=False)
    assert result.fast == "eager" and any("CUDA" in str(w.message) for w in caught)


def test_resume_refuses_other_settings(tmp_path, data):
    train, _ = data
    fit(tiny_model(), train, epochs=1, batch_size=32, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        fit(tiny_model(), train, epochs=2, batch_size=16, out_dir=tmp_path, resume=True, progress=False)


# ------------------------------------------------------------------------------------------------ the graph path
class FailingCapture(GraphLogicOnCPU):
    """Warm-up runs (and changes the model), then the recording fails."""

    def _record(self):
        raise RuntimeError("operation not permitted when stream is capturing")


def graph_opt(model, lr=1e-2):
    return training._make_adam(model, lr, "graph", scheduled=True)  # fused, capturable, tensor lr


def graph_on_cpu(monkeypatch, stepper=GraphLogicOnCPU):
    """Make fit take its graph path on the CPU, with the CUDA calls stubbed (auto picks it, as on CUDA)."""
    monkeypatch.setattr(training, "GraphStepper", stepper)
    monkeypatch.setattr(training, "_resolve_fast", lambda fast, *args: "graph" if fast in ("auto", "graph") else fast)


def _step(model, opt):
    return functools.partial(training.train_step, model, opt, training._batch_loss, "analytic")


@pytest.mark.parametrize("n", [160, 150, 20])  # 5 full batches; 4 + a partial one; fewer than one batch
def test_graph_step_logic_matches_eager_on_cpu(data, n):
    """Batch gathering from the device-side permutation, the step counter, accumulation, NaN bookkeeping, the
    eager remainder, the tensor lr and the undoing of the warm-up: bit-identical to the eager loop, with
    _make_adam's graph optimizer (fused, capturable, tensor lr) on both."""
    train = data[0][:n]
    perm_gen = torch.Generator().manual_seed(1)
    perms = [torch.randperm(n, generator=perm_gen) for _ in range(2)]
    cpu = torch.device("cpu")
    out = {}
    for kind in ("eager", "graph"):
        model = tiny_model()
        opt = graph_opt(model)
        if kind == "graph":
            stepper = GraphLogicOnCPU(_step(model, opt), model, opt, train.clone(), 32, cpu)
            stepper.capture()
            run = stepper.run_epoch
        else:
            def run(data, perm, beta, model=model, opt=opt):
                return training.train_epoch(_step(model, opt), opt, data, perm, beta, 32, cpu)
        torch.manual_seed(7)
        sums = []
        for lr, p in zip((1e-2, 3e-3), perms, strict=True):
            training._set_lr(opt, lr)
            sums.append(tuple(t.clone() for t in run(train, p, 0.5)))
        out[kind] = (sums, torch.cat([p.detach().flatten() for p in model.parameters()]))
    for (acc_e, bad_e), (acc_g, bad_g) in zip(out["eager"][0], out["graph"][0], strict=True):
        assert torch.equal(acc_e, acc_g) and bad_e.item() == bad_g.item() == -1
    assert torch.equal(out["eager"][1], out["graph"][1])


def test_capture_restores_buffers_and_optimizer_and_trains_in_train_mode(data):
    """A model with BatchNorm, left in eval mode (as after load_run or a first fit): capture runs the warm-up in
    train mode and then restores every parameter and buffer (running statistics, num_batches_tracked) and the
    optimizer state."""
    train = data[0]
    model = tiny_model()
    model.encoder.body.append(nn.BatchNorm1d(16))
    opt = graph_opt(model)
    training._load_optimizer_state(opt, _trained_state(model))  # a resumed optimizer: non-zero moments
    model.eval()
    modes = []
    model.encoder.body[-1].register_forward_pre_hook(lambda module, args: modes.append(module.training))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = {k: v.clone() for k, v in opt.state_dict()["state"][0].items()}
    stepper = GraphLogicOnCPU(_step(model, opt), model, opt, train.clone(), 32, torch.device("cpu"))
    stepper.capture()
    assert modes and all(modes) and model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(v, opt_before[k]), k


def _trained_state(model):
    """The state of a graph optimizer after two steps on a copy of ``model`` (so model itself is unchanged)."""
    twin = tiny_model()
    twin.encoder.body.append(nn.BatchNorm1d(16))
    twin.load_state_dict(model.state_dict())
    opt = graph_opt(twin)
    for _ in range(2):
        opt.zero_grad()
        twin(torch.rand(8, 784)).loss().backward()
        opt.step()
    return opt.state_dict()


def test_forced_capture_failure_gives_the_eager_result_or_raises_when_asked(monkeypatch, data):
    train, test = data
    kw = dict(epochs=2, batch_size=32, binarize=True, progress=False, seed=2, lr=1e-2, lr_final=1e-3)
    eager = fit(tiny_model(), train, test, fast="eager", **kw)
    graph_on_cpu(monkeypatch, FailingCapture)
    with pytest.warns(UserWarning, match="capture failed"):
        auto = fit(tiny_model(), train, test, fast="auto", **kw)
    assert auto.fast == "eager"
    assert_same_params(eager.model, auto.model)
    assert without_seconds(eager.history) == without_seconds(auto.history)
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="capture failed"):
        fit(model, train, fast="graph", **kw)
    for k, v in model.state_dict().items():  # the warm-up was undone before the error
        assert torch.equal(v, before[k]), k


def test_capture_warms_up_on_the_training_data(monkeypatch, data):
    """The buffer the graph reads holds the (grey) training data before the warm-up, not uninitialised memory."""
    train, _ = data
    graph_on_cpu(monkeypatch)
    model = tiny_model()
    seen = []
    model.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    fit(model, train, epochs=1, batch_size=32, binarize=True, progress=False)
    for warmup_batch in seen[:WARMUP_STEPS]:  # the first batch of the identity permutation
        assert torch.equal(warmup_batch, train[:32])


def test_graph_path_resume_is_exact(tmp_path, monkeypatch, data, interrupt_at_epoch):
    """Interrupted in epoch 3 and resumed, the graph path continues exactly as an uninterrupted run: capture
    (whose warm-up draws noise) happens before seeding and before the checkpoint's RNG state is restored."""
    graph_on_cpu(monkeypatch)
    straight, resumed = straight_and_resumed(tmp_path, data, interrupt_at_epoch, epochs=4, batch_size=48,
                                             binarize=True, progress=False, seed=3)
    assert straight.fast == resumed.fast == "graph"
    assert json.loads((tmp_path / "run.json").read_text())["fast"] == "graph"


def test_history_lr_is_the_schedules_value_with_a_tensor_lr(monkeypatch, data):
    """The graph path's lr is a float32 device tensor; the history records lr_at_epoch's exact value."""
    real = training._make_adam
    monkeypatch.setattr(training, "_make_adam", lambda model, lr, mode, scheduled=False: real(model, lr, "graph",
                                                                                            scheduled))
    result = fit(tiny_model(), data[0], epochs=4, batch_size=32, lr=1e-2, lr_final=1e-4, progress=False)
    assert [row["lr"] for row in result.history] == [training.lr_at_epoch(e, 4, 1e-2, 1e-4) for e in range(1, 5)]


def test_fast_auto_picks_the_graph_only_for_plain_build_vae_models():
    gpu = torch.device("cuda")  # only the device's type is read: no GPU needed

    def auto(model, **kw):
        args = dict(resident=True, custom_optimizer=False) | kw
        return training._resolve_fast("auto", gpu, args["resident"], args["custom_optimizer"], model)

    assert auto(tiny_model()) == "graph"
    assert auto(tiny_model(), resident=False) == "eager"
    assert auto(tiny_model(), custom_optimizer=True) == "eager"
    hooked = tiny_model()
    hooked.encoder.register_forward_hook(lambda *args: None)
    assert auto(hooked) == "eager"
    patched = tiny_model()
    patched.encoder.reparameterize = lambda mu, log_var, n=None: mu
    assert auto(patched) == "eager"
    wrapped = tiny_model()
    wrapped.decoder.net = NaNAfter(wrapped.decoder.net, after=10)  # Python-side counter: frozen in a replay
    assert auto(wrapped) == "eager"
    # An explicit request trusts the model.
    assert training._resolve_fast("graph", gpu, True, False, wrapped) == "graph"
    assert training._resolve_fast("auto", torch.device("cpu"), True, False, tiny_model()) == "eager"


def test_tf32_flags_are_set_for_the_run_and_restored(data):
    flags = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = [f.allow_tf32 for f in flags]
    seen = []
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
        fit(tiny_model(), data[0], epochs=1, batch_size=32, progress=False, tf32=True,
            callback=lambda row, model: seen.append([f.allow_tf32 for f in flags]))
        assert seen == [[True, True]]
        assert [f.allow_tf32 for f in flags] == [False, True]

        def boom(row, model):
            seen.append([f.allow_tf32 for f in flags])
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            fit(tiny_model(), data[0], epochs=1, batch_size=32, progress=False, callback=boom)  # default: off
        assert seen[-1] == [False, False]
        assert [f.allow_tf32 for f in flags] == [False, True]
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


flushes_subnormals = pytest.mark.skipif(not torch.set_flush_denormal(False),
                                        reason="this CPU cannot flush subnormal floats to zero")


def _flushed_share(threads: int) -> float:
    """The share of a large product of subnormals that comes out zero, read from its bits (a float comparison
    would itself count a subnormal as zero on a flushing thread): torch splits it across ``threads``."""
    torch.set_num_threads(threads)
    subnormal = torch.full((1 << 22,), 1000, dtype=torch.int32).view(torch.float32)  # 1.4e-42, made from bits
    product = subnormal * 1.0
    return (product.view(torch.int32) == 0).float().mean().item()


@flushes_subnormals
def test_flush_denormals_reaches_every_intra_op_thread_and_restores_the_mode():
    """torch.set_flush_denormal sets only the calling thread's flag: with two threads, half of a large product
    would still be subnormal (tried: 0.5). The block flushes all of it, and leaves the mode as it found it."""
    from vaelib.config import flush_denormals

    saved = torch.get_num_threads()
    try:
        assert _flushed_share(2) == 0.0
        with flush_denormals():
            assert _flushed_share(2) == 1.0
            assert _flushed_share(1) == 1.0
        assert _flushed_share(2) == 0.0
        with flush_denormals(enabled=False):
            assert _flushed_share(2) == 0.0
        torch.set_flush_denormal(True)  # already on (on this thread): left on
        with flush_denormals():
            pass
        assert _flushed_share(1) == 1.0
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(saved)


@flushes_subnormals
def test_fit_flushes_subnormals_on_the_cpu_while_it_trains(data):
    from vaelib.config import _flushing_denormals

    seen = []
    fit(tiny_model(), data[0], epochs=1, batch_size=32, progress=False, device="cpu",
        callback=lambda row, model: seen.append(_flushing_denormals()))
    assert seen == [True]
    assert not _flushing_denormals()


def test_compiled_loss_has_its_own_cache_per_fit(monkeypatch, data):
    """With one compilation allowed per code object, two fits with other batch shapes both compile: each fit
    compiles its own copy of the loss (a shared module-level function would hit the limit in the second)."""
    import torch._dynamo

    monkeypatch.setattr(training, "COMPILE_BACKEND", "eager")  # trace with dynamo, skip code generation
    train = data[0]  # 160 = 5 x 32 = 10 x 16: one batch shape per fit
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        for batch_size in (32, 16):
            result = fit(tiny_model(), train, epochs=1, batch_size=batch_size, fast="compile", progress=False)
            assert result.fast == "compile" and result.setup_seconds["compile"] > 0


# ------------------------------------------------------------------------------------------------ devices
def test_select_device_names_what_is_available(monkeypatch):
    from vaelib.config import DeviceUnavailableError, select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailableError, match=r"'cuda' is not available here; available: cpu") as info:
        select_device("cuda")
    assert isinstance(info.value, ValueError)
    with pytest.raises(DeviceUnavailableError, match="not a device"):
        select_device("warp")
    with pytest.raises(DeviceUnavailableError, match="available: cpu"):
        fit(tiny_model(), torch.rand(8, 784), epochs=1, device="cuda", progress=False)
    monkeypatch.setenv("VAELIB_DEVICE", "meta")
    assert select_device() == torch.device("meta")  # the environment variable, when no device is given
    assert select_device("cpu") == torch.device("cpu")  # an explicit choice wins


def test_non_cuda_tests_run_on_the_cpu_where_cuda_is_available(monkeypatch):
    """conftest.py's autouse fixture: on a GPU machine, fit/load_run/the CLI with no device still use the CPU."""
    from vaelib.config import select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device() == torch.device("cpu")


def test_objectives_move_data_to_the_models_device():
    """A model on another device (here "meta", which computes shapes only) takes CPU data: elbo and iwae_bound
    move it there (without it: "Tensor on device cpu is not on the expected device meta")."""
    from vaelib.objectives import elbo, iwae_bound

    model = tiny_model().to("meta")
    x = torch.rand(5, 784)
    assert elbo(model, x).elbo.device.type == "meta"
    assert iwae_bound(model, x, k=3).shape == (5,)


# ------------------------------------------------------------------------------------------------ CUDA
def _trajectory(fast, train, test, epochs=8, **kw):
    model = tiny_model(hidden=(64,), latent_dim=4)
    return fit(model, train, test, epochs=epochs, batch_size=32, fast=fast, device="cuda", progress=False,
               binarize=True, **kw)


def _flat(model):
    return torch.cat([p.detach().flatten().cpu() for p in model.parameters()])


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize(("fast", "reference"), [("graph", "eager"), ("graph-compile", "compile")])
def test_cuda_graph_matches_eager_trajectory(data, fast, reference):
    """Replays draw the same noise and read the same binarised batches as the eager loop (graph-safe RNG: each
    replay gets the generator's next offset), so the trajectories agree to float32 rounding. Frozen noise or a
    frozen binarisation changes the loss by Monte-Carlo error, ~1e-2 relative, far outside this tolerance."""
    train, test = data
    ref = _trajectory(reference, train, test)
    graph = _trajectory(fast, train, test)
    assert graph.fast == fast and ref.fast == reference
    for a, b in zip(ref.history, graph.history, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4), (a, b)
        assert b["test_elbo"] == pytest.approx(a["test_elbo"], rel=1e-3), (a, b)
    assert (_flat(graph.model) - _flat(ref.model)).abs().max() < 1e-3
    assert graph.history[-1]["train_loss"] < graph.history[0]["train_loss"]


@pytest.mark.cuda
@cuda
def test_cuda_replays_draw_fresh_noise(data):
    model = tiny_model().cuda()
    opt = graph_opt(model)
    draws = torch.zeros(2, dtype=torch.float64, device="cuda")

    def step(xb, beta, acc, bad, step_index):  # writes one normal draw per replay
        acc.copy_(torch.randn(2, dtype=torch.float64, device="cuda"))

    stepper = GraphStepper(step, model, opt, data[0].cuda(), 32, torch.device("cuda"))
    stepper.capture()
    stepper.replay()
    draws.copy_(stepper.acc)
    stepper.replay()
    assert not torch.equal(draws, stepper.acc)


@pytest.mark.cuda
@cuda
def test_cuda_binarised_batches_differ_between_epochs():
    """lr ~ 0 and z = mu: the epoch's reconstruction term is a function of the binarised data alone. The graph
    reads each epoch's new draw (as the eager loop does), and the draws differ between epochs."""
    grey = torch.tensor([0.1, 0.9]).repeat_interleave(392).expand(160, 784).clone()
    rec = {}
    for fast in ("eager", "graph"):
        model = tiny_model()
        model.encoder.reparameterize = lambda mu, log_var, n=None: mu
        result = fit(model, grey, epochs=3, batch_size=32, lr=1e-12, binarize=True, fast=fast, device="cuda",
                     progress=False)
        assert result.fast == fast
        rec[fast] = [row["train_rec"] for row in result.history]
    assert rec["graph"] == pytest.approx(rec["eager"], rel=1e-4)  # a frozen draw differs by ~1e-2
    assert len(set(rec["graph"])) == 3


@pytest.mark.cuda
@cuda
def test_cuda_capture_preserves_buffers_and_train_mode(data):
    model = tiny_model()
    model.encoder.body.append(nn.BatchNorm1d(16))
    model.cuda().eval()
    opt = graph_opt(model)
    modes = []
    model.encoder.body[-1].register_forward_pre_hook(lambda module, args: modes.append(module.training))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stepper = GraphStepper(_step(model, opt), model, opt, data[0].cuda(), 32, torch.device("cuda"))
    stepper.capture()
    assert stepper.graph is not None and modes and all(modes) and model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    stepper.replay()  # a replay trains in train mode: the running statistics move
    assert not torch.equal(model.encoder.body[-1].running_mean, before["encoder.body.2.running_mean"])


@pytest.mark.cuda
@cuda
def test_cuda_forced_capture_failure_gives_the_eager_result(monkeypatch, data):
    train, test = data
    kw = dict(epochs=2, batch_size=32, binarize=True, progress=False, device="cuda")
    eager = fit(tiny_model(), train, test, fast="eager", **kw)

    def fail(self):
        raise RuntimeError("forced capture failure")

    monkeypatch.setattr(GraphStepper, "_record", fail)
    with pytest.warns(UserWarning, match="capture failed"):
        auto = fit(tiny_model(), train, test, fast="auto", **kw)
    assert auto.fast == "eager"
    assert_same_params(eager.model, auto.model)
    assert without_seconds(eager.history) == without_seconds(auto.history)
    with pytest.raises(RuntimeError, match="capture failed"):
        fit(tiny_model(), train, fast="graph", **kw)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("fast", ["eager", "graph"])
def test_cuda_resume_is_exact(tmp_path, data, interrupt_at_epoch, fast):
    straight, resumed = straight_and_resumed(tmp_path, data, interrupt_at_epoch, epochs=4, batch_size=48,
                                             lr=1e-2, lr_final=1e-3, binarize=True, progress=False, seed=3,
                                             device="cuda", fast=fast)
    assert straight.fast == resumed.fast == fast


@pytest.mark.cuda
@cuda
def test_cuda_compile_mode_runs(data):
    train, test = data
    result = _trajectory("compile", train, test, epochs=3)
    assert result.fast == "compile" and result.setup_seconds["compile"] > 0
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


@pytest.mark.cuda
@cuda
def test_cuda_host_data_through_pinned_memory_equals_resident(data):
    train, _ = data
    params = {}
    for resident in (True, False):
        result = fit(tiny_model(), train[:150], epochs=2, batch_size=32, fast="eager", device="cuda",
                     resident=resident, progress=False)
        params[resident] = _flat(result.model)
    assert torch.equal(params[True], params[False])


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("lr_final", [None, 1e-5])
def test_cuda_graph_equals_eager_without_noise(data, lr_final):
    """With z = mu (no sampling noise), the replayed graph and the eager loop make the same updates up to
    floating-point reassociation: the warm-up before capture is undone and no step is lost or doubled; with a
    schedule, the replayed graph reads each epoch's lr (a float baked in at capture would not)."""
    train, _ = data
    params = {}
    for fast in ("eager", "graph"):
        model = tiny_model(hidden=(64,), latent_dim=4)
        model.encoder.reparameterize = lambda mu, log_var, n=None: mu  # deterministic z
        result = fit(model, train[:150], epochs=3, batch_size=32, fast=fast, device="cuda", progress=False,
                     lr=1e-2, lr_final=lr_final)  # 150 = 4 full batches + a partial one per epoch
        assert result.fast == fast
        params[fast] = _flat(model)
    diff = (params["graph"] - params["eager"]).abs()
    assert diff.max() < 1e-4, diff.max()


@pytest.mark.cuda
@cuda
def test_cuda_graph_nan_detection_and_resume_from_cpu(tmp_path, data):
    train, _ = data
    fit(tiny_model(), train, epochs=1, batch_size=32, device="cpu", out_dir=tmp_path, progress=False)
    resumed = fit(tiny_model(), train, epochs=2, batch_size=32, device="cuda", fast="graph", out_dir=tmp_path,
                  resume=True, progress=False)
    assert resumed.fast == "graph" and len(resumed.history) == 2

    def poison(row, model):  # after epoch 1, a NaN weight: the first replay of epoch 2 must be flagged
        if row["epoch"] == 1:
            with torch.no_grad():
                model.decoder.net[0].weight[0, 0] = float("nan")

    with pytest.raises(TrainingDivergedError, match=r"epoch 2, step 1 of 5"):
        fit(tiny_model(), train, epochs=3, batch_size=32, device="cuda", fast="graph", progress=False,
            callback=poison)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_cuda_graph_on_a_device_that_is_not_current(data):
    with torch.cuda.device(0):
        result = fit(tiny_model(), data[0], epochs=2, batch_size=32, device="cuda:1", fast="graph", progress=False)
    assert result.fast == "graph" and next(result.model.parameters()).device == torch.device("cuda:1")
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_default_cpu_path_equals_the_plain_loop_to_float32_rounding(data):
    """fit's default CPU path (fused Adam, one reused batch buffer, sums tallied on the device) trains as
    pytorch/examples' loop written out here does (a fresh batch per step, torch's per-tensor Adam, the loss from
    objectives.elbo), with the same draws: the same seeds, and torch.bernoulli for the binarisation. 150 images
    in batches of 32 end in a partial batch, which the buffer must not pad."""
    train = data[0][:150]
    model = tiny_model(hidden=(64,))
    plain = build_vae(**model.config)
    plain.load_state_dict(model.state_dict())
    result = fit(model, train, epochs=3, batch_size=32, lr=1e-2, binarize=True, seed=5, progress=False,
                 device="cpu")
    assert result.fast == "eager"

    perm_gen, bin_gen = torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)
    torch.manual_seed(5)
    opt = torch.optim.Adam(plain.parameters(), lr=1e-2, foreach=False, fused=False)
    losses = []
    for _ in range(3):
        perm = torch.randperm(len(train), generator=perm_gen)
        binary = torch.bernoulli(train, generator=bin_gen)
        total = 0.0
        for idx in perm.split(32):
            terms = elbo(plain, binary[idx])
            opt.zero_grad()
            terms.loss().backward()
            opt.step()
            total += (terms.rec - terms.kl).sum().item()
        losses.append(-total / len(train))
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert [row["train_loss"] for row in result.history] == pytest.approx(losses, rel=1e-5)


def test_fit_many_gives_each_job_what_fit_gives_alone(data):
    """Two worker processes, each job with its own settings and init seed: every result equals fit run alone
    (on one thread, as the workers run), in the jobs' order; a failing job is named."""
    train, test = data
    jobs = [{"model": {"latent_dim": 2, "hidden": [16]}, "beta": 0.5, "init_seed": 1},
            {"model": {"latent_dim": 3, "hidden": [8]}, "beta": 2.0, "seed": 4}]
    results = training.fit_many(jobs, train, test, processes=2, epochs=2, batch_size=32, lr=1e-2, beta=1.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for job, result in zip(jobs, results, strict=True):
            torch.manual_seed(job.get("init_seed", 0))
            alone = fit(build_vae(**job["model"]), train, test, epochs=2, batch_size=32, lr=1e-2, beta=job["beta"],
                        seed=job.get("seed", 0), progress=False, device="cpu")
            assert_same_params(result.model, alone.model)
            assert without_seconds(result.history) == without_seconds(alone.history)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(VaelibError, match="job 1: ValueError: beta must be >= 0"):
        training.fit_many([jobs[0], {**jobs[1], "beta": -1.0}], train, processes=2, epochs=1)


def test_set_cpu_threads_gives_the_cpu_one_thread_unless_told(monkeypatch):
    from vaelib.config import THREADS_ENV, set_cpu_threads

    saved = torch.get_num_threads()
    monkeypatch.delenv(THREADS_ENV, raising=False)
    try:
        torch.set_num_threads(2)
        assert set_cpu_threads("meta") == 2  # not the CPU: left alone
        assert set_cpu_threads("cpu") == 1
        monkeypatch.setenv(THREADS_ENV, "2")
        assert set_cpu_threads("cpu") == 2
        assert set_cpu_threads("cpu", threads=1) == 1
    finally:
        torch.set_num_threads(saved)
