"""The layers of the tree, read from every import (with `ast`, imports inside functions included).

    config                      imports nothing of the project
    storage/                    config
    model, diffusion,           config, storage (the core)
    dataset, utils
    limits/                     the core and below (cost estimates, on the meta device)
    sampling/                   limits, the core and below
    training/, editing/,        sampling and below (never each other)
    evaluation/, interop/
    commands/                   the features and below (sample.py's command as library calls)
    webapp/                     commands and below (app.py's page)
    train.py, sample.py, ...    anything but another script
    bench/                      anything but a script

No module imports another module's `_private` names, there is no import cycle, and every error class a user
can meet derives from config.UserError (each script catches it once)."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"train", "sample", "evaluate", "export", "distill", "app"}
CORE = {"model", "diffusion", "dataset", "utils"}
FEATURES = {"training", "editing", "evaluation", "interop"}
# What each layer may import (by top-level name); a module may always import its own package.
ALLOWED = {"config": set(), "storage": {"config"}, "core": {"config", "storage"},
           "limits": {"config", "storage"} | CORE, "sampling": {"config", "storage", "limits"} | CORE,
           "feature": {"config", "storage", "limits", "sampling"} | CORE,
           "interop": {"config", "storage", "limits"} | CORE}
ALLOWED["commands"] = ALLOWED["feature"] | FEATURES
ALLOWED["webapp"] = ALLOWED["commands"] | {"commands"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_files() -> list[Path]:
    skip = {"tests", ".venv", ".git", "checkpoints", "results", "data", "docs", "configs"}
    return sorted(p for p in REPO.rglob("*.py") if p.relative_to(REPO).parts[0] not in skip)


PROJECT = {module_name(p) for p in project_files()}
TOP = {m.split(".")[0] for m in PROJECT}


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import of a project module in a file, relative imports resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module_name(path).split(".")
                package = package[:len(package) - node.level + (path.name == "__init__.py")]
                base = ".".join(package + ([base] if base else []))
            found.append((base, [alias.name for alias in node.names]))
    return [(m, names) for m, names in found if m.split(".")[0] in TOP]


def layer(module: str) -> str:
    top = module.split(".")[0]
    if top in ("config", "storage", "limits", "sampling", "interop", "bench", "commands", "webapp"):
        return top
    if top in CORE:
        return "core"
    if top in FEATURES:
        return "feature"
    return "script" if top in SCRIPTS else "other"


def layer_problems(path: Path) -> list[str]:
    me = module_name(path)
    mine, problems = layer(me), []
    for target, names in imports(path):
        top = target.split(".")[0]
        if top == me.split(".")[0]:
            continue
        if mine in ("script", "bench"):
            bad = top in SCRIPTS
        else:
            bad = top not in ALLOWED.get(mine, set())
        if bad:
            problems.append(f"{me} ({mine}) imports {target}")
    return problems


def private_uses(path: Path) -> list[str]:
    """`from m import _x`, `m._x` on an imported project module, and `obj._x` on anything but self/cls."""
    me, found = module_name(path), []
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in TOP}
    for target, names in imports(path):
        if target != me:
            found += [f"{me}: from {target} import {n}" for n in names if n.startswith("_") and not n.startswith("__")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id in ("self", "cls"):
                continue
            if node.attr in ("_replace", "_asdict", "_fields", "_make"):  # NamedTuple's public API
                continue
            if isinstance(base, ast.Name) and base.id not in aliases and base.id[0].isupper() and base.id in {
                    n.name for n in tree.body if isinstance(n, ast.ClassDef)}:
                continue  # a class's own private names, used inside its module
            found.append(f"{me}:{node.lineno}: .{node.attr}")
    return found


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in project_files():
        edges = set()
        for target, names in imports(path):
            for cand in [f"{target}.{n}" for n in names] + [target]:
                if cand in PROJECT:
                    edges.add(cand)
                    break
        graph[module_name(path)] = edges - {module_name(path)}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_every_layer():
    layers = {layer(m) for m in PROJECT}
    assert {"config", "storage", "core", "limits", "sampling", "feature", "interop", "script", "bench"} <= layers
    assert "other" not in layers, sorted(m for m in PROJECT if layer(m) == "other")


@pytest.mark.parametrize("path", project_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_module_imports_only_its_layer_and_below(path):
    assert not layer_problems(path)


@pytest.mark.parametrize("path", [p for p in project_files() if p.relative_to(REPO).parts[0] != "bench"],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_uses_another_modules_private_names(path):
    assert not private_uses(path)


def test_there_is_no_import_cycle():
    assert not cycles(import_graph())


def test_the_checks_fail_on_planted_bad_imports(tmp_path, monkeypatch):
    """Each rule, broken once in a file placed in the tree's layout (a temp copy of the names)."""
    for folder, name, text in [
            ("", "diffusion.py", "def f():\n    from editing.algorithms import inpaint\n"),
            ("", "config.py", "from storage.paths import RunPaths\n"),
            ("storage", "x.py", "import model\n"),
            ("limits", "x.py", "from sampling import generate\n"),
            ("storage", "y.py", "import limits\n"),
            ("training", "x.py", "from editing import modes\n"),
            ("editing", "x.py", "from commands import run_request\n"),
            ("commands", "x.py", "import sample\n"),
            ("bench", "x.py", "from sample import main\n"),
            ("", "train.py", "import sample\n")]:
        (tmp_path / folder).mkdir(exist_ok=True)
        (tmp_path / folder / name).write_text(text)
        monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
        assert layer_problems(tmp_path / folder / name), (folder, name)
    (tmp_path / "sampling").mkdir()
    (tmp_path / "sampling" / "y.py").write_text("from diffusion import _choice\nimport diffusion\n"
                                                "def f(d):\n    return d._t(0, None), diffusion._x\n")
    assert len(private_uses(tmp_path / "sampling" / "y.py")) == 3
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_every_error_class_is_a_user_error():
    """A user's mistake is one line and exit 1 in every script, because they all catch config.UserError."""
    sys.path.insert(0, str(REPO))
    from config import UserError
    found = []
    for path in project_files():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and not node.name.startswith("_"):
                module = __import__(module_name(path), fromlist=[node.name])
                found.append(getattr(module, node.name))
    assert len(found) >= 9
    assert [c for c in found if not issubclass(c, UserError)] == []


