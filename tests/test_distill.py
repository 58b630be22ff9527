"""distill.py (issue #16, progressive distillation): the command, exact resume, the loss it trains, bad inputs.

A tiny class-conditional digits teacher (8x8, an 8-channel U-Net, T=20, guidance 2 from configs/digits.yaml)
trained 2 steps, distilled in rounds of 3 optimizer steps, in a temporary working directory."""
import ast
import functools
import os
import re
import sys
from pathlib import Path

import pytest
import torch

import distill
import sample
from config import load_config, to_dict
from model import build_model
from sampling.loading import load_for_sampling
from storage.checkpoints import CHECKPOINT_VERSION, load_checkpoint
from train import main as train_main
from training.distillation import (DistillRounds, distillation_target, run_distillation, sample_triples, student_loss,
    student_triples)
from training.trainer import Trainer, train

sys.path.insert(0, str(Path(__file__).resolve().parent))
from safety import DIGITS, REPO, TINY, Case, run_case  # noqa: E402

COND = [o for o in TINY if not o.startswith("model.num_classes")]  # digits: 10 classes, guidance 2


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """checkpoints/tt/last.pt of a 2-step conditional run (absolute path)."""
    root = tmp_path_factory.mktemp("teacher")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cwd = Path.cwd()
    try:
        os.chdir(root)
        train(load_config(DIGITS, COND + ["run_name=tt", "train.max_steps=2"]))
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return root / "checkpoints" / "tt" / "last.pt"


@pytest.fixture(scope="module")
def straight(teacher):
    """checkpoints/straight/ of an uninterrupted 16 -> 8 -> 4 distillation (3 steps per round), absolute."""
    root, cwd, threads = teacher.parents[2], Path.cwd(), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        os.chdir(root)
        assert distill.main(args(teacher, "run_name=straight")) == 0
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    return root / "checkpoints" / "straight"


pytestmark = pytest.mark.usefixtures("workdir")  # tests/conftest.py


def args(teacher, *extra):
    return ["--teacher", str(teacher), "--start-steps", "16", "--steps", "4", "--round-steps", "3", *extra]


def test_command_makes_a_student_that_sample_py_uses_by_default(teacher, capsys):
    run = Path("checkpoints/tt_distill")
    run.mkdir(parents=True)
    (run / "steps_0002.pt").write_bytes(b"another distillation's student")
    command = ["--teacher", str(teacher), "--start-steps", "8", "--steps", "4", "--round-steps", "3"]
    assert distill.main(command) == 1 and "holds the students of another" in capsys.readouterr().err
    assert (run / "steps_0002.pt").is_file()
    assert distill.main([*command, "--overwrite"]) == 0 and not (run / "steps_0002.pt").exists()
    last, student = load_checkpoint(run / "last.pt"), load_checkpoint(run / "steps_0004.pt")
    cfg = last["config"]
    assert (cfg["sample"]["sampler"], cfg["sample"]["steps"], cfg["sample"]["eta"]) == ("ddim", 4, 0.0)
    assert cfg["diffusion"]["timestep_spacing"] == "trailing"
    assert cfg["sample"]["guidance_scale"] == 1.0  # folded into the student: sampling must not guide again
    assert last["distill"]["teacher"] == str(teacher) and last["distill"]["guidance_scale"] == 2.0
    assert (last["distill"]["rounds"], last["distill"]["start_steps"], last["distill"]["steps"]) == ([4], 8, 4)
    assert last["step"] == 3
    assert_same(student["ema"], last["ema"], "steps_0004.pt is the final student")
    teacher_ema = load_checkpoint(teacher)["ema"]
    assert any(not torch.equal(v, teacher_ema[k]) for k, v in last["ema"].items())  # it trained
    assert sample.main(["--checkpoint", str(run / "last.pt")]) == 0
    assert Path("results/images/tt_distill/ddim_4_0/grid.png").is_file()


def test_train_py_sends_a_distillation_back_to_distill_py(straight, capsys):
    """train.py --resume on a student would silently train it with the plain loss: it names distill.py."""
    assert train_main(["--resume", str(straight / "last.pt")]) == 1
    assert "python distill.py --teacher" in capsys.readouterr().err
    Path("checkpoints").symlink_to(straight.parent, target_is_directory=True)
    assert train_main(["--resume"]) == 1  # the cifar10 preset's run does not exist: the hint lists this one
    assert "distillation 'straight': python distill.py" in capsys.readouterr().err


