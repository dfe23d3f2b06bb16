"""The DaSLaM pipeline (experiments/daslam.py): its reward formula and decomposition parsing by
hand, and an end-to-end run of the three stages at tiny size."""
import pytest

from configs import daslam_rl
from configs import daslam_sft
from configs import daslam_solver
from experiments import daslam
from lowrank_jax.data import arith

pytestmark = pytest.mark.usefixtures("fast_compile")


def _problem():
  # 5 -> +3 = 8 -> x2 = 16
  return arith.Problem(name="tom", obj="pens", start=5, ops=("add", "double"), operands=(3, 0),
                       variants=(0, 0), values=(8, 16))


@pytest.mark.parametrize("sub_answers, expected", [
    ([8, 16], 1.0 + 0.5 * 2 / 2),       # right throughout
    ([7, 16], 1.0 + 0.5 * 1 / 2),       # right answer, first step wrong
    ([8, 15], 0.0 + 0.5 * 1 / 2),
    ([16], 1.0 + 0.5 * 0 / 2),          # one sub-question: its answer is the final one
    ([8], 0.0 + 0.5 * 1 / 2),
    ([], 0.0),
    ([8, None], 0.5 * 1 / 2),
])
def test_reward_by_hand(sub_answers, expected):
  assert daslam.reward(_problem(), sub_answers, 0.5) == pytest.approx(expected)


def test_parse_decomposition():
  tok = arith.WordTokenizer.for_problems(30)
  p = _problem()
  ids = [*tok.encode(p.decomposition()), tok.eos_id, *tok.encode("| tom")]
  assert daslam.parse_decomposition(tok, ids) == p.subquestions()
  assert daslam.parse_decomposition(tok, tok.encode("| | tom has 3 pens |")) == ["tom has 3 pens"]
  five = " | ".join(["tom has 1 pens"] * 5)
  assert len(daslam.parse_decomposition(tok, tok.encode(five))) == arith.MAX_STEPS


def test_pipeline_end_to_end_tiny(tmp_path):
  workdir = str(tmp_path)
  daslam.run_stage(daslam_solver.get_config("runlocal"), workdir)
  daslam.run_stage(daslam_sft.get_config("runlocal"), workdir)
  out = daslam.run_stage(daslam_rl.get_config("runlocal"), workdir)
  assert out["base_unchanged"] and out["solver_unchanged"]
  modes = ("direct", "gold decomposition", "SFT decomposer", "RL decomposer")
  assert set(out["accuracy"]) == {(s, m) for s in ("small", "large") for m in modes}
  assert all(0.0 <= a <= 1.0 for a in out["accuracy"].values())
