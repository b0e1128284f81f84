"""Learning-rate schedules: lr sequences against their closed forms (written out again here),
ReduceLROnPlateau against hand-traced sequences, checkpoints, and PyTorch when installed."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from backprop import optim, schedules
from backprop.parameter import Parameter

pytestmark = pytest.mark.backends  # once per kernel backend (tests/conftest.py)

LR = 0.4


def make_optimizer(lr=LR, dtype=np.float64, xp=np):
    return optim.SGD([Parameter(xp.ones((2, 3), dtype=dtype), "0.W"),
                      Parameter(xp.zeros(3, dtype=dtype), "0.b")], lr=lr, momentum=0.9)


def lrs(scheduler, steps):
    """The lr at construction, then after each of ``steps`` steps."""
    out = [scheduler.optimizer.lr]
    for _ in range(steps):
        scheduler.step()
        out.append(scheduler.optimizer.lr)
        assert scheduler.get_last_lr() == [out[-1]]
    return out


def step_lr_expected(steps, step_size, gamma):
    out, lr = [], LR
    for t in range(steps + 1):
        if t and t % step_size == 0:
            lr *= gamma
        out.append(lr)
    return out


def cosine_expected(steps, T_max, eta_min):
    return [eta_min + (LR - eta_min) * (1 + math.cos(math.pi * t / T_max)) / 2
            for t in range(steps + 1)]


def warmup_expected(steps, warmup, start):
    return [LR * start + (LR - LR * start) * min(t, warmup) / warmup for t in range(steps + 1)]


CLOSED_FORMS = [
    ("StepLR", {"step_size": 3, "gamma": 0.5}, lambda n: step_lr_expected(n, 3, 0.5)),
    ("StepLR", {"step_size": 1}, lambda n: step_lr_expected(n, 1, 0.1)),
    ("ExponentialLR", {"gamma": 0.9}, lambda n: [LR * 0.9 ** t for t in range(n + 1)]),
    ("CosineAnnealingLR", {"T_max": 5}, lambda n: cosine_expected(n, 5, 0.0)),
    ("CosineAnnealingLR", {"T_max": 4, "eta_min": 0.01},
     lambda n: cosine_expected(n, 4, 0.01)),
    ("LinearWarmup", {"warmup_steps": 4}, lambda n: warmup_expected(n, 4, 1 / 3)),
    ("LinearWarmup", {"warmup_steps": 5, "start_factor": 0.0},
     lambda n: warmup_expected(n, 5, 0.0)),
]


@pytest.mark.parametrize("name,kw,expected", CLOSED_FORMS,
                         ids=[f"{n}-{'-'.join(kw)}" for n, kw, _ in CLOSED_FORMS])
def test_lr_sequence_matches_closed_form(name, kw, expected):
    got = lrs(getattr(schedules, name)(make_optimizer(), **kw), 12)
    np.testing.assert_allclose(got, expected(12), rtol=1e-13, atol=1e-15)
    assert all(type(lr) is float for lr in got)


def test_cosine_reaches_eta_min_and_climbs_back():
    got = lrs(schedules.CosineAnnealingLR(make_optimizer(), T_max=4, eta_min=0.1), 8)
    assert got[0] == LR and got[4] == pytest.approx(0.1) and got[8] == pytest.approx(LR)
    assert got[5] > got[4]


def test_warmup_hands_over_to_after():
    opt = make_optimizer()
    cosine = schedules.CosineAnnealingLR(opt, T_max=6, eta_min=0.02)
    warm = schedules.LinearWarmup(opt, warmup_steps=3, start_factor=0.25, after=cosine)
    got = lrs(warm, 10)
    want = warmup_expected(2, 3, 0.25) + cosine_expected(7, 6, 0.02)
    np.testing.assert_allclose(got, want, rtol=1e-13)
    assert cosine.last_epoch == 7 and cosine.get_last_lr() == [got[-1]]


def test_a_second_schedule_starts_from_the_initial_lr():
    opt = make_optimizer()
    schedules.StepLR(opt, step_size=1, gamma=0.5).step()
    assert opt.lr == LR / 2 and opt.initial_lr == LR
    assert schedules.ExponentialLR(opt, gamma=0.9).base_lr == LR


@pytest.mark.parametrize("name,kw", [(n, kw) for n, kw, _ in CLOSED_FORMS])
def test_float32_parameters_stay_float32_under_schedules(xp, name, kw):
    opt = make_optimizer(dtype=np.float32, xp=xp)
    sched = getattr(schedules, name)(opt, **kw)
    for _ in range(4):
        for p in opt.params:
            p.grad = xp.ones(p.shape, dtype=np.float32)
        opt.step()
        sched.step()
        assert type(opt.lr) is float
    assert all(p.data.dtype == np.float32 for p in opt.params)
    assert all(v.dtype == np.float32 for v in opt.state_dict()["state"].values())


# ---------------------------------------------------------------------------------------
PLATEAU_CASES = [  # (options, metrics, lr after each step), traced by hand from the rules
    ({"factor": 0.5, "patience": 2, "threshold": 0.0},
     [5, 4, 4, 4, 4, 3, 3, 3, 3, 3, 3],
     [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]),
    ({"factor": 0.1, "patience": 1, "cooldown": 2, "min_lr": 0.005},
     [1.0] * 15,
     [1, 1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.005, 0.005, 0.005, 0.005, 0.005]),
    ({"mode": "max", "threshold_mode": "abs", "threshold": 0.1, "patience": 0, "factor": 0.5},
     [0.5, 0.55, 0.7, 0.75, 0.9],
     [1, 0.5, 0.5, 0.25, 0.25]),
    ({"threshold": 0.1, "patience": 0, "factor": 0.5},  # rel: must beat best · 0.9
     [10, 9.5, 8.9, 8.5],
     [1, 0.5, 0.5, 0.25]),
    ({"patience": 0, "factor": 0.5}, [1.0, float("nan"), 0.5], [1, 0.5, 0.5]),
]


@pytest.mark.parametrize("kw,metrics,want", PLATEAU_CASES)
def test_reduce_lr_on_plateau(kw, metrics, want):
    opt = make_optimizer(lr=1.0)
    sched = schedules.ReduceLROnPlateau(opt, **kw)
    assert opt.lr == 1.0
    got = []
    for m in metrics:
        sched.step(np.asarray(m))
        got.append(opt.lr)
        assert sched.get_last_lr() == [opt.lr]
    np.testing.assert_allclose(got, want, rtol=1e-12)


# ---------------------------------------------------------------------------------------
def plateau(opt):
    return schedules.ReduceLROnPlateau(opt, factor=0.5, patience=1, cooldown=1)


BUILDERS = {
    "StepLR": lambda o: schedules.StepLR(o, step_size=2, gamma=0.5),
    "ExponentialLR": lambda o: schedules.ExponentialLR(o, gamma=0.8),
    "CosineAnnealingLR": lambda o: schedules.CosineAnnealingLR(o, T_max=5, eta_min=0.01),
    "LinearWarmup": lambda o: schedules.LinearWarmup(
        o, 3, after=schedules.StepLR(o, step_size=2, gamma=0.5)),
    "ReduceLROnPlateau": plateau,
}
METRICS = [3.0, 2.0, 2.5, 2.5, 2.5, 1.0, 1.5, 1.5, 1.5, 1.5]


def advance(sched, epochs):
    out = []
    for e in epochs:
        if isinstance(sched, schedules.ReduceLROnPlateau):
            sched.step(METRICS[e])
        else:
            sched.step()
        out.append(sched.optimizer.lr)
    return out


@pytest.mark.parametrize("name", BUILDERS)
def test_state_dict_round_trip(name):
    straight = advance(BUILDERS[name](make_optimizer()), range(10))

    opt = make_optimizer()
    sched = BUILDERS[name](opt)
    first = advance(sched, range(4))
    saved = json.loads(json.dumps({"opt": {k: v for k, v in opt.state_dict().items()
                                           if k != "state"}, "sched": sched.state_dict()}))

    opt2 = make_optimizer(lr=7.0)  # other starting lr: everything comes from the checkpoint
    sched2 = BUILDERS[name](opt2)
    if name == "ReduceLROnPlateau":
        opt2.lr = saved["opt"]["hyper"]["lr"]  # the lr it lowered lives in the optimizer
    sched2.load_state_dict(saved["sched"])
    assert sched2.get_last_lr() == [first[-1]] and opt2.lr == first[-1]
    np.testing.assert_allclose(first + advance(sched2, range(4, 10)), straight, rtol=1e-13)


def test_load_state_dict_rejects_another_schedule():
    opt = make_optimizer()
    saved = schedules.StepLR(opt, step_size=2).state_dict()
    with pytest.raises(ValueError, match="for a StepLR schedule, not ExponentialLR"):
        schedules.ExponentialLR(opt, gamma=0.5).load_state_dict(saved)
    warm = schedules.LinearWarmup(opt, 2).state_dict()
    with pytest.raises(ValueError, match="'after'"):
        schedules.LinearWarmup(opt, 2, after=schedules.StepLR(opt, 1)).load_state_dict(warm)


@pytest.mark.parametrize("build_it,error,message", [
    (lambda o: schedules.StepLR(o, step_size=0), ValueError, "step_size must be an integer"),
    (lambda o: schedules.StepLR(o, step_size=2.5), ValueError, "step_size must be an integer"),
    (lambda o: schedules.ExponentialLR(o, gamma=-0.5), ValueError, "Invalid gamma"),
    (lambda o: schedules.CosineAnnealingLR(o, T_max=0), ValueError, "T_max"),
    (lambda o: schedules.CosineAnnealingLR(o, T_max=3, eta_min=-1), ValueError, "eta_min"),
    (lambda o: schedules.LinearWarmup(o, 3, start_factor=1.5), ValueError, "start_factor"),
    (lambda o: schedules.LinearWarmup(o, 0), ValueError, "warmup_steps"),
    (lambda o: schedules.LinearWarmup(o, 3, after=plateau(o)), TypeError, "closed-form"),
    (lambda o: schedules.LinearWarmup(o, 3, after=schedules.StepLR(make_optimizer(), 1)),
     ValueError, "same optimizer"),
    (lambda o: schedules.ReduceLROnPlateau(o, mode="avg"), ValueError, "mode"),
    (lambda o: schedules.ReduceLROnPlateau(o, factor=1.0), ValueError, "factor"),
    (lambda o: schedules.ReduceLROnPlateau(o, patience=-1), ValueError, "patience"),
    (lambda o: schedules.ReduceLROnPlateau(o, threshold_mode="pct"), ValueError,
     "threshold_mode"),
    (lambda o: schedules.StepLR("sgd", 2), TypeError, "expected a backprop optimizer"),
])
def test_arguments_are_validated(build_it, error, message):
    with pytest.raises(error, match=message):
        build_it(make_optimizer())


# ---------------------------------------------------------------------------------------
def test_sequences_match_torch():
    torch = pytest.importorskip("torch")
    S = torch.optim.lr_scheduler

    def torch_lrs(make, steps, metrics=None):
        p = torch.zeros(1, requires_grad=True)
        opt = torch.optim.SGD([p], lr=LR)
        sched = make(opt)
        out = [opt.param_groups[0]["lr"]]
        for t in range(steps):
            opt.step()
            sched.step(*([metrics[t]] if metrics else []))
            out.append(opt.param_groups[0]["lr"])
        return out

    pairs = [
        (lambda o: S.StepLR(o, 3, 0.5), lambda o: schedules.StepLR(o, 3, 0.5)),
        (lambda o: S.ExponentialLR(o, 0.9), lambda o: schedules.ExponentialLR(o, 0.9)),
        (lambda o: S.CosineAnnealingLR(o, 5, 0.01),
         lambda o: schedules.CosineAnnealingLR(o, 5, 0.01)),
        (lambda o: S.LinearLR(o, 0.2, 1.0, 4), lambda o: schedules.LinearWarmup(o, 4, 0.2)),
        (lambda o: S.SequentialLR(o, [S.LinearLR(o, 0.2, 1.0, 3), S.ExponentialLR(o, 0.8)],
                                  milestones=[3]),
         lambda o: schedules.LinearWarmup(o, 3, 0.2, after=schedules.ExponentialLR(o, 0.8))),
    ]
    for make_torch, make_ours in pairs:
        np.testing.assert_allclose(lrs(make_ours(make_optimizer()), 14),
                                   torch_lrs(make_torch, 14), rtol=1e-10)
    metrics = METRICS + [1.5] * 6
    ours = plateau(make_optimizer())
    got = [LR] + [(ours.step(m), ours.optimizer.lr)[1] for m in metrics]
    want = torch_lrs(lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=1, cooldown=1),
                     len(metrics), metrics)
    np.testing.assert_allclose(got, want, rtol=1e-13)