def assert_same(a, b, where):
    """Bitwise equality of nested checkpoint entries."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def stopped_run(teacher, stop_at, run_name):
    plan, cfg = distill.plan_and_config(distill.parse_args(args(teacher, f"run_name={run_name}")))
    return run_distillation(cfg, plan, stop_at=stop_at)


@pytest.mark.parametrize("stop_at", [3, 4])  # at the round boundary, and inside round 2
def test_interrupted_and_resumed_distillation_equals_the_straight_one(teacher, straight, stop_at):
    assert stopped_run(teacher, stop_at, "resumed")["interrupted"] == "stop_at"
    assert load_checkpoint("checkpoints/resumed/last.pt")["step"] == stop_at
    assert distill.main(args(teacher, "run_name=resumed", "--resume")) == 0
    for name in ("last.pt", "steps_0008.pt", "steps_0004.pt"):
        a, b = load_checkpoint(straight / name), load_checkpoint(Path("checkpoints/resumed") / name)
        for key in ("model", "ema", "ema_num_updates", "teacher_model", "optimizer", "lr_scheduler", "step",
                    "data_state", "rng"):
            assert_same(a[key], b[key], f"{name}: {key}")
    # round 2's teacher is round 1's student; round 1's the teacher checkpoint's EMA
    last, first = load_checkpoint(straight / "last.pt"), load_checkpoint(straight / "steps_0008.pt")
    assert all(torch.equal(last["teacher_model"][k], v) for k, v in first["ema"].items())
    assert all(torch.equal(first["teacher_model"][k], v) for k, v in load_checkpoint(teacher)["ema"].items())
    assert first["config"]["sample"]["steps"] == 8 and last["config"]["sample"]["steps"] == 4


def test_a_resume_with_other_round_settings_is_refused(teacher, capsys):
    stopped_run(teacher, 2, "changed")
    assert distill.main(args(teacher, "run_name=changed", "--resume", "--steps", "8")) == 1
    assert "the distillation differs (steps 4 -> 8)" in capsys.readouterr().err


def test_compute_loss_is_the_student_loss_against_the_guided_two_step_teacher(teacher):
    plan, cfg = distill.plan_and_config(distill.parse_args(args(teacher, "run_name=loss")))
    # Weights far from the zero-initialised output layer of a 2-step run, so guided and unguided differ.
    gen = torch.Generator().manual_seed(1)
    plan.teacher_weights = {k: v + 0.3 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                            for k, v in plan.teacher_weights.items()}
    rounds = DistillRounds(plan)
    trainer = Trainer(cfg, loss=rounds.loss, hooks=[rounds])
    try:
        with torch.no_grad():  # a student that has moved away from its teacher (round 1 starts equal)
            for p in trainer.net.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        x0, y = trainer.next_batch()
        torch.manual_seed(5)
        losses, t = trainer.compute_loss((x0, y))
        d = trainer.diffusion
        torch.manual_seed(5)
        t2, t_mid, t_next = sample_triples(student_triples(d, 8, 16), x0.shape[0])
        xt = d.q_sample(x0, t2, torch.randn_like(x0))
        model = load_for_sampling(teacher)[0]
        model.load_state_dict(plan.teacher_weights)
        target, weight = distillation_target(d, d.guided_model(model, y, 2.0), xt, t2, t_mid, t_next, clip_x0=True)
        expected = student_loss(d, trainer.net(xt, t2, y), xt, t2, target, weight)
        assert torch.equal(t, t2)
        assert torch.equal(losses, expected)
    finally:
        trainer.close()


# ----------------------------------------------------------------------------- bad inputs
def weights_only(root: Path, *overrides, config=DIGITS):
    cfg = load_config(config, [*overrides])
    torch.save({"format_version": CHECKPOINT_VERSION, "step": 1, "config": to_dict(cfg),
                "model": build_model(cfg).state_dict()}, root / "teacher.pt")


def foreign(root: Path):
    torch.save({"weights": torch.zeros(2)}, root / "teacher.pt")


KEEP, ABSENT = ("teacher.pt",), ("checkpoints/*",)
CASES = [
    Case("not-a-ddpm-lab-checkpoint", ["distill.py", "--teacher", "teacher.pt"], 1, r"not a ddpm-lab checkpoint",
         foreign, keep=KEEP, absent=ABSENT),
    Case("toy-2d-teacher", ["distill.py", "--teacher", "teacher.pt"], 1, r"distillation needs an image model",
         functools.partial(weights_only, config=str(REPO / "configs" / "toy2d.yaml")), keep=KEEP, absent=ABSENT),
    Case("start-not-a-power-of-two-multiple", ["distill.py", "--teacher", "teacher.pt", "--start-steps", "12"], 1,
         r"start_steps=12 must be final_steps=4 times a power of two", lambda r: weights_only(r, *TINY),
         keep=KEEP, absent=ABSENT),
    Case("model-override", ["distill.py", "--teacher", "teacher.pt", "--start-steps", "8", "model.channels=16"], 1,
         r"cannot override 'model.channels'", lambda r: weights_only(r, *TINY), keep=KEEP, absent=ABSENT),
    Case("start-above-T", ["distill.py", "--teacher", "teacher.pt", "--start-steps", "32"], 1,
         r"start_steps <= num_timesteps=20", lambda r: weights_only(r, *TINY), keep=KEEP, absent=ABSENT),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input(case, tmp_path):
    run_case(case, tmp_path / "w")


def test_evaluate_record_names_the_teacher_and_the_steps(straight, teacher):
    import evaluate
    found = evaluate._distilled_from(load_checkpoint(straight / "last.pt"))
    assert found == {"teacher": str(teacher), "student_steps": 4, "teacher_start_steps": 16, "guidance_scale": 2.0}
    assert evaluate._distilled_from(load_checkpoint(teacher)) is None


# ----------------------------------------------------------------------------- how distillation plugs in
def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _members(cls: ast.ClassDef) -> list[str]:
    """The names a class body defines: methods, and attributes assigned there (`_update = other`)."""
    names = [n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    for n in cls.body:
        targets = n.targets if isinstance(n, ast.Assign) else [n.target] if isinstance(n, ast.AnnAssign) else []
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def _bases(cls: ast.ClassDef) -> set[str]:
    return {b.id if isinstance(b, ast.Name) else b.attr for b in cls.bases if isinstance(b, (ast.Name, ast.Attribute))}


def private_overrides(folder: Path) -> list[str]:
    """Classes in the .py files under folder (tests and virtual environments aside) deriving, directly or not,
    from training/trainer.py's Trainer that define one of its private names, and `Sub._x = ...` assignments
    of them anywhere in those files."""
    skip = {".venv", ".git", "tests"}
    paths = [p for p in sorted(folder.rglob("*.py")) if not skip & set(p.relative_to(folder).parts)]
    trees = {path: ast.parse(path.read_text()) for path in paths}
    classes = [(path, node) for path, tree in trees.items() for node in ast.walk(tree)
               if isinstance(node, ast.ClassDef)]
    (trainer,) = [cls for path, cls in classes if path.name == "trainer.py" and cls.name == "Trainer"]
    private = {name for name in _members(trainer) if _private(name)}
    assert {"_setup", "_update", "_finish"} <= private  # the walk sees the Trainer's private methods
    derived, grown = {"Trainer"}, True
    while grown:  # subclasses of subclasses too
        more = {cls.name for _, cls in classes if _bases(cls) & derived}
        grown, derived = not more <= derived, derived | more
    found = [f"{path.name}: {cls.name}.{name}" for path, cls in classes if cls.name in derived - {"Trainer"}
             for name in _members(cls) if name in private]
    found += [f"{path.name}: {ast.unparse(t)} = ..." for path, tree in trees.items() for node in ast.walk(tree)
              if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Attribute)
              and isinstance(t.value, ast.Name) and t.value.id in derived - {"Trainer"} and t.attr in private]
    return found


def test_no_class_in_training_overrides_a_private_method_of_the_trainer(tmp_path):
    """Distillation plugs into the Trainer as a loss object and a TrainerHook using its public methods; a
    subclass overriding _update, _setup, ... would silently depend on its internals: none does anywhere in the
    tree. Planted overrides (a method of a sub-subclass, an assignment) are found in a copy of trainer.py."""
    assert private_overrides(REPO) == []
    (tmp_path / "trainer.py").write_text((REPO / "training" / "trainer.py").read_text())
    (tmp_path / "x.py").write_text("from training.trainer import Trainer\nclass A(Trainer):\n    pass\n"
                                   "class B(A):\n    def _update(self, skip):\n        pass\n"
                                   "A._finish = print\n")
    assert private_overrides(tmp_path) == ["x.py: B._update", "x.py: A._finish = ..."]


def test_each_round_has_its_own_progress_bar_naming_its_steps(teacher, capsys):
    """distill.py says which round runs and what it halves: "round 2/2: 8 → 4 steps", one bar per round (a
    resumed run starts its round's bar part-way)."""
    assert distill.main(args(teacher, "run_name=shown")) == 0
    err = capsys.readouterr().err
    assert re.search(r"round 1/2: 16 → 8 steps: 100%.*3/3", err) and re.search(r"round 2/2: 8 → 4 steps: 100%.*3/3",
                                                                              err), err[-2000:]
    assert stopped_run(teacher, 4, "shown_resumed")["interrupted"] == "stop_at"
    capsys.readouterr()
    assert distill.main(args(teacher, "run_name=shown_resumed", "--resume")) == 0
    err = capsys.readouterr().err
    assert "round 1/2" not in err and re.search(r"round 2/2: 8 → 4 steps:  33%.*1/3", err), err[-2000:]
