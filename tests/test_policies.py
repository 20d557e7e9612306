import numpy as np
import pytest

from tests.conftest import compose_config
from worldmodel.control.policies import make_policy
from worldmodel.envs.pixels import action_space

LOW, HIGH = np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32)


def policy(name, seed=0, env="carracing"):
    cfg = compose_config(f"env={env}", f"policy={name}")
    return make_policy(cfg.policy, action_space(cfg.env), np.random.default_rng(seed))


def test_pseudo_random_warmup_hold_and_split():
    p = policy("pseudo_random")
    frame = np.zeros((64, 64, 3), np.uint8)
    warmup = [p.act(frame, t) for t in range(20)]
    assert all(np.allclose(a, [-0.1, 1.0, 0.0]) for a in warmup)

    kinds = []
    t = 20
    for _ in range(8000):
        held = [p.act(frame, t + k).copy() for k in range(20)]
        t += 20
        assert all(np.array_equal(h, held[0]) for h in held), "an action is held for 20 steps"
        a = held[0]
        assert a.dtype == np.float32 and np.all(a >= LOW) and np.all(a <= HIGH)
        assert np.count_nonzero(a) <= 1, "one component at a time"
        if a[1] > 0:
            kinds.append("accelerate")
        elif a[0] < 0:
            kinds.append("left")
        elif a[0] > 0:
            kinds.append("right")
        else:
            kinds.append("brake")
    share = {k: kinds.count(k) / len(kinds) for k in ("accelerate", "left", "right", "brake")}
    # 8000 draws: the standard error of a share is at most ~0.0056; allow about 4 of them.
    assert share["accelerate"] == pytest.approx(0.35, abs=0.022)
    assert share["left"] == pytest.approx(0.30, abs=0.022)
    assert share["right"] == pytest.approx(0.30, abs=0.022)
    assert share["brake"] == pytest.approx(0.05, abs=0.012)


def test_pseudo_random_magnitudes_are_uniform():
    p = policy("pseudo_random", seed=3)
    frame = np.zeros((64, 64, 3), np.uint8)
    mags = [np.abs(p.act(frame, 20 + 20 * k)).max() for k in range(4000)]
    assert 0.0 <= min(mags) and max(mags) <= 1.0
    assert np.mean(mags) == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("name", ["random", "brownian"])
def test_other_policies_stay_in_the_action_box(name):
    p = policy(name)
    actions = np.array([p.act(None, t) for t in range(2000)])
    assert actions.dtype == np.float32 and actions.shape == (2000, 3)
    assert np.all(actions >= LOW) and np.all(actions <= HIGH)
    assert actions.std(axis=0).min() > 0.05


def test_random_policy_holds_for_refresh_steps():
    p = policy("random")
    actions = np.array([p.act(None, t) for t in range(100)])
    for start in range(0, 100, 20):
        assert np.all(actions[start : start + 20] == actions[start])
    assert not np.array_equal(actions[0], actions[20])


def test_same_seed_same_actions():
    p, q, other = policy("pseudo_random", 7), policy("pseudo_random", 7), policy("pseudo_random", 8)
    a = np.array([p.act(None, t).copy() for t in range(400)])
    b = np.array([q.act(None, t).copy() for t in range(400)])
    c = np.array([other.act(None, t).copy() for t in range(400)])
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_hold_random_holds_one_hot_actions_and_starts_across_the_view():
    p = policy("hold_random", env="cartpole")
    actions, decisions = [], []
    for t in range(3000):
        actions.append(p.act(None, t))
        decisions.append(p.until)
    actions = np.array(actions)
    assert actions.shape == (3000, 2) and set(actions.sum(1)) == {1.0}, "one-hot"
    holds = np.diff(np.unique(decisions))
    assert holds.min() == 1 and holds.max() == 6, "each draw is held 1 to 6 steps"
    assert 0.4 < actions[:, 0].mean() < 0.6
    starts = np.array([p.start_state() for _ in range(2000)])
    assert starts.shape == (2000, 4) and starts[:, 0].min() < -1.1 and starts[:, 0].max() > 1.1


@pytest.mark.parametrize(
    ("env", "name"), [("cartpole", "pseudo_random"), ("cartpole", "brownian"), ("carracing", "hold_random")]
)
def test_a_policy_that_does_not_fit_the_env_is_one_line(env, name):
    from worldmodel.control.policies import validate
    from worldmodel.errors import WorldModelError

    with pytest.raises(WorldModelError, match=f"policy={name} cannot act in env={env}") as err:
        validate(compose_config(f"env={env}", f"policy={name}"))
    assert "\n" not in str(err.value)


def test_random_policy_in_a_discrete_env_gives_one_hot_actions():
    p = policy("random", env="cartpole")
    actions = np.array([p.act(None, t) for t in range(100)])
    assert actions.shape == (100, 2) and np.all(actions.sum(1) == 1)