def test_train_py_loads_no_editing_interop_or_evaluation_module(tmp_path):
    """The quickstart's command, on a tiny model for one step: the modules it loaded, listed at exit."""
    tiny = ["device=cpu", "data.image_size=8", "model.channels=8", "model.norm_groups=4", "model.channel_mult=[1,2]",
            "model.attention_resolutions=[]", "model.num_heads=1", "diffusion.num_timesteps=20",
            "train.batch_size=8", "train.max_steps=1", "train.amp=off", "train.sample_every=1000",
            "train.ckpt_every=1000", "train.num_sample_images=4", "train.sample_steps=2"]
    code = ("import atexit, runpy, sys\n"
            "atexit.register(lambda: print('MODULES', ' '.join(sorted(sys.modules)), file=sys.stderr))\n"
            f"sys.argv = ['train.py', '--config', {str(REPO / 'configs/digits.yaml')!r}, *{tiny!r}]\n"
            f"sys.path.insert(0, {str(REPO)!r})\n"
            f"runpy.run_path({str(REPO / 'train.py')!r}, run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("MODULES ")]
    assert line, proc.stderr[-3000:]
    loaded = set(line[-1].split()[1:])
    assert {"training.trainer", "diffusion", "model"} <= loaded
    assert not {m for m in loaded if m.split(".")[0] in ("editing", "interop", "evaluation")}


def test_run_paths_name_the_folders_the_scripts_always_used():
    """storage/paths.py is the one place the output folders are spelled (relative to the working directory)."""
    from storage.paths import CLASSIFIERS, FID_REFS, INCEPTION, RunPaths
    run = RunPaths("mnist")
    assert (run.checkpoints, run.images, run.plots, run.logs, run.eval_records) == (
        Path("checkpoints/mnist"), Path("results/images/mnist"), Path("results/plots/mnist"),
        Path("results/logs/mnist"), Path("results/eval/mnist.jsonl"))
    assert (FID_REFS, CLASSIFIERS, INCEPTION) == (Path("data/fid_refs"), Path("data/classifiers"),
                                                  Path("data/inception"))

