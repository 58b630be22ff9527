"""The layout rule of issue #13: library modules below, command-line scripts on top.

The command-line files (train.py, sample.py, evaluate.py, export.py and the bench/ scripts) import library
modules and never each other; library modules (every other .py file at the top, dataset.py included: its
`python dataset.py --preview` is a __main__ block of a library module) never import a command-line file.
Imports are found with `ast` anywhere in a file, inside functions too."""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOP_SCRIPTS = {"train", "sample", "evaluate", "export", "distill"}


def bench_scripts() -> set[str]:
    """bench/*.py files with a __main__ block (other bench files are helpers the scripts may share)."""
    return {p.stem for p in (REPO / "bench").glob("*.py") if '__name__ == "__main__"' in p.read_text()}


def imported_names(path: Path) -> set[str]:
    """Every module name a file imports: `import a.b` -> a.b, `from a import b` -> a and a.b."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def scripts_imported(path: Path) -> set[str]:
    """The command-line files among a file's imports. A bench file runs with bench/ on sys.path, so it can
    reach a bench script by its bare name as well as by bench.<name>."""
    bench = bench_scripts()
    found = {name for name in imported_names(path) if name in TOP_SCRIPTS}
    found |= {name for name in imported_names(path) if name.startswith("bench.") and name[6:] in bench}
    if path.parent.name == "bench":
        found |= {f"bench.{name}" for name in imported_names(path) if name in bench}
    return found - {path.stem, f"bench.{path.stem}"}


def library_modules() -> list[Path]:
    return sorted(p for p in REPO.glob("*.py") if p.stem not in TOP_SCRIPTS)


def script_files() -> list[Path]:
    return [REPO / f"{name}.py" for name in sorted(TOP_SCRIPTS)] + [REPO / "bench" / f"{name}.py"
                                                                  for name in sorted(bench_scripts())]


def test_the_layout_sees_every_file():
    assert {"config", "diffusion", "generation", "loading", "paths", "utils"} <= {p.stem for p in library_modules()}
    assert {"quality", "throughput"} <= bench_scripts()


@pytest.mark.parametrize("path", library_modules(), ids=lambda p: p.name)
def test_library_modules_never_import_a_command_line_file(path):
    assert not scripts_imported(path), f"{path.name} (a library module) imports {scripts_imported(path)}"


@pytest.mark.parametrize("path", script_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_command_line_files_never_import_each_other(path):
    assert not scripts_imported(path), f"{path.relative_to(REPO)} imports {scripts_imported(path)}"


def test_the_walk_finds_imports_inside_functions(tmp_path):
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from sample import generate\n    import bench.quality\n")
    assert scripts_imported(f) == {"sample", "bench.quality"}


def test_run_paths_name_the_folders_the_scripts_always_used():
    """paths.py is the one place the output folders are spelled (relative to the working directory)."""
    from storage.paths import CLASSIFIERS, FID_REFS, INCEPTION, RunPaths
    run = RunPaths("mnist")
    assert (run.checkpoints, run.images, run.plots, run.logs, run.eval_records) == (
        Path("checkpoints/mnist"), Path("results/images/mnist"), Path("results/plots/mnist"),
        Path("results/logs/mnist"), Path("results/eval/mnist.jsonl"))
    assert (FID_REFS, CLASSIFIERS, INCEPTION) == (Path("data/fid_refs"), Path("data/classifiers"),
                                                  Path("data/inception"))
