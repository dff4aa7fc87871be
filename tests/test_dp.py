"""Differential privacy (``train.dp``): the accountant, DP-SGD, the private mu/sigma, uploads."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord, RecordDict
from hydra import compose, initialize_config_dir

from docl_flower.core.data.idx import IdxDataset
from docl_flower.core.evaluation.results import RunResult
from docl_flower.core.features.extractors import Identity
from docl_flower.core.pipeline.client_spec import ClientSpec
from docl_flower.core.training.autoencoder import (
    Autoencoder,
    AutoencoderSpec,
    TrainSpec,
    train_autoencoder,
)
from docl_flower.core.training.calibration import train_and_calibrate
from docl_flower.core.training.dp import ACCOUNTANT, ImageBce, PrivacySpent, per_user, release_stats
from docl_flower.core.training.dp_spec import DpSpec
from docl_flower.federation import keys
from docl_flower.federation.client_tasks import handle_train
from docl_flower.federation.components import build_experiment
from docl_flower.federation.strategy import RegisterOnce
from docl_flower.federation.uploads import UploadError, UploadRules, parse_upload, read_dp

from .conftest import PROJECT_ROOT
from .test_strategy import ASSIGNMENT, RULES, reply, run_round, upload

ADAM = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-2}
#: The tiny DP trainings below share one setting (epsilon 4, delta 1e-5, sample rate 1/4,
#: 20 steps), so that Opacus's noise search runs once (it is cached).
EPOCHS, BATCHES = 5, 4
ONE_CYCLE = {"_target_": "torch.optim.lr_scheduler.OneCycleLR", "_partial_": True, "max_lr": 1e-2}


# ------------------------------------------------------------------ (a) the accountant
def _epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    from opacus.accountants import create_accountant

    accountant = create_accountant(mechanism=ACCOUNTANT)
    accountant.history = [(noise, rate, steps)]
    return float(accountant.get_epsilon(delta=delta))


def test_the_accountant_gives_opacus_documented_epsilon():
    # Opacus 1.x, opacus/tests/accountants_test.py::test_rdp_accountant: noise 1.5, sample rate
    # 0.04, int(90 / 0.04) = 2250 steps, delta 1e-5 -> epsilon 7.32911117143 (RDP).
    assert ACCOUNTANT == "rdp"
    assert _epsilon(1.5, 0.04, 2250, 1e-5) == pytest.approx(7.32911117143, abs=1e-6)


def test_the_noise_search_gives_opacus_documented_multiplier():
    from opacus.accountants.utils import get_noise_multiplier

    # opacus/tests/accountants_test.py::test_get_noise_multiplier_rdp_steps: epsilon 8,
    # delta 1e-5, sample rate 0.04, 2000 steps -> noise multiplier 1.3562 (4 places).
    noise = get_noise_multiplier(
        target_epsilon=8, target_delta=1e-5, sample_rate=0.04, steps=2000, accountant=ACCOUNTANT
    )
    assert noise == pytest.approx(1.3562, abs=1e-4)
    assert _epsilon(noise, 0.04, 2000, 1e-5) <= 8


@pytest.mark.parametrize(
    ("noise", "rate", "steps", "tight"),
    [
        # Computed with Microsoft's prv_accountant (an independent, numerically tight
        # accountant), listed in opacus/tests/prv_accountant.py (msr_values), delta 1e-6.
        (1.5, 0.05, 1000, 6.20996924657726712126759593957),
        (2.0, 0.001, 20000, 0.305837939762453436820521801565),
        (0.8, 0.05, 100, 6.74105193941409996938318727189),
    ],
)
def test_the_rdp_bound_is_never_below_the_tight_epsilon(noise, rate, steps, tight):
    bound = _epsilon(noise, rate, steps, 1e-6)
    assert tight <= bound <= 1.3 * tight


# ------------------------------------------------------------------ (b) DP-SGD and the release
@pytest.mark.filterwarnings("ignore:Secure RNG turned off", "ignore:Full backward hook")
def test_one_dp_sgd_step_is_the_average_of_clipped_per_image_gradients():
    # Prepare: Opacus's ghost clipping with our per-image loss, no noise, one full batch.
    from opacus import PrivacyEngine
    from torch.func import grad, vmap

    torch.manual_seed(0)
    x = torch.rand(32, 16)
    model = Autoencoder(16, AutoencoderSpec(hidden=4))
    before = {k: v.detach().clone() for k, v in model.named_parameters()}

    def image_loss(params: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        h = F.relu(xi @ params["encoder.weight"].T + params["encoder.bias"])
        logits = h @ params["decoder.weight"].T + params["decoder.bias"]
        return F.binary_cross_entropy_with_logits(logits, xi, reduction="sum")

    per_image = vmap(grad(image_loss), in_dims=(None, 0))(before, x)
    norms = torch.sqrt(sum((g.reshape(32, -1) ** 2).sum(1) for g in per_image.values()))
    clip = float(norms.median())  # half of the images are clipped, half are not
    scale = (clip / (norms + 1e-6)).clamp(max=1.0)
    assert (scale < 1).sum() >= 15 and (scale == 1).sum() >= 15
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=32)
    _, optimizer, criterion, _ = PrivacyEngine().make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        criterion=ImageBce(),
        data_loader=loader,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        poisson_sampling=False,
        grad_sample_mode="ghost",
    )
    # Execute
    loss = criterion(model.logits(x), x)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    # Assert
    for name, param in model.named_parameters():
        clipped = (per_image[name] * scale.view(-1, *[1] * (per_image[name].dim() - 1))).sum(0)
        torch.testing.assert_close(param.detach(), before[name] - clipped / 32)


def _dp_spec(epsilon: float = 4.0, batch_size: int = 16, **dp: object) -> TrainSpec:
    return TrainSpec(
        epochs=EPOCHS,
        batch_size=batch_size,
        optimizer=ADAM,
        scheduler=ONE_CYCLE,
        dp={"epsilon": epsilon, **dp},
    )


def test_dp_training_on_tiny_data_spends_at_most_its_budget():
    # Prepare: 64 random 16-dim images.
    x = torch.rand(64, 16, generator=torch.Generator().manual_seed(0))
    spec = _dp_spec(4.0)
    # Execute
    fit = train_and_calibrate(x, AutoencoderSpec(hidden=4), spec, seed=3)
    again = train_and_calibrate(x, AutoencoderSpec(hidden=4), spec, seed=3)
    # Assert
    spent = fit.privacy
    assert spent is not None and spent.accountant == "rdp"
    assert 0 < spent.epsilon <= 4.0 and spent.epsilon > 3.5  # the budget is used, not exceeded
    assert spent.delta == pytest.approx(1e-5)
    assert spent.epsilon == pytest.approx(spent.train_epsilon + spent.stats_epsilon)
    assert spent.train_epsilon <= 0.9 * 4.0 and spent.stats_epsilon <= 0.1 * 4.0
    assert spent.noise_multiplier > 0 and spent.stats_noise_multiplier > 0
    assert spent.steps == EPOCHS * BATCHES and spent.sample_rate == 1 / BATCHES
    assert len(fit.report.losses) == EPOCHS and all(math.isfinite(v) for v in fit.report.losses)
    bound = 0.05 * 16
    assert 0 <= fit.err_mean <= bound and 1e-3 * bound <= fit.err_std <= bound / 2
    assert fit.method == "train" and fit.folds == 0
    for name, value in fit.model.state_dict().items():  # plain module, reproducible
        assert torch.isfinite(value).all()
        assert torch.equal(value, again.model.state_dict()[name])
    assert not hasattr(next(fit.model.parameters()), "grad_sample")


def test_dp_training_with_many_empty_poisson_batches_still_runs():
    # 4 images, expected batch 1: a step's batch is empty with probability 0.75^4 = 0.32.
    x = torch.rand(BATCHES, 8, generator=torch.Generator().manual_seed(1))
    fit = train_and_calibrate(x, AutoencoderSpec(hidden=2), _dp_spec(batch_size=1), seed=0)
    assert fit.privacy is not None and 0 < fit.privacy.epsilon <= 4.0
    assert fit.privacy.steps == EPOCHS * BATCHES
    assert all(torch.isfinite(v).all() for v in fit.model.state_dict().values())


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")  # epsilon 1e4
def test_the_released_statistics_are_the_clipped_ones_plus_calibrated_noise():
    errors = torch.linspace(0.0, 20.0, 10_001)  # 10 % above the clip bound of 18
    clipped = errors.clamp(0, 18.0)
    exact = release_stats(errors, bound=18.0, epsilon=1e4, delta=1e-6, seed=0)
    assert exact.err_mean == pytest.approx(float(clipped.mean()), rel=1e-3)
    assert exact.err_std == pytest.approx(float(clipped.std(unbiased=False)), rel=1e-3)
    noisy = [release_stats(errors, 18.0, epsilon=0.5, delta=1e-6, seed=s) for s in range(20)]
    assert all(r.epsilon <= 0.5 and r.noise_multiplier > 1 for r in noisy)
    # The noise on mu is N(0, (z sqrt(2) B / n)^2): its spread over seeds matches it.
    sd = 18.0 * noisy[0].noise_multiplier * math.sqrt(2) / errors.numel()
    spread = float(np.std([r.err_mean for r in noisy]))
    assert 0.4 * sd < spread < 2.0 * sd
    tiny = release_stats(torch.tensor([1.0, 2.0]), bound=4.0, epsilon=0.1, delta=1e-6, seed=0)
    assert 0 <= tiny.err_mean <= 4.0 and 4e-3 <= tiny.err_std <= 2.0


def test_per_user_composition():
    a = PrivacySpent(2.0, 1e-5, 1.1, 1.8, 0.2, 9.0, 100, 0.1)
    b = PrivacySpent(3.0, 2e-5, 0.9, 2.7, 0.3, 9.0, 100, 0.1)
    assert per_user([a, b], disjoint=True) == {
        "epsilon": 3.0,
        "delta": 2e-5,
        "noise_multiplier": 0.9,
    }
    both = per_user([a, b], disjoint=False)
    assert both["epsilon"] == pytest.approx(5.0) and both["delta"] == pytest.approx(3e-5)


def test_non_private_training_is_unchanged_and_refuses_a_dp_spec():
    assert not TrainSpec().dp.enabled and TrainSpec() == TrainSpec(dp={"epsilon": None})
    with pytest.raises(ValueError, match="without differential privacy"):
        train_autoencoder(torch.rand(8, 4), AutoencoderSpec(hidden=2), _dp_spec(), seed=0)


def test_a_fixed_delta_must_be_below_one_over_n():
    with pytest.raises(ValueError, match=r"dp.delta 0.1 must be below 1/n"):
        DpSpec(epsilon=1.0, delta=0.1).delta_for(20)
    assert DpSpec(epsilon=1.0, delta=None).delta_for(20) == pytest.approx(1 / 200)


# ------------------------------------------------------------------ (c) inside the Flower client
def test_dp_training_runs_inside_the_flower_client_and_its_upload_validates(tiny_root):
    # Prepare: the ClientApp's logic, in-process, with train.dp.epsilon set.
    spec = ClientSpec(
        seed=11,
        dataset=IdxDataset("mnist", str(tiny_root / "mnist"), verify=False),
        features=Identity(),
        model=AutoencoderSpec(hidden=8),
        train=TrainSpec(
            epochs=EPOCHS,
            batch_size=16,  # 60 images: 4 batches
            dp=DpSpec(epsilon=4.0, delta=1e-5),
        ),
        assignment={0: [3]},
    )
    content = RecordDict({keys.CONFIG_RECORD: ConfigRecord({keys.SPEC: spec.to_json()})})
    # Execute
    answer = handle_train(content, {"partition-id": 0})
    # Assert: the metrics carry the spend, and the upload registers with it.
    metrics = answer.metric_records[keys.METRICS_RECORD]
    assert 0 < metrics[keys.DP_EPSILON] <= 4.0
    assert metrics[keys.DP_DELTA] == pytest.approx(1e-5)
    assert metrics[keys.DP_NOISE_MULTIPLIER] > 0
    rules = UploadRules.for_autoencoder(AutoencoderSpec(hidden=8), 784)
    user, (reg,) = parse_upload(answer, {0: (3,)}, rules)
    assert user == 0 and reg.num_examples == 60
    strat = RegisterOnce({0: (3,)}, rules)
    run_round(strat, [reply(answer, 7)])
    recorded = strat.outcome.result_fields()["dp"]
    assert recorded == {"0": read_dp(dict(metrics))}
    assert RunResult.from_dict({**_minimal_result(), "dp": recorded}).dp["0"]["epsilon"] <= 4.0


def _minimal_result() -> dict[str, object]:
    return {
        "method": "docl",
        "overall_accuracy": 1.0,
        "per_class_accuracy": {},
        "rounds": 1,
        "registered": [0],
        "failed": {},
        "bytes_uploaded": {},
        "bytes_downloaded": {},
        "receives_others_parameters": False,
        "train_seconds": {},
    }


# ------------------------------------------------------------------ (d) bad configs
def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


BAD_DP = [
    (["train.dp.epsilon=0"], "train.dp.epsilon"),
    (["train.dp.epsilon=-1"], "train.dp.epsilon"),
    (["train.dp.epsilon=nan"], "train.dp.epsilon"),
    (["train.dp.epsilon=inf"], "train.dp.epsilon"),
    (["train.dp.epsilon=abc"], "train.dp.epsilon"),
    (["train.dp.epsilon=true"], "train.dp.epsilon"),
    (["train.dp.epsilon=4", "train.dp.delta=1"], "train.dp.delta"),
    (["train.dp.epsilon=4", "train.dp.delta=0"], "train.dp.delta"),
    (["train.dp.epsilon=4", "train.dp.delta=abc"], "train.dp.delta"),
    (["train.dp.epsilon=4", "train.dp.max_grad_norm=0"], "train.dp.max_grad_norm"),
    (["train.dp.epsilon=4", "train.dp.max_grad_norm=inf"], "train.dp.max_grad_norm"),
    (["train.dp.epsilon=4", "train.dp.stats_share=1"], "train.dp.stats_share"),
    (["train.dp.epsilon=4", "train.dp.error_clip=0"], "train.dp.error_clip"),
    (["train.dp.epsilon=4", "+train.dp.bogus=1"], "train.dp"),
    (["train.dp=5"], "train.dp"),
    (["train.dp.epsilon=4", "train.calibration=heldout"], "train.calibration"),
]


@pytest.mark.parametrize(("overrides", "key"), BAD_DP, ids=[" ".join(o) for o, _ in BAD_DP])
def test_bad_dp_configs_fail_with_one_line_naming_the_key(overrides, key):
    with pytest.raises(ValueError) as err:
        build_experiment(_compose(overrides))
    message = str(err.value)
    assert re.match(rf"{re.escape(key)}([ :=]|$)", message), message
    assert "\n" not in message


def test_dp_overrides_reach_the_client_spec_and_the_default_is_off():
    off = build_experiment(_compose([]))
    assert isinstance(off.train, TrainSpec) and not off.train.dp.enabled
    exp = build_experiment(_compose(["train.dp.epsilon=8", "train.dp.delta=null"]))
    assert isinstance(exp.train, TrainSpec)
    assert exp.train.dp == DpSpec(epsilon=8.0, delta=None)
    assert ClientSpec.from_json(exp.client_spec.to_json()).train == exp.train
    dp_recipe = build_experiment(_compose(["train=dp"]))
    assert isinstance(dp_recipe.train, TrainSpec) and dp_recipe.train.dp.enabled


# ------------------------------------------------------------------ (e) hostile DP metrics
def _with_dp(user: int, **dp: object) -> SimpleNamespace:
    content = upload(user)
    metrics = dict(content.metric_records[keys.METRICS_RECORD])
    metrics.update({keys.DP_EPSILON: 4.0, keys.DP_DELTA: 1e-5, keys.DP_NOISE_MULTIPLIER: 1.2, **dp})
    for key in [k for k, v in dp.items() if v is None]:
        metrics.pop(key)
    return SimpleNamespace(
        metric_records={keys.METRICS_RECORD: metrics},
        array_records={keys.ARRAYS_RECORD: dict(content.array_records[keys.ARRAYS_RECORD])},
    )


BAD_DP_METRICS = {
    "epsilon nan": {keys.DP_EPSILON: float("nan")},
    "epsilon inf": {keys.DP_EPSILON: float("inf")},
    "epsilon negative": {keys.DP_EPSILON: -1.0},
    "epsilon a string": {keys.DP_EPSILON: "4"},
    "epsilon a list": {keys.DP_EPSILON: [4.0, 4.0]},
    "epsilon a bool": {keys.DP_EPSILON: True},
    "delta one": {keys.DP_DELTA: 1.0},
    "delta negative": {keys.DP_DELTA: -1e-5},
    "noise nan": {keys.DP_NOISE_MULTIPLIER: float("nan")},
    "noise missing": {keys.DP_NOISE_MULTIPLIER: None},
}


@pytest.mark.parametrize("case", sorted(BAD_DP_METRICS))
def test_a_malformed_dp_metric_rejects_that_reply_only(case):
    # Prepare: user 0's DP metrics are malformed; user 1 reports valid ones, 2-4 none.
    strat = RegisterOnce(ASSIGNMENT, RULES)
    bad = _with_dp(0, **BAD_DP_METRICS[case])
    replies = [reply(bad, 100), reply(_with_dp(1), 101)]  # type: ignore[arg-type]
    replies += [reply(upload(u), 101 + u) for u in (2, 3, 4)]
    # Execute
    run_round(strat, replies)
    # Assert
    out = strat.outcome
    assert sorted(out.registered) == [1, 2, 3, 4]
    assert list(out.failed) == [0] and "dp-" in out.failed[0]
    assert out.result_fields()["dp"] == {
        "1": {"epsilon": 4.0, "delta": 1e-5, "noise_multiplier": 1.2}
    }
    with pytest.raises(UploadError, match="dp-"):
        parse_upload(bad, ASSIGNMENT, RULES)
