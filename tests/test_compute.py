"""The compute meter counts what a strategy computes, exactly where it can be worked out
by hand: an MLP's forward and backward FLOPs, a frozen backbone's, a teacher's forward and
herding's feature pass under their own names; memoised steps count what counting every
step counts; the same run counts the same; bad settings are refused clearly.

On split digits (8x8 inputs, 5 x 2 classes) with an MLP 64-32-10, one matrix product per
linear layer: a forward pass of N rows costs 2N(64*32 + 32*10) FLOPs. Backward computes a
weight's gradient (2N*in*out) for every trainable layer, and an input's gradient (the
same again) only where that input needs one: never for the first layer, whose input is
data, nor below a frozen layer.
"""

from __future__ import annotations

import pytest
import torch

from clsim.assembly import build_stream, load_scenario_data
from clsim.compute import ComputeMeter, check_mode, mode_from_env, without_clocks
from clsim.config import parse_scenario
from clsim.context import RunContext
from clsim.engine import run_strategy
from clsim.errors import ConfigError
from clsim.evaluation import plan_of
from clsim.flops import flops_of

IN, HIDDEN, OUT = 64, 32, 10
FORWARD_PER_ROW = 2 * (IN * HIDDEN + HIDDEN * OUT)

SCENARIO = f"""
name: compute
seed: 0
threads: 1
data: {{dataset: digits}}
stream: {{type: class_incremental, n_experiences: 5}}
model: {{name: mlp, hidden: [{HIDDEN}]}}
training: {{epochs: 2, batch_size: 64, optimizer: {{name: sgd, lr: 0.1, momentum: 0.9}}}}
strategies:
  naive: {{plugins: [naive]}}
  frozen: {{plugins: ["test_compute:FreezeBackbone"]}}
  herding: {{plugins: [{{replay: {{selection: herding, capacity: 100}}}}]}}
  reservoir: {{plugins: [{{replay: {{capacity: 100}}}}]}}
  lwf: {{plugins: [lwf]}}
  der: {{budget: 'model + 300 exemplars', plugins: [der]}}
  agem: {{budget: 'model + 300 exemplars', plugins: [agem]}}
  er_ace: {{budget: 'model + 300 exemplars', plugins: [er_ace]}}
  ewc: {{plugins: [ewc]}}
  icarl: {{budget: 'model + 300 exemplars', plugins: [icarl]}}
  nmc: {{plugins: [nmc]}}
  memo: {{budget: '8 models + 300 exemplars', plugins: [memo]}}
  prd: {{plugins: [prd]}}
  si: {{plugins: [{{si: {{c: 0.01, xi: 0.1}}}}]}}
  pl_fms: {{budget: 'model + 300 exemplars', plugins: [pl_fms]}}
  gdumb: {{budget: 'model + 300 exemplars', plugins: [gdumb]}}
"""


class FreezeBackbone:
    """Freezes the encoder at setup: only the head trains."""

    def clsim_setup(self, ctx: RunContext) -> None:
        ctx.model.features.requires_grad_(False)


@pytest.fixture(scope="module")
def setting():
    torch.set_num_threads(1)
    scenario = parse_scenario(SCENARIO)
    dataset = load_scenario_data(scenario)
    return scenario, dataset, build_stream(scenario, dataset, scenario.seed)


def run(setting, name: str, mode: str = "on", online: bool = False) -> dict:
    scenario, dataset, stream = setting
    outcome = run_strategy(scenario, scenario.strategies[name], dataset, stream,
                           seed=scenario.seed, device=torch.device("cpu"), compute=mode)
    assert outcome.error is None, outcome.error
    return outcome.to_dict()["compute"]


def n_train(setting) -> int:
    return sum(exp.n_train for exp in setting[2])


