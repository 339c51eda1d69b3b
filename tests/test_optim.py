"""Every optimizer, schedule and init choice builds and steps; debug hooks log when on, cost nothing when off."""

import json

import pytest
import torch
from conftest import cli, common, ok, run_dirs, summary
from torch import nn

from pipeline import cli as pipeline_cli
from pipeline import hooks, optim
from pipeline.errors import ConfigError


def tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def one_step(model, opt, sched=None):
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    if sched:
        sched.step()
    opt.zero_grad()
    return loss.item()


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_steps(name):
    _, cfg = pipeline_cli.parse(
        [f"optimizer.name={name}", "optimizer.lr=0.05", "optimizer.momentum=0.9", "optimizer.weight_decay=0.01"]
    )
    model = tiny()
    before = [p.detach().clone() for p in model.parameters()]
    opt = optim.optimizer(cfg.optimizer, model.parameters())
    assert type(opt).__name__.lower() == name
    one_step(model, opt)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("name", optim.SCHEDULERS)
@pytest.mark.parametrize("warmup", [0, 3])
def test_every_schedule_follows_its_shape(name, warmup):
    if name == "onecycle" and warmup:  # refused before any work: it has a warmup of its own
        with pytest.raises(ConfigError, match="own warmup"):
            pipeline_cli.parse([f"scheduler.name={name}", f"scheduler.warmup_steps={warmup}"])
        return
    _, cfg = pipeline_cli.parse(
        [
            f"scheduler.name={name}",
            f"scheduler.warmup_steps={warmup}",
            "optimizer.lr=0.1",
            "scheduler.step_size=1",
            "scheduler.gamma=0.5",
        ]
    )
    model = tiny()
    opt = optim.optimizer(cfg.optimizer, model.parameters())
    sched = optim.scheduler(cfg.scheduler, opt, steps_per_epoch=10, epochs=2)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        one_step(model, opt, sched)
    if warmup:
        assert lrs[0] < lrs[warmup] and lrs[0] == pytest.approx(0.1 / (warmup + 1))
    if name == "none":
        assert sched is None or lrs[-1] == pytest.approx(0.1)
    elif name == "step":
        assert lrs[-1] == pytest.approx(0.05) and lrs[max(warmup, 1)] == pytest.approx(0.1)
    elif name == "cosine":
        assert lrs[-1] < 0.02 and lrs[-1] < lrs[warmup + 1]
    elif name == "onecycle":
        peak = lrs.index(max(lrs))
        assert 0 < peak < 19 and lrs[0] < 0.1 / 5 and lrs[-1] < lrs[peak] / 100


@pytest.mark.parametrize("name", optim.INITS)
def test_every_init_builds(name):
    _, cfg = pipeline_cli.parse([f"model.init={name.upper()}"])
    model = tiny()
    default = [p.detach().clone() for p in model.parameters()]
    optim.init_weights(model, cfg.model.init, "relu")
    changed = any(not torch.equal(a, b) for a, b in zip(default, model.parameters()))
    assert changed == (name != "default")
    if name != "default":
        assert all(torch.count_nonzero(m.bias) == 0 for m in model if isinstance(m, (nn.Linear, nn.Conv2d)))
    assert one_step(model, torch.optim.SGD(model.parameters(), lr=0.01)) > 0


def test_kaiming_uses_relu_gain_for_elu():
    torch.manual_seed(0)
    layer = nn.Linear(2000, 2000)
    optim.init_weights(layer, "kaiming_normal", "elu")
    assert layer.weight.std().item() == pytest.approx((2 / 2000) ** 0.5, rel=0.05)


def test_hooks_record_only_on_logged_steps():
    model = tiny()
    stats = hooks.LayerStats(model)
    one_step(model, torch.optim.SGD(model.parameters(), lr=0.01))
    assert stats.collect() == {}  # inactive: nothing recorded
    stats.active = True
    one_step(model, torch.optim.SGD(model.parameters(), lr=0.01))
    values = stats.collect()
    expected = {"debug/activation_mean/0", "debug/activation_std/3", "debug/grad_norm/0", "debug/grad_norm/3"}
    assert expected <= set(values)
    # The recorded gradient is the loss's gradient w.r.t. the layer's output.
    stats.active = True
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))
    logits = model(x)
    logits.retain_grad()
    nn.functional.cross_entropy(logits, y).backward()
    assert stats.collect()["debug/grad_norm/3"] == pytest.approx(logits.grad.norm().item(), rel=1e-6)
    stats.remove()
    assert not model[0]._forward_hooks and not model[0]._backward_hooks


@pytest.mark.slow
def test_hooks_on_and_off_end_to_end(workdir):
    args = ["trainer.epochs=1", "trainer.max_steps=20"]
    ok(cli(common(workdir / "on", *args, "debug.hooks=true", "debug.hooks_every=10"), cwd=workdir))
    ok(cli(common(workdir / "off", *args), cwd=workdir))
    on_run, off_run = run_dirs(workdir / "on" / "runs", "digits")[0], run_dirs(workdir / "off" / "runs", "digits")[0]
    on_lines = [json.loads(x) for x in (on_run / "metrics.jsonl").read_text().splitlines()]
    debug = [x for x in on_lines if any(k.startswith("debug/") for k in x)]
    assert [x["step"] for x in debug] == [10, 20]
    assert "debug/grad_norm/net.8" in debug[0] and "debug/activation_std/net.0" in debug[0]
    assert "debug/" not in (off_run / "metrics.jsonl").read_text()
    # Observing does not change training.
    assert summary(workdir / "on" / "runs", "digits")["eval/loss"] == pytest.approx(
        summary(workdir / "off" / "runs", "digits")["eval/loss"], rel=1e-6
    )
