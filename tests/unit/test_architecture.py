"""The core never names a method: no plugin name appears in pipeline/engine/ or pipeline/stages/
(methods reach the trainer only as objects, through the registry and build.py)."""

import re

from testkit import ROOT

from pipeline import registry

GROUPS = ("losses", "reweighting", "samplers", "models", "finetune")
# names that are also plain words of the core's vocabulary
GENERIC = {"none", "instance", "continue", "inverse", "reversed", "progressive", "ce", "cb", "am", "hinge", "sqrt"}


def test_no_method_is_named_in_the_engine_or_the_stages():
    names = {n for g in GROUPS for n in registry.names(g)} - GENERIC
    names |= {"ldam", "lsoftmax", "needs_norms", "strong_augment"}
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, names))) + r")\b", re.IGNORECASE)
    hits = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
            for folder in ("pipeline/engine", "pipeline/stages") for path in sorted((ROOT / folder).glob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)


# -- one home per fact. Each fact below is written in exactly one module of pipeline/.

def _code_lines(pattern: str) -> list[str]:
    """'path:line: text' of every line of pipeline/**/*.py matching `pattern` (comments included)."""
    rx = re.compile(pattern)
    return [f"{path.relative_to(ROOT).as_posix()}:{i}: {line.strip()}"
            for path in sorted((ROOT / "pipeline").rglob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1) if rx.search(line)]


def _only_in(hits: list[str], home: str) -> list[str]:
    return [h for h in hits if not h.startswith(home + ":")]


def test_the_cifar_normalisation_is_written_once():
    hits = _code_lines(r"0\.4914|0\.2023")
    assert hits and not _only_in(hits, "pipeline/data/sources.py"), "\n".join(hits)


def test_the_default_experiment_name_is_written_once():
    hits = _code_lines(r"""(?i)experiment\w*\s*(:\s*\w+\s*)?=\s*["']longtail["']""")
    assert [h.split(":")[0] for h in hits] == ["pipeline/tracking.py"], "\n".join(hits)


def test_one_atomic_writer_and_one_csv_writer():
    for pattern in (r"os\.replace\(|os\.rename\(|mkstemp\(", r"csv\.(writer|DictWriter)\("):
        hits = _code_lines(pattern)
        assert hits and not _only_in(hits, "pipeline/io.py"), "\n".join(hits)


def test_one_yaml_reader():
    """YAML 1.1 (yaml.safe_load) reads 1e-05 as a string, checks.yaml_load as a number: one reader, one rule."""
    hits = _code_lines(r"yaml\.(safe_load|load|full_load|unsafe_load)\(")
    assert hits and not _only_in(hits, "pipeline/checks.py"), "\n".join(hits)


# -- each DVC stage depends on the project code it runs

# what a stage runs: its module, and the built-in plugins it loads through entry points
STAGE_CODE = {"build_dataset": ["pipeline/stages/build_dataset.py"],
              "pretrain": ["pipeline/stages/training.py", "pipeline/methods", "pipeline/models"],
              "finetune": ["pipeline/stages/training.py", "pipeline/methods", "pipeline/models"],
              "evaluate": ["pipeline/stages/evaluate.py", "pipeline/models"]}
# imported, but they never change what a stage computes: errors, durable writes, MLflow, plugin lookup,
# value checks, method naming, console progress, the plugin authors' contract test
NO_RESULT = {"pipeline/__init__.py", "pipeline/errors.py", "pipeline/io.py", "pipeline/tracking.py",
             "pipeline/registry.py", "pipeline/checks.py", "pipeline/method_names.py", "pipeline/testing.py",
             "pipeline/engine/progress.py", "pipeline/interrupts.py"}
# the code that makes data/prepared/dataset.npz, a dependency of every later stage
DATASET_CODE = {"pipeline/data/__init__.py", "pipeline/data/sources.py", "pipeline/data/profiles.py"}
IMPORTED_FOR_NAMES = {"evaluate": {"pipeline/stages/training.py",  # the dataset and checkpoint paths
                                   "pipeline/plugin_kit.py"}}  # the loss heads' names (build.py)


def _pipeline_imports(path):
    """The pipeline/ files a module imports (at the top or inside functions)."""
    import ast

    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1])  # the package a relative import starts from (for __init__: its own)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = (package[:len(package) - node.level + 1] if node.level else [])
            names = [".".join(base + ([node.module] if node.module else []))]
            names += [f"{names[0]}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            for candidate in (ROOT / (name.replace(".", "/") + ".py"), ROOT / name.replace(".", "/") / "__init__.py"):
                if name.split(".")[0] == "pipeline" and candidate.exists():
                    found.add(candidate)
    return found


def test_each_stage_depends_on_the_code_it_runs():
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for stage, entry in STAGE_CODE.items():
        todo = [f for e in entry for f in ([ROOT / e] if e.endswith(".py") else (ROOT / e).glob("*.py"))]
        seen = set()
        while todo:
            f = todo.pop()
            if f not in seen:
                seen.add(f)
                todo += _pipeline_imports(f)
        deps = [d.rstrip("/") for d in stages[stage]["deps"]]
        allowed = NO_RESULT | IMPORTED_FOR_NAMES.get(stage, set()) | (DATASET_CODE if stage != "build_dataset" else set())
        untracked = sorted(rel for rel in (f.relative_to(ROOT).as_posix() for f in seen)
                           if rel not in allowed and not any(rel == d or rel.startswith(d + "/") for d in deps))
        assert not untracked, f"dvc.yaml: stage {stage} runs {untracked} but does not depend on it"


# -- the fine-tune contract is written down, and strategies keep to it

def test_strategies_use_only_the_trainer_surface_the_contract_names():
    from pipeline.engine import contract

    named = set(re.findall(r"`([a-z_]+)[`(/ ]", contract.__doc__))
    used = {}
    for path in sorted((ROOT / "pipeline" / "methods").glob("*.py")):
        for attr in re.findall(r"\b(?:ctx\.trainer|trainer|self\.t|t)\.([a-z_]\w*)", path.read_text()):
            used.setdefault(attr, path.name)
    outside = {attr: where for attr, where in used.items() if attr not in named}
    assert not outside, f"trainer attributes used by strategies but not in engine/contract.py: {outside}"


# -- the project's own docs/methods.md, which the method modules cite by section

def test_method_modules_cite_their_section_of_the_projects_methods_doc():
    import ast

    sections = set(re.findall(r"^## (§\d+) ", (ROOT / "docs" / "methods.md").read_text(), re.M))
    modules = sorted((ROOT / "pipeline" / "methods").glob("[!_]*.py")) + [ROOT / "pipeline" / "models" / "bbn.py"]
    modules += sorted((ROOT / "plugins").glob("*/src/*/loss.py"))
    for path in modules:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        cited = re.findall(r"docs/methods\.md (§\d+)", doc)
        assert cited and set(cited) <= sections, f"{path.relative_to(ROOT)} cites {cited or 'no section'}"


def test_the_loss_heads_and_extra_inputs_are_listed_once():
    """The loss contract's lists are exported by plugin_kit (check_loss_plugin reads them from there); the heads
    are written in registry.py, which is torch-free, so that building a loss checks its head in `longtail check`
    and in a stage alike."""
    hits = _code_lines(r'\("linear", "linear_nobias", "cosine"\)')
    assert hits and not _only_in(hits, "pipeline/registry.py"), "\n".join(hits)
    hits = _code_lines(r'\{"features", "weight"\}|"features" and "weight"')
    assert not _only_in(hits, "pipeline/plugin_kit.py"), "\n".join(hits)