def n_steps(setting, epochs: int = 2, batch: int = 64) -> int:
    return epochs * sum(-(-exp.n_train // batch) for exp in setting[2])


def evaluation_flops(setting, per_row: int = FORWARD_PER_ROW) -> int:
    """The untrained model's evaluation and one after each experience, every test row."""
    stream = setting[2]
    return (len(stream) + 1) * plan_of(stream).n_predicted * per_row


def test_an_mlp_costs_its_closed_form(setting):
    compute = run(setting, "naive")
    rows = 2 * n_train(setting)  # two epochs
    assert compute["parts"] == {
        "training.forward": rows * FORWARD_PER_ROW,
        # first layer: weight gradient only; head: weight and input gradients
        "training.backward": rows * (2 * IN * HIDDEN + 4 * HIDDEN * OUT),
        "evaluation.forward": evaluation_flops(setting),
    }
    assert compute["flops_total"] == sum(compute["parts"].values())
    assert compute["steps"] == n_steps(setting)
    stream = setting[2]
    assert compute["samples_forwarded"] == {
        "training": rows, "evaluation": (len(stream) + 1) * plan_of(stream).n_predicted}
    assert compute["inference_flops_per_sample"] == FORWARD_PER_ROW
    # each experience counts two signatures (a full batch, the last shorter one) of three
    # regions (forward, backward, step; naive has no hook in a step); the rest is memoised
    assert compute["step_regions"] == {"counted": 3 * 2 * 5,
                                       "memoised": 3 * (n_steps(setting) - 2 * 5)}
    # each evaluation (6) predicts every test set in one batch: a size met before in the
    # same evaluation is charged from the memo
    sizes = [exp.n_test for exp in stream]
    assert compute["prediction_regions"] == {
        "counted": 6 * len(set(sizes)), "memoised": 6 * (len(sizes) - len(set(sizes)))}
    assert compute["prediction_regions"]["memoised"] > 0
    experiences = [row for row in compute["rows"] if row["stage"] == "experience"]
    assert [row["experience"] for row in experiences] == list(range(len(stream)))
    for row, exp in zip(experiences, stream, strict=True):
        assert row["parts"]["training.forward"] == 2 * exp.n_train * FORWARD_PER_ROW
        assert row["optimizer_steps"] == 2 * -(-exp.n_train // 64)
        assert row["cpu_seconds"] >= 0 and row["wall_seconds"] >= 0
    assert "mm" in compute["counted_ops"] and "convolution" in compute["counted_ops"]


def test_a_small_cnn_costs_its_closed_form(setting):
    """small_cnn on the 8x8 digits, channels [4, 8]: a 3x3 convolution (padding 1) costs
    2 * Cout * Cin * 3 * 3 * Hout * Wout per row forward; 8x8 -> pool -> 4x4 -> pool ->
    global pool -> the head (8 -> 10). Backward: every conv's weight gradient (its forward
    again), the second conv's input gradient (the first's input is data), the head's two;
    BatchNorm, pooling and ReLU count 0."""
    scenario, dataset, _ = setting
    cnn = parse_scenario(SCENARIO.replace(f"{{name: mlp, hidden: [{HIDDEN}]}}",
                                          "{name: small_cnn, channels: [4, 8]}")
                         .replace("epochs: 2", "epochs: 1"))
    stream = build_stream(cnn, dataset, cnn.seed)[:2]
    outcome = run_strategy(cnn, cnn.strategies["naive"], dataset, stream, seed=0,
                           device=torch.device("cpu"), compute="on")
    assert outcome.error is None, outcome.error
    compute = outcome.to_dict()["compute"]
    conv1, conv2, head = 2 * 4 * 1 * 9 * 8 * 8, 2 * 8 * 4 * 9 * 4 * 4, 2 * 8 * 10
    rows = sum(exp.n_train for exp in stream)
    assert compute["parts"] == {
        "training.forward": rows * (conv1 + conv2 + head),
        "training.backward": rows * (conv1 + 2 * conv2 + 2 * head),
        "evaluation.forward": 3 * plan_of(stream).n_predicted * (conv1 + conv2 + head),
    }
    assert compute["inference_flops_per_sample"] == conv1 + conv2 + head


def test_a_convolution_costs_its_closed_form():
    """On a bare convolution, stride 2: Hout = Wout = 5 for a 9x9 input, padding 1."""
    conv = torch.nn.Conv2d(3, 6, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 9, 9, requires_grad=True)
    out, forward = flops_of(lambda: conv(x))
    assert out.shape == (2, 6, 5, 5)
    assert forward == 2 * 2 * 6 * 3 * 3 * 3 * 5 * 5
    _, backward = flops_of(lambda: out.sum().backward())
    assert backward == 2 * forward  # the weight's gradient and the input's


def test_the_counter_sees_what_autograd_computes():
    """The rule the closed forms rest on, on a bare module: no gradient matrix product for
    a frozen layer, none for an input that needs no gradient."""
    layers = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    x = torch.randn(11, 5)
    out, forward = flops_of(lambda: layers(x))
    assert forward == 2 * 11 * (5 * 7 + 7 * 3)
    _, backward = flops_of(lambda: out.sum().backward())
    assert backward == 2 * 11 * 5 * 7 + 4 * 11 * 7 * 3
    layers[0].requires_grad_(False)
    out = layers(x)
    _, backward = flops_of(lambda: out.sum().backward())
    assert backward == 2 * 11 * 7 * 3  # the head's weight gradient alone


def test_a_frozen_backbone_is_charged_its_forward_only(setting):
    compute = run(setting, "frozen")
    rows = 2 * n_train(setting)
    assert compute["parts"]["training.forward"] == rows * FORWARD_PER_ROW
    # the head's weight gradient; its input (frozen features) needs none
    assert compute["parts"]["training.backward"] == rows * 2 * HIDDEN * OUT
    # evaluation reads the frozen features from the simulator's cache: charged as computed
    assert compute["parts"]["evaluation.forward"] == evaluation_flops(setting)


def test_the_feature_cache_does_not_change_a_count(setting, monkeypatch):
    """Features the cache serves are charged as if computed: on or off, warm or cold, the
    count is the same (a compare cell counts the same first or last in its worker)."""
    warm = run(setting, "nmc")
    again = run(setting, "nmc")  # every feature served from the cache now
    monkeypatch.setattr("clsim.feature_cache._CACHE", None)
    monkeypatch.setenv("CLSIM_FEATURE_CACHE", "off")
    off = run(setting, "nmc")
    assert without_clocks({"compute": warm}) == without_clocks({"compute": again}) \
        == without_clocks({"compute": off})
    assert warm["parts"]["nmc.clsim_train_experience"] > 0


def test_herding_and_a_teacher_have_parts_of_their_own(setting):
    herding = run(setting, "herding")
    # herding runs the experience's samples through the encoder once (64 -> 32)
    assert herding["parts"]["replay.herding"] == n_train(setting) * 2 * IN * HIDDEN
    assert "replay.clsim_after_experience" not in herding["parts"]
    lwf = run(setting, "lwf")
    later = sum(exp.n_train for exp in setting[2][1:])  # no teacher in the first experience
    assert lwf["parts"]["lwf.teacher"] == 2 * later * FORWARD_PER_ROW
    assert lwf["rows"][1]["parts"].get("lwf.teacher", 0) == 0  # experience 0
    icarl = run(setting, "icarl")
    assert icarl["parts"]["icarl.teacher"] > 0
    prd = run(setting, "prd")  # the old encoder's forward, in clsim_forward
    assert prd["parts"]["prd.teacher"] > 0 and "prd.clsim_forward" not in prd["parts"]
    # iCaRL herds with replay's code in its own hook: the part is named by the plugin
    assert icarl["parts"]["icarl.herding"] == n_train(setting) * 2 * IN * HIDDEN


def same_counts(on: dict, every: dict) -> None:
    """``on`` (memoised) and ``every`` (every step counted) count the same, and the memo
    was used: some step region of the memoised run was charged from it."""
    regions = [(compute.pop("step_regions"), compute.pop("prediction_regions"))
               for compute in (on, every)]
    for compute in (on, every):
        compute.pop("mode"), compute.pop("estimated")
    assert without_clocks({"compute": on}) == without_clocks({"compute": every})
    (steps, predictions), (every_steps, every_predictions) = regions
    assert steps["memoised"] + predictions["memoised"] > 0, regions[0]
    assert every_steps["memoised"] == every_predictions["memoised"] == 0, regions[1]


@pytest.mark.parametrize("name", ["naive", "reservoir", "herding", "lwf", "der", "agem",
                                  "er_ace", "ewc", "icarl", "frozen", "memo", "prd", "si",
                                  "pl_fms", "gdumb", "nmc"])
def test_memoised_steps_count_what_counting_every_step_counts(setting, name):
    """The memo's assumption (a step's FLOPs follow from its shapes within one plan),
    checked on the built-in strategies: replayed rows, a teacher, A-GEM's reference
    gradient, DER's stored logits, EWC's penalty, PL-FMS's random share of replayed rows
    and its per-sample losses, MEMO's blocks."""
    same_counts(run(setting, name, "on"), run(setting, name, "every_step"))


@pytest.mark.parametrize(("file", "name"), [
    ("fscil_strategies_quick", "fast_slow"), ("fscil_strategies_quick", "prototype_fscil"),
    ("fscil_strategies_quick", "nmc"), ("analytic_quick", "analytic"),
    ("pl_fms_quick", "pl_fms"), ("memo_quick", "memo"), ("prd_quick", "prd"),
    ("classics_quick", "si"),
])
def test_memoised_steps_hold_on_the_quick_scenarios(file, name):
    """The same on the shipped quick scenarios of strategies the split-digits setting
    does not cover (few-shot sessions, hierarchical labels), on a shortened stream."""
    from helpers import REPO_ROOT

    from clsim.config import load_scenario

    scenario = load_scenario(REPO_ROOT / "scenarios" / f"{file}.yaml")
    dataset = load_scenario_data(scenario)
    stream = build_stream(scenario, dataset, scenario.seed)[:3]
    counts = []
    for mode in ("on", "every_step"):
        outcome = run_strategy(scenario, scenario.strategies[name], dataset, stream,
                               seed=scenario.seed, device=torch.device("cpu"), compute=mode)
        assert outcome.error is None, outcome.error
        counts.append(outcome.to_dict()["compute"])
    same_counts(*counts)


@pytest.mark.parametrize("name", ["reservoir", "der", "memo", "prd", "si"])
def test_memoised_steps_hold_on_an_online_stream(setting, name):
    """Online: many short plans (one per part between anytime evaluations), a buffer
    filling while the stream goes by, MEMO's blocks and PRD's teacher."""
    scenario, dataset, _ = setting
    online = parse_scenario(SCENARIO.replace(
        "n_experiences: 5}", "n_experiences: 5, online: true, eval_every: 100}").replace(
        "epochs: 2", "epochs: 1"))
    stream = build_stream(online, dataset, online.seed)
    counts = []
    for mode in ("on", "every_step"):
        outcome = run_strategy(online, online.strategies[name], dataset, stream, seed=0,
                               device=torch.device("cpu"), compute=mode)
        assert outcome.error is None, outcome.error
        counts.append(outcome.to_dict()["compute"])
    same_counts(*counts)
    # parts cut at every 100 samples: at least one step more per cut than offline
    assert counts[0]["steps"] >= sum(-(-exp.n_train // 64) for exp in stream)


def test_memo_costs_more_per_test_sample_as_its_blocks_grow(setting):
    """Inference per test sample, row by row: MEMO adds a block per experience, and every
    prediction runs through all of them."""
    compute = run(setting, "memo")
    per_sample = [row["inference_flops_per_sample"] for row in compute["rows"]
                  if row["stage"] == "experience"]
    assert all(a < b for a, b in zip(per_sample, per_sample[1:], strict=False))
    assert compute["inference_flops_per_sample"] == per_sample[-1]
    assert compute["parts"]["memo.herding"] > 0


def test_the_same_run_counts_the_same(setting):
    first, second = run(setting, "der"), run(setting, "der")
    assert without_clocks({"compute": first}) == without_clocks({"compute": second})


def test_off_counts_nothing(setting):
    scenario, dataset, stream = setting
    outcome = run_strategy(scenario, scenario.strategies["naive"], dataset, stream,
                           seed=0, device=torch.device("cpu"), compute="off")
    assert outcome.to_dict()["compute"] is None


def test_bad_settings_are_named(monkeypatch, setting):
    monkeypatch.setenv("CLSIM_COMPUTE", "sometimes")
    with pytest.raises(ConfigError, match=r"CLSIM_COMPUTE='sometimes'.*on, every_step, off"):
        mode_from_env()
    monkeypatch.setenv("CLSIM_COMPUTE", "Every_Step")
    assert mode_from_env() == "every_step"
    with pytest.raises(ConfigError, match="expected one of on, every_step, off"):
        check_mode("memo")
    scenario, dataset, stream = setting
    with pytest.raises(ConfigError, match="'always'"):
        run_strategy(scenario, scenario.strategies["naive"], dataset, stream, seed=0,
                     device=torch.device("cpu"), compute="always")
    ctx = RunContext("s", torch.nn.Linear(1, 1), torch.device("cpu"), None, 0, 1, 1)
    for bad in ("", "a.b", 3):
        with pytest.raises(ValueError, match="compute_part takes a non-empty name"):
            ctx.compute_part(bad)
    with ctx.compute_part("fine"):  # outside a run: nothing to charge, no error
        pass


def test_a_bad_clsim_compute_stops_clsim_run_before_anything_runs(monkeypatch, tmp_path,
                                                                  capsys):
    from helpers import REPO_ROOT

    from clsim.cli import main

    monkeypatch.setenv("CLSIM_COMPUTE", "bogus")
    out = tmp_path / "out"
    code = main(["run", str(REPO_ROOT / "scenarios" / "quickstart.yaml"), "--out", str(out),
                 "--no-progress"])
    assert code == 2
    assert capsys.readouterr().err.startswith(
        "clsim: error: environment variable CLSIM_COMPUTE='bogus': expected one of on, "
        "every_step, off")
    assert not out.exists()


def test_a_meter_names_parts_inside_hooks():
    meter = ComputeMeter()
    layer = torch.nn.Linear(4, 4)
    with meter.active():
        with meter.hook("replay", "clsim_after_experience"):
            layer(torch.ones(2, 4))
            with meter.plugin_part("herding"):
                layer(torch.ones(3, 4))
        layer(torch.ones(5, 4))  # outside a counted region: the engine's own work
        with meter.counted():
            layer(torch.ones(1, 4))
        with meter.paused(), meter.hook("replay", "clsim_after_batch"):
            layer(torch.ones(7, 4))  # a memoised step: charged by the memo, not counted
    meter.finish()
    assert meter.totals() == {"replay.clsim_after_experience": 2 * 2 * 16,
                              "replay.herding": 2 * 3 * 16, "run": 2 * 16}


def test_a_plugin_that_trains_itself_memoises_its_own_steps():
    """TAME owns its experiences and marks its steps with ``ctx.compute_step``: memoised,
    they count what counting every step counts."""
    from helpers import REPO_ROOT

    from clsim.config import load_scenario

    scenario = load_scenario(REPO_ROOT / "scenarios" / "tame_quick.yaml")
    dataset = load_scenario_data(scenario)
    stream = build_stream(scenario, dataset, scenario.seed)
    counts = []
    for mode in ("on", "every_step"):
        outcome = run_strategy(scenario, scenario.strategies["tame"], dataset, stream,
                               seed=scenario.seed, device=torch.device("cpu"), compute=mode)
        assert outcome.error is None, outcome.error
        counts.append(outcome.to_dict()["compute"])
    regions = counts[0]["step_regions"]
    same_counts(*counts)
    assert regions["memoised"] > 10 * regions["counted"]
    assert counts[0]["parts"]["training.backward"] > 0
    assert counts[0]["parts"]["tame.clsim_predict"] > 0


@pytest.mark.parametrize("mode", ["on", "every_step"])
def test_a_step_nested_in_a_memoised_step_is_charged_on_its_own(mode):
    """A loop step charged from the memo still runs a nested ``plugin_step``: its rows,
    unknown to the loop's signature, are charged right either way."""
    meter = ComputeMeter(mode)
    layer = torch.nn.Linear(4, 4)
    memo = meter.memo(("loop",))
    with meter.active():
        for rows in (1, 2, 3, 2):  # one loop signature, the nested rows drawn at random
            with memo.region(("before_batch",)), meter.hook("p", "clsim_before_batch"):
                layer(torch.ones(5, 4))  # the hook's own work, the same every step
                with meter.plugin_step(("losses", rows)):
                    layer(torch.ones(rows, 4))
    meter.finish()
    assert meter.totals() == {"p.clsim_before_batch": 2 * 16 * (4 * 5 + 1 + 2 + 3 + 2)}
    if mode == "on":  # the loop's step counted once, the nested one per distinct size
        assert meter.regions == {"counted": 1 + 3, "memoised": 3 + 1}


def test_state_sizes_read_what_a_plugin_holds():
    """Numbers, tensor shapes, lengths, one level into containers and into objects
    without a length: what a step's FLOPs may follow from."""
    from types import SimpleNamespace

    from clsim.compute import state_sizes

    class Holder:
        def __init__(self) -> None:
            self.steps, self.scale, self.on = 3, 0.5, True
            self.store = {"a": torch.zeros(2, 3), "b": [torch.zeros(4)]}
            self.counters = SimpleNamespace(seen=7, rows=torch.zeros(5))
            self.name, self.layer, self.nothing = "x", torch.nn.Linear(2, 2), None
            self.many = list(range(100))

    holder = Holder()
    before = state_sizes([("h", holder)])
    assert before == (((3, 0.5, True, ((2, 3), 1), (7, (5,)), None, None, None, 100)),)
    for change in (lambda h: setattr(h, "steps", 4),
                   lambda h: h.store.__setitem__("a", torch.zeros(3, 3)),
                   lambda h: setattr(h.counters, "seen", 8),
                   lambda h: h.store["b"].append(torch.zeros(1)),
                   lambda h: setattr(h, "on", False)):
        changed = Holder()
        change(changed)
        assert state_sizes([("h", changed)]) != before
    assert state_sizes([("h", object())]) == ()
